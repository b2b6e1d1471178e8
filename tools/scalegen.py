#!/usr/bin/env python3
"""Build an array holding N stored blocks, fast, for the scale bench.

    tools/scalegen.py ARRAY NBLOCKS [--block-size 4K] [--lun big]

It goes through the package's own layers, without FUSE and without the
write-back cache: `init_array`, then on the opened Array, under the commit
lock, batches of unique blocks (each its number in its first 8 bytes, the
rest one random pattern: unique ids, and a data file system with
compression holds them in little space) are hashed by the array's hasher,
stored by the write-back's `store_new` (segment appends, index adds),
put in the LUN's overlay and folded into its map by `merge`; a commit
every COMMIT_EVERY blocks, and a collection at the end (the nodes each
merge superseded). So the index, the maps and the segments are
exactly what writes through a mount make, at the speed of the store.
Prints one JSON line: blocks, seconds, bytes.

    tools/scalegen.py ARRAY NBLOCKS --direct

builds the same kind of array in a fraction of the time, for sizes the
layers above cannot reach in a session (100M blocks: 400 GB of data, 100M
index rows). The array and its empty LUN are made through the package
(`init_array`, `Array.create_lun`, a clean close); then, with the array
closed, the segments are written whole, in order: data segments of
SEGMENT_LIMIT bytes, each record block i's number + 1 in its first 8 bytes
and zeros after (a file system with compression holds 400 GB of them in a
few GB), hashed by the array's own Hasher; the LUN's map is built bottom
up from those ids (leaves of FANOUT ids, then each level above, to the
LUN's height) into node segments of their own. Every (id, location) goes
to one of 256 in-RAM buckets by its first byte, so that the catalogue's
`blocks` rows are inserted bucket by bucket in key order (a B-tree fed in
order: about 1.5 us a row instead of 20+ at random) with the table's two
indexes dropped first and made again after; with the `segments` rows and
the LUN's root, height and allocated count in one transaction. The counts
are what refs.py defines for a map no other map shares: every row 1
(each block is one entry of one counted leaf, each node one entry of its
parent, the root the LUN's), every node `counted`. A stale kept dedup
filter is removed and the array is opened once through the package to
build it and closed clean, which keeps it (tools/fsck, run by the tests
on small arrays of both kinds, checks every row, count and node).
About 29 bytes of RAM a block while it runs (the buckets).
"""
import argparse
import array as pyarray
import concurrent.futures
import json
import os
import sqlite3
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from fusearray import ZERO_ID, maps  # noqa: E402
from fusearray.array import Array, init_array  # noqa: E402
from fusearray.perms import FILE_MODE  # noqa: E402
from fusearray.store import HDR, MAGIC, SEGMENT_LIMIT, Hasher, seg_name  # noqa: E402
from fusearray.util import parse_bytes  # noqa: E402

BATCH = 1 << 14
COMMIT_EVERY = 1 << 20


async def build(path: str, nblocks: int, bs: int, lun: str) -> dict:
    t0 = time.monotonic()
    a = Array(path, 256 << 20)
    async with trio.open_nursery() as n:
        await a.open(n)
        try:
            vol = await a.create_lun(lun, str(nblocks * bs), block_size=bs)
            pattern = bytearray(os.urandom(bs))
            wb = a.writeback
            done = 0
            while done < nblocks:
                count = min(BATCH, nblocks - done)
                datas = []
                for i in range(done, done + count):
                    struct.pack_into("<Q", pattern, 0, i + 1)
                    datas.append(bytes(pattern))
                ids = await trio.to_thread.run_sync(a.hasher.block_ids, datas)
                async with wb.lock:
                    await wb.store_new([(vol.pack, b, d) for b, d in zip(ids, datas)])
                    for i, b in enumerate(ids):
                        vol.overlay[done + i] = b
                    await wb.merge()
                    if (done + count) % COMMIT_EVERY < BATCH or done + count == nblocks:
                        await wb.commit(flush=False)
                done += count
            async with wb.lock:
                await wb.commit()
            await a.collect_garbage()      # the maps' superseded nodes: a clean array
        finally:
            await a.close()
            n.cancel_scope.cancel()
    return {"blocks": nblocks, "seconds": round(time.monotonic() - t0, 1),
            "bytes": nblocks * bs}


#: a bucket row: id, segment, offset, length, counted (a map node)
ROW = struct.Struct("<16sIIIB")


