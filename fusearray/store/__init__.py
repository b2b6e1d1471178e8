"""The block store: content-addressed blocks in append-only segment files
over a pack's disks (see pack.py for the contract).

Modules: records (the on-disk record format and byte helpers), hasher
(block ids), disks (a disk directory and its label), pack (the pack).
The names other modules use are re-exported here.
"""
from .disks import LABEL, Disk
from .hasher import Hasher
from .pack import CHUNK, SEGMENT_LIMIT, SEGMENT_MIN, SPARE_IDLE, SPARES, Pack
from .records import HDR, MAGIC, fsync_dir, write_file_atomic
# the accelerators as the store uses them (None when not built, see
# fusearray.native), and the helpers the tests check against them
from .records import hash128_many as _hash128_many
from .records import in_memory as _in_memory
from .records import verify_mapped as _verify_mapped
from .records import xor as _xor
from .records import xor_into as _xor_into

__all__ = ["CHUNK", "HDR", "LABEL", "MAGIC", "SEGMENT_LIMIT", "SEGMENT_MIN", "SPARES",
           "SPARE_IDLE", "Disk", "Hasher", "Pack", "fsync_dir", "write_file_atomic",
           "_hash128_many", "_in_memory", "_verify_mapped", "_xor", "_xor_into"]
