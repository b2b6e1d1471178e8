"""Transportable shadow copies (issue 5) end to end, as a user does it from
the shell: `fusearray export SET [--base SET2] FILE|-` on one array and
`fusearray import FILE|- [--as] [--remap] [--resume]` on another, both
mounted at once.

Covered: full round trips through a file and through a pipe (bit-exact,
identity and tags kept, or remapped), an incremental chain of three sets
(small streams, zeroed blocks, a missing base refused), WWN and name
collisions, damaged / truncated / foreign streams refused leaving nothing
behind, an interrupted import resumed (also across a daemon restart) or
cancelled, dedup against what the receiving pack holds, a 1 TiB thin LUN, the
daemon's memory while a 512 MiB set streams, and the format spec.

Every subprocess is ended from `finally` by its Popen; the `make_mount`
fixture unmounts both arrays.
"""
import json
import os
import random
import re
import signal
import struct
import subprocess


from fusearray import ctlclient
from conftest import PY, Mount, run, wait_for
from fallbacks import punch_hole
from fusearray import native

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BS = 64 * KiB                        # the default block size
FA = f"{PY} -m fusearray"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WWN_RE = re.compile(r"naa\.6[0-9a-f]{31}\Z")
XA = "user.fusearray."
REC = struct.Struct("<cI")           # record framing (docs/stream-format.md)
MAGIC = b"FASTRM\x00\x02"


# ---- helpers -----------------------------------------------------------------------
def sh(script: str, check=True, **kw) -> subprocess.CompletedProcess:
    return run(["bash", "-c", "set -o pipefail; " + script], check=check, **kw)


