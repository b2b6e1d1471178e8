"""The stream socket: export and import without the stream crossing FUSE.

`fusearray export` and `fusearray import` hand the daemon the descriptor of
their file or pipe (SCM_RIGHTS over a Unix socket), and the daemon writes
or reads the stream there itself, the way `zfs send` hands its descriptor
to the kernel. Through ctl/export and ctl/import every stream byte was
copied by the kernel into FUSE and again by pyfuse3; here it is one
read or write on the descriptor. ctl/export and ctl/import stay the
shell's interface and the CLI's fallback (an older daemon, another network
namespace, FUSEARRAY_STREAM_SOCKET=0).

The socket is a file, ARRAY/run/stream.sock, in a directory of the array
that is 0700 (the socket itself 0600): only root and the daemon's own user
can connect at all; SO_PEERCRED is checked again at accept. Its path is
published as the xattr `user.fusearray.stream_socket` of the mount's ctl/
directory (a path too long for sun_path is reached through
/proc/self/fd/N/stream.sock). A stale socket left by a SIGKILL is replaced
at the next mount (the array's lock says no other daemon serves it).

Nobody can wedge the daemon through it: connections are bounded per peer
process (MAX_PER_PEER) and in total (MAX_CONNECTIONS), refused beyond with
EBUSY; a connection must send its command within COMMAND_TIMEOUT seconds;
a transfer that moves no byte for IDLE_TIMEOUT seconds ends (an import is
kept for --resume); an error from accept() (EMFILE, ENFILE, ENOBUFS, ...)
is an event and a back-off, and the server keeps serving. Reads and writes
of the clients' descriptors run on threads of their own limiter, so stalled
clients never hold the threads the array needs.

Protocol: the client sends one message, the command line
(`export SET [base=SET2]` or `import [as=SET] [pack=P] [remap=yes]
[resume=yes [job=N]]`, newline-ended) with exactly one descriptor. The
server answers with lines: `total=N` (an export's size estimate, when
known), `progress=N` (stream bytes so far, at most five a second), then the
reply of the ctl protocol (`status=ok|error` and its key=value lines), and
closes. A client that goes away cancels: an export stops, an import is kept
for `import --resume`, as when a ctl/import writer closes early; so is an
import whose input ends when its client is already gone (a killed
`fusearray import s3://...` writes its pipe itself, and its descriptors close
together: the CLI keeps the socket below the pipe, so the socket is closed
first; should the pipe still end first, an input that ends without its
trailer waits END_GRACE for the client to go before it is called truncated).
"""
import array as _array
import collections
import errno
import logging
import os
import secrets
import select
import socket
import stat
import struct
import time

import trio

from . import ctl, transport
from .errors import ArrayError, invalid

# None when not available (see fusearray.native): the stream is read
from .native import map_stream as _map_stream
from .native import populate as _populate

log = logging.getLogger("fusearray")

MAX_LINE = 4096
READ_CHUNK = 4 << 20        # import: bytes per read of the source
READ_AHEAD = 2              # import: chunks read ahead of the parser
PROGRESS_EVERY = 0.2        # seconds between progress lines
PEERCRED = struct.Struct("3i")
SOCKET_DIR = "run"
SOCKET_NAME = "stream.sock"


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


MAX_CONNECTIONS = int(_env_number("FUSEARRAY_STREAM_MAX_CONNECTIONS", 32))
MAX_PER_PEER = int(_env_number("FUSEARRAY_STREAM_MAX_PER_PEER", 8))
COMMAND_TIMEOUT = _env_number("FUSEARRAY_STREAM_COMMAND_TIMEOUT", 30)
IDLE_TIMEOUT = _env_number("FUSEARRAY_STREAM_IDLE_TIMEOUT", 600)
ACCEPT_BACKOFF_MAX = 2.0
NOTE_EVERY = 60.0           # seconds between events about refused connections
EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def socket_address(path: str):
    """What to bind or connect to for the socket file `path`: the path, or
    /proc/self/fd/N/NAME when it is too long for sun_path (then also the
    directory's descriptor, to close after)."""
    if len(os.fsencode(path)) < 100:
        return path, None
    dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{dfd}/{os.path.basename(path)}", dfd


