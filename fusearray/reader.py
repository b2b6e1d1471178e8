"""The block reader: stored blocks and map nodes, by id, out of the packs.

A volume resolves a block number to an id itself (its cache, its overlay,
then its map through `maps` with the reader's node cache and `loader`);
everything stored is read here, and only here the packs are read for a
volume. The read path runs in one direction:

    Volume.read_parts -> BlockReader.mapped_blocks / read_into / read_blocks
                      -> Pack (mapped views, page-cache preads, or a worker
                         thread's verified reads)

The reader holds no volume and no array: it is given the volume whose
block it reads (it looks at `vol.pack`, `vol.source` and `vol.path` only),
the node cache (`NodeCache`, shared with the committer, which adds the
nodes it writes) and two sinks: `event(level, message)` and `drain_notes()`
(messages packs left from worker threads, turned into events).

Concurrency: every method runs on the trio thread. The waits are
`trio.to_thread.run_sync` of a pack's blocking reads (a read larger than
`NOWAIT_MAX`, a page-cache miss, a map node or an export's batch); while a
worker thread reads segment files, the segments it reads are held by the
pack's reading guard (`Pack.reading`, entered and left on the trio
thread), so GC dropping one of them (Pack.drop_dead_segment) unlinks it
but leaves its file descriptor open, and the guard closes it when the last
read is over (a RADOS object, with no fd to hold, is removed only after
that).
Views returned by `mapped_blocks` are checked where they lie and valid only
until the caller's next await (GC may recycle a segment file meanwhile).
Nothing here writes: a crash leaves nothing of the reader behind.

Errors: a block the index does not hold is "data lost" (an error event,
EIO); a block that fails its hash or an I/O error is an error event and EIO.
"""
import collections

import trio

from . import maps
from .errors import ArrayError, ChecksumError, ioerror
from .store import UNCACHED

#: reads of the committed index one `lookups` makes before it looks the
#: rest up on the trio thread (see lookups)
LOOKUP_TRIES = 4

#: Reads up to this size try the page cache on the loop before a thread.
NOWAIT_MAX = 1 << 20


