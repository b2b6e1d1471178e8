"""fusearray: a virtual storage array in user space.

One FUSE mount shows every LUN and shadow copy as a regular file; blocks live
in a content-addressed store behind copy-on-write block maps. See README.md
and DESIGN.md. Layers (one owner of state each, data flowing one way):
store -> maps -> volume -> array -> ctl -> fs -> cli.
"""

__version__ = "0.1.0"

#: Block id of an all-zero block: never stored, reads as zeros.
ZERO_ID = bytes(16)
#: Default LUN block size.
DEFAULT_BLOCK_SIZE = 64 * 1024
#: Default write-back cache size of a mount.
DEFAULT_CACHE_SIZE = 256 * 1024 * 1024
#: Format version of an array directory.
FORMAT_VERSION = 1
