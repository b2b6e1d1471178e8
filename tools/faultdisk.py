#!/usr/bin/env python3
"""faultdisk: a passthrough FUSE filesystem that fails on command.

    python3 tools/faultdisk.py BACKING MOUNTPOINT [--ready-fd N] [--rules FILE]

Everything under MOUNTPOINT is BACKING's (files, directories, rename,
truncate, fsync, statfs), served one request at a time, with no attribute
caching: correct rather than fast. The kernel's page cache of the files is
kept (no direct_io), so a program may mmap them (fusearray's mapped reads).

Faults are rules, set at run time through the control file MOUNTPOINT/.faults
(not listed): each written line is one rule, `clear` removes them all;
`crash` takes back, in every file, what was written since its last good
fsync (what a power cut loses: file data only, not directory entries) and
drops the kernel's cached pages: run it while nothing has the files open
(after SIGKILL of the program using them). Reading the file gives the rules
and the counters as JSON.

    OP KIND [after=N] [bytes=N] [p=P seed=S] [count=N] [path=GLOB] [lose|keep]

  OP     write | read | fsync (fsync and fdatasync) | fsyncdir
  KIND   eio | enospc (write) | short (write: only the first half is written
         and its length returned)
  after=N    let N matching calls pass first (default 0: the next one fails)
  bytes=N    let N bytes of matching writes (or reads) pass first
  p=P        fail each matching call with probability P (seeded: seed=S)
  count=N    fail N times, then the rule is spent (default 1; 0: for ever)
  path=GLOB  match only paths (relative to the root, no leading /) that
             fnmatch GLOB, e.g. path='*/segments/*.seg'
  lose       (fsync) like Linux after a failed writeback: the bytes written
             to the file since its last good fsync are not stored (the file
             gets back its content and size from then) and the kernel's
             cached pages of it are dropped, so a reader sees the old bytes
  keep       (fsync, the default) the error is reported, the data is kept

Examples:
    echo 'write eio after=3' > MNT/.faults       # the 4th write from now fails
    echo 'write enospc bytes=1M count=0' > MNT/.faults   # full after 1 MiB more
    echo 'fsync eio lose path=*.seg' > MNT/.faults
    echo clear > MNT/.faults

`FaultDisk` (below) starts one as a child process for tests and tools: a
readiness pipe like fusearray's daemon, ended by PID, unmounted with
fusermount3 -u (lazily if it must).
"""
import argparse
import errno
import fnmatch
import json
import os
import random
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time

CONTROL = b".faults"
CTL_INO = 2**62
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC}
KINDS = {"write": ("eio", "enospc", "short"), "read": ("eio",),
         "fsync": ("eio",), "fsyncdir": ("eio",)}


