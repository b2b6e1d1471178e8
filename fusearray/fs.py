"""The pyfuse3 Operations: a thin translation of inodes and handles to the
array, its volumes and the control protocol.

Tree (DESIGN section 2): luns/NAME, snapshots/SET/NAME, ctl/VERB,
ctl/status, ctl/status.json, ctl/events, ctl/events.json, ctl/metrics,
ctl/jobs/ID.

The read, write, fsync and fallocate handlers of LUN and shadow copy files
count each request in the volume's IoStats (fusearray.metrics): timed with
perf_counter_ns around the array call, on the trio thread.

Owners and modes come from fusearray.perms (LUN and shadow copy files 0660
root:disk by default); the kernel checks them (default_permissions), with
the caller's supplementary groups, so no handler checks ctx.uid itself.

Every handler is guarded: ArrayError -> its errno; anything unexpected ->
logged, an event, and EIO (never an exception that would end the main
loop and unmount the array).
"""
import collections
import ctypes
import errno
import functools
import logging
import os
import stat
from time import perf_counter_ns

import pyfuse3
import trio

from . import STREAM_SOCKET_XATTR, ctl, events, metrics, perms, transport
from .errors import ArrayError, invalid

log = logging.getLogger("fusearray")

#: Longest command line of ctl/export and ctl/import (as on the stream socket).
STREAM_LINE_MAX = 4096

from .native import reply_plan as _reply_plan    # None: join the parts

ROOT = pyfuse3.ROOT_INODE
LUNS, SNAPS, CTL, JOBS = 2, 3, 4, 5
STATUS, STATUS_JSON, EVENTS = 10, 11, 12
EVENTS_JSON = 13
METRICS = 14
VERB_BASE = 100
VOL_BASE = 1 << 32
SET_BASE = 1 << 40
JOB_BASE = 1 << 48
DIRS = {ROOT: None, LUNS: b"luns", SNAPS: b"snapshots", CTL: b"ctl", JOBS: b"jobs"}
TEXT_FILES = {STATUS: b"status", STATUS_JSON: b"status.json", EVENTS: b"events",
              EVENTS_JSON: b"events.json", METRICS: b"metrics"}
