"""RadosMedium: a disk that is a namespace of a RADOS pool (`rados:POOL/NAMESPACE`).

The same interface as media.DirMedium (read media.py first), over librados
through Debian's `rados` binding (python3-rados, Ceph 16.2 Pacific).

Layout: one disk is one *namespace* of a pool. Every segment file is one
object of that namespace, named as in a directory (`00000001.seg`), and the
label is the object `fusearray-disk.json` beside them. Several packs (or
arrays) may share a pool, each in its own namespace: an I/O context set to a
namespace sees and lists only that namespace's objects (`names()` walks the
namespace alone, checked in tests/test_media.py). `rados:POOL` without a
namespace is the pool's default namespace ("").

Durability: RADOS acknowledges a write (and a create, trunc, remove,
write_full) only once every OSD of the object's acting set has it on stable
storage, so `fsync` and `sync_dir` are no-ops and `write_label` is one
`write_full` (atomic: a reader sees the old label or the new one). The
redundancy of a rados disk is the pool's (its size / erasure code), so a
rados pack has one disk.

No rename: RADOS has no rename of an object (only a copy). `renames` is
False, so the store keeps no spare segment files for this medium; `rename`
raises EOPNOTSUPP.

Object size: segments are at most 64 MiB; the OSD refuses objects larger
than `osd_max_object_size` (default 128 MiB) with EFBIG, and single writes
larger than `osd_max_write_size` (default 90 MB); `pwritev` sends at most
WRITE_CHUNK (2 MiB) per RADOS write, the pieces of a bigger one in flight at
once, and `preadv` reads READ_CHUNK (4 MiB) pieces the same way. Measured on
the tests' cluster (loopback, one memstore OSD, 2 cores, medians of
interleaved runs): 1 MiB pwritev/preadv ~1000/1200 MiB/s, as raw
Ioctx.write/read (1040/1380); 16 MiB pwritev 855-945 MiB/s with 4 MiB
pieces (one 16 MiB write: 770), preadv 1020 (one read and the copy into the
caller's buffer: 670; the raw read alone 1180). aio_write for a single
write measured the same as write. A store append is ~16 MiB (the write-back
cache's flush batch: 256 records of 64 KiB + 24 bytes, 3 of them to a
segment): cut in 2 MiB pieces (8 in flight) it ran 12-17 % faster than in
4 MiB pieces (three runs of 20-40 interleaved rounds of 3 appends on the
bench VM, loaded by others: 716/671/635 MB/s against 613/586/564; 1 MiB
pieces 687/672/676, 8 MiB 563/561/518), for the same CPU; a tail piece of a few KiB (16 MiB + 6 KiB cut
in 4 MiB) costs nothing measurable, so pieces are cut plainly.

Handles are object names (`fds` False: no mappings, no page-cache reads);
`open`/`close` only check existence. Note RADOS semantics that differ from a
file held open: a write to an object that was removed creates it again, and
`trunc` of an object that is not there is a silent no-op in the OSD. The
store closes a segment's handle before it unlinks it, so neither happens.

Connections: one `rados.Rados` per conf file per process, shared by every
medium of that cluster (`_clusters`, under `_lock`), connected lazily on
first use with client timeouts (at most CLIENT_TIMEOUT s for an OSD op, a
mon op, the connect), so a dead cluster fails an operation with ETIMEDOUT,
never hangs it. After a failed connect, operations fail at once for
RETRY_CONNECT s rather than each waiting for the timeout again. A process
that forks gets a connection of its own (librados is not fork-safe). Each
medium opens one I/O context, sets its namespace once and shares it between
the worker threads: librados I/O on one context is thread-safe and the
binding releases the GIL around it; what is not (opening the context,
connecting) is under a lock. `shutdown()` (at unmount, once no I/O is in
flight) closes every context and connection; a later use connects again.

Errors: every method raises OSError only (the store relies on it): missing
object -> FileNotFoundError, exists -> FileExistsError, timeout ->
ETIMEDOUT, full -> ENOSPC, denied -> EACCES, other librados errors their own
errno (EIO when they carry none), each message naming the medium and object.

The binding (checked against Pacific 16.2.15): there is no Ioctx.create,
so `open(create=True)` is a write op `new(LIBRADOS_CREATE_EXCLUSIVE)`;
Ioctx.write takes `bytes` only (a bytearray or memoryview is refused, so
an iov is joined: one copy); a zero-length write creates the object and
extends it to its offset, unlike pwritev(2), so none is sent; a read of
length 0 fails with ERANGE (librados reads to the object's end into no
room), so none is sent either; an aio_read
that read nothing hands its callback a buffer of the full length,
uninitialised (only get_return_value() bytes count); mon_command ignores its
timeout argument (the client's rados_mon_op_timeout applies), and commands
a mgr serves (`osd df`) wait for it when there is none.

Space: `space()` is the pool's usable bytes from the mon's `df` (max_avail:
after replication and the full ratio; what `ceph df` shows), not the raw
cluster total of `get_cluster_stats` (which counts every replica and
ignores the full ratio, so a size-3 pool would look three times as big).
Both come from the mgr: a cluster without a mgr (the tests') reports zeros
there, and then the OSDs' own statfs is summed instead (up+in OSDs,
divided by the pool's size, less the full ratio's reserve). Cached for
SPACE_TTL s per pool.
"""
import contextlib
import errno
import json
import os
import re
import struct
import threading
import time
import weakref

from .media import LABEL, RADOS_PREFIX

try:
    import rados
except ImportError as _e:           # only rados packs need it
    rados = None
    _IMPORT_ERROR = str(_e)

#: seconds after which a librados OSD op, mon op or the connect gives up
#: (a smaller value in the conf file wins; 0 there means "never" and is replaced)
CLIENT_TIMEOUT = 30
_TIMEOUT_OPTIONS = ("rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout")
#: after a failed connect, fail at once for this long instead of waiting again
RETRY_CONNECT = 5.0
#: status() waits at most this long for the cluster's health
STATUS_TIMEOUT = 5.0
#: space() answers from a cache this young
SPACE_TTL = 2.0
#: the most bytes one RADOS write carries: a bigger pwritev sends pieces of
#: this size, all in flight at once (faster: 2 MiB pieces of a store append
#: measured 12-17 % faster than 4 MiB ones, see the module docstring; and
#: the OSD refuses writes over its osd_max_write_size, 90 MB by default)
WRITE_CHUNK = 2 << 20
#: the most bytes one RADOS read asks for: a bigger preadv reads pieces of
#: this size, all in flight at once
READ_CHUNK = 4 << 20