async def make_empty_lun(path: str, nblocks: int, bs: int, lun: str) -> None:
    a = Array(path, 64 << 20)
    async with trio.open_nursery() as n:
        await a.open(n)
        try:
            await a.create_lun(lun, str(nblocks * bs), block_size=bs)
        finally:
            await a.close()
            n.cancel_scope.cancel()


async def build_filter(path: str) -> None:
    """Open the array once through the package: its dedup filter is built
    from the committed rows; the clean close keeps it for the next mount."""
    a = Array(path, 64 << 20)
    async with trio.open_nursery() as n:
        await a.open(n)
        try:
            while not all((p["dedup_filter"] or {"ready": True})["ready"]
                          for p in a.status()["packs"]):
                await trio.sleep(0.5)
        finally:
            await a.close()
            n.cancel_scope.cancel()


def write_file(path: str, buf) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, view[done:], done)
    finally:
        os.close(fd)


class SegmentWriter:
    """Numbered segment files of one disk directory, written whole (in
    `pool`, a thread, when given: the next segment is made meanwhile)."""

    def __init__(self, segdir: str, first_seq: int):
        self.segdir = segdir
        self.seq = first_seq - 1
        self.rows = []          # (seg, live, size, count) for the segments table

    def write(self, buf, count: int, pool=None):
        self.seq += 1
        self.rows.append((self.seq, len(buf), len(buf), count))
        path = os.path.join(self.segdir, seg_name(self.seq))
        if pool is not None:
            return pool.submit(write_file, path, buf)
        write_file(path, buf)
        return None