def _num(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in UNITS else ""
    return int(t[:len(t) - len(unit)]) * UNITS[unit]


class Rule:
    """One fault rule (see the module doc for the syntax)."""

    def __init__(self, line: str):
        words = shlex.split(line)
        if len(words) < 2 or words[0] not in KINDS or words[1] not in KINDS[words[0]]:
            raise ValueError(f"bad rule {line!r}: want OP KIND ..., OP one of "
                             f"{', '.join(KINDS)}, KIND per OP {KINDS}")
        self.op, self.kind = words[0], words[1]
        self.after = 0
        self.bytes = 0
        self.p = None
        self.seed = 0
        self.count = 1
        self.glob = None
        self.lose = False
        for w in words[2:]:
            k, _, v = w.partition("=")
            if k == "after":
                self.after = int(v)
            elif k == "bytes":
                self.bytes = _num(v)
            elif k == "p":
                self.p = float(v)
            elif k == "seed":
                self.seed = int(v)
            elif k == "count":
                self.count = int(v)
            elif k == "path":
                self.glob = v
            elif k == "lose" and not v and self.op == "fsync":
                self.lose = True
            elif k == "keep" and not v:
                self.lose = False
            else:
                raise ValueError(f"bad rule {line!r}: unknown option {w!r}")
        self.rng = random.Random(self.seed)
        self.fired = 0
        self.text = line.strip()

    def spent(self) -> bool:
        return self.count > 0 and self.fired >= self.count

    def check(self, op: str, path: str, nbytes: int) -> bool:
        """Does this call fail? Counts the call (or its bytes) down."""
        if self.spent() or op != self.op:
            return False
        if self.glob is not None and not fnmatch.fnmatch(path, self.glob):
            return False
        if self.after > 0:
            self.after -= 1
            return False
        if self.bytes > 0:
            self.bytes -= nbytes
            if self.bytes >= 0:
                return False
            self.bytes = 0
        if self.p is not None and self.rng.random() >= self.p:
            return False
        self.fired += 1
        return True


class Faults:
    """The rule set and the counters (shared by the handlers)."""

    def __init__(self):
        self.rules: list[Rule] = []
        self.injected = {}          # "op kind" -> faults injected
        self.calls = {}             # op -> calls seen
        self.lost_bytes = 0         # bytes taken back by `lose` fsyncs and crashes
        self.crashes = 0

    def set(self, text: str) -> list[str]:
        """Add the rules of `text`; returns its commands (`clear`, `crash`),
        in order, for the caller to run."""
        new, commands = [], []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line in ("clear", "crash"):
                commands.append(line)
                continue
            new.append(Rule(line))
        if "clear" in commands:
            self.rules.clear()
        self.rules.extend(new)
        return commands

    def hit(self, op: str, path: str, nbytes: int = 0):
        """The rule that fails this call, or None."""
        self.calls[op] = self.calls.get(op, 0) + 1
        for r in self.rules:
            if r.check(op, path, nbytes):
                key = f"{op} {r.kind}" + (" lose" if r.lose else "")
                self.injected[key] = self.injected.get(key, 0) + 1
                return r
        return None

    def report(self) -> bytes:
        return (json.dumps({
            "rules": [{"rule": r.text, "fired": r.fired, "spent": r.spent()}
                      for r in self.rules],
            "injected": self.injected, "calls": self.calls,
            "lost_bytes": self.lost_bytes, "crashes": self.crashes}, sort_keys=True) + "\n").encode()


class _Journal:
    """What a file held before the writes since its last good fsync: enough
    to take them back (`lose`)."""

    def __init__(self, size: int):
        self.size = size            # the file's size at the last good fsync
        self.undo: list[tuple[int, bytes]] = []     # (offset, old bytes)

    def written(self, fd: int, off: int, n: int) -> None:
        if off < self.size:
            self.undo.append((off, os.pread(fd, min(n, self.size - off), off)))

    def revert(self, fd: int) -> int:
        lost = 0
        for off, old in reversed(self.undo):
            os.pwrite(fd, old, off)
            lost += len(old)
        cur = os.fstat(fd).st_size
        os.ftruncate(fd, self.size)
        return lost + max(cur - self.size, 0)


def make_operations(root: str, faults: Faults):
    import pyfuse3
    import trio

    class Ops(pyfuse3.Operations):
        def __init__(self):
            super().__init__()
            self.root = os.path.realpath(root)
            self.paths = {pyfuse3.ROOT_INODE: ""}     # inode -> path relative to root
            self.inos = {}                            # (st_dev, st_ino) -> inode
            self.next_ino = pyfuse3.ROOT_INODE + 1
            self.fhs = {}                             # fh -> [fd, inode]
            self.dirs = {}                            # fh -> inode
            self.journals = {}                        # inode -> _Journal
            self.ctl_buf = {}                         # fh -> bytes written to .faults
            self.next_fh = 1

        # ---- names and attributes ---------------------------------------------
        def _abs(self, rel: str) -> str:
            return os.path.join(self.root, rel) if rel else self.root

        def _path(self, ino: int) -> str:
            try:
                return self.paths[ino]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        def _child(self, parent: int, name: bytes) -> str:
            base = self._path(parent)
            name = os.fsdecode(name)
            return f"{base}/{name}" if base else name

        def _attr(self, rel: str, st=None):
            try:
                st = st or os.lstat(self._abs(rel))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            if rel == "":
                ino = pyfuse3.ROOT_INODE
            else:
                key = (st.st_dev, st.st_ino)
                ino = self.inos.get(key)
                if ino is None:
                    ino = self.inos[key] = self.next_ino
                    self.next_ino += 1
                self.paths[ino] = rel
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.generation = 0
            a.entry_timeout = 0
            a.attr_timeout = 0
            for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blocks"):
                setattr(a, f, getattr(st, f))
            a.st_blksize = 4096
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
            return a

        def _ctl_attr(self):
            a = pyfuse3.EntryAttributes()
            a.st_ino = CTL_INO
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = 0
            a.entry_timeout = a.attr_timeout = 0
            return a

        def _rename_tree(self, old: str, new: str) -> None:
            for ino, p in list(self.paths.items()):
                if p == old or p.startswith(old + "/"):
                    self.paths[ino] = new + p[len(old):]

        def _forget_path(self, rel: str) -> None:
            for ino, p in list(self.paths.items()):
                if p == rel:
                    del self.paths[ino]
                    self.journals.pop(ino, None)

        # ---- handlers -----------------------------------------------------------
        async def lookup(self, parent, name, ctx=None):
            if parent == pyfuse3.ROOT_INODE and name == CONTROL:
                return self._ctl_attr()
            if name == b".":
                return self._attr(self._path(parent))
            if name == b"..":
                return self._attr(os.path.dirname(self._path(parent)))
            return self._attr(self._child(parent, name))

        async def getattr(self, inode, ctx=None):
            if inode == CTL_INO:
                return self._ctl_attr()
            return self._attr(self._path(inode))

        async def setattr(self, inode, attr, fields, fh, ctx):
            if inode == CTL_INO:
                return self._ctl_attr()
            p = self._abs(self._path(inode))
            try:
                if fields.update_size:
                    if fh in self.fhs:
                        fd = self.fhs[fh][0]
                        self._journal(inode, fd).written(fd, attr.st_size, 1 << 62)
                        os.ftruncate(fd, attr.st_size)
                    else:
                        os.truncate(p, attr.st_size)
                if fields.update_mode:
                    os.chmod(p, stat.S_IMODE(attr.st_mode))
                if fields.update_uid or fields.update_gid:
                    os.chown(p, attr.st_uid if fields.update_uid else -1,
                             attr.st_gid if fields.update_gid else -1)
                if fields.update_atime or fields.update_mtime:
                    st = os.lstat(p)
                    os.utime(p, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            return self._attr(self._path(inode))

        async def opendir(self, inode, ctx):
            self._path(inode)
            fh = self.next_fh
            self.next_fh += 1
            self.dirs[fh] = inode
            return fh

        async def readdir(self, fh, start_id, token):
            rel = self._path(self.dirs[fh])
            try:
                names = sorted(os.listdir(self._abs(rel)))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            for i, name in enumerate(names[start_id:], start_id):
                child = f"{rel}/{name}" if rel else name
                try:
                    a = self._attr(child)
                except pyfuse3.FUSEError:
                    continue
                if not pyfuse3.readdir_reply(token, os.fsencode(name), a, i + 1):
                    break

        async def releasedir(self, fh):
            self.dirs.pop(fh, None)

        async def fsyncdir(self, fh, datasync):
            rel = self._path(self.dirs[fh])
            if faults.hit("fsyncdir", rel):
                raise pyfuse3.FUSEError(errno.EIO)
            fd = os.open(self._abs(rel), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        async def mkdir(self, parent, name, mode, ctx):
            rel = self._child(parent, name)
            try:
                os.mkdir(self._abs(rel), mode)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            return self._attr(rel)

        async def rmdir(self, parent, name, ctx):
            rel = self._child(parent, name)
            try:
                os.rmdir(self._abs(rel))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            self._forget_path(rel)

        async def unlink(self, parent, name, ctx):
            rel = self._child(parent, name)
            try:
                os.unlink(self._abs(rel))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            self._forget_path(rel)

        async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
            old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
            try:
                if flags:
                    raise OSError(errno.EINVAL, "rename flags")
                os.rename(self._abs(old), self._abs(new))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            self._forget_path(new)
            self._rename_tree(old, new)

        async def statfs(self, ctx):
            st = os.statvfs(self.root)
            s = pyfuse3.StatvfsData()
            for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
                setattr(s, f, getattr(st, f))
            return s

        def _new_fh(self, fd, inode) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.fhs[fh] = [fd, inode]
            return fh

        async def open(self, inode, flags, ctx):
            if inode == CTL_INO:
                fh = self.next_fh
                self.next_fh += 1
                self.ctl_buf[fh] = b""
                return pyfuse3.FileInfo(fh=fh, direct_io=True)
            rel = self._path(inode)
            try:
                fd = os.open(self._abs(rel), flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND
                                                       | os.O_DIRECT))
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            return pyfuse3.FileInfo(fh=self._new_fh(fd, inode), keep_cache=True)

        async def create(self, parent, name, mode, flags, ctx):
            rel = self._child(parent, name)
            try:
                fd = os.open(self._abs(rel), (flags | os.O_CREAT) & ~(os.O_APPEND | os.O_DIRECT),
                             mode)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            a = self._attr(rel)
            self.journals.pop(a.st_ino, None)
            return pyfuse3.FileInfo(fh=self._new_fh(fd, a.st_ino), keep_cache=True), a

        def _journal(self, inode: int, fd: int) -> _Journal:
            j = self.journals.get(inode)
            if j is None:
                j = self.journals[inode] = _Journal(os.fstat(fd).st_size)
            return j

        async def read(self, fh, off, size):
            if fh in self.ctl_buf:
                return faults.report()[off:off + size]
            fd, inode = self.fhs[fh]
            if faults.hit("read", self.paths.get(inode, "?"), size):
                raise pyfuse3.FUSEError(errno.EIO)
            try:
                return os.pread(fd, size, off)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None

        async def write(self, fh, off, buf):
            if fh in self.ctl_buf:
                self.ctl_buf[fh] += bytes(buf)
                text, nl, rest = self.ctl_buf[fh].rpartition(b"\n")
                if nl:
                    self.ctl_buf[fh] = rest
                    await self._control(text)
                return len(buf)
            fd, inode = self.fhs[fh]
            rule = faults.hit("write", self.paths.get(inode, "?"), len(buf))
            n = len(buf)
            if rule is not None:
                if rule.kind != "short":
                    raise pyfuse3.FUSEError(ERRNOS[rule.kind])
                if n > 1:
                    n //= 2
            try:
                self._journal(inode, fd).written(fd, off, n)
                return os.pwrite(fd, memoryview(buf)[:n], off)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None

        async def fsync(self, fh, datasync):
            if fh in self.ctl_buf:
                return
            fd, inode = self.fhs[fh]
            rule = faults.hit("fsync", self.paths.get(inode, "?"))
            if rule is not None:
                j = self.journals.pop(inode, None)
                if rule.lose and j is not None:
                    faults.lost_bytes += j.revert(fd)
                    # the kernel's cached pages go too: readers see the disk
                    await trio.to_thread.run_sync(_invalidate, inode)
                raise pyfuse3.FUSEError(errno.EIO)
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno) from None
            self.journals.pop(inode, None)

        async def flush(self, fh):
            if fh in self.ctl_buf and self.ctl_buf[fh].strip():
                text, self.ctl_buf[fh] = self.ctl_buf[fh], b""
                await self._control(text)

        async def _control(self, text: bytes) -> None:
            try:
                commands = faults.set(text.decode())
            except (ValueError, UnicodeDecodeError) as e:
                print(f"faultdisk: {e}", file=sys.stderr, flush=True)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            if "crash" in commands:
                for inode, j in list(self.journals.items()):
                    rel = self.paths.get(inode)
                    if rel is None:
                        continue
                    try:
                        fd = os.open(self._abs(rel), os.O_RDWR)
                    except OSError:
                        continue
                    try:
                        faults.lost_bytes += j.revert(fd)
                    finally:
                        os.close(fd)
                    await trio.to_thread.run_sync(_invalidate, inode)
                self.journals.clear()
                faults.crashes += 1

        async def release(self, fh):
            if self.ctl_buf.pop(fh, None) is not None:
                return
            fd, _ = self.fhs.pop(fh)
            os.close(fd)

        async def forget(self, inode_list):
            pass

    def _invalidate(inode):
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except (FileNotFoundError, OSError):
            pass

    return Ops()


def serve(backing: str, mnt: str, ready_fd: int | None = None, rules: str | None = None) -> int:
    import pyfuse3
    import trio

    faults = Faults()
    if rules:
        with open(rules) as f:
            faults.set(f.read())
    ops = make_operations(backing, faults)
    try:
        pyfuse3.init(ops, mnt, {"fsname=faultdisk", "subtype=faultdisk"})
    except Exception as e:
        if ready_fd is not None:
            os.write(ready_fd, f"mount failed: {e}\n".encode())
            os.close(ready_fd)
        raise
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: pyfuse3.terminate())
    try:
        trio.run(lambda: pyfuse3.main(min_tasks=2, max_tasks=8))
    finally:
        pyfuse3.close(unmount=True)
    return 0


