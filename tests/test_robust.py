"""A daemon never dies from a request, and when it dies all the same it
says so (issue 13: defects 2, 14, 20 and "a daemon never dies").

- a copy job whose volumes are deleted under it ends cleanly (defect 2),
  from the shell, and under concurrent command loops;
- an unexpected error in a job or in the committer fails that job / that
  round, never the daemon; every FUSE handler is guarded;
- a daemon that dies leaves its traceback in the daemon log, an event and
  a crash record, detaches its mount, and the next mount says what
  happened; after a SIGKILL the next mount says the session did not end
  cleanly (defect 14);
- a job resumed after a SIGKILL never shows less than it showed, logs each
  10 % step once and its resumption once; a pause survives the kill
  (defect 20).

Every process is ended from `finally` by its pid; the `Mount` fixture
unmounts what it mounted.
"""
import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import trio

from fusearray import ctlclient
from conftest import Mount, cli, require_fuse, run, wait_for

MiB = 1 << 20
PY = sys.executable
LONG = os.environ.get("FUSEARRAY_LONG") == "1"
STRESS_SECONDS = float(os.environ.get("FUSEARRAY_STRESS_SECONDS", 120 if LONG else 15))
STRESS_SEED = int(os.environ.get("FUSEARRAY_STRESS_SEED", 13))


# ---- helpers -------------------------------------------------------------------------
def sh(script: str) -> subprocess.CompletedProcess:
    return run(["bash", "-c", script], check=False)


def shell_ctl(m: Mount, verb: str, line: str) -> tuple[int, dict, str]:
    """`exec 3<>ctl/VERB; echo LINE >&3; cat <&3` from bash: (echo's exit
    status, the reply, the shell's error message)."""
    r = sh(f"exec 3<>{m.mnt}/ctl/{verb}; echo '{line}' >&3; rc=$?; cat <&3; exit $rc")
    reply = ctlclient.parse_reply(r.stdout)
    return r.returncode, reply, r.stderr




