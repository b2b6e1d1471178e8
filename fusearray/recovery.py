"""Pack recovery (IVdsPack::Recover), disk replacement and scrub, as jobs
(DESIGN section 5).

`Recovery` is given what it works on (the packs, the job runner, the
write-back's commit lock and commit, an event sink, the disk checks) and
holds no state of its own: a job's progress is in its Job (params
`rebuilt_below`, `next_seg`, committed with the row), a disk's in the
catalogue's disk state. It registers the recover, replace and scrub
workers with the JobRunner.

Concurrency: the commands and workers run on the trio thread; the reads,
XOR and writes of a rebuild piece, a segment's scrub, the disk checks and
the rejoin run in worker threads (trio.to_thread), the pack's methods named
`*_blocking` being the ones safe there. A scrub holds the commit lock per
segment (no segment is retired under it); a rebuild holds it only for its
last pass and the rejoin (no appends meanwhile).

A rebuild writes a disk's share of every segment it lacks: for a disk that
comes back, the segments from the one that was active when it left (write-
once segments before that are unchanged), plus any it lacks or holds at a
different length. Sealed segments are rebuilt while I/O goes on; the last
pass (segments written meanwhile, the active one) runs under the commit
lock, then the disk rejoins. The disk stays not-online in the catalogue
until then, so a crash mid-rebuild leaves the pack usable (degraded) and
the resumed job, or a second `recover`, does the work again.
"""
import errno
import time

import trio

from .errors import ArrayError, busy, ioerror, notfound
from .jobs import Job, JobCancelled, JobRunner
from .store import seg_name
from .util import human_bytes

PIECE = 4 << 20
PARALLEL = 2        # rebuild pieces in flight: the reads, XOR and writes of one
                    # piece drop the GIL, so two use two cores


async def _rebuild_pieces(pack, d, seq: int, pieces) -> int:
    """Rebuild [(off, n)] of disk `d`'s file of `seq`, each piece in its own
    worker thread at once. Returns the bytes written; raises the first
    piece's error (after all have ended)."""
    errors: list = []
    done = [0]

    async def one(off: int, n: int) -> None:
        try:
            wrote = await trio.to_thread.run_sync(pack.rebuild_piece_blocking, d, seq, off, n)
        except (ArrayError, OSError) as e:
            errors.append(e)
        else:
            done[0] += wrote        # (not `+= await`: that reads done[0] before the wait)
    async with trio.open_nursery() as nursery:
        for off, n in pieces:
            nursery.start_soon(one, off, n)
    if errors:
        raise errors[0]
    return done[0]


def _sealed(pack) -> set:
    """Segments no append can change any more (not the active one)."""
    active = pack.active_seq if pack.active_open else None
    return {s for s in pack.sealed() if s != active}


def _drop_rebuilt(pack, d, plan, below: int, sealed: set, upto: dict) -> list:
    """Worker thread: `plan` without the sealed segments below `below` that
    disk `d` already holds at their full length (rebuilt before a restart;
    the last piece of each was fsynced); those go in `upto` as done."""
    out = []
    for seq, size in plan:
        if seq < below and seq in sealed:
            try:
                have = d.medium.file_size(seg_name(seq))
            except OSError:
                have = -1
            if have == size == pack.disk_file_size(seq):
                upto[(d.idx, seq)] = size
                continue
        out.append((seq, size))
    return out


