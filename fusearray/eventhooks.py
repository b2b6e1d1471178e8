"""Event subscribers (#19): the executables of ARRAY/hooks/event.d/ run
once per event, as ZFS's zedlets do (hooks.py finds and runs them).

`EventHooks.subscribe(seq, time, level, message)` is the events journal's
subscriber (EventJournal.subscriber): called on the trio thread for every
event logged, it never blocks. An event first needs a token of a bucket
(BURST at once, then RATE a second; one without is counted as suppressed)
and then a place in a bounded queue (QUEUE_MAX; one that finds it full is
counted as dropped). One trio task (`run`, started in the array's nursery
by Array.open) takes the events off the queue one at a time, in order, and
runs the hooks in worker threads: `hooks.find` (its answer cached for
FIND_CACHE seconds) and `hooks.run_blocking`, one hook after the other in
name order, each with a time limit of HOOK_TIMEOUT seconds (then its
process group is killed). Nothing here blocks the trio loop, so LUN I/O
and ctl commands go on while a hook runs.

A hook's environment: FUSEARRAY_EVENT_ID (the id of ctl/events.json),
FUSEARRAY_EVENT_TIME (ISO 8601, UTC), FUSEARRAY_EVENT_TIME_EPOCH (seconds
since the epoch), FUSEARRAY_EVENT_LEVEL, FUSEARRAY_EVENT_MESSAGE, and, as
every hook's (hooks.HookRunner.environment), FUSEARRAY_ARRAY,
FUSEARRAY_MOUNT, FUSEARRAY_STAGE=event, PATH and LANG.

What it says, as events that are never passed to event hooks themselves
(so a failing hook cannot feed itself):
- a hook's failure (non-zero exit, a signal, killed at the time limit,
  cannot be run): a warning naming the hook and the event's id; the array
  goes on;
- a hook (or its directory) not run because another user could change it
  (hooks.find's problems): one warning per distinct problem for the life
  of the daemon, not one per event;
- events suppressed by the rate limit, and events dropped by a full queue:
  one summary each once the queue is drained, at most every
  SUMMARY_EVERY seconds (and only while there are hooks to run: an array
  without event hooks says nothing).

At close the task is cancelled with the daemon's nursery: events still
queued are dropped (they are never run later; ctl/events and the catalogue
still have them), and a hook still running is killed (its process group).
"""
import collections
import os
import signal
import threading
import time

import trio

from . import hooks
from .util import iso_time

#: Events waiting for the hooks, at most.
QUEUE_MAX = 1000
#: Events passed to the hooks: BURST at once, then RATE a second.
BURST, RATE = 20, 5.0
#: A hook's time limit, in seconds.
HOOK_TIMEOUT = 10.0
#: How long hooks.find's answer is used, in seconds.
FIND_CACHE = 1.0
#: The shortest time between two summaries of the same kind, in seconds.
SUMMARY_EVERY = 5.0
#: Distinct untrusted-hook problems remembered (each said once).
PROBLEMS_MAX = 256


