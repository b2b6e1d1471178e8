"""Serving LUNs over iSCSI (#18): each shared LUN is a target of a tgtd
(Debian's `tgt`, a user-space iSCSI target: no kernel module) that the
daemon starts, drives with tgtadm and stops, by PID.

- One tgtd per portal (ADDR:PORT) in use, so a target is reachable only on
  the portal it was shared on. Its control socket is
  ARRAY/run/tgtd-<portal>.0 (ARRAY/run is 0700: no other user, and no
  other tgtd, talks to it), reached through /proc/self/fd/N/ so a long
  array path still fits sun_path. tgtd binds another portal (0.0.0.0:3260)
  when it cannot bind the one asked: the portals it reports are checked
  before any target is made, and a tgtd with any other is stopped.
- One target per shared LUN, named `iqn.2026-12.org.fusearray:<the array
  uuid's first 8 hex digits>:<lun name, lower case, _ as ->`, with one
  logical unit (LUN 1) whose backing store is MOUNT/luns/NAME: tgtd opens
  the file through the mount, so a shared LUN is open, and resync, swap,
  delete and shrink are EBUSY unless forced, as for a loop device
  (`describe` gives their messages the share).
- Identity on the wire: scsi_sn = the LUN's serial (VPD page 0x80),
  scsi_id = its WWN (`naa.6` + 31 hex digits), from which tgt builds page
  0x83: an NAA designator, type 6 (IEEE Registered Extended, 16 bytes),
  equal to the WWN; a T10 vendor ID designator holding the WWN as text;
  and tgt's own NAA 3 (locally assigned, from its target and LUN numbers).
- Access: the initiator names given may log in, and only they; none given,
  every initiator that reaches the portal may (the default portal is
  127.0.0.1:3260: this host only).
- A read-only LUN's logical unit has readonly=1 (writes fail with
  DATA PROTECT). When what a logical unit was made from changes (the
  size, the read-only tag, the volume behind the name after a swap), it
  is made again (`refresh`): delete and new, as tgt reads a backing
  store's size only when it opens it.
- What survives: the shares are recorded in ARRAY/shares.json (written
  atomically) and served again by `restore` once the mount serves
  requests (tgtd opens the files through it). The tgtds' PIDs and start
  times are in ARRAY/run/tgtd.json: a tgtd left by a daemon that was
  killed is stopped when the array opens next (`open`), after checking
  /proc/PID is that very tgtd.
- Stopping: `close` stops every tgtd while the mount still serves (a
  tgtd closing its files sends FUSE requests); the records stay.
  `fusearray umount` stops the shares first (`unshare LUN keep=yes`),
  since an open file makes the unmount busy, and serves them again if
  the unmount fails.

Tasks: tgtadm runs as a child awaited by trio, never blocking the thread
that answers tgtd's FUSE requests; one task per tgtd waits for its exit
(an exit nobody asked for is an error event, and its shares show not
served). One lock serialises every change (share, unshare, refresh,
restore, close).
"""
import dataclasses
import errno
import ipaddress
import json
import os
import re
import signal
import subprocess
import time

import trio

from .errors import ArrayError, busy, exists, invalid, ioerror
from .perms import open_private, private_dir
from .store import write_file_atomic
from .util import unlink_quietly

SHARES_FILE = "shares.json"
RUN_DIR = "run"                    # streamsock.SOCKET_DIR: the array's private sockets
PIDS_FILE = "tgtd.json"            # in RUN_DIR
LOG_FILE = "iscsi.log"             # tgtd's output
IQN_PREFIX = "iqn.2026-12.org.fusearray"
DEFAULT_PORTAL = "127.0.0.1:3260"
LUN_NUMBER = 1                     # the logical unit of each target (0 is tgt's controller)
PRODUCT_ID = "fusearray"
#: How long tgtadm may take (its requests may wait for tgtd's FUSE requests).
ADM_TIMEOUT = 30.0
#: How long a tgtd has to come up, and to end once asked.
START_WAIT = 10.0
STOP_WAIT = 10.0
#: How long the mount's readiness waits for the shares to be served again.
RESTORE_WAIT = 30.0
#: How long an unshare waits for tgtd's handle of the LUN to be released.
RELEASE_WAIT = 5.0

