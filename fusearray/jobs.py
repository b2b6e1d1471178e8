"""Jobs: long-running operations with honest progress, that can be paused,
throttled, cancelled, and that resume after a restart (DESIGN section 1, 3).

A Job is plain state plus the controls its worker checks between batches
(`checkpoint`). The JobRunner is the one owner of every Job: it numbers
them, starts their workers in the daemon's nursery (each guarded: a bug
fails its job, never the mount), ends them, logs their started and
progress events, journals what must survive until the next commit
(JobJournal) and takes the ctl controls. The copy, rebuild, scrub and
import jobs all go through it; their workers are registered by kind
(`register`) by whoever does the work (shadows.Shadows, recovery.Recovery).
The runner knows no Array: it is given an event sink and `mark_dirty` (the
write-back persists the rows of dirty jobs at its next commit).

Concurrency: everything here runs on the trio thread; a worker is a trio
task, and what it does in worker threads is its own (see its module). A
worker is idempotent (it recomputes what is left), so resuming after a
crash is running it again: a crash mid-job leaves its last committed row
plus the journal's lines (controls, ends, percent floors), which `load`
replays; an import job is left paused for its stream to come back.
"""
import json
import logging
import os
import time
import traceback

import trio

from .errors import invalid, notfound
from .perms import FILE_MODE
from .util import human_bytes, iso_time, parse_bytes

log = logging.getLogger("fusearray")

ACTIVE = ("queued", "running", "paused")


class JobCancelled(Exception):
    pass


