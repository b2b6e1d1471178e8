"""Volumes (LUNs and shadow copies) and the write-back block cache.

A volume's content is, from newest to oldest:
1. its entries in the block cache (dirty or clean copies of whole blocks,
   or partial ones: the bytes of sub-block writes over the stored block);
2. its overlay: block ids flushed to the store but not yet merged into the
   map (the committer merges them at the next commit);
3. its map (root, height): the last merged state.

A read goes one way: the volume resolves block numbers to ids (cache,
overlay, then its map through `maps` with the reader's node cache and
loader) and has the BlockReader (reader.py) read the stored ones from the
pack. A volume holds no array: it is built with the mount's BlockCache,
the reader and write admission (see Volume).

Only the trio thread touches any of this. Code between two awaits is a
critical section: after every await, state is re-checked (a block may have
been written, flushed or evicted meanwhile, or the volume's content replaced
wholesale, which bumps `generation`).

The cache is bounded: writers wait (back-pressure) while dirty bytes exceed
half the cache; clean blocks are evicted least recently used first. Every
entry counts a whole block, partial ones included.

Small writes are absorbed: a write of part of a block that is not in the
cache reads nothing and awaits nothing. It makes a partial entry (Entry:
a block-size buffer holding the written bytes, `valid` the byte ranges
written); later sub-block writes patch it, a write of the whole block
makes it whole. The stored block under it is read once, when something
needs the bytes not written (`Volume.complete`): a read of a range not
all written (read_cached answers a read inside the written ranges without
a coroutine, as for any hit), the write-back before it hashes the block
(WriteBack.flush, one batch of reads per volume and flush; so a snapshot,
a resync's source and every commit see merged blocks), or a shrink's last
block (zero_tail). Completion fills only what is still not written after
its await, so writes made meanwhile win over the stored bytes; an entry
dropped or a volume whose content was replaced meanwhile (`generation`)
is left alone. A partial entry is always dirty (never evicted) and owns
its buffer (never `shared`). Counters in BlockCache.stats
(ctl/status.json "cache").
"""
import collections
import errno
import math

import trio

from . import ZERO_ID, maps
from .errors import ArrayError
from .metrics import IoStats


def merge_range(ranges: list, lo: int, hi: int) -> list:
    """`ranges` (sorted, disjoint, non-adjacent (lo, hi) intervals) with
    [lo, hi) added: a new list, merged the same way."""
    out = []
    i, n = 0, len(ranges)
    while i < n and ranges[i][1] < lo:
        out.append(ranges[i])
        i += 1
    while i < n and ranges[i][0] <= hi:
        lo = min(lo, ranges[i][0])
        hi = max(hi, ranges[i][1])
        i += 1
    out.append((lo, hi))
    out.extend(ranges[i:])
    return out


def covers(ranges: list, lo: int, hi: int) -> bool:
    """[lo, hi) lies inside one interval of `ranges` (merged, so inside
    their union)."""
    for a, b in ranges:
        if a <= lo:
            if hi <= b:
                return True
        else:
            break
    return False


def gaps(ranges: list, size: int) -> list:
    """The intervals of [0, size) outside `ranges`."""
    out, pos = [], 0
    for a, b in ranges:
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < size:
        out.append((pos, size))
    return out