class NodeCache(collections.OrderedDict):
    """Map nodes by id (immutable), bounded, oldest inserted evicted."""

    def __init__(self, limit_bytes: int):
        super().__init__()
        self.limit = max(limit_bytes // maps.NODE_SIZE, 64)

    def add(self, nid: bytes, data: bytes) -> None:
        self[nid] = data
        if len(self) > self.limit:
            self.popitem(last=False)

    def status(self) -> dict:
        """ctl/status: the limit and what is held (nodes of NODE_SIZE
        bytes, their Python objects' overhead not counted)."""
        return {"limit_bytes": self.limit * maps.NODE_SIZE, "nodes": len(self),
                "bytes": len(self) * maps.NODE_SIZE}


def _read_many(pack, bids, locs) -> list:
    """Worker thread: read and verify each block (blocks near each other in
    a segment of a RADOS pack as one read: Reads.read_many_blocking)."""
    return pack.read_many_blocking(bids, locs)


class BlockReader:
    """Reads blocks and map nodes of volumes from their packs (see the
    module docstring)."""

    def __init__(self, nodes: NodeCache, event, drain_notes):
        self.nodes = nodes
        self.event = event                 # event(level, message)
        self.drain_notes = drain_notes     # pack notes -> events

    # ---- map nodes ---------------------------------------------------------
    async def load_node(self, vol, nid: bytes) -> bytes:
        node = self.nodes.get(nid)
        if node is not None:
            return node
        if vol.source is None:
            pack, loc = vol.pack, (await self.lookups(vol.pack, [nid]))[0]
        else:
            pack, loc = self.locate(vol, nid)
        if loc is None:
            raise self.lost(vol.pack, f"map node {nid.hex()} of {vol.path} is not in "
                            f"pack {vol.pack.name}")
        node = bytes((await self.read_locs(pack, [nid], [loc]))[0])
        self.nodes.add(nid, node)
        return node

    def loader(self, vol):
        """`load(nid)` for the maps module: the nodes of `vol`'s map."""
        async def load(nid):
            return await self.load_node(vol, nid)
        return load

    # ---- blocks ------------------------------------------------------------
    @staticmethod
    async def lookups(pack, bids: list, dedup: bool = False) -> list:
        """pack.lookup of each of `bids`, without reading the committed
        index on the trio thread: the ids its cache does not know are
        read in a worker thread first (Pack.read_rows_blocking, one
        statement per 500) and learnt on return. The answers hold until
        the caller's next await. `dedup`: the ids are of new data (see
        Pack.lookup). A commit that ended during the read (answers from
        before it may be stale: Pack.learn refuses its rows too) means
        another read, a few times, before the rest is looked up here (on
        the trio thread). An answer the cache gave before the read and
        has evicted since (a batch bigger than the cache) still holds
        if no commit ended meanwhile: a change since would be in the
        overlays, which lookup_cached consults first."""
        for _ in range(LOOKUP_TRIES):
            gen = pack.index_generation()
            before = {}
            missing = []
            for b in bids:
                loc = pack.lookup_cached(b, dedup)
                if loc is UNCACHED:
                    missing.append(b)
                else:
                    before[b] = loc
            if not missing:
                return [before[b] for b in bids]
            try:
                read_gen, found = await trio.to_thread.run_sync(pack.read_rows_blocking,
                                                                missing, dedup)
            except OSError as e:        # (catalogue.CatalogueError: the array said so)
                raise ioerror(f"pack {pack.name}: {e.strerror or e}") from None
            if read_gen != gen or pack.index_generation() != gen:
                continue
            known = pack.learn(gen, missing, found)
            out = []
            for b in bids:
                loc = known.get(b, UNCACHED)
                if loc is UNCACHED:
                    loc = pack.lookup_cached(b, dedup)
                if loc is UNCACHED:
                    loc = before[b] if b in before else pack.lookup(b, dedup)
                out.append(loc)
            return out
        return [pack.lookup(b, dedup) for b in bids]

    @staticmethod
    def locate(vol, bid: bytes):
        """(pack, location) of a block of `vol`: its own pack, or while a
        copy is in progress, the source pack."""
        loc = vol.pack.lookup(bid)
        if loc is not None or vol.source is None:
            return vol.pack, loc
        return vol.source, vol.source.lookup(bid)

    async def read_blocks(self, vol, bids: list) -> list:
        """The blocks `bids` of `vol` (verified copies)."""
        if vol.source is None:
            pack = vol.pack
            locs = []
            for b, loc in zip(bids, await self.lookups(pack, bids)):
                if loc is None:
                    raise self.lost(pack, f"block {b.hex()} of {vol.path} is not in "
                                    f"pack {pack.name}")
                locs.append(loc)
            return await self.read_locs(pack, bids, locs)
        out = []
        for b in bids:
            pack, loc = self.locate(vol, b)
            if loc is None:
                raise self.lost(vol.pack, f"block {b.hex()} of {vol.path} is in neither "
                                f"pack {vol.pack.name} nor {vol.source.name}")
            out.extend(await self.read_locs(pack, [b], [loc]))
        return out

    def mapped_blocks(self, vol, bids: list) -> list:
        """Views of the blocks `bids` of `vol` where they lie in the pack's
        mapped segment files, verified there, or None for each the pack
        cannot serve so (see Pack.mapped_blocks); no I/O wait, no copy.
        Valid until the caller's next await."""
        if vol.source is not None:
            return [None] * len(bids)
        pack = vol.pack
        # an id the index cache does not know: None here, read_into looks it up
        locs = [pack.lookup_cached(b) for b in bids]
        return pack.mapped_blocks(bids, [None if loc is UNCACHED else loc for loc in locs])

    async def read_into(self, vol, items, in_thread: bool = False) -> None:
        """Fill each (dst, id) of `items`, dst a memoryview of the block's
        length: from the page cache straight into dst where the pack allows
        (verified there), the rest through read_blocks in one batch.
        `in_thread`: the page-cache reads run in a worker thread (a big
        batch, e.g. an export's, while the trio thread goes on)."""
        rest = items
        if vol.source is None:
            pack = vol.pack
            locs = await self.lookups(pack, [bid for _, bid in items])
            todo = [(bid, loc, dst) for (dst, bid), loc in zip(items, locs)]
            if in_thread:
                with pack.reading([loc[0] for _, loc, _ in todo if loc is not None]):
                    missed = await trio.to_thread.run_sync(pack.read_many_into_nowait, todo)
            else:
                missed = pack.read_many_into_nowait(todo)
            rest = [(dst, bid) for bid, _, dst in missed]
        if rest:
            datas = await self.read_blocks(vol, [bid for _, bid in rest])
            for (dst, _), data in zip(rest, datas):
                dst[:] = data

    async def read_locs(self, pack, bids, locs) -> list:
        """The blocks `bids` at `locs` (pack.lookup's answers, looked up
        with no await since) of `pack`, verified: from the page cache on
        the loop when small and there, else in a worker thread under the
        reading guard. A hash mismatch or an I/O error is an error event
        and EIO."""
        if sum(loc[2] for loc in locs) <= NOWAIT_MAX:
            out = []
            for b, loc in zip(bids, locs):
                data = pack.read_nowait(b, loc)
                if data is None:
                    break
                out.append(data)
            else:
                return out
        try:
            with pack.reading([loc[0] for loc in locs]):
                return await trio.to_thread.run_sync(_read_many, pack, bids, locs)
        except ChecksumError as e:
            self.drain_notes()
            msg = f"read error in pack {pack.name}: {e}; the read failed with EIO"
            self.event("error", msg)
            raise ioerror(msg) from None
        except OSError as e:
            msg = f"I/O error reading pack {pack.name}: {e}"
            self.event("error", msg)
            raise ioerror(msg) from None
        finally:
            if pack.notes:
                self.drain_notes()

    def lost(self, pack, what: str) -> ArrayError:
        """The error (and its event) for a block the index does not hold."""
        msg = (f"{what}: data lost; run `fusearray -m MNT scrub {pack.name}` "
               "and restore the LUN from a shadow copy")
        self.event("error", msg)
        return ioerror(msg)
