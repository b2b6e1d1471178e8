"""The block index: block id -> (segment, offset, length), with each
segment's live record bytes, logical size and entry count.

What is committed lives on disk, not in RAM: `rows`, a committed view
(the catalogue's `PackRows`: SQLite's blocks and segments tables, read
through their own connection; `MemRows` for a pack with no catalogue, as
in unit tests) answers point lookups, a segment's entries and a streaming
scan. In RAM are only
- the changes not committed yet: `pending_add` / `pending_del`, the
  reference counts' changes (`pending_refs`, `pending_counted`: refs.py
  decides them, `ref` / `mark_counted` record them), and while a commit's
  transaction runs, the ones it writes (`committing`);
- a bounded LRU cache of looked-up locations (and of misses), whose size
  is set by the mount's `--index-cache` (`IndexCache`);
- a Bloom filter of the stored ids (idfilter.py, a share of
  `--index-cache`), built in a worker thread after open: once built, a
  lookup of an id never stored (the dedup check of new data) is answered
  without reading the committed view;
- the per-segment accounting (`seg_live`, `seg_size`, `seg_count`): one
  entry per segment file (tens of MiB each), read from the segments table
  at open: so opening costs the number of segments, not of blocks.
A lookup looks in that order: pending, committing, filter, cache,
committed rows.

Threads: every change (add, drop, take_pending, committed, forget_segment)
on the trio thread by holders of the array's commit lock; lookups from any
thread (the cache has its own lock; the overlays are read by single dict
operations; `rows` serialises its connection); scans (`refs_blocking`,
`unreferenced_blocking`, `scan_blocking`, `problems_blocking`, `entries_in`) in worker threads under the commit
lock (so the overlays do not change meanwhile), each on a connection of
its own.

The index is persisted by the catalogue in the same SQLite transaction as
the map roots, after the segments' sync_blocking(): the rows of
`take_pending()` (adds, deletions, changed segments, count changes, nodes
counted), after which the writer calls `committed()`. A row dropped and
added again before the commit is deleted and inserted (it starts with no
references); a row that moves (compaction) keeps its counts.
"""
import collections
import threading

from .idfilter import IdFilter
from .media import seg_name
from .records import HDR

#: What one cached location costs in RAM, rounded up: tracemalloc on
#: CPython 3.11 counted 105 bytes for the entry and its location tuple and
#: 57 for the 16-byte id, with 200,000 entries in the cache.
CACHE_ENTRY_BYTES = 200
#: Share of --index-cache given to the committed view's page cache (SQLite
#: pages: the B-tree's inner pages make a miss one leaf read).
PAGE_CACHE_SHARE = 4
#: Share of --index-cache given to the packs' dedup filters (idfilter.py).
FILTER_SHARE = 8
DEFAULT_INDEX_CACHE = 64 << 20

_GONE = object()          # an overlay's answer: deleted
_UNKNOWN = object()       # the overlays (or the cache) say nothing of this id
#: lookup_cached's answer when only the committed view knows (a read of it)
UNCACHED = _UNKNOWN


