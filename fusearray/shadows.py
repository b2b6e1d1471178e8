"""Shadow copies: snapshot sets, resync, swap, delete, the copy jobs, and
the staging API an import uses (DESIGN section 4.2-4.5).

`Shadows` works on the namespace (namespace.Namespace: volumes, LUNs,
sets) under the write-back's commit lock, like every other change, and is
given everything it uses: the namespace, the job runner, the write-back
(lock, flush, merge, commit, store_new), the collector (pins, collect),
the read path (read_locs, loader), an event sink and the kernel-cache
notifier. It holds no state of its own.

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

Concurrency: commands and the copy worker run on the trio thread, taking
the commit lock for each change; a copy job reads a batch (a worker thread,
through read_locs) while the previous one is stored (store_new, under the
lock: hashing and appends in a worker thread). A crash mid-copy leaves the
volumes reading from their source; the resumed job recomputes what is left.

Staging (for transport.Importer): `stage` makes an import job's invisible
staging set, `stage_volume` its shadow copies, `store` the blocks it
receives, `publish` makes the verified set visible, `drop` removes a
partial import whole. Each, but `store`, wants the commit lock held by its
caller (who commits); a crash mid-import leaves the staging set and job
committed at the last checkpoint, for `import --resume` or `cancel`.
"""
import errno
import time

import trio

from . import maps
from .errors import ArrayError, busy, exists, invalid, ioerror, notfound, unsupported
from .host import Freeze, volume_key
from .jobs import Job, JobCancelled, JobRunner
from .namespace import Namespace, ShadowSet, staging_name
from .util import InFlight, check_name, human_bytes, utc_stamp
from .volume import Volume

COPY_BATCH = 64
#: ids a copy job's plan looks up in one go (off the loop: reader.lookups)
LOOKUP_BATCH = 4096


