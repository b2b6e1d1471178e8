"""Packs end to end (issue 4), by fault injection against real mounts:
mirror and RAID-5 layouts over disk directories, a disk that vanishes (its
directory removed, its segments deleted, its label garbled), bit rot found by
reads and by scrub, two disks gone, recover (with progress, throttle, pause,
cancel, SIGKILL in the middle, a stale copy of a disk, a disk with an
invalid label), replace, the status views, a pack that fills up, and bad
input.

Every LUN has a model (a bytearray) and every check compares the whole LUN
with it byte for byte. The mounts use a 2 MiB block cache, so a full read of
a LUN comes from the disks and not from the daemon's memory; the host's page
cache is dropped before reads that must hit the disks.

`check_redundancy` is the invariant checker: it reads the committed block
index from the catalogue and checks, on the disk files themselves, that every
block has all its mirror copies (header and hash) or, for RAID-5, that it
reads back from the data chunks under the rotating layout and that every row
of every segment XORs to zero (data and parity agree).
"""
import errno
import fcntl
import glob
import json
import mmap
import os
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import time

import pytest
import xxhash

from fusearray import ctlclient
from conftest import Mount, cli, drop_caches, run, wait_for
from fallbacks import punch_hole
from fusearray import native

MiB = 1 << 20
CHUNK = 64 << 10                  # RAID-5 stripe unit (README: 64 KiB chunks)
BS = 64 << 10                     # LUN block size (default)
HDR = struct.Struct("<4s16sI")    # segment record header: magic, id, length
MAGIC = b"FAB1"
CACHE = 2 * MiB                   # daemon block cache: reads reach the disks
DISK_WAIT = 12.0                  # disks are checked every ~2 s


# ---- helpers -----------------------------------------------------------------------
def sh(script: str, check=True) -> subprocess.CompletedProcess:
    return run(["bash", "-c", script], check=check)


def new_mount(make_mount, tmp_path, *packs, sub="a") -> tuple[Mount, dict]:
    """Init an array with packs given as (name, layout, [disk names]) and
    start it. Returns the mount and {disk name: absolute path}."""
    disks = {}
    args = []
    for name, layout, names in packs:
        paths = [str(tmp_path / "disks" / n) for n in names]
        disks.update(zip(names, paths))
        args += ["--pack", f"{name}={layout}:{','.join(paths)}"]
    m = make_mount(sub, cache_size=CACHE)
    m.init(*args).start()
    return m, disks


class Lun:
    """A LUN and its model."""

    def __init__(self, m: Mount, name: str, size: int, pack: str):
        m.ok("create", f"{name} {size} pack={pack}")
        self.m, self.name, self.pack = m, name, pack
        self.data = bytearray(size)

    @property
    def path(self) -> str:
        return self.m.path("luns", self.name)

    def write(self, off: int, data: bytes, fsync: bool = True) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for i in range(0, len(data), MiB):
                piece = data[i:i + MiB]
                assert os.pwrite(fd, piece, off + i) == len(piece)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.data[off:off + len(data)] = data

    def fill(self, off: int, n: int) -> None:
        self.write(off, os.urandom(n))

    def read(self) -> bytes:
        out = bytearray()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while len(out) < len(self.data):
                chunk = os.pread(fd, 4 * MiB, len(out))
                assert chunk, f"short read of {self.name} at {len(out)}"
                out += chunk
        finally:
            os.close(fd)
        return bytes(out)

    def check(self, what: str = "") -> None:
        got = self.read()
        if got != self.data:
            bad = next(i for i in range(0, len(got), BS)
                       if got[i:i + BS] != self.data[i:i + BS])
            raise AssertionError(f"LUN {self.name} differs from its model at block "
                                 f"{bad // BS} (offset {bad}) {what}")

    def blocks(self) -> set:
        return {bytes(self.data[i:i + BS]) for i in range(0, len(self.data), BS)}


def status_pack(m: Mount, name: str) -> dict | None:
    return next((p for p in m.status()["packs"] if p["name"] == name), None)


def disk_states(m: Mount, pack: str) -> list[str]:
    return [d["state"] for d in status_pack(m, pack)["disks"]]


def wait_pack(m: Mount, pack: str, state: str, disks: list[str] | None = None,
              timeout: float = DISK_WAIT) -> dict:
    def ok():
        p = status_pack(m, pack)
        return p["state"] == state and (disks is None or
                                        [d["state"] for d in p["disks"]] == disks) and p
    try:
        return wait_for(ok, timeout, f"pack {pack} {state} {disks}")
    except AssertionError:
        raise AssertionError(f"pack {pack}: wanted {state} {disks}, got "
                             f"{status_pack(m, pack)}") from None


def status_text(m: Mount) -> str:
    return m.view("status")


def events_since(m: Mount, mark: int) -> list[str]:
    return m.events().splitlines()[mark:]


def wait_event(m: Mount, mark: int, pred, timeout: float = 5.0) -> list[str]:
    """Events after `mark` that match (events from disk checks are logged
    shortly after the state changes)."""
    try:
        return wait_for(lambda: [l for l in events_since(m, mark) if pred(l)], timeout,
                        "an event")
    except AssertionError:
        raise AssertionError(f"no such event in {events_since(m, mark)}") from None


def event_mark(m: Mount) -> int:
    return len(m.events().splitlines())





def recover_throttled(m: Mount, pack: str, rate: str = "5M") -> str:
    """`recover PACK` then at once `throttle JOB RATE`, the files opened
    beforehand so the throttle lands before much is copied."""
    fr = os.open(m.path("ctl", "recover"), os.O_RDWR)
    ft = os.open(m.path("ctl", "throttle"), os.O_RDWR)
    try:
        os.write(fr, f"{pack}\n".encode())
        reply = ctlclient.parse_reply(os.read(fr, 4096))
        assert reply.get("status") == "ok", reply
        os.write(ft, f"{reply['job']} {rate}\n".encode())
        assert os.read(ft, 4096).startswith(b"status=ok")
    finally:
        os.close(fr)
        os.close(ft)
    return reply["job"]


def seg_files(disk: str) -> list[str]:
    return sorted(glob.glob(os.path.join(disk, "segments", "*.seg")))


def seed_of(m: Mount) -> int:
    with open(os.path.join(m.array, "array.json")) as f:
        return json.load(f)["seed"]


def block_rows(m: Mount, pack: str) -> list[tuple[bytes, int, int, int]]:
    """The committed block index of a pack: (id, seg, off, len)."""
    db = sqlite3.connect(f"file:{m.array}/catalogue.db?mode=ro", uri=True)
    try:
        return [(bytes(r[0]), r[1], r[2], r[3]) for r in
                db.execute("SELECT id, seg, off, len FROM blocks WHERE pack=? "
                           "ORDER BY seg, off", (pack,))]
    finally:
        db.close()


def seg_path(disk: str, seg: int) -> str:
    return os.path.join(disk, "segments", f"{seg:08d}.seg")