def _errno_of(e: BaseException) -> int:
    if rados is not None:
        if isinstance(e, rados.ObjectNotFound):
            return errno.ENOENT
        if isinstance(e, rados.ObjectExists):
            return errno.EEXIST
        if isinstance(e, rados.TimedOut):
            return errno.ETIMEDOUT
        if isinstance(e, rados.NoSpace):
            return errno.ENOSPC
        if isinstance(e, (rados.PermissionError, rados.PermissionDeniedError)):
            return errno.EACCES
    code = getattr(e, "errno", None)
    if isinstance(code, int) and code and abs(code) in errno.errorcode:
        return abs(code)
    return errno.EIO


def _errno_of_ret(ret: int) -> int:
    """The errno of a librados return value (< 0), as _errno_of maps them."""
    code = -ret
    if code == errno.EPERM:
        return errno.EACCES
    return code if code in errno.errorcode else errno.EIO


def _chunks(iov, size: int):
    """The bytes of `iov` cut into pieces of `size` (the last shorter), one
    at a time: one copy (the binding takes only bytes). A generator, so
    that pwritev sends each piece before it joins the next and lets it go:
    librados has copied it by then, and the next join reuses its memory.
    Joining all the pieces first (a list) touched fresh pages for every
    append: 15,000 minor page faults per three 16 MiB appends against 2,000,
    twice the CPU, and 418-450 MB/s against 579-709 (four runs of 20-30
    interleaved rounds on the bench VM)."""
    cur, n = [], 0
    for b in iov:
        mv = memoryview(b)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        while len(mv):
            take = min(size - n, len(mv))
            cur.append(mv[:take])
            n += take
            mv = mv[take:]
            if n == size:
                yield b"".join(cur)
                cur, n = [], 0
    if n:
        yield b"".join(cur)


def _scatter(views, pos: int, src) -> None:
    """Copy `src` into the byte views `views` (one space, in order) at `pos`."""
    src = memoryview(src)
    for v in views:
        if not len(src):
            return
        if pos >= len(v):
            pos -= len(v)
            continue
        n = min(len(v) - pos, len(src))
        v[pos:pos + n] = src[:n]
        src = src[n:]
        pos = 0


def _oserror(e: BaseException, where: str) -> OSError:
    """A librados error as an OSError (FileNotFoundError etc. by errno)."""
    code = _errno_of(e)
    text = re.sub(r"^\[errno -?\d+\] ", "", str(e)) or type(e).__name__
    if not text.startswith("RADOS "):       # the binding's bare classes say only where
        text = f"{os.strerror(code)} ({text})"
    return OSError(code, f"{where}: {text}")


class _Cluster:
    """The one connection of this process to the cluster of `conf`."""

    def __init__(self, conf: str):
        self.conf = conf
        self.pid = os.getpid()
        self.closed = False
        self._lock = threading.Lock()      # the state below (never held across I/O)
        self._connecting = threading.Lock()   # one connect at a time
        self._client = None
        self._failed: tuple[float, OSError] | None = None
        #: the media with an I/O context of this connection (closed before it)
        self.media: "weakref.WeakSet[RadosMedium]" = weakref.WeakSet()
        self._probe: "_Probe | None" = None
        self.space_cache: dict[str, tuple[float, tuple[int, int]]] = {}

    def client(self):
        """The connected rados.Rados (connecting on first use: one connect
        at a time, and not under `_lock`, so shutdown() never waits for it)."""
        c = self._client
        if c is not None:
            return c
        with self._connecting:
            with self._lock:
                if self._client is not None:
                    return self._client
                if self.closed:
                    raise OSError(errno.ESHUTDOWN, f"the connection to {self.conf} is shut down")
                failed = self._failed
            if failed and time.monotonic() - failed[0] < RETRY_CONNECT:
                e = failed[1]
                raise OSError(e.errno, f"{e.strerror} (not tried again for {RETRY_CONNECT:g} s)")
            if rados is None:
                raise OSError(errno.ENOSYS, "the Python module `rados` (Debian's python3-rados) "
                                            f"is missing: {_IMPORT_ERROR}")
            c = None
            try:
                with ceph_args_for_vfs():   # (a cluster array's catalogue comes later)
                    c = rados.Rados(conffile=self.conf, **client_identity())
                for opt in _TIMEOUT_OPTIONS:
                    try:
                        v = float(c.conf_get(opt) or 0)
                    except (ValueError, rados.Error):
                        v = 0
                    if not 0 < v <= CLIENT_TIMEOUT:
                        c.conf_set(opt, str(CLIENT_TIMEOUT))
                c.connect()
            except rados.Error as e:
                err = _oserror(e, f"connecting to the Ceph cluster of {self.conf}")
                self._failed = (time.monotonic(), err)
                _quietly(c)
                raise err from None
            with self._lock:
                closed = self.closed
                if not closed:
                    self._failed = None
                    self._client = c
            if closed:                  # shut down while it connected
                _quietly(c)
                raise OSError(errno.ESHUTDOWN, f"the connection to {self.conf} is shut down")
            return c

    def open_ioctx(self, medium: "RadosMedium"):
        """An I/O context of `medium`'s pool, set to its namespace."""
        pool, who = medium.pool, medium.path
        c = self.client()
        try:
            io = c.open_ioctx(pool)
        except rados.ObjectNotFound:
            raise FileNotFoundError(errno.ENOENT, f"{who}: pool {pool} does not exist in the "
                                                  f"Ceph cluster of {self.conf}") from None
        except rados.Error as e:
            raise _oserror(e, f"{who}: opening pool {pool} of {self.conf}") from None
        io.set_namespace(medium.namespace)
        with self._lock:
            if self.closed:          # shut down meanwhile
                io.close()
                raise OSError(errno.ESHUTDOWN, f"the connection to {self.conf} is shut down")
            self.media.add(medium)
        return io

    def shutdown(self) -> None:
        with self._lock:
            self.closed = True
            media, self.media = list(self.media), weakref.WeakSet()
            c, self._client = self._client, None
        # every I/O context before the connection (one destroyed after
        # rados_shutdown would use freed memory)
        for m in media:
            m.drop_ioctx(self)
        _quietly(c)

    def health(self) -> str:
        """The cluster's health status (HEALTH_OK, ...) or "unreachable: why",
        within STATUS_TIMEOUT s: the mon command runs in a thread of its own
        (the binding ignores mon_command's timeout; a hung one ends at the
        client's mon op timeout), at most one at a time per cluster."""
        with self._lock:
            p = self._probe
            if p is None or p.done.is_set():
                p = self._probe = _Probe(self)
        if not p.done.wait(STATUS_TIMEOUT):
            return f"unreachable: no answer from the cluster of {self.conf} in {STATUS_TIMEOUT:g} s"
        return p.result


