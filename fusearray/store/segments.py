"""Segments: the active segment and its appends, their durability (sync,
with the write-again after a failed fsync), the spare files of dead
segments, retirement, and the reading guard.

Segments are write-once: a segment is appended to only by the mount that
created it, and deleted whole (or kept as a spare file for a new one)
once nothing in it is live. On-disk record: see records.py.

State and who touches it:
- `active_seq`, `active_tail`, `active_open`, `last_roll`, `spares`,
  `spare_bytes`, the raid5 tail row (layouts.py) and the unsynced
  bookkeeping (`unsynced_recs`, `new_segs`, `suspect`, `lost_writes`)
  are changed by the blocking methods (append_blocking and its
  roll_blocking, sync_blocking, retire_blocking, trim_spares_blocking),
  which run in worker threads while the caller holds the array's commit
  lock: one of them at a time, and no index change meanwhile. The trio
  thread reads them (segments(), the committer's idle check) and changes
  `active_open` (seal_if_sparse) under the same lock. `since_lost` reads
  and pops the unsynced bookkeeping from whichever thread loses a disk.
- `inflight`, `retired`, `unlink_later` and `unlinkable` (the reading
  guard) are the trio thread's.
- An fd is registered (files.py) before any index entry points into its
  segment, and closed only when no read is in flight on it.

Crash safety: anything appended after the last commit is unreferenced
garbage, removed at the next open (Pack.open_blocking).
"""
import contextlib
import errno
import time

from .media import seg_name, spare_name
from .records import HDR, IOV_MAX, MAGIC

SEGMENT_LIMIT = 64 << 20
SEGMENT_MIN = 4 << 20
SPARES = 8                # dead segment files kept for reuse (see retire_blocking)
SPARE_IDLE = 30.0         # seconds without a new segment before extra spares go


