"""Layouts: how a segment's logical bytes lie on a pack's disks, one
strategy class each (the pack holds one, `Pack.strategy`).

- single: each segment is one file on the pack's one disk.
- mirror: the same file, byte for byte, on every disk (2 or 3).
- raid5:  a segment's logical bytes are cut in CHUNK-sized pieces laid
  out in rows over k = n-1 data disks plus one XOR parity chunk per row,
  the parity disk rotating with the row. Disk file offset of row r is
  r * CHUNK on every disk.

A layout answers the geometry questions (how many disks it can lose, how
long a disk's file is, where a logical range lies) and does the
layout-specific I/O through the fd table (files.py): the append's write,
the logical read (with raid5 reconstruction), the repair of a bad piece,
a rebuild piece and the per-block and parity parts of a scrub.

State: only raid5's `row`, the tail row of the active segment (its data
so far, to rewrite the parity as appends fill it), touched by the
appender alone (a worker thread, appends serialised by the array's
commit lock); the segments' undo restores it.
"""
import errno

from ..errors import ChecksumError
from .records import IOV_MAX, NOT_THE_DISK, Gather, xor, xor_at

CHUNK = 64 << 10          # raid5 stripe unit


class Layout:
    """What single and mirror share: every online disk holds the whole
    segment file, byte for byte (Raid5 overrides the I/O)."""
    name = ""
    row = None               # raid5's tail row; None for the others
    trims_tails = True       # open: cut files back to the committed end
    striped = False          # a block's bytes lie in pieces over several disks

    def __init__(self, n: int):
        self.n = n           # disks

    @property
    def k(self) -> int:
        """Data disks: usable space is the least disk's times k."""
        return 1

    def failed(self, bad: int) -> bool:
        """Is some data unreadable with `bad` disks not online?"""
        return bad == self.n

    def can_lose(self, others: int) -> bool:
        """Does the data stay readable on `others` online disks?"""
        return False

    def disk_bytes(self, logical: int) -> int:
        """Length of a disk's file for a segment of `logical` bytes."""
        return logical

    def stable_bytes(self, tail: int) -> int:
        """Disk bytes of the active segment appends can no longer change."""
        return self.disk_bytes(tail)

    def physical(self, logical: int) -> int:
        """Bytes on all disks together for `logical` bytes of segments."""
        return logical

    def places(self, off: int, n: int, first_online) -> list:
        """(disk idx, disk offset, length, logical offset) of the pieces a
        read of the logical range takes when nothing fails (`first_online`:
        the disk a whole-copy layout reads from)."""
        return [(first_online, off, n, off)]

    # ---- I/O (worker threads) ---------------------------------------------
    def write(self, files, seq: int, iov, offset: int) -> None:
        """Write an append's records (`iov`) at logical `offset`: the same
        bytes to every online disk."""
        wrote = 0
        failed: list = []
        for d in files.health.online():
            try:
                if files.write(d.idx, seq, iov, offset):
                    wrote += 1
            except OSError as e:
                if e.errno in NOT_THE_DISK:
                    raise
                failed.append((d, e))
        for d, e in failed:
            files.health.write_failed(d, e, others_wrote=bool(wrote))
        if not wrote:
            raise failed[-1][1] if failed else \
                OSError(errno.EIO, f"no disk of pack {files.health.pack.name} took the write")

    def read(self, files, seq: int, off: int, n: int, avoid: int | None = None):
        """The logical bytes, from the first disk that gives them (not
        `avoid`); None if none can."""
        for d in files.disks:
            if d.idx == avoid:
                continue
            got = files.get(d.idx, seq, off, n)
            if got is not None:
                return got
        return None

    def suspects(self, files, off: int, n: int) -> list[int]:
        """Disks whose bytes a failed read of the range may blame (each is
        avoided in turn to find a good copy); none: no redundancy."""
        return []

    def repair(self, files, di: int, seq: int, off: int, data) -> None:
        """Rewrite disk `di`'s part of the logical range with good `data`."""
        files.put(di, seq, off, data)

    def rebuild_into(self, files, di: int, seq: int, off: int, acc, tmp, src) -> bool:
        """Disk `di`'s bytes at [off, off+len(acc)) into `acc` from the
        online disks `src` (tmp: scratch as long)."""
        return files.get_into(src[0].idx, seq, off, acc)

    def scrub_block(self, files, hasher, read_block, heal, bid, seq, off, length):
        """Check one block of a scrub; (repaired, lost) as 0/1 counts."""
        data = read_block(seq, off, length)
        if data is not None and hasher.block_id(data) == bid:
            return 0, 0
        try:
            heal(bid, seq, off, length, data is None)
            return 1, 0
        except ChecksumError:
            return 0, 1

    def scrub_parity(self, files, seq: int, disk_bytes: int) -> int:
        """Check the redundancy beyond the blocks (raid5 parity); repairs."""
        return 0


