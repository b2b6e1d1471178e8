"""What the maps reach, on disk: the live set of a big garbage collection
and of fsck, with bounded memory whatever the array stores.

`Reach` is a SQLite file of (pack, id) rows in a directory of its own
(ARRAY/.reach.XXXX, removed by `close`; one a crash left is removed at
the next open: `remove_stale`), with the catalogue attached read only, so
that "indexed but not reached" (garbage, leaks) and "reached but not
indexed" (dangling references) are joins on disk. The index's changes not
yet committed (Pack.uncommitted_ids: bounded by what one commit writes)
are looked up in the pack itself. A catalogue that cannot be attached (an
array in a Ceph cluster: its VFS locks the database per connection) is
copied instead, its block index streamed into a file of the same
directory (`copy`), under the same commit lock.

`walk` puts a map's nodes and blocks into a Reach node by node; a node
already there is not walked again (subtrees shared by snapshots cost once).

Threads: a Reach's calls run in worker threads, one at a time (the caller
awaits each); the walk and the joins run under the array's commit lock
(the index and the maps stand still).
"""
import os
import shutil
import sqlite3
import tempfile

import trio

from . import ZERO_ID, maps

#: ids handed to the table (and read back) at a time
BATCH = 8192
PREFIX = ".reach."


def remove_stale(array_dir: str) -> list:
    """Remove the Reach directories a crash left in `array_dir`."""
    gone = []
    for fn in os.listdir(array_dir):
        if fn.startswith(PREFIX):
            shutil.rmtree(os.path.join(array_dir, fn), ignore_errors=True)
            gone.append(fn)
    return gone


