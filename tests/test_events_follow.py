"""Event subscribers (#19 point 4): event ids that stay the same in memory,
in the catalogue and across a SIGKILL; ctl/events.json; `fusearray events
--follow`; ARRAY/hooks/event.d/ run once per event (rate-limited, failures
are events, never a block). Units first (no FUSE), then real mounts."""
import json
import os
import signal
import stat
import subprocess
import time

import trio

from fusearray import events, hooks
from fusearray.catalogue import Catalogue, Changes
from fusearray.eventhooks import EventHooks
from fusearray.events import EventJournal
from fusearray.util import iso_time

from conftest import PY, wait_for


# ---- units -----------------------------------------------------------------------
def _open_journal(path, cat):
    j = EventJournal(str(path))
    done = int(cat.meta().get("events_journal", 0))
    j.recover_blocking(done, lambda evs, n: cat.commit_blocking(
        Changes(events=evs, meta={"events_journal": n})))
    j.load(cat.events(events.EVENTS_KEPT, events.NOISE_KEPT))
    return j


def _commit(j, cat):
    evs, n = j.take()
    cat.commit_blocking(Changes(events=evs, meta={} if n is None else {"events_journal": n + 1}))


def test_an_event_keeps_its_id_in_the_catalogue_and_after_a_crash(tmp_path):
    """The id an event has in memory (ctl/events.json) is its catalogue
    seq after the commit, and after a 'SIGKILL' (the journal left as it
    is) and the next open, also for an event whose journal line could not
    be written and for the daemon's death notice (record_death)."""
    cat = Catalogue(str(tmp_path / "c.db"), create=True)
    cat.commit_blocking(Changes(events=[(1.0, "info", "array created")]))   # as init_array
    j = j2 = None
    try:
        j = _open_journal(tmp_path, cat)
        j.event("info", "one")
        j.event("error", "refused", source="refused create commands")
        j.event("info", "two")
        shown = [(e[0], e[3]) for e in j.log]
        _commit(j, cat)
        assert [(r[0], r[3]) for r in cat.events(100, 100)] == shown
        j.event("info", "three: in the journal only")
        fd = j._fd                           # one journal write fails (EBADF) ...
        j._fd = os.open(os.devnull, os.O_RDONLY)
        j.event("info", "four: not journaled")
        os.close(j._fd)
        j._fd = fd                           # ... and the next ones are written again
        j.event("warning", "five: in the journal only")
        j.record_death("the daemon died")
        shown = [(e[0], e[3]) for e in j.log]
        ids = [s for s, _ in shown]
        assert ids == list(range(1, len(ids) + 1))       # dense, each one event
        j.close()                            # the crash: no commit, journals stay
        j2 = _open_journal(tmp_path, cat)
        after = [(e[0], e[3]) for e in j2.log]
        lost = [x for x in shown if x[1].startswith("four")]
        assert after == [x for x in shown if x not in lost]     # same ids, four lost
        j2.event("info", "six")
        assert j2.log[-1][0] == ids[-1] + 1
        _commit(j2, cat)
        assert [(r[0], r[3]) for r in cat.events(100, 100)] == \
            [(e[0], e[3]) for e in j2.log]
    finally:
        for x in (j, j2):
            if x is not None:
                x.close()
        cat.close()


def test_events_json_renders_the_kept_events_with_their_ids():
    log = events.EventLog()
    log.append((3, 10.5, "info", "a"))
    log.append((4, 11.0, "error", 'b "quoted"'), noise=True)
    lines = events.render_json(log).decode().splitlines()
    assert [json.loads(l) for l in lines] == [
        {"id": 3, "time": 10.5, "level": "info", "message": "a"},
        {"id": 4, "time": 11.0, "level": "error", "message": 'b "quoted"'}]
    assert events.render_json(events.EventLog()) == b""


