"""The `fusearray` command (DESIGN section 6).

Array-side commands (init, mount, umount) act on directories; every other
command talks to a mount through its ctl/ files, exactly as a shell script
would (`exec 3<>ctl/VERB; echo ARGS >&3; cat <&3`), with the ctl client
fusearray/ctlclient.py; one subcommand per verb of ctl.VERB_NAMES. Export and import hand
the daemon their file's descriptor through its stream socket instead
(fusearray/streamsock.py), so the stream does not cross FUSE; ctl/export
and ctl/import are the fallback.

Exit codes: 0 success; 1 the array refused or failed, or the command
could not reach it (`fusearray: MESSAGE` on stderr; a ctl verb's message
names the errno, e.g. EEXIST); 2 a usage error (argparse's message);
130 interrupted (Ctrl-C), except `events --follow`, which ends with 0.
`wait JOB` is 1 unless the job is done. The mount(8) helper has mount's
codes instead (fusearray/mounthelper.py).
"""
import argparse
import errno
import json
import os
import queue
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

from . import STREAM_SOCKET_XATTR, ctlclient, default_cache_size
from .ctlclient import VERB_NAMES
from .errors import ArrayError

DEFAULT_ARRAY = os.path.join(os.environ.get("XDG_DATA_HOME") or
                             os.path.expanduser("~/.local/share"), "fusearray", "default")
DEFAULT_MOUNT = "/mnt/fusearray"


class UserError(Exception):
    """Printed as `fusearray: MESSAGE`, exit status 1."""


# ---- talking to a mount ------------------------------------------------------------
def mountpoint(args) -> str:
    mnt = args.mount or os.environ.get("FUSEARRAY_MOUNT")
    if not mnt:
        raise UserError("no mount given: use -m MOUNTPOINT or set FUSEARRAY_MOUNT")
    if not os.path.isdir(os.path.join(mnt, "ctl")):
        raise UserError(f"{mnt} is not a mounted fusearray (no ctl/ directory)")
    return mnt


def ctl_call(mnt: str, verb: str, words: list[str]) -> dict:
    """Run one command through ctl/VERB; returns the reply as a dict."""
    try:
        err, pairs = ctlclient.call(mnt, verb, " ".join(words))
    except FileNotFoundError:
        raise UserError(f"this array has no verb {verb!r}") from None
    if err:
        raise UserError(str(ctlclient.CtlError(err, pairs, verb)))
    return pairs


read_ctl = ctlclient.read_view
status_json = ctlclient.status


# ---- array-side commands ---------------------------------------------------------
def cmd_init(args) -> int:
    from .array import init_array
    from .util import parse_bytes
    from . import home
    init_array(args.array, args.pack, parse_bytes(args.block_size, "block size"),
               args.verify, args.log, args.ceph_conf)
    where = args.array if home.is_cluster(args.array) else os.path.abspath(args.array)
    print(f"initialised array {where}")
    return 0


def resolve_array(args) -> str:
    """The array directory to mount: ARRAY itself, or for `rados:POOL/NAME`
    (an array in a Ceph cluster) this host's cache directory of it, made or
    refreshed from the cluster (--cache-dir, default
    /var/cache/fusearray/POOL/NAME)."""
    from . import home
    if not home.is_cluster(args.array):
        if args.cache_dir is not None:
            raise UserError("--cache-dir is for an array in a Ceph cluster (rados:POOL/NAME)")
        return args.array
    from .array import ceph_conf_now
    conf = os.path.abspath(args.ceph_conf) if args.ceph_conf else ceph_conf_now()
    return home.prepare_cache_dir(args.array, args.cache_dir, conf)


def cmd_mount(args) -> int:
    from .util import parse_bytes
    from .perms import resolve
    cache = parse_bytes(args.cache_size, "cache size") if args.cache_size else default_cache_size()
    perms = {"owner": args.owner, "group": args.group, "mode": args.mode,
             "ctl_group": args.ctl_group}
    index_cache = (parse_bytes(args.index_cache, "index cache size")
                   if args.index_cache else None)
    resolve(**perms)        # a bad user, group or mode is refused here, before forking
    if args.lease is not None and not 2 <= args.lease <= 3600:
        raise UserError("--lease: give 2 to 3600 seconds")
    from .daemon import rados_options
    rados = rados_options(args.lease, args.break_lock, args.accept_stale)
    args.array = resolve_array(args)
    if not args.background:
        from . import daemon
        return daemon.run(args.array, args.mountpoint, cache, None, args.debug, perms,
                          args.log, args.fsync, args.metrics_port, index_cache, rados)
    return start_background(args.array, args.mountpoint, cache, args.debug, perms, args.log,
                            args.fsync, args.metrics_port, index_cache, rados)


