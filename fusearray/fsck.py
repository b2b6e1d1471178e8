"""Consistency check of an array: the invariants tests end with, and what
`tools/fsck` runs on an unmounted array.

Invariants:
1. every block and map node reachable from a volume is in its pack's index
   (no dangling reference);
2. (after GC, `strict`) every index entry is reachable (no leak);
3. each segment's live-byte count equals the sum over its index entries;
4. every indexed segment file exists and is long enough;
5. (`verify_data`) every reachable block reads back matching its hash;
6. each volume's `allocated` equals its non-zero map entries;
7. each index entry's reference count (refs.py) is the number of roots of
   the pack's volumes (not being copied) equal to it plus its occurrences
   in the pack's counted nodes, and every entry of a counted node is
   indexed (a count too low would let a collection free live data, one too
   high leaks space).

Memory is bounded whatever the array holds: the maps are walked node by
node, and what they reach goes into a table on disk (reach.py: a SQLite
file in ARRAY/.reach.*, removed at the end), not into RAM; leaks and
dangling references are joins of it with the catalogue's index, the
accounting a GROUP BY (the changes not committed looked up in the pack).
`packs` limits the check to some packs: their index, and the volumes whose
blocks lie in them.
"""
import trio

from . import ZERO_ID, maps, refs
from .reach import Reach, stream, unindexed, unreached, walk


async def check(array, strict: bool = False, verify_data: bool = False,
                packs: list | None = None, tmpdir: str | None = None) -> dict:
    """The invariants (see the module docstring) of `packs` (default all),
    with the array's commit lock held: the index and the maps stand still
    while they are streamed (the committer and GC wait)."""
    async with array.writeback.lock:
        # counts owed until the commit are made whole first (refs.py: the
        # next commit would write them so)
        await array.writeback.refs.settle()
        return await _check(array, strict, verify_data, packs, tmpdir)


async def _check(array, strict, verify_data, packs, tmpdir) -> dict:
    problems: list[str] = []
    names = list(array.packs) if packs is None else packs
    for name in names:
        if name not in array.packs:
            problems.append(f"pack {name}: no such pack")
    names = [n for n in names if n in array.packs]
    copy = None
    if array.catalogue.single:
        # an array in a cluster: its catalogue cannot be attached as a
        # second connection (the VFS's lock): its index is copied (reach.py)
        tmpdir = tmpdir or array.path
        copy = [(n, array.catalogue.pack_rows(n, 0).scan()) for n in array.packs]
    reach = await trio.to_thread.run_sync(Reach, array.catalogue.path, tmpdir, copy)
    try:
        for vol in list(array.volumes.values()):
            mine = [p.name for p in (vol.pack, vol.source) if p is not None]
            if not set(mine) & set(names):
                continue
            load = array.reader.loader(vol)
            try:
                await walk(vol.root, vol.height, load, reach, mine)
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
            live += await trio.to_thread.run_sync(reach.count_blocking, name)
            # 1. every reached id indexed (or, a copy in progress, in the
            #    other pack of a volume that reaches it)
            async for batch in unindexed(pack, reach):
                problems += [f"pack {name}: block {bid.hex()} is referenced but in no "
                             "pack's index" for bid in batch
                             if not _in_other_pack(array, pack, bid)]
            if verify_data:
                async for batch in stream(reach.batches_blocking(name)):
                    # (looked up in a worker thread, 500 to a statement)
                    for bid, loc in zip(batch, await array.reader.lookups(pack, batch)):
                        if loc is not None:
                            try:
                                await array.reader.read_locs(pack, [bid], [loc])
                            except Exception as e:
                                problems.append(f"pack {name}: {e}")
            # 2. every index entry reached
            leaked = len(await unreached(pack, reach))
            blocks += pack.block_count()
            if strict and leaked:
                problems.append(f"pack {name}: {leaked} index entries are not "
                                "referenced by any volume")
            # 3, 4: the accounting
            problems += await trio.to_thread.run_sync(pack.index_problems_blocking)
            # 7: the reference counts
            problems += await _check_refs(array, pack, reach)
    finally:
        await trio.to_thread.run_sync(reach.close)
    return {"problems": problems, "blocks": blocks, "live": live}


async def _check_refs(array, pack, reach) -> list[str]:
    """Invariant 7 for `pack`: the expected references go into a table on
    disk (each counted node read once), then every entry's count is
    compared with it, batch by batch."""
    problems = []
    name = pack.name
    roots = [root for (p, root), n in refs.counted_roots(array.volumes.values()).items()
             for _ in range(n) if p == name]
    await trio.to_thread.run_sync(reach.add_refs_blocking, name, roots)
    it = pack.scan_blocking()
    async for batch in stream(it):
        now = await trio.to_thread.run_sync(pack.refs_blocking, [b for b, _ in batch])
        for bid, loc in batch:
            if not now.get(bid, (0, False))[1]:
                continue
            try:
                node = array.reader.nodes.get(bid) or bytes(
                    (await array.reader.read_locs(pack, [bid], [loc]))[0])
            except Exception as e:
                problems.append(f"pack {name}: counted map node {bid.hex()} unreadable: {e}")
                continue
            kids = [k for k, n in refs.entries(node).items() for _ in range(n)]
            await trio.to_thread.run_sync(reach.add_refs_blocking, name, kids)
    wrong = 0
    async for batch in stream(pack.scan_blocking()):
        ids = [b for b, _ in batch]
        now = await trio.to_thread.run_sync(pack.refs_blocking, ids)
        want = await trio.to_thread.run_sync(reach.expected_refs_blocking, name, ids)
        for bid in ids:
            have = now.get(bid, (0, False))[0]
            if have != want.get(bid, 0):
                wrong += 1
                if wrong <= 10:
                    problems.append(f"pack {name}: block {bid.hex()} counts {have} "
                                    f"reference(s), {want.get(bid, 0)} expected")
    if wrong > 10:
        problems.append(f"pack {name}: {wrong - 10} more wrong reference counts")
    async for batch in stream(reach.referenced_blocking(name)):
        for bid, loc in zip(batch, await array.reader.lookups(pack, batch)):
            if loc is None:
                problems.append(f"pack {name}: {bid.hex()} is referenced by a counted "
                                "node or root but not indexed")
    return problems


def _in_other_pack(array, pack, bid: bytes) -> bool:
    """A block a copying volume reaches may lie in its other pack only."""
    for vol in array.volumes.values():
        if vol.source is not None and pack in (vol.pack, vol.source):
            other = vol.source if pack is vol.pack else vol.pack
            if other.lookup(bid) is not None:
                return True
    return False