async def _until(cond, timeout=10.0):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_event_hooks_limit_queue_and_never_feed_themselves(tmp_path):
    """The subscriber without FUSE (fake find and run, a fake clock): the
    token bucket, the bounded queue, one summary each, untrusted hooks said
    once, failures are events that are not passed to the hooks."""
    now = [100.0]
    ran = []

    def find(path, stage):
        assert stage == "event"
        return ["/h/10-a"], ["hook event.d/20-b not run: it is writable by others"]

    def run(path, env, timeout, started=None):
        ran.append(env)
        return hooks.Result(os.path.basename(path),
                            1 if "fail" in env["FUSEARRAY_EVENT_MESSAGE"] else 0)

    j = EventJournal(str(tmp_path))
    eh = EventHooks(str(tmp_path), j.event, lambda: "/mnt/x", burst=3, rate=1.0,
                    queue_max=2, timeout=7.0, find=find, run_hook=run, clock=lambda: now[0])
    j.subscriber = eh.subscribe
    msgs = lambda: [e[3] for e in j.log]
    async with trio.open_nursery() as n:
        n.start_soon(eh.run)
        await trio.sleep(0.05)
        j.event("info", "first")
        await _until(lambda: len(ran) == 1)
        env = ran[0]
        seq, t = j.log[0][0], j.log[0][1]
        assert env["FUSEARRAY_EVENT_ID"] == str(seq) and env["FUSEARRAY_EVENT_LEVEL"] == "info"
        assert env["FUSEARRAY_EVENT_MESSAGE"] == "first"
        assert env["FUSEARRAY_EVENT_TIME"] == iso_time(t)
        assert abs(float(env["FUSEARRAY_EVENT_TIME_EPOCH"]) - t) < 1e-3
        assert env["FUSEARRAY_STAGE"] == "event" and env["FUSEARRAY_MOUNT"] == "/mnt/x"
        assert env["FUSEARRAY_ARRAY"] == str(tmp_path)
        assert sum("writable by others" in m for m in msgs()) == 1      # said once

        # a burst: 2 tokens left, the queue holds 2: 8 suppressed
        for i in range(10):
            j.event("info", f"burst {i}")
        await _until(lambda: len(ran) == 3)
        await _until(lambda: any("were not passed" in m for m in msgs()))
        summary = [m for m in msgs() if "rate limit" in m]
        assert len(summary) == 1 and summary[0].startswith("event hooks: 8 event(s)")
        assert [e["FUSEARRAY_EVENT_MESSAGE"] for e in ran[1:]] == ["burst 0", "burst 1"]

        # a full queue: tokens enough, but two events are already waiting
        now[0] += 1000
        eh.burst = eh.tokens = 10.0
        for i in range(5):
            j.event("info", f"queued {i}")
        await _until(lambda: len(ran) == 5)
        await _until(lambda: any("already waiting" in m for m in msgs()))
        assert [e["FUSEARRAY_EVENT_MESSAGE"] for e in ran[3:]] == ["queued 0", "queued 1"]

        # a failing hook: a warning, not passed to the hooks (no recursion)
        now[0] += 1000
        j.event("info", "please fail")
        await _until(lambda: any("exited with status 1" in m for m in msgs()))
        await trio.sleep(0.1)
        assert len(ran) == 6 and eh.failures == 1
        warn = [m for m in msgs() if "exited with status 1" in m][0]
        assert "event.d/10-a" in warn and f"event {j.log[-2][0]}" in warn
        hooked = {e["FUSEARRAY_EVENT_MESSAGE"] for e in ran}
        assert not any(m.startswith("event hooks") or "event hook " in m for m in hooked)
        assert sum("writable by others" in m for m in msgs()) == 1      # still once
        n.cancel_scope.cancel()
    assert not eh.queue


async def test_event_hooks_without_hooks_say_nothing(tmp_path):
    """An array without event.d: a flood costs no summary event."""
    j = EventJournal(str(tmp_path))
    eh = EventHooks(str(tmp_path), j.event, burst=2, rate=0.0)
    j.subscriber = eh.subscribe
    async with trio.open_nursery() as n:
        n.start_soon(eh.run)
        for i in range(50):
            j.event("info", f"e{i}")
        await trio.sleep(0.3)
        n.cancel_scope.cancel()
    assert [e[3] for e in j.log] == [f"e{i}" for i in range(50)]