class FaultDisk:
    """A faultdisk in a child process (for tests and tools)."""

    def __init__(self, backing: str, mnt: str, log: str | None = None):
        self.backing = str(backing)
        self.mnt = str(mnt)
        self.log = log
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    def start(self) -> "FaultDisk":
        r, w = os.pipe()
        cmd = [sys.executable, os.path.abspath(__file__), self.backing, self.mnt,
               "--ready-fd", str(w)]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(w,), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log:
                out.close()
            os.close(w)
        with os.fdopen(r) as f:
            msg = f.read().strip()
        if msg != "ok":
            self.proc.wait(timeout=30)
            self.proc = None
            raise RuntimeError(f"faultdisk mount failed: {msg!r}")
        return self

    def rules(self, *lines: str) -> None:
        with open(os.path.join(self.mnt, ".faults"), "w") as f:
            f.write("".join(l + "\n" for l in lines))

    def clear(self) -> None:
        self.rules("clear")

    def crash(self) -> None:
        """Clear the rules and lose every write not fsynced (a power cut)."""
        self.rules("clear", "crash")

    def report(self) -> dict:
        with open(os.path.join(self.mnt, ".faults")) as f:
            return json.loads(f.read())

    def stop(self) -> None:
        """Unmount and end the process (by its PID), lazily if it must."""
        if self.proc is None:
            if _stale(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
            return
        r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        if r.returncode:
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None
        if os.path.ismount(self.mnt) or _stale(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)


def _stale(path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--rules", help="a file of rules to start with")
    a = ap.parse_args(argv)
    return serve(a.backing, a.mountpoint, a.ready_fd, a.rules)


if __name__ == "__main__":
    sys.exit(main())
