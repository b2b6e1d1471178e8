"""The catalogue: SQLite (WAL, synchronous=FULL) in ARRAY/catalogue.db.

It is the array's single commit point. One transaction writes the block
index rows of everything appended since the last commit, the map roots
that reference them, and the catalogue changes (LUNs, sets, events), after
the segment files were fsynced. A crash before COMMIT leaves only garbage in
segments; after it, everything is durable.

Only the array's committer uses the connection, from worker threads,
serialised by one CapacityLimiter (check_same_thread is off for that).

An array in a Ceph cluster (`fusearray init rados:POOL/NAME`) keeps its
catalogue in RADOS through Ceph's SQLite VFS (libcephsqlite, Debian's
libsqlite3-mod-ceph): `file:///POOL:NAMESPACE/catalogue.db?vfs=ceph`. That
VFS locks the database per connection with an exclusive RADOS lock and has
no shared memory, so there the catalogue is one connection in exclusive
locking mode (which is what lets SQLite keep WAL without shared memory):
the committed views (`pack_rows`) and scans share it, under one lock that
a transaction holds from BEGIN to COMMIT, so they still see only committed
rows.
"""
import contextlib
import ctypes
import dataclasses
import errno
import os
import sqlite3
import threading

from .events import EVENTS_KEPT, NOISE_KEPT
from .store.rados import ceph_args_for_vfs
from .perms import FILE_MODE


class CatalogueError(OSError):
    """The catalogue's database failed under a read (errno EIO): an I/O
    error of its disk, or for a catalogue in a cluster, a cluster that did
    not answer in time (Ceph's VFS then fails every later call on that
    connection: only a new mount reads it again). The committed state is
    what it was; the array stops accepting changes (Array._catalogue_failed,
    told through Catalogue.on_failure)."""


def read_error(e: sqlite3.Error, failed=None) -> CatalogueError:
    """The CatalogueError for `e` (ENOSPC for SQLite's "full", else EIO);
    `failed(err)` is told first when given (the committed views' reads)."""
    if getattr(e, "sqlite_errorcode", None) == SQLITE_FULL:
        err = CatalogueError(errno.ENOSPC, f"the catalogue's file system is full: {e}")
    else:
        err = CatalogueError(errno.EIO, f"the catalogue cannot be read: {e}")
    if failed is not None:
        failed(err)
    return err


#: SQLite's result code for a full disk (sqlite3.Error.sqlite_errorcode)
SQLITE_FULL = 13


@contextlib.contextmanager
def failures():
    """A sqlite3.Error inside (in this thread, or a worker thread awaited
    inside) becomes a CatalogueError: for the catalogue's users, which do
    not import sqlite3 (the array's open)."""
    try:
        yield
    except sqlite3.Error as e:
        raise read_error(e) from None


#: the tables create_tables makes
TABLES = ("meta", "packs", "disks", "blocks", "segments", "volumes", "jobs", "sets", "events")


