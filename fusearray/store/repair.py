"""Rebuild and scrub: a disk's share of segments written again from the
others, and every copy / the parity of a segment checked and repaired.

Functions of a pack (the recovery jobs call them through Pack), each one
piece of work in a worker thread:
- rebuild_plan, rebuild_piece_blocking: while I/O goes on (several pieces
  at once, no lock) for sealed segments, which nothing else writes; the
  last pass (segments written meanwhile, the active one) under the
  array's commit lock, so no append moves the tail meanwhile.
- rejoin_blocking: under the commit lock; opens the disk's files and puts
  it back online.
- scrub_segment_blocking: under the commit lock, one segment a call (no
  segment is retired under it); repairs count against their disk.
The segment lists (`segs`) are taken on the trio thread (Pack.segments()).
"""
import errno

from .media import seg_name
from .records import scratch


def rebuild_plan(pack, d, segs: list) -> list[tuple[int, int]]:
    """(seg, disk bytes) disk `d` needs: what changed since it left, and
    anything it lacks or holds a different length of. `segs` from
    segments(), taken on the trio thread."""
    plan = []
    since = d.since or 0
    for seq in segs:
        size = pack.segs.disk_file_size(seq)
        try:
            have = d.medium.file_size(seg_name(seq))
        except OSError:
            have = -1
        if seq >= since or have != size:
            plan.append((seq, size))
    return plan


def rebuild_piece_blocking(pack, d, seq: int, off: int, n: int) -> int:
    """Write disk `d`'s bytes of segment `seq` at [off, off+n) from the
    other disks. Returns bytes written. Reads go into two scratch
    buffers kept per thread (a rebuild is thousands of pieces: fresh
    memory for each cost more than the XOR)."""
    src = [x for x in pack.disks if x is not d and x.state == "online"]
    if not src:
        raise OSError(errno.EIO, f"no online disk of pack {pack.name} to rebuild from")
    acc, tmp = scratch(n)
    ok = pack.strategy.rebuild_into(pack.files, d.idx, seq, off, acc, tmp, src)
    if not ok:
        raise OSError(errno.EIO, f"segment {seq} cannot be rebuilt: too many disks "
                      f"of pack {pack.name} are unavailable")
    m = d.medium
    m.prepare()
    fd = m.open_or_create(seg_name(seq))
    try:
        m.pwritev(fd, [acc], off)
        if off + n >= pack.segs.disk_file_size(seq):
            m.truncate(fd, pack.segs.disk_file_size(seq))
            m.fsync(fd)
    finally:
        m.close(fd)
    return n


def rejoin_blocking(pack, d, array_uuid: str, segs: list) -> None:
    """After its rebuild: the disk serves again."""
    d.write_label(array_uuid, pack.name)
    m = d.medium
    m.sync_dir()
    for seq in segs:
        if m.exists(seg_name(seq)):
            pack.files.add((d.idx, seq), m.open(seg_name(seq)))
    d.state, d.since, d.errors = "online", None, 0


def scrub_segment_blocking(pack, seq: int, entries) -> tuple[int, int]:
    """Verify every copy / the parity of a segment's blocks; repair from
    redundancy. Returns (repaired, unrecoverable)."""
    strategy, files, reads = pack.strategy, pack.files, pack.reads
    repaired = lost = 0
    for bid, (s, off, length) in entries:
        fixed, gone = strategy.scrub_block(files, pack.hasher, reads.read_logical,
                                           reads.heal, bid, seq, off, length)
        repaired += fixed
        lost += gone
    if pack.health.state == "healthy":
        repaired += strategy.scrub_parity(files, seq, pack.segs.disk_file_size(seq))
    return repaired, lost