def fill(path: str, size: int, seed: int) -> str:
    """Write `size` bytes of seeded data with dd (O_DIRECT, fsync); its sha256."""
    data = random.Random(seed).randbytes(size)
    h = hashlib.sha256(data).hexdigest()
    p = subprocess.run(["dd", f"of={path}", "bs=1M", "oflag=direct", "conv=notrunc,fsync",
                        "status=none"], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr
    return h


def sha_of(path: str) -> str:
    return run(["sha256sum", path]).stdout.split()[0]


def alive(m: Mount) -> bool:
    return m.proc is not None and m.proc.poll() is None and os.path.isdir(m.path("ctl"))


def two_packs(m: Mount, tmp_path) -> None:
    m.init().start()
    m.ok("addpack", f"p2 single {tmp_path}/p2disk")


# ---- defect 2: a copy job whose volumes were deleted -----------------------------------
def test_copy_job_of_deleted_volumes_ends_cleanly_from_the_shell(make_mount, tmp_path):
    """The sequence of the report, as a script runs it: the paused resync's
    destination, its shadow copy and its source LUN deleted, then `resume`:
    the daemon lives, the job has ended (cancelled, with the reason, as an
    event), `resume` is refused with EINVAL and a message, and a LUN not
    involved reads what was written."""
    m = make_mount()
    two_packs(m, tmp_path)
    m.ok("create", "keep 16M")
    keep = fill(m.path("luns", "keep"), 16 * MiB, 1)
    m.ok("create", "src 64M")
    fill(m.path("luns", "src"), 64 * MiB, 2)
    c = f"{m.mnt}/ctl"
    r = sh(f"""set -e
        echo 'src set=S' > {c}/snapshot
        exec 3<>{c}/resync; echo 'S/src=dst pack=p2' >&3; cat <&3 > {tmp_path}/resync.out
        exec 3>&-
        J=$(sed -n 's/^job=//p' {tmp_path}/resync.out)
        echo "$J 1M" > {c}/throttle
        echo "$J" > {c}/pause
        echo 'dst force=yes' > {c}/delete
        echo 'S' > {c}/delete
        echo 'src force=yes' > {c}/delete
        echo "$J"
    """)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.split()[-1]
    rc, reply, err = shell_ctl(m, "resume", jid)
    assert alive(m), m.output()
    assert rc != 0 and reply.get("errno") == "EINVAL", (rc, reply, err)
    assert re.search(r"has already ended|is ending", reply.get("message", "")), reply
    j = wait_for(lambda: (j := m.job(jid))["state"] != "paused" and j, 60, "the job to end")
    assert j["state"] == "cancelled" and "deleted" in j["error"], j
    assert any("ended at" in l and "deleted" in l for l in m.job_events(jid)), \
        m.job_events(jid)
    assert not [l for l in m.events().splitlines() if "internal error" in l]
    assert sha_of(m.path("luns", "keep")) == keep
    # and the pack the copy went to holds nothing of it once collected
    m.ok("create", "after 8M pack=p2")        # the array still takes commands
    m.stop()
    m.start()
    assert m.job(jid)["state"] == "cancelled"
    assert sha_of(m.path("luns", "keep")) == keep


def test_copy_job_goes_on_for_the_volumes_left(make_mount, tmp_path):
    """One resync of two LUNs to another pack; one destination (and every
    source) deleted while it is paused: the job finishes the other, whose
    data is the shadow copy's, byte for byte, from its own pack."""
    m = make_mount()
    two_packs(m, tmp_path)
    m.ok("create", "a 32M")
    m.ok("create", "b 32M")
    fill(m.path("luns", "a"), 32 * MiB, 3)
    hb = fill(m.path("luns", "b"), 32 * MiB, 4)
    m.ok("snapshot", "a b set=S")
    jid = m.ok("resync", "S/a=xa S/b=xb pack=p2")["job"]
    m.ok("throttle", f"{jid} 1M")
    m.ok("pause", jid)
    m.ok("delete", "xa force=yes")
    m.ok("delete", "S")
    m.ok("delete", "a force=yes")
    m.ok("delete", "b force=yes")
    m.ok("resume", jid)
    m.ok("throttle", f"{jid} 0")
    wait_for(lambda: m.job(jid)["state"] != "running", 120, "the job to end")
    j = m.job(jid)
    assert j["state"] == "done" and j["percent"] == "100", j
    assert alive(m)
    xb = next(v for v in m.status()["luns"] if v["name"] == "xb")
    assert xb["pack"] == "p2"
    assert sha_of(m.path("luns", "xb")) == hb


# ---- defect 2 under load: concurrent command loops --------------------------------------
OK_ERRNOS = {"EEXIST", "ENOENT", "EBUSY", "EINVAL", "EOPNOTSUPP", "ENOTSUP", "ENOSPC", "EROFS"}


def _stress(m: Mount, seconds: float, seed: int, threads: int = 4) -> dict:
    """`threads` loops of random create/snapshot/delete/resize/resync
    (half of them to the other pack)/pause/resume/cancel/throttle on a few
    names, for `seconds`. Returns counts; every reply is ok or an errno of
    OK_ERRNOS with a message."""
    names = [f"s{i}" for i in range(4)]
    sets = [f"T{i}" for i in range(3)]
    bad: list = []
    counts = {"commands": 0, "ok": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def one(rng: random.Random) -> None:
        n, s = rng.choice(names), rng.choice(sets)
        jobs = [j["id"] for j in m.status()["jobs"] if j["state"] in ("running", "paused")]
        op = rng.choice(["create", "create", "snapshot", "delete", "delete", "resize",
                         "resync", "resync", "control", "write"])
        if op == "create":
            verb, line = "create", f"{n} {rng.choice([4, 8, 16])}M block=4K" + rng.choice(
                ["", " pack=p2"])
        elif op == "snapshot":
            verb, line = "snapshot", f"{n} set={s}" + rng.choice(
                ["", " context=plex pack=p2", " context=plex pack=main"])
        elif op == "delete":
            verb, line = "delete", rng.choice([f"{n} force=yes", s, f"{s}/{n}"])
        elif op == "resize":
            verb, line = "resize", f"{n} {rng.choice([2, 4, 8, 24])}M force=yes"
        elif op == "resync":
            verb, line = "resync", f"{s}/{rng.choice(names)}={n} force=yes" + rng.choice(
                ["", " pack=p2", " pack=main"]) + rng.choice(["", " undo=no"])
        elif op == "control" and jobs:
            verb = rng.choice(["pause", "resume", "cancel", "throttle"])
            line = f"{rng.choice(jobs)}" + (" 2M" if verb == "throttle" else "")
        else:
            try:
                fd = os.open(m.path("luns", n), os.O_WRONLY)
            except OSError as e:
                assert e.errno == errno.ENOENT, e
                return
            try:
                os.pwrite(fd, rng.randbytes(MiB), rng.randrange(0, 2 * MiB, 4096))
            except OSError as e:    # shrunk or deleted meanwhile
                assert e.errno in (errno.ENOSPC, errno.ENOENT, errno.EINVAL, errno.ENXIO), e
            finally:
                os.close(fd)
            return
        err, reply = m.ctl(verb, line)
        if not err and reply.get("job") and rng.random() < 0.7:
            m.ctl("throttle", f"{reply['job']} {rng.choice(['1M', '4M'])}")   # keep it going
        with lock:
            counts["commands"] += 1
            if err == 0 and reply.get("status") == "ok":
                counts["ok"] += 1
            elif not (err and reply.get("errno") in OK_ERRNOS and reply.get("errno")
                      == errno.errorcode[err] and len(reply.get("message", "")) > 10):
                bad.append((verb, line, err, reply))

    def loop(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        try:
            while time.monotonic() < stop and not bad and m.proc.poll() is None:
                one(rng)
        except Exception as e:          # (reported below, not lost in the thread)
            bad.append(("thread", k, repr(e)))
    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad, bad[:5]
    return counts


def test_concurrent_command_loops_with_cross_pack_resyncs(make_mount, tmp_path):
    """The loops that crashed the daemon twice within 5 s: it lives, every
    reply is ok or a documented errno with a message, no internal error is
    logged, and a LUN none of them touches reads what was written, also
    after a clean restart. (tools/stress_commands.py runs it for longer.)"""
    m = make_mount()
    two_packs(m, tmp_path)
    m.ok("create", "keep 16M")
    keep = fill(m.path("luns", "keep"), 16 * MiB, 5)
    counts = _stress(m, STRESS_SECONDS, seed=STRESS_SEED)
    print(f"stress: {counts} in {STRESS_SECONDS:.0f} s, seed {STRESS_SEED}")
    assert alive(m), m.output()[-3000:]
    assert counts["commands"] > 20 and counts["ok"] > 5, counts
    internal = [l for l in m.events().splitlines()
                if "internal error" in l or "died" in l or "data lost" in l]
    assert not internal, internal
    assert sha_of(m.path("luns", "keep")) == keep
    m.stop()
    m.start()
    assert sha_of(m.path("luns", "keep")) == keep


# ---- a daemon never dies from a request (in process) -------------------------------------
async def _with_array(path, fn):
    from fusearray.array import Array
    async with trio.open_nursery() as n:
        a = Array(str(path), 8 * MiB)
        await a.open(n)
        try:
            return await fn(a)
        finally:
            await a.close()
            n.cancel_scope.cancel()


@pytest.mark.daemon_errors(r"TypeError: 'NoneType' object is not subscriptable")
async def test_a_bug_in_a_job_fails_that_job_not_the_daemon(tmp_path, monkeypatch):
    """A copy job's worker raises a TypeError (as `_read_locs` did on a
    collected block): the job is failed with the reason, as an event, the
    traceback in the log, and the array (its nursery) goes on serving."""
    from fusearray.array import init_array
    from fusearray.shadows import Shadows
    init_array(str(tmp_path / "arr"))

    async def broken(self, vols):
        raise TypeError("'NoneType' object is not subscriptable")
    monkeypatch.setattr(Shadows, "_missing", broken)

    async def body(a):
        await a.add_pack("far", "single", [str(tmp_path / "far")])
        lun = await a.create_lun("db", "4M")
        await lun.write(0, os.urandom(4 * MiB))
        _, job, _ = await a.snapshot(["db"], "p", context="plex", pack="far")
        with trio.fail_after(30):
            while job.active:
                await trio.sleep(0.01)
        assert job.state == "failed" and "TypeError" in job.error, job.text()
        msgs = [e[3] for e in a.events]
        assert any(f"job {job.id} (plex) failed" in x and "TypeError" in x and
                   "daemon log" in x for x in msgs), msgs[-5:]
        # still serving: commands and I/O
        await a.create_lun("other", "1M")
        assert await a.shadow("p/db").read(0, 4096) == await lun.read(0, 4096)
    await _with_array(tmp_path / "arr", body)


@pytest.mark.daemon_errors(r"RuntimeError: disk check bug")
async def test_a_bug_in_the_committers_disk_check_is_caught(tmp_path, monkeypatch):
    """The committer's disk check ran outside its guard: an unexpected error
    there ended the daemon. Now it is an event and the committer goes on
    (the next round commits)."""
    from fusearray import writeback
    from fusearray.array import init_array
    from fusearray.store import Pack
    init_array(str(tmp_path / "arr"))
    calls = []
    real = Pack.check_disks_blocking

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk check bug")
        return real(self, *args)
    monkeypatch.setattr(Pack, "check_disks_blocking", flaky)
    monkeypatch.setattr(writeback, "DISK_CHECK_INTERVAL", 0.0)

    async def body(a):
        with trio.fail_after(30):
            while len(calls) < 3:
                await trio.sleep(0.05)
        msgs = [e[3] for e in a.events]
        assert any("internal error in the committer" in x and "disk check bug" in x
                   for x in msgs), msgs
        a.cache.errors.pop("*", None)
        await a.create_lun("x", "1M")
    await _with_array(tmp_path / "arr", body)


async def test_a_command_whose_shadow_copy_is_deleted_while_it_waits(tmp_path):
    """resync and swap look their shadow copy up, then wait for the commit
    lock; a delete of it that got the lock first (and collected its
    blocks) made the resync point a new LUN at collected blocks (data lost,
    found by the concurrent loops) and a second delete of the same set
    raise KeyError. Now each is ENOENT and nothing changes."""
    from fusearray.array import init_array
    from fusearray.errors import ArrayError
    init_array(str(tmp_path / "arr"))

    async def body(a):
        lun = await a.create_lun("db", "4M")
        await lun.write(0, os.urandom(4 * MiB))
        await a.snapshot(["db"], "S")
        await a.delete_lun("db", force=True)
        results = {}

        async def attempt(name, fn):
            try:
                results[name] = await fn()
            except ArrayError as e:
                results[name] = e.errno
        async with trio.open_nursery() as n:
            async with a.writeback.lock:  # (the test holds the lock: all queue up)
                n.start_soon(attempt, "delete", lambda: a.delete_shadow("S"))
                await trio.sleep(0.05)
                n.start_soon(attempt, "delete2", lambda: a.delete_shadow("S"))
                n.start_soon(attempt, "resync", lambda: a.resync(["S/db=copy"]))
                n.start_soon(attempt, "swap", lambda: a.swap("S/db", "db2"))
                await trio.sleep(0.05)
        assert results["delete"] == {"deleted": "S"}, results
        assert {results[k] for k in ("delete2", "resync", "swap")} == {errno.ENOENT}, results
        assert "copy" not in a.luns and "db2" not in a.luns and "S" not in a.sets
    await _with_array(tmp_path / "arr", body)


def test_every_fuse_handler_is_guarded():
    """Each request handler the file system defines either goes through
    `guarded` (an unexpected error is EIO and an event, never the end of
    pyfuse3.main) or, for fallocate (called from the shim), catches
    everything itself."""
    import inspect

    import pyfuse3

    from fusearray.fs import Operations
    handlers = [n for n, f in inspect.getmembers(pyfuse3.Operations)
                if callable(f) and not n.startswith("_")]
    mine = [n for n in handlers if n in Operations.__dict__]
    assert {"lookup", "read", "write", "open", "release", "fsync"} <= set(mine), mine
    unguarded = [n for n in mine if not hasattr(Operations.__dict__[n], "__wrapped__")]
    assert unguarded == [], unguarded
    src = inspect.getsource(Operations.fallocate)
    assert "except Exception" in src


# ---- defect 14: a daemon that dies says so ---------------------------------------------
def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


@pytest.mark.daemon_errors(r"RuntimeError: test crash requested through "
                            r"FUSEARRAY_TEST_CRASH_FILE")
def test_a_dying_daemon_leaves_a_trace_and_no_stale_mount(tmp_path):
    """`fusearray mount --background` with the test-only crash hook: the
    daemon dies of an unexpected error. Its traceback is in daemon.log (the
    detached daemon's stderr goes there too), an event says it, crash.json
    records it, its mountpoint is detached (not left stale), and the next
    `fusearray mount` warns on stderr what happened, as an event too."""
    require_fuse()
    arr, mnt, boom = tmp_path / "arr", tmp_path / "mnt", tmp_path / "boom"
    mnt.mkdir()
    cli("init", str(arr))
    pids = []
    env = dict(os.environ, FUSEARRAY_TEST_CRASH_FILE=str(boom))
    try:
        r = run([PY, "-m", "fusearray", "mount", "--background", str(arr), str(mnt)], env=env)
        pids.append(int(re.search(r"\(pid (\d+)\)", r.stdout).group(1)))
        assert os.path.ismount(mnt)
        boom.touch()
        wait_for(lambda: _pid_gone(pids[0]), 60, "the daemon to die")
        # not stale: the mountpoint is a plain directory again
        wait_for(lambda: not os.path.ismount(mnt), 10, "the mount to be detached")
        os.stat(mnt)
        log = (arr / "daemon.log").read_text()
        assert "Traceback" in log and "RuntimeError: test crash requested" in log, log[-2000:]
        crash = json.loads((arr / "crash.json").read_text())
        assert crash["pid"] == pids[0] and "RuntimeError" in crash["error"], crash
        # the next mount says what happened, on stderr and as an event
        boom.unlink()
        r = run([PY, "-m", "fusearray", "mount", "--background", str(arr), str(mnt)])
        pids.append(int(re.search(r"\(pid (\d+)\)", r.stdout).group(1)))
        assert f"the previous daemon (pid {pids[0]}) died at" in r.stderr, r.stderr
        assert "RuntimeError: test crash requested" in r.stderr and "daemon.log" in r.stderr
        with open(mnt / "ctl" / "events") as f:
            events = f.read()
        assert re.search(rf"error the daemon \(pid {pids[0]}\) died of an unexpected error: "
                         "RuntimeError", events), events[-2000:]
        assert re.search(rf"warning the previous daemon \(pid {pids[0]}\) died at", events)
        assert not (arr / "crash.json").exists()
        # a clean end is not reported
        cli("umount", str(mnt))
        wait_for(lambda: _pid_gone(pids[1]), 60, "the daemon to exit")
        r = run([PY, "-m", "fusearray", "mount", "--background", str(arr), str(mnt)])
        pids.append(int(re.search(r"\(pid (\d+)\)", r.stdout).group(1)))
        assert "previous daemon" not in r.stderr, r.stderr
        cli("umount", str(mnt))
        wait_for(lambda: _pid_gone(pids[2]), 60, "the daemon to exit")
    finally:
        for pid in pids:
            if not _pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        if os.path.ismount(mnt) or not os.path.isdir(mnt):
            run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_after_sigkill_the_next_mount_says_the_session_did_not_end_cleanly(mount):
    m = mount
    pid = m.proc.pid
    assert m.warnings == []
    m.kill9()
    m.start()
    assert len(m.warnings) == 1 and f"the previous daemon (pid {pid}," in m.warnings[0], \
        m.warnings
    assert "did not end cleanly" in m.warnings[0]
    assert "did not end cleanly" in m.events()
    m.stop()
    m.start()
    assert m.warnings == []


# ---- defect 20: a resumed job's progress ------------------------------------------------
def test_a_job_resumed_after_sigkill_never_shows_less(make_mount, tmp_path):
    """A cross-pack resync, throttled, SIGKILLed past 40 %: after the
    restart its percent never reads below what it showed, its 10 % steps
    are logged once each over both sessions, it says once that it resumes
    (with numbers that match its total), and it ends done."""
    m = make_mount()
    two_packs(m, tmp_path)
    m.ok("create", "src 96M")
    h = fill(m.path("luns", "src"), 96 * MiB, 6)
    m.ok("snapshot", "src set=S")
    jid = m.ok("resync", "S/src=dst pack=p2")["job"]
    m.ok("throttle", f"{jid} 20M")
    shown = wait_for(lambda: int((j := m.job(jid))["percent"]) >= 40 and j, 60,
                     "the copy to pass 40 %")
    shown = max(int(shown["percent"]), int(m.job(jid)["percent"]))
    m.kill9()
    m.start()
    seen = []
    while True:
        j = m.job(jid)
        seen.append(int(j["percent"]))
        if j["state"] != "running":
            break
        if len(seen) == 5:
            m.ok("throttle", f"{jid} 0")
        time.sleep(0.05)
    assert j["state"] == "done", j
    assert min(seen) >= shown, (shown, seen)
    assert seen == sorted(seen), seen
    ev = m.job_events(jid)
    steps = [int(x) for l in ev for x in re.findall(r": (\d+)% \(", l)]
    assert steps == sorted(set(steps)) and steps == list(range(10, 100, 10)), ev
    resumed = [l for l in ev if "resumes" in l]
    assert len(resumed) == 1 and sum("started" in l for l in ev) == 1, ev
    total = int(j["total_bytes"])
    pct, left, of = re.search(r"resumes at (\d+)% after a restart: ([\d.]+)M to copy "
                              r"\(of ([\d.]+)M\)", resumed[0]).groups()
    assert int(pct) >= shown and abs(float(of) * MiB - total) < 0.1 * MiB, (resumed, total)
    assert float(left) * MiB < total
    assert sha_of(m.path("luns", "dst")) == h


def test_a_pause_and_a_throttle_survive_sigkill(make_mount, tmp_path):
    """`pause` and `throttle` given just before a SIGKILL (no commit since):
    the job comes back paused and throttled, and says so once."""
    m = make_mount()
    two_packs(m, tmp_path)
    m.ok("create", "src 32M")
    fill(m.path("luns", "src"), 32 * MiB, 7)
    m.ok("snapshot", "src set=S")
    jid = m.ok("resync", "S/src=dst pack=p2")["job"]
    m.ok("throttle", f"{jid} 3M")
    m.ok("pause", jid)
    m.kill9()
    m.start()
    j = m.job(jid)
    assert j["state"] == "paused" and j["rate_limit"] == str(3 * MiB), j
    # (its worker says so once it has planned what is left: soon after the mount)
    def said():
        ev = m.job_events(jid)
        return ev if any("resumes" in l for l in ev) else None
    ev = wait_for(said, 30, "the job to say it resumes")
    assert sum("resumes" in l for l in ev) == 1 and "paused" in [l for l in ev
                                                               if "resumes" in l][0], ev
    m.ok("resume", jid)
    m.ok("throttle", f"{jid} 0")
    wait_for(lambda: m.job(jid)["state"] == "done", 60, "the job to finish")


def test_a_scrub_resumed_after_sigkill_goes_on_where_it_was(make_mount, tmp_path):
    """A throttled scrub SIGKILLed after its first segments: it resumes
    after the last segment it had committed, so its block count at the end
    is the pack's (a second, uninterrupted scrub's), not more; its percent
    never reads below what it showed."""
    m = make_mount()
    m.init().start()
    m.ok("create", "big 256M")
    fill(m.path("luns", "big"), 200 * MiB, 8)        # segments of 64 MiB: four
    m.ok("create", "tick 1M")
    jid = m.ok("scrub", "main")["job"]
    m.ok("throttle", f"{jid} 20M")
    wait_for(lambda: int(m.job(jid)["percent"]) >= 30, 60, "the scrub to pass a segment")
    fill(m.path("luns", "tick"), MiB, 9)             # its fsync commits the job's row
    shown = int(m.job(jid)["percent"])
    assert m.job(jid)["state"] == "running", m.job(jid)
    m.kill9()
    m.start()
    assert int(m.job(jid)["percent"]) >= shown
    m.ok("throttle", f"{jid} 0")
    j = wait_for(lambda: (j := m.job(jid))["state"] != "running" and j, 60, "the scrub")
    assert j["state"] == "done", j
    again = m.ok("scrub", "main")["job"]
    k = wait_for(lambda: (k := m.job(again))["state"] != "running" and k, 60, "the scrub")
    assert k["state"] == "done" and int(k["blocks"]) > 3000, k
    assert j["blocks"] == k["blocks"], (j, k)
    resumed = [l for l in m.job_events(jid) if "resumes" in l]
    assert len(resumed) == 1, m.job_events(jid)


def test_a_recover_resumed_after_sigkill_keeps_the_segments_it_rebuilt(make_mount, tmp_path):
    """A throttled rebuild of a mirror disk SIGKILLed after its first sealed
    64 MiB segment: the resumed job does not rebuild that segment again
    (its "to rebuild" is a segment, ~64 MiB, less than at the start; before,
    it planned everything again), says so once, and the disk it rebuilt
    across the kill holds every block (the other disk removed: same data)."""
    import shutil

    from test_packs import Lun, check_redundancy, new_mount, recover_throttled, wait_pack
    m, disks = new_mount(make_mount, tmp_path, ("fast", "mirror", ["d1", "d2"]))
    lun = Lun(m, "l", 192 * MiB, "fast")
    lun.fill(0, MiB)
    shutil.rmtree(disks["d2"])
    wait_pack(m, "fast", "degraded", ["online", "missing"])
    lun.fill(MiB, 150 * MiB)                  # two sealed segments and more, all new
    os.mkdir(disks["d2"])                     # since it left: all of them to rebuild
    jid = recover_throttled(m, "fast", "20M")
    wait_for(lambda: int(m.job(jid)["done_bytes"]) >= 72 * MiB, 60, "a segment rebuilt")
    lun.fill(160 * MiB, MiB)                  # its fsync commits the job's row
    assert m.job(jid)["state"] == "running", m.job(jid)
    m.kill9()
    m.start()
    # the resumed worker plans (and says so) once it runs, which may be a
    # moment after the mount serves: wait for it (read at once, it was
    # missing twice in full runs on a loaded machine)
    resumed = wait_for(lambda: [l for l in m.job_events(jid) if "resumes" in l], 30,
                       "the resumed rebuild's event")
    ev = m.job_events(jid)
    first = float(re.search(r"started: ([\d.]+)M to rebuild", "\n".join(ev)).group(1))
    again = float(re.search(r"resumes at \d+% after a restart: ([\d.]+)M to rebuild",
                            resumed[0]).group(1))
    assert again <= first - 48, (first, again, resumed)     # a segment: ~64 MiB
    m.ok("throttle", f"{jid} 0")
    j = wait_for(lambda: (j := m.job(jid))["state"] != "running" and j, 60, "the rebuild")
    assert j["state"] == "done", j
    wait_pack(m, "fast", "healthy", ["online", "online"])
    assert len([l for l in m.job_events(jid) if "resumes" in l]) == 1, m.job_events(jid)
    check_redundancy(m, "fast", [disks["d1"], disks["d2"]], "mirror")
    shutil.rmtree(disks["d1"])
    wait_pack(m, "fast", "degraded", ["missing", "online"])
    lun.check("from the disk rebuilt across a SIGKILL")
