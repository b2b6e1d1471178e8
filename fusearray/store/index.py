"""The block index: block id -> (segment, offset, length), with each
segment's live record bytes and logical size, and the changes since the
last commit (`pending_add`, `pending_del`) the catalogue persists.

Mutated on the trio thread only, by holders of the array's commit lock
(the store of new blocks, the commit, GC); looked up there without it
(single dict reads). Worker threads read it only as single dict reads:
`seg_size` for a segment's file length (rebuild, scrub), and the index
itself in the write-again after a failed fsync, under the commit lock.
The index is persisted by the catalogue in the same SQLite transaction
as the map roots, after the segments' sync_blocking().
"""
import os

from .records import HDR


class BlockIndex:
    """A pack's block index and its per-segment accounting."""

    def __init__(self):
        self.index: dict[bytes, tuple[int, int, int]] = {}   # id -> (seg, off, len)
        self.seg_live: dict[int, int] = {}                   # seg -> live record bytes
        self.seg_size: dict[int, int] = {}                   # seg -> logical bytes
        self.pending_add: dict[bytes, tuple[int, int, int]] = {}
        self.pending_del: set[bytes] = set()

    def load(self, rows) -> dict[int, int]:
        """The committed rows (id, seg, off, len). Returns each segment's
        committed end."""
        for bid, seg, off, length in rows:
            self.index[bytes(bid)] = (seg, off, length)
            self.seg_live[seg] = self.seg_live.get(seg, 0) + length + HDR.size
        ends: dict[int, int] = {}
        for seg, off, length in self.index.values():
            ends[seg] = max(ends.get(seg, 0), off + length)
        self.seg_size.update(ends)
        return ends

    def lookup(self, bid: bytes):
        return self.index.get(bid)

    def add(self, bid: bytes, loc) -> None:
        old = self.index.get(bid)
        if old is not None:
            self._unlive(old)
        self.index[bid] = loc
        self.seg_live[loc[0]] = self.seg_live.get(loc[0], 0) + loc[2] + HDR.size
        self.seg_size[loc[0]] = max(self.seg_size.get(loc[0], 0), loc[1] + loc[2])
        self.pending_add[bid] = loc
        self.pending_del.discard(bid)

    def _unlive(self, loc) -> None:
        self.seg_live[loc[0]] -= loc[2] + HDR.size

    def sweep(self, live: set) -> int:
        """Drop index entries of blocks not in `live`. Returns bytes freed."""
        freed = 0
        for bid in [b for b in self.index if b not in live]:
            loc = self.index.pop(bid)
            self._unlive(loc)
            freed += loc[2]
            self.pending_add.pop(bid, None)
            self.pending_del.add(bid)
        return freed

    def take_pending(self):
        adds, dels = self.pending_add, self.pending_del
        self.pending_add, self.pending_del = {}, set()
        return adds, dels

    def dead_segments(self, is_active) -> list[int]:
        """Sealed segments with nothing live: delete after the commit that
        dropped their entries."""
        return [s for s, live in self.seg_live.items()
                if live <= 0 and not is_active(s) and s in self.seg_size]

    def sparse_segments(self, is_active, ratio: float = 0.5) -> list[int]:
        """Sealed segments worth compacting (live share below `ratio`)."""
        out = []
        for s, live in self.seg_live.items():
            size = self.seg_size.get(s, 0)
            if not is_active(s) and 0 < live and size and live / size < ratio:
                out.append(s)
        return out

    def entries_in(self, seq: int) -> list[tuple[bytes, tuple]]:
        return [(b, loc) for b, loc in self.index.items() if loc[0] == seq]

    def forget_segment(self, seq: int) -> None:
        self.seg_live.pop(seq, None)
        self.seg_size.pop(seq, None)

    def data_bytes(self) -> int:
        """Logical: the bytes in the pack's segments, before redundancy."""
        return sum(self.seg_size.values())

    def problems(self, name: str, disks) -> list[str]:
        """Check the index against the accounting (fsck's invariants 3 and
        4): each segment's live-byte count is the sum over its entries, no
        entry lies past its segment's end, every online disk has the file
        of each indexed segment."""
        problems = []
        sums: dict = {}
        for bid, (seg, off, length) in self.index.items():
            sums[seg] = sums.get(seg, 0) + length + HDR.size
            size = self.seg_size.get(seg)
            if size is None or off + length > size:
                problems.append(f"pack {name}: block {bid.hex()} lies past the end "
                                f"of segment {seg}")
        for seg, total in sums.items():
            if self.seg_live.get(seg, 0) != total:
                problems.append(f"pack {name}: segment {seg} live bytes "
                                f"{self.seg_live.get(seg)} != {total}")
            for d in disks:
                if d.state == "online" and not os.path.exists(d.seg_path(seg)):
                    problems.append(f"pack {name}: segment file {seg} is missing on "
                                    f"disk {d.idx}")
        return problems
