"""The segment record format and the byte-level helpers every part of the
store shares. No state: functions, constants and a per-thread scratch
(safe from any thread).

On-disk record (one per block): header `MAGIC | id (16) | length (u32)`,
then the data. Files written here are the owner's alone (0600).
"""
import bisect
import errno
import os
import struct
import threading

from ..native import hash128_many, verify_mapped, xor_into  # noqa: F401 (for the package)
from ..perms import FILE_MODE

HDR = struct.Struct("<4s16sI")
MAGIC = b"FAB1"
IOV_MAX = 1024
NOWAIT = getattr(os, "RWF_NOWAIT", None)
#: write errors that say nothing about the disk: raised to the caller, not
#: counted against it (EFAULT: the source buffer faulted, e.g. a stream file
#: cut short under an import's mapping)
NOT_THE_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFAULT)

# The accelerators, imported here for the store's modules (None when not
# available, see fusearray.native): then pure-Python XOR (xor_at), hashing
# by python-xxhash with the GIL held (hasher.py), no reads from mapped
# files (reads.py).

_SCRATCH = threading.local()


def scratch(n: int):
    """Two n-byte buffers private to the calling thread, reused call after
    call (memoryviews; their content is whatever the last user left)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or len(bufs[0]) < n:
        bufs = _SCRATCH.bufs = (memoryview(bytearray(n)), memoryview(bytearray(n)))
    return bufs[0][:n], bufs[1][:n]


def xor(parts):
    """XOR of equal-length buffers (a new bytes-like object)."""
    acc = bytearray(parts[0])
    for p in parts[1:]:
        xor_at(acc, 0, p)
    return acc


def xor_at(acc: bytearray, at: int, src) -> None:
    """acc[at:at+len(src)] ^= src."""
    n = len(src)
    if xor_into is not None:
        xor_into(memoryview(acc)[at:at + n], src)
    else:
        x = int.from_bytes(acc[at:at + n], "little") ^ int.from_bytes(src, "little")
        acc[at:at + n] = x.to_bytes(n, "little")


class Gather:
    """A batch of buffers as one logical byte string, sliced into views
    without copying (RAID-5 cuts a batch of records into stripe chunks)."""

    def __init__(self, bufs):
        self.views = [memoryview(b) for b in bufs]
        self.starts = []
        pos = 0
        for v in self.views:
            self.starts.append(pos)
            pos += len(v)
        self.size = pos

    def slices(self, start: int, n: int) -> list:
        i = bisect.bisect_right(self.starts, start) - 1
        out = []
        while n > 0:
            v = self.views[i]
            o = start - self.starts[i]
            take = min(len(v) - o, n)
            if take > 0:
                out.append(v[o:o + take])
                start += take
                n -= take
            i += 1
        return out


def in_memory(path: str) -> bool:
    """Is `path` on tmpfs/ramfs (reads never block on a device)?"""
    path = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mnt = parts[4]
                typ = parts[parts.index("-") + 1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, typ
    except (OSError, ValueError, IndexError):
        return False
    return fstype in ("tmpfs", "ramfs")


def pwritev_all(fd: int, iov, offset: int) -> None:
    want = sum(len(b) for b in iov)
    done = os.pwritev(fd, iov, offset)
    if done != want:   # short write: finish it piecewise
        data = b"".join(bytes(b) for b in iov)
        while done < want:
            n = os.pwrite(fd, data[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write to segment")
            done += n


def write_file_atomic(path: str, data: bytes) -> None:
    """tmp, fsync, rename, fsync the directory. The file is 0600 (labels,
    array.json with the secret that keys the dedup hash)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)         # a .tmp left by an older version
            pwritev_all(fd, [data], 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        try:
            os.unlink(tmp)          # (a full file system: the part written goes too)
        except OSError:
            pass
        raise
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
