"""Reads of blocks: verified against their ids, healed from redundancy.

- read_blocking (a worker thread, under the segments' reading guard, beside
  appends and other reads, no lock): the layout's logical read; a missing
  disk, a read error or a mismatch falls back to another copy (mirror) or
  reconstruction from the other disks (raid5), and the bad piece is
  rewritten in place (segments are otherwise write-once, so that is
  safe). An error counts against its disk and may fail it (disks.py).
- read_many_blocking (a worker thread, under the guard): read_blocking of
  a request's blocks. On media without fds (RADOS: every read is a round
  trip to an OSD) the blocks that lie near each other in a segment are
  read as one run, one read of the medium, each block then verified
  (a sequentially written 1 MiB is one RADOS read, not 16). A block the
  run did not give right (a read error, a short read, a mismatch) is read
  again alone through read_blocking, which fails over, heals and counts
  the error as it always did: the run read itself counts nothing.
- read_nowait, read_into_nowait, read_many_into_nowait: only what the
  page cache holds (preadv2 RWF_NOWAIT), so safe on the trio thread;
  read_many_into_nowait also runs in a worker thread (under the guard)
  for big batches. They never heal and never count an error: anything
  unusual and the caller reads the blocking way.
- mapped_blocks (trio thread): views of blocks where they lie in the
  segment files, mapped read-only, verified there.

`mapped_reads`, `run_reads` and `lost_reads` are counters (written from
the threads that read; approximate under races, for status only).
"""
from ..errors import ChecksumError
from .records import HDR, IOV_MAX, verify_mapped

#: run reads (media without fds): the most bytes between two wanted blocks
#: a run reads and drops rather than making two reads. On the tests'
#: cluster a small RADOS read takes 0.05-0.2 ms and a 1 MiB one about 1 ms
#: (docs/scale-out.md): a round trip costs about what 100-200 KiB more of
#: one read do
RUN_GAP = 128 << 10
#: the most bytes one run read asks for (the medium cuts a big read in
#: pieces in flight at once: RadosMedium.READ_CHUNK)
RUN_MAX = 16 << 20


