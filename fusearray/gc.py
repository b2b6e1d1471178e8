"""The garbage collector: plan, then execute (as restic's prune).

A collection (`collect`): write back and merge first (so every overlay is
in a map), then
- PLAN (`plan`): mark every block id reachable from a volume, an overlay
  or a pinned root, per pack (a copied volume's blocks count in both its
  packs); nothing is changed. The live ids go into a set in RAM, or when
  the packs store more than LIVE_IN_RAM blocks into a table on disk
  (reach.py: bounded RAM; not on a full pack, and in RAM after all when
  the table cannot be made);
- EXECUTE (`execute`): drop the index entries of every other block
  (a scan of the index against the set, or a join with the table), close a mostly-dead active segment to appends, move the live
  blocks out of sparse segments (compaction, may use the pack's reserve);
then commit (the write-back's `commit`): the segments left with nothing
live are recycled as spares or deleted after the commit that dropped
their entries. A pack that refused writes for being full is retried.

What a crash leaves: before that commit, the old index (the drop was in
memory only; the compacted copies are unreferenced segment bytes, removed
at the next open; a table on disk, ARRAY/.reach.*, removed at the next
open); after it, dead segment files not yet removed, found unreferenced
and removed at the next open. Never a reachable block lost.

The cost of a collection follows what is stored, not what changed: every
map root is walked, with the commit lock held (issue 16 point 4).

`reclaim` is the collection a full pack runs in the middle of a write-back
(WriteBack._flush_pack): no flush, no new data, compaction up to
RECLAIM_RATIO live, the commit of what is stored only.

Owns (trio thread only): whether a collection is wanted (`wanted`,
`want()`), the garbage found per pack since its last collection
(`garbage`, `add_garbage`, `pressing`), when the last full one ran
(`last_gc`, `due`), the roots pinned by exports (`pin`/`unpin`) and
`reclaiming` (a reclaim is running: a full pack inside it does not reclaim
again).

Given at construction (the write-back makes it; no reference to the
Array): the write-back it collects for (`store`: its `flush`, `merge`,
`commit`, `retry_full_packs`), the pack and volume tables (the
coordinator's dicts, shared, read here), the reader's `read_locs(pack,
ids, locs)` and `loader(vol)`. Every collection runs on the trio thread
with the write-back's commit lock held by its caller; pack I/O (reads for
compaction, appends) runs in worker threads through the reader and Pack
*_blocking methods.
"""
import dataclasses
import logging
import sqlite3
import time

import trio

from . import ZERO_ID, maps
from .errors import ArrayError
from .reach import Reach, unreached, walk
from .util import human_bytes

log = logging.getLogger("fusearray")

GC_INTERVAL = 10.0
GC_GARBAGE_MIN = 64 << 20
#: A pack's garbage is pressing at this share of its data (and at least
#: GC_GARBAGE_MIN and two segments): the marking walks that pack's maps, so
#: it stays in proportion; lower, so overwrites find spare segment files
#: sooner (see `threshold`).
PRESSING_SHARE = 16
#: A collection in the middle of a write-back (WriteBack._reclaim_as_we_go)
#: compacts only segments less live than this: under a sequential overwrite
#: the segment at the overwrite's front is partly dead at each collection,
#: and at GC's usual half its live rest, overwritten a moment later, was
#: copied: 8 % more bytes written over a 1 GiB LUN's three passes.
AS_WE_GO_COMPACT = 0.25
#: On a full pack, segments with this share of garbage or more are
#: compacted (GC's usual bar is half): overwrites (a file system's journal
#: and metadata) leave garbage spread thin over many segments.
RECLAIM_RATIO = 0.95


#: Stored blocks (all packs a collection looks at) up to which the marking
#: keeps the live ids in a set in RAM (about 100 bytes each); above, in a
#: table on disk (reach.py: bounded RAM, slower)
LIVE_IN_RAM = 1 << 20


@dataclasses.dataclass
class Plan:
    """What a collection does: in each pack of `live`, drop every block
    not in its set (or, `reach` given, not reached in that table on disk);
    then seal the active segment if less than `seal` of it is live, and
    compact sealed segments less than `compact` live."""
    live: dict               # pack name -> set of live ids (None: see reach)
    seal: float = 0.5
    compact: float = 0.5
    reach: Reach | None = None

    def close(self) -> None:
        """Worker thread: remove the table on disk."""
        if self.reach is not None:
            self.reach.close()


async def _closed(plan: Plan) -> None:
    """Remove a plan's table on disk, even when cancelled."""
    if plan.reach is not None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(plan.close)


