"""One mount at a time on a rados pack, with fencing (#17 point 3, for
packs): the mount takes the namespace's exclusive lease (store/rados.Lease:
a cls_lock lock with a duration, renewed; the clients recorded on the lease
object are blocklisted by whoever takes it next). Two daemons stand for two
hosts: each its own Ceph client (its own address and instance id) and its
own array directory, a copy of one array, both naming one pool namespace.
"""
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import threading
import time

import pytest

from conftest import Mount, cli, read_at, run, wait_for, write_synced

pytestmark = pytest.mark.mount

MiB = 1 << 20
LEASE = "4"                          # seconds: the tests' short lease


@pytest.fixture
def pool(rados_pool):       # (conftest: a fresh pool of the session's cluster)
    return rados_pool


def pool_digest(ceph, pool: str) -> dict:
    """{object: sha256 of its content} of the whole pool (every namespace)."""
    import rados
    out = {}
    with ceph.client().open_ioctx(pool) as io:
        io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
        keys = [(o.nspace, o.key) for o in io.list_objects()]
        for ns, key in keys:
            io.set_namespace(ns)
            size = io.stat(key)[0]
            out[(ns, key)] = hashlib.sha256(io.read(key, size) if size else b"").hexdigest()
    return out


def two_hosts(make_mount, ceph, pool) -> tuple[Mount, Mount]:
    """Array `a` on a rados pack with a LUN, and `b`, a copy of its
    directory (the same pack: the other host's view of it)."""
    a = make_mount("a").init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf)
    a.start("--lease", LEASE)
    a.ok("create", "v 16M")
    a.first = write_synced(a.path("luns", "v"), 8 * MiB)
    a.stop()
    b = make_mount("b")
    shutil.copytree(a.array, b.array, symlinks=True)
    os.unlink(os.path.join(b.array, "daemon.log"))
    return a, b


def test_a_second_mount_is_refused_while_the_lease_lives(make_mount, ceph, pool):
    a, b = two_hosts(make_mount, ceph, pool)
    a.start("--lease", LEASE)
    with pytest.raises(AssertionError, match="mount failed") as e:
        b.start("--lease", LEASE)
    msg = str(e.value)
    assert "is in use by client." in msg and a.array in msg and \
        f"pid {a.proc.pid}" in msg and "--break-lock" in msg, msg
    assert "Traceback" not in b.output()
    # long after the lease's length: still refused (the holder renews it)
    time.sleep(int(LEASE) * 2)
    with pytest.raises(AssertionError, match="is in use by"):
        b.start("--lease", LEASE)
    assert read_at(a.path("luns", "v"), 0, len(a.first)) == a.first
    write_synced(a.path("luns", "v"), MiB, off=8 * MiB)         # a writes on, unharmed
    a.ok("sync", "all")
    # a clean unmount gives the lease back; b's directory is now an older
    # copy (a committed since it was taken): refused, ESTALE, unless told
    a.stop()
    with pytest.raises(AssertionError, match="written since by another copy") as e:
        b.start("--lease", LEASE)
    assert "--accept-stale" in str(e.value) and a.array in str(e.value), e.value
    t0 = time.monotonic()
    b.start("--lease", LEASE, "--accept-stale")
    assert time.monotonic() - t0 < int(LEASE)       # at once
    assert "fenced" not in b.events()               # nobody to fence after a clean end
    b.stop()


def test_the_holder_killed_another_host_takes_over_after_the_lease(make_mount, ceph, pool):
    a, b = two_hosts(make_mount, ceph, pool)
    a.start("--lease", LEASE)
    a.kill9()
    t0 = time.monotonic()
    while True:
        try:        # (b's directory is a copy taken before a's mount: --accept-stale)
            b.start("--lease", LEASE, "--accept-stale")
            break
        except AssertionError as e:
            assert "is in use by" in str(e), e
            assert time.monotonic() - t0 < int(LEASE) + 5, "the lease did not run out"
            time.sleep(0.5)
    took = time.monotonic() - t0
    print(f"took over {took:.1f} s after the holder died (lease {LEASE} s)")
    assert took <= int(LEASE) + 5
    assert "fenced the earlier holder" in b.events()
    assert read_at(b.path("luns", "v"), 0, len(a.first)) == a.first
    b.stop()