def create_tables(conn: sqlite3.Connection) -> None:
    conn.executescript("""
    -- key/value settings: format (int), uuid (array id), next_serial (the
    -- counter WWNs and serials are made from: only ever increases, so an
    -- identifier is never reused, even after a delete)
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    -- storage tiers
    CREATE TABLE packs (
        name    TEXT PRIMARY KEY,   -- [A-Za-z0-9._-]
        layout  TEXT NOT NULL,      -- single | mirror | raid5
        created REAL NOT NULL       -- unix time
    );
    CREATE TABLE disks (
        pack  TEXT NOT NULL REFERENCES packs(name),
        idx   INTEGER NOT NULL,     -- position in the pack, from 0
        path  TEXT NOT NULL,        -- host directory (absolute)
        state TEXT NOT NULL,        -- online | missing | failed | stale | invalid
        since INTEGER,              -- first segment it may lack (not online); NULL
        PRIMARY KEY (pack, idx)
    );
    -- block index of each pack: where the block with content id `id` lies.
    -- Map nodes are blocks too. A row exists only for a block whose bytes
    -- were fsynced before the transaction that added it committed.
    CREATE TABLE blocks (
        pack TEXT NOT NULL,
        id   BLOB NOT NULL,         -- 16-byte keyed xxh3-128 of the data
        seg  INTEGER NOT NULL,      -- segment file number
        off  INTEGER NOT NULL,      -- offset of the data (after the header)
        len  INTEGER NOT NULL,      -- data length
        refs INTEGER NOT NULL DEFAULT 0,    -- references (refs.py): map roots
                                    -- of the pack's volumes + entries of counted nodes
        counted INTEGER NOT NULL DEFAULT 0, -- 1: a map node whose entries are counted
        PRIMARY KEY (pack, id)
    ) WITHOUT ROWID;
    CREATE INDEX blocks_seg ON blocks (pack, seg);
    -- what a collection looks at: the rows nothing references
    CREATE INDEX blocks_unref ON blocks (pack, id) WHERE refs = 0;
    -- each segment's accounting, kept with the blocks rows of the same
    -- commit so that opening reads one row a segment, not one a block
    CREATE TABLE segments (
        pack  TEXT NOT NULL,
        seg   INTEGER NOT NULL,
        live  INTEGER NOT NULL,     -- live record bytes (data + headers)
        size  INTEGER NOT NULL,     -- logical end of the records
        count INTEGER NOT NULL,     -- index entries (0: nothing live)
        PRIMARY KEY (pack, seg)
    ) WITHOUT ROWID;
    -- LUNs and shadow copies
    CREATE TABLE volumes (
        vid        INTEGER PRIMARY KEY AUTOINCREMENT,  -- inode source, never reused
        name       TEXT NOT NULL,   -- LUN name; for a shadow copy the LUN it copies
        kind       TEXT NOT NULL,   -- lun | shadow
        set_name   TEXT,            -- shadow copy's set, NULL for a LUN
        pack       TEXT NOT NULL,
        size       INTEGER NOT NULL,   -- bytes, multiple of 512
        block_size INTEGER NOT NULL,
        root       BLOB NOT NULL,   -- map root id (16 zero bytes: all zero)
        height     INTEGER NOT NULL,-- map tree height (>= 1)
        allocated  INTEGER NOT NULL,-- non-zero mapped blocks
        wwn        TEXT NOT NULL UNIQUE,  -- naa.6 + 31 hex digits
        serial     TEXT NOT NULL,
        readonly   INTEGER NOT NULL,
        hidden     INTEGER NOT NULL,
        origin     TEXT,            -- shadow copy: WWN of the LUN it copies
        context    TEXT,            -- shadow copy: differential | plex
        consistency TEXT,           -- shadow copy: application | crash (NULL: not known)
        created    REAL NOT NULL,
        source     TEXT             -- pack still holding blocks of this map that
                                    -- its own pack lacks (plex copy or cross-pack
                                    -- resync in progress); NULL when independent
    );
    -- long-running operations; a job not finished resumes at the next open
    CREATE TABLE jobs (
        id          INTEGER PRIMARY KEY,  -- from meta next_job, never reused
        kind        TEXT NOT NULL,        -- resync | plex | recover | replace | scrub
        state       TEXT NOT NULL,        -- queued | running | paused | done | failed | cancelled
        done_bytes  INTEGER NOT NULL,
        total_bytes INTEGER NOT NULL,
        rate_limit  INTEGER NOT NULL,     -- bytes/s, 0 = none (throttle)
        started     REAL NOT NULL,
        finished    REAL,                 -- NULL while not ended
        error       TEXT NOT NULL,        -- why it failed, or ''
        params      TEXT NOT NULL         -- JSON: what it works on (volume ids)
    );
    CREATE TABLE sets (
        name    TEXT PRIMARY KEY,
        created REAL NOT NULL
    );
    -- the event log (ctl/events), oldest first; pruned at each commit that
    -- adds events to the newest EVENTS_KEPT ordinary and NOISE_KEPT noise
    -- rows (events.py), so a flood of refused commands neither grows the
    -- catalogue nor pushes the array's own events out
    CREATE TABLE events (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        time    REAL NOT NULL,
        level   TEXT NOT NULL,      -- info | warning | error
        message TEXT NOT NULL,      -- one printable line (events.clean)
        noise   INTEGER NOT NULL DEFAULT 0  -- 1: rate-limited, caused by a user
                                    -- at will (a refused command, a summary)
    );
    """)