def r5_place(nd: int, loff: int) -> tuple[int, int]:
    """RAID-5 placement (README): rows of k = nd-1 data chunks plus one
    parity chunk; the parity disk of row r is r % nd and the data chunks
    follow it. Returns (disk, offset in the disk's file)."""
    k = nd - 1
    row, w = divmod(loff, k * CHUNK)
    j, o = divmod(w, CHUNK)
    return (row % nd + 1 + j) % nd, row * CHUNK + o


def r5_read(files: list, loff: int, n: int) -> bytes:
    out = []
    while n > 0:
        di, doff = r5_place(len(files), loff)
        take = min(CHUNK - (loff % CHUNK), n)
        piece = os.pread(files[di], take, doff)
        out.append(piece + bytes(take - len(piece)))
        loff += take
        n -= take
    return b"".join(out)


def pread_file(path: str, n: int, off: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def check_redundancy(m: Mount, pack: str, disks: list[str], layout: str) -> dict:
    """The invariant after a rebuild: every committed block has all its
    copies / consistent parity on every disk. Returns statistics."""
    seed = seed_of(m)
    rows = block_rows(m, pack)
    assert rows, f"pack {pack} has no blocks"
    by_seg: dict = {}
    for r in rows:
        by_seg.setdefault(r[1], []).append(r)
    stats = {"blocks": len(rows), "parity_rows": [0] * len(disks),
             "data_pieces": [0] * len(disks)}
    for seg, recs in by_seg.items():
        files = []
        try:
            for d in disks:
                assert os.path.exists(seg_path(d, seg)), f"{seg_path(d, seg)} is missing"
                files.append(os.open(seg_path(d, seg), os.O_RDONLY))
            for bid, _, off, n in recs:
                if layout == "mirror":
                    copies = [os.pread(fd, HDR.size + n, off - HDR.size) for fd in files]
                else:
                    copies = [r5_read(files, off - HDR.size, HDR.size + n)]
                    for pos in range(off - HDR.size, off + n, CHUNK):
                        stats["data_pieces"][r5_place(len(disks), pos)[0]] += 1
                for d, c in zip(disks, copies):
                    assert HDR.unpack(c[:HDR.size]) == (MAGIC, bid, n), \
                        f"bad record header of block {bid.hex()} seg {seg} off {off} on {d}"
                    assert xxhash.xxh3_128_digest(c[HDR.size:], seed) == bid, \
                        f"block {bid.hex()} seg {seg} off {off} on {d} does not match its hash"
            if layout == "raid5":
                size = max(os.fstat(fd).st_size for fd in files)
                for row in range(-(-size // CHUNK)):
                    acc = 0
                    for fd in files:
                        acc ^= int.from_bytes(os.pread(fd, CHUNK, row * CHUNK), "little")
                    assert acc == 0, f"pack {pack} seg {seg} row {row}: parity does not match"
                    stats["parity_rows"][row % len(disks)] += 1
        finally:
            for fd in files:
                os.close(fd)
    return stats


def data_rows(m: Mount, lun: Lun, layout: str, disks: list[str]):
    """Committed index rows of the pack that hold blocks of `lun` (not map
    nodes), read from a good copy."""
    want = lun.blocks()
    out = []
    for bid, seg, off, n in block_rows(m, lun.pack):
        if n != BS:
            continue
        if layout == "mirror":
            data = pread_file(seg_path(disks[0], seg), n, off)
        else:
            files = [os.open(seg_path(d, seg), os.O_RDONLY) for d in disks]
            try:
                data = r5_read(files, off, n)
            finally:
                for fd in files:
                    os.close(fd)
        if data in want:
            out.append((bid, seg, off, n))
    return out


def flip(path: str, pos: int) -> int:
    """Invert one byte of a file; returns its old value."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, pos)[0]
        os.pwrite(fd, bytes([old ^ 0xFF]), pos)
        os.fsync(fd)
    finally:
        os.close(fd)
    return old


def rot(m: Mount, lun: Lun, layout: str, disks: list[str], target: int, nblocks: int,
        rng: random.Random, per_block: int = 3) -> list[tuple[str, int, int]]:
    """Flip `per_block` bytes at random places inside the data of `nblocks`
    distinct blocks of `lun`, on disk `target` only. Returns (file, pos,
    original byte)."""
    rows = data_rows(m, lun, layout, disks)
    assert len(rows) >= nblocks
    done = []
    for bid, seg, off, n in rng.sample(rows, len(rows)):
        places = []
        for _ in range(200):
            i = rng.randrange(n)
            if layout == "mirror":
                places.append(off + i)
            else:
                di, doff = r5_place(len(disks), off + i)
                if di == target:
                    places.append(doff)
            if len(places) == per_block:
                break
        if len(places) < per_block or len(set(places)) < per_block:
            continue
        path = seg_path(disks[target], seg)
        done += [(path, p, flip(path, p)) for p in places]
        nblocks -= 1
        if not nblocks:
            return done
    raise AssertionError("could not place the rot")


def restored(places) -> bool:
    return all(pread_file(path, 1, pos)[0] == old for path, pos, old in places)


# ---- 1. layouts and placement ------------------------------------------------------
def test_layouts_mirror_raid5_addpack_placement(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    more = [str(tmp_path / "disks" / f) for f in ("f1", "f2", "f3")]
    assert m.ok("addpack", f"more mirror {','.join(more)}") == {"status": "ok", "pack": "more"}
    st = m.status()
    assert [(p["name"], p["layout"], p["state"]) for p in st["packs"]] == \
        [("fast", "mirror", "healthy"), ("cheap", "raid5", "healthy"),
         ("more", "mirror", "healthy")]
    assert [d["path"] for d in st["packs"][1]["disks"]] == [disks[e] for e in ("e1", "e2", "e3")]
    assert [(d["id"], d["path"], d["state"]) for d in st["packs"][2]["disks"]] == \
        [(i, p, "online") for i, p in enumerate(more)]
    assert any("added pack more: mirror" in l for l in m.events().splitlines())

    luns = {p: Lun(m, f"x{p}", 64 * MiB, p) for p in ("fast", "cheap", "more")}
    for lun in luns.values():
        lun.fill(0, 24 * MiB)
        lun.fill(40 * MiB + 4096, 3 * MiB + 512)       # unaligned, crossing blocks
        assert os.getxattr(lun.path, "user.fusearray.pack").decode() == lun.pack
    drop_caches()
    for lun in luns.values():
        lun.check()

    # mirror: every disk holds every block (the same segment files)
    for pack, names in (("fast", [disks["d1"], disks["d2"]]), ("more", more)):
        s = check_redundancy(m, pack, names, "mirror")
        assert s["blocks"] >= 27 * MiB // BS
        sizes = {tuple(os.path.getsize(f) for f in seg_files(d)) for d in names}
        assert len(sizes) == 1 and sum(next(iter(sizes))) > 27 * MiB, sizes
    # raid5: every disk holds data and parity, in equal shares
    e = [disks[x] for x in ("e1", "e2", "e3")]
    s = check_redundancy(m, "cheap", e, "raid5")
    assert min(s["parity_rows"]) > 0 and min(s["data_pieces"]) > 0, s
    assert max(s["parity_rows"]) - min(s["parity_rows"]) <= 1, s
    # each disk holds half of what one mirror copy holds (k = 2): the pack
    # stores 3/2 of the data, not 2x or 3x
    copy = sum(os.path.getsize(f) for f in seg_files(disks["d1"]))
    totals = [sum(os.path.getsize(f) for f in seg_files(d)) for d in e]
    assert max(totals) - min(totals) <= 2 * CHUNK, totals
    assert all(abs(t - copy / 2) < copy * 0.05 for t in totals), (totals, copy)
    used = status_pack(m, "cheap")["used_bytes"]
    assert abs(used - 1.5 * copy) < copy * 0.1, (used, copy)


# ---- 2. one disk vanishes ----------------------------------------------------------
@pytest.mark.parametrize("fault", ["removed", "emptied", "garbled-label"])
def test_one_disk_vanishes_io_goes_on(make_mount, tmp_path, fault):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    fast = Lun(m, "lf", 64 * MiB, "fast")
    cheap = Lun(m, "lc", 64 * MiB, "cheap")
    for lun in (fast, cheap):
        lun.fill(0, 20 * MiB)
    # disk 0 of the mirror (the one reads go to first), disk 1 of the raid5
    victims = {"fast": (0, disks["d1"]), "cheap": (1, disks["e2"])}
    mark = event_mark(m)
    for _, d in victims.values():
        if fault == "removed":
            shutil.rmtree(d)
        elif fault == "emptied":
            for f in os.listdir(os.path.join(d, "segments")):
                os.unlink(os.path.join(d, "segments", f))
        else:
            with open(os.path.join(d, "fusearray-disk.json"), "wb") as f:
                f.write(os.urandom(64))
    wait_pack(m, "fast", "degraded")
    wait_pack(m, "cheap", "degraded")
    for pack, (idx, d) in victims.items():
        ev = wait_event(m, mark, lambda l: f"disk {idx} of pack {pack} ({d})" in l)
        assert " error " in ev[0], ev
        assert f"recover {pack}" in ev[0] and f"replace {pack} {idx}" in ev[0], ev[0]
        assert "degraded" in ev[0], ev[0]

    drop_caches()
    for lun in (fast, cheap):
        lun.check(f"with a disk {fault}")
    # writes go on, and read back (from the disks that are left)
    for lun in (fast, cheap):
        lun.fill(8 * MiB + 12345, 6 * MiB)
        lun.fill(30 * MiB, 10 * MiB)
    drop_caches()
    for lun in (fast, cheap):
        lun.check(f"after writes with a disk {fault}")
    if fault == "removed":
        assert not os.path.exists(disks["d1"])     # nothing wrote into the gone disk
    # an unreadable label is `invalid` (DESIGN 5), listed under INVALID;
    # a disk whose directory or files are gone is `missing`
    want = "invalid" if fault == "garbled-label" else "missing"
    assert disk_states(m, "fast") == [want, "online"], m.status()["packs"]
    assert disk_states(m, "cheap") == ["online", want, "online"], m.status()["packs"]
    if fault == "garbled-label":
        inv = status_pack(m, "INVALID")
        assert inv is not None, m.status()["packs"]
        assert sorted((d["pack"], d["id"]) for d in inv["disks"]) == [("cheap", 1), ("fast", 0)]


# ---- 2b. bit rot found by reads is repaired in place ---------------------------------
def test_bit_rot_repaired_on_read(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    rng = random.Random(4)
    fast = Lun(m, "lf", 32 * MiB, "fast")
    cheap = Lun(m, "lc", 32 * MiB, "cheap")
    for lun in (fast, cheap):
        lun.fill(0, 24 * MiB)
    dd = [disks["d1"], disks["d2"]]
    ee = [disks["e1"], disks["e2"], disks["e3"]]
    # 5 blocks each, 3 bytes each (below the 8 errors that fail a disk)
    rot_fast = rot(m, fast, "mirror", dd, 0, 5, rng)
    rot_cheap = rot(m, cheap, "raid5", ee, 2, 5, rng)
    assert not restored(rot_fast) and not restored(rot_cheap)
    mark = event_mark(m)
    drop_caches()
    fast.check("with rot on disk 0")
    cheap.check("with rot on disk 2")
    new = events_since(m, mark)
    for pack, idx in (("fast", 0), ("cheap", 2)):
        rep = [l for l in new if f"disk {idx} of pack {pack}" in l and "repaired" in l]
        assert len(rep) == 5, (pack, new)
    # repaired in place: the rotted bytes hold their old values again
    assert restored(rot_fast) and restored(rot_cheap)
    check_redundancy(m, "fast", dd, "mirror")
    check_redundancy(m, "cheap", ee, "raid5")
    mark = event_mark(m)
    drop_caches()
    fast.check("second read")
    cheap.check("second read")
    assert not [l for l in events_since(m, mark) if "repaired" in l]
    assert [p["state"] for p in m.status()["packs"]] == ["healthy", "healthy"]


def read_direct(lun: Lun) -> bytes:
    """The LUN read with O_DIRECT 1 MiB reads: every one reaches the daemon."""
    out = bytearray()
    fd = os.open(lun.path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)                    # page-aligned
    try:
        while len(out) < len(lun.data):
            assert os.preadv(fd, [buf], len(out)) == MiB
            out += buf
    finally:
        buf.close()
        os.close(fd)
    return bytes(out)


def test_raid5_reads_from_mapped_files_and_rot_found_there(make_mount, tmp_path):
    """Large reads of a RAID-5 LUN take each block's pieces where they lie
    in the disks' segment files (mapped, checked against the block's hash;
    status.json counts them) when the pages are in memory. A rotted piece
    fails that check: the read still returns the right bytes, rebuilt and
    repaired from parity, with an event."""
    m, disks = new_mount(make_mount, tmp_path, ("cheap", "raid5", ["e1", "e2", "e3"]))
    lun = Lun(m, "lc", 32 * MiB, "cheap")
    lun.fill(0, 24 * MiB)
    m.stop()                   # an empty block cache; the segment files stay in memory
    m.start()
    assert read_direct(lun) == lun.data
    assert read_direct(lun) == lun.data
    if native.ENABLED:
        assert status_pack(m, "cheap")["mapped_reads"] >= 24 * MiB // BS
    else:       # FUSEARRAY_NATIVE=0: no verify_mapped, every block read the ordinary way
        assert status_pack(m, "cheap")["mapped_reads"] == 0
    ee = [disks["e1"], disks["e2"], disks["e3"]]
    places = rot(m, lun, "raid5", ee, 1, 3, random.Random(7))
    mark = event_mark(m)
    assert read_direct(lun) == lun.data
    rep = [l for l in events_since(m, mark) if "disk 1 of pack cheap" in l and "repaired" in l]
    assert len(rep) == 3, events_since(m, mark)
    assert restored(places)


# ---- 3. two disks gone: failed, EIO, never wrong data --------------------------------
def test_two_disks_gone_pack_failed_eio_never_wrong_data(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]),
                         ("safe", "mirror", ["s1", "s2"]))
    fast = Lun(m, "lf", 16 * MiB, "fast")
    cheap = Lun(m, "lc", 16 * MiB, "cheap")
    safe = Lun(m, "ls", 16 * MiB, "safe")
    for lun in (fast, cheap, safe):
        lun.fill(0, 8 * MiB)                     # the second half is never written
    mark = event_mark(m)
    for d in ("d1", "d2", "e1", "e3"):
        shutil.rmtree(disks[d])
    wait_pack(m, "fast", "failed", ["missing", "missing"])
    wait_pack(m, "cheap", "failed", ["missing", "online", "missing"])
    wait_event(m, mark, lambda l: "of pack fast" in l and "the pack is failed" in l)
    # raid5 blocks whose data lies wholly on the disk left are unaffected
    seed = seed_of(m)
    where = {bid: (off, n) for bid, _, off, n in block_rows(m, "cheap")}
    unaffected = set()
    for off in range(0, 8 * MiB, BS):
        boff, n = where[xxhash.xxh3_128_digest(bytes(cheap.data[off:off + BS]), seed)]
        if {r5_place(3, x)[0] for x in (boff, boff + n - 1)} | \
                {r5_place(3, x)[0] for x in range(boff - boff % CHUNK + CHUNK,
                                                 boff + n, CHUNK)} == {1}:
            unaffected.add(off)
    assert unaffected
    drop_caches()
    for lun in (fast, cheap):
        fd = os.open(lun.path, os.O_RDONLY)
        eio = 0
        try:
            for off in range(0, len(lun.data), BS):
                try:
                    got = os.pread(fd, BS, off)
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    assert lun is fast or off not in unaffected, \
                        f"block at {off} lies on the disk that is left, yet EIO"
                    eio += 1
                    continue
                assert got == lun.data[off:off + BS], \
                    f"{lun.name}: a read at {off} returned wrong data"
        finally:
            os.close(fd)
        assert eio >= 8 * MiB // BS // 2, (lun.name, eio)
    assert any("EIO" in l and "pack fast" in l for l in events_since(m, mark))
    # the mount stays up: status answers, the other pack reads and writes right
    assert status_pack(m, "safe")["state"] == "healthy"
    safe.fill(10 * MiB, 2 * MiB)
    drop_caches()
    safe.check()

    # writes to the failed pack fail (EIO, "the array could not do it"),
    # and do not take the other packs down with them
    problems = []
    mark = event_mark(m)
    fd = os.open(fast.path, os.O_WRONLY)
    err = 0
    try:
        for i in range(8):
            os.pwrite(fd, os.urandom(MiB), i * MiB)
        os.fsync(fd)
    except OSError as e:
        err = e.errno
    finally:
        os.close(fd)
    assert err, "writes to a failed pack succeeded"
    if err != errno.EIO:
        problems.append(f"a write to failed pack fast: {errno.errorcode[err]}, want EIO")
    ev = wait_event(m, mark, lambda l: "pack fast" in l and ("full" in l or "writ" in l))
    full = [l for l in ev if "pack fast is full" in l]
    if full:
        problems.append(f"a write to failed pack fast is logged as a full pack: {full[0]}")
    try:
        safe.fill(12 * MiB, MiB)
    except OSError as e:
        problems.append(f"after a write to failed pack fast, a write to healthy pack "
                        f"safe fails: {e}")
    drop_caches()
    safe.check()
    assert not problems, "\n".join(problems)


# ---- 4. recover ----------------------------------------------------------------------
def test_recover_progress_events_throttle_and_io(make_mount, tmp_path):
    """A disk comes back empty; `recover` is a job whose percent is honest,
    which logs an event at start, every 10 % and end, obeys throttle, and
    lets I/O go on. Afterwards the redundancy is really there. (The data
    here fits in the pack's first segment, as on any young pack.)"""
    m, disks = new_mount(make_mount, tmp_path, ("fast", "mirror", ["d1", "d2"]))
    lun = Lun(m, "l0", 64 * MiB, "fast")
    lun.fill(0, 48 * MiB)
    shutil.rmtree(disks["d1"])
    wait_pack(m, "fast", "degraded", ["missing", "online"])
    lun.fill(50 * MiB, 2 * MiB)
    os.mkdir(disks["d1"])
    mark = event_mark(m)
    problems = []
    t0 = time.monotonic()
    jid = recover_throttled(m, "fast", "5M")
    seen = []
    while time.monotonic() - t0 < 2.5:
        j = m.job(jid)
        seen.append((j["state"], int(j["percent"]), int(j["done_bytes"]),
                     int(j["total_bytes"]), round(time.monotonic() - t0, 2)))
        if j["state"] == "done":
            break
        time.sleep(0.1)
    assert [s[2] for s in seen] == sorted(s[2] for s in seen), seen
    total = max(s[3] for s in seen)
    assert 48 * MiB <= total < 60 * MiB, seen        # the work: what disk 0 lacks
    running = [s for s in seen if s[0] == "running" and 0 < s[1] < 100]
    if not running:
        problems.append("the job never showed a percent between 0 and 100 (polled every "
                        f"0.1 s): (state, percent, done, total, t): {seen}")
    elif len(running) > 2:
        rate = (running[-1][2] - running[0][2]) / (running[-1][4] - running[0][4])
        if rate > 12 * MiB:
            problems.append(f"`throttle {jid} 5M` did not hold: {rate / MiB:.0f} MiB/s")
    if seen[-1][0] == "done":
        problems.append(f"`throttle {jid} 5M` did not hold: {total / MiB:.0f} MiB rebuilt "
                        f"in {seen[-1][4]} s")
    # I/O goes on while it runs
    lun.fill(52 * MiB, 3 * MiB)
    lun.check("during recover")
    if m.job(jid)["state"] == "running":
        assert m.ok("throttle", f"{jid} 0")["state"] == "running"
    j = m.wait_job(jid)
    assert j["percent"] == "100" and j["done_bytes"] == j["total_bytes"], j
    evs = [l for l in events_since(m, mark) if f"job {jid} " in l]
    assert any("started" in l for l in evs), evs
    assert "done" in evs[-1] and "healthy" in evs[-1], evs
    steps = [int(x) for l in evs for x in re.findall(r": (\d+)% \(", l)]
    if steps != list(range(10, 100, 10)):
        problems.append(f"progress events at {steps} %, not every 10 %: {evs}")
    wait_pack(m, "fast", "healthy", ["online", "online"], timeout=3)
    check_redundancy(m, "fast", [disks["d1"], disks["d2"]], "mirror")
    lun.check("after recover")
    shutil.rmtree(disks["d2"])                       # the rebuilt disk alone
    wait_pack(m, "fast", "degraded", ["online", "missing"])
    drop_caches()
    lun.check("from the rebuilt disk alone")
    assert not problems, "recover progress:\n" + "\n".join(problems)


def big_degraded(make_mount, tmp_path, lose: dict):
    """A mirror and a raid5 pack with more than a 64 MiB segment of data each
    (so the rebuild has sealed segments to work through), then the disks in
    `lose` ({pack: disk name}) removed."""
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    luns = {}
    for pack in lose:
        luns[pack] = Lun(m, f"l{pack}", 160 * MiB, pack)
        luns[pack].fill(0, (100 if pack == "fast" else 140) * MiB)
    for pack, d in lose.items():
        shutil.rmtree(disks[d])
    for pack, d in lose.items():
        want = ["online"] * (2 if pack == "fast" else 3)
        want[int(d[1]) - 1] = "missing"
        wait_pack(m, pack, "degraded", want)
    return m, disks, luns


def test_recover_pause_resume_cancel_and_second_recover(make_mount, tmp_path):
    m, disks, luns = big_degraded(make_mount, tmp_path, {"cheap": "e2"})
    lun = luns["cheap"]
    lun.fill(100 * MiB, 2 * MiB)
    os.mkdir(disks["e2"])
    mark = event_mark(m)
    jid = recover_throttled(m, "cheap", "5M")
    j = wait_for(lambda: (j := m.job(jid))["state"] == "running" and
                 0 < int(j["percent"]) < 100 and j, 10, "recover to make progress")
    assert j["kind"] == "recover" and int(j["total_bytes"]) > 64 * MiB, j
    # status: the pack, its disks and a progress bar for the job
    text = status_text(m)
    assert re.search(r"^  cheap: raid5 degraded", text, re.M), text
    assert re.search(r"^    disk 1 stale +" + re.escape(disks["e2"]), text, re.M), text
    assert re.search(rf"^  {jid} recover running \[#* *\] \d+%$", text, re.M), text
    assert disk_states(m, "cheap") == ["online", "stale", "online"]
    assert [x for x in m.status()["jobs"] if str(x["id"]) == jid][0]["state"] == "running"

    assert m.ok("pause", jid)["state"] == "paused"
    time.sleep(1.0)                   # a piece in flight may finish (<= 0.8 s throttle wait)
    held = m.job(jid)
    time.sleep(1.0)
    now = m.job(jid)
    assert now["state"] == "paused" and now["done_bytes"] == held["done_bytes"], (held, now)
    text = status_text(m)
    assert re.search(rf"^  {jid} recover paused \[#* *\] {now['percent']}%$", text, re.M)
    lun.fill(3 * MiB, MiB)            # I/O goes on while it is paused
    lun.check("recover paused")
    m.ok("resume", jid)
    wait_for(lambda: int(m.job(jid)["done_bytes"]) > int(now["done_bytes"]), 10,
             "progress after resume")
    assert m.ok("cancel", jid)
    j = m.wait_job(jid, ("cancelled",), 10)
    assert 0 < int(j["percent"]) < 100, j
    assert any(f"job {jid} (recover) cancelled" in l for l in events_since(m, mark))
    # still degraded (the disk has not rejoined), still right
    p = status_pack(m, "cheap")
    assert p["state"] == "degraded" and p["disks"][1]["state"] != "online", p
    drop_caches()
    lun.check("after cancel")
    lun.fill(20 * MiB, 2 * MiB)
    # a second recover finishes the work
    jid2 = m.ok("recover", "cheap")["job"]
    assert jid2 != jid
    m.wait_job(jid2, timeout=60)
    wait_pack(m, "cheap", "healthy", ["online"] * 3, timeout=3)
    ee = [disks[x] for x in ("e1", "e2", "e3")]
    check_redundancy(m, "cheap", ee, "raid5")
    shutil.rmtree(disks["e3"])
    wait_pack(m, "cheap", "degraded", ["online", "online", "missing"])
    drop_caches()
    lun.check("with disk 2 gone after the rebuild of disk 1")


def test_recover_survives_sigkill(make_mount, tmp_path):
    m, disks, luns = big_degraded(make_mount, tmp_path, {"fast": "d2"})
    lun = luns["fast"]
    os.mkdir(disks["d2"])
    jid = recover_throttled(m, "fast", "5M")
    wait_for(lambda: 0 < int(m.job(jid)["percent"]) < 90, 10, "recover under way")
    lun.fill(104 * MiB, 2 * MiB)      # I/O meanwhile (its fsync commits the job's row)
    time.sleep(2.0)
    lun.fill(106 * MiB, MiB)          # and again, with some progress made
    before = m.job(jid)
    assert before["state"] == "running" and 0 < int(before["percent"]) < 50, before
    m.kill9()
    m.start()
    mark = next(i for i, l in reversed(list(enumerate(m.events().splitlines())))
                if "array opened" in l)
    # usable at once: degraded (the disk has not rejoined), right data, writes work
    p = status_pack(m, "fast")
    assert p["state"] == "degraded" and p["disks"][0]["state"] == "online", p
    assert p["disks"][1]["state"] in ("stale", "missing"), p
    # the job resumes where it was, still throttled
    j = m.job(jid)
    assert j["state"] == "running" and j["rate_limit"] == str(5 * MiB), j
    assert any(f"job {jid} (recover) resumes at" in l for l in m.events().splitlines())
    drop_caches()
    lun.check("after SIGKILL mid-recover")
    lun.fill(110 * MiB, 4 * MiB)
    assert m.job(jid)["state"] == "running" and status_pack(m, "fast")["state"] == "degraded"
    m.ok("throttle", f"{jid} 0")
    m.wait_job(jid)
    evs = [l for l in events_since(m, mark) if f"job {jid} " in l]
    steps = [int(x) for l in evs for x in re.findall(r": (\d+)% \(", l)]
    assert steps and steps == list(range(steps[0], 100, 10)), evs   # every 10 % from where it was
    assert "done" in evs[-1], evs
    wait_pack(m, "fast", "healthy", ["online", "online"], timeout=5)
    dd = [disks["d1"], disks["d2"]]
    check_redundancy(m, "fast", dd, "mirror")
    shutil.rmtree(disks["d1"])
    wait_pack(m, "fast", "degraded", ["missing", "online"])
    drop_caches()
    lun.check("from the disk rebuilt across a SIGKILL")


def test_recover_stale_disk_copies_only_what_changed(make_mount, tmp_path):
    """An old copy of a disk comes back: it is `stale`, and recover copies
    the segments written since it left, not the whole disk."""
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    fast = Lun(m, "lf", 128 * MiB, "fast")
    cheap = Lun(m, "lc", 160 * MiB, "cheap")
    fast.fill(0, 80 * MiB)            # a sealed 64 MiB segment and more
    cheap.fill(0, 140 * MiB)          # two sealed segments and more
    old = tmp_path / "old"
    old.mkdir()
    for d in ("d1", "e3"):
        run(["cp", "-a", disks[d], str(old / d)])
    shutil.rmtree(disks["d1"])
    shutil.rmtree(disks["e3"])
    wait_pack(m, "fast", "degraded", ["missing", "online"])
    wait_pack(m, "cheap", "degraded", ["online", "online", "missing"])
    fast.fill(80 * MiB, 10 * MiB)
    fast.fill(5 * MiB, 2 * MiB)       # overwrite old data too
    cheap.fill(140 * MiB, 6 * MiB)
    cheap.fill(1 * MiB, 3 * MiB)
    mark = event_mark(m)
    for d in ("d1", "e3"):
        run(["cp", "-a", str(old / d), disks[d]])
    wait_pack(m, "fast", "degraded", ["stale", "online"])
    wait_pack(m, "cheap", "degraded", ["online", "online", "stale"])
    assert m.status()["packs"][0]["disks"][0]["state"] == "stale"
    wait_event(m, mark, lambda l: "disk 0 of pack fast" in l and "older" in l
               and "recover fast" in l)
    drop_caches()
    fast.check("with a stale disk back")
    cheap.check("with a stale disk back")
    for pack, lun, dd, gone, lay in (
            ("fast", fast, ["d1", "d2"], "d2", "mirror"),
            ("cheap", cheap, ["e1", "e2", "e3"], "e1", "raid5")):
        paths = [disks[x] for x in dd]
        full = sum(os.path.getsize(f) for f in seg_files(disks[gone]))
        jid = m.ok("recover", pack)["job"]
        j = m.wait_job(jid)
        assert 0 < int(j["total_bytes"]) < full * 0.75, (pack, j, full)
        wait_pack(m, pack, "healthy", timeout=3)
        check_redundancy(m, pack, paths, lay)
        shutil.rmtree(disks[gone])
        wait_pack(m, pack, "degraded")
        drop_caches()
        lun.check(f"from the recovered stale disk of {pack}")


def test_invalid_label_disk_listed_under_INVALID_rejoins_via_recover(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path, ("fast", "mirror", ["d1", "d2"]))
    lun = Lun(m, "l0", 32 * MiB, "fast")
    lun.fill(0, 20 * MiB)
    m.stop()
    label = os.path.join(disks["d2"], "fusearray-disk.json")
    with open(label, "w") as f:
        f.write('{"array": "not json')
    m.start()
    p = status_pack(m, "fast")
    assert p["state"] == "degraded" and [d["state"] for d in p["disks"]] == \
        ["online", "invalid"], p
    inv = status_pack(m, "INVALID")
    assert inv and [(d["pack"], d["id"], d["path"], d["state"]) for d in inv["disks"]] == \
        [("fast", 1, disks["d2"], "invalid")], inv
    text = status_text(m)
    assert re.search(r"^  INVALID: ", text, re.M) and "disk 1 invalid" in text, text
    assert any("pack fast" in l and "disk 1 invalid" in l and "recover fast" in l
               for l in m.events().splitlines()), m.events()
    lun.check("with an invalid disk")
    lun.fill(21 * MiB, 3 * MiB)
    jid = m.ok("recover", "fast")["job"]
    m.wait_job(jid)
    wait_pack(m, "fast", "healthy", ["online", "online"], timeout=3)
    assert status_pack(m, "INVALID") is None
    with open(label) as f:
        assert json.load(f)["pack"] == "fast"
    check_redundancy(m, "fast", [disks["d1"], disks["d2"]], "mirror")
    shutil.rmtree(disks["d1"])
    wait_pack(m, "fast", "degraded", ["missing", "online"])
    drop_caches()
    lun.check("from the disk that rejoined")


# ---- 5. replace ---------------------------------------------------------------------
def test_single_pack_disk_away_and_back_rejoins_with_recover(make_mount, tmp_path):
    """A single pack's one directory goes away (an unmounted disk, a
    cluster that stopped answering) and comes back whole: nothing could be
    written meanwhile, so `recover` brings it online at once with nothing
    lost, rather than calling its data lost for want of another copy; at
    the next mount too. A directory that comes back without its segments
    is refused with the names of what is missing."""
    m, disks = new_mount(make_mount, tmp_path, ("one", "single", ["o1"]))
    lun = Lun(m, "v", 8 * MiB, "one")
    lun.fill(0, 6 * MiB)
    m.ok("sync", "all")
    away = disks["o1"] + ".away"
    os.rename(disks["o1"], away)
    wait_pack(m, "one", "failed", ["missing"])
    drop_caches()
    with pytest.raises(OSError) as e:
        lun.read()
    assert e.value.errno == errno.EIO
    err, reply = m.ctl("recover", "one")
    assert err == errno.EIO and "still missing" in reply["message"], reply
    os.rename(away, disks["o1"])
    wait_pack(m, "one", "failed", ["stale"])
    job = m.ok("recover", "one")
    assert job["state"] == "done", job
    assert disk_states(m, "one") == ["online"] and status_pack(m, "one")["state"] == "healthy"
    assert "is back with every segment" in m.events()
    lun.check("after the disk came back")
    lun.fill(MiB, MiB)
    # gone at a mount: the pack opens failed; back: recover at once
    m.stop()
    os.rename(disks["o1"], away)
    m.start()
    assert disk_states(m, "one") == ["missing"]
    m.stop()
    os.rename(away, disks["o1"])
    m.start()
    m.ok("recover", "one")
    assert status_pack(m, "one")["state"] == "healthy"
    lun.check("after a mount without its disk")
    # back without a segment it held: refused, named, nothing changed
    segs = sorted(glob.glob(os.path.join(disks["o1"], "segments", "*.seg")))
    m.stop()
    os.rename(disks["o1"], away)
    m.start()
    m.stop()
    shutil.copytree(away, disks["o1"])
    os.unlink(os.path.join(disks["o1"], "segments", os.path.basename(segs[0])))
    m.start()
    err, reply = m.ctl("recover", "one")
    assert err == errno.EIO and os.path.basename(segs[0]) in reply["message"], reply
    assert disk_states(m, "one") != ["online"]


def test_replace_missing_disk(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    fast = Lun(m, "lf", 64 * MiB, "fast")
    cheap = Lun(m, "lc", 64 * MiB, "cheap")
    for lun in (fast, cheap):
        lun.fill(0, 30 * MiB)
    shutil.rmtree(disks["d2"])
    shutil.rmtree(disks["e1"])
    wait_pack(m, "fast", "degraded", ["online", "missing"])
    wait_pack(m, "cheap", "degraded", ["missing", "online", "online"])
    new_f, new_c = str(tmp_path / "disks" / "d9"), str(tmp_path / "disks" / "e9")
    mark = event_mark(m)
    jf = m.ok("replace", f"fast 1 {new_f}")["job"]
    jc = m.ok("replace", f"cheap 0 {new_c}")["job"]
    for jid in (jf, jc):
        j = m.wait_job(jid)
        assert j["kind"] == "replace" and j["percent"] == "100", j
    new = events_since(m, mark)
    assert any(f"disk 1 of pack fast {disks['d2']} -> {new_f}" in l for l in new), new
    p = wait_pack(m, "fast", "healthy", ["online", "online"], timeout=3)
    assert [d["path"] for d in p["disks"]] == [disks["d1"], new_f]
    p = wait_pack(m, "cheap", "healthy", ["online"] * 3, timeout=3)
    assert [d["path"] for d in p["disks"]] == [new_c, disks["e2"], disks["e3"]]
    assert seg_files(new_f) and seg_files(new_c)
    with open(os.path.join(new_f, "fusearray-disk.json")) as f:
        assert json.load(f)["disk"] == 1
    check_redundancy(m, "fast", [disks["d1"], new_f], "mirror")
    check_redundancy(m, "cheap", [new_c, disks["e2"], disks["e3"]], "raid5")
    shutil.rmtree(disks["d1"])
    shutil.rmtree(disks["e2"])
    wait_pack(m, "fast", "degraded", ["missing", "online"])
    wait_pack(m, "cheap", "degraded", ["online", "missing", "online"])
    drop_caches()
    fast.check("from the new disk alone")
    cheap.check("with the new disk in the raid5")


# ---- 6. scrub -----------------------------------------------------------------------
def scrub_report(m: Mount, pack: str) -> tuple[dict, tuple[int, int, int]]:
    jid = m.ok("scrub", pack)["job"]
    j = m.wait_job(jid, ("done", "failed"))
    ev = [l for l in m.job_events(jid) if "blocks verified" in l]
    assert len(ev) == 1, m.job_events(jid)
    got = re.search(r"(\d+) blocks verified, (\d+) repaired, (\d+) unrecoverable", ev[0])
    return j, tuple(int(x) for x in got.groups())


def test_scrub_repairs_rot_and_reports_counts(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    rng = random.Random(6)
    fast = Lun(m, "lf", 32 * MiB, "fast")
    cheap = Lun(m, "lc", 32 * MiB, "cheap")
    for lun in (fast, cheap):
        lun.fill(0, 16 * MiB)
    dd = [disks["d1"], disks["d2"]]
    ee = [disks["e1"], disks["e2"], disks["e3"]]
    # rot where reads do not look: the second mirror copy, and raid5 data
    # plus a parity chunk
    places = rot(m, fast, "mirror", dd, 1, 3, rng, per_block=2)
    places += rot(m, cheap, "raid5", ee, 0, 2, rng, per_block=2)
    rotted_rows = {pos // CHUNK for path, pos, _ in places if path.startswith(disks["e1"])}
    seg = block_rows(m, "cheap")[0][1]
    row = next(r for r in range(30, 100) if r % 3 == 1 and not {r - 1, r, r + 1} & rotted_rows)
    ppath = seg_path(disks["e2"], seg)
    places.append((ppath, row * CHUNK + 777, flip(ppath, row * CHUNK + 777)))
    assert not any(restored([p]) for p in places)
    for pack, lun, want in (("fast", fast, 3), ("cheap", cheap, 3)):
        j, (blocks, repaired, lost) = scrub_report(m, pack)
        assert j["state"] == "done" and j["kind"] == "scrub" and j["percent"] == "100", j
        assert blocks >= 16 * MiB // BS and lost == 0, (blocks, repaired, lost)
        assert repaired == want, (pack, blocks, repaired, lost)
    assert restored(places)
    check_redundancy(m, "fast", dd, "mirror")
    check_redundancy(m, "cheap", ee, "raid5")
    drop_caches()
    fast.check("after scrub")
    cheap.check("after scrub")
    for pack in ("fast", "cheap"):
        j, (blocks, repaired, lost) = scrub_report(m, pack)
        assert j["state"] == "done" and repaired == 0 and lost == 0 and blocks > 0
    assert [p["state"] for p in m.status()["packs"]] == ["healthy", "healthy"]
    # the counts are in the job too (issue 4, point 6)
    jid = m.ok("scrub", "fast")["job"]
    j = m.wait_job(jid)
    assert "repaired" in j, f"ctl/jobs/{jid} does not report scrub counts: {j}"


# ---- 7. a disk failed by errors, and the status views ------------------------------
def test_disk_failed_by_checksum_errors_then_recovered(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path, ("fast", "mirror", ["d1", "d2"]))
    rng = random.Random(7)
    lun = Lun(m, "l0", 32 * MiB, "fast")
    lun.fill(0, 20 * MiB)
    dd = [disks["d1"], disks["d2"]]
    rot(m, lun, "mirror", dd, 0, 12, rng, per_block=1)
    mark = event_mark(m)
    drop_caches()
    lun.check("with 12 rotten blocks on disk 0")
    wait_pack(m, "fast", "degraded", ["failed", "online"], timeout=3)
    wait_event(m, mark, lambda l: "disk 0 of pack fast" in l and "is failed" in l
               and "replace fast 0" in l)
    assert m.status()["packs"][0]["disks"][0]["state"] == "failed"
    text = status_text(m)
    assert re.search(r"^  fast: mirror degraded", text, re.M), text
    assert re.search(r"^    disk 0 failed +" + re.escape(disks["d1"]), text, re.M), text
    assert re.search(r"^    disk 1 online +" + re.escape(disks["d2"]), text, re.M), text
    lun.fill(24 * MiB, 4 * MiB)
    jid = m.ok("recover", "fast")["job"]
    m.wait_job(jid)
    wait_pack(m, "fast", "healthy", ["online", "online"], timeout=3)
    assert re.search(r"^  fast: mirror healthy", status_text(m), re.M)
    check_redundancy(m, "fast", dd, "mirror")
    shutil.rmtree(disks["d2"])
    wait_pack(m, "fast", "degraded", ["online", "missing"])
    drop_caches()
    lun.check("from the disk that had failed, rebuilt")


# ---- 8. a pack that fills up ----------------------------------------------------------
def test_full_pack_enospc_then_space_freed(make_mount, tmp_path):
    t1, t2 = tmp_path / "tmpfs1", tmp_path / "tmpfs2"
    mounted = []
    m = None
    try:
        for t in (t1, t2):
            t.mkdir()
            run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(t)])
            mounted.append(t)
        m = make_mount("a", cache_size=CACHE)
        other = [str(tmp_path / "disks" / x) for x in ("o1", "o2")]
        m.init("--pack", f"small=mirror:{t1}/d,{t2}/d",
               "--pack", f"big=mirror:{','.join(other)}").start()
        a = Lun(m, "a", 96 * MiB, "small")
        b = Lun(m, "b", 64 * MiB, "small")
        c = Lun(m, "c", 64 * MiB, "big")
        b.fill(0, 16 * MiB)
        a.fill(0, 8 * MiB)
        c.fill(0, 4 * MiB)
        mark = event_mark(m)
        src = tmp_path / "rand"
        src.write_bytes(os.urandom(80 * MiB))
        r = run(["dd", f"if={src}", f"of={a.path}", "bs=1M", f"seek={8 * MiB}",
                 "oflag=seek_bytes", "conv=notrunc,fsync", "status=none"], check=False)
        assert r.returncode != 0 and "No space left on device" in r.stderr, r
        new = events_since(m, mark)
        assert any("pack small is full" in l and "ENOSPC" in l for l in new), new
        # nothing already written is harmed
        drop_caches()
        b.check("on a full pack")
        assert a.read()[:8 * MiB] == a.data[:8 * MiB]
        # another pack still takes writes (checked at the end)
        try:
            c.fill(8 * MiB, MiB)
            other_pack_err = None
        except OSError as e:
            other_pack_err = e
        c.check("while pack small is full")
        # free space: delete a LUN of the pack, and writes work again
        m.ok("delete", "b")
        a.data[8 * MiB:] = a.read()[8 * MiB:]      # whatever dd got in is what it holds
        a.fill(20 * MiB, 4 * MiB)
        a.fill(90 * MiB, MiB)
        drop_caches()
        a.check("after space was freed")
        assert status_pack(m, "small")["state"] == "healthy"
        # punching holes frees space too
        a.write(0, bytes(8 * MiB))
        punch_hole(a.path, 40 * MiB, 40 * MiB)      # tests/fallbacks.py
        a.data[40 * MiB:80 * MiB] = bytes(40 * MiB)
        a.fill(30 * MiB, 6 * MiB)
        drop_caches()
        a.check("after a punch-hole")
        c.check()
        assert other_pack_err is None, \
            f"a write to pack big failed while only pack small was full: {other_pack_err}"
    finally:
        if m is not None:
            m.close()
        for t in reversed(mounted):
            if run(["umount", str(t)], check=False).returncode:
                run(["umount", "-l", str(t)], check=False)


# ---- bad input ------------------------------------------------------------------------
def comparable(st: dict) -> dict:
    return {"luns": st["luns"], "sets": st["sets"], "jobs": st["jobs"],
            "packs": [(p["name"], p["layout"], p["state"],
                       [(d["id"], d["path"], d["state"]) for d in p["disks"]])
                      for p in st["packs"]]}


def refused(m: Mount, verb: str, line: str, want: int) -> str:
    before = comparable(m.status())
    err, reply = m.ctl(verb, line)
    assert err == want, (verb, line, errno.errorcode.get(err, err), reply)
    assert reply.get("status") == "error" and reply.get("errno") == errno.errorcode[want], reply
    msg = reply.get("message", "")
    assert len(msg) > 20 and "\n" not in msg, reply
    assert msg in m.events(), (msg, m.events()[-2000:])
    assert comparable(m.status()) == before, (verb, line, "changed the array")
    return msg


def test_bad_input(make_mount, tmp_path):
    m, disks = new_mount(make_mount, tmp_path,
                         ("fast", "mirror", ["d1", "d2"]),
                         ("cheap", "raid5", ["e1", "e2", "e3"]))
    lun = Lun(m, "l0", 16 * MiB, "fast")
    lun.fill(0, 4 * MiB)
    D = lambda n: str(tmp_path / "new" / n)          # noqa: E731
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("keep me")
    other = make_mount("b")            # a disk of another array
    other.init("--pack", f"p=mirror:{D('o1')},{D('o2')}")

    assert "takes" in refused(m, "addpack", f"p1 mirror {D('a')}", errno.EINVAL)
    assert "3 to 16" in refused(m, "addpack", f"p1 raid5 {D('a')},{D('b')}", errno.EINVAL)
    refused(m, "addpack", f"p1 mirror {D('a')},{D('b')},{D('c')},{D('d')}", errno.EINVAL)
    assert "twice" in refused(m, "addpack", f"p1 mirror {D('a')},{D('a')}/", errno.EINVAL)
    assert disks["d2"] in refused(m, "addpack", f"p1 mirror {D('a')},{disks['d2']}",
                                  errno.EBUSY)
    assert "not empty" in refused(m, "addpack", f"p1 mirror {D('a')},{full}", errno.EINVAL)
    refused(m, "addpack", f"p1 mirror {D('o1')},{D('a')}", errno.EBUSY)
    refused(m, "addpack", f"p1 stripes {D('a')},{D('b')}", errno.EINVAL)
    refused(m, "addpack", f"fast mirror {D('a')},{D('b')}", errno.EEXIST)
    held = tmp_path / "held"            # a disk directory an init is labelling now
    held.mkdir()
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another fusearray init" in refused(m, "addpack", f"p1 mirror {D('a')},{held}",
                                                   errno.EBUSY)
    finally:
        os.close(fd)
    assert os.listdir(held) == []
    assert not os.path.exists(D("a")) and not os.path.exists(D("b"))
    assert os.listdir(full) == ["something"]
    assert "force=yes" in refused(m, "replace", f"fast 0 {D('a')}", errno.EBUSY)
    refused(m, "replace", f"fast 5 {D('a')}", errno.ENOENT)
    refused(m, "replace", f"nosuch 0 {D('a')}", errno.ENOENT)
    refused(m, "recover", "nosuch", errno.ENOENT)
    refused(m, "scrub", "nosuch", errno.ENOENT)
    refused(m, "recover", "fast extra", errno.EINVAL)
    assert not os.path.exists(D("a"))
    # replace of a missing disk by a directory already in use
    shutil.rmtree(disks["d2"])
    wait_pack(m, "fast", "degraded", ["online", "missing"])
    refused(m, "replace", f"fast 1 {disks['e1']}", errno.EBUSY)
    refused(m, "replace", f"fast 1 {full}", errno.EINVAL)
    # recover with the disk still gone: EIO, says what to do
    assert "replace fast" in refused(m, "recover", "fast", errno.EIO)
    lun.check("after refused commands")

    # fusearray init: the same rules, nothing created
    for packs, word in ((["x=raid5:{a},{b}"], "3 to 16"),
                        (["x=mirror:{a},{a}"], "twice"),
                        (["x=mirror:{a},{b}", "y=mirror:{b},{c}"], "already"),
                        ([f"x=mirror:{{a}},{full}"], "not empty")):
        arr = tmp_path / "arr-bad"
        args = [a for p in packs for a in ("--pack", p.format(a=D("i1"), b=D("i2"),
                                                               c=D("i3")))]
        r = cli("init", str(arr), *args, check=False)
        assert r.returncode != 0 and word in r.stderr, (packs, r.stderr)
        assert not arr.exists() and not os.path.exists(D("i1")), packs