class Recovery:
    """recover, replace and scrub of packs, as jobs (see the module
    docstring). `packs` is the array's pack table, `pack(name)` its lookup
    (ENOENT naming the packs); `lock` and `commit()` are the write-back's;
    `drain_notes()` turns the packs' notes into events; `check_new_disks`
    is the Array's (bounded, in a worker thread)."""

    def __init__(self, uuid: str, *, packs: dict, pack, runner: JobRunner, lock, commit,
                 event, drain_notes, check_new_disks):
        self.uuid = uuid
        self.packs = packs
        self.pack = pack
        self.runner = runner
        self.lock = lock
        self.commit = commit
        self.event = event
        self.drain_notes = drain_notes
        self.check_new_disks = check_new_disks
        runner.register(("recover", "replace"), self._run_rebuild_job)
        runner.register(("scrub",), self._run_scrub_job)

    def _busy_pack(self, pack) -> None:
        j = self.runner.of_pack(pack.name)
        if j is not None:
            raise busy(f"pack {pack.name} already has a {j.kind} job ({j.id}) running")

    async def recover(self, name: str) -> Job:
        pack = self.pack(name)
        self._busy_pack(pack)
        await trio.to_thread.run_sync(pack.check_disks_blocking, self.uuid,
                                      pack.sealed())
        self.drain_notes()
        targets, absent = [], []
        for d in pack.disks:
            if d.state == "online":
                continue
            if not d.present():
                absent.append(d)
            else:
                targets.append(d)
        if absent and not targets:
            raise ioerror(f"pack {name}: disk(s) "
                          + ", ".join(f"{d.idx} ({d.path})" for d in absent)
                          + " are still missing: bring the directory back, or "
                          f"`replace {name} DISK NEW_DIR`")
        if targets and not pack.online() and pack.layout == "single" and \
                targets[0].state == "stale":
            return await self._rejoin_only_disk(pack, targets[0])
        if targets and not pack.online():
            raise ioerror(f"pack {name} has no online disk to rebuild from: its data "
                          "is lost; restore it from a plex copy or an export")
        async with self.lock:
            for d in targets:
                if d.state in ("invalid", "failed"):
                    d.since = 0           # its content can't be trusted: all of it
                d.state = "stale"
            job = self.runner.new("recover", [], done=not targets)
            job.params.update(pack=name, disks=[d.idx for d in targets])
            self.event("info", f"recover {name} (job {job.id}): "
                       + (f"rebuilding disk(s) {', '.join(str(d.idx) for d in targets)}"
                          if targets else "nothing to rebuild, the pack is "
                          f"{pack.state}"))
            await self.commit()
        if targets:
            self.runner.start(job)
        return job

    async def _rejoin_only_disk(self, pack, d) -> Job:
        """A single pack's one disk is back (its label ours: `stale`): while
        it was gone the pack took no write (there was nowhere to put one),
        so it is whole if it holds every segment at its fsync'd length; it
        serves again, with nothing to rebuild. (A cluster that did not
        answer at mount, a directory that was unmounted for a while.)"""
        def lacking() -> list[str]:
            m = d.medium
            names = set(m.names())
            return [seg_name(seq) for seq in pack.segments()
                    if seg_name(seq) not in names
                    or m.file_size(seg_name(seq)) < pack.stable_size(seq)]
        async with self.lock:
            gone = await trio.to_thread.run_sync(lacking)
            if gone:
                raise ioerror(f"pack {pack.name}: its disk {d.idx} ({d.path}) is back "
                              f"without {len(gone)} segment(s) it held ({', '.join(gone[:4])}"
                              f"{'...' if len(gone) > 4 else ''}): there is no other copy to "
                              "rebuild from; restore the data from a plex copy or an export")
            await trio.to_thread.run_sync(pack.rejoin_blocking, d, self.uuid,
                                          pack.segments())
            job = self.runner.new("recover", [], done=True)
            job.params.update(pack=pack.name, disks=[d.idx])
            self.event("info", f"recover {pack.name} (job {job.id}): its only disk "
                       f"{d.idx} ({d.path}) is back with every segment: serving again, "
                       "nothing to rebuild")
            await self.commit()
        return job

    async def replace(self, name: str, old: str, new_dir: str, force: bool = False) -> Job:
        pack = self.pack(name)
        try:
            d = pack.disks[int(old)]
        except (ValueError, IndexError):
            raise notfound(f"pack {name} has no disk {old!r} (disks 0 to "
                           f"{len(pack.disks) - 1})") from None
        if pack.layout == "single":
            raise ArrayError(errno.EOPNOTSUPP, f"pack {name} has no redundancy to rebuild "
                             "a replaced disk from (layout single)")
        if d.state == "online" and not force:
            raise busy(f"disk {d.idx} of pack {name} ({d.path}) is healthy: use force=yes "
                       "to replace it anyway")
        self._busy_pack(pack)
        path = (await self.check_new_disks(name, "single", [new_dir]))[0]
        others = [x for x in pack.disks if x is not d and x.state == "online"]
        if len(others) < len(pack.disks) - 1 and pack.layout == "raid5":
            raise ioerror(f"pack {name} has lost more than one disk: a raid5 pack cannot "
                          "rebuild a replacement; its data is lost")
        async with self.lock:
            old_path = d.path
            pack.close_disk_files(d)
            d.path, d.state, d.since, d.errors = path, "stale", 0, 0
            await trio.to_thread.run_sync(d.medium.prepare)
            job = self.runner.new("replace", [])
            job.params.update(pack=name, disks=[d.idx])
            self.event("info", f"replace (job {job.id}): disk {d.idx} of pack {name} "
                       f"{old_path} -> {path}; rebuilding")
            await self.commit()
        self.runner.start(job)
        return job

    async def scrub(self, name: str) -> Job:
        pack = self.pack(name)
        self._busy_pack(pack)
        async with self.lock:
            job = self.runner.new("scrub", [])
            job.params.update(pack=name, repaired=0, lost=0, blocks=0)
            await self.commit()
        self.runner.start(job)
        return job

    # ---- workers ---------------------------------------------------------------------
    async def _run_rebuild_job(self, job: Job) -> None:
        pack = self.packs.get(job.params["pack"])
        try:
            if pack is None:
                raise notfound(f"pack {job.params['pack']} is gone")
            disks = [pack.disks[i] for i in job.params["disks"]]
            plans = {d.idx: await trio.to_thread.run_sync(pack.rebuild_plan, d,
                                                          pack.segments())
                     for d in disks}
            upto: dict = {}                  # (disk, seg) -> disk bytes rebuilt
            # sealed segments below `rebuilt_below` were rebuilt (and fsynced)
            # before a restart: a resumed job keeps them where the disk's
            # file still has the segment's length (before: it redid all)
            below = job.params.setdefault("rebuilt_below", {})
            for d in disks:
                if job.resumed and below.get(str(d.idx)):
                    plans[d.idx] = await trio.to_thread.run_sync(
                        _drop_rebuilt, pack, d, plans[d.idx], below[str(d.idx)],
                        _sealed(pack), upto)
                # what is below it now was all skipped as rebuilt
                below[str(d.idx)] = min([below.get(str(d.idx), 0) if job.resumed else 0]
                                        + [seq for seq, _ in plans[d.idx]])
            left = sum(n for p in plans.values() for _, n in p)
            job.total_bytes = job.done_bytes + left
            job.state = "running" if job.state == "queued" else job.state
            self.runner.mark_dirty(job)
            self.runner.started(job, f"{human_bytes(left)} to rebuild on pack {pack.name}")
            for d in disks:
                whole = True                 # every segment so far rebuilt for good
                for seq, size in sorted(plans[d.idx]):
                    stable = min(size, pack.stable_size(seq))
                    for start in range(0, stable, PARALLEL * PIECE):
                        await job.checkpoint()
                        if seq not in pack.segments():
                            break             # deleted meanwhile
                        pieces = [(off, min(PIECE, stable - off)) for off in
                                  range(start, min(stable, start + PARALLEL * PIECE), PIECE)]
                        n = await _rebuild_pieces(pack, d, seq, pieces)
                        job.done_bytes += n
                        upto[(d.idx, seq)] = sum(pieces[-1])
                        self.runner.mark_dirty(job)
                        self.runner.progress(job)
                    whole = whole and (stable == size and seq in _sealed(pack)
                                       and upto.get((d.idx, seq), 0) >= size)
                    if whole:
                        below[str(d.idx)] = max(below[str(d.idx)], seq + 1)
            await job.checkpoint()
            async with self.lock:            # no appends meanwhile: the rest
                for d in disks:
                    rest = await trio.to_thread.run_sync(pack.rebuild_plan, d,
                                                         pack.segments())
                    for seq, size in rest:
                        start = upto.get((d.idx, seq), 0)
                        if seq != pack.active_seq and start >= size:
                            continue
                        if seq == pack.active_seq and pack.layout == "raid5":
                            start = min(start, pack.stable_size(seq))
                        for off in range(start, size, PIECE):
                            await trio.to_thread.run_sync(
                                pack.rebuild_piece_blocking, d, seq, off,
                                min(PIECE, size - off))
                    await trio.to_thread.run_sync(pack.rejoin_blocking, d, self.uuid,
                                                  pack.segments())
                job.state, job.finished = "done", time.time()
                job.done_bytes = max(job.done_bytes, job.total_bytes)
                job.total_bytes = job.done_bytes
                self.runner.mark_dirty(job)
                self.event("info", f"job {job.id} ({job.kind}) done: disk(s) "
                           f"{', '.join(str(d.idx) for d in disks)} of pack {pack.name} "
                           f"online; the pack is {pack.state}")
                await self.commit(put_off=True)     # (no room: its record waits)
        except JobCancelled:
            self.runner.end(job, "cancelled", f"job {job.id} ({job.kind}) cancelled at "
                             f"{job.percent}%: the pack stays {pack.state}; run recover again")
        except (ArrayError, OSError) as e:
            self.runner.end(job, "failed", f"job {job.id} ({job.kind}) failed: {e}",
                             str(e))

    async def _run_scrub_job(self, job: Job) -> None:
        pack = self.packs.get(job.params["pack"])
        try:
            if pack is None:
                raise notfound(f"pack {job.params['pack']} is gone")
            # segments are scrubbed in order; `next_seg` (committed with
            # the counters and done_bytes) is where a resumed scrub goes on
            # (before: it started over and counted those blocks twice)
            start = job.params.get("next_seg", 0) if job.resumed else 0
            segs = [s for s in pack.segments() if s >= start]
            left = sum(pack.seg_size.get(s, 0) for s in segs)
            if not start:
                job.done_bytes = 0
            job.total_bytes = job.done_bytes + left
            job.state = "running" if job.state == "queued" else job.state
            self.runner.mark_dirty(job)
            self.runner.started(job, f"{human_bytes(left)} to verify on pack {pack.name}")
            for seq in segs:
                await job.checkpoint()
                async with self.lock:
                    entries = await trio.to_thread.run_sync(pack.entries_in, seq)
                    fixed, lost = await trio.to_thread.run_sync(
                        pack.scrub_segment_blocking, seq, entries)
                self.drain_notes()
                job.params["repaired"] += fixed
                job.params["lost"] += lost
                job.params["blocks"] += len(entries)
                job.done_bytes += pack.seg_size.get(seq, 0)
                job.params["next_seg"] = seq + 1
                self.runner.mark_dirty(job)
                self.runner.progress(job)
            p = job.params
            state = "done" if not p["lost"] else "failed"
            self.runner.end(job, state, f"job {job.id} (scrub) of pack {pack.name}: "
                             f"{p['blocks']} blocks verified, {p['repaired']} repaired, "
                             f"{p['lost']} unrecoverable",
                             f"{p['lost']} blocks could not be repaired" if p["lost"] else "")
        except JobCancelled:
            self.runner.end(job, "cancelled", f"job {job.id} (scrub) cancelled")
        except (ArrayError, OSError) as e:
            self.runner.end(job, "failed", f"job {job.id} (scrub) failed: {e}", str(e))
