"""fusearray: a virtual storage array in user space.

One FUSE mount shows every LUN and shadow copy as a regular file; blocks live
in a content-addressed store behind copy-on-write block maps. See README.md
and DESIGN.md. Layers, each object the one owner of its state, calls
going down only:

    cli / ctlclient            (the command; talks to a mount's ctl/ files)
    mounthelper, systemdunit   (mount(8)'s helper, the systemd unit: cli underneath)
    fs -> ctl                  (the pyfuse3 Operations; the control protocol)
    array                      (the coordinator: builds and delegates to)
      namespace, jobs, shadows, recovery, transport
      writeback + gc           (the commit point and the collector)
      volume -> reader, maps   (LUNs and the cache; block and node reads)
    store/                     (packs: segments, index, disks, layouts)
    catalogue                  (SQLite: one transaction per commit)

The structure, paths and threads: docs/architecture.md, docs/concurrency.md.
"""

__version__ = "0.1.0"

#: Block id of an all-zero block: never stored, reads as zeros.
ZERO_ID = bytes(16)
#: Default LUN block size.
DEFAULT_BLOCK_SIZE = 64 * 1024
#: Smallest default write-back cache of a mount (and the size unit tests use).
DEFAULT_CACHE_SIZE = 256 * 1024 * 1024
#: Largest default write-back cache of a mount.
MAX_DEFAULT_CACHE_SIZE = 4 * 1024 * 1024 * 1024
#: xattr of a mount's ctl/ naming its stream socket (fusearray/streamsock.py).
STREAM_SOCKET_XATTR = "user.fusearray.stream_socket"
#: Format version of an array directory.
FORMAT_VERSION = 1


def default_cache_size() -> int:
    """The write-back cache a mount gets without --cache-size: 1/8 of the
    machine's memory, between 256 MiB and 4 GiB. Like an array controller's
    (or ZFS's ARC), the cache is what makes small random I/O cheap: a block
    in it is read or updated without reading and verifying the whole block
    from the store. Memory is only taken as blocks are used."""
    import os
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_CACHE_SIZE
    return max(DEFAULT_CACHE_SIZE, min(ram // 8, MAX_DEFAULT_CACHE_SIZE))
