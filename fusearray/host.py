"""What this host does with the array's files (#19): which loop devices are
attached to a LUN or shadow copy and where their file systems are
mounted, and freezing those file systems for the instant of a shadow copy
set.

- `attachments_blocking(mountpoint)`: {"luns/NAME" or "snapshots/SET/NAME":
  [Attachment(device, mounts)]}, from /sys/block/loopN/loop/backing_file
  (the path the kernel holds: a file under our mount) and, for the device
  and its partitions, /proc/self/mountinfo (major:minor -> mountpoints).
  Blocking, but only sysfs and procfs, and never a path on our own mount
  (a stat there would be a FUSE request to this very daemon): callers run
  it in a worker thread all the same.
- `Freeze`: an async context manager that freezes mountpoints through the
  freezer child (freezer.py: why a child, and how the thaw cannot be
  missed) within a time limit, and thaws them when the block ends, however
  it ends.
"""
import dataclasses
import errno
import os
import subprocess
import sys
import time

import trio

from .errors import ArrayError, ioerror

#: A freeze that is not complete after this many seconds aborts the set
#: (VSS's writer timeout is 10 s too).
FREEZE_TIMEOUT = 10.0
#: The freezer thaws on its own after this many seconds frozen, whatever
#: the daemon does.
FREEZE_HOLD = 60.0
#: How long the thaw may take before the daemon stops waiting for it.
THAW_WAIT = 10.0


@dataclasses.dataclass
class Attachment:
    device: str                 # /dev/loopN
    mounts: list                # where it (or a partition of it) is mounted

    def describe(self) -> str:
        return self.device + (f" mounted on {', '.join(self.mounts)}" if self.mounts else "")


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = field.encode()
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def mounts_by_device(mountinfo: str = "/proc/self/mountinfo") -> dict:
    """{"major:minor": [mountpoint, ...]}."""
    out: dict = {}
    try:
        with open(mountinfo) as f:
            for line in f:
                parts = line.split(" ")
                if len(parts) > 4:
                    out.setdefault(parts[2], []).append(_unescape(parts[4]))
    except OSError:
        pass
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def attachments_blocking(mountpoint: str, sys_block: str = "/sys/block",
                         mountinfo: str = "/proc/self/mountinfo") -> dict:
    """{path under the mount: [Attachment]} of the loop devices whose
    backing file lies under `mountpoint` (see the module docstring)."""
    prefix = mountpoint.rstrip("/") + "/"
    try:
        names = sorted(n for n in os.listdir(sys_block) if n.startswith("loop"))
    except OSError:
        return {}
    found = []
    for name in names:
        backing = _read(os.path.join(sys_block, name, "loop", "backing_file"))
        if not backing:
            continue
        if backing.endswith(" (deleted)"):
            backing = backing[:-len(" (deleted)")]
        if not backing.startswith(prefix):
            continue
        devs = [_read(os.path.join(sys_block, name, "dev"))]
        try:                                            # partitions: loopNp1...
            for sub in os.listdir(os.path.join(sys_block, name)):
                if sub.startswith(name + "p"):
                    devs.append(_read(os.path.join(sys_block, name, sub, "dev")))
        except OSError:
            pass
        found.append((backing[len(prefix):], f"/dev/{name}", [d for d in devs if d]))
    if not found:
        return {}
    mounts = mounts_by_device(mountinfo)
    out: dict = {}
    for rel, dev, devs in found:
        where = [m for d in devs for m in mounts.get(d, [])]
        out.setdefault(rel, []).append(Attachment(dev, where))
    return out


def volume_key(vol) -> str:
    """The key of `vol` in attachments_blocking's result."""
    return f"luns/{vol.name}" if vol.kind == "lun" else f"snapshots/{vol.set_name}/{vol.name}"