def fa(m: Mount, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
    """The `fusearray -m MNT ...` CLI."""
    return run([PY, "-m", "fusearray", "-m", m.mnt, *map(str, args)], check=check,
               timeout=timeout)


def pair(make_mount, **kw) -> tuple[Mount, Mount]:
    """Two independent arrays, mounted at once."""
    return make_mount("a", **kw).init().start(), make_mount("b", **kw).init().start()


def put(p, data: bytes, off: int = 0) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        for i in range(0, len(data), MiB):
            assert os.pwrite(fd, data[i:i + MiB], off + i) == len(data[i:i + MiB])
        os.fsync(fd)
    finally:
        os.close(fd)


def read(p, off=0, n=None) -> bytes:
    with open(p, "rb") as f:
        f.seek(off)
        return f.read() if n is None else f.read(n)


def fill_random(p, nbytes: int, off: int = 0) -> None:
    """Random data into a LUN file (dd, direct I/O, fsync)."""
    run(["dd", "if=/dev/urandom", f"of={p}", "bs=1M", f"count={nbytes // MiB}",
         f"seek={off}", "iflag=fullblock", "oflag=direct,seek_bytes",
         "conv=notrunc,fsync", "status=none"])


def cmp_file(a, b) -> None:
    run(["cmp", str(a), str(b)])


def xattrs(p) -> dict:
    return {k[len(XA):]: os.getxattr(p, k).decode() for k in os.listxattr(p)
            if k.startswith(XA)}


def listed(m: Mount) -> list[str]:
    return sorted(os.listdir(m.path("snapshots")))


def set_row(m: Mount, name: str) -> dict | None:
    return next((s for s in m.status()["sets"] if s["name"] == name), None)


def shadow_row(m: Mount, set_name: str, name: str) -> dict:
    return next(v for v in set_row(m, set_name)["shadow_copies"] if v["name"] == name)


def used(m: Mount, pack: str = "main") -> int:
    return next(p for p in m.status()["packs"] if p["name"] == pack)["used_bytes"]


def jobs(m: Mount, kind="import") -> list[dict]:
    return [j for j in m.status()["jobs"] if j["kind"] == kind]



def n_events(m: Mount) -> int:
    return len(m.events().splitlines())


def events_since(m: Mount, n: int) -> list[str]:
    return m.events().splitlines()[n:]


def records(path) -> list[tuple[int, bytes, int]]:
    """(offset, type, payload length) of every record of a stream file."""
    data = read(path)
    assert data[:8] == MAGIC
    out, off = [], 8
    while off < len(data):
        typ, n = REC.unpack_from(data, off)
        out.append((off, typ, n))
        off += REC.size + n
    assert off == len(data)
    return out


def damaged(src, dst, pos: int, xor: int = 0x01) -> str:
    data = bytearray(read(src))
    data[pos] ^= xor
    with open(dst, "wb") as f:
        f.write(data)
    return str(dst)


def refused_import(m: Mount, stream, expect: str, *args, errname: str | None = None) -> str:
    """`import` must fail: exit 1, a one-line `fusearray: ...` message
    containing `expect`, and nothing left: no set listed or in status.json,
    no import job left active, the pack's used bytes back where they were."""
    before_sets, before_list, before_used = m.status()["sets"], listed(m), used(m)
    n0 = n_events(m)
    r = fa(m, "import", stream, *args, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("fusearray: ") and "\n" not in err and expect in err, err
    assert "Traceback" not in r.stderr and r.stdout == "", r
    assert listed(m) == before_list
    assert m.status()["sets"] == before_sets
    assert not [j for j in jobs(m) if j["state"] in ("running", "paused", "queued")], \
        m.status()["jobs"]
    wait_for(lambda: used(m) <= before_used, 30,
             f"space to be reclaimed (used {used(m)}, was {before_used})")
    new = events_since(m, n0)
    assert not [e for e in new if "internal error" in e], new
    assert any(expect in e for e in new), new           # the failure is logged
    if errname:
        assert any(f"[{errname}]" in e for e in new), new
    return err


def end_proc(p: subprocess.Popen | None, group: bool = False) -> None:
    """Kill (if still running) and reap; `group`: the whole process group a
    `start_new_session` shell pipeline made."""
    if p is None:
        return
    if group:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif p.poll() is None:
        p.kill()
    p.wait(timeout=30)
    for s in (p.stdin, p.stdout, p.stderr):
        if s is not None:
            try:
                s.close()
            except OSError:
                pass


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no {field} for pid {pid}")


# ---- 1. full round trip, through a file and through a pipe --------------------------
def mapped_imports(m) -> int:
    """How many imports mapped their stream file; with the native layer off
    (FUSEARRAY_NATIVE=0, no map_stream) none may, so this is 1 there when
    none did: the fallback (reads) was used, as the native leg expects 1."""
    with open(os.path.join(m.array, "daemon.log")) as f:
        n = f.read().count("import: the stream file is mapped")
    if not native.ENABLED:
        assert n == 0, "a stream file was mapped with the native layer off"
        return 1
    return n


def test_round_trip_file_and_pipe_between_two_arrays(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "db 24M")
    a.ok("create", "x 8M block=16K")
    a.ok("create", "h 1M")
    fill_random(a.path("luns", "db"), 20 * MiB, 2 * MiB)
    put(a.path("luns", "x"), os.urandom(3 * MiB + 777), 12345)      # unaligned
    put(a.path("luns", "h"), os.urandom(100_000), 5000)
    a.ok("snapshot", "db x h set=S")
    a.ok("readonly", "S/x off")
    a.ok("hidden", "S/h on")
    put(a.path("luns", "db"), b"\xee" * MiB, 3 * MiB)   # later writes stay out of S
    src = {n: xattrs(a.path("snapshots", "S", n)) for n in ("db", "x")}
    assert src["x"]["readonly"] == "off" and src["x"]["block_size"] == "16384", src
    h_src = shadow_row(a, "S", "h")
    assert h_src["hidden"] is True

    # through a file, the set's own name: identity and tags kept
    f = tmp_path / "S.stream"
    fa(a, "export", "S", f)
    r = fa(b, "import", f)
    assert "imported set S" in r.stdout, r.stdout
    assert listed(b) == ["S"]
    assert sorted(os.listdir(b.path("snapshots", "S"))) == ["db", "x"]    # h is hidden
    for n in ("db", "x"):
        cmp_file(a.path("snapshots", "S", n), b.path("snapshots", "S", n))
        got = xattrs(b.path("snapshots", "S", n))
        for k in ("wwn", "serial", "origin", "context", "readonly", "hidden", "kind",
                  "set", "block_size", "pack"):
            assert got[k] == src[n][k], (n, k, got, src[n])
    assert os.stat(b.path("snapshots", "S", "x")).st_size == 8 * MiB
    h_b = shadow_row(b, "S", "h")
    assert h_b["hidden"] is True and h_b["wwn"] == h_src["wwn"] and h_b["readonly"] is True
    assert set_row(b, "S")["created"] == set_row(a, "S")["created"]
    assert read(b.path("snapshots", "S", "db"), 3 * MiB, 16) != b"\xee" * 16
    assert mapped_imports(b) == 1, "the stream file was read, not mapped (streamsock)"

    # through a pipe, under another name, new identities
    r = sh(f"{FA} -m {a.mnt} export S - | {FA} -m {b.mnt} import - --as S2 --remap")
    assert "imported set S2" in r.stdout, r.stdout
    assert mapped_imports(b) == 1          # a pipe is read
    assert listed(b) == ["S", "S2"]
    seen = {src[n]["wwn"] for n in src} | {h_src["wwn"]} | \
        {v["wwn"] for v in a.status()["luns"]}
    for n in ("db", "x"):
        cmp_file(a.path("snapshots", "S", n), b.path("snapshots", "S2", n))
        got = xattrs(b.path("snapshots", "S2", n))
        assert WWN_RE.match(got["wwn"]) and got["wwn"] not in seen, got
        seen.add(got["wwn"])
        assert got["serial"] != src[n]["serial"] and got["set"] == "S2"
        for k in ("origin", "context", "readonly", "hidden", "block_size"):
            assert got[k] == src[n][k], (n, k, got, src[n])
    h2 = shadow_row(b, "S2", "h")
    assert h2["hidden"] is True and h2["wwn"] not in seen

    # the hidden copy came across too, bit-exact
    for m, s in ((a, "S"), (b, "S"), (b, "S2")):
        m.ok("hidden", f"{s}/h off")
    cmp_file(a.path("snapshots", "S", "h"), b.path("snapshots", "S", "h"))
    cmp_file(a.path("snapshots", "S", "h"), b.path("snapshots", "S2", "h"))


# ---- 2. incremental chain -----------------------------------------------------------
def test_incremental_chain_of_three(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "vol 64M")
    a.ok("create", "small 4M")
    vol, small = a.path("luns", "vol"), a.path("luns", "small")
    fill_random(vol, 64 * MiB)
    fill_random(small, 4 * MiB)
    a.ok("snapshot", "vol small set=s1")
    rng = random.Random(5)
    nblk = 64 * MiB // BS
    for bno in rng.sample(range(nblk), nblk // 100):          # ~1 % of the blocks
        put(vol, os.urandom(BS), bno * BS)
    hole_off, hole_len = 300 * BS, 4 * BS
    punch_hole(vol, hole_off, hole_len)      # tests/fallbacks.py
    assert read(vol, hole_off, hole_len) == bytes(hole_len)
    a.ok("snapshot", "vol small set=s2")
    for bno in rng.sample(range(nblk), nblk // 100):
        put(vol, os.urandom(BS), bno * BS)
    put(small, os.urandom(5000), 7 * BS + 100)
    a.ok("snapshot", "vol small set=s3")

    f1, f2, f3 = (tmp_path / f"s{i}.stream" for i in (1, 2, 3))
    fa(a, "export", "s1", f1)
    fa(a, "export", "s2", "--base", "s1", f2)
    fa(a, "export", "s3", f3, "--base", "s2")
    full = os.path.getsize(f1)
    assert full > 68 * MiB
    for f in (f2, f3):
        size = os.path.getsize(f)
        assert 10 * BS < size <= 0.02 * full, (f, size, full)
    kinds = [json.loads(read(f, 8 + REC.size, records(f)[0][2]))["kind"] for f in (f1, f2, f3)]
    assert kinds == ["full", "incremental", "incremental"]

    # an incremental without its base: refused, nothing left
    refused_import(b, f2, "needs base set 's1'", errname="ENOENT")
    fa(b, "import", f1)
    refused_import(b, f3, "needs base set 's2'", errname="ENOENT")
    fa(b, "import", f2)
    fa(b, "import", f3)
    assert listed(b) == ["s1", "s2", "s3"]
    for s in ("s1", "s2", "s3"):                   # the base sets are left as they were
        for n in ("vol", "small"):
            cmp_file(a.path("snapshots", s, n), b.path("snapshots", s, n))
            assert xattrs(b.path("snapshots", s, n))["wwn"] == \
                xattrs(a.path("snapshots", s, n))["wwn"]
    # the punched hole came across as zeros (the base had data there)
    assert read(b.path("snapshots", "s1", "vol"), hole_off, hole_len) != bytes(hole_len)
    assert read(b.path("snapshots", "s2", "vol"), hole_off, hole_len) == bytes(hole_len)
    assert shadow_row(b, "s2", "vol")["allocated_bytes"] == \
        shadow_row(a, "s2", "vol")["allocated_bytes"] < 64 * MiB


def test_incremental_across_a_resize(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "r 32M")
    fill_random(a.path("luns", "r"), 32 * MiB)
    a.ok("snapshot", "r set=r1")
    a.ok("resize", "r 128M")
    fill_random(a.path("luns", "r"), 8 * MiB, 100 * MiB)
    fill_random(a.path("luns", "r"), MiB, 3 * MiB)
    a.ok("snapshot", "r set=r2")
    f1, f2 = tmp_path / "r1.stream", tmp_path / "r2.stream"
    fa(a, "export", "r1", f1)
    fa(a, "export", "r2", "--base", "r1", f2)
    fa(b, "import", f1)
    fa(b, "import", f2)
    cmp_file(a.path("snapshots", "r2", "r"), b.path("snapshots", "r2", "r"))


def test_incremental_into_another_pack(make_mount, tmp_path):
    a, b = pair(make_mount)
    os.makedirs(tmp_path / "p2")
    b.ok("addpack", f"p2 single {tmp_path / 'p2'}")
    a.ok("create", "q 16M")
    fill_random(a.path("luns", "q"), 16 * MiB)
    a.ok("snapshot", "q set=q1")
    fill_random(a.path("luns", "q"), MiB, 3 * MiB)
    a.ok("snapshot", "q set=q2")
    f1, f2 = tmp_path / "q1.stream", tmp_path / "q2.stream"
    fa(a, "export", "q1", f1)
    fa(a, "export", "q2", "--base", "q1", f2)
    fa(b, "import", f1)
    r = fa(b, "import", f2, "--pack", "p2", check=False)
    if r.returncode == 0:      # refusing it clearly would be fine too
        assert shadow_row(b, "q2", "q")["pack"] == "p2"
        cmp_file(a.path("snapshots", "q2", "q"), b.path("snapshots", "q2", "q"))
    else:
        assert r.returncode == 1 and "pack" in r.stderr and listed(b) == ["q1"], r


# ---- 3. identity and name collisions ------------------------------------------------
def test_wwn_collision_and_taken_name(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "d 8M")
    fill_random(a.path("luns", "d"), 8 * MiB)
    a.ok("snapshot", "d set=S")
    f = tmp_path / "S.stream"
    fa(a, "export", "S", f)
    wwn = xattrs(a.path("snapshots", "S", "d"))["wwn"]

    # back into the array it came from: the name is taken, then the WWN is
    refused_import(a, f, "already exists", errname="EEXIST")
    refused_import(a, f, "already exists", "--remap", errname="EEXIST")
    err = refused_import(a, f, "already used here by shadow S/d", "--as", "S2",
                         errname="EEXIST")
    assert wwn in err and "remap" in err
    r = fa(a, "import", f, "--as", "S2", "--remap")
    assert "imported set S2" in r.stdout
    cmp_file(a.path("snapshots", "S", "d"), a.path("snapshots", "S2", "d"))
    x2 = xattrs(a.path("snapshots", "S2", "d"))
    assert WWN_RE.match(x2["wwn"]) and x2["wwn"] != wwn
    assert x2["wwn"] != xattrs(a.path("luns", "d"))["wwn"]
    assert x2["origin"] == xattrs(a.path("snapshots", "S", "d"))["origin"]

    # on another array: the first import keeps the WWN, a second one collides with it
    fa(b, "import", f)
    assert xattrs(b.path("snapshots", "S", "d"))["wwn"] == wwn
    refused_import(b, f, "already used here by shadow S/d", "--as", "S3")
    fa(b, "import", f, "--as", "S3", "--remap")
    wwns = {xattrs(b.path("snapshots", s, "d"))["wwn"] for s in ("S", "S3")}
    assert len(wwns) == 2 and wwn in wwns and listed(b) == ["S", "S3"]


EXPORT_ERRORS = ((("nope",), "no shadow copy set named 'nope'"),
                 (("S", "--base", "nope"), "no base set named 'nope'"))


def test_export_errors_exit_1_write_nothing_and_are_logged(mount, tmp_path):
    mount.ok("create", "d 1M")
    mount.ok("snapshot", "d set=S")
    for args, expect in EXPORT_ERRORS:
        r = fa(mount, "export", *args, tmp_path / "x", check=False)
        assert r.returncode == 1 and r.stderr.startswith("fusearray: "), r
        assert not os.path.exists(tmp_path / "x")
        assert f"{expect} [ENOENT]" in mount.events()


def test_export_error_message_reaches_the_user(mount, tmp_path):
    mount.ok("create", "d 1M")
    mount.ok("snapshot", "d set=S")
    for args, expect in EXPORT_ERRORS:
        r = fa(mount, "export", *args, tmp_path / "x", check=False)
        assert r.returncode == 1 and expect in r.stderr, r


# ---- 4. damaged, truncated and foreign streams --------------------------------------
def test_damaged_truncated_foreign_streams_leave_nothing(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "db 32M")
    fill_random(a.path("luns", "db"), 32 * MiB)
    a.ok("snapshot", "db set=S")
    good = tmp_path / "S.stream"
    fa(a, "export", "S", good)
    recs = records(good)
    size = os.path.getsize(good)
    blocks = [r for r in recs if r[1] == b"B"]
    assert len(blocks) == 512 and recs[0][1] == b"H" and recs[-1][1] == b"T"
    # the receiver already holds data of its own
    b.ok("create", "keep 8M")
    fill_random(b.path("luns", "keep"), 4 * MiB)
    b.ok("snapshot", "keep set=mine")
    u0 = used(b)

    # a flipped bit in the data of a block 3/4 into the stream: refused at that block
    off, _, n = blocks[3 * len(blocks) // 4]
    bad = damaged(good, tmp_path / "data.bad", off + REC.size + 16 + 1000)
    err = refused_import(b, bad, "does not match its hash")
    at = int(re.search(r"stream offset (\d+)", err).group(1))
    assert off < at <= off + REC.size + n, (off, at)         # at once, not at the end

    # a changed value in the header (still valid JSON): the chain catches it
    hdr = read(good, 0, recs[1][0])
    pos = hdr.index(b'"array": "') + len(b'"array": "')
    # another hex digit, so the id stays well-formed and only the chain can
    # tell (flipping a bit turned 'a' into '`' once in 16 arrays, and then
    # the header check refused it first: CI stop 21)
    swap = ord("0") if hdr[pos] != ord("0") else ord("1")
    refused_import(b, damaged(good, tmp_path / "hdr.bad", pos, xor=hdr[pos] ^ swap),
                   "checksum or counts do not match")
    # the hash field of a block whose data is unchanged: refused at that block
    off, _, n = blocks[200]
    refused_import(b, damaged(good, tmp_path / "h64.bad", off + REC.size + 8 + 3),
                   "does not match its hash")
    # a block's number (within the LUN): only the chain covers it
    off, _, n = blocks[300]
    refused_import(b, damaged(good, tmp_path / "bno.bad", off + REC.size, 0x01),
                   "checksum or counts do not match")
    # a record's type byte
    refused_import(b, damaged(good, tmp_path / "type.bad", blocks[100][0], 0x40),
                   "corrupt stream")
    # truncated: in the middle of a block, and just before the trailer
    for name, cut in (("half", size // 2), ("notrailer", recs[-1][0])):
        p = tmp_path / f"{name}.bad"
        with open(p, "wb") as out:
            out.write(read(good, 0, cut))
        refused_import(b, p, "truncated")
    # foreign: random bytes, a text file, an unknown version
    p = tmp_path / "random.bad"
    p.write_bytes(os.urandom(MiB))
    refused_import(b, p, "not a fusearray stream")
    refused_import(b, os.path.join(REPO, "README.md"), "not a fusearray stream")
    refused_import(b, damaged(good, tmp_path / "v1.bad", 7, 0x03),
                   "stream version 1 is not supported")

    assert used(b) == u0 and listed(b) == ["mine"]
    fa(b, "import", good)                          # and the good stream still works
    cmp_file(a.path("snapshots", "S", "db"), b.path("snapshots", "S", "db"))


def test_damaged_header_json_is_reported_as_damaged(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "d 1M")
    put(a.path("luns", "d"), os.urandom(MiB))
    a.ok("snapshot", "d set=S")
    good = tmp_path / "S.stream"
    fa(a, "export", "S", good)
    hdr = read(good, 0, records(good)[1][0])
    for name, pos in (("key", hdr.index(b'"set": {') + 2),      # "set" -> "sdt"
                      ("syntax", hdr.index(b'"format"') - 2)):  # the ',' before it
        p = damaged(good, tmp_path / f"{name}.bad", pos)
        err = refused_import(b, p, "stream")
        assert "truncated" not in err and ("damaged" in err or "corrupt" in err), (name, err)


# ---- 4. an interrupted import: cancelled, resumed, resumed after a restart -------------
def partial_import(m: Mount, stream, nbytes: int, *args) -> int:
    """Feed the first `nbytes` of `stream` to `fusearray import -` and
    SIGKILL it once its job shows progress. Returns the job id."""
    known = {j["id"] for j in m.status()["jobs"]}
    p = subprocess.Popen([PY, "-m", "fusearray", "-m", m.mnt, "import", "-", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        with open(stream, "rb") as f:
            left = nbytes
            while left:
                chunk = f.read(min(MiB, left))
                p.stdin.write(chunk)
                left -= len(chunk)
        p.stdin.flush()
        j = wait_for(lambda: next((j for j in jobs(m) if j["id"] not in known
                                   and j["done_bytes"] >= nbytes // 2), None),
                     30, "the import job to show progress")
        assert j["state"] == "running" and p.poll() is None, (j, p.poll())
        p.kill()                                     # SIGKILL, mid-stream
        assert p.wait(timeout=30) == -9
    finally:
        end_proc(p)
    jid = j["id"]
    wait_for(lambda: m.job(jid)["state"] == "paused", 30, f"import job {jid} to pause")
    return jid


def test_interrupted_import_cancel_resume_and_restart(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "big 256M")
    fill_random(a.path("luns", "big"), 256 * MiB)
    a.ok("snapshot", "big set=S")
    big = tmp_path / "S.stream"
    fa(a, "export", "S", big)
    total = os.path.getsize(big)
    u0 = used(b)

    # interrupted, then cancelled: removed and its space reclaimed
    jid = partial_import(b, big, 96 * MiB)
    assert used(b) > u0 + 64 * MiB                  # it had stored data
    assert listed(b) == [] and b.status()["sets"] == []
    wait_for(lambda: f"import job {jid} interrupted at stream offset" in b.events(), 30,
             "the interruption to be logged")
    b.ok("cancel", str(jid))
    assert b.job(jid)["state"] == "cancelled"
    wait_for(lambda: used(b) <= u0, 30, "the cancelled import's space to be reclaimed")
    assert listed(b) == [] and b.status()["sets"] == []
    r = fa(b, "import", big, "--resume", check=False)
    assert r.returncode == 1 and "no interrupted import" in r.stderr, r

    # interrupted, then resumed from where it stopped
    jid = partial_import(b, big, 96 * MiB)
    assert listed(b) == [] and b.status()["sets"] == []
    off = int(b.job(jid)["stream_offset"])
    assert 32 * MiB < off <= 96 * MiB, off
    r = fa(b, "import", big, "--as", "S", "--resume")
    assert "imported set S" in r.stdout, r.stdout
    assert b.job(jid)["state"] == "done"
    assert f"import job {jid} resumes at stream offset {off}" in b.events()
    cmp_file(a.path("snapshots", "S", "big"), b.path("snapshots", "S", "big"))
    assert xattrs(b.path("snapshots", "S", "big"))["wwn"] == \
        xattrs(a.path("snapshots", "S", "big"))["wwn"]

    # interrupted, the daemon restarted, then resumed
    jid = partial_import(b, big, 128 * MiB, "--as", "S3", "--remap")
    b.stop()
    b.start()
    assert b.job(jid)["state"] == "paused"
    assert listed(b) == ["S"] and [s["name"] for s in b.status()["sets"]] == ["S"]
    off = int(b.job(jid)["stream_offset"])
    assert 64 * MiB < off < total, off
    r = fa(b, "import", big, "--as", "S3", "--resume")
    assert "imported set S3" in r.stdout, r.stdout
    assert b.job(jid)["state"] == "done" and listed(b) == ["S", "S3"]
    cmp_file(a.path("snapshots", "S", "big"), b.path("snapshots", "S3", "big"))
    assert xattrs(b.path("snapshots", "S3", "big"))["wwn"] != \
        xattrs(b.path("snapshots", "S", "big"))["wwn"]


def test_resume_from_a_fresh_export_through_a_pipe(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "big 64M")
    fill_random(a.path("luns", "big"), 64 * MiB)
    a.ok("snapshot", "big set=S")
    f = tmp_path / "S.stream"
    fa(a, "export", "S", f)
    jid = partial_import(b, f, 40 * MiB)
    r = sh(f"{FA} -m {a.mnt} export S - | {FA} -m {b.mnt} import - --resume", check=False)
    if r.returncode == 0:
        cmp_file(a.path("snapshots", "S", "big"), b.path("snapshots", "S", "big"))
    else:     # refusing is acceptable if it is clear and the partial import is kept
        assert "corrupt" not in r.stderr and "damaged" not in r.stderr \
            and b.job(jid)["state"] == "paused", \
            (r.stderr, b.job(jid))


def test_export_read_in_odd_sizes_from_the_shell(mount, tmp_path):
    """ctl/export read with any read size (cat's 128K, dd's odd 77777 bytes)
    gives the same bytes as the CLI: the encoder's batch buffers are
    recycled only once every byte of them has been sent."""
    m = mount
    m.ok("create", "db 40M")
    fill_random(m.path("luns", "db"), 40 * MiB)
    m.ok("snapshot", "db set=S")
    ref = tmp_path / "cli.stream"
    fa(m, "export", "S", ref)
    ctl = m.path("ctl", "export")
    for name, reader in (("cat", "cat <&3"), ("dd", "dd bs=77777 status=none <&3")):
        out = tmp_path / f"{name}.stream"
        run(["bash", "-c", f"exec 3<>{ctl}; echo S >&3; {reader} > {out}; exec 3>&-"])
        assert os.path.getsize(out) == os.path.getsize(ref) > 40 * MiB, name
        cmp_file(ref, out)


def test_export_to_a_closed_pipe_has_no_traceback(mount):
    mount.ok("create", "d 4M")
    fill_random(mount.path("luns", "d"), 4 * MiB)
    mount.ok("snapshot", "d set=S")
    r = sh(f"{FA} -m {mount.mnt} export S - | head -c 1000 | wc -c", check=False)
    assert r.stdout.strip() == "1000"
    assert "Traceback" not in r.stderr, r.stderr


# ---- 5. dedup on import, a huge thin LUN, bounded memory ------------------------------
def test_import_dedups_against_the_receiving_pack(make_mount, tmp_path):
    a, b = pair(make_mount)
    data = tmp_path / "data"
    data.write_bytes(os.urandom(32 * MiB))
    for m in (a, b):                      # the receiver wrote the same data itself
        m.ok("create", "d 32M")
        run(["dd", f"if={data}", f"of={m.path('luns', 'd')}", "bs=1M", "oflag=direct",
             "conv=notrunc,fsync", "status=none"])
    a.ok("snapshot", "d set=S")
    f = tmp_path / "S.stream"
    fa(a, "export", "S", f)
    u0 = used(b)
    fa(b, "import", f)
    u1 = used(b)
    assert u1 - u0 < MiB, (u0, u1)                 # 32 MiB of data, all known
    fa(b, "import", f, "--as", "S2", "--remap")
    u2 = used(b)
    assert u2 - u1 < MiB, (u1, u2)
    assert shadow_row(b, "S2", "d")["allocated_bytes"] == 32 * MiB
    cmp_file(data, b.path("snapshots", "S", "d"))
    cmp_file(data, b.path("snapshots", "S2", "d"))
    # the control: into an array that lacks the blocks, the data is stored
    b.ok("delete", "d")
    b.ok("delete", "S")
    b.ok("delete", "S2")
    wait_for(lambda: used(b) < u0 - 16 * MiB, 30, "the deletes to free the data")
    u3 = used(b)
    fa(b, "import", f)
    assert used(b) - u3 >= 32 * MiB, (u3, used(b))


def test_thin_1T_lun_exports_a_small_stream(make_mount, tmp_path):
    a, b = pair(make_mount)
    a.ok("create", "t 1T")
    d1, d2 = os.urandom(4 * MiB), os.urandom(4 * MiB)
    t = a.path("luns", "t")
    put(t, d1, 0)
    put(t, d2, 700 * GiB + 3 * MiB)
    a.ok("snapshot", "t set=T")
    f = tmp_path / "T.stream"
    fa(a, "export", "T", f, timeout=60)
    assert 8 * MiB < os.path.getsize(f) < 10 * MiB, os.path.getsize(f)
    fa(b, "import", f, timeout=60)
    p = b.path("snapshots", "T", "t")
    assert os.stat(p).st_size == TiB
    assert shadow_row(b, "T", "t")["allocated_bytes"] == 8 * MiB
    assert os.stat(p).st_blocks * 512 <= 9 * MiB
    assert read(p, 0, 4 * MiB) == d1
    assert read(p, 700 * GiB + 3 * MiB, 4 * MiB) == d2
    for off in (4 * MiB, 300 * GiB, TiB - MiB):
        assert read(p, off, MiB) == bytes(MiB)


def test_memory_bounded_while_streaming_512M(make_mount, tmp_path):
    a, b = pair(make_mount, cache_size=64 * MiB)
    cache = a.status()["cache"]["limit_bytes"]
    assert cache == 64 * MiB == b.status()["cache"]["limit_bytes"]
    bound = cache + 200 * MiB
    a.ok("create", "big 512M")
    fill_random(a.path("luns", "big"), 512 * MiB)
    a.ok("snapshot", "big set=S")
    pids = {"export": a.status()["pid"], "import": b.status()["pid"]}
    peak = {k: 0 for k in pids}

    def sample():
        for k, pid in pids.items():
            peak[k] = max(peak[k], proc_status(pid, "VmRSS"))
    p = subprocess.Popen(["bash", "-c", f"set -o pipefail; {FA} -m {a.mnt} export S - | "
                          f"{FA} -m {b.mnt} import - --as S2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        wait_for(lambda: sample() or p.poll() is not None, 120, "export | import")
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    finally:
        end_proc(p, group=True)
    assert b"imported set S2" in out
    assert shadow_row(b, "S2", "big")["allocated_bytes"] == 512 * MiB
    for k, pid in pids.items():
        hwm = proc_status(pid, "VmHWM")
        print(f"{k} daemon: peak VmRSS {peak[k] // MiB} MiB, VmHWM {hwm // MiB} MiB, "
              f"bound {bound // MiB} MiB")
        assert peak[k] < bound and hwm < bound, (k, peak[k] // MiB, hwm // MiB)


# ---- 6. the format is documented ----------------------------------------------------
def test_stream_format_is_documented():
    with open(os.path.join(REPO, "docs", "stream-format.md")) as f:
        doc = f.read()
    assert all(w in doc for w in ("MAGIC", "header", "record", "trailer", "## Versioning",
                                  "xxh3")), "docs/stream-format.md is incomplete"


# ---- issue 13: hostile streams and command lines ---------------------------------------
def _forged(good, dst, change) -> str:
    """`good` with its header changed by `change(header)` and the trailer's
    chain recomputed (docs/stream-format.md), as a careful forger would."""
    import xxhash
    data = read(good)
    out, chain, n, blocks, off = [MAGIC], bytes(16), 0, 0, 8
    while off < len(data):
        typ, size = REC.unpack_from(data, off)
        payload = data[off + 5:off + 5 + size]
        off += 5 + size
        if typ == b"H":
            h = json.loads(payload)
            change(h)
            payload = json.dumps(h).encode()
        if typ == b"T":
            payload = json.dumps({"records": n, "blocks": blocks,
                                  "chain": chain.hex()}).encode()
        else:
            chain = xxhash.xxh3_128_digest(chain + typ + (payload[:16] if typ == b"B"
                                                          else payload))
            n += 1
            blocks += typ == b"B"
        out.append(REC.pack(typ, len(payload)) + payload)
    with open(dst, "wb") as f:
        f.write(b"".join(out))
    return str(dst)


def test_hostile_headers_are_refused_before_anything_is_staged(make_mount, tmp_path):
    """Defects 4, 11, 12, 13: a header with a map height of 1000, a block
    size of 2^40, 1, 3 or 256 MiB, a size not a multiple of 512, a WWN with
    a newline, escape sequences in context, two volumes of one name: each
    refused (EINVAL, the field named) with nothing staged; the array still
    creates, writes and fsyncs, and after a restart no set comes back."""
    a, b = pair(make_mount)
    for n in ("d", "e"):
        a.ok("create", f"{n} 1M")
        put(a.path("luns", n), os.urandom(MiB))
    a.ok("snapshot", "d e set=S")
    good = tmp_path / "S.stream"
    fa(a, "export", "S", good)

    def vol0(**kw):
        return lambda h: h["volumes"][0].update(kw)
    cases = [("height", vol0(height=1000)), ("block_size", vol0(block_size=1 << 40)),
             ("block_size", vol0(block_size=1)), ("block_size", vol0(block_size=3)),
             ("block_size", vol0(block_size=256 * MiB)),
             ("multiple of 512", vol0(size=MiB + 100)),
             ("wwn", vol0(wwn="naa.6" + "0" * 30 + "\n")),
             ("context", vol0(context="\x1b[31mplex")),
             ("given twice", vol0(name="e"))]
    b.ok("create", "probe 1M")
    for i, (text, change) in enumerate(cases):
        err = refused_import(b, _forged(good, tmp_path / f"bad{i}.fas", change), text,
                             "--remap", errname="EINVAL")
        assert "corrupt stream" in err, err
        b.ok("create", f"after{i} 1M")
        put(b.path("luns", f"after{i}"), os.urandom(64 * KiB))      # write + fsync
    fa(b, "import", good)               # a valid stream still goes in
    b.ok("delete", "S")
    b.stop()
    b.start()
    assert b.status()["sets"] == [] and listed(b) == []
    assert "Traceback" not in b.output()


def _ctl_stream(m, verb: str, writes: list[bytes]):
    """Write each piece on one descriptor of ctl/VERB; (errnos, reply)."""
    errs, data, _ = m.ctl_writes(verb, writes)
    return errs, data


def _pairs(data: bytes) -> dict:
    return ctlclient.parse_reply(data)


def test_ctl_export_and_import_check_their_command_line_at_its_write(mount, tmp_path):
    """Defect 18: a bad first line on ctl/export or ctl/import is refused at
    its write with an errno, and the reply read after it is
    status=error/errno/message (never empty, never a stream); import's
    as=/pack= are checked before any stream byte; once refused, the
    stream written after it gets the same errno and no more events."""
    import errno as E
    m = mount
    m.ok("create", "d 1M")
    put(m.path("luns", "d"), os.urandom(MiB))
    m.ok("snapshot", "d set=S")
    ref = tmp_path / "S.fas"
    fa(m, "export", "S", ref)
    stream = read(ref)
    for writes, errno_, text in [
            ([b"\xff\xfe\n"], E.EINVAL, "UTF-8"),
            ([b"S\nS\n"], E.EINVAL, "second line"),
            ([b"S \x1b[2J\n"], E.EINVAL, "control characters"),
            ([b"nope\n"], E.ENOENT, "nope"),
            ([b"x" * 5000 + b"\n"], E.EINVAL, "longer than")]:
        errs, data = _ctl_stream(m, "export", writes)
        reply = _pairs(data)
        assert errs == [errno_], (writes, errs)
        assert reply.get("status") == "error" and reply["errno"] == E.errorcode[errno_] \
            and text in reply["message"], (writes, data[:200])
    # a line written in two pieces, without a newline: it runs at the first read
    errs, data = _ctl_stream(m, "export", [b"S"])
    assert errs == [0] and data == stream
    # a second command while the stream is read: EINVAL, the stream goes on
    fd = os.open(m.path("ctl", "export"), os.O_RDWR)
    try:
        os.write(fd, b"S\n")
        first = os.read(fd, 4096)
        try:
            os.write(fd, b"S\n")
            raise AssertionError("a second export command was taken")
        except OSError as e:
            assert e.errno == E.EINVAL
        rest = b""
        while chunk := os.read(fd, 1 << 20):
            rest += chunk
    finally:
        os.close(fd)
    assert first + rest == stream

    n0 = n_events(m)
    for first_line, errno_, text in [
            (b"as=bad/name\n", E.EINVAL, "bad set name"),
            (b"as=S\n", E.EEXIST, "already exists"),
            (b"pack=nope\n", E.ENOENT, "no pack named"),
            (b"\xff\n", E.EINVAL, "UTF-8"),
            (b"job=3\n", E.EINVAL, "resume=yes"),
            (b"as=T\nas=U\n", E.EINVAL, "bad magic")]:
        errs, data = _ctl_stream(m, "import", [first_line, stream[:4096], stream[4096:]])
        reply = _pairs(data)
        assert errs == [errno_] * 3, (first_line, errs)
        assert reply.get("status") == "error" and reply["errno"] == E.errorcode[errno_] \
            and text in reply["message"], (first_line, data)
    new = events_since(m, n0)
    assert len(new) == 6 and not [e for e in new if "internal error" in e], new
    assert listed(m) == ["S"] and not [j for j in jobs(m) if j["state"] != "failed"]
    # the command line in pieces, then the stream: imported
    errs, data = _ctl_stream(m, "import", [b"as=", b"T remap=yes", b"\n" + stream[:100],
                                           stream[100:]])
    assert errs == [0] * 4 and _pairs(data) == {"status": "ok", "set": "T", "job": _pairs(
        data)["job"], "blocks": "16"}, data
    cmp_file(m.path("snapshots", "S", "d"), m.path("snapshots", "T", "d"))