class Segments:
    """A pack's segments. `pack` gives the collaborators: its disks, fd
    table (`files`), disk health, layout strategy, block index (`blocks`),
    hasher and space accounting."""

    def __init__(self, pack):
        self.pack = pack
        self.active_seq = 0
        self.active_tail = 0
        self.active_open = False             # appends go to active_seq
        self.unsynced_recs: list = []        # (id, loc) appended since the last good sync
        self.new_segs: dict[int, set] = {}   # disk idx -> segments made since its dir's last fsync
        self.suspect: set = set()            # segments a failed fsync left in doubt
        self.lost_writes: str | None = None  # why every sync fails (see sync_blocking)
        self.spares: list[tuple[dict, int]] = []  # ({disk idx: file name}, free-space credit) of dead segments kept for reuse
        self.spare_bytes = 0
        self.spare_limit = SPARES            # spares kept (set at open, see retire_blocking)
        self.last_roll = 0.0                 # time.monotonic() of the last new segment
        self.seg_limit = SEGMENT_LIMIT       # set from the capacity at open
        self.inflight: dict[int, int] = {}
        self.retired: set[int] = set()       # deleted, fds closed when idle
        self.unlink_later: set[int] = set()  # retired, removed once idle (no fds)
        self.unlinkable: list[int] = []      # such, idle now: to remove (take_unlinkable)

    # ---- appends (worker thread, under the array's commit lock) ------------
    def roll_blocking(self) -> None:
        """Start a new segment (a spare file when there is one) on every
        online disk."""
        pack = self.pack
        if pack.health.state == "failed":
            raise OSError(errno.EIO, f"pack {pack.name} has failed: writes are refused")
        self.active_seq += 1
        seq = self.active_seq
        self.last_roll = time.monotonic()
        group: dict = {}
        if self.spares:
            group, credit = self.spares.pop()
            self.spare_bytes -= credit
        for d in pack.health.online():
            name, m = seg_name(seq), d.medium
            m.prepare()
            spare = group.pop(d.idx, None)
            if spare is not None:
                m.rename(spare, name)    # reuse its pages: no fresh allocation
                fd = m.open(name)
            else:
                fd = m.open(name, create=True)
            pack.files.add((d.idx, seq), fd)
            self.new_segs.setdefault(d.idx, set()).add(seq)
        for di, spare in group.items():  # of a disk that is no longer online
            try:
                pack.disks[di].medium.unlink(spare)
            except OSError:
                pass
        self.active_tail = 0
        self.active_open = True
        pack.strategy.row = None

    def append_blocking(self, records, reserve_ok: bool = False) -> list[tuple[int, int, int]]:
        """Append (id, data) records; return their locations. Caller
        serialises appends. All or nothing: on an error the segments are
        cut back to where they were. User data may not use the last
        `reserve` bytes of free space (GC compaction and map nodes may:
        `reserve_ok`), so a full pack can still free itself."""
        pack = self.pack
        if pack.health.state == "failed":
            raise OSError(errno.EIO, f"pack {pack.name} has failed: writes are refused "
                          "(too many disks are unavailable)")
        pack.refresh_space_blocking()
        if not reserve_ok:
            need = sum(len(d) + HDR.size for _, d in records)
            if pack.free_bytes() < pack.reserve + need:
                raise OSError(errno.ENOSPC, "No space left on the pack (the rest is "
                              "kept for garbage collection)")
        undo = (self.active_seq, self.active_tail, self.active_open, pack.strategy.row)
        try:
            locs = self._append(records)
        except OSError:
            self._undo_append(*undo)
            raise
        finally:
            pack.refresh_space_blocking()    # admission control counts on it
        self.unsynced_recs.extend(zip([bid for bid, _ in records], locs))
        return locs

    def _undo_append(self, seq, tail, was_open, row) -> None:
        pack = self.pack
        for s in range(seq + 1, self.active_seq + 1):     # segments this call made
            for d in pack.disks:
                fd = pack.files.take((d.idx, s))
                try:
                    if fd is not None:
                        d.medium.close(fd)
                    d.medium.unlink(seg_name(s))
                except OSError:
                    pass
        if was_open:
            end = pack.strategy.disk_bytes(tail)
            for d in pack.disks:
                fd = pack.files.fds.get((d.idx, seq))
                if fd is not None:
                    try:
                        d.medium.truncate(fd, max(end, 0))
                    except OSError:
                        pass
        self.active_seq, self.active_tail, self.active_open = seq, tail, was_open
        pack.strategy.row = row

    def _append(self, records) -> list[tuple[int, int, int]]:
        locs = []
        iov: list = []
        start = None
        for bid, data in records:
            n = len(data)
            full = not self.active_open or self.active_tail + HDR.size + n > self.seg_limit
            if full or len(iov) >= IOV_MAX:
                if iov:
                    self._write(iov, start)
                    iov = []
                if full:
                    self.roll_blocking()
            if not iov:
                start = self.active_tail
            iov.append(HDR.pack(MAGIC, bid, n))
            iov.append(data)
            locs.append((self.active_seq, self.active_tail + HDR.size, n))
            self.active_tail += HDR.size + n
        if iov:
            self._write(iov, start)
        return locs       # the caller's add() records them (and seg_size)

    def _write(self, iov, offset) -> None:
        self.pack.strategy.write(self.pack.files, self.active_seq, iov, offset)

    # ---- durability (worker thread, under the array's commit lock) ---------
    def sync_blocking(self) -> list:
        """Make every append so far durable (fsync the files written and the
        directories of new segment files), before the catalogue commits
        their index entries. Caller holds the array's commit lock (no
        append and no index change meanwhile). Returns [(id, loc)]: blocks
        that had to be written again, for add() on the trio thread.

        A failed fsync (of a file or a directory) on a disk the pack can do
        without fails that disk (the others hold the data). On the last
        disk holding the data it proves nothing stored since the last good
        sync, and a retried fsync of the same file would say 0 whatever
        happened (Linux reports a writeback error once: "fsyncgate"): the
        segments are sealed, their blocks appended since the last good sync
        are read back, checked against their ids and written again to a
        new segment, which is synced in turn (three tries). If a block no
        longer reads back right, or it never syncs, the data is lost:
        raises OSError(EIO), and every later call does too (`lost_writes`),
        so nothing after the last durable commit is committed."""
        if self.lost_writes:
            raise OSError(errno.EIO, self.lost_writes)
        moved: dict = {}
        for _ in range(3):
            self.suspect |= self._sync_once()
            if not self.suspect:
                self.unsynced_recs.clear()
                return list(moved.items())
            moved.update(self._write_again(moved))
        self.lost_writes = (f"pack {self.pack.name}: its disk keeps failing to sync what "
                            "was written since the last commit, even written again to new "
                            "segment files")
        return self._lost_writes()

    def _lost_writes(self):
        name = self.pack.name
        self.lost_writes += ("; fsync fails from now on and nothing more is committed: "
                             "remount the array to go back to its last durable state "
                             "(writes acknowledged since the last good fsync are lost), "
                             f"and check or replace the disk (`scrub {name}`)")
        self.pack.note("error", self.lost_writes)
        raise OSError(errno.EIO, self.lost_writes)

    def _sync_once(self) -> set:
        """fsync what was written; a disk that fails it is failed if the
        pack can do without it. Returns the segments left in doubt."""
        pack = self.pack
        files, health = pack.files, pack.health
        bad: dict = {}                       # disk idx -> [what failed, segments]
        for key in list(files.unsynced):
            fd = files.fds.get(key)
            if fd is not None:
                try:
                    pack.disks[key[0]].medium.fsync(fd)
                except OSError as e:
                    bad.setdefault(key[0], [f"fsync of segment {key[1]} failed: "
                                            f"{e.strerror}", set()])[1].add(key[1])
            files.unsynced.discard(key)
        for d in health.online():
            segs = self.new_segs.get(d.idx)
            if not segs:
                continue
            try:
                d.medium.sync_dir()
                self.new_segs.pop(d.idx, None)
            except OSError as e:
                b = bad.setdefault(d.idx, [f"fsync of its segment directory failed: "
                                           f"{e.strerror}", set()])
                b[1] |= segs
        doubt: set = set()
        for di, (what, segs) in bad.items():
            d = pack.disks[di]
            if d.state != "online":
                continue
            if health.can_lose(d):
                health.lose(d, "failed", f"{what}: what was written to it since the last "
                            "commit may be lost")
            else:
                pack.note("warning", f"disk {d.idx} of pack {pack.name} ({d.path}): {what}; "
                          "the blocks written since the last commit are read back, "
                          "checked and written again")
                doubt |= segs
        return doubt

    def _write_again(self, moved: dict) -> dict:
        """The blocks appended since the last good sync into a segment in
        doubt: sealed, read back, checked, appended anew. Returns
        {id: new loc}; raises (lost_writes) if one does not read back
        right."""
        pack = self.pack
        if self.active_open and self.active_seq in self.suspect:
            self.active_open = False
        records, lost = [], 0
        seen = set()
        for bid, loc in list(self.unsynced_recs):
            if loc[0] not in self.suspect or bid in seen \
                    or moved.get(bid, pack.blocks.lookup(bid)) != loc:
                continue          # written again already, or dropped by GC
            seen.add(bid)
            data = pack.strategy.read(pack.files, *loc)
            if data is not None and pack.hasher.verified(bid, data):
                records.append((bid, bytes(data)))
            else:
                lost += 1
        if lost:
            self.lost_writes = (f"pack {pack.name}: {lost} block(s) written since the last "
                                f"commit did not survive a failed fsync of segment(s) "
                                f"{sorted(self.suspect)} (they no longer read back right)")
            self._lost_writes()
        out = {}
        if records:
            locs = self.append_blocking(records, reserve_ok=True)
            out = {bid: loc for (bid, _), loc in zip(records, locs)}
        self.suspect.clear()
        return out

    def since_lost(self, d) -> int:
        """Disk `d` is leaving: the first segment it may lack (what it
        holds but never fsynced may be gone: a rebuild starts there). Its
        list of new segments to fsync the directory of is dropped."""
        # list(): one C-level copy under the GIL; iterating the set itself
        # could meet an append adding to it in another thread (a reader or
        # the disk check loses a disk without the commit lock) and raise
        # "Set changed size during iteration"
        unsynced = list(self.pack.files.unsynced)
        return min([self.active_seq] + [k[1] for k in unsynced if k[0] == d.idx]
                   + list(self.new_segs.pop(d.idx, ())))

    # ---- dead segments (worker thread, under the array's commit lock) -------
    def close_segment_blocking(self, seq: int) -> None:
        self.pack.files.close_segment(seq)

    def retire_blocking(self, seq: int, reuse: bool) -> None:
        """A dead segment (nothing in the committed index points into it):
        keep its file as a spare for the next segment, or delete it.

        Reusing a file overwrites pages the filesystem already has instead
        of allocating (and zeroing) new ones: on the bench VM, seq writes
        that kept allocating fresh segment memory ran at ~340 MB/s (the
        profile: the copy into new tmpfs pages), with reuse ~1.4 GB/s. A
        spare is one file per online disk; its space counts as free
        (free_bytes, per disk as the layout uses it), and the caller keeps
        none on a tight pack. Up to `spare_limit` (half the pack's
        segments) are kept: under steady overwrites one GC finds 40-110
        segments dead at once on the bench (1 GiB LUN, 9 GiB pack), and with
        8 kept, 258 of 298 new segments were fresh files; with the limit at
        half the pack, 103 of 378 (the first GC's among them). The space
        was garbage until then anyway, so keeping it raises no peak; spares
        past SPARES go after SPARE_IDLE seconds without a new segment
        (trim_spares_blocking). A reused file holds old bytes past the new
        segment's end: nothing reads there, and RAID-5 zeroes the rest of
        each row it starts (see Raid5.write) so parity stays exact."""
        pack = self.pack
        keep = reuse and len(self.spares) < self.spare_limit and \
            all(d.medium.renames for d in pack.disks)
        group: dict = {}
        sizes = []
        for d in pack.disks:
            if d.state == "missing":
                continue
            name, m = seg_name(seq), d.medium
            try:
                if keep and d.state == "online":
                    spare = spare_name(seq)
                    m.rename(name, spare)
                    group[d.idx] = spare
                    sizes.append(m.allocated(spare))
                else:
                    m.unlink(name)
                self.fsync_dir_quietly(d)
            except FileNotFoundError:
                pass
        if group:
            credit = min(sizes) * pack.strategy.k
            self.spares.append((group, credit))
            self.spare_bytes += credit
        self.close_segment_blocking(seq)
        pack.refresh_space_blocking()

    def trim_spares_blocking(self, keep: int = SPARES) -> int:
        """Delete spares beyond `keep` (the array calls this when no new
        segment was started for SPARE_IDLE seconds). Returns how many went.
        Caller serialises with appends and retire_blocking."""
        gone = 0
        while len(self.spares) > keep:
            group, credit = self.spares.pop(0)
            self.spare_bytes -= credit
            for di, spare in group.items():
                try:
                    self.pack.disks[di].medium.unlink(spare)
                except OSError:
                    pass
            gone += 1
        if gone:
            for d in self.pack.health.online():
                self.fsync_dir_quietly(d)
            self.pack.refresh_space_blocking()
        return gone

    def fsync_dir_quietly(self, d) -> None:
        """After a dead segment was deleted or made a spare: if that does
        not last (a failed directory fsync, then a crash), the next open
        deletes the file again (nothing points into it)."""
        try:
            d.medium.sync_dir()
        except OSError as e:
            self.pack.health.disk_error(d, f"fsync of its segment directory failed: "
                                           f"{e.strerror}")

    def unlink_segment_blocking(self, seq: int) -> None:
        for d in self.pack.disks:
            try:
                d.medium.unlink(seg_name(seq))
            except OSError:
                continue
            self.fsync_dir_quietly(d)
        self.pack.refresh_space_blocking()

    # ---- the reading guard (trio thread) -----------------------------------
    @contextlib.contextmanager
    def reading(self, segs):
        """Segments a worker thread reads inside this block: none of their
        files is closed (or, on a medium without fds, removed) until the
        read is over: a dead segment retired meanwhile is closed (or made
        ready to remove, `unlinkable`) when its last reader leaves.
        Entered and left on the trio thread."""
        segs = list(segs)
        for s in segs:
            self.inflight[s] = self.inflight.get(s, 0) + 1
        try:
            yield
        finally:
            for s in segs:
                self.inflight[s] -= 1
                if not self.inflight[s]:
                    del self.inflight[s]
                    if s in self.retired:
                        self.retired.discard(s)
                        if s in self.unlink_later:
                            self.unlink_later.discard(s)
                            self.unlinkable.append(s)
                        else:
                            self.close_segment_blocking(s)

    def drop_dead_segment(self, seq: int) -> str:
        """Trio thread, after the commit that dropped a dead segment's
        entries: forget it. What the caller does with its files:
        - "retire": nothing reads it; retire it now (retire_blocking);
        - "unlink": a read is in flight and its handles are fds: unlink it
          now (unlink_segment_blocking); a file held open keeps its data
          and the fds are closed when the last reader leaves;
        - "later": a read is in flight on a medium without fds (RADOS,
          where removing the object pulls the bytes from under the read:
          the read would fail, or find another segment's bytes, and count
          that against the disk): nothing now; once the last reader has
          left it is in `take_unlinkable()`, for the caller to retire after
          a later commit. A crash before leaves it unreferenced: removed at
          the next open."""
        self.pack.blocks.forget_segment(seq)
        if not self.inflight.get(seq):
            return "retire"
        self.retired.add(seq)
        if all(d.medium.fds for d in self.pack.disks):
            return "unlink"
        self.unlink_later.add(seq)
        return "later"

    def take_unlinkable(self) -> list[int]:
        """Trio thread: the dead segments whose removal waited for their
        last reader (drop_dead_segment's "later"), now idle; the caller
        retires them (retire_blocking, no reuse)."""
        out, self.unlinkable = self.unlinkable, []
        return out

    # ---- which segments, how long (any thread: reads of single values) -----
    def is_active(self, seq: int) -> bool:
        return self.active_open and seq == self.active_seq

    def seal_if_sparse(self, ratio: float = 0.5) -> None:
        """Close the active segment to appends when most of it is garbage,
        so GC can reclaim it."""
        blocks = self.pack.blocks
        s = self.active_seq
        if self.active_open and s in blocks.seg_size:
            if blocks.seg_live.get(s, 0) < blocks.seg_size[s] * ratio:
                self.active_open = False

    def disk_file_size(self, seq: int) -> int:
        size = self.active_tail if seq == self.active_seq and self.active_open \
            else self.pack.blocks.seg_size.get(seq, 0)
        return self.pack.strategy.disk_bytes(size)

    def sealed(self) -> list[int]:
        """Segments whose files every online disk must have."""
        return [s for s in self.pack.blocks.seg_size if s not in self.retired]

    def segments(self) -> list[int]:
        segs = set(self.pack.blocks.seg_size)
        if self.active_open:
            segs.add(self.active_seq)
        return sorted(s for s in segs if s not in self.retired)

    def stable_size(self, seq: int) -> int:
        """Disk bytes of a segment that appends can no longer change (for
        raid5 the tail row's parity still moves)."""
        size = self.disk_file_size(seq)
        if seq == self.active_seq and self.active_open:
            return self.pack.strategy.stable_bytes(self.active_tail)
        return size
