"""Shadow copies end to end (issue 3), as a user does it from the shell:
snapshot sets, their consistency under concurrent writers, differential and
plex contexts, LUN resync (same pack and across packs, with a crash in the
middle), undo, swap, read-only/hidden tags, deletes that reclaim space, the
job controls, the ext4 restore flow, and bad input.

Every subprocess is ended from `finally` by its Popen; the `Mount` fixture
detaches the loop devices and unmounts what it recorded.
"""
import calendar
import errno
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from fusearray import ctlclient
from conftest import Mount, cli, end_proc, run, sha, wait_for, write_files
import packbackend

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WWN_RE = re.compile(r"naa\.6[0-9a-f]{31}\Z")
STAMP_RE = re.compile(r"(\d{8}T\d{6}Z)(?:-(\d+))?\Z")


# ---- helpers -----------------------------------------------------------------------
def sh(script: str, check=True) -> subprocess.CompletedProcess:
    return run(["bash", "-c", script], check=check)


def shell_ctl(m: Mount, verb: str, line: str) -> tuple[int, dict, str]:
    """`exec 3<>ctl/VERB; echo LINE >&3; cat <&3` from bash: (echo's exit
    status, the reply, the shell's error message)."""
    r = sh(f"exec 3<>{m.mnt}/ctl/{verb}; echo '{line}' >&3; rc=$?; cat <&3; exit $rc",
           check=False)
    lines = r.stdout.splitlines()
    reply = ctlclient.parse_reply(r.stdout)
    if lines:
        assert lines[0].startswith("status="), r.stdout     # status= comes first
    return r.returncode, reply, r.stderr


def read(p, off=0, n=None) -> bytes:
    with open(p, "rb") as f:
        f.seek(off)
        return f.read() if n is None else f.read(n)


def put(p, data: bytes, off: int = 0, fsync: bool = True) -> None:
    """Write into a LUN file in 1 MiB pieces (a LUN never changes size)."""
    fd = os.open(p, os.O_WRONLY)
    try:
        for i in range(0, len(data), MiB):
            assert os.pwrite(fd, data[i:i + MiB], off + i) == len(data[i:i + MiB])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def dd_in(m: Mount, src, lun_path: str, seek_bytes: int = 0) -> None:
    run(["dd", f"if={src}", f"of={lun_path}", "bs=1M", f"seek={seek_bytes}",
         "oflag=direct,seek_bytes", "conv=notrunc,fsync", "status=none"])


def lun_row(m: Mount, name: str) -> dict:
    return next(v for v in m.status()["luns"] if v["name"] == name)


def set_row(m: Mount, name: str) -> dict | None:
    return next((s for s in m.status()["sets"] if s["name"] == name), None)


def shadow_row(m: Mount, set_name: str, name: str) -> dict:
    return next(v for v in set_row(m, set_name)["shadow_copies"] if v["name"] == name)


def pack_row(m: Mount, name: str) -> dict:
    return next(p for p in m.status()["packs"] if p["name"] == name)



def xattrs(p: str) -> dict:
    """`getfattr -d` of a LUN or shadow copy file, as a dict."""
    out = run(["getfattr", "-d", "--absolute-names", p]).stdout
    got = {}
    for line in out.splitlines():
        if line.startswith("user.fusearray."):
            k, v = line.split("=", 1)
            got[k[len("user.fusearray."):]] = v.strip('"')
    return got


def errno_of(fn, *args) -> int:
    try:
        fd = fn(*args)
    except OSError as e:
        return e.errno
    if isinstance(fd, int):
        os.close(fd)
    return 0


def cmp_file(a, b, n=None) -> None:
    run(["cmp", *(["-n", str(n)] if n is not None else []), str(a), str(b)])


def refused(m: Mount, verb: str, line: str, want: int) -> dict:
    """A command that must fail: the errno, a readable one-line reply, the
    same text as an event, and nothing changed."""
    before = comparable(m.status())
    err, reply = m.ctl(verb, line)
    assert err == want, (verb, line, errno.errorcode.get(err, err), reply)
    assert reply.get("status") == "error" and reply.get("errno") == errno.errorcode[want], reply
    msg = reply.get("message", "")
    assert len(msg) > 20 and "\n" not in msg, reply
    assert msg in m.events(), (msg, m.events()[-2000:])
    assert comparable(m.status()) == before, (verb, line, "changed the array state")
    return reply


def comparable(st: dict) -> dict:
    """The parts of status.json a refused command must not change."""
    return {"luns": st["luns"], "sets": st["sets"],
            "jobs": [dict(j, done_bytes=None, percent=None) if j["state"] == "running" else j
                     for j in st["jobs"]],
            "packs": sorted(p["name"] for p in st["packs"])}


COPY_BATCH_BYTES = 64 * 65536     # a copy job works in batches of 64 blocks


def held_still(m: Mount, jid, watch=1.5) -> int:
    """A paused job may finish the batch in flight (after at most one
    throttle sleep), then done_bytes stays put. Returns it."""
    t0 = time.monotonic()
    first = int(m.job(jid)["done_bytes"])
    late = []
    while (t := time.monotonic() - t0) < watch:
        j = m.job(jid)
        assert j["state"] == "paused", j
        if t > 0.7:
            late.append(int(j["done_bytes"]))
        time.sleep(0.05)
    assert late and len(set(late)) == 1, f"a paused job kept copying: {late}"
    assert late[0] - first <= COPY_BATCH_BYTES, (first, late[0])
    return late[0]