class IndexCache:
    """Block id -> location or None (not stored), least recently used
    evicted beyond `limit` entries. Any thread."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.limit = max(1024, limit_bytes // CACHE_ENTRY_BYTES)
        self.map: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def resize(self, limit_bytes: int) -> None:
        with self.lock:
            self.limit_bytes = limit_bytes
            self.limit = max(1024, limit_bytes // CACHE_ENTRY_BYTES)
            while len(self.map) > self.limit:
                self.map.popitem(last=False)

    def get(self, bid: bytes):
        with self.lock:
            loc = self.map.get(bid, _UNKNOWN)
            if loc is _UNKNOWN:
                self.misses += 1
            else:
                self.hits += 1
                self.map.move_to_end(bid)
            return loc

    def put(self, bid: bytes, loc) -> None:
        with self.lock:
            self.map[bid] = loc
            self.map.move_to_end(bid)
            while len(self.map) > self.limit:
                self.map.popitem(last=False)

    def put_if_absent(self, bid: bytes, loc):
        """Cache `loc` unless an entry is there already; returns the entry."""
        with self.lock:
            old = self.map.get(bid, _UNKNOWN)
            if old is not _UNKNOWN:
                return old
            self.map[bid] = loc
            while len(self.map) > self.limit:
                self.map.popitem(last=False)
            return loc

    def put_if_cached(self, bid: bytes, loc) -> None:
        """Correct an entry the cache holds (an add or a move)."""
        with self.lock:
            if bid in self.map:
                self.map[bid] = loc

    def status(self) -> dict:
        return {"limit_bytes": self.limit_bytes, "entries": len(self.map),
                "bytes": len(self.map) * CACHE_ENTRY_BYTES,
                "hits": self.hits, "misses": self.misses}


class MemRows:
    """A committed view held in RAM (a pack with no catalogue: unit tests,
    tools): the same interface as the catalogue's PackRows."""

    def __init__(self, rows=()):
        self.rows: dict = {bytes(b): (s, o, n) for b, s, o, n in rows}
        self.counts: dict = {}      # id -> [refs, counted] (absent: [0, 0])

    def get(self, bid: bytes):
        return self.rows.get(bid)

    def get_many(self, ids) -> dict:
        return {b: self.rows[b] for b in ids if b in self.rows}

    def segments(self) -> dict:
        """{seg: (live, size, count)}, as the catalogue's segments table."""
        return {s: (total + n * HDR.size, end, n)
                for s, (total, n, end) in self.segment_sums().items()}

    def entries_in(self, seq: int) -> list:
        return [(b, loc) for b, loc in self.rows.items() if loc[0] == seq]

    def segment_sums(self) -> dict:
        sums: dict = {}
        for s, o, n in self.rows.values():
            total, count, end = sums.get(s, (0, 0, 0))
            sums[s] = (total + n, count + 1, max(end, o + n))
        return sums

    def scan(self):
        yield list(self.rows.items())

    def ids(self):
        yield list(self.rows)

    def refs(self, ids) -> dict:
        return {b: tuple(self.counts.get(b, (0, 0))) for b in ids if b in self.rows}

    def unreferenced(self) -> list:
        return [(b, loc) for b, loc in self.rows.items()
                if not self.counts.get(b, (0, 0))[0]]

    def apply(self, adds: dict, dels: set, refs: dict | None = None,
              counted=()) -> None:
        for b in dels:
            self.rows.pop(b, None)
            self.counts.pop(b, None)
        self.rows.update(adds)
        for b, d in (refs or {}).items():
            if b in self.rows:
                self.counts.setdefault(b, [0, 0])[0] += d
        for b in counted:
            if b in self.rows:
                self.counts.setdefault(b, [0, 0])[1] = 1

    def close(self) -> None:
        pass


