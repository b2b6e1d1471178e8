"""Block store: content-addressed blocks in append-only segment files.

A pack is a set of disks (host directories) with one layout; this module
owns the pack's segment files and its block index (block id -> location).
It knows nothing of LUNs, maps or snapshots: garbage collection asks the
layer above for the set of live ids (`Pack.sweep`).

On-disk record (one per block): header `MAGIC | id (16) | length (u32)`, then
the data. Segments are write-once: a segment is appended to only by the
mount that created it, and deleted whole once nothing in it is live.

Concurrency contract:
- The index, the live-byte counts and `pending_*` are touched only from the
  trio thread.
- Methods ending in `_blocking` run in worker threads and touch only files
  and the fd table. Appends are serialised by the caller (the array's
  committer); reads may run concurrently with appends and with each other.
- A segment's fd is registered before any index entry points into it, and
  closed only when no read is in flight on it (`inflight`).

Crash safety: the index is persisted by the catalogue in the same SQLite
transaction as the map roots, after `sync_blocking()`. Anything appended
after the last commit is unreferenced garbage, removed at the next open.

Disk faults (see sync_blocking and _write): a disk whose write or fsync
fails while another holds the data (mirror, healthy raid5) is failed at
once, like md; the last disk holding the data is never failed (that would
only make the rest unreadable): its errors go to the caller. A failed
fsync does not mean the data is stored, nor does a later fsync of the same
file that succeeds (Linux reports a writeback error once): the blocks
written since the last good sync are read back, checked against their ids
and written again to a new segment; any that no longer read back right are
lost, and from then on every sync fails (nothing more is committed, so a
restart returns to the last durable state).
"""
import contextlib
import errno
import mmap
import os
import threading
import time

from ..errors import ChecksumError
from ..perms import FILE_MODE, private_dir
from .disks import ERROR_LIMIT, Disk
from .hasher import Hasher
from .records import (HDR, IOV_MAX, MAGIC, NOT_THE_DISK, NOWAIT, Gather, fsync_dir, in_memory,
                      pwritev_all, scratch, verify_mapped, xor, xor_at)

SEGMENT_LIMIT = 64 << 20
SEGMENT_MIN = 4 << 20
SPARES = 8                # dead segment files kept for reuse (see retire_blocking)
SPARE_IDLE = 30.0         # seconds without a new segment before extra spares go
CHUNK = 64 << 10          # raid5 stripe unit
MAPS_MAX = 64             # segment files kept mapped for reads


