"""The garbage collector: plan, then execute (as restic's prune).

A collection (`collect`): write back and merge first (so every overlay is
in a map), then
- PLAN (`plan`): bring the counts of the volumes' map roots up to date,
  and gather per pack what must stay although nothing counts a reference
  to it (overlays, pinned roots, the maps of volumes being copied or
  deleted while open); nothing is changed;
- EXECUTE (`execute`): free every block and map node with no reference
  (refs.py: the index's rows with refs = 0, and through each freed node
  the entries it no longer holds), close a mostly-dead active segment to
  appends, move the live blocks out of sparse segments (compaction, may
  use the pack's reserve);
then commit (the write-back's `commit`): the segments left with nothing
live are recycled as spares or deleted after the commit that dropped
their entries. A pack that refused writes for being full is retried.

What a crash leaves: before that commit, the old index (the drop was in
memory only; the compacted copies are unreferenced segment bytes, removed
at the next open); after it, dead segment files not yet removed, found
unreferenced and removed at the next open. Never a reachable block lost. The counts
change in the same transaction as the rows and roots (refs.py).

The cost of a collection follows what it frees (and the size of the
volumes being copied or deleted while open), not what is stored: no map
root is walked otherwise.

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
import time

import trio

from . import ZERO_ID, maps
from .errors import ArrayError
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


@dataclasses.dataclass
class Plan:
    """What a collection does: in each pack of `protect`, free every
    block and node with no reference (refs.py) except those in its set;
    then seal the active segment if less than `seal` of it is live, and
    compact sealed segments less than `compact` live."""
    protect: dict            # pack name -> ids kept although unreferenced
    seal: float = 0.5
    compact: float = 0.5


class Collector:
    """The garbage collector (see the module docstring)."""

    def __init__(self, store, packs: dict, volumes: dict, *, read_locs, loader, refs):
        self.store = store              # the write-back: flush, merge, commit, retry_full_packs
        self.refs = refs                # the reference counts (refs.RefCounts)
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
        """(what they kept may be unreferenced now: the next collection
        frees it)"""
        for r in roots:
            self.pins.remove(r)
        self.want()

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
        """Free every block no map references (refs.py), compact
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
        plan.compact = compact
        freed = await self.execute(plan)
        await store.commit(flush, freed=set(plan.protect))
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
            plan.seal, plan.compact = 1.0, RECLAIM_RATIO
            freed = await self.execute(plan)
            await store.commit(flush=False, freed=set(plan.protect))
            self._ran("reclaim", t0)
            log.info("reclaim on a full pack freed %s", human_bytes(freed))
        finally:
            self.reclaiming = False

    async def plan(self, only: list | None = None) -> Plan:
        """What a collection of the packs in `only` (default all) may not
        free although nothing counts a reference to it (refs.py): the
        volumes' overlays, the roots pinned by exports, and what a volume
        being copied or deleted-but-open reaches (a walk of that volume's
        map only). Brings the counts of the volumes' roots up to date
        first. Changes nothing else."""
        names = list(self.packs) if only is None else [n for n in only if n in self.packs]
        self.refs.update_roots()
        protect: dict = {name: set() for name in names}

        async def reaches(vol, root, height):
            if vol.source is None:          # a counted root: its subtree is counted
                ids = {root} - {ZERO_ID}
            else:                           # being copied: nothing of it is counted
                ids = set()
                await maps.mark(root, height, self.loader(vol), ids, set())
            for p in (vol.pack, vol.source):
                if p is not None and p.name in protect:
                    protect[p.name] |= ids
        for vol in list(self.volumes.values()):
            if vol.pack.name in protect:
                protect[vol.pack.name].update(vol.overlay.values())
            if vol.source is not None or vol.deleted:
                await reaches(vol, vol.root, vol.height)
        for vol, root, height in list(self.pins):
            await reaches(vol, root, height)
        return Plan(protect)

    async def release(self, done=()) -> int:
        """In each commit, before its transaction: free what the changes
        since the last commit left without a reference (the nodes a merge
        replaced and the blocks only they held, a deleted volume's map),
        so that the counts written are the net change (refs.RefCounts.free,
        eager). Not in a pack a volume being copied or deleted-but-open
        touches (what it reaches would need a walk): the next collection
        frees those. `done`: the packs a collection freed just before
        (nothing more to find there). Returns the bytes freed. Caller holds
        the commit lock."""
        skip = set(done)
        for vol, _, _ in [(v, None, None) for v in self.volumes.values()] + list(self.pins):
            if vol.source is not None or vol.deleted:
                skip |= {p.name for p in (vol.pack, vol.source) if p is not None}
        protect: dict = {n: set() for n, p in self.packs.items()
                         if n not in skip and p.has_pending()}
        if not protect:
            return 0
        for vol in self.volumes.values():
            if vol.pack.name in protect:
                protect[vol.pack.name].update(vol.overlay.values())
        for vol, root, _ in self.pins:
            if vol.pack.name in protect:
                protect[vol.pack.name].add(root)
        freed = 0
        for name, keep in protect.items():
            pack = self.packs[name]
            dead = await self.refs.free(pack, keep, eager=True)
            if dead:
                n = pack.drop(dead)
                self.freed_bytes[name] = self.freed_bytes.get(name, 0) + n
                freed += n
        return freed

    async def execute(self, plan: Plan) -> int:
        """Free what nothing references in every pack of `plan` (the
        cascade through freed nodes, refs.RefCounts.free), then seal and
        compact each; the caller commits. Returns the bytes freed."""
        freed = 0
        for name, protect in plan.protect.items():
            pack = self.packs[name]
            dead = await self.refs.free(pack, protect)
            n = pack.drop(dead)
            self.freed_bytes[name] = self.freed_bytes.get(name, 0) + n
            freed += n
        for name in plan.protect:
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
