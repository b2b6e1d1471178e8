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
node, and what they reach goes into a table on disk (reach.py: a SQLite
file in ARRAY/.reach.*, removed at the end), not into RAM; leaks and
dangling references are joins of it with the catalogue's index, the
accounting a GROUP BY (the changes not committed looked up in the pack).
`packs` limits the check to some packs: their index, and the volumes whose
blocks lie in them.
"""
import trio

from . import ZERO_ID, maps
from .reach import Reach, stream, unindexed, unreached, walk


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
                    for bid in batch:
                        loc = pack.lookup(bid)
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
    finally:
        await trio.to_thread.run_sync(reach.close)
    return {"problems": problems, "blocks": blocks, "live": live}


def _in_other_pack(array, pack, bid: bytes) -> bool:
    """A block a copying volume reaches may lie in its other pack only."""
    for vol in array.volumes.values():
        if vol.source is not None and pack in (vol.pack, vol.source):
            other = vol.source if pack is vol.pack else vol.pack
            if other.lookup(bid) is not None:
                return True
    return False
