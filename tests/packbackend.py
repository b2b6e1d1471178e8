"""Where the suite's default arrays keep their pack: FUSEARRAY_TEST_PACK.

`local` (the default): `Mount.init()` with no arguments makes the array's
default pack `main` in a host directory. `rados`: it makes `main` a rados
pack (`--pack main=rados:POOL`) on a fresh pool of the session's Ceph
cluster (the `ceph` fixture), deleted when the mount is closed. .ci/run
runs the shadow copy, transport and pack-fault tests a second time this
way (#17: everything that works on a single pack works on a rados pack).
Tests that give `init` their own packs, or look at a local pack's segment
files, keep them local (they say so with the `local_pack` marker).
"""
import os

BACKEND = os.environ.get("FUSEARRAY_TEST_PACK", "local")
if BACKEND not in ("local", "rados"):
    raise SystemExit(f"FUSEARRAY_TEST_PACK={BACKEND!r}: use local or rados")

#: the session's CephCluster, set by conftest's session fixture when BACKEND is rados
cluster = None


def default_pack_args(pools: list) -> list[str]:
    """`init` arguments for a default array; a pool made is appended to
    `pools` (the mount drops it when closed)."""
    if BACKEND != "rados":
        return []
    assert cluster is not None, "FUSEARRAY_TEST_PACK=rados but no cluster was started"
    pool = cluster.new_pool()
    pools.append(pool)
    return ["--pack", f"main=rados:{pool}", "--ceph-conf", cluster.conf]


def drop_pools(pools: list) -> None:
    while pools:
        cluster.drop_pool(pools.pop())


def remove_segments(disk_path: str) -> int:
    """Delete the segment files of a pack's disk (`ctl/status`'s disk path:
    a host directory, or `rados:POOL/NAMESPACE`): the pack's data lost, as a
    test of what survives it does. Returns how many were deleted."""
    if not disk_path.startswith("rados:"):
        segdir = os.path.join(disk_path, "segments")
        names = [n for n in os.listdir(segdir) if n.endswith(".seg")]
        for n in names:
            os.unlink(os.path.join(segdir, n))
        return len(names)
    pool, ns = disk_path[len("rados:"):].split("/", 1)
    with cluster.client().open_ioctx(pool) as io:
        io.set_namespace(ns)
        names = [o.key for o in io.list_objects() if o.key.endswith(".seg")]
        for n in names:
            io.remove_object(n)
    return len(names)
