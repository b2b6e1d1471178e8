"""The array: packs, volumes, the catalogue, the committer, GC and events.

State ownership: the Array object (trio thread) owns every in-memory
structure; the catalogue is written only by the committer, in a worker
thread, under `_lock`. Every metadata change (create, delete, resize, tags)
and every data commit goes through `_commit()`, the single commit point:

    flush dirty cache -> store (segments)         [thread]
    merge overlays into maps, store new nodes     [trio + thread]
    fsync segment files                           [thread]
    one SQLite transaction: index rows, roots, catalogue rows, events [thread]

`sync()` is what fsync on a LUN calls: it returns once every write
acknowledged before it is committed (group commit: one commit serves every
fsync that arrived before it started).

The Array is the coordinator: it opens and closes the array and builds
collaborators, each the one owner of its state and given what it needs
(never the Array):
- `ns` (namespace.Namespace): volumes, LUNs, shadow copy sets, identities;
- `runner` (jobs.JobRunner): every job, its worker, events and journal;
- `shadows` (shadows.Shadows): snapshot, resync, swap, delete of shadow
  copies, the copy jobs, the staging API of an import;
- `recovery` (recovery.Recovery): recover, replace, scrub jobs.
The fs and ctl layers call the Array's public methods, which delegate.
"""
import errno
import fcntl
import json
import logging
import math
import os
import secrets
import time
import uuid

import trio

from . import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE, FORMAT_VERSION, ZERO_ID, maps
from .catalogue import Catalogue, Changes
from .events import EVENTS_KEPT, NOISE_KEPT, EventJournal
from .errors import ArrayError, ChecksumError, busy, exists, invalid, ioerror, notfound, nospace
from .perms import FILE_MODE, private_dir, tighten
from .store import SPARE_IDLE, SPARES, Disk, Hasher, Pack, write_file_atomic
from .util import check_name, human_bytes, iso_time, parse_size
from .jobs import JobRunner
from .namespace import Namespace
from .reader import BlockReader, NodeCache
from .recovery import Recovery
from .shadows import Shadows
from .volume import BlockCache, Volume

log = logging.getLogger("fusearray")

ARRAY_FILE = "array.json"
CATALOGUE_FILE = "catalogue.db"
JOB_JOURNAL = "jobs.journal"         # job changes not yet in the catalogue (jobs.JobJournal)
LOCK_FILE = "lock"
CRASH_FILE = "crash.json"            # what the last daemon died of (daemon.py writes it)
RUNNING_FILE = "running"             # a daemon has the array open: gone at a clean close
LAYOUTS = ("single", "mirror", "raid5")
#: A LUN may be this many times larger than its pack (thin provisioning).
OVERCOMMIT = 16
COMMIT_INTERVAL = 5.0
GC_INTERVAL = 10.0
GC_GARBAGE_MIN = 64 << 20
DISK_CHECK_INTERVAL = 2.0
#: Merge overlays into maps once this much is flushed (finds garbage sooner).
OVERLAY_MERGE = 256 << 20
FLUSH_BATCH = 16 << 20
#: On a full pack, segments with this share of garbage or more are
#: compacted (GC's usual bar is half): overwrites (a file system's journal
#: and metadata) leave garbage spread thin over many segments.
RECLAIM_RATIO = 0.95
#: A full or failed pack's dirty blocks are retried this often.
FLUSH_RETRY = 3.0


def _bs_ok(bs: int) -> bool:
    return 4096 <= bs <= (1 << 20) and bs & (bs - 1) == 0


# ---- creating an array (blocking; used by `fusearray init`) ----------------
def parse_pack_spec(spec: str) -> tuple[str, str, list[str]]:
    """`NAME=LAYOUT:DIR[,DIR...]`."""
    try:
        name, rest = spec.split("=", 1)
        layout, dirs = rest.split(":", 1)
    except ValueError:
        raise invalid(f"bad pack {spec!r}: use NAME=LAYOUT:DIR[,DIR...]") from None
    return name, layout, [d for d in dirs.split(",") if d]


#: ctl/status lists disks found invalid under a pack of this name.
RESERVED_PACK = "INVALID"
#: The longest the checks of new disk directories may take (a directory on
#: a hung network file system): then the command fails, the mount goes on.
DISK_CHECK_TIMEOUT = 60.0


def check_pack(name: str, layout: str, dirs: list[str], used: set) -> list[str]:
    """Validate a new pack; returns absolute disk paths. Blocking (it looks
    at the directories): never on the trio thread of a mounted array."""
    check_name(name, "pack name")
    if name == RESERVED_PACK:
        raise invalid(f"the pack name {RESERVED_PACK} is reserved (ctl/status lists "
                      "invalid disks under it): choose another name")
    if layout not in LAYOUTS:
        raise invalid(f"unknown layout {layout!r}: use single, mirror or raid5")
    need = {"single": (1, 1), "mirror": (2, 3), "raid5": (3, 16)}[layout]
    if not need[0] <= len(dirs) <= need[1]:
        count = f"exactly {need[0]}" if need[0] == need[1] else f"{need[0]} to {need[1]}"
        raise invalid(f"layout {layout} takes {count} directories, got {len(dirs)}")
    paths = [os.path.abspath(d) for d in dirs]
    if len(set(paths)) != len(paths):
        raise invalid("the same directory is given twice: each disk needs its own")
    for p in paths:
        if p in used:
            raise busy(f"directory {p} is already a disk of this array")
        if os.path.exists(p):
            if not os.path.isdir(p):
                raise invalid(f"{p} is not a directory")
            if os.listdir(p):
                if os.path.exists(os.path.join(p, "fusearray-disk.json")):
                    raise busy(f"{p} is already a disk of a fusearray pack")
                raise invalid(f"disk directory {p} is not empty")
    return paths


def check_outside_mount(paths: list[str], mountpoint: str | None) -> None:
    """Refuse a disk directory inside the array's own mount: the daemon
    would send FUSE requests to itself. By the resolved path (symlinks
    followed) and by the device of its nearest existing ancestor (a bind
    mount of part of the mount elsewhere). Blocking, in a worker thread:
    the lookups it makes inside the mount are answered by the trio thread."""
    if not mountpoint:
        return
    mnt = os.path.realpath(mountpoint)
    dev = os.stat(mnt).st_dev
    for p in paths:
        real = os.path.realpath(p)
        near = real
        while True:
            try:
                st = os.stat(near)
                break
            except FileNotFoundError:
                near = os.path.dirname(near)
        if real == mnt or real.startswith(mnt.rstrip("/") + "/") or st.st_dev == dev:
            raise invalid(f"disk directory {p} is inside this array's own mount {mnt}: "
                          "a pack's disks must be host directories outside it")


