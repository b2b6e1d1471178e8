"""A pack on a disk that fails on command (tools/faultdisk.py): EIO and
ENOSPC on writes, short writes, failed fsyncs (with the written data lost,
as Linux may), failed directory fsyncs and read errors, at chosen or random
points, under a generated workload on a LUN. Every fsync that returned 0 is
checked after SIGKILL, a power cut of the disk (what it holds but never
fsynced is taken back) and a restart: each block reads as its content at
the last good fsync or as one written after it, never anything else, and
never older than the last good fsync.

The pack-fault tests mount with `--fsync commit`: every fsync is a full
commit, so the fsync that meets a pack fault answers for it. With the
intent log (the default) an fsync writes the log instead and the pack's
faults surface at the background commit: the log-mode tests at the end put
the log on the fault disk too and check the same promise with faults in
the log, in the pack's commits behind it, and power cuts of both.

The long run is tools/faultrun (more seeds, longer, bigger)."""
import errno
import hashlib
import mmap
import os
import random
import sys
from pathlib import Path

import pytest

from conftest import Mount, drop_caches, require_fuse, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from faultdisk import FaultDisk  # noqa: E402

MiB = 1 << 20
BS = 64 << 10           # the LUN's block size (the array's default)


def _h(b) -> bytes:
    return hashlib.blake2b(b, digest_size=16).digest()


class Rig:
    """A fault disk and an array whose pack `main` lives on it; with
    `fsync="log"` the intent log lives on it too (`FDISK/logs`), else the
    array is mounted `--fsync commit`."""

    def __init__(self, base: Path, layout: str = "single", ndisks: int = 1,
                 fsync: str = "commit"):
        self.base = base
        self.fd = FaultDisk(base / "backing", base / "fdisk", log=str(base / "faultdisk.out"))
        self.disks = [str(base / "fdisk" / f"d{i}") for i in range(ndisks)]
        self.layout = layout
        self.m = Mount(base)
        self.crashes = 0
        self.fsync = fsync
        self.opts = ("--fsync", "commit") if fsync == "commit" else ()

    def start(self, cache_size=None):
        self.fd.start()
        self.m.cache_size = cache_size
        init = ["--pack", f"main={self.layout}:{','.join(self.disks)}"]
        if self.fsync == "log":
            os.makedirs(self.base / "fdisk" / "logs")
            init += ["--log", str(self.base / "fdisk" / "logs")]
        self.m.init(*init)
        self.m.start(*self.opts)
        return self

    def close(self):
        try:
            self.m.close()
        finally:
            self.fd.stop()

    def restart(self, power_cut=True):
        """SIGKILL the daemon, cut the disk's power (unsynced data lost),
        clear the faults, mount again."""
        self.m.kill9()
        if power_cut:
            self.fd.crash()
        else:
            self.fd.clear()
        self.crashes += 1
        self.m.start(*self.opts)

    def injected(self) -> int:
        return sum(self.fd.report()["injected"].values())


@pytest.fixture
def rig(tmp_path):
    require_fuse()
    made = []

    def make(layout="single", ndisks=1, cache_size=None, fsync="commit"):
        r = Rig(tmp_path / f"r{len(made)}", layout, ndisks, fsync)
        made.append(r)
        return r.start(cache_size)
    try:
        yield make
    finally:
        for r in made:
            r.close()


