"""The stream socket: export and import without the stream crossing FUSE.

`fusearray export` and `fusearray import` hand the daemon the descriptor of
their file or pipe (SCM_RIGHTS over a Unix socket), and the daemon writes
or reads the stream there itself, the way `zfs send` hands its descriptor
to the kernel. Through ctl/export and ctl/import every stream byte was
copied by the kernel into FUSE and again by pyfuse3; here it is one
read or write on the descriptor. ctl/export and ctl/import stay the
shell's interface and the CLI's fallback (an older daemon, another network
namespace, FUSEARRAY_STREAM_SOCKET=0).

The socket is abstract (no file to leave behind after a SIGKILL) with a
random name, bound before it is published as the xattr
`user.fusearray.stream_socket` of the mount's ctl/ directory. Only root and
the daemon's own user may use it (SO_PEERCRED): the same who may open the
ctl/ verbs (mode 0600).

Protocol: the client sends one message, the command line
(`export SET [base=SET2]` or `import [as=SET] [pack=P] [remap=yes]
[resume=yes [job=N]]`, newline-ended) with exactly one descriptor. The
server answers with lines: `total=N` (an export's size estimate, when
known), `progress=N` (stream bytes so far, at most five a second), then the
reply of the ctl protocol (`status=ok|error` and its key=value lines), and
closes. A client that goes away cancels: an export stops, an import is kept
for `import --resume`, as when a ctl/import writer closes early.
"""
import array as _array
import collections
import errno
import logging
import os
import secrets
import socket
import stat
import struct
import time

import trio

from . import ctl, transport
from .errors import ArrayError, invalid

try:
    from ._fuseshim import map_stream as _map_stream, populate as _populate
except ImportError:         # built without xxhash.h: the stream is read
    _map_stream = _populate = None

log = logging.getLogger("fusearray")

MAX_LINE = 4096
READ_CHUNK = 4 << 20        # import: bytes per read of the source
READ_AHEAD = 2              # import: chunks read ahead of the parser
PROGRESS_EVERY = 0.2        # seconds between progress lines
PEERCRED = struct.Struct("3i")


def _write_all(fd: int, pieces) -> int:
    """Write every piece (a pipe or a socket may take part of a writev)."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    done = 0
    while views:
        n = os.writev(fd, views)
        done += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return done


def _read_into(fd: int, buf: bytearray) -> int:
    """Fill `buf` from `fd`; fewer bytes only at the end of the input. A
    file fills it in one read; a pipe hands out what it holds, so keep
    reading to give the parser big pieces."""
    mv = memoryview(buf)
    got = 0
    while got < len(buf) and (n := os.readv(fd, [mv[got:]])):
        got += n
    return got


def _map_source(fd: int):
    """(mapping, end offset) of the rest of a regular file from its current
    offset, mapped read-only (the shim's map_stream: a file cut short meanwhile
    reads as zeros past its new end, so the import fails as damaged, never
    the daemon); None for a pipe, a small rest, or no shim: then it is read."""
    if _map_stream is None:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        if st.st_size - pos < READ_CHUNK:
            return None
        return _map_stream(fd, pos, st.st_size - pos), st.st_size
    except OSError:
        return None


class ChunkPool:
    """The import's read buffers, reused. Each chunk is parsed in place
    (the importer keeps views of its blocks until they are stored), so a
    chunk goes back to the pool only once the importer has stored the
    batch that holds its last block. Reusing them matters: every fresh
    4 MiB buffer is 1024 page faults, and on a virtual machine whose host
    takes back freed memory a fault costs several microseconds."""

    KEEP = 24

    def __init__(self, size: int):
        self.size = size
        self.free: list = []
        self.held: collections.deque = collections.deque()    # (chunk, batch)

    def get(self) -> bytearray:
        return self.free.pop() if self.free else bytearray(self.size)

    async def feed(self, imp, chunk: bytearray, n: int) -> None:
        """Feed the first `n` bytes of `chunk` to the importer `imp`; the
        chunk comes back once `imp` has stored every block it keeps of it.
        (A chunk whose feed failed is never reused: views may remain.)"""
        await imp.feed(memoryview(chunk)[:n])
        self.held.append((chunk, imp.holding()))
        while self.held and self.held[0][1] <= imp.stored:
            self._reuse(self.held.popleft()[0])

    def _reuse(self, chunk: bytearray) -> None:
        if len(self.free) < self.KEEP:
            self.free.append(chunk)


def _sole(exc: BaseException) -> BaseException:
    """The one exception a chain of single-member exception groups holds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _os_error(what: str, e: OSError) -> ArrayError:
    if e.errno == errno.EPIPE:
        return ArrayError(errno.EPIPE, "export: the output was closed before the stream ended")
    return ArrayError(e.errno or errno.EIO, f"{what}: {e.strerror or e}")


