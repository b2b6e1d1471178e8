"""The media (fusearray/store/media.py, rados.py) keep one contract: a
model-based conformance test applies the same random operations (seeded)
to a DirMedium on tmp_path, a RadosMedium on a fresh pool of the test
cluster (the session fixture `ceph`) and a plain model (name -> bytearray),
and every result must match the model's: the same bytes, the same counts,
the same FileNotFoundError / FileExistsError. Then what is RADOS's alone:
errors mapped to OSError with clear messages (missing pool, no conf, an
unreachable cluster), 8 threads writing and reading one medium at once,
status() and space(), namespaces that do not see each other, shutdown().

No FUSE. The DirMedium runs need nothing; the RADOS ones need the cluster
(skipped where Ceph cannot run, failed instead under FUSEARRAY_REQUIRE_CEPH=1).
"""
import errno
import random
import threading
import time

import pytest

from fusearray.store import rados as rmod
from fusearray.store.media import LABEL, DirMedium, medium_for, seg_name
from fusearray.store.rados import RadosMedium

NAMES = [seg_name(i) for i in range(1, 5)] + ["00000001.spare"]
SEEDS = range(8)


# ---- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _shutdown_connections():
    """The module's media share one connection per conf: closed at its end."""
    yield
    rmod.shutdown()


@pytest.fixture
def pool(ceph):
    """A fresh pool of the test's own, deleted after (memstore keeps data in RAM)."""
    name = ceph.new_pool()
    yield name
    ceph.drop_pool(name)


def dir_medium(tmp_path, sub="disk") -> DirMedium:
    m = DirMedium(str(tmp_path / sub))
    m.prepare()
    return m


def rados_medium(ceph, pool, namespace="disk0") -> RadosMedium:
    m = medium_for(f"rados:{pool}/{namespace}", ceph.conf)
    assert isinstance(m, RadosMedium)
    m.prepare()
    return m


@pytest.fixture(params=["dir", pytest.param("rados", marks=pytest.mark.array)])
def medium(request, tmp_path):
    """Either kind of medium, prepared and empty."""
    if request.param == "dir":
        return dir_medium(tmp_path)
    return rados_medium(request.getfixturevalue("ceph"), request.getfixturevalue("pool"))


# ---- the model --------------------------------------------------------------------------
class Model:
    """What a medium should hold: name -> bytes, and the label."""

    kind = "model"

    def __init__(self):
        self.files: dict[str, bytearray] = {}
        self.label: bytes | None = None

    def need(self, name):
        if name not in self.files:
            raise FileNotFoundError(errno.ENOENT, name)
        return self.files[name]


class Target:
    """A medium under test and the handles it has open (name -> handle)."""

    def __init__(self, m):
        self.m = m
        self.handles: dict = {}

    def close_all(self):
        for h in self.handles.values():
            self.m.close(h)
        self.handles.clear()


def outcome(fn):
    """("ok", value) or ("raise", the exception's class) for the two a
    medium must raise alike; anything else fails the test."""
    try:
        return ("ok", fn())
    except (FileNotFoundError, FileExistsError) as e:
        return ("raise", type(e))


def _buffers(rng, sizes):
    out = []
    for n in sizes:
        b = bytearray(b"\xee" * n)
        out.append(memoryview(b) if rng.random() < 0.5 else b)
    return out


def _iov(rng):
    pieces = []
    for _ in range(rng.randint(1, 4)):
        n = rng.choice([0, 1, rng.randint(1, 4096), rng.randint(1, 70_000)])
        data = rng.randbytes(n)
        pieces.append(rng.choice([bytes, bytearray, memoryview])(data))
    return pieces