_INITIATOR = re.compile(r"(iqn\.[0-9]{4}-[0-9]{2}\.[A-Za-z0-9][A-Za-z0-9.-]*(:[!-+\--~]+)?"
                        r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}([0-9A-Fa-f]{16})?)")


def parse_portal(text: str) -> str:
    """`ADDR:PORT` (an IPv4 address, or an IPv6 one in brackets), as tgtd
    takes it; EINVAL otherwise."""
    host, sep, port = text.rpartition(":")
    bad = invalid(f"bad portal {text[:80]!r}: give ADDR:PORT, an IP address and a TCP port "
                  f"(e.g. {DEFAULT_PORTAL}, or [::1]:3260)")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad
    v6 = host.startswith("[") and host.endswith("]")
    try:
        addr = ipaddress.ip_address(host[1:-1] if v6 else host)
    except ValueError:
        raise bad from None
    if (addr.version == 6) != v6:
        raise bad
    return f"[{addr}]:{int(port)}" if v6 else f"{addr}:{int(port)}"


def parse_initiators(text: str) -> list[str]:
    """`IQN[,IQN...]` (iqn., eui. or naa. names); EINVAL otherwise."""
    names = text.split(",")
    for n in names:
        if len(n) > 223 or not _INITIATOR.fullmatch(n):
            raise invalid(f"bad initiator name {n[:80]!r}: give iSCSI names "
                          "(iqn.YYYY-MM.reversed.domain[:id], eui.<16 hex> or naa.<hex>) "
                          "separated by commas")
    return list(dict.fromkeys(names))


def target_name(array_uuid: str, lun: str) -> str:
    """The target's IQN (iSCSI names are lower case, without `_`)."""
    return f"{IQN_PREFIX}:{array_uuid[:8]}:{lun.lower().replace('_', '-')}"


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot); None if gone
    or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else int(fields[19])


def _is_tgtd(pid: int, start: int) -> bool:
    """/proc/PID is the tgtd recorded: same start time, program tgtd."""
    if proc_start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(argv0) == b"tgtd"


@dataclasses.dataclass
class Share:
    lun: str
    portal: str
    initiators: list                # [] : every initiator that reaches the portal
    target: str
    tid: int = 0                    # its target id in its tgtd; 0 while not served
    made: tuple | None = None       # (vid, size, readonly) its logical unit was made for
    error: str | None = None        # why it is not served

    def record(self) -> dict:
        return {"portal": self.portal, "initiators": self.initiators}

    def describe(self) -> str:
        return f"shared over iSCSI as target {self.target} on {self.portal}"


class Tgtd:
    """One tgtd serving one portal: its process, its control socket, its
    targets' ids."""

    def __init__(self, portal: str, run_fd: int):
        self.portal = portal
        self.run_fd = run_fd
        self.socket = "tgtd-" + re.sub(r"[^0-9A-Za-z.]", "-", portal)
        self.proc: trio.Process | None = None
        self.start_time: int | None = None
        self.next_tid = 1
        self.stopping = False
        self.exited = trio.Event()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self) -> dict:
        return dict(os.environ, TGT_IPC_SOCKET=f"/proc/self/fd/{self.run_fd}/{self.socket}")

    async def start(self, log_fd: int) -> None:
        self.proc = await trio.lowlevel.open_process(
            ["tgtd", "-f", "--iscsi", f"portal={self.portal}"], env=self.env(),
            pass_fds=(self.run_fd,), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            cwd="/", start_new_session=True)
        self.start_time = proc_start_time(self.proc.pid)

    async def adm(self, *args: str) -> str:
        """Run `tgtadm --lld iscsi ARGS` against this tgtd; its output.
        EIO with tgtadm's message when it fails."""
        cmd = ["tgtadm", "--lld", "iscsi", *args]
        with trio.move_on_after(ADM_TIMEOUT) as scope:
            try:
                r = await trio.run_process(cmd, env=self.env(), pass_fds=(self.run_fd,),
                                           capture_stdout=True, capture_stderr=True,
                                           check=False)
            except OSError as e:
                raise ioerror(f"cannot run tgtadm: {e.strerror} (install the tgt "
                              "package)") from None
        if scope.cancelled_caught:
            raise ioerror(f"tgtadm {' '.join(args[:4])} took more than {ADM_TIMEOUT:.0f} s "
                          f"(tgtd pid {self.pid} for {self.portal} is not answering)")
        if r.returncode:
            msg = r.stderr.decode(errors="replace").strip().removeprefix("tgtadm: ")
            raise ArrayError(errno.EIO, f"tgtadm {' '.join(args[:4])}: {msg or 'failed'} "
                             f"(exit {r.returncode})")
        return r.stdout.decode(errors="replace")

    async def wait_ready(self) -> None:
        """Until tgtd answers; then check it listens on its portal and on
        nothing else (it falls back to 0.0.0.0:3260 when it cannot bind
        the one asked)."""
        deadline = trio.current_time() + START_WAIT
        while True:
            if self.exited.is_set():
                raise ioerror(f"tgtd for {self.portal} exited at start (see the array's "
                              f"{LOG_FILE})")
            try:
                out = await self.adm("--mode", "portal", "--op", "show")
                break
            except ArrayError:
                if trio.current_time() > deadline:
                    raise ioerror(f"tgtd for {self.portal} (pid {self.pid}) did not answer "
                                  f"within {START_WAIT:.0f} s") from None
                await trio.sleep(0.02)
        portals = [line.split(":", 1)[1].strip().rsplit(",", 1)[0]
                   for line in out.splitlines() if line.startswith("Portal:")]
        if portals != [self.portal]:
            raise busy(f"cannot listen on {self.portal}: the address is in use or not "
                       "this host's (the tgt service, or another program, may hold the "
                       "port: give another portal, e.g. portal=127.0.0.1:3261)")


