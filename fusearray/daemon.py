"""Mount lifecycle: open the array, mount, serve, commit, unmount.

    python -m fusearray.daemon ARRAY MOUNTPOINT [--cache-size N] [--ready-fd FD]
        [--owner USER] [--group GROUP] [--mode MODE] [--ctl-group GROUP]
        [--metrics-port PORT]

`fusearray mount` runs this in the foreground, or (--background) as a child
that reports readiness through a pipe: `ok` once the mount serves requests,
or `error: MESSAGE`, after any number of `warning: MESSAGE` lines (e.g. how
the previous daemon ended, when not cleanly).

A daemon never dies from a request (every task under its nursery is
guarded); if it still dies of an unexpected error, `died` puts the
traceback in ARRAY/daemon.log, an event in the events journal and a crash
record in ARRAY/crash.json (which the next mount reports), and detaches the
mountpoint lazily so it is not left stale.

The libfuse interposer (fallocate support, see fusearray.native) must be
loaded before pyfuse3 is imported, so this module imports pyfuse3 and
everything above it lazily. What of the native layer is active is logged
and put in an event at mount (native.summary()).
"""
import argparse
import errno
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback

log = logging.getLogger("fusearray")


def clear_stale_mount(mnt: str) -> None:
    """A mountpoint whose daemon died answers ENOTCONN: detach it lazily."""
    try:
        os.stat(mnt)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("mountpoint %s is stale (its daemon died): detaching it", mnt)
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def setup_logging(array_path: str, foreground: bool, debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fh = logging.FileHandler(os.path.join(array_path, "daemon.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError:
        pass
    if foreground:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh.setLevel(logging.WARNING)
        root.addHandler(sh)


def _mounted(mnt: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[1].replace("\\040", " ") == mnt:
            return True
    return False


def first_error(e: BaseException) -> BaseException:
    """The first leaf of an exception group (trio wraps a task's error)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def died(array_path: str, array, mnt: str | None, e: BaseException) -> str:
    """The daemon is dying of `e`: say so wherever it can be found later.
    Returns the one-line reason."""
    leaf = first_error(e)
    reason = f"{type(leaf).__name__}: {leaf}".strip()
    reason = " ".join(reason.split())[:500]
    log.critical("the daemon died of an unexpected error: %s\n%s", reason,
                 "".join(traceback.format_exception(e)))
    msg = (f"the daemon (pid {os.getpid()}) died of an unexpected error: {reason} "
           f"(a bug: the traceback is in {os.path.join(array_path, 'daemon.log')})")
    if array is not None:
        try:
            array.record_death(msg)
        except Exception:
            log.exception("cannot record the death as an event")
    record = {"pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "error": reason, "mountpoint": mnt}
    try:
        from .store import write_file_atomic
        write_file_atomic(os.path.join(array_path, "crash.json"),
                          (json.dumps(record) + "\n").encode())
    except OSError as err:
        log.error("cannot write the crash record: %s", err)
    if mnt and _mounted(mnt):       # (no stat: that would ask our own dead mount)
        r = subprocess.run(["fusermount3", "-u", "-z", mnt], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode:
            log.error("cannot detach the mount %s: %s", mnt, r.stderr.strip())
        else:
            log.error("detached the mount %s (lazily)", mnt)
    return reason


def run(array_path: str, mnt: str, cache_size: int, ready_fd: int | None = None,
        debug: bool = False, perms: dict | None = None, log_dir: str | None = None,
        fsync: str = "log", metrics_port: int | None = None,
        index_cache: int | None = None, rados: dict | None = None) -> int:
    """`perms`: the mount's --owner, --group, --mode, --ctl-group
    (fusearray.perms.resolve); `log_dir`: --log (the intent log's directory);
    `fsync`: --fsync (log or commit); `metrics_port`: --metrics-port (serve
    ctl/metrics over HTTP on 127.0.0.1); `index_cache`: --index-cache
    (bytes of RAM for the block index's cache)."""
    from .perms import UMASK
    os.umask(UMASK)         # nothing the daemon creates is for other users (logs, data)
    from . import native
    shim = native.load_interposer()     # before pyfuse3 is imported
    import trio

    from . import perms as access_mod
    from .array import Array
    from .errors import ArrayError

    foreground = ready_fd is None

    def ready(msg: str, final: bool = True, echo: bool = True) -> None:
        """Tell `fusearray mount --background` (the ready fd) how the mount
        went; in the foreground, errors and warnings go to stderr (`echo`:
        unless the caller prints its own)."""
        nonlocal ready_fd
        if foreground and echo and msg.startswith(("error: ", "warning: ")):
            print(f"fusearray: {msg.split(': ', 1)[1]}", file=sys.stderr)
        if ready_fd is not None:
            try:
                os.write(ready_fd, (msg + "\n").encode())
            except OSError:
                final = True
            finally:
                if final:
                    os.close(ready_fd)
                    ready_fd = None

    setup_logging(array_path, ready_fd is None, debug)
    faulthandler.enable()     # a fatal signal's stack to stderr (the daemon log when detached)
    array = None
    try:
        mnt = os.path.abspath(mnt)
        if not os.path.isdir(mnt):
            clear_stale_mount(mnt)
        if not os.path.isdir(mnt):
            raise ArrayError(errno.ENOENT, f"mountpoint {mnt} is not a directory")
        if os.path.ismount(mnt):
            raise ArrayError(errno.EBUSY, f"{mnt} is already a mountpoint: unmount it "
                             "first (fusearray umount)")
        access = access_mod.resolve(**(perms or {}))
        array = Array(array_path, cache_size, log_dir, fsync, index_cache=index_cache,
                      **(rados or {}))
    except ArrayError as e:
        ready(f"error: {e.message}", echo=False)
        print(f"fusearray: {e.message}", file=sys.stderr)
        return 1
    try:
        return trio.run(_serve, array, mnt, shim, ready, debug, access, metrics_port)
    except ArrayError as e:
        ready(f"error: {e.message}", echo=False)
        print(f"fusearray: {e.message}", file=sys.stderr)
        return 1
    except BaseException as e:      # nothing should get here: it is a bug
        if isinstance(first_error(e), KeyboardInterrupt):
            raise
        reason = died(array_path, array, mnt, e)
        ready(f"error: the daemon died: {reason}", echo=False)
        print(f"fusearray: the daemon died of an unexpected error: {reason} (see "
              f"{os.path.join(array_path, 'daemon.log')})", file=sys.stderr)
        return 70           # EX_SOFTWARE


async def _serve(array, mnt, shim, ready, debug, access, metrics_port=None) -> int:
    import pyfuse3
    import trio

    from . import metrics, native
    from .fs import Operations, install_fallocate
    from .streamsock import StreamServer

    from .errors import ArrayError

    async with trio.open_nursery() as nursery:
        # known before the open: the open's events reach event.d hooks with
        # FUSEARRAY_MOUNT (nothing uses the mount before it is up)
        array.mountpoint = mnt
        try:
            await array.open(nursery)
        except ArrayError as e:
            ready(f"error: {e.message}")
            await array.close()
            nursery.cancel_scope.cancel()
            return 1
        if metrics_port is not None:
            try:
                await nursery.start(metrics.serve_http, lambda: metrics.render(array),
                                    metrics_port)
            except OSError as e:
                ready(f"error: cannot serve metrics on 127.0.0.1:{metrics_port}: "
                      f"{e.strerror or e}")
                await array.close()
                nursery.cancel_scope.cancel()
                return 1
            array.event("info", f"metrics served at http://127.0.0.1:{metrics_port}/metrics")
        ops = Operations(array, access)
        streams = StreamServer(array)
        if await nursery.start(streams.serve):
            ops.stream_socket = streams.name
        opts = set(pyfuse3.default_options)
        # every user may reach the mount (allow_other); the kernel checks each
        # access against the files' modes (default_permissions: fusearray.perms)
        opts |= {"fsname=fusearray", "subtype=fusearray", "allow_other",
                 "default_permissions"}
        if debug:
            opts.add("debug")
        try:
            pyfuse3.init(ops, mnt, opts)
        except RuntimeError as e:
            await streams.close()
            await array.close()
            ready(f"error: cannot mount {mnt}: {e}")
            nursery.cancel_scope.cancel()
            return 1
        fallocate = install_fallocate(shim, ops, nursery)
        log.info("%s", native.summary())
        array.event("info", native.summary())
        if not fallocate:
            array.event("warning", "fallocate (punch-hole, discard) is not available: "
                        "the libfuse interposer is not in use "
                        f"({native.why().get(native.INTERPOSER, 'not installed')}); "
                        "fallocate and a loop device's discard fail with EOPNOTSUPP. "
                        "Write zeros instead to free blocks: zero blocks are stored free")
        nursery.start_soon(_on_signals, pyfuse3, array)
        if os.environ.get(TEST_CRASH_ENV):
            nursery.start_soon(_test_crash, os.environ[TEST_CRASH_ENV])
        log.info("mounted %s on %s", array.path, mnt)
        for note in array.previous_session:
            ready(f"warning: {note}", final=False)
        nursery.start_soon(_restore_shares, array, ready, nursery)
        clean = False
        lost = 0
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            clean = True
        finally:
            try:
                array.iscsi.kill_all()          # (left only if the mount went otherwise)
                with trio.CancelScope(shield=True):
                    await streams.close()       # its sessions end before the array
                    lost = await array.close()  # > 0: acknowledged writes not stored
            finally:
                pyfuse3.close(unmount=clean)      # the shim sends queued replies first
                nursery.cancel_scope.cancel()
    if shim is not None:
        log.info("%d read replies were sent by the shim's reply thread",
                 shim.async_replies())
        log.info("%d read replies were gathered from several buffers",
                 shim.planned_replies())
    log.info("unmounted %s", mnt)
    if lost:
        log.error("%d bytes of acknowledged writes could not be stored and are lost "
                  "(see the events)", lost)
        return 1
    return 0


TEST_CRASH_ENV = "FUSEARRAY_TEST_CRASH_FILE"


async def _test_crash(path: str) -> None:
    """TESTS ONLY (FUSEARRAY_TEST_CRASH_FILE=PATH in the daemon's
    environment): once PATH exists, raise an error in a task of the main
    nursery, as a bug would, to test what a dying daemon leaves."""
    import trio
    while not os.path.exists(path):
        await trio.sleep(0.05)
    raise RuntimeError(f"test crash requested through {TEST_CRASH_ENV}")


async def _restore_shares(array, ready, nursery) -> None:
    """The recorded iSCSI shares are served again, now that the mount
    answers (tgtd opens the LUN files through it); then the mount says it
    is ready, with a warning for each share not served (or after
    iscsi.RESTORE_WAIT seconds, the restore going on)."""
    import trio

    from .iscsi import RESTORE_WAIT
    done = trio.Event()
    notes: list = []

    async def restore():
        notes.extend(await array.iscsi.restore())
        done.set()
    nursery.start_soon(restore)
    with trio.move_on_after(RESTORE_WAIT):
        await done.wait()
    if not done.is_set():
        notes.append(f"the iSCSI shares are not all served after {RESTORE_WAIT:.0f} s: "
                     "see ctl/status and the events")
    for note in notes:
        ready(f"warning: {note}", final=False)
    ready("ok")


async def _on_signals(pyfuse3, array) -> None:
    import trio

    from .iscsi import STOP_WAIT
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for _ in sigs:
            log.info("signal received: unmounting")
            # tgtd first, while the mount still answers the requests its
            # closes send (else the unmount is busy and tgtd hangs)
            with trio.move_on_after(2 * STOP_WAIT):
                await array.iscsi.close()
            pyfuse3.terminate()
            return


def _size(text: str) -> int:
    from .errors import ArrayError
    from .util import parse_bytes
    try:
        return parse_bytes(text, "index cache size")
    except ArrayError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fusearray-daemon")
    p.add_argument("array")
    p.add_argument("mountpoint")
    p.add_argument("--cache-size", type=int, default=None)
    p.add_argument("--index-cache", type=_size, default=None,
                   help="RAM for the block index's cache (bytes, or 64M)")
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--log", default=None, help="the intent log's directory")
    p.add_argument("--fsync", choices=("log", "commit"), default="log",
                   help="what makes an fsync durable: the intent log or a full commit")
    p.add_argument("--owner", help="owner of LUN and shadow copy files (default: root)")
    p.add_argument("--group", help="their group (default: disk)")
    p.add_argument("--mode", help="their mode (default: 0660; write bits off when read-only)")
    p.add_argument("--ctl-group", help="group that may write ctl/ verbs (default: none)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve ctl/metrics at http://127.0.0.1:PORT/metrics")
    p.add_argument("--lease", type=float, default=None,
                   help="rados packs: the mount's lease in seconds (default 30)")
    p.add_argument("--break-lock", action="store_true",
                   help="rados packs: take them over from a live holder, fencing it")
    p.add_argument("--accept-stale", action="store_true",
                   help="rados packs: open this array directory although another copy "
                        "of it wrote them since (what that copy stored since is dropped)")
    a = p.parse_args(argv)
    from . import default_cache_size
    perms = {"owner": a.owner, "group": a.group, "mode": a.mode, "ctl_group": a.ctl_group}
    return run(a.array, a.mountpoint, a.cache_size or default_cache_size(), a.ready_fd,
               a.debug, perms, a.log, a.fsync, a.metrics_port, a.index_cache,
               rados_options(a.lease, a.break_lock, a.accept_stale))


def rados_options(lease: float | None, break_lock: bool, accept_stale: bool = False) -> dict:
    """--lease, --break-lock and --accept-stale as Array's keywords."""
    out: dict = {"break_lock": break_lock}
    if accept_stale:
        out["accept_stale"] = True
    if lease is not None:
        out["lease"] = lease
    return out


if __name__ == "__main__":
    sys.exit(main())