class EventHooks:
    """The event.d subscriber of the array at `array_path` (see the module
    docstring). `event(level, message)` is the array's event sink (its
    own events do not come back here); `mountpoint()` the mount, for the
    hooks' FUSEARRAY_MOUNT. `find`, `run_hook` and `clock` are for tests."""

    def __init__(self, array_path: str, event, mountpoint=lambda: None, *,
                 queue_max: int = QUEUE_MAX, burst: float = BURST, rate: float = RATE,
                 timeout: float = HOOK_TIMEOUT, find=hooks.find,
                 run_hook=hooks.run_blocking, clock=time.monotonic):
        self.path = array_path
        self.event = event
        self.runner = hooks.HookRunner(array_path, event, mountpoint)   # its environment()
        self.queue: collections.deque = collections.deque()
        self.queue_max = queue_max
        self.burst, self.rate, self.timeout = float(burst), float(rate), timeout
        self.find, self.run_hook, self.clock = find, run_hook, clock
        self.tokens, self.refilled = self.burst, clock()
        self.suppressed = self.dropped = 0        # not yet summed up
        self.suppressed_since = self.dropped_since = 0.0
        self.summed_at = {"suppressed": -SUMMARY_EVERY, "dropped": -SUMMARY_EVERY}
        self.runs = 0                             # hooks run (for tests and status)
        self.failures = 0
        self._own = False                         # logging our own event: not ours to pass on
        self._wake: trio.Event | None = None
        self._loop_thread = None
        self._found: list | None = None          # hooks.find's hooks, cached
        self._found_at = 0.0
        self._problems: set = set()               # said once each
        self._pid = None                          # the running hook's process group

    # ---- the journal's subscriber (trio thread, never blocks) ---------------
    def subscribe(self, seq: int, t: float, level: str, message: str) -> None:
        if self._own:
            return
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1:
            if not self.suppressed:
                self.suppressed_since = t
            self.suppressed += 1
            return
        self.tokens -= 1
        if len(self.queue) >= self.queue_max:
            if not self.dropped:
                self.dropped_since = t
            self.dropped += 1
            return
        self.queue.append((seq, t, level, message))
        if self._wake is not None and threading.get_ident() == self._loop_thread:
            self._wake.set()

    def say(self, level: str, message: str) -> None:
        """An event of the event hooks themselves: never passed to them."""
        self._own = True
        try:
            self.event(level, message)
        finally:
            self._own = False

    # ---- the task ------------------------------------------------------------
    async def run(self) -> None:
        """The one task: events off the queue, their hooks run, in order.
        Cancelled at close: what is queued is dropped, a running hook killed."""
        self._loop_thread = threading.get_ident()
        try:
            while True:
                if self.queue:
                    await self.deliver(*self.queue.popleft())
                else:
                    await self._idle()
        finally:
            self.queue.clear()
            pid = self._pid
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass

    async def _idle(self) -> None:
        """Queue empty: the summaries that are due, then wait for an event
        (or until the next summary may be said)."""
        wait = self.summarize()
        self._wake = trio.Event()
        with trio.move_on_after(wait):
            await self._wake.wait()
        self._wake = None

    def summarize(self) -> float:
        """Say the summaries that are due; returns how long until the next
        one may be (inf: none pending)."""
        wait = float("inf")
        if (self.suppressed or self.dropped) and not self._found:
            self.suppressed = self.dropped = 0        # no hooks: nothing was missed
            return wait
        now = self.clock()
        for kind in ("suppressed", "dropped"):
            n = getattr(self, kind)
            if not n:
                continue
            left = self.summed_at[kind] + SUMMARY_EVERY - now
            if left > 0:
                wait = min(wait, left)
                continue
            since = time.strftime("%H:%M:%SZ", time.gmtime(getattr(self, kind + "_since")))
            if kind == "suppressed":
                self.say("warning", f"event hooks: {n} event(s) since {since} were not "
                         f"passed to the event.d hooks (rate limit: {self.burst:g} at "
                         f"once, then {self.rate:g} a second)")
            else:
                self.say("warning", f"event hooks: {n} event(s) since {since} were not "
                         f"passed to the event.d hooks: {self.queue_max} events were "
                         "already waiting for them")
            setattr(self, kind, 0)
            self.summed_at[kind] = now
        return wait

    async def hooks(self) -> list:
        """The hooks to run (hooks.find in a worker thread, cached for
        FIND_CACHE seconds); each new problem is said once."""
        now = self.clock()
        if self._found is None or now - self._found_at >= FIND_CACHE:
            found, problems = await trio.to_thread.run_sync(self.find, self.path, "event")
            self._found, self._found_at = found, self.clock()
            for p in problems:
                if p not in self._problems and len(self._problems) < PROBLEMS_MAX:
                    self._problems.add(p)
                    self.say("warning", f"event hooks: {p}")
        return self._found

    def environment(self, seq: int, t: float, level: str, message: str) -> dict:
        return self.runner.environment("event", {
            "event_id": seq, "event_time": iso_time(t), "event_time_epoch": f"{t:.6f}",
            "event_level": level, "event_message": message})

    async def deliver(self, seq: int, t: float, level: str, message: str) -> None:
        """Run every hook for one event, one after the other."""
        found = await self.hooks()
        if not found:
            return
        env = self.environment(seq, t, level, message)
        for path in found:
            r = await trio.to_thread.run_sync(self._run_blocking, path, env,
                                              abandon_on_cancel=True)
            self.runs += 1
            if not r.ok:
                self.failures += 1
                self.say("warning", f"event hook event.d/{r.name} {r.describe()} "
                         f"(event {seq}; the array goes on)")

    def _run_blocking(self, path: str, env: dict):
        """In a worker thread: one hook; its process group noted meanwhile
        (killed if the task is cancelled)."""
        try:
            return self.run_hook(path, env, self.timeout, started=self._started)
        finally:
            self._pid = None

    def _started(self, pid: int) -> None:
        self._pid = pid
