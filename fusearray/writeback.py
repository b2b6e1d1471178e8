"""The write-back and committer: dirty cache -> packs -> maps -> catalogue.

Owns (the only writer of each; all of it on the trio thread):
- the commit lock (`lock`, a trio.Lock) and the catalogue's worker-thread
  limiter (`db`, a trio.CapacityLimiter(1));
- the catalogue changes of the next commit: `changes` (catalogue.Changes,
  swapped for a fresh one at each commit), the volume rows and job rows to
  write (`mark_row`, `mark_job`), whether disk states changed
  (`mark_meta`);
- the durability accounting: `durable_seq` (every write of any volume up
  to this one is stored and committed) and each volume's `durable_seq`
  (written only here, by `_mark_durable`), `last_commit`;
- `fatal`: a failed catalogue transaction stops the array (every later
  commit raises EIO);
- admission control near a full pack (`admit`, `pack_writable`,
  `check_fits`): a Volume is given the WriteBack as its `admission`;
- the committer task (`run_committer`, one, in the daemon's nursery);
- its partner, the garbage collector (`collector`, gc.Collector, made
  here): the write-back tells it what becomes garbage as blocks are
  stored and merged, and calls its `reclaim` when a pack is full.

Given at construction (it holds no reference to the Array): the pack and
volume tables (the coordinator's dicts, shared, read here), the block
cache (volume.BlockCache: dirty blocks, their errors and back-off), the
map node cache, the hasher, `verify`, the block reader (`read_locs`,
`loader`), an event sink `event(level, message)`, `drain_notes()` (pack
notes -> events), `round_start()` (called at each committer round: event
summaries) and the coordinator's part of each commit: `uncommitted()` (it
has something to commit), `prepare_commit(ch)` (on the trio thread, just
before the transaction: adds its counters, event and job journals; returns
a token) and `await committed(token)` (after the transaction: retires
those journals). `catalogue` is set by the coordinator once opened.

The commit (`commit`, caller holds `lock`), step by step, and what a crash
(SIGKILL, power loss) leaves after each:

    1. flush: partial dirty blocks (absorbed sub-block writes, see
       volume.py) completed: their stored blocks read, one batch per
       volume (the read-modify-write, once per block) [reader: page cache
       or a worker thread]; dirty cache blocks hashed, deduplicated and
       appended to segment files [worker thread: hash_and_store]; their ids go to the
       volumes' overlays [trio]. A crash leaves segment bytes no index row
       points to: the next open truncates/removes them (Pack.open_blocking);
       those writes were acknowledged but no fsync covered them yet: they
       may be lost (DESIGN 4.1), nothing fsync'd is.
    2. merge: overlays folded into the maps, new map nodes appended
       [trio + worker thread]. Same as 1.
    3. Pack.sync_blocking: fsync of every segment file written [thread].
       Durable bytes, still unreachable: as 1. A failed fsync commits
       nothing (the pack rewrites those blocks, see store/segments.py).
    4. one SQLite transaction: index rows, roots, volume/set/job rows,
       disk states, events, meta counters [thread, under `db`]. After it
       every write acknowledged before step 1 and stored is reachable
       (`durable_seq`); an fsync waiting on it returns. If it fails the
       array stops (`fatal`): nothing later is committed.
    5. after: the coordinator's journals retired (`committed`), segments
       left with nothing live recycled as spares or deleted [thread]. A
       crash leaves spare or orphan segment files: removed at the next open.

Lock order: `lock` (trio) -> `db` (trio limiter, held only around the
catalogue transaction) -> Pack.files.lock (a threading.Lock over a
pack's fd table and mapped segments, taken inside the store, never held
across I/O; see fusearray/store/__init__.py). Nothing takes `lock` while holding a pack's lock. The block cache
has no lock: it is the trio thread's.

Worker threads (trio.to_thread): `hash_and_store` / `store_hashed` (under
`lock`: they append to packs and read their index), Pack *_blocking
methods (append, sync, retire, check disks, trim spares, statvfs) and the
catalogue transaction. Their results (index adds) are applied on the trio
thread.
"""
import errno
import logging
import secrets
import time

import trio

from . import ZERO_ID, maps
from .catalogue import Changes
from .errors import ArrayError, ChecksumError, ioerror, nospace
from .gc import AS_WE_GO_COMPACT, Collector
from .intentlog import Coverage
from .refs import RefCounts
from .store import SPARE_IDLE, SPARES
from .util import human_bytes

log = logging.getLogger("fusearray")

#: A LUN may be this many times larger than its pack (thin provisioning).
OVERCOMMIT = 16
COMMIT_INTERVAL = 5.0
DISK_CHECK_INTERVAL = 2.0
#: Merge overlays into maps once this much is flushed (finds garbage sooner).
OVERLAY_MERGE = 256 << 20
FLUSH_BATCH = 16 << 20
#: Free space a commit wants where the catalogue writes beyond its pages
#: (check_room).
COMMIT_SLACK = 1 << 20
#: check_room looks again after this many seconds, or at once unless there
#: was this much more than a commit's rows need at the last look.
ROOM_TTL = 1.0
ROOM_PLENTY = 256 << 20
#: A full or failed pack's dirty blocks are retried this often.
FLUSH_RETRY = 3.0
#: The intent log covers an fsync only if the pack has this much room
#: beyond every dirty block (else the commit answers, with its ENOSPC).
LOG_MARGIN = 64 << 20


class Collision(Exception):
    """Verify mode found two different blocks with the same content id."""

    def __init__(self, pack: str, bid: bytes):
        super().__init__(pack, bid)
        self.pack, self.bid = pack, bid.hex()


def hash_and_store(hasher, items, verify: bool):
    """Worker thread, under the commit lock: hash each (pack, data),
    append what its pack lacks. Returns (ids, [(pack, id, loc)]) for the
    caller to add to the indexes on the trio thread."""
    ids = block_ids(hasher, [data for _, data in items])
    return ids, store_hashed(items, ids, verify)