def init_array(path: str, packs: list[str] | None = None,
               block_size: int = DEFAULT_BLOCK_SIZE, verify: bool = False) -> None:
    """Create an array directory (`fusearray init`)."""
    path = os.path.abspath(path)
    if not _bs_ok(block_size):
        raise invalid("block size must be a power of two from 4K to 1M")
    if os.path.exists(os.path.join(path, ARRAY_FILE)):
        raise exists(f"{path} is already an array")
    if os.path.exists(path) and os.listdir(path):
        raise invalid(f"{path} is not empty: give a new or empty directory")
    specs = [parse_pack_spec(s) for s in packs or []]
    if not specs:
        specs = [("main", "single", [os.path.join(path, "disks", "main.0")])]
    used: set = set()
    checked = []
    for name, layout, dirs in specs:
        if name in {c[0] for c in checked}:
            raise exists(f"pack {name} given twice")
        paths = check_pack(name, layout, dirs, used)
        used.update(paths)
        checked.append((name, layout, paths))
    private_dir(path)       # the raw data, the catalogue and the secret: 0700
    if not packs:
        private_dir(os.path.join(path, "disks"))
    array_id = str(uuid.uuid4())
    conf = {"format": FORMAT_VERSION, "uuid": array_id,
            "seed": secrets.randbits(64), "block_size": block_size,
            "verify": verify, "vendor": secrets.token_hex(5)[:9]}
    cat = Catalogue(os.path.join(path, CATALOGUE_FILE), create=True)
    try:
        now = time.time()
        ch = Changes(meta={"format": FORMAT_VERSION, "uuid": array_id,
                           "next_serial": 1, "next_vid": 1},
                     packs_add=[(n, l, now, p) for n, l, p in checked],
                     events=[(now, "info", f"array created at {path}")])
        for name, _, paths in checked:
            for i, p in enumerate(paths):
                Disk(i, p).write_label(array_id, name)
        cat.commit_blocking(ch)
    finally:
        cat.close()
    write_file_atomic(os.path.join(path, ARRAY_FILE), json.dumps(conf, indent=1).encode())


def read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, ARRAY_FILE)) as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise notfound(f"{path} is not a fusearray array (no {ARRAY_FILE}); "
                       "create one with `fusearray init`") from None
    except (OSError, ValueError) as e:
        raise ioerror(f"cannot read {path}/{ARRAY_FILE}: {e}") from None
    if conf.get("format") != FORMAT_VERSION:
        raise invalid(f"{path} has array format {conf.get('format')}, "
                      f"this fusearray reads format {FORMAT_VERSION}")
    return conf