def start_background(array: str, mnt: str, cache: int, debug: bool = False,
                     perms: dict | None = None, log_dir: str | None = None,
                     fsync: str = "log", metrics_port: int | None = None,
                     index_cache: int | None = None, rados: dict | None = None) -> int:
    from .perms import mount_args
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "fusearray.daemon", os.path.abspath(array),
           os.path.abspath(mnt), "--cache-size", str(cache), "--ready-fd", str(w),
           *mount_args(**(perms or {}))]
    if debug:
        cmd.append("--debug")
    if log_dir is not None:
        cmd += ["--log", os.path.abspath(log_dir)]
    if fsync != "log":
        cmd += ["--fsync", fsync]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    if index_cache is not None:
        cmd += ["--index-cache", str(index_cache)]
    if (rados or {}).get("lease") is not None:
        cmd += ["--lease", str(rados["lease"])]
    if (rados or {}).get("break_lock"):
        cmd.append("--break-lock")
    if (rados or {}).get("accept_stale"):
        cmd.append("--accept-stale")
    try:        # what the daemon itself cannot log (a crash's traceback) goes to its log
        err = os.open(os.path.join(array, "daemon.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                      0o600)
    except OSError:
        err = subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, pass_fds=(w,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
    finally:
        if err != subprocess.DEVNULL:
            os.close(err)
    os.close(w)
    with os.fdopen(r) as f:
        lines = f.read().strip().splitlines()
    for line in lines[:-1]:        # e.g. how the previous daemon ended
        print(f"fusearray: {line}", file=sys.stderr)
    msg = lines[-1] if lines else ""
    if msg != "ok":
        proc.wait(timeout=30)
        raise UserError(msg.removeprefix("error: ") or
                        f"the daemon exited with status {proc.returncode} before mounting "
                        f"(see {array}/daemon.log)")
    print(f"mounted {os.path.abspath(array)} on {os.path.abspath(mnt)} (pid {proc.pid})")
    return 0


def cmd_umount(args) -> int:
    mnt = os.path.abspath(args.mountpoint)
    pid = None
    try:
        st = status_json(mnt)
        pid = st["pid"]
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
            print(f"detached stale mount {mnt} (its daemon had died)")
            return 0
        raise UserError(f"{mnt} is not a mounted fusearray: {e.strerror}") from None
    # every acknowledged write stored and committed first, or no unmount:
    # the daemon keeps serving and keeps the data (DESIGN 4.1)
    try:
        reply = ctl_call(mnt, "sync", ["all"] + (["discard=yes"] if args.discard else []))
    except UserError as e:
        raise UserError(f"not unmounting {mnt}: {e}") from None
    dropped = int(reply.get("dropped_bytes", 0) or 0)
    if dropped:
        print(f"fusearray: dropped {dropped} bytes of acknowledged writes that could "
              "not be stored (--discard; see the events)", file=sys.stderr)
    # tgtd holds the shared LUNs open: stop their targets (kept for the
    # next mount), and serve them again if the unmount fails
    stopped = []
    try:
        for v in st["luns"]:
            if (v.get("iscsi") or {}).get("serving"):
                ctl_call(mnt, "unshare", [v["name"], "keep=yes"])
                stopped.append(v["name"])
        r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"cannot unmount {mnt}: {r.stderr.strip()} (detach loop "
                            "devices with `fusearray detach LUN` and close open files first)")
    except UserError:
        for name in stopped:
            try:
                ctl_call(mnt, "share", [name])
            except UserError as e:
                print(f"fusearray: {e}", file=sys.stderr)
        raise
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
        except OSError:
            break
        time.sleep(0.05)
    return 0


# ---- mount-side commands -------------------------------------------------------------
def cmd_verb(args) -> int:
    mnt = mountpoint(args)
    reply = ctl_call(mnt, args.verb, args.words)
    if args.json:
        print(json.dumps(reply))
    else:
        for k, v in reply.items():
            if k != "status":
                print(f"{k}={v}")
    return 0


def cmd_share(args) -> int:
    words = [args.lun] + ([f"portal={args.portal}"] if args.portal else []) + (
        [f"initiator={','.join(args.initiator)}"] if args.initiator else [])
    args.verb, args.words = "share", words
    return cmd_verb(args)


def cmd_unshare(args) -> int:
    args.verb, args.words = "unshare", [args.lun] + (["keep=yes"] if args.keep else [])
    return cmd_verb(args)


def cmd_status(args) -> int:
    mnt = mountpoint(args)
    sys.stdout.write(read_ctl(mnt, "status.json" if args.json else "status"))
    return 0


def cmd_events(args) -> int:
    mnt = mountpoint(args)
    as_json = getattr(args, "json", False)
    if (args.follow or as_json or args.since is not None) and \
            not os.path.exists(os.path.join(mnt, "ctl", "events.json")):
        raise UserError(f"{mnt} has no ctl/events.json (a daemon older than this "
                        "fusearray: mount the array again)")
    if args.follow:
        return follow_events(mnt, args.since, as_json)
    if args.since is None and not as_json:
        sys.stdout.write(read_ctl(mnt, "events"))      # as it always was
        return 0
    evs = [e for e in read_events(mnt) if args.since is None or e["id"] > args.since]
    sys.stdout.write("".join(_event_line(e, as_json) for e in evs))
    return 0


# ---- iostat -------------------------------------------------------------------------
def read_metrics(mnt: str) -> dict:
    """ctl/metrics's samples (metrics.parse)."""
    from . import metrics
    if not os.path.exists(os.path.join(mnt, "ctl", "metrics")):
        raise UserError(f"{mnt} has no ctl/metrics (a daemon older than this fusearray: "
                        "mount the array again)")
    return metrics.parse(read_ctl(mnt, "metrics"))


def cmd_iostat(args) -> int:
    """As `zpool iostat -v`: without -w, one report of the totals since the
    mount; with -w SECONDS, a report of the per-second rates since the
    mount, then one every SECONDS of the rates over that interval, COUNT
    reports in all (default: until Ctrl-C, which exits 0)."""
    from . import metrics
    mnt = mountpoint(args)
    if args.interval is None:
        sys.stdout.write(metrics.iostat(read_metrics(mnt), parsable=args.parsable))
        return 0
    prev = None
    cur = read_metrics(mnt)
    now = time.monotonic()
    since = max(time.time() - cur.get(("fusearray_start_time_seconds", ()), 0.0), 1e-3)
    try:
        done = 0
        while True:
            if done:
                sys.stdout.write("\n")
            sys.stdout.write(metrics.iostat(cur, prev, since, args.parsable))
            sys.stdout.flush()
            done += 1
            if args.count is not None and done >= args.count:
                return 0
            time.sleep(max(0.0, now + args.interval - time.monotonic()))
            prev, cur = cur, read_metrics(mnt)
            since, now = time.monotonic() - now, time.monotonic()
    except KeyboardInterrupt:
        return 0


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return v


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of reports (1 or more)")
    return int(text)


# ---- events --follow ---------------------------------------------------------------
#: How often `events --follow` reads ctl/events.json, in seconds.
FOLLOW_POLL = 0.2
#: What a mount answers while its daemon is gone or restarting.
_MOUNT_DOWN = (errno.ENOTCONN, errno.ENOENT, errno.ECONNABORTED, errno.ENODEV,
               errno.ESHUTDOWN, errno.EIO)


def read_events(mnt: str) -> list[dict]:
    """ctl/events.json (one open, read to its end: one consistent view),
    oldest first. A torn or foreign line is skipped."""
    out = []
    with open(os.path.join(mnt, "ctl", "events.json"), "rb") as f:
        data = f.read()
    for line in data.splitlines():
        try:
            e = json.loads(line)
            e["id"] = int(e["id"])
        except (ValueError, TypeError, KeyError):
            continue
        out.append(e)
    return out


def _event_line(e: dict, as_json: bool) -> str:
    from .util import iso_time
    if as_json:
        return json.dumps(e) + "\n"
    return f"{iso_time(e['time'])} {e['level']} {e['message']}\n"    # as ctl/events


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop()


def follow_events(mnt: str, since: int | None, as_json: bool, poll: float = FOLLOW_POLL,
                  out=None, err=None) -> int:
    """`events --follow`: the kept events after `since` (None: all of
    them), then each new one as it comes, each printed once, in id order.
    A mount that is gone or not answering (its daemon restarting) is
    waited for, and following resumes from the last id printed. Ids skipped
    (pruned before they were read, or lost by a crash) are said on stderr.
    Ctrl-C and SIGTERM end it (exit 0)."""
    import signal
    out = out or sys.stdout
    err = err or sys.stderr
    last = since
    down = printed = False
    old = signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            try:
                evs = read_events(mnt)
            except OSError as e:
                if e.errno not in _MOUNT_DOWN:
                    raise UserError(f"cannot read {mnt}/ctl/events.json: "
                                    f"{e.strerror or e}") from None
                if not down:
                    print(f"fusearray: {mnt} is not answering ({e.strerror}); waiting for "
                          "it to come back", file=err, flush=True)
                    down = True
                time.sleep(poll)
                continue
            if down:
                print(f"fusearray: {mnt} is back; following from event "
                      f"{last if last is not None else 0}", file=err, flush=True)
                down = False
            if evs and last is not None and evs[-1]["id"] < last and printed:
                # the array's newest id is below ours: events were lost in a
                # crash and their ids are given again: follow from its newest
                print(f"fusearray: the array's newest event is {evs[-1]['id']}, "
                      f"below the last printed ({last}): events of the previous "
                      "daemon were lost; following from there", file=err, flush=True)
                last = evs[-1]["id"]
            new = [e for e in evs if last is None or e["id"] > last]
            if new:
                if last is not None and new[0]["id"] > last + 1:
                    a, b = last + 1, new[0]["id"] - 1
                    print(f"fusearray: event(s) {a}" + (f"-{b}" if b > a else "")
                          + " were not seen: removed from the kept events (or lost) "
                          "before they could be read", file=err, flush=True)
                out.write("".join(_event_line(e, as_json) for e in new))
                out.flush()
                last = new[-1]["id"]
                printed = True
            time.sleep(poll)
    except (KeyboardInterrupt, _Stop):
        return 0
    except BrokenPipeError:              # `| head`: the reader is gone
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_jobs(args) -> int:
    jobs = status_json(mountpoint(args))["jobs"]
    if args.json:
        print(json.dumps(jobs))
        return 0
    for j in jobs:
        print(f"{j['id']} {j['kind']} {j['state']} {j['percent']}%")
    return 0


def read_job(mnt: str, jid: str) -> dict:
    try:
        return ctlclient.job(mnt, jid)
    except FileNotFoundError:
        raise UserError(f"no job {jid!r}") from None


def cmd_wait(args) -> int:
    """Show a progress bar until the job ends; non-zero unless it is done."""
    mnt = mountpoint(args)
    tty = sys.stderr.isatty()
    last = None
    while True:
        job = read_job(mnt, args.job)
        state, pct = job["state"], int(job["percent"])
        line = (f"job {job['id']} {job['kind']} [{'#' * (pct // 5):20}] {pct:3}% "
                f"{state} {int(job['rate_bytes_per_s']) >> 20} MiB/s")
        if tty:
            sys.stderr.write("\r" + line)
        elif (state, pct // 10) != last:
            print(line, file=sys.stderr)
            last = (state, pct // 10)
        if state in ("done", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if tty:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(job))
    if state != "done":
        raise UserError(f"job {args.job} {state}" + (f": {job['error']}" if job.get("error") else ""))
    return 0


class Progress:
    """A progress bar on stderr when it is a terminal."""

    def __init__(self, label: str, total: int | None):
        self.label, self.total, self.done = label, total, 0
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self.last > 0.2:
            self.last = now
            if self.total:
                pct = min(100, self.done * 100 // self.total)
                sys.stderr.write(f"\r{self.label} [{'#' * (pct // 5):20}] {pct:3}% "
                                 f"{self.done >> 20} MiB")
            else:
                sys.stderr.write(f"\r{self.label} {self.done >> 20} MiB")

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


PEERCRED = struct.Struct("3i")


def _private_opener(path, flags):
    """A new stream file is 0600: it holds the set's data (like the LUNs)."""
    return os.open(path, flags, 0o600)


def stream_socket(mnt: str) -> socket.socket | None:
    """A connection to the mount's stream socket, or None: the daemon has
    none, it is in another network namespace, or FUSEARRAY_STREAM_SOCKET=0
    (then export and import go through ctl/)."""
    if os.environ.get("FUSEARRAY_STREAM_SOCKET", "1") == "0":
        return None
    try:
        name = os.getxattr(os.path.join(mnt, "ctl"), STREAM_SOCKET_XATTR)
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dfd = None
    try:
        if name.startswith(b"/"):          # ARRAY/run/stream.sock (root and the daemon's user)
            from .streamsock import socket_address
            addr, dfd = socket_address(os.fsdecode(name))
            sock.connect(addr)
        else:                               # an older daemon's abstract socket
            sock.connect(b"\0" + name)
        _, uid, _ = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    PEERCRED.size))
        if uid not in (0, os.stat(mnt).st_uid):     # not the daemon: never hand it a file
            raise OSError(errno.EPERM, "the stream socket is not the array's")
    except OSError:
        sock.close()
        return None
    finally:
        if dfd is not None:
            os.close(dfd)
    return sock


def stream_call(mnt: str, sock: socket.socket, line: str, fd: int, label: str,
                total: int | None = None) -> dict:
    """Send `line` with descriptor `fd` through the stream socket, show the
    daemon's progress lines, return its reply. The mount is held busy (an
    open directory) meanwhile, as an open ctl/ file would hold it."""
    busy = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with sock:
            sock.sendmsg([(line + "\n").encode()],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            bar = Progress(label, total)
            reply, rest = None, b""         # the reply: `status=` and what follows it
            while data := sock.recv(65536):
                *lines, rest = (rest + data).split(b"\n")
                for text in lines:
                    key, _, value = text.decode(errors="replace").partition("=")
                    if key == "status" and reply is None:
                        reply = {}
                    if reply is not None:
                        reply[key] = value
                    elif key == "total":
                        bar.total = int(value)
                    elif key == "progress":
                        bar.add(int(value) - bar.done)
            bar.close()
    finally:
        os.close(busy)
    if reply is None:
        raise UserError(f"{line.split()[0]}: the array's daemon went away before the "
                        "stream ended")
    if reply.get("status") != "ok":
        raise UserError(reply.get("message") or "the array refused the stream")
    return reply


def _pump(read, write, on_chunk=None, depth: int = 4) -> None:
    """Copy chunks from read() (b"" at the end) to write(chunk), with the
    writes in a second thread: both are system calls that drop the GIL, so
    reading the next MiB overlaps writing the last (a serial loop left each
    side idle half the time). A write error stops the reading and is
    raised here; at most `depth` chunks are in flight."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    failed: list = []

    def drain():
        while (chunk := q.get()) is not None:
            if not failed:
                try:
                    write(chunk)
                except BaseException as e:      # re-raised in the caller's thread
                    failed.append(e)
    t = threading.Thread(target=drain, name="writer", daemon=True)
    t.start()
    try:
        while not failed and (chunk := read()):
            if on_chunk:
                on_chunk(chunk)
            q.put(chunk)
    finally:
        q.put(None)
        t.join()
    if failed:
        raise failed[0]


def cmd_export(args) -> int:
    mnt = mountpoint(args)
    if args.file.startswith("s3://"):
        return _export_s3(args, mnt)
    if args.bwlimit:
        raise UserError("export: --bwlimit is for s3:// targets only")
    sock = stream_socket(mnt)
    if sock is not None:
        return _export_by_socket(args, mnt, sock)
    from .transport import header_total
    fd = os.open(os.path.join(mnt, "ctl", "export"), os.O_RDWR)
    out = None
    try:
        try:
            os.write(fd, (args.set + (f" base={args.base}" if args.base else "") + "\n").encode())
        except OSError as e:
            pairs = ctlclient.parse_reply(os.read(fd, 65536))
            raise UserError(pairs.get("message") or os.strerror(e.errno)) from None
        out = sys.stdout.buffer if args.file == "-" else open(args.file, "wb",
                                                               opener=_private_opener)
        bar = None

        def progress(chunk):
            nonlocal bar
            if bar is None:
                bar = Progress(f"export {args.set}", header_total(chunk))
            bar.add(len(chunk))
        try:
            _pump(lambda: os.read(fd, 1 << 20), out.write, progress)
        except BrokenPipeError:
            out = None
            raise UserError("export: the output was closed before the stream "
                            "ended") from None
        if bar:
            bar.close()
        out.flush()
        if out is not sys.stdout.buffer:
            os.fsync(out.fileno())
    finally:
        os.close(fd)
        if out is not None and out is not sys.stdout.buffer:
            out.close()
        elif out is None:   # a broken pipe: don't let Python complain at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _export_by_socket(args, mnt: str, sock) -> int:
    """The daemon writes the stream to our file or standard output. A file
    this command created is removed if the export fails."""
    line = "export " + args.set + (f" base={args.base}" if args.base else "")
    if args.file == "-":
        sys.stdout.flush()
        stream_call(mnt, sock, line, sys.stdout.fileno(), f"export {args.set}")
        return 0
    created = not os.path.lexists(args.file)
    fd = os.open(args.file, os.O_WRONLY | os.O_CREAT, 0o600)    # the daemon truncates
    done = False
    try:
        stream_call(mnt, sock, line, fd, f"export {args.set}")
        os.fsync(fd)
        done = True
    finally:
        os.close(fd)
        if not done and created:
            os.unlink(args.file)
    return 0


def _skip(read, n: int) -> None:
    """Read past the first `n` bytes of a pipe (what a resumed import's
    array already has)."""
    while n > 0 and (got := read(min(n, 1 << 20))):
        n -= len(got)


def _import_by_socket(args, mnt: str, sock, opts: list, start: int) -> int:
    """The daemon reads the stream from our file or standard input, from
    `start` bytes past where it stands (a resume)."""
    fd = sys.stdin.fileno() if args.file == "-" else os.open(args.file, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        total = None
        if stat.S_ISREG(st.st_mode):
            pos = os.lseek(fd, start, os.SEEK_CUR)
            total = max(st.st_size - pos, 0)
        else:
            _skip(lambda n: os.read(fd, n), start)
        reply = stream_call(mnt, sock, " ".join(["import"] + opts), fd, "import", total)
    finally:
        if args.file != "-":
            os.close(fd)
    print(f"imported set {reply['set']} ({reply.get('blocks', '?')} blocks)")
    return 0


def cmd_import(args) -> int:
    mnt = mountpoint(args)
    if args.bwlimit and not args.file.startswith("s3://"):
        raise UserError("import: --bwlimit is for s3:// sources only")
    opts = []
    if args.as_name:
        opts.append(f"as={args.as_name}")
    if args.pack:
        opts.append(f"pack={args.pack}")
    if args.remap:
        opts.append("remap=yes")
    start = 0
    if args.resume:
        jobs = [j for j in status_json(mnt)["jobs"] if j["kind"] == "import"
                and j["state"] in ("paused", "running")]
        if not jobs:
            raise UserError("there is no interrupted import to resume")
        jid = str(jobs[-1]["id"])
        start = int(read_job(mnt, jid)["stream_offset"])
        opts += ["resume=yes", f"job={jid}"]
    if args.file.startswith("s3://"):
        return _import_s3(args, mnt, opts, start)
    sock = stream_socket(mnt)
    if sock is not None:
        return _import_by_socket(args, mnt, sock, opts, start)
    src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    fd = os.open(os.path.join(mnt, "ctl", "import"), os.O_RDWR)
    try:
        if start:
            if src is sys.stdin.buffer:
                _skip(src.read, start)
            else:
                src.seek(start)
        failed = None
        bar = Progress("import", os.fstat(src.fileno()).st_size - start
                       if src is not sys.stdin.buffer else None)
        def put(chunk):
            view = memoryview(chunk)
            while view:                  # a FUSE write may take less than asked
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "the array took no bytes of the stream")
                view = view[n:]
        try:
            os.write(fd, (" ".join(opts) + "\n").encode())
            _pump(lambda: src.read(1 << 20), put, lambda c: bar.add(len(c)))
        except OSError as e:
            failed = e
        bar.close()
        reply = ctlclient.read_reply(fd)
    finally:
        os.close(fd)
        if src is not sys.stdin.buffer:
            src.close()
    pairs = ctlclient.parse_reply(reply)
    if failed is not None or pairs.get("status") != "ok":
        raise UserError(pairs.get("message") or os.strerror(failed.errno))
    print(f"imported set {pairs['set']} ({pairs.get('blocks', '?')} blocks)")
    return 0


# ---- S3 (fusearray/s3.py: the layout, the verification, resume) ----------------------
def _s3_rate(args) -> int:
    from .util import parse_bytes
    return parse_bytes(args.bwlimit, "--bwlimit") if args.bwlimit else 0


def _big_pipe() -> tuple[int, int]:
    """A pipe of 4 MiB (root may exceed /proc/sys/fs/pipe-max-size), else
    1 MiB, else the default 64 KiB: fewer wake-ups of both ends."""
    import fcntl
    r, w = os.pipe()
    for size in (4 << 20, 1 << 20):
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
            break
        except OSError:
            pass
    return r, w


def _export_s3(args, mnt: str) -> int:
    """The stream into s3://BUCKET/PREFIX: the daemon writes it into a pipe
    (or ctl/export), a thread here cuts it into parts and uploads them; the
    manifest only once the array said the stream ended well."""
    from . import s3
    rate = _s3_rate(args)
    n = s3.concurrency_setting()
    target = s3.Target(args.file, pool=n + 2)
    up = s3.Uploader(target, args.set, args.base, s3.part_size_setting(), n, rate)
    line = args.set + (f" base={args.base}" if args.base else "")
    label = f"export {args.set}"
    try:
        sock = stream_socket(mnt)
        if sock is not None:
            r, w = _big_pipe()
            failed: list = []

            def drain():
                try:
                    up.pump(r)
                except BaseException as e:      # the S3 side failed: stop the array's writes
                    failed.append(e)
                finally:
                    os.close(r)                 # the daemon's next write gets EPIPE
            t = threading.Thread(target=drain, name="s3-export", daemon=True)
            t.start()
            try:
                reply = stream_call(mnt, sock, "export " + line, w, label)
            except UserError:
                if failed:
                    raise failed[0] from None
                raise
            finally:
                os.close(w)
                t.join()
            if failed:
                raise failed[0]
            sent = int(reply.get("bytes", up.bytes))
        else:
            fd = os.open(os.path.join(mnt, "ctl", "export"), os.O_RDWR)
            try:
                try:
                    os.write(fd, (line + "\n").encode())
                except OSError as e:
                    pairs = ctlclient.parse_reply(os.read(fd, 65536))
                    raise UserError(pairs.get("message") or os.strerror(e.errno)) from None
                up.pump(fd)
            finally:
                os.close(fd)
            sent = up.bytes
        m = up.finish(sent)
    except BaseException:
        up.abandon()
        raise
    print(f"exported set {args.set} to {target.url}: {m['bytes']} bytes in "
          f"{len(m['parts'])} parts ({up.uploaded} uploaded, {up.kept} already there)")
    return 0


def _above(fd: int, low: int) -> int:
    """`fd` moved above `low`. Killed, a process's descriptors are closed
    in ascending order: with the stream socket below the pipe, the daemon
    finds the client gone by the time it reads the pipe's end, and keeps the
    import for --resume instead of refusing it as truncated."""
    import fcntl
    if fd > low:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low + 1)
    os.close(fd)
    return new


def _import_s3(args, mnt: str, opts: list, start: int) -> int:
    """The parts of s3://BUCKET/PREFIX, each verified, from stream offset
    `start` into the array: through a pipe whose read end the daemon gets
    (or ctl/import). A damaged part ends the stream (the array refuses it
    as truncated and removes what it staged); any other S3 failure leaves
    the import interrupted, for --resume."""
    from . import s3
    rate = _s3_rate(args)
    n = s3.concurrency_setting()
    target = s3.Target(args.file, pool=n + 2)
    dl = s3.Downloader(target, n, rate)
    chunks = dl.chunks(start)
    line = " ".join(["import"] + opts)
    failed: list = []

    def damaged() -> bool:
        return bool(failed) and isinstance(failed[0], s3.S3Error) and \
            failed[0].errno == errno.EIO

    sock = stream_socket(mnt)
    if sock is not None:
        r, w = _big_pipe()
        w = _above(w, sock.fileno())

        def feed():
            try:
                for mv in chunks:
                    while mv:
                        mv = mv[os.write(w, mv):]
            except BaseException as e:
                failed.append(e)
                if not damaged():           # keep it: the daemon sees us gone first
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            finally:
                os.close(w)
        t = threading.Thread(target=feed, name="s3-import", daemon=True)
        t.start()
        try:
            reply = stream_call(mnt, sock, line, r, "import", dl.total - start)
        except UserError:
            if failed and not isinstance(failed[0], BrokenPipeError):
                raise _import_failure(failed[0], damaged()) from None
            raise
        finally:
            os.close(r)
            t.join()
        if failed:
            raise _import_failure(failed[0], damaged())
    else:
        fd = os.open(os.path.join(mnt, "ctl", "import"), os.O_RDWR)
        try:
            bar = Progress("import", dl.total - start)
            try:
                os.write(fd, (" ".join(opts) + "\n").encode())
                for mv in chunks:
                    while mv:
                        k = os.write(fd, mv)
                        if k <= 0:
                            raise OSError(errno.EIO, "the array took no bytes of the stream")
                        mv = mv[k:]
                        bar.add(k)
            except s3.S3Error as e:
                failed.append(e)
            except OSError:
                pass                    # the array refused: its reply says why
            bar.close()
            if failed and not damaged():
                raise _import_failure(failed[0], False)     # closed unasked: kept
            reply = ctlclient.parse_reply(ctlclient.read_reply(fd))
        finally:
            os.close(fd)
        if failed:
            raise _import_failure(failed[0], True)
        if reply.get("status") != "ok":
            raise UserError(reply.get("message") or "the array refused the stream")
    print(f"imported set {reply['set']} ({reply.get('blocks', '?')} blocks) from "
          f"{target.url}: {dl.downloaded} of {dl.total} bytes read"
          + (f" (resumed at {start})" if start else ""))
    return 0


def _import_failure(e: BaseException, removed: bool) -> BaseException:
    from .s3 import S3Error
    if not isinstance(e, S3Error):
        return e
    return S3Error(e.errno, e.message + ("; the import was refused and removed" if removed
                                         else "; what arrived is kept: run the same "
                                         "import with --resume to go on"))


def loop_devices(path: str) -> list[str]:
    r = subprocess.run(["losetup", "-j", path, "-O", "NAME", "-n"], capture_output=True,
                       text=True)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def cmd_attach(args) -> int:
    mnt = mountpoint(args)
    path = os.path.join(mnt, "luns", args.lun)
    if not os.path.exists(path):
        raise UserError(f"no LUN named {args.lun!r} in {mnt}")
    ro = os.getxattr(path, "user.fusearray.readonly") == b"on"
    cmd = ["losetup", "--direct-io=on", "--find", "--show"] + (["-r"] if ro else []) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"losetup failed: {r.stderr.strip()}")
    print(r.stdout.strip())
    return 0


def cmd_detach(args) -> int:
    mnt = mountpoint(args)
    path = os.path.join(mnt, "luns", args.lun)
    devs = loop_devices(path)
    if not devs:
        raise UserError(f"LUN {args.lun} is not attached to a loop device")
    for dev in devs:
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"losetup -d {dev} failed: {r.stderr.strip()}")
        print(f"detached {dev}")
    return 0


def cmd_install_unit(args) -> int:
    """Write the systemd unit template and this mount's environment file."""
    from . import systemdunit
    from .util import parse_bytes
    from . import home
    mnt = os.path.abspath(args.mountpoint or DEFAULT_MOUNT)
    cluster = []            # an array in a Ceph cluster: where its cache is, which cluster
    if args.array and home.is_cluster(args.array):
        array = "{}{}/{}".format(home.PREFIX, *home.parse(args.array))
        from .array import ceph_conf_now
        from .mounthelper import DEFAULT_CEPH_CONF
        conf = args.ceph_conf or ceph_conf_now() or (
            DEFAULT_CEPH_CONF if os.path.isfile(DEFAULT_CEPH_CONF) else None)
        if not conf:
            raise UserError(f"{array}: no Ceph cluster named: give --ceph-conf FILE (the "
                            "unit runs without $CEPH_CONF)")
        cluster = ["--ceph-conf", os.path.abspath(conf)]
        if args.cache_dir:
            cluster += ["--cache-dir", os.path.abspath(args.cache_dir)]
    else:
        if args.cache_dir or args.ceph_conf:
            raise UserError("--cache-dir and --ceph-conf are for an array in a Ceph cluster "
                            "(rados:POOL/NAME)")
        array = os.path.abspath(args.array or DEFAULT_ARRAY)
    if args.cache_size:
        parse_bytes(args.cache_size, "cache size")
    if args.index_cache:
        parse_bytes(args.index_cache, "index cache size")
    opts = []
    for flag, val in (("--cache-size", args.cache_size),
                      ("--index-cache", args.index_cache), ("--owner", args.owner),
                      ("--group", args.group), ("--mode", args.mode),
                      ("--ctl-group", args.ctl_group), ("--log", args.log)):
        if val:
            opts += [flag, os.path.abspath(val) if flag == "--log" else val]
    if args.fsync != "log":
        opts += ["--fsync", args.fsync]
    if args.lease is not None:
        if not 2 <= args.lease <= 3600:
            raise UserError("--lease: give 2 to 3600 seconds")
        opts += ["--lease", str(args.lease)]
    opts += cluster
    try:
        unit, written = systemdunit.install(array, mnt, opts, args.root)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot install the unit: {e}") from None
    for path in written:
        print(f"wrote {path}")
    print(f"to mount {array} on {mnt} at boot (and now, if it is not mounted yet):\n"
          f"  systemctl daemon-reload && systemctl enable --now {unit}")
    return 0


def cmd_up(args) -> int:
    """The main job: bring up the embedded default array and show it."""
    array, mnt = args.array or DEFAULT_ARRAY, args.mountpoint or DEFAULT_MOUNT
    if not os.path.exists(os.path.join(array, "array.json")):
        os.makedirs(array, exist_ok=True)
        cmd_init(argparse.Namespace(array=array, pack=None, block_size="64K", verify=False,
                                    log=None, ceph_conf=None))
    os.makedirs(mnt, exist_ok=True)
    if os.path.isdir(os.path.join(mnt, "ctl")):
        print(f"{array} is already mounted on {mnt}")
    else:
        start_background(array, mnt, default_cache_size())
    if not os.path.exists(os.path.join(mnt, "luns", "lun0")):
        ctl_call(mnt, "create", ["lun0", "1G"])
        print("created LUN lun0 (1G)")
    sys.stdout.write(read_ctl(mnt, "status"))
    print(f"""
Next steps (FUSEARRAY_MOUNT={mnt} lets you drop -m):
  export FUSEARRAY_MOUNT={mnt}
  dev=$(fusearray attach lun0) && mkfs.ext4 -q $dev && mkdir -p /mnt/lun0 && mount $dev /mnt/lun0
  echo "lun1 4G" > {mnt}/ctl/create          # or: fusearray create lun1 4G
  getfattr -d {mnt}/luns/lun0                 # WWN, serial, tags
  cat {mnt}/ctl/status {mnt}/ctl/events
  umount /mnt/lun0; fusearray detach lun0; fusearray umount {mnt}""")
    if args.install_unit:
        print()
        cmd_install_unit(argparse.Namespace(
            array=array, mountpoint=mnt, root=args.root, cache_size=None, index_cache=None,
            owner=None,
            group=None, mode=None, ctl_group=None, log=None, fsync="log", lease=None,
            cache_dir=None, ceph_conf=None))
        print(f"  (it is mounted now: `fusearray umount {mnt}` first, or enable without "
              "--now)")
    return 0


# ---- argument parsing ------------------------------------------------------------------
class _Version(argparse.Action):
    """--version: the package's version and fusearray.native's report."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version

        from . import native
        print(f"fusearray {version('fusearray')}")
        print(native.summary())
        parser.exit()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fusearray", description="A virtual storage array "
                                "in user space: LUNs and shadow copies as files on FUSE.")
    p.add_argument("-m", "--mount", help="mountpoint (default: $FUSEARRAY_MOUNT)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="the version and what of the native layer is active")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create an array")
    s.add_argument("array", help="a new or empty directory, or rados:POOL/NAME: an array "
                                 "wholly in a Ceph cluster (its packs rados packs, default "
                                 "main=rados:POOL), mountable from any host")
    s.add_argument("--pack", action="append", metavar="NAME=LAYOUT:DIR[,DIR...]",
                   help="a pack: NAME=single:DIR, NAME=mirror:DIR,DIR[,DIR], "
                        "NAME=raid5:DIR,DIR,DIR[,...] or NAME=rados:POOL (a RADOS pool)")
    s.add_argument("--ceph-conf", metavar="FILE",
                   help="the ceph.conf of the cluster rados packs live on "
                        "(default: $CEPH_CONF); recorded in the array")
    s.add_argument("--block-size", default="64K")
    s.add_argument("--verify", action="store_true",
                   help="confirm dedup hits byte for byte")
    s.add_argument("--log", metavar="DIR",
                   help="keep the intent log (what makes fsync fast) in DIR, e.g. on a "
                        "faster device; default: ARRAY/log")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("mount", help="mount an array")
    s.add_argument("array", help="its directory, or rados:POOL/NAME (an array in a Ceph "
                                 "cluster)")
    s.add_argument("mountpoint")
    s.add_argument("--cache-dir", metavar="DIR",
                   help="an array in a Ceph cluster: this host's cache directory of it "
                        "(default /var/cache/fusearray/POOL/NAME)")
    s.add_argument("--ceph-conf", metavar="FILE",
                   help="an array in a Ceph cluster: the cluster's ceph.conf (default "
                        "$CEPH_CONF)")
    s.add_argument("--background", action="store_true")
    s.add_argument("--cache-size", default=None)
    s.add_argument("--index-cache", default=None, metavar="SIZE",
                   help="RAM for the block index's cache (default 64M; the index "
                        "itself is on disk, in the catalogue)")
    s.add_argument("--debug", action="store_true")
    s.add_argument("--log", metavar="DIR",
                   help="move the intent log to DIR (replayed from where it was first)")
    s.add_argument("--fsync", choices=("log", "commit"), default="log",
                   help="log (default): an fsync is one append to the intent log; "
                        "commit: every fsync is a full commit (the pack's write errors "
                        "answer the fsync that meets them)")
    s.add_argument("--owner", metavar="USER",
                   help="owner of the LUN and shadow copy files (default: root)")
    s.add_argument("--group", metavar="GROUP",
                   help="their group (default: disk, as for block devices)")
    s.add_argument("--mode", metavar="MODE",
                   help="their mode, octal (default: 0660; write bits off when read-only)")
    s.add_argument("--ctl-group", metavar="GROUP",
                   help="a group whose members may write ctl/ verbs (0660); default: "
                        "root only (0600)")
    s.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="also serve ctl/metrics (Prometheus text) at "
                        "http://127.0.0.1:PORT/metrics")
    s.add_argument("--lease", type=float, metavar="SECONDS",
                   help="rados packs: this mount's lease on each (default 30): another "
                        "host may take them over this long after this daemon ends")
    s.add_argument("--break-lock", action="store_true",
                   help="rados packs: take them over from a mount that still holds "
                        "them, fencing it off the cluster first (its writes then fail)")
    s.add_argument("--accept-stale", action="store_true",
                   help="rados packs: open this array directory although another copy of "
                        "it (another host's) has written them since: what that copy "
                        "stored since is dropped (refused with ESTALE otherwise)")
    s.set_defaults(fn=cmd_mount)

    s = sub.add_parser("umount", help="unmount (waits for the final commit; refuses "
                       "while acknowledged writes cannot be stored)")
    s.add_argument("mountpoint")
    s.add_argument("--discard", action="store_true",
                   help="drop acknowledged writes that cannot be stored (a full or "
                   "failed pack) instead of refusing; an event says how much")
    s.set_defaults(fn=cmd_umount)

    s = sub.add_parser("up", help="init, mount and show the default array")
    s.add_argument("--array", default=None)
    s.add_argument("--mountpoint", default=None)
    s.add_argument("--install-unit", action="store_true",
                   help="also install the systemd unit that mounts it at boot "
                        "(as install-unit)")
    s.add_argument("--root", default="/", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("install-unit", help="install the systemd unit fusearray@.service "
                       "for an array and its mountpoint (default: up's)")
    s.add_argument("array", nargs="?", default=None)
    s.add_argument("mountpoint", nargs="?", default=None)
    s.add_argument("--root", default="/", metavar="DIR",
                   help="write under DIR instead of / (DIR/etc/systemd/system, "
                        "DIR/etc/fusearray)")
    s.add_argument("--cache-size", default=None)
    s.add_argument("--index-cache", default=None, metavar="SIZE")
    s.add_argument("--log", metavar="DIR")
    s.add_argument("--fsync", choices=("log", "commit"), default="log")
    s.add_argument("--owner", metavar="USER")
    s.add_argument("--group", metavar="GROUP")
    s.add_argument("--mode", metavar="MODE")
    s.add_argument("--ctl-group", metavar="GROUP")
    s.add_argument("--lease", type=int, metavar="SECONDS",
                   help="the lease of an array in a Ceph cluster or of rados packs")
    s.add_argument("--cache-dir", metavar="DIR",
                   help="an array in a Ceph cluster: this host's cache directory of it")
    s.add_argument("--ceph-conf", metavar="FILE",
                   help="an array in a Ceph cluster: its cluster's ceph.conf (default "
                        "$CEPH_CONF, else /etc/ceph/ceph.conf), written into the unit")
    s.set_defaults(fn=cmd_install_unit)

    for name, fn, what in (("status", cmd_status, "show ctl/status (--json: ctl/status.json)"),
                           ("events", cmd_events, "show the events (ctl/events)"),
                           ("jobs", cmd_jobs, "list the jobs: id, kind, state, percent")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        s.set_defaults(fn=fn)
        if name == "events":
            s.add_argument("-f", "--follow", action="store_true",
                           help="print new events as they come (across daemon restarts)")
            s.add_argument("--since", type=int, metavar="ID",
                           help="only events with an id above ID (ctl/events.json's ids)")
    s = sub.add_parser("export", help="write a shadow copy set as a stream")
    s.add_argument("set")
    s.add_argument("file", help="a file, - for standard output, or s3://BUCKET/PREFIX")
    s.add_argument("--base", help="incremental against this set")
    s.add_argument("--bwlimit", metavar="RATE",
                   help="s3:// only: at most RATE bytes per second (e.g. 50M)")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("import", help="bring a set exported elsewhere into this array")
    s.add_argument("file", help="a file, - for standard input, or s3://BUCKET/PREFIX")
    s.add_argument("--bwlimit", metavar="RATE",
                   help="s3:// only: at most RATE bytes per second (e.g. 50M)")
    s.add_argument("--as", dest="as_name", help="the set's name here")
    s.add_argument("--pack", help="pack to store it on (default main)")
    s.add_argument("--remap", action="store_true",
                   help="give the shadow copies new WWNs if theirs are taken here")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted import of this stream")
    s.set_defaults(fn=cmd_import)
    s = sub.add_parser("iostat", help="I/O per pack and LUN, as zpool iostat -v")
    s.add_argument("-w", dest="interval", type=_positive, metavar="SECONDS",
                   help="a report every SECONDS: per-second rates over the interval")
    s.add_argument("-p", dest="parsable", action="store_true",
                   help="exact numbers (bytes, nanoseconds) instead of human units")
    s.add_argument("count", nargs="?", type=_count, metavar="COUNT",
                   help="with -w: this many reports, then exit (default: until Ctrl-C)")
    s.set_defaults(fn=cmd_iostat)
    s = sub.add_parser("wait", help="wait for a job, with a progress bar")
    s.add_argument("job")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_wait)
    for name, fn, what in (("attach", cmd_attach, "attach a LUN to a loop device (prints it)"),
                           ("detach", cmd_detach, "detach a LUN's loop devices")):
        s = sub.add_parser(name, help=what)
        s.add_argument("lun")
        s.set_defaults(fn=fn)
    s = sub.add_parser("share", help="serve a LUN over iSCSI (ctl/share)")
    s.add_argument("lun")
    s.add_argument("--portal", metavar="ADDR:PORT",
                   help="where its target listens (default 127.0.0.1:3260)")
    s.add_argument("--initiator", action="append", metavar="IQN",
                   help="an initiator allowed to log in (repeat for more; default: any "
                        "initiator that reaches the portal)")
    s.set_defaults(fn=cmd_share)
    s = sub.add_parser("unshare", help="stop serving a LUN over iSCSI (ctl/unshare)")
    s.add_argument("lun")
    s.add_argument("--keep", action="store_true",
                   help="stop its target but keep the share for the next mount")
    s.set_defaults(fn=cmd_unshare)
    for verb in VERB_NAMES:
        if verb in ("share", "unshare"):        # (their own options above)
            continue
        s = sub.add_parser(verb, help=f"ctl/{verb}")
        s.add_argument("words", nargs=argparse.REMAINDER)
        s.set_defaults(fn=cmd_verb, verb=verb)
    args = p.parse_args(argv)
    if args.fn is cmd_iostat and args.count is not None and args.interval is None:
        p.error("iostat: COUNT needs -w SECONDS")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except (UserError, ArrayError) as e:
        print(f"fusearray: {e}", file=sys.stderr)
        return 1
    except OSError as e:        # a mount that went away under the command, a full disk
        print(f"fusearray: {e.filename + ': ' if e.filename else ''}"
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
