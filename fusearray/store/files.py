"""The fd table: a pack's open segment files, their read-only mappings,
and reads and writes of one disk's bytes.

`fds` maps (disk idx, seg) to a handle of the disk's medium (media.py: an
fd for a directory), `maps` the same key to a mapping of that file
(mapped reads, see reads.py; only media whose handles are fds). `lock` guards both tables: every
insertion and removal holds it, and a mapping is published only if its
fd is still the table's (a closer may have taken it meanwhile). Lookups
(`fds.get`) are single dict reads, done without the lock by the appender
and the readers: an fd is only closed once no read can be using it (the
segments' reading guard) or its disk has left the pack (then a read on a
closed or reused fd fails over like an I/O error and is verified anyway).

`unsynced` collects the (disk idx, seg) written since their last fsync
(appends add under the array's commit lock, repairs from whichever
thread heals; Segments.sync_blocking drains it under the commit lock).
`nowait` is the preadv2 flag of the reads on the loop (RWF_NOWAIT; 0 on
tmpfs, which has none and never waits; None: no such reads).

Failing I/O reports to the pack's DiskHealth (`health`): a read error
counts against the disk, a write error of an append fails it if the pack
can do without it (else it is raised), a repair's counts against it.
Errors that say nothing about the disk (NOT_THE_DISK) are raised.
"""
import errno
import mmap
import os
import threading

from .records import NOT_THE_DISK

MAPS_MAX = 64             # segment files kept mapped for reads, per disk