def block_ids(hasher, datas) -> list:
    """The id of each buffer; ZERO_ID for None (a zero block). Needs no lock."""
    hashed = iter(hasher.block_ids([d for d in datas if d is not None]))
    return [ZERO_ID if d is None else next(hashed) for d in datas]


def store_hashed(items, ids, verify: bool) -> list:
    """Worker thread, under the commit lock: append the (pack, data) of
    `items` whose id (`ids`, in step) their pack lacks; dedup hits are
    confirmed byte for byte in verify mode (raises Collision). Returns
    [(pack, id, loc)] for the caller to add to the indexes on the trio
    thread."""
    new: dict = {}
    for (pack, data), bid in zip(items, ids):
        if bid == ZERO_ID:
            continue
        recs = new.setdefault(pack, {})
        if bid in recs:
            continue
        loc = pack.lookup(bid, dedup=True)
        if loc is None:
            recs[bid] = data
        elif verify:
            try:
                old = pack.read_blocking(bid, loc)
            except (ChecksumError, OSError):
                recs[bid] = data         # the stored copy is bad: store it again
                continue
            if old != data:
                raise Collision(pack.name, bid)
    added = []
    for pack, recs in new.items():
        records = list(recs.items())
        if records:
            locs = pack.append_blocking(records)
            added.extend((pack, bid, loc) for (bid, _), loc in zip(records, locs))
    return added


def per_volume(sizes: dict) -> str:
    """`LUN l0 12.0M, l1 4.0M` for {volume: bytes}."""
    return ", ".join(f"{'LUN' if v.kind == 'lun' else 'shadow copy'} {v.path} "
                     f"{human_bytes(n)}"
                     for v, n in sorted(sizes.items(), key=lambda kv: -kv[1]))


