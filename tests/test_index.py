"""The block index on disk (issue 16 points 1 and 3): the committed index
is the catalogue's blocks table read through a bounded cache, opening reads
one row a segment and none a block, and an old catalogue is upgraded."""
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import trio

from fusearray import maps
from fusearray.array import init_array
from fusearray.catalogue import Catalogue, Changes, PackRows
from fusearray.store import DEFAULT_INDEX_CACHE, HDR
from fusearray.store.index import CACHE_ENTRY_BYTES, UNCACHED, BlockIndex

from conftest import cli, drop_caches, sha
from test_core import assert_clean, with_array

MiB = 1 << 20
TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


# ---- the index alone --------------------------------------------------------------
def test_changes_stay_visible_while_their_commit_runs(tmp_path):
    """take_pending hands the changes to a commit; until committed() they
    answer lookups (the table does not have them yet), a change made
    meanwhile wins over them, and after committed() the view answers."""
    idx = BlockIndex(1 << 20)
    idx.open([(b"a" * 16, 1, 0, 100)])
    idx.add(b"b" * 16, (1, 132, 100))
    idx.drop([(b"a" * 16, (1, 0, 100))])
    adds, dels, segs, _, _ = idx.take_pending()
    assert adds == {b"b" * 16: (1, 132, 100)} and dels == {b"a" * 16}
    assert segs == {1: (100 + HDR.size, 232, 1)}
    assert idx.lookup(b"a" * 16) is None              # the view still has it
    assert idx.lookup(b"b" * 16) == (1, 132, 100)     # the view lacks it
    idx.add(b"a" * 16, (2, 0, 100))                   # stored again meanwhile
    assert idx.lookup(b"a" * 16) == (2, 0, 100)
    idx.committed()
    assert idx.rows.get(b"b" * 16) == (1, 132, 100) and idx.rows.get(b"a" * 16) is None
    assert idx.lookup(b"a" * 16) == (2, 0, 100) and idx.lookup(b"b" * 16) == (1, 132, 100)
    assert idx.count() == 2


