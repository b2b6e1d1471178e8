"""Block ids: xxHash3-128 keyed with the array's random 64-bit seed.

Stateless but for a cache of the all-zero blocks' hashes: safe from any
thread (a racing fill of that cache stores the same value twice).
"""
import xxhash

from .. import ZERO_ID
from .records import hash128_many


class Hasher:
    """Block ids: xxHash3-128 keyed with the array's random 64-bit seed.

    The key keeps ids unpredictable to an outsider (xxh3 is not
    cryptographic); `verify` mode in the array confirms dedup hits byte for
    byte. All-zero blocks get ZERO_ID and are never stored."""

    def __init__(self, seed: int):
        self.seed = seed
        self._zeros: dict[int, tuple[bytes, bytes]] = {}    # size -> (zeros, their hash)

    def _zero(self, n: int) -> tuple[bytes, bytes]:
        z = self._zeros.get(n)
        if z is None:
            zeros = bytes(n)
            z = self._zeros[n] = (zeros, xxhash.xxh3_128_digest(zeros, self.seed))
        return z

    def is_zero(self, data) -> bool:
        zeros = self._zero(len(data))[0]
        # bytes/bytearray compare with memcmp; a memoryview compares item
        # by item (30x slower), so it is compared as bytes
        return (data if type(data) is not memoryview else data.tobytes()) == zeros

    def block_ids(self, datas) -> list:
        """block_id of each buffer; the hashing runs without the GIL when
        the shim was built with XXH3 (same ids: checked in the tests)."""
        if hash128_many is not None:
            raw = hash128_many(datas, self.seed)
        else:
            raw = [xxhash.xxh3_128_digest(d, self.seed) for d in datas]
        return [self.block_id_from(d, bid) for d, bid in zip(datas, raw)]

    def block_id(self, data) -> bytes:
        return self.block_id_from(data, xxhash.xxh3_128_digest(data, self.seed))

    def verified(self, bid: bytes, data) -> bool:
        """Does stored block `data` have id `bid`? (Stored blocks are never
        all-zero, so the id is the plain keyed hash.)"""
        return xxhash.xxh3_128_digest(data, self.seed) == bid

    def block_id_from(self, data, bid: bytes) -> bytes:
        """The id of `data` given its keyed xxh3-128 digest `bid` (computed by
        the caller, e.g. with another hash in one pass). The hash first (memory speed for any buffer type); only a block
        hashing like all-zeros is compared byte for byte."""
        if bid == self._zero(len(data))[1] and self.is_zero(data):
            return ZERO_ID
        return bid
