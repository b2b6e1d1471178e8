"""End to end, as a user does it from the shell: ext4 on a loop device over a
LUN file, fstrim / punch-hole space reclaim, and SIGKILL crash loops that
check the durability contract of DESIGN 4.1 (every write acknowledged before
an fsync survives a SIGKILL of the daemon; a filesystem on a LUN is
fsck-clean after journal replay).

Every subprocess is ended from `finally` by its Popen; the `Mount` fixture
detaches the loop devices and unmounts what it recorded.
"""
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from conftest import end_proc, run, sha, wait_for, write_files
from fallbacks import fstrim, punch_hole

MiB = 1 << 20
SECTOR = 512
PY = sys.executable


# ---- helpers -----------------------------------------------------------------------
def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def verify_files(files: dict) -> None:
    for p, digest in sorted(files.items()):
        with open(p, "rb") as f:
            got = sha(f.read())
        assert got == digest, f"{p}: content differs from what was written and synced"


def fsck_clean(dev: str) -> str:
    """`e2fsck -fn DEV` must exit 0 and report nothing to fix."""
    r = run(["e2fsck", "-fn", dev], check=False)
    out = r.stdout + r.stderr
    bad = [l for l in out.splitlines() if re.search(r"wrong|fix", l, re.I)]
    assert r.returncode == 0 and not bad, f"e2fsck -fn {dev} exit {r.returncode}:\n{out}"
    return out


def lun_status(m, name: str) -> dict:
    return next(l for l in m.status()["luns"] if l["name"] == name)


def pack_used(m, pack: str = "main") -> int:
    return next(p for p in m.status()["packs"] if p["name"] == pack)["used_bytes"]


