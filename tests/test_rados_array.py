"""An array wholly in a Ceph cluster (#17 point 2, and point 3's failover):
`fusearray init rados:POOL/NAME` keeps the array's identity, catalogue,
intent log and lease in the cluster (fusearray/home.py); a host mounts it
with a cache directory of its own. Two daemons stand for two hosts: each
its own Ceph client (CEPH_ARGS --id) and its own cache directory, nothing
shared between them but the cluster.
"""
import errno
import json
import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import (cli, end_helper_mounts, exited, fusearray_mounts, read_at, run,
                      wait_for, write_synced)
from test_rados_lease import LEASE, MiB, pool_digest   # (LEASE: the tests' short lease)
from test_rados_pack import ext4_intact, ext4_with_files, full_ratios, pool_full

pytestmark = pytest.mark.mount


@pytest.fixture
def pool(rados_pool):       # (conftest: a fresh pool of the session's cluster)
    return rados_pool


class Hosts:
    """Hosts of one array in the cluster: `host(name)` is a Mount whose
    array directory is that host's cache directory, prepared from the
    cluster before each start, with its own client id."""

    def __init__(self, make_mount, ceph, spec):
        self.make_mount, self.ceph, self.spec = make_mount, ceph, spec

    def host(self, name: str, ceph_args: str = ""):
        m = self.make_mount(name, array=None)
        m.array = str(m.base / "cache")
        env = {"CEPH_CONF": self.ceph.conf, "CEPH_ARGS": f"--id host{name} {ceph_args}".strip()}
        start = m.start

        def start_on_cluster(*opts):
            from fusearray.home import prepare_cache_dir
            prepare_cache_dir(self.spec, m.array, self.ceph.conf)
            return start("--lease", LEASE, *opts, env=env)
        m.start = start_on_cluster
        return m


def init(ceph, pool: str, name: str = "arr") -> str:
    spec = f"rados:{pool}/{name}"
    cli("init", spec, "--ceph-conf", ceph.conf)
    return spec


def namespace_objects(ceph, pool: str, ns: str) -> set:
    with ceph.client().open_ioctx(pool) as io:
        io.set_namespace(ns)
        return {o.key for o in io.list_objects()}