@pytest.mark.daemon_errors(r"lease|fenced|ESHUTDOWN|shutdown|not stored|I/O error|EIO")
def test_a_stalled_holder_is_fenced_and_none_of_its_writes_reach_the_cluster(
        make_mount, ceph, pool):
    a, b = two_hosts(make_mount, ceph, pool)
    a.start("--lease", LEASE)
    a.ok("create", "w 8M")
    write_synced(a.path("luns", "w"), 4 * MiB)
    a.ok("sync", "all")
    os.kill(a.proc.pid, signal.SIGSTOP)          # the holder stalls (a frozen host)
    try:
        # takes over at once, fencing a; its directory is a copy older than
        # a's last commit (--accept-stale: what a stored since is dropped)
        b.start("--lease", LEASE, "--break-lock", "--accept-stale")
        ev = b.events()
        assert "fenced the earlier holder" in ev, ev
        assert read_at(b.path("luns", "v"), 0, len(a.first)) == a.first
        b.ok("snapshot", "v set=after")
        b.ok("sync", "all")
        before = pool_digest(ceph, pool)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    # a wakes up and writes: its fsync may be kept by its own intent log,
    # but nothing it does reaches the cluster
    fd = os.open(a.path("luns", "w"), os.O_WRONLY)
    try:
        for i in range(4):
            os.pwrite(fd, os.urandom(MiB), i * MiB)
        try:
            os.fsync(fd)
        except OSError as e:
            assert e.errno == errno.EIO
    finally:
        os.close(fd)
    err, reply = a.ctl("sync", "all")
    assert err == errno.EIO and "not stored" in reply["message"], reply
    wait_for(lambda: "lost its lease" in a.events(), 15, "a to learn it was fenced")
    wait_for(lambda: a.status()["packs"][0]["state"] == "failed", 15, "a's disk check")
    assert "fenced this daemon off the cluster" in a.events()
    assert pool_digest(ceph, pool) == before           # 0 bytes of a's reached it
    # b is unharmed and goes on
    write_synced(b.path("luns", "v"), MiB, off=9 * MiB)
    b.ok("sync", "all")
    assert pool_digest(ceph, pool) != before
    r = cli("umount", "--discard", a.mnt, check=False)
    assert r.returncode == 0, r.stderr
    a.proc.wait(timeout=60)
    a.proc = None
    b.stop()
    r = run([os.sys.executable, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "fsck"), b.array], check=False)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr


def test_twenty_kills_and_restarts_lose_no_fsyncd_byte(make_mount, ceph, pool):
    """The same array on the same host, SIGKILLed and mounted again 20
    times: the new daemon sees that the lease's holder was this array here
    (whose directory lock it now holds: so that daemon is dead), fences it
    and takes over at once, not after the lease; every fsync'd byte is
    there."""
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf)
    m.start("--lease", "30")
    m.ok("create", "v 32M")
    model = bytearray(32 * MiB)
    rng = random.Random(17)
    waits = []
    for cycle in range(20):
        for _ in range(3):
            off = rng.randrange(0, 32 * MiB - 300_000)
            model[off:off + 300_000] = write_synced(m.path("luns", "v"), 300_000, off)
        m.kill9()
        t0 = time.monotonic()
        m.start("--lease", "30")
        waits.append(time.monotonic() - t0)
        assert read_at(m.path("luns", "v")) == model, f"cycle {cycle}"
    print(f"mount after SIGKILL: max {max(waits):.2f} s, lease 30 s")
    assert max(waits) < 15              # never waited the lease out
    assert "fenced the earlier holder" in m.events()
    m.stop()