# ---- 1. a set over two LUNs: names, files, tags, identity, content ------------------
def test_snapshot_set_files_xattrs_and_content(mount, tmp_path):
    m = mount
    m.ok("create", "db 32M")
    m.ok("create", "logs 8M")
    db, logs = m.path("luns", "db"), m.path("luns", "logs")
    d1, l1 = os.urandom(32 * MiB), os.urandom(3 * MiB + 4567)
    (tmp_path / "d1").write_bytes(d1)
    dd_in(m, tmp_path / "d1", db)
    put(logs, l1, 12345)                 # unaligned, not block-sized
    lun_wwn = {n: os.getxattr(m.path("luns", n), "user.fusearray.wwn").decode()
               for n in ("db", "logs")}

    rc, reply, err = shell_ctl(m, "snapshot", "db logs set=nightly")
    assert rc == 0 and reply == {"status": "ok", "set": "nightly", "consistency": "crash"}, (reply, err)
    assert sorted(os.listdir(m.path("snapshots"))) == ["nightly"]
    assert sorted(os.listdir(m.path("snapshots", "nightly"))) == ["db", "logs"]
    seen = set(lun_wwn.values())
    for n, size in (("db", 32 * MiB), ("logs", 8 * MiB)):
        p = m.path("snapshots", "nightly", n)
        st = os.stat(p)
        assert st.st_size == size and oct(st.st_mode & 0o777) == "0o440"
        x = xattrs(p)
        assert x["kind"] == "shadow" and x["set"] == "nightly" and x["context"] == "differential"
        assert x["origin"] == lun_wwn[n] and x["pack"] == "main" and x["readonly"] == "on"
        assert WWN_RE.match(x["wwn"]) and x["wwn"] not in seen, x
        seen.add(x["wwn"])
        # read-only is enforced by the daemon (we are root: mode bits alone would not)
        assert errno_of(os.open, p, os.O_WRONLY) == errno.EROFS
        assert errno_of(os.open, p, os.O_RDWR) == errno.EROFS
    r = sh(f"echo x > {m.path('snapshots', 'nightly', 'db')}", check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    row = set_row(m, "nightly")
    assert sorted(v["name"] for v in row["shadow_copies"]) == ["db", "logs"]
    assert all(v["origin"] == lun_wwn[v["name"]] for v in row["shadow_copies"])

    # the content is the LUNs' at that instant, and later LUN writes leave it be
    cmp_file(tmp_path / "d1", m.path("snapshots", "nightly", "db"))
    exp_logs = bytes(12345) + l1 + bytes(8 * MiB - 12345 - len(l1))
    assert read(m.path("snapshots", "nightly", "logs")) == exp_logs
    put(db, os.urandom(5 * MiB), 7 * MiB + 100)
    put(logs, b"\xff" * MiB, 0)
    cmp_file(tmp_path / "d1", m.path("snapshots", "nightly", "db"))
    assert read(m.path("snapshots", "nightly", "logs")) == exp_logs
    assert read(db, 7 * MiB + 100, 16) != d1[7 * MiB + 100:7 * MiB + 116]

    # without set=: a UTC stamp; a second set in the same second gets -2
    for _ in range(10):
        t0 = time.time()
        a = m.ok("snapshot", "db")["set"]
        b = m.ok("snapshot", "logs")["set"]
        ma, mb = STAMP_RE.match(a), STAMP_RE.match(b)
        assert ma and mb, (a, b)
        stamp = calendar.timegm(time.strptime(ma.group(1), "%Y%m%dT%H%M%SZ"))
        assert abs(stamp - t0) < 5, (a, t0)            # UTC, now
        if ma.group(1) == mb.group(1):
            assert ma.group(2) is None and b == f"{ma.group(1)}-2", (a, b)
            break
    else:
        pytest.fail("never took two sets within one second")
    assert os.listdir(m.path("snapshots", a)) == ["db"]
    assert os.listdir(m.path("snapshots", b)) == ["logs"]
    assert "shadow copy set nightly taken" in m.events()


# ---- 2. one instant across LUNs while two writers run -------------------------------
REC = 4096
WRITER = r"""
import mmap, os, struct, sys
targets = sys.argv[1].split(",")       # LUN paths, written in turn for each record
base, nrec, progress, tag = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
fds = [os.open(t, os.O_WRONLY | os.O_DIRECT) for t in targets]
buf = mmap.mmap(-1, 4096)
log = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
n = 0
while True:
    n += 1
    for r in range(nrec):
        for fd in fds:
            buf[:] = struct.pack("<QQQQ", tag, n, r, n ^ r) * 128
            os.pwrite(fd, buf, base + r * 4096)
    os.write(log, b"%d\n" % n)         # loop n is complete (every write acknowledged)
"""


def last_loop(progress) -> int:
    try:
        with open(progress, "rb") as f:
            lines = f.read().split(b"\n")[:-1]
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines else 0


def record_values(img: bytes, base: int, nrec: int, tag: int) -> list[int]:
    """The sequence number in each record; asserts each record is whole
    (not torn) and is the writer's."""
    out = []
    for r in range(nrec):
        rec = img[base + r * REC:base + (r + 1) * REC]
        if rec == bytes(REC):
            out.append(0)
            continue
        head = rec[:32]
        assert rec == head * 128, f"record {r} at {base + r * REC} is torn"
        t, n, rr, chk = (int.from_bytes(head[i:i + 8], "little") for i in range(0, 32, 8))
        assert (t, rr, chk) == (tag, r, n ^ r), f"record {r} holds a foreign write"
        out.append(n)
    return out


def prefix_state(values: list[int]) -> int:
    """Values in write order must read [n]*k + [n-1]*(L-k): a sequential
    writer stopped at one instant. Returns the number of writes completed."""
    n, L = values[0], len(values)
    k = next((i for i, v in enumerate(values) if v != n), L)
    assert all(v == n - 1 for v in values[k:]) and (n > 0 or k == L), \
        f"not a point-in-time state of a sequential writer: {values}"
    return (n - 1) * L + k if n else 0


def test_set_is_one_instant_under_two_writers(mount, tmp_path):
    m = mount
    m.ok("create", "db 16M")
    m.ok("create", "logs 16M")
    db, logs = m.path("luns", "db"), m.path("luns", "logs")
    NX, NY = 96, 160                  # records: 384 KiB and 640 KiB, across block edges
    BX, BY = 3 * 4096, 2 * MiB + 5 * 4096
    px, py = tmp_path / "x.progress", tmp_path / "y.progress"
    # X writes each record to db then logs (dependent writes across the LUNs);
    # Y writes records on db only, in another region
    ex, ey = tmp_path / "x.err", tmp_path / "y.err"
    wx = wy = None
    try:
        with open(ex, "wb") as fx, open(ey, "wb") as fy:
            wx = subprocess.Popen([PY, "-c", WRITER, f"{db},{logs}", str(BX), str(NX), str(px),
                                   "1"], stderr=fx)
            wy = subprocess.Popen([PY, "-c", WRITER, db, str(BY), str(NY), str(py), "2"],
                                  stderr=fy)
        wait_for(lambda: last_loop(px) >= 3 and last_loop(py) >= 3, 30, "the writers to run")
        sets = []
        for i in range(6):
            n0 = (last_loop(px), last_loop(py))
            m.ok("snapshot", f"db logs set=s{i}")
            n1 = (last_loop(px), last_loop(py))
            sets.append((f"s{i}", n0, n1))
            wait_for(lambda: last_loop(px) > n1[0] and last_loop(py) > n1[1], 30,
                     "the writers to go on after the snapshot")
        assert wx.poll() is None and wy.poll() is None, "a writer died"
    finally:
        end_proc(wx)
        end_proc(wy)
    assert wx.returncode == -9 and wy.returncode == -9, (ex.read_text(), ey.read_text())
    for name, (x0, y0), (x1, y1) in sets:
        sdb = read(m.path("snapshots", name, "db"))
        slogs = read(m.path("snapshots", name, "logs"))
        vdb = record_values(sdb, BX, NX, 1)
        vlogs = record_values(slogs, BX, NX, 1)
        # X's writes in order: db r0, logs r0, db r1, logs r1, ...
        x_done = prefix_state([v for pair in zip(vdb, vlogs) for v in pair])
        y_done = prefix_state(record_values(sdb, BY, NY, 2))
        # every loop acknowledged before the command is in; nothing started
        # after it returned is
        assert x0 * 2 * NX <= x_done <= (x1 + 1) * 2 * NX, (name, x0, x1, x_done)
        assert y0 * NY <= y_done <= (y1 + 1) * NY, (name, y0, y1, y_done)
        # and nothing else on the LUNs
        assert sdb[:BX] == bytes(BX) and slogs[BX + NX * REC:] == bytes(len(slogs) - BX - NX * REC)
    # the writers moved between sets: they were really running across them
    assert len({x for _, (x, _), _ in sets}) > 1


# ---- 3. differential O(1), plex to another pack that survives the source's loss -----
def test_differential_huge_and_plex_survives_source_pack_loss(mount, tmp_path):
    m = mount
    m.ok("create", "huge 1T")
    huge = m.path("luns", "huge")
    spots = [(0, os.urandom(100000)), (512 * GiB + 777, os.urandom(70000)),
             (TiB - 65536, os.urandom(65536))]
    for off, data in spots:
        put(huge, data, off)
    t0 = time.monotonic()
    assert m.ok("snapshot", "huge set=h1") == {"status": "ok", "set": "h1", "consistency": "crash"}
    print(f"differential snapshot of a 1 TiB LUN: {(time.monotonic() - t0) * 1000:.1f} ms")
    sp = m.path("snapshots", "h1", "huge")
    assert os.stat(sp).st_size == TiB
    for off, data in spots:
        assert read(sp, off, len(data)) == data
    assert read(sp, 300 * GiB, MiB) == bytes(MiB)
    assert shadow_row(m, "h1", "huge")["allocated_bytes"] <= 5 * 65536

    m.ok("addpack", f"OTHER single {tmp_path}/other")
    refused(m, "snapshot", "huge context=differential pack=OTHER", errno.EOPNOTSUPP)

    # plex: an independent copy on OTHER, of the instant of the command
    # src spans several map leaves (of 1024 blocks); d1 and the plex share
    # the ones not written in between
    m.ok("create", "src 256M")
    m.ok("create", "keep 16M")
    src = m.path("luns", "src")
    expect = bytearray(256 * MiB)
    for off in (3 * MiB, 70 * MiB + 512, 150 * MiB, 240 * MiB):
        v0 = os.urandom(10 * MiB)
        put(src, v0, off)
        expect[off:off + len(v0)] = v0
    put(m.path("luns", "keep"), os.urandom(16 * MiB))
    m.ok("snapshot", "src set=d1")
    v1 = os.urandom(8 * MiB)
    put(src, v1, 10 * MiB)                  # the plex holds this, d1 does not
    expect[10 * MiB:18 * MiB] = v1
    (tmp_path / "expect").write_bytes(expect)
    rc, reply, err = shell_ctl(m, "snapshot", "src set=p1 context=plex pack=OTHER")
    assert rc == 0 and reply["set"] == "p1" and reply["job"].isdigit(), (reply, err)
    jid = reply["job"]
    put(src, os.urandom(20 * MiB), 0)       # after the instant: not in the plex
    r = cli("wait", jid, mnt=m.mnt)
    assert r.returncode == 0
    j = m.job(jid)
    assert (j["kind"], j["state"], j["percent"]) == ("plex", "done", "100"), j
    plex = m.path("snapshots", "p1", "src")
    x = xattrs(plex)
    assert (x["context"], x["pack"], x["set"], x["kind"]) == ("plex", "OTHER", "p1", "shadow")
    cmp_file(tmp_path / "expect", plex)

    # lose everything on the source side: the LUN, its other shadow copies,
    # then the source pack's segment files themselves
    m.ok("delete", "src")                   # (a delete runs the GC at once)
    cmp_file(tmp_path / "expect", plex)
    m.ok("delete", "d1")
    m.ok("snapshot", "keep set=k1")
    cmp_file(tmp_path / "expect", plex)
    disk = pack_row(m, "main")["disks"][0]["path"]       # a directory or a rados pool
    m.stop()
    assert packbackend.remove_segments(disk), "pack main held no segments: nothing lost"
    m.start()
    cmp_file(tmp_path / "expect", plex)      # byte for byte, from OTHER alone
    # ... and the source pack really is gone
    assert pack_row(m, "main")["state"] == "failed"
    assert errno_of(lambda: read(m.path("luns", "keep"), 0, 65536)) == errno.EIO
    # bad input: resync of a shadow copy whose pack has failed is EIO, and says why
    reply = refused(m, "resync", "k1/keep", errno.EIO)
    assert "recover main" in reply["message"]


# ---- 4a. resync within a pack: instant, undoable, repeatable --------------------------
def test_resync_same_pack(mount, tmp_path):
    m = mount
    m.ok("create", "db 64M")
    m.ok("create", "logs 16M")
    db = m.path("luns", "db")
    D1, L1 = os.urandom(64 * MiB), os.urandom(16 * MiB)
    put(db, D1)
    put(m.path("luns", "logs"), L1)
    m.ok("snapshot", "db set=older")          # an older set: D1 too
    m.ok("snapshot", "db logs set=nightly")
    D2 = os.urandom(64 * MiB)
    put(db, D2)
    m.ok("snapshot", "db set=newer")
    D3 = bytearray(D2)
    D3[MiB:9 * MiB] = os.urandom(8 * MiB)      # damage
    put(db, bytes(D3[MiB:9 * MiB]), MiB)
    D3 = bytes(D3)
    njobs = len(m.status()["jobs"])

    rc, reply, err = shell_ctl(m, "resync", "nightly/db")
    assert rc == 0 and reply["status"] == "ok", (reply, err)
    jid, undo = reply["job"], reply["undo"]
    assert re.fullmatch(r"undo-db-\d{8}T\d{6}Z(-\d+)?", undo), undo
    assert read(db) == D1                       # at once
    j = m.job(jid)
    assert (j["kind"], j["state"], j["percent"]) == ("resync", "done", "100"), j
    for key in ("id", "done_bytes", "total_bytes", "rate_bytes_per_s", "started",
                "finished", "error"):
        assert key in j
    assert len(m.status()["jobs"]) == njobs + 1
    # the undo set holds the state just before; the shadow copy and every other set stay
    assert read(m.path("snapshots", undo, "db")) == D3
    assert read(m.path("snapshots", "nightly", "db")) == D1
    assert read(m.path("snapshots", "nightly", "logs")) == L1
    assert read(m.path("snapshots", "older", "db")) == D1
    assert read(m.path("snapshots", "newer", "db")) == D2
    assert xattrs(m.path("snapshots", undo, "db"))["origin"] == xattrs(db)["wwn"]
    assert read(m.path("luns", "logs")) == L1  # not in the pair list: untouched

    # again: writes, then resync from the same shadow copy
    put(db, b"\x5a" * MiB, 40 * MiB)
    undo2 = m.ok("resync", "nightly/db")["undo"]
    assert undo2 != undo and read(db) == D1
    assert read(m.path("snapshots", undo2, "db"), 40 * MiB, MiB) == b"\x5a" * MiB
    # undo the first resync: resync from its undo set
    m.ok("resync", f"{undo}/db undo=no")
    assert read(db) == D3
    sets = {s["name"] for s in m.status()["sets"]}
    assert sets == {"older", "nightly", "newer", undo, undo2}   # undo=no made none

    # into another LUN, created if missing
    wwn_db = xattrs(db)["wwn"]
    r = m.ok("resync", "nightly/db=testbed")
    assert "undo" not in r                     # nothing to undo in a new LUN
    tb = lun_row(m, "testbed")
    assert tb["size"] == 64 * MiB and tb["pack"] == "main" and tb["wwn"] != wwn_db
    assert read(m.path("luns", "testbed")) == D1
    assert read(db) == D3
    # several pairs: one recovery set, one job
    njobs = len(m.status()["jobs"])
    r = m.ok("resync", "nightly/db=tb1 nightly/logs=tb2 undo=no")
    assert r["job"].isdigit() and len(m.status()["jobs"]) == njobs + 1
    assert m.job(r["job"])["state"] == "done"
    assert read(m.path("luns", "tb1")) == D1 and read(m.path("luns", "tb2")) == L1

    # the destination takes the source's size (growing it back here; shrinking
    # below in test_resync_restores_size_after_grow)
    m.ok("resize", "db 20M")
    assert os.stat(db).st_size == 20 * MiB
    m.ok("resync", "nightly/db undo=no")
    assert os.stat(db).st_size == 64 * MiB and lun_row(m, "db")["size"] == 64 * MiB
    assert read(db) == D1
    m.ok("resize", "tb2 48M")
    m.ok("resync", "nightly/logs=tb2 undo=no")
    assert os.stat(m.path("luns", "tb2")).st_size == 16 * MiB

    # an open destination is EBUSY, unless force=yes
    put(db, b"\x77" * MiB, 0)
    fd = os.open(db, os.O_RDWR)
    try:
        reply = refused(m, "resync", "nightly/db", errno.EBUSY)
        assert "force=yes" in reply["message"]
        assert os.pread(fd, MiB, 0) == b"\x77" * MiB
        m.ok("resync", "nightly/db force=yes undo=no")
        # the held descriptor sees the new content, not stale pages
        assert os.pread(fd, 4 * MiB, 0) == D1[:4 * MiB]
        os.pwrite(fd, b"after", 0)
        assert os.pread(fd, 5, 0) == b"after"
    finally:
        os.close(fd)
    assert read(m.path("snapshots", "nightly", "db")) == D1     # still untouched
    assert re.search(r"resync \(job \d+\): nightly/db -> db", m.events())


# ---- 4b. resync across packs: instant first read, copy in the background -------------
def test_resync_cross_pack_io_during_copy(mount, tmp_path):
    m = mount
    m.ok("addpack", f"OTHER single {tmp_path}/other")
    m.ok("create", "db 256M")
    size = 256 * MiB
    rng = random.Random(4)
    base = bytearray(size)
    base[:192 * MiB] = rng.randbytes(192 * MiB)
    (tmp_path / "base").write_bytes(base)
    dd_in(m, tmp_path / "base", m.path("luns", "db"))
    m.ok("snapshot", "db set=nightly")
    put(m.path("luns", "db"), os.urandom(MiB), 0)            # the LUN moves on

    rc, reply, err = shell_ctl(m, "resync", "nightly/db=far pack=OTHER")
    assert rc == 0, (reply, err)
    jid = reply["job"]
    t_throttle = time.monotonic()
    m.ok("throttle", f"{jid} 16M")
    far = m.path("luns", "far")
    model = bytearray(base)
    fd = os.open(far, os.O_RDWR)
    try:
        # right after the write returned, `far` reads as the shadow copy
        for off in (0, 100 * MiB + 4095, 191 * MiB, 200 * MiB):
            assert os.pread(fd, 256 * 1024, off) == bytes(model[off:off + 256 * 1024])
        j0 = m.job(jid)
        assert j0["state"] in ("queued", "running") and int(j0["percent"]) < 100, j0
        assert lun_row(m, "far")["pack"] == "OTHER" and lun_row(m, "far")["size"] == size
        assert lun_row(m, "far")["state"] == "resyncing"      # until the copy is done
        # reads and writes meanwhile, against a model
        for i in range(400):
            off = rng.randrange(size - 300000)
            n = rng.choice([1, 512, 4096, 65535, 65536, 65537, 300000])
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off:off + n] = data
            else:
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), (i, off, n)
            if i % 50 == 0:
                os.fsync(fd)
        wait_for(lambda: int(m.job(jid)["done_bytes"]) > int(j0["done_bytes"]) + 2 * MiB,
                 10, "the copy to move on")                        # progress moves
        j1 = m.job(jid)
        elapsed = time.monotonic() - t_throttle
        assert j1["state"] == "running", "the copy ended before the I/O was done: not concurrent"
        assert int(j1["percent"]) > int(j0["percent"])
        assert int(j1["total_bytes"]) >= 192 * MiB
        # throttled: at most 16 MiB/s since the throttle, plus the batch in flight
        moved = int(j1["done_bytes"]) - int(j0["done_bytes"])
        assert moved <= 16 * MiB * elapsed + 2 * COPY_BATCH_BYTES, (moved, elapsed)
        m.ok("throttle", f"{jid} 0")
        assert cli("wait", jid, mnt=m.mnt).returncode == 0
        assert m.job(jid)["state"] == "done"
        assert lun_row(m, "far")["state"] == "online"
        # the copy never overwrote the writes made meanwhile
        got = bytearray(size)
        for off in range(0, size, 8 * MiB):
            got[off:off + 8 * MiB] = os.pread(fd, 8 * MiB, off)
        assert got == model, "far differs from the model after the copy"
    finally:
        os.close(fd)
    cmp_file(tmp_path / "base", m.path("snapshots", "nightly", "db"))   # source untouched
    ev = m.job_events(jid)
    assert any(f"job {jid} (resync) started" in l for l in ev), ev
    steps = [int(s) for l in ev for s in re.findall(rf"job {jid} \(resync\): (\d+)%", l)]
    assert steps == list(range(10, 100, 10)), ev
    assert f"job {jid} (resync) done" in ev[-1], ev
    # a plain copy of the same shadow copy; then the source LUN goes (the GC
    # runs at once) while the shadow copy it came from stays on main
    j2 = m.ok("resync", "nightly/db=far2 pack=OTHER")["job"]
    w = cli("wait", j2, mnt=m.mnt)
    assert "%" in w.stderr and "done" in w.stderr        # the progress bar
    cmp_file(tmp_path / "base", m.path("luns", "far2"))
    m.ok("delete", "db")
    cmp_file(tmp_path / "base", m.path("luns", "far2"))
    assert read(far) == model
    cmp_file(tmp_path / "base", m.path("snapshots", "nightly", "db"))
    # and independent of the source side altogether
    m.ok("delete", "nightly")
    cmp_file(tmp_path / "base", m.path("luns", "far2"))
    assert read(far) == model


