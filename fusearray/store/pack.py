"""A pack: a set of disks (host directories) with one layout, holding
content-addressed blocks in append-only segment files.

`Pack` is the store's face to the array: it builds its collaborators,
each the owner of one concern, and passes calls on to them:

- `strategy` (layouts.py): the layout (Single, Mirror, Raid5);
- `health` (disks.py): the disks' states and the rules of failing one;
- `files` (files.py): the fd table, the mappings, one disk's bytes;
- `blocks` (index.py): the block index and per-segment accounting;
- `segs` (segments.py): appends, sync, spares, retirement, reading guard;
- `reads` (reads.py): verified reads, healing, page-cache and mapped reads;
- rebuild and scrub (repair.py).

It owns opening and closing, and the space accounting (capacity, free
space, the reserve only GC may use, the slack only overwrites may use).
It knows nothing of LUNs, maps or snapshots: garbage collection asks the
layer above for the set of live ids (`sweep`). Threads and locks: see
the package docstring (fusearray/store/__init__.py).

Crash safety: the index is persisted by the catalogue in the same SQLite
transaction as the map roots, after `sync_blocking()`. Anything appended
after the last commit is unreferenced garbage: open_blocking deletes the
segment files nothing points into and cuts the others back to their
committed end (raid5 keeps whole rows).

Disk faults (see Segments.sync_blocking and DiskHealth): a disk whose
write or fsync fails while another holds the data (mirror, healthy raid5)
is failed at once, like md; the last disk holding the data is never
failed (that would only make the rest unreadable): its errors go to the
caller. A failed fsync does not mean the data is stored, nor does a later
fsync of the same file that succeeds (Linux reports a writeback error
once): the blocks written since the last good sync are read back, checked
against their ids and written again to a new segment; any that no longer
read back right are lost, and from then on every sync fails (nothing more
is committed, so a restart returns to the last durable state).
"""
from . import repair
from .disks import Disk, DiskHealth
from .files import SegmentFiles
from .hasher import Hasher
from .index import DEFAULT_INDEX_CACHE, BlockIndex
from .layouts import layout_for
from .reads import Reads
from .records import NOWAIT
from .segments import SEGMENT_LIMIT, SEGMENT_MIN, SPARES, Segments


def _passed_on(part: str, name: str, settable: bool = False) -> property:
    """A Pack attribute that is collaborator `part`'s `name`."""
    def get(self):
        return getattr(getattr(self, part), name)

    def put(self, value):
        setattr(getattr(self, part), name, value)
    return property(get, put if settable else None,
                    doc=f"{part}.{name}" + (" (settable)" if settable else ""))