class Shares:
    """The shares of one array and the tgtds serving them (see the module
    docstring). `lun(name)` finds a LUN (ENOENT), `mountpoint()` is where
    the array is mounted, `event(level, message)` logs."""

    def __init__(self, array_path: str, array_uuid: str, *, lun, mountpoint, event):
        self.path = array_path
        self.uuid = array_uuid
        self.lun = lun
        self.mountpoint = mountpoint
        self.event = event
        self.shares: dict[str, Share] = {}       # LUN name -> Share
        self.tgtds: dict[str, Tgtd] = {}         # portal -> its running tgtd
        self.lock = trio.Lock()
        self.nursery = None
        self.run_fd: int | None = None
        self.log_fd: int | None = None

    # ---- opening: the records, and what a killed daemon left running ----
    async def open(self, nursery) -> None:
        """Read the records and stop the tgtds a previous daemon left
        (before the mount: they would hold the portals)."""
        self.nursery = nursery
        records, stale, error = await trio.to_thread.run_sync(self._open_blocking)
        if error:
            self.event("error", f"cannot read {SHARES_FILE}: {error}; no LUN is shared over "
                       "iSCSI until shared again")
        for name, rec in records.items():
            self.shares[name] = Share(name, rec["portal"], list(rec.get("initiators", [])),
                                      target_name(self.uuid, name))
        for pid, portal, how in stale:
            self.event("warning", f"stopped tgtd (pid {pid}, portal {portal}) left running "
                       f"by the previous daemon ({how}); its shares are served again once "
                       "the mount is up")

    def _open_blocking(self):
        run = os.path.join(self.path, RUN_DIR)
        private_dir(run)
        self.run_fd = os.open(run, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        records, error = {}, None
        try:
            with open(os.path.join(self.path, SHARES_FILE)) as f:
                records = dict(json.load(f)["shares"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            error = str(e)
        stale = []
        pids = os.path.join(run, PIDS_FILE)
        try:
            with open(pids) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = {}
        for portal, rec in recorded.items():
            try:
                pid, start = int(rec["pid"]), int(rec["start"])
            except (KeyError, TypeError, ValueError):
                continue
            if _is_tgtd(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:      # (it ended meanwhile)
                    continue
                deadline = time.monotonic() + STOP_WAIT
                while proc_start_time(pid) == start and time.monotonic() < deadline:
                    time.sleep(0.02)
                stale.append((pid, portal, "SIGKILL"))
        if recorded:
            os.unlink(pids)
        return records, stale, error

    # ---- the records -------------------------------------------------------
    async def _save(self) -> None:
        data = {"format": 1, "shares": {n: s.record() for n, s in sorted(self.shares.items())}}
        await trio.to_thread.run_sync(write_file_atomic, os.path.join(self.path, SHARES_FILE),
                                      (json.dumps(data, indent=1) + "\n").encode())

    async def _save_pids(self) -> None:
        path = os.path.join(self.path, RUN_DIR, PIDS_FILE)
        data = {p: {"pid": t.pid, "start": t.start_time} for p, t in self.tgtds.items()}
        if data:
            await trio.to_thread.run_sync(write_file_atomic, path, json.dumps(data).encode())
        else:
            await trio.to_thread.run_sync(unlink_quietly, path)

    # ---- views ------------------------------------------------------------------
    def describe(self, name: str) -> str | None:
        """`shared over iSCSI as target IQN on PORTAL` for an EBUSY, or None."""
        s = self.shares.get(name)
        return s.describe() if s is not None else None

    def status(self, name: str) -> dict | None:
        s = self.shares.get(name)
        if s is None:
            return None
        return {"target": s.target, "portal": s.portal, "initiators": s.initiators,
                "serving": bool(s.tid), "error": s.error}

    # ---- commands -------------------------------------------------------------------
    async def share(self, vol, portal: str | None, initiators: str | None) -> Share:
        """Serve LUN `vol` on `portal` (ADDR:PORT) to `initiators`
        (IQN[,IQN...]), or serve it again: options not given (None) keep
        what was recorded, or take the defaults."""
        portal = parse_portal(portal) if portal is not None else None
        initiators = parse_initiators(initiators) if initiators is not None else None
        if self.mountpoint() is None:
            raise ArrayError(errno.EOPNOTSUPP, "the array is not mounted: tgtd serves a "
                             "LUN's file through the mount")
        if vol.hidden:
            raise invalid(f"LUN {vol.name} is hidden: a hidden LUN is not offered to "
                          f"hosts (`hidden {vol.name} off` first)")
        async with self.lock:
            old = self.shares.get(vol.name)
            portal = portal or (old.portal if old else DEFAULT_PORTAL)
            if initiators is None:
                initiators = old.initiators if old else []
            target = target_name(self.uuid, vol.name)
            other = next((s.lun for s in self.shares.values()
                          if s.target == target and s.lun != vol.name), None)
            if other is not None:
                raise exists(f"LUN {other} is shared as target {target} already: the names "
                             "differ only by case or _/- (rename one by a swap as=NAME)")
            if old is not None and old.tid and (old.portal, old.initiators) == (portal,
                                                                                initiators):
                return old          # served as asked
            share = Share(vol.name, portal, initiators, target)
            if old is not None and old.tid:
                await self._unserve(old)
            try:
                await self._serve(share, vol)
            except ArrayError as e:
                if old is not None:
                    old.error = e.message
                raise
            self.shares[vol.name] = share
            await self._save()
        self.event("info", f"LUN {vol.name} ({vol.wwn}) is {share.describe()}"
                   f" (initiators: {', '.join(initiators) if initiators else 'any'})")
        if not initiators and not ipaddress.ip_address(
                portal.rpartition(":")[0].strip("[]")).is_loopback:
            self.event("warning", f"LUN {vol.name} is shared on {portal} to any initiator "
                       "that reaches it: give initiator=IQN[,IQN...] to restrict it")
        return share

    async def unshare(self, name: str, keep: bool = False, vol=None) -> None:
        """Stop serving LUN `name`; `keep`: it stays recorded (the next
        mount, or `share NAME`, serves it again)."""
        async with self.lock:
            share = self.shares.get(name)
            if share is None:
                raise ArrayError(errno.ENOENT, f"LUN {name} is not shared")
            pid = self.tgtds[share.portal].pid if share.tid else None
            if share.tid:
                await self._unserve(share)
            share.error = "stopped (unshare keep=yes)" if keep else None
            if not keep:
                del self.shares[name]
                await self._save()
        if vol is not None and pid is not None:
            await self._wait_released(vol, pid)
        self.event("info", f"LUN {name}: iSCSI target {share.target} "
                   + ("stopped (kept for the next mount)" if keep else "removed"))

    async def refresh(self) -> None:
        """Make again each served logical unit whose volume, size or
        read-only tag changed (tgt reads them at its open)."""
        async with self.lock:
            for share in list(self.shares.values()):
                if not share.tid:
                    continue
                try:
                    vol = self.lun(share.lun)
                except ArrayError:
                    continue
                if share.made == self._made(vol):
                    continue
                tgtd = self.tgtds[share.portal]
                try:
                    await tgtd.adm("--mode", "logicalunit", "--op", "delete", "--tid",
                                   str(share.tid), "--lun", str(LUN_NUMBER))
                    await self._add_lu(tgtd, share.tid, share, vol)
                except ArrayError as e:
                    try:                        # no target rather than a stale one
                        await self._unserve(share)
                    except ArrayError:
                        pass
                    share.error = f"cannot update it after a change: {e.message}"
                    self.event("error", f"LUN {share.lun}: iSCSI target {share.target} "
                               f"stopped: {share.error}; `share {share.lun}` serves it again")

    async def restore(self) -> list[str]:
        """Serve the recorded shares (once the mount serves requests).
        Returns the warnings (what could not be served)."""
        notes = []
        async with self.lock:
            for share in list(self.shares.values()):
                if share.tid:
                    continue
                try:
                    vol = self.lun(share.lun)
                    if vol.hidden:
                        raise invalid("it is hidden (`hidden NAME off`, then `share NAME`)")
                    await self._serve(share, vol)
                except ArrayError as e:
                    share.error = e.message
                    notes.append(f"LUN {share.lun} is not served over iSCSI ({share.target} "
                                 f"on {share.portal}): {e.message}")
                    self.event("error", notes[-1])
                else:
                    self.event("info", f"LUN {share.lun} is {share.describe()} again")
        return notes

    async def close(self) -> None:
        """Stop every tgtd (the mount still serving); the records stay."""
        async with self.lock:
            for tgtd in list(self.tgtds.values()):
                await self._stop(tgtd, graceful=True)
            for share in self.shares.values():
                share.tid = 0

    def kill_all(self) -> None:
        """SIGKILL every tgtd, without waiting (the mount no longer serves,
        so a graceful end would wait for FUSE replies that never come)."""
        for tgtd in self.tgtds.values():
            tgtd.stopping = True
            if tgtd.proc is not None and tgtd.proc.returncode is None:
                tgtd.proc.kill()

    def close_fds(self) -> None:
        for fd in (self.run_fd, self.log_fd):
            if fd is not None:
                os.close(fd)
        self.run_fd = self.log_fd = None

    # ---- serving -------------------------------------------------------------------
    @staticmethod
    def _made(vol) -> tuple:
        return (vol.vid, vol.size, vol.readonly)

    async def _serve(self, share: Share, vol) -> None:
        """Make the target of `share` in its portal's tgtd (started if
        needed); nothing is left of it when this fails."""
        tgtd = await self._tgtd(share.portal)
        tid = tgtd.next_tid
        tgtd.next_tid += 1
        try:
            await tgtd.adm("--mode", "target", "--op", "new", "--tid", str(tid),
                           "--targetname", share.target)
            await self._add_lu(tgtd, tid, share, vol)
            if share.initiators:
                for name in share.initiators:
                    await tgtd.adm("--mode", "target", "--op", "bind", "--tid", str(tid),
                                   "--initiator-name", name)
            else:
                await tgtd.adm("--mode", "target", "--op", "bind", "--tid", str(tid),
                               "--initiator-address", "ALL")
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await tgtd.adm("--mode", "target", "--op", "delete", "--force",
                                   "--tid", str(tid))
                except ArrayError:
                    pass
                if not self._targets_of(tgtd, but=share):
                    await self._stop(tgtd, graceful=True)
            raise
        share.tid = tid
        share.error = None

    async def _add_lu(self, tgtd: Tgtd, tid: int, share: Share, vol) -> None:
        """The logical unit of target `tid`: the LUN's file, its identity
        and read-only tag (tgt takes no parameters with `new`)."""
        path = os.path.join(self.mountpoint(), "luns", vol.name)
        await tgtd.adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                       "--lun", str(LUN_NUMBER), "--bstype", "rdwr", "--backing-store", path)
        params = (f"scsi_id={vol.wwn},scsi_sn={vol.serial},product_id={PRODUCT_ID},"
                  f"readonly={int(vol.readonly)}")
        await tgtd.adm("--mode", "logicalunit", "--op", "update", "--tid", str(tid),
                       "--lun", str(LUN_NUMBER), "--params", params)
        share.made = self._made(vol)

    async def _unserve(self, share: Share) -> None:
        tgtd = self.tgtds[share.portal]
        try:
            await tgtd.adm("--mode", "target", "--op", "delete", "--force",
                           "--tid", str(share.tid))
        finally:
            share.tid = 0
            if not self._targets_of(tgtd):
                await self._stop(tgtd, graceful=True)

    def _targets_of(self, tgtd: Tgtd, but: Share | None = None) -> list:
        return [s for s in self.shares.values()
                if s.tid and s.portal == tgtd.portal and s is not but]

    async def _tgtd(self, portal: str) -> Tgtd:
        """The running tgtd of `portal`, started if there is none."""
        tgtd = self.tgtds.get(portal)
        if tgtd is not None:
            return tgtd
        if self.log_fd is None:
            self.log_fd = open_private(os.path.join(self.path, LOG_FILE),
                                       os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        tgtd = Tgtd(portal, self.run_fd)
        try:
            await tgtd.start(self.log_fd)
        except OSError as e:
            raise ArrayError(errno.EIO if e.errno != errno.ENOENT else errno.EOPNOTSUPP,
                             f"cannot start tgtd: {e.strerror} (install the tgt package: "
                             "apt-get install tgt)") from None
        self.tgtds[portal] = tgtd
        self.nursery.start_soon(self._watch, tgtd)
        try:
            await self._save_pids()         # (first: a SIGKILL from now on leaves it known)
            await tgtd.wait_ready()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop(tgtd, graceful=False)
            raise
        return tgtd

    async def _stop(self, tgtd: Tgtd, graceful: bool) -> None:
        """End `tgtd`: its targets deleted and asked to exit (graceful),
        killed if it does not within STOP_WAIT; waits for its exit."""
        tgtd.stopping = True
        with trio.CancelScope(shield=True):
            if graceful and not tgtd.exited.is_set():
                try:
                    for share in self._targets_of(tgtd):
                        await tgtd.adm("--mode", "target", "--op", "delete", "--force",
                                       "--tid", str(share.tid))
                    await tgtd.adm("--mode", "sys", "--op", "delete")
                except ArrayError as e:
                    self.event("warning", f"tgtd (pid {tgtd.pid}) for {tgtd.portal} did not "
                               f"stop when asked ({e.message}): killing it")
            with trio.move_on_after(STOP_WAIT if graceful else 0):
                await tgtd.exited.wait()
            if not tgtd.exited.is_set():
                tgtd.proc.kill()
                await tgtd.exited.wait()
            if self.tgtds.get(tgtd.portal) is tgtd:
                del self.tgtds[tgtd.portal]
            await self._save_pids()
            for name in (f"{tgtd.socket}.0", f"{tgtd.socket}.0.lock"):    # (tgtd leaves them)
                await trio.to_thread.run_sync(unlink_quietly, name, self.run_fd)

    async def _watch(self, tgtd: Tgtd) -> None:
        """Wait for `tgtd` to exit; an exit nobody asked for is an error."""
        status = await tgtd.proc.wait()
        tgtd.exited.set()
        if tgtd.stopping:
            return
        lost = [s for s in self.shares.values() if s.tid and s.portal == tgtd.portal]
        why = (f"tgtd (pid {tgtd.pid}) for {tgtd.portal} exited (status {status}); see "
               f"{os.path.join(self.path, LOG_FILE)}")
        for s in lost:
            s.tid = 0
            s.error = why
        if self.tgtds.get(tgtd.portal) is tgtd:
            del self.tgtds[tgtd.portal]
        self.event("error", why + (f": LUN(s) {', '.join(s.lun for s in lost)} are no longer "
                                   "served over iSCSI; `share LUN` serves one again"
                                   if lost else ""))
        await self._save_pids()

    @staticmethod
    async def _wait_released(vol, pid: int) -> None:
        """Until tgtd's handle of `vol` is released (FUSE sends the release
        after the close returns): an unshare is followed at once by
        commands that refuse an open LUN."""
        with trio.move_on_after(RELEASE_WAIT):
            while any(p == pid for p, _ in vol.holders):
                await trio.sleep(0.01)