class Single(Layout):
    name = "single"

    def failed(self, bad: int) -> bool:
        return bad > 0 or super().failed(bad)


class Mirror(Layout):
    name = "mirror"

    def can_lose(self, others: int) -> bool:
        return others >= 1

    def physical(self, logical: int) -> int:
        return logical * self.n

    def suspects(self, files, off: int, n: int) -> list[int]:
        return [d.idx for d in files.disks]

    def scrub_block(self, files, hasher, read_block, heal, bid, seq, off, length):
        """Every copy is checked, the bad ones rewritten from a good one."""
        copies = [(d, files.get(d.idx, seq, off, length)) for d in files.health.online()]
        good = next((c for _, c in copies if c is not None
                     and hasher.block_id(c) == bid), None)
        if good is None:
            return 0, 1
        repaired = 0
        for d, c in copies:
            if c is None or hasher.block_id(c) != bid:
                files.put(d.idx, seq, off, good)
                repaired += 1
        return repaired, 0


class Raid5(Layout):
    name = "raid5"
    trims_tails = False      # a file's tail row is parity-covered, kept whole
    striped = True

    @property
    def k(self) -> int:
        return self.n - 1

    def failed(self, bad: int) -> bool:
        return bad > 1 or super().failed(bad)

    def can_lose(self, others: int) -> bool:
        return others == self.n - 1

    def disk_bytes(self, logical: int) -> int:
        return -(-logical // (self.k * CHUNK)) * CHUNK

    def stable_bytes(self, tail: int) -> int:
        # the tail row's parity still moves
        return (tail // (self.k * CHUNK)) * CHUNK

    def physical(self, logical: int) -> int:
        return logical * self.n // self.k

    def pieces(self, off: int, n: int):
        """(disk idx, disk offset, length, logical offset) pieces of the
        logical range, in order."""
        k, nd = self.k, self.n
        out = []
        end = off + n
        while off < end:
            row, w = divmod(off, k * CHUNK)
            j, o = divmod(w, CHUNK)
            take = min(CHUNK - o, end - off)
            p = row % nd
            out.append(((p + 1 + j) % nd, row * CHUNK + o, take, off))
            off += take
        return out

    def places(self, off: int, n: int, first_online) -> list:
        return self.pieces(off, n)

    def parity_disk(self, row: int) -> int:
        return row % self.n

    def write(self, files, seq: int, iov, offset: int) -> None:
        """Data pieces go to their disks as views of the batch's buffers
        (pwritev, no joining); each row's parity is written with them. A
        full row's parity is XORed straight from the batch; a partial row
        is kept in `row` (later appends fill it and rewrite its parity)."""
        data = Gather(iov)
        k, row_bytes = self.k, self.k * CHUNK
        runs: dict = {}        # disk -> [offset, bytes, views]: one pwritev per run
        pos = 0

        def put(di: int, doff: int, views) -> None:
            views = views if type(views) is list else [views]
            run = runs.get(di)
            if run is not None and run[0] + run[1] == doff and len(run[2]) < IOV_MAX - 64:
                run[1] += sum(len(v) for v in views)
                run[2] += views
                return
            if run is not None:
                files.put(di, seq, run[0], run[2], strict=True)
            runs[di] = [doff, sum(len(v) for v in views), views]
        while pos < data.size:
            row, w = divmod(offset + pos, row_bytes)
            take = min(row_bytes - w, data.size - pos)
            if take == row_bytes:
                self.row = None
                parity = bytearray(CHUNK)
                for j in range(k):
                    at = 0
                    for v in data.slices(pos + j * CHUNK, CHUNK):
                        xor_at(parity, at, v)
                        at += len(v)
            else:
                if self.row is None or self.row[:2] != (seq, row):
                    self.row = (seq, row, bytearray(row_bytes))
                    rest = row_bytes - (w + take)
                    if rest:     # a reused file has old bytes there: parity counts zeros
                        zeros = bytes(CHUNK)
                        for di, doff, n, _ in self.pieces(row * row_bytes + w + take, rest):
                            put(di, doff, zeros[:n])
                buf = self.row[2]
                at = w
                for v in data.slices(pos, take):
                    buf[at:at + len(v)] = v
                    at += len(v)
                bv = memoryview(buf)
                parity = xor([bv[j * CHUNK:(j + 1) * CHUNK] for j in range(k)])
            for di, doff, n, loff in self.pieces(offset + pos, take):
                put(di, doff, data.slices(loff - offset, n))
            put(self.parity_disk(row), row * CHUNK, parity)
            pos += take
        for di, (doff, _, views) in runs.items():
            files.put(di, seq, doff, views, strict=True)

    def reconstruct(self, files, skip: int, seq: int, off: int, n: int):
        """Disk `skip`'s bytes at [off, off+n) from all the others."""
        acc = bytearray(n)
        ok = self.reconstruct_into(files, skip, seq, off, memoryview(acc),
                                   memoryview(bytearray(n)))
        return acc if ok else None

    def reconstruct_into(self, files, skip: int, seq: int, off: int, acc, tmp) -> bool:
        """reconstruct into `acc`, with `tmp` (as long) as scratch."""
        others = [di for di in range(self.n) if di != skip]
        if not files.get_into(others[0], seq, off, acc):
            return False
        for di in others[1:]:
            if not files.get_into(di, seq, off, tmp):
                return False
            xor_at(acc, 0, tmp)
        return True

    def read(self, files, seq: int, off: int, n: int, avoid: int | None = None):
        out = []
        for di, doff, ln, _ in self.pieces(off, n):
            got = None if di == avoid else files.get(di, seq, doff, ln)
            if got is None:
                got = self.reconstruct(files, di, seq, doff, ln)
            if got is None:
                return None
            out.append(got)
        return b"".join(out)

    def suspects(self, files, off: int, n: int) -> list[int]:
        return sorted({p[0] for p in self.pieces(off, n)})

    def repair(self, files, di: int, seq: int, off: int, data) -> None:
        for pdi, doff, ln, loff in self.pieces(off, len(data)):
            if pdi == di:
                files.put(di, seq, doff, data[loff - off:loff - off + ln])

    def rebuild_into(self, files, di: int, seq: int, off: int, acc, tmp, src) -> bool:
        return self.reconstruct_into(files, di, seq, off, acc, tmp)

    def scrub_parity(self, files, seq: int, disk_bytes: int) -> int:
        """Each row's parity against the XOR of its data chunks (a healthy
        pack only); a wrong one is rewritten."""
        repaired = 0
        for row in range(-(-disk_bytes // CHUNK)):
            p = self.parity_disk(row)
            chunks = [files.get(di, seq, row * CHUNK, CHUNK) for di in range(self.n) if di != p]
            stored = files.get(p, seq, row * CHUNK, CHUNK)
            if None in chunks or stored is None:
                continue
            want = xor(chunks)
            if want != stored:
                files.put(p, seq, row * CHUNK, want)
                repaired += 1
        return repaired


LAYOUTS = {cls.name: cls for cls in (Single, Mirror, Raid5)}


def layout_for(name: str, disks: int) -> Layout:
    """The strategy of layout `name` over `disks` disks."""
    return LAYOUTS[name](disks)