class BlockIndex:
    """A pack's block index and its per-segment accounting (see the
    module docstring)."""

    def __init__(self, cache_bytes: int = DEFAULT_INDEX_CACHE, filter_bytes: int = 0):
        self.rows = MemRows()
        self.cache = IndexCache(cache_bytes)
        self.filter_bytes = filter_bytes
        self.filter: IdFilter | None = None     # made at open (if filter_bytes)
        self.filter_stop = threading.Event()    # (close: a build in progress ends)
        self.seg_live: dict[int, int] = {}                   # seg -> live record bytes
        self.seg_size: dict[int, int] = {}                   # seg -> logical bytes
        self.seg_count: dict[int, int] = {}                  # seg -> index entries
        self.pending_add: dict[bytes, tuple[int, int, int]] = {}
        # dropped since the last commit (also those added again after: their
        # committed row, and its references, go first)
        self.pending_del: set[bytes] = set()
        # reference counts (refs.py): changes, nodes now counted
        self.pending_refs: dict[bytes, int] = {}
        self.pending_counted: set[bytes] = set()
        self.committing: tuple = ({}, set(), {}, set())      # taken, not yet committed
        self.dirty_segs: set[int] = set()                    # accounting changed
        self.generation = 0                                  # commits ended (learn)

    def open(self, rows) -> dict[int, int]:
        """Take the committed view `rows` (PackRows or MemRows; a list of
        (id, seg, off, len) tuples makes a MemRows). Returns each
        segment's committed end (the segments with entries)."""
        self.rows = rows if hasattr(rows, "segments") else MemRows(rows)
        ends: dict[int, int] = {}
        for seg, (live, size, count) in self.rows.segments().items():
            if count > 0:
                self.seg_live[seg], self.seg_size[seg] = live, size
                self.seg_count[seg] = count
                ends[seg] = size
        if self.filter_bytes:       # (ready once built or loaded: even with no
            # segment counted, the table is what says no block is stored)
            self.filter = IdFilter(self.filter_bytes, 2 * self.count())
        return ends

    def build_filter_blocking(self) -> bool:
        """Worker thread: set the filter's bits of every committed id (one
        streaming pass over the committed view, a batch in RAM at a time)
        and mark it ready. The ids added meanwhile set their own bits
        (add). False if stopped (close) first: the filter stays unused."""
        f = self.filter
        if f is None or f.ready:
            return True
        if self.filter_stop.is_set():
            return False
        for batch in self.rows.ids():
            if self.filter_stop.is_set():
                return False
            f.add_many(batch)
        f.ready = not self.filter_stop.is_set()
        return f.ready

    def save_filter_blocking(self, path: str, tag: str) -> bool:
        """At a clean close, after the last commit: the built filter kept
        at `path` for the next open of the same catalogue state (`tag`)."""
        if self.filter is None or not self.filter.ready:
            return False
        self.filter.save_blocking(path, tag)
        return True

    def load_filter_blocking(self, path: str, tag: str) -> bool:
        """At open, before anything is added: the filter saved at `path`
        if it was saved for this catalogue state (`tag`), else none (then
        build_filter_blocking makes it)."""
        if self.filter is None or self.filter.ready:
            return False
        return self.filter.load_blocking(path, tag)

    def filter_status(self) -> dict | None:
        return None if self.filter is None else self.filter.status(self.count())

    def close(self) -> None:
        self.filter_stop.set()
        self.rows.close()

    # ---- lookups (any thread) -------------------------------------------------
    def _overlay(self, bid: bytes):
        """What the changes not yet committed say of `bid`: its location,
        _GONE, or _UNKNOWN."""
        loc = self.pending_add.get(bid)
        if loc is not None:
            return loc
        if bid in self.pending_del:
            return _GONE
        adds, dels = self.committing[:2]
        loc = adds.get(bid)
        if loc is not None:
            return loc
        if bid in dels:
            return _GONE
        return _UNKNOWN

    def lookup_cached(self, bid: bytes, dedup: bool = False):
        """The location of `bid`, None (not stored), or UNCACHED: only the
        committed view knows (no I/O here). `dedup`: the question is
        whether new data is stored already, which the filter may answer
        (a read of a block a map names never asks it: a wrong "no" there
        would fail the read; here it would only store the block again)."""
        loc = self._overlay(bid)
        if loc is not _UNKNOWN:
            return None if loc is _GONE else loc
        if dedup and self.filter is not None and self.filter.excludes(bid):
            return None             # certainly not committed (idfilter.py)
        return self.cache.get(bid)

    def lookup(self, bid: bytes, dedup: bool = False):
        """The location of `bid`, or None. A miss in the cache is a point
        read of the committed view (an indexed B-tree): on the trio thread
        only where lookup_cached answered first or a miss is rare (see
        read_rows_blocking)."""
        loc = self.lookup_cached(bid, dedup)
        if loc is not _UNKNOWN:
            return loc
        loc = self.rows.get(bid)
        # a commit may have ended meanwhile; what it wrote is what `rows`
        # now answers, and the overlays are looked at again for a change
        # made since (a cache entry is only ever corrected by add/drop)
        again = self._overlay(bid)
        if again is not _UNKNOWN:
            return None if again is _GONE else again
        self.cache.put(bid, loc)
        return loc

    def read_rows_blocking(self, ids, dedup: bool = False) -> tuple:
        """(generation, {id: location}) of the committed rows among `ids`:
        one statement per 500 ids, in a worker thread, nothing cached (a
        commit may end meanwhile: `learn` on the trio thread decides).
        So a cache miss of a read or a dedup check does not stall the
        trio loop on a B-tree leaf read (a disk read at 10M blocks)."""
        gen = self.generation
        f = self.filter
        if dedup and f is not None:
            ids = [b for b in ids if not f.excludes(b)]
        return gen, (self.rows.get_many(list(ids)) if ids else {})

    def learn(self, gen: int, ids, found: dict) -> dict:
        """Trio thread: read_rows_blocking's answers for `ids`, cached and
        returned {id: location or None} where they are still true: if no
        commit ended since it started (`generation`; one that ended before
        its read is in what it read, one still running is in the
        overlays, which lookups consult first), for the ids no change
        since speaks of. Else {}: a later lookup reads again."""
        if gen != self.generation:
            return {}
        out = {}
        for b in ids:
            if self._overlay(b) is _UNKNOWN:
                out[b] = self.cache.put_if_absent(b, found.get(b))
        return out

    # ---- changes (trio thread, commit lock) -------------------------------------
    def add(self, bid: bytes, loc) -> None:
        f = self.filter
        new = False
        if f is not None:
            new = f.ready and not f.may_hold(bid)   # (then no table read on this thread)
            f.add(bid)              # before anything can commit it
        old = None if new else self.lookup(bid)
        if old is not None:
            self._unlive(old)
        self.pending_add[bid] = loc
        self.cache.put_if_cached(bid, loc)
        s = loc[0]
        self.seg_live[s] = self.seg_live.get(s, 0) + loc[2] + HDR.size
        self.seg_size[s] = max(self.seg_size.get(s, 0), loc[1] + loc[2])
        self.seg_count[s] = self.seg_count.get(s, 0) + 1
        self.dirty_segs.add(s)

    def _unlive(self, loc) -> None:
        s = loc[0]
        self.seg_live[s] -= loc[2] + HDR.size
        self.seg_count[s] -= 1
        self.dirty_segs.add(s)

    def drop(self, dead) -> int:
        """Drop the entries [(id, loc)] a collection freed. Returns
        bytes freed."""
        freed = 0
        for bid, loc in dead:
            if self.lookup(bid) != loc:
                continue            # (cannot change under the commit lock)
            self._unlive(loc)
            freed += loc[2]
            self.pending_add.pop(bid, None)
            self.pending_del.add(bid)
            self.pending_refs.pop(bid, None)
            self.pending_counted.discard(bid)
            self.cache.put_if_cached(bid, None)
        return freed

    # ---- reference counts (trio thread, commit lock; refs.py) ---------------------
    def ref(self, bid: bytes, delta: int) -> None:
        """`bid` gains (or loses) `delta` references at the next commit."""
        n = self.pending_refs.get(bid, 0) + delta
        if n:
            self.pending_refs[bid] = n
        else:
            self.pending_refs.pop(bid, None)

    def mark_counted(self, bid: bytes) -> None:
        """Node `bid`'s entries are counted as references from now on."""
        self.pending_counted.add(bid)

    def refs_blocking(self, ids) -> dict:
        """{id: (refs, counted)} as of now for the stored ids among `ids`
        (the committed rows with the changes not committed; a row dropped
        since counts from nothing). Worker thread, commit lock."""
        fresh = self.pending_del | self.committing[1]
        old = self.rows.refs([b for b in ids if b not in fresh])
        out = {}
        for b in ids:
            now = self._overlay(b)
            if now is _GONE or (now is _UNKNOWN and b not in old):
                continue            # not stored
            r, k = old.get(b, (0, 0))
            r += self.committing[2].get(b, 0) + self.pending_refs.get(b, 0)
            k = k or b in self.committing[3] or b in self.pending_counted
            out[b] = (r, bool(k))
        return out

    def unreferenced_blocking(self) -> list:
        """The ids that may have no reference now: the committed rows
        with none, those added or dropped and added since, and those that
        lost references since (refs_blocking tells which really have
        none). Worker thread, commit lock."""
        out = {b for b, _ in self.rows.unreferenced()}
        out |= set(self.pending_add) | set(self.committing[0])
        out |= {b for b, d in self.pending_refs.items() if d < 0}
        return [b for b in out if self.lookup(b) is not None]

    def take_pending(self):
        """The changes for the next commit: (adds, dels, segments, refs,
        counted) where segments is {seg: (live, size, count)}, with None
        for a segment forgotten, refs {id: change}, counted {id}. They stay
        visible to lookups until `committed()`."""
        adds, dels = self.pending_add, self.pending_del
        refs, counted = self.pending_refs, self.pending_counted
        self.pending_add, self.pending_del = {}, set()
        self.pending_refs, self.pending_counted = {}, set()
        cadds, cdels, crefs, ccounted = self.committing
        if cadds or cdels or crefs or ccounted:   # a commit that failed: the array stopped
            cadds = {b: l for b, l in cadds.items() if b not in dels}
            cadds.update(adds)
            for b in dels:
                crefs.pop(b, None)
                ccounted.discard(b)
            for b, d in refs.items():
                crefs[b] = crefs.get(b, 0) + d
            adds, dels, refs, counted = cadds, cdels | dels, crefs, ccounted | counted
        self.committing = (adds, dels, refs, counted)
        segs = {s: ((self.seg_live[s], self.seg_size[s], self.seg_count[s])
                    if s in self.seg_size else None) for s in self.dirty_segs}
        self.dirty_segs = set()
        return adds, dels, segs, refs, counted

    def committed(self) -> None:
        """The transaction holding take_pending()'s changes committed:
        the committed view answers for them now."""
        adds, dels, refs, counted = self.committing
        self.rows.apply(adds, dels, refs, counted)
        self.committing = ({}, set(), {}, set())
        self.generation += 1

    def uncommitted(self) -> set:
        """The ids whose entry the committed view does not hold as it is
        now (added, moved or dropped since the last commit)."""
        adds, dels = self.committing[:2]
        return set(self.pending_add) | self.pending_del | set(adds) | dels

    def pending_changes(self) -> int:
        """Rows the next commit writes (adds, drops, count changes)."""
        return (len(self.pending_add) + len(self.pending_del) + len(self.pending_refs)
                + len(self.pending_counted))

    def has_pending(self) -> bool:
        return bool(self.pending_add or self.pending_del or self.dirty_segs
                    or self.pending_refs or self.pending_counted)

    # ---- segments ---------------------------------------------------------------
    def dead_segments(self, is_active) -> list[int]:
        """Sealed segments with nothing live: delete after the commit that
        dropped their entries."""
        return [s for s, n in self.seg_count.items()
                if n <= 0 and not is_active(s) and s in self.seg_size]

    def sparse_segments(self, is_active, ratio: float = 0.5) -> list[int]:
        """Sealed segments worth compacting (live share below `ratio`)."""
        out = []
        for s, live in self.seg_live.items():
            size = self.seg_size.get(s, 0)
            if not is_active(s) and 0 < live and size and live / size < ratio:
                out.append(s)
        return out

    def entries_in(self, seq: int) -> list[tuple[bytes, tuple]]:
        """The live entries of segment `seq` (a worker thread: a range
        read of the committed view), with the changes not committed."""
        out = {}
        for bid, loc in self.rows.entries_in(seq):
            now = self._overlay(bid)
            if now is _UNKNOWN:
                out[bid] = loc
        for adds in (self.committing[0], self.pending_add):
            for bid, loc in list(adds.items()):
                if loc[0] == seq and self._overlay(bid) == loc:
                    out[bid] = loc
        return list(out.items())

    def forget_segment(self, seq: int) -> None:
        self.seg_live.pop(seq, None)
        self.seg_size.pop(seq, None)
        self.seg_count.pop(seq, None)
        self.dirty_segs.add(seq)

    def data_bytes(self) -> int:
        """Logical: the bytes in the pack's segments, before redundancy."""
        return sum(self.seg_size.values())

    def count(self) -> int:
        """Blocks (and map nodes) indexed."""
        return sum(self.seg_count.values())

    # ---- scans (worker threads, commit lock) -------------------------------------
    def scan_blocking(self):
        """Every entry (id, loc) as of now, in batches: the committed view
        streamed with the changes not committed applied. Memory: one
        batch."""
        seen_overlay = set()
        for batch in self.rows.scan():
            out = []
            for bid, loc in batch:
                now = self._overlay(bid)
                if now is _UNKNOWN:
                    out.append((bid, loc))
                elif now is not _GONE and bid not in seen_overlay:
                    seen_overlay.add(bid)
                    out.append((bid, now))
            yield out
        rest = []
        for adds in (self.committing[0], self.pending_add):
            for bid in list(adds):
                if bid in seen_overlay:
                    continue
                loc = self._overlay(bid)
                if loc is not _GONE and loc is not _UNKNOWN:
                    seen_overlay.add(bid)
                    rest.append((bid, loc))
        yield rest

    def problems_blocking(self, name: str, disks) -> list[str]:
        """Check the index against the accounting (fsck's invariants 3 and
        4): each segment's live-byte count and entry count are the sums
        over its entries, no entry lies past its segment's end, every
        online disk has the file of each indexed segment. The committed
        rows are summed by the committed view (in SQLite), the changes not
        committed applied to the sums here."""
        problems = []
        sums = {seg: [total + n * HDR.size, n, end]
                for seg, (total, n, end) in self.rows.segment_sums().items()}
        for bid in self.uncommitted():
            for loc, sign in ((self.rows.get(bid), -1), (self.lookup(bid), 1)):
                if loc is None:
                    continue
                row = sums.setdefault(loc[0], [0, 0, 0])
                row[0] += sign * (loc[2] + HDR.size)
                row[1] += sign
                if sign > 0:
                    row[2] = max(row[2], loc[1] + loc[2])
        for seg, (total, n, end) in sums.items():
            if not n:
                continue
            size = self.seg_size.get(seg)
            if size is None or end > size:
                problems.append(f"pack {name}: an entry lies past the end of segment {seg} "
                                f"({end} > {size})")
            if self.seg_live.get(seg, 0) != total or self.seg_count.get(seg, 0) != n:
                problems.append(f"pack {name}: segment {seg} live bytes "
                                f"{self.seg_live.get(seg)} != {total} or entries "
                                f"{self.seg_count.get(seg)} != {n}")
            for d in disks:
                if d.state == "online" and not d.medium.exists(seg_name(seg)):
                    problems.append(f"pack {name}: segment file {seg} is missing on "
                                    f"disk {d.idx}")
        for seg, n in self.seg_count.items():
            if n and not sums.get(seg, (0, 0))[1]:
                problems.append(f"pack {name}: segment {seg} counts {n} entries "
                                "but has none")
        return problems
