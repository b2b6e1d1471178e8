"""Consistency check of an array: the invariants tests end with, and what
`tools/fsck` runs on an unmounted array.

Invariants:
1. every block and map node reachable from a volume is in its pack's index
   (no dangling reference);
2. (after GC, `strict`) every index entry is reachable (no leak);
3. each segment's live-byte count equals the sum over its index entries;
4. every indexed segment file exists and is long enough;
5. (`verify_data`) every reachable block reads back matching its hash;
6. each volume's `allocated` equals its non-zero map entries.

Memory is bounded whatever the array holds: the maps are walked node by
node, and what they reach goes into a table on disk (`Reach`, a SQLite
file in a temporary directory, removed at the end), not into RAM; the
index is streamed in batches (Pack.scan_blocking) and checked against it.
`packs` limits the check to some packs: their index, and the volumes whose
blocks lie in them.
"""
import os
import sqlite3
import tempfile

import trio

from . import ZERO_ID, maps

#: ids handed to the Reach table (and read back) at a time
BATCH = 8192


class Reach:
    """What the maps reach, per pack, on disk (worker threads: one at a
    time, the caller awaits each call)."""

    def __init__(self, catalogue: str, tmpdir: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="fusearray-fsck.", dir=tmpdir)
        self.conn = sqlite3.connect(f"file:{os.path.join(self.dir, 'reach.db')}",
                                    uri=True, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA main.journal_mode=OFF")
        self.conn.execute("PRAGMA main.synchronous=OFF")
        self.conn.execute("PRAGMA main.cache_size=-8192")
        # the committed index, read only, to join with what the maps reach
        self.conn.execute("ATTACH DATABASE ? AS cat", (f"file:{catalogue}?mode=ro",))
        self.conn.execute("CREATE TABLE reach (pack TEXT NOT NULL, id BLOB NOT NULL, "
                          "PRIMARY KEY (pack, id)) WITHOUT ROWID")

    def add_blocking(self, packs, ids, want_new: bool = False) -> list:
        """Record `ids` as reached in each of `packs`; with `want_new`,
        returns those that were new in the first pack (a node seen before
        is not walked again)."""
        new = []
        with self.conn:
            for i, p in enumerate(packs):
                if i or not want_new:
                    self.conn.executemany("INSERT OR IGNORE INTO reach VALUES (?, ?)",
                                          [(p, b) for b in ids])
                    continue
                for b in ids:
                    cur = self.conn.execute("INSERT OR IGNORE INTO reach VALUES (?, ?)", (p, b))
                    if cur.rowcount:
                        new.append(b)
        return new

    def present_blocking(self, pack: str, ids) -> set:
        """Which of `ids` were reached in `pack`."""
        out = set()
        ids = list(ids)
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            out.update(bytes(r[0]) for r in self.conn.execute(
                f"SELECT id FROM reach WHERE pack=? AND id IN ({','.join('?' * len(part))})",
                (pack, *part)))
        return out

    def _batches(self, sql: str, args):
        cur = self.conn.cursor()
        cur.execute(sql, args)
        while True:
            rows = cur.fetchmany(BATCH)
            if not rows:
                return
            yield [bytes(r[0]) for r in rows]

    def batches_blocking(self, pack: str):
        """What the maps reach in `pack`, in batches."""
        return self._batches("SELECT id FROM reach WHERE pack=? ORDER BY id", (pack,))

    def unindexed_blocking(self, pack: str):
        """Reached ids the committed index of `pack` lacks, in batches."""
        return self._batches("SELECT r.id FROM reach r WHERE r.pack=? AND NOT EXISTS "
                             "(SELECT 1 FROM cat.blocks b WHERE b.pack=r.pack AND b.id=r.id)",
                             (pack,))

    def unreached_blocking(self, pack: str):
        """Ids of the committed index of `pack` nothing reaches, in batches."""
        return self._batches("SELECT b.id FROM cat.blocks b WHERE b.pack=? AND NOT EXISTS "
                             "(SELECT 1 FROM reach r WHERE r.pack=b.pack AND r.id=b.id)",
                             (pack,))

    def count_blocking(self, pack: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM reach WHERE pack=?",
                                 (pack,)).fetchone()[0]

    def close(self) -> None:
        self.conn.close()
        for fn in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, fn))
        os.rmdir(self.dir)


async def _walk(vol, load, reach: Reach, packs: list) -> None:
    """Put every node and block id `vol`'s map reaches into `reach` for
    each of `packs`, node by node (a node already reached is not walked
    again: shared subtrees cost once)."""
    todo = [(vol.root, vol.height - 1)]
    while todo:
        level_ids = {}
        while todo and sum(len(v) for v in level_ids.values()) < BATCH:
            nid, level = todo.pop()
            if nid != ZERO_ID:
                level_ids.setdefault(level, []).append(nid)
        for level, nids in level_ids.items():
            fresh = await trio.to_thread.run_sync(reach.add_blocking, packs, nids, True)
            for nid in fresh:
                node = await load(nid)
                ids = [bytes(node[i:i + maps.ENTRY]) for i in range(0, maps.NODE_SIZE,
                                                                    maps.ENTRY)]
                ids = [b for b in ids if b != ZERO_ID]
                if level == 0:
                    await trio.to_thread.run_sync(reach.add_blocking, packs, ids)
                else:
                    todo.extend((b, level - 1) for b in ids)


