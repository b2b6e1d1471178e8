"""Event subscribers (#19 point 4): event ids that stay the same in memory,
in the catalogue and across a SIGKILL; ctl/events.json; `fusearray events
--follow`; ARRAY/hooks/event.d/ run once per event (rate-limited, failures
are events, never a block). Units first (no FUSE), then real mounts."""
import json
import os
import signal
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


def test_follow_prints_each_id_once_and_says_what_it_missed(tmp_path, monkeypatch):
    """follow_events against a directory standing in for the mount (no
    FUSE): --since, a gap of pruned ids, the mount gone and back, an array
    whose newest id went below the last printed (events lost in a crash),
    Ctrl-C ending it with 0."""
    import io
    from fusearray import cli
    ctl_dir = tmp_path / "ctl"

    def publish(ids):
        ctl_dir.mkdir(exist_ok=True)
        (ctl_dir / "events.json").write_text("".join(
            json.dumps({"id": i, "time": 1.0 * i, "level": "info", "message": f"m{i}"}) + "\n"
            for i in ids))

    steps = [lambda: os.unlink(ctl_dir / "events.json"),     # the mount is gone
             lambda: None,
             lambda: publish(range(5, 10)),                  # back, with 7-9 new
             lambda: publish([5, 6, 12, 13]),                # 10-11 pruned meanwhile
             lambda: publish([1, 2]),                        # lost in a crash
             lambda: publish([1, 2, 3])]

    def sleep(_):
        if not steps:
            raise KeyboardInterrupt
        steps.pop(0)()
    monkeypatch.setattr(cli.time, "sleep", sleep)
    publish([5, 6])
    out, err = io.StringIO(), io.StringIO()
    assert cli.follow_events(str(tmp_path), 2, True, out=out, err=err) == 0
    assert [json.loads(l)["id"] for l in out.getvalue().splitlines()] == \
        [5, 6, 7, 8, 9, 12, 13, 3]
    e = err.getvalue()
    assert "event(s) 3-4 were not seen" in e and "event(s) 10-11 were not seen" in e
    assert "not answering" in e and "is back" in e
    assert "newest event is 2, below the last printed (13)" in e
    out = io.StringIO()
    steps[:] = []
    publish([1, 2])
    assert cli.follow_events(str(tmp_path), None, False, out=out, err=io.StringIO()) == 0
    assert out.getvalue() == "".join(f"{iso_time(float(i))} info m{i}\n" for i in (1, 2))


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


# ---- real mounts -------------------------------------------------------------------
def _events_json(m) -> list[dict]:
    return [json.loads(l) for l in m.view("events.json").splitlines()]


def _ids(evs) -> list[int]:
    return [e["id"] for e in evs]


def _printed(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(l) for l in f.read().splitlines() if l.endswith("}")]