# ---- 5. SIGKILL in the middle of a cross-pack resync ----------------------------------
def test_sigkill_mid_cross_pack_resync(mount, tmp_path):
    m = mount
    m.ok("addpack", f"OTHER single {tmp_path}/other")
    m.ok("create", "db 128M")
    base = bytearray(os.urandom(128 * MiB))
    base[100 * MiB:] = bytes(28 * MiB)
    (tmp_path / "base").write_bytes(base)
    dd_in(m, tmp_path / "base", m.path("luns", "db"))
    m.ok("snapshot", "db set=nightly")
    jid = m.ok("resync", "nightly/db=far pack=OTHER")["job"]
    m.ok("throttle", f"{jid} 16M")
    far = m.path("luns", "far")
    model = bytearray(base)
    wait_for(lambda: int(m.job(jid)["percent"]) >= 15, 30, "the copy to be under way")
    d0 = int(m.job(jid)["done_bytes"])
    # a commit holds the progress so far (fsync no longer commits: it writes
    # the intent log; the committer commits every few seconds)
    m.ok("sync", "all")
    writes = [(5 * MiB + 3, os.urandom(70000)), (60 * MiB, os.urandom(2 * MiB)),
              (120 * MiB - 4096, os.urandom(8192))]
    fd = os.open(far, os.O_RDWR)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
            model[off:off + len(data)] = data
        os.fsync(fd)                 # acknowledged and synced: must survive
    finally:
        os.close(fd)
    j = m.job(jid)
    assert j["state"] == "running" and int(j["percent"]) < 100, j
    m.kill9()

    m.start()
    j = m.job(jid)
    assert j["state"] in ("running", "done"), j
    assert int(j["done_bytes"]) >= d0, (d0, j)      # progress kept, not back to 0
    assert read(far) == model, "after the crash far is not shadow + synced writes"
    if m.job(jid)["state"] == "running":
        m.ok("throttle", f"{jid} 0")
    assert cli("wait", jid, mnt=m.mnt).returncode == 0
    assert read(far) == model
    assert any(f"job {jid} (resync) resumes at" in l for l in m.events().splitlines())
    m.stop()
    r = run([PY, os.path.join(REPO, "tools", "fsck"), m.array], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m.start()
    assert read(far) == model


# ---- 6. swap ------------------------------------------------------------------------
def test_swap(mount):
    m = mount
    m.ok("create", "db 8M")
    m.ok("create", "logs 8M")
    db, logs = m.path("luns", "db"), m.path("luns", "logs")
    D1, L1 = os.urandom(8 * MiB), os.urandom(8 * MiB)
    put(db, D1)
    put(logs, L1)
    m.ok("snapshot", "db logs set=nightly")
    put(db, os.urandom(8 * MiB))
    put(logs, b"\x01" * MiB)
    swwn = xattrs(m.path("snapshots", "nightly", "db"))["wwn"]
    old_wwn = xattrs(db)["wwn"]

    fd = os.open(db, os.O_RDONLY)
    try:
        reply = refused(m, "swap", "nightly/db", errno.EBUSY)
        assert "force=yes" in reply["message"]
    finally:
        os.close(fd)
    rc, reply, err = shell_ctl(m, "swap", "nightly/db")
    assert rc == 0 and reply["lun"] == "db" and reply["wwn"] == swwn, (reply, err)
    assert read(db) == D1
    x = xattrs(db)
    assert (x["wwn"], x["kind"], x["readonly"], x["hidden"]) == (swwn, "lun", "off", "off")
    assert "set" not in x and "origin" not in x
    assert old_wwn not in json.dumps(m.status())        # the old LUN is gone
    assert "db" in os.listdir(m.path("luns"))
    assert oct(os.stat(db).st_mode & 0o777) == "0o660"
    put(db, b"rw" * 100, 4096)                           # read-write
    assert read(db, 4096, 200) == b"rw" * 100
    assert os.listdir(m.path("snapshots", "nightly")) == ["logs"]
    assert [v["name"] for v in set_row(m, "nightly")["shadow_copies"]] == ["logs"]

    # as=: a new LUN; the old one stays; the emptied set goes
    lwwn = xattrs(m.path("snapshots", "nightly", "logs"))["wwn"]
    r = m.ok("swap", "nightly/logs as=logs2")
    assert r["lun"] == "logs2" and r["wwn"] == lwwn
    assert read(m.path("luns", "logs2")) == L1 and read(logs, 0, MiB) == b"\x01" * MiB
    assert set_row(m, "nightly") is None and os.listdir(m.path("snapshots")) == []
    assert sorted(os.listdir(m.path("luns"))) == ["db", "logs", "logs2"]

    # as= an existing name is EEXIST; force=yes swaps over an open LUN
    m.ok("snapshot", "db logs set=n2")
    refused(m, "swap", "n2/logs as=db", errno.EEXIST)
    D2 = read(db)
    put(db, b"\x02" * MiB)
    fd = os.open(db, os.O_RDWR)
    try:
        n2wwn = xattrs(m.path("snapshots", "n2", "db"))["wwn"]
        assert m.ok("swap", "n2/db force=yes")["wwn"] == n2wwn
    finally:
        os.close(fd)
    assert read(db) == D2 and xattrs(db)["wwn"] == n2wwn
    assert "swap: shadow copy n2/db" in m.events()


# ---- 7. readonly / hidden on LUNs and shadow copies; they persist ---------------------
def test_readonly_hidden_tags(mount):
    m = mount
    m.ok("create", "db 8M")
    m.ok("create", "other 1M")
    db = m.path("luns", "db")
    D = os.urandom(8 * MiB)
    put(db, D)
    m.ok("snapshot", "db set=s1")
    m.ok("snapshot", "db other set=s2")
    sp = m.path("snapshots", "s1", "db")

    # hidden: gone from listings and lookups, flagged in status
    assert m.ok("hidden", "db on") == {"status": "ok", "lun": "db", "hidden": "on"}
    assert os.listdir(m.path("luns")) == ["other"]
    assert errno_of(os.stat, db) == errno.ENOENT
    assert errno_of(os.open, db, os.O_RDONLY) == errno.ENOENT
    assert lun_row(m, "db")["hidden"] is True
    assert re.search(r"^\s+db .*\[hidden\]", read(m.path("ctl", "status")).decode(), re.M)
    m.ok("hidden", "s1/db on")
    assert os.listdir(m.path("snapshots")) == ["s2"]     # nothing visible left in s1
    assert errno_of(os.stat, sp) == errno.ENOENT
    m.ok("hidden", "s2/db on")
    assert os.listdir(m.path("snapshots", "s2")) == ["other"]
    assert shadow_row(m, "s1", "db")["hidden"] is True
    m.ok("hidden", "db off")
    m.ok("hidden", "s2/db off")
    assert sorted(os.listdir(m.path("luns"))) == ["db", "other"]

    # readonly on a LUN: EROFS, mode 0444, tag in the xattrs
    m.ok("readonly", "db on")
    assert errno_of(os.open, db, os.O_WRONLY) == errno.EROFS
    assert oct(os.stat(db).st_mode & 0o777) == "0o440" and xattrs(db)["readonly"] == "on"
    # readonly off on a shadow copy: a writable test bed that diverges
    m.ok("hidden", "s1/db off")
    m.ok("readonly", "s1/db off")
    assert oct(os.stat(sp).st_mode & 0o777) == "0o660" and xattrs(sp)["readonly"] == "off"
    W = os.urandom(MiB + 5)
    put(sp, W, 3 * MiB + 7)
    exp = bytearray(D)
    exp[3 * MiB + 7:4 * MiB + 12] = W
    assert read(sp) == exp
    assert read(db) == D                                 # the LUN is unaffected
    assert read(m.path("snapshots", "s2", "db")) == D    # and so is the other set

    # tags persist across stop/start; the writable shadow's data too
    m.ok("hidden", "s2/db on")
    m.ok("hidden", "other on")
    m.stop()
    m.start()
    assert lun_row(m, "db")["readonly"] is True and lun_row(m, "other")["hidden"] is True
    assert os.listdir(m.path("luns")) == ["db"]
    assert errno_of(os.open, db, os.O_RDWR) == errno.EROFS
    assert os.listdir(m.path("snapshots", "s2")) == ["other"]
    s1 = shadow_row(m, "s1", "db")
    assert s1["readonly"] is False and s1["hidden"] is False
    assert read(sp) == exp
    assert errno_of(os.open, m.path("snapshots", "s2", "db"), os.O_RDONLY) == errno.ENOENT
    m.ok("readonly", "db off")
    put(db, b"ok", 0)


# ---- 8. deletes reclaim space; shadow copies outlive their LUN -----------------------
def test_delete_reclaims_space(mount, tmp_path):
    m = mount
    m.ok("create", "a 128M")
    m.ok("create", "b 128M")
    a, b = m.path("luns", "a"), m.path("luns", "b")
    X = 64 * MiB

    def used():
        return pack_row(m, "main")["used_bytes"]

    def drops(before, by, what):
        wait_for(lambda: used() <= before - by, 15, f"{what} to free space (was {before}, "
                 f"now {used()})")

    put(a, os.urandom(X))                       # A: only set1/a will hold it
    m.ok("snapshot", "a set=set1")
    B = os.urandom(X)
    put(a, B)
    put(b, os.urandom(X))                       # C: only set2/b will hold it
    m.ok("snapshot", "a b set=set2")
    put(b, os.urandom(X))
    m.ok("snapshot", "a set=set3")              # B, also in set2/a
    put(a, os.urandom(X))                       # E: only LUN a holds it
    (tmp_path / "B").write_bytes(B)
    u0 = wait_for(lambda: (u := used()) >= 5 * X and u, 15, "all data to be counted")

    m.ok("delete", "set1/a")
    assert set_row(m, "set1") is None and not os.path.exists(m.path("snapshots", "set1"))
    drops(u0, X // 3, "delete set1/a")
    u1 = used()
    cmp_file(tmp_path / "B", m.path("snapshots", "set2", "a"), X)
    rc, reply, err = shell_ctl(m, "delete", "set2")
    assert rc == 0 and reply["deleted"] == "set2", (reply, err)
    assert set_row(m, "set2") is None
    drops(u1, X // 3, "delete set2")
    u2 = used()
    m.ok("delete", "a")
    assert not os.path.exists(a) and [v["name"] for v in m.status()["luns"]] == ["b"]
    drops(u2, X // 3, "delete LUN a")
    cmp_file(tmp_path / "B", m.path("snapshots", "set3", "a"), X)   # outlives its LUN
    assert xattrs(m.path("snapshots", "set3", "a"))["kind"] == "shadow"
    u3 = used()
    m.ok("delete", "set3")
    drops(u3, X // 3, "delete set3")
    assert used() <= X + 24 * MiB              # about LUN b's content is left
    # GC invariants: nothing dangling, nothing leaked
    m.stop()
    r = run([PY, os.path.join(REPO, "tools", "fsck"), m.array, "--strict"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- 9. jobs: pause, resume, throttle, cancel, persistence, CLI ----------------------
def test_job_controls_and_persistence(mount, tmp_path):
    m = mount
    m.ok("addpack", f"OTHER single {tmp_path}/other")
    m.ok("create", "src 128M")
    put(m.path("luns", "src"), os.urandom(96 * MiB))
    expect = read(m.path("luns", "src"))
    r = m.ok("snapshot", "src set=p1 context=plex pack=OTHER")
    jid = r["job"]
    m.ok("throttle", f"{jid} 8M")
    # throttled while running: 96 MiB cannot be done in a second at 8 MiB/s
    d0 = int(m.job(jid)["done_bytes"])
    wait_for(lambda: int(m.job(jid)["done_bytes"]) > d0, 10, "progress while throttled")
    j = m.job(jid)
    assert j["state"] == "running" and int(j["percent"]) < 60, j
    assert j["rate_limit"] == str(8 * MiB)

    p0 = int(m.job(jid)["done_bytes"])
    assert m.ok("pause", jid) == {"status": "ok", "job": jid, "state": "paused"}
    assert m.job(jid)["state"] == "paused"
    p = held_still(m, jid)
    assert p - p0 <= 2 * COPY_BATCH_BYTES, (p0, p)  # at most the batch in flight
    out = cli("jobs", mnt=m.mnt).stdout
    assert re.search(rf"^{jid} plex paused \d+%$", out, re.M), out

    # persistence: a paused job stays paused across stop/start
    m.stop()
    m.start()
    j = m.job(jid)
    assert j["state"] == "paused" and int(j["done_bytes"]) >= p > 0, (p, j)
    cmp_file(m.path("luns", "src"), m.path("snapshots", "p1", "src"))
    p = held_still(m, jid, 1.0)
    assert p == int(j["done_bytes"])
    m.ok("resume", jid)
    wait_for(lambda: int(m.job(jid)["done_bytes"]) > p, 10, "progress after resume")
    assert m.job(jid)["state"] == "running"
    m.ok("throttle", f"{jid} 0")
    assert cli("wait", jid, mnt=m.mnt).returncode == 0
    assert read(m.path("snapshots", "p1", "src")) == expect
    refused(m, "pause", jid, errno.EINVAL)            # it has ended

    # cancel: the job ends cancelled; `fusearray wait` says so and fails
    put(m.path("luns", "src"), os.urandom(64 * MiB))     # new blocks, for OTHER to copy
    expect = read(m.path("luns", "src"))
    r = m.ok("snapshot", "src set=p2 context=plex pack=OTHER")
    j2 = r["job"]
    m.ok("throttle", f"{j2} 4M")
    assert m.job(j2)["state"] == "running"
    assert m.ok("cancel", j2)["job"] == j2
    m.wait_job(j2, ("cancelled",), 10)
    w = cli("wait", j2, mnt=m.mnt, check=False)
    assert w.returncode != 0 and "cancelled" in w.stderr
    j = m.job(j2)
    assert int(j["percent"]) < 100 and j["finished"]
    assert any("cancelled" in l for l in m.job_events(j2))
    # the array stays consistent: the cancelled plex still reads right
    assert read(m.path("snapshots", "p2", "src")) == expect
    out = cli("jobs", mnt=m.mnt).stdout
    assert f"{jid} plex done 100%" in out and f"{j2} plex cancelled" in out
    refused(m, "resume", "999", errno.ENOENT)
    m.stop()
    m.start()
    assert m.job(j2)["state"] == "cancelled" and m.job(jid)["state"] == "done"


# ---- 10. the full ext4 flow -----------------------------------------------------------
def check_files(files: dict, root_from=None, root_to=None) -> None:
    for p, digest in sorted(files.items()):
        q = p.replace(root_from, root_to, 1) if root_from else p
        assert sha(read(q)) == digest, f"{q} differs"


def fsck_clean(dev: str) -> None:
    r = run(["e2fsck", "-fn", dev], check=False)
    assert r.returncode == 0, f"e2fsck -fn {dev}: {r.returncode}\n{r.stdout}{r.stderr}"


@pytest.mark.slow
def test_ext4_snapshot_damage_resync_testbed(mount, tmp_path):
    m = mount
    m.ok("create", "db 128M")
    dev = m.attach("db")
    run(["mkfs.ext4", "-q", dev])
    where = str(tmp_path / "fs")
    m.mount_fs(dev, where)
    rng = random.Random(10)
    files = write_files(where, "f", [3 * MiB, 100, 70000, 1], rng)
    os.makedirs(os.path.join(where, "sub"))
    files |= write_files(os.path.join(where, "sub"), "g", [2 * MiB + 1], rng)
    run(["sync"])
    # quiesce, as a VSS writer would; snapshot; thaw
    run(["fsfreeze", "-f", where])
    try:
        rc, reply, err = shell_ctl(m, "snapshot", "db set=nightly")
    finally:
        run(["fsfreeze", "-u", where])
    assert rc == 0, (reply, err)
    # the snapshot file itself mounts read-only through a read-only loop device
    sdev = run(["losetup", "--find", "--show", "-r",
                m.path("snapshots", "nightly", "db")]).stdout.strip()
    m.loops.append(sdev)
    snapfs = str(tmp_path / "snapfs")
    m.mount_fs(sdev, snapfs, "-o", "ro,noload")
    check_files(files, where, snapfs)
    m.umount_fs(snapfs)
    run(["losetup", "-d", sdev])
    m.loops.remove(sdev)

    # damage
    victims = sorted(files)[:3]
    for p in victims[:2]:
        with open(p, "r+b") as f:
            f.write(b"\0garbage\0" * 1000)
    os.unlink(victims[2])
    write_files(where, "junk", [4 * MiB], rng)
    run(["sync"])
    assert sha(read(victims[0])) != files[victims[0]]
    # restore: umount, detach, resync, attach, fsck, the old files are back
    m.umount_fs(where)
    refused(m, "resync", "nightly/db", errno.EBUSY)          # still attached
    m.detach("db", dev)
    wait_for(lambda: lun_row(m, "db")["open"] == 0, 10, "db closed after detach")
    r = m.ok("resync", "nightly/db")
    undo = r["undo"]
    assert undo.startswith("undo-db-")
    dev = m.attach("db")
    fsck_clean(dev)
    m.mount_fs(dev, where)
    check_files(files)
    assert not os.path.exists(os.path.join(where, "junk-0.bin"))
    # a test bed from the same shadow copy while the original keeps running
    m.ok("resync", "nightly/db=testbed")
    tdev = m.attach("testbed")
    fsck_clean(tdev)
    bed = str(tmp_path / "bed")
    m.mount_fs(tdev, bed)
    check_files(files, where, bed)
    with open(os.path.join(bed, "only-in-testbed"), "wb") as f:
        f.write(b"bed")
    with open(os.path.join(where, "only-in-db"), "wb") as f:
        f.write(b"db")
    run(["sync"])
    assert not os.path.exists(os.path.join(where, "only-in-testbed"))
    assert not os.path.exists(os.path.join(bed, "only-in-db"))
    check_files(files)
    m.umount_fs(bed)
    m.detach("testbed", tdev)
    # the undo set holds the damaged state, mountable read-only
    udev = run(["losetup", "--find", "--show", "-r", m.path("snapshots", undo, "db")]
               ).stdout.strip()
    m.loops.append(udev)
    undofs = str(tmp_path / "undofs")
    m.mount_fs(udev, undofs, "-o", "ro,noload")
    assert os.path.exists(os.path.join(undofs, "junk-0.bin"))
    assert not os.path.exists(victims[2].replace(where, undofs, 1))
    assert sha(read(victims[0].replace(where, undofs, 1))) != files[victims[0]]
    m.umount_fs(undofs)
    run(["losetup", "-d", udev])
    m.loops.remove(udev)
    m.umount_fs(where)
    fsck_clean(dev)
    m.detach("db", dev)


# ---- 4c. the destination takes the source's size, also after growing ----------------
def test_resync_restores_size_after_grow(mount):
    m = mount
    m.ok("create", "db 64M")
    D = os.urandom(64 * MiB)
    put(m.path("luns", "db"), D)
    m.ok("snapshot", "db set=nightly")
    # 64 MiB of 64 KiB blocks is one map leaf: 128 MiB needs a taller map
    m.ok("resize", "db 128M")
    assert os.stat(m.path("luns", "db")).st_size == 128 * MiB
    put(m.path("luns", "db"), b"\x33" * MiB, 100 * MiB)
    m.ok("resync", "nightly/db")
    assert os.stat(m.path("luns", "db")).st_size == 64 * MiB
    assert read(m.path("luns", "db")) == D
    m.ok("resize", "db 256M")
    assert read(m.path("luns", "db"), 64 * MiB, MiB) == bytes(MiB)



def test_resync_into_a_lun_of_another_block_size(mount):
    """A resync gives the destination the shadow copy's block size: reads
    across a zero (unwritten) block of the new size come back whole and in
    place (the zero block served used to keep the old size: a 256 KiB read
    over 128K blocks returned 192 KiB, the data after the hole shifted)."""
    m = mount
    m.ok("create", "src 4M block=128K")
    m.ok("create", "dst 4M block=64K")
    K = 1024
    a, c = os.urandom(128 * K), os.urandom(128 * K)
    put(m.path("luns", "src"), a, 0)          # block 0 data, block 1 a hole
    put(m.path("luns", "src"), c, 256 * K)    # block 2 data
    put(m.path("luns", "dst"), os.urandom(1 * MiB))
    m.ok("snapshot", "src set=s128")
    m.ok("resync", "s128/src=dst force=yes")
    want = a + bytes(128 * K) + c + bytes(MiB - 384 * K)
    got = read(m.path("luns", "dst"), 0, MiB)
    assert len(got) == MiB
    assert got == want
    assert read(m.path("luns", "dst"), 64 * K, 256 * K) == want[64 * K:320 * K]
    fd = os.open(m.path("luns", "dst"), os.O_RDONLY)
    try:
        assert os.pread(fd, 256 * K, 0) == want[:256 * K]     # one request, whole
    finally:
        os.close(fd)
    st = {v["name"]: v for v in m.status()["luns"]}
    assert st["dst"]["block_size"] == 128 * K

# ---- 11. bad input ----------------------------------------------------------------------
def test_bad_input(mount, tmp_path):
    m = mount
    m.ok("create", "db 16M")
    m.ok("create", "logs 16M")
    m.ok("create", "big 1G")
    put(m.path("luns", "db"), os.urandom(4 * MiB))
    m.ok("snapshot", "db logs big set=nightly")
    m.ok("snapshot", "db set=other")
    m.ok("addpack", f"OTHER single {tmp_path}/other")
    cases = [
        ("resync", "nope/db", errno.ENOENT),
        ("resync", "nightly/nope", errno.ENOENT),
        ("resync", "nightly", errno.EINVAL),
        ("resync", "nightly/db=other/db", errno.EINVAL),
        ("resync", "nightly/db=bad/name/x", errno.EINVAL),
        ("resync", "nightly/db=x nightly/logs=x", errno.EINVAL),
        ("resync", "nightly/db speed=fast", errno.EINVAL),
        ("resync", "nightly/db pack=nope", errno.ENOENT),
        ("resync", "nightly/db=far pack=OTHER undo=maybe", errno.EINVAL),
        ("snapshot", "nope", errno.ENOENT),
        ("snapshot", "db nope set=new", errno.ENOENT),
        ("snapshot", "db set=nightly", errno.EEXIST),
        ("snapshot", "db set=bad/name", errno.EINVAL),
        ("snapshot", "db db", errno.EINVAL),
        ("snapshot", "db color=red", errno.EINVAL),
        ("snapshot", "db context=mirror", errno.EINVAL),
        ("snapshot", "db context=differential pack=OTHER", errno.EOPNOTSUPP),
        ("snapshot", "db context=plex pack=nope", errno.ENOENT),
        ("swap", "nope/db", errno.ENOENT),
        ("swap", "nightly/db as=logs", errno.EEXIST),
        ("swap", "nightly/db as=a/b", errno.EINVAL),
        ("swap", "nightly/db when=now", errno.EINVAL),
        ("delete", "nope", errno.ENOENT),
        ("delete", "nightly/nope", errno.ENOENT),
        ("readonly", "nightly/nope on", errno.ENOENT),
        ("hidden", "nope/db on", errno.ENOENT),
        ("readonly", "nightly/db sideways", errno.EINVAL),
        ("cancel", "42", errno.ENOENT),
        ("throttle", "42 1M", errno.ENOENT),
    ]
    for verb, line, want in cases:
        refused(m, verb, line, want)
    # the shell sees the errno's message
    r = sh(f"echo 'nightly/db=other/db' > {m.mnt}/ctl/resync", check=False)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    r = sh(f"echo 'db set=nightly' > {m.mnt}/ctl/snapshot", check=False)
    assert r.returncode != 0 and "File exists" in r.stderr
    # a read-only destination
    m.ok("readonly", "logs on")
    refused(m, "resync", "nightly/logs", errno.EROFS)
    m.ok("readonly", "logs off")

    # a LUN still being copied in: EBUSY for snapshot and resync into it
    m.ok("create", "src 64M")
    put(m.path("luns", "src"), os.urandom(48 * MiB))
    m.ok("snapshot", "src set=s")
    jid = m.ok("resync", "s/src=far pack=OTHER")["job"]
    m.ok("throttle", f"{jid} 2M")
    assert m.job(jid)["state"] == "running"
    # (the job runs before its plan is made: its total is set then, by itself,
    # which `refused` would see as a change if it came between its two looks)
    wait_for(lambda: int(m.job(jid)["total_bytes"]) > 0, what="the copy's plan")
    refused(m, "snapshot", "far", errno.EBUSY)
    refused(m, "resync", "nightly/db=far", errno.EBUSY)
    m.ok("throttle", f"{jid} 0")
    m.wait_job(jid)

    # a destination the pack cannot hold: a pack on a 4 MiB filesystem takes
    # LUNs of at most 16 x 4 MiB, so a 1 GiB shadow copy does not fit
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small)])
    try:
        m.ok("addpack", f"SMALL single {small}/disk")
        reply = refused(m, "resync", "nightly/big=x pack=SMALL", errno.ENOSPC)
        assert "SMALL" in reply["message"]
        m.stop()
    finally:
        m.close()
        run(["umount", str(small)], check=False)


def test_plex_into_a_pack_too_small_is_enospc(mount, tmp_path):
    """A plex shadow copy is a volume on the target pack: like create, resize
    and resync, it must fit the pack's limit (16x its capacity)."""
    m = mount
    m.ok("create", "big 1G")
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small)])
    try:
        m.ok("addpack", f"SMALL single {small}/disk")
        refused(m, "create", "x 1G pack=SMALL", errno.ENOSPC)
        refused(m, "snapshot", "big context=plex pack=SMALL", errno.ENOSPC)
        m.stop()
    finally:
        m.close()
        run(["umount", str(small)], check=False)


def test_cli_jobs_and_wait(mount):
    """`fusearray jobs` lists jobs, `--json` is machine output; `wait` exits 0
    for a done job and non-zero for an unknown one."""
    m = mount
    m.ok("create", "db 4M")
    m.ok("snapshot", "db set=s")
    jid = m.ok("resync", "s/db")["job"]
    assert cli("jobs", mnt=m.mnt).stdout == f"{jid} resync done 100%\n"
    assert cli("wait", jid, mnt=m.mnt).returncode == 0
    r = cli("wait", "77", mnt=m.mnt, check=False)
    assert r.returncode == 1 and "no job" in r.stderr
    out = cli("jobs", "--json", mnt=m.mnt).stdout
    assert json.loads(out) == [{"id": int(jid), "kind": "resync", "state": "done",
                                "percent": 100, "done_bytes": 0, "total_bytes": 0}], out