class Array:
    def __init__(self, path: str, cache_size: int = DEFAULT_CACHE_SIZE):
        self.path = os.path.abspath(path)
        self.conf = read_config(self.path)
        self.hasher = Hasher(self.conf["seed"])
        self.verify = bool(self.conf.get("verify"))
        self.default_block_size = self.conf["block_size"]
        self.cache = BlockCache(cache_size)
        self.nodes = NodeCache(max(64 << 20, min(cache_size // 4, 512 << 20)))
        self.packs: dict[str, Pack] = {}
        self.journal = EventJournal(self.path)   # events: logged, shown, journaled (events.py)
        self.events = self.journal.log           # what ctl/events shows
        self.reader = BlockReader(self.nodes, self.journal.event, self.drain_notes)
        self.durable_seq = 0      # every write up to this one (any volume) is durable
        self.started = time.time()
        self._lock = trio.Lock()
        self._db = trio.CapacityLimiter(1)
        self._pending = Changes()
        self._dirty_rows: set = set()
        self._gc_wanted = False
        self._garbage: dict = {}                 # pack name -> bytes overwritten since its last GC
        self._meta_changed = False               # disk states changed
        self._reclaiming = False
        self._last_disk_check = 0.0
        self._last_commit = 0.0
        self._last_gc = 0.0
        self._lockfd = None
        self._open_infos: list = []              # (level, message) found while opening
        self.catalogue: Catalogue | None = None
        self.fatal: BaseException | None = None
        self._dirty_jobs: set = set()
        self._pins: list = []                    # (vol, root, height) kept by exports
        self.nursery = None                      # the daemon's: set by `open`
        self.notify = lambda vol: None   # the fs layer invalidates kernel caches
        self.mountpoint: str | None = None       # set by the daemon (disks must be outside)
        self.previous_session: list[str] = []    # how the last daemon ended, if badly
        # ---- the collaborators (each given what it needs, none the Array) ----
        self.writeback = _WriteBackNames(self)
        self.collector = _CollectorNames(self)
        self.runner = JobRunner(os.path.join(self.path, JOB_JOURNAL), event=self.journal.event,
                                mark_dirty=self.writeback.mark_job)
        self.ns = Namespace(self.conf["uuid"], self.conf["vendor"],
                            make_volume=self._make_volume,
                            changes=lambda: self.writeback.changes,
                            mark_row=self.writeback.mark_row,
                            volume_dropped=self.runner.volume_dropped)
        self.volumes = self.ns.volumes           # every live volume, also deleted-but-open
        self.luns = self.ns.luns
        self.sets = self.ns.sets                 # name -> namespace.ShadowSet
        self.jobs = self.runner.jobs
        self.shadows = Shadows(self.ns, self.runner, wb=self.writeback,
                               collector=self.collector, read_locs=self.reader.read_locs,
                               loader=self.reader.loader, pack=self.pack, event=self.journal.event,
                               notify=lambda vol: self.notify(vol),
                               store_hashed=_store_hashed, collision=_Collision)
        self.recovery = Recovery(self.conf["uuid"], packs=self.packs, pack=self.pack,
                                 runner=self.runner, lock=self._lock,
                                 commit=self._commit, event=self.journal.event,
                                 drain_notes=self.drain_notes,
                                 check_new_disks=self.check_new_disks)

    def _make_volume(self, row: dict, pack: Pack, source: Pack | None) -> Volume:
        """A Volume of catalogue row `row`, wired to the cache, the reader
        and write admission (the Array's admit/pack_writable until the
        write-back owns them)."""
        return Volume(row, pack, cache=self.cache, reader=self.reader, admission=self,
                      source=source)

    # the counters the commit persists (the namespace's and the runner's)
    @property
    def next_serial(self) -> int:
        return self.ns.next_serial

    @property
    def next_vid(self) -> int:
        return self.ns.next_vid

    @property
    def next_job(self) -> int:
        return self.runner.next_id

    @property
    def job_journal(self):
        return self.runner.journal

    # ---- open / close --------------------------------------------------------
    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise busy(f"array {self.path} is already mounted (daemon pid {other or '?'}); "
                       "unmount it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lockfd = fd

    def _previous_session_blocking(self) -> list[str]:
        """How the last daemon ended, if not cleanly: its crash record (it
        died of an error and wrote one), or its running marker alone (it
        was killed: SIGKILL, out of memory, the machine stopped). Then this
        daemon's marker. Caller holds the array lock."""
        notes = []
        crash = os.path.join(self.path, CRASH_FILE)
        running = os.path.join(self.path, RUNNING_FILE)
        try:
            with open(crash) as f:
                c = json.load(f)
            notes.append(f"the previous daemon (pid {c.get('pid', '?')}) died at "
                         f"{c.get('time', '?')}: {c.get('error', '?')}; its mount was "
                         f"detached; see {os.path.join(self.path, 'daemon.log')} for the "
                         "traceback")
        except FileNotFoundError:
            try:
                with open(running) as f:
                    pid, _, started = f.read().strip().partition(" ")
                notes.append(f"the previous daemon (pid {pid or '?'}, started "
                             f"{iso_time(float(started)) if started else '?'}) did not end "
                             "cleanly: it was killed (SIGKILL, out of memory) or the machine "
                             "stopped; writes it acknowledged without an fsync may be lost "
                             "(every fsync'd write is kept)")
            except FileNotFoundError:
                pass
            except (OSError, ValueError):
                notes.append("the previous daemon did not end cleanly (its marker file "
                             f"{running} is unreadable)")
        except (OSError, ValueError) as e:
            notes.append(f"the previous daemon died (its crash record {crash} is "
                         f"unreadable: {e}); see {os.path.join(self.path, 'daemon.log')}")
        write_file_atomic(running, f"{os.getpid()} {time.time()}\n".encode())
        _unlink_quietly(crash)
        return notes

    def record_death(self, message: str) -> None:
        """The daemon is dying of an unexpected error: an event, written to
        the events journal even after `close` (the next open puts it in the
        catalogue), and to the log."""
        self.journal.record_death(message)

    def _open_blocking(self):
        self._take_lock()
        self.previous_session = self._previous_session_blocking()
        cat = self.catalogue = Catalogue(os.path.join(self.path, CATALOGUE_FILE))
        meta = cat.meta()
        if meta.get("uuid") != self.conf["uuid"]:
            raise invalid(f"catalogue of {self.path} belongs to another array")
        self._meta = meta
        self._job_rows = cat.jobs()
        self._journaled_jobs = self.runner.load_blocking(self._job_rows,
                                                         int(meta.get("next_job", 1)))
        notes = []
        for name, layout, _created in cat.packs():
            disks = [Disk(i, p, s, since) for i, p, s, since in cat.disks(name)]
            pack = Pack(name, layout, disks, self.hasher)
            removed = pack.open_blocking(cat.block_rows(name), self.conf["uuid"])
            if removed:
                notes.append(f"pack {name}: removed {len(removed)} segment file(s) "
                             "left unreferenced by an interrupted session")
            if pack.state != "healthy":
                notes.append(f"pack {name} is {pack.state}: "
                             + ", ".join(f"disk {d.idx} {d.state} ({d.path})"
                                         for d in pack.disks if d.state != "online")
                             + f"; run `recover {name}`")
            self.packs[name] = pack
        self._tighten_modes(cat)
        notes += self.previous_session
        rows = cat.volumes()
        replayed = self.journal.recover_blocking(
            int(meta.get("events_journal", 0)),
            lambda events, n: cat.commit_blocking(Changes(events=events,
                                                          meta={"events_journal": n})))
        if replayed:
            notes.append(f"recovered {replayed} event(s) logged after the last commit "
                         "of the previous session")
        self.journal.load(cat.events(EVENTS_KEPT, NOISE_KEPT))
        self._set_rows = cat.sets()
        return rows, notes

    def _tighten_modes(self, cat: Catalogue) -> None:
        """An array made by an older fusearray let other users read its
        data, catalogue and secret: take the group and world bits off
        (directories 0700, files 0600), and say so in an event."""
        disks = [p for name, _, _ in cat.packs() for _, p, _, _ in cat.disks(name)]
        try:
            changed = tighten([self.path] + disks)
        except OSError as e:
            self._open_infos.append(("warning", f"cannot restrict the modes of the array's "
                                     f"files to their owner: {e}; fix with "
                                     f"`chmod -R go= {self.path}` and each disk directory"))
            return
        if changed:
            shown = ", ".join(os.path.relpath(p, self.path) if p.startswith(self.path + "/")
                              else p for p in changed[:5])
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            self._open_infos.append(("info", f"restricted {len(changed)} file(s) and "
                                     f"directories of the array to their owner (they were "
                                     f"readable by other users): {shown}{more}"))

    async def open(self, nursery) -> None:
        rows, notes = await trio.to_thread.run_sync(self._open_blocking)
        self.ns.load(self._meta, self._set_rows, rows, self.packs)
        self.nursery = nursery
        self.runner.load(self._job_rows, self._journaled_jobs)
        for n in notes:
            self.event("warning", n)
        for level, n in self._open_infos:
            self.event(level, n)
        self.event("info", f"array opened: {len(self.luns)} LUN(s), "
                   f"{len(self.packs)} pack(s)")
        self._last_commit = time.monotonic()
        nursery.start_soon(self._committer)
        self.runner.resume_all(nursery)   # each worker says it resumes, and where

    async def close(self) -> int:
        """Final commit, then release files. Safe to call once. Returns the
        bytes of acknowledged writes that could not be stored (a full or
        failed pack) and are lost with the process: an error event says so
        (the daemon then exits non-zero). `fusearray umount` runs `sync all`
        first and refuses to unmount while any is left, so this happens
        only to an unmount or SIGTERM that bypassed it."""
        lost = 0
        try:
            if self.fatal is None and self.catalogue is not None:
                async with self._lock:
                    await self._commit()
                    unstored = self._unstored()
                    lost = sum(unstored.values())
                    if lost:
                        err = self._not_stored_error(None)
                        self.event("error", f"unmounted with {human_bytes(lost)} of "
                                   f"acknowledged writes not stored ({_per_volume(unstored)}):"
                                   f" they are lost; {err.message}. `fusearray umount` "
                                   "refuses this unless given --discard")
                    self.event("info", "array closed")
                    await self._commit(flush=False)
        finally:
            for pack in self.packs.values():
                pack.close_blocking()
            if self.catalogue is not None:
                self.catalogue.close()
                self.catalogue = None
            self.journal.close()
            self.runner.close()
            if self._lockfd is not None:
                _unlink_quietly(os.path.join(self.path, RUNNING_FILE))   # ended cleanly
            if self._lockfd is not None:
                os.close(self._lockfd)
                self._lockfd = None
        return lost

    # ---- events ----------------------------------------------------------------
    def event(self, level: str, message: str, source: str | None = None) -> None:
        """Log an event: EventJournal.event (collaborators are given
        `journal.event` itself)."""
        self.journal.event(level, message, source)

    def flush_event_summaries(self) -> None:
        self.journal.flush_summaries()

    def drain_notes(self) -> None:
        """Pack messages from worker threads -> events."""
        for pack in self.packs.values():
            while pack.notes:
                level, msg = pack.notes.pop(0)
                self.event(level, msg)
                self._meta_changed = True

    # ---- committer ---------------------------------------------------------------
    async def _committer(self) -> None:
        cache = self.cache
        while True:
            with trio.move_on_after(1.0):
                await cache.wake_committer.wait()
            if cache.wake_committer.is_set():
                cache.wake_committer = trio.Event()
            try:
                await self._committer_round()
            except ArrayError:
                pass     # recorded as an event and in cache.errors; retried
            except Exception as e:   # a bug: keep serving, say so, retry later
                log.exception("committer failed")
                self.event("error", f"internal error in the committer: "
                           f"{type(e).__name__}: {e}; retrying")
                self.cache.errors["*"] = ioerror(f"the array could not write back "
                                                 f"data: {e}")
                await trio.sleep(1)

    async def _committer_round(self) -> None:
        """One round of the committer: disk checks, write-back, the
        periodic commit and GC. Its errors are the committer's to catch."""
        cache = self.cache
        self.flush_event_summaries()
        now = time.monotonic()
        if now - self._last_disk_check >= DISK_CHECK_INTERVAL:
            self._last_disk_check = now
            for pack in list(self.packs.values()):
                before = [d.state for d in pack.disks]
                async with self._lock:       # no segment retired meanwhile
                    await trio.to_thread.run_sync(pack.check_disks_blocking,
                                                  self.conf["uuid"], pack.sealed())
                if before != [d.state for d in pack.disks]:
                    self._meta_changed = True
        self.drain_notes()
        async with self._lock:
            if cache.dirty_bytes > cache.flush_at:
                # bounded: under a steady stream of writes the dirty
                # level never drops, and an unbounded loop starved the
                # commits and GC below (segments piled up, 7 GB of
                # them for a 1 GB LUN, and fresh pages cost 4x)
                budget = cache.dirty_limit
                while cache.dirty_bytes > cache.flush_to and budget > 0:
                    await self._flush(FLUSH_BATCH)
                    budget -= FLUSH_BATCH
                    await self._reclaim_as_we_go()
            now = time.monotonic()
            piled = sum(len(v.overlay) * v.block_size for v in self.volumes.values())
            if (now - self._last_commit >= COMMIT_INTERVAL and self._needs_commit()) \
                    or piled > OVERLAY_MERGE:
                await self._commit()     # merging finds overwritten blocks
            if self._gc_wanted:
                if now - self._last_gc >= GC_INTERVAL:
                    await self._gc()
                elif pressing := self._garbage_pressing():
                    await self._gc(pressing)
            for pack in self.packs.values():
                if len(pack.spares) > SPARES and now - pack.last_roll > SPARE_IDLE:
                    await trio.to_thread.run_sync(pack.trim_spares_blocking, SPARES)

    async def _reclaim_as_we_go(self) -> None:
        """In a long write-back (a LUN overwritten end to end): once
        OVERLAY_MERGE is flushed, fold it into the maps, and if that shows
        a pack's garbage pressing, collect it there and then, without
        flushing the rest (the old data's segments become spares for the
        rest of the flush instead of after it: one overwrite pass took
        twice the LUN's space, all of it new files, at a quarter of the
        speed on the bench VM). Caller holds `_lock`."""
        if sum(len(v.overlay) * v.block_size for v in self.volumes.values()) < OVERLAY_MERGE:
            return
        await self._merge()
        pressing = self._garbage_pressing()
        if pressing:
            await self._gc(pressing, flush=False)

    def _garbage_pressing(self) -> list:
        """The packs with overwritten data worth reclaiming now rather than
        at the next GC interval: a quarter of what each stores (so the
        marking, which walks that pack's maps, stays in proportion). Per
        pack: against the whole array, one LUN's overwrite pass found no GC
        until it ended, and all of it went to fresh segment files. Both
        sides logical: a mirror's copies would double the bar."""
        return [name for name, garbage in self._garbage.items()
                if name in self.packs
                and garbage > max(GC_GARBAGE_MIN, self.packs[name].data_bytes() // 4)]

    def _needs_commit(self) -> bool:
        return bool(self.cache.dirty or self._dirty_rows or not self._pending.empty()
                    or self.journal.uncommitted
                    or self._dirty_jobs or self._meta_changed
                    or any(v.overlay for v in self.volumes.values())
                    or any(p.pending_add or p.pending_del for p in self.packs.values()))

    async def _flush(self, max_bytes: int | None = None) -> None:
        """Write dirty cache blocks to their packs; their ids go to the
        volumes' overlays. Caller holds `_lock`.

        The buffers are handed over, not copied: they are marked `shared`
        and a write to one copies it first. Each pack is flushed on its
        own: a full or failed pack keeps its blocks dirty (retried every
        few seconds) and its error in `cache.errors`, while the others go
        on. Raises the first pack error."""
        cache = self.cache
        now = time.monotonic()
        groups: dict = {}
        taken = 0
        snap = cache.seq        # the buffers taken hold every write up to this one
        for e in cache.dirty:
            pack = e.vol.pack
            if pack.name in cache.errors and now < cache.retry_at.get(pack.name, 0):
                continue
            if e.buf is not None:
                e.shared = True
            groups.setdefault(pack, []).append((e, e.gen, e.vol.generation, e.buf))
            taken += e.vol.block_size
            if max_bytes and taken >= max_bytes:
                break
        first = None
        try:
            for pack, batch in groups.items():
                try:
                    await self._flush_pack(pack, batch, snap)
                    if cache.errors.pop(pack.name, None) is not None:
                        self.event("info", f"pack {pack.name} accepts writes again")
                except ArrayError as err:
                    cache.errors[pack.name] = err
                    cache.retry_at[pack.name] = now + FLUSH_RETRY
                    first = first or err
        finally:
            for batch in groups.values():
                for e, _, _, buf in batch:
                    if e.buf is buf and type(buf) is bytearray:
                        e.shared = False
            cache.recount_stuck()
            cache.flushed()
        if first is not None:
            raise first

    async def _flush_pack(self, pack: Pack, batch, snap: int) -> None:
        """Store `batch` [(entry, gen, volume generation, buf)], taken
        when the last write acknowledged was number `snap`. Punched blocks
        (buf None) need no space and go first, so that on a full pack the
        reclaim below already frees what they punched."""
        cache = self.cache
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
                    _hash_and_store, self.hasher, items, self.verify)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT) or self._reclaiming:
                    raise
                if pack.name in cache.errors and not self._gc_wanted and not zeros:
                    raise       # full already, and nothing freed since the last reclaim
                await self._reclaim()           # garbage first, then try again
                ids, added = await trio.to_thread.run_sync(
                    _hash_and_store, self.hasher, items, self.verify)
        except OSError as err:
            raise self._append_error(pack, err, quiet=pack.name in cache.errors) from None
        except _Collision as c:
            msg = (f"hash collision in pack {c.pack} on id {c.bid}: two different "
                   "blocks share a content id; the write was refused (verify mode "
                   "caught it)")
            self.event("error", msg)
            raise ioerror(msg) from None
        for p, bid, loc in added:
            p.add(bid, loc)
        for (e, gen, vgen, _), bid in zip(batch, ids):
            self._stored(e, gen, vgen, bid, snap)

    def _stored(self, e, gen: int, vgen: int, bid: bytes, snap: int) -> None:
        """Entry `e` as of generation `gen` is stored as `bid`: its id goes
        to the overlay (unless the volume's content was replaced since)."""
        vol = e.vol
        if vgen != vol.generation or vol.cache.get(e.bno) is not e:
            return
        old = vol.overlay.get(e.bno)
        if old is not None and old != bid and old != ZERO_ID:
            self._add_garbage(vol)               # flushed, then overwritten
            self._gc_wanted = True
        elif bid == ZERO_ID:
            self._gc_wanted = True               # punched: may free space (see admit)
        vol.overlay[e.bno] = bid
        cache = self.cache
        cache.mark_clean(e, gen)
        if e.dirty:     # written again meanwhile: only writes after `snap` are not stored
            e.seq = max(e.seq, snap + 1)
        elif type(e.buf) is memoryview:
            cache.drop(e)   # a view pins its whole write request: let it go

    def _append_error(self, pack: Pack, e: OSError, quiet: bool = False) -> ArrayError:
        """The error writers get; an event unless the pack already had one."""
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

    async def _store_new(self, items, reserve_ok: bool = False) -> None:
        """Append the blocks of `items` [(pack, id, data)] their pack does not
        hold yet. Dedup hits are confirmed byte for byte in verify mode."""
        new: dict = {}
        check = []
        for pack, bid, data in items:
            if bid == ZERO_ID:
                continue
            recs = new.setdefault(pack, {})
            if bid in recs:
                continue
            loc = pack.lookup(bid)
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
                raise self._append_error(pack, e) from None
            for (bid, _), loc in zip(records, locs):
                pack.add(bid, loc)

    async def _merge(self) -> None:
        """Fold every overlay into its map; store the new nodes."""
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
            root, delta = await maps.apply(root, height, merged, self.reader.loader(vol),
                                           emit, self.hasher, stats)
            await self._store_new([(vol.pack, nid, data) for nid, data in new_nodes], True)
            vol.root, vol.height = root, height
            vol.allocated += delta
            for bno, bid in merged.items():
                if vol.overlay.get(bno) == bid:
                    del vol.overlay[bno]
            self._dirty_rows.add(vol)
            if stats["replaced"]:
                self._gc_wanted = True   # something was overwritten or zeroed
                self._add_garbage(vol, stats["replaced"])

    async def _commit(self, flush: bool = True) -> None:
        """The commit point. Caller holds `_lock`. flush=False commits only
        what is already stored (the index and catalogue changes)."""
        if self.fatal is not None:
            raise ioerror(f"the array stopped after a fatal error: {self.fatal}")
        seq = self.cache.seq
        if flush:
            try:
                await self._flush()
            except ArrayError:
                pass    # in cache.errors and the blocks stay dirty: writers and
                        # sync() see it (_mark_durable); the catalogue changes still commit
            await self._merge()
        for pack in self.packs.values():
            lost_before = pack.lost_writes
            try:
                moved = await trio.to_thread.run_sync(pack.sync_blocking)
            except OSError as e:      # not durable: nothing is committed (see Pack.sync_blocking)
                self.drain_notes()
                raise self._append_error(pack, e, quiet=lost_before is not None) from None
            for bid, loc in moved:    # written again after a failed fsync
                pack.add(bid, loc)
        ch, self._pending = self._pending, Changes()
        ch.events, journal = self.journal.take()
        if journal is not None:
            ch.meta["events_journal"] = journal + 1   # journals below are in the catalogue
        for pack in self.packs.values():
            adds, dels = pack.take_pending()
            if adds:
                ch.blocks_add[pack.name] = adds
            if dels:
                ch.blocks_del[pack.name] = dels
        ch.volumes = [v.row() for v in self._dirty_rows if not v.deleted]
        self._dirty_rows = set()
        ch.meta.update(next_serial=self.next_serial, next_vid=self.next_vid,
                       next_job=self.next_job)
        ch.jobs = [j.row() for j in self._dirty_jobs]
        noted = self.job_journal.notes if self.job_journal is not None else 0
        ch.disks = [(p.name, d.idx, d.path, d.state, d.since)
                    for p in self.packs.values() for d in p.disks]
        self._dirty_jobs = set()
        try:
            await trio.to_thread.run_sync(self.catalogue.commit_blocking, ch,
                                          limiter=self._db)
        except Exception as e:
            self.fatal = e
            log.exception("catalogue commit failed")
            raise ioerror(f"catalogue commit failed: {e}; the array stopped "
                          "accepting changes, remount it") from None
        if journal is not None:
            await self.journal.retire(journal)
        if self.job_journal is not None:
            self.job_journal.committed(noted)
        if flush:       # every overlay was merged: what is not dirty is committed
            self._mark_durable(seq)
        self._meta_changed = False
        if flush:       # commits of what is stored (GC during a write-back) don't put it off
            self._last_commit = time.monotonic()
        await self._delete_dead_segments()

    async def _delete_dead_segments(self) -> None:
        """After a commit: segments nothing points into any more are
        recycled (or deleted while a read is still in flight on them)."""
        for pack in self.packs.values():
            for seg in pack.dead_segments():
                if pack.drop_dead_segment(seg):     # being read: closed after the read
                    await trio.to_thread.run_sync(pack.unlink_segment_blocking, seg)
                else:
                    reuse = pack.free_bytes() > 8 * pack.reserve   # never on a full pack
                    await trio.to_thread.run_sync(pack.retire_blocking, seg, reuse)

    @property
    def write_seq(self) -> int:
        """Sequence number of the last write acknowledged (any volume)."""
        return self.cache.seq

    async def sync(self, vol: Volume | None = None) -> None:
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
        Group commit: one commit serves every fsync waiting for the lock."""
        target = self.cache.seq if vol is None else vol.last_write
        if self._durable(vol) >= target:
            return
        async with self._lock:
            if self._durable(vol) >= target:
                return
            cache = self.cache
            for name in ([vol.pack.name] if vol is not None else list(cache.errors)):
                cache.retry_at.pop(name, None)     # retried now, not after the back-off
            try:
                await self._commit()
            except ArrayError:
                if self._durable(vol) >= target:
                    return          # a later step failed; what fsync covers is in
                raise
            if self._durable(vol) < target:
                raise self._not_stored_error(vol)

    async def sync_all(self, discard: bool = False) -> dict:
        """ctl `sync all [discard=yes]`, what `fusearray umount` runs before
        it unmounts: every acknowledged write of every volume stored and
        committed (sync(None)), or ENOSPC/EIO saying how much of which
        LUN is not, and the array stays as it is. With `discard`, blocks
        that still cannot be stored after a last try are dropped (the LUN
        reads what it held before those writes) and an event says how
        much of which LUN was dropped."""
        try:
            await self.sync(None)
            return {"unstored_bytes": 0}
        except ArrayError as err:
            unstored = self._unstored()
            if not unstored:
                raise
            if not discard:
                raise ArrayError(err.errno, f"{human_bytes(sum(unstored.values()))} of "
                                 f"acknowledged writes are not stored "
                                 f"({_per_volume(unstored)}): {err.message}. Free space "
                                 "(or repair the pack) and retry, or drop them with "
                                 "`fusearray umount --discard` (ctl: sync all "
                                 "discard=yes)") from None
        async with self._lock:
            cache = self.cache
            for name in list(cache.errors):
                cache.retry_at.pop(name, None)
            try:
                await self._flush()         # a last try: what can be stored is
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
                           f"writes that could not be stored ({_per_volume(dropped)}), "
                           "as asked (sync all discard=yes, `fusearray umount --discard`);"
                           " those blocks read as they were before the writes")
            await self._commit()
        await self.sync(None)
        return {"unstored_bytes": 0, "dropped_bytes": total}

    def _unstored(self) -> dict:
        """{volume: bytes} of dirty blocks of packs that refused them."""
        cache = self.cache
        out: dict = {}
        for e in cache.dirty:
            if e.vol.pack.name in cache.errors or "*" in cache.errors:
                out[e.vol] = out.get(e.vol, 0) + e.vol.block_size
        return out

    def _durable(self, vol: Volume | None) -> int:
        return self.durable_seq if vol is None else vol.durable_seq

    def _not_stored_error(self, vol: Volume | None) -> ArrayError:
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

    async def pack_writable(self, pack: Pack) -> None:
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
        async with self._lock:
            if cache.error_for(pack.name) is None:
                return                      # stored meanwhile
            cache.retry_at.pop(pack.name, None)
            try:
                if self._has_room(pack) or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    await self._flush()
                else:
                    await self._gc()        # frees what was deleted or punched; retries
            except ArrayError:
                pass
        err = cache.error_for(pack.name)
        if err is not None:
            raise err

    async def admit(self, vol: Volume, off: int, end: int) -> None:
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
            # clears _gc_wanted at its start, so without waiting a write
            # racing it saw nothing pending and was refused (ENOSPC) just
            # before that GC freed the space; then look once more
            async with self._lock:
                if self._frees_pending(pack):
                    try:
                        await self._gc()
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

    def _frees_pending(self, pack: Pack) -> bool:
        """Something may free space in `pack` at the next collection: a
        delete or overwrite since the last one, or a punched block not yet
        written back."""
        return self._gc_wanted or any(e.buf is None and e.vol.pack is pack
                                      for e in self.cache.dirty)

    def _has_room(self, pack: Pack) -> bool:
        """As of its last statvfs, `pack` can take its stuck dirty blocks."""
        stuck = sum(e.vol.block_size for e in self.cache.dirty if e.vol.pack is pack)
        return pack.free_bytes() >= pack.reserve + stuck + (1 << 20)

    # ---- garbage collection ----------------------------------------------------
    def _add_garbage(self, vol: Volume, blocks: int = 1) -> None:
        name = vol.pack.name
        self._garbage[name] = self._garbage.get(name, 0) + blocks * vol.block_size

    async def _gc(self, only: list | None = None, flush: bool = True) -> None:
        """Mark every block reachable from a volume, sweep the rest, compact
        sparse segments, commit, delete emptied segments; with `only`, in
        those packs alone (their volumes' maps are all it walks); with
        flush=False, what is already stored only (dirty blocks stay in the
        cache; see _commit). Caller holds `_lock`."""
        if only is None:
            self._gc_wanted = False
            self._garbage.clear()
            self._last_gc = time.monotonic()
        for name in only or ():
            self._garbage.pop(name, None)
        if flush:
            await self._flush()
        await self._merge()
        live, seen = await self._mark_live(only)
        freed = 0
        for name in live:
            pack = self.packs[name]
            freed += pack.sweep(live[name])
            pack.seal_if_sparse()
            await self._compact(pack)
        await self._commit(flush)
        if freed:
            log.info("gc freed %s", human_bytes(freed))
        await self._retry_full_packs()

    async def _retry_full_packs(self) -> None:
        """After GC freed space: a pack that refused writes for being full
        is retried at once (its blocks still dirty from the failed writes
        are flushed, which clears its error), or, with none left, its error
        is cleared. Writers then get in without waiting for the back-off."""
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
                    await self._flush()
                except ArrayError:
                    pass                     # still an error: writers keep getting it
            elif cache.errors.pop(pack.name, None) is not None:
                cache.recount_stuck()
                self.event("info", f"pack {pack.name} accepts writes again")

    async def _compact(self, pack: Pack, ratio: float = 0.5) -> None:
        """Move the live blocks out of segments less than `ratio` live
        (they die at the next commit). May use the pack's reserve."""
        for seg in pack.sparse_segments(ratio):
            entries = pack.entries_in(seg)
            bids = [b for b, _ in entries]
            datas = await self.reader.read_locs(pack, bids, [loc for _, loc in entries])
            try:
                locs = await trio.to_thread.run_sync(pack.append_blocking,
                                                     list(zip(bids, datas)), True)
            except OSError as e:
                log.warning("compaction of pack %s stopped: %s", pack.name, e)
                return
            for b, loc in zip(bids, locs):
                pack.add(b, loc)

    async def _mark_live(self, only: list | None = None):
        """Every id reachable from a volume, an overlay or a pinned root,
        per pack (of the packs in `only`, default all)."""
        names = list(self.packs) if only is None else [n for n in only if n in self.packs]
        live: dict = {name: set() for name in names}
        seen: dict = {name: set() for name in names}   # per pack: a node shared
        for vol in list(self.volumes.values()):        # across packs counts in each
            if vol.source is not None:     # its blocks must stay in both packs
                if vol.source.name not in live and vol.pack.name not in live:
                    continue
                mine: set = set(vol.overlay.values())
                await maps.mark(vol.root, vol.height, self.reader.loader(vol), mine, set())
                for name in (vol.source.name, vol.pack.name):
                    if name in live:
                        live[name] |= mine
            elif vol.pack.name in live:
                await maps.mark(vol.root, vol.height, self.reader.loader(vol),
                                live[vol.pack.name], seen[vol.pack.name])
                live[vol.pack.name].update(vol.overlay.values())
        for vol, root, height in list(self._pins):
            if vol.source is not None:     # still copied: in both packs, as above
                mine = set()
                await maps.mark(root, height, self.reader.loader(vol), mine, set())
                for name in (vol.source.name, vol.pack.name):
                    if name in live:
                        live[name] |= mine
            elif vol.pack.name in live:
                await maps.mark(root, height, self.reader.loader(vol), live[vol.pack.name],
                                seen[vol.pack.name])
        return live, seen

    async def _reclaim(self) -> None:
        """A pack is full: free what no map references, without writing
        anything new (no flush, no compaction). Caller holds `_lock`."""
        self._reclaiming = True
        try:
            try:
                await self._merge()     # overwritten blocks become garbage (small writes)
            except ArrayError:
                pass
            self._gc_wanted = False     # this is a collection: set again by what frees
            live, _ = await self._mark_live()
            freed = sum(p.sweep(live[n]) for n, p in self.packs.items())
            for pack in self.packs.values():
                pack.seal_if_sparse(1.0)
                await self._compact(pack, RECLAIM_RATIO)
            await self._commit(flush=False)
            log.info("reclaim on a full pack freed %s", human_bytes(freed))
        finally:
            self._reclaiming = False

    async def collect_garbage(self) -> None:
        async with self._lock:
            await self._gc()

    # ---- commands ---------------------------------------------------------------
    def pack(self, name: str | None) -> Pack:
        name = name or ("main" if "main" in self.packs else next(iter(self.packs)))
        try:
            return self.packs[name]
        except KeyError:
            raise notfound(f"no pack named {name!r} (packs: {', '.join(self.packs)})") from None

    def lun(self, name: str) -> Volume:
        return self.ns.lun(name)

    def shadow(self, path: str) -> Volume:
        return self.ns.shadow(path)

    def new_identity(self) -> tuple[str, str]:
        return self.ns.new_identity()

    def _check_fits(self, pack: Pack, size: int) -> None:
        cap = pack.capacity_bytes()
        if size > cap * OVERCOMMIT:
            raise nospace(f"pack {pack.name} cannot hold a LUN of {human_bytes(size)}: "
                          f"its capacity is {human_bytes(cap)} and LUNs may be at most "
                          f"{OVERCOMMIT}x that (thin provisioning)")

    async def create_lun(self, name: str, size_text: str, pack: str | None = None,
                         block_size: int | None = None) -> Volume:
        check_name(name, "LUN name")
        size = parse_size(size_text)
        bs = self.default_block_size if block_size is None else block_size
        if not _bs_ok(bs):
            raise invalid("block size must be a power of two from 4K to 1M")
        p = self.pack(pack)
        async with self._lock:
            if name in self.luns:
                raise exists(f"a LUN named {name} already exists")
            self._check_fits(p, size)
            vol = self.ns.create_lun(name, size, p, bs)
            self.event("info", f"created LUN {name}: {human_bytes(size)} on pack "
                       f"{p.name}, block size {bs // 1024}K, {vol.wwn}")
            await self._commit()
        return vol

    async def delete_lun(self, name: str, force: bool = False) -> None:
        vol = self.lun(name)
        if vol.open_count and not force:
            raise busy(f"LUN {name} is open ({vol.open_by()}; e.g. a loop "
                       "device): detach it first or use force=yes")
        async with self._lock:
            if self.luns.get(name) is not vol:
                raise notfound(f"no LUN named {name!r}")
            del self.luns[name]
            self.ns.drop_volume(vol)      # (a copy job of it ends)
            self.event("info", f"deleted LUN {name} ({vol.wwn})")
            await self._gc()

    def released(self, vol: Volume) -> None:
        """The last handle of a deleted volume closed: forget it."""
        if self.ns.released(vol):
            self._gc_wanted = True

    async def resize_lun(self, name: str, size_text: str, force: bool = False) -> Volume:
        vol = self.lun(name)
        size = parse_size(size_text)
        if vol.readonly:
            raise ArrayError(errno.EROFS, f"LUN {name} is read-only")
        if size < vol.size and vol.open_count and not force:
            raise busy(f"LUN {name} is open ({vol.open_by()}): shrinking it under a "
                       "user could cut off data in use; detach it first or use force=yes")
        async with self._lock:
            self._check_fits(vol.pack, size)
            old = vol.size
            if size < old:
                await self._shrink(vol, size)
            vol.size = size
            self._dirty_rows.add(vol)
            self.event("info", f"resized LUN {name} from {human_bytes(old)} to "
                       f"{human_bytes(size)}")
            await self._commit()
        self.notify(vol)
        return vol

    async def _shrink(self, vol: Volume, size: int) -> None:
        """Drop content past `size` so a later grow reads zeros there."""
        bs = vol.block_size
        keep = math.ceil(size / bs)
        if size % bs:
            await vol.zero_tail(size)
        vol.discard_cache(keep)
        await self._flush()
        await self._merge()
        new_nodes = []

        def emit(nid, data):
            self.nodes.add(nid, data)
            new_nodes.append((nid, data))
        root, delta = await maps.trim(vol.root, vol.height, keep, self.reader.loader(vol),
                                      emit, self.hasher)
        await self._store_new([(vol.pack, nid, d) for nid, d in new_nodes])
        vol.root = root
        vol.allocated += delta
        self._gc_wanted = True

    async def check_new_disks(self, name: str, layout: str, dirs: list[str]) -> list[str]:
        """check_pack and check_outside_mount, in a worker thread (they look
        at user-given paths, perhaps inside this very mount); bounded in time.
        Returns the absolute disk paths."""
        check_name(name, "pack name")
        used = {d.path for p in self.packs.values() for d in p.disks}

        def work():
            check_outside_mount([os.path.abspath(d) for d in dirs], self.mountpoint)
            return check_pack(name, layout, dirs, used)
        with trio.move_on_after(DISK_CHECK_TIMEOUT):
            try:
                return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
            except OSError as e:
                raise ioerror(f"cannot check the disk directories {', '.join(dirs)}: "
                              f"{e}") from None
        raise ioerror(f"checking the disk directories {', '.join(dirs)} took more than "
                      f"{DISK_CHECK_TIMEOUT:.0f} s (a hung file system?): nothing was done")

    async def add_pack(self, name: str, layout: str, dirs: list[str]) -> Pack:
        paths = await self.check_new_disks(name, layout, dirs)
        async with self._lock:
            if name in self.packs:
                raise exists(f"a pack named {name} already exists")
            disks = [Disk(i, p) for i, p in enumerate(paths)]
            try:
                await trio.to_thread.run_sync(_make_disks, disks, self.conf["uuid"], name)
            except OSError as e:
                raise ioerror(f"cannot prepare disk directories for pack {name}: {e}") from None
            pack = Pack(name, layout, disks, self.hasher)
            await trio.to_thread.run_sync(pack.open_blocking, [])
            self.packs[name] = pack
            self._pending.packs_add.append((name, layout, time.time(), paths))
            self.event("info", f"added pack {name}: {layout} over {', '.join(paths)}")
            await self._commit()
        return pack

    async def set_flag(self, vol: Volume, flag: str, value: bool) -> None:
        async with self._lock:
            setattr(vol, flag, value)
            self._dirty_rows.add(vol)
            self.event("info", f"{vol.kind} {vol.path}: {flag} {'on' if value else 'off'}")
            await self._commit()

    def render_job(self, jid: int) -> bytes:
        return self.runner.render(jid)

    # ---- delegates: the commands of the fs and ctl layers ---------------------------
    async def snapshot(self, *args, **kw):
        return await self.shadows.snapshot(*args, **kw)

    async def resync(self, *args, **kw):
        return await self.shadows.resync(*args, **kw)

    async def swap(self, *args, **kw) -> Volume:
        return await self.shadows.swap(*args, **kw)

    async def delete_shadow(self, target: str, force: bool = False) -> dict:
        return await self.shadows.delete_shadow(target, force)

    async def recover(self, name: str):
        return await self.recovery.recover(name)

    async def replace(self, name: str, old: str, new_dir: str, force: bool = False):
        return await self.recovery.replace(name, old, new_dir, force)

    async def scrub(self, name: str):
        return await self.recovery.scrub(name)

    def job(self, text: str):
        return self.runner.get(text)

    async def control_job(self, text: str, action: str, rate: str | None = None):
        return await self.runner.control(text, action, rate)

    def pin(self, roots) -> None:
        self.collector.pin(roots)

    def unpin(self, roots) -> None:
        self.collector.unpin(roots)

    # ---- status ------------------------------------------------------------------
    def status(self) -> dict:
        packs = []
        for p in self.packs.values():
            packs.append({"name": p.name, "layout": p.layout, "state": p.state,
                          "capacity_bytes": p.capacity_bytes(),
                          "used_bytes": p.used_bytes(),
                          "free_bytes": p.free_bytes(),
                          "blocks": len(p.index),
                          "mapped_reads": p.mapped_reads,
                          "disks": [{"id": d.idx, "path": d.path, "state": d.state}
                                    for d in p.disks]})
        luns = [self._vol_status(v) for v in sorted(self.luns.values(), key=lambda v: v.name)]
        sets = [{"name": s.name, "created": s.created,      # (an import in progress:
                 "shadow_copies": [self._vol_status(v)     # shown as its job)
                                   for v in s.members.values()]}
                for s in self.ns.visible_sets()]
        invalid_disks = [{"id": d.idx, "path": d.path, "state": d.state, "pack": p.name}
                         for p in self.packs.values() for d in p.disks
                         if d.state == "invalid"]
        if invalid_disks:
            packs.append({"name": "INVALID", "layout": "-", "state": "invalid",
                          "capacity_bytes": 0, "used_bytes": 0, "free_bytes": 0,
                          "blocks": 0, "mapped_reads": 0, "disks": invalid_disks})
        return {"pid": os.getpid(), "array": self.path, "uuid": self.conf["uuid"],
                "packs": packs, "luns": luns, "sets": sets,
                "jobs": self.runner.status(),
                "cache": {"limit_bytes": self.cache.limit, "bytes": self.cache.bytes,
                          "dirty_bytes": self.cache.dirty_bytes}}

    def _vol_status(self, v: Volume) -> dict:
        d = {"name": v.name, "size": v.size, "pack": v.pack.name, "wwn": v.wwn,
             "serial": v.serial, "readonly": v.readonly, "hidden": v.hidden,
             "allocated_bytes": v.allocated_bytes(), "block_size": v.block_size,
             "open": v.open_count, "state": "online"}
        if v.kind == "shadow":
            d.update(origin=v.origin, context=v.context, set=v.set_name)
        return d


def _per_volume(sizes: dict) -> str:
    """`LUN l0 12.0M, l1 4.0M` for {volume: bytes}."""
    return ", ".join(f"{'LUN' if v.kind == 'lun' else 'shadow copy'} {v.path} "
                     f"{human_bytes(n)}"
                     for v, n in sorted(sizes.items(), key=lambda kv: -kv[1]))


class _Collision(Exception):
    def __init__(self, pack: str, bid: bytes):
        super().__init__(pack, bid)
        self.pack, self.bid = pack, bid.hex()


def _hash_and_store(hasher: Hasher, items, verify: bool):
    """Worker thread, under the array's commit lock: hash each (pack, data),
    append what its pack lacks. Returns (ids, [(pack, id, loc)]) for the
    caller to add to the indexes on the trio thread."""
    ids = _block_ids(hasher, [data for _, data in items])
    return ids, _store_hashed(items, ids, verify)


def _block_ids(hasher: Hasher, datas) -> list:
    """The id of each buffer; ZERO_ID for None (a zero block). Needs no lock."""
    hashed = iter(hasher.block_ids([d for d in datas if d is not None]))
    return [ZERO_ID if d is None else next(hashed) for d in datas]


def _store_hashed(items, ids, verify: bool) -> list:
    """Worker thread, under the array's commit lock: append the (pack, data)
    of `items` whose id (`ids`, in step) their pack lacks; dedup hits are
    confirmed byte for byte in verify mode. Returns [(pack, id, loc)] for
    the caller to add to the indexes on the trio thread."""
    new: dict = {}
    for (pack, data), bid in zip(items, ids):
        if bid == ZERO_ID:
            continue
        recs = new.setdefault(pack, {})
        if bid in recs:
            continue
        loc = pack.index.get(bid)
        if loc is None:
            recs[bid] = data
        elif verify:
            try:
                old = pack.read_blocking(bid, loc)
            except (ChecksumError, OSError):
                recs[bid] = data         # the stored copy is bad: store it again
                continue
            if old != data:
                raise _Collision(pack.name, bid)
    added = []
    for pack, recs in new.items():
        records = list(recs.items())
        if records:
            locs = pack.append_blocking(records)
            added.extend((pack, bid, loc) for (bid, _), loc in zip(records, locs))
    return added


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_disks(disks, array_uuid: str, pack: str) -> None:
    for d in disks:
        private_dir(d.path)
        d.write_label(array_uuid, pack)




class _WriteBackNames:
    """The write-back's public names (issue #14 contract) over the Array's
    private ones, until writeback.py has them: what Shadows and an import
    use. Temporary."""

    def __init__(self, array: Array):
        self.a = array

    @property
    def lock(self):
        return self.a._lock

    @property
    def changes(self) -> Changes:
        return self.a._pending

    def mark_row(self, vol) -> None:
        self.a._dirty_rows.add(vol)

    def mark_job(self, job) -> None:
        self.a._dirty_jobs.add(job)

    async def commit(self, flush: bool = True) -> None:
        await self.a._commit(flush)

    async def flush(self, max_bytes: int | None = None) -> None:
        await self.a._flush(max_bytes)

    async def merge(self) -> None:
        await self.a._merge()

    async def store_new(self, items, reserve_ok: bool = False) -> None:
        await self.a._store_new(items, reserve_ok)

    def append_error(self, pack: Pack, e: OSError, quiet: bool = False) -> ArrayError:
        return self.a._append_error(pack, e, quiet)

    def check_fits(self, pack: Pack, size: int) -> None:
        self.a._check_fits(pack, size)


class _CollectorNames:
    """The collector's public names over the Array's private ones, until
    gc.py has them. Temporary."""

    def __init__(self, array: Array):
        self.a = array

    def pin(self, roots) -> None:
        """Keep the blocks of [(vol, root, height)] alive (an export reads
        them while the volumes may change)."""
        self.a._pins.extend(roots)

    def unpin(self, roots) -> None:
        for r in roots:
            self.a._pins.remove(r)

    async def collect(self, only: list | None = None) -> None:
        """A collection now. Caller holds the commit lock."""
        await self.a._gc(only)

    def want(self) -> None:
        """A collection at the committer's next GC interval."""
        self.a._gc_wanted = True