class Entry:
    """A cached block. `buf` None means all zeros (a punched block).
    `shared`: a flush holds `buf`, or `buf` is a read-only view of a write
    request's data; a write must copy it first (`own`). `seq`, while dirty:
    no write it holds that is not stored yet has a sequence number below it
    (see BlockCache.seq).

    `valid` None: the whole block is in `buf`. Otherwise the entry is
    partial (what a sub-block write that missed the cache makes, without
    reading the pack): `buf` is a private block-size bytearray holding the
    written bytes at `valid`, a sorted list of disjoint, non-adjacent
    (lo, hi) intervals, and zeros elsewhere; the rest of the block is the
    stored one. A partial entry is always dirty, never `shared`: it is
    completed (Volume.complete: the stored block read once, its bytes put
    in the gaps) before a read needs its gaps and before the write-back
    hashes it."""
    __slots__ = ("vol", "bno", "buf", "dirty", "gen", "shared", "seq", "valid",
                 "__weakref__")

    def __init__(self, vol, bno, buf, valid=None):
        self.vol = vol
        self.bno = bno
        self.buf = buf
        self.dirty = False
        self.gen = 0
        self.shared = False
        self.seq = 0
        self.valid = valid

    def own(self) -> bytearray:
        """The buffer, private and writable (zeros materialised)."""
        if self.buf is None:
            self.buf = bytearray(self.vol.block_size)
        elif self.shared:
            self.buf = bytearray(self.buf)
        self.shared = False
        return self.buf

    def patch(self, lo: int, data) -> None:
        """Write `data` at `lo` in the block (a sub-block write)."""
        hi = lo + len(data)
        self.own()[lo:hi] = data
        if self.valid is not None:
            valid = merge_range(self.valid, lo, hi)
            self.valid = None if valid[0] == (0, len(self.buf)) else valid

    def covers(self, lo: int, hi: int) -> bool:
        """The bytes [lo, hi) of the block are in the entry."""
        return self.valid is None or covers(self.valid, lo, hi)

    def fill(self, data) -> None:
        """Complete a partial entry with the stored block `data` (None:
        zeros): its bytes go where nothing was written."""
        buf = self.buf
        for lo, hi in gaps(self.valid, len(buf)):
            buf[lo:hi] = bytes(hi - lo) if data is None else data[lo:hi]
        self.valid = None


FLUSH_AT = 64 << 20       # dirty bytes that start a write-back (at most half the dirty limit)

_POOL: list = []              # free reply buffers of _POOL_SIZE bytes
_POOL_SIZE = 1 << 20          # the largest FUSE read
_POOL_DEPTH = 8               # at most 8 MiB kept


def _take_buffer(n: int) -> bytearray:
    """A reply buffer of at least `n` bytes for a large read. pyfuse3 sends
    the reply as soon as the handler returns, with no await in between, so a
    buffer given back just before `return` is free again by the time any
    other task runs."""
    if n <= _POOL_SIZE:
        return _POOL.pop() if _POOL else bytearray(_POOL_SIZE)
    return bytearray(n)


def _give_buffer(buf: bytearray) -> None:
    if len(buf) == _POOL_SIZE and len(_POOL) < _POOL_DEPTH:
        _POOL.append(buf)


