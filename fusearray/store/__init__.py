"""The block store: content-addressed blocks in append-only segment files
over a pack's disks. The names other modules use are re-exported here.

Modules (each docstring is that module's contract):
- records:  the on-disk record (`MAGIC | id | length`, then the data) and
            the byte helpers (XOR, gather, atomic file write, fsync_dir);
- hasher:   block ids (keyed xxh3-128; ZERO_ID for all-zero blocks);
- media:    where a disk's files live: a host directory or a RADOS pool
            namespace (rados.py); every file operation goes through it;
- disks:    a disk (a medium) and its label; DiskHealth, the rules by
            which a disk leaves its pack;
- layouts:  Single, Mirror, Raid5: where a segment's bytes lie on the
            disks, and the layout's own I/O (write, read, reconstruct,
            repair, rebuild, scrub);
- files:    the fd table, the read-only mappings, one disk's bytes;
- index:    the block index (committed rows on disk, read through the
            catalogue's view, behind a bounded cache) and each segment's
            live bytes, logical size and entry count;
- segments: the active segment, appends, sync (and the write-again after
            a failed fsync), spares, retirement, the reading guard;
- reads:    verified reads with healing, page-cache and mapped reads;
- repair:   rebuild and scrub, one piece a call;
- pack:     Pack, the face of all these to the array; space accounting.

Concurrency contract (what the code does; the array keeps to it):
- Trio thread: every change to the index (add, sweep, take_pending,
  drop_dead_segment, take_unlinkable, seal_if_sparse), by holders of the
  array's commit lock; lookups (from any thread: see index.py) and the segment lists
  (segments(), sealed()) without it; the reading guard (`reading`, entered and left there);
  mapped_blocks and the no-wait reads (read_nowait, read_into_nowait,
  read_many_into_nowait), which only take what the page cache holds.
- Worker threads (trio.to_thread), every method named `*_blocking`, plus
  rebuild_plan and big batches of read_many_into_nowait:
  - append_blocking (with roll_blocking, called only from it), which
    changes active_seq, active_tail, active_open, last_roll, spares,
    spare_bytes, the raid5 tail row and the fd table; sync_blocking
    (which may seal the active segment and append again); retire_,
    trim_spares_, unlink_segment_, close_segment_blocking (spares, fd
    table); scrub_segment_blocking; rejoin_blocking; the committer's
    check_disks_blocking: the caller holds the array's commit lock, so
    one of these runs at a time and the index does not change meanwhile.
  - read_blocking and read_many_blocking (its batch form: runs of blocks
    as one read on media without fds): no lock, beside appends and other
    reads, inside the reading guard of its segments; it may rewrite a bad
    piece in place (heal) and fail a disk.
  - rebuild_piece_blocking: no lock for sealed segments (several pieces
    at once), the last pass under the commit lock.
  - open_blocking and close_blocking: when nothing else uses the pack.
- `Pack.files.lock` (the fd table's lock, once `Pack._lock`) guards the fd
  and mapping tables only: every insertion and removal, and the
  publication of a mapping. It is never held across I/O (files are
  opened, mapped and closed outside it) and nests in no other lock.
  Lookups of an fd are single dict reads without it.
- A disk's state can change from a worker thread: an I/O or checksum
  error, a failed write or fsync, or the disk check takes it out
  (DiskHealth.lose: a single attribute write, its files closed under the
  fd table's lock, `since` from the segments' unsynced bookkeeping).
  Readers that see the old state fail over as for an I/O error. A lose
  from a reader's thread, or from `recover`'s disk check (which runs
  without the commit lock), can meet an append in another thread: both
  touch the unsynced bookkeeping, which has no lock of its own, so the
  lose only reads it with single GIL-held operations (a set copied by
  list(), a dict pop), never by iterating a set an append may grow.
- `notes` take messages from any thread (list.append); the array drains
  them on the trio thread. The counters `mapped_reads` and `lost_reads`
  are approximate under concurrent reads.
- What the caller serialises: appends, sync, retirement and every index
  change under its commit lock; a worker thread's reads inside
  `reading(segs)`; segment lists for the threads taken on the trio thread.

Crash: anything appended after the last commit is unreferenced and goes
at the next open (files nothing points into deleted, tails cut back);
spares are deleted at open; a retirement or deletion whose directory
fsync did not last is done again then.
"""
from .disks import Disk
from .hasher import Hasher
from .index import DEFAULT_INDEX_CACHE, FILTER_SHARE, PAGE_CACHE_SHARE, UNCACHED
from .layouts import CHUNK, Mirror, Raid5, Single
from .media import DEFAULT_LEASE, LABEL, close_media, is_rados, seg_name
from .pack import Pack
from .records import HDR, MAGIC, fsync_dir, write_file_atomic
# the accelerators as the store uses them (None when not built, see
# fusearray.native), and the helpers the tests check against them
from .records import hash128_many as _hash128_many
from .records import in_memory as _in_memory
from .records import verify_mapped as _verify_mapped
from .records import xor as _xor
from .records import xor_into as _xor_into
from .segments import SEGMENT_LIMIT, SEGMENT_MIN, SPARE_IDLE, SPARES

__all__ = ["CHUNK", "close_media", "DEFAULT_LEASE", "DEFAULT_INDEX_CACHE", "FILTER_SHARE", "PAGE_CACHE_SHARE", "HDR", "LABEL", "MAGIC", "SEGMENT_LIMIT", "SEGMENT_MIN", "SPARES",
           "SPARE_IDLE", "UNCACHED", "Disk", "Hasher", "is_rados", "seg_name", "Mirror", "Pack", "Raid5", "Single",
           "fsync_dir", "write_file_atomic",
           "_hash128_many", "_in_memory", "_verify_mapped", "_xor", "_xor_into"]