#: The OSD-op timeout of Ceph's SQLite VFS's RADOS client (a cluster
#: array's catalogue): none. The VFS (SimpleRADOSStriper) sends SQLite's
#: writes as async RADOS writes and, at xSync, waits for them with
#: AioCompletion::wait_for_complete(), which returns 0 whatever the write's
#: result (Ceph 16 here; fixed upstream in ceph/ceph#69195, tracker 77010,
#: not in Debian's 16.2): a write that timed out (a full pool, OSDs
#: down past the timeout) is reported to SQLite as durable and the commit is
#: lost without an error. Seen here: a pool full for 90 s with the timeout
#: at 60 s lost four acknowledged commits; the next mount found the packs'
#: commit record ahead of the catalogue. With no timeout such a write waits
#: until the cluster takes it, and the commit with it. It overrides a
#: timeout the configuration or CEPH_ARGS sets.
VFS_OSD_OP_TIMEOUT = "--rados_osd_op_timeout=0"


def vfs_ceph_args(ceph_args: str) -> str:
    """`ceph_args` (CEPH_ARGS) with any OSD-op timeout replaced by
    VFS_OSD_OP_TIMEOUT."""
    out, words = [], ceph_args.split()
    i = 0
    while i < len(words):
        w = words[i]
        if w.split("=", 1)[0].lstrip("-").replace("-", "_") == "rados_osd_op_timeout":
            i += 1 if "=" in w else 2      # (`--opt=v` or `--opt v`)
            continue
        out.append(w)
        i += 1
    return " ".join(out + [VFS_OSD_OP_TIMEOUT])


_ceph_args_lock = threading.Lock()


@contextlib.contextmanager
def ceph_args_for_vfs():
    """`with ceph_args_for_vfs():` make a Ceph client (ours, or the VFS's at
    its first open): libceph-common reads CEPH_ARGS once per process (its
    env_to_vec keeps the first read for every later client), so whichever
    client comes first fixes them for the VFS too; inside, CEPH_ARGS is
    vfs_ceph_args of the user's. Outside it is the user's again: what this
    process starts (hooks, the ceph tools) sees it unchanged. Our own
    clients set their timeouts on their handles and are not affected. One
    thread at a time (clients are made in worker threads): two at once would
    each save the other's value and one would leave it set."""
    with _ceph_args_lock:
        old = os.environ.get("CEPH_ARGS")
        os.environ["CEPH_ARGS"] = vfs_ceph_args(old or "")
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("CEPH_ARGS", None)
            else:
                os.environ["CEPH_ARGS"] = old


def client_identity(env=None) -> dict:
    """Who this process is to the cluster: the client name in CEPH_ARGS, as
    the ceph tools take it (`--id ID`, `-i ID`, `--name client.ID`, `-n
    client.ID`, `--user ID`), as the keywords of rados.Rados; {} for the
    default, client.admin. (librados's own parse of CEPH_ARGS cannot change
    the name of a handle already made, so it is read here.) The keyring
    the conf names for that client is then the one used: a key with only
    the caps a pack needs (docs/scale-out.md) instead of the admin key."""
    args = (os.environ if env is None else env).get("CEPH_ARGS", "").split()
    for i, a in enumerate(args):
        key, eq, val = a.partition("=")
        if not eq:
            val = args[i + 1] if i + 1 < len(args) else ""
        if key in ("--id", "-i", "--user") and val:
            return {"rados_id": val}
        if key in ("--name", "-n") and val:
            return {"name": val}
    return {}


def _quietly(c) -> None:
    """Shut the rados.Rados `c` down (if any), ignoring its errors."""
    if c is not None:
        try:
            c.shutdown()
        except Exception:          # noqa: BLE001  (closing: nothing to do about it)
            pass


class _Probe:
    """One health query of a cluster, in a daemon thread."""

    def __init__(self, cluster: _Cluster):
        self.cluster = cluster
        self.done = threading.Event()
        self.result = ""
        threading.Thread(target=self._run, name="rados-health", daemon=True).start()

    def _run(self) -> None:
        try:
            out = _mon(self.cluster, {"prefix": "health", "format": "json"})
            self.result = str(json.loads(out)["status"])
        except OSError as e:
            self.result = f"unreachable: {e.strerror or e}"
        except (ValueError, KeyError, TypeError) as e:
            self.result = f"unreachable: unreadable health: {e}"
        finally:
            self.done.set()


def _mon(cluster: _Cluster, cmd: dict) -> bytes:
    """A mon command's output; OSError on failure."""
    c = cluster.client()
    try:
        ret, out, errs = c.mon_command(json.dumps(cmd), b"")
    except rados.Error as e:
        raise _oserror(e, f"mon command {cmd['prefix']!r} to {cluster.conf}") from None
    if ret:
        code = abs(ret) if abs(ret) in errno.errorcode else errno.EIO
        raise OSError(code, f"mon command {cmd['prefix']!r} to {cluster.conf}: "
                            f"{errs or os.strerror(code)}")
    return out


_lock = threading.Lock()
_clusters: dict[str, _Cluster] = {}
#: I/O contexts a forked child inherited: its parent's, kept from being destroyed
_PARENTS_IOCTXS: list = []


def _cluster(conf: str) -> _Cluster:
    """The connection of this process to the cluster of `conf`."""
    key = os.path.abspath(conf)
    with _lock:
        cl = _clusters.get(key)
        if cl is None or cl.closed or cl.pid != os.getpid():
            # (a fork's child leaves the parent's connection alone: not its own)
            cl = _clusters[key] = _Cluster(key)
        return cl


def shutdown() -> None:
    """Close every I/O context and connection of this process (at unmount,
    when no I/O is in flight: librados must not be used during its
    shutdown). Media used later connect again."""
    with _lock:
        mine = [c for c in _clusters.values() if c.pid == os.getpid()]
        _clusters.clear()
    for c in mine:
        c.shutdown()


def parse_path(path: str) -> tuple[str, str]:
    """`rados:POOL/NAMESPACE` -> (POOL, NAMESPACE); `rados:POOL` -> (POOL, "")."""
    if not path.startswith(RADOS_PREFIX):
        raise OSError(errno.EINVAL, f"{path!r} is not a rados disk (rados:POOL/NAMESPACE)")
    pool, _, namespace = path[len(RADOS_PREFIX):].partition("/")
    if not pool:
        raise OSError(errno.EINVAL, f"{path!r}: no pool (rados:POOL/NAMESPACE)")
    return pool, namespace