class Reads:
    """A pack's block reads. `pack` gives the collaborators: its disks,
    fd table (`files`), disk health, layout strategy and hasher."""

    def __init__(self, pack):
        self.pack = pack
        self.gap = bytearray(HDR.size)       # where record headers go in a run read
        self.lost_reads = 0
        self.mapped_reads = 0     # blocks served verified where they lie (mapped_blocks)
        self.run_reads = 0        # medium reads of runs of blocks (read_many_blocking)

    def read_logical(self, seq: int, off: int, n: int, avoid: int | None = None):
        """The logical bytes of segment `seq` at [off, off+n), not from disk
        `avoid`; None if the disks can't give them. Unverified."""
        return self.pack.strategy.read(self.pack.files, seq, off, n, avoid)

    def read_blocking(self, bid: bytes, loc) -> bytes:
        seg, off, length = loc
        data = self.read_logical(seg, off, length)
        if data is not None and self.pack.hasher.block_id(data) == bid:
            return data
        return self.heal(bid, seg, off, length, data is None)

    def read_many_blocking(self, bids, locs) -> list:
        """read_blocking of each of `bids` at `locs` (in order), with the
        blocks near each other in a segment read as one run on media
        without fds (see the module docstring); on media with fds (host
        directories: the page cache, mapped and no-wait reads) and striped
        layouts, block by block as ever."""
        pack = self.pack
        if len(bids) < 2 or pack.strategy.striped or \
                all(d.medium.fds for d in pack.disks):
            return [self.read_blocking(b, loc) for b, loc in zip(bids, locs)]
        out: list = [None] * len(bids)
        for run in self._runs(locs):
            if len(run) > 1:        # (a block alone: read_blocking below)
                self._read_run(bids, locs, run, out)
        return [data if data is not None else self.read_blocking(b, loc)
                for data, b, loc in zip(out, bids, locs)]

    @staticmethod
    def _runs(locs) -> list:
        """The indexes of `locs` grouped in runs: one segment, in the order
        of their offsets, each block starting at most RUN_GAP after the
        end of the one before (or at the same place: the same block twice),
        at most RUN_MAX bytes from the run's first to its last byte."""
        order = sorted(range(len(locs)), key=lambda i: locs[i])
        runs: list = []
        run, seg, start, end = [], None, 0, 0
        for i in order:
            s, off, n = locs[i]
            if run and s == seg and (off, n) == tuple(locs[run[-1]][1:]):
                run.append(i)       # the same block again: read once
                continue
            if not run or s != seg or off < end or off - end > RUN_GAP \
                    or off + n - start > RUN_MAX:
                if run:
                    runs.append(run)
                run, seg, start = [], s, off
            run.append(i)
            end = off + n
        if run:
            runs.append(run)
        return runs

    def _read_run(self, bids, locs, run: list, out: list) -> None:
        """Read the blocks of `run` (indexes of `locs`, sorted by offset,
        one segment) with one read of the first online disk, into `out`
        where they match their ids; the rest stay None (the caller reads
        them alone, the way that heals and counts errors)."""
        pack = self.pack
        files = pack.files
        di = files.first_online()
        if di is None:
            return
        seg, start = locs[run[0]][0], locs[run[0]][1]
        iov, bufs, pos = [], [], start     # bufs: (indexes, buffer), one per place
        for i in run:
            off, n = locs[i][1], locs[i][2]
            if bufs and off == pos - n and locs[bufs[-1][0][0]][1] == off:
                bufs[-1][0].append(i)      # the same block again
                continue
            if off > pos:
                iov.append(self.gap if off - pos == HDR.size else bytearray(off - pos))
            buf = bytearray(n)
            iov.append(buf)
            bufs.append(([i], buf))
            pos = off + n
        got = files.read_quiet(di, seg, iov, start)
        self.run_reads += 1
        whole = [(idx, buf) for idx, buf in bufs if locs[idx[0]][1] + len(buf) - start <= got]
        ids = pack.hasher.block_ids([buf for _, buf in whole])
        for (idx, buf), bid in zip(whole, ids):
            for i in idx:
                if bids[i] == bid:
                    out[i] = buf

    def heal(self, bid: bytes, seg: int, off: int, length: int, unreadable: bool) -> bytes:
        """The normal read failed: find a good copy, rewrite the bad one."""
        pack = self.pack
        strategy, files = pack.strategy, pack.files
        for bad in strategy.suspects(files, off, length):
            data = self.read_logical(seg, off, length, avoid=bad)
            if data is None or pack.hasher.block_id(data) != bid:
                continue
            d = pack.disks[bad]
            if d.state == "online" and not unreadable:
                strategy.repair(files, bad, seg, off, data)
                pack.health.disk_error(d, f"block {bid.hex()[:16]} in segment {seg} did "
                                       "not match its hash; repaired from redundancy")
            elif d.state == "online":
                strategy.repair(files, bad, seg, off, data)
            return data
        self.lost_reads += 1
        raise ChecksumError(
            f"block {bid.hex()} in segment {seg} offset {off} of pack {pack.name} "
            f"does not match its hash and cannot be rebuilt ({pack.layout}, "
            f"pack {pack.health.state})")

    # ---- from the page cache only -------------------------------------------
    def read_nowait(self, bid: bytes, loc):
        """Read a block only if the page cache has it (preadv2 RWF_NOWAIT):
        safe on the event loop. None when it would block or anything is
        unusual; then use read_blocking in a thread."""
        if loc is None or self.pack.files.nowait is None:
            return None
        buf = bytearray(loc[2])
        return buf if self.read_into_nowait(bid, loc, memoryview(buf)) else None

    def read_many_into_nowait(self, items) -> list:
        """read_into_nowait for [(bid, loc, dst)], with one preadv per run
        of records that lie back to back in a segment (a sequential write
        lays them out so: a 1 MiB read is one system call, not 16). The
        record headers between them land in a scratch buffer. Returns the
        items it could not serve (for the caller's fallback)."""
        files = self.pack.files
        if files.nowait is None or self.pack.strategy.striped:
            return [it for it in items if not self.read_into_nowait(*it)]
        di = files.first_online()
        rest = []
        i = 0
        while i < len(items):
            bid, loc, dst = items[i]
            j = i + 1
            if di is not None and loc is not None and loc[2] == len(dst):
                end = loc[1] + loc[2]   # extend the run while the next record follows on
                while j < len(items) and j - i < IOV_MAX // 2:
                    nloc = items[j][1]
                    if nloc is None or nloc[0] != loc[0] or nloc[1] != end + HDR.size \
                            or nloc[2] != len(items[j][2]):
                        break
                    end = nloc[1] + nloc[2]
                    j += 1
                iov = []
                for _, _, d in items[i:j]:
                    iov += [self.gap, d] if iov else [d]
                ok = files.preadv_nowait(di, loc[0], iov, loc[1]) == end - loc[1]
            else:
                ok = False
            rest += [it for it in items[i:j]
                     if not (ok and self.pack.hasher.verified(it[0], it[2]))]
            i = j
        return rest

    def read_into_nowait(self, bid: bytes, loc, dst) -> bool:
        """read_nowait into a caller's buffer (a memoryview of exactly the
        block's length), from whichever disks hold it: one (single), the
        first online copy (mirror) or the pieces across the data disks
        (raid5, straight into their places). False when it would block, a
        disk is not online, or anything is unusual: then dst holds garbage
        and the caller reads the block the blocking way (which heals)."""
        files = self.pack.files
        if loc is None or files.nowait is None or loc[2] != len(dst):
            return False
        strategy = self.pack.strategy
        if not strategy.striped:
            return not self.read_many_into_nowait([(bid, loc, dst)])
        seg, off, length = loc
        for di, doff, ln, lo in strategy.places(off, length, None):
            if files.preadv_nowait(di, seg, [dst[lo - off:lo - off + ln]], doff) != ln:
                return False
        return self.pack.hasher.verified(bid, dst)

    # ---- mapped ---------------------------------------------------------------
    def mapped_blocks(self, bids, locs) -> list:
        """Views of blocks where they lie in the segment files, mapped
        read-only, each verified against its id there: a memoryview, or for
        raid5 a tuple of them (the block's pieces on the data disks, in
        order, hashed as one); None for a block that cannot be served so
        (no online copy, a piece's disk not online, not in the page cache,
        a bad hash: the caller reads it the ordinary way, which
        reconstructs and heals). The reply is then the only copy of the
        data. The views keep their mapping alive; a file that shrinks under
        a view cannot crash the daemon (the check is SIGBUS-guarded, see
        the native accelerators)."""
        out = [None] * len(bids)
        files, strategy = self.pack.files, self.pack.strategy
        if verify_mapped is None or files.nowait is None:
            return out
        striped = strategy.striped
        di = None if striped else files.first_online()
        if di is None and not striped:
            return out
        idx, views, on_disk = [], [], False
        for i, loc in enumerate(locs):
            if loc is None:
                continue
            seq, off, n = loc
            pieces = []
            for pdi, doff, ln, _ in strategy.places(off, n, di):
                m = files.mapping(pdi, seq, doff + ln)
                if m is None:
                    break
                pieces.append(m[1][doff:doff + ln])
                on_disk = on_disk or not m[2]
            else:
                idx.append(i)
                views.append(tuple(pieces) if striped else pieces[0])
        if not views:
            return out
        try:
            bad = set(verify_mapped(views, [bids[i] for i in idx], self.pack.hasher.seed,
                                    on_disk))
        except OSError:
            return out
        for k, i in enumerate(idx):
            if k not in bad:
                out[i] = views[k]
        self.mapped_reads += len(idx) - len(bad)
        return out