class DataBuffer:
    """A data segment's records: the same R records in every segment; only
    the counters (block number + 1) and the ids in the headers change."""

    def __init__(self, per_seg: int, bs: int):
        self.rec = rec = HDR.size + bs
        assert rec % 8 == 0 and HDR.size % 8 == 0
        self.buf = bytearray(per_seg * rec)
        mv = self.mv = memoryview(self.buf)
        for j in range(per_seg):
            HDR.pack_into(self.buf, j * rec, MAGIC, ZERO_ID, bs)
        self.counters = mv.cast("Q")[HDR.size // 8::rec // 8]
        self.words = mv.cast("I")
        self.datas = [mv[j * rec + HDR.size:(j + 1) * rec] for j in range(per_seg)]
        self.pending = None     # its write in flight

    def fill(self, hasher, first: int, count: int) -> list:
        """Blocks first..first+count-1; returns their ids."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        rec = self.rec
        self.counters[:count] = pyarray.array("Q", range(first + 1, first + count + 1))
        ids = hasher.block_ids(self.datas[:count])
        packed = pyarray.array("I")
        packed.frombytes(b"".join(ids))
        for w in range(4):      # each header's id: 4 words from byte 4
            self.words[1 + w:1 + w + count * (rec // 4):rec // 4] = packed[w::4]
        return ids


class NodeSink:
    """Map nodes, stored as records of node segments (one buffer of
    records, written when full)."""

    def __init__(self, hasher, segs: SegmentWriter, buckets):
        self.hasher, self.segs, self.buckets = hasher, segs, buckets
        self.per_seg = SEGMENT_LIMIT // (HDR.size + maps.NODE_SIZE)
        self.parts: list = []

    def put(self, entries: list) -> bytes:
        """Store the node of these entries (padded with ZERO_ID); its id."""
        node = b"".join(entries) + ZERO_ID * (maps.FANOUT - len(entries))
        nid = self.hasher.block_id(node)
        self.parts.append((nid, node))
        if len(self.parts) == self.per_seg:
            self.flush()
        return nid

    def flush(self) -> None:
        if not self.parts:
            return
        seq = self.segs.seq + 1
        buf = bytearray()
        for nid, node in self.parts:
            buf += HDR.pack(MAGIC, nid, len(node))
            self.buckets[nid[0]] += ROW.pack(nid, seq, len(buf), len(node), 1)
            buf += node
        self.segs.write(buf, len(self.parts))
        self.parts = []


def build_direct(path: str, nblocks: int, bs: int, lun: str) -> dict:
    t0 = time.monotonic()
    trio.run(make_empty_lun, path, nblocks, bs, lun)
    conf = json.loads(Path(path, "array.json").read_text())
    hasher = Hasher(conf["seed"])
    db = sqlite3.connect(os.path.join(path, "catalogue.db"), isolation_level=None)
    try:
        (pack, disk), = db.execute("SELECT pack, path FROM disks")
        (top,) = db.execute("SELECT coalesce(max(seg), 0) FROM segments").fetchone()
        (height,) = db.execute("SELECT height FROM volumes WHERE name = ? AND kind = 'lun'",
                               (lun,)).fetchone()
    finally:
        db.close()
    segs = SegmentWriter(os.path.join(disk, "segments"), top + 1)
    buckets = [bytearray() for _ in range(256)]
    nodes = NodeSink(hasher, segs, buckets)

    # data segments, made in one buffer while the other is written
    per_seg = min(SEGMENT_LIMIT // (HDR.size + bs), nblocks)
    bufs = [DataBuffer(per_seg, bs), DataBuffer(per_seg, bs)]
    leaf: list = []
    level1: list = []           # ids of the leaves, in order
    done = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        while done < nblocks:
            count = min(per_seg, nblocks - done)
            db = bufs[done // per_seg % 2]
            ids = db.fill(hasher, done, count)
            seq = segs.seq + 1
            for j, bid in enumerate(ids):
                buckets[bid[0]] += ROW.pack(bid, seq, j * db.rec + HDR.size, bs, 0)
            db.pending = segs.write(db.mv[:count * db.rec], count, pool)
            for bid in ids:
                leaf.append(bid)
                if len(leaf) == maps.FANOUT:
                    level1.append(nodes.put(leaf))
                    leaf = []
            done += count
        for db in bufs:
            if db.pending is not None:
                db.pending.result()
    if leaf:
        level1.append(nodes.put(leaf))
    level = level1
    for _ in range(height - 1):
        level = [nodes.put(level[i:i + maps.FANOUT]) for i in range(0, len(level), maps.FANOUT)]
    nodes.flush()
    assert len(level) == 1, "the LUN's height does not cover its blocks"
    root = level[0]
    os.sync()
    t_data = time.monotonic() - t0

    db = sqlite3.connect(os.path.join(path, "catalogue.db"), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")    # no 10 GB write-ahead log
        db.execute("PRAGMA synchronous=OFF")         # (one sync at the end)
        db.execute("PRAGMA cache_size=-1048576")     # 1 GiB: the index builds sort in it
        indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                             "AND tbl_name = 'blocks' AND sql IS NOT NULL").fetchall()
        db.execute("BEGIN")
        for name, _ in indexes:
            db.execute(f"DROP INDEX {name}")
        for b in range(256):
            raw = buckets[b]
            rows = sorted(raw[i:i + ROW.size] for i in range(0, len(raw), ROW.size))
            buckets[b] = None
            db.executemany("INSERT INTO blocks (pack, id, seg, off, len, refs, counted) "
                           "VALUES (?, ?, ?, ?, ?, 1, ?)",
                           ((pack, bid, seg, off, ln, counted) for bid, seg, off, ln, counted
                            in ROW.iter_unpack(b"".join(rows))))
        for _, sql in indexes:
            db.execute(sql)
        db.executemany("INSERT INTO segments (pack, seg, live, size, count) "
                       "VALUES (?, ?, ?, ?, ?)", ((pack,) + r for r in segs.rows))
        db.execute("UPDATE volumes SET root = ?, allocated = ? WHERE name = ? AND kind = 'lun'",
                   (root, nblocks, lun))
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    os.sync()
    t_rows = time.monotonic() - t0 - t_data
    # the filter kept at the close above does not cover these rows
    for fn in os.listdir(path):
        if fn.startswith("dedup-filter."):
            os.unlink(os.path.join(path, fn))
    trio.run(build_filter, path)
    return {"blocks": nblocks, "seconds": round(time.monotonic() - t0, 1),
            "bytes": nblocks * bs, "direct": True, "data_seconds": round(t_data, 1),
            "rows_seconds": round(t_rows, 1), "segments": len(segs.rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("array")
    p.add_argument("nblocks", type=int)
    p.add_argument("--block-size", default="4K")
    p.add_argument("--lun", default="big")
    p.add_argument("--pack-dir", metavar="DIR",
                   help="the pack's disk directory (default: in ARRAY), e.g. on a file "
                        "system with compression")
    p.add_argument("--direct", action="store_true",
                   help="write the segments and the catalogue's rows directly (see above)")
    a = p.parse_args()
    bs = parse_bytes(a.block_size, "block size")
    init_array(a.array, block_size=bs,
               packs=[f"main=single:{os.path.abspath(a.pack_dir)}"] if a.pack_dir else None)
    if a.direct:
        print(json.dumps(build_direct(a.array, a.nblocks, bs, a.lun)))
    else:
        print(json.dumps(trio.run(build, a.array, a.nblocks, bs, a.lun)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