def gen_op(rng, model: Model, open_names: list[str]):
    """The next operation: (name, args); chosen from what the model holds
    (the store's discipline: I/O on open handles of existing files)."""
    kinds = ["create", "open", "open_or_create", "file_size", "exists", "unlink", "names",
             "write_label", "read_label", "allocated", "close"]
    if open_names:
        kinds += ["pwritev"] * 4 + ["preadv"] * 4 + ["truncate", "size"]
    kind = rng.choice(kinds)
    name = rng.choice(NAMES)
    if kind in ("pwritev", "preadv", "truncate", "size", "close") and open_names:
        name = rng.choice(open_names)
    cur = len(model.files.get(name, b""))
    if kind == "pwritev":
        off = rng.choice([0, cur, rng.randint(0, cur + 1), rng.randint(0, cur + 100_000)])
        return kind, (name, _iov(rng), off)
    if kind == "preadv":
        sizes = [rng.choice([0, 1, rng.randint(1, 5000), rng.randint(1, 60_000)])
                 for _ in range(rng.randint(1, 4))]
        off = rng.choice([0, cur, max(cur - 10, 0), rng.randint(0, cur + 1),
                          rng.randint(0, cur + 100_000)])
        return kind, (name, sizes, off)
    if kind == "truncate":
        size = rng.choice([0, cur // 2, rng.randint(0, cur + 1), cur + rng.randint(1, 90_000)])
        return kind, (name, size)
    if kind == "write_label":
        return kind, (rng.randbytes(rng.randint(0, 300)),)
    return kind, (name,)


def apply_model(model: Model, open_names: list[str], kind, args):
    """The expected outcome, and the model changed accordingly."""
    def run():
        if kind == "create":
            name, = args
            if name in model.files:
                raise FileExistsError(errno.EEXIST, name)
            model.files[name] = bytearray()
            open_names.append(name)
            return None
        if kind in ("open", "open_or_create"):
            name, = args
            if kind == "open":
                model.need(name)
            model.files.setdefault(name, bytearray())
            if name not in open_names:
                open_names.append(name)
            return None
        if kind == "close":
            if args[0] in open_names:
                open_names.remove(args[0])
            return None
        if kind == "pwritev":
            name, iov, off = args
            f = model.files[name]
            data = b"".join(bytes(p) for p in iov)
            if data and len(f) < off + len(data):      # writing nothing grows nothing
                f.extend(bytes(off + len(data) - len(f)))
            f[off:off + len(data)] = data
            return None
        if kind == "preadv":
            name, sizes, off = args
            f = model.files[name]
            got = bytes(f[off:off + sum(sizes)])
            bufs, pos = [], 0
            for n in sizes:
                part = got[pos:pos + n]
                bufs.append(part + b"\xee" * (n - len(part)))
                pos += n
            return len(got), bufs
        if kind == "truncate":
            name, size = args
            f = model.files[name]
            if size < len(f):
                del f[size:]
            else:
                f.extend(bytes(size - len(f)))
            return None
        if kind in ("size", "file_size"):
            return len(model.need(args[0]))
        if kind == "allocated":
            model.need(args[0])
            return None
        if kind == "exists":
            return args[0] in model.files
        if kind == "unlink":
            name, = args
            if name in open_names:
                open_names.remove(name)
            model.need(name)
            del model.files[name]
            return None
        if kind == "names":
            return sorted(model.files)
        if kind == "write_label":
            model.label = bytes(args[0])
            return None
        if kind == "read_label":
            if model.label is None:
                raise FileNotFoundError(errno.ENOENT, LABEL)
            return model.label
        raise AssertionError(kind)
    return outcome(run)


def apply_medium(t: Target, kind, args):
    """The same operation on a medium (through its handles)."""
    m = t.m

    def run():
        if kind == "create":
            t.handles[args[0]] = m.open(args[0], create=True)
            return None
        if kind in ("open", "open_or_create"):
            name, = args
            h = m.open(name) if kind == "open" else m.open_or_create(name)
            old = t.handles.pop(name, None)
            if old is not None:
                m.close(old)
            t.handles[name] = h
            return None
        if kind == "close":
            h = t.handles.pop(args[0], None)
            if h is not None:
                m.close(h)
            return None
        if kind == "pwritev":
            name, iov, off = args
            assert m.pwritev(t.handles[name], iov, off) is None
            return None
        if kind == "preadv":
            name, sizes, off = args
            bufs = _buffers(random.Random(0), sizes)
            n = m.preadv(t.handles[name], bufs, off)
            return n, [bytes(b) for b in bufs]
        if kind == "truncate":
            name, size = args
            m.truncate(t.handles[name], size)
            return None
        if kind == "size":
            return m.size(t.handles[args[0]])
        if kind == "file_size":
            return m.file_size(args[0])
        if kind == "allocated":
            a = m.allocated(args[0])
            assert isinstance(a, int) and a >= 0
            if m.kind == "rados":
                assert a == m.file_size(args[0])
            return None
        if kind == "exists":
            return m.exists(args[0])
        if kind == "unlink":
            h = t.handles.pop(args[0], None)     # the store closes before it unlinks
            if h is not None:
                m.close(h)
            m.unlink(args[0])
            return None
        if kind == "names":
            return sorted(m.names())
        if kind == "write_label":
            m.write_label(args[0])
            return None
        if kind == "read_label":
            return m.read_label()
        raise AssertionError(kind)
    return outcome(run)


def _short(x, n=300):
    r = repr(x)
    return r if len(r) <= n else r[:n] + f"...({len(r)} chars)"


def run_model(seed: int, media: list, steps: int = 250) -> None:
    rng = random.Random(seed)
    model, open_names = Model(), []
    targets = [Target(m) for m in media]
    log = []
    try:
        for step in range(steps):
            kind, args = gen_op(rng, model, open_names)
            log.append(f"{step}: {kind}{_short(args, 120)}")
            want = apply_model(model, open_names, kind, args)
            for t in targets:
                got = apply_medium(t, kind, args)
                assert got == want, (f"seed {seed}, {t.m.kind} medium {t.m}, step {step}: "
                                     f"{kind} gave {_short(got)}, the model {_short(want)}\n"
                                     + "\n".join(log[-15:]))
        # at the end: every file whole, byte for byte, and the listing
        for t in targets:
            assert sorted(t.m.names()) == sorted(model.files), t.m.kind
            for name, data in model.files.items():
                assert t.m.file_size(name) == len(data), (t.m.kind, name)
                h = t.m.open(name)
                buf = bytearray(len(data) + 7)
                assert t.m.preadv(h, [buf], 0) == len(data)
                assert buf[:len(data)] == data, (t.m.kind, name)
                t.m.close(h)
    finally:
        for t in targets:
            t.close_all()


# ---- conformance ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_dir_medium_follows_the_model(seed, tmp_path):
    """The host-directory medium alone (no cluster needed)."""
    run_model(seed, [dir_medium(tmp_path)])


@pytest.mark.array
@pytest.mark.parametrize("seed", SEEDS)
def test_dir_and_rados_media_follow_the_model(seed, tmp_path, ceph, pool, monkeypatch):
    """Both media in lockstep with the model: the same operations, the same
    results and errors. Odd seeds cut writes and reads into pieces of odd
    sizes (in flight at once, as those over 4 MiB are)."""
    if seed % 2:
        monkeypatch.setattr(rmod, "WRITE_CHUNK", 997)
        monkeypatch.setattr(rmod, "READ_CHUNK", 1499)
    d = dir_medium(tmp_path)
    r = rados_medium(ceph, pool, f"seed{seed}")
    run_model(seed, [d, r])
    assert set(r.names()) == set(d.names())


def test_the_model_run_sees_a_divergence(tmp_path):
    """The harness catches a medium that reads wrong: not a vacuous check."""
    class Liar(DirMedium):
        def preadv(self, h, bufs, off):
            n = super().preadv(h, bufs, off)
            if n and len(bufs[0]):
                bufs[0][0] ^= 1
            return n
    m = Liar(str(tmp_path / "liar"))
    m.prepare()
    with pytest.raises(AssertionError, match="preadv"):
        run_model(1, [m], steps=400)


# ---- RADOS specifics ------------------------------------------------------------------
@pytest.mark.array
def test_the_rados_medium_attributes(ceph, pool):
    m = RadosMedium(f"rados:{pool}/ns/with/slashes", ceph.conf)
    assert (m.kind, m.fds, m.renames) == ("rados", False, False)
    assert (m.pool, m.namespace) == (pool, "ns/with/slashes")
    assert m.path == f"rados:{pool}/ns/with/slashes"
    assert str(m) == m.path
    assert m.present() and not m.in_memory()
    m.prepare()
    # the durability no-ops
    h = m.open_or_create("00000001.seg")
    m.pwritev(h, [b"x" * 10], 0)
    assert m.fsync(h) is None and m.sync_dir() is None and m.close(h) is None
    with pytest.raises(OSError) as e:
        m.rename("00000001.seg", "00000002.seg")
    assert e.value.errno == errno.EOPNOTSUPP and m.path in str(e.value)
    # the default namespace: rados:POOL
    d = RadosMedium(f"rados:{pool}", ceph.conf)
    assert (d.pool, d.namespace) == (pool, "")


@pytest.mark.array
def test_namespaces_do_not_see_each_other(ceph, pool):
    a, b = rados_medium(ceph, pool, "a"), rados_medium(ceph, pool, "b")
    a.pwritev(a.open("00000001.seg", create=True), [b"in a"], 0)
    a.write_label(b"label a")
    b.open("00000001.seg", create=True)          # the same name, another object
    b.pwritev(b.open("00000002.seg", create=True), [b"in b"], 0)
    assert sorted(a.names()) == ["00000001.seg"]             # the label left out
    assert sorted(b.names()) == ["00000001.seg", "00000002.seg"]
    assert a.file_size("00000001.seg") == 4 and b.file_size("00000001.seg") == 0
    with pytest.raises(FileNotFoundError):
        b.read_label()
    assert a.read_label() == b"label a"
    b.unlink("00000001.seg")
    assert a.exists("00000001.seg") and not b.exists("00000001.seg")
    default = RadosMedium(f"rados:{pool}", ceph.conf)      # the pool's default namespace
    assert default.names() == [] and not default.exists("00000002.seg")


@pytest.mark.array
def test_big_writes_and_reads(ceph, pool):
    """A 16 MiB write of three pieces at 1 MiB of an empty object (sent as
    4 MiB pieces; the hole reads as zeros), read back by a 24 MiB preadv
    into three buffers (4 MiB pieces, short at the object's end)."""
    m = rados_medium(ceph, pool)
    rng = random.Random(7)
    data = rng.randbytes(16 << 20)
    h = m.open("00000001.seg", create=True)
    mv = memoryview(data)
    m.pwritev(h, [mv[:1], bytearray(mv[1:5 << 20]), mv[5 << 20:]], 1 << 20)
    assert m.size(h) == (17 << 20)
    bufs = [bytearray(3 << 20), memoryview(bytearray(1 << 20)), bytearray(20 << 20)]
    assert m.preadv(h, bufs, 0) == 17 << 20
    got = b"".join(bytes(b) for b in bufs)
    assert got[:1 << 20] == bytes(1 << 20) and got[1 << 20:17 << 20] == data
    assert m.preadv(h, [bytearray(10)], 17 << 20) == 0
    m.truncate(h, 100)
    assert m.preadv(h, [bytearray(1000)], 0) == 100


@pytest.mark.array
@pytest.mark.parametrize("size", [8, 8 << 20])
def test_a_write_the_osd_refuses(ceph, pool, size):
    """Past the OSD's largest object (osd max object size, 128 MiB): EFBIG,
    as one write and as pieces in flight; nothing written."""
    m = rados_medium(ceph, pool)
    h = m.open("00000001.seg", create=True)
    with pytest.raises(OSError) as e:
        m.pwritev(h, [b"y" * size], 129 << 20)
    assert e.value.errno == errno.EFBIG, e.value
    assert m.path in str(e.value) and "00000001.seg" in str(e.value)
    assert "too large" in str(e.value)
    assert m.size(h) == 0


@pytest.mark.array
def test_missing_objects_and_existing_ones(ceph, pool, monkeypatch):
    m = rados_medium(ceph, pool)
    monkeypatch.setattr(rmod, "READ_CHUNK", 100)     # reads over 100 bytes: in pieces
    for fn in (lambda: m.open("nope"), lambda: m.file_size("nope"), lambda: m.size("nope"),
               lambda: m.allocated("nope"), lambda: m.unlink("nope"), m.read_label,
               lambda: m.preadv("nope", [bytearray(10)], 0),
               lambda: m.preadv("nope", [bytearray(1000)], 0)):
        with pytest.raises(FileNotFoundError) as e:
            fn()
        assert e.value.errno == errno.ENOENT
        assert m.path in str(e.value)
    assert not m.exists("nope")
    m.open("there", create=True)
    with pytest.raises(FileExistsError) as e:
        m.open("there", create=True)
    assert e.value.errno == errno.EEXIST and "there" in str(e.value) and m.path in str(e.value)
    m.pwritev("there", [b"keep"], 0)
    m.open_or_create("there")                   # does not empty it
    assert m.file_size("there") == 4


@pytest.mark.array
def test_a_missing_pool(ceph):
    m = RadosMedium("rados:no-such-pool/ns", ceph.conf)
    assert m.present() is False
    with pytest.raises(FileNotFoundError) as e:
        m.prepare()
    assert e.value.errno == errno.ENOENT
    msg = str(e.value)
    assert "no-such-pool" in msg and ceph.conf in msg and "does not exist" in msg
    for fn in (m.names, lambda: m.open("x"), m.read_label):
        with pytest.raises(FileNotFoundError, match="pool no-such-pool does not exist"):
            fn()


def test_no_ceph_conf(monkeypatch):
    monkeypatch.delenv("CEPH_CONF", raising=False)
    with pytest.raises(OSError) as e:
        RadosMedium("rados:pool/ns")
    assert e.value.errno == errno.EINVAL
    assert "CEPH_CONF" in str(e.value) and "rados:pool/ns" in str(e.value)
    monkeypatch.setenv("CEPH_CONF", "/some/ceph.conf")
    assert RadosMedium("rados:pool/ns").conf == "/some/ceph.conf"
    assert RadosMedium("rados:pool/ns", "/other.conf").conf == "/other.conf"
    for bad in ("rados:", "rados:/ns", "pool/ns"):
        with pytest.raises(OSError) as e:
            RadosMedium(bad, "/x.conf")
        assert e.value.errno == errno.EINVAL


def test_librados_errors_become_oserrors():
    """Each librados exception maps to its OSError, naming where."""
    from cephcluster import require_ceph
    require_ceph()
    import rados
    cases = [(rados.ObjectNotFound("m", errno=2), errno.ENOENT, FileNotFoundError),
             (rados.ObjectExists("m", errno=17), errno.EEXIST, FileExistsError),
             (rados.TimedOut("m", errno=110), errno.ETIMEDOUT, TimeoutError),
             (rados.NoSpace("m", errno=28), errno.ENOSPC, OSError),
             (rados.PermissionError("m", errno=1), errno.EACCES, PermissionError),
             (rados.PermissionDeniedError("m", errno=13), errno.EACCES, PermissionError),
             (rados.IOError("m", errno=5), errno.EIO, OSError),
             (rados.InvalidArgumentError("m", errno=22), errno.EINVAL, OSError),
             (rados.OSError("m", errno=-27), errno.EFBIG, OSError),      # negative: its abs
             (rados.IoctxStateError("m"), errno.EIO, OSError),           # no errno
             (rados.Error("m", errno=99999), errno.EIO, OSError)]        # no such errno
    for exc, code, cls in cases:
        e = rmod._oserror(exc, "rados:p/n: writing 00000001.seg")
        assert type(e) is not rados.Error and isinstance(e, cls), (exc, e)
        assert e.errno == code, (exc, e)
        assert e.strerror.startswith("rados:p/n: writing 00000001.seg: "), e.strerror
        assert "[errno" not in e.strerror


@pytest.mark.array
def test_an_unreachable_cluster_fails_fast(tmp_path, monkeypatch):
    """A cluster that does not answer: status() says so within a few
    seconds, an operation fails with ETIMEDOUT naming the medium, and the
    next ones fail at once rather than waiting again."""
    from cephcluster import require_ceph
    require_ceph()
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\nauth client required = none\n")
    monkeypatch.setattr(rmod, "CLIENT_TIMEOUT", 2)
    m = RadosMedium("rados:p/ns", str(conf))
    t = time.monotonic()
    st = m.status()
    assert time.monotonic() - t < rmod.STATUS_TIMEOUT + 1
    assert st["pool"] == "p" and st["namespace"] == "ns" and st["conf"] == str(conf)
    assert st["health"].startswith("unreachable: "), st
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        m.names()
    assert e.value.errno == errno.ETIMEDOUT and str(m) in str(e.value), e.value
    with pytest.raises(OSError) as e:
        m.present()
    assert e.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t < 1, "failed at once after a failed connect"


@pytest.mark.array
def test_a_status_that_hangs_is_cut_short(ceph, pool, monkeypatch):
    """status() returns within STATUS_TIMEOUT even when the mon does not
    answer (the binding ignores mon_command's own timeout)."""
    m = rados_medium(ceph, pool)
    assert m.status()["health"].startswith("HEALTH_")
    release = threading.Event()
    real = rmod._mon

    def stuck(cluster, cmd):
        if cmd["prefix"] == "health":
            release.wait(30)
        return real(cluster, cmd)
    monkeypatch.setattr(rmod, "_mon", stuck)
    monkeypatch.setattr(rmod, "STATUS_TIMEOUT", 0.5)
    try:
        t = time.monotonic()
        st = m.status()
        assert time.monotonic() - t < 2
        assert st["health"].startswith("unreachable: no answer"), st
    finally:
        release.set()


@pytest.mark.array
def test_status_and_space(ceph, pool):
    m = rados_medium(ceph, pool, "st")
    st = m.status()
    assert st == {"pool": pool, "namespace": "st", "conf": ceph.conf,
                  "health": ceph.health()["status"]}
    assert st["health"].startswith("HEALTH_")
    cap, avail = m.space()
    # memstore's capacity (the fixture's OSD_BYTES) less the full ratio's reserve
    assert 0 < avail <= cap, (cap, avail)
    assert m.space() == (cap, avail)             # cached


@pytest.mark.array
def test_space_from_a_mgr_report(ceph, pool, monkeypatch):
    """With a mgr, the mon's df has the pool's max_avail (replicas and the
    full ratio counted): capacity is what the pool stores plus that; a pool
    the report does not have yet gets the raw totals."""
    import json
    other = ceph.new_pool()
    df = {"stats": {"total_bytes": 3000, "total_avail_bytes": 2000},
          "pools": [{"name": pool, "stats": {"stored": 100, "max_avail": 900}}]}
    real = rmod._mon
    monkeypatch.setattr(rmod, "_mon", lambda cl, cmd: json.dumps(df).encode()
                        if cmd["prefix"] == "df" else real(cl, cmd))
    assert rados_medium(ceph, pool, "sp").space() == (1000, 900)
    assert rados_medium(ceph, other, "sp").space() == (3000, 2000)
    ceph.drop_pool(other)


@pytest.mark.array
def test_shutdown_and_use_again(ceph, pool):
    m = rados_medium(ceph, pool)
    m.pwritev(m.open_or_create("a"), [b"before"], 0)
    rmod.shutdown()
    rmod.shutdown()                              # twice is fine
    assert m.file_size("a") == 6                 # connects again
    buf = bytearray(6)
    assert m.preadv("a", [buf], 0) == 6 and buf == b"before"


@pytest.mark.parametrize("threads", [8])
def test_eight_threads_on_one_medium(medium, threads, monkeypatch):
    """8 threads write and read at once: each its own ranges of two shared
    objects and an object of its own, random sizes; every read sees what
    that thread wrote, and at the end the objects hold all of it. (RADOS:
    I/O over 100 000 bytes goes as pieces in flight at once, so both ways
    run side by side.)"""
    monkeypatch.setattr(rmod, "WRITE_CHUNK", 100_000)
    monkeypatch.setattr(rmod, "READ_CHUNK", 100_000)
    region = 1 << 20
    errors = []
    for name in ("00000001.seg", "00000002.seg"):
        medium.close(medium.open(name, create=True))
    expect: dict[str, dict[int, bytes]] = {}
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(t):
        try:
            rng = random.Random(t)
            own = seg_name(100 + t)
            h_own = medium.open(own, create=True)
            hs = {n: medium.open(n) for n in ("00000001.seg", "00000002.seg")}
            hs[own] = h_own
            start.wait()
            for i in range(24):
                name = rng.choice(list(hs))
                base = 0 if name == own else t * region
                n = rng.randint(1, region // 2)
                off = base + rng.randint(0, region - n)
                data = rng.randbytes(n)
                cut = rng.randint(0, n)
                medium.pwritev(hs[name], [data[:cut], bytearray(data[cut:])], off)
                bufs = [bytearray(cut), memoryview(bytearray(n - cut))]
                got = medium.preadv(hs[name], bufs, off)
                assert got == n and b"".join(bytes(b) for b in bufs) == data, (t, i, name)
                with lock:
                    expect.setdefault(name, {})[off] = data
            for h in hs.values():
                medium.close(h)
        except BaseException as e:      # noqa: BLE001  (reported by the main thread)
            errors.append((t, e))
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for x in ts:
        x.start()
    for x in ts:
        x.join(120)
    assert not any(x.is_alive() for x in ts)
    assert not errors, errors
    # overlapping writes of one thread: replay in order is not known, so
    # check the ranges no later write touched
    for name, writes in expect.items():
        h = medium.open(name)
        for off, data in writes.items():
            buf = bytearray(len(data))
            assert medium.preadv(h, [buf], off) == len(data)
            others = [(o, len(d)) for o, d in writes.items() if o != off]
            for i in range(0, len(data), 4096):
                if not any(o <= off + i < o + n for o, n in others):
                    assert buf[i] == data[i], (name, off, i)
        medium.close(h)
    assert len(medium.names()) == 2 + threads


def test_the_vfs_ceph_args_never_time_an_osd_op_out(monkeypatch):
    """CEPH_ARGS while a Ceph client is made (rados.ceph_args_for_vfs): the
    user's, with any OSD-op timeout, in either spelling, replaced by none
    (Ceph's SQLite VFS reports a timed-out write as durable); the user's
    again afterwards, for what the process starts."""
    v = rmod.vfs_ceph_args
    assert v("") == "--rados_osd_op_timeout=0"
    assert v("--id fa --rados_osd_op_timeout=60 -k /k") == "--id fa -k /k --rados_osd_op_timeout=0"
    assert v("--rados-osd-op-timeout 5 --id fa") == "--id fa --rados_osd_op_timeout=0"
    assert v(v("--id fa")) == "--id fa --rados_osd_op_timeout=0"
    monkeypatch.setenv("CEPH_ARGS", "--id fa --rados_osd_op_timeout 9")
    import os
    with rmod.ceph_args_for_vfs():
        assert os.environ["CEPH_ARGS"] == "--id fa --rados_osd_op_timeout=0"
    assert os.environ["CEPH_ARGS"] == "--id fa --rados_osd_op_timeout 9"
    monkeypatch.delenv("CEPH_ARGS")
    with pytest.raises(RuntimeError):
        with rmod.ceph_args_for_vfs():
            assert os.environ["CEPH_ARGS"] == "--rados_osd_op_timeout=0"
            raise RuntimeError
    assert "CEPH_ARGS" not in os.environ


def test_the_vfs_ceph_args_from_two_threads_at_once_leave_the_users(monkeypatch):
    """Two clients made at once in two worker threads: CEPH_ARGS is the
    user's again after both (without the lock the second saved the first's
    value as the user's and put it back last)."""
    import os
    monkeypatch.setenv("CEPH_ARGS", "--id fa")
    inside = threading.Event()

    def first():
        with rmod.ceph_args_for_vfs():
            inside.set()
            time.sleep(0.3)
    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with rmod.ceph_args_for_vfs():
        time.sleep(0.6)         # (ends after the first: it puts back what it saw)
    t.join()
    assert os.environ["CEPH_ARGS"] == "--id fa"
