"""The tests' Ceph cluster works for a RADOS pack backend: the session
fixture `ceph` (tests/conftest.py, tests/cephcluster.py) starts one
cluster, and the venv's `rados` module (Debian's python3-rados through the
venv's .pth, tools/setup.sh) does through it what such a backend needs:
whole and partial writes, reads at an offset, append, trunc, stat, remove,
listing by a name prefix, asynchronous writes; each test's pool is its own.
"""
import hashlib
import os
import threading

import pytest

# a cluster for the session, seconds of work per test: with the Array tier
# (no FUSE), not the fast `unit` core
pytestmark = pytest.mark.array


@pytest.fixture(scope="module")
def client(ceph):
    import rados
    c = rados.Rados(conffile=ceph.conf)
    c.connect(timeout=30)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def io(ceph, client):
    """An I/O context on a fresh pool of the test's own (deleted after)."""
    pool = ceph.new_pool()
    ioctx = client.open_ioctx(pool)
    try:
        yield ioctx
    finally:
        ioctx.close()
        ceph.drop_pool(pool)


def test_the_cluster_runs(ceph):
    assert os.path.isfile(ceph.conf)
    assert sorted(ceph.pids) == ["mon.a", "osd.0"]
    assert sorted(ceph.running()) == ["mon.a", "osd.0"]
    # ports picked free by tools/ceph-up: not a user's cluster's defaults,
    # not the OSD's range
    for port in (ceph.mon_port, ceph.mon_v2_port):
        assert port not in (6789, 3300) and not 6800 <= port <= 7300
    h = ceph.health()
    assert h["status"] == "HEALTH_OK", h


def test_write_and_read_at_an_offset(io):
    data = os.urandom(100_000)
    io.write_full("obj", data)
    assert io.read("obj", 1000, 5000) == data[5000:6000]
    assert io.read("obj", len(data)) == data
    # a read past the end is short; at the end, empty
    assert io.read("obj", 1000, len(data) - 10) == data[-10:]
    assert io.read("obj", 10, len(data)) == b""
    # a write in the middle replaces only its range
    io.write("obj", b"X" * 100, 50_000)
    got = io.read("obj", len(data))
    assert got == data[:50_000] + b"X" * 100 + data[50_100:]
    # write_full replaces the whole object
    io.write_full("obj", b"short")
    assert io.read("obj") == b"short"


def test_append_trunc_stat(io):
    import rados
    io.write_full("log", b"a" * 10)
    io.append("log", b"b" * 5)
    io.append("log", b"c" * 3)
    size, mtime = io.stat("log")                # mtime: a time.struct_time
    assert size == 18 and mtime.tm_year >= 2024
    assert io.read("log") == b"a" * 10 + b"b" * 5 + b"c" * 3
    io.trunc("log", 12)
    assert io.stat("log")[0] == 12
    assert io.read("log") == b"a" * 10 + b"bb"
    io.trunc("log", 20)                 # grows with zeroes
    assert io.read("log") == b"a" * 10 + b"bb" + bytes(8)
    with pytest.raises(rados.ObjectNotFound):
        io.stat("never-written")


def test_remove(io):
    import rados
    io.write_full("gone", b"data")
    io.remove_object("gone")
    with pytest.raises(rados.ObjectNotFound):
        io.stat("gone")
    with pytest.raises(rados.ObjectNotFound):
        io.read("gone")
    with pytest.raises(rados.ObjectNotFound):
        io.remove_object("gone")


def test_list_by_prefix(io):
    # librados lists a whole pool (or namespace); a prefix is a filter on
    # the client's side
    names = {f"pack/{i:04d}" for i in range(20)} | {f"index/{i}" for i in range(5)} | {"super"}
    for n in names:
        io.write_full(n, n.encode())
    assert {o.key for o in io.list_objects()} == names
    assert sorted(o.key for o in io.list_objects() if o.key.startswith("pack/")) \
        == sorted(n for n in names if n.startswith("pack/"))
    io.remove_object("pack/0003")
    assert "pack/0003" not in {o.key for o in io.list_objects()}


def test_aio_write_and_wait(io):
    blobs = {f"blk/{i}": os.urandom(64 * 1024 + i) for i in range(32)}
    done = []
    called = threading.Condition()

    def on_complete(completion):        # called in a librados thread
        with called:
            done.append(completion.get_return_value())
            called.notify_all()

    comps = [io.aio_write_full(name, data, oncomplete=on_complete)
             for name, data in blobs.items()]
    comps.append(io.aio_write("blk/0", b"Z" * 10, 100, oncomplete=on_complete))
    for c in comps:
        c.wait_for_complete()
        assert c.get_return_value() == 0
    io.aio_flush()
    # the callbacks run in librados' finisher thread, after the completion
    # is marked complete: wait_for_complete() may return before they ran
    with called:
        assert called.wait_for(lambda: len(done) == len(comps), timeout=30), done
        assert done == [0] * len(comps)
    blobs["blk/0"] = blobs["blk/0"][:100] + b"Z" * 10 + blobs["blk/0"][110:]
    for name, data in blobs.items():
        got = io.read(name, len(data) + 1)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name


def test_a_large_object(io):
    data = os.urandom(8 << 20)
    io.write_full("big", data)
    assert io.stat("big")[0] == len(data)
    got = b"".join(io.read("big", 1 << 20, off) for off in range(0, len(data), 1 << 20))
    assert got == data


def test_new_pools_are_isolated(ceph, client):
    import rados
    a, b = ceph.new_pool(), ceph.new_pool()
    # made by the fixture's own client: this one lists them once it has the
    # newest OSD map (list_pools() reads the map it has)
    client.wait_for_latest_osdmap()
    assert a != b and {a, b} <= set(client.list_pools())
    with client.open_ioctx(a) as ia, client.open_ioctx(b) as ib:
        ia.write_full("same-name", b"in a")
        ib.write_full("same-name", b"in b")
        ia.write_full("only-a", b"1")
        assert ia.read("same-name") == b"in a" and ib.read("same-name") == b"in b"
        assert {o.key for o in ib.list_objects()} == {"same-name"}
        with pytest.raises(rados.ObjectNotFound):
            ib.stat("only-a")
        ia.remove_object("same-name")
        assert ib.read("same-name") == b"in b"
    client.delete_pool(a)
    assert not client.pool_exists(a) and client.pool_exists(b)
    with client.open_ioctx(b) as ib:
        assert ib.read("same-name") == b"in b"
    client.delete_pool(b)
