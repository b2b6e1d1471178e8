"""The intent log: an fsync made durable by one append and one data sync.

Without it every fsync was a full commit (flush, hash, merge, segment
fsyncs, one SQLite transaction). With it, an fsync writes the writes
acknowledged before it, as they were written (a 4 KiB write is a 4 KiB
record, whatever the block size), to a log file with one `pwritev` and one
`fdatasync`; the full commit runs behind it in the background (by time and
by the log's size, WriteBack.committer_round) and makes the log's records
obsolete. Like ZFS's intent log, the log is only read after a crash: at
open, before the mount appears, the records no commit covered are written
again into their volumes and committed (`Array.open`).

Owns (trio thread): the records acknowledged and not logged yet
(`pending`, in sequence order), the log's slot files, how far the log
goes (`logged`), what the catalogue covers (`covered`), and the log lock
(`lock`, a trio.Lock: one log write in flight; every fsync that arrives
meanwhile waits for it and shares the next one: group commit).

Where: `ARRAY/log/` by default, or `DIR/<array uuid>/` with `--log DIR`
(a faster device, like a ZFS SLOG). The directory holds up to SLOTS_MAX
slot files `slot.N` of SLOT_SIZE bytes, zero-filled when made (overwriting
written blocks needs no metadata change: an fdatasync is one data write
and one device flush) and reused: a slot is appended to from its start
with a new `use` number once everything in it is covered.

A record is a 64-byte header and its data:

    magic "FAIL", kind (1 write, 2 zero range), version 1, 0,
    length (data bytes that follow), use (of the slot), seq (the write's
    sequence number, BlockCache.seq, increasing across mounts), vid,
    offset, span (bytes the record changes), 0, digest

`digest` is XXH3-64, seeded from the array's uuid, of the header before it
and the data. Reading a slot stops at the first record that is not whole
and right: a wrong magic, kind, use or digest, a length past the slot's end,
a seq not above the previous one. A record torn by a crash (the batch
whose fdatasync never returned: nothing in it was acknowledged) or damaged
later is never replayed as data, and everything before it is.

Coverage: a commit that flushed everything acknowledged up to `seq`
records in its transaction `log_seq` = seq and `log_stuck` = {vid: s} for
volumes whose writes from s+1 on could not be stored (a full or failed
pack). A record is covered (never replayed) when its seq is at most its
volume's coverage. Records of deleted volumes are skipped.

Crash at any step: a log write in flight leaves a torn batch (not
acknowledged: cut off at the first bad record); a commit in flight leaves
the previous coverage (its records are replayed: the same bytes again at
the same places, in the original order, over the last committed state); a
replay in flight leaves the log as it was (nothing is changed in the log
before the replay's commit is in the catalogue), so the next open replays
again. Seq numbers keep growing across mounts (the cache starts above the
catalogue's `log_seq` and the log's last record), so a record is never
mistaken for a newer one.
"""
import errno
import json
import os
import queue
import struct
import threading

import trio
import xxhash

from .errors import ArrayError, ioerror
from .perms import FILE_MODE

MAGIC = b"FAIL"
VERSION = 1
WRITE, ZERO = 1, 2
HEAD = struct.Struct("<4sBBHIQQQQQIQ")      # 64 bytes, see the module docstring
SLOT_SIZE = 8 << 20
SLOTS_MIN = 2                                # made at open
SLOTS_MAX = 8
IOV_MAX = 512                                # records per pwritev (two iovecs each)


def log_seed(uuid: str) -> int:
    """The digest seed of an array's log: records of another array fail."""
    return xxhash.xxh3_64_intdigest(uuid.encode())


def record_bytes(seed: int, use: int, rec) -> tuple:
    """The header of record `rec` (seq, vid, kind, off, span, data) in a
    slot's use `use`, and its data."""
    seq, vid, kind, off, span, data = rec
    n = len(data) if data is not None else 0
    head = HEAD.pack(MAGIC, kind, VERSION, 0, n, use, seq, vid, off, span, 0, 0)
    h = xxhash.xxh3_64(seed=seed)
    h.update(head[:-8])
    if n:
        h.update(data)
    return head[:-8] + struct.pack("<Q", h.intdigest()), data