class StreamServer:
    """Serves export and import commands that come with a descriptor."""

    def __init__(self, array):
        self.array = array
        self.name = f"fusearray-{secrets.token_hex(16)}"
        self.uid = os.getuid()
        self.scope = None
        self.ended = trio.Event()

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind and accept until `close`; reports False to `start` (and
        returns) when the socket cannot be bound, so the CLI falls back to
        ctl/export and ctl/import."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(b"\0" + self.name.encode())
            sock.listen(16)
        except OSError as e:
            sock.close()
            log.warning("no stream socket (%s): export and import go through ctl/", e)
            self.ended.set()
            task_status.started(False)
            return
        try:
            with sock, trio.CancelScope() as self.scope:
                async with trio.open_nursery() as sessions:
                    task_status.started(True)
                    while True:
                        conn, _ = await sock.accept()
                        sessions.start_soon(self._session, conn)
        finally:
            self.ended.set()

    async def close(self) -> None:
        """Stop serving; running sessions end (an import is kept for
        resume) before this returns, so the array can close after it."""
        if self.scope is not None:
            self.scope.cancel()
        await self.ended.wait()

    # ---- one connection -------------------------------------------------------------
    async def _session(self, conn) -> None:
        fds: list[int] = []
        with conn:
            try:
                try:
                    msg, anc, flags, _ = await conn.recvmsg(
                        MAX_LINE, socket.CMSG_SPACE(4 * _array.array("i").itemsize))
                except OSError:
                    return
                for level, kind, data in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds += _array.array("i", data[:len(data) - len(data) % 4])
                try:
                    reply = await self._command(conn, msg, fds, flags)
                except Exception as e:      # a bug: fail this command, never the mount
                    log.exception("stream socket command failed")
                    err = ArrayError(errno.EIO, f"internal error: {type(e).__name__}: {e}")
                    self.array.event("error", f"stream socket: {err.message}")
                    reply = ctl.format_error(err)
            finally:
                for fd in fds:
                    os.close(fd)
            if reply is not None:
                await self._tell(conn, reply)

    async def _command(self, conn, msg: bytes, fds: list, flags: int):
        """Run the command; its reply, or None when the client went away."""
        line, nl, _ = msg.partition(b"\n")
        verb, _, rest = line.partition(b" ")
        name = verb.decode(errors="replace") or "stream"
        try:
            _, uid, _ = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        PEERCRED.size))
            if uid not in (0, self.uid):
                raise ArrayError(errno.EACCES, f"the stream socket takes commands from root "
                                 f"and uid {self.uid} only, not uid {uid}")
            if not nl:
                raise invalid("a stream command is one line, ended by a newline")
            if verb not in (b"export", b"import"):
                raise invalid(f"the stream socket takes export and import, not {name!r}")
            if len(fds) != 1 or flags & socket.MSG_CTRUNC:
                raise invalid(f"{name}: a stream command carries exactly one file descriptor")
            text = rest.decode()
            if verb == b"export":
                return await self._export(conn, fds[0], text)
            return await self._import(conn, fds[0], text)
        except UnicodeDecodeError:
            return ctl.failure(self.array, name, rest, invalid(f"{name}: the command is "
                                                               "not valid UTF-8 text"))
        except ArrayError as e:
            return ctl.failure(self.array, name, rest, e)
        except BaseExceptionGroup as group:     # from the nurseries: one error inside
            e = _sole(group)
            if isinstance(e, ArrayError):
                return ctl.failure(self.array, name, rest, e)
            raise

    async def _tell(self, conn, data: bytes) -> None:
        try:
            await conn.send(data)
        except OSError:
            pass            # the client is gone: the watcher cancels the work

    async def _while_connected(self, conn, work) -> bool:
        """Run `work()`; cancel it if the client closes its end (it sends
        nothing after the command). True when the client went away. Work
        that must not stop half-way shields itself."""
        gone = False
        async with trio.open_nursery() as nursery:
            async def watch():
                nonlocal gone
                try:
                    await conn.recv(1)
                except OSError:
                    pass
                gone = True
                nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            await work()
            nursery.cancel_scope.cancel()
        return gone

    async def _progress(self, conn, last: list, done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            await self._tell(conn, f"progress={done}\n".encode())

    # ---- export: the daemon writes the stream to the descriptor -----------------------
    async def _export(self, conn, fd: int, line: str):
        run = await transport.ExportRun.start(self.array, line)
        sent, last = 0, [time.monotonic()]

        async def work():
            nonlocal sent
            try:
                st = await trio.to_thread.run_sync(os.fstat, fd)
                if stat.S_ISREG(st.st_mode):      # the CLI leaves truncating to us
                    await trio.to_thread.run_sync(
                        lambda: os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR)))
            except OSError as e:
                raise _os_error("export: the output cannot be written", e) from None
            if run.total is not None:
                await self._tell(conn, f"total={run.total}\n".encode())
            while (pieces := await run.next_batch()) is not None:
                try:
                    sent += await trio.to_thread.run_sync(_write_all, fd, pieces,
                                                          abandon_on_cancel=True)
                except OSError as e:
                    raise _os_error("export: writing the stream failed", e) from None
                for p in pieces:        # written: the batch buffer is free again
                    transport.recycle(p.obj if isinstance(p, memoryview) else p)
                await self._progress(conn, last, sent)
        try:
            if await self._while_connected(conn, work):
                log.info("export %s: the client went away after %d bytes", line, sent)
                return None
        finally:
            run.close()
        return ctl.format_reply({"bytes": sent})

    # ---- import: the daemon reads the stream from the descriptor ----------------------
    async def _import(self, conn, fd: int, line: str):
        imp = transport.start_import(self.array, line)
        got, last = 0, [time.monotonic()]
        pool = ChunkPool(READ_CHUNK)

        async def reader(send):
            async with send:
                while True:
                    chunk = pool.get()
                    try:
                        n = await trio.to_thread.run_sync(_read_into, fd, chunk,
                                                          abandon_on_cancel=True)
                    except OSError as e:
                        await send.send(e)
                        return
                    await send.send((chunk, n))
                    if not n:
                        return

        async def mapped():
            """The part of a file there at the start, parsed where it lies:
            no read copy. What follows (a file still growing) is read."""
            nonlocal got
            source = _map_source(fd)
            if source is None:
                return
            whole, end = memoryview(source[0]), source[1]
            log.info("import: the stream file is mapped (%d bytes parsed where they lie)",
                     len(whole))
            for at in range(0, len(whole), READ_CHUNK):
                piece = whole[at:at + READ_CHUNK]
                await trio.to_thread.run_sync(_populate, piece)   # disk waits off the loop
                with trio.CancelScope(shield=True):       # a chunk is parsed whole
                    await imp.feed(piece)
                got += len(piece)
                await self._progress(conn, last, got)
            os.lseek(fd, end, os.SEEK_SET)

        async def work():
            nonlocal got
            await mapped()
            send, recv = trio.open_memory_channel(READ_AHEAD)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, send)
                async with recv:
                    async for item in recv:
                        if isinstance(item, OSError):      # kept: see finally
                            raise ArrayError(item.errno or errno.EIO, (
                                f"import: reading the stream failed after {got} bytes "
                                f"({item.strerror or item}); what arrived is kept: "
                                "resume with `fusearray import FILE --resume`"))
                        chunk, n = item
                        if not n:
                            break
                        with trio.CancelScope(shield=True):   # a chunk is parsed whole
                            await pool.feed(imp, chunk, n)
                        got += n
                        await self._progress(conn, last, got)
                nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await imp.end_of_input()
        try:
            if await self._while_connected(conn, work):
                return None
        finally:
            with trio.CancelScope(shield=True):
                await imp.interrupted()     # a no-op once finished or failed
        set_name = imp.as_name or imp.header["set"]["name"]
        return ctl.format_reply({"set": set_name, "job": imp.job.id, "blocks": imp.blocks})