async def _stream(it):
    """The batches of a Reach query, each fetched in a worker thread."""
    while (batch := await trio.to_thread.run_sync(next, it, None)) is not None:
        yield batch


async def check(array, strict: bool = False, verify_data: bool = False,
                packs: list | None = None, tmpdir: str | None = None) -> dict:
    """The invariants (see the module docstring) of `packs` (default all),
    with the array's commit lock held: the index and the maps stand still
    while they are streamed (the committer and GC wait)."""
    async with array.writeback.lock:
        return await _check(array, strict, verify_data, packs, tmpdir)


async def _check(array, strict, verify_data, packs, tmpdir) -> dict:
    problems: list[str] = []
    names = list(array.packs) if packs is None else packs
    for name in names:
        if name not in array.packs:
            problems.append(f"pack {name}: no such pack")
    names = [n for n in names if n in array.packs]
    reach = await trio.to_thread.run_sync(Reach, array.catalogue.path, tmpdir)
    try:
        for vol in list(array.volumes.values()):
            mine = [p.name for p in (vol.pack, vol.source) if p is not None]
            if not set(mine) & set(names):
                continue
            load = array.reader.loader(vol)
            try:
                await _walk(vol, load, reach, mine)
                n = await maps.count(vol.root, vol.height - 1, load)
            except Exception as e:   # a missing node
                problems.append(f"{vol.path}: map cannot be walked: {e}")
                continue
            over = [b for b in vol.overlay.values() if b != ZERO_ID]
            await trio.to_thread.run_sync(reach.add_blocking, mine, over)
            if n != vol.allocated:
                problems.append(f"{vol.path}: allocated={vol.allocated} but the map has "
                                f"{n} non-zero entries")
        live = blocks = 0
        for name in names:
            pack = array.packs[name]
            # what the commit has not put in the catalogue yet is looked up
            # in the pack's index itself; the rest is joined on disk
            changed = pack.uncommitted_ids()
            live += await trio.to_thread.run_sync(reach.count_blocking, name)
            # 1. every reached id indexed (or, a copy in progress, in the
            #    other pack of a volume that reaches it)
            doubt = (set(await trio.to_thread.run_sync(reach.present_blocking, name, changed))
                     if changed else set())
            async for batch in _stream(reach.unindexed_blocking(name)):
                problems += _dangling(array, pack, [b for b in batch if b not in doubt])
            problems += _dangling(array, pack, doubt)
            if verify_data:
                async for batch in _stream(reach.batches_blocking(name)):
                    for bid in batch:
                        loc = pack.lookup(bid)
                        if loc is not None:
                            try:
                                await array.reader.read_locs(pack, [bid], [loc])
                            except Exception as e:
                                problems.append(f"pack {name}: {e}")
            # 2. every index entry reached
            leaked, counted = 0, set()
            async for batch in _stream(reach.unreached_blocking(name)):
                for bid in batch:
                    if bid in changed:
                        counted.add(bid)
                        if pack.lookup(bid) is None:
                            continue        # dropped since the commit
                    leaked += 1
            fresh = [b for b in changed - counted if pack.lookup(b) is not None]
            found = await trio.to_thread.run_sync(reach.present_blocking, name, fresh)
            leaked += sum(1 for b in fresh if b not in found)
            blocks += pack.block_count()
            if strict and leaked:
                problems.append(f"pack {name}: {leaked} index entries are not "
                                "referenced by any volume")
            # 3, 4: the accounting
            problems += await trio.to_thread.run_sync(pack.index_problems_blocking)
    finally:
        await trio.to_thread.run_sync(reach.close)
    return {"problems": problems, "blocks": blocks, "live": live}


def _dangling(array, pack, ids) -> list:
    """The problems of reached `ids` that `pack`'s index lacks now."""
    return [f"pack {pack.name}: block {bid.hex()} is referenced but in no pack's index"
            for bid in sorted(ids)
            if pack.lookup(bid) is None and not _in_other_pack(array, pack, bid)]


def _in_other_pack(array, pack, bid: bytes) -> bool:
    """A block a copying volume reaches may lie in its other pack only."""
    for vol in array.volumes.values():
        if vol.source is not None and pack in (vol.pack, vol.source):
            other = vol.source if pack is vol.pack else vol.pack
            if other.lookup(bid) is not None:
                return True
    return False