class Workload:
    """Random writes to a LUN through the mount, fsyncs and a model.

    `cur` is what a read must return now; `durable` what the last fsync
    that returned 0 covered; `later[b]` the hashes of block b's contents
    written since then (any may be what a crash leaves)."""

    def __init__(self, rig: Rig, rng: random.Random, size: int, lun="l0"):
        self.rig, self.m, self.rng, self.size, self.lun = rig, rig.m, rng, size, lun
        self.m.ok("create", f"{lun} {size}")
        self.cur = bytearray(size)
        self.durable = bytes(size)
        self.later: dict[int, set] = {}
        self.ev_mark = len(self.m.events().splitlines())
        self.stats = dict(ops=0, writes=0, write_errors=0, fsyncs=0, fsync_acked=0,
                          fsync_errors=0, faults=0, crashes=0, bytes_checked=0,
                          bytes_lost=0)
        self._open()

    def _open(self):
        p = self.m.path("luns", self.lun)
        self.fd = os.open(p, os.O_RDWR)
        self.dfd = os.open(p, os.O_RDWR | os.O_DIRECT)

    def _close(self):
        for f in (self.fd, self.dfd):
            try:
                os.close(f)
            except OSError:
                pass

    def write(self, off=None, n=None, direct=None):
        rng = self.rng
        direct = rng.random() < 0.4 if direct is None else direct
        if n is None:
            n = rng.choice([rng.randrange(1, 8192), rng.randrange(1, 3 * BS),
                            rng.randrange(1, 1 * MiB)])
        if off is None:
            off = rng.randrange(0, self.size - 1)
        if direct:
            off, n = off // 4096 * 4096, max(n // 4096, 1) * 4096
        n = min(n, self.size - off)
        data = rng.randbytes(n)
        self.stats["ops"] += 1
        self.stats["writes"] += 1
        try:
            if direct:
                buf = mmap.mmap(-1, n)
                buf[:] = data
                got = os.pwrite(self.dfd, buf, off)
                buf.close()
            else:
                got = os.pwrite(self.fd, data, off)
        except OSError as e:
            self.stats["write_errors"] += 1
            self._reread(off, n)       # what the array holds now (maybe part of it)
            return e.errno
        assert got == n, f"short write to the LUN: {got} of {n}"
        self.cur[off:off + n] = data
        self._note(off, n)
        return 0

    def _note(self, off, n):
        for b in range(off // BS, (off + n - 1) // BS + 1):
            self.later.setdefault(b, set()).add(_h(self.cur[b * BS:(b + 1) * BS]))

    def _reread(self, off, n):
        """After a failed write: what the array holds now (all, some or
        none of it), block by block; a block that reads EIO (lost data)
        is left as it was."""
        for b in range(off // BS, (off + n - 1) // BS + 1):
            try:
                self.cur[b * BS:(b + 1) * BS] = os.pread(self.fd, BS, b * BS)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
            self._note(b * BS, BS)

    def fsync(self):
        self.stats["ops"] += 1
        self.stats["fsyncs"] += 1
        try:
            (os.fsync if self.rng.random() < 0.5 else os.fdatasync)(self.fd)
        except OSError as e:
            self.stats["fsync_errors"] += 1
            return e.errno
        self.stats["fsync_acked"] += 1
        self.durable = bytes(self.cur)
        self.later = {}
        return 0

    def check_now(self, what, lost_ok=False):
        """Reads return the last written bytes (running, no crash); with
        `lost_ok` (the array said it lost writes) a block may fail with
        EIO instead, never read other bytes. Returns the blocks that did."""
        eio = []
        for b in range(self.size // BS):
            try:
                got = os.pread(self.fd, BS, b * BS)
            except OSError as e:
                if not lost_ok or e.errno != errno.EIO:
                    raise AssertionError(f"{what}: reading block {b}: {e}") from None
                eio.append(b)
                continue
            assert got == self.cur[b * BS:(b + 1) * BS], \
                f"{what}: block {b} reads other bytes than written"
            self.stats["bytes_checked"] += BS
        return eio

    def lost(self) -> bool:
        """Did the array say, since the last restart, that it lost writes
        (a failed fsync that took unsynced data with it)?"""
        return any("fsync fails from now on" in l
                   for l in self.m.events().splitlines()[self.ev_mark:])

    def crash_and_check(self, what, power_cut=True):
        self._close()
        self.rig.restart(power_cut)
        self.stats["crashes"] += 1
        self._open()
        got = _read_all(self.fd, self.size)
        bad = []
        for b in range(self.size // BS):
            blk = got[b * BS:(b + 1) * BS]
            if blk != self.durable[b * BS:(b + 1) * BS] and _h(blk) not in self.later.get(b, ()):
                bad.append(b)
        self.stats["bytes_checked"] += self.size
        self.stats["bytes_lost"] += len(bad) * BS
        assert not bad, (f"{what}: after SIGKILL and a power cut, blocks {bad[:10]} "
                         f"hold neither what the last good fsync covered nor anything "
                         f"written after it\n{self.m.output()[-3000:]}")
        self.cur = bytearray(got)
        self.durable = bytes(got)
        self.later = {}
        self.ev_mark = len(self.m.events().splitlines())

    def close(self):
        self._close()


def _read_all(fd, size) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, min(4 * MiB, size - len(out)), len(out))
        assert chunk, "short read"
        out += chunk
    return bytes(out)


def _alive_with_event(m, mark: int, pack="main"):
    assert m.proc.poll() is None, "the daemon died\n" + m.output()[-3000:]
    new = m.events().splitlines()[mark:]
    assert any(f"pack {pack}" in l for l in new), new


# ---- the fault disk itself ------------------------------------------------------------
def test_faultdisk_injects_what_it_is_told(tmp_path):
    """The disk's own contract: each kind of fault fires where it is told,
    a lost fsync gives back the old bytes (to readers too, mmap included),
    a power cut takes back what was never fsynced."""
    require_fuse()
    fd = FaultDisk(tmp_path / "b", tmp_path / "m")
    fd.start()
    try:
        p = str(tmp_path / "m" / "f")
        f = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(f, b"a" * 8192, 0)
        os.fsync(f)
        fd.rules("write short path=f", "write eio after=1 path=f")
        assert os.pwrite(f, b"b" * 8192, 8192) == 4096
        os.pwrite(f, b"c" * 10, 0)
        with pytest.raises(OSError) as e:
            os.pwrite(f, b"d" * 10, 0)
        assert e.value.errno == 5
        fd.rules("write enospc bytes=100 count=0")
        os.pwrite(f, b"e" * 100, 0)
        with pytest.raises(OSError) as e:
            os.pwrite(f, b"e", 0)
        assert e.value.errno == 28
        fd.clear()
        mm = mmap.mmap(f, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
        assert mm[:1] == b"e"
        fd.rules("fsync eio lose")
        with pytest.raises(OSError):
            os.fdatasync(f)
        assert os.pread(f, 8, 0) == b"a" * 8 and os.fstat(f).st_size == 8192
        assert mm[:8] == b"a" * 8
        mm.close()
        os.fsync(f)                             # the rule is spent
        os.pwrite(f, b"z" * 16, 0)
        fd.rules("read eio count=0")   # the kernel tries a failed page again
        drop_caches()                           # not from the page cache
        with pytest.raises(OSError):
            os.pread(f, 16, 0)
        fd.clear()
        fd.rules("fsyncdir eio")
        dfd = os.open(str(tmp_path / "m"), os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(OSError):
            os.fsync(dfd)
        os.close(dfd)
        os.close(f)
        fd.crash()
        with open(p, "rb") as g:
            assert g.read(8) == b"a" * 8        # the unsynced "z"s are gone
        rep = fd.report()
        assert rep["injected"].pop("read eio") >= 1
        assert rep["injected"] == {"write short": 1, "write eio": 1, "write enospc": 1,
                                   "fsync eio lose": 1, "fsyncdir eio": 1}
        with pytest.raises(OSError):
            fd.rules("write sometimes")
    finally:
        fd.stop()


# ---- each fault on a single disk ---------------------------------------------------
SEG = "path=d0/segments/*"
CHOSEN = [f"write eio {SEG}", f"write eio count=3 {SEG}", f"write enospc {SEG}",
          f"write enospc count=0 {SEG}", f"write short count=5 {SEG}",
          f"fsync eio {SEG}", f"fsync eio lose {SEG}", f"fsync eio lose count=3 {SEG}",
          "fsyncdir eio path=d0/segments"]


@pytest.mark.parametrize("rule", CHOSEN)
def test_chosen_fault_single_disk(rig, rule):
    """One fault at a chosen point: the fsync that meets it (or a later
    one, while the data is not stored) fails, the daemon lives and says
    which pack; what fsync acknowledged before is all there after SIGKILL
    and a power cut."""
    r = rig()
    w = Workload(r, random.Random(rule), 4 * MiB)
    for _ in range(6):
        w.write()
    assert w.fsync() == 0
    w.crash_and_check(f"{rule}: before the fault")   # the next write starts a segment file
    for _ in range(6):
        w.write()
    mark = len(r.m.events().splitlines())
    r.fd.rules(rule)
    first = w.fsync()
    assert r.injected(), "the rule never fired"
    lost = False
    if first:
        _alive_with_event(r.m, mark)
        lost = w.lost()
        if lost:
            assert "lose" in rule, r.m.events()
            for _ in range(2):               # and it stays so, whatever is written
                assert w.fsync() == errno.EIO
                w.write()
        elif w.fsync() == 0:
            # said 0 after a failure: a crash right now must find everything
            w.crash_and_check(f"{rule}: the fsync after a failed one returned 0")
    eio = w.check_now(f"{rule}: running, after the fault", lost_ok=lost)
    assert not eio or lost
    w.crash_and_check(rule)
    for _ in range(4):
        w.write()
    assert w.fsync() == 0, "the array does not accept writes again after a restart"
    w.crash_and_check(rule + ", after the restart")
    w.close()


# ---- a generated workload ---------------------------------------------------------------
RANDOM_RULES = [
    "write eio {seg}", "write eio count=2 {seg}", "write enospc {seg}",
    "write short count=4 {seg}", "write eio p=0.2 seed={seed} count=3 {seg}",
    "write enospc bytes={nbytes} count=0 {seg}", "fsync eio {seg}",
    "fsync eio lose {seg}", "fsync eio lose p=0.5 seed={seed} count=2 {seg}",
    "fsyncdir eio path=d0/segments",
]


LOG_RULES = [
    "write eio {log}", "write short {log}", "write enospc {log}", "fsync eio {log}",
    "fsync eio lose {log}", "fsyncdir eio path=logs/*",
]


def run_random(rig, seed: int, steps: int, size: int, stats: dict | None = None,
               fsync: str = "commit"):
    """A seeded random run: writes, fsyncs, faults, fault clearing, checks
    while running, SIGKILL + power cut + restart. Returns the counts. With
    fsync="log" the intent log is on the fault disk as well: its faults are
    drawn too, and a step may run a full commit (`sync all`, what the
    committer does in the background) so the pack's faults meet one."""
    rng = random.Random(seed)
    r = rig(fsync=fsync)
    w = Workload(r, rng, size)
    rules = RANDOM_RULES + (LOG_RULES if fsync == "log" else [])
    for step in range(steps):
        x = rng.random()
        if x < 0.55:
            w.write()
        elif x < 0.75:
            before = r.injected()
            if w.fsync() and r.injected() > before:
                # the pack's error is logged when it starts (not on every retry)
                _alive_with_event(r.m, 0)
        elif x < 0.80 and fsync == "log":
            r.m.ctl("sync", "all")      # a commit behind the log; may fail with the pack
        elif x < 0.85:
            rule = rng.choice(rules).format(seg="path=d0/segments/*", log="path=logs/*",
                                            seed=rng.randrange(1 << 30),
                                            nbytes=rng.randrange(0, 4 * MiB))
            r.fd.rules(rule)
        elif x < 0.90:
            r.fd.clear()
        elif x < 0.95:
            w.check_now(f"seed {seed} step {step}", lost_ok=w.lost())
        else:
            w.crash_and_check(f"seed {seed} step {step}")
    w.crash_and_check(f"seed {seed} at the end")
    w.stats["faults"] = r.injected()
    w.close()
    r.close()
    if stats is not None:
        for k, v in w.stats.items():
            stats[k] = stats.get(k, 0) + v
    return w.stats


def test_random_faults_with_the_log_on_the_fault_disk(rig, capsys):
    """The default mode: fsyncs through the intent log, the log and the pack
    on one fault disk, faults drawn for both, commits behind the log, power
    cuts: every fsync that returned 0 is there after each crash."""
    seeds = int(os.environ.get("FUSEARRAY_FAULT_SEEDS", "4"))
    stats: dict = {}
    for seed in range(seeds):
        run_random(rig, 100 + seed, 150, 6 * MiB, stats, fsync="log")
    assert stats["bytes_lost"] == 0
    assert stats["faults"] > 0 and stats["fsync_acked"] > 0
    with capsys.disabled():
        print("\nfaults (log mode): " + " ".join(f"{k}={v}" for k, v in stats.items()))


@pytest.mark.parametrize("rule", ["write eio path=logs/*", "write short path=logs/*",
                                  "write enospc path=logs/*", "fsync eio path=logs/*",
                                  "fsync eio lose path=logs/*"])
def test_a_failing_log_device_falls_back_to_commits(rig, rule):
    """The log's device fails a write or an fsync: that fsync is answered
    by a full commit instead (it returns 0: the pack is fine), an event says
    the log failed, later fsyncs commit; after SIGKILL and a power cut
    every fsync'd write is there, and the next mount uses the log again. A
    short write is finished by the log itself (written on from where it
    stopped)."""
    r = rig(fsync="log")
    w = Workload(r, random.Random(rule), 4 * MiB)
    for _ in range(6):
        w.write()
    assert w.fsync() == 0
    w.crash_and_check(f"{rule}: before the fault")
    for _ in range(6):
        w.write()
    r.fd.rules(rule)
    syncs = r.m.status()["intent_log"]["log_syncs"]
    assert w.fsync() == 0
    assert r.injected(), "the rule never fired"
    st = r.m.status()["intent_log"]
    if "short" in rule:
        assert not st["log_failed"] and st["log_syncs"] == syncs + 1, st
    else:
        assert st["log_failed"] and st["log_syncs"] == syncs, st
        assert any("the intent log in" in l and "failed" in l
                   for l in r.m.events().splitlines())
    r.fd.clear()
    for _ in range(4):
        w.write()
    assert w.fsync() == 0
    w.crash_and_check(f"{rule}: after the log failed")
    syncs = r.m.status()["intent_log"]["log_syncs"]
    w.write()
    assert w.fsync() == 0
    assert r.m.status()["intent_log"]["log_syncs"] == syncs + 1    # the log again
    w.crash_and_check(f"{rule}: the log again")
    w.close()


def test_pack_faults_behind_the_log_lose_nothing_fsync_acknowledged(rig):
    """With the log, an fsync returns before the pack is written: a pack
    fault (a failed write, a failed fsync that loses data) meets the commit
    behind it. What the fsyncs acknowledged stays readable and survives
    SIGKILL and a power cut (the log replays it); later fsyncs report the
    pack's error until it is stored."""
    r = rig(fsync="log")
    w = Workload(r, random.Random(7), 4 * MiB)
    for rule in [f"write eio {SEG}", f"fsync eio lose {SEG}", f"write enospc count=0 {SEG}"]:
        for _ in range(6):
            w.write()
        assert w.fsync() == 0            # the log
        r.fd.rules(rule)
        err, _ = r.m.ctl("sync", "all")  # the commit behind it meets the fault
        assert err in (errno.EIO, errno.ENOSPC), (rule, err)
        assert r.injected(), rule
        w.check_now(rule, lost_ok=w.lost())
        r.fd.clear()
        w.crash_and_check(rule)          # replayed from the log


def test_random_faults_single_disk(rig, capsys):
    seeds = int(os.environ.get("FUSEARRAY_FAULT_SEEDS", "4"))
    stats: dict = {}
    for seed in range(seeds):
        run_random(rig, seed, 150, 6 * MiB, stats)
    assert stats["bytes_lost"] == 0
    assert stats["faults"] > 0 and stats["fsync_acked"] > 0
    with capsys.disabled():
        print("\nfaults: " + " ".join(f"{k}={v}" for k, v in stats.items()))


# ---- a mirror with one faulty disk ---------------------------------------------------------
def test_mirror_survives_one_faulty_disk(rig):
    """Every kind of fault on one half of a mirror: no fsync fails, nothing
    is lost, the disk is marked failed with an event; `recover` brings it
    back once the faults are gone."""
    rng = random.Random(11)
    for rule in ["write eio", "write short count=0", "fsync eio lose", "read eio count=0",
                 "fsyncdir eio"]:
        r = rig("mirror", 2)
        w = Workload(r, rng, 4 * MiB)
        for _ in range(8):
            w.write()
        assert w.fsync() == 0
        w.crash_and_check(f"{rule}: before the fault")   # the next write starts a segment file
        mark = len(r.m.events().splitlines())
        r.fd.rules(f"{rule} path=d0/*")     # d0: the one reads go to first
        for _ in range(8):
            w.write()
            assert w.fsync() == 0, f"{rule}: an fsync failed with one good disk"
        if rule.startswith("read"):
            drop_caches()
            w.check_now(rule)
        assert r.injected(), rule
        if not rule.startswith("write short"):
            wait_for(lambda: r.m.status()["packs"][0]["disks"][0]["state"] == "failed",
                     what=f"{rule}: disk 0 marked failed")
            _alive_with_event(r.m, mark)
        w.check_now(rule)
        w.crash_and_check(rule)
        r.m.ok("recover", "main")            # the faults are gone: it rejoins
        wait_for(lambda: r.m.status()["packs"][0]["state"] == "healthy", timeout=120,
                 what=f"{rule}: the pack healthy after recover")
        w.check_now(rule + ", recovered")
        w.close()
        r.close()


def test_read_errors_never_fail_the_last_disk(rig):
    """Read errors on a single disk (its segment files and its label) are
    errors to the reader, counted and logged, but the disk stays in
    service: failing the only disk holding the data made every block
    unreadable until a `recover`, after the fault was long gone."""
    r = rig()
    w = Workload(r, random.Random(5), 2 * MiB)
    for _ in range(6):
        w.write()
    assert w.fsync() == 0
    w.crash_and_check("before the fault")       # nothing left in the cache
    r.fd.rules("read eio count=0 path=d0/*")
    drop_caches()
    mark = len(r.m.events().splitlines())
    eio = w.check_now("with every read failing", lost_ok=True)
    assert len(eio) >= 9, eio                   # more than the error limit (8)
    st = r.m.status()["packs"][0]
    assert st["disks"][0]["state"] == "online" and st["state"] == "healthy", st
    # the disk check (every 2 s) reads the label: wait for two of them
    wait_for(lambda: sum("reading its label failed" in l
                         for l in r.m.events().splitlines()[mark:]) >= 2,
             what="two failed label reads logged")
    _alive_with_event(r.m, mark)
    st = r.m.status()["packs"][0]
    assert st["disks"][0]["state"] == "online" and st["state"] == "healthy", st
    r.fd.clear()
    assert w.check_now("once the faults are gone") == []
    w.close()