class SegmentFiles:
    """The fd table of a pack's segment files, and one disk's bytes."""

    def __init__(self, disks, health, nowait):
        self.disks = disks
        self.health = health
        self.fds: dict[tuple[int, int], int] = {}            # (disk idx, seg) -> fd
        # (disk idx, seg) -> (fd, read-only map of the file, on tmpfs/ramfs)
        self.maps: dict[tuple[int, int], tuple[int, memoryview, bool]] = {}
        self.lock = threading.Lock()
        self.unsynced: set[tuple[int, int]] = set()
        self.nowait = nowait                 # preadv2 flags for reads on the loop
        self._mem_paths: dict[str, bool] = {}

    # ---- the table -------------------------------------------------------
    def add(self, key, fd: int) -> None:
        with self.lock:
            self.fds[key] = fd

    def fd(self, di: int, seq: int):
        """The fd of disk `di`'s file of `seq`, None if that disk is not
        online or the file not open."""
        return self.fds.get((di, seq)) if self.disks[di].state == "online" else None

    def _close(self, key, h) -> None:
        self.disks[key[0]].medium.close(h)

    def pop(self, key, *default):
        """Take `key`'s fd out of the table (to close it), with its mapping.
        Caller holds `lock`."""
        self.maps.pop(key, None)
        return self.fds.pop(key, *default)

    def take(self, key):
        """pop under the lock; None if not open."""
        with self.lock:
            return self.pop(key, None)

    def close_disk(self, d) -> None:
        """Close disk `d`'s files (and drop their mappings). Any thread."""
        with self.lock:
            fds = [(key, self.pop(key)) for key in [k for k in self.fds if k[0] == d.idx]]
        for key, fd in fds:
            try:
                self._close(key, fd)
            except OSError:
                pass

    def close_segment(self, seq: int) -> None:
        with self.lock:
            fds = [(k, self.pop(k)) for k in [k for k in self.fds if k[1] == seq]]
        for key, fd in fds:
            self._close(key, fd)

    def close_all(self) -> None:
        with self.lock:
            for key, fd in self.fds.items():
                self._close(key, fd)
            self.fds.clear()
            self.maps.clear()

    # ---- one disk's bytes --------------------------------------------------
    def write(self, di: int, seq: int, iov, off: int) -> bool:
        """pwritev to disk `di`'s file; False when it is not online or not
        open (a missing disk: redundancy covers it). Raises OSError."""
        fd = self.fd(di, seq)
        if fd is None:
            return False
        self.disks[di].medium.pwritev(fd, iov, off)
        self.unsynced.add((di, seq))
        return True

    def put(self, di: int, seq: int, off: int, data, strict: bool = False) -> None:
        """Write disk `di`'s bytes. `strict` (appends): a failed write fails
        the disk if the pack can do without it, else raises; otherwise (a
        repair) it counts against the disk."""
        d = self.disks[di]
        try:
            self.write(di, seq, data if type(data) is list else [data], off)
        except OSError as e:
            if e.errno in NOT_THE_DISK:
                raise
            if not strict:
                self.health.disk_error(d, f"write failed: {e.strerror}")
            elif self.health.can_lose(d):
                self.health.lose(d, "failed", f"a write to it failed: {e.strerror}")
            else:
                self.health.disk_error(d, f"write failed: {e.strerror}")
                raise

    def get(self, di: int, seq: int, off: int, n: int):
        """Bytes of disk `di`'s file (a bytearray), or None when that disk
        can't give them."""
        buf = bytearray(n)
        return buf if self.get_into(di, seq, off, memoryview(buf)) else None

    def get_into(self, di: int, seq: int, off: int, dst) -> bool:
        """Fill `dst` from disk `di`'s file at `off` (zeros past the file's
        end); False when that disk can't give the bytes."""
        fd = self.fd(di, seq)
        if fd is None:
            return False
        try:
            got = self.disks[di].medium.preadv(fd, [dst], off)
        except OSError as e:
            self.health.disk_error(self.disks[di], f"read failed: {e.strerror}")
            return False
        if got < len(dst):
            dst[got:] = bytes(len(dst) - got)
        return True

    def read_quiet(self, di: int, seq: int, iov, off: int) -> int:
        """preadv of disk `di`'s file of `seq` into the buffers `iov` from
        `off`: the bytes read, -1 when the disk is not online, the file is
        not open or the read failed. Counts nothing against the disk: for
        a reader that reads again the counted way (get_into) whatever this
        did not give right (reads.py's run reads)."""
        fd = self.fd(di, seq)
        if fd is None:
            return -1
        try:
            return self.disks[di].medium.preadv(fd, iov, off)
        except OSError:
            return -1

    def first_online(self) -> int | None:
        return next((d.idx for d in self.disks if d.state == "online"), None)

    def preadv_nowait(self, di: int, seg: int, iov, off: int) -> int:
        """preadv2 from disk `di`'s file of `seg` with the no-wait flags;
        -1 when the disk is not online, the file is not open or the read
        would block."""
        fd = self.fd(di, seg)
        flags = self.nowait         # None once a read found RWF_NOWAIT unsupported
        if fd is None or flags is None:
            return -1
        try:
            return os.preadv(fd, iov, off, flags)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                # tmpfs has no RWF_NOWAIT, but its reads never wait for a device
                self.nowait = 0 if all(d.medium.in_memory() for d in self.disks) else None
            return -1

    def mapping(self, di: int, seq: int, end: int):
        """(fd, view, in memory) of disk `di`'s file of segment `seq`,
        mapped up to at least `end`, or None. A growing file is mapped
        again when a read goes past the old map. Mappings go with their fd
        (pop); at most MAPS_MAX a disk are kept, each holding a duplicate
        fd."""
        key = (di, seq)
        fd = self.fd(di, seq)
        if fd is None or not self.disks[di].medium.fds:
            return None
        m = self.maps.get(key)
        if m is not None and m[0] == fd and len(m[1]) >= end:
            return m
        try:
            size = os.fstat(fd).st_size
            if size < end:
                return None
            mv = memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        except (OSError, ValueError):
            return None
        d = self.disks[di]
        mem = self._mem_paths.get(d.path)
        if mem is None:
            mem = self._mem_paths[d.path] = d.medium.in_memory()
        with self.lock:                 # closers hold it
            if self.fds.get(key) != fd:     # closed (and maybe reused) meanwhile
                return None
            self.maps.pop(key, None)
            while len(self.maps) >= MAPS_MAX * len(self.disks):
                self.maps.pop(next(iter(self.maps)))
            m = self.maps[key] = (fd, mv, mem)
        return m