def take_over(host, deadline: float, *opts) -> float:
    """Mount `host`, again and again while the dead holder's lease lives;
    the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            host.start(*opts)
            return time.monotonic() - t0
        except AssertionError as e:
            assert "is in use by" in str(e), e
            assert time.monotonic() - t0 < deadline, "the lease did not run out"
            time.sleep(0.3)


def test_init_and_mount_from_the_shell_keep_nothing_on_the_host(make_mount, ceph, pool,
                                                                tmp_path, monkeypatch):
    spec = f"rados:{pool}/arr"
    env = dict(os.environ, CEPH_CONF=ceph.conf)
    r = run([os.sys.executable, "-m", "fusearray", "init", spec], env=env)
    assert f"initialised array {spec}" in r.stdout
    # refusals: one line, an errno's exit status, nothing made
    for args, want in ((["init", spec], "is already an array"),
                       (["init", f"rados:{pool}/other", "--pack", f"x=single:{tmp_path}/d"],
                        "keeps its packs there too"),
                       (["init", "rados:nosuchpool/arr"], "does not exist"),
                       (["init", "rados:bad pool/x"], "bad array")):
        r = run([os.sys.executable, "-m", "fusearray", *args], env=env, check=False)
        assert r.returncode != 0 and want in r.stderr and "Traceback" not in r.stderr, \
            (args, r.stderr)
    assert not os.path.exists(f"{tmp_path}/d")
    m = make_mount("a")
    cache = tmp_path / "cache"
    r = run([os.sys.executable, "-m", "fusearray", "mount", spec, m.mnt, "--cache-dir",
             str(cache), "--background", "--lease", LEASE], env=env)
    try:
        assert os.path.ismount(m.mnt)
        m.ok("create", "v 16M")
        data = write_synced(m.path("luns", "v"), 6 * MiB, off=MiB)
        data = data[:100_000] + write_synced(m.path("luns", "v"), 100_000, off=MiB + 100_000)\
            + data[200_000:]                     # (small: through the intent log)
        st = m.status()
        assert st["array"] == spec and st["cache_dir"] == str(cache), st
        assert st["intent_log"]["log_dir"].endswith("/fusearray-array.arr"), st["intent_log"]
        assert st["intent_log"]["log_syncs"] >= 1
        # the host holds no data, no catalogue, no log
        names = set(os.listdir(cache))
        assert not names & {"catalogue.db", "catalogue.db-wal", "log", "disks"}, names
        objs = namespace_objects(ceph, pool, "fusearray-array.arr")
        assert {"array.json", "fusearray-lease", "log.slot.0"} <= objs, objs
        assert any(o.startswith("catalogue.db.") for o in objs), objs
        # a local pack cannot join it
        err, reply = m.ctl("addpack", f"x single {tmp_path}/e")
        assert err == errno.EINVAL and "rados" in reply["message"], reply
        # another array's cache directory is refused
        r = run([os.sys.executable, "-m", "fusearray", "mount", f"rados:{pool}/arr2",
                 str(tmp_path / "mnt2"), "--cache-dir", str(cache)], env=env, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    finally:
        r = run([os.sys.executable, "-m", "fusearray", "umount", m.mnt], env=env,
                check=False)
        if r.returncode:
            run(["fusermount3", "-u", "-z", m.mnt], check=False)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not os.path.exists(cache / "running"), 30, "the daemon to end")
    # fsck of it (its index copied to the cache directory: reach.py) is
    # clean; then a block's index row removed in the cluster is found
    fsck = [os.sys.executable, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "fsck"), str(cache)]
    r = run(fsck, env=env, check=False)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr
    assert not [f for f in os.listdir(cache) if f.startswith(".reach.")]
    from fusearray.catalogue import Catalogue, cluster_uri
    monkeypatch.setenv("CEPH_CONF", ceph.conf)    # (the VFS's cluster; not for later tests)
    uri = cluster_uri(pool, "fusearray-array.arr")
    cat = Catalogue(uri)
    try:
        with cat.transaction() as c:
            row = c.execute("SELECT * FROM blocks WHERE refs > 0 AND counted = 0 "
                            "LIMIT 1").fetchone()
            c.execute("DELETE FROM blocks WHERE pack=? AND id=?", row[:2])
    finally:
        cat.close()
    r = run(fsck, env=env, check=False)
    assert r.returncode == 1 and "problem(s)" in r.stdout \
        and " 0 problem(s)" not in r.stdout, r.stdout + r.stderr
    cat = Catalogue(uri)                     # (put back)
    try:
        with cat.transaction() as c:
            c.execute(f"INSERT INTO blocks VALUES ({','.join('?' * len(row))})", row)
    finally:
        cat.close()
    # mounted again from another cache directory: the same bytes
    b = Hosts(make_mount, ceph, spec).host("b")
    b.start()
    assert read_at(b.path("luns", "v"), MiB, len(data)) == data
    assert "fenced" not in b.events()        # a clean end gave the lease back
    b.stop()


def test_failover_after_the_holder_is_killed(make_mount, ceph, pool):
    """The issue's failover: mount on A, write and fsync, SIGKILL A, mount
    on B (its own client and cache directory): every fsync'd byte is
    there, served from the cluster (the catalogue and A's intent log),
    within the lease + 5 s."""
    hosts = Hosts(make_mount, ceph, init(ceph, pool))
    a, b = hosts.host("a"), hosts.host("b")
    a.start()
    a.ok("create", "v 32M")
    model = bytearray(32 * MiB)
    rng = random.Random(5)
    a.ok("sync", "all")                       # some of it in the catalogue ...
    for _ in range(6):
        off = rng.randrange(0, 32 * MiB - 400_000)
        n = rng.randrange(1, 400_000)
        model[off:off + n] = write_synced(a.path("luns", "v"), n, off)
    a.ok("sync", "all")
    for _ in range(6):                        # ... and some only in its intent log
        off = rng.randrange(0, 32 * MiB - 400_000)
        n = rng.randrange(1, 400_000)
        model[off:off + n] = write_synced(a.path("luns", "v"), n, off)
    a.kill9()
    took = take_over(b, int(LEASE) + 5)
    print(f"B serves the array {took:.1f} s after A was killed (lease {LEASE} s)")
    assert took <= int(LEASE) + 5
    ev = b.events()
    assert "fenced the earlier holder" in ev and "replayed" in ev, ev
    assert read_at(b.path("luns", "v")) == model
    b.stop()


@pytest.mark.daemon_errors(r"lease|fenced|ESHUTDOWN|shutdown|not stored|I/O error|EIO|"
                           r"catalogue|blocklist|disk I/O")
def test_failover_from_a_stalled_holder_fences_it(make_mount, ceph, pool):
    """A stalls (SIGSTOP); B takes the array over at once with --break-lock
    and serves everything A fsync'd; A wakes and writes: nothing it does
    reaches the cluster."""
    hosts = Hosts(make_mount, ceph, init(ceph, pool))
    a, b = hosts.host("a"), hosts.host("b")
    a.start()
    a.ok("create", "v 16M")
    first = write_synced(a.path("luns", "v"), 3 * MiB)
    a.ok("sync", "all")
    second = write_synced(a.path("luns", "v"), 2 * MiB, off=8 * MiB)   # (in the log)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        b.start("--break-lock")
        assert "fenced the earlier holder" in b.events()
        assert read_at(b.path("luns", "v"), 0, len(first)) == first
        assert read_at(b.path("luns", "v"), 8 * MiB, len(second)) == second
        b.ok("snapshot", "v set=after")
        b.ok("sync", "all")
        before = pool_digest(ceph, pool)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # A wakes up and writes; it may keep its fsync nowhere but must fail it,
    # and nothing reaches the cluster (it may also end: Ceph's SQLite VFS
    # aborts a process whose database lock was taken from it)
    try:
        fd = os.open(a.path("luns", "v"), os.O_WRONLY)
        try:
            for i in range(4):
                os.pwrite(fd, os.urandom(MiB), i * MiB)
            try:
                os.fsync(fd)
            except OSError as e:
                assert e.errno in (errno.EIO, errno.ENOTCONN), e
        finally:
            os.close(fd)
        err, reply = a.ctl("sync", "all")
        assert err in (errno.EIO, errno.ENOTCONN), reply
    except OSError as e:                     # the daemon ended
        assert e.errno in (errno.ENOTCONN, errno.ENOENT), e
    time.sleep(2 * int(LEASE))               # anything A had in flight has landed or failed
    assert pool_digest(ceph, pool) == before, "a fenced daemon's write reached the cluster"
    if a.proc.poll() is None:
        assert "lost the lease" in a.events() or "lost its lease" in a.events()
        r = cli("umount", "--discard", a.mnt, check=False)  # its close commits nothing there
        assert r.returncode == 0, r.stderr
        a.proc.wait(timeout=60)
    a.proc = None
    run(["fusermount3", "-u", "-z", a.mnt], check=False)
    assert pool_digest(ceph, pool) == before, "a fenced daemon's close reached the cluster"
    # B goes on, unharmed
    write_synced(b.path("luns", "v"), MiB, off=12 * MiB)
    b.ok("sync", "all")
    assert pool_digest(ceph, pool) != before
    b.stop()


def test_twenty_kill_and_take_over_cycles_lose_no_fsyncd_byte(make_mount, ceph, pool):
    """Hosts A and B in turn: write and fsync, SIGKILL, the other takes the
    array over with --break-lock (replaying the dead one's intent log from
    the cluster); 20 cycles, every fsync'd byte there at each."""
    hosts = Hosts(make_mount, ceph, init(ceph, pool))
    pair = [hosts.host("a"), hosts.host("b")]
    pair[0].start()
    pair[0].ok("create", "v 16M")
    model = bytearray(16 * MiB)
    rng = random.Random(20)
    waits = []
    for cycle in range(20):
        m, nxt = pair[cycle % 2], pair[(cycle + 1) % 2]
        for _ in range(3):
            off = rng.randrange(0, 16 * MiB - 200_000)
            n = rng.randrange(1, 200_000)
            model[off:off + n] = write_synced(m.path("luns", "v"), n, off)
        m.kill9()
        t0 = time.monotonic()
        nxt.start("--break-lock")
        waits.append(time.monotonic() - t0)
        assert read_at(nxt.path("luns", "v")) == model, f"cycle {cycle}"
    print(f"take-overs: max {max(waits):.2f} s, mean {sum(waits) / len(waits):.2f} s")
    pair[0].stop()                            # (20 cycles: A serves again at the end)


def test_a_cache_directory_replays_its_journals_only_if_it_held_the_array_last(
        ceph, pool, tmp_path):
    """The event and job journals of a cache directory (changes after its
    last commit) are kept when it was the last to hold the array (a crash
    of this host: they are replayed), dropped when another host held it
    since (they would undo that host's work)."""
    import json
    import socket
    import rados
    from fusearray.home import prepare_cache_dir
    spec = init(ceph, pool)
    cache = str(tmp_path / "cache")
    prepare_cache_dir(spec, cache, ceph.conf)
    with ceph.client().open_ioctx(pool) as io:
        io.set_namespace("fusearray-array.arr")
        for holder, kept in (({"array": cache, "host": socket.gethostname()}, True),
                             ({"array": "/elsewhere/cache", "host": "hostb"}, False),
                             (None, False)):
            for fn in ("events.journal.3", "jobs.journal"):
                with open(os.path.join(cache, fn), "w") as f:
                    f.write("{}\n")
            if holder is None:
                try:
                    io.rm_xattr("fusearray-lease", "holder")
                except rados.Error:
                    pass
            else:
                io.set_xattr("fusearray-lease", "holder", json.dumps(holder).encode())
            prepare_cache_dir(spec, cache, ceph.conf)
            left = {"events.journal.3", "jobs.journal"} & set(os.listdir(cache))
            assert bool(left) == kept and (not kept or len(left) == 2), (holder, left)


def test_ext4_on_a_lun_moves_to_another_host_after_a_kill(make_mount, ceph, pool, tmp_path):
    """ext4 on a LUN of host A, files written and fsync'd, A SIGKILLed with
    the file system mounted; host B takes the array over: e2fsck clean
    (after its journal's replay) and every fsync'd file there."""
    hosts = Hosts(make_mount, ceph, init(ceph, pool))
    a, b = hosts.host("a"), hosts.host("b")
    a.start()
    fs = str(tmp_path / "fs")
    files = ext4_with_files(a, "disk", fs)
    a.kill9()
    b.start("--break-lock")
    ext4_intact(b, "disk", fs, files)
    b.stop()


def test_the_intent_log_in_the_cluster_reads_back_and_stops_at_damage(ceph, pool):
    """Without FUSE: an intent log whose slots are RADOS objects
    (intentlog.SlotObjects) gives back what was synced, in order, after a
    reopen; a byte flipped in a slot object stops the read there (the
    records before it are still read, none at or after it)."""
    import trio
    from fusearray.intentlog import Coverage, IntentLog
    from fusearray.store.rados import RadosMedium
    from test_intentlog import make_records
    medium = RadosMedium(f"rados:{pool}/logtest", ceph.conf)
    recs = [r for r in make_records(random.Random(3), 60) if r[4] < 60_000]

    def opened():
        log = IntentLog(None, "an-array", 4 << 20, event=lambda *a: None, medium=medium)
        return log, log.open_blocking(Coverage())

    log, found = opened()
    assert found == [] and len(log.slots) >= 2
    log.start()

    async def write():
        for i in range(0, len(recs), 7):       # several syncs: several appends
            for seq, vid, kind, off, span, data in recs[i:i + 7]:
                if data is None:
                    log.record_zero(vid, seq, off, span)
                else:
                    log.record(vid, seq, off, data)
            assert await log.sync(recs[min(i + 6, len(recs) - 1)][0])
    trio.run(write)
    log.close_blocking()
    log, found = opened()
    assert found == recs
    log.close_blocking()
    name = "log.slot.0"
    body = medium.read_object(name)
    assert len(body) > 1000
    pos = len(body) // 2
    medium.write_object(name, body[:pos] + bytes([body[pos] ^ 0x10]) + body[pos + 1:])
    log, found = opened()
    log.close_blocking()
    assert 0 < len(found) < len(recs) and found == recs[:len(found)]
    assert log.damaged and log.damaged[0][0] == "slot.0"


def _labels(ceph, pool: str) -> dict:
    """{namespace: the array id on its pack label} of every labelled
    namespace of `pool`."""
    import rados
    out = {}
    with ceph.client().open_ioctx(pool) as io:
        io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
        spaces = {o.nspace for o in io.list_objects() if o.key == "fusearray-disk.json"}
        for ns in spaces:
            io.set_namespace(ns)
            out[ns] = json.loads(io.read("fusearray-disk.json", 1 << 16))["array"]
    return out


def _array_id(ceph, pool: str, name: str) -> str:
    with ceph.client().open_ioctx(pool) as io:
        io.set_namespace(f"fusearray-array.{name}")
        return json.loads(io.read("array.json", 1 << 16))["uuid"]


def test_racing_and_killed_inits_leave_one_working_array_and_nothing_in_the_way(
        make_mount, ceph, pool):
    """Three inits of one name at once: one makes the array, the others
    are refused with one line (another init of it is running on this host,
    or it is already an array): none is fenced half-way by another. Then
    inits SIGKILLed at random moments, each followed by the same init
    again (the same name, the same explicit pack namespace): it succeeds
    (or finds the array the killed one finished): nothing a dead init left
    (its lease, its half-made catalogue, its pack label) is in the way; in
    the end every labelled namespace of the pool belongs to an array that
    exists, and the last array mounts, keeps data and is fsck-clean."""
    env = dict(os.environ, CEPH_CONF=ceph.conf)
    fa = [os.sys.executable, "-m", "fusearray"]
    procs = [subprocess.Popen(fa + ["init", f"rados:{pool}/race"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    assert [rc for _, _, rc in outs].count(0) == 1, outs
    for out, err, rc in outs:
        if rc:
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and \
                re.search(r"is running on this host|is already an array", err), err
    arrays = {"race": _array_id(ceph, pool, "race")}
    rng = random.Random(17)
    t0 = time.monotonic()
    cli("init", f"rados:{pool}/timing", "--ceph-conf", ceph.conf)
    took = time.monotonic() - t0
    arrays["timing"] = _array_id(ceph, pool, "timing")
    outcomes = []
    for i in range(8):
        name, ns = f"k{i}", f"ns{i}"
        args = fa + ["init", f"rados:{pool}/{name}", "--pack", f"main=rados:{pool}/{ns}"]
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=rng.uniform(0.05, took))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        p.wait()
        killed = p.returncode == -signal.SIGKILL
        r = run(args, env=env, check=False)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode:        # only when the killed one had finished
            assert not killed or "is already an array" in r.stderr, r.stderr
        outcomes.append("killed" if killed else "finished")
        arrays[name] = _array_id(ceph, pool, name)
        assert _labels(ceph, pool)[ns] == arrays[name]
    assert "killed" in outcomes, outcomes
    # every labelled namespace is a pack of an array that exists: no leftovers
    assert set(_labels(ceph, pool).values()) <= set(arrays.values()), \
        (_labels(ceph, pool), arrays)
    # the last one works
    m = Hosts(make_mount, ceph, f"rados:{pool}/k7").host("a")
    m.start()
    m.ok("create", "v 8M")
    data = write_synced(m.path("luns", "v"), 4 * MiB)
    assert read_at(m.path("luns", "v"), 0, len(data)) == data
    m.stop()
    r = run([os.sys.executable, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "fsck"), m.array], env=env, check=False)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr


@pytest.mark.unit
def test_the_init_lock_is_one_per_array_and_this_users(tmp_path, monkeypatch):
    """home.init_lock: a second init of one array on this host is refused
    (EBUSY) while the first holds it, another array's is not, and it is
    free again after; a lock directory another user owns is refused, never
    used (they could hold the lock or swap the file)."""
    from fusearray.errors import ArrayError
    from fusearray.home import ClusterHome
    name = f"lock{os.getpid()}"
    home = ClusterHome(f"rados:p/{name}", str(tmp_path / "ceph.conf"))
    other = ClusterHome(f"rados:p/{name}x", str(tmp_path / "ceph.conf"))
    with home.init_lock():
        with pytest.raises(ArrayError) as e:
            with home.init_lock():
                pass
        assert e.value.errno == errno.EBUSY and "is running on this host" in e.value.message
        with other.init_lock():
            pass
    with home.init_lock():
        pass
    assert not os.path.exists(f"/run/fusearray/init.p.{name}.lock")   # (nothing left)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 4321)     # a user; the directory is root's
    os.mkdir(tmp_path / "fusearray-4321")
    with pytest.raises(ArrayError) as e:
        with home.init_lock():
            pass
    assert e.value.errno == errno.EBUSY and "another user" in e.value.message, e.value
    assert os.listdir(tmp_path / "fusearray-4321") == []


def test_mount_8_and_fstab_mount_an_array_in_the_cluster(ceph, pool, tmp_path, helper_link):
    """`mount -t fuse.fusearray rados:POOL/NAME MNT -o ceph_conf=..,cache_dir=..`
    and an fstab line of the same, without $CEPH_CONF (as at boot): the
    array is served from the cluster with that cache directory; a second
    mount is a no-op; umount(8) ends the daemon; what was fsync'd is there
    at the next mount."""
    from fusearray import ctlclient
    spec = init(ceph, pool)
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    os.mkdir(mnt)
    env = dict(os.environ)
    env.pop("CEPH_CONF", None)
    opts = f"_netdev,ceph_conf={ceph.conf},cache_dir={cache},lease={LEASE}"
    pids = []
    try:
        run(["mount", "-t", "fuse.fusearray", spec, mnt, "-o", opts], env=env)
        st = ctlclient.status(mnt)
        pids.append(st["pid"])
        assert st["array"] == spec and st["cache_dir"] == cache, st
        cli("create", "v", "16M", mnt=mnt)
        data = write_synced(os.path.join(mnt, "luns", "v"), 3 * MiB, off=MiB)
        run(["mount", "-t", "fuse.fusearray", spec, mnt, "-o", opts], env=env)
        assert len(fusearray_mounts(mnt)) == 1
        run(["umount", mnt])
        wait_for(lambda: exited(pids[-1]), 60, "the daemon to exit after umount")
        assert not fusearray_mounts(mnt)
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{spec} {mnt} fuse.fusearray defaults,{opts} 0 0\n")
        run(["mount", "--fstab", str(fstab), mnt], env=env)
        st = ctlclient.status(mnt)
        pids.append(st["pid"])
        assert st["array"] == spec
        assert read_at(os.path.join(mnt, "luns", "v"), MiB, len(data)) == data
        run(["umount", mnt])
        wait_for(lambda: exited(pids[-1]), 60, "the daemon to exit after umount")
    finally:
        end_helper_mounts(mnt, pids)


@pytest.mark.daemon_errors(r"is full|ENOSPC|No space|lease|timed out")
def test_a_full_pool_holds_a_catalogue_commit_until_it_has_room(ceph, pool, make_mount):
    """The pool of an array in the cluster full for longer than the Ceph
    clients' OSD-op timeout (a short one, as a user's ceph.conf or CEPH_ARGS
    may set): a command that commits waits, then succeeds once the pool has
    room, and its commit and everything fsync'd before are there after a
    clean unmount and mount. (Ceph's SQLite VFS reports a write that timed
    out as durable: with the timeout the snapshot "succeeded", its commit
    and those before it never reached the catalogue, and the next mount was
    refused with ESTALE: the packs' commit record ahead of the catalogue.
    rados.VFS_OSD_OP_TIMEOUT.)"""
    spec = init(ceph, pool)
    a = Hosts(make_mount, ceph, spec).host("a", "--rados_osd_op_timeout=4")
    a.start()
    a.ok("create", "v 16M")
    data = write_synced(a.path("luns", "v"), 8 * MiB)
    client = ceph.client()
    result = {}
    try:
        full_ratios(ceph, 0.000001, 0.0000008, 0.0000005)
        wait_for(lambda: pool_full(client, pool), 60, "the pool to be flagged full")
        t = threading.Thread(target=lambda: result.update(r=a.ctl("snapshot", "v set=s1")))
        t.start()
        time.sleep(12)          # three timeouts' worth
        assert t.is_alive(), f"the commit did not wait for room: {result}"
    finally:
        full_ratios(ceph, 0.95, 0.90, 0.85)
    wait_for(lambda: not pool_full(client, pool), 60, "the pool to have room")
    t.join(120)
    assert not t.is_alive(), "the snapshot did not finish once the pool had room"
    err, reply = result["r"]
    assert err == 0, reply
    a.stop()
    a.start()           # (without the fix: ESTALE, the catalogue behind the record)
    assert read_at(a.path("snapshots", "s1", "v"), 0, len(data)) == data
    assert read_at(a.path("luns", "v"), 0, len(data)) == data
    a.stop()            # (before the pool goes)


def _catalogue_objects(io) -> dict:
    """{name: (data, {xattr: value})} of the catalogue's RADOS objects (its
    database and WAL, striped), without their locks."""
    out = {}
    for o in io.list_objects():
        if o.key.startswith("catalogue.db"):
            size = io.stat(o.key)[0]
            out[o.key] = (io.read(o.key, size + 1) if size else b"",
                          {k: v for k, v in io.get_xattrs(o.key) if not k.startswith("lock.")})
    return out


def test_a_catalogue_that_lost_acknowledged_commits_is_named_so(ceph, pool, make_mount):
    """The catalogue in the cluster set back to an earlier state of the same
    mount (what a VFS that lies about a sync leaves: rados.VFS_OSD_OP_TIMEOUT):
    the next mount is refused with ESTALE saying the catalogue lost commits
    its own mount made, not that another copy of the array wrote the pack;
    --accept-stale opens it as it was, and the array goes on. The refused
    mount writes nothing: its close used to commit its empty state over the
    catalogue's (its counters back to 1), so the next LUN made took the id
    and WWN of an existing one and replaced it: LUN v was gone."""
    spec = init(ceph, pool)
    a = Hosts(make_mount, ceph, spec).host("a")
    a.start()
    a.ok("create", "v 16M")
    data = write_synced(a.path("luns", "v"), 4 * MiB)
    a.ok("sync", "all")
    with ceph.client().open_ioctx(pool) as io:
        io.set_namespace("fusearray-array.arr")
        os.kill(a.proc.pid, signal.SIGSTOP)     # (a consistent copy: no commit under it)
        try:
            earlier = _catalogue_objects(io)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        a.ok("create", "w 16M")
        a.ok("sync", "all")
        a.stop()
        for name in {o.key for o in io.list_objects()} - set(earlier):
            if name.startswith("catalogue.db"):
                io.remove_object(name)
        for name, (blob, xattrs) in earlier.items():
            io.write_full(name, blob)
            for k, v in xattrs.items():
                io.set_xattr(name, k, v)
    with pytest.raises(AssertionError, match="lost writes it had acknowledged") as e:
        a.start()
    msg = str(e.value)
    assert "--accept-stale" in msg and "another copy" not in msg, msg
    a.start("--accept-stale")
    assert "pack main: opened with --accept-stale although" in "\n".join(a.warnings) or \
        "opened with --accept-stale" in a.events(), a.warnings
    assert sorted(os.listdir(a.path("luns"))) == ["v"]      # as the catalogue was
    assert read_at(a.path("luns", "v"), 0, len(data)) == data
    a.ok("create", "w 16M")                                  # and it goes on
    a.stop()
    a.start()
    assert sorted(os.listdir(a.path("luns"))) == ["v", "w"]
    a.stop()


def test_a_catalogue_an_init_left_after_its_first_commit_is_made_again(ceph, pool,
                                                                       monkeypatch):
    """An init killed after its catalogue's first commit (packs and disks
    rows in it) and before array.json: the next init drops what it left
    and makes the catalogue again. Tables dropped with foreign keys on
    failed there (a parent before its children's rows: "FOREIGN KEY
    constraint failed", a traceback from `fusearray init`, seen in CI's
    killed-init test). No FUSE."""
    import time as _time
    from fusearray.catalogue import Catalogue, Changes, cluster_uri
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    uri = cluster_uri(pool, "fusearray-array.left")
    cat = Catalogue(uri, create=True)
    now = _time.time()
    cat.commit_blocking(Changes(meta={"format": 1, "uuid": "u1"},
                                packs_add=[("main", "single", now, [f"rados:{pool}"])],
                                disks=[("main", 0, f"rados:{pool}", "online", now)]))
    cat.close()
    cat = Catalogue(uri, create=True)       # (the next init)
    try:
        assert cat.packs() == [] and cat.meta().get("uuid") is None
    finally:
        cat.close()