def upgrade_tables(conn: sqlite3.Connection, record_header: int) -> None:
    """Catalogues made before a column or table existed get it. The
    segments table of an older catalogue is made from its blocks rows
    (once: one pass over them); `record_header` is a record's header
    bytes (store.records.HDR), counted in a segment's live bytes."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    if "segments" not in tables and "blocks" in tables:
        with _Txn(conn):
            conn.execute("CREATE TABLE segments (pack TEXT NOT NULL, seg INTEGER NOT NULL, "
                         "live INTEGER NOT NULL, size INTEGER NOT NULL, "
                         "count INTEGER NOT NULL, PRIMARY KEY (pack, seg)) WITHOUT ROWID")
            conn.execute("CREATE INDEX IF NOT EXISTS blocks_seg ON blocks (pack, seg)")
            conn.execute("INSERT INTO segments SELECT pack, seg, SUM(len) + COUNT(*) * ?, "
                         "MAX(off + len), COUNT(*) FROM blocks GROUP BY pack, seg",
                         (record_header,))
    cols = {r[1] for r in conn.execute("PRAGMA table_info(blocks)")}
    if cols and "refs" not in cols:
        # the counts themselves are made at the next open (meta refs absent:
        # refs.recount, one walk of every map)
        with _Txn(conn):
            conn.execute("ALTER TABLE blocks ADD COLUMN refs INTEGER NOT NULL DEFAULT 0")
            conn.execute("ALTER TABLE blocks ADD COLUMN counted INTEGER NOT NULL DEFAULT 0")
            conn.execute("CREATE INDEX IF NOT EXISTS blocks_unref ON blocks (pack, id) "
                         "WHERE refs = 0")
            conn.execute("DELETE FROM meta WHERE key='refs'")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    if "noise" not in cols:
        conn.execute("ALTER TABLE events ADD COLUMN noise INTEGER NOT NULL DEFAULT 0")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(volumes)")}
    if cols and "consistency" not in cols:
        conn.execute("ALTER TABLE volumes ADD COLUMN consistency TEXT")


VOLUME_COLUMNS = ("vid", "name", "kind", "set_name", "pack", "size", "block_size",
                  "root", "height", "allocated", "wwn", "serial", "readonly",
                  "hidden", "origin", "context", "created", "source", "consistency")
JOB_COLUMNS = ("id", "kind", "state", "done_bytes", "total_bytes", "rate_limit",
               "started", "finished", "error", "params")


@dataclasses.dataclass
class Changes:
    """Everything one commit writes."""
    blocks_add: dict = dataclasses.field(default_factory=dict)  # pack -> {id: loc}
    blocks_del: dict = dataclasses.field(default_factory=dict)  # pack -> {id}
    segments: dict = dataclasses.field(default_factory=dict)    # pack -> {seg: (live, size, count) | None}
    refs: dict = dataclasses.field(default_factory=dict)        # pack -> {id: change of refs}
    counted: dict = dataclasses.field(default_factory=dict)     # pack -> {id} now counted nodes
    recount: dict = dataclasses.field(default_factory=dict)     # pack -> [(refs, counted, id)]: absolute
    volumes: list = dataclasses.field(default_factory=list)     # rows (dict)
    volumes_del: list = dataclasses.field(default_factory=list) # vids
    sets_add: list = dataclasses.field(default_factory=list)    # (name, created)
    sets_del: list = dataclasses.field(default_factory=list)    # names
    packs_add: list = dataclasses.field(default_factory=list)   # (name, layout, created, [paths])
    events: list = dataclasses.field(default_factory=list)      # (time, level, message[, noise[, seq]])
    jobs: list = dataclasses.field(default_factory=list)        # rows (dict)
    disks: list = dataclasses.field(default_factory=list)       # (pack, idx, path, state, since)
    meta: dict = dataclasses.field(default_factory=dict)

    def empty(self) -> bool:
        return not (any(self.blocks_add.values()) or any(self.blocks_del.values())
                    or any(self.segments.values()) or any(self.refs.values())
                    or any(self.counted.values()) or self.recount
                    or self.volumes or self.volumes_del or self.sets_add
                    or self.sets_del or self.packs_add or self.events or self.meta
                    or self.jobs)


_vfs_lock = threading.Lock()
_vfs_ready = False

def ceph_vfs() -> None:
    """Register Ceph's SQLite VFS ("ceph") in this process, once. Python's
    sqlite3 cannot load extensions here (built without it) but links the
    system libsqlite3, so the VFS's init is registered as an automatic
    extension of it through ctypes; it runs at the next connection.
    OSError ENOENT when libcephsqlite is not installed."""
    global _vfs_ready
    with _vfs_lock:
        if _vfs_ready:
            return
        try:
            lib = ctypes.CDLL("libsqlite3.so.0")
            ext = ctypes.CDLL("libcephsqlite.so")
        except OSError as e:
            raise OSError(errno.ENOENT, "Ceph's SQLite VFS (libcephsqlite.so, Debian package "
                                        f"libsqlite3-mod-ceph) is not installed: {e}") from None
        if lib.sqlite3_auto_extension(ext.sqlite3_cephsqlite_init) != 0:
            raise OSError(errno.EIO, "registering Ceph's SQLite VFS failed")
        with ceph_args_for_vfs():
            sqlite3.connect(":memory:").close()     # runs it: the VFS is there from now on
        _vfs_ready = True


def cluster_uri(pool: str, namespace: str, name: str = "catalogue.db") -> str:
    """The catalogue of an array in a cluster: database `name` striped over
    objects of `namespace` in `pool` (the cluster: $CEPH_CONF)."""
    return f"file:///{pool}:{namespace}/{name}?vfs=ceph"


def is_cluster_uri(path: str) -> bool:
    return path.startswith("file:///") and path.endswith("?vfs=ceph")


class Catalogue:
    def __init__(self, path: str, create: bool = False, record_header: int = 0):
        self.path = path
        self.single = is_cluster_uri(path)      # one connection (module docstring)
        self.lock = threading.RLock() if self.single else None
        if self.single:
            ceph_vfs()
            with ceph_args_for_vfs():      # (its client connects at the first open)
                self.conn = sqlite3.connect(path, uri=True, check_same_thread=False,
                                            isolation_level=None)
        else:
            if create:   # 0600 before SQLite opens it: its -wal and -shm take the same mode
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
            self.conn = sqlite3.connect(path, check_same_thread=False,
                                        isolation_level=None)
        try:
            self._set_up(path, create, record_header)
        except BaseException:
            self.conn.close()   # (a cluster's: else its RADOS lock outlives us)
            raise
        self._reads = None          # the committed views' connection (pack_rows)
        #: on_failure(CatalogueError), from any thread: a read of the
        #: committed views failed (the Array stops the write-back)
        self.on_failure = None

    def _set_up(self, path: str, create: bool, record_header: int) -> None:
        if self.single:
            # before the first access: SQLite then keeps the WAL index in
            # the heap, not in shared memory (which the ceph VFS has not)
            self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"SQLite refused WAL mode for {path} (got {mode})")
        self.conn.execute("PRAGMA synchronous=FULL")
        if create and self.single:
            # what an init that died half-way left (under its lease), before
            # foreign keys are on: a parent table dropped with its children's
            # rows still there fails with them on (a CI run: an init killed
            # after its first commit, the next one "FOREIGN KEY constraint
            # failed")
            self.conn.executescript("".join(
                f"DROP TABLE IF EXISTS {t};" for t in reversed(TABLES)))
        self.conn.execute("PRAGMA foreign_keys=ON")
        if create:   # array.json, written after this, marks a finished init
            create_tables(self.conn)
        else:
            upgrade_tables(self.conn, record_header)

    def pack_rows(self, pack: str, cache_bytes: int) -> "PackRows":
        """The committed view of pack `pack`'s block index (one read
        connection shared by the packs, `cache_bytes` of SQLite pages)."""
        if self._reads is None:
            self._reads = (_Reads.shared(self.conn, self.lock, cache_bytes) if self.single
                           else _Reads(self.path, cache_bytes))
            self._reads.failed = self._read_failed
        return PackRows(self._reads, self.path, pack)

    def _read_failed(self, err: "CatalogueError") -> None:
        if self.on_failure is not None:
            self.on_failure(err)

    def transaction(self):
        return _Txn(self.conn, self.lock)

    def close(self) -> None:
        if self._reads is not None and not self.single:
            self._reads.close()
        if self.lock is not None:
            with self.lock:
                self.conn.close()
        else:
            self.conn.close()

    # ---- reads (at open) ----------------------------------------------------
    def meta(self) -> dict:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def packs(self) -> list:
        return self.conn.execute("SELECT name, layout, created FROM packs").fetchall()

    def disks(self, pack: str) -> list:
        return self.conn.execute("SELECT idx, path, state, since FROM disks WHERE pack=? "
                                 "ORDER BY idx", (pack,)).fetchall()

    def volumes(self) -> list[dict]:
        cur = self.conn.execute(f"SELECT {', '.join(VOLUME_COLUMNS)} FROM volumes "
                                "ORDER BY vid")
        return [dict(zip(VOLUME_COLUMNS, r)) for r in cur]

    def sets(self) -> list:
        return self.conn.execute("SELECT name, created FROM sets ORDER BY created, name").fetchall()

    def events(self, limit: int, noise_limit: int = 0) -> list:
        """(seq, time, level, message, noise), oldest first: the newest
        `limit` ordinary events and the newest `noise_limit` noise ones."""
        rows = []
        for noise, n in ((0, limit), (1, noise_limit)):
            rows += self.conn.execute("SELECT seq, time, level, message, noise FROM events "
                                      "WHERE noise=? ORDER BY seq DESC LIMIT ?",
                                      (noise, n)).fetchall()
        return sorted(rows)

    def jobs(self) -> list[dict]:
        cur = self.conn.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs ORDER BY id")
        return [dict(zip(JOB_COLUMNS, r)) for r in cur]

    # ---- the commit ----------------------------------------------------------
    def commit_blocking(self, ch: Changes) -> None:
        c = self.conn
        with self.transaction():
            for name, layout, created, paths in ch.packs_add:
                c.execute("INSERT INTO packs VALUES (?,?,?)", (name, layout, created))
                c.executemany("INSERT INTO disks VALUES (?,?,?,?,?)",
                              [(name, i, p, "online", None) for i, p in enumerate(paths)])
            c.executemany("INSERT OR REPLACE INTO disks VALUES (?,?,?,?,?)", ch.disks)
            # a row dropped and added again in one commit (freed, then
            # written anew) is deleted first: it starts with no references
            # (each batch in key order: a big commit, e.g. the counts of
            # every shared leaf a random write after a shadow copy makes its
            # own, walks the B-tree once from left to right instead of
            # descending to a random page per row: each page is read and
            # written to the log once; issue 16)
            for pack, ids in ch.blocks_del.items():
                c.executemany("DELETE FROM blocks WHERE pack=? AND id=?",
                              [(pack, b) for b in sorted(ids)])
            # a row that moves (compaction) keeps its references
            for pack, adds in ch.blocks_add.items():
                c.executemany("INSERT INTO blocks (pack, id, seg, off, len) VALUES (?,?,?,?,?) "
                              "ON CONFLICT (pack, id) DO UPDATE SET seg=excluded.seg, "
                              "off=excluded.off, len=excluded.len",
                              [(pack, b, s, o, n) for b, (s, o, n) in sorted(adds.items())])
            for pack, rows in ch.recount.items():
                c.execute("UPDATE blocks SET refs=0, counted=0 WHERE pack=?", (pack,))
                c.executemany("UPDATE blocks SET refs=?, counted=? WHERE pack=? AND id=?",
                              [(r, k, pack, b) for r, k, b in sorted(rows, key=_third)])
            for pack, deltas in ch.refs.items():
                c.executemany("UPDATE blocks SET refs=refs+? WHERE pack=? AND id=?",
                              [(d, pack, b) for b, d in sorted(deltas.items()) if d])
            for pack, ids in ch.counted.items():
                c.executemany("UPDATE blocks SET counted=1 WHERE pack=? AND id=?",
                              [(pack, b) for b in sorted(ids)])
            for pack, segs in ch.segments.items():
                c.executemany("DELETE FROM segments WHERE pack=? AND seg=?",
                              [(pack, s) for s, row in segs.items() if row is None])
                c.executemany("INSERT OR REPLACE INTO segments VALUES (?,?,?,?,?)",
                              [(pack, s) + row for s, row in segs.items()
                               if row is not None])
            c.executemany("DELETE FROM volumes WHERE vid=?", [(v,) for v in ch.volumes_del])
            if ch.volumes:
                cols = ", ".join(VOLUME_COLUMNS)
                marks = ", ".join("?" * len(VOLUME_COLUMNS))
                c.executemany(f"INSERT OR REPLACE INTO volumes ({cols}) VALUES ({marks})",
                              [tuple(r[k] for k in VOLUME_COLUMNS) for r in ch.volumes])
            c.executemany("DELETE FROM sets WHERE name=?", [(s,) for s in ch.sets_del])
            c.executemany("INSERT INTO sets VALUES (?,?)", ch.sets_add)
            if ch.jobs:
                c.executemany(f"INSERT OR REPLACE INTO jobs ({', '.join(JOB_COLUMNS)}) "
                              f"VALUES ({', '.join('?' * len(JOB_COLUMNS))})",
                              [tuple(r[k] for k in JOB_COLUMNS) for r in ch.jobs])
            if ch.events:
                # an event's number is given by the journal (events.py) and kept
                # (None: a new number); one already here is the same event
                c.executemany("INSERT OR IGNORE INTO events (seq, time, level, message, "
                              "noise) VALUES (?,?,?,?,?)",
                              [(e[4] if len(e) > 4 else None,) + (e + (0,))[:4]
                               for e in ch.events])
                prune_events(c)
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)",
                          [(k, str(v)) for k, v in ch.meta.items()])


def _third(row):
    return row[2]


#: A segment's rows (compaction) and the rows nothing references (a
#: collection), through their indexes by name: without statistics (no
#: ANALYZE) SQLite's planner prefers the primary key's `pack=?` prefix,
#: a scan of every row of the pack, to a secondary index on the same
#: prefix; at 1M blocks that made a cold snapshot delete's collection
#: cost 1.1 s whatever it freed (issue 16). INDEXED BY fails loudly if the index is missing.
ENTRIES_IN_SQL = ("SELECT id, seg, off, len FROM blocks INDEXED BY blocks_seg "
                  "WHERE pack=? AND seg=?")
UNREFERENCED_SQL = ("SELECT id, seg, off, len FROM blocks INDEXED BY blocks_unref "
                    "WHERE pack=? AND refs=0")

#: Rows a scan reads at a time (its memory: one batch).
SCAN_BATCH = 4096


class _Reads:
    """The read connection the committed views share: WAL readers see the
    last committed transaction, beside the committer's writes. Used from
    the trio thread and worker threads, one statement at a time (lock)."""

    def __init__(self, path: str | None, cache_bytes: int):
        self.single = path is None
        if path is None:
            return
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA query_only=1")
        self.conn.execute(f"PRAGMA cache_size={-max(256, cache_bytes >> 10)}")
        self.lock = threading.Lock()
        self.failed = None      # failed(CatalogueError), any thread: Catalogue.on_failure

    @classmethod
    def shared(cls, conn, lock, cache_bytes: int) -> "_Reads":
        """The catalogue's one connection (a catalogue in a cluster), under
        its lock: a transaction holds it to COMMIT, so reads see only what
        is committed."""
        r = cls(None, cache_bytes)
        r.conn, r.lock, r.failed = conn, lock, None
        with lock:
            conn.execute(f"PRAGMA cache_size={-max(2048, cache_bytes >> 10)}")
        return r

    @contextlib.contextmanager
    def query(self):
        """The connection under the lock, for one statement (or one batch
        of them). A failure of the database (an I/O error of its disk; for
        a catalogue in a cluster, a cluster that did not answer in time,
        after which Ceph's VFS fails every later call) is a
        CatalogueError."""
        with self.lock:
            try:
                yield self.conn
            except sqlite3.Error as e:
                raise read_error(e, self.failed) from None

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class PackRows:
    """One pack's committed block index (the blocks and segments tables):
    what store.index.BlockIndex reads below its cache."""

    def __init__(self, reads: _Reads, path: str, pack: str):
        self.reads, self.path, self.pack = reads, path, pack

    def get(self, bid: bytes):
        # fetchall: the statement runs to its end, so the connection holds no
        # read snapshot between lookups (one would keep the WAL from being
        # checkpointed)
        with self.reads.query() as conn:
            rows = conn.execute("SELECT seg, off, len FROM blocks WHERE pack=? "
                                           "AND id=?", (self.pack, bid)).fetchall()
        return rows[0] if rows else None

    def get_many(self, ids) -> dict:
        """{id: (seg, off, len)} of the committed rows among `ids`."""
        out = {}
        with self.reads.query() as conn:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                marks = ",".join("?" * len(part))
                for b, s, o, n in conn.execute(
                        f"SELECT id, seg, off, len FROM blocks WHERE pack=? AND id IN ({marks})",
                        [self.pack] + part).fetchall():
                    out[bytes(b)] = (s, o, n)
        return out

    def segments(self) -> dict:
        with self.reads.query() as conn:
            rows = conn.execute("SELECT seg, live, size, count FROM segments "
                                           "WHERE pack=?", (self.pack,)).fetchall()
        return {seg: (live, size, count) for seg, live, size, count in rows}

    def segment_sums(self) -> dict:
        """{seg: (sum of lengths, entries, largest end)} of the committed
        rows (a pass over the pack's rows inside SQLite; fsck)."""
        with self.reads.query() as conn:
            rows = conn.execute("SELECT seg, SUM(len), COUNT(*), MAX(off + len) "
                                           "FROM blocks WHERE pack=? GROUP BY seg",
                                           (self.pack,)).fetchall()
        return {seg: (total, n, end) for seg, total, n, end in rows}

    def entries_in(self, seq: int) -> list:
        with self.reads.query() as conn:
            rows = conn.execute(ENTRIES_IN_SQL, (self.pack, seq)).fetchall()
        return [(bytes(b), (s, o, n)) for b, s, o, n in rows]

    def refs(self, ids) -> dict:
        """{id: (refs, counted)} of the committed rows among `ids`."""
        out = {}
        ids = list(ids)
        with self.reads.query() as conn:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                marks = ",".join("?" * len(part))
                for b, r, k in conn.execute(
                        f"SELECT id, refs, counted FROM blocks WHERE pack=? AND id IN ({marks})",
                        [self.pack] + part).fetchall():
                    out[bytes(b)] = (r, k)
        return out

    def unreferenced(self) -> list:
        """The committed rows with no reference: [(id, loc)]."""
        with self.reads.query() as conn:
            rows = conn.execute(UNREFERENCED_SQL, (self.pack,)).fetchall()
        return [(bytes(b), (s, o, n)) for b, s, o, n in rows]

    def scan(self):
        """Every row in id order, in batches of SCAN_BATCH, on a
        connection of its own (one read snapshot: a commit meanwhile is
        not seen). On a catalogue's one connection (in a cluster): batch
        after batch by id, each under its lock (a commit between two
        batches is seen from the next one on)."""
        for rows in self._stream("id, seg, off, len"):
            yield [(bytes(b), (s, o, n)) for b, s, o, n in rows]

    def ids(self):
        """Every row's id, as scan (the dedup filter's build)."""
        for rows in self._stream("id"):
            yield [bytes(r[0]) for r in rows]

    def _stream(self, cols: str):
        if self.reads.single:
            yield from self._stream_shared(cols)
            return
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise read_error(e, self.reads.failed) from None
        try:
            try:
                conn.execute("PRAGMA query_only=1")
                conn.execute("PRAGMA cache_size=-2048")
                cur = conn.execute(f"SELECT {cols} FROM blocks WHERE pack=? "
                                   "ORDER BY id", (self.pack,))
                yield from iter(lambda: cur.fetchmany(SCAN_BATCH), [])
            except sqlite3.Error as e:
                raise read_error(e, self.reads.failed) from None
        finally:
            conn.close()

    def _stream_shared(self, cols: str):
        last = b""
        while True:
            with self.reads.query() as conn:
                rows = conn.execute(
                    f"SELECT {cols} FROM blocks WHERE pack=? AND id > ? "
                    "ORDER BY id LIMIT ?", (self.pack, last, SCAN_BATCH)).fetchall()
            if not rows:
                return
            last = bytes(rows[-1][0])
            yield rows

    def apply(self, adds: dict, dels: set, refs: dict | None = None,
              counted=()) -> None:
        """(the catalogue's commit wrote them)"""

    def close(self) -> None:
        pass


def prune_events(c, kept: int = EVENTS_KEPT, noise_kept: int = NOISE_KEPT) -> None:
    """Keep the newest `kept` ordinary and `noise_kept` noise events."""
    for noise, n in ((0, kept), (1, noise_kept)):
        c.execute("DELETE FROM events WHERE noise=? AND seq <= (SELECT seq FROM events "
                  "WHERE noise=? ORDER BY seq DESC LIMIT 1 OFFSET ?)", (noise, noise, n))


class _Txn:
    def __init__(self, conn, lock=None):
        self.conn = conn
        self.lock = lock

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        return self.conn

    def __exit__(self, et, ev, tb):
        try:
            if et is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
        finally:
            if self.lock is not None:
                self.lock.release()
        return False