class Pack:
    """A pack: segments over its disks with one layout.

    - single: each segment is one file on the pack's one disk.
    - mirror: the same file, byte for byte, on every disk (2 or 3).
    - raid5:  a segment's logical bytes are cut in CHUNK-sized pieces laid
      out in rows over k = n-1 data disks plus one XOR parity chunk per row,
      the parity disk rotating with the row. Disk file offset of row r is
      r * CHUNK on every disk.

    Reads are verified against the block id. A missing disk, a read error
    or a mismatch falls back to another copy (mirror) or reconstruction from
    the other disks (raid5), and the bad piece is rewritten in place
    (segments are otherwise write-once, so that is safe). Messages for the
    event log are queued in `notes` (threads append, the array drains them).
    """

    def __init__(self, name: str, layout: str, disks: list[Disk], hasher: Hasher):
        self.name = name
        self.layout = layout
        self.disks = disks
        self.hasher = hasher
        # trio-thread state
        self.index: dict[bytes, tuple[int, int, int]] = {}   # id -> (seg, off, len)
        self.seg_live: dict[int, int] = {}                   # seg -> live record bytes
        self.seg_size: dict[int, int] = {}                   # seg -> logical bytes
        self.pending_add: dict[bytes, tuple[int, int, int]] = {}
        self.pending_del: set[bytes] = set()
        self.inflight: dict[int, int] = {}
        self.retired: set[int] = set()       # deleted, fds closed when idle
        # file state (appender thread + readers)
        self.fds: dict[tuple[int, int], int] = {}            # (disk idx, seg) -> fd
        # (disk idx, seg) -> (fd, read-only map of the file, on tmpfs/ramfs): see mapped_blocks
        self._maps: dict[tuple[int, int], tuple[int, memoryview, bool]] = {}
        self._mem_paths: dict[str, bool] = {}
        self._lock = threading.Lock()        # fd table
        self.active_seq = 0
        self.active_tail = 0
        self.active_open = False             # appends go to active_seq
        self._unsynced: set[tuple[int, int]] = set()
        self._unsynced_recs: list = []       # (id, loc) appended since the last good sync
        self._new_segs: dict[int, set] = {}  # disk idx -> segments made since its dir's last fsync
        self._suspect: set = set()           # segments a failed fsync left in doubt
        self.lost_writes: str | None = None  # why every sync fails (see sync_blocking)
        self.spares: list[tuple[dict, int]] = []  # ({disk idx: path}, free-space credit) of dead segments kept for reuse
        self.spare_bytes = 0
        self.spare_limit = SPARES            # spares kept (set at open, see retire_blocking)
        self.last_roll = 0.0                 # time.monotonic() of the last new segment
        self._space = None        # (capacity, available) from the last statvfs
        self.notes: list[tuple[str, str]] = []   # (level, message) for the event log
        self._row: tuple | None = None       # raid5: (seg, row, bytearray) of the tail row
        self.seg_limit = SEGMENT_LIMIT       # set from the capacity at open
        self._nowait = NOWAIT               # preadv2 flags for reads on the loop
        self._gap = bytearray(HDR.size)      # where record headers go in a run read
        self.reserve = 2 * SEGMENT_LIMIT     # free space only GC may use
        # above the reserve: free space only overwrites of blocks a LUN
        # already holds may use (a file system's superblock and journal
        # replay on a pack that new data filled), see Array.admit
        self.slack = SEGMENT_LIMIT
        self.admit_refused = False           # the array logged a refused write
        self.lost_reads = 0
        self.mapped_reads = 0     # blocks served verified where they lie (mapped_blocks)

    @property
    def disk(self) -> Disk:
        return self.disks[0]

    @property
    def k(self) -> int:
        return len(self.disks) - 1 if self.layout == "raid5" else 1

    def online(self) -> list[Disk]:
        return [d for d in self.disks if d.state == "online"]

    @property
    def state(self) -> str:
        bad = sum(d.state != "online" for d in self.disks)
        if not bad:
            return "healthy"
        if self.layout == "single" or (self.layout == "raid5" and bad > 1) \
                or bad == len(self.disks):
            return "failed"
        return "degraded"

    def note(self, level: str, msg: str) -> None:
        self.notes.append((level, msg))

    # ---- disks ---------------------------------------------------------------
    def _label_ok(self, d: Disk, array_uuid: str | None) -> bool:
        return d.label_state(self.name, array_uuid) == "ok"

    def check_disks_blocking(self, array_uuid: str | None = None,
                             segs: list | None = None) -> None:
        """Notice disks that vanished or came back (run every few seconds).
        `segs`: the segments every online disk must hold (from segments(),
        taken on the trio thread)."""
        expected = {f"{seq:08d}.seg" for seq in segs or ()}
        for d in self.disks:
            label = d.label_state(self.name, array_uuid)
            ok = label == "ok"
            if d.state == "online" and label == "error":
                self.disk_error(d, "reading its label failed")
            elif d.state == "online" and not ok:
                self._lose(d, label, "its directory or label is gone" if label == "missing"
                           else "its label is unreadable or belongs elsewhere")
            elif d.state == "online":
                try:
                    gone = expected - set(os.listdir(d.segdir))
                except OSError:
                    gone = expected
                if gone:
                    self._lose(d, "missing", f"{len(gone)} segment file(s) are gone "
                               "from its directory")
            elif d.state == "missing" and ok:
                d.state = "stale"
                self.note("warning", f"disk {d.idx} of pack {self.name} ({d.path}) is "
                          f"back but older than the pack: run `recover {self.name}`")
        self.refresh_space_blocking()

    def _lose(self, d: Disk, state: str, why: str) -> None:
        if d.state != "online":
            return
        d.state = state
        # what it holds but never fsynced may be gone: a rebuild starts there
        d.since = min([self.active_seq] + [k[1] for k in self._unsynced if k[0] == d.idx]
                      + list(self._new_segs.pop(d.idx, ())))
        self.close_disk_files(d)
        what = {"degraded": "data is still readable (redundancy lost)",
                "failed": "some data can no longer be read"}.get(self.state, "")
        self.note("error", f"disk {d.idx} of pack {self.name} ({d.path}) is {state}: {why}; "
                  f"the pack is {self.state}: {what}; run `recover {self.name}` when the "
                  f"disk is back, or `replace {self.name} {d.idx} NEW_DIR`")

    def disk_error(self, d: Disk, what: str) -> None:
        d.errors += 1
        last = not self.can_lose(d)
        self.note("warning", f"disk {d.idx} of pack {self.name} ({d.path}): {what} "
                  + ("(the last disk holding the data: it stays in service)" if last
                     else f"(error {d.errors} of {ERROR_LIMIT})"))
        if d.errors >= ERROR_LIMIT and not last:
            self._lose(d, "failed", f"{d.errors} I/O or checksum errors")

    def can_lose(self, d: Disk) -> bool:
        """Would the pack's data stay readable without disk `d`? (A single
        disk, the last online copy of a mirror or a second raid5 disk
        never is failed: that would make the data unreadable, not safer.)"""
        others = sum(x is not d and x.state == "online" for x in self.disks)
        if self.layout == "mirror":
            return others >= 1
        if self.layout == "raid5":
            return others == len(self.disks) - 1
        return False

    def close_disk_files(self, d: Disk) -> None:
        """Close disk `d`'s segment files (and drop their mappings): it
        left the pack, or is being replaced. Any thread."""
        with self._lock:
            fds = [self._pop_fd(key) for key in [k for k in self.fds if k[0] == d.idx]]
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- open / close (blocking) -------------------------------------
    def open_blocking(self, rows, array_uuid: str | None = None) -> list[int]:
        """Load the committed index `rows` (id, seg, off, len) and open the
        segments. Segment files nothing points into are crash garbage and
        are deleted. Returns the deleted segment numbers."""
        for bid, seg, off, length in rows:
            self.index[bytes(bid)] = (seg, off, length)
            self.seg_live[seg] = self.seg_live.get(seg, 0) + length + HDR.size
        ends: dict[int, int] = {}
        for seg, off, length in self.index.values():
            ends[seg] = max(ends.get(seg, 0), off + length)
        self.seg_size.update(ends)
        removed: set = set()
        top = 0
        for d in self.disks:
            label = d.label_state(self.name, array_uuid) if d.state == "online" else "ok"
            if label == "error":
                label = "invalid"
            if label != "ok":
                d.state, d.since = label, 0
                self.note("error", f"disk {d.idx} of pack {self.name} ({d.path}) is "
                          f"{label}: " + ("its directory or label is gone" if
                                          label == "missing" else "its label is "
                                          "unreadable or belongs elsewhere")
                          + f"; run `recover {self.name}`")
            elif d.state in ("missing", "failed") and self._label_ok(d, array_uuid):
                d.state = "stale"
            if d.state in ("missing", "invalid") or not os.path.isdir(d.segdir):
                continue
            present: set = set()
            for fn in sorted(os.listdir(d.segdir)):
                path = os.path.join(d.segdir, fn)
                if fn.endswith(".spare") or (fn.endswith(".seg") and int(fn[:-4]) not in ends):
                    os.unlink(path)
                    if fn.endswith(".seg"):
                        removed.add(int(fn[:-4]))
                    continue
                if not fn.endswith(".seg"):
                    continue
                seq = int(fn[:-4])
                top = max(top, seq)
                if d.state != "online":
                    continue
                fd = self.fds[(d.idx, seq)] = os.open(path, os.O_RDWR)
                present.add(seq)
                if self.layout != "raid5" and os.fstat(fd).st_size > ends[seq]:
                    os.ftruncate(fd, ends[seq])   # uncommitted or recycled tail
            if removed:
                fsync_dir(d.segdir)
            lacking = set(ends) - present
            if d.state == "online" and lacking:
                d.state, d.since = "stale", min(lacking)
                self.note("error", f"disk {d.idx} of pack {self.name} ({d.path}) lacks "
                          f"{len(lacking)} segment file(s): it is stale; run "
                          f"`recover {self.name}`")
                self.close_disk_files(d)
        self.refresh_space_blocking()
        cap = self.capacity_bytes()
        if cap:   # small packs get small segments, so garbage frees space sooner
            self.seg_limit = max(SEGMENT_MIN, min(SEGMENT_LIMIT, cap // 32))
            # enough spares for the segments one GC finds dead at once
            self.spare_limit = max(SPARES, cap // 2 // self.seg_limit)
        # free space is logical (a mirror's least free disk), and so is this
        self.reserve = 2 * self.seg_limit
        self.slack = self.seg_limit
        top = max([top] + list(ends))
        self.active_seq = top      # a new segment is started on first append
        self.active_tail = 0
        return sorted(removed)

    def close_blocking(self) -> None:
        with self._lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            self._maps.clear()

    # ---- geometry (raid5) ------------------------------------------------
    def _pieces(self, off: int, n: int):
        """raid5: (disk idx, disk offset, length, logical offset) pieces of
        the logical range, in order."""
        k, nd = self.k, len(self.disks)
        out = []
        end = off + n
        while off < end:
            row, w = divmod(off, k * CHUNK)
            j, o = divmod(w, CHUNK)
            take = min(CHUNK - o, end - off)
            p = row % nd
            out.append(((p + 1 + j) % nd, row * CHUNK + o, take, off))
            off += take
        return out

    def _parity_disk(self, row: int) -> int:
        return row % len(self.disks)

    # ---- data path (blocking) ------------------------------------------
    def _roll_blocking(self) -> None:
        if self.state == "failed":
            raise OSError(errno.EIO, f"pack {self.name} has failed: writes are refused")
        self.active_seq += 1
        seq = self.active_seq
        self.last_roll = time.monotonic()
        group: dict = {}
        if self.spares:
            group, credit = self.spares.pop()
            self.spare_bytes -= credit
        for d in self.online():
            path = d.seg_path(seq)
            private_dir(d.segdir)
            spare = group.pop(d.idx, None)
            if spare is not None:
                os.rename(spare, path)   # reuse its pages: no fresh allocation
                fd = os.open(path, os.O_RDWR)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with self._lock:
                self.fds[(d.idx, seq)] = fd
            self._new_segs.setdefault(d.idx, set()).add(seq)
        for spare in group.values():     # of a disk that is no longer online
            try:
                os.unlink(spare)
            except OSError:
                pass
        self.active_tail = 0
        self.active_open = True
        self._row = None

    def append_blocking(self, records, reserve_ok: bool = False) -> list[tuple[int, int, int]]:
        """Append (id, data) records; return their locations. Caller
        serialises appends. All or nothing: on an error the segments are
        cut back to where they were. User data may not use the last
        `reserve` bytes of free space (GC compaction and map nodes may:
        `reserve_ok`), so a full pack can still free itself."""
        if self.state == "failed":
            raise OSError(errno.EIO, f"pack {self.name} has failed: writes are refused "
                          "(too many disks are unavailable)")
        self.refresh_space_blocking()
        if not reserve_ok:
            need = sum(len(d) + HDR.size for _, d in records)
            if self.free_bytes() < self.reserve + need:
                raise OSError(errno.ENOSPC, "No space left on the pack (the rest is "
                              "kept for garbage collection)")
        undo = (self.active_seq, self.active_tail, self.active_open, self._row)
        try:
            locs = self._append(records)
        except OSError:
            self._undo_append(*undo)
            raise
        finally:
            self.refresh_space_blocking()    # admission control counts on it
        self._unsynced_recs.extend(zip([bid for bid, _ in records], locs))
        return locs

    def _undo_append(self, seq, tail, was_open, row) -> None:
        for s in range(seq + 1, self.active_seq + 1):     # segments this call made
            for d in self.disks:
                with self._lock:
                    fd = self._pop_fd((d.idx, s), None)
                if fd is not None:
                    os.close(fd)
                try:
                    os.unlink(d.seg_path(s))
                except OSError:
                    pass
        if was_open:
            end = tail if self.layout != "raid5" else -(-tail // (self.k * CHUNK)) * CHUNK
            for d in self.disks:
                fd = self.fds.get((d.idx, seq))
                if fd is not None:
                    try:
                        os.ftruncate(fd, max(end, 0))
                    except OSError:
                        pass
        self.active_seq, self.active_tail, self.active_open, self._row = seq, tail, was_open, row

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
                    self._roll_blocking()
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
        seq = self.active_seq
        if self.layout == "raid5":
            self._write_raid5(seq, Gather(iov), offset)
            return
        wrote = 0
        failed: list = []
        for d in self.online():
            fd = self.fds.get((d.idx, seq))
            if fd is None:
                continue
            try:
                pwritev_all(fd, iov, offset)
                self._unsynced.add((d.idx, seq))
                wrote += 1
            except OSError as e:
                if e.errno in NOT_THE_DISK:
                    raise
                failed.append((d, e))
        for d, e in failed:
            if wrote and self.can_lose(d):      # it lacks this record: out it goes
                self._lose(d, "failed", f"a write to it failed: {e.strerror}")
            else:
                self.disk_error(d, f"write failed: {e.strerror}")
        if not wrote:
            raise failed[-1][1] if failed else \
                OSError(errno.EIO, f"no disk of pack {self.name} took the write")

    def _write_raid5(self, seq: int, data: "Gather", offset: int) -> None:
        """Data pieces go to their disks as views of the batch's buffers
        (pwritev, no joining); each row's parity is written with them. A
        full row's parity is XORed straight from the batch; a partial row
        is kept in `_row` (later appends fill it and rewrite its parity)."""
        k, row_bytes = self.k, self.k * CHUNK
        runs: dict = {}        # disk -> [offset, bytes, views]: one pwritev per run
        pos = 0

        def put(di: int, doff: int, views) -> None:
            views = views if type(views) is list else [views]
            run = runs.get(di)
            if run is not None and run[0] + run[1] == doff and len(run[2]) < IOV_MAX - 64:
                run[1] += sum(len(v) for v in views)
                run[2] += views
                return
            if run is not None:
                self._put(di, seq, run[0], run[2], strict=True)
            runs[di] = [doff, sum(len(v) for v in views), views]
        while pos < data.size:
            row, w = divmod(offset + pos, row_bytes)
            take = min(row_bytes - w, data.size - pos)
            if take == row_bytes:
                self._row = None
                parity = bytearray(CHUNK)
                for j in range(k):
                    at = 0
                    for v in data.slices(pos + j * CHUNK, CHUNK):
                        xor_at(parity, at, v)
                        at += len(v)
            else:
                if self._row is None or self._row[:2] != (seq, row):
                    self._row = (seq, row, bytearray(row_bytes))
                    rest = row_bytes - (w + take)
                    if rest:     # a reused file has old bytes there: parity counts zeros
                        zeros = bytes(CHUNK)
                        for di, doff, n, _ in self._pieces(row * row_bytes + w + take, rest):
                            put(di, doff, zeros[:n])
                buf = self._row[2]
                at = w
                for v in data.slices(pos, take):
                    buf[at:at + len(v)] = v
                    at += len(v)
                bv = memoryview(buf)
                parity = xor([bv[j * CHUNK:(j + 1) * CHUNK] for j in range(k)])
            for di, doff, n, loff in self._pieces(offset + pos, take):
                put(di, doff, data.slices(loff - offset, n))
            put(self._parity_disk(row), row * CHUNK, parity)
            pos += take
        for di, (doff, _, views) in runs.items():
            self._put(di, seq, doff, views, strict=True)

    def _put(self, di: int, seq: int, off: int, data, strict: bool = False) -> None:
        """Write disk `di`'s bytes. `strict` (appends): a failed write fails
        the disk if the pack can do without it, else raises; otherwise (a
        repair) it counts against the disk."""
        d = self.disks[di]
        fd = self.fds.get((di, seq)) if d.state == "online" else None
        if fd is None:
            return                     # a missing disk: parity covers it
        try:
            pwritev_all(fd, data if type(data) is list else [data], off)
            self._unsynced.add((di, seq))
        except OSError as e:
            if e.errno in NOT_THE_DISK:
                raise
            if not strict:
                self.disk_error(d, f"write failed: {e.strerror}")
            elif self.can_lose(d):
                self._lose(d, "failed", f"a write to it failed: {e.strerror}")
            else:
                self.disk_error(d, f"write failed: {e.strerror}")
                raise

    def _get(self, di: int, seq: int, off: int, n: int):
        """Bytes of disk `di`'s file (a bytearray), or None when that disk
        can't give them."""
        buf = bytearray(n)
        return buf if self._get_into(di, seq, off, memoryview(buf)) else None

    def _get_into(self, di: int, seq: int, off: int, dst) -> bool:
        """Fill `dst` from disk `di`'s file at `off` (zeros past the file's
        end); False when that disk can't give the bytes."""
        d = self.disks[di]
        fd = self.fds.get((di, seq)) if d.state == "online" else None
        if fd is None:
            return False
        try:
            got = os.preadv(fd, [dst], off)
        except OSError as e:
            self.disk_error(d, f"read failed: {e.strerror}")
            return False
        if got < len(dst):
            dst[got:] = bytes(len(dst) - got)
        return True

    def _reconstruct(self, skip: int, seq: int, off: int, n: int):
        """raid5: disk `skip`'s bytes at [off, off+n) from all the others."""
        acc = bytearray(n)
        ok = self._reconstruct_into(skip, seq, off, memoryview(acc), memoryview(bytearray(n)))
        return acc if ok else None

    def _reconstruct_into(self, skip: int, seq: int, off: int, acc, tmp) -> bool:
        """_reconstruct into `acc`, with `tmp` (as long) as scratch."""
        others = [di for di in range(len(self.disks)) if di != skip]
        if not self._get_into(others[0], seq, off, acc):
            return False
        for di in others[1:]:
            if not self._get_into(di, seq, off, tmp):
                return False
            xor_at(acc, 0, tmp)
        return True

    def _read_logical(self, seq: int, off: int, n: int, avoid: int | None = None):
        if self.layout != "raid5":
            for d in self.disks:
                if d.idx == avoid:
                    continue
                got = self._get(d.idx, seq, off, n)
                if got is not None:
                    return got
            return None
        out = []
        for di, doff, ln, _ in self._pieces(off, n):
            got = None if di == avoid else self._get(di, seq, doff, ln)
            if got is None:
                got = self._reconstruct(di, seq, doff, ln)
            if got is None:
                return None
            out.append(got)
        return b"".join(out)

    def read_blocking(self, bid: bytes, loc) -> bytes:
        seg, off, length = loc
        data = self._read_logical(seg, off, length)
        if data is not None and self.hasher.block_id(data) == bid:
            return data
        return self._heal(bid, seg, off, length, data is None)

    def _heal(self, bid: bytes, seg: int, off: int, length: int, unreadable: bool) -> bytes:
        """The normal read failed: find a good copy, rewrite the bad one."""
        if self.layout != "single":
            suspects = [d.idx for d in self.disks]
            if self.layout == "raid5":
                suspects = sorted({p[0] for p in self._pieces(off, length)})
            for bad in suspects:
                data = self._read_logical(seg, off, length, avoid=bad)
                if data is None or self.hasher.block_id(data) != bid:
                    continue
                d = self.disks[bad]
                if d.state == "online" and not unreadable:
                    self._repair(bad, seg, off, data)
                    self.disk_error(d, f"block {bid.hex()[:16]} in segment {seg} did not "
                                    "match its hash; repaired from redundancy")
                elif d.state == "online":
                    self._repair(bad, seg, off, data)
                return data
        self.lost_reads += 1
        raise ChecksumError(
            f"block {bid.hex()} in segment {seg} offset {off} of pack {self.name} "
            f"does not match its hash and cannot be rebuilt ({self.layout}, "
            f"pack {self.state})")

    def _repair(self, di: int, seg: int, off: int, data: bytes) -> None:
        if self.layout == "raid5":
            for pdi, doff, ln, loff in self._pieces(off, len(data)):
                if pdi == di:
                    self._put(di, seg, doff, data[loff - off:loff - off + ln])
        else:
            self._put(di, seg, off, data)

    def read_nowait(self, bid: bytes, loc):
        """Read a block only if the page cache has it (preadv2 RWFNOWAIT):
        safe on the event loop. None when it would block or anything is
        unusual; then use read_blocking in a thread."""
        if loc is None or self._nowait is None:
            return None
        buf = bytearray(loc[2])
        return buf if self.read_into_nowait(bid, loc, memoryview(buf)) else None

    def read_many_into_nowait(self, items) -> list:
        """read_into_nowait for [(bid, loc, dst)], with one preadv per run
        of records that lie back to back in a segment (a sequential write
        lays them out so: a 1 MiB read is one system call, not 16). The
        record headers between them land in a scratch buffer. Returns the
        items it could not serve (for the caller's fallback)."""
        if self._nowait is None or self.layout == "raid5":
            return [it for it in items if not self.read_into_nowait(*it)]
        di = self._first_online()
        rest = []
        i = 0
        while i < len(items):
            bid, loc, dst = items[i]
            j = i + 1
            if di is not None and loc is not None and loc[2] == len(dst):
                end = loc[1] + loc[2]   # extend the run while the next record follows on
                while j < len(items) and j - i < IOV_MAX // 2:
                    nloc = items[j][1]
                    if nloc is None or nloc[0] != loc[0] or nloc[1] != end + HDR.size \
                            or nloc[2] != len(items[j][2]):
                        break
                    end = nloc[1] + nloc[2]
                    j += 1
                iov = []
                for _, _, d in items[i:j]:
                    iov += [self._gap, d] if iov else [d]
                ok = self._preadv_nowait(di, loc[0], iov, loc[1]) == end - loc[1]
            else:
                ok = False
            rest += [it for it in items[i:j] if not (ok and self._verified(it[0], it[2]))]
            i = j
        return rest

    def read_into_nowait(self, bid: bytes, loc, dst) -> bool:
        """read_nowait into a caller's buffer (a memoryview of exactly the
        block's length), from whichever disks hold it: one (single), the
        first online copy (mirror) or the pieces across the data disks
        (raid5, straight into their places). False when it would block, a
        disk is not online, or anything is unusual: then dst holds garbage
        and the caller reads the block the blocking way (which heals)."""
        if loc is None or self._nowait is None or loc[2] != len(dst):
            return False
        if self.layout != "raid5":
            return not self.read_many_into_nowait([(bid, loc, dst)])
        seg, off, length = loc
        for di, doff, ln, lo in self._pieces(off, length):
            if self._preadv_nowait(di, seg, [dst[lo - off:lo - off + ln]], doff) != ln:
                return False
        return self._verified(bid, dst)

    def mapped_blocks(self, bids, locs) -> list:
        """Views of blocks where they lie in the segment files, mapped
        read-only, each verified against its id there: a memoryview, or for
        raid5 a tuple of them (the block's pieces on the data disks, in
        order, hashed as one); None for a block that cannot be served so
        (no online copy, a piece's disk not online, not in the page cache,
        a bad hash: the caller reads it the ordinary way, which
        reconstructs and heals). The reply is then the only copy of the
        data. The views keep their mapping alive; a file that shrinks under
        a view cannot crash the daemon (the check is SIGBUS-guarded, see
        _fuseshim.c)."""
        out = [None] * len(bids)
        if verify_mapped is None or self._nowait is None:
            return out
        raid5 = self.layout == "raid5"
        di = None if raid5 else self._first_online()
        if di is None and not raid5:
            return out
        idx, views, on_disk = [], [], False
        for i, loc in enumerate(locs):
            if loc is None:
                continue
            seq, off, n = loc
            pieces = []
            for pdi, doff, ln, _ in self._pieces(off, n) if raid5 else [(di, off, n, off)]:
                m = self._mapping(pdi, seq, doff + ln)
                if m is None:
                    break
                pieces.append(m[1][doff:doff + ln])
                on_disk = on_disk or not m[2]
            else:
                idx.append(i)
                views.append(tuple(pieces) if raid5 else pieces[0])
        if not views:
            return out
        try:
            bad = set(verify_mapped(views, [bids[i] for i in idx], self.hasher.seed, on_disk))
        except OSError:
            return out
        for k, i in enumerate(idx):
            if k not in bad:
                out[i] = views[k]
        self.mapped_reads += len(idx) - len(bad)
        return out

    def _mapping(self, di: int, seq: int, end: int):
        """(fd, view, in memory) of disk `di`'s file of segment `seq`,
        mapped up to at least `end`, or None. A growing file is mapped
        again when a read goes past the old map. Mappings go with their fd
        (_pop_fd); at most MAPS_MAX a disk are kept, each holding a
        duplicate fd."""
        key = (di, seq)
        fd = self.fds.get(key) if self.disks[di].state == "online" else None
        if fd is None:
            return None
        m = self._maps.get(key)
        if m is not None and m[0] == fd and len(m[1]) >= end:
            return m
        try:
            size = os.fstat(fd).st_size
            if size < end:
                return None
            mv = memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        except (OSError, ValueError):
            return None
        path = self.disks[di].path
        mem = self._mem_paths.get(path)
        if mem is None:
            mem = self._mem_paths[path] = in_memory(path)
        with self._lock:                # the fd table's lock: closers hold it
            if self.fds.get(key) != fd:     # closed (and maybe reused) meanwhile
                return None
            self._maps.pop(key, None)
            while len(self._maps) >= MAPS_MAX * len(self.disks):
                self._maps.pop(next(iter(self._maps)))
            m = self._maps[key] = (fd, mv, mem)
        return m

    def _pop_fd(self, key, *default):
        """Take `key`'s fd out of the table (to close it), with its mapping."""
        self._maps.pop(key, None)
        return self.fds.pop(key, *default)

    def _first_online(self) -> int | None:
        return next((d.idx for d in self.disks if d.state == "online"), None)

    def _preadv_nowait(self, di: int, seg: int, iov, off: int) -> int:
        """preadv2 from disk `di`'s file of `seg` with the no-wait flags;
        -1 when the disk is not online, the file is not open or the read
        would block."""
        fd = self.fds.get((di, seg)) if self.disks[di].state == "online" else None
        if fd is None:
            return -1
        try:
            return os.preadv(fd, iov, off, self._nowait)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                # tmpfs has no RWFNOWAIT, but its reads never wait for a device
                self._nowait = 0 if all(in_memory(d.path) for d in self.disks) else None
            return -1

    def _verified(self, bid: bytes, data) -> bool:
        # stored blocks are never all-zero, so the id is the plain keyed hash
        return self.hasher.verified(bid, data)

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
            self._suspect |= self._sync_once()
            if not self._suspect:
                self._unsynced_recs.clear()
                return list(moved.items())
            moved.update(self._write_again(moved))
        self.lost_writes = (f"pack {self.name}: its disk keeps failing to sync what was "
                            "written since the last commit, even written again to new "
                            "segment files")
        return self._lost_writes()

    def _lost_writes(self):
        self.lost_writes += ("; fsync fails from now on and nothing more is committed: "
                             "remount the array to go back to its last durable state "
                             "(writes acknowledged since the last good fsync are lost), "
                             f"and check or replace the disk (`scrub {self.name}`)")
        self.note("error", self.lost_writes)
        raise OSError(errno.EIO, self.lost_writes)

    def _sync_once(self) -> set:
        """fsync what was written; a disk that fails it is failed if the
        pack can do without it. Returns the segments left in doubt."""
        bad: dict = {}                       # disk idx -> [what failed, segments]
        for key in list(self._unsynced):
            fd = self.fds.get(key)
            if fd is not None:
                try:
                    os.fsync(fd)
                except OSError as e:
                    bad.setdefault(key[0], [f"fsync of segment {key[1]} failed: "
                                            f"{e.strerror}", set()])[1].add(key[1])
            self._unsynced.discard(key)
        for d in self.online():
            segs = self._new_segs.get(d.idx)
            if not segs:
                continue
            try:
                fsync_dir(d.segdir)
                self._new_segs.pop(d.idx, None)
            except OSError as e:
                b = bad.setdefault(d.idx, [f"fsync of its segment directory failed: "
                                           f"{e.strerror}", set()])
                b[1] |= segs
        doubt: set = set()
        for di, (what, segs) in bad.items():
            d = self.disks[di]
            if d.state != "online":
                continue
            if self.can_lose(d):
                self._lose(d, "failed", f"{what}: what was written to it since the last "
                           "commit may be lost")
            else:
                self.note("warning", f"disk {d.idx} of pack {self.name} ({d.path}): {what}; "
                          "the blocks written since the last commit are read back, "
                          "checked and written again")
                doubt |= segs
        return doubt

    def _write_again(self, moved: dict) -> dict:
        """The blocks appended since the last good sync into a segment in
        doubt: sealed, read back, checked, appended anew. Returns
        {id: new loc}; raises (lost_writes) if one does not read back
        right."""
        if self.active_open and self.active_seq in self._suspect:
            self.active_open = False
        records, lost = [], 0
        seen = set()
        for bid, loc in list(self._unsynced_recs):
            if loc[0] not in self._suspect or bid in seen \
                    or moved.get(bid, self.index.get(bid)) != loc:
                continue          # written again already, or dropped by GC
            seen.add(bid)
            data = self._read_logical(*loc)
            if data is not None and self._verified(bid, data):
                records.append((bid, bytes(data)))
            else:
                lost += 1
        if lost:
            self.lost_writes = (f"pack {self.name}: {lost} block(s) written since the last "
                                f"commit did not survive a failed fsync of segment(s) "
                                f"{sorted(self._suspect)} (they no longer read back right)")
            self._lost_writes()
        out = {}
        if records:
            locs = self.append_blocking(records, reserve_ok=True)
            out = {bid: loc for (bid, _), loc in zip(records, locs)}
        self._suspect.clear()
        return out

    def close_segment_blocking(self, seq: int) -> None:
        with self._lock:
            fds = [self._pop_fd(k) for k in [k for k in self.fds if k[1] == seq]]
        for fd in fds:
            os.close(fd)

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
        each row it starts (see _write_raid5) so parity stays exact."""
        keep = reuse and len(self.spares) < self.spare_limit
        group: dict = {}
        sizes = []
        for d in self.disks:
            if d.state == "missing":
                continue
            path = d.seg_path(seq)
            try:
                if keep and d.state == "online":
                    spare = os.path.join(d.segdir, f"{seq:08d}.spare")
                    os.rename(path, spare)
                    group[d.idx] = spare
                    sizes.append(os.stat(spare).st_blocks * 512)
                else:
                    os.unlink(path)
                self._fsync_dir_quietly(d)
            except FileNotFoundError:
                pass
        if group:
            credit = min(sizes) * (self.k if self.layout == "raid5" else 1)
            self.spares.append((group, credit))
            self.spare_bytes += credit
        self.close_segment_blocking(seq)
        self.refresh_space_blocking()

    def trim_spares_blocking(self, keep: int = SPARES) -> int:
        """Delete spares beyond `keep` (the array calls this when no new
        segment was started for SPARE_IDLE seconds). Returns how many went.
        Caller serialises with appends and retire_blocking."""
        gone = 0
        while len(self.spares) > keep:
            group, credit = self.spares.pop(0)
            self.spare_bytes -= credit
            for spare in group.values():
                try:
                    os.unlink(spare)
                except OSError:
                    pass
            gone += 1
        if gone:
            for d in self.online():
                self._fsync_dir_quietly(d)
            self.refresh_space_blocking()
        return gone

    def _fsync_dir_quietly(self, d: Disk) -> None:
        """After a dead segment was deleted or made a spare: if that does
        not last (a failed directory fsync, then a crash), the next open
        deletes the file again (nothing points into it)."""
        try:
            fsync_dir(d.segdir)
        except OSError as e:
            self.disk_error(d, f"fsync of its segment directory failed: {e.strerror}")

    def unlink_segment_blocking(self, seq: int) -> None:
        for d in self.disks:
            try:
                os.unlink(d.seg_path(seq))
            except OSError:
                continue
            self._fsync_dir_quietly(d)
        self.refresh_space_blocking()

    # ---- rebuild and scrub (blocking, one piece per call) -------------------
    def disk_file_size(self, seq: int) -> int:
        size = self.active_tail if seq == self.active_seq and self.active_open \
            else self.seg_size.get(seq, 0)
        if self.layout == "raid5":
            return -(-size // (self.k * CHUNK)) * CHUNK
        return size

    def sealed(self) -> list[int]:
        """Segments whose files every online disk must have."""
        return [s for s in self.seg_size if s not in self.retired]

    def segments(self) -> list[int]:
        segs = set(self.seg_size)
        if self.active_open:
            segs.add(self.active_seq)
        return sorted(s for s in segs if s not in self.retired)

    def stable_size(self, seq: int) -> int:
        """Disk bytes of a segment that appends can no longer change (for
        raid5 the tail row's parity still moves)."""
        size = self.disk_file_size(seq)
        if seq == self.active_seq and self.active_open and self.layout == "raid5":
            return (self.active_tail // (self.k * CHUNK)) * CHUNK
        return size

    def rebuild_plan(self, d: Disk, segs: list) -> list[tuple[int, int]]:
        """(seg, disk bytes) disk `d` needs: what changed since it left, and
        anything it lacks or holds a different length of. `segs` from
        segments(), taken on the trio thread."""
        plan = []
        since = d.since or 0
        for seq in segs:
            size = self.disk_file_size(seq)
            try:
                have = os.stat(d.seg_path(seq)).st_size
            except OSError:
                have = -1
            if seq >= since or have != size:
                plan.append((seq, size))
        return plan

    def rebuild_piece_blocking(self, d: Disk, seq: int, off: int, n: int) -> int:
        """Write disk `d`'s bytes of segment `seq` at [off, off+n) from the
        other disks. Returns bytes written. Reads go into two scratch
        buffers kept per thread (a rebuild is thousands of pieces: fresh
        memory for each cost more than the XOR)."""
        src = [x for x in self.disks if x is not d and x.state == "online"]
        if not src:
            raise OSError(errno.EIO, f"no online disk of pack {self.name} to rebuild from")
        acc, tmp = scratch(n)
        if self.layout == "raid5":
            ok = self._reconstruct_into(d.idx, seq, off, acc, tmp)
        else:
            ok = self._get_into(src[0].idx, seq, off, acc)
        if not ok:
            raise OSError(errno.EIO, f"segment {seq} cannot be rebuilt: too many disks "
                          f"of pack {self.name} are unavailable")
        private_dir(d.segdir)
        fd = os.open(d.seg_path(seq), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            pwritev_all(fd, [acc], off)
            if off + n >= self.disk_file_size(seq):
                os.ftruncate(fd, self.disk_file_size(seq))
                os.fsync(fd)
        finally:
            os.close(fd)
        return n

    def rejoin_blocking(self, d: Disk, array_uuid: str, segs: list) -> None:
        """After its rebuild: the disk serves again."""
        d.write_label(array_uuid, self.name)
        fsync_dir(d.segdir)
        for seq in segs:
            path = d.seg_path(seq)
            if os.path.exists(path):
                with self._lock:
                    self.fds[(d.idx, seq)] = os.open(path, os.O_RDWR)
        d.state, d.since, d.errors = "online", None, 0

    def scrub_segment_blocking(self, seq: int, entries) -> tuple[int, int]:
        """Verify every copy / the parity of a segment's blocks; repair from
        redundancy. Returns (repaired, unrecoverable)."""
        repaired = lost = 0
        for bid, (s, off, length) in entries:
            if self.layout == "mirror":
                copies = [(d, self._get(d.idx, seq, off, length)) for d in self.online()]
                good = next((c for _, c in copies if c is not None
                             and self.hasher.block_id(c) == bid), None)
                if good is None:
                    lost += 1
                    continue
                for d, c in copies:
                    if c is None or self.hasher.block_id(c) != bid:
                        self._put(d.idx, seq, off, good)
                        repaired += 1
                continue
            data = self._read_logical(seq, off, length)
            if data is not None and self.hasher.block_id(data) == bid:
                continue
            try:
                self._heal(bid, seq, off, length, data is None)
                repaired += 1
            except ChecksumError:
                lost += 1
        if self.layout == "raid5" and self.state == "healthy":
            rows = -(-self.disk_file_size(seq) // CHUNK)
            for row in range(rows):
                p = self._parity_disk(row)
                chunks = [self._get(di, seq, row * CHUNK, CHUNK)
                          for di in range(len(self.disks)) if di != p]
                stored = self._get(p, seq, row * CHUNK, CHUNK)
                if None in chunks or stored is None:
                    continue
                want = xor(chunks)
                if want != stored:
                    self._put(p, seq, row * CHUNK, want)
                    repaired += 1
        return repaired, lost

    # ---- the reading guard (trio thread) -----------------------------------
    @contextlib.contextmanager
    def reading(self, segs):
        """Segments a worker thread reads inside this block: none of their
        files is closed until the read is over (a dead segment retired
        meanwhile is closed when its last reader leaves). Entered and left
        on the trio thread."""
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
                        self.close_segment_blocking(s)

    def drop_dead_segment(self, seq: int) -> bool:
        """Trio thread, after the commit that dropped a dead segment's
        entries: forget it. True when a read is still in flight on it: then
        the caller unlinks it now (unlink_segment_blocking) and its fds are
        closed when the last reader leaves; False: the caller retires it
        (retire_blocking)."""
        self.forget_segment(seq)
        if self.inflight.get(seq):
            self.retired.add(seq)
            return True
        return False

    # ---- index (trio thread) -------------------------------------------
    def lookup(self, bid: bytes):
        return self.index.get(bid)

    def add(self, bid: bytes, loc) -> None:
        old = self.index.get(bid)
        if old is not None:
            self._unlive(old)
        self.index[bid] = loc
        self.seg_live[loc[0]] = self.seg_live.get(loc[0], 0) + loc[2] + HDR.size
        self.seg_size[loc[0]] = max(self.seg_size.get(loc[0], 0), loc[1] + loc[2])
        self.pending_add[bid] = loc
        self.pending_del.discard(bid)

    def _unlive(self, loc) -> None:
        self.seg_live[loc[0]] -= loc[2] + HDR.size

    def sweep(self, live: set) -> int:
        """Drop index entries of blocks not in `live`. Returns bytes freed."""
        freed = 0
        for bid in [b for b in self.index if b not in live]:
            loc = self.index.pop(bid)
            self._unlive(loc)
            freed += loc[2]
            self.pending_add.pop(bid, None)
            self.pending_del.add(bid)
        return freed

    def take_pending(self):
        adds, dels = self.pending_add, self.pending_del
        self.pending_add, self.pending_del = {}, set()
        return adds, dels

    def dead_segments(self) -> list[int]:
        """Sealed segments with nothing live: delete after the commit that
        dropped their entries."""
        return [s for s, live in self.seg_live.items()
                if live <= 0 and not self._is_active(s) and s in self.seg_size]

    def sparse_segments(self, ratio: float = 0.5) -> list[int]:
        """Sealed segments worth compacting (live share below `ratio`)."""
        out = []
        for s, live in self.seg_live.items():
            size = self.seg_size.get(s, 0)
            if not self._is_active(s) and 0 < live and size and live / size < ratio:
                out.append(s)
        return out

    def _is_active(self, seq: int) -> bool:
        return self.active_open and seq == self.active_seq

    def seal_if_sparse(self, ratio: float = 0.5) -> None:
        """Close the active segment to appends when most of it is garbage,
        so GC can reclaim it."""
        s = self.active_seq
        if self.active_open and s in self.seg_size:
            if self.seg_live.get(s, 0) < self.seg_size[s] * ratio:
                self.active_open = False

    def entries_in(self, seq: int) -> list[tuple[bytes, tuple]]:
        return [(b, loc) for b, loc in self.index.items() if loc[0] == seq]

    def forget_segment(self, seq: int) -> None:
        self.seg_live.pop(seq, None)
        self.seg_size.pop(seq, None)

    def block_ids(self):
        """The ids in the index (trio thread; a live view)."""
        return self.index.keys()

    def index_problems(self) -> list[str]:
        """Check the index against the accounting (fsck's invariants 3 and
        4): each segment's live-byte count is the sum over its entries, no
        entry lies past its segment's end, every online disk has the file
        of each indexed segment."""
        problems = []
        sums: dict = {}
        for bid, (seg, off, length) in self.index.items():
            sums[seg] = sums.get(seg, 0) + length + HDR.size
            size = self.seg_size.get(seg)
            if size is None or off + length > size:
                problems.append(f"pack {self.name}: block {bid.hex()} lies past the end "
                                f"of segment {seg}")
        for seg, total in sums.items():
            if self.seg_live.get(seg, 0) != total:
                problems.append(f"pack {self.name}: segment {seg} live bytes "
                                f"{self.seg_live.get(seg)} != {total}")
            for d in self.disks:
                if d.state == "online" and not os.path.exists(d.seg_path(seg)):
                    problems.append(f"pack {self.name}: segment file {seg} is missing on "
                                    f"disk {d.idx}")
        return problems

    # ---- accounting ------------------------------------------------------
    def data_bytes(self) -> int:
        """Logical: the bytes in the pack's segments, before redundancy."""
        return sum(self.seg_size.values())

    def used_bytes(self) -> int:
        """Physical: every disk's share, redundancy included."""
        logical = self.data_bytes()
        if self.layout == "mirror":
            return logical * len(self.disks)
        if self.layout == "raid5":
            return logical * len(self.disks) // self.k
        return logical

    def _statvfs(self, field: str) -> int:
        sizes = []
        for d in self.disks:
            try:
                st = os.statvfs(d.path)
            except OSError:
                continue
            sizes.append(getattr(st, field) * st.f_frsize)
        if not sizes:
            return 0
        return min(sizes) * self.k if self.layout == "raid5" else min(sizes)

    def refresh_space_blocking(self) -> None:
        """statvfs the disks (a worker thread: a hung disk must not stall
        the trio thread) for capacity_bytes and free_bytes. Called after
        every append, segment retirement and disk check, and at open."""
        self._space = (self._statvfs("f_blocks"), self._statvfs("f_bavail"))

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
        return self._space_now()[1] + self.spare_bytes
