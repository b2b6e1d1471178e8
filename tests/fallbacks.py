"""Punch-hole and discard as the tests do them, with the native layer or
without it (FUSEARRAY_NATIVE=0, the second CI leg).

Without the libfuse interposer the daemon has no fallocate op, so the
kernel answers fallocate() on a LUN file with EOPNOTSUPP, and a loop
device's discard (fstrim) fails the same way; README says to free space by
writing zeros instead (zero blocks are stored free). These helpers assert
exactly that fallback behaviour, then free the space that documented way,
so the test goes on to check the same outcome (the range reads zeros, its
blocks are freed) on both legs.
"""
import ctypes
import errno
import os
import subprocess

from fusearray import native

#: the daemons the tests start load the interposer (the first CI leg)
INTERPOSER = native.ENABLED
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def fallocate_punch(fd: int, off: int, length: int) -> int:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) on `fd`: 0 or the errno."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length):
        return ctypes.get_errno()
    return 0


def zero_range(fd: int, off: int, length: int) -> None:
    """Write zeros over [off, off+length) clipped to the file's size (what
    a punch hole reads as), 1 MiB at a time."""
    end = min(off + length, os.fstat(fd).st_size)
    chunk = bytes(1 << 20)
    while off < end:
        n = min(len(chunk), end - off)
        os.pwrite(fd, chunk[:n], off)
        off += n


def punch_hole(path: str, off: int, length: int) -> None:
    """Punch a hole in a LUN file (OSError if it fails). Without the
    interposer: assert EOPNOTSUPP, then write zeros over the range."""
    fd = os.open(path, os.O_WRONLY)
    try:
        err = fallocate_punch(fd, off, length)
        if not INTERPOSER:
            assert err == errno.EOPNOTSUPP, \
                f"punch-hole without the interposer: {errno.errorcode.get(err, err)}"
            zero_range(fd, off, length)
        elif err:
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def fstrim(where: str, fill: bool = True) -> int | None:
    """fstrim the filesystem mounted on `where`: the bytes trimmed. Without
    the interposer the loop device's discards fail with EOPNOTSUPP: the
    kernel's loop driver then stops advertising discard, so fstrim is
    refused as "not supported" (or, the very first time on a loop device
    that never discarded, ext4 ignores the failed discards and fstrim
    exits 0, having freed nothing); then, with `fill`, fill the free space
    with zeros and remove the filler (the way to give a thin LUN's free
    space back without discard); None."""
    r = subprocess.run(["fstrim", "-v", where], capture_output=True, text=True)
    if INTERPOSER:
        assert r.returncode == 0, f"fstrim {where}: {r.stderr}"
        import re
        return int(re.search(r"\((\d+) bytes\)", r.stdout).group(1))
    assert r.returncode == 0 or "not supported" in r.stderr, (r.returncode, r.stderr)
    if fill:
        zero_fill(where)
    return None


def zero_fill(where: str) -> None:
    """Fill the free space of the filesystem on `where` with zeros (fsynced),
    then remove the filler and sync."""
    filler = os.path.join(where, ".zero-fill")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = bytes(1 << 20)
    try:
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    break
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                break
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(filler)
    subprocess.run(["sync"], check=True)
