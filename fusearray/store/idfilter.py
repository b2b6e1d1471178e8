"""A Bloom filter over a pack's block ids: an in-RAM "certainly not
stored" for the dedup check of new data (issue 16 point 1).

A write of data the pack has never seen asks the index whether its id is
stored. Without this filter that question is a B-tree probe of the
committed index (the catalogue's blocks table) for every new block, a
disk read once the table outgrows the page cache: the wall ZFS's dedup
table and every content-addressed store meet. The filter answers most of
those misses from RAM, at a fixed size set by the mount's --index-cache.

The ids are keyed xxh3-128 digests, uniform already, so the filter does
not hash them again: its k probe positions come from the id's bytes by
double hashing (h1 + i * h2 over the two 64-bit halves), masked to a
power-of-two bit count.

What makes it safe: a "no" must never be wrong (the caller would then
store a block a second time, or worse, a read would find no block), so
- every id the index adds sets its bits (BlockIndex.add, on the trio
  thread), from the filter's creation at open on;
- the ids committed before it are set by one streaming pass over the
  committed rows in a worker thread (`add_many`), after which `ready` is
  set; until then every question goes to the index as before;
- bits are never cleared: a dropped block's bits stay set (a "maybe"
  that costs a lookup), so the false positive rate creeps up with churn
  until the next mount builds it afresh (`status` reports the estimate);
- two threads setting bits of the same byte could lose one (`b[i] |= v`
  is a read and a write), so setting takes a lock; a question reads one
  byte at a time without it: a byte is stored whole.
"""
import json
import math
import os
import threading

import xxhash

from .records import write_file_atomic

#: The most probe positions an id gets (a bit array sized for few ids).
MAX_PROBES = 6
_M64 = (1 << 64) - 1
MAGIC = b"fusearray dedup filter 1\n"


def probes_for(bits: int, ids: int) -> int:
    """k for `bits` bits expected to hold `ids` ids (ln 2 * bits/ids,
    rounded, 1..MAX_PROBES)."""
    return max(1, min(MAX_PROBES, round(math.log(2) * bits / max(1, ids))))


class IdFilter:
    """A bit array of a power-of-two size (at most `limit_bytes`) with
    `probes` positions per id, chosen for `expected` ids."""

    def __init__(self, limit_bytes: int, expected: int):
        nbytes = 1
        while nbytes * 2 <= max(1, limit_bytes):
            nbytes *= 2
        self.nbits = nbytes * 8
        self.mask = self.nbits - 1
        self.bits = bytearray(nbytes)    # (calloc'd: pages count once set)
        self.probes = probes_for(self.nbits, max(expected, 1))
        self.lock = threading.Lock()
        self.ready = False               # every committed id is in: "no" is true
        self.negatives = 0               # questions answered "not stored" (approximate)

    def _positions(self, bid: bytes):
        h = int.from_bytes(bid[:16], "little")
        h1, h2 = h & _M64, (h >> 64) | 1
        mask = self.mask
        return [(h1 + i * h2) & mask for i in range(self.probes)]

    def add(self, bid: bytes) -> None:
        bits = self.bits
        with self.lock:
            for p in self._positions(bid):
                bits[p >> 3] |= 1 << (p & 7)

    def add_many(self, ids, chunk: int = 1024) -> None:
        """Set the bits of `ids` (a worker thread: the lock is let go every
        `chunk` ids so that the trio thread's adds do not wait long)."""
        bits, mask, probes = self.bits, self.mask, self.probes
        ids = list(ids)
        for i in range(0, len(ids), chunk):
            with self.lock:
                for bid in ids[i:i + chunk]:
                    h = int.from_bytes(bid[:16], "little")
                    h1, h2 = h & _M64, (h >> 64) | 1
                    for j in range(probes):
                        p = (h1 + j * h2) & mask
                        bits[p >> 3] |= 1 << (p & 7)

    def may_hold(self, bid: bytes) -> bool:
        """False only if `bid` was never added (any thread, no lock)."""
        bits = self.bits
        for p in self._positions(bid):
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    def excludes(self, bid: bytes) -> bool:
        """True if the filter is built and says `bid` is not stored."""
        if self.ready and not self.may_hold(bid):
            self.negatives += 1
            return True
        return False

    def false_positive_rate(self, ids: int) -> float:
        """The expected share of "maybe" answers for ids not stored, with
        `ids` ids set: (1 - e^(-k n / m))^k."""
        k = self.probes
        return (1.0 - math.exp(-k * ids / self.nbits)) ** k

    def status(self, ids: int) -> dict:
        return {"bytes": len(self.bits), "ready": self.ready, "probes": self.probes,
                "false_positive_rate": round(self.false_positive_rate(ids), 4),
                "negatives": self.negatives}

    # ---- kept across a clean unmount ------------------------------------------
    def save_blocking(self, path: str, tag: str) -> None:
        """Write the built filter to `path` (atomically, checksummed),
        labelled `tag`: the catalogue state it covers exactly (the array,
        the session and the commit count of the unmount's last commit)."""
        head = json.dumps({"tag": tag, "nbits": self.nbits, "probes": self.probes}).encode()
        body = MAGIC + head + b"\n" + bytes(self.bits)
        write_file_atomic(path, body + xxhash.xxh3_128_digest(body))

    def load_blocking(self, path: str, tag: str) -> bool:
        """Take the bits saved at `path` if they are whole (checksum) and
        labelled `tag`; the file is removed either way (it is only ever
        good for the catalogue state it was saved with). Saved bigger (a
        larger --index-cache then), they are folded down: a position
        masked to 2m bits, masked again to m, is the OR of the halves.
        Saved smaller: not taken (the build makes one of this size).
        True if the filter is ready now."""
        try:
            with open(path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            body = b""
        finally:
            for stale in (path, path + ".tmp"):     # (.tmp: a save a crash cut short)
                try:
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
        body, digest = body[:-16], body[-16:]
        if not body or not body.startswith(MAGIC) or xxhash.xxh3_128_digest(body) != digest:
            return False
        head, _, bits = body[len(MAGIC):].partition(b"\n")
        try:
            meta = json.loads(head)
        except ValueError:
            return False
        probes, nbits, n = meta.get("probes"), meta.get("nbits"), len(self.bits)
        if meta.get("tag") != tag or probes not in range(1, MAX_PROBES + 1) \
                or nbits != len(bits) * 8 or len(bits) < n or len(bits) % n:
            return False
        folded = int.from_bytes(bits[:n], "little")
        for off in range(n, len(bits), n):
            folded |= int.from_bytes(bits[off:off + n], "little")
        with self.lock:
            self.probes = probes
            self.bits[:] = folded.to_bytes(n, "little")
        self.ready = True
        return True