def _copy_index(path: str, copy) -> str:
    """A file at `path` with table `blocks` (pack, id, seg, off, len) of
    the batches of `copy` (each pack's rows in id order); its path."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE blocks (pack TEXT NOT NULL, id BLOB NOT NULL, "
                     "seg INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL, "
                     "PRIMARY KEY (pack, id)) WITHOUT ROWID")
        for pack, batches in copy:
            for batch in batches:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO blocks VALUES (?,?,?,?,?)",
                                 [(pack, b, s, o, n) for b, (s, o, n) in batch])
                conn.execute("COMMIT")
    finally:
        conn.close()
    return path


class Reach:
    """Reached ids per pack, on disk (see the module docstring)."""

    def __init__(self, catalogue: str, tmpdir: str | None = None, copy=None):
        """`copy`: [(pack, batches of (id, (seg, off, len)))] to attach
        instead of `catalogue` (see the module docstring)."""
        self.dir = tempfile.mkdtemp(prefix=PREFIX,
                                    dir=tmpdir or os.path.dirname(os.path.abspath(catalogue)))
        try:
            if copy is not None:
                catalogue = _copy_index(os.path.join(self.dir, "index.db"), copy)
            self.conn = sqlite3.connect(f"file:{os.path.join(self.dir, 'reach.db')}",
                                        uri=True, check_same_thread=False,
                                        isolation_level=None)
            self.conn.execute("PRAGMA main.journal_mode=OFF")
            self.conn.execute("PRAGMA main.synchronous=OFF")
            self.conn.execute("PRAGMA main.cache_size=-8192")
            # the committed index, read only, joined with what the maps reach
            self.conn.execute("ATTACH DATABASE ? AS cat", (f"file:{catalogue}?mode=ro",))
            # appended in walk order (no index while it fills: an index
            # built at the end by one sort is many times faster than keys
            # inserted in random order); the nodes, keyed, so a node
            # already walked is not walked again
            self.conn.execute("CREATE TABLE reach (pack TEXT NOT NULL, id BLOB NOT NULL)")
            self.conn.execute("CREATE TABLE nodes (pack TEXT NOT NULL, id BLOB NOT NULL, "
                              "PRIMARY KEY (pack, id)) WITHOUT ROWID")
            # fsck: one row per reference the counts should hold (refs.py)
            self.conn.execute("CREATE TABLE refs (pack TEXT NOT NULL, id BLOB NOT NULL)")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.indexed = False
        self.refs_indexed = False

    def add_refs_blocking(self, pack: str, ids) -> None:
        """Record one expected reference in `pack` to each of `ids` (an id
        given n times: n references)."""
        self.conn.execute("BEGIN")
        try:
            self.conn.executemany("INSERT INTO refs VALUES (?, ?)", [(pack, b) for b in ids])
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def expected_refs_blocking(self, pack: str, ids) -> dict:
        """{id: expected references} for those of `ids` with any."""
        if not self.refs_indexed:
            self.conn.execute("CREATE INDEX refs_id ON refs (pack, id)")
            self.refs_indexed = True
        out = {}
        ids = list(ids)
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            for b, n in self.conn.execute(
                    f"SELECT id, COUNT(*) FROM refs WHERE pack=? AND id IN "
                    f"({','.join('?' * len(part))}) GROUP BY id", (pack, *part)):
                out[bytes(b)] = n
        return out

    def referenced_blocking(self, pack: str):
        """Every id with an expected reference in `pack`, in batches."""
        if not self.refs_indexed:
            self.conn.execute("CREATE INDEX refs_id ON refs (pack, id)")
            self.refs_indexed = True
        return self._batches("SELECT DISTINCT id FROM refs WHERE pack=? ORDER BY id", (pack,))

    def add_blocking(self, packs, ids, nodes: bool = False) -> list:
        """Record `ids` as reached in each of `packs`. `nodes`: they are map
        nodes; returns those not recorded before in one of the packs (to
        walk: what they reach must be recorded in that pack too)."""
        new = []
        self.conn.execute("BEGIN")      # one transaction a batch (autocommit: one a row)
        try:
            if not nodes:
                for p in packs:
                    self.conn.executemany("INSERT INTO reach VALUES (?, ?)",
                                          [(p, b) for b in ids])
            else:
                for b in ids:
                    fresh = False
                    for p in packs:
                        cur = self.conn.execute("INSERT OR IGNORE INTO nodes VALUES (?, ?)",
                                                (p, b))
                        if cur.rowcount:
                            self.conn.execute("INSERT INTO reach VALUES (?, ?)", (p, b))
                            fresh = True
                    if fresh:
                        new.append(b)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return new

    def index_blocking(self) -> None:
        """Before the first query: sort what was reached into an index."""
        if not self.indexed:
            self.conn.execute("PRAGMA main.cache_size=-32768")
            self.conn.execute("CREATE INDEX reach_id ON reach (pack, id)")
            self.conn.execute("PRAGMA main.cache_size=-8192")
            self.indexed = True

    def present_blocking(self, pack: str, ids) -> set:
        """Which of `ids` were reached in `pack`."""
        self.index_blocking()
        out = set()
        ids = list(ids)
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            out.update(bytes(r[0]) for r in self.conn.execute(
                f"SELECT id FROM reach WHERE pack=? AND id IN ({','.join('?' * len(part))})",
                (pack, *part)))
        return out

    def _batches(self, sql: str, args, row=lambda r: bytes(r[0])):
        self.index_blocking()
        cur = self.conn.cursor()
        cur.execute(sql, args)
        while True:
            rows = cur.fetchmany(BATCH)
            if not rows:
                return
            yield [row(r) for r in rows]

    def batches_blocking(self, pack: str):
        """What the maps reach in `pack`, in batches of ids."""
        return self._batches("SELECT DISTINCT id FROM reach WHERE pack=? ORDER BY id",
                             (pack,))

    def unindexed_blocking(self, pack: str):
        """Reached ids the committed index of `pack` lacks, in batches."""
        return self._batches("SELECT r.id FROM reach r WHERE r.pack=? AND NOT EXISTS "
                             "(SELECT 1 FROM cat.blocks b WHERE b.pack=r.pack AND b.id=r.id)",
                             (pack,))

    def unreached_blocking(self, pack: str):
        """Entries (id, loc) of the committed index of `pack` nothing
        reaches, in batches."""
        return self._batches("SELECT b.id, b.seg, b.off, b.len FROM cat.blocks b WHERE "
                             "b.pack=? AND NOT EXISTS (SELECT 1 FROM reach r WHERE "
                             "r.pack=b.pack AND r.id=b.id)", (pack,),
                             lambda r: (bytes(r[0]), (r[1], r[2], r[3])))

    def count_blocking(self, pack: str) -> int:
        """Distinct ids reached in `pack`."""
        self.index_blocking()
        return self.conn.execute("SELECT COUNT(DISTINCT id) FROM reach WHERE pack=?",
                                 (pack,)).fetchone()[0]

    def close(self) -> None:
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def stream(it):
    """The batches of a Reach query, each fetched in a worker thread."""
    while (batch := await trio.to_thread.run_sync(next, it, None)) is not None:
        yield batch


async def walk(root: bytes, height: int, load, reach: Reach, packs: list) -> None:
    """Put every node and block id of the map (root, height) into `reach`
    for each of `packs`, node by node."""
    todo = [(root, height - 1)]
    while todo:
        level = todo[-1][1]
        nids = []
        while todo and todo[-1][1] == level and len(nids) < BATCH:
            nid = todo.pop()[0]
            if nid != ZERO_ID:
                nids.append(nid)
        fresh = await trio.to_thread.run_sync(reach.add_blocking, packs, nids, True)
        blocks = []
        for n, nid in enumerate(fresh):
            node = await load(nid)
            ids = [bytes(node[i:i + maps.ENTRY])
                   for i in range(0, maps.NODE_SIZE, maps.ENTRY)]
            ids = [b for b in ids if b != ZERO_ID]
            if level == 0:
                blocks += ids
                if len(blocks) >= BATCH:
                    await trio.to_thread.run_sync(reach.add_blocking, packs, blocks)
                    blocks = []
            else:
                todo.extend((b, level - 1) for b in ids)
            if n % 16 == 15:
                await trio.sleep(0)     # a big map: let I/O in between
        if blocks:
            await trio.to_thread.run_sync(reach.add_blocking, packs, blocks)


async def unreached(pack, reach: Reach) -> list:
    """The entries [(id, loc)] of `pack`'s index as it is now (committed
    rows with the changes since applied) that nothing reached."""
    changed = pack.uncommitted_ids()
    out, seen = [], set()
    async for batch in stream(reach.unreached_blocking(pack.name)):
        for bid, loc in batch:
            if bid in changed:
                seen.add(bid)
                loc = pack.lookup(bid)
                if loc is None:
                    continue            # dropped since the commit
            out.append((bid, loc))
    fresh = {b: loc for b in changed - seen if (loc := pack.lookup(b)) is not None}
    found = await trio.to_thread.run_sync(reach.present_blocking, pack.name, list(fresh))
    out += [(b, loc) for b, loc in fresh.items() if b not in found]
    return out


async def unindexed(pack, reach: Reach):
    """Reached ids `pack`'s index lacks now, in batches."""
    changed = pack.uncommitted_ids()
    doubt = (await trio.to_thread.run_sync(reach.present_blocking, pack.name, changed)
             if changed else set())
    async for batch in stream(reach.unindexed_blocking(pack.name)):
        yield [b for b in batch if b not in doubt and pack.lookup(b) is None]
    yield [b for b in doubt if pack.lookup(b) is None]