def test_mounts_racing_for_one_pack_exactly_one_wins(make_mount, ceph, pool):
    """Three copies of an array started at the same instant, each its own
    client: exactly one mounts, the others are refused naming a holder;
    four rounds, the winner unmounted cleanly between them."""
    a, b = two_hosts(make_mount, ceph, pool)
    c = make_mount("c")
    shutil.copytree(a.array, c.array, symlinks=True)
    os.unlink(os.path.join(c.array, "daemon.log"))
    mounts = [a, b, c]
    for rnd in range(4):
        errors: dict = {}

        def start(m):
            try:
                m.start("--lease", LEASE)
            except AssertionError as e:
                errors[m.array] = str(e)
        threads = [threading.Thread(target=start, args=(m,)) for m in mounts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        won = [m for m in mounts if m.proc is not None and os.path.ismount(m.mnt)]
        assert len(won) == 1, (rnd, [m.array for m in won], errors)
        # (a loser is named the holder, or told it was fenced by it: a
        # client on record may be about to lock, so the winner fences all)
        assert len(errors) == 2 and all(
            re.search(r"is in use by (client\.\d+ \(as|another mount, which fenced this)", e)
            for e in errors.values()), "\n".join(errors.values())
        assert read_at(won[0].path("luns", "v"), 0, len(a.first)) == a.first
        won[0].stop()
        for m in mounts:        # the copies kept in step (else the others are stale)
            if m is not won[0]:
                shutil.rmtree(m.array)
                shutil.copytree(won[0].array, m.array, symlinks=True)
                os.unlink(os.path.join(m.array, "daemon.log"))


def test_the_client_name_comes_from_CEPH_ARGS(make_mount, ceph, pool):
    """A mount connects as the client CEPH_ARGS names (`--id fusearray`),
    so a key with a pack's caps alone can serve instead of client.admin's:
    the mon sees that entity while the array is mounted, and a refused
    mount names it."""
    import json
    import subprocess
    from fusearray.store.rados import client_identity
    assert client_identity({"CEPH_ARGS": "--keyring /k --id fa"}) == {"rados_id": "fa"}
    assert client_identity({"CEPH_ARGS": "-n client.x"}) == {"name": "client.x"}
    assert client_identity({"CEPH_ARGS": "--id"}) == client_identity({}) == {}

    def entities():
        r = subprocess.run(["ceph", "--admin-daemon", str(ceph.dir / "run" / "mon.a.asok"),
                            "sessions"], capture_output=True, text=True, check=True)
        return {s.get("entity_name") for s in json.loads(r.stdout)}
    a, b = two_hosts(make_mount, ceph, pool)
    assert "client.fusearray" not in entities()
    a.start("--lease", LEASE, env={"CEPH_ARGS": "--id fusearray"})
    assert "client.fusearray" in entities()
    with pytest.raises(AssertionError, match=r"in use by client\.\d+ \(as client\.fusearray"):
        b.start("--lease", LEASE)
    a.stop()
    wait_for(lambda: "client.fusearray" not in entities(), 30, "the session to end")


@pytest.mark.array
def test_a_holder_that_died_before_naming_itself_is_known_by_its_own_record(ceph, pool):
    """A client locks the lease and dies before it writes the `holder`
    record (which still names the previous holder, elsewhere): the next
    mount of the same array on the same host finds the dead one by the
    record it made before locking (through the lock's lockers), so it
    takes over at once, fencing it, instead of waiting out the lease as if
    another host held it."""
    import json
    import subprocess
    import sys

    from fusearray.store.rados import LEASE_OBJECT, RadosMedium
    path = f"rados:{pool}/leasens"
    holder = {"host": "this-host", "pid": 1, "array": "/arrays/a"}
    child = subprocess.Popen([sys.executable, "-c", f"""
import json, sys, time
from fusearray.store.rados import LEASE_OBJECT, RadosMedium
m = RadosMedium({path!r}, {ceph.conf!r})
m.take_lease(30, {holder!r}, False)
_, io = m.lease_io()
io.set_xattr(LEASE_OBJECT, "holder", json.dumps({{"host": "elsewhere", "pid": 9,
             "array": "/other", "client": "client.1", "cookie": "gone"}}).encode())
print("locked", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    m = RadosMedium(path, ceph.conf)
    try:
        t0 = time.monotonic()
        fenced = m.take_lease(30, dict(holder, pid=2), False)
        assert fenced and time.monotonic() - t0 < 15, fenced     # (not the 30 s lease)
        _, io = m.lease_io()
        assert json.loads(io.get_xattr(LEASE_OBJECT, "holder"))["pid"] == 2
    finally:
        m.release_lease()


def test_an_older_copy_of_the_array_directory_is_refused_not_let_drop_newer_data(
        make_mount, ceph, pool):
    """Two copies of one array directory (two hosts) on one rados pack: b
    mounts, writes and commits; then a, whose copy is older, is refused
    (ESTALE, naming b's directory): opening it would have removed b's new
    segments from the pool as garbage. b's data is whole after that. With
    --accept-stale a opens (a warning says what is dropped), and then b's
    directory is the older one, refused in turn."""
    a, b = two_hosts(make_mount, ceph, pool)
    b.start("--lease", LEASE)
    b.ok("create", "w 8M")
    newer = write_synced(b.path("luns", "w"), 4 * MiB)
    b.stop()
    with pytest.raises(AssertionError, match="written since by another copy") as e:
        a.start("--lease", LEASE)
    assert b.array in str(e.value) and "Traceback" not in a.output(), e.value
    b.start("--lease", LEASE)
    assert read_at(b.path("luns", "w"), 0, len(newer)) == newer
    assert read_at(b.path("luns", "v"), 0, len(a.first)) == a.first
    b.stop()
    a.start("--lease", LEASE, "--accept-stale")
    assert "opened with --accept-stale" in a.events()
    assert read_at(a.path("luns", "v"), 0, len(a.first)) == a.first
    a.stop()
    with pytest.raises(AssertionError, match="written since by another copy"):
        b.start("--lease", LEASE)
    r = run([os.sys.executable, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "fsck"), a.array], check=False)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr
