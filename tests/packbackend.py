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
