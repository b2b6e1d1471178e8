"""Shadow copies: snapshot sets, resync, swap, delete, and the copy jobs
(DESIGN section 4.2-4.4). A mixin of Array: it works on the array's state
under the array's commit lock, like every other change.

Why everything is cheap: a map is named by its root id and every node is
immutable, so
- a differential snapshot copies (root, height, size) into a new volume row;
- a same-pack resync copies the shadow's root into the LUN;
- a plex snapshot or a cross-pack resync also copies the root, and marks the
  volume with a `source` pack: ids its own pack lacks are read from there.
  A copy job then stores every missing id (map nodes and blocks) in the
  volume's pack; the map itself never changes, so writes made meanwhile
  are never overwritten by the copy, and after a crash the job simply
  recomputes what is missing. When nothing is missing the source is
  dropped and the volume is independent of the source pack.
"""
import errno
import math
import time

import trio

from . import ZERO_ID, maps
from .errors import ArrayError, busy, exists, invalid, ioerror, notfound, unsupported
from .jobs import Job, JobCancelled
from .util import InFlight, check_name, human_bytes, parse_bytes, utc_stamp
from .volume import Volume

COPY_BATCH = 64


class ShadowOps:
    # ---- helpers -----------------------------------------------------------------
    def _new_set_name(self) -> str:
        base = utc_stamp()
        name, n = base, 1
        while name in self.sets:
            n += 1
            name = f"{base}-{n}"
        return name

    def _shadow_row(self, src: Volume, set_name: str, pack, context: str,
                    hidden: bool, readonly: bool = True) -> dict:
        wwn, serial = self.new_identity()
        vid = self.next_vid
        self.next_vid += 1
        return {"vid": vid, "name": src.name, "kind": "shadow", "set_name": set_name,
                "size": src.size, "block_size": src.block_size, "root": src.root,
                "height": src.height, "allocated": src.allocated, "wwn": wwn,
                "serial": serial, "readonly": int(readonly), "hidden": int(hidden),
                "origin": src.wwn if src.kind == "lun" else src.origin,
                "context": context, "created": time.time(), "source": None}

    def _shadow_row_from(self, vh: dict, set_name: str, pack, remap: bool) -> dict:
        """A catalogue row for an imported shadow copy (header `vh`)."""
        wwn, serial = self.new_identity()
        if not remap:
            wwn, serial = vh["wwn"], vh["serial"]
        vid = self.next_vid
        self.next_vid += 1
        bs = vh["block_size"]
        return {"vid": vid, "name": vh["name"], "kind": "shadow", "set_name": set_name,
                "size": vh["size"], "block_size": bs, "root": ZERO_ID,
                "height": maps.height_for(math.ceil(vh["size"] / bs)), "allocated": 0,
                "wwn": wwn, "serial": serial, "readonly": int(vh["readonly"]),
                "hidden": int(vh["hidden"]), "origin": vh["origin"],
                "context": vh["context"], "created": time.time(), "source": None}

    def pin(self, roots) -> None:
        """Keep the blocks of [(vol, root, height)] alive (an export reads
        them while the volumes may change)."""
        self._pins.extend(roots)

    def unpin(self, roots) -> None:
        for r in roots:
            self._pins.remove(r)

    def _add_set(self, name: str, created: float) -> None:
        self.sets[name] = {"created": created, "members": {}}
        self._pending.sets_add.append((name, created))

    def _add_shadow(self, row: dict, pack, source) -> Volume:
        vol = Volume(self, row, pack, source)
        self.volumes[vol.vid] = vol
        self.sets[vol.set_name]["members"][vol.name] = vol
        self._dirty_rows.add(vol)
        return vol

    def _check_copy_free(self, vol: Volume, what: str) -> None:
        if vol.source is not None:
            job = self._job_of(vol)
            raise busy(f"{what} {vol.path} is still being copied from pack "
                       f"{vol.source.name}" + (f" (job {job.id})" if job else "")
                       + ": wait for the job to finish")

    def _job_of(self, vol: Volume):
        for job in self.jobs.values():
            if job.active and vol.vid in job.params.get("vids", ()):
                return job
        return None

    def _check_live(self, vol: Volume) -> None:
        """Under the lock, of a volume looked up before it."""
        if vol.deleted or self.volumes.get(vol.vid) is not vol:
            raise notfound(f"{'LUN' if vol.kind == 'lun' else 'shadow copy'} {vol.path} "
                           "was deleted meanwhile")

    def _check_pack_usable(self, pack, what: str) -> None:
        if pack.state == "failed":
            raise ioerror(f"pack {pack.name} of {what} has failed: its data cannot be "
                          f"read; run `recover {pack.name}` first")

    # ---- snapshot -------------------------------------------------------------------
    async def snapshot(self, names: list[str], set_name: str | None = None,
                       context: str = "differential", pack: str | None = None,
                       hidden: bool = False) -> str:
        if context not in ("differential", "plex"):
            raise invalid(f"unknown context {context!r}: use differential or plex")
        if set_name is not None:
            check_name(set_name, "set name")
            if set_name in self.sets:
                raise exists(f"a shadow copy set named {set_name} already exists")
        if len(set(names)) != len(names):
            raise invalid("a LUN is listed twice")
        luns = [self.lun(n) for n in names]
        target = self.pack(pack) if pack else None
        for lun in luns:
            if context == "differential" and target is not None and target is not lun.pack:
                raise unsupported(f"a differential shadow copy shares blocks with its LUN, "
                                  f"so it lives on the LUN's pack ({lun.pack.name}), not on "
                                  f"{target.name}: use context=plex to copy to another pack")
            self._check_copy_free(lun, "LUN")
            self._check_pack_usable(lun.pack, f"LUN {lun.name}")
            if target is not None and target is not lun.pack:
                self._check_fits(target, lun.size)
        # Writes that start from here on wait: none is in the set.
        gate = trio.Event()
        for lun in luns:
            lun.frozen = gate
        try:
            async with self._lock:
                if set_name is None:
                    set_name = self._new_set_name()
                elif set_name in self.sets:
                    raise exists(f"a shadow copy set named {set_name} already exists")
                for lun in luns:
                    if self.luns.get(lun.name) is not lun:
                        raise notfound(f"LUN {lun.name} was deleted meanwhile")
                await self._flush()
                await self._merge()
                created = time.time()
                self._add_set(set_name, created)
                made = []
                for lun in luns:
                    dest = target or lun.pack
                    row = self._shadow_row(lun, set_name, dest, context, hidden)
                    copy = dest is not lun.pack
                    made.append(self._add_shadow(row, dest, lun.pack if copy else None))
                plex = [v for v in made if v.source is not None]
                job = self._new_job("plex", plex) if plex else None
                self.event("info", f"shadow copy set {set_name} taken: "
                           + ", ".join(f"{v.name} ({v.wwn})" for v in made)
                           + f", context {context}" + (f", copy job {job.id}" if job else ""))
                await self._commit()
        finally:
            for lun in luns:
                lun.frozen = None
            gate.set()
        if job:
            self._start_job(job)
        return set_name, job

    # ---- delete ---------------------------------------------------------------------
    async def delete_shadow(self, target: str, force: bool = False) -> dict:
        if "/" in target:
            vols = [self.shadow(target)]
            set_name = vols[0].set_name
        else:
            if target not in self.sets or target.startswith("."):
                raise notfound(f"no LUN or shadow copy set named {target!r}")
            set_name = target
            vols = list(self.sets[target]["members"].values())
        for v in vols:
            if v.open_count and not force:
                raise busy(f"shadow copy {v.path} is open ({v.open_by()}): "
                           "close or detach it first, or use force=yes")
        async with self._lock:
            vols = [v for v in vols if not v.deleted]     # a delete meanwhile
            if not vols or set_name not in self.sets:
                raise notfound(f"shadow copy {target} was deleted meanwhile")
            for v in vols:
                self._drop_volume(v)
                self.sets[set_name]["members"].pop(v.name, None)
            if not self.sets[set_name]["members"]:
                del self.sets[set_name]
                self._pending.sets_del.append(set_name)
            self.event("info", f"deleted shadow copy {target}: "
                       + ", ".join(f"{v.path} ({v.wwn})" for v in vols))
            await self._gc()
        return {"deleted": target}

    def _drop_volume(self, vol: Volume) -> None:
        vol.deleted = True
        vol.discard_cache()
        self._pending.volumes_del.append(vol.vid)
        self._dirty_rows.discard(vol)
        if not vol.open_count:
            self.volumes.pop(vol.vid, None)
        job = self._job_of(vol)
        if job is not None:
            job.params["vids"] = [v for v in job.params["vids"] if v != vol.vid]
            self._dirty_jobs.add(job)
            if not job.params["vids"] and job.kind in ("resync", "plex"):
                job.cancel(f"its volume(s) were deleted (the last: {vol.path})")

    # ---- resync ---------------------------------------------------------------------
    async def resync(self, pairs: list[str], pack: str | None = None, force: bool = False,
                     undo: bool = True):
        plan = []
        dests = set()
        for text in pairs:
            src_path, eq, dest_name = text.partition("=")
            if "/" not in src_path:
                raise invalid(f"{text!r}: give SET/NAME[=DEST]")
            src = self.shadow(src_path)
            dest_name = dest_name if eq else src.name
            if "/" in dest_name:
                raise invalid(f"{text!r}: the destination must be a LUN, not a shadow copy")
            check_name(dest_name, "LUN name")
            if dest_name in dests:
                raise invalid(f"LUN {dest_name} is the destination of two pairs")
            dests.add(dest_name)
            self._check_pack_usable(src.pack, f"shadow copy {src.path}")
            self._check_copy_free(src, "shadow copy")
            dest = self.luns.get(dest_name)
            if dest is not None:
                if dest.open_count and not force:
                    raise busy(f"LUN {dest_name} is open ({dest.open_by()}; e.g. "
                               "a loop device or a mounted filesystem): unmount and detach "
                               "it first, or use force=yes")
                if dest.readonly:
                    raise ArrayError(errno.EROFS, f"LUN {dest_name} is read-only")
                self._check_copy_free(dest, "LUN")
            dpack = self.pack(pack) if pack else (dest.pack if dest else src.pack)
            self._check_same_pack(dest, dpack)
            self._check_fits(dpack, src.size)
            plan.append((src, dest_name, dpack))
        async with self._lock:
            for src, _, _ in plan:       # (checked before the lock: a delete may
                self._check_live(src)    # have collected its blocks meanwhile)
            await self._flush()
            await self._merge()
            # every pair checked again before any is applied: a failure
            # leaves nothing half done (a LUN created or overwritten, an
            # undo set taken) for the next commit to store
            for src, dest_name, dpack in plan:
                self._check_same_pack(self.luns.get(dest_name), dpack)
            copying, undo_sets, lines = [], [], []
            for src, dest_name, dpack in plan:
                dest = self.luns.get(dest_name)
                if dest is not None and undo:
                    undo_sets.append(self._undo_copy(dest))
                if dest is None:
                    dest = self._create_volume(dest_name, src.size, dpack, src.block_size)
                dest.discard_cache()
                dest.root, dest.height = src.root, src.height
                dest.allocated, dest.size = src.allocated, src.size
                dest.set_block_size(src.block_size)
                dest.source = src.pack if dpack is not src.pack else None
                self._dirty_rows.add(dest)
                if dest.source is not None:
                    copying.append(dest)
                lines.append(f"{src.path} -> {dest_name}")
            job = self._new_job("resync", copying, done=not copying)
            self.event("info", f"resync (job {job.id}): " + ", ".join(lines)
                       + (f"; previous state kept as {', '.join(undo_sets)}" if undo_sets
                          else "") + ("; copying in the background" if copying else ""))
            await self._commit()
        for src, dest_name, _ in plan:
            self.notify(self.luns[dest_name])
        if copying:
            self._start_job(job)
        return job, undo_sets

    @staticmethod
    def _check_same_pack(dest, dpack) -> None:
        if dest is not None and dest.pack is not dpack:
            raise unsupported(f"LUN {dest.name} lives on pack {dest.pack.name}: a "
                              "resync keeps a LUN on its pack (resync into a new "
                              "LUN to copy to another pack)")

    def _undo_copy(self, lun: Volume) -> str:
        stamp = utc_stamp()
        base = f"undo-{lun.name[:64 - len(stamp) - 8]}-{stamp}"
        name, n = base, 1
        while name in self.sets:
            n += 1
            name = f"{base}-{n}"
        self._add_set(name, time.time())
        self._add_shadow(self._shadow_row(lun, name, lun.pack, "differential", False),
                         lun.pack, None)
        return name

    def _create_volume(self, name, size, pack, block_size) -> Volume:
        wwn, serial = self.new_identity()
        vid = self.next_vid
        self.next_vid += 1
        row = {"vid": vid, "name": name, "kind": "lun", "set_name": None, "size": size,
               "block_size": block_size, "root": ZERO_ID, "height": maps.height_for(math.ceil(size / block_size)),
               "allocated": 0, "wwn": wwn, "serial": serial, "readonly": 0, "hidden": 0,
               "origin": None, "context": None, "created": time.time(), "source": None}
        vol = Volume(self, row, pack)
        self.volumes[vid] = vol
        self.luns[name] = vol
        self._dirty_rows.add(vol)
        return vol

    # ---- swap -------------------------------------------------------------------------
    async def swap(self, path: str, as_name: str | None = None, force: bool = False) -> Volume:
        src = self.shadow(path)
        name = as_name or src.name
        check_name(name, "LUN name")
        old = self.luns.get(name)
        if as_name is not None and old is not None:
            raise exists(f"a LUN named {name} already exists: swap {path} without as= "
                         "to replace it, or choose another name")
        if old is not None and old.open_count and not force:
            raise busy(f"LUN {name} is open ({old.open_by()}): detach it "
                       "first, or use force=yes (its content is discarded)")
        if src.open_count and not force:
            raise busy(f"shadow copy {path} is open ({src.open_by()}): close it first or "
                       "use force=yes")
        async with self._lock:
            self._check_live(src)
            if self.luns.get(name) is not old:
                raise busy(f"LUN {name} was created or deleted meanwhile: try again")
            await self._flush()
            await self._merge()
            if old is not None:
                del self.luns[name]
                self._drop_volume(old)
            set_name = src.set_name
            self.sets[set_name]["members"].pop(src.name, None)
            if not self.sets[set_name]["members"]:
                del self.sets[set_name]
                self._pending.sets_del.append(set_name)
            src.kind, src.set_name, src.name = "lun", None, name
            src.readonly = src.hidden = False
            src.origin = src.context = None
            self.luns[name] = src
            self._dirty_rows.add(src)
            self.event("info", f"swap: shadow copy {path} ({src.wwn}) is now LUN {name}"
                       + (f"; the previous LUN {name} ({old.wwn}) was discarded" if old
                          else ""))
            await self._gc()
        return src

    # ---- jobs ---------------------------------------------------------------------------
    def _new_job(self, kind: str, vols: list, done: bool = False) -> Job:
        jid = self.next_job
        self.next_job += 1
        job = Job(jid, kind, {"vids": [v.vid for v in vols]})
        if done:
            job.state, job.finished = "done", time.time()
        self.jobs[jid] = job
        self._dirty_jobs.add(job)
        return job

    def job(self, text: str) -> Job:
        try:
            return self.jobs[int(text)]
        except (ValueError, KeyError):
            raise notfound(f"no job {text!r}") from None

    async def control_job(self, text: str, action: str, rate: str | None = None) -> Job:
        job = self.job(text)
        if not job.active:
            raise invalid(f"job {job.id} has already ended ({job.state})")
        if job.cancelling and action != "cancel":
            raise invalid(f"job {job.id} is ending (cancelled"
                          + (f": {job.cancel_reason}" if job.cancel_reason else "") + ")")
        if action == "pause":
            job.pause()
        elif action == "resume":
            job.resume()
        elif action == "cancel" and job.kind == "import":
            await self._cancel_import(job)
        elif action == "cancel":
            job.cancel()
        elif action == "throttle":
            job.throttle(parse_bytes(rate, "rate"))
        self.note_job(job)
        self.event("info", f"job {job.id} ({job.kind}): {action}"
                   + (f" {rate}/s" if rate else ""))
        return job

    async def _cancel_import(self, job: Job) -> None:
        """Drop a partial import: its staging set and the space it took."""
        async with self._lock:
            staging = f".import-{job.id}"
            for v in list(self.sets.get(staging, {"members": {}})["members"].values()):
                self._drop_volume(v)
            if staging in self.sets:
                del self.sets[staging]
                self._pending.sets_del.append(staging)
            job.state, job.finished = "cancelled", time.time()
            self._dirty_jobs.add(job)
            await self._gc()

    async def _missing(self, vols: list) -> list:
        """[(vol, id, length)] of ids reachable from `vols` that their own
        pack lacks, each once per pack. Each map is pinned while it is
        walked: a volume deleted meanwhile (its job then ends) keeps its
        blocks in both packs until the walk is over."""
        out, seen = [], set()
        for vol in vols:
            if vol.deleted or vol.source is None:
                continue
            ids: set = set()
            pin = [(vol, vol.root, vol.height)]
            self.pin(pin)
            try:
                await maps.mark(vol.root, vol.height, self.loader(vol), ids, set())
            finally:
                self.unpin(pin)
            for i, bid in enumerate(ids):
                if i % 4096 == 0:
                    await trio.sleep(0)
                if vol.deleted or vol.source is None:
                    break
                key = (vol.pack.name, bid)
                if key in seen or vol.pack.lookup(bid) is not None:
                    continue
                seen.add(key)
                loc = vol.source.lookup(bid)
                if loc is None:
                    if vol.root != pin[0][1]:
                        continue      # written meanwhile: the block is no longer its
                    raise ioerror(f"block {bid.hex()} of {vol.path} is in neither pack "
                                  f"{vol.pack.name} nor its source")
                out.append((vol, bid, loc[2]))
        return out

    def _copy_volumes(self, job: Job) -> list:
        """The volumes `job` still copies; raises JobCancelled when every
        one it had was deleted (nothing left to copy for)."""
        vols = [self.volumes.get(v) for v in job.params["vids"]]
        vols = [v for v in vols if v is not None and not v.deleted]
        if not vols:
            job.cancel_reason = job.cancel_reason or "its volumes were deleted"
            raise JobCancelled()
        return [v for v in vols if v.source is not None]

    async def _run_copy_job(self, job: Job) -> None:
        """Store in each volume's pack every id it still reads from its source.
        A block a volume no longer reaches (the volume was deleted, written
        or shrunk, and the block collected from the source) is skipped."""
        try:
            vols = self._copy_volumes(job)
            todo = await self._missing(vols)
            left = sum(n for _, _, n in todo)
            if job.resumed and job.total_bytes:
                # what survived the restart is done: what is left is missing
                job.done_bytes = max(0, job.total_bytes - left)
                job.total_bytes = job.done_bytes + left
            else:
                job.total_bytes = job.done_bytes + left
            if job.state == "queued":
                job.state = "running"
            self._dirty_jobs.add(job)
            self._job_started_event(job, f"{human_bytes(left)} to copy")
            # one batch is stored (hashed, appended: a worker thread) while
            # the next is read (another): the copy runs on two cores
            storing = InFlight()

            async def store(records, nbytes) -> None:
                if records:
                    async with self._lock:
                        await self._store_new(records)
                job.done_bytes += nbytes
                self._dirty_jobs.add(job)
                self._job_progress_event(job)
            try:
                for i in range(0, len(todo), COPY_BATCH):
                    await job.checkpoint()
                    batch = todo[i:i + COPY_BATCH]
                    by_source: dict = {}
                    for vol, bid, n in batch:
                        if vol.deleted or vol.source is None or vol.pack.lookup(bid) is not None:
                            continue
                        by_source.setdefault(vol.source, []).append((vol, bid))
                    records = []
                    for source, items in by_source.items():
                        # looked up just before the read (no wait in between):
                        # None when the source no longer holds it (collected)
                        found = [(v, b, source.lookup(b)) for v, b in items]
                        found = [x for x in found if x[2] is not None]
                        if not found:
                            continue
                        datas = await self._read_locs(source, [b for _, b, _ in found],
                                                      [loc for _, _, loc in found])
                        records += [(v.pack, b, d) for (v, b, _), d in zip(found, datas)]
                    await storing.wait()
                    storing.start(self._nursery, store, records, sum(n for _, _, n in batch))
                await storing.wait()
            finally:        # a cancelled or failed job ends after its last store
                with trio.CancelScope(shield=True):
                    await storing.wait(raise_error=False)
            self._copy_volumes(job)          # all deleted meanwhile: cancelled
            async with self._lock:
                for vol in vols:
                    if vol.vid in self.volumes:
                        vol.source = None
                        self._dirty_rows.add(vol)
                job.state, job.finished = "done", time.time()
                job.done_bytes = job.total_bytes
                self._dirty_jobs.add(job)
                self.event("info", f"job {job.id} ({job.kind}) done: "
                           f"{human_bytes(job.total_bytes)} copied")
                await self._commit()
                self._gc_wanted = True
        except JobCancelled:
            if job.cancel_reason:
                self._end_job(job, "cancelled", f"job {job.id} ({job.kind}) ended at "
                              f"{job.percent}%: {job.cancel_reason}", job.cancel_reason)
            else:
                self._end_job(job, "cancelled", f"job {job.id} ({job.kind}) cancelled at "
                              f"{job.percent}%: the volumes read right but keep reading "
                              "blocks not yet copied from their source pack")
        except ArrayError as e:
            self._end_job(job, "failed", f"job {job.id} ({job.kind}) failed: {e.message}",
                          e.message)

    def _job_started_event(self, job: Job, work: str) -> None:
        """One event when a worker starts: new, or resumed after a restart."""
        if job.resumed:
            self.event("info", f"job {job.id} ({job.kind}) resumes at {job.percent}% after "
                       f"a restart: {work} (of {human_bytes(job.total_bytes)})"
                       + (f"; paused: `resume {job.id}` to go on" if job.state == "paused"
                          else ""))
        else:
            self.event("info", f"job {job.id} ({job.kind}) started: {work}")
        self._job_progress_event(job)

    def _job_progress_event(self, job: Job) -> None:
        """After progress: an event per 10 % step, and the percent noted in
        the job journal whenever it rises (what was shown is never lost)."""
        decile = min(job.percent // 10, 9)
        while job.last_decile < decile:          # one event per 10 % step
            job.last_decile += 1
            self.event("info", f"job {job.id} ({job.kind}): {job.last_decile * 10}% "
                       f"({human_bytes(job.done_bytes)} of {human_bytes(job.total_bytes)})")
        if job.percent > job.noted_floor:
            self.note_job(job)

    def note_job(self, job: Job) -> None:
        """A change to `job` the next commit persists, journaled meanwhile."""
        self._dirty_jobs.add(job)
        if self.job_journal is not None:
            self.job_journal.note(job)