def test_cache_is_bounded_and_misses_go_to_the_table(tmp_path):
    """More blocks than the cache holds: every lookup is right, the cache
    never holds more than its limit, and a dropped block is not answered
    from a stale cache entry."""
    path = str(tmp_path / "cat.db")
    cat = Catalogue(path, create=True)
    cat.commit_blocking(Changes(packs_add=[("p", "single", 0.0, ["/nonexistent"])]))
    idx = BlockIndex(1024 * CACHE_ENTRY_BYTES)
    idx.open(cat.pack_rows("p", 1 << 20))
    rng = random.Random(1)
    ids = [rng.randbytes(16) for _ in range(5000)]
    for i, b in enumerate(ids):
        idx.add(b, (i // 1000, (i % 1000) * 200, 100))
    adds, dels, segs, _, _ = idx.take_pending()
    cat.commit_blocking(Changes(blocks_add={"p": adds}, blocks_del={"p": dels},
                                segments={"p": segs}))
    idx.committed()
    for _ in range(3):
        for i in rng.sample(range(5000), 3000):
            assert idx.lookup(ids[i]) == (i // 1000, (i % 1000) * 200, 100)
            assert len(idx.cache.map) <= 1024
    assert idx.lookup(rng.randbytes(16)) is None
    gone = ids[:10]
    assert all(idx.lookup(b) for b in gone)           # cached now
    idx.drop([(b, idx.lookup(b)) for b in gone])
    assert all(idx.lookup(b) is None for b in gone)
    adds, dels, segs, _, _ = idx.take_pending()
    cat.commit_blocking(Changes(blocks_del={"p": dels}, segments={"p": segs}))
    idx.committed()
    assert all(idx.lookup(b) is None for b in gone)
    assert idx.problems_blocking("p", []) == []
    # a new view (the next open) sees the same
    idx2 = BlockIndex(1 << 20)
    ends = idx2.open(cat.pack_rows("p", 1 << 20))
    assert sorted(ends) == [0, 1, 2, 3, 4] and idx2.count() == 4990
    assert idx2.seg_count == idx.seg_count and idx2.seg_live == idx.seg_live
    cat.close()


def test_segment_rows_and_unreferenced_rows_are_found_without_a_scan(tmp_path):
    """Compaction asks for one segment's rows and a collection for the
    rows with no reference: each goes through its index, so its cost is
    the rows it returns, not the rows stored. Counted in SQLite virtual
    machine steps (a progress handler), on a pack of 20,000 rows; a
    scan of the pack (what the planner chose without INDEXED BY, having
    no statistics) takes over 100,000."""
    path = str(tmp_path / "cat.db")
    cat = Catalogue(path, create=True)
    cat.commit_blocking(Changes(packs_add=[("p", "single", 0.0, ["/nonexistent"])]))
    rng = random.Random(2)
    ids = [rng.randbytes(16) for _ in range(20000)]
    adds = {b: (i // 1000, (i % 1000) * 200, 100) for i, b in enumerate(ids)}
    cat.commit_blocking(Changes(blocks_add={"p": adds},
                                refs={"p": {b: 1 for b in ids[5:]}}))
    rows = cat.pack_rows("p", 1 << 20)
    steps = []
    rows.reads.conn.set_progress_handler(lambda: steps.append(1), 100)

    def cost(fn, *args):
        steps.clear()
        out = fn(*args)
        return out, len(steps) * 100

    got, n = cost(rows.unreferenced)
    assert sorted(got) == sorted((b, adds[b]) for b in ids[:5])
    assert n < 2000, n
    got, n = cost(rows.entries_in, 7)
    assert sorted(got) == sorted((b, adds[b]) for b in ids[7000:8000])
    assert n < 30000, n
    steps.clear()
    rows.reads.conn.execute("SELECT COUNT(len) FROM blocks WHERE pack='p'").fetchall()
    assert len(steps) * 100 > 60000         # what a scan costs
    cat.close()


def test_a_lookup_read_in_a_thread_is_learnt_only_if_no_commit_ended_meanwhile(tmp_path):
    """read_rows_blocking reads the committed view in a worker thread and
    caches nothing; `learn` back on the trio thread caches its answers
    only if no commit ended since (a block dropped and committed in
    between must not come back from a stale read as stored: a dedup hit
    on freed space) and not for an id a change since speaks of."""
    path = str(tmp_path / "cat.db")
    cat = Catalogue(path, create=True)
    cat.commit_blocking(Changes(packs_add=[("p", "single", 0.0, ["/nonexistent"])]))
    idx = BlockIndex(1 << 20)
    idx.open(cat.pack_rows("p", 1 << 20))

    def commit():
        adds, dels, segs, refs, counted = idx.take_pending()
        cat.commit_blocking(Changes(blocks_add={"p": adds}, blocks_del={"p": dels},
                                    segments={"p": segs}, refs={"p": refs},
                                    counted={"p": counted}))
        idx.committed()
    a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
    idx.add(a, (1, 0, 100))
    idx.add(b, (1, 200, 100))
    commit()
    idx.cache.map.clear()
    assert idx.lookup_cached(a) is UNCACHED
    gen, found = idx.read_rows_blocking([a, b, c])
    assert found == {a: (1, 0, 100), b: (1, 200, 100)}
    assert len(idx.cache.map) == 0                       # nothing cached by the read
    # a commit ends meanwhile, dropping a: the read is not learnt
    idx.drop([(a, (1, 0, 100))])
    commit()
    idx.cache.map.clear()
    assert idx.learn(gen, [a, b, c], found) == {}
    assert idx.lookup_cached(a) is UNCACHED and idx.lookup(a) is None
    # no commit meanwhile: learnt, misses too; an id changed since is left out
    idx.cache.map.clear()
    gen, found = idx.read_rows_blocking([b, c])
    idx.add(c, (1, 400, 100))
    assert idx.learn(gen, [b, c], found) == {b: (1, 200, 100)}
    assert idx.lookup_cached(b) == (1, 200, 100) and idx.lookup(c) == (1, 400, 100)
    cat.close()


async def test_reads_and_writes_never_read_the_index_table_on_the_trio_thread(
        tmp_path, monkeypatch):
    """With an index cache far smaller than the blocks stored, reading a
    LUN end to end, loading its map nodes, writing new and repeated
    content (dedup checks) and fsck (with data) look up what the cache
    misses in worker threads: no point read of the blocks table runs on
    the trio thread (at 10M blocks each is a disk read that would stall
    every request; fsck asked for each reached id one by one)."""
    init_array(str(tmp_path / "arr"), block_size=4096)
    data = os.urandom(8 * MiB)

    async def write(a):
        vol = await a.create_lun("l", "16M", block_size=4096)
        await vol.write(0, data)
        await a.sync()
    await with_array(tmp_path / "arr", write)
    on_loop = []
    rows_get, rows_get_many = PackRows.get, PackRows.get_many

    def get(self, bid):
        if threading.current_thread() is threading.main_thread():
            on_loop.append(bid)
        return rows_get(self, bid)

    def get_many(self, ids):
        off_loop.append(len(ids))
        return rows_get_many(self, ids)
    off_loop = []
    monkeypatch.setattr(PackRows, "get", get)
    monkeypatch.setattr(PackRows, "get_many", get_many)

    async def body(a):
        vol = a.luns["l"]
        a.nodes.clear()
        got = bytearray()
        for off in range(0, len(data), 64 * 1024):
            got += await vol.read(off, 64 * 1024)
        assert got == data
        # new content and content stored already (a dedup hit)
        await vol.write(8 * MiB, os.urandom(2 * MiB) + data[:2 * MiB])
        await a.sync()
        assert bytes(await vol.read(10 * MiB, 2 * MiB)) == data[:2 * MiB]
        assert on_loop == []
        assert sum(off_loop) >= 2048            # the misses went to worker threads
        off_loop.clear()
        a.packs["main"].blocks.cache.resize(0)
        await assert_clean(a, strict=True)
        assert on_loop == []
        assert sum(off_loop) >= 2560            # (the blocks fsck reached, at least)
    await with_array(tmp_path / "arr", body, index_cache=256 * 1024)


def test_fsck_on_a_full_file_system_says_so_and_exits_2(tmp_path):
    """tools/fsck makes its table of what the maps reach in the array's
    directory: on a full file system it prints one line naming the cause
    and exits 2 (a usage error), no traceback, and leaves no table."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        arr = str(small / "arr")
        init_array(arr, block_size=4096)

        async def write(a):
            vol = await a.create_lun("l", "12M", block_size=4096)
            await vol.write(0, os.urandom(12 * MiB))
            await a.sync()
        trio.run(with_array, arr, write)
        st = os.statvfs(small)
        with open(small / "filler", "wb") as f:        # leave 32 KiB
            f.write(bytes(st.f_bavail * st.f_frsize - 32 * 1024))
        r = subprocess.run([sys.executable, os.path.join(TOOLS, "fsck"), arr, "--no-data"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.startswith("fsck: cannot check") and "full" in r.stderr, r.stderr
        assert not [f for f in os.listdir(arr) if f.startswith(".reach.")]
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---- the array --------------------------------------------------------------------
def _traced(statements):
    """sqlite3.connect that records every statement its connections run."""
    real = sqlite3.connect

    def connect(*a, **kw):
        conn = real(*a, **kw)
        conn.set_trace_callback(statements.append)
        return conn
    return connect


async def test_open_reads_no_block_rows_and_lookups_stay_in_the_cache(tmp_path, monkeypatch):
    """Opening an array with thousands of blocks reads the segments table
    and not one row of the blocks table as a whole; after reads of every
    block the index's RAM is within --index-cache; fsck is clean."""
    init_array(str(tmp_path / "arr"), block_size=4096)
    data = os.urandom(8 * MiB)

    async def write(a):
        vol = await a.create_lun("l", "8M", block_size=4096)
        await vol.write(0, data)
        await a.sync()
    await with_array(tmp_path / "arr", write)

    statements: list = []
    monkeypatch.setattr(sqlite3, "connect", _traced(statements))
    cache = 256 * 1024        # 1024 entries of the 2048+ blocks

    async def read(a):
        scans = [s for s in statements if "FROM blocks" in s and "id=" not in s
                 and "seg=" not in s]
        assert scans == [], scans
        pack = a.packs["main"]
        assert len(pack.blocks.cache.map) == 0 and pack.block_count() > 2048
        assert a.status()["index"]["limit_bytes"] == cache
        vol = a.luns["l"]
        got = bytearray()
        for off in range(0, len(data), 64 * 1024):
            got += await vol.read(off, 64 * 1024)
        assert got == data
        assert len(pack.blocks.cache.map) <= pack.blocks.cache.limit
        assert pack.blocks.cache.limit * CACHE_ENTRY_BYTES <= cache
        assert a.status()["index"]["bytes"] <= cache
        nodes = a.status()["node_cache"]
        assert 0 < nodes["bytes"] <= nodes["limit_bytes"]
        assert nodes["bytes"] == nodes["nodes"] * maps.NODE_SIZE == len(a.nodes) * maps.NODE_SIZE
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", read, index_cache=cache)


async def test_an_older_catalogue_gets_its_segments_table(tmp_path):
    """A catalogue made before the segments table: opening makes it from
    the blocks rows (once), and the accounting matches what was there."""
    init_array(str(tmp_path / "arr"))

    async def write(a):
        vol = await a.create_lun("l", "16M")
        await vol.write(0, os.urandom(6 * MiB))
        await vol.write(MiB, os.urandom(MiB))          # some garbage
        await a.sync()
        p = a.packs["main"]
        return dict(p.seg_live), dict(p.seg_size), p.block_count()
    live, size, count = await with_array(tmp_path / "arr", write)
    db = sqlite3.connect(str(tmp_path / "arr" / "catalogue.db"))
    db.execute("DROP TABLE segments")
    db.execute("DROP INDEX blocks_seg")
    db.commit()
    db.close()

    async def check(a):
        p = a.packs["main"]
        assert p.block_count() == count and p.seg_live == live
        assert all(p.seg_size[s] <= size[s] for s in size)
        await assert_clean(a)
        assert len(await a.luns["l"].read(0, 6 * MiB)) == 6 * MiB
    await with_array(tmp_path / "arr", check)


# ---- on a real mount --------------------------------------------------------------
def test_index_cache_option_on_a_mount(make_mount):
    """`mount --index-cache 1M` with more blocks than that holds: status
    shows the limit and the cache within it, the data reads back after a
    remount and after a SIGKILL, and fsck is clean."""
    m = make_mount().init("--block-size", "4K")
    m.start("--index-cache", "1M")
    try:
        cli("create", "l", "48M", mnt=m.mnt)
        lun = os.path.join(m.mnt, "luns", "l")
        data = os.urandom(40 * MiB)     # 10240 blocks: more than 1M of cache holds
        with open(lun, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        st = m.status()
        assert st["index"]["limit_bytes"] == MiB
        assert st["index"]["bytes"] <= MiB
        assert st["packs"][0]["blocks"] >= 10240
        m.kill9()
        m.start("--index-cache", "1M")
        drop_caches()
        with open(lun, "rb") as f:
            assert sha(f.read(len(data))) == sha(data)
        st = m.status()
        assert st["index"]["bytes"] <= MiB
        assert st["packs"][0]["index_cache"]["misses"] > 0
    finally:
        m.stop()
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fsck")
    out = subprocess.run([sys.executable, tools, m.array], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dedup_filter_on_a_mount(make_mount):
    """On a real mount: new data's dedup checks are answered by the filter
    (the index cache is not even asked); a clean unmount keeps the filter
    and the next mount takes it (no pass over the table); after a SIGKILL
    the next mount builds it in the background (an event says so) and
    dedup hits are still found; the data reads back, fsck is clean."""
    m = m_ = make_mount().init("--block-size", "4K")
    m.start()
    saved = os.path.join(m.array, "dedup-filter.main")
    lun = os.path.join(m.mnt, "luns", "l")

    def write(off, data):
        with open(lun, "r+b") as f:
            f.seek(off)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        m.ok("sync", "all")         # written back: dedup decided

    def pack():
        return m.status()["packs"][0]

    def this_mount():
        return m.events().rsplit("array opened", 1)[1]
    try:
        cli("create", "l", "64M", mnt=m.mnt)
        a, b = os.urandom(16 * MiB), os.urandom(16 * MiB)
        write(0, a)
        f = pack()["dedup_filter"]
        assert f["ready"] and f["bytes"] == DEFAULT_INDEX_CACHE // 8
        assert f["negatives"] >= 4096, f
        m.stop()
        assert os.path.exists(saved)
        m.start()
        p = pack()
        assert p["dedup_filter"]["ready"] and not os.path.exists(saved)   # taken
        assert "dedup filter ready" not in this_mount()                   # not built
        neg, misses, blocks = (p["dedup_filter"]["negatives"], p["index_cache"]["misses"],
                               p["blocks"])
        write(16 * MiB, b)
        p = pack()
        assert p["dedup_filter"]["negatives"] - neg >= 4096
        assert p["index_cache"]["misses"] - misses < 400, (p["index_cache"], misses)
        assert p["blocks"] - blocks >= 4096
        m.kill9()
        m.start()
        for _ in range(300):
            if "pack main: dedup filter ready" in this_mount():
                break
            time.sleep(0.1)
        assert pack()["dedup_filter"]["ready"], m.events()
        blocks = pack()["blocks"]
        write(32 * MiB, a)                                  # a copy: dedup hits
        assert pack()["blocks"] - blocks < 100
        drop_caches()
        with open(lun, "rb") as f:
            assert sha(f.read(48 * MiB)) == sha(a + b + a)
    finally:
        m.stop()
    out = _fsck(m_.array)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- fsck ---------------------------------------------------------------------------
def _fsck(array, *args):
    tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fsck")
    return subprocess.run([sys.executable, tools, array, *args], capture_output=True,
                          text=True)


def test_fsck_finds_a_dangling_block_a_leak_and_bad_accounting_per_pack(tmp_path):
    """tools/fsck (streaming: the reached ids go to a table on disk) reports
    a reached block missing from the index, an index entry nothing reaches
    (--strict) and a segment whose accounting is off, in the pack that has
    them; --pack checks one pack alone."""
    arr = str(tmp_path / "arr")
    init_array(arr)
    (tmp_path / "b").mkdir()

    async def write(a):
        await a.add_pack("b", "single", [str(tmp_path / "b")])
        for pack in ("main", "b"):
            vol = await a.create_lun(f"l{pack}", "8M", pack=pack)
            await vol.write(0, os.urandom(4 * MiB))
        await a.sync()
        await a.collect_garbage()
    trio.run(with_array, tmp_path / "arr", write)
    r = _fsck(arr, "--strict")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problem(s)" in r.stdout
    db = sqlite3.connect(os.path.join(arr, "catalogue.db"))
    # a data block of pack b gone from its index; an entry nothing reaches in it
    (gone,) = db.execute("SELECT id FROM blocks WHERE pack='b' AND len=65536 "
                         "LIMIT 1").fetchone()
    seg, off = db.execute("SELECT seg, off FROM blocks WHERE id=?", (gone,)).fetchone()
    db.execute("DELETE FROM blocks WHERE pack='b' AND id=?", (gone,))
    db.execute("INSERT INTO blocks (pack, id, seg, off, len) VALUES ('b', ?, ?, ?, 10)", (b"\x01" * 16, seg, off))
    db.execute("UPDATE segments SET live = live + 1 WHERE pack='b' AND seg=?", (seg,))
    db.commit()
    db.close()
    r = _fsck(arr, "--strict", "--no-data")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"pack b: block {bytes(gone).hex()} is referenced but in no pack's index" \
        in r.stdout
    assert "pack b: 1 index entries are not referenced by any volume" in r.stdout
    assert f"pack b: segment {seg} live bytes" in r.stdout
    assert "pack main" not in r.stdout
    r = _fsck(arr, "--strict", "--pack", "main")
    assert r.returncode == 0 and "0 problem(s)" in r.stdout, r.stdout + r.stderr
    r = _fsck(arr, "--pack", "b", "--no-data")
    assert r.returncode == 1 and "pack b: 1 index entries" not in r.stdout, r.stdout
    r = _fsck(arr, "--pack", "nosuch")
    assert r.returncode == 1 and "pack nosuch: no such pack" in r.stdout, r.stdout


# ---- garbage collection by reference counts -------------------------------------------
async def test_collection_frees_exactly_what_nothing_reaches(tmp_path):
    """Overwrites, shadow copies, a deleted set, a punched range and a copy
    to another pack in progress: a collection by reference counts frees
    exactly what nothing reaches (fsck --strict: no leak, every count
    right), the data reads back."""
    init_array(str(tmp_path / "arr"))
    (tmp_path / "far").mkdir()
    rng = random.Random(7)

    async def body(a):
        await a.add_pack("far", "single", [str(tmp_path / "far")])
        # the two packs share --index-cache (after SQLite's quarter and the
        # filters' eighth); the first pack's filter had it all: the new
        # one gets none until the next mount shares it anew
        share = (DEFAULT_INDEX_CACHE - DEFAULT_INDEX_CACHE // 4 - DEFAULT_INDEX_CACHE // 8) // 2
        assert [p.index_status()["limit_bytes"] for p in a.packs.values()] == [share] * 2
        assert [(p.filter_status() or {"bytes": 0})["bytes"] for p in a.packs.values()] == \
            [DEFAULT_INDEX_CACHE // 8, 0]
        vol = await a.create_lun("l", "16M")
        model = bytearray(16 * MiB)
        for _ in range(3):
            for _ in range(40):
                off = rng.randrange(0, 16 * MiB - 65536)
                data = rng.randbytes(rng.choice([4096, 65536]))
                await vol.write(off, data)
                model[off:off + len(data)] = data
            await a.sync()
            await a.snapshot(["l"], set_name=f"s{rng.randrange(10**6)}", quiesce=False)
        await a.snapshot(["l"], set_name="plex", context="plex", pack="far",
                         quiesce=False)                      # a copy job, maybe running
        await a.delete_shadow(sorted(a.sets)[0])
        await vol.zero(MiB, 2 * MiB)
        model[MiB:3 * MiB] = bytes(2 * MiB)
        await a.sync()
        runs = a.collector.runs["collect"]
        await a.collect_garbage()
        assert a.collector.runs["collect"] == runs + 1
        assert bytes(await vol.read(0, 16 * MiB)) == model
        await assert_clean(a, strict=True)
        return a.packs["main"].block_count()
    await with_array(tmp_path / "arr", body)


async def test_walk_records_a_shared_subtree_in_each_pack_that_reaches_it(tmp_path):
    """A subtree already walked for pack A is walked again for a copying
    volume that reaches it in A and B: B's blocks must all be recorded
    (else a collection of B drops what the copy still reads)."""
    from fusearray import maps
    from fusearray.reach import Reach, walk
    ids = [bytes([i]) * 16 for i in range(1, 4)]
    leaf = bytearray(maps.NODE_SIZE)
    for i, b in enumerate(ids):
        leaf[i * 16:(i + 1) * 16] = b
    root = bytearray(maps.NODE_SIZE)
    root[0:16] = b"L" * 16
    nodes = {b"L" * 16: bytes(leaf), b"R" * 16: bytes(root)}

    async def load(nid):
        return nodes[nid]
    path = str(tmp_path / "cat.db")
    Catalogue(path, create=True).close()
    reach = Reach(path)
    try:
        await walk(b"R" * 16, 2, load, reach, ["A"])
        await walk(b"R" * 16, 2, load, reach, ["A", "B"])
        assert reach.count_blocking("A") == 5 and reach.count_blocking("B") == 5
        assert reach.present_blocking("B", ids) == set(ids)
    finally:
        reach.close()
    assert not os.path.exists(reach.dir)


async def test_a_table_a_crash_left_is_removed_at_open(tmp_path):
    """A collection's or fsck's table on disk (ARRAY/.reach.*) that a
    SIGKILL left behind is removed when the array opens."""
    init_array(str(tmp_path / "arr"))
    left = tmp_path / "arr" / ".reach.abc123"
    left.mkdir()
    (left / "reach.db").write_bytes(b"x" * 4096)

    async def body(a):
        assert not left.exists()
        assert not [f for f in os.listdir(a.path) if f.startswith(".reach.")]
    await with_array(tmp_path / "arr", body)


# ---- the dedup filter (issue 16 point 1) -------------------------------------------
def _catalogue_index(tmp_path, filter_bytes, rows=()):
    """A BlockIndex on a catalogue's pack 'p' holding `rows` {id: loc}
    committed, and a list the catalogue's read connection appends each
    statement it runs to."""
    cat = Catalogue(str(tmp_path / "cat.db"), create=True)
    cat.commit_blocking(Changes(packs_add=[("p", "single", 0.0, ["/nonexistent"])]))
    if rows:
        cat.commit_blocking(Changes(blocks_add={"p": dict(rows)}))
    pr = cat.pack_rows("p", 1 << 20)
    statements: list = []
    pr.reads.conn.set_trace_callback(statements.append)
    idx = BlockIndex(1 << 20, filter_bytes)
    idx.open(pr)
    return cat, idx, statements


@pytest.mark.parametrize("filter_bytes", [0, 1 << 16])
def test_a_dedup_miss_is_answered_by_the_filter_without_reading_the_table(
        tmp_path, filter_bytes):
    """A pack of 20,000 committed ids: once its filter is built (one pass
    over the table), the dedup check of 2,000 new ids reads the table for
    at most a few (false positives), where with no filter (0 bytes) each
    one is a read; stored ids are found either way, and a read (not a
    dedup check) never asks the filter."""
    rng = random.Random(5)
    stored = {rng.randbytes(16): (i // 1000, (i % 1000) * 200, 100) for i in range(20000)}
    cat, idx, statements = _catalogue_index(tmp_path, filter_bytes, stored)
    try:
        if filter_bytes:
            assert idx.filter_status()["ready"] is False     # committed ids: a pass first
            assert idx.lookup(rng.randbytes(16), dedup=True) is None   # (from the table)
            assert idx.build_filter_blocking() is True
            assert idx.filter_status()["ready"] is True
        statements.clear()
        new = [rng.randbytes(16) for _ in range(2000)]
        assert all(idx.lookup(b, dedup=True) is None for b in new)
        gen, found = idx.read_rows_blocking(new[:1000], dedup=True)
        assert found == {}
        reads = [s for s in statements if "FROM blocks" in s]
        if filter_bytes:
            assert len(reads) < 20, len(reads)      # 65536 bytes for 20,000 ids: < 0.1 %
            assert idx.filter_status()["negatives"] > 2900
        else:
            assert len(reads) >= 2001 and idx.filter_status() is None
        sample = rng.sample(sorted(stored), 500)
        assert all(idx.lookup(b, dedup=True) == stored[b] for b in sample)
        statements.clear()
        other = [rng.randbytes(16) for _ in range(2)]
        assert idx.lookup(other[0]) is None and idx.lookup_cached(other[1]) is UNCACHED
        assert any("FROM blocks" in s for s in statements)   # a read asks the table
    finally:
        cat.close()


def test_the_filter_never_says_no_to_a_stored_id_model_based(tmp_path):
    """Generated sequences of adds, drops, commits, filter builds at any
    point (also with changes pending), saves and loads across reopens
    (also of a damaged or a mislabelled file), on a 512-bit filter (many
    false positives: the "maybe" path is taken too): a dedup lookup
    always agrees with a model of what is stored."""
    for seed in range(12):
        rng = random.Random(seed)
        sub = tmp_path / str(seed)
        sub.mkdir()
        cat = Catalogue(str(sub / "cat.db"), create=True)
        cat.commit_blocking(Changes(packs_add=[("p", "single", 0.0, ["/nonexistent"])]))
        model: dict = {}
        pool = [rng.randbytes(16) for _ in range(400)]
        commits = 0

        def reopen(load: str | None):
            idx = BlockIndex(1 << 16, 64)
            idx.open(cat.pack_rows("p", 1 << 20))
            if load is not None:
                idx.load_filter_blocking(str(sub / "f"), load)
            return idx
        idx = reopen(None)
        for step in range(300):
            op = rng.random()
            if op < 0.45:
                b = rng.choice(pool)
                loc = (rng.randrange(8), rng.randrange(1 << 20), 100)
                idx.add(b, loc)
                model[b] = loc
            elif op < 0.6 and model:
                b = rng.choice(sorted(model))
                idx.drop([(b, model.pop(b))])
            elif op < 0.75:
                adds, dels, segs, refs, counted = idx.take_pending()
                cat.commit_blocking(Changes(blocks_add={"p": adds}, blocks_del={"p": dels},
                                            segments={"p": segs}))
                idx.committed()
                commits += 1
            elif op < 0.82:
                idx.build_filter_blocking()
            elif op < 0.9 and not idx.has_pending():
                saved = idx.save_filter_blocking(str(sub / "f"), f"t{commits}")
                if rng.random() < 0.3 and saved:         # damage the saved file
                    raw = bytearray((sub / "f").read_bytes())
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                    (sub / "f").write_bytes(bytes(raw))
                idx.close()
                # the catalogue's state now, or a label of another one
                idx = reopen(f"t{commits}" if rng.random() < 0.8 else "other")
            for b in pool[:60] + rng.sample(pool, 40):
                assert idx.lookup(b, dedup=True) == model.get(b), (seed, step, b.hex())
        idx.close()
        cat.close()


def test_a_saved_filter_is_taken_only_whole_for_its_state_and_folds_to_a_smaller_size(
        tmp_path):
    """save/load: taken for its label (the catalogue state), folded to a
    filter of half or a quarter the size with the same answers for every
    stored id, refused if smaller, damaged or labelled otherwise; the
    file is consumed either way."""
    from fusearray.store.idfilter import IdFilter
    rng = random.Random(9)
    ids = [rng.randbytes(16) for _ in range(3000)]
    big = IdFilter(1 << 14, 3000)
    big.add_many(ids)
    big.ready = True
    path = str(tmp_path / "f")
    for size, tag, damage, taken in [(1 << 14, "s1", False, True), (1 << 12, "s1", False, True),
                                     (1 << 15, "s1", False, False), (1 << 14, "s2", False, False),
                                     (1 << 14, "s1", True, False)]:
        big.save_blocking(path, "s1")
        if damage:
            with open(path, "r+b") as fh:
                fh.seek(os.path.getsize(path) // 2)
                byte = fh.read(1)[0]
                fh.seek(-1, 1)
                fh.write(bytes([byte ^ 4]))
        with open(path + ".tmp", "wb") as fh:          # a save a crash cut short
            fh.write(b"part")
        f = IdFilter(size, 10)
        assert f.load_blocking(path, tag) is taken and f.ready is taken
        assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
        if taken:
            assert all(f.may_hold(b) for b in ids) and f.probes == big.probes
            fresh = [rng.randbytes(16) for _ in range(2000)]
            no = sum(not f.may_hold(b) for b in fresh)
            assert no > (1000 if size == 1 << 12 else 1900), no
    assert IdFilter(1 << 14, 3000).load_blocking(path, "s1") is False     # no file


TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")
SCALEGEN, TOOLS_FSCK = os.path.join(TOOLS, "scalegen.py"), os.path.join(TOOLS, "fsck")


@pytest.mark.parametrize("direct", [False, True], ids=["layers", "direct"])
def test_scalegen_arrays_are_clean_and_their_map_is_the_one_writes_make(make_mount, direct):
    """tools/scalegen.py, which builds the scale bench's arrays (issue 16),
    both ways: through the package's layers and `--direct` (segments and
    catalogue rows written by the tool, 100M blocks in a session). Each
    array is fsck --strict clean (every row, count, node, and the data);
    on a mount its LUN reads back each block's number; and the same blocks
    written through the mount into a second LUN (all dedup hits: no new
    data stored) give the same map root as the generated LUN's, so the
    direct map is exactly the one the array's own writes build."""
    n = 20000                   # two data segments, 20 leaves, height 2
    m = make_mount()
    gen = subprocess.run([sys.executable, SCALEGEN, m.array, str(n), "--lun", "big"]
                         + (["--direct"] if direct else []), capture_output=True, text=True)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    assert json.loads(gen.stdout)["blocks"] == n
    fsck = subprocess.run([sys.executable, TOOLS_FSCK, m.array, "--strict"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0 and f"{n + 21} blocks indexed" in fsck.stdout, fsck.stdout
    m.start()
    try:
        with open(os.path.join(m.mnt, "luns", "big"), "rb") as f:
            data = f.read()
        assert len(data) == n * 4096
        blocks = [data[i * 4096:(i + 1) * 4096] for i in range(n)]
        assert [int.from_bytes(b[:8], "little") for b in blocks] == list(range(1, n + 1))
        if direct:
            assert all(b[8:] == bytes(4088) for b in blocks)
        used = m.status()["packs"][0]["used_bytes"]
        cli("create", "copy", str(n * 4096), mnt=m.mnt)
        with open(os.path.join(m.mnt, "luns", "copy"), "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        m.ok("sync", "all")
        # every data block a dedup hit: what grew is at most map nodes
        assert m.status()["packs"][0]["used_bytes"] - used < n * 4096 // 10
    finally:
        m.stop()
    db = sqlite3.connect(os.path.join(m.array, "catalogue.db"))
    try:
        roots = dict(db.execute("SELECT name, root FROM volumes WHERE kind = 'lun'"))
    finally:
        db.close()
    assert roots["big"] == roots["copy"] != bytes(16)


def test_a_big_commit_updates_the_blocks_table_in_key_order(tmp_path):
    """A commit's changes to the blocks table go in key order, so a big
    one (a random write into each of many leaves a shadow copy shares
    adds one reference to each of their 1,024 entries: millions of rows on
    a large pack) walks the B-tree once from left to right: each page of
    the table (and of the index of unreferenced rows, which rows leave at
    their first reference) is written once, however small SQLite's page
    cache. Measured in the bytes this process hands to write(2)
    (/proc/self/io wchar) during one commit of 12,000 reference changes
    over a 60,000-row table with the cache cut to 8 pages: in the order
    they came (random ids) a page is spilled and written again many times."""
    path = str(tmp_path / "cat.db")
    cat = Catalogue(path, create=True)
    try:
        cat.commit_blocking(Changes(packs_add=[("p", "single", 0.0, ["/nonexistent"])]))
        rng = random.Random(3)
        ids = [rng.randbytes(16) for _ in range(60000)]
        cat.commit_blocking(Changes(blocks_add={"p": {b: (i // 1000, i, 100)
                                                      for i, b in enumerate(ids)}}))
        cat.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cat.conn.execute("PRAGMA cache_size=8")
        cat.conn.execute("PRAGMA wal_autocheckpoint=0")
        before = _written()
        cat.commit_blocking(Changes(refs={"p": {b: 1 for b in rng.sample(ids, 12000)}}))
        written = _written() - before
    finally:
        cat.close()
    size = os.path.getsize(path)    # every page of the catalogue, once
    assert written <= size * 1.3, (written, size)


def _written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])
