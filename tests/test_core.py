"""Core units without FUSE: store, maps, cache, catalogue and the array's
commit/GC, each ending with the invariant check (fusearray.fsck)."""
import contextlib
import errno
import os
import random

import pytest
import trio

from fusearray import ZERO_ID, fsck, maps, native
from fusearray.array import Array, init_array
from fusearray.errors import ArrayError, ChecksumError
from fusearray.store import Disk, Hasher, Pack
from fusearray.store.media import DirMedium

MiB = 1 << 20


# ---- store ---------------------------------------------------------------------------
def labelled(path, idx=0):
    d = Disk(idx, str(path))
    d.write_label("u", "p")
    return d


def test_store_append_read_verify(tmp_path):
    h = Hasher(1234)
    pack = Pack("p", "single", [labelled(tmp_path)], h)
    pack.open_blocking([])
    datas = [os.urandom(4096) for _ in range(10)]
    recs = [(h.block_id(d), d) for d in datas]
    locs = pack.append_blocking(recs)
    for (bid, d), loc in zip(recs, locs):
        pack.add(bid, loc)
        assert pack.read_blocking(bid, loc) == d
    pack.sync_blocking()
    # bit rot is detected, never returned
    seg, off, n = locs[3]
    with open(pack.disk.seg_path(seg), "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xff" if datas[3][100] != 0xff else b"\x00")
    pack.close_blocking()
    pack2 = Pack("p", "single", [labelled(tmp_path)], h)
    pack2.open_blocking([(b, *l) for (b, _), l in zip(recs, locs)])
    with pytest.raises(ChecksumError):
        pack2.read_blocking(recs[3][0], locs[3])
    assert pack2.read_blocking(recs[4][0], locs[4]) == datas[4]
    pack2.close_blocking()


def test_a_pack_whose_disks_cannot_say_their_space_is_not_full(tmp_path, monkeypatch):
    """Every disk's space query fails (a Ceph cluster that does not answer,
    a hung directory): the pack keeps what it knew, so an append is tried
    and fails with the disk's own error, never ENOSPC (which would tell
    the user to delete data: it happened with a stalled OSD)."""
    h = Hasher(77)
    pack = Pack("p", "single", [labelled(tmp_path)], h)
    pack.open_blocking([])
    known = pack.free_bytes()
    assert known > 0

    def no_answer(*_):
        raise OSError(errno.ETIMEDOUT, "the cluster does not answer")
    monkeypatch.setattr(pack.disk.medium, "space", no_answer)
    pack.refresh_space_blocking()
    assert pack.free_bytes() == known
    data = os.urandom(4096)
    loc, = pack.append_blocking([(h.block_id(data), data)])   # tried: the write works here
    monkeypatch.setattr(pack.disk.medium, "pwritev", no_answer)
    with pytest.raises(OSError) as e:
        pack.append_blocking([(h.block_id(data[::-1]), data[::-1])])
    assert e.value.errno == errno.ETIMEDOUT
    assert pack.read_blocking(h.block_id(data), loc) == data
    pack.close_blocking()


def test_spares_cover_a_gc_burst_and_extra_ones_go_when_idle(tmp_path):
    """Dead segments are kept as spare files for new segments, up to half
    the pack (one GC frees many at once), and reused before any fresh file;
    trim_spares_blocking deletes those past SPARES and gives their space
    back."""
    from fusearray.store import SPARES
    h = Hasher(5)
    pack = Pack("p", "single", [labelled(tmp_path)], h)
    pack.open_blocking([])
    pack.seg_limit = 1 << 20
    pack.spare_limit = SPARES + 4
    rng = random.Random(9)
    segs = []
    for _ in range(SPARES + 6):
        pack.append_blocking([(h.block_id(d), d) for d in [rng.randbytes(1 << 20)]])
        segs.append(pack.active_seq)
        pack.active_open = False
    for seq in segs:
        pack.retire_blocking(seq, True)
    assert len(pack.spares) == SPARES + 4          # the rest were deleted
    segdir = pack.disk.segdir
    spares = sorted(f for f in os.listdir(segdir) if f.endswith(".spare"))
    assert len(spares) == SPARES + 4
    inodes = {os.stat(os.path.join(segdir, f)).st_ino for f in spares}
    pack.append_blocking([(h.block_id(d), d) for d in [rng.randbytes(1 << 20)]])
    assert os.stat(pack.disk.seg_path(pack.active_seq)).st_ino in inodes   # reused
    assert len(pack.spares) == SPARES + 3
    before = pack.spare_bytes
    assert pack.trim_spares_blocking() == 3
    assert len(pack.spares) == SPARES and pack.spare_bytes < before
    assert len([f for f in os.listdir(segdir) if f.endswith(".spare")]) == SPARES
    pack.close_blocking()


def no_mapped_reads(pack, bids, locs, datas) -> None:
    """FUSEARRAY_NATIVE=0 (no verify_mapped): every block fails the mapped
    check untouched (None) and the ordinary read returns it right."""
    assert pack.mapped_blocks(bids, locs) == [None] * len(bids)
    for bid, loc, data in zip(bids, locs, datas):
        assert pack.read_blocking(bid, loc) == data
    pack.close_blocking()


def test_mapped_reads_verify_in_place_and_survive_a_file_truncated_under_them(tmp_path):
    """Large reads take blocks straight from the segment files, mapped, and
    check them there (Pack.mapped_blocks). A byte flipped on disk fails
    that check (the ordinary read heals it), and a file cut short from
    outside while mapped must not kill the process with SIGBUS: its blocks
    fail the check, and the ordinary read gets them from the other copy."""
    h = Hasher(77)
    disks = [labelled(tmp_path / f"d{i}", i) for i in range(2)]
    pack = Pack("p", "mirror", disks, h)
    pack.open_blocking([])
    rng = random.Random(3)
    datas = [rng.randbytes(64 << 10) for _ in range(24)]
    bids = [h.block_id(d) for d in datas]
    locs = pack.append_blocking(list(zip(bids, datas)))
    if not native.ENABLED:
        return no_mapped_reads(pack, bids, locs, datas)
    seq = locs[0][0]
    views = pack.mapped_blocks(bids, locs)
    assert [bytes(v) for v in views] == datas
    assert (0, seq) in pack.files.maps          # served from disk 0, the first online copy
    del views

    with open(disks[0].seg_path(seq), "r+b") as f:       # bit rot on disk 0
        f.seek(locs[5][1] + 7)
        f.write(bytes([datas[5][7] ^ 0x55]))
    views = pack.mapped_blocks(bids, locs)
    assert views[5] is None and all(bytes(v) == d for i, (v, d) in enumerate(zip(views, datas))
                                    if i != 5)
    assert pack.read_blocking(bids[5], locs[5]) == datas[5]     # healed from disk 1
    assert bytes(pack.mapped_blocks(bids[5:6], locs[5:6])[0]) == datas[5]
    del views

    os.truncate(disks[0].seg_path(seq), 4096)     # cut short under the live mapping
    assert pack.mapped_blocks(bids, locs) == [None] * len(bids)
    for bid, loc, d in zip(bids, locs, datas):
        assert pack.read_blocking(bid, loc) == d
    pack.close_segment_blocking(seq)
    assert not pack.files.maps                  # a closed file's mapping goes with its fd
    pack.close_blocking()