class Pack:
    """A pack: segments over its disks with one layout (see the module
    docstring). Messages for the event log are queued in `notes` (threads
    append, the array drains them on the trio thread)."""

    def __init__(self, name: str, layout: str, disks: list[Disk], hasher: Hasher,
                 index_cache: int = DEFAULT_INDEX_CACHE, filter_bytes: int = 0):
        self.name = name
        self.layout = layout
        self.disks = disks
        self.hasher = hasher
        self.notes: list[tuple[str, str]] = []   # (level, message) for the event log
        self.strategy = layout_for(layout, len(disks))
        self.health = DiskHealth(self)
        # no-wait reads on the loop need fds (a RADOS pack's reads go to threads)
        self.files = SegmentFiles(disks, self.health,
                                  NOWAIT if all(d.medium.fds for d in disks) else None)
        self.blocks = BlockIndex(index_cache, filter_bytes)
        self.segs = Segments(self)
        self.reads = Reads(self)
        self._space = None        # (capacity, available) from the last statvfs
        self.reserve = 2 * SEGMENT_LIMIT     # free space only GC may use
        # above the reserve: free space only overwrites of blocks a LUN
        # already holds may use (a file system's superblock and journal
        # replay on a pack that new data filled), see Array.admit
        self.slack = SEGMENT_LIMIT
        self.admit_refused = False           # the array logged a refused write

    # what the array, recovery, fsck and the tests read of the collaborators
    seg_live = _passed_on("blocks", "seg_live")
    seg_size = _passed_on("blocks", "seg_size")
    active_seq = _passed_on("segs", "active_seq")
    active_tail = _passed_on("segs", "active_tail")
    active_open = _passed_on("segs", "active_open", settable=True)
    last_roll = _passed_on("segs", "last_roll", settable=True)
    seg_limit = _passed_on("segs", "seg_limit", settable=True)
    spares = _passed_on("segs", "spares")
    spare_bytes = _passed_on("segs", "spare_bytes")
    spare_limit = _passed_on("segs", "spare_limit", settable=True)
    lost_writes = _passed_on("segs", "lost_writes")
    mapped_reads = _passed_on("reads", "mapped_reads")
    run_reads = _passed_on("reads", "run_reads")
    lost_reads = _passed_on("reads", "lost_reads")

    @property
    def disk(self) -> Disk:
        return self.disks[0]

    @property
    def k(self) -> int:
        return self.strategy.k

    def online(self) -> list[Disk]:
        return self.health.online()

    @property
    def state(self) -> str:
        return self.health.state

    def note(self, level: str, msg: str) -> None:
        self.notes.append((level, msg))

    # ---- disks ---------------------------------------------------------------
    def check_disks_blocking(self, array_uuid: str | None = None,
                             segs: list | None = None) -> None:
        """Notice disks that vanished or came back (run every few seconds).
        `segs`: the segments every online disk must hold (from sealed(),
        taken on the trio thread)."""
        self.health.check_blocking(array_uuid, segs)
        self.refresh_space_blocking()

    def close_disk_files(self, d: Disk) -> None:
        """Close disk `d`'s segment files (and drop their mappings): it
        left the pack, or is being replaced. Any thread."""
        self.files.close_disk(d)

    # ---- open / close (blocking) -------------------------------------
    def open_blocking(self, rows, array_uuid: str | None = None) -> list[int]:
        """Take the committed index `rows` (the catalogue's PackRows, or a
        list of (id, seg, off, len) held in RAM) and open the segments: one
        step a segment, none a block. Segment files nothing points into are
        crash garbage and are deleted. Returns the deleted segment numbers."""
        ends = self.blocks.open(rows)
        removed: set = set()
        top = 0
        for d in self.disks:
            d.refresh_info()
            label = d.label_state(self.name, array_uuid) if d.state == "online" else "ok"
            if label in ("error", "fenced"):
                label = "invalid"
            if label != "ok":
                d.state, d.since = label, 0
                self.note("error", f"disk {d.idx} of pack {self.name} ({d.path}) is "
                          f"{label}: " + (d.why_missing() if label == "missing" else
                                          "its label is unreadable or belongs elsewhere")
                          + f"; run `recover {self.name}`")
            elif d.state in ("missing", "failed") and \
                    d.label_state(self.name, array_uuid) == "ok":
                d.state = "stale"
            if d.state in ("missing", "invalid"):
                continue
            m = d.medium
            try:
                names = sorted(m.names())
            except FileNotFoundError:
                continue
            present: set = set()
            for fn in names:
                if fn.endswith(".spare") or (fn.endswith(".seg") and int(fn[:-4]) not in ends):
                    m.unlink(fn)
                    if fn.endswith(".seg"):
                        removed.add(int(fn[:-4]))
                    continue
                if not fn.endswith(".seg"):
                    continue
                seq = int(fn[:-4])
                top = max(top, seq)
                if d.state != "online":
                    continue
                fd = m.open(fn)
                self.files.add((d.idx, seq), fd)
                present.add(seq)
                if self.strategy.trims_tails and m.size(fd) > ends[seq]:
                    m.truncate(fd, ends[seq])   # uncommitted or recycled tail
            if removed:
                m.sync_dir()
            lacking = set(ends) - present
            if d.state == "online" and lacking:
                d.state, d.since = "stale", min(lacking)
                self.note("error", f"disk {d.idx} of pack {self.name} ({d.path}) lacks "
                          f"{len(lacking)} segment file(s): it is stale; run "
                          f"`recover {self.name}`")
                self.close_disk_files(d)
        self.refresh_space_blocking()
        cap = self.capacity_bytes()
        segs = self.segs
        if cap:   # small packs get small segments, so garbage frees space sooner
            segs.seg_limit = max(SEGMENT_MIN, min(SEGMENT_LIMIT, cap // 32))
            # enough spares for the segments one GC finds dead at once
            segs.spare_limit = max(SPARES, cap // 2 // segs.seg_limit)
        # free space is logical (a mirror's least free disk), and so is this
        self.reserve = 2 * segs.seg_limit
        self.slack = segs.seg_limit
        top = max([top] + list(ends))
        segs.active_seq = top      # a new segment is started on first append
        segs.active_tail = 0
        return sorted(removed)

    @property
    def records_commits(self) -> bool:
        return any(d.records_commits for d in self.disks)

    def mark_commit_blocking(self, rec: dict) -> None:
        """The array's commit record on each online disk that keeps one
        (Disk.mark_commit). A disk that fails it keeps the older record
        (a later commit writes it again): nothing else depends on it."""
        for d in self.disks:
            if d.state == "online" and d.records_commits:
                try:
                    d.mark_commit(rec)
                except OSError:
                    pass

    def close_blocking(self) -> None:
        self.files.close_all()
        self.blocks.close()
        for d in self.disks:
            d.release_lease()           # a rados disk: the next mount may take it at once

    # ---- segments (segments.py) ------------------------------------------
    def append_blocking(self, records, reserve_ok: bool = False) -> list[tuple[int, int, int]]:
        return self.segs.append_blocking(records, reserve_ok)

    def sync_blocking(self) -> list:
        return self.segs.sync_blocking()

    def close_segment_blocking(self, seq: int) -> None:
        self.segs.close_segment_blocking(seq)

    def retire_blocking(self, seq: int, reuse: bool) -> None:
        self.segs.retire_blocking(seq, reuse)

    def trim_spares_blocking(self, keep: int = SPARES) -> int:
        return self.segs.trim_spares_blocking(keep)

    def unlink_segment_blocking(self, seq: int) -> None:
        self.segs.unlink_segment_blocking(seq)

    def reading(self, segs):
        return self.segs.reading(segs)

    def drop_dead_segment(self, seq: int) -> str:
        return self.segs.drop_dead_segment(seq)

    def take_unlinkable(self) -> list[int]:
        return self.segs.take_unlinkable()

    def seal_if_sparse(self, ratio: float = 0.5) -> None:
        self.segs.seal_if_sparse(ratio)

    def disk_file_size(self, seq: int) -> int:
        return self.segs.disk_file_size(seq)

    def sealed(self) -> list[int]:
        return self.segs.sealed()

    def segments(self) -> list[int]:
        return self.segs.segments()

    def stable_size(self, seq: int) -> int:
        return self.segs.stable_size(seq)

    # ---- index (index.py; trio thread) ---------------------------------------
    def lookup(self, bid: bytes, dedup: bool = False):
        """`dedup`: is new data stored already (BlockIndex.lookup_cached)."""
        return self.blocks.lookup(bid, dedup)

    def lookup_cached(self, bid: bytes, dedup: bool = False):
        """lookup without I/O: index.UNCACHED if only the committed view
        knows (then read_rows_blocking in a worker thread, and learn)."""
        return self.blocks.lookup_cached(bid, dedup)

    def read_rows_blocking(self, ids, dedup: bool = False) -> tuple:
        return self.blocks.read_rows_blocking(ids, dedup)

    def index_generation(self) -> int:
        """Commits ended so far (BlockIndex.generation: lookups)."""
        return self.blocks.generation

    def learn(self, gen: int, ids, found: dict) -> dict:
        return self.blocks.learn(gen, ids, found)

    def add(self, bid: bytes, loc) -> None:
        self.blocks.add(bid, loc)

    def drop(self, dead) -> int:
        return self.blocks.drop(dead)

    def take_pending(self):
        return self.blocks.take_pending()

    # ---- reference counts (index.py records them; refs.py decides them) ---------
    def ref(self, bid: bytes, delta: int) -> None:
        self.blocks.ref(bid, delta)

    def mark_counted(self, bid: bytes) -> None:
        self.blocks.mark_counted(bid)

    def refs_blocking(self, ids) -> dict:
        return self.blocks.refs_blocking(ids)

    def unreferenced_blocking(self) -> list:
        return self.blocks.unreferenced_blocking()

    def count_change(self, bid: bytes) -> int:
        """The change of `bid`'s count since the last commit."""
        return self.blocks.pending_refs.get(bid, 0)

    def changed_since_commit(self) -> set:
        """The ids that may have lost their last reference since the last
        commit: those added, and those whose count went down."""
        return set(self.blocks.pending_add) | {b for b, d in self.blocks.pending_refs.items()
                                               if d < 0}

    def committed(self) -> None:
        self.blocks.committed()

    def has_pending(self) -> bool:
        return self.blocks.has_pending()

    def uncommitted_ids(self) -> set:
        return self.blocks.uncommitted()

    def block_count(self) -> int:
        return self.blocks.count()

    def pending_changes(self) -> int:
        """Index rows the next commit writes."""
        return self.blocks.pending_changes()

    def index_status(self) -> dict:
        return self.blocks.cache.status()

    def filter_status(self) -> dict | None:
        """The dedup filter's size, state and estimated false positives."""
        return self.blocks.filter_status()

    def filter_bytes(self) -> int:
        """RAM the dedup filter holds (0: none)."""
        st = self.blocks.filter_status()
        return st["bytes"] if st else 0

    def build_filter_blocking(self) -> bool:
        """Worker thread: the dedup filter's pass over the committed ids."""
        return self.blocks.build_filter_blocking()

    def save_filter_blocking(self, path: str, tag: str) -> bool:
        return self.blocks.save_filter_blocking(path, tag)

    def load_filter_blocking(self, path: str, tag: str) -> bool:
        return self.blocks.load_filter_blocking(path, tag)

    def stop_filter(self) -> None:
        """A build in progress ends at its next batch (any thread)."""
        self.blocks.filter_stop.set()

    def resize_index_cache(self, limit_bytes: int) -> None:
        """The pack's share of --index-cache changed (a pack was added)."""
        self.blocks.cache.resize(limit_bytes)

    def dead_segments(self) -> list[int]:
        return self.blocks.dead_segments(self.segs.is_active)

    def sparse_segments(self, ratio: float = 0.5) -> list[int]:
        return self.blocks.sparse_segments(self.segs.is_active, ratio)

    def entries_in(self, seq: int) -> list[tuple[bytes, tuple]]:
        return self.blocks.entries_in(seq)

    def forget_segment(self, seq: int) -> None:
        self.blocks.forget_segment(seq)

    def scan_blocking(self):
        """Every index entry (id, loc), in batches (worker thread)."""
        return self.blocks.scan_blocking()

    def index_problems_blocking(self) -> list[str]:
        return self.blocks.problems_blocking(self.name, self.disks)

    # ---- reads (reads.py) -----------------------------------------------------
    def read_blocking(self, bid: bytes, loc) -> bytes:
        return self.reads.read_blocking(bid, loc)

    def read_many_blocking(self, bids, locs) -> list:
        return self.reads.read_many_blocking(bids, locs)

    def read_nowait(self, bid: bytes, loc):
        return self.reads.read_nowait(bid, loc)

    def read_into_nowait(self, bid: bytes, loc, dst) -> bool:
        return self.reads.read_into_nowait(bid, loc, dst)

    def read_many_into_nowait(self, items) -> list:
        return self.reads.read_many_into_nowait(items)

    def mapped_blocks(self, bids, locs) -> list:
        return self.reads.mapped_blocks(bids, locs)

    # ---- rebuild and scrub (repair.py) ------------------------------------------
    def rebuild_plan(self, d: Disk, segs: list) -> list[tuple[int, int]]:
        return repair.rebuild_plan(self, d, segs)

    def rebuild_piece_blocking(self, d: Disk, seq: int, off: int, n: int) -> int:
        return repair.rebuild_piece_blocking(self, d, seq, off, n)

    def rejoin_blocking(self, d: Disk, array_uuid: str, segs: list) -> None:
        repair.rejoin_blocking(self, d, array_uuid, segs)

    def scrub_segment_blocking(self, seq: int, entries) -> tuple[int, int]:
        return repair.scrub_segment_blocking(self, seq, entries)

    # ---- accounting ------------------------------------------------------
    def data_bytes(self) -> int:
        """Logical: the bytes in the pack's segments, before redundancy."""
        return self.blocks.data_bytes()

    def used_bytes(self) -> int:
        """Physical: every disk's share, redundancy included."""
        return self.strategy.physical(self.data_bytes())

    def refresh_space_blocking(self) -> None:
        """statvfs the disks (a worker thread: a hung disk must not stall
        the trio thread) for capacity_bytes and free_bytes: the least of
        the disks times the data disks. Called after every append, segment
        retirement and disk check, and at open. When no disk answers (a
        Ceph cluster that does not, a hung directory), what was known
        stays: a pack that cannot say its space is not full, and a write
        to it then fails with the disks' own error (EIO, the cluster does
        not answer), never ENOSPC (which tells the user to delete data)."""
        spaces = []
        for d in self.disks:
            try:
                spaces.append(d.medium.space())
            except OSError:
                continue
        if not spaces:
            if self._space is None:
                self._space = (0, 0)
            return
        self._space = (min(c for c, _ in spaces) * self.k, min(f for _, f in spaces) * self.k)

    def _space_now(self) -> tuple[int, int]:
        if self._space is None:        # not opened through open_blocking
            self.refresh_space_blocking()
        return self._space

    def capacity_bytes(self) -> int:
        """What the pack can hold (usable, after redundancy), as of the
        last refresh."""
        return self._space_now()[0]

    def free_bytes(self) -> int:
        """Free space as of the last refresh (plus spare segment files)."""
        return self._space_now()[1] + self.segs.spare_bytes