def fsync_lun(m, name: str) -> None:
    """A user's fsync on the LUN file: the array commits."""
    fd = os.open(m.path("luns", name), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def attached(dev: str) -> bool:
    return any(l.startswith(dev + ":") for l in run(["losetup", "-a"]).stdout.splitlines())


def dd_write(src: str, lun_path: str, off: int, size: int, fsync: bool = False) -> None:
    conv = "notrunc,fsync" if fsync else "notrunc"
    run(["dd", f"if={src}", f"of={lun_path}", f"bs={size}", "count=1", f"seek={off}",
         "oflag=direct,seek_bytes", f"conv={conv}", "status=none"])


# ---- 1. attach, mkfs, use, fsck, remount, detach ---------------------------------
def test_ext4_attach_mkfs_use_detach(mount, tmp_path):
    m = mount
    m.ok("create", "vol 256M")
    dev = m.attach("vol")
    run(["mkfs.ext4", "-q", dev])
    where = str(tmp_path / "fs")
    m.mount_fs(dev, where)
    rng = random.Random(1)
    files = write_files(where, "big", [3 * MiB, 5 * MiB + 1234, 1 * MiB], rng)
    files |= write_files(where, "small", [0, 1, 511, 4096, 70000], rng)
    os.makedirs(os.path.join(where, "d/e"))
    files |= write_files(os.path.join(where, "d/e"), "nested", [12345], rng)
    run(["sync"])
    m.umount_fs(where)

    fsck_clean(dev)
    # the filesystem really lives in the LUN: it holds the files' bytes
    wait_for(lambda: lun_status(m, "vol")["allocated_bytes"] >= 9 * MiB, 10,
             "allocated_bytes to count the files")

    m.mount_fs(dev, where)
    verify_files(files)
    assert sorted(os.listdir(where)) == sorted(
        ["lost+found", "d"] + [os.path.basename(p) for p in files if "/d/e/" not in p])
    m.umount_fs(where)
    m.detach("vol", dev)
    assert not attached(dev)
    # the LUN file is no longer open once detached
    wait_for(lambda: lun_status(m, "vol")["open"] == 0, 10, "LUN closed after detach")


# ---- 2. ext4 survives SIGKILL of the daemon ------------------------------------------
def test_ext4_survives_sigkill(mount, tmp_path):
    m = mount
    m.ok("create", "vol 256M")
    dev = m.attach("vol")
    run(["mkfs.ext4", "-q", dev])
    where = str(tmp_path / "fs")
    m.mount_fs(dev, where)
    rng = random.Random(2)
    synced = write_files(where, "a", [4 * MiB, 2 * MiB + 7, 100, 8192], rng)
    os.makedirs(os.path.join(where, "sub"))
    synced |= write_files(os.path.join(where, "sub"), "b", [1 * MiB, 3], rng)
    run(["sync"])
    # more changes after the checkpoint (may or may not survive), then SIGKILL
    write_files(where, "after", [2 * MiB, 10], rng)
    small = os.path.join(where, "a-2.bin")
    old = read(small)
    new = rng.randbytes(len(old))
    with open(small, "r+b") as f:    # in place, not synced: old or new, never garbage
        f.write(new)
    del synced[small]
    m.kill9()

    m.start()
    dev = m.attach("vol")
    m.mount_fs(dev, where)       # journal replay
    verify_files(synced)
    assert read(small) in (old, new)
    m.umount_fs(where)
    fsck_clean(dev)
    m.detach("vol", dev)


# ---- 3. fstrim and punch-hole free space ----------------------------------------------
def test_fstrim_frees_space(mount, tmp_path):
    m = mount
    m.ok("create", "vol 256M")
    dev = m.attach("vol")
    run(["mkfs.ext4", "-q", dev])
    where = str(tmp_path / "fs")
    m.mount_fs(dev, where)
    keep = write_files(where, "keep", [3 * MiB, 4096, 1], random.Random(3))
    size = 64 * MiB
    big = os.path.join(where, "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    run(["sync"])
    alloc0 = wait_for(lambda: (a := lun_status(m, "vol")["allocated_bytes"]) >= size and a,
                      30, "allocated_bytes to count the 64 MiB file")
    used0 = wait_for(lambda: (u := pack_used(m)) >= size and u, 30,
                     "pack used_bytes to count the 64 MiB file")

    os.unlink(big)
    run(["sync"])
    trimmed = fstrim(where)      # without the interposer: refused, then zeros (fallbacks.py)
    assert trimmed is None or trimmed >= size, trimmed

    def alloc_dropped():
        fsync_lun(m, "vol")
        return lun_status(m, "vol")["allocated_bytes"] <= alloc0 - size * 3 // 4
    wait_for(alloc_dropped, 30, "allocated_bytes to drop after fstrim")
    wait_for(lambda: pack_used(m) <= used0 - size // 2, 60,
             f"pack used_bytes to drop after fstrim (was {used0})")
    # the filesystem is still fine and trim spared the live files
    m.umount_fs(where)
    fsck_clean(dev)
    m.mount_fs(dev, where)
    verify_files(keep)
    m.umount_fs(where)
    m.detach("vol", dev)

    # punch-hole straight on a LUN file
    m.ok("create", "raw 16M")
    lun = m.path("luns", "raw")
    data = os.urandom(8 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    run(["dd", f"if={src}", f"of={lun}", "bs=1M", "oflag=direct", "conv=notrunc,fsync",
         "status=none"])
    wait_for(lambda: os.stat(lun).st_blocks * 512 >= 8 * MiB, 30, "st_blocks to count 8 MiB")
    du0 = int(run(["du", "-B1", lun]).stdout.split()[0])
    assert du0 >= 8 * MiB
    punch_hole(lun, 2 * MiB, 4 * MiB)
    assert os.stat(lun).st_size == 16 * MiB          # a LUN never changes size
    expect = tmp_path / "expect.bin"
    expect.write_bytes(data[:2 * MiB] + bytes(4 * MiB) + data[6 * MiB:] + bytes(8 * MiB))
    run(["cmp", str(expect), lun])
    run(["cmp", "-n", str(4 * MiB), "-i", f"{2 * MiB}:0", lun, "/dev/zero"])

    def blocks_dropped():
        fsync_lun(m, "raw")
        return os.stat(lun).st_blocks * 512 <= 4 * MiB + 64 * 1024
    wait_for(blocks_dropped, 30, "st_blocks to drop after punch-hole")
    du1 = int(run(["du", "-B1", lun]).stdout.split()[0])
    assert du1 <= du0 - 4 * MiB + 64 * 1024, (du0, du1)
    # and the hole is durable across a clean restart
    m.stop()
    m.start()
    run(["cmp", str(expect), lun])
    assert os.stat(lun).st_blocks * 512 <= 4 * MiB + 64 * 1024


# ---- 4. SIGKILL crash loop -----------------------------------------------------------
RAW_WRITER = r"""
import mmap, os, random, sys, json
lun, plan_path, progress = sys.argv[1:4]
plan = json.load(open(plan_path))
datas = []
for off, n, seed in plan:
    buf = mmap.mmap(-1, n)
    buf[:] = random.Random(seed).randbytes(n)
    datas.append(buf)
log = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
fd = os.open(lun, os.O_WRONLY | os.O_DIRECT)
i = 0
try:
    while True:
        off, n, seed = plan[i % len(plan)]
        os.pwrite(fd, datas[i % len(plan)], off)
        i += 1
        if i == 1:
            os.write(log, b"started\n")
        if i % 8 == 0:
            os.fsync(fd)
            os.write(log, b"synced %d\n" % i)
except OSError:
    sys.exit(1)
"""

FS_WRITER = r"""
import os, random, sys, time
root, progress, prefix = sys.argv[1:4]
log = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(log, b"started\n")
i = total = 0
try:
    # bounded: past the cap it idles until killed, so four crash cycles of
    # page-cache-speed writing cannot fill the filesystem under the test
    while total < (16 << 20):
        rng = random.Random(f"{prefix}-{i}")
        data = rng.randbytes(rng.randrange(1, 1 << 20))
        p = os.path.join(root, f"{prefix}-{i}.bin")
        with open(p, "wb") as f:
            f.write(data)
            if i % 3 == 0:
                f.flush()
                os.fsync(f.fileno())
                os.write(log, b"synced %s\n" % p.encode())
        i += 1
        total += len(data)
    while True:
        time.sleep(1)
except OSError:
    sys.exit(1)
"""


def fs_writer_file(p: str) -> bytes:
    prefix, i = os.path.basename(p)[:-4].rsplit("-", 1)
    rng = random.Random(f"{prefix}-{i}")
    return rng.randbytes(rng.randrange(1, 1 << 20))


def progress_lines(path) -> list[str]:
    try:
        text = read(path).decode()
    except FileNotFoundError:
        return []
    return [l for l in text.split("\n")[:-1]]    # only complete lines


def plan_data(plan):
    return [random.Random(seed).randbytes(n) for _off, n, seed in plan]


def check_after_crash(actual: bytes, base: bytes, plan, datas) -> None:
    """`actual` equals `base` except in sectors that one of the un-synced
    plan writes covers, where each 512-byte sector holds either the base
    version or the version of one of those writes."""
    ok = set()
    for (off, n, _), d in zip(plan, datas):
        for s in range(off // SECTOR, (off + n) // SECTOR):
            a = s * SECTOR
            if actual[a:a + SECTOR] == d[a - off:a - off + SECTOR]:
                ok.add(s)
    bad = []
    chunk = 64 * 1024
    for c in range(0, len(base), chunk):
        if actual[c:c + chunk] == base[c:c + chunk]:
            continue
        for a in range(c, c + chunk, SECTOR):
            if actual[a:a + SECTOR] != base[a:a + SECTOR] and a // SECTOR not in ok:
                bad.append(a)
    assert not bad, (f"{len(bad)} sectors hold neither the synced content nor an "
                     f"un-synced write's; first offsets: {bad[:10]}")


@pytest.mark.slow
def test_sigkill_crash_loop(mount, tmp_path):
    m = mount
    # a new seed each run (the kill timing is random anyway); printed, so a
    # failure shows it, and FUSEARRAY_CRASH_SEED=N replays the same writes
    seed = int(os.environ.get("FUSEARRAY_CRASH_SEED") or random.randrange(1 << 32))
    print(f"crash loop seed: FUSEARRAY_CRASH_SEED={seed}")
    rng = random.Random(seed)
    S = 64 * MiB
    m.ok("create", "crash 64M")
    lun = m.path("luns", "crash")
    model = bytearray(S)
    writer = None
    cycles = 30
    synced_counts = []
    try:
        for cycle in range(cycles):
            # synced writes: dd at random (sector-aligned, not block-aligned) offsets
            for _ in range(rng.randrange(3, 7)):
                n = rng.randrange(1, 512) * SECTOR
                off = rng.randrange(0, (S - n) // SECTOR) * SECTOR
                data = rng.randbytes(n)
                src = tmp_path / "src.bin"
                src.write_bytes(data)
                dd_write(str(src), lun, off, n)
                model[off:off + n] = data
            if rng.random() < 0.3:
                n = rng.randrange(1, 1024) * SECTOR
                off = rng.randrange(0, (S - n) // SECTOR) * SECTOR
                punch_hole(lun, off, n)      # tests/fallbacks.py
                model[off:off + n] = bytes(n)
            # the checkpoint: fsync on another descriptor, or dd's own fsync
            if cycle % 2:
                fsync_lun(m, "crash")
            else:
                n = 8 * SECTOR
                off = rng.randrange(0, (S - n) // SECTOR) * SECTOR
                data = rng.randbytes(n)
                (tmp_path / "src.bin").write_bytes(data)
                dd_write(str(tmp_path / "src.bin"), lun, off, n, fsync=True)
                model[off:off + n] = data

            # un-synced (and periodically synced) writes, killed mid-flight
            plan = []
            for _ in range(48):
                n = rng.randrange(1, 257) * SECTOR * rng.choice((1, 1, 8))
                off = rng.randrange(0, (S - n) // SECTOR) * SECTOR
                plan.append((off, n, rng.randrange(1 << 30)))
            plan_path = tmp_path / "plan.json"
            plan_path.write_text(json.dumps(plan))
            progress = tmp_path / f"progress-{cycle}"
            writer = subprocess.Popen([PY, "-c", RAW_WRITER, lun, str(plan_path), str(progress)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: "started" in progress_lines(progress) or writer.poll() is not None,
                     30, "the writer to start")
            assert writer.poll() is None, "the writer died before the crash"
            time.sleep(rng.uniform(0, 0.3))
            m.kill9(then=lambda: end_proc(writer))
            writer = None

            counts = [int(l.split()[1]) for l in progress_lines(progress) if l.startswith("synced")]
            c = max(counts, default=0)
            synced_counts.append(c)
            datas = plan_data(plan)
            base = bytearray(model)          # model + the writes the writer saw fsynced
            for i in range(c):
                off, n, _ = plan[i % len(plan)]
                base[off:off + n] = datas[i % len(plan)]

            m.start()
            with open(lun, "rb") as f:
                actual = f.read()
            assert len(actual) == S
            check_after_crash(actual, bytes(base), plan, datas)
            model = bytearray(actual)
        assert sum(1 for c in synced_counts if c) >= cycles // 2, synced_counts

        # ---- ext4 on a loop device, killed during file writes ----
        m.ok("create", "fs 256M")
        dev = m.attach("fs")
        run(["mkfs.ext4", "-q", dev])
        where = str(tmp_path / "fs")
        m.mount_fs(dev, where)
        durable: dict = {}
        for cycle in range(4):
            durable |= write_files(where, f"c{cycle}", [rng.randrange(1, 4 * MiB)
                                                       for _ in range(3)] + [17], rng)
            run(["sync"])
            progress = tmp_path / f"fsprogress-{cycle}"
            writer = subprocess.Popen([PY, "-c", FS_WRITER, where, str(progress), f"bg{cycle}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: "started" in progress_lines(progress) or writer.poll() is not None,
                     30, "the file writer to start")
            assert writer.poll() is None, "the file writer died before the crash"
            time.sleep(rng.uniform(0.05, 0.5))
            # the writer ends before the lazy unmount: after it, its opens by path
            # would land in the host directory under `where` and fsync there
            m.kill9(then=lambda: end_proc(writer))
            writer = None
            # the lazily unmounted ext4 lets go of its loop device once the writer is gone
            wait_for(lambda: not attached(dev), 30, f"{dev} to be released")
            for l in progress_lines(progress):
                if l.startswith("synced "):
                    p = l.split(" ", 1)[1]
                    durable[p] = sha(fs_writer_file(p))

            m.start()
            dev = m.attach("fs")
            m.mount_fs(dev, where)           # journal replay
            verify_files(durable)
            m.umount_fs(where)
            fsck_clean(dev)
            m.mount_fs(dev, where)
        assert any(os.path.basename(p).startswith("bg") for p in durable), \
            "no background file was ever fsynced before a crash"
        m.umount_fs(where)
        m.detach("fs", dev)
    finally:
        end_proc(writer)