def _resident(path, off, n):
    """How many pages of path's [off, off+n) are in the page cache (mincore
    on a mapping of our own, which touches nothing)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    start = off - off % mmap.PAGESIZE
    length = off + n - start
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            base = ctypes.addressof(anchor) + start
            del anchor
            vec = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            assert libc.mincore(ctypes.c_void_p(base), length, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            m.close()


def test_mapped_reads_on_a_disk_leave_pages_not_in_memory_to_the_ordinary_read(tmp_path):
    """On a pack whose disks are not tmpfs a page fault on a mapped file
    would wait for the device on the event loop, so a block whose pages
    are not all in memory (mincore) fails the mapped check without being
    touched; once the ordinary read brought it in, it is served mapped."""
    from fusearray.store import _in_memory
    if _in_memory(str(tmp_path)):
        pytest.skip("needs a disk-backed directory for the page cache to drop pages")
    h = Hasher(79)
    pack = Pack("p", "single", [labelled(tmp_path / "d0")], h)
    pack.open_blocking([])
    rng = random.Random(6)
    datas = [rng.randbytes(64 << 10) for _ in range(8)]
    bids = [h.block_id(d) for d in datas]
    locs = pack.append_blocking(list(zip(bids, datas)))
    pack.sync_blocking()
    if not native.ENABLED:
        return no_mapped_reads(pack, bids, locs, datas)
    path = pack.disk.seg_path(locs[0][0])
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # clean after the fsync
    finally:
        os.close(fd)
    _, off, n = locs[3]
    assert _resident(path, off, n) == 0, "the page cache kept the pages"
    views = pack.mapped_blocks(bids, locs)
    assert views == [None] * len(bids)
    assert _resident(path, off, n) == 0            # the check did not fault them in
    del views
    assert pack.read_blocking(bids[3], locs[3]) == datas[3]
    assert _resident(path, off, n) > 0
    views = pack.mapped_blocks(bids, locs)
    assert bytes(views[3]) == datas[3]
    del views
    pack.close_blocking()


def test_raid5_mapped_reads_hash_a_block_in_pieces_across_the_disks(tmp_path):
    """A RAID-5 block lies in 64 KiB chunks on several data disks; mapped
    reads give its pieces (a tuple of views, in order, from more than one
    disk) hashed as one. A flipped byte in one piece, a disk that is not
    online, a file cut short under its mapping: only the blocks with a
    piece there fail (None), and the ordinary read returns them right."""
    h = Hasher(78)
    disks = [labelled(tmp_path / f"d{i}", i) for i in range(3)]
    pack = Pack("p", "raid5", disks, h)
    pack.open_blocking([])
    rng = random.Random(4)
    datas = [rng.randbytes(rng.choice([64 << 10, 4096, 100 << 10, 130 << 10]))
             for _ in range(40)]
    bids = [h.block_id(d) for d in datas]
    locs = pack.append_blocking(list(zip(bids, datas)))
    if not native.ENABLED:
        return no_mapped_reads(pack, bids, locs, datas)
    seq = locs[0][0]

    def on(i):          # the disks block i has a piece on
        return {di for di, _, _, _ in pack.strategy.pieces(locs[i][1], locs[i][2])}

    views = pack.mapped_blocks(bids, locs)
    assert all(type(v) is tuple for v in views)
    assert [b"".join(v) for v in views] == datas
    assert sum(len(on(i)) > 1 for i in range(len(datas))) >= 20     # most span disks
    del views

    # bit rot in the second piece of a block that spans two disks
    i = next(i for i in range(len(datas)) if len(on(i)) > 1)
    di, doff, ln, loff = pack.strategy.pieces(locs[i][1], locs[i][2])[1]
    at = loff - locs[i][1] + 5
    with open(disks[di].seg_path(seq), "r+b") as f:
        f.seek(doff + 5)
        f.write(bytes([datas[i][at] ^ 0x11]))
    views = pack.mapped_blocks(bids, locs)
    assert views[i] is None
    assert all(b"".join(v) == d for k, (v, d) in enumerate(zip(views, datas)) if k != i)
    del views
    assert pack.read_blocking(bids[i], locs[i]) == datas[i]            # healed
    assert b"".join(pack.mapped_blocks(bids[i:i + 1], locs[i:i + 1])[0]) == datas[i]

    # a disk not online: its blocks are left to the ordinary read (rebuilt from parity)
    disks[1].state = "missing"
    views = pack.mapped_blocks(bids, locs)
    for k, (v, d) in enumerate(zip(views, datas)):
        assert (v is None) == (1 in on(k)), k
        assert v is None or b"".join(v) == d
    del views
    assert all(pack.read_blocking(b, l) == d for b, l, d in zip(bids, locs, datas))
    disks[1].state = "online"

    # a file cut short under its live mapping: no SIGBUS, those blocks fail
    views = pack.mapped_blocks(bids, locs)
    assert all(v is not None for v in views)
    del views
    os.truncate(disks[2].seg_path(seq), 4096)
    views = pack.mapped_blocks(bids, locs)
    hit = [k for k in range(len(datas)) if views[k] is None]
    assert hit and all(2 in on(k) for k in hit)
    assert all(b"".join(v) == d for v, d in zip(views, datas) if v is not None)
    del views
    for bid, loc, d in zip(bids, locs, datas):
        assert pack.read_blocking(bid, loc) == d
    pack.close_blocking()


@pytest.mark.parametrize("layout", ["mirror", "raid5"])
def test_reused_segment_files_keep_redundancy_exact(tmp_path, layout):
    """A dead segment's files are reused for a new segment (spares); they
    still hold the old bytes past the new data. Every block must read back
    with any one disk missing: for RAID-5 the reconstruction XORs whole
    rows, so the unwritten rest of the last row must not be old bytes."""
    h = Hasher(99)
    n = 3 if layout == "raid5" else 2
    disks = [labelled(tmp_path / f"d{i}", i) for i in range(n)]
    pack = Pack("p", layout, disks, h)
    pack.open_blocking([])
    rng = random.Random(5)
    old = [rng.randbytes(64 << 10) for _ in range(40)]          # 2.5 MiB of old bytes
    pack.append_blocking([(h.block_id(d), d) for d in old])
    first = pack.active_seq
    pack.active_open = False                                     # sealed
    pack.retire_blocking(first, True)
    assert pack.spares and pack.spare_bytes > 0
    new = [rng.randbytes(rng.randrange(1, 100) << 10) for _ in range(17)]
    recs = [(h.block_id(d), d) for d in new]
    locs = pack.append_blocking(recs)
    assert {loc[0] for loc in locs} == {first + 1} and not pack.spares   # the spare reused
    for gone in range(n):
        pack.disks[gone].state = "missing"
        try:
            for (bid, d), loc in zip(recs, locs):
                assert pack.read_blocking(bid, loc) == d, (gone, loc)
        finally:
            pack.disks[gone].state = "online"
    pack.close_blocking()


class RemoteLike:
    """A host directory that acts as a medium without fds (as RADOS:
    no mappings, no page-cache reads, every read a call of the medium),
    counting its reads; `fail`: its reads raise EIO."""
    fds = False

    def __init__(self, medium):
        self.medium = medium
        self.reads = []             # (offset, bytes asked) of each preadv
        self.fail = False

    def __getattr__(self, name):
        return getattr(self.medium, name)

    def preadv(self, h, bufs, off):
        self.reads.append((off, sum(len(memoryview(b).cast("B")) for b in bufs)))
        if self.fail:
            raise OSError(errno.EIO, "injected read error")
        return self.medium.preadv(h, bufs, off)


def test_reads_on_a_medium_without_fds_read_runs_and_heal_block_by_block(tmp_path):
    """On a medium without fds (RADOS) a request's blocks that lie near
    each other in a segment are one read of the medium (Pack.
    read_many_blocking), each verified; a block that fails its hash there
    is read again alone the healing way (rewritten from the other copy,
    counted against its disk), and a run read that fails counts nothing
    itself: the blocks are read alone, which fail over and count the
    errors as before."""
    h = Hasher(99)
    disks = [labelled(tmp_path / f"d{i}", i) for i in range(2)]
    for d in disks:
        d.medium = RemoteLike(d.medium)
    pack = Pack("p", "mirror", disks, h)
    pack.open_blocking([])
    rng = random.Random(5)
    datas = [rng.randbytes(64 << 10) for _ in range(40)]
    bids = [h.block_id(d) for d in datas]
    locs = pack.append_blocking(list(zip(bids, datas)))
    pack.sync_blocking()
    seq = locs[0][0]
    m0, m1 = disks[0].medium, disks[1].medium
    assert pack.read_nowait(bids[0], locs[0]) is None       # no page-cache reads
    assert pack.mapped_blocks(bids[:2], locs[:2]) == [None, None]

    # 16 blocks back to back: one read; in any order, with a repeat and a
    # gap of a block (read and dropped), still one; far apart: two
    want = list(range(4, 20))
    assert pack.read_many_blocking([bids[i] for i in want], [locs[i] for i in want]) == \
        [datas[i] for i in want]
    assert m0.reads == [(locs[4][1], locs[19][1] + locs[19][2] - locs[4][1])] and not m1.reads
    m0.reads.clear()
    want = [9, 3, 9, 5, 2, 7]
    assert pack.read_many_blocking([bids[i] for i in want], [locs[i] for i in want]) == \
        [datas[i] for i in want]
    assert len(m0.reads) == 1
    m0.reads.clear()
    big_gap = [1, 3, 39]
    assert pack.read_many_blocking([bids[i] for i in big_gap], [locs[i] for i in big_gap]) \
        == [datas[i] for i in big_gap]
    assert len(m0.reads) == 2 and pack.run_reads == 3
    m0.reads.clear()

    # bit rot on disk 0 in the middle of a run: the others come from the
    # run, that one is read alone, healed from disk 1, counted on disk 0
    with open(disks[0].seg_path(seq), "r+b") as f:
        f.seek(locs[10][1] + 5)
        f.write(bytes([datas[10][5] ^ 0x33]))
    want = list(range(4, 20))
    assert pack.read_many_blocking([bids[i] for i in want], [locs[i] for i in want]) == \
        [datas[i] for i in want]
    assert m0.reads[1:] == [(locs[10][1], 65536)] and disks[0].errors == 1
    with open(disks[0].seg_path(seq), "rb") as f:          # rewritten in place
        f.seek(locs[10][1])
        assert f.read(65536) == datas[10]
    assert any("did not match its hash" in msg for _, msg in pack.notes)

    # disk 0 fails every read: the run read counts nothing, each block read
    # alone fails over to disk 1 and counts an error on disk 0, as ever
    m0.reads.clear()
    m1.reads.clear()
    m0.fail = True
    want = [20, 21, 22]
    assert pack.read_many_blocking([bids[i] for i in want], [locs[i] for i in want]) == \
        [datas[i] for i in want]
    assert len(m0.reads) == 4 and disks[0].errors == 1 + 3 and len(m1.reads) == 3
    m0.fail = False

    # no copy left to heal from (single): ChecksumError, never the bad bytes
    pack.close_blocking()
    sd = labelled(tmp_path / "s")
    sd.medium = RemoteLike(sd.medium)
    single = Pack("p", "single", [sd], h)
    single.open_blocking([])
    locs = single.append_blocking(list(zip(bids, datas)))
    single.sync_blocking()
    with open(sd.seg_path(locs[30][0]), "r+b") as f:
        f.seek(locs[30][1] + 9)
        f.write(bytes([datas[30][9] ^ 0x11]))
    with pytest.raises(ChecksumError):
        single.read_many_blocking([bids[i] for i in range(28, 33)],
                                  [locs[i] for i in range(28, 33)])
    assert single.lost_reads == 1
    assert single.read_many_blocking([bids[i] for i in (28, 29, 31, 32)],
                                     [locs[i] for i in (28, 29, 31, 32)]) == \
        [datas[i] for i in (28, 29, 31, 32)]
    single.close_blocking()


def test_store_open_removes_unreferenced_segments(tmp_path):
    h = Hasher(7)
    pack = Pack("p", "single", [labelled(tmp_path)], h)
    pack.open_blocking([])
    d = os.urandom(1000)
    loc = pack.append_blocking([(h.block_id(d), d)])[0]
    pack.sync_blocking()
    pack.close_blocking()
    # nothing committed: the segment is crash garbage
    pack2 = Pack("p", "single", [labelled(tmp_path)], h)
    assert pack2.open_blocking([]) == [loc[0]]
    assert os.listdir(pack2.disk.segdir) == []
    pack2.close_blocking()


def test_native_block_ids_match_python_xxhash():
    """The shim's GIL-free XXH3-128 (both builds: generic and, on a CPU
    with it, AVX2) gives python-xxhash's ids, for every buffer type and
    length, zero blocks included."""
    from fusearray import native, store
    if not native.ENABLED:
        pytest.skip("native modules disabled (FUSEARRAY_NATIVE=0): tests/test_native.py "
                    "checks the fallbacks are in use")
    assert store._hash128_many is not None, "fusearray._accel was built without libxxhash-dev"
    h = Hasher(0xDEADBEEF12345678)
    bufs = [b"", b"a", os.urandom(17), os.urandom(64 << 10), bytearray(os.urandom(999)),
            memoryview(os.urandom(70000))[3:65539], bytes(64 << 10), bytearray(4096)]
    got = h.block_ids(bufs)
    assert got == [h.block_id(b) for b in bufs]
    assert got[-2] == got[-1] == ZERO_ID and got[3] != ZERO_ID
    import xxhash
    assert store._hash128_many(bufs[:4], 7) == [xxhash.xxh3_128_digest(b, 7) for b in bufs[:4]]
    # the generic build too, over lengths that take each of XXH3's code paths
    lens = [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 65536, 100003]
    data = [os.urandom(n) for n in lens]
    want = [xxhash.xxh3_128_digest(d, 99) for d in data]
    assert store._hash128_many(data, 99, 1) == want
    assert store._hash128_many(data, 99) == want
    # the stream's record hashes (transport), both builds, any buffer type
    from fusearray import transport
    from fusearray.native import hash64_many
    want64 = [xxhash.xxh3_64_digest(d) for d in data]
    assert hash64_many(data, 1) == hash64_many(data) == want64
    # both in one pass (the import's check and id), both builds
    from fusearray.native import hash64_128_many
    assert hash64_128_many(data, 99, 1) == hash64_128_many(data, 99) == \
        [a + b for a, b in zip(want64, want)]
    assert transport._hash64_many([memoryview(d) for d in data]) == want64
    assert transport._hash64_many([bytearray(d) for d in data]) == want64


def test_import_checks_and_ids_in_one_pass_match_the_two_pass_way():
    """An import batch is checked against the stream's xxh3_64 and given
    its ids in one pass (hash64_128_many); the ids must be the ones the
    two passes gave: whole blocks, a block of zeros sent as data, a short
    last block (padded, so its id is the padded copy's) and a zero record;
    a block that does not match its hash is EIO naming it."""
    import xxhash

    from fusearray import native, transport
    from fusearray.writeback import block_ids
    assert transport._shim_hash64_128_many is not None or not native.ENABLED, \
        "fusearray._accel was built without XXH3"
    h = Hasher(0x1234)
    bs = 64 << 10

    class V:
        name = "lun0"
    v = V()
    rng = random.Random(1)
    sent = [rng.randbytes(bs), bytes(bs), rng.randbytes(bs), rng.randbytes(5000)]
    datas = sent[:3] + [sent[3] + bytes(bs - 5000)]
    items = [(v, i, d) for i, d in enumerate(datas)] + [(v, 9, None)]
    checks = [(i, s, xxhash.xxh3_64_digest(s), 100 * i) for i, s in enumerate(sent)]
    want = block_ids(h, [d for _, _, d in items])
    assert want[1] == want[4] == ZERO_ID
    assert transport._check_and_ids(h, items, checks) == want
    bad = list(checks)
    bad[2] = (2, sent[2], bytes(8), 200)
    with pytest.raises(ArrayError) as e:
        transport._check_and_ids(h, items, bad)
    assert e.value.errno == errno.EIO and "block 2 of lun0 (stream offset 200)" in str(e.value)


def test_hasher_keyed_and_zero():
    a, b = Hasher(1), Hasher(2)
    data = b"x" * 4096
    assert a.block_id(data) != b.block_id(data)
    assert a.block_id(bytes(4096)) == ZERO_ID
    assert a.block_id(data) == a.block_id(bytes(data))


# ---- maps ----------------------------------------------------------------------------
async def test_maps_apply_lookup_trim_mark():
    h = Hasher(5)
    nodes = {}

    async def load(nid):
        return nodes[nid]

    def emit(nid, data):
        nodes[nid] = data
    nblocks = 3 * maps.FANOUT * maps.FANOUT + 17          # height 3
    height = maps.height_for(nblocks)
    assert height == 3
    rng = random.Random(1)
    model = {}
    root = ZERO_ID
    for _ in range(5):
        upd = {rng.randrange(nblocks): os.urandom(16) for _ in range(200)}
        old_root = root
        root, delta = await maps.apply(root, height, upd, load, emit, h)
        before = len([v for v in model.values() if v != ZERO_ID])
        model.update(upd)
        assert len([v for v in model.values() if v != ZERO_ID]) - before == delta
        # the old root still reads as before (copy on write)
        assert old_root != root
    for bno, bid in model.items():
        assert await maps.lookup(root, height, bno, load) == bid
        assert maps.lookup_nowait(nodes, root, height, bno) == bid
    assert await maps.lookup(root, height, nblocks - 1, load) in (ZERO_ID, model.get(nblocks - 1))
    # runs of ids, across leaf boundaries and all-zero subtrees, equal lookups one by one
    for first, n_ in [(0, 1), (maps.FANOUT - 3, 7), (rng.randrange(nblocks - 3000), 2500),
                      (2 * maps.FANOUT * maps.FANOUT - 5, 10), (nblocks - 16, 16)]:
        last = first + n_ - 1
        assert maps.ids_nowait(nodes, root, height, first, last) == \
            [maps.lookup_nowait(nodes, root, height, b) for b in range(first, last + 1)]
    # a leaf missing from the node cache: None for its blocks, not a guess
    b = min(model)
    leaf = root
    for level in range(height - 1, 0, -1):
        leaf = maps.child(nodes[leaf], b // maps.FANOUT ** level % maps.FANOUT)
    partial = {k: v for k, v in nodes.items() if k != leaf}
    end = b - b % maps.FANOUT + maps.FANOUT      # the first block of the next leaf
    got = maps.ids_nowait(partial, root, height, end - 2, end + 1)
    assert got == [None, None] + [maps.lookup_nowait(nodes, root, height, x)
                                  for x in (end, end + 1)]
    n = await maps.count(root, height - 1, load)
    assert n == len(model)
    cut = nblocks // 2
    troot, tdelta = await maps.trim(root, height, cut, load, emit, h)
    assert n + tdelta == len([b for b in model if b < cut])
    for bno, bid in model.items():
        want = bid if bno < cut else ZERO_ID
        assert await maps.lookup(troot, height, bno, load) == want
    live, seen = set(), set()
    await maps.mark(root, height, load, live, seen)
    assert set(model.values()) <= live
    # growing keeps content
    groot = maps.grow(root, height, height + 1, emit, h)
    some = next(iter(model))
    assert await maps.lookup(groot, height + 1, some, load) == model[some]


async def test_maps_zero_subtrees_are_free():
    h = Hasher(5)
    nodes = {}

    async def load(nid):
        return nodes[nid]
    root, _ = await maps.apply(ZERO_ID, 2, {5: os.urandom(16)}, load,
                               nodes.__setitem__, h)
    assert len(nodes) == 2
    root, delta = await maps.apply(root, 2, {5: ZERO_ID}, load, nodes.__setitem__, h)
    assert root == ZERO_ID and delta == -1


# ---- the array, in process -------------------------------------------------------------
async def open_array(path, cache=8 * MiB):
    a = Array(str(path), cache)
    return a


async def with_array(path, fn, cache=8 * MiB, **kw):
    """Open the array at `path` (Array keywords `kw`), run `fn(array)`, close it."""
    async with trio.open_nursery() as n:
        a = Array(str(path), cache, **kw)
        await a.open(n)
        try:
            return await fn(a)
        finally:
            await a.close()
            n.cancel_scope.cancel()


async def assert_clean(a, strict=False):
    r = await fsck.check(a, strict=strict, verify_data=True)
    assert r["problems"] == [], r["problems"]
    return r


async def test_array_write_read_model_and_persist(tmp_path):
    init_array(str(tmp_path / "arr"))
    rng = random.Random(3)
    size = 8 * MiB
    model = bytearray(size)

    async def phase1(a):
        vol = await a.create_lun("lun0", "8M", block_size=16384)
        for _ in range(300):
            off = rng.randrange(size)
            n = rng.randrange(1, 70000)
            data = os.urandom(n)
            written = await vol.write(off, data)
            assert written == min(n, size - off)
            model[off:off + written] = data[:written]
        # reads at random places, crossing blocks
        for _ in range(200):
            off = rng.randrange(size)
            n = rng.randrange(1, 100000)
            assert await vol.read(off, n) == bytes(model[off:off + n])
        await a.sync()
        await assert_clean(a)
    await with_array(tmp_path / "arr", phase1, cache=1 * MiB)   # small: forces flushes

    async def phase2(a):
        vol = a.lun("lun0")
        assert await vol.read(0, size) == bytes(model)
        await a.collect_garbage()
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", phase2)


async def test_array_end_semantics_and_errors(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "1M")
        assert await vol.write(1 * MiB - 10, b"x" * 100) == 10     # short at the end
        with pytest.raises(ArrayError) as e:
            await vol.write(1 * MiB, b"x")
        assert e.value.errno == errno.ENOSPC
        assert await vol.read(1 * MiB - 10, 100) == b"x" * 10
        assert await vol.read(1 * MiB, 100) == b""
        with pytest.raises(ArrayError) as e:
            await a.create_lun("l", "1M")
        assert e.value.errno == errno.EEXIST
        for bad in ("bad name", "-x", "x" * 65):
            with pytest.raises(ArrayError) as e:
                await a.create_lun(bad, "1M")
            assert e.value.errno == errno.EINVAL
        for bad in ("1000", "0", "1Q", "-5"):
            with pytest.raises(ArrayError) as e:
                await a.create_lun("ok", bad)
            assert e.value.errno == errno.EINVAL
        with pytest.raises(ArrayError) as e:
            await a.create_lun("ok", "1M", pack="nope")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(ArrayError) as e:
            await a.create_lun("huge", "1024T")
        assert e.value.errno == errno.ENOSPC
        assert set(a.luns) == {"l"}
        await assert_clean(a)
    await with_array(tmp_path / "arr", body)


async def test_steady_writes_still_commit_and_collect(tmp_path, monkeypatch):
    """Under a stream of writes that keeps the cache over its flush mark,
    the committer must still commit and collect garbage: an unbounded
    flush loop once starved both (a 1 GiB LUN piled up 7 GB of segments).
    The commit interval is shortened so the stream outlasts it."""
    from fusearray import writeback
    monkeypatch.setattr(writeback, "COMMIT_INTERVAL", 0.05)
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "256M")     # twice the cache: writes must flush
        rng = random.Random(3)
        start = a.writeback.last_commit
        for i in range(4 * 256):                  # 4 passes over the LUN, never pausing
            await vol.write((i % 256) * MiB, bytes(rng.randbytes(MiB)))
        used = a.packs["main"].used_bytes()
        assert a.writeback.last_commit > start, "no commit during the write stream"
        assert used < 3 * 256 * MiB, f"garbage never collected: {used >> 20} MiB"
        await a.sync()
        await assert_clean(a)
    await with_array(tmp_path / "arr", body, cache=128 * MiB)


async def test_write_back_starts_early_in_a_large_cache(tmp_path, monkeypatch):
    """A burst far below a large cache's dirty limit is written back while
    it arrives (from 64 MiB dirty), not left for the next fsync or periodic
    commit: otherwise fsync pays for the whole burst at once (a 512 MiB
    write + fsync took twice as long in a 3 GiB cache)."""
    from fusearray import volume, writeback
    monkeypatch.setattr(writeback, "COMMIT_INTERVAL", 3600)    # no periodic commit
    init_array(str(tmp_path / "arr"))

    async def body(a):
        cache = a.cache
        assert cache.flush_at == volume.FLUSH_AT < cache.dirty_limit // 4
        vol = await a.create_lun("l", "256M")
        rng = random.Random(4)
        for i in range(160):                      # 160 MiB: a fifth of the dirty limit
            await vol.write(i * MiB, bytes(rng.randbytes(MiB)))
        with trio.fail_after(30):
            while cache.dirty_bytes > cache.flush_at:
                await trio.sleep(0.01)
        # written back: in the overlay, or already merged into the map (the
        # write-back merges as it goes, see _reclaim_as_we_go)
        assert vol.overlay or vol.allocated, "nothing was written back"
        await a.sync()
        await assert_clean(a)
    await with_array(tmp_path / "arr", body, cache=1536 * MiB)


async def test_dedup_and_zero_blocks(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "16M")
        block = os.urandom(64 * 1024)
        for i in range(32):
            await vol.write(i * 64 * 1024, block)
        await vol.write(8 * MiB, bytes(4 * MiB))                  # zeros: no space
        await a.sync()
        pack = a.packs["main"]
        data_blocks = [b for batch in pack.scan_blocking() for b, _ in batch
                       if b not in a.nodes]
        assert len(data_blocks) == 1                              # stored once
        assert vol.allocated == 32
        assert await vol.read(0, 64 * 1024) == block
        await assert_clean(a)
    await with_array(tmp_path / "arr", body)


async def test_a_mapped_block_is_checked_again_after_any_await_before_the_reply(
        tmp_path, monkeypatch):
    """A large read checks blocks where they lie in the mapped segment
    files and replies from there. A block that fails the check is read the
    ordinary way, an await during which GC may recycle a file under the
    mapped ones. Simulated: while the ordinary read runs, the bytes under
    an already checked block change on disk 0 of a mirror. The read must
    check it again and return the right bytes (healed from disk 1), never
    the changed ones."""
    init_array(str(tmp_path / "arr"), packs=[f"m=mirror:{tmp_path}/d0,{tmp_path}/d1"])

    async def body(a):
        vol = await a.create_lun("l", "4M", pack="m")
        data = os.urandom(4 * MiB)
        await vol.write(0, data)
        await a.sync()
        for e in list(vol.cache.values()):     # clean now: read from the pack
            assert not e.dirty
            a.cache.drop(e)
        pack = a.packs["m"]
        bs = vol.block_size
        locs = [pack.lookup(vol.current_id_nowait(b)) for b in range(4)]
        path = pack.disks[0].seg_path(locs[0][0])

        def flip(block):
            with open(path, "r+b") as f:
                f.seek(locs[block][1] + 11)
                f.write(bytes([data[block * bs + 11] ^ 0xA5]))
        flip(1)                  # block 1 fails its mapped check: an ordinary read
        read_into = a.reader.read_into

        async def read_into_while_block_2_changes(*args, **kw):
            flip(2)              # block 2 was checked in place already
            await read_into(*args, **kw)
        monkeypatch.setattr(a.reader, "read_into", read_into_while_block_2_changes)
        parts = await vol.read_parts(0, 4 * bs)
        assert b"".join(parts) == data[:4 * bs]
    await with_array(tmp_path / "arr", body)


async def test_resize_shrink_then_grow_reads_zeros(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "4M")
        data = os.urandom(4 * MiB)
        await vol.write(0, data)
        await a.resize_lun("l", "1000K")
        assert vol.size == 1000 * 1024
        await a.resize_lun("l", "8M")
        got = await vol.read(0, 8 * MiB)
        assert got[:1000 * 1024] == data[:1000 * 1024]
        assert got[1000 * 1024:] == bytes(8 * MiB - 1000 * 1024)
        await a.collect_garbage()
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


async def test_committer_trims_extra_spares_once_no_segment_was_started_for_a_while(tmp_path):
    """Deleting a LUN leaves many dead segments kept as spare files (up to
    half the pack); once no new segment was started for SPARE_IDLE seconds
    the committer deletes all but SPARES of them."""
    from fusearray.store import SPARES
    init_array(str(tmp_path / "arr"))

    async def body(a):
        pack = a.packs["main"]
        pack.seg_limit = 1 << 20                     # many small segments
        vol = await a.create_lun("l", "24M")
        await vol.write(0, os.urandom(24 * MiB))
        await a.sync()
        await a.delete_lun("l")
        await a.collect_garbage()
        assert len(pack.spares) > SPARES, (len(pack.spares), pack.spare_limit)
        segdir = pack.disk.segdir
        assert len([f for f in os.listdir(segdir) if f.endswith(".spare")]) > SPARES
        pack.last_roll -= 3600                       # idle for an hour
        with trio.fail_after(10):
            while len(pack.spares) > SPARES:
                await trio.sleep(0.1)
        assert len([f for f in os.listdir(segdir) if f.endswith(".spare")]) == SPARES
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


@pytest.mark.parametrize("layout", ["single", "mirror"])
async def test_open_cuts_segment_files_back_to_what_was_committed(tmp_path, layout):
    """A crash after appends (or a spare file's recycling) and before
    their commit leaves segment files longer than the catalogue says, and
    files it does not know: the next open cuts every file back to its
    committed end on each disk and removes the unknown ones, so the space
    comes back and a mirror's copies stay the same size; the data reads
    back and fsck is clean. (RAID-5 keeps tails: its parity covers them.)"""
    disks = [str(tmp_path / f"d{i}") for i in range(2 if layout == "mirror" else 1)]
    init_array(str(tmp_path / "arr"), packs=[f"m={layout}:" + ",".join(disks)])
    data = os.urandom(3 * MiB)
    sizes = {}

    async def write(a):
        pack = a.packs["m"]
        vol = await a.create_lun("l", "8M", pack="m")
        await vol.write(0, data)
        await a.sync()
        for d in pack.disks:
            for f in os.listdir(d.segdir):
                sizes[os.path.join(d.segdir, f)] = os.path.getsize(os.path.join(d.segdir, f))
    await with_array(tmp_path / "arr", write)
    assert sizes
    top = max(sizes)
    for path in sizes:                  # what the crash left
        with open(path, "ab") as f:
            f.write(os.urandom(256 * 1024))
    stray = {os.path.join(os.path.dirname(p), "99999999.seg") for p in sizes}
    for path in stray:
        with open(path, "wb") as f:
            f.write(os.urandom(4096))

    async def check(a):
        for path, size in sizes.items():
            assert os.path.getsize(path) == size, (path, top)
        assert not any(os.path.exists(p) for p in stray)
        assert bytes(await a.luns["l"].read(0, len(data))) == data
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", check)


@pytest.mark.parametrize("layout", ["single", "mirror", "raid5"])
async def test_overwrites_reuse_dead_segment_files_whatever_the_layout(tmp_path, monkeypatch,
                                                                       layout):
    """Dead segment files are kept as spares and reused for new segments
    (fresh memory is slow on some VMs: a mirror that could not reuse wrote
    its overwrite passes at 170-290 MB/s against ~1100 when it could).
    Free space and the reserve are both logical; the mirror's reserve was
    once counted per copy, which on disks of this size kept it from ever
    reusing a file; GC came at a quarter of its physical bytes overwritten,
    twice as late as on a single disk. Disks of 400 MiB are simulated."""
    from fusearray import gc
    disks = 3 if layout == "raid5" else 2 if layout == "mirror" else 1
    spec = f"m={layout}:" + ",".join(str(tmp_path / f"d{i}") for i in range(disks))
    init_array(str(tmp_path / "arr"), packs=[spec])
    cap = 400 * MiB

    def fake_space(self):         # a disk of `cap` bytes: (capacity, available)
        used = 0
        for root, _, files in os.walk(self.path):
            used += sum(os.stat(os.path.join(root, f)).st_blocks * 512 for f in files)
        return cap, cap - used
    monkeypatch.setattr(DirMedium, "space", fake_space)

    async def body(a):
        pack = a.packs["m"]
        assert pack.reserve == 2 * pack.seg_limit
        vol = await a.create_lun("l", "24M", pack="m")
        rng = random.Random(2)
        for _ in range(2):
            await vol.write(0, rng.randbytes(24 * MiB))
            await a.sync()
            await a.collect_garbage()
        assert pack.spares, "the overwritten segments were deleted, not kept for reuse"
        spare_inodes = {os.stat(os.path.join(pack.disks[di].segdir, n)).st_ino
                        for g, _ in pack.spares for di, n in g.items()}
        before = pack.active_seq
        await vol.write(0, rng.randbytes(24 * MiB))
        await a.sync()
        new = [os.stat(d.seg_path(s)).st_ino for s in range(before + 1, pack.active_seq + 1)
               for d in pack.disks if os.path.exists(d.seg_path(s))]
        assert new and spare_inodes & set(new), "no new segment reused a spare file"
        # GC is pressing at a sixteenth of the data overwritten (at least two
        # segments), logical bytes on both sides (not a mirror's two copies
        # against one)
        monkeypatch.setattr(gc, "GC_GARBAGE_MIN", 0)
        bar = max(2 * pack.seg_limit, pack.data_bytes() // gc.PRESSING_SHARE)
        assert a.collector.threshold("m") == bar
        a.collector.garbage = {"m": bar}
        assert a.collector.pressing() == ["m"]
        a.collector.garbage = {"m": bar - 1}
        assert a.collector.pressing() == []
        await a.collect_garbage()
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


async def test_overwrites_are_freed_by_their_commit_and_gc_is_pressed_per_pack(tmp_path):
    """An overwrite's old blocks are freed by the commit that merged it,
    in each pack, before any collection (refs.py: the nodes the merge
    replaced lose their last reference there). Garbage is still counted
    per pack (it says when to compact): a collection called for by one
    pack clears that pack's count alone, and nothing live is lost in
    either."""
    init_array(str(tmp_path / "arr"), packs=[f"a=single:{tmp_path}/d0",
                                             f"b=single:{tmp_path}/d1"])

    async def body(a):
        rng = random.Random(8)
        vols = {n: await a.create_lun(f"l{n}", "4M", pack=n) for n in "ab"}
        await a.sync()
        empty = {n: a.packs[n].block_count() for n in "ab"}
        for _ in range(2):
            for v in vols.values():
                await v.write(0, rng.randbytes(4 * MiB))
            await a.sync()
        want = {n: await v.read(0, 4 * MiB) for n, v in vols.items()}
        pb = a.packs["b"]
        # 64 blocks of 64K and the map's root (a leaf) in each: the first
        # pass's blocks and map are gone
        for n in "ab":
            assert a.packs[n].block_count() == empty[n] + 64 + 1, n
        assert set(a.collector.garbage) == {"a", "b"} and a.collector.garbage["a"] >= 4 * MiB
        before_b = pb.block_count()
        async with a.writeback.lock:
            await a.collector.collect(["a"])
        assert pb.block_count() == before_b
        assert set(a.collector.garbage) == {"b"}
        for n, v in vols.items():
            assert await v.read(0, 4 * MiB) == want[n]
        await a.collect_garbage()
        assert not a.collector.garbage
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


async def test_a_long_write_back_collects_the_garbage_it_makes_as_it_goes(tmp_path,
                                                                         monkeypatch):
    """A LUN overwritten end to end with a large cache: the committer's
    write-back folds each OVERLAY_MERGE into the maps and, once that
    pack's garbage is pressing, collects it without flushing the rest, so
    the old data's segment files are reused by the same write-back. Before,
    the whole write-back went to new files and the garbage was found after
    it: an overwrite needed twice the LUN's space."""
    from fusearray import gc, writeback
    monkeypatch.setattr(writeback, "OVERLAY_MERGE", 8 * MiB)
    monkeypatch.setattr(gc, "GC_GARBAGE_MIN", 0)
    init_array(str(tmp_path / "arr"))

    async def body(a):
        pack = a.packs["main"]
        pack.seg_limit = 4 * MiB
        vol = await a.create_lun("l", "96M")
        rng = random.Random(12)
        await vol.write(0, rng.randbytes(96 * MiB))
        await a.sync()
        await a.collect_garbage()
        rolls = []
        roll = pack.segs.roll_blocking

        def spy():
            rolls.append(bool(pack.spares))
            roll()
        monkeypatch.setattr(pack.segs, "roll_blocking", spy)
        new = rng.randbytes(96 * MiB)
        for off in range(0, 96 * MiB, MiB):
            await vol.write(off, new[off:off + MiB])
        cache = a.cache
        assert cache.dirty_bytes > cache.flush_at     # the committer's write-back, not sync's
        with trio.fail_after(30):
            while cache.dirty_bytes > cache.flush_to:
                await trio.sleep(0.05)
        assert len(rolls) >= 10 and any(rolls), rolls
        await a.sync()
        assert await vol.read(0, 96 * MiB) == new
        await a.collect_garbage()
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body, cache=256 * MiB)


async def test_steady_overwrites_reuse_spare_files_and_keep_the_pack_small(tmp_path,
                                                                          monkeypatch):
    """A LUN overwritten end to end three times through the committer's
    write-back (#15 point 4): after the first pass, a new segment starts on
    a spare file (a dead segment's, whose pages the file system already
    has) nearly every time, because the write-back merges and collects as
    it goes at a sixteenth of the pack's data (at least two segments);
    those collections copy little (a sequential overwrite leaves no
    segment worth compacting but the one at its front, partly dead at each
    collection: it is compacted only when less than a quarter is live), and
    the pack never holds much more than the LUN.
    Before, the write-back merged every OVERLAY_MERGE and collected at a
    quarter: the first 256 MiB of an overwrite always went to fresh files
    (here: all of it)."""
    from fusearray import gc
    monkeypatch.setattr(gc, "GC_GARBAGE_MIN", 0)
    monkeypatch.setattr(gc, "GC_INTERVAL", 3600.0)   # only the write-back's collections
    init_array(str(tmp_path / "arr"))
    lun = 96 * MiB

    async def body(a):
        pack = a.packs["main"]
        pack.seg_limit = 4 * MiB
        vol = await a.create_lun("l", "96M")
        rng = random.Random(15)
        await vol.write(0, rng.randbytes(lun))
        await a.sync()
        await a.collect_garbage()
        assert a.collector.threshold("main") == 2 * pack.seg_limit     # 96M // 16 is less
        rolls, copied, peak = [], [], []
        roll = pack.segs.roll_blocking

        def spy():
            rolls.append(bool(pack.spares))
            roll()
        monkeypatch.setattr(pack.segs, "roll_blocking", spy)
        read_locs = a.collector.read_locs      # what compaction reads to copy

        async def spy_read(p, ids, locs):
            copied.append(len(ids))
            return await read_locs(p, ids, locs)
        monkeypatch.setattr(a.collector, "read_locs", spy_read)
        collections = []
        collect = a.collector.collect

        async def spy_collect(*args, **kw):
            collections.append(kw.get("flush", True))
            await collect(*args, **kw)
        monkeypatch.setattr(a.collector, "collect", spy_collect)
        cache = a.cache
        for _ in range(3):
            new = rng.randbytes(lun)
            for off in range(0, lun, MiB):
                await vol.write(off, new[off:off + MiB])
                peak.append(pack.data_bytes())
        with trio.fail_after(60):
            while cache.dirty_bytes > cache.flush_to:
                await trio.sleep(0.05)
        fresh = rolls.count(False)
        assert len(rolls) >= 60 and fresh <= 6, (fresh, len(rolls))
        assert collections.count(False) >= 10, collections     # collected as it went
        # compaction moved at most the live quarter of the segment at the
        # overwrite's front, each time (at GC's usual half: 157 blocks, 31 at once)
        per_seg = pack.seg_limit // (64 * 1024)
        assert max(copied, default=0) < per_seg * gc.AS_WE_GO_COMPACT, copied
        assert sum(copied) <= 3 * lun // (64 * 1024) // 20, copied
        # the LUN, the garbage below the bar, the segment at the front
        assert max(peak) <= lun + 6 * a.collector.threshold("main"), \
            (max(peak) / MiB, a.collector.threshold("main") / MiB)
        await a.sync()
        assert await vol.read(0, lun) == new
        await a.collect_garbage()
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body, cache=64 * MiB)     # the LUN: 3x the dirty limit