def _write_all(fd: int, pieces, activity=None) -> int:
    """Write every piece (a pipe or a socket may take part of a writev);
    `activity[0]` is set to the time of each write that moved bytes."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    done = 0
    while views:
        n = os.writev(fd, views)
        done += n
        if activity is not None:
            activity[0] = time.monotonic()
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return done


def _read_into(fd: int, buf: bytearray, activity=None) -> int:
    """Fill `buf` from `fd`; fewer bytes only at the end of the input. A
    file fills it in one read; a pipe hands out what it holds, so keep
    reading to give the parser big pieces."""
    mv = memoryview(buf)
    got = 0
    while got < len(buf) and (n := os.readv(fd, [mv[got:]])):
        got += n
        if activity is not None:
            activity[0] = time.monotonic()
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


#: How long an import whose input ended without its trailer waits for its
#: client to go too before it calls the stream truncated (_import).
END_GRACE = 1.0


def _gone(conn) -> bool:
    """Has the client closed its end (or sent something, which it never
    does)? Asked without waiting, at the end of an import's input."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(p.poll(0))


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
        self.name = os.path.join(array.path, SOCKET_DIR, SOCKET_NAME)
        self.uid = os.getuid()
        self.scope = None
        self.ended = trio.Event()
        self.total = 0
        self.peers: dict[int, int] = {}         # pid -> open connections
        self.io = trio.CapacityLimiter(MAX_CONNECTIONS * 2)
        self._noted: dict[str, float] = {}
        self.refused = 0                        # connections turned away (status)

    def _note(self, key: str, level: str, message: str) -> None:
        """An event, at most one per NOTE_EVERY seconds for `key` (a flood
        of refused connections must not flood the log)."""
        now = time.monotonic()
        if now - self._noted.get(key, -NOTE_EVERY) >= NOTE_EVERY:
            self._noted[key] = now
            self.array.event(level, message)

    def _bind(self):
        """The listening socket in its private directory (blocking)."""
        d = os.path.dirname(self.name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self.uid:
            raise OSError(errno.EPERM, f"{d} is not a directory of uid {self.uid}")
        os.chmod(d, 0o700)
        try:
            os.unlink(self.name)            # a stale one (we hold the array's lock)
        except FileNotFoundError:
            pass
        addr, dfd = socket_address(self.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr)
            os.chmod(addr, 0o600)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        finally:
            if dfd is not None:
                os.close(dfd)
        return sock

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind and accept until `close`; reports False to `start` (and
        returns) when the socket cannot be bound, so the CLI falls back to
        ctl/export and ctl/import."""
        try:
            sock = trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(self._bind))
        except OSError as e:
            log.warning("no stream socket (%s): export and import go through ctl/", e)
            self.ended.set()
            task_status.started(False)
            return
        try:
            with sock, trio.CancelScope() as self.scope:
                async with trio.open_nursery() as sessions:
                    task_status.started(True)
                    await self._accept_loop(sock, sessions)
        finally:
            try:
                os.unlink(self.name)
            except OSError:
                pass
            self.ended.set()

    async def _accept_loop(self, sock, sessions) -> None:
        backoff = 0.0
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                # EMFILE and its kin: the pending connection waits in the
                # backlog; back off and serve on (never a busy loop, never an exit)
                backoff = min(max(backoff * 2, 0.05), ACCEPT_BACKOFF_MAX)
                if e.errno in EXHAUSTED:
                    self._note("exhausted", "warning", f"stream socket: accept failed "
                               f"({e.strerror or e}): out of descriptors or memory; "
                               f"retrying (ctl/ and the LUNs are not affected)")
                elif e.errno not in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    self._note("accept", "warning", f"stream socket: accept failed "
                               f"({e.strerror or e}); retrying")
                await trio.sleep(backoff)
                continue
            except Exception as e:          # a bug: never the daemon's end
                log.exception("stream socket accept")
                self._note("accept", "error", f"stream socket: accept failed "
                           f"({type(e).__name__}: {e}); retrying")
                backoff = min(max(backoff * 2, 0.05), ACCEPT_BACKOFF_MAX)
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            try:
                self._admit(conn, sessions)
            except Exception:
                log.exception("stream socket admit")
                conn.close()

    def _admit(self, conn, sessions) -> None:
        """Start a session for `conn`, or turn it away at once (a short
        reply, never a wait): a user other than root and ours, or over the
        per-peer or total limit."""
        try:
            pid, uid, _ = PEERCRED.unpack(conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        except OSError:
            conn.close()
            return
        err = None
        if uid not in (0, self.uid):
            err = ArrayError(errno.EACCES, f"the stream socket takes commands from root "
                             f"and uid {self.uid} only, not uid {uid}")
            self._note(f"uid{uid}", "error", f"stream socket: {err.message}")
        elif self.total >= MAX_CONNECTIONS or self.peers.get(pid, 0) >= MAX_PER_PEER:
            which = (f"{MAX_CONNECTIONS} in all" if self.total >= MAX_CONNECTIONS
                     else f"{MAX_PER_PEER} per process")
            err = ArrayError(errno.EBUSY, f"the stream socket serves at most {which}: "
                             "wait for a running export or import to end")
            self._note("busy", "warning", f"stream socket: connection of pid {pid} "
                       f"(uid {uid}) refused: {err.message}")
        if err is not None:
            self.refused += 1
            try:
                os.write(conn.fileno(), ctl.format_error(err))     # non-blocking, small
            except OSError:
                pass
            conn.close()
            return
        self.total += 1
        self.peers[pid] = self.peers.get(pid, 0) + 1
        sessions.start_soon(self._counted, conn, pid)

    async def _counted(self, conn, pid: int) -> None:
        try:
            await self._session(conn)
        except Exception:                   # never out of the nursery
            log.exception("stream socket session")
        finally:
            self.total -= 1
            self.peers[pid] -= 1
            if not self.peers[pid]:
                del self.peers[pid]

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
                msg = None
                with trio.move_on_after(COMMAND_TIMEOUT):
                    try:
                        msg, anc, flags, _ = await conn.recvmsg(
                            MAX_LINE, socket.CMSG_SPACE(4 * _array.array("i").itemsize))
                    except OSError:
                        return
                if msg is None:
                    await self._tell(conn, ctl.format_error(ArrayError(
                        errno.ETIMEDOUT, f"no command within {COMMAND_TIMEOUT:g} s: the "
                        "connection is closed")))
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
        with trio.move_on_after(COMMAND_TIMEOUT):   # a client that never reads
            try:
                await conn.send(data)
            except OSError:
                pass            # the client is gone: the watcher cancels the work

    async def _while_connected(self, conn, work, activity=None, idle: str = "") -> bool:
        """Run `work()`; cancel it if the client closes its end (it sends
        nothing after the command). True when the client went away. Work
        that must not stop half-way shields itself. With `activity`, a
        transfer that moves no byte for IDLE_TIMEOUT seconds ends with
        ETIMEDOUT (`idle` says what did not move)."""
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

            async def watchdog():
                while True:
                    await trio.sleep(max(min(IDLE_TIMEOUT / 4, 5.0), 0.05))
                    if time.monotonic() - activity[0] > IDLE_TIMEOUT:
                        raise ArrayError(errno.ETIMEDOUT, f"{idle} for {IDLE_TIMEOUT:g} s: "
                                         "the transfer was ended" + (
                                             "; what arrived is kept: resume with "
                                             "`fusearray import FILE --resume`"
                                             if idle.startswith("import") else ""))
            nursery.start_soon(watch)
            if activity is not None:
                nursery.start_soon(watchdog)
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
        activity = [time.monotonic()]

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
                    sent += await trio.to_thread.run_sync(_write_all, fd, pieces, activity,
                                                          abandon_on_cancel=True,
                                                          limiter=self.io)
                except OSError as e:
                    raise _os_error("export: writing the stream failed", e) from None
                for p in pieces:        # written: the batch buffer is free again
                    transport.recycle(p.obj if isinstance(p, memoryview) else p)
                await self._progress(conn, last, sent)
        try:
            if await self._while_connected(conn, work, activity, "export: the output took "
                                           "no byte"):
                log.info("export %s: the client went away after %d bytes", line, sent)
                return None
        finally:
            run.close()
        return ctl.format_reply({"bytes": sent})

    # ---- import: the daemon reads the stream from the descriptor ----------------------
    async def _import(self, conn, fd: int, line: str):
        imp = transport.start_import(self.array, line)
        got, last = 0, [time.monotonic()]
        activity = [time.monotonic()]
        pool = ChunkPool(READ_CHUNK)

        async def reader(send):
            async with send:
                while True:
                    chunk = pool.get()
                    try:
                        n = await trio.to_thread.run_sync(_read_into, fd, chunk, activity,
                                                          abandon_on_cancel=True,
                                                          limiter=self.io)
                        item = (chunk, n)
                    except OSError as e:
                        item, n = e, 0
                    try:
                        await send.send(item)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        # the parser stopped (its own error says why): a second
                        # error here made the reply "internal error: ExceptionGroup"
                        return
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
                activity[0] = time.monotonic()
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
                            if not _gone(conn) and not imp.verified:
                                # no trailer and the client still there: its
                                # descriptors may close a moment apart (seen: the
                                # pipe's end first); one gone meanwhile cancels
                                # this wait (_while_connected), kept for --resume
                                await trio.sleep(END_GRACE)
                            if _gone(conn):
                                # the writer and the client ended together (a killed
                                # `fusearray import s3://...` feeding a pipe): an
                                # interruption, kept for --resume, not a truncation
                                left[0] = True
                                return
                            break
                        with trio.CancelScope(shield=True):   # a chunk is parsed whole
                            await pool.feed(imp, chunk, n)
                        got += n
                        await self._progress(conn, last, got)
                nursery.cancel_scope.cancel()
            activity[0] = float("inf")      # all read: the end is not idleness
            with trio.CancelScope(shield=True):
                await imp.end_of_input()
        left = [False]
        try:
            if await self._while_connected(conn, work, activity, (
                    "import: no stream byte arrived")) or left[0]:
                return None
        finally:
            with trio.CancelScope(shield=True):
                await imp.interrupted()     # a no-op once finished or failed
        set_name = imp.as_name or imp.header["set"]["name"]
        return ctl.format_reply({"set": set_name, "job": imp.job.id, "blocks": imp.blocks})