class Freeze:
    """`async with Freeze(mounts) as fz:` the file systems mounted on
    `mounts` are frozen inside the block (`fz.frozen`: by us, `fz.already`:
    frozen by someone else, left so), thawed when it ends. Entering raises
    ArrayError when a freeze fails (its errno) or does not complete within
    `timeout` (EIO); nothing stays frozen then. `fz.held()` says whether
    the freezer can still be holding (False once the hold limit may have
    passed). `thaw_errors` lists the file systems whose thaw failed."""

    def __init__(self, mounts: list, timeout: float = FREEZE_TIMEOUT,
                 hold: float = FREEZE_HOLD, command: list | None = None):
        self.mounts = list(mounts)
        self.timeout, self.hold = timeout, hold
        self.command = command or [sys.executable, "-m", "fusearray.freezer"]
        self.frozen: list = []
        self.already: list = []
        self.thaw_errors: list = []
        self.proc = None
        self._buf = b""
        self._t0 = 0.0

    async def _line(self, proc) -> str | None:
        while b"\n" not in self._buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="backslashreplace")

    async def __aenter__(self):
        if not self.mounts:
            self._t0 = time.monotonic()
            return self
        # (python -m: the package must be importable by the child as by us)
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        try:
            self.proc = await trio.lowlevel.open_process(
                self.command + ["--hold", str(self.hold)] + self.mounts,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd="/")
        except OSError as e:
            raise ioerror(f"cannot start the freezer: {e.strerror or e}") from None
        with trio.move_on_after(self.timeout):
            while True:
                line = await self._line(self.proc)
                if line is None:
                    await self._end()
                    raise ioerror("the freezer ended before the file systems were "
                                  "frozen; the set was not taken")
                word, _, rest = line.partition(" ")
                if word == "frozen":
                    self.frozen.append(rest)
                elif word == "already":
                    self.already.append(rest)
                elif word == "error":
                    mnt, _, rest = rest.partition(" ")
                    name, _, msg = rest.partition(" ")
                    await self._end()
                    raise ArrayError(getattr(errno, name, errno.EIO),
                                     f"cannot freeze the file system on {mnt}: {msg}; "
                                     "the set was not taken (quiesce=no takes it "
                                     "crash-consistent)")
                elif word == "ready":
                    self._t0 = time.monotonic()
                    return self
        pending = [m for m in self.mounts if m not in self.frozen and m not in self.already]
        await self._end(wait=False)     # stuck in a FIFREEZE: it thaws when that returns
        raise ioerror(f"freezing the file system on {pending[0] if pending else '?'} did "
                      f"not complete within {self.timeout:g} s; the set was not taken "
                      "(what was frozen is thawed; quiesce=no takes it crash-consistent)")

    def held(self) -> bool:
        """True while the freezer surely still holds (a second's margin
        before its hold limit); always with nothing to freeze (no freezer,
        no limit: a set then waits for its commit however long it takes)."""
        if not self.mounts:
            return True
        return time.monotonic() - self._t0 < self.hold - 1.0

    async def __aexit__(self, *exc):
        if self.proc is not None:
            await self._end()
        return False

    async def _end(self, wait: bool = True) -> None:
        """Tell the freezer to thaw (and close its stdin: it thaws at EOF
        too); wait up to THAW_WAIT for what it says (not at all without
        `wait`). What it froze and did not say it thawed (it died) is
        thawed here, in a worker thread."""
        proc, self.proc = self.proc, None
        try:
            await proc.stdin.send_all(b"thaw\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await proc.stdin.aclose()
        thawed, ended = set(), False
        with trio.move_on_after(THAW_WAIT if wait else 0):
            while True:
                line = await self._line(proc)
                if line is None:
                    ended = True
                    break
                word, _, rest = line.partition(" ")
                if word == "thawed":
                    thawed.add(rest)
                elif word == "thaw-error":
                    mnt, _, msg = rest.partition(" ")
                    thawed.add(mnt)
                    self.thaw_errors.append(f"{mnt}: {msg}")
                elif word == "frozen":          # (a freeze that completed late)
                    self.frozen.append(rest)
        if ended:
            await proc.wait()
            for mnt in self.frozen:
                if mnt not in thawed:           # the freezer died: thaw it here
                    try:
                        await trio.to_thread.run_sync(_thaw, mnt)
                    except OSError as e:
                        if e.errno != errno.EINVAL:          # EINVAL: not frozen
                            self.thaw_errors.append(f"{mnt}: {e.strerror}")
        else:        # still in a freeze: it thaws when the ioctl returns (stdin closed)
            trio.lowlevel.spawn_system_task(proc.wait)


def _thaw(mnt: str) -> None:
    from .freezer import FITHAW, ioctl_path
    ioctl_path(mnt, FITHAW)