class Job:
    def __init__(self, jid: int, kind: str, params: dict, total: int = 0,
                 state: str = "queued", done: int = 0, rate_limit: int = 0,
                 started: float | None = None, finished: float | None = None,
                 error: str = ""):
        self.id = jid
        self.kind = kind
        self.params = params
        self.state = state
        self.total_bytes = total
        self.done_bytes = done
        self.rate_limit = rate_limit
        self.started = started or time.time()
        self.finished = finished
        self.error = error
        self._resumed = trio.Event()
        if state != "paused":
            self._resumed.set()
        self._cancel = False
        self.cancel_reason = ""          # why the array (not a user) cancelled it
        self.resumed = False             # loaded at open, not new: it resumes
        self.noted_floor = params.get("percent_floor", 0)   # what the journal holds
        self._window = (time.monotonic(), done)   # for the measured rate
        self._throttle_from = (time.monotonic(), done)
        self.last_decile = self.percent // 10

    @classmethod
    def from_row(cls, r: dict) -> "Job":
        job = cls(r["id"], r["kind"], json.loads(r["params"]), r["total_bytes"],
                  r["state"], r["done_bytes"], r["rate_limit"], r["started"],
                  r["finished"], r["error"])
        job.resumed = job.active
        return job

    def row(self) -> dict:
        # what was shown is kept: a resumed job may find more work left than
        # it had (a crash loses the pieces in flight), and its percent holds
        # there rather than going back
        self.params["percent_floor"] = self.percent
        return {"id": self.id, "kind": self.kind, "state": self.state,
                "done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "rate_limit": self.rate_limit, "started": self.started,
                "finished": self.finished, "error": self.error,
                "params": json.dumps(self.params)}

    @property
    def percent(self) -> int:
        """done/total, never below what this job showed before a restart."""
        if self.state == "done":
            return 100
        floor = self.params.get("percent_floor", 0)
        if not self.total_bytes:
            return floor
        return min(100, max(floor, self.done_bytes * 100 // self.total_bytes))

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def rate(self) -> int:
        """Measured bytes/s over the last window (0 when not running)."""
        if self.state != "running":
            return 0
        t0, d0 = self._window
        dt = time.monotonic() - t0
        return int((self.done_bytes - d0) / dt) if dt > 0 else 0

    def text(self) -> bytes:
        fields = {"id": self.id, "kind": self.kind, "state": self.state,
                  "percent": self.percent, "done_bytes": self.done_bytes,
                  "total_bytes": self.total_bytes, "rate_bytes_per_s": self.rate(),
                  "rate_limit": self.rate_limit, "started": iso_time(self.started),
                  "finished": iso_time(self.finished), "error": self.error}
        if self.kind == "import":
            fields["stream_offset"] = self.params.get("offset", 0)
        if self.kind == "scrub":
            for key in ("blocks", "repaired", "lost"):
                fields[f"{key}"] = self.params.get(key, 0)
        return "".join(f"{k}={v}\n" for k, v in fields.items()).encode()

    def status(self) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state,
                "percent": self.percent, "done_bytes": self.done_bytes,
                "total_bytes": self.total_bytes}

    # ---- controls (from ctl) -------------------------------------------------------
    def pause(self) -> None:
        self.state = "paused"
        self._resumed = trio.Event()

    def resume(self) -> None:
        if self.state == "paused":
            self.state = "running"
        self._resumed.set()
        self._window = self._throttle_from = (time.monotonic(), self.done_bytes)

    def cancel(self, reason: str = "") -> None:
        """Stop at the next checkpoint. `reason`: the array ends the job
        itself (its volumes were deleted), not a user."""
        self._cancel = True
        self.cancel_reason = self.cancel_reason or reason
        self._resumed.set()

    @property
    def cancelling(self) -> bool:
        """Cancelled; its worker has not ended it yet."""
        return self._cancel and self.active

    def throttle(self, rate: int) -> None:
        self.rate_limit = rate
        self._throttle_from = (time.monotonic(), self.done_bytes)

    # ---- for the worker ----------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Between batches: honour cancel, pause and the rate limit. A
        rate-limit wait is taken in slices of at most 0.1 s, so a pause,
        cancel or new rate given meanwhile holds before the next batch."""
        while True:
            if self._cancel:
                raise JobCancelled()
            if not self._resumed.is_set():
                await self._resumed.wait()
                continue
            if self.rate_limit:
                t0, d0 = self._throttle_from
                ahead = (self.done_bytes - d0) / self.rate_limit - (time.monotonic() - t0)
                if ahead > 0:
                    await trio.sleep(min(ahead, 0.1))
                    continue
            break
        now = time.monotonic()
        if now - self._window[0] > 2.0:
            self._window = (now, self.done_bytes)


class JobJournal:
    """What must not be lost about a job between two commits, as JSON lines
    in ARRAY/jobs.journal (appended into the page cache: survives SIGKILL,
    like the events journal): every control (pause, resume, throttle,
    cancel), every end that is not committed at once, and the percent each
    time it rises, so a resumed job never shows less than it showed, nor
    logs its 10 % steps again. Truncated once a commit holds every line
    (a noted job is dirty, so the next commit carries its row); replayed
    over the catalogue's rows at open."""

    FIELDS = ("state", "rate_limit", "finished", "error")

    def __init__(self, path: str):
        self.path = path
        self.fd = None
        self.notes = 0          # lines appended so far
        self.covered = 0        # ... of which the catalogue holds all

    def replay_blocking(self, rows: list) -> list:
        """Apply the journal to the catalogue's job rows (in place); returns
        the ids changed. Then opens the journal for appending."""
        last: dict = {}
        floor: dict = {}
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        jid = int(rec["id"])
                    except (ValueError, TypeError, KeyError):
                        continue        # a torn last line
                    last[jid] = rec
                    floor[jid] = max(floor.get(jid, 0), int(rec.get("floor", 0)))
        except FileNotFoundError:
            pass
        changed = []
        for r in rows:
            rec = last.get(r["id"])
            if rec is None:
                continue
            params = json.loads(r["params"])
            if floor[r["id"]] > params.get("percent_floor", 0):
                params["percent_floor"] = floor[r["id"]]
                r["params"] = json.dumps(params)
            # a state committed as ended stays ended (a "done" is committed
            # by its worker, not journaled); an import's state is its own
            if r["state"] in ACTIVE and r["kind"] != "import":
                for k in self.FIELDS:
                    if k in rec:
                        r[k] = rec[k]
            changed.append(r["id"])
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        if last:
            self.notes = 1      # the first commit holds the replayed rows: truncate then
        return changed

    def note(self, job: Job) -> None:
        job.noted_floor = max(job.noted_floor, job.percent)
        rec = {"id": job.id, "floor": job.noted_floor, "state": job.state,
               "rate_limit": job.rate_limit, "finished": job.finished, "error": job.error}
        self.notes += 1
        if self.fd is not None:
            try:
                os.write(self.fd, (json.dumps(rec) + "\n").encode())
            except OSError:
                pass            # the next commit still has it

    def committed(self, mark: int) -> None:
        """A commit that carried every job noted up to `mark` is in."""
        if mark > self.covered and mark == self.notes and self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                self.covered = mark
            except OSError:
                pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class JobRunner:
    """Every job of the array, their workers and their events (see the
    module docstring). `event(level, message)` is the event sink;
    `mark_dirty(job)` has the next commit write a job's row."""

    def __init__(self, journal_path: str, *, event, mark_dirty):
        self.jobs: dict[int, Job] = {}
        self.next_id = 1
        self.journal = JobJournal(journal_path)
        self.event = event
        self.mark_dirty = mark_dirty
        self.nursery = None                 # the daemon's: set by `resume_all`
        self.workers: dict = {}             # kind -> async worker(job)
        self.default_worker = None          # kinds not registered (copy jobs)
        self.cancellers: dict = {}          # kind -> async cancel(job), not job.cancel()

    def register(self, kinds, worker, *, default: bool = False, cancel=None) -> None:
        """`worker(job)` runs jobs of `kinds` (and unknown kinds if
        `default`); `cancel(job)`, if given, is how a user cancels them
        (an import job has no worker: its stream's writer drives it)."""
        for kind in kinds:
            if worker is not None:
                self.workers[kind] = worker
            if cancel is not None:
                self.cancellers[kind] = cancel
        if default:
            self.default_worker = worker

    # ---- loading (at open) --------------------------------------------------------
    def load_blocking(self, rows: list, next_id: int) -> set:
        """Worker thread, at open: the journal replayed over the catalogue's
        rows (in place); returns the ids it changed."""
        self.next_id = next_id
        return set(self.journal.replay_blocking(rows))

    def load(self, rows: list, journaled: set) -> None:
        for r in rows:
            job = Job.from_row(r)
            self.jobs[job.id] = job
            if job.id in journaled:
                self.mark_dirty(job)        # the journal's news go to the catalogue

    def resume_all(self, nursery) -> None:
        """Start the workers of the jobs a previous session left active."""
        self.nursery = nursery
        for job in self.jobs.values():
            if job.active and job.kind == "import":
                job.pause()     # waits for its stream: `fusearray import --resume`
            elif job.active:
                self.start(job)            # its worker says it resumes, and where

    # ---- lifecycle ----------------------------------------------------------------
    def new(self, kind: str, vols: list, done: bool = False) -> Job:
        """A new job of `kind` over volumes `vols` (already ended if `done`)."""
        jid = self.next_id
        self.next_id += 1
        job = Job(jid, kind, {"vids": [v.vid for v in vols]})
        if done:
            job.state, job.finished = "done", time.time()
        self.jobs[jid] = job
        self.mark_dirty(job)
        return job

    def start(self, job: Job) -> None:
        worker = self.workers.get(job.kind, self.default_worker)
        self.nursery.start_soon(self._guarded, worker, job, name=f"job {job.id}")

    async def _guarded(self, worker, job: Job) -> None:
        """Run a job's worker under the daemon's nursery: an unexpected
        error (a bug) fails that job, with its reason as an event and the
        traceback in the daemon log; it never reaches the nursery, which
        would end the daemon and leave the mount stale."""
        try:
            await worker(job)
        except Exception as e:          # (also an ExceptionGroup from a nursery inside)
            log.error("job %d (%s) failed on an internal error:\n%s", job.id, job.kind,
                      "".join(traceback.format_exception(e)))
            what = f"internal error: {type(e).__name__}: {e}"
            self.end(job, "failed", f"job {job.id} ({job.kind}) failed at "
                     f"{job.percent}%: {what} (a bug: the traceback is in the "
                     "daemon log); the array goes on", what)

    def end(self, job: Job, state: str, message: str, error: str = "") -> None:
        """A job ends without a commit of its own: journaled until the next."""
        job.state, job.finished, job.error = state, time.time(), error
        if state == "done":
            job.done_bytes = job.total_bytes
        self.note(job)
        self.event({"done": "info", "failed": "error"}.get(state, "warning"), message)

    def note(self, job: Job) -> None:
        """A change to `job` the next commit persists, journaled meanwhile."""
        self.mark_dirty(job)
        self.journal.note(job)

    def started(self, job: Job, work: str) -> None:
        """One event when a worker starts: new, or resumed after a restart."""
        if job.resumed:
            self.event("info", f"job {job.id} ({job.kind}) resumes at {job.percent}% after "
                       f"a restart: {work} (of {human_bytes(job.total_bytes)})"
                       + (f"; paused: `resume {job.id}` to go on" if job.state == "paused"
                          else ""))
        else:
            self.event("info", f"job {job.id} ({job.kind}) started: {work}")
        self.progress(job)

    def progress(self, job: Job) -> None:
        """After progress: an event per 10 % step, and the percent noted in
        the job journal whenever it rises (what was shown is never lost)."""
        decile = min(job.percent // 10, 9)
        while job.last_decile < decile:          # one event per 10 % step
            job.last_decile += 1
            self.event("info", f"job {job.id} ({job.kind}): {job.last_decile * 10}% "
                       f"({human_bytes(job.done_bytes)} of {human_bytes(job.total_bytes)})")
        if job.percent > job.noted_floor:
            self.note(job)

    # ---- lookups ------------------------------------------------------------------
    def get(self, text: str) -> Job:
        try:
            return self.jobs[int(text)]
        except (ValueError, KeyError):
            raise notfound(f"no job {text!r}") from None

    def job_of(self, vid: int) -> Job | None:
        """The active job that copies volume `vid`, if any."""
        for job in self.jobs.values():
            if job.active and vid in job.params.get("vids", ()):
                return job
        return None

    def of_pack(self, name: str) -> Job | None:
        """The active job working on pack `name` (recover, replace, scrub)."""
        for job in self.jobs.values():
            if job.active and job.params.get("pack") == name:
                return job
        return None

    def volume_dropped(self, vol) -> None:
        """`vol` was deleted: its copy job no longer copies it, and ends
        when it copied only deleted volumes."""
        job = self.job_of(vol.vid)
        if job is not None:
            job.params["vids"] = [v for v in job.params["vids"] if v != vol.vid]
            self.mark_dirty(job)
            if not job.params["vids"] and job.kind in ("resync", "plex"):
                job.cancel(f"its volume(s) were deleted (the last: {vol.path})")

    def render(self, jid: int) -> bytes:
        job = self.jobs.get(jid)
        return job.text() if job else b""

    def status(self) -> list:
        return [j.status() for j in sorted(self.jobs.values(), key=lambda j: j.id)]

    # ---- controls (ctl) ---------------------------------------------------------------
    async def control(self, text: str, action: str, rate: str | None = None) -> Job:
        job = self.get(text)
        if not job.active:
            raise invalid(f"job {job.id} has already ended ({job.state})")
        if job.cancelling and action != "cancel":
            raise invalid(f"job {job.id} is ending (cancelled"
                          + (f": {job.cancel_reason}" if job.cancel_reason else "") + ")")
        if action == "pause":
            job.pause()
        elif action == "resume":
            job.resume()
        elif action == "cancel" and job.kind in self.cancellers:
            await self.cancellers[job.kind](job)
        elif action == "cancel":
            job.cancel()
        elif action == "throttle":
            job.throttle(parse_bytes(rate, "rate"))
        self.note(job)
        self.event("info", f"job {job.id} ({job.kind}): {action}"
                   + (f" {rate}/s" if rate else ""))
        return job

    # ---- commits ----------------------------------------------------------------------
    def journal_mark(self) -> int:
        """Before a commit takes the dirty jobs: what the journal holds."""
        return self.journal.notes

    def committed(self, mark: int) -> None:
        """That commit is in: the journal lines up to `mark` are covered."""
        self.journal.committed(mark)

    def close(self) -> None:
        self.journal.close()
