#!/usr/bin/env python3
"""memfile: the leanest useful pyfuse3 file server, our "FUSE ceiling".

    python tools/memfile.py MOUNTPOINT [--size 1G] [--tasks 8]

Mounts a FUSE filesystem (fs name ``memfile``) holding one regular file,
``MOUNTPOINT/file``, of a fixed size, kept in anonymous memory (an mmap, so
unwritten parts cost nothing and read as zeros). The file is opened with
``direct_io`` (as fusearray opens LUN files); fsync is a no-op; the size never
changes (like a block device: writes are clipped at the end, truncation is
ignored). Unmounts cleanly on SIGTERM and SIGINT.

It exists so tools/bench can tell how much of fusearray's cost is FUSE and
pyfuse3 itself; keep the hot path (read, write) free of anything else.
"""
import argparse
import errno
import mmap
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
FILE_NAME = b'file'
UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


def parse_size(text):
    text = text.strip().upper().removesuffix('B').removesuffix('I')
    unit = text[-1] if text and text[-1] in UNITS else ''
    return int(text[:len(text) - len(unit)]) * UNITS[unit]


class MemFile(pyfuse3.Operations):
    def __init__(self, size):
        super().__init__()
        self.size = size
        self.data = mmap.mmap(-1, size) if size else b''
        self.uid, self.gid = os.getuid(), os.getgid()

    def _attr(self, ino):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.entry_timeout = attr.attr_timeout = 300
        if ino == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = self.size
            attr.st_blocks = (self.size + 511) // 512
        attr.st_blksize = 1 << 20
        return attr

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.getattr(inode)  # size is fixed; ignore the rest

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return self.data[off:off + size]

    async def write(self, fh, off, buf):
        end = min(off + len(buf), self.size)
        if off >= end:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.data[off:end] = buf if end - off == len(buf) else buf[:end - off]
        return end - off

    async def fsync(self, fh, datasync):
        pass

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = self.size // 4096
        st.f_files = 2
        st.f_namemax = 255
        return st


async def serve(tasks):
    async with trio.open_nursery() as nursery:
        async def fuse_loop():
            await pyfuse3.main(min_tasks=tasks, max_tasks=tasks)
            nursery.cancel_scope.cancel()  # unmounted from outside
        nursery.start_soon(fuse_loop)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                nursery.cancel_scope.cancel()
                break


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('mountpoint')
    ap.add_argument('--size', default='1G', type=parse_size,
                    help='file size, bytes or with K/M/G/T (default 1G)')
    ap.add_argument('--tasks', type=int, default=8,
                    help='pyfuse3 worker tasks (default 8)')
    args = ap.parse_args(argv)

    pyfuse3.init(MemFile(args.size), args.mountpoint,
                 {'fsname=memfile', 'default_permissions'})
    try:
        trio.run(serve, args.tasks)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