XATTR = "user.fusearray."

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def guarded(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except ArrayError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:
            log.exception("unexpected error in %s", fn.__name__)
            self.array.event("error", f"internal error in {fn.__name__}: "
                             f"{type(e).__name__}: {e} (request failed with EIO)")
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _reply(parts):
    """The read reply for a list of buffers: the one buffer, or the shim's
    gathered reply (sent straight from the buffers, see reply_plan in
    _fuseshim.c), or else the buffers joined."""
    if len(parts) == 1:
        return parts[0]
    plan = _reply_plan(parts) if _reply_plan is not None else None
    return plan if plan is not None else b"".join(parts)


class VolHandle:
    __slots__ = ("vol", "pid", "uid")

    def __init__(self, vol, pid: int = 0, uid: int = 0):
        self.vol = vol
        self.pid, self.uid = pid, uid       # who opened it


class CtlHandle:
    """ctl/VERB: the session (line buffer, reply: see ctl.Session) of one
    open file; its writes, flush and release run one at a time."""
    __slots__ = ("session", "lock")

    def __init__(self, verb, origin):
        self.session = ctl.Session(verb, origin)
        self.lock = trio.Lock()


class ExportHandle:
    """ctl/export: write `SET [base=SET2]` and a newline, then read the
    stream. One command per open; a line without its newline runs at the
    first read."""
    __slots__ = ("run", "pieces", "avail", "reply", "done", "line", "refused")

    def __init__(self):
        self.run = None             # transport.ExportRun once the command is taken
        self.pieces = collections.deque()   # memoryviews of stream bytes not yet read
        self.avail = 0
        self.reply = b""
        self.done = False
        self.line = b""             # the command so far (until its newline)
        self.refused = False        # a command was refused: the reply says why

    def add(self, pieces) -> None:
        for p in pieces:
            if len(p):
                self.pieces.append(memoryview(p))
                self.avail += len(p)

    def take(self, size: int):
        """Up to `size` bytes off the front: the piece itself when one
        covers the read, else one join."""
        first = self.pieces[0] if self.pieces else b""
        if len(first) >= size:
            data = first[:size]
            if len(first) > size:
                self.pieces[0] = first[size:]
            else:
                transport.recycle(self.pieces.popleft().obj)
        else:
            out, used = [], []
            n = 0
            while self.pieces and n < size:
                p = self.pieces.popleft()
                if n + len(p) > size:
                    self.pieces.appendleft(p[size - n:])
                    p = p[:size - n]
                else:
                    used.append(p.obj)
                out.append(p)
                n += len(p)
            data = b"".join(out)
            for buf in used:        # copied: whole pieces' buffers are free again
                transport.recycle(buf)
        self.avail -= len(data)
        return data


class ImportHandle:
    """ctl/import: write `[as=SET] [pack=P] [remap=yes] [resume=yes job=N]`
    and a newline, then the stream; read the reply at the end. The command
    line is checked as soon as its newline arrives; once refused, the
    handle takes nothing more (the reply says why)."""
    __slots__ = ("importer", "reply", "pos", "lock", "line", "refused")

    def __init__(self):
        self.importer = None
        self.reply = b""
        self.pos = 0
        self.lock = trio.Lock()
        self.line = b""             # the command so far (until its newline)
        self.refused = None         # the ArrayError that refused the command

class TextHandle:
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class Operations(pyfuse3.Operations):
    # LUN sizes change behind the kernel's back (resize): no writeback cache
    # (FUSE_NOTES: the kernel would then ignore our size changes).
    enable_writeback_cache = False

    def __init__(self, array, access: perms.Access | None = None):
        super().__init__()
        self.array = array
        # owners and modes (fusearray.perms); the kernel enforces them
        # (default_permissions), with the caller's supplementary groups
        self.access = access or perms.resolve()
        self.verbs = sorted(list(ctl.VERBS) + ["export", "import"])
        self.handles: dict[int, object] = {}
        self.next_fh = 1
        self.set_inos: dict[str, int] = {}
        self.ino_sets: dict[int, str] = {}
        self.stream_socket = None       # its name once streamsock serves
        array.notify = self._invalidate

    # ---- inode <-> object ----------------------------------------------------------
    def _set_ino(self, name: str) -> int:
        ino = self.set_inos.get(name)
        if ino is None:
            ino = SET_BASE + len(self.set_inos) + 1
            self.set_inos[name] = ino
            self.ino_sets[ino] = name
        return ino

    def _vol(self, ino: int):
        vol = self.array.volumes.get(ino - VOL_BASE) if VOL_BASE <= ino < SET_BASE else None
        if vol is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return vol

    def _children(self, ino: int) -> list[tuple[bytes, int]]:
        a = self.array
        if ino == ROOT:
            return [(b"luns", LUNS), (b"snapshots", SNAPS), (b"ctl", CTL)]
        if ino == LUNS:
            return [(n.encode(), VOL_BASE + v.vid) for n, v in sorted(a.luns.items())
                    if not v.hidden]
        if ino == SNAPS:
            return [(n.encode(), self._set_ino(n)) for n in sorted(a.sets)
                    if (s := a.ns.visible_set(n)) is not None
                    and any(not v.hidden for v in s.members.values())]
        if ino == CTL:
            return ([(TEXT_FILES[i], i) for i in TEXT_FILES] + [(b"jobs", JOBS)]
                    + [(v.encode(), VERB_BASE + i) for i, v in enumerate(self.verbs)])
        if ino == JOBS:
            return [(str(j).encode(), JOB_BASE + j) for j in sorted(getattr(a, "jobs", {}))]
        if ino in self.ino_sets:
            s = a.sets.get(self.ino_sets[ino])
            if s is None:
                return []
            return [(n.encode(), VOL_BASE + v.vid) for n, v in sorted(s.members.items())
                    if not v.hidden]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        acc = self.access
        a.st_uid, a.st_gid = acc.uid, acc.gid
        a.st_blksize = 65536
        t = int(self.array.started * 1e9)
        a.entry_timeout = 0             # names change behind the kernel's back
        a.attr_timeout = 0
        if ino in DIRS or ino in self.ino_sets:
            a.st_mode = stat.S_IFDIR | perms.TREE_DIR_MODE
            a.st_nlink = 2
        elif ino in TEXT_FILES or ino >= JOB_BASE:
            a.st_mode = stat.S_IFREG | perms.VIEW_MODE
        elif VERB_BASE <= ino < VERB_BASE + len(self.verbs):
            mode, a.st_uid, a.st_gid = acc.verb()
            a.st_mode = stat.S_IFREG | mode
        else:
            vol = self._vol(ino)
            mode, a.st_uid, a.st_gid = acc.lun(vol.readonly)
            a.st_mode = stat.S_IFREG | mode
            a.st_size = vol.size
            a.st_blocks = vol.allocated_bytes() // 512
            a.st_blksize = vol.block_size
            t = int(vol.created * 1e9)
            a.attr_timeout = 1          # resize invalidates it (notify)
        a.st_nlink = a.st_nlink or 1
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    def _invalidate(self, vol) -> None:
        """A volume's size or content changed behind the kernel's back."""
        try:
            pyfuse3.invalidate_inode(VOL_BASE + vol.vid, attr_only=True)
        except (FileNotFoundError, OSError):
            pass

    # ---- tree ----------------------------------------------------------------------
    @guarded
    async def lookup(self, parent, name, ctx):
        if name == b".":
            return self._attr(parent)
        for n, ino in self._children(parent):
            if n == name:
                return self._attr(ino)
        raise pyfuse3.FUSEError(errno.ENOENT)

    @guarded
    async def getattr(self, inode, ctx):
        return self._attr(inode)

    @guarded
    async def setattr(self, inode, attr, fields, fh, ctx):
        if VOL_BASE <= inode < SET_BASE:
            vol = self._vol(inode)
            if vol.readonly and (fields.update_size or fields.update_mode):
                raise pyfuse3.FUSEError(errno.EROFS)
            # A LUN is a block device: truncate/O_TRUNC leave the size as it is.
        return self._attr(inode)

    @guarded
    async def opendir(self, inode, ctx):
        entries = self._children(inode)
        fh = self._new_handle(TextHandle(entries))
        return fh

    @guarded
    async def readdir(self, fh, start_id, token):
        entries = self.handles[fh].data
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                attr = self._attr(ino)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                break

    @guarded
    async def releasedir(self, fh):
        self.handles.pop(fh, None)

    @guarded
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        cap = sum(p.capacity_bytes() for p in self.array.packs.values())
        free = sum(p.free_bytes() for p in self.array.packs.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = cap // 4096
        s.f_bfree = s.f_bavail = free // 4096
        s.f_files = len(self.array.volumes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 64
        return s

    # ---- files ---------------------------------------------------------------------
    def _new_handle(self, h) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return fh

    @guarded
    async def open(self, inode, flags, ctx):
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if VOL_BASE <= inode < SET_BASE:
            vol = self._vol(inode)
            if writing and vol.readonly:
                raise pyfuse3.FUSEError(errno.EROFS)
            vol.opened(ctx.pid, ctx.uid)     # named in EBUSY messages
            return pyfuse3.FileInfo(fh=self._new_handle(VolHandle(vol, ctx.pid, ctx.uid)),
                                    direct_io=True)
        if inode in TEXT_FILES or inode >= JOB_BASE:
            if writing:
                raise pyfuse3.FUSEError(errno.EACCES)
            if inode in (STATUS, STATUS_JSON):
                await self.array.refresh_host_view()     # loop devices, mounts
            return pyfuse3.FileInfo(fh=self._new_handle(TextHandle(self._render(inode))),
                                    direct_io=True)
        if VERB_BASE <= inode < VERB_BASE + len(self.verbs):
            verb = self.verbs[inode - VERB_BASE]
            h = {"export": ExportHandle, "import": ImportHandle}.get(verb)
            h = h() if h else CtlHandle(verb, f"uid {ctx.uid}")
            return pyfuse3.FileInfo(fh=self._new_handle(h), direct_io=True)
        raise pyfuse3.FUSEError(errno.EISDIR)

    def _render(self, inode) -> bytes:
        a = self.array
        if inode == STATUS:
            return ctl.render_status(a.status())
        if inode == STATUS_JSON:
            return ctl.render_status_json(a.status())
        if inode == EVENTS:
            return ctl.render_events(a.events)
        if inode == EVENTS_JSON:
            return events.render_json(a.events)
        if inode == METRICS:
            return metrics.render(a)
        return a.render_job(inode - JOB_BASE)

    @guarded
    async def read(self, fh, off, size):
        h = self.handles[fh]
        if type(h) is VolHandle:
            vol = h.vol
            t0 = perf_counter_ns()
            data = vol.read_cached(off, size)
            if data is None:
                try:
                    data = _reply(await vol.read_parts(off, size))
                except Exception:
                    vol.stats.read_errors += 1
                    raise
            vol.stats.read(len(data), perf_counter_ns() - t0)
            return data
        if type(h) is CtlHandle:
            return h.session.read(size)
        if type(h) is ExportHandle:
            return await self._export_read(h, size)
        if type(h) is ImportHandle:
            return await self._import_read(h, size)
        return h.data[off:off + size]

    @guarded
    async def write(self, fh, off, buf):
        h = self.handles[fh]
        if type(h) is VolHandle:
            vol = h.vol
            t0 = perf_counter_ns()
            try:
                n = await vol.write(off, buf)
            except Exception:
                vol.stats.write_errors += 1
                raise
            vol.stats.write(n, perf_counter_ns() - t0)
            return n
        if type(h) is CtlHandle:          # a command runs once its line is complete
            async with h.lock:
                await h.session.write(self.array, bytes(buf))
            return len(buf)
        if type(h) is ExportHandle:
            return await self._export_write(h, buf)
        if type(h) is ImportHandle:
            return await self._import_write(h, buf)
        raise pyfuse3.FUSEError(errno.EBADF)

    # ---- ctl/export and ctl/import: streams on one descriptor -----------------------
    def _stream_line(self, verb: str, h, buf) -> tuple[str | None, bytes]:
        """Add a write to the command line being assembled on `h`: (the
        line, what follows its newline) once it is complete, else (None,
        b""). A line too long or not UTF-8 is EINVAL."""
        data = bytes(buf)
        line, nl, rest = (h.line + data).partition(b"\n")
        if len(line) > STREAM_LINE_MAX:
            h.line = b""
            raise invalid(f"{verb}: the command line is longer than {STREAM_LINE_MAX} bytes")
        if not nl:
            h.line = line
            return None, b""
        h.line = b""
        return self._decode(verb, line), rest

    @staticmethod
    def _decode(verb: str, line: bytes) -> str:
        try:
            text = line.decode()
        except UnicodeDecodeError:
            raise invalid(f"{verb}: the command is not valid UTF-8 text") from None
        if not text.isprintable():
            raise invalid(f"{verb}: the command holds control characters")
        return text

    async def _export_write(self, h, buf) -> int:
        try:
            if h.run is not None or h.refused:
                raise invalid("export: one command per open of ctl/export (open it "
                              "again for another)" + ("; the stream is being read"
                                                      if h.run is not None else ""))
            line, rest = self._stream_line("export", h, buf)
            if line is not None:
                if rest.strip():
                    raise invalid("export: one command per open of ctl/export, and a "
                                  "second line was written")
                await self._export_start(h, line)
        except ArrayError as e:
            if h.run is None:               # no stream to read: the reply is read instead
                h.reply, h.done = ctl.failure(self.array, "export", bytes(buf), e), True
                h.refused = True
            else:
                self.array.event("error", f"{e.message} [{e.errname}]")
            raise
        return len(buf)

    async def _export_start(self, h, line: str) -> None:
        h.run = await transport.ExportRun.start(self.array, line)

    async def _export_read(self, h, size) -> bytes:
        if h.run is None and not h.refused and h.line:
            try:                            # a command without its newline: run it now
                line, h.line = h.line, b""
                await self._export_start(h, self._decode("export", line))
            except ArrayError as e:
                h.reply, h.refused = ctl.failure(self.array, "export", line, e), True
        if h.run is None:
            if not h.refused and not h.reply:
                h.refused = True
                h.reply = ctl.failure(self.array, "export", b"", invalid(
                    "export: no command was written: write `SET [base=SET2]` first"))
            data, h.reply = h.reply[:size], h.reply[size:]
            return data
        while h.avail < size and not h.done:
            pieces = await h.run.next_batch()
            if pieces is None:
                h.done = True
            else:
                h.add(pieces)
        return h.take(size)

    async def _import_write(self, h, buf) -> int:
        async with h.lock:
            try:
                if h.refused is not None:
                    raise h.refused         # its reply and event are there already
                data = bytes(buf)
                if h.importer is None:
                    line, data = self._stream_line("import", h, buf)
                    if line is None:
                        return len(buf)
                    h.importer = transport.start_import(self.array, line)
                if data:
                    await h.importer.feed(data)
            except ArrayError as e:
                if h.refused is None:
                    h.reply = ctl.failure(self.array, "import", b"", e)
                    h.refused = e
                raise
        return len(buf)

    async def _import_read(self, h, size) -> bytes:
        async with h.lock:
            if not h.reply:
                imp = h.importer
                try:
                    if imp is None and h.line:      # a command without its newline
                        line, h.line = h.line, b""
                        imp = h.importer = transport.start_import(
                            self.array, self._decode("import", line))
                    if imp is None:
                        raise invalid("import: nothing was written: write the command "
                                      "line, then the stream")
                    await imp.end_of_input()
                    set_name = imp.as_name or imp.header["set"]["name"]
                    h.reply = ctl.format_reply({"set": set_name, "job": imp.job.id,
                                                "blocks": imp.blocks})
                except ArrayError as e:
                    h.reply = ctl.failure(self.array, "import", b"", e)
                    h.refused = h.refused or e
            data = h.reply[h.pos:h.pos + size]
            h.pos += len(data)
            return data

    @guarded
    async def flush(self, fh):
        # On every close() of a descriptor: durability is fsync's job, but a
        # ctl/VERB descriptor holding a partial line runs it now, and the
        # kernel hands this reply's errno to close(2) (FUSE_NOTES).
        h = self.handles.get(fh)
        if type(h) is CtlHandle:
            if h.lock.locked() and not h.session.pending():
                # a command runs (a long one: a snapshot's hooks) and this is
                # the close of another descriptor of the same file with no
                # partial line: e.g. a child forked meanwhile closing its
                # copy at exec. Nothing to run: do not make it wait.
                return
            async with h.lock:
                await h.session.close(self.array)

    @guarded
    async def fsync(self, fh, datasync):
        h = self.handles.get(fh)
        if type(h) is VolHandle:
            vol = h.vol
            t0 = perf_counter_ns()
            try:
                await self.array.sync(vol, log=True)
            except Exception:
                vol.stats.fsync_errors += 1
                raise
            vol.stats.fsync(perf_counter_ns() - t0)

    @guarded
    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if type(h) is CtlHandle:        # a partial line no flush ran (its errno: an event)
            async with h.lock:
                await h.session.close(self.array)
        elif type(h) is VolHandle:
            h.vol.closed(h.pid, h.uid)
            self.array.released(h.vol)
        elif type(h) is ExportHandle and h.run is not None:
            h.run.close()
        elif type(h) is ImportHandle and h.importer is not None and not h.reply:
            await h.importer.interrupted()

    # ---- fallocate (through fusearray._fuseshim) ------------------------------------
    async def fallocate(self, inode, mode, off, length, fh) -> int:
        """Returns 0 or an errno. Punch-hole and zero-range free blocks;
        plain allocation inside the LUN is a no-op (thin)."""
        try:
            h = self.handles.get(fh)
            vol = h.vol if type(h) is VolHandle else self._vol(inode)
            if vol.readonly:
                return errno.EROFS
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                if mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                    return errno.EOPNOTSUPP
                if off < vol.size:
                    await vol.zero(off, length)
                    vol.stats.discard_ops += 1
                    vol.stats.discard_bytes += min(length, vol.size - off)
                return 0
            if mode & ~FALLOC_FL_KEEP_SIZE:
                return errno.EOPNOTSUPP
            if off + length > vol.size and not mode & FALLOC_FL_KEEP_SIZE:
                return errno.ENOSPC   # a LUN never changes size by I/O
            return 0
        except pyfuse3.FUSEError as e:
            return e.errno
        except ArrayError as e:
            return e.errno
        except Exception as e:
            log.exception("unexpected error in fallocate")
            self.array.event("error", f"internal error in fallocate: {e}")
            return errno.EIO

    # ---- extended attributes -----------------------------------------------------
    def _xattrs(self, inode) -> dict:
        if inode == CTL and self.stream_socket:
            return {STREAM_SOCKET_XATTR.encode(): self.stream_socket.encode()}
        if not VOL_BASE <= inode < SET_BASE:
            return {}
        v = self._vol(inode)
        d = {"wwn": v.wwn, "serial": v.serial, "kind": v.kind, "pack": v.pack.name,
             "readonly": "on" if v.readonly else "off",
             "hidden": "on" if v.hidden else "off",
             "block_size": str(v.block_size)}
        if v.kind == "shadow":
            d.update(set=v.set_name, origin=v.origin or "", context=v.context or "",
                     consistency=v.consistency or "unknown")
        return {(XATTR + k).encode(): val.encode() for k, val in d.items()}

    @guarded
    async def getxattr(self, inode, name, ctx):
        value = self._xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @guarded
    async def listxattr(self, inode, ctx):
        return list(self._xattrs(inode))

    @guarded
    async def setxattr(self, inode, name, value, ctx):
        if name.startswith(XATTR.encode()):
            raise pyfuse3.FUSEError(errno.EPERM)   # identity and tags go through ctl/
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @guarded
    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM if name.startswith(XATTR.encode())
                                else pyfuse3.ENOATTR)


def install_fallocate(shim, ops: Operations, nursery) -> bool:
    """Route fallocate requests to `ops.fallocate` through the libfuse
    interposer `shim` (fusearray.native.Interposer; see _fuseshim.c).
    False without it: the kernel answers fallocate with EOPNOTSUPP."""
    if shim is None:
        return False
    reply_err = shim.libfuse_function("fuse_reply_err", ctypes.c_int,
                                      (ctypes.c_void_p, ctypes.c_int))

    async def serve(req, ino, mode, off, length, fh):
        err = await ops.fallocate(ino, mode, off, length, fh)
        reply_err(req, err)

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64)
    def on_fallocate(req, ino, mode, off, length, fh):
        try:
            nursery.start_soon(serve, req, ino, mode, off, length, fh)
        except Exception:
            reply_err(req, errno.EIO)

    shim.set_fallocate(on_fallocate)        # which keeps it alive
    return shim.installed()

