"""A pack on RADOS (#17): `--pack NAME=rados:POOL` at init and
`addpack NAME rados POOL` on a mounted array put a pack's segments into a
Ceph pool namespace (store/rados.py), on the suite's own throw-away cluster
(the session fixture `ceph`). What users do, on real mounts: dd and cmp
against LUN files, shadow copies, umount and mount, SIGKILL and restart,
ext4 on a loop device, resync and plex copies between a local and a rados
pack, export and import onto a rados pack, tools/fsck; and what goes wrong:
a missing pool, a used namespace, no cluster named, a cluster that does not
answer, the pool deleted under a mounted array.
"""
import errno
import json
import os
import re
import subprocess
import time

import pytest

from conftest import PY, Mount, cli, read_at, run, wait_for, write_synced

pytestmark = pytest.mark.mount

MiB = 1 << 20


@pytest.fixture
def pool(rados_pool):       # (conftest: a fresh pool of the session's cluster)
    return rados_pool


@pytest.fixture
def client(ceph):
    return ceph.client()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def objects(client, pool: str) -> dict[str, set[str]]:
    """{namespace: {object names}} of a pool."""
    import rados
    out: dict[str, set[str]] = {}
    with client.open_ioctx(pool) as io:
        io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
        for o in io.list_objects():
            out.setdefault(o.nspace, set()).add(o.key)
    return out



def fsck(m: Mount) -> str:
    r = run([PY, os.path.join(ROOT, "tools", "fsck"), m.array], check=False)
    assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr
    return r.stdout


def array_conf(m: Mount) -> dict:
    with open(os.path.join(m.array, "array.json")) as f:
        return json.load(f)


def disk_of(m: Mount, pack: str) -> dict:
    p = next(p for p in m.status()["packs"] if p["name"] == pack)
    assert len(p["disks"]) == 1, p
    return p["disks"][0]