class BlockCache:
    """The mount's write-back cache, shared by all volumes."""

    def __init__(self, limit: int):
        self.limit = max(limit, 1 << 20)
        self.dirty_limit = self.limit // 2            # writers wait above this
        # the committer starts writing back here, whatever the cache size,
        # so a burst is written back while it arrives rather than after it
        # (what fsync then waits for); down to flush_to
        self.flush_at = min(self.dirty_limit // 2, FLUSH_AT)
        self.flush_to = self.flush_at // 2
        self.clean: collections.OrderedDict = collections.OrderedDict()  # Entry -> None, LRU first
        self.dirty: dict = {}            # Entry -> None, oldest dirtied first
        self.bytes = 0
        self.dirty_bytes = 0
        self.wake_committer = trio.Event()   # set: the committer should flush
        self.room = trio.Event()             # set after each flush
        self.errors: dict[str, ArrayError] = {}   # pack name ("*": all) -> flush failure
        self.retry_at: dict[str, float] = {}
        self.stuck_bytes = 0                 # dirty bytes of packs with errors
        # writes acknowledged so far: the n-th write (or punch) to return
        # gets sequence number n; a dirty entry's `seq` is at most that of
        # the oldest write in it not yet stored (Array.sync's accounting)
        self.seq = 0
        # counters (ctl/status.json, "cache"): sub-block writes that missed
        # the cache, absorbed into a partial entry without reading the pack;
        # partial blocks completed (their stored block read once) by the
        # write-back and for a read; blocks read from a pack before a write
        # could be acknowledged (only a shrink's last block now)
        self.absorbed = 0
        self.completed_at_flush = 0
        self.completed_for_read = 0
        self.write_loads = 0

    def stats(self) -> dict:
        """The counters above, by name."""
        return {"absorbed_writes": self.absorbed,
                "completed_at_flush": self.completed_at_flush,
                "completed_for_read": self.completed_for_read,
                "write_loads": self.write_loads}

    def resume_after(self, seq: int) -> None:
        """Acknowledgements go on after `seq` (the intent log's replay gives
        each write its number again; numbers grow across mounts)."""
        self.seq = max(self.seq, seq)

    def acknowledge(self) -> int:
        """A write is about to return to its caller: its sequence number."""
        self.seq += 1
        return self.seq

    # entries move between `clean` (LRU) and `dirty`
    def insert_clean(self, e: Entry) -> None:
        e.vol.cache[e.bno] = e
        self.clean[e] = None
        self.bytes += e.vol.block_size
        if self.bytes > self.limit:
            self.evict()

    def touch(self, e: Entry) -> None:
        if not e.dirty:
            self.clean.move_to_end(e)

    def mark_dirty(self, e: Entry) -> None:
        e.gen += 1
        if not e.dirty:
            e.dirty = True
            e.seq = self.seq + 1      # the write dirtying it returns after this
            if e.vol.cache.get(e.bno) is not e:
                e.vol.cache[e.bno] = e
                self.bytes += e.vol.block_size
            else:
                self.clean.pop(e, None)
            self.dirty[e] = None
            self.dirty_bytes += e.vol.block_size
            if self.bytes > self.limit:
                self.evict()

    def mark_clean(self, e: Entry, gen: int) -> None:
        """After a flush of `e` as of generation `gen`."""
        if e.dirty and e.gen == gen and e.vol.cache.get(e.bno) is e:
            e.dirty = False
            del self.dirty[e]
            self.dirty_bytes -= e.vol.block_size
            self.clean[e] = None

    def drop(self, e: Entry) -> None:
        """Forget an entry (its content is superseded)."""
        if e.vol.cache.get(e.bno) is e:
            del e.vol.cache[e.bno]
            self.bytes -= e.vol.block_size
        if e.dirty:
            self.dirty.pop(e, None)
            self.dirty_bytes -= e.vol.block_size
            e.dirty = False
        else:
            self.clean.pop(e, None)

    def evict(self) -> None:
        while self.bytes > self.limit and self.clean:
            e, _ = self.clean.popitem(last=False)
            if e.vol.cache.get(e.bno) is e:
                del e.vol.cache[e.bno]
            self.bytes -= e.vol.block_size
        if self.dirty_bytes > self.flush_at:
            self.wake_committer.set()

    def error_for(self, pack: str | None):
        """The flush failure writers to `pack` get (None: any pack)."""
        if pack is None:
            return next(iter(self.errors.values()), None)
        return self.errors.get(pack) or self.errors.get("*")

    async def wait_for_room(self, pack: str) -> None:
        """Back-pressure: wait while dirty data is over the limit (blocks a
        full or failed pack can't take don't count against other packs)."""
        while self.dirty_bytes - self.stuck_bytes > self.dirty_limit:
            err = self.error_for(pack)
            if err is not None:
                raise err
            self.wake_committer.set()
            room = self.room
            await room.wait()
        if self.dirty_bytes > self.flush_at:
            self.wake_committer.set()

    def recount_stuck(self) -> None:
        self.stuck_bytes = sum(e.vol.block_size for e in self.dirty
                               if e.vol.pack.name in self.errors)

    def flushed(self) -> None:
        self.room.set()
        self.room = trio.Event()


class Volume:
    """A LUN or a shadow copy. Identity and flags are plain attributes; the
    array owns the catalogue row and commits it.

    Built with what it uses, never the array: `cache` the mount's
    BlockCache (`block_cache`; `cache` is this volume's own entries),
    `reader` the BlockReader its stored blocks and map nodes are read
    with, `admission` what decides whether a write near a full pack may go
    on (`await admission.admit(vol, off, end)`, `await
    admission.pack_writable(pack)`)."""

    def __init__(self, row: dict, pack, *, cache: BlockCache, reader, admission,
                 source=None, intent=None):
        self.block_cache = cache
        self.intent = intent      # the intent log (intentlog.IntentLog): each write recorded
        self.reader = reader
        self.admission = admission
        self.pack = pack
        self.source = source      # Pack still holding blocks this map needs
        self.vid = row["vid"]
        self.name = row["name"]
        self.kind = row["kind"]
        self.set_name = row["set_name"]
        self.size = row["size"]
        self.block_size = row["block_size"]
        self.root = bytes(row["root"])
        self.height = row["height"]
        self.allocated = row["allocated"]
        self.wwn = row["wwn"]
        self.serial = row["serial"]
        self.readonly = bool(row["readonly"])
        self.hidden = bool(row["hidden"])
        self.origin = row["origin"]
        self.context = row["context"]
        self.consistency = row.get("consistency")   # shadow copy: application | crash
        self.created = row["created"]
        self.cache: dict[int, Entry] = {}
        self.overlay: dict[int, bytes] = {}
        self.loading: dict[int, trio.Event] = {}
        self.open_count = 0
        self.holders: collections.Counter = collections.Counter()   # (pid, uid) -> handles
        self.generation = 0
        self.last_write = 0       # sequence number of the last write acknowledged
        self.durable_seq = 0      # every write up to this one is stored and committed
        self.deleted = False
        self.frozen: trio.Event | None = None   # set while a snapshot is taken
        # its I/O counters (metrics.py): the fs layer counts requests, the
        # read path below cache hits and misses, the write-back dedup hits
        self.stats = IoStats()
        self._set_zeros()

    def _set_zeros(self) -> None:
        self._zeros = bytes(self.block_size)
        self._zview = memoryview(self._zeros)

    def set_block_size(self, block_size: int) -> None:
        """A resync gives the LUN the source's block size (call
        discard_cache first): the zero block served for unmapped blocks
        follows it."""
        self.block_size = block_size
        self._set_zeros()

    def opened(self, pid: int, uid: int) -> None:
        """A handle was opened on it by process `pid` of user `uid`."""
        self.open_count += 1
        self.holders[(pid, uid)] += 1

    def closed(self, pid: int, uid: int) -> None:
        self.open_count -= 1
        self.holders[(pid, uid)] -= 1
        if self.holders[(pid, uid)] <= 0:
            del self.holders[(pid, uid)]

    def open_by(self) -> str:
        """Its open handles and who opened them, for an EBUSY message:
        `2 handle(s), opened by pid 812 (uid 1000)` (a loop device's is the
        losetup that attached it)."""
        who = [f"pid {pid} (uid {uid})" for pid, uid in sorted(self.holders)[:4]]
        if len(self.holders) > 4:
            who.append(f"{len(self.holders) - 4} more")
        return f"{self.open_count} handle(s)" + (", opened by " + ", ".join(who)
                                                  if who else "")

    def row(self) -> dict:
        return {"vid": self.vid, "name": self.name, "kind": self.kind,
                "set_name": self.set_name, "pack": self.pack.name, "size": self.size,
                "block_size": self.block_size, "root": self.root, "height": self.height,
                "allocated": self.allocated, "wwn": self.wwn, "serial": self.serial,
                "readonly": int(self.readonly), "hidden": int(self.hidden),
                "origin": self.origin, "context": self.context, "created": self.created,
                "source": self.source.name if self.source else None,
                "consistency": self.consistency}

    @property
    def path(self) -> str:
        return f"{self.set_name}/{self.name}" if self.kind == "shadow" else self.name

    @property
    def nblocks(self) -> int:
        return math.ceil(self.size / self.block_size)

    def allocated_bytes(self) -> int:
        """Logical bytes mapped non-zero (approximate while blocks are dirty:
        counted at flush)."""
        return min(self.allocated * self.block_size, self.size)

    # ---- id resolution ---------------------------------------------------
    def current_id_nowait(self, bno: int):
        """The block's id if not in the cache, or None if unknown without
        loading a map node."""
        bid = self.overlay.get(bno)
        if bid is not None:
            return bid
        return maps.lookup_nowait(self.reader.nodes, self.root, self.height, bno)

    def current_ids_nowait(self, first: int, last: int) -> list:
        """current_id_nowait for the blocks [first, last]."""
        ids = maps.ids_nowait(self.reader.nodes, self.root, self.height, first, last)
        if self.overlay:
            get = self.overlay.get
            for i in range(len(ids)):
                bid = get(first + i)
                if bid is not None:
                    ids[i] = bid
        return ids

    async def current_id(self, bno: int) -> bytes:
        while True:
            bid = self.current_id_nowait(bno)
            if bid is not None:
                return bid
            root, gen = self.root, self.generation
            bid = await maps.lookup(root, self.height, bno, self.reader.loader(self))
            if root == self.root and gen == self.generation and bno not in self.overlay:
                return bid

    # ---- reads -------------------------------------------------------------
    def read_cached(self, off: int, size: int):
        """A read within one block that the cache holds, without a
        coroutine (the path of every small random read hit), or None. The
        result may share memory with the cache entry: like read(), it is
        for the FUSE reply, which is sent before any other task runs."""
        bs = self.block_size
        bno = off // bs
        if (off + size - 1) // bs != bno or off + size > self.size or size <= 0:
            return None
        e = self.cache.get(bno)
        if e is None:
            return None
        lo = off - bno * bs
        if e.valid is not None and not covers(e.valid, lo, lo + size):
            return None         # partly not written: read_parts completes it
        self.block_cache.touch(e)
        self.stats.cache_hits += 1
        return self._zeros[:size] if e.buf is None else e.buf[lo:lo + size]

    async def read(self, off: int, size: int) -> bytes:
        """Bytes at [off, off+size), clipped at the end."""
        parts = await self.read_parts(off, size)
        return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)

    async def read_parts(self, off: int, size: int) -> list:
        """The bytes at [off, off+size), clipped at the end, as a list of
        buffers in order, for the FUSE reply to gather (fs.py). Whole blocks
        that miss the cache are views of the store's mapped segment files
        (RAID-5: of its pieces on the data disks), verified where they lie
        (no copy at all before the reply's); the
        rest are copies (cache hits, zeros) or blocks read into a pooled
        buffer. Use them before the next await: the pooled buffer is
        reused by the next read. Large reads do not fill the cache: they are
        streaming reads, and the pack's page cache serves them again as
        cheaply. Partial end blocks go through the cache, so small reads
        around them stay fast."""
        if off >= self.size or size <= 0:
            return [b""]
        end = min(off + size, self.size)
        bs = self.block_size
        first, last = off // bs, (end - 1) // bs
        if first == last:
            e = self.cache.get(first)
            if e is not None and e.valid is not None and \
                    covers(e.valid, off - first * bs, end - first * bs):
                self.block_cache.touch(e)
                self.stats.cache_hits += 1
                return [bytes(e.buf[off - first * bs:end - first * bs])]
            blocks = await self._blocks((first,))
            return [bytes(blocks[0][off - first * bs:end - first * bs])]
        cache = self.block_cache
        parts: list = []
        direct = []                     # (index in parts, id) of whole blocks to read
        ids = self.current_ids_nowait(first, last)   # valid until the first await
        awaited = False
        for bno in range(first, last + 1):
            base = bno * bs
            lo, hi = max(off, base), min(end, base + bs)
            e = self.cache.get(bno)
            if (e is None and hi - lo < bs) or \
                    (e is not None and not e.covers(lo - base, hi - base)):
                data = (await self._blocks((bno,)))[0]
                awaited = True
                parts.append(bytes(memoryview(data)[lo - base:hi - base]))
                continue
            if e is not None:
                cache.touch(e)      # a copy: the entry may change at the next await
                self.stats.cache_hits += 1
                parts.append(self._zview[:hi - lo] if e.buf is None
                             else bytes(memoryview(e.buf)[lo - base:hi - base]))
                continue
            bid = ids[bno - first] if not awaited else self.current_id_nowait(bno)
            if bid is None:
                bid = await self.current_id(bno)
                awaited = True
            if bid == ZERO_ID:
                parts.append(self._zview[:hi - lo])
            else:
                direct.append((len(parts), bid))
                parts.append(None)
        self.stats.cache_misses += len(direct)
        taken = []
        while direct:
            # A mapped block is checked where it lies, so no await may come
            # between its check and the reply: while other tasks run, GC
            # may recycle its segment file for new data. After reading the
            # rest (an await), the mapped ones are checked again.
            views = self.reader.mapped_blocks(self, [bid for _, bid in direct])
            rest = [(i, bid) for (i, bid), v in zip(direct, views) if v is None]
            if not rest:
                for (i, _), v in zip(direct, views):
                    parts[i] = v
                break
            direct = [(i, bid) for (i, bid), v in zip(direct, views) if v is not None]
            out = _take_buffer(len(rest) * bs)
            taken.append(out)
            mv = memoryview(out)
            items = []
            for k, (i, bid) in enumerate(rest):
                parts[i] = mv[k * bs:(k + 1) * bs]
                items.append((parts[i], bid))
            del views
            await self.reader.read_into(self, items)
        for out in taken:
            _give_buffer(out)      # reused only after pyfuse3 has sent this reply
        if any(type(x) is tuple for x in parts):    # a RAID-5 block in pieces
            parts = [p for x in parts for p in (x if type(x) is tuple else (x,))]
        return parts

    async def _blocks(self, bnos) -> list:
        cache = self.block_cache
        out: list = [None] * len(bnos)
        misses = []
        stats = self.stats
        for i, bno in enumerate(bnos):
            e = self.cache.get(bno)
            completed = False
            while e is not None and e.valid is not None:    # partial: complete it
                await self.complete([e])
                e = self.cache.get(bno)
                completed = True
            if e is not None:
                cache.touch(e)
                if completed:       # its stored part was read from the pack
                    stats.cache_misses += 1
                else:
                    stats.cache_hits += 1
                out[i] = self._zeros if e.buf is None else e.buf
                continue
            bid = self.current_id_nowait(bno)
            if bid is None:
                bid = await self.current_id(bno)
            if bid == ZERO_ID:
                out[i] = self._zeros
            else:
                misses.append((i, bno, bid))
        if misses:
            stats.cache_misses += len(misses)
            gen = self.generation
            datas = await self.reader.read_blocks(self, [m[2] for m in misses])
            for (i, bno, bid), data in zip(misses, datas):
                out[i] = data
                if (gen == self.generation and bno not in self.cache
                        and bno not in self.loading and self.current_id_nowait(bno) == bid):
                    if type(data) is not bytearray:
                        data = bytearray(data)
                    cache.insert_clean(Entry(self, bno, data))
        return out

    # ---- writes ------------------------------------------------------------
    def _check_writable(self, off: int) -> None:
        if self.readonly:
            raise ArrayError(errno.EROFS, f"{self.kind} {self.path} is read-only")
        if self.deleted:
            raise ArrayError(errno.ENXIO, f"{self.kind} {self.path} was deleted")
        if off >= self.size:
            raise ArrayError(errno.ENOSPC, f"write at {off} is past the end of "
                             f"{self.path} ({self.size} bytes)")

    async def _gate(self) -> None:
        """Writes that start while a snapshot is being taken wait for it:
        none of them is in the set."""
        while self.frozen is not None:
            await self.frozen.wait()

    async def write(self, off: int, buf, *, replay: bool = False) -> int:
        """A write acknowledged when this returns (in the cache, recorded
        for the intent log). `replay`: a record of the intent log put back
        at open (Array.open): no checks, not recorded again, no
        back-pressure (the caller commits as it goes)."""
        cache = self.block_cache
        end = min(off + len(buf), self.size)
        if not replay:
            if self.frozen is not None:
                await self._gate()
            self._check_writable(off)
            if cache.errors and cache.error_for(self.pack.name) is not None:
                # refused until its unstored blocks are stored: space may be
                # back since (a delete, a punch hole, the host's file system)
                await self.admission.pack_writable(self.pack)
            pack = self.pack
            if pack.free_bytes() - pack.reserve - pack.slack - cache.dirty_bytes \
                    < end - off + 2 * self.block_size:
                await self.admission.admit(self, off, end)     # near full: look closer
                if self.frozen is not None:
                    await self._gate()
        bs = self.block_size
        mv = memoryview(buf)
        immutable = type(buf) is bytes      # pyfuse3's request data
        pos = off
        while pos < end:
            bno, boff = divmod(pos, bs)
            n = min(bs - boff, end - pos)
            piece = mv[pos - off:pos - off + n]
            e = self.cache.get(bno)
            if n == bs:
                if immutable:       # keep a view of the request: no copy
                    if e is None:
                        e = Entry(self, bno, piece)
                    else:
                        e.buf = piece
                    e.shared = True     # read-only: a partial write copies first
                elif e is None:
                    e = Entry(self, bno, bytearray(piece))
                elif e.buf is None or e.shared:
                    e.buf, e.shared = bytearray(piece), False
                else:
                    e.buf[:] = piece
                e.valid = None
            else:
                if e is None:       # absorbed: the stored block is read at write-back
                    e = Entry(self, bno, bytearray(bs), [])
                    cache.absorbed += 1
                e.patch(boff, piece)
            cache.mark_dirty(e)
            pos += n
        self.last_write = cache.acknowledge()
        if replay:
            return end - off
        if self.intent is not None:
            self.intent.record(self.vid, self.last_write, off,
                               mv[:end - off] if immutable else bytes(mv[:end - off]))
        if cache.dirty_bytes > cache.flush_at:
            await cache.wait_for_room(self.pack.name)
        return end - off

    async def complete(self, entries, at_flush: bool = False) -> None:
        """Make the partial entries among `entries` (of this volume) whole:
        their stored blocks fill what was not written. Blocks the pack's
        mapped segments hold in the page cache are verified and copied
        from there at once (no await, no copy but the fill); the rest are
        read in one batch (BlockReader.read_into: the page cache without
        waiting where it can, else a worker thread). After an await everything is checked again:
        an entry dropped or replaced meanwhile (a resync, a discard) is
        left alone, bytes written meanwhile are kept (only the gaps left
        are filled), and one whose stored id changed is read again. Raises
        the reader's error (EIO) if a stored block cannot be read: the
        entries stay partial."""
        cache = self.block_cache
        while True:
            todo = [e for e in entries
                    if e.valid is not None and self.cache.get(e.bno) is e]
            if not todo:
                return
            gen = self.generation
            bids = []
            for e in todo:
                bid = self.current_id_nowait(e.bno)
                if bid is None:
                    bid = await self.current_id(e.bno)
                bids.append(bid)

            def fill(e, bid, data) -> None:
                if gen != self.generation or e.valid is None \
                        or self.cache.get(e.bno) is not e:
                    return          # content replaced, completed or dropped meanwhile
                now = self.current_id_nowait(e.bno)
                if now is not None and now != bid:
                    return          # (cannot happen while it is partial) read again
                e.fill(data)
                if at_flush:
                    cache.completed_at_flush += 1
                else:
                    cache.completed_for_read += 1
            stored = []
            for e, bid in zip(todo, bids):
                if bid == ZERO_ID:
                    fill(e, bid, None)
                else:
                    stored.append((e, bid))
            if not stored:
                continue
            # views valid until the next await: used at once (on the
            # loop: faster than a worker thread's copy, even for the
            # write-back's batch, measured)
            views = self.reader.mapped_blocks(self, [bid for _, bid in stored])
            rest = []
            for (e, bid), view in zip(stored, views):
                if view is None:
                    rest.append((e, bid))
                else:
                    fill(e, bid, view if type(view) is not tuple else b"".join(view))
            del views
            if rest:
                scratch = bytearray(len(rest) * self.block_size)
                mv = memoryview(scratch)
                bs = self.block_size
                parts = [mv[k * bs:(k + 1) * bs] for k in range(len(rest))]
                await self.reader.read_into(self, list(zip(parts, [b for _, b in rest])))
                for (e, bid), part in zip(rest, parts):
                    fill(e, bid, part)

    async def _entry_for_update(self, bno: int) -> Entry:
        """The cache entry of `bno`, loading the block first if needed (a
        partial entry is completed)."""
        while True:
            e = self.cache.get(bno)
            if e is not None:
                if e.valid is not None:
                    await self.complete([e])
                    continue
                return e
            ev = self.loading.get(bno)
            if ev is not None:
                await ev.wait()
                continue
            ev = self.loading[bno] = trio.Event()
            gen = self.generation
            try:
                bid = await self.current_id(bno)
                data = None
                if bid != ZERO_ID:
                    data = (await self.reader.read_blocks(self, [bid]))[0]
                    self.block_cache.write_loads += 1
            finally:
                del self.loading[bno]
                ev.set()
            if gen != self.generation or bno in self.cache \
                    or self.current_id_nowait(bno) != bid:
                continue      # written (and maybe flushed and evicted) meanwhile
            e = Entry(self, bno, None if data is None else bytearray(data))
            self.block_cache.insert_clean(e)
            return e

    async def zero_tail(self, size: int) -> None:
        """A shrink to `size` bytes: the bytes from `size` to the end of
        its block become zeros (a later grow reads zeros there)."""
        bs = self.block_size
        if not size % bs:
            return
        e = await self._entry_for_update(size // bs)
        if e.buf is not None:
            e.own()[size % bs:] = bytes(bs - size % bs)
            self.block_cache.mark_dirty(e)

    async def zero(self, off: int, length: int, *, replay: bool = False) -> None:
        """Punch a hole / zero a range: whole blocks become ZERO (freed at
        the next commit), partial ones are written with zeros. `replay`:
        as for write()."""
        if not replay:
            if self.frozen is not None:
                await self._gate()
            self._check_writable(off)
        end = min(off + length, self.size)
        bs = self.block_size
        cache = self.block_cache
        pos = off
        while pos < end:
            bno, boff = divmod(pos, bs)
            n = min(bs - boff, end - pos)
            if n == bs:
                e = self.cache.get(bno)
                if e is None:
                    e = Entry(self, bno, None)
                else:
                    e.buf, e.shared, e.valid = None, False, None
                cache.mark_dirty(e)
            else:       # like a write (never refused: no space needed)
                e = self.cache.get(bno)
                if e is None:
                    e = Entry(self, bno, bytearray(bs), [])
                    cache.absorbed += 1
                e.patch(boff, bytes(n))
                cache.mark_dirty(e)
            pos += n
        self.last_write = cache.acknowledge()
        if self.intent is not None and not replay:
            self.intent.record_zero(self.vid, self.last_write, off, end - off)
        cache.wake_committer.set()

    def discard_cache(self, from_bno: int = 0) -> None:
        """Forget cached blocks and overlay entries at or after `from_bno`
        (their content is replaced); in-flight loads are invalidated."""
        self.generation += 1
        for bno, e in list(self.cache.items()):
            if bno >= from_bno:
                self.block_cache.drop(e)
        for bno in [b for b in self.overlay if b >= from_bno]:
            del self.overlay[bno]
