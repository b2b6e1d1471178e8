"""Media: where one disk's segment files and label live.

A disk of a pack is a *medium*: a host directory (`DirMedium`, the
default) or a namespace of a RADOS pool (`RadosMedium` in rados.py,
`rados:POOL/NAMESPACE`). The store reads, writes, syncs, cuts, lists and
deletes segment files only through a disk's medium, so a new kind of
medium is one class with these methods, nothing else in the store
changes. Files are named as in a directory: `00000001.seg`, spares
`00000001.spare`, the label `fusearray-disk.json`.

Handles are opaque to the store: an fd for a directory (which is what
lets the store map files and read the page cache without a thread:
`fds` is True), an object name for RADOS. Every method may block (worker
threads; see the package docstring) and raises OSError with an errno on
failure: FileNotFoundError for a file that is not there, EIO and the like
for the medium failing (the disk rules in disks.py count those).

Durability: `pwritev` then `fsync` of the handle, and `sync_dir` after a
file was created, renamed or deleted, make it last. A medium whose writes
are durable once acknowledged (RADOS) makes those no-ops.

`renames`: spare files (a dead segment's file reused for a new one, see
Segments.retire_blocking) need rename; a medium without it keeps none.
"""
import errno
import os
import sys

from ..perms import FILE_MODE, private_dir
from .records import fsync_dir, in_memory, pwritev_all, write_file_atomic

LABEL = "fusearray-disk.json"


def seg_name(seq: int) -> str:
    return f"{seq:08d}.seg"


def spare_name(seq: int) -> str:
    return f"{seq:08d}.spare"


class DirMedium:
    """A disk that is a host directory: the label in it, the segment files
    in its `segments/` (both 0600 in 0700 directories)."""

    kind = "dir"
    fds = True          # handles are fds: mappings and no-wait reads work
    renames = True

    def __init__(self, path: str):
        self.path = path
        self.segdir = os.path.join(path, "segments")

    def _p(self, name: str) -> str:
        return os.path.join(self.segdir, name)

    # ---- the disk as a whole --------------------------------------------------
    def present(self) -> bool:
        return os.path.isdir(self.path)

    def prepare(self) -> None:
        """Create the directory and its segment directory (owner only)."""
        private_dir(self.path)
        private_dir(self.segdir)

    def write_label(self, data: bytes) -> None:
        write_file_atomic(os.path.join(self.path, LABEL), data)

    def read_label(self) -> bytes:
        with open(os.path.join(self.path, LABEL), "rb") as f:
            return f.read()

    def names(self) -> list[str]:
        """The files of the segment directory (FileNotFoundError if none)."""
        return os.listdir(self.segdir)

    def sync_dir(self) -> None:
        fsync_dir(self.segdir)

    def space(self) -> tuple[int, int]:
        """(capacity, available) in bytes."""
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def in_memory(self) -> bool:
        return in_memory(self.path)

    # ---- files ----------------------------------------------------------------
    def open(self, name: str, create: bool = False):
        """A handle on file `name`; `create`: a new one (FileExistsError if
        it is there)."""
        if create:
            return os.open(self._p(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        return os.open(self._p(name), os.O_RDWR)

    def open_or_create(self, name: str):
        """A handle on file `name`, made empty if it is not there."""
        return os.open(self._p(name), os.O_RDWR | os.O_CREAT, FILE_MODE)

    def close(self, h) -> None:
        os.close(h)

    def pwritev(self, h, iov, off: int) -> None:
        pwritev_all(h, iov, off)

    def preadv(self, h, bufs, off: int) -> int:
        """Bytes read into `bufs` from `off` (fewer at the end of the file)."""
        return os.preadv(h, bufs, off)

    def fsync(self, h) -> None:
        os.fsync(h)

    def truncate(self, h, size: int) -> None:
        os.ftruncate(h, size)

    def size(self, h) -> int:
        return os.fstat(h).st_size

    def file_size(self, name: str) -> int:
        return os.stat(self._p(name)).st_size

    def allocated(self, name: str) -> int:
        """Bytes the file takes on the medium."""
        return os.stat(self._p(name)).st_blocks * 512

    def exists(self, name: str) -> bool:
        return os.path.exists(self._p(name))

    def unlink(self, name: str) -> None:
        os.unlink(self._p(name))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._p(old), self._p(new))

    def __str__(self) -> str:
        return self.path


RADOS_PREFIX = "rados:"


#: a rados disk's lease (s): how long after its holder ends another mount
#: may take it over without --break-lock (rados.Lease)
DEFAULT_LEASE = 30


def is_rados(path: str) -> bool:
    return path.startswith(RADOS_PREFIX)


def medium_for(path: str, ceph_conf: str | None = None):
    """The medium a disk's path names: `rados:POOL/NAMESPACE` or a directory."""
    if is_rados(path):
        from .rados import RadosMedium      # librados only for rados packs
        return RadosMedium(path, ceph_conf)
    return DirMedium(path)


def close_media() -> None:
    """Drop this process's connections to remote media (RADOS clusters), if
    any was made: at the array's close, after its packs closed (no I/O in
    flight). A medium used later connects again."""
    rados = sys.modules.get(__package__ + ".rados")
    if rados is not None:
        rados.shutdown()


def not_there(e: OSError) -> bool:
    return e.errno == errno.ENOENT