class Shadows:
    """Shadow copy commands, copy jobs and the staging API (see the module
    docstring). `wb` is the write-back (lock, flush, merge, commit,
    store_new, mark_row, check_fits, append_error), `collector` the garbage
    collector (pin, unpin, collect, want), `read_locs(pack, ids, locs)`,
    `lookups(pack, ids)` (index lookups off the loop) and `loader(vol)` the
    read path, `pack(name)` the pack lookup, `notify(vol)`
    the kernel-cache invalidation (the fs layer's)."""

    def __init__(self, ns: Namespace, runner: JobRunner, *, wb, collector, read_locs,
                 lookups, loader, pack, event, notify, store_hashed, collision, hooks,
                 attachments, shared=lambda vol: None, freeze=Freeze):
        self.ns = ns
        self.runner = runner
        self.wb = wb
        self.collector = collector
        self.read_locs = read_locs
        self.lookups = lookups
        self.loader = loader
        self.pack = pack
        self.event = event
        self.notify = notify
        self.store_hashed = store_hashed
        self.collision = collision
        self.hooks = hooks                  # hooks.HookRunner: writer hooks
        self.attachments = attachments      # async () -> host.attachments_blocking's dict
        self.freeze = freeze                # host.Freeze (a test may give another)
        self.shared = shared                # (vol) -> how it is shared over iSCSI, or None
        self.quiesce_lock = trio.Lock()     # one set's freeze and hooks at a time
        self.restoring: set = set()         # LUN names a resync command works on
        runner.register(("plex", "resync"), self._run_copy_job, default=True)
        runner.register(("import",), None, cancel=self.cancel_import)

    # ---- checks -------------------------------------------------------------------
    def check_copy_free(self, vol: Volume, what: str) -> None:
        """Refuse `vol` while a copy job still fills it from its source."""
        if vol.source is not None:
            job = self.runner.job_of(vol.vid)
            raise busy(f"{what} {vol.path} is still being copied from pack "
                       f"{vol.source.name}" + (f" (job {job.id})" if job else "")
                       + ": wait for the job to finish")

    def _check_live(self, vol: Volume) -> None:
        """Under the lock, of a volume looked up before it."""
        if vol.deleted or self.ns.volumes.get(vol.vid) is not vol:
            raise notfound(f"{'LUN' if vol.kind == 'lun' else 'shadow copy'} {vol.path} "
                           "was deleted meanwhile")

    @staticmethod
    def _check_pack_usable(pack, what: str) -> None:
        if pack.state == "failed":
            raise ioerror(f"pack {pack.name} of {what} has failed: its data cannot be "
                          f"read; run `recover {pack.name}` first")

    # ---- snapshot -------------------------------------------------------------------
    async def snapshot(self, names: list[str], set_name: str | None = None,
                       context: str = "differential", pack: str | None = None,
                       hidden: bool = False, quiesce: bool = True):
        """Take a shadow copy set of LUNs `names`: (set name, copy job or
        None, {"consistency": application|crash, "frozen": [mountpoints]}).

        With `quiesce` (the default), as a VSS requester does: the
        pre-snapshot hooks run (a failure vetoes: EIO, nothing done), the
        file systems mounted on this host from loop devices over these
        LUNs are frozen (host.Freeze: within FREEZE_TIMEOUT, else EIO), the
        instant is taken, they are thawed (whatever happens), then the
        post-snapshot hooks run. A shadow copy is application-consistent
        when its LUN's file systems were all frozen (at least one) or a
        pre-snapshot hook succeeded; else crash-consistent (as with
        quiesce=no, which runs neither)."""
        ns, wb = self.ns, self.wb
        if context not in ("differential", "plex"):
            raise invalid(f"unknown context {context!r}: use differential or plex")
        if set_name is not None:
            check_name(set_name, "set name")
            if set_name in ns.sets:
                raise exists(f"a shadow copy set named {set_name} already exists")
        if len(set(names)) != len(names):
            raise invalid("a LUN is listed twice")
        luns = [ns.lun(n) for n in names]
        target = self.pack(pack) if pack else None
        for lun in luns:
            if context == "differential" and target is not None and target is not lun.pack:
                raise unsupported(f"a differential shadow copy shares blocks with its LUN, "
                                  f"so it lives on the LUN's pack ({lun.pack.name}), not on "
                                  f"{target.name}: use context=plex to copy to another pack")
            self.check_copy_free(lun, "LUN")
            self._check_pack_usable(lun.pack, f"LUN {lun.name}")
            if target is not None and target is not lun.pack:
                wb.check_fits(target, lun.size)
        if not quiesce:
            set_name, job, _ = await self._take(luns, set_name, context, target, hidden,
                                                None, {})
            return set_name, job, {"consistency": "crash", "frozen": []}
        async with self.quiesce_lock:
            if set_name is None:
                set_name = ns.new_set_name()
            att = await self.attachments()
            facts = self._facts("snapshot", luns, att, set=set_name)
            what = f"snapshot of {', '.join(names)} (set {set_name})"
            ran = await self.hooks.run("pre-snapshot", facts, what, veto=True)
            mounts = list(dict.fromkeys(m for lun in luns for a in att.get(volume_key(lun), [])
                                        for m in a.mounts))
            consistency = {}
            for lun in luns:
                mine = [m for a in att.get(volume_key(lun), []) for m in a.mounts]
                consistency[lun.name] = "application" if mine or ran else "crash"
            fz = self.freeze(mounts)
            try:
                async with fz:
                    set_name, job, made = await self._take(luns, set_name, context, target,
                                                           hidden, fz, consistency)
            finally:
                for e in fz.thaw_errors:
                    self.event("error", f"{what}: could not thaw the file system on {e}: "
                               "its writers are blocked until `fsfreeze -u` of it")
            frozen = fz.frozen + fz.already
            if mounts:
                self.event("info", f"{what}: froze {', '.join(frozen)} for the instant, "
                           "thawed")
            await self.hooks.run("post-snapshot", facts, what, veto=False)
        overall = "application" if all(v == "application" for v in consistency.values()) \
            else "crash"
        return set_name, job, {"consistency": overall, "frozen": frozen}

    def _facts(self, operation: str, luns: list, att: dict, **more) -> dict:
        """A hook's environment (as FUSEARRAY_<KEY>): the operation, the
        LUNs, their WWNs, loop devices and mountpoints (space-separated)."""
        loops = [a.device for v in luns for a in att.get(volume_key(v), [])]
        mounts = [m for v in luns for a in att.get(volume_key(v), []) for m in a.mounts]
        return {"operation": operation, **more,
                "luns": " ".join(v.name for v in luns),
                "wwns": " ".join(v.wwn for v in luns),
                "loop_devices": " ".join(loops), "mountpoints": " ".join(mounts)}

    async def _take(self, luns, set_name, context, target, hidden, fz, consistency):
        """The instant: writes wait at the gate, the set is made and
        committed. `fz` (a held host.Freeze, or None) must still hold at
        the instant, else nothing is done."""
        ns, wb = self.ns, self.wb
        job = None
        # Writes that start from here on wait: none is in the set.
        gate = trio.Event()
        for lun in luns:
            lun.frozen = gate
        try:
            async with wb.lock:
                if set_name is None:
                    set_name = ns.new_set_name()
                elif set_name in ns.sets:
                    raise exists(f"a shadow copy set named {set_name} already exists")
                for lun in luns:
                    if ns.luns.get(lun.name) is not lun:
                        raise notfound(f"LUN {lun.name} was deleted meanwhile")
                await wb.flush()
                await wb.merge()
                if fz is not None and not fz.held():
                    raise ioerror(f"the freeze of {', '.join(fz.frozen)} reached its hold "
                                  "limit before the instant (the freezer thawed them): "
                                  "the set was not taken; try again")
                created = time.time()
                ns.add_set(set_name, created)
                made = []
                for lun in luns:
                    dest = target or lun.pack
                    row = ns.shadow_row(lun, set_name, context, hidden)
                    row["consistency"] = consistency.get(lun.name, "crash")
                    copy = dest is not lun.pack
                    made.append(ns.add_shadow(row, dest, lun.pack if copy else None))
                plex = [v for v in made if v.source is not None]
                job = self.runner.new("plex", plex) if plex else None
                self.event("info", f"shadow copy set {set_name} taken: "
                           + ", ".join(f"{v.name} ({v.wwn}, {v.consistency}-consistent)"
                                       for v in made)
                           + f", context {context}" + (f", copy job {job.id}" if job else ""))
                await wb.commit()
        finally:
            for lun in luns:
                lun.frozen = None
            gate.set()
        if job:
            self.runner.start(job)
        return set_name, job, made

    # ---- delete ---------------------------------------------------------------------
    async def delete_shadow(self, target: str, force: bool = False) -> dict:
        ns = self.ns
        if "/" in target:
            vols = [ns.shadow(target)]
            set_name = vols[0].set_name
        else:
            s = ns.visible_set(target)
            if s is None:
                raise notfound(f"no LUN or shadow copy set named {target!r}")
            set_name = target
            vols = list(s.members.values())
        for v in vols:
            if v.open_count and not force:
                raise busy(f"shadow copy {v.path} is open ({v.open_by()}): "
                           "close or detach it first, or use force=yes")
        async with self.wb.lock:
            vols = [v for v in vols if not v.deleted]     # a delete meanwhile
            if not vols or set_name not in ns.sets:
                raise notfound(f"shadow copy {target} was deleted meanwhile")
            for v in vols:
                ns.drop_volume(v)
                ns.sets[set_name].members.pop(v.name, None)
            if not ns.sets[set_name].members:
                ns.remove_set(set_name)
            self.event("info", f"deleted shadow copy {target}: "
                       + ", ".join(f"{v.path} ({v.wwn})" for v in vols))
            await self.collector.collect()
        return {"deleted": target}

    # ---- resync ---------------------------------------------------------------------
    async def resync(self, pairs: list[str], pack: str | None = None, force: bool = False,
                     undo: bool = True):
        """Resync shadow copies into LUNs (SET/NAME[=DEST]). Around it, as
        a VSS restore: the pre-restore hooks (a failure vetoes: EIO,
        nothing done; they may let go of the LUNs, e.g. unmount them), then
        the checks (a LUN open, attached or mounted is EBUSY naming where,
        unless force=yes), the resync, the post-restore hooks. The LUNs are
        in state `resyncing` from the hooks to the end of the copy job."""
        ns = self.ns
        srcs, dests = [], []
        for text in pairs:
            src_path, eq, dest_name = text.partition("=")
            if "/" not in src_path:
                raise invalid(f"{text!r}: give SET/NAME[=DEST]")
            srcs.append(ns.shadow(src_path))
            dests.append(dest_name if eq else srcs[-1].name)
        if any(d in self.restoring for d in dests):
            raise busy(f"LUN {next(d for d in dests if d in self.restoring)} is being "
                       "resynced by another command: wait for it")
        luns = [ns.luns[d] for d in dests if d in ns.luns]
        att = await self.attachments()
        what = f"resync of {', '.join(pairs)}"
        facts = self._facts("resync", luns, att, set=" ".join(dict.fromkeys(
            v.set_name for v in srcs)), sources=" ".join(v.path for v in srcs),
            destinations=" ".join(dests))
        self.restoring.update(dests)
        try:
            await self.hooks.run("pre-restore", facts, what, veto=True)
            att = await self.attachments()          # (a hook may have let go of them)
            job, undo_sets = await self._resync(pairs, pack, force, undo, att)
        finally:
            self.restoring.difference_update(dests)
        await self.hooks.run("post-restore", facts, what, veto=False)
        return job, undo_sets

    def state(self, vol: Volume) -> str:
        """`resyncing` while a resync works on LUN `vol` (its hooks, the
        command, its copy job), else `online`."""
        if vol.kind == "lun" and (vol.name in self.restoring or (
                vol.source is not None and (job := self.runner.job_of(vol.vid)) is not None
                and job.kind == "resync")):
            return "resyncing"
        return "online"

    def _held(self, vol: Volume, att: dict) -> str:
        """Who holds `vol`, for an EBUSY: its iSCSI share, its loop devices
        and mountpoints on this host, and its open handles."""
        where = [a.describe() for a in att.get(volume_key(vol), [])]
        shared = self.shared(vol)
        return ((shared + ", " if shared else "")
                + ("attached to " + "; ".join(where) + ", " if where else "") + vol.open_by())

    async def _resync(self, pairs: list[str], pack: str | None, force: bool, undo: bool,
                      att: dict):
        ns, wb = self.ns, self.wb
        plan = []
        dests = set()
        for text in pairs:
            src_path, eq, dest_name = text.partition("=")
            if "/" not in src_path:
                raise invalid(f"{text!r}: give SET/NAME[=DEST]")
            src = ns.shadow(src_path)
            dest_name = dest_name if eq else src.name
            if "/" in dest_name:
                raise invalid(f"{text!r}: the destination must be a LUN, not a shadow copy")
            check_name(dest_name, "LUN name")
            if dest_name in dests:
                raise invalid(f"LUN {dest_name} is the destination of two pairs")
            dests.add(dest_name)
            self._check_pack_usable(src.pack, f"shadow copy {src.path}")
            self.check_copy_free(src, "shadow copy")
            dest = ns.luns.get(dest_name)
            if dest is not None:
                if dest.open_count and not force:
                    raise busy(f"LUN {dest_name} is in use ({self._held(dest, att)}): "
                               "unmount and detach it first, or use force=yes")
                if dest.readonly:
                    raise ArrayError(errno.EROFS, f"LUN {dest_name} is read-only")
                self.check_copy_free(dest, "LUN")
            dpack = self.pack(pack) if pack else (dest.pack if dest else src.pack)
            self._check_same_pack(dest, dpack)
            wb.check_fits(dpack, src.size)
            plan.append((src, dest_name, dpack))
        async with wb.lock:
            for src, _, _ in plan:       # (checked before the lock: a delete may
                self._check_live(src)    # have collected its blocks meanwhile)
            await wb.flush()
            await wb.merge()
            # every pair checked again before any is applied: a failure
            # leaves nothing half done (a LUN created or overwritten, an
            # undo set taken) for the next commit to store
            for src, dest_name, dpack in plan:
                self._check_same_pack(ns.luns.get(dest_name), dpack)
            copying, undo_sets, lines = [], [], []
            for src, dest_name, dpack in plan:
                dest = ns.luns.get(dest_name)
                if dest is not None and undo:
                    undo_sets.append(self._undo_copy(dest))
                if dest is None:
                    dest = ns.create_lun(dest_name, src.size, dpack, src.block_size)
                dest.discard_cache()
                dest.root, dest.height = src.root, src.height
                dest.allocated, dest.size = src.allocated, src.size
                dest.set_block_size(src.block_size)
                dest.source = src.pack if dpack is not src.pack else None
                wb.mark_row(dest)
                if dest.source is not None:
                    copying.append(dest)
                lines.append(f"{src.path} -> {dest_name}")
            job = self.runner.new("resync", copying, done=not copying)
            self.event("info", f"resync (job {job.id}): " + ", ".join(lines)
                       + (f"; previous state kept as {', '.join(undo_sets)}" if undo_sets
                          else "") + ("; copying in the background" if copying else ""))
            await wb.commit()
        for src, dest_name, _ in plan:
            self.notify(ns.luns[dest_name])
        if copying:
            self.runner.start(job)
        return job, undo_sets

    @staticmethod
    def _check_same_pack(dest, dpack) -> None:
        if dest is not None and dest.pack is not dpack:
            raise unsupported(f"LUN {dest.name} lives on pack {dest.pack.name}: a "
                              "resync keeps a LUN on its pack (resync into a new "
                              "LUN to copy to another pack)")

    def _undo_copy(self, lun: Volume) -> str:
        ns = self.ns
        stamp = utc_stamp()
        name = ns.new_set_name(f"undo-{lun.name[:64 - len(stamp) - 8]}-{stamp}")
        ns.add_set(name, time.time())
        ns.add_shadow(ns.shadow_row(lun, name, "differential", False), lun.pack, None)
        return name

    # ---- swap -------------------------------------------------------------------------
    async def swap(self, path: str, as_name: str | None = None, force: bool = False) -> Volume:
        ns = self.ns
        src = ns.shadow(path)
        att = await self.attachments()
        name = as_name or src.name
        check_name(name, "LUN name")
        old = ns.luns.get(name)
        if as_name is not None and old is not None:
            raise exists(f"a LUN named {name} already exists: swap {path} without as= "
                         "to replace it, or choose another name")
        if old is not None and old.open_count and not force:
            raise busy(f"LUN {name} is in use ({self._held(old, att)}): unmount and detach "
                       "it first, or use force=yes (its content is discarded)")
        if old is not None and name in self.restoring:
            raise busy(f"LUN {name} is being resynced: wait for the resync command")
        if src.open_count and not force:
            raise busy(f"shadow copy {path} is in use ({self._held(src, att)}): close it "
                       "first or use force=yes")
        async with self.wb.lock:
            self._check_live(src)
            if ns.luns.get(name) is not old:
                raise busy(f"LUN {name} was created or deleted meanwhile: try again")
            await self.wb.flush()
            await self.wb.merge()
            if old is not None:
                del ns.luns[name]
                ns.drop_volume(old)
            ns.remove_member(src)
            src.kind, src.set_name, src.name = "lun", None, name
            src.readonly = src.hidden = False
            src.origin = src.context = src.consistency = None
            ns.luns[name] = src
            self.wb.mark_row(src)
            self.event("info", f"swap: shadow copy {path} ({src.wwn}) is now LUN {name}"
                       + (f"; the previous LUN {name} ({old.wwn}) was discarded" if old
                          else ""))
            await self.collector.collect()
        return src

    # ---- copy jobs ------------------------------------------------------------------------
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
            self.collector.pin(pin)
            try:
                await maps.mark(vol.root, vol.height, self.loader(vol), ids, set())
            finally:
                self.collector.unpin(pin)
            ids = list(ids)
            # (the index is read off the loop, a batch at a time: on a
            # catalogue in a cluster a lookup is a RADOS read)
            for i in range(0, len(ids), LOOKUP_BATCH):
                if vol.deleted or vol.source is None:
                    break
                part = [b for b in ids[i:i + LOOKUP_BATCH] if (vol.pack.name, b) not in seen]
                own = await self.lookups(vol.pack, part, dedup=True)   # (new to it?)
                part = [b for b, loc in zip(part, own) if loc is None]
                if vol.deleted or vol.source is None:
                    break
                for bid, loc in zip(part, await self.lookups(vol.source, part)):
                    key = (vol.pack.name, bid)
                    if key in seen:
                        continue
                    seen.add(key)
                    if loc is None:
                        if vol.root != pin[0][1]:
                            continue  # written meanwhile: the block is no longer its
                        raise ioerror(f"block {bid.hex()} of {vol.path} is in neither "
                                      f"pack {vol.pack.name} nor its source")
                    out.append((vol, bid, loc[2]))
        return out

    def _copy_volumes(self, job: Job) -> list:
        """The volumes `job` still copies; raises JobCancelled when every
        one it had was deleted (nothing left to copy for)."""
        vols = [self.ns.volumes.get(v) for v in job.params["vids"]]
        vols = [v for v in vols if v is not None and not v.deleted]
        if not vols:
            job.cancel_reason = job.cancel_reason or "its volumes were deleted"
            raise JobCancelled()
        return [v for v in vols if v.source is not None]

    async def _run_copy_job(self, job: Job) -> None:
        """Store in each volume's pack every id it still reads from its source.
        A block a volume no longer reaches (the volume was deleted, written
        or shrunk, and the block collected from the source) is skipped."""
        wb, runner = self.wb, self.runner
        try:
            vols = self._copy_volumes(job)
            if job.state == "queued":       # (its plan is part of its run: no wait first)
                job.state = "running"
            todo = await self._missing(vols)
            left = sum(n for _, _, n in todo)
            if job.resumed and job.total_bytes:
                # what survived the restart is done: what is left is missing
                job.done_bytes = max(0, job.total_bytes - left)
                job.total_bytes = job.done_bytes + left
            else:
                job.total_bytes = job.done_bytes + left
            wb.mark_job(job)
            runner.started(job, f"{human_bytes(left)} to copy")
            # one batch is stored (hashed, appended: a worker thread) while
            # the next is read (another): the copy runs on two cores
            storing = InFlight()

            async def store(records, nbytes) -> None:
                if records:
                    async with wb.lock:
                        await wb.store_new(records)
                job.done_bytes += nbytes
                wb.mark_job(job)
                runner.progress(job)
            try:
                for i in range(0, len(todo), COPY_BATCH):
                    await job.checkpoint()
                    batch = todo[i:i + COPY_BATCH]
                    by_source: dict = {}
                    for vol, bid, n in batch:
                        if not (vol.deleted or vol.source is None):
                            by_source.setdefault((vol.pack, vol.source), []).append((vol, bid))
                    records = []
                    for (pack, source), items in by_source.items():
                        stored = await self.lookups(pack, [b for _, b in items],
                                                    dedup=True)     # (new to it?)
                        items = [(v, b) for (v, b), loc in zip(items, stored)
                                 if loc is None and not v.deleted and v.source is source]
                        # looked up just before the read (no wait in between:
                        # `lookups` answers for the moment it returns): None
                        # when the source no longer holds it (collected)
                        locs = await self.lookups(source, [b for _, b in items])
                        found = [(v, b, loc) for (v, b), loc in zip(items, locs)
                                 if loc is not None]
                        if not found:
                            continue
                        datas = await self.read_locs(source, [b for _, b, _ in found],
                                                     [loc for _, _, loc in found])
                        records += [(v.pack, b, d) for (v, b, _), d in zip(found, datas)]
                    await storing.wait()
                    storing.start(runner.nursery, store, records, sum(n for _, _, n in batch))
                await storing.wait()
            finally:        # a cancelled or failed job ends after its last store
                with trio.CancelScope(shield=True):
                    await storing.wait(raise_error=False)
            self._copy_volumes(job)          # all deleted meanwhile: cancelled
            async with wb.lock:
                for vol in vols:
                    if vol.vid in self.ns.volumes:
                        await wb.end_copy(vol)
                job.state, job.finished = "done", time.time()
                job.done_bytes = job.total_bytes
                wb.mark_job(job)
                self.event("info", f"job {job.id} ({job.kind}) done: "
                           f"{human_bytes(job.total_bytes)} copied")
                await wb.commit(put_off=True)   # (no room: its record waits, it is done)
                self.collector.want()
        except JobCancelled:
            if job.cancel_reason:
                runner.end(job, "cancelled", f"job {job.id} ({job.kind}) ended at "
                           f"{job.percent}%: {job.cancel_reason}", job.cancel_reason)
            else:
                runner.end(job, "cancelled", f"job {job.id} ({job.kind}) cancelled at "
                           f"{job.percent}%: the volumes read right but keep reading "
                           "blocks not yet copied from their source pack")
        except ArrayError as e:
            runner.end(job, "failed", f"job {job.id} ({job.kind}) failed: {e.message}",
                       e.message)

    # ---- staging (an import) --------------------------------------------------------------
    def stage(self, job: Job) -> ShadowSet:
        """The invisible staging set of import job `job`. Caller holds the lock."""
        return self.ns.add_set(staging_name(job.id), time.time())

    def stage_volume(self, staging: ShadowSet, vh: dict, pack, remap: bool,
                     base: Volume | None = None) -> Volume:
        """A shadow copy in `staging` for the stream's volume header `vh`
        (with `base`: sent as changes against that volume, whose map it
        starts from). Caller holds the lock."""
        row = self.ns.imported_row(vh, staging.name, remap)
        row["height"] = max(row["height"], vh["height"])
        if base is not None:
            row.update(root=base.root, height=base.height, allocated=base.allocated)
        return self.ns.add_shadow(row, pack, None)

    async def store(self, items, ids, verify: bool) -> None:
        """Store an import's blocks [(vol, bno, data)] with their ids (in
        step; ZERO_ID for a zero block): dedup against and append to each
        volume's pack, under the commit lock, and point the volumes'
        overlays at them. Nothing is referenced before this succeeds."""
        async with self.wb.lock:
            try:
                added = await trio.to_thread.run_sync(
                    self.store_hashed, [(v.pack, d) for v, _, d in items], ids, verify)
            except OSError as e:
                if e.errno == errno.EFAULT:     # a mapped stream file cut short
                    raise ArrayError(errno.EIO, "the stream is damaged: its file was cut "
                                     "short while it was imported") from None
                raise self.wb.append_error(items[0][0].pack, e) from None
            except self.collision as c:
                raise ArrayError(errno.EIO, f"hash collision in pack {c.pack} on id "
                                 f"{c.bid}: the import was refused") from None
            for p, bid, loc in added:
                p.add(bid, loc)
            for (v, bno, _), bid in zip(items, ids):
                v.overlay[bno] = bid

    def publish(self, vols: list, name: str, created: float) -> ShadowSet:
        """The verified import's volumes leave their staging set for the
        new visible set `name`. Caller holds the lock (and commits)."""
        ns = self.ns
        staging = vols[0].set_name if vols else None
        s = ns.add_set(name, created)
        for v in vols:
            ns.sets[staging].members.pop(v.name, None)
            v.set_name = name
            s.members[v.name] = v
            self.wb.mark_row(v)
        if staging:
            ns.remove_set(staging)
        return s

    def drop(self, job: Job, vols: list = ()) -> None:
        """Remove import job `job`'s staging set and its volumes (and any
        of `vols` still live). Caller holds the lock."""
        ns = self.ns
        staging = staging_name(job.id)
        s = ns.sets.get(staging)
        members = list(s.members.values()) if s is not None else []
        for v in list(vols) + [m for m in members if m not in vols]:
            if v.vid in ns.volumes:
                ns.drop_volume(v)
                t = ns.sets.get(v.set_name)
                if t is not None:
                    t.members.pop(v.name, None)
        if staging in ns.sets:
            ns.remove_set(staging)

    async def cancel_import(self, job: Job) -> None:
        """Drop a partial import: its staging set and the space it took."""
        async with self.wb.lock:
            self.drop(job)
            job.state, job.finished = "cancelled", time.time()
            self.wb.mark_job(job)
            await self.collector.collect()