class RadosMedium:
    """A disk that is the namespace NAMESPACE of pool POOL of a Ceph cluster
    (the module docstring has the design)."""

    kind = "rados"
    fds = False         # handles are object names: no mappings, no no-wait reads
    #: the disk check lists the namespace at most this often (s): a listing
    #: walks every PG of the pool (docs/scale-out.md), the label read and
    #: the lease catch a pool or a take-over that went away at every check
    LIST_EVERY = 60
    renames = False     # RADOS cannot rename an object: no spare segment files
    #: None in service; a callable that takes each I/O context as it is
    #: opened and returns the one to use (tools/benchmarks/radostrace wraps
    #: it to record the RADOS ops the pack issues)
    wrap_ioctx = None

    def __init__(self, path: str, ceph_conf: str | None = None):
        self.path = path
        self.pool, self.namespace = parse_path(path)
        conf = ceph_conf or os.environ.get("CEPH_CONF")
        if not conf:
            raise OSError(errno.EINVAL, f"{path}: no Ceph cluster named: give its ceph.conf "
                                        "(--ceph-conf) or set CEPH_CONF")
        self.conf = os.path.abspath(conf)      # (a daemon may change directory)
        self._lock = threading.Lock()
        self._cl: _Cluster | None = None
        self._io = None                 # the I/O context, opened on first use
        self._io_of: _Cluster | None = None     # the connection it belongs to
        #: the mount's exclusive lease on this namespace (take_lease); once
        #: wanted, nothing is written without it
        self.lease: "Lease | None" = None

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"RadosMedium({self.path!r}, {self.conf!r})"

    # ---- plumbing ---------------------------------------------------------------
    def _cluster(self) -> _Cluster:
        cl = self._cl
        if cl is None or cl.closed or cl.pid != os.getpid():
            cl = self._cl = _cluster(self.conf)
        return cl

    def _ioctx(self):
        """This medium's I/O context (opened on first use, or again after a
        shutdown); OSError if the cluster or the pool is not there."""
        io, cl = self._io, self._io_of
        if io is not None and not cl.closed and cl.pid == os.getpid():
            return io
        with self._lock:
            cl = self._cluster()
            if self._io is None or self._io_of is not cl:
                if self._io is not None and self._io_of.pid != os.getpid():
                    # the parent's, in a forked child: never destroyed here
                    _PARENTS_IOCTXS.append(self._io)
                self._client()              # the connect's error, naming this medium
                io = cl.open_ioctx(self)
                wrap = RadosMedium.wrap_ioctx
                self._io = io if wrap is None else wrap(io)
                self._io_of = cl
            return self._io

    def drop_ioctx(self, cl: _Cluster) -> None:
        """Close the I/O context if it is of connection `cl` (being shut
        down); the next use opens another."""
        with self._lock:
            if self._io is None or self._io_of is not cl:
                return
            io, self._io = self._io, None
        try:
            io.close()
        except Exception:          # noqa: BLE001  (closing: nothing to do about it)
            pass

    def _client(self):
        """The connected rados.Rados of this medium's cluster."""
        try:
            return self._cluster().client()
        except OSError as e:
            raise OSError(e.errno, f"{self.path}: {e.strerror}") from None

    def _err(self, e: BaseException, what: str, name: str | None = None) -> OSError:
        where = f"{self.path}: {what}" + (f" {name}" if name is not None else "")
        return _oserror(e, where)

    # ---- the disk as a whole ------------------------------------------------------
    def present(self) -> bool:
        """Does the pool exist? (OSError if the cluster does not answer.)"""
        c = self._client()
        try:
            return c.pool_exists(self.pool)
        except rados.Error as e:
            raise self._err(e, "looking up the pool") from None

    def prepare(self) -> None:
        """Nothing to create (a namespace exists by its objects); the pool
        must exist: FileNotFoundError otherwise."""
        if not self.present():
            raise FileNotFoundError(
                errno.ENOENT, f"{self.path}: pool {self.pool} does not exist in the Ceph "
                              f"cluster of {self.conf}: create it first "
                              f"(ceph osd pool create {self.pool})")

    def write_label(self, data: bytes) -> None:
        """One write_full: atomic and durable once it returns."""
        self._may_write()
        io = self._ioctx()
        try:
            io.write_full(LABEL, bytes(data))
        except rados.Error as e:
            raise self._err(e, "writing", LABEL) from None

    def read_label(self) -> bytes:
        return self._read_all(LABEL)

    def _read_all(self, name: str) -> bytes:
        io = self._ioctx()
        chunk, parts, off = 1 << 20, [], 0
        try:
            while True:
                b = io.read(name, chunk, off)
                parts.append(b)
                off += len(b)
                if len(b) < chunk:
                    return b"".join(parts)
        except rados.Error as e:
            raise self._err(e, "reading", name) from None

    def read_object(self, name: str) -> bytes:
        """The whole of object `name` (FileNotFoundError if it is not there)."""
        return self._read_all(name)

    def write_object(self, name: str, data: bytes) -> None:
        """Replace object `name` with `data`: one write_full, atomic and
        durable once it returns."""
        self._may_write()
        io = self._ioctx()
        try:
            io.write_full(name, bytes(data))
        except rados.Error as e:
            raise self._err(e, "writing", name) from None

    def unlock_dead(self, obj: str, lock: str, holder_xattr: str) -> list[str]:
        """Fence and unlock a dead holder of cls_lock `lock` on `obj` whose
        address is in xattr `holder_xattr` (Ceph's SQLite VFS records its
        client there: an exclusive lock a dead daemon's catalogue still
        holds would otherwise keep the next mount waiting its whole
        duration). Only for a caller that holds this namespace's lease: no
        live mount can hold it then. Returns the addresses blocklisted."""
        c, io = self.lease_io()
        try:
            try:
                held_by = io.get_xattr(obj, holder_xattr).decode(errors="replace")
            except rados.ObjectNotFound:
                return []
            addrs = parse_addrs(held_by)
            for a in addrs:
                c.blocklist_add(a, BLOCKLIST_SECONDS)
            if addrs:
                c.wait_for_latest_osdmap()
            for num, cookie in lockers(io, obj, lock):
                break_lock(io, obj, lock, num, cookie)
            return addrs
        except rados.Error as e:
            raise self._err(e, f"unlocking {lock} of a dead holder of", obj) from None

    def names(self) -> list[str]:
        """The objects of the namespace (the label and the lease left out)."""
        io = self._ioctx()
        try:
            return [o.key for o in io.list_objects() if o.key not in (LABEL, LEASE_OBJECT)]
        except rados.Error as e:
            raise self._err(e, "listing the namespace") from None

    def sync_dir(self) -> None:
        """Nothing to do: a create or remove is durable once acknowledged."""

    def space(self) -> tuple[int, int]:
        """(capacity, available) in bytes that the pool can still take (see
        the module docstring: the mon's df, else the OSDs' statfs)."""
        cl = self._cluster()
        got = cl.space_cache.get(self.pool)
        now = time.monotonic()
        if got is not None and now - got[0] < SPACE_TTL:
            return got[1]
        try:
            self._client()
            space = self._space_df(cl)
            if space is None:
                space = self._space_osds(cl)
        except (ValueError, KeyError, TypeError) as e:
            raise OSError(errno.EIO, f"{self.path}: unreadable space report: {e}") from None
        except OSError as e:
            if (e.strerror or "").startswith(self.path):
                raise
            raise OSError(e.errno, f"{self.path}: {e.strerror}") from None
        cl.space_cache[self.pool] = (now, space)
        return space

    def _space_df(self, cl: _Cluster) -> tuple[int, int] | None:
        df = json.loads(_mon(cl, {"prefix": "df", "format": "json"}))
        if not df["stats"].get("total_bytes"):
            return None                 # no mgr has reported: nothing known here
        for p in df.get("pools", ()):
            if p["name"] == self.pool:
                st = p["stats"]
                return int(st["stored"]) + int(st["max_avail"]), int(st["max_avail"])
        # a pool too new for the mgr's report: the raw totals meanwhile
        return int(df["stats"]["total_bytes"]), int(df["stats"]["total_avail_bytes"])

    def _space_osds(self, cl: _Cluster) -> tuple[int, int]:
        dump = json.loads(_mon(cl, {"prefix": "osd dump", "format": "json"}))
        size = next((int(p["size"]) for p in dump["pools"] if p["pool_name"] == self.pool), None)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, f"{self.path}: pool {self.pool} does not "
                                                  f"exist in the Ceph cluster of {cl.conf}")
        full = float(dump.get("full_ratio") or 0.95)
        total = avail = 0
        c = self._client()
        for o in dump["osds"]:
            if not (o["up"] and o["in"]):
                continue
            try:
                ret, out, errs = c.osd_command(
                    int(o["osd"]), json.dumps({"prefix": "perf dump", "logger": "osd"}), b"")
            except rados.Error as e:
                raise self._err(e, f"asking osd.{o['osd']} for its space") from None
            if ret:
                code = abs(ret) if abs(ret) in errno.errorcode else errno.EIO
                raise OSError(code, f"{self.path}: osd.{o['osd']} gave no space report: "
                                    f"{errs or os.strerror(code)}")
            st = json.loads(out)["osd"]
            total += int(st["stat_bytes"])
            avail += int(st["stat_bytes_avail"])
        usable = int(total * full)
        return usable // size, max(0, avail - (total - usable)) // size

    def in_memory(self) -> bool:
        return False

    def status(self) -> dict:
        """{"pool", "namespace", "conf", "health"}: health is the cluster's
        (HEALTH_OK, HEALTH_WARN, HEALTH_ERR) or "unreachable: why"; returns
        within STATUS_TIMEOUT s."""
        return {"pool": self.pool, "namespace": self.namespace, "conf": self.conf,
                "health": self._cluster().health()}

    # ---- files ----------------------------------------------------------------------
    def open(self, name: str, create: bool = False):
        """A handle (the object's name) on object `name`; `create`: a new
        one (FileExistsError if it is there), else FileNotFoundError if it
        is not."""
        if create:
            self._create(name, exclusive=True)
        else:
            self.size(name)
        return name

    def open_or_create(self, name: str):
        """A handle on object `name`, made empty if it is not there."""
        self._create(name, exclusive=False)
        return name

    def _create(self, name: str, exclusive: bool) -> None:
        self._may_write()
        io = self._ioctx()
        op = io.create_write_op()
        try:
            op.new(rados.LIBRADOS_CREATE_EXCLUSIVE if exclusive
                   else rados.LIBRADOS_CREATE_IDEMPOTENT)
            io.operate_write_op(op, name, int(time.time()))
        except rados.Error as e:
            raise self._err(e, "creating", name) from None
        finally:
            io.release_write_op(op)

    def close(self, h) -> None:
        """Nothing to do: a handle is a name."""

    def pwritev(self, h, iov, off: int) -> None:
        """Write all of `iov` (bytes-likes) at `off`: durable once it
        returns; OSError on failure, never short. Up to WRITE_CHUNK bytes
        go as one write; more as WRITE_CHUNK pieces in flight at once (see
        the module docstring), all waited for before it returns or raises."""
        total = sum(len(b) if type(b) is bytes else memoryview(b).nbytes for b in iov)
        if not total:       # as pwritev(2): nothing written, the object unchanged
            return
        self._may_write()
        io = self._ioctx()
        if total <= WRITE_CHUNK:
            data = iov[0] if len(iov) == 1 and type(iov[0]) is bytes else b"".join(iov)
            try:
                io.write(h, data, off)
            except rados.Error as e:
                raise self._err(e, f"writing {total} bytes at {off} to", h) from None
            return
        comps, failed = [], None
        try:
            pos = off
            # each piece goes as soon as it is joined (see _chunks)
            for chunk in _chunks(iov, WRITE_CHUNK):
                comps.append(io.aio_write(h, chunk, pos))
                pos += len(chunk)
        except rados.Error as e:
            failed = self._err(e, f"writing {total} bytes at {off} to", h)
        for c in comps:         # every write in flight ends before we return
            c.wait_for_complete()
            ret = c.get_return_value()
            if ret < 0 and failed is None:
                failed = OSError(_errno_of_ret(ret), f"{self.path}: writing {total} bytes at "
                                                     f"{off} to {h}: {os.strerror(-ret)}")
        if failed is not None:
            raise failed

    def preadv(self, h, bufs, off: int) -> int:
        """Bytes read into `bufs` (writable buffers, filled in order) from
        `off`: fewer at the end of the object, 0 past it;
        FileNotFoundError if the object is not there. Up to READ_CHUNK
        bytes as one read; more as READ_CHUNK pieces in flight at once."""
        views = []
        for b in bufs:
            mv = memoryview(b)
            views.append(mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B"))
        want = sum(len(v) for v in views)
        if want == 0:       # (a RADOS read of length 0 fails: ERANGE)
            return 0
        io = self._ioctx()
        if want > READ_CHUNK:
            return self._read_pieces(io, h, views, want, off)
        try:
            data = io.read(h, want, off)
        except rados.Error as e:
            raise self._err(e, f"reading {want} bytes at {off} of", h) from None
        _scatter(views, 0, data)
        return len(data)

    def _read_pieces(self, io, h, views, want: int, off: int) -> int:
        n = -(-want // READ_CHUNK)
        got: list = [None] * n          # (return value, bytes) by piece
        left, lock, done = [n], threading.Lock(), threading.Event()

        def on_complete(i):             # (in a librados thread)
            def cb(comp, data):
                got[i] = (comp.get_return_value(), data)
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
            return cb
        what = f"reading {want} bytes at {off} of"
        try:
            for i in range(n):
                io.aio_read(h, min(READ_CHUNK, want - i * READ_CHUNK), off + i * READ_CHUNK,
                            on_complete(i))
        except rados.Error as e:
            raise self._err(e, what, h) from None
        # each piece ends by the client's OSD op timeout at the latest
        if not done.wait(2 * CLIENT_TIMEOUT + 5):
            raise OSError(errno.ETIMEDOUT, f"{self.path}: {what} {h}: no answer")
        total = 0
        for i, (ret, data) in enumerate(got):
            if ret < 0:
                raise OSError(_errno_of_ret(ret), f"{self.path}: {what} {h}: "
                                                  f"{os.strerror(-ret)}")
            # (the binding leaves a piece that read nothing at its full
            # length, uninitialised: only `ret` bytes count)
            _scatter(views, i * READ_CHUNK, memoryview(data)[:ret])
            total += ret
            if ret < min(READ_CHUNK, want - i * READ_CHUNK):
                break                   # the object's end
        return total

    def fsync(self, h) -> None:
        """Nothing to do: RADOS acknowledges a write only once it is durable
        on every OSD of the object's acting set, so a write that returned
        is already on stable storage."""

    def truncate(self, h, size: int) -> None:
        self._may_write()
        io = self._ioctx()
        try:
            io.trunc(h, size)
        except rados.Error as e:
            raise self._err(e, f"truncating to {size}", h) from None

    def size(self, h) -> int:
        return self.file_size(h)

    def file_size(self, name: str) -> int:
        io = self._ioctx()
        try:
            return io.stat(name)[0]
        except rados.Error as e:
            raise self._err(e, "stat of", name) from None

    def allocated(self, name: str) -> int:
        """Bytes the object takes: its size (RADOS does not say more)."""
        return self.file_size(name)

    def exists(self, name: str) -> bool:
        try:
            self.file_size(name)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, name: str) -> None:
        self._may_write()
        io = self._ioctx()
        try:
            io.remove_object(name)
        except rados.Error as e:
            raise self._err(e, "removing", name) from None

    def rename(self, old: str, new: str) -> None:
        raise OSError(errno.EOPNOTSUPP, f"{self.path}: RADOS cannot rename an object "
                                        f"({old} -> {new})")

    # ---- the commit record: which copy of the array wrote last -------------------
    def last_commit(self) -> dict:
        """The record the array's last committing mount left on the lease
        object (`mark_commit`), {} if none. OSError if the cluster fails."""
        _, io = self.lease_io()
        try:
            return json.loads(io.get_xattr(LEASE_OBJECT, COMMIT_XATTR))
        except (rados.ObjectNotFound, rados.NoData, ValueError):
            return {}
        except rados.Error as e:
            raise self._err(e, "reading the commit record on", LEASE_OBJECT) from None

    def mark_commit(self, rec: dict) -> None:
        """After a commit of the array: which mount (session) committed,
        and how many commits its catalogue holds (Array._check_not_stale
        reads it at the next mount). Under the lease, as every write."""
        self._may_write()
        _, io = self.lease_io()
        try:
            io.set_xattr(LEASE_OBJECT, COMMIT_XATTR, json.dumps(rec).encode())
        except rados.Error as e:
            raise self._err(e, "writing the commit record on", LEASE_OBJECT) from None

    # ---- the lease: one mount at a time, fencing ------------------------------------
    def take_lease(self, seconds: float, holder: dict, break_lock: bool = False,
                   on_lost=None) -> list[str]:
        """Take this namespace's exclusive lease for this process (Lease);
        from then on every write checks it. Returns the addresses of
        earlier holders it fenced. OSError EBUSY naming the holder when
        another mount has it (unless `break_lock`); other OSErrors when the
        cluster does not answer: the lease is then taken before the first
        write, which fails if it cannot be."""
        if self.lease is not None and self.lease.held():
            return []
        lease = self.lease = Lease(self, seconds, holder, on_lost)
        return lease.take(break_lock)

    def release_lease(self) -> None:
        """At a clean close: give the lease back (another mount may take it
        at once)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()

    def _may_write(self) -> None:
        lease = self.lease
        if lease is not None:
            lease.check()

    def lease_io(self):
        """(the connected rados.Rados, this medium's I/O context): for Lease."""
        return self._client(), self._ioctx()


#: the object of a namespace that carries its lease (a cls_lock exclusive
#: lock with a duration) and the records of the clients that took it
LEASE_OBJECT = "fusearray-lease"
LEASE_LOCK = "fusearray"
#: the xattr of the lease object naming the array's last commit (mark_commit)
COMMIT_XATTR = "commit"
#: lock_exclusive flag: renew our own lock (LIBRADOS_LOCK_FLAG_MAY_RENEW)
_LOCK_RENEW = 1
#: errnos of a renewal that mean the lease is another mount's now (EBUSY,
#: EEXIST: its lock; ESHUTDOWN: this client is blocklisted; ENOENT: the
#: pool or the lease object is gone)
_LOST = (errno.EBUSY, errno.ESHUTDOWN, errno.EEXIST, errno.ENOENT)
#: entity_name_t's type of a client (CEPH_ENTITY_TYPE_CLIENT)
_ENTITY_CLIENT = 0x08
#: a lease counts as ours until this share of it after the renewal was sent
_LEASE_TRUST = 0.8
#: how long a fenced client stays blocklisted (s): longer than any stall
#: a daemon could wake from and still act (its lease check refuses too)
BLOCKLIST_SECONDS = 7 * 24 * 3600


class Lease:
    """One mount's exclusive lease on a rados disk: the mechanism RBD uses
    for its exclusive lock, made of cls_lock and the OSD blocklist.

    Taking it: the client first records itself on the lease object (an
    xattr `c.<instance id>` = its address, host, pid, array), then takes
    the exclusive lock with a duration of `seconds`. Whoever takes the lock
    next, after the duration ran out (the holder died or stalled) or at
    once with `break_lock`, blocklists every recorded client but itself
    before it writes anything: a stalled holder that wakes up can never
    write again (its every operation fails with ESHUTDOWN), whatever it was
    doing when it stopped. Recording before locking closes the gap: a
    client that stalls between the two is recorded, so fenced.

    Holding it: a thread renews the lock every `seconds`/4; every write
    of the medium first checks that the last renewal was sent less than
    _LEASE_TRUST x `seconds` ago (a monotonic clock, which a SIGSTOP does
    not stop), so a daemon that wakes after its lease ran out refuses to
    write even before it learns it was fenced. A renewal that fails
    because another client holds the lock, or because this one was
    blocklisted, ends the lease for good: `on_lost(why)` is called once and
    every write fails with EIO from then on.
    """

    def __init__(self, medium: RadosMedium, seconds: float, holder: dict, on_lost=None):
        self.medium = medium
        self.seconds = max(2, int(round(seconds)))
        self.holder = holder
        self.on_lost = on_lost
        self.lost: str | None = None
        self.until = 0.0            # monotonic time the lease is trusted until
        self.cookie = ""
        self.client_id = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._taking = threading.Lock()
        self.taken = False          # taken once (and then renewed) by take()

    def _lock(self, io, renew: bool) -> None:
        sent = time.monotonic()
        io.lock_exclusive(LEASE_OBJECT, LEASE_LOCK, self.cookie,
                          json.dumps(self.holder)[:200], self.seconds,
                          _LOCK_RENEW if renew else 0)
        self.until = sent + _LEASE_TRUST * self.seconds

    def take(self, break_lock: bool) -> list[str]:
        c, io = self.medium.lease_io()
        where = self.medium.path
        try:
            me = f"c.{c.get_instance_id()}"
            addr = c.get_addrs()
            self.client_id = f"client.{c.get_instance_id()}"
            self.cookie = f"{self.client_id}.{os.getpid()}"
            ident = client_identity()
            rec = dict(self.holder, client=self.client_id, cookie=self.cookie, addr=addr,
                       since=time.time(), name=ident.get("name") or
                       f"client.{ident.get('rados_id', 'admin')}")
            self.holder = rec
            io.set_xattr(LEASE_OBJECT, me, json.dumps(rec).encode())
        except rados.Error as e:
            raise _oserror(e, f"{where}: recording this mount on {LEASE_OBJECT}") from None
        fenced: list[str] = []
        deadline = None
        while True:
            try:
                self._lock(io, renew=False)
                break
            except rados.ObjectBusy:
                holder = self._holder(io, me)
                for _ in range(20):     # (a holder records itself just after locking)
                    if holder.get("client") or holder.get("fenced_us"):
                        break
                    time.sleep(0.05)
                    holder = self._holder(io, me)
                # a holder that was this array on this host is a dead daemon
                # of it: the array directory's lock, which this one holds, says so
                ours = bool(holder) and all(holder.get(k) == self.holder.get(k)
                                            for k in ("host", "array"))
                if not (break_lock or ours):
                    self._forget(io, me)
                    raise OSError(errno.EBUSY, f"{where} is in use by {_describe(holder)}: "
                                  f"its lease runs out {self.seconds} s after that daemon "
                                  "ends; to take it over at once (fencing that daemon off "
                                  "the cluster), mount with --break-lock") from None
                if deadline is None:      # fence first, then break its lock
                    fenced += self._fence(c, io, me)
                    deadline = time.monotonic() + self.seconds + 5
                    if self._break(io, holder):
                        continue
                    # (no record of its cookie: wait until its lease runs out)
                if time.monotonic() > deadline:
                    self._forget(io, me)
                    raise OSError(errno.EBUSY, f"{where}: the lease of {_describe(holder)} "
                                  f"did not run out in {self.seconds + 5} s") from None
                time.sleep(0.25)
            except rados.Error as e:
                raise _oserror(e, f"{where}: taking the lease") from None
        # ours: every other client recorded here is fenced before we write
        fenced += self._fence(c, io, me)
        try:
            io.set_xattr(LEASE_OBJECT, "holder", json.dumps(self.holder).encode())
        except rados.Error as e:
            raise _oserror(e, f"{where}: recording the holder") from None
        self.taken = True
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease {where}")
        self._thread.start()
        return sorted(set(fenced))

    def _break(self, io, holder: dict) -> bool:
        """Break the lock of `holder` (cls_lock's break_lock; the binding has
        no call for it: its input encoded here as Ceph does,
        cls_lock_break_op v1: name, locker entity (type, number), cookie).
        False if the holder's record does not say enough."""
        try:
            num = int(str(holder["client"]).removeprefix("client."))
            cookie = str(holder["cookie"])
        except (KeyError, ValueError):
            return False

        try:
            break_lock(io, LEASE_OBJECT, LEASE_LOCK, num, cookie)
        except rados.Error as e:
            raise _oserror(e, f"{self.medium.path}: breaking the lease of "
                              f"{_describe(holder)}") from None
        return True

    def _forget(self, io, me: str) -> None:
        """Take this client's record off the lease object (it did not get
        the lease: nobody need fence it)."""
        try:
            io.rm_xattr(LEASE_OBJECT, me)
        except rados.Error:
            pass                    # a later holder fences it: harmless

    def _holder(self, io, me: str) -> dict:
        """The holder's record: the one the client that holds the lock
        made before it locked (`c.<its number>`, found through the lock's
        lockers), else the `holder` record (written just after locking:
        alone it may still be the previous holder's when the new one died
        in between); {"fenced_us": True} when this client was blocklisted
        meanwhile (a mount racing this one took the lease and fenced every
        client on record, this one too, as it must: a client that recorded
        itself may be about to lock)."""
        try:
            try:
                locked = lockers(io, LEASE_OBJECT, LEASE_LOCK)
            except (rados.Error, struct.error):
                locked = []         # (then the `holder` record alone)
            for num, cookie in locked:
                try:
                    rec = json.loads(io.get_xattr(LEASE_OBJECT, f"c.{num}"))
                except (rados.ObjectNotFound, rados.NoData, ValueError):
                    continue
                if rec.get("client") == f"client.{num}" and rec.get("cookie") == cookie:
                    return rec
            return json.loads(io.get_xattr(LEASE_OBJECT, "holder"))
        except rados.Error as e:
            return {"fenced_us": True} if _errno_of(e) == errno.ESHUTDOWN else {}
        except ValueError:
            return {}

    def _fence(self, c, io, me: str) -> list[str]:
        """Blocklist every client recorded on the lease object but this
        one, and forget them. Returns their addresses."""
        out = []
        try:
            recs = [(k, v) for k, v in io.get_xattrs(LEASE_OBJECT)
                    if k.startswith("c.") and k != me]
        except rados.Error as e:
            raise _oserror(e, f"{self.medium.path}: reading {LEASE_OBJECT}") from None
        for k, v in recs:
            try:
                addr = json.loads(v)["addr"]
            except (ValueError, KeyError, TypeError):
                addr = None
            try:
                if addr:
                    c.blocklist_add(addr, BLOCKLIST_SECONDS)
                    out.append(addr)
                io.rm_xattr(LEASE_OBJECT, k)
            except rados.Error as e:
                raise _oserror(e, f"{self.medium.path}: fencing {addr or k}") from None
        if out:
            # our next ops carry the OSD map with the entries, so an OSD
            # serving them has it too and refuses the fenced client's
            try:
                c.wait_for_latest_osdmap()
            except rados.Error as e:
                raise _oserror(e, f"{self.medium.path}: waiting for the OSD map "
                                  "after fencing") from None
        return out

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            if self._renew() in _LOST:
                return
            # (other failures: a cluster that does not answer: try again;
            # writes stop by themselves once the lease is no longer trusted)

    def _renew(self) -> int:
        """Renew once: 0, or the failure's errno; one of _LOST ends the
        lease for good (another mount holds it, or fenced this client)."""
        try:
            _, io = self.medium.lease_io()
            self._lock(io, renew=True)
            return 0
        except (rados.Error, OSError) as e:
            code = (_errno_of(e) if isinstance(e, rados.Error) else e.errno) or errno.EIO
        if code in _LOST:
            why = ("another mount took it over and fenced this daemon off the cluster"
                   if code == errno.ESHUTDOWN else "another mount holds it now")
            self._lose(f"{why} ({os.strerror(code)})")
        return code

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            self._stop.set()
            if self.on_lost is not None:
                self.on_lost(why)

    def held(self) -> bool:
        return self.lost is None and time.monotonic() < self.until

    def check(self) -> None:
        """Before a write: OSError EIO unless the lease is surely ours."""
        if not self.taken and self.lost is None:
            # not taken at mount (the cluster did not answer): take it now
            with self._taking:
                if not self.taken:
                    try:
                        self.take(break_lock=False)
                    except OSError as e:
                        raise OSError(errno.EIO, f"{self.medium.path}: not written: no "
                                                 f"lease ({e.strerror})") from None
        if self.lost is not None:
            raise OSError(errno.EIO, f"{self.medium.path}: this daemon lost its lease: "
                                     f"{self.lost}; nothing more is written there")
        if time.monotonic() >= self.until:
            # stalled past it (SIGSTOP, a frozen VM) or the cluster did not
            # answer the renewals: try once, as the renewal would
            code = self._renew()
            if code:
                raise OSError(errno.EIO, f"{self.medium.path}: the lease ran out and could "
                                         f"not be renewed ({os.strerror(code)}): not "
                                         "written")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is not None:
            return
        try:
            c, io = self.medium.lease_io()
            io.unlock(LEASE_OBJECT, LEASE_LOCK, self.cookie)
            io.rm_xattr(LEASE_OBJECT, f"c.{c.get_instance_id()}")
            io.rm_xattr(LEASE_OBJECT, "holder")
        except (rados.Error, OSError):
            pass                    # it runs out by itself
        self.lost = "released"


def _text(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<I", len(b)) + b


def _versioned(body: bytes) -> bytes:
    """Ceph's ENCODE_START(1, 1) framing: version, compat, length."""
    return struct.pack("<BBI", 1, 1, len(body)) + body


def break_lock(io, obj: str, lock: str, num: int, cookie: str) -> None:
    """cls_lock's break_lock of client.`num`'s lock `lock` (cookie
    `cookie`) on `obj`; the binding has no call for it, so its input is
    encoded here as Ceph does (cls_lock_break_op v1: name, locker entity
    (type, number), cookie). Nothing if it is not locked by it any more."""
    body = _text(lock) + struct.pack("<Bq", _ENTITY_CLIENT, num) + _text(cookie)
    try:
        io.execute(obj, "lock", "break_lock", _versioned(body))
    except rados.ObjectNotFound:
        pass


def lockers(io, obj: str, lock: str) -> list[tuple[int, str]]:
    """[(client number, cookie)] holding cls_lock `lock` on `obj`:
    cls_lock's get_info (the binding has no list_lockers), its reply
    decoded as far as the lockers' ids (cls_lock_get_info_reply v1: a map
    of locker_id_t v1 {entity (type u8, number i64), cookie} to
    locker_info_t, then the type and tag)."""
    try:
        _, out = io.execute(obj, "lock", "get_info", _versioned(_text(lock)), length=65536)
    except rados.ObjectNotFound:
        return []
    b = bytes(out)
    pos = 6                                     # the reply's version, compat, length
    (n,) = struct.unpack_from("<I", b, pos)
    pos += 4
    found = []
    for _ in range(n):
        pos += 6                                # locker_id_t's framing
        etype, num = struct.unpack_from("<Bq", b, pos)
        pos += 9
        (clen,) = struct.unpack_from("<I", b, pos)
        pos += 4
        cookie = b[pos:pos + clen].decode(errors="replace")
        pos += clen
        if etype == _ENTITY_CLIENT:
            found.append((num, cookie))
        # the value (locker_info_t) is skipped by its framing's length
        (vlen,) = struct.unpack_from("<I", b, pos + 2)
        pos += 6 + vlen
    return found


def parse_addrs(text: str) -> list[str]:
    """Client addresses as the blocklist takes them (IP:PORT/NONCE) from
    Ceph's address vector text (`[v2:1.2.3.4:0/5,v1:...]` or `1.2.3.4:0/5`)."""
    out = []
    for a in text.strip().strip("[]").split(","):
        a = a.strip()
        for p in ("v2:", "v1:", "any:"):
            a = a.removeprefix(p)
        if a and "/" in a and a not in out:
            out.append(a)
    return out


def _describe(holder: dict) -> str:
    if holder.get("fenced_us"):
        return "another mount, which fenced this client as it took the lease (both tried at once)"
    if not holder.get("client"):
        return "another mount"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else "?"
    return (f"{holder.get('client', '?')} (as {holder.get('name', '?')}, host "
            f"{holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}, array {holder.get('array', '?')}, since {when})")