def _end(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        p.kill()
    if p is not None:
        p.wait(timeout=30)


def test_events_json_and_the_cli(mount):
    """ctl/events.json has the events of ctl/events with their ids;
    `events` keeps its text, `--json` prints the JSON lines, `--since ID`
    only later ones."""
    m = mount
    m.ok("create", "a 1M")
    evs = _events_json(m)
    text = m.events().splitlines()
    assert [f"{iso_time(e['time'])} {e['level']} {e['message']}" for e in evs] == text
    assert _ids(evs) == sorted(set(_ids(evs)))
    assert any(e["message"].startswith("created LUN a") for e in evs)
    r = subprocess.run([PY, "-m", "fusearray", "-m", m.mnt, "events"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == text
    r = subprocess.run([PY, "-m", "fusearray", "-m", m.mnt, "events", "--json"],
                       capture_output=True, text=True, check=True)
    assert [json.loads(l) for l in r.stdout.splitlines()] == evs
    since = evs[-3]["id"]
    r = subprocess.run([PY, "-m", "fusearray", "-m", m.mnt, "events", "--json",
                        "--since", str(since)], capture_output=True, text=True, check=True)
    assert [json.loads(l) for l in r.stdout.splitlines()] == evs[-2:]


def test_follow_prints_each_event_once_across_a_sigkill(mount, tmp_path):
    """`events --follow --json` while commands run, the daemon is SIGKILLed
    (its last events only in the events journal) and mounted again: every
    event printed once, ids strictly increasing, the same ids and messages
    as ctl/events.json after the restart."""
    m = mount
    out, err = tmp_path / "follow.out", tmp_path / "follow.err"
    f = None
    with open(out, "w") as fo, open(err, "w") as fe:
        f = subprocess.Popen([PY, "-m", "fusearray", "-m", m.mnt, "events", "--follow",
                              "--json"], stdout=fo, stderr=fe)
    try:
        def seen(text):
            return lambda: [e for e in _printed(out) if text in e["message"]]
        wait_for(seen("array opened"), what="the kept events printed")
        m.ok("create", "fa 1M")
        assert m.ctl("create", "fa 1M")[0] != 0               # refused: exists
        m.ok("snapshot", "fa set=fs1")
        m.ok("create", "fb 1M")
        m.ok("delete", "fb")
        m.ok("create", "prekill 1M")
        assert m.ctl("delete", "nosuch-prekill")[0] != 0      # in the journal only
        before = wait_for(seen("nosuch-prekill"), what="the last event before the kill")
        m.kill9()
        wait_for(lambda: "not answering" in err.read_text(), what="the follower to see it gone")
        m.start()
        wait_for(seen("recovered"), what="the reopen's events")
        m.ok("create", "after 1M")
        assert m.ctl("resize", "nosuch-after 2M")[0] != 0
        wait_for(seen("nosuch-after"), what="the events after the restart")
        time.sleep(0.5)                                       # nothing printed twice later
        f.send_signal(signal.SIGTERM)
        assert f.wait(timeout=30) == 0
        f = None
    finally:
        _end(f)
    printed = _printed(out)
    ids = _ids(printed)
    assert ids == sorted(set(ids)), "ids not strictly increasing or printed twice"
    kept = _events_json(m)
    # nothing pruned here: every kept event up to the last printed, once, same ids
    assert printed == [e for e in kept if e["id"] <= ids[-1]]
    msgs = [e["message"] for e in printed]
    for text in ("created LUN fa", "fa 1M", "fs1", "created LUN fb", "deleted LUN fb",
                 "created LUN prekill", "nosuch-prekill", "recovered", "created LUN after",
                 "nosuch-after"):
        assert sum(text in msg for msg in msgs) >= 1, (text, msgs)
    for text in ("nosuch-prekill", "created LUN prekill", "nosuch-after", "created LUN after"):
        assert sum(text in msg for msg in msgs) == 1, (text, msgs)
    assert sum("array opened" in msg for msg in msgs) == 2
    # what the follower read from the old daemon has the same id after the restart
    old = before[0]
    assert [e for e in kept if e["id"] == old["id"]] == [old]
    log = err.read_text()
    assert "not answering" in log and "is back" in log and "were not seen" not in log


def _hook(m, name: str, body: str, mode: int = 0o755) -> str:
    d = os.path.join(m.array, "hooks", "event.d")
    os.makedirs(d, exist_ok=True)
    for p in (os.path.dirname(d), d):
        os.chmod(p, 0o755)
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(p, mode)
    return p


#: A hook that appends the event's fields, one line a run, tab-separated.
RECORD = ('printf "%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n" "$FUSEARRAY_EVENT_ID" '
          '"$FUSEARRAY_EVENT_TIME" "$FUSEARRAY_EVENT_TIME_EPOCH" "$FUSEARRAY_EVENT_LEVEL" '
          '"$FUSEARRAY_EVENT_MESSAGE" "$FUSEARRAY_ARRAY" "$FUSEARRAY_MOUNT" '
          '"$FUSEARRAY_STAGE" >> {out}')


def _records(path) -> list[list[str]]:
    try:
        with open(path) as f:
            return [l.split("\t") for l in f.read().splitlines()]
    except FileNotFoundError:
        return []


def test_event_hooks_see_every_event_and_a_failure_is_a_warning(make_mount, tmp_path):
    """event.d: a recording hook sees each event of a short sequence with
    its fields; a failing hook (exit 1) is a warning event per event, never
    passed to the hooks, and the array keeps working."""
    m = make_mount().init()
    rec = tmp_path / "records"
    _hook(m, "10-record", RECORD.format(out=rec))
    _hook(m, "20-fail", "echo boom >&2; exit 1")
    m.start()
    m.ok("create", "ha 1M")
    assert m.ctl("create", "ha 1M")[0] != 0
    m.ok("snapshot", "ha set=hs")
    m.ok("delete", "hs")
    wait_for(lambda: any("deleted" in r[4] for r in _records(rec)), what="the hook's records")
    wait_for(lambda: sum("event.d/20-fail exited with status 1" in e["message"]
                         for e in _events_json(m)) >= len(_records(rec)),
             what="a warning per failure")
    m.ok("create", "still-works 1M")             # the array goes on
    kept = {e["id"]: e for e in _events_json(m)}
    records = _records(rec)
    ids = [int(r[0]) for r in records]
    assert ids == sorted(set(ids))               # each event once, in order
    for r in records:
        e = kept[int(r[0])]
        assert r[1] == iso_time(e["time"]) and abs(float(r[2]) - e["time"]) < 1e-3
        assert r[3:5] == [e["level"], e["message"]]
        assert r[5:] == [m.array, m.mnt, "event"]
    scripted = [i for i, e in kept.items() if i <= ids[-1] and (
        "LUN ha" in e["message"] or "ha 1M" in e["message"] or "hs" in e["message"])]
    assert len(scripted) >= 4 and set(scripted) <= set(ids)
    fails = [e for e in kept.values() if e["message"].startswith("event hook event.d/20-fail")]
    assert fails and all(e["level"] == "warning" and "stderr: boom" in e["message"]
                         for e in fails)
    assert not {e["id"] for e in fails} & set(ids)     # never passed to the hooks
    assert not any("event hook" in r[4] for r in records)


def test_a_slow_hook_is_killed_and_blocks_nothing_an_untrusted_one_never_runs(
        make_mount, tmp_path):
    """A hook that sleeps past the time limit is killed (a warning says
    so) while commands go on; a hook writable by others is not run, and
    one warning (not one per event) says why."""
    m = make_mount().init()
    trace = tmp_path / "trace"
    _hook(m, "10-slow", f'case "$FUSEARRAY_EVENT_MESSAGE" in *slowpoke*) '
          f'echo start >> {trace}; sleep 60; echo end >> {trace};; esac')
    m.start()
    evil = tmp_path / "evil-ran"     # made after the open, which would take its go bits off
    p = _hook(m, "20-evil", f"touch {evil}")
    os.chmod(p, 0o777)                           # writable by others: never run
    m.ok("create", "slowpoke 1M")
    wait_for(lambda: "start" in (trace.read_text() if trace.exists() else ""),
             what="the slow hook to start")
    m.ok("create", "quick 1M")                   # while the hook sleeps
    m.ok("delete", "quick")
    with open(trace, "a") as f:
        f.write("commands done\n")
    killed = wait_for(lambda: [e for e in _events_json(m) if "event.d/10-slow" in e["message"]
                               and "time limit" in e["message"]], timeout=60,
                      what="the slow hook killed at its time limit")
    assert trace.read_text().splitlines() == ["start", "commands done"]   # no "end"
    kept = wait_for(lambda: [e for e in _events_json(m) if "20-evil" in e["message"]]
                    and _events_json(m), what="the untrusted hook's warning")
    quick = [e["id"] for e in kept if "created LUN quick" in e["message"]]
    assert quick and quick[0] < killed[0]["id"]     # done before the hook was
    assert killed[0]["level"] == "warning" and "killed" in killed[0]["message"]
    evil_warn = [e for e in kept if "20-evil" in e["message"]]
    assert len(evil_warn) == 1 and "writable by group or others" in evil_warn[0]["message"]
    assert not evil.exists()


def test_a_flood_is_rate_limited_for_the_hooks(make_mount, tmp_path):
    """200 refused commands (of several verbs, so several sources) at
    once: the hook runs far fewer times than events are logged, and a
    summary event says how many were not passed to it."""
    m = make_mount().init()
    rec = tmp_path / "records"
    _hook(m, "10-record", RECORD.format(out=rec))
    m.start()
    first = _events_json(m)[-1]["id"]
    for i in range(50):
        for verb, line in (("delete", f"nosuch{i}"), ("resize", f"nosuch{i} 1M"),
                           ("swap", f"nosuch/x{i}"), ("cancel", f"99{i}")):
            assert m.ctl(verb, line)[0] != 0
    summary = wait_for(lambda: [e for e in _events_json(m) if "were not passed to the "
                                "event.d hooks (rate limit" in e["message"]], timeout=30,
                       what="the rate limit's summary")
    n = int(summary[0]["message"].split("event hooks: ")[1].split()[0])
    logged = [e for e in _events_json(m) if e["id"] > first and e["id"] < summary[0]["id"]]
    time.sleep(1.5)
    runs = [int(r[0]) for r in _records(rec) if first < int(r[0]) < summary[0]["id"]]
    assert len(runs) == len(set(runs))
    assert n > 0 and len(runs) + n == len(logged)    # each event either run or counted
    assert len(runs) < len(logged) < 200


def test_an_unmount_while_a_hook_runs_kills_it(make_mount, tmp_path):
    """At close the event hooks' task is cancelled: the running hook is
    killed (its process group) and the unmount does not wait for it."""
    m = make_mount().init()
    pids = tmp_path / "pids"
    _hook(m, "10-slow", f'case "$FUSEARRAY_EVENT_MESSAGE" in *slowpoke*) '
          f'echo $$ >> {pids}; sleep 60;; esac')
    m.start()
    m.ok("create", "slowpoke 1M")
    pid = int(wait_for(lambda: pids.exists() and pids.read_text().strip(),
                       what="the slow hook to start"))
    t0 = time.monotonic()
    m.stop()
    assert time.monotonic() - t0 < 8.0           # not the hook's 10 s limit, nor its 60 s
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10,
             what="the hook's process to be gone")
