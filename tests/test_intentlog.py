"""The intent log (issue #15): an fsync is one log append and one data sync;
what it covered survives SIGKILL at any moment (during fsync-heavy writes,
ext4 with fsync on every file, and the log's replay itself); a torn or
damaged record is never replayed as data and everything before it is.

Every subprocess is ended from `finally` by its Popen; the `Mount` fixture
detaches loop devices and unmounts what it recorded.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import Mount, cli, end_proc, require_fuse, run, sha, wait_for
from fusearray import intentlog
from test_ext4 import attached, fsck_clean, progress_lines, verify_files

MiB = 1 << 20
PY = sys.executable


# ---- the record format, without FUSE ------------------------------------------------
def make_records(rng, n, first_seq=1):
    recs = []
    seq = first_seq
    for _ in range(n):
        seq += rng.randrange(1, 4)
        if rng.random() < 0.15:
            recs.append((seq, rng.randrange(1, 9), intentlog.ZERO,
                         rng.randrange(1 << 30), rng.randrange(1, 1 << 20), None))
        else:
            data = rng.randbytes(rng.choice((1, 512, 4096, rng.randrange(1, 70000))))
            recs.append((seq, rng.randrange(1, 9), intentlog.WRITE,
                         rng.randrange(1 << 30), len(data), data))
    return recs


def encode(seed, use, recs) -> tuple[bytearray, list]:
    """The slot bytes of `recs` and where each record ends."""
    out = bytearray()
    ends = []
    for r in recs:
        head, data = intentlog.record_bytes(seed, use, r)
        out += head
        if data is not None:
            out += data
        ends.append(len(out))
    return out, ends


def test_records_read_back_as_written():
    rng = random.Random(1)
    seed = intentlog.log_seed("array-one")
    recs = make_records(rng, 200)
    buf, _ = encode(seed, 7, recs)
    use, got, damaged = intentlog.parse_slot(bytes(buf) + bytes(4096), seed)
    assert use == 7 and got == recs and damaged is None
    # another array's seed: nothing of it is read
    assert intentlog.parse_slot(bytes(buf), intentlog.log_seed("array-two"))[:2] == (0, [])


@pytest.mark.parametrize("case", range(300))
def test_a_torn_or_flipped_record_is_never_replayed_and_all_before_it_is(case):
    """Generated: a slot's content cut at a random byte (a torn batch) or
    one random bit flipped (damage): exactly the records wholly before the
    damage are read, none at or after it."""
    rng = random.Random(case)
    seed = intentlog.log_seed(f"arr-{case}")
    recs = make_records(rng, rng.randrange(1, 40))
    buf, ends = encode(seed, 3, recs)
    if case % 2:
        cut = rng.randrange(len(buf))
        damaged = bytes(buf[:cut]) + bytes(rng.randrange(0, 200))   # zeros after a tear
        want = [r for r, e in zip(recs, ends) if e <= cut]
    else:
        bit = rng.randrange(len(buf) * 8)
        damaged = bytearray(buf)
        damaged[bit // 8] ^= 1 << (bit % 8)
        k = next(i for i, e in enumerate(ends) if bit // 8 < e)
        want = recs[:k]
    _, got, _ = intentlog.parse_slot(bytes(damaged), seed)
    assert got == want


def test_a_reused_slot_stops_at_what_its_earlier_use_left():
    """A slot is reused from its start with a new use number: the records
    of the earlier use after the new ones are not read (they are covered,
    and may be older versions of the same blocks)."""
    rng = random.Random(5)
    seed = intentlog.log_seed("x")
    old, _ = encode(seed, 1, make_records(rng, 50))
    new_recs = make_records(rng, 5, first_seq=10_000)
    new, _ = encode(seed, 2, new_recs)
    slot = bytearray(old)
    slot[:len(new)] = new
    assert intentlog.parse_slot(bytes(slot), seed) == (2, new_recs, None)


# ---- on a real mount -------------------------------------------------------------------
SYNC_WRITER = r"""
import os, random, sys
lun, progress, seed, size, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
log = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
fd = os.open(lun, os.O_WRONLY)
i = 0
os.write(log, b"started\n")
try:
    while True:
        off = rng.randrange(size // bs) * bs
        data = rng.randbytes(bs)
        os.pwrite(fd, data, off)
        os.fdatasync(fd)
        os.write(log, b"synced %d\n" % i)
        i += 1
except OSError:
    sys.exit(1)
"""


def replay_writer(seed, size, bs, count):
    """The first `count` writes of SYNC_WRITER with `seed`: [(off, data)]."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        off = rng.randrange(size // bs) * bs
        out.append((off, rng.randbytes(bs)))
    return out


def synced(progress) -> int:
    return sum(1 for l in progress_lines(progress) if l.startswith("synced"))


def read_lun(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def log_status(m) -> dict:
    return m.status()["intent_log"]


def test_fdatasync_each_write_survives_sigkill_through_the_log(mount, tmp_path):
    """The 4k + fdatasync pattern, killed at random moments (up to 2.5 s in:
    the log fills and commits run behind it, so kills land in write-backs
    and commits too): every write an fdatasync returned for is there after
    the restart (the one in flight may or may not be), the fsyncs were the
    log's (no commit each), and the restart replayed them."""
    m = mount
    S, BS = 32 * MiB, 4096
    m.ok("create", f"l 32M")
    lun = m.path("luns", "l")
    model = bytearray(S)
    rng = random.Random(int(os.environ.get("FUSEARRAY_CRASH_SEED") or random.randrange(1 << 30)))
    replays = behind = 0
    for cycle in range(5):
        progress = tmp_path / f"progress-{cycle}"
        seed = rng.randrange(1 << 30)
        commits0 = log_status(m)["log_commits"]      # the open's own
        w = subprocess.Popen([PY, "-c", SYNC_WRITER, lun, str(progress), str(seed), str(S),
                              str(BS)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: synced(progress) >= 50 or w.poll() is not None, 30,
                     "the writer's first fsyncs")
            assert w.poll() is None, "the writer died"
            if cycle == 0:      # once at least, after a commit behind the log
                wait_for(lambda: log_status(m)["log_commits"] > commits0, 30,
                         "a commit behind the log")
            time.sleep(rng.uniform(0, 2.5))
            st = log_status(m)
            assert st["log_syncs"] > 0 and st["log_fallbacks"] == 0, st
            behind += st["log_commits"] > commits0
            m.kill9(then=lambda: end_proc(w))
        finally:
            end_proc(w)
        c = synced(progress)
        writes = replay_writer(seed, S, BS, c + 1)
        for off, data in writes[:c]:
            model[off:off + BS] = data
        m.start()
        if "intent log: replayed" in m.events():
            replays += 1
        actual = read_lun(lun)
        if c < len(writes):          # the write in flight: either version
            off, data = writes[c]
            if actual[off:off + BS] == data:
                model[off:off + BS] = data
        assert actual == bytes(model), f"cycle {cycle}: {c} synced writes"
    assert replays >= 1       # the killed daemons had logged, uncommitted fsyncs
    assert behind >= 1        # and commits had run behind the log
    m.stop()
    m.start()
    assert read_lun(lun) == bytes(model)


def find_last_record(m, uuid):
    """(slot path, offset of the last record's data, its length) of the
    record with the highest seq in the array's log."""
    d = os.path.join(m.array, "log")
    seed = intentlog.log_seed(uuid)
    found = None
    for name in os.listdir(d):
        if not name.startswith("slot."):
            continue
        p = os.path.join(d, name)
        with open(p, "rb") as f:
            buf = f.read()
        _, recs, _ = intentlog.parse_slot(buf, seed)
        pos = 0
        for r in recs:
            n = len(r[5]) if r[5] is not None else 0
            if found is None or r[0] > found[3]:
                found = (p, pos + intentlog.HEAD.size, n, r[0])
            pos += intentlog.HEAD.size + n
    return found


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_damaged_last_record_is_not_replayed_after_sigkill(make_mount, damage):
    """After SIGKILL, the newest log record is damaged (one bit flipped in
    its data, or the slot cut inside it, zeros after): the restart replays
    every record before it and not that one, says so, and the LUN holds
    the old content where that write went."""
    m = make_mount()
    m.init().start()
    uuid = m.status()["uuid"]
    m.ok("create", "l 8M")
    lun = m.path("luns", "l")
    rng = random.Random(damage)
    base = rng.randbytes(8 * MiB)
    with open(lun, "r+b") as f:
        f.write(base)
    cli("sync", "all", mnt=m.mnt)
    fd = os.open(lun, os.O_WRONLY)
    writes = []
    try:
        for i in range(40):
            off = i * 128 * 1024 + rng.randrange(0, 64) * 512
            data = rng.randbytes(rng.choice((512, 4096, 12288)))
            os.pwrite(fd, data, off)
            os.fdatasync(fd)
            writes.append((off, data))
    finally:
        os.close(fd)
    assert log_status(m)["log_syncs"] >= 40
    m.kill9()
    path, data_at, n, _seq = find_last_record(m, uuid)
    with open(path, "r+b") as f:
        if damage == "flip":
            f.seek(data_at + rng.randrange(n))
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
        else:
            cut = data_at + rng.randrange(n)
            f.seek(cut)
            f.write(bytes(intentlog.SLOT_SIZE - cut))
    m.start()
    want = bytearray(base)
    for off, data in writes[:-1]:
        want[off:off + len(data)] = data
    assert read_lun(lun) == bytes(want)
    ev = m.events()
    assert "replayed 39 write(s)" in ev, ev[-2000:]
    assert "damaged record" in ev, ev[-2000:]
    m.stop()


def start_daemon(m, ready_file):
    """Start the daemon without waiting: its Popen and the read end of its
    ready pipe (non-blocking)."""
    r, w = os.pipe()
    p = subprocess.Popen([PY, "-m", "fusearray.daemon", m.array, m.mnt, "--ready-fd", str(w)],
                         pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    os.close(w)
    os.set_blocking(r, False)
    return p, r


def test_sigkill_during_the_log_replay_loses_nothing(make_mount, tmp_path):
    """A log of fdatasync'd writes, the daemon killed; then its restarts
    killed again and again while the log is being replayed (kill times
    spread over the measured time to ready of a restart of the same
    state): the last restart still has every synced write."""
    m = make_mount()
    m.init("--block-size", "1M").start()    # each 4k record re-reads a 1 MiB block: a long replay
    m.ok("create", "l 64M")
    lun = m.path("luns", "l")
    S, BS = 64 * MiB, 4096
    rng = random.Random(11)
    model = bytearray(S)
    fd = os.open(lun, os.O_WRONLY)
    try:
        for _ in range(1500):
            off = rng.randrange(S // BS) * BS
            data = rng.randbytes(BS)
            os.pwrite(fd, data, off)
            os.fdatasync(fd)
            model[off:off + BS] = data
    finally:
        os.close(fd)
    m.kill9()
    # time a restart of this very state on a copy, then put the copy back
    backup = tmp_path / "backup"
    shutil.copytree(m.array, backup, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
    t0 = time.monotonic()
    m.start()
    took = time.monotonic() - t0
    assert read_lun(lun) == bytes(model)
    m.kill9()
    shutil.rmtree(m.array)
    shutil.copytree(backup, m.array, symlinks=True)
    early = 0
    for frac in (0.5, 0.65, 0.8, 0.9, 0.95, 1.0):
        p, r = start_daemon(m, None)
        try:
            time.sleep(took * frac)
            p.kill()
            p.wait(timeout=30)
        finally:
            end_proc(p)
            try:
                got = os.read(r, 4096)
            except BlockingIOError:
                got = b""
            os.close(r)
            run(["fusermount3", "-u", "-z", m.mnt], check=False)
        early += b"ok" not in got
    assert early >= 1, "every kill came after the mount was ready"
    m.start()
    assert read_lun(lun) == bytes(model)
    m.stop()


FSYNC_EACH_WRITER = r"""
import os, random, sys
root, progress, prefix = sys.argv[1:4]
log = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(log, b"started\n")
i = 0
try:
    while i < 4000:
        rng = random.Random(f"{prefix}-{i}")
        p = os.path.join(root, f"{prefix}-{i}.bin")
        with open(p, "wb") as f:
            f.write(rng.randbytes(rng.choice((4096, 65536, rng.randrange(1, 200000)))))
            f.flush()
            os.fsync(f.fileno())
        os.write(log, b"synced %s\n" % p.encode())
        i += 1
except OSError:
    sys.exit(1)
"""


def fsync_each_file(p: str) -> bytes:
    prefix, i = os.path.basename(p)[:-4].rsplit("-", 1)
    rng = random.Random(f"{prefix}-{i}")
    return rng.randbytes(rng.choice((4096, 65536, rng.randrange(1, 200000))))


@pytest.mark.slow
def test_ext4_with_fsync_on_every_file_survives_sigkill(mount, tmp_path):
    """ext4 on a loop device, a writer that fsyncs every file it writes
    (journal commits through the log), the daemon SIGKILLed mid-stream
    four times: after each restart the journal replays, every synced file
    is intact and fsck finds nothing."""
    m = mount
    m.ok("create", "fs 256M")
    dev = m.attach("fs")
    run(["mkfs.ext4", "-q", dev])
    where = str(tmp_path / "fs")
    m.mount_fs(dev, where)
    rng = random.Random(3)
    durable: dict = {}
    for cycle in range(4):
        progress = tmp_path / f"progress-{cycle}"
        w = subprocess.Popen([PY, "-c", FSYNC_EACH_WRITER, where, str(progress), f"c{cycle}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(progress_lines(progress)) > 20 or w.poll() is not None, 60,
                     "the writer's first fsyncs")
            assert w.poll() is None, "the writer died before the crash"
            time.sleep(rng.uniform(0, 0.4))
            assert log_status(m)["log_syncs"] > 0
            m.kill9(then=lambda: end_proc(w))
        finally:
            end_proc(w)
        wait_for(lambda: not attached(dev), 30, f"{dev} to be released")
        for l in progress_lines(progress):
            if l.startswith("synced "):
                p = l.split(" ", 1)[1]
                durable[p] = sha(fsync_each_file(p))
        m.start()
        dev = m.attach("fs")
        m.mount_fs(dev, where)           # the journal replays
        verify_files(durable)
        m.umount_fs(where)
        fsck_clean(dev)
        m.mount_fs(dev, where)
    assert len(durable) > 40


def test_log_in_its_own_directory_and_moved_by_mount(make_mount, tmp_path):
    """`init --log DIR` keeps the log in DIR/<uuid> (a faster device, like a
    SLOG): fsync'd writes survive SIGKILL from there; `mount --log NEW`
    replays the old log first and moves it; a log directory that is gone
    after a crash refuses the mount with a clear error (it may hold
    acknowledged writes)."""
    slog = tmp_path / "slog"
    slog.mkdir()
    m = make_mount()
    m.init("--log", str(slog)).start()
    uuid = m.status()["uuid"]
    assert log_status(m)["log_dir"] == str(slog / uuid)
    assert not os.path.exists(os.path.join(m.array, "log"))
    m.ok("create", "l 4M")
    lun = m.path("luns", "l")
    data = os.urandom(4096)
    fd = os.open(lun, os.O_WRONLY)
    os.pwrite(fd, data, 8192)
    os.fdatasync(fd)
    os.close(fd)
    m.kill9()
    m.start()
    assert read_lun(lun)[8192:8192 + 4096] == data
    # moved
    fd = os.open(lun, os.O_WRONLY)
    os.pwrite(fd, data[::-1], 0)
    os.fdatasync(fd)
    os.close(fd)
    m.kill9()
    slog2 = tmp_path / "slog2"
    slog2.mkdir()
    m.start("--log", str(slog2))
    assert read_lun(lun)[:4096] == data[::-1]
    assert log_status(m)["log_dir"] == str(slog2 / uuid)
    assert not os.path.exists(slog / uuid)
    with open(os.path.join(m.array, "array.json")) as f:
        assert json.load(f)["log_dir"] == str(slog2)
    # gone after a crash: refused, nothing changed
    fd = os.open(lun, os.O_WRONLY)
    os.pwrite(fd, data, 4096)
    os.fdatasync(fd)
    os.close(fd)
    m.kill9()
    os.rename(slog2, tmp_path / "elsewhere")
    with pytest.raises(AssertionError, match="intent log directory .* is missing"):
        m.start()
    os.rename(tmp_path / "elsewhere", slog2)
    m.start()
    assert read_lun(lun)[4096:8192] == data
    m.stop()
    # a --log DIR that does not exist is refused at init
    r = cli("init", str(tmp_path / "other"), "--log", str(tmp_path / "nope"), check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_sequence_numbers_keep_growing_across_mounts(make_mount):
    """A clean unmount commits coverage up to write N; writes of the next
    mount are numbered above N, so a record fsync'd in it and SIGKILLed
    before any commit is replayed, not taken for one the catalogue holds
    (numbers restarting at 1 lost it)."""
    m = make_mount()
    m.init().start()
    m.ok("create", "l 4M")
    lun = m.path("luns", "l")
    fd = os.open(lun, os.O_WRONLY)
    try:
        for i in range(200):
            os.pwrite(fd, os.urandom(4096), (i % 64) * 4096)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    m.stop()
    m.start()
    data = os.urandom(4096)
    fd = os.open(lun, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 1 << 20)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    m.kill9()
    m.start()
    assert read_lun(lun)[1 << 20:(1 << 20) + 4096] == data
    assert "replayed 1 write(s)" in m.events()
    m.stop()