class WriteBack:
    """The write-back, the commit and admission (see the module docstring)."""

    def __init__(self, packs: dict, volumes: dict, cache, nodes, hasher, verify: bool, *,
                 reader, event, drain_notes, round_start, uncommitted, prepare_commit,
                 committed, array_uuid: str, intent=None, fsync_log: bool = True,
                 catalogue_room=None):
        self.packs = packs              # the coordinator's: name -> Pack
        self.volumes = volumes          # the coordinator's: vid -> Volume
        self.cache = cache
        self.nodes = nodes
        self.hasher = hasher
        self.verify = verify
        self.reader = reader
        self.event = event
        self.drain_notes = drain_notes
        self.round_start = round_start
        self.uncommitted = uncommitted
        self.prepare_commit = prepare_commit
        self.committed = committed
        self.array_uuid = array_uuid
        self.intent = intent            # the intent log (intentlog.IntentLog) or None
        self.fsync_log = fsync_log      # fsyncs through the log (mount --fsync log)
        self.catalogue = None           # set by the coordinator once opened
        # () -> (free bytes, catalogue bytes, where) or None (not known): the
        # room where the catalogue writes (worker thread; see check_room)
        self.catalogue_room = catalogue_room
        self.catalogue_full: str | None = None      # why commits wait (said once; check_room)
        self._room_seen = (-ROOM_TTL, 0)    # (when, free bytes) of the last look
        self.lock = trio.Lock()         # the commit lock
        self.db = trio.CapacityLimiter(1)
        self.changes = Changes()        # what the next commit writes besides rows
        self.durable_seq = 0            # every write up to this one (any volume) is durable
        self.fatal: BaseException | None = None
        self.last_commit = 0.0
        # the array's lineage (open_lineage): this mount's session, the
        # catalogue's commit count, what the first commit records of them
        self.session = secrets.token_hex(8)
        self.commits = 0
        self._lineage: dict | None = None
        self._where: dict = {}
        self._rows: set = set()         # volumes whose row the next commit writes
        self._jobs: set = set()         # jobs whose row the next commit writes
        self._meta_changed = False      # disk states changed
        self._last_disk_check = 0.0
        # the reference counts of the packs' blocks (their changes go with the
        # index's), and the collector that frees what they say is unreferenced
        self.refs = RefCounts(packs, volumes, read_locs=reader.read_locs,
                              lookups=reader.lookups, nodes=nodes)
        self.collector = Collector(self, packs, volumes, read_locs=reader.read_locs,
                                   loader=reader.loader, refs=self.refs)

    # ---- what the next commit writes ---------------------------------------
    def mark_row(self, vol) -> None:
        """`vol`'s catalogue row changed: written at the next commit."""
        self._rows.add(vol)

    def mark_job(self, job) -> None:
        """`job`'s catalogue row changed: written at the next commit."""
        self._jobs.add(job)

    def mark_meta(self) -> None:
        """Disk states changed: the next commit writes them."""
        self._meta_changed = True

    def check_fits(self, pack, size: int) -> None:
        """A LUN of `size` bytes may live on `pack` (thin provisioning)."""
        cap = pack.capacity_bytes()
        if size > cap * OVERCOMMIT:
            raise nospace(f"pack {pack.name} cannot hold a LUN of {human_bytes(size)}: "
                          f"its capacity is {human_bytes(cap)} and LUNs may be at most "
                          f"{OVERCOMMIT}x that (thin provisioning)")

    # ---- committer ---------------------------------------------------------------
    async def run_committer(self) -> None:
        """The committer task (one, in the daemon's nursery): woken by the
        cache when dirty data piles up, else once a second."""
        cache = self.cache
        while True:
            with trio.move_on_after(1.0):
                await cache.wake_committer.wait()
            if cache.wake_committer.is_set():
                cache.wake_committer = trio.Event()
            try:
                await self.committer_round()
            except ArrayError:
                pass     # recorded as an event and in cache.errors; retried
            except Exception as e:   # a bug: keep serving, say so, retry later
                log.exception("committer failed")
                self.event("error", f"internal error in the committer: "
                           f"{type(e).__name__}: {e}; retrying")
                self.cache.errors["*"] = ioerror(f"the array could not write back "
                                                 f"data: {e}")
                await trio.sleep(1)

    async def committer_round(self) -> None:
        """One round of the committer: disk checks, write-back, the
        periodic commit and GC. Its errors are the committer's to catch."""
        cache = self.cache
        collector = self.collector
        self.round_start()
        now = time.monotonic()
        if now - self._last_disk_check >= DISK_CHECK_INTERVAL:
            self._last_disk_check = now
            for pack in list(self.packs.values()):
                before = [d.state for d in pack.disks]
                async with self.lock:       # no segment retired meanwhile
                    await trio.to_thread.run_sync(pack.check_disks_blocking,
                                                  self.array_uuid, pack.sealed())
                if before != [d.state for d in pack.disks]:
                    self._meta_changed = True
        self.drain_notes()
        async with self.lock:
            if cache.dirty_bytes > cache.flush_at:
                # bounded: under a steady stream of writes the dirty
                # level never drops, and an unbounded loop starved the
                # commits and GC below (segments piled up, 7 GB of
                # them for a 1 GB LUN, and fresh pages cost 4x)
                budget = cache.dirty_limit
                while cache.dirty_bytes > cache.flush_to and budget > 0:
                    await self.flush(FLUSH_BATCH)
                    budget -= FLUSH_BATCH
                    await self._reclaim_as_we_go()
            now = time.monotonic()
            piled = self._overlaid()
            if (now - self.last_commit >= COMMIT_INTERVAL and self.needs_commit()) \
                    or piled > OVERLAY_MERGE \
                    or (self.intent is not None and self.intent.wants_commit()):
                await self.commit()     # merging finds overwritten blocks
            if collector.wanted:
                if collector.due(now):
                    await collector.collect()
                elif pressing := collector.pressing():
                    await collector.collect(pressing)
            for pack in self.packs.values():
                if len(pack.spares) > SPARES and now - pack.last_roll > SPARE_IDLE:
                    await trio.to_thread.run_sync(pack.trim_spares_blocking, SPARES)

    def _overlaid(self) -> int:
        """Bytes flushed to overlays and not merged into maps yet."""
        return sum(len(v.overlay) * v.block_size for v in self.volumes.values())

    async def _reclaim_as_we_go(self) -> None:
        """In a long write-back (a LUN overwritten end to end): once
        a quarter of a pack's GC bar is flushed (Collector.merge_every, at most
        OVERLAY_MERGE), fold it into the maps, and if that shows a pack's
        garbage pressing, collect it there and then, without flushing the
        rest (the old data's segments become spares for the rest of the
        flush instead of after it: one overwrite pass took twice the LUN's
        space, all of it new files, at a quarter of the speed on the bench
        VM). Caller holds `lock`."""
        if self._overlaid() < min(OVERLAY_MERGE, self.collector.merge_every()):
            return
        await self.merge()
        pressing = self.collector.pressing()
        if pressing:
            await self.collector.collect(pressing, flush=False, compact=AS_WE_GO_COMPACT)

    def needs_commit(self) -> bool:
        return bool(self.cache.dirty or self._rows or not self.changes.empty()
                    or self.uncommitted()
                    or self._jobs or self._meta_changed
                    or any(v.overlay for v in self.volumes.values())
                    or any(p.has_pending() for p in self.packs.values()))

    # ---- write-back ------------------------------------------------------------
    async def flush(self, max_bytes: int | None = None) -> None:
        """Write dirty cache blocks to their packs; their ids go to the
        volumes' overlays. Caller holds `lock`.

        Partial entries (absorbed sub-block writes) among those it takes
        are completed first: the stored blocks under them read in one
        batch per volume (Volume.complete); writes made during that read
        win over the stored bytes, and an entry made partial during it
        waits for the next flush. A stored block that cannot be read leaves
        those entries dirty and fails its pack's flush like a failed
        append (EIO, an event, retried); the pack's whole blocks are
        still written back.

        The buffers are handed over, not copied: they are marked `shared`
        and a write to one copies it first. Each pack is flushed on its
        own: a full or failed pack keeps its blocks dirty (retried every
        few seconds) and its error in `cache.errors`, while the others go
        on. Raises the first pack error."""
        cache = self.cache
        now = time.monotonic()
        first = None
        unreadable: dict = {}     # pack -> why some partial blocks could not be completed
        partial: dict = {}        # volume -> its partial entries this flush takes
        taken = 0
        for e in cache.dirty:
            if e.vol.pack.name in cache.errors and now < cache.retry_at.get(e.vol.pack.name, 0):
                continue
            if e.valid is not None:
                partial.setdefault(e.vol, []).append(e)
            taken += e.vol.block_size
            if max_bytes and taken >= max_bytes:
                break
        for vol, entries in partial.items():
            # read-modify-write, once per block however many writes hit it:
            # the stored blocks under the partial ones, one batch per volume
            try:
                await vol.complete(entries, at_flush=True)
            except ArrayError as err:      # a stored block unreadable: they stay dirty
                unreadable.setdefault(vol.pack, err)
        groups: dict = {}
        taken = 0
        snap = cache.seq        # the buffers taken hold every write up to this one
        for e in cache.dirty:
            pack = e.vol.pack
            if pack.name in cache.errors and now < cache.retry_at.get(pack.name, 0):
                continue
            if e.valid is not None:
                continue        # made partial since (a write during the reads above)
            if e.buf is not None:
                e.shared = True
            groups.setdefault(pack, []).append((e, e.gen, e.vol.generation, e.buf))
            taken += e.vol.block_size
            if max_bytes and taken >= max_bytes:
                break
        try:
            for pack, batch in groups.items():
                try:
                    await self._flush_pack(pack, batch, snap)
                    if pack not in unreadable and \
                            cache.errors.pop(pack.name, None) is not None:
                        self.event("info", f"pack {pack.name} accepts writes again")
                except ArrayError as err:
                    cache.errors[pack.name] = err
                    cache.retry_at[pack.name] = now + FLUSH_RETRY
                    first = first or err
                    unreadable.pop(pack, None)      # that error says it
            for pack, err in unreadable.items():
                # partly written blocks whose stored rest cannot be read
                # cannot be written back: the writers' error, as for a
                # failed append (the read error is an event already)
                msg = (f"I/O error writing to pack {pack.name}: partly written "
                       f"blocks cannot be completed ({err.message})")
                if pack.name not in cache.errors:
                    self.event("error", msg)
                werr = ioerror(msg)
                cache.errors[pack.name] = werr
                cache.retry_at[pack.name] = now + FLUSH_RETRY
                first = first or werr
        finally:
            for batch in groups.values():
                for e, _, _, buf in batch:
                    if e.buf is buf and type(buf) is bytearray:
                        e.shared = False
            cache.recount_stuck()
            cache.flushed()
        if first is not None:
            raise first

    async def _flush_pack(self, pack, batch, snap: int) -> None:
        """Store `batch` [(entry, gen, volume generation, buf)], taken
        when the last write acknowledged was number `snap`. Punched blocks
        (buf None) need no space and go first, so that on a full pack the
        reclaim below already frees what they punched."""
        cache = self.cache
        collector = self.collector
        zeros = [b for b in batch if b[3] is None]
        if zeros:
            for e, gen, vgen, _ in zeros:
                self._stored(e, gen, vgen, ZERO_ID, snap)
            batch = [b for b in batch if b[3] is not None]
            if not batch:
                return
        items = [(pack, b[3]) for b in batch]
        try:
            try:
                ids, added = await trio.to_thread.run_sync(
                    hash_and_store, self.hasher, items, self.verify)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT) or collector.reclaiming:
                    raise
                if pack.name in cache.errors and not collector.wanted and not zeros:
                    raise       # full already, and nothing freed since the last reclaim
                await collector.reclaim()           # garbage first, then try again
                ids, added = await trio.to_thread.run_sync(
                    hash_and_store, self.hasher, items, self.verify)
        except OSError as err:
            raise self.append_error(pack, err, quiet=pack.name in cache.errors) from None
        except Collision as c:
            msg = (f"hash collision in pack {c.pack} on id {c.bid}: two different "
                   "blocks share a content id; the write was refused (verify mode "
                   "caught it)")
            self.event("error", msg)
            raise ioerror(msg) from None
        stored = set()
        for p, bid, loc in added:
            p.add(bid, loc)
            stored.add(bid)
        for (e, gen, vgen, _), bid in zip(batch, ids):
            self._stored(e, gen, vgen, bid, snap)
            if bid != ZERO_ID:      # (an all-zero block is never stored)
                st = e.vol.stats
                st.written_back += 1
                if bid in stored:
                    stored.discard(bid)     # the first of its content: appended
                else:
                    st.dedup_hits += 1      # the pack had it, or this batch did

    def _stored(self, e, gen: int, vgen: int, bid: bytes, snap: int) -> None:
        """Entry `e` as of generation `gen` is stored as `bid`: its id goes
        to the overlay (unless the volume's content was replaced since)."""
        vol = e.vol
        if vgen != vol.generation or vol.cache.get(e.bno) is not e:
            return
        old = vol.overlay.get(e.bno)
        if old is not None and old != bid and old != ZERO_ID:
            self.collector.add_garbage(vol)      # flushed, then overwritten
            self.collector.want()
        elif bid == ZERO_ID:
            self.collector.want()                # punched: may free space (see admit)
        vol.overlay[e.bno] = bid
        cache = self.cache
        cache.mark_clean(e, gen)
        if e.dirty:     # written again meanwhile: only writes after `snap` are not stored
            e.seq = max(e.seq, snap + 1)
        elif type(e.buf) is memoryview:
            cache.drop(e)   # a view pins its whole write request: let it go

    def append_error(self, pack, e: OSError, quiet: bool = False) -> ArrayError:
        """The error writers get; an event unless the pack already had one."""
        if self.fatal is not None:      # (a failed catalogue read stopped it: said once)
            return ioerror(f"the array stopped after a fatal error: {self.fatal}")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg = (f"pack {pack.name} is full: {e.strerror}; writes fail with "
                   "ENOSPC until space is freed (delete LUNs or shadow copies, "
                   "punch holes / fstrim)")
            err = nospace(msg)
        else:
            msg = f"I/O error writing to pack {pack.name}: {e.strerror or e}"
            err = ioerror(msg)
        if not quiet:
            self.event("error", msg)
        return err

    async def store_new(self, items, reserve_ok: bool = False) -> None:
        """Append the blocks of `items` [(pack, id, data)] their pack does not
        hold yet. Dedup hits are confirmed byte for byte in verify mode.
        Caller holds `lock`."""
        new: dict = {}
        check = []
        asked: dict = {}
        for pack, bid, _ in items:
            if bid != ZERO_ID:
                asked.setdefault(pack, {})[bid] = None
        locs = {}
        for pack, ids in asked.items():     # (no SQL on the trio thread)
            found = await self.reader.lookups(pack, list(ids), dedup=True)
            locs[pack] = dict(zip(ids, found))
        for pack, bid, data in items:
            if bid == ZERO_ID:
                continue
            recs = new.setdefault(pack, {})
            if bid in recs:
                continue
            loc = locs[pack][bid]
            if loc is None:
                recs[bid] = data
            elif self.verify:
                check.append((pack, bid, loc, data))
        if check:
            for pack, bid, loc, data in check:
                old = (await self.reader.read_locs(pack, [bid], [loc]))[0]
                if old != data:
                    msg = (f"hash collision in pack {pack.name} on id {bid.hex()}: "
                           "two different blocks share a content id; the write "
                           "was refused (verify mode caught it)")
                    self.event("error", msg)
                    raise ioerror(msg)
        for pack, recs in new.items():
            if not recs:
                continue
            records = list(recs.items())
            try:
                locs = await trio.to_thread.run_sync(pack.append_blocking, records,
                                                     reserve_ok)
            except OSError as e:
                raise self.append_error(pack, e) from None
            for (bid, _), loc in zip(records, locs):
                pack.add(bid, loc)

    async def store_nodes(self, vol, nodes, pairs=()) -> None:
        """Store map nodes [(id, bytes)] just made for `vol`'s map (in the
        pack's reserve if need be) and count their entries as references
        (refs.py; `pairs` from maps.apply: which node each replaced).
        Caller holds `lock`."""
        await self.store_new([(vol.pack, nid, data) for nid, data in nodes], True)
        await self.refs.count_nodes(vol, nodes, pairs)

    async def end_copy(self, vol) -> None:
        """`vol`'s copy into its own pack is complete: its map is counted
        there, and it no longer reads from its source. Caller holds `lock`
        (and commits)."""
        await self.refs.adopt(vol, self.reader.loader)
        vol.source = None
        self.mark_row(vol)

    def open_lineage(self, meta: dict, where: dict) -> None:
        """At open, from the catalogue's meta: its commit count; this
        mount's first commit records its session and, as the previous
        one, the session that committed last (Array._check_not_stale).
        `where`: the host and directory the commit records name."""
        self._where = where
        self.commits = int(meta.get("commits", 0))
        self._lineage = {"session": self.session, "prev_session": meta.get("session", ""),
                         "prev_commits": self.commits}

    async def check_room(self) -> None:
        """Before a commit takes its changes: is there room for it where
        the catalogue writes? A catalogue transaction that fails for want
        of space stops the array (nothing after it can be trusted to
        commit); refused here instead, the commit is only put off: its
        changes stay pending, fsync'd writes stay in the intent log, the
        caller gets ENOSPC, and commits resume by themselves once there is
        room (the committer tries every round). Its need: the new rows
        (their bytes in the table and its indexes, twice: the WAL, then
        the database), the pages they change (random ids: a leaf each, two
        indexes; no more than the catalogue's size), and some slack. A
        file system that fills between this check and the transaction
        still stops the array (nothing acknowledged is lost: the intent
        log has it)."""
        if self.catalogue_room is None:
            return
        rows = sum(p.pending_changes() for p in self.packs.values()) + len(self._rows) + 64
        seen_at, seen_free = self._room_seen
        if time.monotonic() - seen_at < ROOM_TTL and seen_free > ROOM_PLENTY + 256 * rows:
            return                  # plenty a moment ago: no thread hop per commit
        try:
            got = await trio.to_thread.run_sync(self.catalogue_room)
        except OSError:
            got = None              # not known: try (as before this check)
        if got is None:
            return
        free, size, where = got
        self._room_seen = (time.monotonic(), free)
        need = COMMIT_SLACK + 256 * rows + min(2 * 4096 * rows, size)
        if free >= need:
            if self.catalogue_full is not None:
                self.catalogue_full = None
                self.event("info", f"the catalogue has room again ({where}): commits "
                           "resume")
            return
        msg = (f"the catalogue's storage is full ({where}: {human_bytes(free)} free, a "
               f"commit needs about {human_bytes(need)}): commits wait, and what needs "
               "one (ctl commands, `sync`, fsync once the intent log is full) fails "
               "with ENOSPC; fsync'd writes are safe in the intent log. Free space "
               "there: commits resume by themselves")
        if self.catalogue_full is None:
            self.event("error", msg)
        self.catalogue_full = msg
        err = nospace(msg)
        err.catalogue_full = True       # (commit's put_off tells it from a pack's ENOSPC)
        raise err

    def _commit_record(self) -> dict:
        """What each pack that keeps one is told after a commit."""
        return {"array": self.array_uuid, "session": self.session, "commits": self.commits,
                **self._where}

    async def open_refs(self, meta: dict) -> None:
        """At open: the roots the committed counts include; an array made
        before the counts has them made now, in one walk and one commit."""
        if meta.get("refs") == "1":
            self.refs.load()
            return
        async with self.lock:
            rows = await self.refs.recount(self.reader.loader)
            self.changes.recount.update(rows)
            self.changes.meta["refs"] = 1
            await self.commit(flush=False)
        self.event("info", "reference counts made for the blocks stored "
                   f"({sum(len(r) for r in rows.values())} rows): collections no "
                   "longer walk every map")

    async def merge(self) -> None:
        """Fold every overlay into its map; store the new nodes. Caller
        holds `lock`."""
        for vol in list(self.volumes.values()):
            need = maps.height_for(vol.nblocks)
            if not vol.overlay and need <= vol.height:
                continue
            new_nodes = []

            def emit(nid, data, _n=new_nodes):
                self.nodes.add(nid, data)
                _n.append((nid, data))
            merged = dict(vol.overlay)
            root, height = vol.root, vol.height
            if need > height:
                root = maps.grow(root, height, need, emit, self.hasher)
                height = need
            stats: dict = {}
            pairs: list = []
            root, delta = await maps.apply(root, height, merged, self.reader.loader(vol),
                                           emit, self.hasher, stats, pairs)
            await self.store_nodes(vol, new_nodes, pairs)
            vol.root, vol.height = root, height
            vol.allocated += delta
            for bno, bid in merged.items():
                if vol.overlay.get(bno) == bid:
                    del vol.overlay[bno]
            self._rows.add(vol)
            if stats["replaced"]:
                self.collector.want()   # something was overwritten or zeroed
                self.collector.add_garbage(vol, stats["replaced"])

    # ---- the commit point --------------------------------------------------------
    async def commit(self, flush: bool = True, cover: bool = True, freed=(),
                     put_off: bool = False) -> None:
        """The commit point (steps in the module docstring). Caller holds
        `lock`. flush=False commits only what is already stored (the index
        and catalogue changes). A commit that flushed records how far it
        covers the intent log unless `cover` is False (the log's replay at
        open commits as it goes without: until it is over, a crash must
        replay every record again). `freed`: the packs a collection freed
        just before (the commit's own freeing skips them). `put_off`: if
        the catalogue has no room (check_room), return with the changes
        pending for the committer instead of raising ENOSPC (a job's end:
        its work is done, only its record waits)."""
        if self.fatal is not None:
            raise ioerror(f"the array stopped after a fatal error: {self.fatal}")
        seq = self.cache.seq
        if flush:
            try:
                await self.flush()
            except ArrayError:
                pass    # in cache.errors and the blocks stay dirty: writers and
                        # sync() see it (_mark_durable); the catalogue changes still commit
            await self.merge()
        for pack in self.packs.values():
            lost_before = pack.lost_writes
            try:
                moved = await trio.to_thread.run_sync(pack.sync_blocking)
            except OSError as e:      # not durable: nothing is committed (see Pack.sync_blocking)
                self.drain_notes()
                raise self.append_error(pack, e, quiet=lost_before is not None) from None
            for bid, loc in moved:    # written again after a failed fsync
                pack.add(bid, loc)
        # the volume rows below say which roots count; then what this
        # commit's changes left unreferenced is freed (net counts written)
        self.refs.update_roots()
        await self.collector.release(freed)
        await self.refs.settle()
        try:
            await self.check_room()
        except ArrayError as e:
            if put_off and getattr(e, "catalogue_full", False):
                return
            raise
        ch, self.changes = self.changes, Changes()
        token = self.prepare_commit(ch)   # events, counters, the job journal's mark
        for pack in self.packs.values():
            adds, dels, segs, refs, counted = pack.take_pending()
            if adds:
                ch.blocks_add[pack.name] = adds
            if dels:
                ch.blocks_del[pack.name] = dels
            if segs:
                ch.segments[pack.name] = segs
            if refs:
                ch.refs[pack.name] = refs
            if counted:
                ch.counted[pack.name] = counted
        coverage = None
        if flush and cover and self.intent is not None:
            coverage = self._coverage(seq)
            ch.meta.update(coverage.meta())
        ch.volumes = [v.row() for v in self._rows if not v.deleted]
        self._rows = set()
        ch.jobs = [j.row() for j in self._jobs]
        ch.disks = [(p.name, d.idx, d.path, d.state, d.since)
                    for p in self.packs.values() for d in p.disks]
        self._jobs = set()
        ch.meta["commits"] = self.commits + 1
        if self._lineage is not None:
            ch.meta.update(self._lineage)
        try:
            await trio.to_thread.run_sync(self.catalogue.commit_blocking, ch,
                                          limiter=self.db)
        except Exception as e:
            self.fatal = e
            log.exception("catalogue commit failed")
            raise ioerror(f"catalogue commit failed: {e}; the array stopped "
                          "accepting changes, remount it") from None
        self.commits += 1
        self._lineage = None
        for pack in self.packs.values():
            pack.committed()        # the catalogue answers for the index changes now
        marked = [p for p in self.packs.values() if p.records_commits]
        if marked:      # (after the commit: a pack never names a commit the catalogue lacks)
            rec = self._commit_record()
            await trio.to_thread.run_sync(
                lambda: [p.mark_commit_blocking(rec) for p in marked], limiter=self.db)
        await self.committed(token)
        if flush:       # every overlay was merged: what is not dirty is committed
            self._mark_durable(seq)
        if coverage is not None:
            self.intent.committed(coverage)
        self._meta_changed = False
        if flush:       # commits of what is stored (GC during a write-back) don't put it off
            self.last_commit = time.monotonic()
        await self._delete_dead_segments()

    async def _delete_dead_segments(self) -> None:
        """After a commit: segments nothing points into any more are
        recycled; one a read is still in flight on is unlinked now (a
        file: the read keeps its fd) or, on RADOS, removed after a later
        commit, once the read is over (Segments.drop_dead_segment)."""
        for pack in self.packs.values():
            for seg in pack.take_unlinkable():
                await trio.to_thread.run_sync(pack.retire_blocking, seg, False)
            for seg in pack.dead_segments():
                how = pack.drop_dead_segment(seg)
                if how == "unlink":
                    await trio.to_thread.run_sync(pack.unlink_segment_blocking, seg)
                elif how == "retire":
                    reuse = pack.free_bytes() > 8 * pack.reserve   # never on a full pack
                    await trio.to_thread.run_sync(pack.retire_blocking, seg, reuse)

    # ---- durability ------------------------------------------------------------
    async def sync(self, vol=None, log: bool = False) -> None:
        """fsync, fdatasync and a loop device's flush of `vol` (None: of
        every volume). The contract (DESIGN 4.1), exactly:

        - It returns only when every write to `vol` acknowledged before it
          was called is stored in its pack and committed (the catalogue
          transaction that makes it reachable after a crash is in), so a
          SIGKILL or a host crash after it loses none of them.
        - Otherwise it raises, every time it is called, for as long as one
          of those writes is not stored: ENOSPC (the pack is full) or EIO
          (a disk write failed, the commit failed). Each call retries the
          write-back first (no back-off), so the first call after space
          is freed or the fault is gone succeeds. A write stops counting
          only once stored, or once its data is dropped on purpose (the
          LUN deleted or its content replaced by a command, `umount
          --discard`).

        Accounting: the cache numbers acknowledged writes (BlockCache.seq);
        a dirty block's `seq` bounds the oldest unstored write in it from
        below; after each commit a volume's `durable_seq` is the highest
        number below which none of its writes is unstored (_mark_durable).
        Group commit: one commit serves every fsync waiting for the lock.

        With `log` (an fsync through the mount), the intent log
        (intentlog.py) takes the place of the commit when it can
        (`_log_may`): the writes are then durable in the log
        (replayed at the next open if no commit covers them first), and the
        commit follows in the background. It cannot when the pack has an
        error or is near full (the commit's ENOSPC/EIO is the answer then,
        exactly as above), when it dropped records over its memory share or
        when the log device failed. Without it (`sync all`, what umount
        runs, and in-process callers) it always commits."""
        target = self.cache.seq if vol is None else vol.last_write
        if self._durable(vol) >= target:
            return
        intent = self.intent
        if log and intent is not None and self.fsync_log:
            if intent.durable(target):
                return
            if self._log_may(vol) and await intent.sync(target):
                return
        async with self.lock:
            if self._durable(vol) >= target:
                return
            cache = self.cache
            for name in ([vol.pack.name] if vol is not None else list(cache.errors)):
                cache.retry_at.pop(name, None)     # retried now, not after the back-off
            try:
                await self.commit()
            except ArrayError:
                if self._durable(vol) >= target:
                    return          # a later step failed; what fsync covers is in
                raise
            if self._durable(vol) < target:
                raise self.not_stored_error(vol)

    def stop(self, why: BaseException) -> None:
        """Commit nothing from now on (the catalogue is no longer this
        mount's: the array's lease was lost to another host; or it cannot
        be read any more: Array._catalogue_failed). Any thread:
        one assignment, read by `commit` and `sync_all`."""
        if self.fatal is None:
            self.fatal = why

    async def sync_all(self, discard: bool = False) -> dict:
        """ctl `sync all [discard=yes]`, what `fusearray umount` runs before
        it unmounts: every acknowledged write of every volume stored and
        committed (sync(None)), or ENOSPC/EIO saying how much of which
        LUN is not, and the array stays as it is. With `discard`, blocks
        that still cannot be stored after a last try are dropped (the LUN
        reads what it held before those writes) and an event says how
        much of which LUN was dropped. After a fatal error (a failed
        catalogue transaction, or the array's lease lost to another host)
        nothing can be committed any more: EIO saying so, or with `discard`
        what is not committed is given up (and the unmount goes on)."""
        if self.fatal is not None:
            if not discard:
                raise ioerror(f"the array stopped after a fatal error ({self.fatal}): "
                              "nothing more can be committed; unmount with `fusearray "
                              "umount --discard` (what was not committed is lost with this "
                              "mount)")
            dropped = self.cache.dirty_bytes
            self.event("warning", f"the array stopped after a fatal error ({self.fatal}): "
                       f"unmounting without committing ({human_bytes(dropped)} not stored), "
                       "as asked (sync all discard=yes, `fusearray umount --discard`)")
            return {"unstored_bytes": 0, "dropped_bytes": dropped}
        if discard and self.catalogue_full is not None:
            # (no room to commit: what is not fsync'd goes; the intent log
            # has the rest for the next mount)
            dropped = self.cache.dirty_bytes
            self.event("warning", f"unmounting without committing: {self.catalogue_full}; "
                       f"as asked (sync all discard=yes): {human_bytes(dropped)} not "
                       "stored are dropped, writes fsync'd before are replayed from the "
                       "intent log at the next mount")
            return {"unstored_bytes": 0, "dropped_bytes": dropped}
        try:
            await self.sync(None)
            if self.needs_commit():     # changes with no write behind them (job progress)
                async with self.lock:
                    await self.commit()
            return {"unstored_bytes": 0}
        except ArrayError as err:
            unstored = self.unstored()
            if not unstored:
                raise
            if not discard:
                raise ArrayError(err.errno, f"{human_bytes(sum(unstored.values()))} of "
                                 f"acknowledged writes are not stored "
                                 f"({per_volume(unstored)}): {err.message}. Free space "
                                 "(or repair the pack) and retry, or drop them with "
                                 "`fusearray umount --discard` (ctl: sync all "
                                 "discard=yes)") from None
        async with self.lock:
            cache = self.cache
            for name in list(cache.errors):
                cache.retry_at.pop(name, None)
            try:
                await self.flush()         # a last try: what can be stored is
            except ArrayError:
                pass
            dropped: dict = {}
            for e in list(cache.dirty):
                if e.vol.pack.name in cache.errors or "*" in cache.errors:
                    dropped[e.vol] = dropped.get(e.vol, 0) + e.vol.block_size
                    cache.drop(e)
            cache.recount_stuck()
            total = sum(dropped.values())
            if total:
                self.event("warning", f"dropped {human_bytes(total)} of acknowledged "
                           f"writes that could not be stored ({per_volume(dropped)}), "
                           "as asked (sync all discard=yes, `fusearray umount --discard`);"
                           " those blocks read as they were before the writes")
            await self.commit()
        await self.sync(None)
        return {"unstored_bytes": 0, "dropped_bytes": total}

    def unstored(self) -> dict:
        """{volume: bytes} of dirty blocks of packs that refused them."""
        cache = self.cache
        out: dict = {}
        for e in cache.dirty:
            if e.vol.pack.name in cache.errors or "*" in cache.errors:
                out[e.vol] = out.get(e.vol, 0) + e.vol.block_size
        return out

    def _log_may(self, vol) -> bool:
        """The intent log may make `vol`'s writes (None: all) durable: its
        pack (every pack) has no write-back error and room for every dirty
        block with a margin, so the commit behind the log will store them."""
        cache = self.cache
        if self.fatal is not None:      # nothing commits: the commit's EIO answers
            return False
        if cache.errors and cache.error_for(vol.pack.name if vol is not None else None):
            return False
        margin = cache.dirty_bytes + self.intent.pending_bytes + LOG_MARGIN
        for pack in ([vol.pack] if vol is not None else self.packs.values()):
            if pack.free_bytes() - pack.reserve - pack.slack < margin:
                return False
        return True

    def _coverage(self, seq: int) -> Coverage:
        """After a flush of everything acknowledged up to `seq`: what the
        commit covers for the intent log (intentlog.Coverage): all of it
        but, per volume, from the oldest write still in a dirty block."""
        stuck: dict = {}
        for e in self.cache.dirty:
            if e.seq <= seq:
                vid = e.vol.vid
                if e.seq - 1 < stuck.get(vid, seq):
                    stuck[vid] = e.seq - 1
        return Coverage(max(seq, self.intent.covered.seq), stuck)

    def _durable(self, vol) -> int:
        return self.durable_seq if vol is None else vol.durable_seq

    def not_stored_error(self, vol):
        """The error an fsync of `vol` (None: of everything) gets while
        some of its writes are not stored."""
        err = self.cache.error_for(vol.pack.name if vol is not None else None)
        if err is not None:
            return err
        what = f"{vol.kind} {vol.path}" if vol is not None else "the array"
        return ioerror(f"writes to {what} are not stored yet (the last write-back "
                       "did not take them); the fsync failed, retry it")

    def _mark_durable(self, seq: int) -> None:
        """After a commit of everything stored when it started, `seq` the
        last write acknowledged then: each volume's writes up to `seq` are
        durable but those still in a dirty block (a full or failed pack)."""
        oldest: dict = {}
        low = seq + 1
        for e in self.cache.dirty:
            if e.seq <= seq:
                v = e.vol
                if e.seq < oldest.get(v, low):
                    oldest[v] = e.seq
        for v in self.volumes.values():
            v.durable_seq = max(v.durable_seq, oldest.get(v, low) - 1)
        self.durable_seq = max(self.durable_seq, min(oldest.values(), default=low) - 1)

    # ---- admission control (a Volume's `admission`) -------------------------------
    async def pack_writable(self, pack) -> None:
        """A write to `pack`, whose last write-back failed, may go on only
        once its unstored blocks are stored (raises the pack's error
        otherwise). Space may have come back since: a statvfs (in a worker
        thread) says so for the host's file system; a delete or a punch
        hole frees space at the next collection, run here if one is due.
        Then the pack's blocks are written back at once, without waiting
        for the retry back-off."""
        cache = self.cache
        err = cache.error_for(pack.name)
        if err is None:
            return
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            await trio.to_thread.run_sync(pack.refresh_space_blocking)
            if not self._has_room(pack) and not self._frees_pending(pack):
                raise err                   # still full, and nothing freed since
        elif time.monotonic() < cache.retry_at.get(pack.name, 0):
            raise err                       # a failed disk: retried after the back-off
        async with self.lock:
            if cache.error_for(pack.name) is None:
                return                      # stored meanwhile
            cache.retry_at.pop(pack.name, None)
            try:
                if self._has_room(pack) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    await self.flush()
                else:
                    await self.collector.collect()  # frees what was deleted or punched; retries
            except ArrayError:
                pass
        err = cache.error_for(pack.name)
        if err is not None:
            raise err

    async def admit(self, vol, off: int, end: int) -> None:
        """Admission control near a full pack: a write is acknowledged only
        if its pack can store it, so a full pack refuses the write itself
        (ENOSPC) and never the fsync after it (that is left to space taken
        from outside and to failed disks). Every block already dirty in the
        cache is counted as needing its space. New data may not use the
        pack's `slack`; overwrites of blocks the LUN already holds may (a
        file system's superblock, journal replay and metadata on a pack its
        data filled, so it can be mounted again and fstrim free it); the
        `reserve` below it is the collector's. A delete or punch hole not
        yet collected is collected here first."""
        pack, cache = vol.pack, self.cache
        if pack.state == "failed":
            return          # no space figure to go by: its write-back says EIO
        bs = vol.block_size
        first, last = off // bs, (end - 1) // bs
        need = sum(bs for b in range(first, last + 1)
                   if not ((e := vol.cache.get(b)) is not None and e.dirty))
        collected = False
        while True:
            await trio.to_thread.run_sync(pack.refresh_space_blocking)
            dirty = sum(e.vol.block_size for e in cache.dirty
                        if e.buf is not None and e.vol.pack is pack)
            room = pack.free_bytes() - pack.reserve - dirty - need
            if room >= pack.slack:
                pack.admit_refused = False
                return
            if room >= 0:
                held = True
                for b in range(first, last + 1):
                    e = vol.cache.get(b)
                    if e is not None and e.buf is not None:
                        continue
                    if e is not None or await vol.current_id(b) == ZERO_ID:
                        held = False
                        break
                if held:
                    pack.admit_refused = False
                    return
            if collected:
                break
            collected = True
            # wait for the lock before refusing: a GC another write started
            # clears the collector's `wanted` at its start, so without
            # waiting a write racing it saw nothing pending and was refused
            # (ENOSPC) just before that GC freed the space; then look once more
            async with self.lock:
                if self._frees_pending(pack):
                    try:
                        await self.collector.collect()
                    except ArrayError:
                        pass
        msg = (f"pack {pack.name} is full: {human_bytes(max(pack.free_bytes(), 0))} free, "
               f"{human_bytes(pack.reserve + pack.slack)} of it kept for collection and "
               "overwrites; the write was refused with ENOSPC. Free space: delete LUNs "
               "or shadow copies, punch holes / fstrim")
        if not pack.admit_refused:
            pack.admit_refused = True
            self.event("error", msg)
        raise nospace(msg)

    def _frees_pending(self, pack) -> bool:
        """Something may free space in `pack` at the next collection: a
        delete or overwrite since the last one, or a punched block not yet
        written back."""
        return self.collector.wanted or any(e.buf is None and e.vol.pack is pack
                                            for e in self.cache.dirty)

    def _has_room(self, pack) -> bool:
        """As of its last statvfs, `pack` can take its stuck dirty blocks."""
        stuck = sum(e.vol.block_size for e in self.cache.dirty if e.vol.pack is pack)
        return pack.free_bytes() >= pack.reserve + stuck + (1 << 20)

    async def retry_full_packs(self) -> None:
        """After GC freed space: a pack that refused writes for being full
        is retried at once (its blocks still dirty from the failed writes
        are flushed, which clears its error), or, with none left, its error
        is cleared. Writers then get in without waiting for the back-off.
        Caller holds `lock`."""
        cache = self.cache
        for pack in list(self.packs.values()):
            err = cache.errors.get(pack.name)
            if err is None or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                continue
            if pack.free_bytes() <= pack.reserve:
                continue                     # still full
            cache.retry_at[pack.name] = 0
            if any(e.vol.pack is pack for e in cache.dirty):
                try:
                    await self.flush()
                except ArrayError:
                    pass                     # still an error: writers keep getting it
            elif cache.errors.pop(pack.name, None) is not None:
                cache.recount_stuck()
                self.event("info", f"pack {pack.name} accepts writes again")