def _iov(seed: int, use: int, records) -> tuple[list, int]:
    iov: list = []
    total = 0
    for rec in records:
        head, data = record_bytes(seed, use, rec)
        iov.append(head)
        total += len(head)
        if data is not None and len(data):
            iov.append(data)
            total += len(data)
    return iov, total


def write_records_blocking(fd: int, pos: int, seed: int, use: int, records) -> int:
    """Worker thread: append `records` at `pos` of a slot file and
    fdatasync it. Returns the bytes written."""
    iov, total = _iov(seed, use, records)
    done = 0
    for i in range(0, len(iov), IOV_MAX):
        part = iov[i:i + IOV_MAX]
        want = sum(len(b) for b in part)
        n = os.pwritev(fd, part, pos + done)
        while n < want:         # a short write (a signal, a nearly full disk): the rest
            rest = b"".join(bytes(b) for b in part)[n:]
            m = os.pwrite(fd, rest, pos + done + n)
            if m <= 0:
                raise OSError(errno.EIO, "short write to the intent log")
            n += m
        done += want
    os.fdatasync(fd)
    return total


class SlotFiles:
    """The log's slots as files `slot.N` of a directory (ARRAY/log or
    `--log DIR`), zero-filled when made."""

    def __init__(self, directory: str):
        self.dir = directory

    def prepare(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def indexes(self) -> list[int]:
        return sorted(int(n[5:]) for n in os.listdir(self.dir)
                      if n.startswith("slot.") and n[5:].isdigit())

    def open_read(self, idx: int) -> tuple:
        """(a handle, the slot's content up to SLOT_SIZE)."""
        fd = os.open(os.path.join(self.dir, f"slot.{idx}"), os.O_RDWR)
        with open(fd, "rb", closefd=False) as f:
            return fd, f.read(SLOT_SIZE)

    def make(self, idx: int):
        """A new zero-filled slot file, durable with its name."""
        path = os.path.join(self.dir, f"slot.{idx}")
        tmp = path + ".new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            zeros = bytes(1 << 20)
            for i in range(SLOT_SIZE >> 20):
                os.pwrite(fd, zeros, i << 20)
            os.fsync(fd)
            os.rename(tmp, path)
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return fd

    def write(self, h, pos: int, seed: int, use: int, records) -> int:
        return write_records_blocking(h, pos, seed, use, records)

    def close(self, h) -> None:
        try:
            os.close(h)
        except OSError:
            pass

    def remove(self) -> None:
        for name in os.listdir(self.dir):
            if name.startswith("slot."):
                os.unlink(os.path.join(self.dir, name))
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


class SlotObjects:
    """The log's slots as objects `log.slot.N` of a medium (an array in a
    Ceph cluster: its RADOS namespace, store.rados.RadosMedium). A write is
    durable on the cluster once acknowledged; a slot is made empty (its
    content ends where its writes end: the parse stops there as at zeros)."""

    PREFIX = "log.slot."

    def __init__(self, medium):
        self.medium = medium
        self.dir = str(medium)

    def prepare(self) -> None:
        pass

    def indexes(self) -> list[int]:
        n = len(self.PREFIX)
        return sorted(int(k[n:]) for k in self.medium.names()
                      if k.startswith(self.PREFIX) and k[n:].isdigit())

    def open_read(self, idx: int) -> tuple:
        h = self.medium.open(f"{self.PREFIX}{idx}")
        buf = bytearray(SLOT_SIZE)
        n = self.medium.preadv(h, [buf], 0)
        del buf[n:]
        return h, bytes(buf)

    def make(self, idx: int):
        return self.medium.open_or_create(f"{self.PREFIX}{idx}")

    def write(self, h, pos: int, seed: int, use: int, records) -> int:
        iov, total = _iov(seed, use, records)
        self.medium.pwritev(h, iov, pos)
        self.medium.fsync(h)
        return total

    def close(self, h) -> None:
        self.medium.close(h)

    def remove(self) -> None:
        for idx in self.indexes():
            self.medium.unlink(f"{self.PREFIX}{idx}")


def parse_slot(buf, seed: int) -> tuple:
    """The records of a slot's content: (use, [(seq, vid, kind, off, span,
    data)], damaged), stopping at the first record that is not whole and
    right (the module docstring). use is 0 for a slot with no valid first
    record; `damaged` is the offset where a record of this use stops being
    right (a torn batch, a damaged block), None where the slot simply ends
    (zeros, or what an earlier use left)."""
    mv = memoryview(buf)
    pos = 0
    use = 0
    last = 0
    out = []
    size = len(mv)
    damaged = None
    while pos + HEAD.size <= size:
        (magic, kind, version, _r0, n, ruse, seq, vid, off, span, _r1,
         digest) = HEAD.unpack_from(mv, pos)
        if magic != MAGIC or version != VERSION:
            break
        if use and ruse != use:
            break           # what an earlier use of the slot left
        h = xxhash.xxh3_64(seed=seed)
        h.update(mv[pos:pos + HEAD.size - 8])
        data = mv[pos + HEAD.size:pos + HEAD.size + n]
        if (kind not in (WRITE, ZERO) or pos + HEAD.size + n > size or seq <= last
                or (kind == ZERO and n) or (kind == WRITE and n != span)):
            damaged = pos
            break
        if n:
            h.update(data)
        if h.intdigest() != digest:
            damaged = pos
            break
        use = ruse
        last = seq
        out.append((seq, vid, kind, off, span, bytes(data) if n else None))
        pos += HEAD.size + n
    return use, out, damaged


class Writer:
    """The log's own worker thread: one log write at a time, handed over
    through a queue and reported back with `run_sync_soon` (about 30 us
    here, against 90 us for `trio.to_thread.run_sync`, which is most of an
    fsync's time on a fast device). Started by `start` on the trio thread,
    ended by `stop` (before the trio run ends)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="fusearray-intentlog",
                                           daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    async def run(self, fn, *args):
        """fn(*args) in the log's thread; its result or exception. Not
        cancellable: a log write, once started, is waited for (what it
        covers is decided by its outcome)."""
        if self.thread is None:
            return await trio.to_thread.run_sync(fn, *args)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list = []

        def job():
            try:
                box.append((True, fn(*args)))
            except BaseException as e:        # handed to the caller
                box.append((False, e))
            token.run_sync_soon(done.set)
        self.jobs.put(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None


class Slot:
    """One slot file: where the next record goes (`pos`), its use number,
    and the highest seq it holds per volume (free once all are covered)."""
    __slots__ = ("idx", "path", "fd", "use", "pos", "vids")

    def __init__(self, idx: int, path: str, fd: int):
        self.idx, self.path, self.fd = idx, path, fd
        self.use = 0
        self.pos = 0
        self.vids: dict = {}


class Coverage:
    """What the catalogue holds: every write up to `seq`, but for the
    volumes in `stuck` only up to their value."""

    def __init__(self, seq: int = 0, stuck: dict | None = None):
        self.seq = seq
        self.stuck = stuck or {}

    @classmethod
    def from_meta(cls, meta: dict) -> "Coverage":
        try:
            stuck = {int(k): int(v) for k, v in json.loads(meta.get("log_stuck", "{}")).items()}
        except (ValueError, AttributeError):
            stuck = {}
        return cls(int(meta.get("log_seq", 0)), stuck)

    def meta(self) -> dict:
        return {"log_seq": self.seq,
                "log_stuck": json.dumps({str(k): v for k, v in self.stuck.items()})}

    def of(self, vid: int) -> int:
        return self.stuck.get(vid, self.seq)

    def floor(self) -> int:
        return min([self.seq, *self.stuck.values()])

    def covers(self, vid: int, seq: int) -> bool:
        return seq <= self.of(vid)


class IntentLog:
    """The intent log of a mount (see the module docstring)."""

    def __init__(self, directory: str | None, uuid: str, buffer_limit: int, *, event,
                 medium=None):
        # where the slots are: files of a directory, or objects of a medium
        # (an array in a Ceph cluster)
        self.store = SlotObjects(medium) if medium is not None else SlotFiles(directory)
        self.dir = self.store.dir
        self.seed = log_seed(uuid)
        self.buffer_limit = min(buffer_limit, SLOT_SIZE // 2)
        self.event = event
        self.pending: list = []          # (seq, vid, kind, off, span, data), seq order
        self.pending_bytes = 0
        self.last = 0                    # the last write recorded
        self.logged = 0                  # every write up to this seq is durable (log or catalogue)
        self.gap = 0                     # the last write dropped from `pending` unlogged
        self.covered = Coverage()
        self.lock = trio.Lock()
        self.slots: list[Slot] = []
        self.active: Slot | None = None
        self.next_use = 1
        self.failed: OSError | None = None
        self.since_commit = 0            # bytes logged since the last covering commit
        self.stats = {"syncs": 0, "batches": 0, "records": 0, "bytes": 0, "fallbacks": 0,
                      "commits": 0}
        self.writer = Writer()
        self.damaged: list = []          # (slot, offset) where a read at open stopped

    # ---- the write path (trio thread, no await) ----------------------------
    def record(self, vid: int, seq: int, off: int, data) -> None:
        """Write number `seq` put `data` at `off` of volume `vid` (it is
        acknowledged next). `data` must not change: the request's bytes."""
        self._add((seq, vid, WRITE, off, len(data), data), len(data))

    def record_zero(self, vid: int, seq: int, off: int, length: int) -> None:
        """Write number `seq` zeroed [off, off+length) of volume `vid`."""
        self._add((seq, vid, ZERO, off, length, None), 0)

    def _add(self, rec, n: int) -> None:
        self.last = rec[0]
        if self.pending_bytes + n > self.buffer_limit:
            # over its share of the cache: drop what is not logged; the
            # fsyncs that need it take the full commit until one covers it
            self.gap = rec[0]
            self.pending = []
            self.pending_bytes = 0
            return
        self.pending.append(rec)
        self.pending_bytes += n + HEAD.size

    # ---- fsync --------------------------------------------------------------
    def can_cover(self) -> bool:
        return self.failed is None and self.gap <= self.covered.floor()

    def durable(self, target: int) -> bool:
        return self.logged >= target

    async def sync(self, target: int) -> bool:
        """Make every write up to `target` durable in the log; False if
        the log cannot (dropped records, no free slot, a failed log
        device): the caller commits instead."""
        if self.logged >= target:
            return True
        if not self.can_cover():
            self.stats["fallbacks"] += 1
            return False
        async with self.lock:
            if self.logged >= target:
                return True         # an fsync in flight when we came covered us
            if not self.can_cover():
                self.stats["fallbacks"] += 1
                return False
            batch, upto = self.pending, self.last
            if not batch:
                self.logged = max(self.logged, upto)
                return True
            size = self.pending_bytes
            slot = await self._place(size)
            if slot is None:
                self.stats["fallbacks"] += 1
                return False
            self.pending, self.pending_bytes = [], 0
            pos = slot.pos
            slot.pos += size           # a failed write leaves a hole: nothing follows it
            try:
                await self.writer.run(self.store.write, slot.fd, pos,
                                      self.seed, slot.use, batch)
            except OSError as e:
                self.fail(e)
                self.gap = max(self.gap, upto)
                return False
            for rec in batch:
                vids = slot.vids
                if vids.get(rec[1], 0) < rec[0]:
                    vids[rec[1]] = rec[0]
            self.logged = max(self.logged, upto)
            self.since_commit += size
            st = self.stats
            st["syncs"] += 1
            st["batches"] += 1
            st["records"] += len(batch)
            st["bytes"] += size
            return True

    def fail(self, e: OSError) -> None:
        if self.failed is None:
            self.event("error", f"the intent log in {self.dir} failed: {e.strerror or e}; "
                       "fsync commits in full until the array is mounted again")
        self.failed = e

    def wants_commit(self) -> bool:
        """The background commit should run now: a quarter of the log's
        room is used since the last one (a log write with no free slot
        would make fsyncs commit in full)."""
        return self.since_commit > SLOT_SIZE * SLOTS_MAX // 4

    async def _place(self, size: int):
        """The slot the next `size` bytes go to (rotating to a free or new
        one), or None."""
        if size > SLOT_SIZE:
            return None
        slot = self.active
        if slot is not None and slot.pos + size <= SLOT_SIZE:
            return slot
        for s in self.slots:
            if s is not slot and self._free(s):
                return self._start(s)
        if len(self.slots) >= SLOTS_MAX:
            return None
        try:
            s = await trio.to_thread.run_sync(self._make_slot_blocking, len(self.slots))
        except OSError as e:
            self.event("warning", f"cannot add a slot to the intent log in {self.dir}: "
                       f"{e.strerror or e}; fsyncs commit in full while it is full")
            return None
        self.slots.append(s)
        return self._start(s)

    def _free(self, s: Slot) -> bool:
        cov = self.covered
        return all(seq <= cov.of(vid) for vid, seq in s.vids.items())

    def _start(self, s: Slot) -> Slot:
        s.use = self.next_use
        self.next_use += 1
        s.pos = 0
        s.vids = {}
        self.active = s
        return s

    # ---- the commit's side --------------------------------------------------
    def commit_point(self) -> int:
        """A commit that flushes everything is starting: how far the log's
        records go now (what it covers once it is in)."""
        return self.last

    def committed(self, cov: Coverage) -> None:
        """A commit covering `cov` is in the catalogue: drop what it covers
        from what the next fsync would log."""
        self.covered = cov
        self.stats["commits"] += 1
        if self.pending:
            keep = [r for r in self.pending if not cov.covers(r[1], r[0])]
            if len(keep) != len(self.pending):
                self.pending = keep
                self.pending_bytes = sum(HEAD.size + (len(r[5]) if r[5] is not None else 0)
                                         for r in keep)
        if cov.floor() >= self.logged:
            self.since_commit = 0
        self.logged = max(self.logged, cov.floor())

    # ---- open / close --------------------------------------------------------
    def open_blocking(self, covered: Coverage) -> list:
        """Worker thread, at open: read the slots; returns the records no
        commit covers, in order (seq, vid, kind, off, span, data). Makes
        the directory and SLOTS_MIN slots if missing."""
        self.covered = covered
        self.store.prepare()
        found = []
        for idx in self.store.indexes():
            name = f"slot.{idx}"
            fd, data = self.store.open_read(idx)
            s = Slot(idx, name, fd)
            s.use, recs, damaged = parse_slot(data, self.seed)
            if damaged is not None:
                self.damaged.append((name, damaged))
            end = 0
            for rec in recs:
                end += HEAD.size + rec[4] * (rec[2] == WRITE)
                if s.vids.get(rec[1], 0) < rec[0]:
                    s.vids[rec[1]] = rec[0]
            s.pos = end
            found.append((s, recs))
        found.sort(key=lambda x: x[0].use)
        self.slots = sorted((s for s, _ in found), key=lambda s: s.idx)
        while len(self.slots) < SLOTS_MIN:
            self.slots.append(self._make_slot_blocking(
                max([s.idx for s in self.slots], default=-1) + 1))
        self.next_use = max([s.use for s in self.slots], default=0) + 1
        out = []
        last = covered.seq
        for s, recs in found:
            for rec in recs:
                last = max(last, rec[0])
                if not covered.covers(rec[1], rec[0]):
                    out.append(rec)
        out.sort(key=lambda r: r[0])
        self.last = self.logged = last
        return out

    def uncovered_blocking(self, covered: Coverage) -> int:
        """The records of the slots there now that no commit covers,
        read without making or changing anything (a log that cannot be
        made here moves elsewhere with nothing lost when this is 0)."""
        try:
            idxs = self.store.indexes()
        except FileNotFoundError:
            return 0
        n = 0
        for idx in idxs:
            h, data = self.store.open_read(idx)
            self.store.close(h)
            n += sum(1 for rec in parse_slot(data, self.seed)[1]
                     if not covered.covers(rec[1], rec[0]))
        return n

    def _make_slot_blocking(self, idx: int) -> Slot:
        """A new empty slot, durable with its name."""
        return Slot(idx, f"slot.{idx}", self.store.make(idx))

    def remove_blocking(self) -> None:
        """Close and delete the slots (and their directory): the log moved."""
        self.close_blocking()
        self.store.remove()

    def start(self) -> None:
        """After the replay: log writes go to the log's thread."""
        self.writer.start()

    def close_blocking(self) -> None:
        self.writer.stop()
        for s in self.slots:
            self.store.close(s.fd)
        self.slots = []
        self.active = None

    def status(self) -> dict:
        used = sum(1 for s in self.slots if not self._free(s))
        return {"log_dir": self.dir, "log_slots": len(self.slots), "log_slots_used": used,
                "log_failed": self.failed is not None, **{f"log_{k}": v
                                                          for k, v in self.stats.items()}}


def missing_log_error(directory: str) -> ArrayError:
    return ioerror(f"the intent log directory {directory} is missing and the array "
                   "was not closed cleanly: it may hold acknowledged writes. Make it "
                   "available (mount its device) and mount the array again")