class Collector:
    """The garbage collector (see the module docstring)."""

    def __init__(self, store, packs: dict, volumes: dict, *, read_locs, loader):
        self.store = store              # the write-back: flush, merge, commit, retry_full_packs
        self.packs = packs
        self.volumes = volumes
        self.read_locs = read_locs
        self.loader = loader
        self.wanted = False
        self.garbage: dict = {}         # pack name -> bytes overwritten since its last GC
        self.reclaiming = False
        self.last_gc = 0.0
        self.pins: list = []            # (vol, root, height) kept by exports
        # statistics() (ctl/metrics): collections by kind, their time, when
        # the last ended (Unix time), bytes freed and compacted per pack
        self.runs = {"collect": 0, "reclaim": 0}
        self.seconds = 0.0
        self.last_run = 0.0
        self.freed_bytes: dict = {}
        self.compacted_bytes: dict = {}

    # ---- what tells it garbage is there ----------------------------------------
    def want(self) -> None:
        """Something was deleted, overwritten or punched: a collection at
        the committer's next GC interval."""
        self.wanted = True

    def add_garbage(self, vol, blocks: int = 1) -> None:
        name = vol.pack.name
        self.garbage[name] = self.garbage.get(name, 0) + blocks * vol.block_size

    def due(self, now: float) -> bool:
        """The periodic collection is due (if `wanted`)."""
        return now - self.last_gc >= GC_INTERVAL

    def threshold(self, name: str) -> int:
        """Bytes of overwritten data that make pack `name`'s garbage
        pressing: a sixteenth of what it stores (so the marking, which
        walks that pack's maps, stays in proportion: about 5 ms a
        collection for a 1 GiB LUN), at least GC_GARBAGE_MIN and two of its
        segments (what one collection should free). Both sides
        logical: a mirror's copies would double the bar.

        Why not more: every segment an overwrite starts while no spare file
        is left is a fresh file, and writing fresh pages cost 6x writing a
        reused file's on the bench VM (tmpfs: 58 against 9 ms per 16 MiB
        flushed). At a quarter, merged every OVERLAY_MERGE, a 1 GiB LUN's
        overwrite ran 512 MiB into fresh files before its first collection
        freed one, and 8 segments at once after that; now 128 MiB, and 2
        segments each time, as many as the overwrite takes until the next
        (#15 point 4)."""
        pack = self.packs[name]
        return max(GC_GARBAGE_MIN, 2 * pack.seg_limit, pack.data_bytes() // PRESSING_SHARE)

    def pressing(self) -> list:
        """The packs with overwritten data worth reclaiming now rather than
        at the next GC interval (their garbage reached `threshold`). Per
        pack: against the whole array, one LUN's overwrite pass found no GC
        until it ended, and all of it went to fresh segment files."""
        return [name for name, garbage in self.garbage.items()
                if name in self.packs and garbage >= self.threshold(name)]

    def merge_every(self) -> int:
        """How much a long write-back flushes between two merges of the
        overlays into the maps (the merge is what finds overwritten blocks,
        WriteBack._reclaim_as_we_go): a quarter of the lowest `threshold`,
        so a pack's garbage is seen pressing within a quarter of its bar
        (the spares a collection frees are gone by the next one: a late
        one means fresh files)."""
        return min((self.threshold(n) for n in self.packs), default=GC_GARBAGE_MIN) // 4

    def pin(self, roots) -> None:
        """Keep the blocks of [(vol, root, height)] alive (an export reads
        them while the volumes may change)."""
        self.pins.extend(roots)

    def unpin(self, roots) -> None:
        for r in roots:
            self.pins.remove(r)

    def statistics(self) -> dict:
        """Counters since the mount (ctl/metrics): `runs` per kind
        (collect, reclaim), `seconds` spent, `last_run` (Unix time, 0: none),
        `freed_bytes`, `compacted_bytes` and `garbage_bytes` (overwritten
        since the pack's last collection) per pack name."""
        return {"runs": dict(self.runs), "seconds": self.seconds,
                "last_run": self.last_run, "freed_bytes": dict(self.freed_bytes),
                "compacted_bytes": dict(self.compacted_bytes),
                "garbage_bytes": dict(self.garbage)}

    def _ran(self, kind: str, t0: float) -> None:
        self.runs[kind] += 1
        self.seconds += time.monotonic() - t0
        self.last_run = time.time()

    # ---- collections -------------------------------------------------------------
    async def collect(self, only: list | None = None, flush: bool = True,
                      compact: float = 0.5) -> None:
        """Mark every block reachable from a volume, sweep the rest, compact
        segments less than `compact` live, commit, delete emptied segments;
        with `only`, in those packs alone (their volumes' maps are all it
        walks); with flush=False, what is already stored only (dirty blocks
        stay in the cache; see WriteBack.commit). Caller holds the commit
        lock."""
        store = self.store
        t0 = time.monotonic()
        if only is None:
            self.wanted = False
            self.garbage.clear()
            self.last_gc = time.monotonic()
        for name in only or ():
            self.garbage.pop(name, None)
        if flush:
            await store.flush()
        await store.merge()
        plan = await self.plan(only)
        try:
            plan.compact = compact
            freed = await self.execute(plan)
        finally:
            await _closed(plan)
        await store.commit(flush)
        self._ran("collect", t0)
        if freed:
            log.info("gc freed %s", human_bytes(freed))
        await store.retry_full_packs()

    async def reclaim(self) -> None:
        """A pack is full: free what no map references, without writing
        anything new (no flush; compaction of segments up to RECLAIM_RATIO
        live, in the reserve). Caller holds the commit lock."""
        store = self.store
        self.reclaiming = True
        t0 = time.monotonic()
        try:
            try:
                await store.merge()     # overwritten blocks become garbage (small writes)
            except ArrayError:
                pass
            self.wanted = False         # this is a collection: set again by what frees
            plan = await self.plan(None)
            try:
                plan.seal, plan.compact = 1.0, RECLAIM_RATIO
                freed = await self.execute(plan)
            finally:
                await _closed(plan)
            await store.commit(flush=False)
            self._ran("reclaim", t0)
            log.info("reclaim on a full pack freed %s", human_bytes(freed))
        finally:
            self.reclaiming = False

    async def plan(self, only: list | None = None) -> Plan:
        """Every id reachable from a volume, an overlay or a pinned root,
        per pack (of the packs in `only`, default all). Changes nothing."""
        names = list(self.packs) if only is None else [n for n in only if n in self.packs]
        # (not on a full pack: the table needs space on the array's file system)
        if not self.reclaiming and sum(self.packs[n].block_count() for n in names) > LIVE_IN_RAM:
            try:
                return await self._plan_on_disk(names)
            except (sqlite3.Error, OSError) as e:
                log.warning("collection: the live set cannot go to disk (%s): marked in RAM",
                            e)
        live: dict = {name: set() for name in names}
        seen: dict = {name: set() for name in names}   # per pack: a node shared
        for vol in list(self.volumes.values()):        # across packs counts in each
            if vol.source is not None:     # its blocks must stay in both packs
                if vol.source.name not in live and vol.pack.name not in live:
                    continue
                mine: set = set(vol.overlay.values())
                await maps.mark(vol.root, vol.height, self.loader(vol), mine, set())
                for name in (vol.source.name, vol.pack.name):
                    if name in live:
                        live[name] |= mine
            elif vol.pack.name in live:
                await maps.mark(vol.root, vol.height, self.loader(vol),
                                live[vol.pack.name], seen[vol.pack.name])
                live[vol.pack.name].update(vol.overlay.values())
        for vol, root, height in list(self.pins):
            if vol.source is not None:     # still copied: in both packs, as above
                mine = set()
                await maps.mark(root, height, self.loader(vol), mine, set())
                for name in (vol.source.name, vol.pack.name):
                    if name in live:
                        live[name] |= mine
            elif vol.pack.name in live:
                await maps.mark(root, height, self.loader(vol), live[vol.pack.name],
                                seen[vol.pack.name])
        return Plan(live)

    async def _plan_on_disk(self, names: list) -> Plan:
        """`plan` for a big array: the same marking into a table on disk."""
        reach = await trio.to_thread.run_sync(Reach, self.store.catalogue.path)
        try:
            roots = [(vol, vol.root, vol.height) for vol in list(self.volumes.values())]
            for vol, root, height in roots + list(self.pins):
                mine = [p.name for p in (vol.pack, vol.source)     # a copy: in both
                        if p is not None and p.name in names]
                if not mine:
                    continue
                await walk(root, height, self.loader(vol), reach, mine)
                if root is vol.root:
                    over = [b for b in vol.overlay.values() if b != ZERO_ID]
                    await trio.to_thread.run_sync(reach.add_blocking, mine, over)
            # the sort into an index: the last step that needs space
            await trio.to_thread.run_sync(reach.index_blocking)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(reach.close)
            raise
        return Plan({name: None for name in names}, reach=reach)

    async def execute(self, plan: Plan) -> int:
        """Sweep every pack of `plan`, then seal and compact each; the
        caller commits. Returns the bytes freed."""
        freed = 0
        for name, live in plan.live.items():
            pack = self.packs[name]
            # the index is on disk: the scan (or the join) for what is not
            # live runs in worker threads (the commit lock keeps the index
            # still), the drop on the trio thread
            if plan.reach is not None:
                dead = await unreached(pack, plan.reach)
            else:
                dead = await trio.to_thread.run_sync(pack.dead_blocking, live)
            n = pack.drop(dead)
            self.freed_bytes[name] = self.freed_bytes.get(name, 0) + n
            freed += n
        for name in plan.live:
            pack = self.packs[name]
            pack.seal_if_sparse(plan.seal)
            await self.compact(pack, plan.compact)
        return freed

    async def compact(self, pack, ratio: float = 0.5) -> None:
        """Move the live blocks out of segments less than `ratio` live
        (they die at the next commit). May use the pack's reserve."""
        for seg in pack.sparse_segments(ratio):
            entries = await trio.to_thread.run_sync(pack.entries_in, seg)
            bids = [b for b, _ in entries]
            datas = await self.read_locs(pack, bids, [loc for _, loc in entries])
            try:
                locs = await trio.to_thread.run_sync(pack.append_blocking,
                                                     list(zip(bids, datas)), True)
            except OSError as e:
                log.warning("compaction of pack %s stopped: %s", pack.name, e)
                return
            for b, loc in zip(bids, locs):
                pack.add(b, loc)
            self.compacted_bytes[pack.name] = (self.compacted_bytes.get(pack.name, 0)
                                               + sum(loc[2] for _, loc in entries))