async def test_delete_reclaims_space(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "32M")
        keep = await a.create_lun("k", "1M")
        await keep.write(0, os.urandom(MiB))
        await vol.write(0, os.urandom(24 * MiB))
        await a.sync()
        used = a.packs["main"].used_bytes()
        assert used > 24 * MiB
        await a.delete_lun("l")
        after = a.packs["main"].used_bytes()
        assert after < used - 20 * MiB, (used, after)
        assert await keep.read(0, 10) != bytes(10)
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


async def test_punch_frees_blocks(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "4M")
        data = os.urandom(4 * MiB)
        await vol.write(0, data)
        await a.sync()
        assert vol.allocated == 64
        await vol.zero(100, 2 * MiB)         # partial first block, whole ones after
        await a.sync()
        got = await vol.read(0, 4 * MiB)
        assert got == data[:100] + bytes(2 * MiB) + data[100 + 2 * MiB:]
        assert vol.allocated == 64 - 31
        await a.collect_garbage()
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


async def test_concurrent_writers_and_readers(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        vol = await a.create_lun("l", "4M", block_size=4096)
        # each task owns disjoint 4K-aligned slots but shares blocks with others
        models = {}

        async def writer(k):
            rng = random.Random(k)
            for _ in range(100):
                slot = rng.randrange(256) * 4 + k       # 1K slots interleaved
                data = os.urandom(1024)
                await vol.write(slot * 1024, data)
                models[slot] = data
                if rng.random() < 0.1:
                    await a.sync()
        async with trio.open_nursery() as n:
            for k in range(4):
                n.start_soon(writer, k)
        for slot, data in models.items():
            assert await vol.read(slot * 1024, 1024) == data
        await a.sync()
        await assert_clean(a)
    await with_array(tmp_path / "arr", body, cache=1 * MiB)


async def test_not_an_array_and_already_open(tmp_path):
    with pytest.raises(ArrayError) as e:
        Array(str(tmp_path))
    assert e.value.errno == errno.ENOENT and "not a fusearray array" in e.value.message
    init_array(str(tmp_path / "arr"))
    with pytest.raises(ArrayError) as e:
        init_array(str(tmp_path / "arr"))
    assert e.value.errno == errno.EEXIST

    async def body(a):
        b = Array(str(tmp_path / "arr"))
        with pytest.raises(ArrayError) as e:
            b._take_lock()
        assert e.value.errno == errno.EBUSY and "already mounted" in e.value.message
    await with_array(tmp_path / "arr", body)


class CollidingHasher(Hasher):
    """Every non-zero block gets the same id: a forced hash collision."""

    def block_id(self, data):
        return ZERO_ID if self.is_zero(data) else b"\x01" * 16

    def block_ids(self, datas):
        return [self.block_id(d) for d in datas]


async def test_verify_mode_refuses_a_hash_collision(tmp_path):
    init_array(str(tmp_path / "arr"), verify=True)

    async def body(a):
        vol = await a.create_lun("l", "1M", block_size=4096)
        block = os.urandom(4096)
        await vol.write(0, block)
        await vol.write(4096, block)              # a true duplicate: verified, shared
        await a.sync()
        assert vol.allocated == 2
        a.hasher.__class__ = CollidingHasher      # from now on, ids collide
        await vol.write(8192, os.urandom(4096))   # different data, same id
        with pytest.raises(ArrayError) as e:
            await a.sync()
        assert e.value.errno == errno.EIO
        assert "hash collision" in a.events[-1][3]
        a.hasher.__class__ = Hasher
        assert await vol.read(0, 4096) == block   # nothing already stored was harmed
    await with_array(tmp_path / "arr", body)


async def test_a_copy_job_reads_the_index_off_the_loop(tmp_path, monkeypatch):
    """A cross-pack resync with cold index caches: every lookup of the
    block index that misses the cache (a B-tree read; on a catalogue in a
    cluster a RADOS read) runs in a worker thread, none on the trio
    thread, while the job plans and copies; the copy is right."""
    import threading

    from fusearray.catalogue import PackRows
    init_array(str(tmp_path / "arr"))
    loop_thread = threading.current_thread()
    on_loop = []
    for name in ("get", "get_many"):
        orig = getattr(PackRows, name)

        def spy(self, *args, _orig=orig, _name=name):
            if threading.current_thread() is loop_thread:
                on_loop.append(_name)
            return _orig(self, *args)
        monkeypatch.setattr(PackRows, name, spy)

    async def body(a):
        await a.add_pack("far", "single", [str(tmp_path / "far")])
        lun = await a.create_lun("db", "16M")
        data = os.urandom(16 * MiB)
        await lun.write(0, data)
        await a.snapshot(["db"], "s1")
        await a.sync()
        for p in a.packs.values():
            p.blocks.cache.resize(0)            # every lookup misses the cache
        on_loop.clear()
        job, _ = await a.resync(["s1/db=copy"], pack="far", undo=False)
        with trio.fail_after(60):
            while job.state not in ("done", "failed", "cancelled"):
                await trio.sleep(0.01)
        assert job.state == "done", job.error
        assert on_loop == [], on_loop[:5]
        assert await a.lun("copy").read(0, 16 * MiB) == data
    await with_array(tmp_path / "arr", body)


async def test_snapshot_resync_swap_in_process(tmp_path):
    init_array(str(tmp_path / "arr"))

    async def body(a):
        await a.add_pack("far", "single", [str(tmp_path / "far")])
        lun = await a.create_lun("db", "8M")
        v1 = os.urandom(8 * MiB)
        await lun.write(0, v1)
        set_name, job, _ = await a.snapshot(["db"], "s1")
        assert set_name == "s1" and job is None
        snap = a.shadow("s1/db")
        assert snap.root == lun.root and snap.readonly and snap.wwn != lun.wwn
        await lun.write(0, os.urandom(4 * MiB))
        assert await snap.read(0, 8 * MiB) == v1
        # same pack: instant, with an undo set of the state before
        job, undo = await a.resync(["s1/db"])
        assert job.state == "done" and len(undo) == 1
        assert await lun.read(0, 8 * MiB) == v1
        # cross pack: reads right at once, the job makes it independent
        job, _ = await a.resync(["s1/db=copy"], pack="far", undo=False)
        copy = a.lun("copy")
        assert copy.pack.name == "far" and copy.source is not None
        assert await copy.read(0, 8 * MiB) == v1
        await copy.write(0, b"new" * 1000)                 # never overwritten by the copy
        with trio.fail_after(30):
            while job.state != "done":
                await trio.sleep(0.01)
        assert copy.source is None and job.percent == 100
        assert await copy.read(0, 3000) == b"new" * 1000
        assert await copy.read(3000, 8 * MiB - 3000) == v1[3000:]
        await assert_clean(a)
        # delete the origin LUN and its sets: the copy keeps its data
        await a.delete_lun("db")
        for s in list(a.sets):
            await a.delete_shadow(s)
        await a.collect_garbage()
        assert await copy.read(3000, 8 * MiB - 3000) == v1[3000:]
        await assert_clean(a, strict=True)
        # swap: the shadow copy becomes the LUN and keeps its WWN
        await a.snapshot(["copy"], "s2")
        wwn = a.shadow("s2/copy").wwn
        await copy.write(0, bytes(8 * MiB))
        swapped = await a.swap("s2/copy")
        assert a.lun("copy") is swapped and swapped.wwn == wwn and not swapped.readonly
        assert await swapped.read(3000, 100) == v1[3000:3100]
        assert "s2" not in a.sets
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


async def test_space_figures_never_statvfs_on_the_trio_thread(tmp_path, monkeypatch):
    """free_bytes/capacity_bytes (statfs, status, GC and full-pack
    decisions on the trio thread) come from figures refreshed in worker
    threads: a hung disk's statvfs must not stall every request."""
    import threading
    init_array(str(tmp_path / "arr"))

    async def body(a):
        real, on_loop = os.statvfs, []

        def spy(path):
            if threading.current_thread() is threading.main_thread():
                on_loop.append(path)
            return real(path)
        monkeypatch.setattr(os, "statvfs", spy)
        vol = await a.create_lun("l", "16M")
        await vol.write(0, os.urandom(4 * MiB))
        await a.sync()
        a.status()
        pack = a.packs["main"]
        assert pack.free_bytes() > 0 and pack.capacity_bytes() >= pack.free_bytes() - \
            pack.spare_bytes
        await vol.write(0, os.urandom(4 * MiB))     # garbage, then GC retires segments
        await a.sync()
        async with a.writeback.lock:
            await a.collector.collect()
        a.status()
        assert not on_loop, f"statvfs on the trio thread: {on_loop}"
        monkeypatch.setattr(os, "statvfs", real)
        await assert_clean(a)
    await with_array(tmp_path / "arr", body)


async def test_in_flight_runs_one_step_and_raises_its_error_at_the_next_wait():
    from fusearray.util import InFlight
    log = []

    async def step(name, fail=False):
        await trio.sleep(0.01)
        log.append(name)
        if fail:
            raise ArrayError(errno.ENOSPC, f"{name} failed")
    f = InFlight()
    async with trio.open_nursery() as n:
        await f.wait()                        # nothing in flight: returns at once
        f.start(n, step, "a")
        assert log == []                      # runs in the background
        await f.wait()
        assert log == ["a"]
        f.start(n, step, "b", True)
        with pytest.raises(ArrayError, match="b failed"):
            await f.wait()
        await f.wait()                        # the error is raised once
        f.start(n, step, "c", True)
        await f.wait(raise_error=False)       # or dropped, for a caller ending anyway
        await f.wait()
    assert log == ["a", "b", "c"]


def test_resumed_job_percent_never_goes_back():
    """A job resumed after a crash may find more left to do than it had
    (the pieces in flight are redone): its percent holds at what it showed,
    then moves on; the bytes stay what they are."""
    from fusearray.jobs import Job
    j = Job(7, "recover", {"pack": "p"}, total=100 * MiB, state="running", done=60 * MiB)
    assert j.percent == 60
    row = j.row()                              # persisted at a commit
    k = Job.from_row(row)                      # the daemon restarts
    k.total_bytes = k.done_bytes + 80 * MiB    # the rebuild plans again: more left
    assert k.done_bytes * 100 // k.total_bytes < 60
    assert k.percent == 60 and k.last_decile == 6
    k.done_bytes += 10 * MiB
    assert k.percent == 60                     # 70/140: still below what it showed
    k.done_bytes += 60 * MiB
    assert k.percent == 92                     # 130/140
    k.state = "done"
    assert k.percent == 100


async def test_copy_job_resumes_after_reopen(tmp_path):
    init_array(str(tmp_path / "arr"))
    data = os.urandom(6 * MiB)

    async def start(a):
        await a.add_pack("far", "single", [str(tmp_path / "far")])
        lun = await a.create_lun("db", "6M")
        await lun.write(0, data)
        _, job, _ = await a.snapshot(["db"], "p", context="plex", pack="far")
        await a.control_job(str(job.id), "pause")
        return job.id
    jid = await with_array(tmp_path / "arr", start)

    async def resume(a):
        job = a.jobs[jid]
        assert job.state == "paused"                  # paused stays paused
        snap = a.shadow("p/db")
        assert snap.source is not None and await snap.read(0, 6 * MiB) == data
        await a.control_job(str(jid), "resume")
        with trio.fail_after(30):
            while job.state != "done":
                await trio.sleep(0.01)
        assert snap.source is None
        await assert_clean(a)
    await with_array(tmp_path / "arr", resume)


def test_native_xor_matches_python():
    from fusearray import native, store
    assert store._xor_into is not None or not native.ENABLED, \
        "the C extension fusearray._accel is not built"
    for n in (1, 7, 8, 65536, 65537):
        parts = [os.urandom(n) for _ in range(3)]
        x = 0
        for p in parts:
            x ^= int.from_bytes(p, "little")
        assert store._xor(parts) == x.to_bytes(n, "little")


async def test_in_flight_depth_two_keeps_two_steps_running():
    from fusearray.util import InFlight
    gates = {name: trio.Event() for name in "abc"}
    ended = []

    async def step(name, fail=False):
        await gates[name].wait()
        ended.append(name)
        if fail:
            raise ArrayError(errno.EIO, f"{name} failed")
    f = InFlight(depth=2)
    async with trio.open_nursery() as n:
        await f.room()
        f.start(n, step, "a")
        await f.room()                        # one running: room for a second at once
        f.start(n, step, "b", True)
        assert f.last() is not None and not f.last().is_set()
        with trio.move_on_after(0.05) as waited:
            await f.room()                    # two running: waits for the oldest
        assert waited.cancelled_caught
        gates["b"].set()
        await trio.sleep(0.01)
        assert ended == ["b"]                 # b ended (failed) while a still runs
        gates["a"].set()
        with pytest.raises(ArrayError, match="b failed"):
            await f.room()
        f.start(n, step, "c")
        gates["c"].set()
        await f.wait()
    assert ended == ["b", "a", "c"] and f.last() is None


@contextlib.asynccontextmanager
async def a_set_and_a_receiver(tmp_path, data):
    """Open arrays a (LUN lun0 holding `data`, a whole number of MiB, in
    set s1) and b, to export from one into the other."""
    init_array(str(tmp_path / "a"))
    init_array(str(tmp_path / "b"))
    async with trio.open_nursery() as n:
        a, b = Array(str(tmp_path / "a"), 8 * MiB), Array(str(tmp_path / "b"), 8 * MiB)
        await a.open(n)
        await b.open(n)
        try:
            lun = await a.create_lun("lun0", f"{len(data) // MiB}M")
            await lun.write(0, data)
            await a.snapshot(["lun0"], "s1")
            yield a, b
        finally:
            await a.close()
            await b.close()
            n.cancel_scope.cancel()


@pytest.mark.parametrize("premature", [False, True])
async def test_pooled_import_reuses_a_chunk_only_once_its_blocks_are_stored(
        tmp_path, monkeypatch, premature):
    """The stream socket's import parses its read buffers in place and
    reuses them. Here every buffer that comes back is overwritten at once:
    the import must still be bit-exact. The control run hands buffers back
    as soon as they are parsed, and the scribbled blocks fail the import,
    so this test sees a buffer reused too early."""
    from fusearray import streamsock, transport
    monkeypatch.setattr(transport, "IMPORT_BATCH", 256 << 10)    # many batches
    data = os.urandom(8 * MiB)

    class Scribbling(streamsock.ChunkPool):
        reused = 0

        def _reuse(self, chunk):
            chunk[:] = b"\xaa" * len(chunk)
            self.reused += 1
            super()._reuse(chunk)

    async with a_set_and_a_receiver(tmp_path, data) as (a, b):
        stream = b"".join([bytes(p) async for batch in transport.export_stream(a, "s1")
                           for p in batch])
        imp = transport.start_import(b, "")
        if premature:
            imp.holding = lambda: 0
        pool = Scribbling(100 << 10)      # records straddle the chunks
        try:
            for at in range(0, len(stream), pool.size):
                chunk = pool.get()
                piece = stream[at:at + pool.size]
                chunk[:len(piece)] = piece
                await pool.feed(imp, chunk, len(piece))
            await imp.end_of_input()
        except ArrayError as e:
            assert premature and "damaged" in e.message, e.message
            assert "s1" not in b.sets
        else:
            assert not premature, "buffers handed back early went unnoticed"
            assert pool.reused > 50
            assert await b.shadow("s1/lun0").read(0, 8 * MiB) == data


@pytest.mark.parametrize("cut", [False, True])
async def test_a_mapped_stream_file_cut_short_mid_import_fails_it_as_damaged(tmp_path, cut):
    """An import from a regular file parses, hashes and appends the blocks
    where they lie in the mapped file (streamsock._map_source). A file cut
    short meanwhile would raise SIGBUS in the parser or a hashing thread
    and kill the daemon; the shim maps zeros over the rest instead, so the
    import fails (a corrupt record or a damaged block), leaves nothing
    behind, and the process lives.
    Uncut, the mapped import is bit-exact."""
    from fusearray import streamsock, transport
    data = os.urandom(24 * MiB)
    path = tmp_path / "s1.fas"
    async with a_set_and_a_receiver(tmp_path, data) as (a, b):
        with open(path, "wb") as f:
            async for batch in transport.export_stream(a, "s1"):
                for p in batch:
                    f.write(p)
        fd = os.open(path, os.O_RDONLY)
        try:
            source = streamsock._map_source(fd)
        finally:
            os.close(fd)            # the mapping does not need it
        if not native.ENABLED:      # FUSEARRAY_NATIVE=0: no map_stream, the file is read
            assert source is None, "a stream file was mapped with the native layer off"
            return
        assert source is not None, "a regular file of 24 MiB was not mapped"
        whole = memoryview(source[0])
        imp = transport.start_import(b, "")
        step = streamsock.READ_CHUNK
        try:
            for at in range(0, len(whole), step):
                if cut and at == step:
                    os.truncate(path, step + 12345)     # under the live mapping
                streamsock._populate(whole[at:at + step])
                await imp.feed(whole[at:at + step])
            await imp.end_of_input()
        except ArrayError as e:
            # zeros where records were: a bad record or a block off its hash
            assert cut and ("corrupt stream" in e.message or "damaged" in e.message), \
                e.message
            await imp.interrupted()
            assert "s1" not in b.sets
        else:
            assert not cut, "a stream cut short was imported"
            assert await b.shadow("s1/lun0").read(0, 24 * MiB) == data
        del whole, source
        await b.collect_garbage()
        await assert_clean(b, strict=True)


# ---- absorbed sub-block writes (partial cache entries) --------------------------------
def test_partial_entry_ranges_merge_cover_and_gaps():
    from fusearray.volume import covers, gaps, merge_range
    assert merge_range([], 10, 20) == [(10, 20)]
    assert merge_range([(10, 20)], 30, 40) == [(10, 20), (30, 40)]
    assert merge_range([(10, 20), (30, 40)], 20, 30) == [(10, 40)]       # adjacent: one
    assert merge_range([(10, 20), (30, 40), (50, 60)], 15, 55) == [(10, 60)]
    assert merge_range([(10, 20)], 0, 5) == [(0, 5), (10, 20)]
    assert merge_range([(10, 20)], 12, 18) == [(10, 20)]
    assert covers([(0, 5), (10, 20)], 10, 20) and covers([(0, 5), (10, 20)], 1, 4)
    assert not covers([(0, 5), (10, 20)], 4, 11) and not covers([], 0, 1)
    assert gaps([(0, 5), (10, 20)], 32) == [(5, 10), (20, 32)]
    assert gaps([], 8) == [(0, 8)] and gaps([(0, 8)], 8) == []
    rng = random.Random(11)
    for _ in range(300):          # against a bitmap
        size = rng.choice([8, 64, 100])
        bits = [False] * size
        ranges: list = []
        for _ in range(rng.randrange(1, 8)):
            lo = rng.randrange(size)
            hi = rng.randrange(lo + 1, size + 1)
            ranges = merge_range(ranges, lo, hi)
            bits[lo:hi] = [True] * (hi - lo)
            want, i = [], 0
            while i < size:
                if bits[i]:
                    j = i
                    while j < size and bits[j]:
                        j += 1
                    want.append((i, j))
                    i = j
                else:
                    i += 1
            assert ranges == want
            lo = rng.randrange(size)
            hi = rng.randrange(lo + 1, size + 1)
            assert covers(ranges, lo, hi) == all(bits[lo:hi])
            assert [(a, b) for a, b in gaps(ranges, size)] == \
                [(a, b) for a, b in zip([0] + [h for _, h in want], [l for l, _ in want] + [size])
                 if a < b]


def test_partial_entry_patch_fill_and_whole():
    from types import SimpleNamespace
    from fusearray.volume import Entry
    vol = SimpleNamespace(block_size=16)
    e = Entry(vol, 0, bytearray(16), [])
    e.patch(2, b"ab")
    e.patch(8, b"cdef")
    assert e.valid == [(2, 4), (8, 12)] and e.covers(8, 12) and not e.covers(3, 9)
    e.fill(bytes(range(100, 116)))
    assert e.valid is None
    assert e.buf == bytes([100, 101]) + b"ab" + bytes(range(104, 108)) + b"cdef" \
        + bytes(range(112, 116))
    e = Entry(vol, 0, bytearray(16), [])
    e.patch(0, b"x" * 10)
    e.patch(10, b"y" * 6)           # the whole block written: complete without a read
    assert e.valid is None and e.buf == b"x" * 10 + b"y" * 6
    e = Entry(vol, 0, bytearray(16), [])
    e.patch(4, b"z")
    e.fill(None)                    # over a zero block
    assert e.valid is None and e.buf == bytes(4) + b"z" + bytes(11)


async def test_sub_block_writes_are_absorbed_and_completed_once_per_block(tmp_path):
    """A sub-block write that misses the cache reads nothing from the pack:
    the block is completed once, by the write-back or by a read that needs
    what was not written; snapshots, resync and shrink see the merged
    block."""
    init_array(str(tmp_path / "arr"))
    size, bs = 4 * MiB, 65536
    base = os.urandom(size)
    model = bytearray(base)
    rng = random.Random(7)

    def partial_entries(vol):
        return sum(1 for e in vol.cache.values() if e.valid is not None)

    async def small_writes(vol, count, within=None):
        pieces = []
        for _ in range(count):
            if within is None:
                off = rng.randrange(size - 5000)
            else:
                off = within * bs + rng.randrange(bs - 5000)
            n = rng.choice([1, 512, 4096, 5000])
            data = rng.randbytes(n)
            assert await vol.write(off, data) == n
            model[off:off + n] = data
            pieces.append((off, n))
        return pieces

    async def body(a):
        vol = await a.create_lun("l", "4M")
        await vol.write(0, base)
        await a.sync()
        stats = a.cache.stats
        s0 = stats()
        pieces = await small_writes(vol, 200)
        s1 = stats()
        assert s1["write_loads"] == s0["write_loads"]          # nothing read to write
        assert s1["absorbed_writes"] > s0["absorbed_writes"]
        partial = partial_entries(vol)
        assert partial > 10
        # reads inside what was written need nothing of the pack
        for off, n in pieces[-20:]:
            assert vol.read_cached(off, n) == model[off:off + n] or \
                (off // bs != (off + n - 1) // bs)
            assert await vol.read(off, n) == bytes(model[off:off + n])
        assert stats()["completed_for_read"] == s0["completed_for_read"]
        await a.sync()                   # read-modify-write here, once per block
        s2 = stats()
        assert s2["completed_at_flush"] - s0["completed_at_flush"] == partial
        assert partial_entries(vol) == 0
        assert await vol.read(0, size) == bytes(model)
        # a read that needs unwritten bytes completes the block at once
        await small_writes(vol, 3, within=5)
        vol.discard_cache()             # (as if evicted) then written again
        await small_writes(vol, 3, within=7)
        assert partial_entries(vol) == 1
        assert await vol.read(7 * bs, bs) == bytes(model[7 * bs:8 * bs])
        assert stats()["completed_for_read"] == s2["completed_for_read"] + 1
        assert partial_entries(vol) == 0
        model[5 * bs:6 * bs] = base[5 * bs:6 * bs]       # discarded: reads the stored
        assert await vol.read(0, size) == bytes(model)
        # a snapshot taken while partial dirty entries exist holds the merged blocks
        await small_writes(vol, 30)
        assert partial_entries(vol) > 0
        await a.snapshot(["l"], "s1")
        snap = bytes(model)
        assert await a.shadow("s1/l").read(0, size) == snap
        # resync over partial dirty entries: they are dropped, the LUN is the set's
        await small_writes(vol, 30)
        assert partial_entries(vol) > 0
        await a.resync(["s1/l"], undo=False)
        model[:] = snap
        assert await vol.read(0, size) == snap
        # punch and zero_tail with partial entries present
        await small_writes(vol, 5, within=9)
        await vol.zero(9 * bs + 100, 200)
        model[9 * bs + 100:9 * bs + 300] = bytes(200)
        await small_writes(vol, 5, within=10)
        await vol.zero(10 * bs, bs)
        model[10 * bs:11 * bs] = bytes(bs)
        await small_writes(vol, 5, within=11)
        await a.resize_lun("l", "720K")       # cuts block 11 after 16K
        del model[720 * 1024:]
        assert await vol.read(0, size) == bytes(model)
        await a.resize_lun("l", "4M")
        model.extend(bytes(size - len(model)))
        assert await vol.read(0, size) == bytes(model)
        await a.sync()
        await assert_clean(a)
    await with_array(tmp_path / "arr", body, cache=64 * MiB)

    async def again(a):
        assert await a.lun("l").read(0, size) == bytes(model)
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", again)


class _FailingConn:
    """A SQLite connection whose reads fail while `failing` is set (as
    Ceph's VFS fails every call once the cluster did not answer in time,
    or a disk that returns EIO)."""

    def __init__(self, conn):
        self.conn, self.failing = conn, False

    def execute(self, sql, *args):
        if self.failing and sql.lstrip().upper().startswith("SELECT"):
            import sqlite3
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


async def test_a_failing_catalogue_read_stops_the_array_cleanly(tmp_path):
    """A read of the catalogue fails (SQLite: disk I/O error) under a
    write-back and under a read: EIO with the catalogue named, never an
    internal error; the write-back stops (one error event saying what to
    do); `sync all` says so and `discard=yes` gives up what is not
    committed, so the array can be unmounted; the next open has every
    write synced before, byte for byte."""
    init_array(str(tmp_path / "arr"))
    first = os.urandom(4 * MiB)

    async def body(a):
        vol = await a.create_lun("l", "8M")
        await vol.write(0, first)
        await a.sync()
        reads = a.catalogue._reads
        conn = reads.conn = _FailingConn(reads.conn)
        conn.failing = True
        a.packs["main"].blocks.cache.resize(0)        # lookups go to the catalogue
        # (data stored already: the dedup filter says "maybe", the table is read)
        await vol.write(4 * MiB, first[:2 * MiB])
        with pytest.raises(ArrayError) as e:
            await a.sync()
        assert e.value.errno == errno.EIO
        a.drain_notes()
        errors = [ev[3] for ev in a.events if ev[2] == "error"]
        assert any("the catalogue cannot be read: disk I/O error" in m and
                   "stopped accepting changes" in m for m in errors), errors
        assert not [m for m in errors if "internal error" in m], errors
        assert a.writeback.fatal is not None
        conn.failing = False                          # (back: the array stays stopped)
        with pytest.raises(ArrayError) as e:
            await a.sync_all()
        assert e.value.errno == errno.EIO and "umount --discard" in e.value.message
        await a.sync_all(discard=True)
    await with_array(tmp_path / "arr", body)

    async def reopened(a):
        vol = a.ns.luns["l"]
        assert await vol.read(0, len(first)) == first
    await with_array(tmp_path / "arr", reopened)

    async def cold_read(a):                 # a read whose lookups need the catalogue
        reads = a.catalogue._reads
        reads.conn = _FailingConn(reads.conn)
        reads.conn.failing = True
        with pytest.raises(ArrayError) as e:
            await a.ns.luns["l"].read(0, len(first))
        assert e.value.errno == errno.EIO and "the catalogue cannot be read" in e.value.message
        a.drain_notes()
        assert not [ev for ev in a.events if "internal error" in ev[3]]
        assert a.writeback.fatal is not None
        reads.conn.failing = False
    await with_array(tmp_path / "arr", cold_read)


@pytest.mark.unit
def test_which_commit_records_mean_another_copy_wrote_since():
    """array.written_since: a pack's commit record against the catalogue's
    lineage. The catalogue of a mount in session S2 (count 12) that came
    after S1 (which ended at 9)."""
    from fusearray.array import written_since
    meta = {"session": "S2", "commits": "12", "prev_session": "S1", "prev_commits": "9"}
    rec = lambda s, n, a="u": {"array": a, "session": s, "commits": n}   # noqa: E731
    assert not written_since({}, meta, "u")                 # no record: a new pack
    assert not written_since(rec("X", 99, a="other"), meta, "u")   # another array's
    assert not written_since(rec("S2", 12), meta, "u")      # our own last commit
    assert not written_since(rec("S2", 7), meta, "u")       # lagging behind: fine
    assert not written_since(rec("S1", 9), meta, "u")       # crash before S2 marked
    assert written_since(rec("S2", 13), meta, "u")          # S2 went on in another copy
    assert written_since(rec("S1", 10), meta, "u")          # S1 went on elsewhere
    assert written_since(rec("S3", 1), meta, "u")           # a session this copy never saw
    assert written_since(rec("S1", 1), {}, "u")             # a catalogue with no lineage


async def test_a_refused_open_writes_nothing_to_the_catalogue(tmp_path):
    """An open refused after the catalogue was opened (here: the catalogue
    is another array's) ends without a commit: its close used to commit the
    empty state it had over that catalogue (the LUN id and WWN counters back
    to 1), so the next LUN made there took the id of an existing one and
    replaced it."""
    import json
    import shutil
    import sqlite3
    path = tmp_path / "arr"
    init_array(str(path))

    async def make_v(a):
        await a.create_lun("v", "4M")
    await with_array(path, make_v)
    cat = path / "catalogue.db"

    def meta():
        with contextlib.closing(sqlite3.connect(cat)) as c:
            return dict(c.execute("SELECT key, value FROM meta"))
    before = meta()
    conf_file = path / "array.json"
    shutil.copy(conf_file, tmp_path / "array.json.orig")
    conf = json.loads(conf_file.read_text())
    conf["uuid"] = "00000000-0000-0000-0000-000000000000"
    conf_file.write_text(json.dumps(conf))
    async with trio.open_nursery() as n:       # as the daemon does: open, refused, close
        a = Array(str(path), 8 * MiB)
        with pytest.raises(ArrayError, match="belongs to another array"):
            await a.open(n)
        await a.close()
    assert meta() == before
    shutil.copy(tmp_path / "array.json.orig", conf_file)

    async def make_w(a):
        await a.create_lun("w", "4M")
        assert sorted(a.luns) == ["v", "w"]
        assert a.luns["v"].wwn != a.luns["w"].wwn
    await with_array(path, make_w)

    async def both(a):
        assert sorted(a.luns) == ["v", "w"]
    await with_array(path, both)


def test_an_atomic_file_write_that_fails_leaves_the_old_file_and_no_part(tmp_path, monkeypatch):
    """write_file_atomic on a full file system: the old content stays and
    the part written is removed (a dedup filter's 8 MiB .tmp was left in a
    full array directory)."""
    from fusearray.store import records
    path = str(tmp_path / "f")
    records.write_file_atomic(path, b"old")

    def full(fd, bufs, off):
        os.write(fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(records, "pwritev_all", full)
    with pytest.raises(OSError):
        records.write_file_atomic(path, b"new" * 1000)
    assert sorted(os.listdir(tmp_path)) == ["f"]
    with open(path, "rb") as f:
        assert f.read() == b"old"
