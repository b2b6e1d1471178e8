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
"""
import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from fusearray.array import Array, init_array  # noqa: E402
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("array")
    p.add_argument("nblocks", type=int)
    p.add_argument("--block-size", default="4K")
    p.add_argument("--lun", default="big")
    a = p.parse_args()
    bs = parse_bytes(a.block_size, "block size")
    init_array(a.array, block_size=bs)
    print(json.dumps(trio.run(build, a.array, a.nblocks, bs, a.lun)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
