"""Against a real mount (daemon in a subprocess): what users do from a shell."""
import errno
import json
import mmap
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import PY, cli, drop_caches, read_at, run, wait_for, write_synced
from fallbacks import INTERPOSER, punch_hole

MiB = 1 << 20
WWN_RE = re.compile(r"naa\.6[0-9a-f]{31}\Z")


def sh(script: str, check=True) -> subprocess.CompletedProcess:
    return run(["bash", "-c", script], check=check)


def lun_status(m, name) -> dict:
    return next(v for v in m.status()["luns"] if v["name"] == name)


def synced(m, name):
    """fsync the LUN (commit), return its status row."""
    fd = os.open(m.path("luns", name), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return lun_status(m, name)


def test_random_io_against_model(mount):
    m = mount
    m.ok("create", "lun0 8M")
    size = 8 * MiB
    model = bytearray(size)
    rng = random.Random(42)
    fds = [os.open(m.path("luns", "lun0"), os.O_RDWR) for _ in range(3)]
    try:
        for i in range(400):
            fd = rng.choice(fds)
            off = rng.randrange(size)
            n = rng.choice([1, 511, 512, 4096, 65535, 65536, 65537, 200000])
            if rng.random() < 0.6:
                data = os.urandom(n)
                done = os.pwrite(fd, data, off)
                assert done == min(n, size - off)
                model[off:off + done] = data[:done]
            else:
                assert os.pread(fd, n, off) == bytes(model[off:off + n])
            if i % 97 == 0:
                os.fsync(fd)
        assert os.pread(fds[0], size, 0) == bytes(model)
    finally:
        for fd in fds:
            os.close(fd)
    # the same through dd and cmp, as a user would
    img = m.base / "img"
    img.write_bytes(bytes(model))
    run(["cmp", str(img), m.path("luns", "lun0")])


def test_block_device_end_semantics(mount):
    m = mount
    m.ok("create", "dev 1M")
    p = m.path("luns", "dev")
    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"a" * 100, MiB - 40) == 40          # short at the end
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"b", MiB)                               # at the end
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"b", MiB + 4096)                        # past the end
        assert e.value.errno == errno.ENOSPC
        assert os.pread(fd, 100, MiB - 40) == b"a" * 40            # read what lies before
        assert os.pread(fd, 100, MiB) == b""
    finally:
        os.close(fd)
    os.truncate(p, 0)
    assert os.stat(p).st_size == MiB
    with open(p, "r+b") as f:
        f.truncate(10)
    assert os.stat(p).st_size == MiB
    # cp of an image and dd with O_TRUNC keep the size and land the bytes
    img = m.base / "disk.img"
    img.write_bytes(os.urandom(MiB // 2))
    run(["cp", str(img), p])
    assert os.stat(p).st_size == MiB
    run(["cmp", "-n", str(MiB // 2), str(img), p])
    sh(f"dd if={img} of={p} bs=64k status=none")
    assert os.stat(p).st_size == MiB
    # a write bigger than the LUN is short; dd reports the error and stops
    big = m.base / "big.img"
    big.write_bytes(os.urandom(MiB + 65536))
    r = run(["dd", f"if={big}", f"of={p}", "bs=64k", "status=none", "conv=notrunc"],
            check=False)
    assert r.returncode != 0 and "No space left" in r.stderr
    run(["cmp", "-n", str(MiB), str(big), p])


def test_ctl_verbs_from_the_shell(mount):
    m = mount
    r = sh(f"echo 'lun0 1G' > {m.mnt}/ctl/create && echo 'lun0 2G' > {m.mnt}/ctl/resize "
           f"&& stat -c %s {m.mnt}/luns/lun0")
    assert r.stdout.strip() == str(2 << 30)
    # the reply on the same descriptor
    r = sh(f"exec 3<>{m.mnt}/ctl/create; echo 'lun1 64M' >&3; cat <&3; exec 3>&-")
    assert r.stdout.splitlines()[0] == "status=ok" and "lun=lun1" in r.stdout
    assert "wwn=naa.6" in r.stdout
    r = sh(f"echo lun1 > {m.mnt}/ctl/delete; ls {m.mnt}/luns")
    assert r.stdout.split() == ["lun0"]
    # failure: the shell sees the errno, the reply and the event tell why
    r = sh(f"echo 'lun0 1G' > {m.mnt}/ctl/create", check=False)
    assert r.returncode != 0 and "File exists" in r.stderr
    r = sh(f"exec 3<>{m.mnt}/ctl/create; echo 'lun0 1G' >&3; cat <&3", check=False)
    assert "status=error" in r.stdout and "errno=EEXIST" in r.stdout
    assert "already exists" in r.stdout
    assert "create lun0 1G: a LUN named lun0 already exists [EEXIST]" in m.events()


def test_ctl_errnos_change_nothing(mount):
    m = mount
    m.ok("create", "a 16M")
    before = m.status()["luns"]
    cases = [
        ("create", "bad/name 1G", errno.EINVAL),
        ("create", "x 1001", errno.EINVAL),
        ("create", "x 1G color=red", errno.EINVAL),
        ("create", "x", errno.EINVAL),
        ("create", "a 1G", errno.EEXIST),
        ("create", "x 1G pack=nope", errno.ENOENT),
        ("create", "x 4096T", errno.ENOSPC),
        ("delete", "nope", errno.ENOENT),
        ("resize", "nope 1G", errno.ENOENT),
        ("resize", "a 1G force=maybe", errno.EINVAL),
        ("readonly", "a sideways", errno.EINVAL),
        ("addpack", f"m2 mirror {m.base}/d1", errno.EINVAL),              # one disk
        ("addpack", f"m2 mirror {m.base}/d1,{m.base}/d1", errno.EINVAL),  # same twice
        ("addpack", f"m2 raid5 {m.base}/d1,{m.base}/d2", errno.EINVAL),   # too few
        ("addpack", "m2 zigzag /tmp/x", errno.EINVAL),
    ]
    for verb, line, want in cases:
        err, reply = m.ctl(verb, line)
        assert err == want, (verb, line, err, reply)
        assert reply["status"] == "error" and reply["errno"] == errno.errorcode[want]
        assert reply["message"] and "\n" not in reply["message"]
        assert reply["message"] in m.events()
    # open LUN: delete and shrink are EBUSY unless force=yes
    fd = os.open(m.path("luns", "a"), os.O_RDWR)
    try:
        assert m.ctl("delete", "a")[0] == errno.EBUSY
        assert m.ctl("resize", "a 8M")[0] == errno.EBUSY
        assert m.status()["luns"] == [dict(before[0], open=1)]
        m.ok("resize", "a 32M")                      # growing an open LUN is fine
    finally:
        os.close(fd)
    assert lun_status(m, "a")["size"] == 32 * MiB
    # read-only: EROFS for writes, opens for writing, resize
    m.ok("readonly", "a on")
    assert oct(os.stat(m.path("luns", "a")).st_mode & 0o777) == "0o440"
    with pytest.raises(OSError) as e:
        os.open(m.path("luns", "a"), os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    assert m.ctl("resize", "a 64M")[0] == errno.EROFS
    m.ok("readonly", "a off")
    fd = os.open(m.path("luns", "a"), os.O_WRONLY)
    os.close(fd)


def test_cli_verbs_and_status(mount):
    m = mount
    cli("create", "lun0", "1G", mnt=m.mnt)
    cli("resize", "lun0", "2G", mnt=m.mnt)
    r = cli("create", "lun0", "1G", mnt=m.mnt, check=False)
    assert r.returncode == 1 and "already exists" in r.stderr and "EEXIST" in r.stderr
    st = json.loads(cli("status", "--json", mnt=m.mnt).stdout)
    assert [v["name"] for v in st["luns"]] == ["lun0"] and st["luns"][0]["size"] == 2 << 30
    for key in ("packs", "luns", "sets", "jobs"):
        assert key in st
    p = st["packs"][0]
    assert p["name"] == "main" and p["layout"] == "single" and p["state"] == "healthy"
    assert p["disks"][0]["state"] == "online" and p["capacity_bytes"] > 0
    txt = cli("status", mnt=m.mnt).stdout
    assert "lun0" in txt and "main: single healthy" in txt
    assert "created LUN lun0" in cli("events", mnt=m.mnt).stdout
    env = dict(os.environ, FUSEARRAY_MOUNT=m.mnt)
    r = subprocess.run(["python", "-m", "fusearray", "delete", "lun0"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(m.path("luns")) == []


def test_identity_xattrs_unique_never_reused(mount):
    m = mount
    seen = set()
    for i in range(3):
        m.ok("create", f"l{i} 1M")
    r = run(["getfattr", "-d", m.path("luns", "l0")]).stdout
    for key in ("wwn", "serial", "kind", "pack", "readonly", "hidden"):
        assert f"user.fusearray.{key}=" in r
    for i in range(3):
        p = m.path("luns", f"l{i}")
        wwn = os.getxattr(p, "user.fusearray.wwn").decode()
        assert WWN_RE.match(wwn), wwn
        assert os.getxattr(p, "user.fusearray.kind") == b"lun"
        assert os.getxattr(p, "user.fusearray.pack") == b"main"
        seen.add(wwn)
    assert len(seen) == 3
    m.ok("delete", "l2")
    m.ok("create", "l2 1M")
    again = os.getxattr(m.path("luns", "l2"), "user.fusearray.wwn").decode()
    assert again not in seen
    with pytest.raises(OSError) as e:
        os.setxattr(m.path("luns", "l0"), "user.fusearray.wwn", b"naa.60")
    assert e.value.errno == errno.EPERM
    # identity survives a restart
    wwn0 = os.getxattr(m.path("luns", "l0"), "user.fusearray.wwn")
    m.stop()
    m.start()
    assert os.getxattr(m.path("luns", "l0"), "user.fusearray.wwn") == wwn0


def test_thin_allocation_punch_and_du(mount):
    m = mount
    m.ok("create", "thin 1G")
    p = m.path("luns", "thin")
    assert os.stat(p).st_blocks == 0
    assert lun_status(m, "thin")["allocated_bytes"] == 0
    sh(f"dd if=/dev/urandom of={p} bs=1M count=8 seek=100 conv=notrunc,fsync status=none")
    row = synced(m, "thin")
    assert row["allocated_bytes"] == 8 * MiB
    assert os.stat(p).st_blocks * 512 == 8 * MiB
    du = int(run(["du", "-k", p]).stdout.split()[0])
    assert du == 8 * 1024
    # zeros take no space
    sh(f"dd if=/dev/zero of={p} bs=1M count=8 seek=300 conv=notrunc,fsync status=none")
    assert synced(m, "thin")["allocated_bytes"] == 8 * MiB
    # punch a hole: those blocks read zeros and are freed (without the
    # interposer: EOPNOTSUPP, then zeros written, see tests/fallbacks.py)
    punch_hole(p, 100 * MiB, 4 * MiB)
    with open(m.path("ctl", "events")) as f:
        events = f.read()
    native_line = [ln for ln in events.splitlines() if "native:" in ln]
    assert native_line, "no native: event at mount"
    if INTERPOSER:
        assert "libfuse interposer on" in native_line[-1], native_line
    else:       # the daemon said why punch-hole fails, and what to do instead
        assert "libfuse interposer off" in native_line[-1], native_line
        assert "fallocate (punch-hole, discard) is not available" in events
        assert "FUSEARRAY_NATIVE=0" in events and "Write zeros" in events
    with open(p, "rb") as f:
        f.seek(100 * MiB)
        assert f.read(4 * MiB) == bytes(4 * MiB)
        assert f.read(4 * MiB) != bytes(4 * MiB)
    assert synced(m, "thin")["allocated_bytes"] == 4 * MiB
    assert os.stat(p).st_blocks * 512 == 4 * MiB


def test_dedup_visible_in_physical_usage(mount):
    m = mount
    m.ok("create", "a 64M")
    m.ok("create", "b 64M")
    pattern = m.base / "pattern"
    pattern.write_bytes(os.urandom(16 * MiB))
    sh(f"dd if={pattern} of={m.path('luns', 'a')} bs=1M conv=notrunc,fsync status=none")
    used1 = m.status()["packs"][0]["used_bytes"]
    assert used1 >= 16 * MiB
    sh(f"dd if={pattern} of={m.path('luns', 'b')} bs=1M conv=notrunc,fsync status=none")
    sh(f"dd if={pattern} of={m.path('luns', 'b')} bs=1M seek=32 conv=notrunc,fsync status=none")
    used2 = m.status()["packs"][0]["used_bytes"]
    assert used2 - used1 < MiB, (used1, used2)          # 32 MiB more written, ~0 stored
    assert synced(m, "b")["allocated_bytes"] == 32 * MiB
    run(["cmp", str(pattern), m.path("luns", "b"), "-n", str(16 * MiB)])


def test_persistence_across_umount_mount(mount):
    m = mount
    m.ok("create", "p 32M")
    m.ok("create", "q 4M")
    data = os.urandom(20 * MiB)
    img = m.base / "img"
    img.write_bytes(data)
    sh(f"dd if={img} of={m.path('luns', 'p')} bs=1M seek=3 conv=notrunc status=none")
    m.ok("readonly", "q on")
    m.ok("hidden", "q on")
    m.stop()                                     # clean unmount commits everything
    m.start()
    with open(m.path("luns", "p"), "rb") as f:
        assert f.read(3 * MiB) == bytes(3 * MiB)
        assert f.read(20 * MiB) == data
    assert os.listdir(m.path("luns")) == ["p"]              # q is hidden
    assert not os.path.exists(m.path("luns", "q"))
    q = lun_status(m, "q")
    assert q["hidden"] and q["readonly"]
    m.ok("hidden", "q off")
    assert sorted(os.listdir(m.path("luns"))) == ["p", "q"]
    with pytest.raises(OSError) as e:
        open(m.path("luns", "q"), "r+b")
    assert e.value.errno == errno.EROFS


def test_resize_visible_at_once(mount):
    m = mount
    m.ok("create", "r 16M")
    p = m.path("luns", "r")
    with open(p, "r+b") as f:
        f.write(b"z" * MiB)
    assert os.stat(p).st_size == 16 * MiB
    m.ok("resize", "r 48M")
    assert os.stat(p).st_size == 48 * MiB
    m.ok("resize", "r 512K")
    assert os.stat(p).st_size == 512 * 1024
    m.ok("resize", "r 2M")
    with open(p, "rb") as f:
        data = f.read()
    assert data == b"z" * (512 * 1024) + bytes(2 * MiB - 512 * 1024)


def test_mount_errors_and_stale_mountpoint(make_mount, tmp_path):
    m = make_mount()
    # not an array
    (tmp_path / "notarray").mkdir()
    r = cli("mount", str(tmp_path / "notarray"), m.mnt, "--background", check=False)
    assert r.returncode == 1 and "not a fusearray array" in r.stderr
    assert not os.path.ismount(m.mnt)
    r = cli("init", str(tmp_path / "notempty"), check=False)
    assert r.returncode == 0
    r = cli("init", str(tmp_path / "notempty"), check=False)
    assert r.returncode == 1 and "already an array" in r.stderr
    m.init().start()
    m.ok("create", "l 4M")
    # the same array twice
    other = tmp_path / "mnt2"
    other.mkdir()
    r = cli("mount", m.array, str(other), "--background", check=False)
    assert r.returncode == 1 and "already mounted" in r.stderr
    assert not os.path.ismount(other)
    # a killed daemon leaves a stale mountpoint; the next mount clears it
    m.proc.kill()
    m.proc.wait()
    m.proc = None
    with pytest.raises(OSError) as e:
        os.stat(m.mnt)
    assert e.value.errno == errno.ENOTCONN
    m.start()
    assert os.listdir(m.path("luns")) == ["l"]
    with open("/proc/mounts") as f:
        assert sum(1 for line in f if line.split()[1] == m.mnt) == 1


def test_handler_errors_never_unmount(mount):
    """Bad requests get errnos; the mount stays up."""
    m = mount
    with pytest.raises(OSError) as e:
        open(m.path("luns", "nope"))
    assert e.value.errno == errno.ENOENT
    with pytest.raises(OSError):
        open(m.path("ctl", "status"), "w")
    with pytest.raises(OSError) as e:
        os.mkdir(m.path("luns", "dir"))
    with pytest.raises(OSError):
        os.unlink(m.path("ctl", "create"))
    r = sh(f"printf '\\xff\\xfe\\n' > {m.mnt}/ctl/create", check=False)
    assert r.returncode != 0
    assert "not valid UTF-8" in m.events()
    assert os.path.ismount(m.mnt) and m.proc.poll() is None
    m.ok("create", "still 1M")


def test_up_brings_up_default_array(tmp_path):
    """The README's main command, pointed at a temporary place."""
    from conftest import require_fuse
    require_fuse()
    arr, mnt = tmp_path / "arr", tmp_path / "mnt"
    pid = None
    try:
        r = cli("up", "--array", str(arr), "--mountpoint", str(mnt))
        assert "created LUN lun0" in r.stdout and "Next steps" in r.stdout
        pid = json.loads((mnt / "ctl" / "status.json").read_text())["pid"]
        assert os.stat(mnt / "luns" / "lun0").st_size == 1 << 30
        r = cli("up", "--array", str(arr), "--mountpoint", str(mnt))   # idempotent
        assert "already mounted" in r.stdout
        cli("umount", str(mnt))
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        if pid and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 9)


def test_fsck_tool_finds_corruption(make_mount):
    m = make_mount()
    m.init().start()
    m.ok("create", "l 4M")
    sh(f"dd if=/dev/urandom of={m.path('luns', 'l')} bs=1M count=2 conv=notrunc,fsync status=none")
    m.stop()
    fsck = [os.sys.executable, "tools/fsck", m.array]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = run(fsck + ["--strict"], cwd=root)
    assert "0 problem(s)" in r.stdout
    segdir = os.path.join(m.array, "disks", "main.0", "segments")
    seg = os.path.join(segdir, sorted(os.listdir(segdir))[0])
    with open(seg, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    r = run(fsck, cwd=root, check=False)
    assert r.returncode == 1 and "does not match its hash" in r.stdout
    # the mount reports the rot as EIO and an event, never as data
    m.start()
    fd = os.open(m.path("luns", "l"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 2 * MiB, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert "does not match its hash" in m.events()


@pytest.mark.parametrize("layout", ["single", "mirror"])
def test_concurrent_large_direct_reads_with_a_small_cache(make_mount, tmp_path, layout):
    """Large O_DIRECT reads bypass the cache and are assembled in pooled
    buffers; with a 4 MiB cache most blocks come from the store. The page
    cache is dropped all along, so reads miss it and go to a worker thread:
    the requests interleave. Several readers at once, over blocks that are
    cached dirty, cached clean, zero or only in the store (offsets not
    aligned to blocks), must each get their own bytes."""
    import mmap
    import threading
    m = make_mount(cache_size=4 * MiB)
    m.init().start()
    size = 32 * MiB
    pack = "main"
    if layout == "mirror":
        disks = [str(tmp_path / d) for d in ("m1", "m2")]
        m.ok("addpack", f"mir mirror {','.join(disks)}")
        pack = "mir"
    m.ok("create", f"big {size} pack={pack}")
    lun = m.path("luns", "big")
    rng = random.Random(7)
    model = bytearray(rng.randbytes(size))
    model[5 * MiB:6 * MiB] = bytes(MiB)              # a zero range: never stored
    with open(lun, "r+b") as f:
        f.write(model)
        os.fsync(f.fileno())
        # some blocks dirty again in the cache, one partly
        for off in (3 * MiB + 100, 17 * MiB):
            piece = rng.randbytes(70000)
            f.seek(off)
            f.write(piece)
            model[off:off + len(piece)] = piece
        f.flush()
    errors = []

    def reader(seed):
        r = random.Random(seed)
        buf = mmap.mmap(-1, 3 * MiB)                   # page-aligned, for O_DIRECT
        fd = os.open(lun, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(60):
                n = r.choice([128 << 10, MiB, 3 * MiB])
                off = r.randrange(0, (size - n) // 4096) * 4096
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
                if buf[:got] != model[off:off + got] or got != n:
                    errors.append((seed, off, n, got))
        finally:
            os.close(fd)
            buf.close()

    stop = threading.Event()

    def dropper():
        while not stop.is_set():
            drop_caches()
            stop.wait(0.01)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    drop = threading.Thread(target=dropper)
    drop.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        drop.join()
    assert not errors, errors[:3]
    img = m.base / "img"
    img.write_bytes(bytes(model))
    run(["cmp", str(img), lun])


def test_events_survive_sigkill(mount):
    """Events reach the catalogue at a commit; one logged just before a
    SIGKILL (here: a refused command, which commits nothing) is still in
    ctl/events after the restart, once, with what came before."""
    m = mount
    m.ok("create", "a 16M")
    err, _ = m.ctl("delete", "no-such-lun-4711")
    assert err == errno.ENOENT
    with open(m.path("ctl", "events")) as f:
        assert "no-such-lun-4711" in f.read()
    m.kill9()
    m.start()
    with open(m.path("ctl", "events")) as f:
        text = f.read()
    assert text.count("error delete no-such-lun-4711") == 1, text
    assert "created LUN a" in text
    assert "recovered 1 event(s)" in text, text
    # and a clean restart neither loses nor repeats them
    m.stop()
    m.start()
    with open(m.path("ctl", "events")) as f:
        assert f.read().count("error delete no-such-lun-4711") == 1


@pytest.mark.parametrize("async_replies", ["1", "0"])
def test_parallel_large_reads_are_answered_from_the_reply_thread(make_mount, monkeypatch,
                                                                 async_replies):
    """With several 1 MiB O_DIRECT reads in flight the shim sends their
    replies from its own thread (_fuseshim.c); every byte must still be the
    right one. FUSEARRAY_ASYNC_REPLY=0 turns it off (the count shows 0).
    Either way the replies are gathered from the blocks where they lie in
    the store's mapped files (reply_plan), block-aligned or not."""
    import threading
    monkeypatch.setenv("FUSEARRAY_ASYNC_REPLY", async_replies)
    m = make_mount()
    m.init().start()
    m.ok("create", "vol 48M")
    data = os.urandom(48 * MiB)
    lun = m.path("luns", "vol")
    with open(lun, "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    bad = []

    def reader(part):
        fd = os.open(lun, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)            # page-aligned for O_DIRECT
        try:
            for shift in (0, 4096, 0):          # 4 KiB in: partial end blocks
                for off in range(part * 12 * MiB + shift, (part + 1) * 12 * MiB - MiB + 1, MiB):
                    if os.preadv(fd, [buf], off) != MiB or buf[:] != data[off:off + MiB]:
                        bad.append(off)
        finally:
            buf.close()
            os.close(fd)
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == [], f"wrong data at offsets {bad[:5]}"
    m.stop()
    with open(os.path.join(m.array, "daemon.log")) as f:
        log = f.read()
    counts = re.findall(r"(\d+) read replies were sent by the shim's reply thread", log)
    if not INTERPOSER:      # FUSEARRAY_NATIVE=0: pyfuse3 sent every reply itself
        assert not counts and "libfuse interposer off" in log, "the interposer was used"
        return
    assert counts, "the daemon did not log its reply count"
    gathered = re.findall(r"(\d+) read replies were gathered from several buffers", log)
    assert gathered and int(gathered[-1]) >= 4 * 12, "reads were not gathered (reply_plan)"
    if async_replies == "1":
        assert int(counts[-1]) > 0, "no reply went through the reply thread"
    else:
        assert int(counts[-1]) == 0


def test_small_random_writes_read_nothing_until_the_write_back(mount, tmp_path):
    """#15 point 3: 4 KiB writes into 64 KiB blocks are absorbed (no block
    read from the pack to acknowledge them); the read-modify-write happens
    at write-back, once per block; what is read back, before and after a
    remount, is the model."""
    m = mount
    m.ok("create", "lun0 16M")
    size, bs = 16 * MiB, 64 * 1024
    lun = m.path("luns", "lun0")
    model = tmp_path / "model"
    sh(f"head -c {size} /dev/urandom > {model}")
    sh(f"dd if={model} of={lun} bs=1M conv=notrunc status=none")
    synced(m, "lun0")
    before = m.status()["cache"]
    rng = random.Random(15)
    touched = set()
    fd = os.open(lun, os.O_WRONLY)
    mfd = os.open(model, os.O_WRONLY)
    try:
        for _ in range(400):
            off = rng.randrange(size // 512 - 8) * 512
            data = rng.randbytes(4096)
            assert os.pwrite(fd, data, off) == 4096
            os.pwrite(mfd, data, off)
            touched.update({off // bs, (off + 4095) // bs})
    finally:
        os.close(fd)
        os.close(mfd)
    after = m.status()["cache"]
    assert after["write_loads"] == before["write_loads"], (before, after)
    assert after["completed_for_read"] == before["completed_for_read"], (before, after)
    assert after["absorbed_writes"] > before["absorbed_writes"]
    drop_caches()
    sh(f"cmp {lun} {model}")
    synced(m, "lun0")
    done = m.status()["cache"]
    completed = sum(done[k] - before[k] for k in ("completed_at_flush", "completed_for_read"))
    assert 0 < completed <= len(touched), (before, done, len(touched))
    assert done["write_loads"] == before["write_loads"]
    m.stop()
    m.start()
    sh(f"cmp {lun} {model}")


def test_a_partly_written_block_reads_merged_before_any_flush(mount):
    m = mount
    m.ok("create", "lun0 1M")
    bs = 64 * 1024
    base = os.urandom(1 * MiB)
    fd = os.open(m.path("luns", "lun0"), os.O_RDWR)
    try:
        os.pwrite(fd, base, 0)
        m.ok("sync", "all")     # stored and out of the cache (an fsync only logs it)
        before = m.status()["cache"]
        model = bytearray(base)
        for off, n in ((3 * bs + 1000, 100), (3 * bs + 5000, 4096), (4 * bs - 10, 20)):
            data = os.urandom(n)
            os.pwrite(fd, data, off)
            model[off:off + n] = data
        # inside what was written: from the entry alone; across it: merged with the stored
        assert os.pread(fd, 100, 3 * bs + 1000) == model[3 * bs + 1000:3 * bs + 1100]
        assert m.status()["cache"]["completed_for_read"] == before["completed_for_read"]
        assert os.pread(fd, 3 * bs, 2 * bs) == model[2 * bs:5 * bs]
        assert os.pread(fd, 1 * MiB, 0) == model
        mid = m.status()["cache"]
        assert mid["write_loads"] == before["write_loads"]
        # blocks 3 and 4, once each (by these reads, or by a write-back between)
        assert sum(mid[k] - before[k] for k in ("completed_for_read",
                                                "completed_at_flush")) == 2, (before, mid)
        os.fsync(fd)
        assert os.pread(fd, 1 * MiB, 0) == model
    finally:
        os.close(fd)


def test_an_unreadable_catalogue_refuses_the_mount_with_what_to_do(tmp_path):
    """catalogue.db damaged (its header overwritten): `fusearray mount`
    exits 1 naming the catalogue and what to do, no traceback, nothing
    mounted, no daemon left; put back, the array mounts."""
    from conftest import require_fuse
    require_fuse()
    array, mnt = tmp_path / "a", tmp_path / "m"
    mnt.mkdir()
    cli("init", str(array))
    db = array / "catalogue.db"
    good = db.read_bytes()
    db.write_bytes(b"\0" * 100 + good[100:])
    r = cli("mount", str(array), str(mnt), "--background", check=False)
    assert r.returncode == 1, r
    assert "the catalogue cannot be read" in r.stderr and "restore it" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr, r.stderr
    log = (array / "daemon.log").read_text() if (array / "daemon.log").exists() else ""
    assert "Traceback" not in log, log
    assert not os.path.ismount(mnt) and not (array / "running").exists()
    db.write_bytes(good)
    cli("mount", str(array), str(mnt), "--background")
    try:
        assert os.path.ismount(mnt)
    finally:
        cli("umount", str(mnt))


def test_a_refused_foreground_mount_says_why(make_mount, tmp_path):
    """`fusearray mount ARRAY MNT` runs in the foreground: a refusal at
    open (here: the array is mounted already) used to exit 1 saying
    nothing; it says why on stderr, as --background does."""
    m = make_mount().init()
    m.start()
    try:
        other = tmp_path / "other"
        other.mkdir()
        for bg in ((), ("--background",)):
            r = run([PY, "-m", "fusearray", "mount", *bg, m.array, str(other)], check=False,
                    timeout=60)
            assert r.returncode == 1, r
            assert "is already mounted" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert not os.path.ismount(other)
    finally:
        m.stop()


def test_an_array_directory_with_no_room_for_the_intent_log(make_mount, tmp_path):
    """The array directory's file system cannot hold the intent log (two
    8 MiB slots; here a 4 MiB tmpfs): the mount is refused with ENOSPC
    saying so and what to do (the daemon used to die of an "unexpected
    error" with a traceback), nothing half-made is left there; `--log DIR`
    on another file system then works at once (the log moves: nothing in
    the old place to replay), is recorded, and the data is there after a
    remount; a filter that would not fit is not kept there."""
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)])
    m = None
    try:
        (tmp_path / "pack").mkdir()
        m = make_mount(array=small / "a")
        m.init("--pack", f"main=single:{tmp_path / 'pack'}")
        r = run([PY, "-m", "fusearray", "mount", m.array, m.mnt], check=False, timeout=60)
        assert r.returncode == 1 and not os.path.ismount(m.mnt), r
        assert "the intent log cannot be made in" in r.stderr and "--log DIR" in r.stderr
        assert "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr
        assert not [n for n in os.listdir(os.path.join(m.array, "log"))], "left behind"
        with pytest.raises(AssertionError, match="its file system is full"):
            m.start()
        logs = tmp_path / "logs"
        logs.mkdir()
        m.start("--log", str(logs))
        assert "the intent log is now in" in m.events()
        cli("create", "l", "8M", mnt=m.mnt)
        data = os.urandom(4 * MiB)
        with open(m.path("luns", "l"), "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        m.kill9()
        m.start()                           # (array.json names the log's directory)
        with open(m.path("luns", "l"), "rb") as f:
            assert f.read(len(data)) == data
        m.stop()
        assert not [n for n in os.listdir(m.array) if n.startswith("dedup-filter")]
        with open(os.path.join(m.array, "array.json")) as f:
            assert json.load(f)["log_dir"] == str(logs)
    finally:
        if m is not None:
            m.close()
        run(["umount", str(small)], check=False)


def test_a_full_catalogue_file_system_puts_commits_off_and_they_resume(make_mount, tmp_path):
    """The array directory's file system fills up while mounted (the
    packs elsewhere): a commit no longer fails SQLite's transaction and
    stops the array (it had to be unmounted with --discard and mounted
    again); commits wait instead: fsync still works (the intent log), a
    command is refused with ENOSPC before it changes anything, `sync all`
    says why, one error event; space freed, commits resume by themselves
    and the same command works; `umount` is refused while full, `umount
    --discard` works, and every fsync'd byte is there after the next
    mount, fsck clean."""
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)])
    m = None
    filler = small / "filler"

    def fill():
        st = os.statvfs(small)
        with open(filler, "ab") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(filler)
                               + st.f_bavail * st.f_frsize - 256 * 1024)
    try:
        (tmp_path / "pack").mkdir()
        m = make_mount(array=small / "a")
        m.init("--pack", f"main=single:{tmp_path / 'pack'}")
        m.start()
        m.ok("create", "l 64M")
        lun = m.path("luns", "l")
        first = os.urandom(4 * MiB)
        with open(lun, "r+b") as f:
            f.write(first)
            f.flush()
            os.fsync(f.fileno())
        m.ok("snapshot", "l set=s0")
        stream = str(tmp_path / "s0.fas")
        cli("export", "s0", stream, mnt=m.mnt)
        m.ok("sync", "all")
        fill()
        second = os.urandom(MiB)
        with open(lun, "r+b") as f:                 # acknowledged: the intent log
            f.seek(4 * MiB)
            f.write(second)
            f.flush()
            os.fsync(f.fileno())
        rc, reply = m.ctl("snapshot", "l set=s1")
        assert rc == errno.ENOSPC, (rc, reply)
        assert "s1" not in [s["name"] for s in m.status()["sets"]]     # nothing half done
        r = cli("import", stream, "--as", "s9", "--remap", mnt=m.mnt, check=False)
        assert r.returncode == 1 and "catalogue's storage is full" in r.stderr, r.stderr
        for _ in range(3):      # through a pipe: the daemon reads ahead while it checks
            r = run(["bash", "-c", f"cat {stream} | {PY} -m fusearray -m {m.mnt} import - "
                                   "--as s9 --remap"], check=False)
            assert r.returncode == 1 and "catalogue's storage is full" in r.stderr, r.stderr
        assert "s9" not in [s["name"] for s in m.status()["sets"]]
        assert m.status()["jobs"] == [], m.status()["jobs"]         # nothing staged
        r = cli("sync", "all", mnt=m.mnt, check=False)
        assert r.returncode == 1 and "catalogue's storage is full" in r.stderr, r.stderr
        assert m.events().count("error the catalogue's storage is full") == 1   # (said once)
        with open(lun, "rb") as f:
            assert f.read(5 * MiB) == first + second
        os.unlink(filler)                            # room again: commits resume
        wait_for(lambda: "commits resume" in m.events(), 30, "commits to resume")
        m.ok("snapshot", "l set=s1")
        m.ok("sync", "all")
        fill()
        third = os.urandom(MiB)
        with open(lun, "r+b") as f:
            f.seek(5 * MiB)
            f.write(third)
            f.flush()
            os.fsync(f.fileno())
        assert cli("umount", m.mnt, check=False).returncode == 1
        cli("umount", "--discard", m.mnt)
        assert m.proc.wait(timeout=60) is not None
        m.proc = None
        os.unlink(filler)
        m.start()
        with open(lun, "rb") as f:
            assert f.read(6 * MiB) == first + second + third
        assert "s1" in [s["name"] for s in m.status()["sets"]]
        m.stop()
        out = run([PY, os.path.join(os.path.dirname(__file__), "..", "tools", "fsck"),
                   m.array], check=False)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        if m is not None:
            m.close()
        run(["umount", str(small)], check=False)


def test_init_on_a_full_file_system_says_so_and_leaves_nothing(tmp_path):
    """`fusearray init` where the array directory's (or a disk
    directory's) file system is full: a clear ENOSPC, no traceback, and
    nothing left behind (it used to die of SQLite's "database or disk is
    full" and leave a half-made array: the next init said "not empty"); a
    disk directory it labelled is emptied too; with room, the same init
    works."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)])
    try:
        (tmp_path / "disks").mkdir()
        for args in ((), ("--pack", f"main=single:{tmp_path / 'disks' / 'd0'}")):
            r = cli("init", str(small / "a"), *args, check=False)
            assert r.returncode == 1, r
            assert "is full; nothing was left behind" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr, r.stderr
            assert os.listdir(small) == [] and os.listdir(tmp_path / "disks") == []
        # the disk directory full, the array directory not
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        r = cli("init", str(tmp_path / "b"), "--pack", f"main=single:{small / 'd0'}",
                check=False)
        assert r.returncode == 1 and "is full" in r.stderr, r.stderr
        assert not (tmp_path / "b").exists() and os.listdir(small) == ["filler"]
    finally:
        run(["umount", str(small)], check=False)
    cli("init", str(small / "a"))
    assert os.path.exists(small / "a" / "array.json")


def test_racing_and_killed_local_inits_leave_one_array_or_a_clear_refusal(tmp_path):
    """Six `fusearray init` of one new local directory at once, five
    rounds: exactly one makes the array; each other is refused with one
    line (another init is using it, it is already an array, or not empty):
    none took the winner's catalogue for a failure of its own and removed
    it (the winner would have said "made" over a broken array), and the
    array passes tools/fsck. Then inits SIGKILLed at random moments: the
    next init of the same directory either finds the array the killed one
    finished or says, in one line, that an init did not finish there and
    what to do; never a traceback; after that advice the init works."""
    fa = [sys.executable, "-m", "fusearray"]
    fsck = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fsck")
    refusals = re.compile(r"another fusearray init \(or a mount\) is using it|"
                          r"is already an array|is not empty|did not finish")
    for round_ in range(5):
        path = str(tmp_path / f"race{round_}")
        procs = [subprocess.Popen(fa + ["init", path], text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(6)]
        outs = [(*p.communicate(timeout=120), p.returncode) for p in procs]
        assert [rc for _, _, rc in outs].count(0) == 1, outs
        for _, err, rc in outs:
            if rc:
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1 \
                    and refusals.search(err), err
        r = run([sys.executable, fsck, path, "--strict"], check=False)
        assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr
    rng = random.Random(5)
    t0 = time.monotonic()
    cli("init", str(tmp_path / "timing"))
    took = time.monotonic() - t0
    for i in range(8):
        path = str(tmp_path / f"killed{i}")
        p = subprocess.Popen(fa + ["init", path], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=rng.uniform(0.05, took))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        p.wait()
        r = cli("init", path, check=False)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode:
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert re.search(r"is already an array|did not finish", r.stderr), r.stderr
            if "did not finish" in r.stderr:      # the advice works
                for name in os.listdir(path):
                    q = os.path.join(path, name)
                    shutil.rmtree(q) if os.path.isdir(q) else os.unlink(q)
                cli("init", path)
        r = run([sys.executable, fsck, path], check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_inits_racing_for_one_disk_directory_leave_one_array_and_the_others_nothing(
        tmp_path):
    """Five `fusearray init` of five new arrays naming the same new disk
    directory (`--pack main=single:DIR`), all at once, four rounds: exactly
    one array is made, and it passes tools/fsck (its disk directory holds
    its own label: another init did not label it over, nor empty it while
    failing); each other init is refused in one line and leaves no array
    directory behind. Then an init while another holds the disk
    directory's lock (an init in progress) is refused with EBUSY."""
    fa = [sys.executable, "-m", "fusearray"]
    fsck = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fsck")
    for round_ in range(4):
        disk = str(tmp_path / f"disk{round_}")
        arrays = [str(tmp_path / f"r{round_}a{i}") for i in range(5)]
        procs = [subprocess.Popen(fa + ["init", a, "--pack", f"main=single:{disk}"],
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for a in arrays]
        outs = [(*p.communicate(timeout=120), p.returncode) for p in procs]
        made = [a for a, (_, _, rc) in zip(arrays, outs) if rc == 0]
        assert len(made) == 1, outs
        for a, (_, err, rc) in zip(arrays, outs):
            if rc:
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1 \
                    and re.search(r"another fusearray init|already a disk|not empty", err), err
                assert not os.path.exists(a), (a, os.listdir(a))
        r = run([sys.executable, fsck, made[0], "--strict"], check=False)
        assert r.returncode == 0 and " 0 problem(s)" in r.stdout, r.stdout + r.stderr
    disk = tmp_path / "held"
    disk.mkdir()
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECTORY)
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = cli("init", str(tmp_path / "late"), "--pack", f"main=single:{disk}", check=False)
    finally:
        os.close(fd)
    assert r.returncode == 1 and "another fusearray init is using it" in r.stderr, r.stderr
    assert not (tmp_path / "late").exists() and os.listdir(disk) == []


def test_an_array_with_more_segment_files_than_the_soft_fd_limit_mounts(make_mount, tmp_path):
    """Every segment file of an array is held open while it is mounted
    (and by tools/fsck): an array of 64 MiB segments passes a stock soft
    RLIMIT_NOFILE of 1024 at about 64 GB stored, and a mount from a stock
    shell or systemd unit then failed. The daemon raises its soft limit to
    the hard one. Here with 6 MiB segments (a 192 MiB tmpfs) and a soft
    limit just below what the mount needs (prlimit): it mounts, the data
    reads back, and so does fsck. With the hard limit that low too, the
    mount is refused in one line saying what to raise (it used to die of
    "unexpected error: Too many open files")."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(small)])
    try:
        m = make_mount()
        m.array = str(small / "array")
        m.init()
        m.start()
        try:
            cli("create", "l", "120M", mnt=m.mnt)
            data = write_synced(os.path.join(m.mnt, "luns", "l"), 112 * 2**20)
            m.ok("sync", "all")
            fds = len(os.listdir(f"/proc/{m.status()['pid']}/fd"))
            segs = len(os.listdir(small / "array" / "disks" / "main.0" / "segments"))
            assert segs >= 16, segs
        finally:
            m.stop()
        soft = fds - segs // 2             # what it held, less half its segment files
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        mnt = tmp_path / "m2"
        mnt.mkdir()
        r = run(["prlimit", f"--nofile={soft}:{hard}", PY, "-m", "fusearray", "mount",
                 "--background", m.array, str(mnt)], check=False, timeout=120)
        assert r.returncode == 0, r.stderr
        try:
            assert read_at(os.path.join(mnt, "luns", "l"), 0, len(data)) == data
        finally:
            cli("umount", str(mnt))
        fsck = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fsck")
        r = run(["prlimit", f"--nofile={soft - 8}:{hard}", PY, fsck, m.array], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        # a hard limit below what it needs: refused in one line, nothing mounted
        r = run(["prlimit", f"--nofile={soft}:{soft}", PY, "-m", "fusearray", "mount",
                 "--background", m.array, str(mnt)], check=False, timeout=120)
        assert r.returncode == 1 and "too many files to open" in r.stderr \
            and "LimitNOFILE" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not os.path.ismount(mnt)
    finally:
        run(["umount", "-l", str(small)], check=False)


def test_a_copy_job_that_ends_while_the_array_directory_is_full_is_done(make_mount, tmp_path):
    """A plex copy into another pack, slowed by `throttle`, ends while the
    array directory's file system is full: its last commit is put off
    (its record waits for room), not failed: the job is done, the copy
    reads right, and once there is room the record commits and survives
    a SIGKILL and remount."""
    small = tmp_path / "small"
    small.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)])
    m = None
    filler = small / "filler"
    try:
        for d in ("pack", "far"):
            (tmp_path / d).mkdir()
        m = make_mount(array=small / "a")
        m.init("--pack", f"main=single:{tmp_path / 'pack'}")
        m.start()
        m.ok("addpack", f"far single {tmp_path / 'far' / 'd0'}")
        m.ok("create", "l 64M")
        data = write_synced(m.path("luns", "l"), 16 * MiB)
        reply = m.ok("snapshot", "l set=s1 context=plex pack=far")
        jid = reply["job"]
        m.ok("throttle", f"{jid} 4M")                   # about 4 s to go
        st = os.statvfs(small)
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 128 * 1024)
        job = m.wait_job(jid, ("done", "failed"), 120)
        assert job["state"] == "done", job
        assert "error the catalogue's storage is full" in m.events()
        assert read_at(m.path("snapshots", "s1", "l"), 0, len(data)) == data
        os.unlink(filler)
        wait_for(lambda: "commits resume" in m.events(), 30, "commits to resume")
        m.ok("sync", "all")
        m.kill9()
        m.start()
        assert m.job(jid)["state"] == "done"
        assert read_at(m.path("snapshots", "s1", "l"), 0, len(data)) == data
        m.stop()
    finally:
        if m is not None:
            m.close()
        run(["umount", str(small)], check=False)