def sh(script: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def test_a_lun_on_a_rados_pack_keeps_its_data_in_the_pool(make_mount, ceph, client, pool):
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    conf = array_conf(m)
    assert conf["ceph_conf"] == ceph.conf
    # the pack's disk: a namespace of the pool of this array and pack alone
    d = disk_of(m, "main")
    ns = f"fusearray.{conf['uuid']}.main"
    assert d["path"] == f"rados:{pool}/{ns}" and d["state"] == "online"
    assert d["rados"] == {"pool": pool, "namespace": ns, "conf": ceph.conf,
                          "health": "HEALTH_OK"}, d
    m.ok("create", "v 48M")
    lun = m.path("luns", "v")
    first = write_synced(lun, 40 * MiB)
    assert read_at(lun, 0, len(first)) == first
    m.ok("snapshot", "v set=s1")
    # overwrite part of it: the shadow copy keeps the old blocks
    second = write_synced(lun, 3 * MiB + 4096, off=5 * MiB + 512)
    now = first[:5 * MiB + 512] + second + first[5 * MiB + 512 + len(second):]
    assert read_at(lun, 0, len(now)) == now
    assert read_at(m.path("snapshots", "s1", "v"), 0, len(first)) == first
    # the data is in the pool's namespace, nothing of it on the host
    objs = objects(client, pool)
    assert set(objs) == {ns}, objs
    segs = sorted(o for o in objs[ns] if o.endswith(".seg"))
    assert segs and "fusearray-disk.json" in objs[ns], objs
    with client.open_ioctx(pool) as io:
        io.set_namespace(ns)
        stored = sum(io.stat(o)[0] for o in segs)
    assert stored >= 40 * MiB, stored
    local = [os.path.join(dp, f) for dp, _, fs in os.walk(m.base) for f in fs
             if f.endswith(".seg")]
    assert local == []
    m.stop()
    fsck(m)
    # a mount later finds the cluster in array.json (no CEPH_CONF needed)
    env_conf = os.environ.pop("CEPH_CONF", None)
    try:
        m.start()
    finally:
        if env_conf is not None:
            os.environ["CEPH_CONF"] = env_conf
    assert read_at(lun, 0, len(now)) == now
    assert read_at(m.path("snapshots", "s1", "v"), 0, len(first)) == first
    # deleting the shadow copy gives back the blocks only it held
    m.ok("delete", "s1")
    m.ok("sync", "all")
    assert read_at(lun, 0, len(now)) == now
    m.stop()
    fsck(m)


def ext4_with_files(m, lun: str, fs: str) -> dict:
    """A 96M LUN `lun` of mount `m` attached, ext4 made on it and mounted
    on `fs`, 20 files written and fsync'd there (fsynced_files)."""
    m.ok("create", f"{lun} 96M")
    dev = m.attach(lun)
    run(["mkfs.ext4", "-q", "-F", dev])
    m.mount_fs(dev, fs)
    return fsynced_files(fs)


def fsynced_files(fs: str) -> dict:
    """20 files written and fsync'd in `fs`: {name: data}."""
    files = {}
    for i in range(20):
        data = os.urandom(64 * 1024 + i * 4099)
        with open(os.path.join(fs, f"f{i}"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files[f"f{i}"] = data
    return files


def ext4_intact(m, lun: str, fs: str, files: dict) -> None:
    """After a crash: LUN `lun` of mount `m` attached, e2fsck clean (after
    its journal's replay), every one of `files` there; detached again."""
    dev = m.attach(lun)
    r = run(["e2fsck", "-fy", dev], check=False)
    assert r.returncode in (0, 1), r.stdout + r.stderr     # 1: the journal replayed
    r = run(["e2fsck", "-fn", dev], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    m.mount_fs(dev, fs)
    for name, data in files.items():
        assert read_at(os.path.join(fs, name)) == data, name
    m.umount_fs(fs)
    m.detach(lun, dev)


def test_sigkill_loses_no_fsyncd_write_and_ext4_stays_clean(make_mount, ceph, pool, tmp_path):
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    fs = str(tmp_path / "fs")
    files = ext4_with_files(m, "disk", fs)
    m.kill9()                       # the daemon dies with the fs mounted on it
    m.start()
    assert any("did not end cleanly" in w for w in m.warnings) or \
        "did not end cleanly" in m.events(), m.events()
    ext4_intact(m, "disk", fs, files)
    # a raw LUN too: fsync'd writes survive a SIGKILL right after the fsync
    m.ok("create", "raw 16M")
    data = write_synced(m.path("luns", "raw"), 9 * MiB + 100, off=4096)
    m.kill9()
    m.start()
    assert read_at(m.path("luns", "raw"), 4096, len(data)) == data
    m.stop()
    fsck(m)


def test_addpack_from_the_shell_and_copies_between_local_and_rados(make_mount, ceph, client,
                                                                   pool, tmp_path):
    m = make_mount().init().start()     # a local pack `main`; the cluster from CEPH_CONF
    r = sh(f"CEPH_CONF={ceph.conf} && export CEPH_CONF && echo 'r rados {pool}' > "
           f"{m.path('ctl', 'addpack')}", check=False)
    # the daemon was started without CEPH_CONF and init named no cluster
    assert r.returncode != 0 and "Invalid argument" in r.stderr, r.stderr
    assert "no Ceph cluster named" in m.events()
    m.stop()
    m.start(env={"CEPH_CONF": ceph.conf})
    sh(f"echo 'r rados {pool}' > {m.path('ctl', 'addpack')}")
    assert disk_of(m, "r")["rados"]["pool"] == pool
    conf = array_conf(m)
    assert conf["ceph_conf"] == ceph.conf          # recorded for later mounts
    # a LUN on each pack; a plex shadow copy of each onto the other pack
    m.ok("create", "loc 24M")
    m.ok("create", "rem 24M pack=r")
    a = write_synced(m.path("luns", "loc"), 24 * MiB)
    b = write_synced(m.path("luns", "rem"), 24 * MiB)
    m.ok("snapshot", "loc set=to_r pack=r context=plex")
    m.ok("snapshot", "rem set=to_l pack=main context=plex")
    for jid in [j["id"] for j in m.status()["jobs"]]:
        m.wait_job(jid)
    assert read_at(m.path("snapshots", "to_r", "loc")) == a
    assert read_at(m.path("snapshots", "to_l", "rem")) == b
    # overwrite both LUNs, then resync each from the copy on the other pack:
    # reads are redirected at once, the background copy finishes
    write_synced(m.path("luns", "loc"), 8 * MiB, off=MiB)
    write_synced(m.path("luns", "rem"), 8 * MiB, off=2 * MiB)
    m.ok("resync", "to_r/loc")
    assert read_at(m.path("luns", "loc")) == a
    m.ok("resync", "to_l/rem")
    assert read_at(m.path("luns", "rem")) == b
    wait_for(lambda: all(j["state"] == "done" for j in m.status()["jobs"]), 120,
             "the resync copies")
    m.stop()
    m.start(env={"CEPH_CONF": ceph.conf})
    assert read_at(m.path("luns", "loc")) == a and read_at(m.path("luns", "rem")) == b
    # the rados pack's namespace holds segments; the local pack's disk too
    ns = disk_of(m, "r")["rados"]["namespace"]
    assert any(o.endswith(".seg") for o in objects(client, pool)[ns])
    m.stop()
    fsck(m)


def test_export_import_onto_a_rados_pack(make_mount, ceph, pool, tmp_path):
    src = make_mount("src").init().start()
    src.ok("create", "v 20M")
    data = write_synced(src.path("luns", "v"), 20 * MiB)
    src.ok("snapshot", "v set=s")
    stream = str(tmp_path / "s.fa")
    cli("export", "s", stream, mnt=src.mnt)
    dst = make_mount("dst").init("--pack", f"main=rados:{pool}",
                                 "--ceph-conf", ceph.conf).start()
    cli("import", stream, mnt=dst.mnt)
    assert read_at(dst.path("snapshots", "s", "v")) == data
    # incremental: the second import only adds what changed
    write_synced(src.path("luns", "v"), MiB, off=3 * MiB)
    src.ok("snapshot", "v set=s2")
    cli("export", "s2", stream + "2", "--base", "s", mnt=src.mnt)
    cli("import", stream + "2", mnt=dst.mnt)
    assert read_at(dst.path("snapshots", "s2", "v")) == read_at(src.path("snapshots", "s2", "v"))
    dst.stop()
    fsck(dst)


def test_bad_rados_packs_are_refused_with_an_errno_and_an_event(make_mount, ceph, client,
                                                                pool, tmp_path):
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    ns = disk_of(m, "main")["rados"]["namespace"]
    before = objects(client, pool)
    cases = [
        ("x rados no_such_pool", errno.ENOENT, "does not exist"),
        (f"x rados {pool}/{ns}", errno.EBUSY, "already a disk of this array"),
        ("x rados bad^pool", errno.EINVAL, "bad rados pack"),
        (f"x rados {pool} extra", errno.EINVAL, None),
        ("main rados " + pool, errno.EEXIST, "already exists"),
    ]
    for line, err, words in cases:
        got, reply = m.ctl("addpack", line)
        assert got == err, (line, got, reply)
        if words:
            assert words in reply.get("message", ""), (line, reply)
    ev = m.events()
    assert "does not exist" in ev and "bad rados pack" in ev
    # a namespace another array uses (a pack's label there) is refused
    with client.open_ioctx(pool) as io:
        io.set_namespace("other")
        io.write_full("fusearray-disk.json", b'{"array": "x", "pack": "p", "disk": 0}')
    got, reply = m.ctl("addpack", f"x rados {pool}/other")
    assert got == errno.EBUSY and "not empty" in reply["message"], reply
    # nothing was half made: the packs and the pool's objects are as before
    assert [p["name"] for p in m.status()["packs"]] == ["main"]
    after = objects(client, pool)
    after.pop("other")
    assert after == before
    m.stop()
    # init: the same checks, a one-line error, exit 1, no array left behind
    for spec, words in [("p=rados:no_such_pool", "does not exist"),
                        (f"p=rados:{pool}/other", "not empty"),
                        (f"p=rados:{pool},x", "bad rados pack")]:
        where = str(tmp_path / "new")
        r = cli("init", where, "--pack", spec, "--ceph-conf", ceph.conf, check=False)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, \
            (spec, r.stderr)
        assert not os.path.exists(where)
    # no cluster named at all (no --ceph-conf, no CEPH_CONF)
    env = {k: v for k, v in os.environ.items() if k != "CEPH_CONF"}
    r = run([PY, "-m", "fusearray", "init", str(tmp_path / "new"), "--pack", f"p=rados:{pool}"],
            check=False, env=env)
    assert r.returncode == 1 and "no Ceph cluster named" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "new")


def test_a_cluster_that_does_not_answer_leaves_its_pack_failed_not_the_array(
        make_mount, ceph, pool, tmp_path):
    """Like a disk that is gone at mount: the array comes up (its other
    packs serve), the rados pack is failed with an event that says the
    cluster does not answer, its LUNs fail reads with EIO (no hang); with
    the cluster back, `recover` brings it back whole."""
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    m.ok("addpack", f"loc single {tmp_path / 'locdisk'}")
    m.ok("create", "v 8M")
    m.ok("create", "w 8M pack=loc")
    data = write_synced(m.path("luns", "v"), 8 * MiB)
    other = write_synced(m.path("luns", "w"), 8 * MiB)
    m.stop()
    # the same cluster named by a conf whose monitors are on dead ports
    dead = str(tmp_path / "dead.conf")
    with open(ceph.conf) as f:
        text = f.read()
    for port in (ceph.mon_port, ceph.mon_v2_port):
        text = text.replace(f":{port}", f":{_closed_port()}")
    with open(dead, "w") as f:
        f.write(text)
    m.start(env={"CEPH_CONF": dead})
    pack = next(p for p in m.status()["packs"] if p["name"] == "main")
    assert pack["state"] == "failed" and pack["disks"][0]["state"] == "missing", pack
    assert pack["disks"][0]["rados"]["health"].startswith("unreachable"), pack
    assert "its cluster does not answer" in m.events()
    with pytest.raises(OSError) as e:
        read_at(m.path("luns", "v"), 0, 65536)
    assert e.value.errno == errno.EIO
    assert read_at(m.path("luns", "w")) == other       # the local pack serves
    m.stop()
    # the right cluster again: `recover` brings the pack back, nothing lost
    m.start()
    if next(p for p in m.status()["packs"] if p["name"] == "main")["state"] != "healthy":
        jid = m.ok("recover", "main").get("job")
        if jid:
            m.wait_job(jid)
    assert next(p for p in m.status()["packs"] if p["name"] == "main")["state"] == "healthy"
    assert read_at(m.path("luns", "v")) == data
    m.stop()
    fsck(m)


def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.daemon_errors(r"pool|ENOENT|No such file|I/O error|EIO|failed")
def test_the_pool_deleted_under_a_mounted_array_is_an_io_error_not_a_crash(
        make_mount, ceph, tmp_path):
    """The worst a cluster admin can do to a mounted array: delete its
    pool. The daemon stays up; the disk check finds the pack's disk gone;
    what was acknowledged but not stored is kept (intent log) and named;
    `sync all` and `umount` say so with EIO instead of pretending; `umount
    --discard` is the way out, as for a dead local disk."""
    pool = ceph.new_pool()
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    m.ok("create", "v 8M")
    write_synced(m.path("luns", "v"), 4 * MiB)
    m.ok("sync", "all")
    ceph.drop_pool(pool)
    fd = os.open(m.path("luns", "v"), os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(2 * MiB), 0)
        os.fsync(fd)                # durable in the (local) intent log: no error
    finally:
        os.close(fd)
    err, reply = m.ctl("sync", "all")
    assert err == errno.EIO and "acknowledged writes are not stored" in reply["message"], reply
    wait_for(lambda: m.status()["packs"][0]["state"] == "failed", 30, "the disk check")
    assert "is missing" in m.events()
    with pytest.raises(OSError) as e:     # stored blocks are gone with the pool
        read_at(m.path("luns", "v"), 3 * MiB, 65536)
    assert e.value.errno == errno.EIO
    r = cli("umount", m.mnt, check=False)
    assert r.returncode == 1 and "not stored" in r.stderr and "Traceback" not in r.stderr
    assert m.proc.poll() is None and os.path.ismount(m.mnt)
    r = cli("umount", "--discard", m.mnt, check=False)
    assert r.returncode == 0, r.stderr
    m.proc.wait(timeout=60)
    m.proc = None


def osd_reads(ceph) -> int:
    """The OSD's count of client read ops so far (its perf counter op_r,
    through its admin socket): what the pack asked of RADOS, counted by
    the cluster."""
    r = run(["ceph", "--admin-daemon", os.path.join(str(ceph.dir), "run", "osd.0.asok"),
             "perf", "dump"])
    return json.loads(r.stdout)["osd"]["op_r"]


def direct_reads(path: str, size: int, step: int = MiB) -> list:
    """The file read with O_DIRECT `step` bytes at a time (what fio and
    dd iflag=direct do): the bytes of each read, or the OSError it raised."""
    import mmap
    buf = mmap.mmap(-1, step)       # page-aligned, as O_DIRECT wants
    out = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in range(0, size, step):
            try:
                n = os.preadv(fd, [buf], off)
                out.append(bytes(buf[:n]))
            except OSError as e:
                out.append(e)
    finally:
        os.close(fd)
        buf.close()
    return out


def test_a_1m_read_is_one_rados_read_not_one_per_block(make_mount, ceph, pool):
    """The blocks of a request that lie together in a segment are read as
    one RADOS read (Reads.read_many_blocking), each still verified: 1 MiB
    read with O_DIRECT is one op on the OSD, not 16 of 64 KiB; the bytes
    are the ones written, aligned or not."""
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    m.ok("create", "v 32M")
    lun = m.path("luns", "v")
    data = write_synced(lun, 32 * MiB)
    m.stop()
    m.start()                   # nothing of it in the daemon's cache
    before = osd_reads(ceph)
    got = direct_reads(lun, 32 * MiB)
    ops = osd_reads(ceph) - before
    assert b"".join(got) == data
    # 32 requests: 32 reads, one more where a request crosses into the next
    # segment, a few of the disk check's (its label); block by block: 512
    assert ops <= 48, ops
    # unaligned and partial reads around block edges, and a whole-file cmp
    for off, n in [(65536 - 100, 200), (MiB + 4096, 3 * MiB + 100), (7, 65536 * 5 - 9),
                   (31 * MiB + 65536 * 15 + 1, 65535)]:
        assert read_at(lun, off, n) == data[off:off + n], (off, n)
    sh(f"dd if={lun} bs=1M iflag=direct status=none | cmp - <(head -c {32 * MiB} {lun})")
    assert read_at(lun) == data
    m.stop()
    fsck(m)


def test_a_block_corrupted_in_the_pool_is_eio_never_wrong_data(make_mount, ceph, client,
                                                               pool):
    """Bytes of one block overwritten in its segment object behind the
    daemon's back: the 1 MiB read that holds it fails with EIO (a rados
    pack has no copy to heal from), every other read of the LUN, the
    blocks beside it in the same run read included, gives the bytes
    written, and the event names the block."""
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    m.ok("create", "v 8M")
    lun = m.path("luns", "v")
    data = write_synced(lun, 8 * MiB)
    m.stop()
    ns = f"fusearray.{array_conf(m)['uuid']}.main"
    bad = 37                    # the 64 KiB block at 2 MiB + 320 KiB
    block = data[bad * 65536:(bad + 1) * 65536]
    with client.open_ioctx(pool) as io:
        io.set_namespace(ns)
        where = []
        for name in sorted(o.key for o in io.list_objects() if o.key.endswith(".seg")):
            body = io.read(name, io.stat(name)[0], 0)
            if block in body:
                where.append((name, body.index(block)))
        assert len(where) == 1, where
        name, at = where[0]
        io.write(name, bytes(b ^ 0x5A for b in block[1000:1100]), at + 1000)
    m.start()
    got = direct_reads(lun, 8 * MiB)
    for i, part in enumerate(got):
        if i == bad * 65536 // MiB:
            assert isinstance(part, OSError) and part.errno == errno.EIO, part
        else:
            assert part == data[i * MiB:(i + 1) * MiB], i
    # 64 KiB at a time: only that block fails
    got = direct_reads(lun, 8 * MiB, step=65536)
    assert [i for i, p in enumerate(got) if isinstance(p, OSError)] == [bad]
    assert all(p == data[i * 65536:(i + 1) * 65536] for i, p in enumerate(got) if i != bad)
    assert "does not match its hash" in m.events()
    m.stop()


@pytest.mark.array
async def test_a_dead_segment_being_read_stays_until_the_read_is_over(ceph, pool, tmp_path):
    """A collection frees a segment of a rados pack while a read of it is
    in flight (a copy job's batch, a LUN read: under the pack's reading
    guard): the read still gets every block, verified, and the object goes
    after the next commit once the read is over. A file held open keeps
    its bytes after an unlink; a RADOS object is gone when removed: before
    this, such a read failed, counted a checksum error against the disk,
    and ended the copy job (test_robust's copy job test on a rados pack)."""
    import trio

    from fusearray.array import init_array
    from fusearray.store.media import seg_name
    from test_core import with_array
    init_array(str(tmp_path / "arr"), [f"main=rados:{pool}"], ceph_conf=ceph.conf)

    async def body(a):
        vol = await a.create_lun("v", "8M")
        await vol.write(0, os.urandom(8 * MiB))
        await a.sync()
        pack = a.packs["main"]
        (seg,) = pack.segments()
        entries = await trio.to_thread.run_sync(pack.entries_in, seg)
        assert len(entries) > 100
        bids, locs = [b for b, _ in entries], [loc for _, loc in entries]
        medium = pack.disks[0].medium
        with pack.reading([seg]):
            await a.delete_lun("v")
            await a.collect_garbage()
            assert seg not in pack.segments()       # freed: nothing points into it
            got = await trio.to_thread.run_sync(pack.read_many_blocking, bids, locs)
            assert pack.hasher.block_ids(got) == bids
            assert all(pack.read_blocking(b, loc) for b, loc in zip(bids[:3], locs[:3]))
            assert medium.exists(seg_name(seg))
        await a.collect_garbage()                   # (a commit) removes it now
        assert not medium.exists(seg_name(seg))
        assert pack.disks[0].state == "online" and pack.disks[0].errors == 0
    await with_array(tmp_path / "arr", body)


def full_ratios(ceph, full: float, backfill: float, nearfull: float) -> None:
    env = dict(os.environ, CEPH_CONF=ceph.conf)
    for what, r in (("full", full), ("backfillfull", backfill), ("nearfull", nearfull)):
        run(["ceph", "osd", f"set-{what}-ratio", str(r)], env=env)


def pool_full(client, pool: str) -> bool:
    ret, out, _ = client.mon_command(json.dumps({"prefix": "osd dump", "format": "json"}),
                                     b"", timeout=10)
    assert ret == 0
    return "full" in next(p["flags_names"] for p in json.loads(out)["pools"]
                          if p["pool_name"] == pool).split(",")


@pytest.mark.daemon_errors(r"is full|ENOSPC|No space")
def test_a_full_cluster_is_enospc_and_writes_go_on_once_it_has_room(make_mount, ceph,
                                                                    client, pool):
    """The cluster's OSDs past their full ratio (the pool flagged full):
    a write to a LUN of a rados pack is refused with ENOSPC and an event
    saying the pack is full, nothing hangs or fails the pack; once the
    cluster has room again the same write and its fsync succeed, and
    everything fsync'd before and after is there after a remount."""
    m = make_mount().init("--pack", f"main=rados:{pool}", "--ceph-conf", ceph.conf).start()
    m.ok("create", "v 32M")
    lun = m.path("luns", "v")
    first = write_synced(lun, 8 * MiB)
    try:
        full_ratios(ceph, 0.000001, 0.0000008, 0.0000005)
        wait_for(lambda: pool_full(client, pool), 60, "the pool to be flagged full")
        # (the pack reads the cluster's space at its disk checks, every few seconds)
        wait_for(lambda: next(p for p in m.status()["packs"] if p["name"] == "main")
                 ["free_bytes"] < MiB, 60, "the pack to see the cluster full")
        r = sh(f"dd if=/dev/urandom of={lun} bs=1M count=8 seek=8 conv=fsync,notrunc "
               "status=none", check=False)
        assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
        assert "is full" in m.events(), m.events()[-2000:]
        assert disk_of(m, "main")["state"] == "online"
        # ctl/status says what is free, not only "used 8.0M of 2.1K"
        line = next(l for l in m.view("status").splitlines() if l.startswith("  main:"))
        assert re.search(r"used \S+ of \S+, \S+ free", line), line
    finally:
        full_ratios(ceph, 0.95, 0.90, 0.85)
    wait_for(lambda: not pool_full(client, pool), 60, "the pool to have room")
    second = wait_for(lambda: _try_write(lun, 8 * MiB), 60, "a write to succeed again")
    assert read_at(lun, 0, 8 * MiB) == first
    m.stop()
    m.start()
    assert read_at(lun, 0, 8 * MiB) == first
    assert read_at(lun, 8 * MiB, len(second)) == second


def _try_write(lun: str, off: int):
    """write_synced at `off`, or None if it fails (ENOSPC until the pack
    learns the cluster has room: its space is read every few seconds)."""
    try:
        return write_synced(lun, 4 * MiB, off=off)
    except OSError:
        time.sleep(0.5)
        return None
