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
"""
from . import ZERO_ID, maps


async def check(array, strict: bool = False, verify_data: bool = False) -> dict:
    problems: list[str] = []
    live = {name: set() for name in array.packs}
    for vol in list(array.volumes.values()):
        load = array.reader.loader(vol)
        mine: set = set()
        try:
            await maps.mark(vol.root, vol.height, load, mine, set())
        except Exception as e:   # a missing node
            problems.append(f"{vol.path}: map cannot be walked: {e}")
            continue
        mine.update(b for b in vol.overlay.values() if b != ZERO_ID)
        n = await maps.count(vol.root, vol.height - 1, load)
        if n != vol.allocated:
            problems.append(f"{vol.path}: allocated={vol.allocated} but the map has "
                            f"{n} non-zero entries")
        for bid in mine:
            if vol.pack.lookup(bid) is None and (vol.source is None
                                                 or vol.source.lookup(bid) is None):
                problems.append(f"{vol.path}: block {bid.hex()} is referenced but in "
                                "no pack's index")
        live[vol.pack.name] |= mine
        if vol.source is not None:
            live[vol.source.name] |= mine
    blocks = 0
    for name, pack in array.packs.items():
        if strict:
            leaked = [b for b in pack.block_ids() if b not in live[name]]
            if leaked:
                problems.append(f"pack {name}: {len(leaked)} index entries are not "
                                "referenced by any volume")
        problems += pack.index_problems()
        if verify_data:
            for bid in live[name]:
                loc = pack.lookup(bid)
                if loc is not None:
                    try:
                        await array.reader.read_locs(pack, [bid], [loc])
                    except Exception as e:
                        problems.append(f"pack {name}: {e}")
        blocks += len(pack.block_ids())
    return {"problems": problems, "blocks": blocks,
            "live": sum(len(s) for s in live.values())}
