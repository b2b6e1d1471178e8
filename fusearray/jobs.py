"""Jobs: long-running operations with honest progress, that can be paused,
throttled, cancelled, and that resume after a restart (DESIGN section 1, 3).

A Job is plain state plus the controls its worker checks between batches
(`checkpoint`). The array runs the worker and persists the row at commits;
the worker itself is idempotent (it recomputes what is left), so resuming
after a crash is running it again.
"""
import json
import os
import time

import trio

from .perms import FILE_MODE
from .util import iso_time

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
