"""Application-consistent shadow copies and restores (#19 points 1-3, 5):
the freeze at the instant (FIFREEZE through the freezer child, a thaw that
cannot be missed), writer hooks around snapshot and resync (a pre hook's
failure is a veto), the loop devices and mounts over a LUN in ctl/status,
EBUSY naming them, and the `resyncing` state.

As a user does it: ext4 on a loop device over a LUN under a writer that
appends and fsyncs continuously, `echo ... > ctl/snapshot`, dumpe2fs and
e2fsck of the shadow copy file. Every process, mount and loop device is
ended in `finally` (the Mount fixture records loops and mounts).
"""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from conftest import end_proc, run, wait_for
from fusearray import host
from fusearray.errors import ArrayError

PY = sys.executable
WRITER = textwrap.dedent("""
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    i = 0
    while True:
        os.write(fd, b"record %08d " % i + b"x" * 4000 + b"\\n")
        os.fsync(fd)
        i += 1
""")


def needs_recovery(path: str) -> bool:
    out = run(["dumpe2fs", "-h", path]).stdout
    feats = next(l for l in out.splitlines() if l.startswith("Filesystem features:"))
    return "needs_recovery" in feats.split()


def make_hook(m, stage: str, name: str, body: str) -> str:
    d = os.path.join(m.array, "hooks", f"{stage}.d")
    os.makedirs(d, exist_ok=True)
    os.chmod(os.path.join(m.array, "hooks"), 0o755)
    os.chmod(d, 0o755)
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write("#!/bin/sh\n" + textwrap.dedent(body))
    os.chmod(p, 0o755)
    return p


def set_names(m) -> set:
    return {s["name"] for s in m.status()["sets"]}


@pytest.fixture
def ext4_lun(mount, tmp_path):
    """lun0 (128 MiB) with ext4 mounted on tmp/fs, a writer appending and
    fsyncing to fs/log all along: (mount, device, fs mountpoint)."""
    m = mount
    m.ok("create", "lun0 128M")
    dev = m.attach("lun0")
    run(["mkfs.ext4", "-q", dev])
    fs = str(tmp_path / "fs")
    m.mount_fs(dev, fs)
    writer = subprocess.Popen([PY, "-c", WRITER, os.path.join(fs, "log")])
    try:
        wait_for(lambda: os.path.exists(os.path.join(fs, "log"))
                 and os.path.getsize(os.path.join(fs, "log")) > 40000, what="the writer")
        yield m, dev, fs
    finally:
        end_proc(writer)


def test_freeze_makes_the_shadow_copy_of_a_busy_ext4_clean(ext4_lun):
    m, dev, fs = ext4_lun
    st = m.status()
    lun = next(v for v in st["luns"] if v["name"] == "lun0")
    assert lun["attached"] == [{"device": dev, "mounts": [fs]}]
    assert f"attached {dev} mounted on {fs}" in m.view("status")

    # the default: frozen for the instant, application-consistent
    r = m.ok("snapshot", "lun0 set=app")
    assert r["consistency"] == "application" and r["frozen"] == fs, r
    copy = m.path("snapshots", "app", "lun0")
    assert os.getxattr(copy, "user.fusearray.consistency") == b"application"
    assert not needs_recovery(copy)
    e = run(["e2fsck", "-fn", copy], check=False)
    assert e.returncode == 0, e.stdout + e.stderr
    # the writer goes on after the thaw
    size = os.path.getsize(os.path.join(fs, "log"))
    wait_for(lambda: os.path.getsize(os.path.join(fs, "log")) > size, what="writes after thaw")
    assert any(f"froze {fs}" in l for l in m.events().splitlines())

    # quiesce=no: crash-consistent, the journal needs recovery
    r = m.ok("snapshot", "lun0 set=crash quiesce=no")
    assert r["consistency"] == "crash" and "frozen" not in r, r
    copy = m.path("snapshots", "crash", "lun0")
    assert os.getxattr(copy, "user.fusearray.consistency") == b"crash"
    assert needs_recovery(copy)
    st = m.status()
    cons = {s["name"]: s["shadow_copies"][0]["consistency"] for s in st["sets"]}
    assert cons == {"app": "application", "crash": "crash"}


def test_resync_and_swap_onto_a_mounted_lun_are_ebusy_naming_it(ext4_lun):
    m, dev, fs = ext4_lun
    m.ok("snapshot", "lun0 set=s1")
    err, reply = m.ctl("resync", "s1/lun0")
    assert err == errno.EBUSY and fs in reply["message"] and dev in reply["message"], reply
    err, reply = m.ctl("swap", "s1/lun0")
    assert err == errno.EBUSY and fs in reply["message"], reply
    assert set_names(m) == {"s1"}                # nothing done (no undo set either)


def test_a_pre_hook_vetoes_snapshot_and_resync_and_nothing_changes(mount):
    m = mount
    m.ok("create", "lun0 8M")
    with open(m.path("luns", "lun0"), "r+b") as f:
        f.write(b"A" * 65536)
    m.ok("snapshot", "lun0 set=before quiesce=no")
    with open(m.path("luns", "lun0"), "r+b") as f:
        f.write(b"B" * 65536)
    make_hook(m, "pre-snapshot", "10-db", """
        echo "checking $FUSEARRAY_LUNS" >&2
        echo "database db1 is not ready" >&2
        exit 1
    """)
    err, reply = m.ctl("snapshot", "lun0 set=vetoed")
    assert err == errno.EIO, reply
    assert "pre-snapshot.d/10-db" in reply["message"]
    assert "database db1 is not ready" in reply["message"]
    assert set_names(m) == {"before"}
    assert any("10-db" in l and "not ready" in l for l in m.events().splitlines())
    # quiesce=no runs no hooks
    m.ok("snapshot", "lun0 set=nohooks quiesce=no")

    make_hook(m, "pre-restore", "10-db", """
        echo "db1 still has lun0 open" >&2
        exit 3
    """)
    err, reply = m.ctl("resync", "before/lun0")
    assert err == errno.EIO and "pre-restore.d/10-db" in reply["message"], reply
    assert "db1 still has lun0 open" in reply["message"]
    with open(m.path("luns", "lun0"), "rb") as f:
        assert f.read(65536) == b"B" * 65536      # not resynced
    assert set_names(m) == {"before", "nohooks"}  # no undo set


def test_hooks_run_in_order_with_the_environment_and_the_lun_resyncing(mount, tmp_path):
    m = mount
    log = str(tmp_path / "hooks.log")
    m.ok("create", "lun0 8M")
    wwn = os.getxattr(m.path("luns", "lun0"), "user.fusearray.wwn").decode()
    with open(m.path("luns", "lun0"), "r+b") as f:
        f.write(b"A" * 65536)
    for stage in ("pre-snapshot", "post-snapshot", "pre-restore", "post-restore"):
        for name in ("20-second", "10-first"):
            make_hook(m, stage, name, f"""
                echo "$FUSEARRAY_STAGE {name} op=$FUSEARRAY_OPERATION set=$FUSEARRAY_SET \\
luns=$FUSEARRAY_LUNS wwns=$FUSEARRAY_WWNS sources=$FUSEARRAY_SOURCES \\
mount=$FUSEARRAY_MOUNT" >> {log}
            """)
    # the pre-restore hook also records the LUN's state as the array shows it
    make_hook(m, "pre-restore", "30-state", f"""
        python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); \\
print("state", [l["state"] for l in s["luns"] if l["name"]=="lun0"][0])' \\
            "$FUSEARRAY_MOUNT/ctl/status.json" >> {log}
    """)
    m.ok("snapshot", "lun0 set=s1")
    with open(m.path("luns", "lun0"), "r+b") as f:
        f.write(b"B" * 65536)
    m.ok("resync", "s1/lun0")
    with open(m.path("luns", "lun0"), "rb") as f:
        assert f.read(65536) == b"A" * 65536
    with open(log) as f:
        lines = f.read().splitlines()
    stages = [l.split()[0] + " " + l.split()[1] for l in lines]
    assert stages == ["pre-snapshot 10-first", "pre-snapshot 20-second",
                      "post-snapshot 10-first", "post-snapshot 20-second",
                      "pre-restore 10-first", "pre-restore 20-second", "state resyncing",
                      "post-restore 10-first", "post-restore 20-second"], lines
    for l in lines[:4]:
        assert f"op=snapshot set=s1 luns=lun0 wwns={wwn}" in l and f"mount={m.mnt}" in l, l
    for l in lines[4:6] + lines[7:]:
        assert "op=resync set=s1 luns=lun0" in l and "sources=s1/lun0" in l, l
    assert next(v for v in m.status()["luns"] if v["name"] == "lun0")["state"] == "online"
    # hooks with no mounted file system: the writers were told, application-consistent
    assert os.getxattr(m.path("snapshots", "s1", "lun0"),
                       "user.fusearray.consistency") == b"application"


def test_a_hook_others_can_change_is_never_run(mount, tmp_path):
    m = mount
    m.ok("create", "lun0 8M")
    mark = tmp_path / "ran"
    p = make_hook(m, "pre-snapshot", "10-open", f"touch {mark}\n")
    os.chmod(p, 0o757)
    err, reply = m.ctl("snapshot", "lun0 set=s1")
    assert err == errno.EIO and "writable by group or others" in reply["message"], reply
    assert not mark.exists() and set_names(m) == set()
    os.chmod(p, 0o755)
    m.ok("snapshot", "lun0 set=s1")
    assert mark.exists()


# ---- the freezer itself, on an ext4 of its own (no array) ------------------------------
class Probes:
    """Writes into a file system that may be frozen: a writer blocked by a
    freeze cannot be killed until the thaw, so each is reaped at the end
    (after the fixture thaws)."""

    def __init__(self, where: str):
        self.where = where
        self.procs: list = []

    def blocked(self, timeout: float) -> bool:
        """True if a write + fsync does not finish within `timeout`."""
        p = subprocess.Popen([PY, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|"
                              "os.O_CREAT); os.write(fd, b'x'); os.fsync(fd)",
                              os.path.join(self.where, f"probe{time.monotonic_ns()}")])
        self.procs.append(p)
        try:
            p.wait(timeout)
            return False
        except subprocess.TimeoutExpired:
            return True


@pytest.fixture
def plain_ext4(tmp_path):
    """An ext4 of its own on a loop device (no array): its Probes."""
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", str(img)])
    dev = run(["losetup", "-f", "--show", str(img)]).stdout.strip()
    where = tmp_path / "fs"
    where.mkdir()
    mounted = False
    probes = Probes(str(where))
    try:
        run(["mount", dev, str(where)])
        mounted = True
        yield probes
    finally:
        if mounted:
            subprocess.run(["fsfreeze", "-u", str(where)], capture_output=True)
        for p in probes.procs:
            end_proc(p)
        if mounted:
            run(["umount", str(where)], check=False)
        run(["losetup", "-d", dev], check=False)


def _close(p) -> None:
    end_proc(p)
    for f in (p.stdin, p.stdout):
        if f is not None:
            f.close()


def _start_freezer(where, *extra):
    p = subprocess.Popen([PY, "-m", "fusearray.freezer", *extra, where],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == f"frozen {where}"
    assert p.stdout.readline().strip() == "ready"
    return p


def test_the_freezer_thaws_when_the_daemon_dies(plain_ext4, tmp_path):
    """The daemon's end of the freezer's stdin closes when it dies (a
    SIGKILL too): the freezer thaws."""
    probes = plain_ext4
    where = probes.where
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-m", "fusearray.freezer", {where!r}],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             start_new_session=True)
        sys.stdout.write(p.stdout.readline().decode()); sys.stdout.write(
            p.stdout.readline().decode()); sys.stdout.flush()
        time.sleep(600)
    """)
    parent = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == f"frozen {where}"
        assert parent.stdout.readline().strip() == "ready"
        assert probes.blocked(0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not probes.blocked(2.0), what="the thaw after the kill")
    finally:
        end_proc(parent)
        parent.stdout.close()


def test_the_freezer_thaws_on_command_and_at_its_hold_limit(plain_ext4):
    probes = plain_ext4
    where = probes.where
    p = _start_freezer(where)
    try:
        assert probes.blocked(0.5)
        p.stdin.write("thaw\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == f"thawed {where}"
        assert p.wait(10) == 0
        assert not probes.blocked(5.0)
    finally:
        _close(p)
    p = _start_freezer(where, "--hold", "1")
    try:
        assert p.stdout.readline().strip() == "expired"        # nobody said thaw
        assert p.stdout.readline().strip() == f"thawed {where}"
        assert not probes.blocked(5.0)
    finally:
        _close(p)
    # frozen by someone else: reported, left frozen, never thawed by it
    run(["fsfreeze", "-f", where])
    try:
        p = subprocess.Popen([PY, "-m", "fusearray.freezer", where], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        out, _ = p.communicate("thaw\n", timeout=10)
        assert out.split("\n")[:2] == [f"already {where}", "ready"], out
        assert "thawed" not in out
        assert probes.blocked(0.5)
    finally:
        run(["fsfreeze", "-u", where])
        _close(p)


async def test_a_freeze_that_does_not_complete_in_time_aborts(tmp_path):
    """A freezer stuck in its FIFREEZE (a stand-in that never says ready)
    makes Freeze raise EIO naming the file system, within the limit."""
    stuck = tmp_path / "stuck"
    pidfile = tmp_path / "pid"
    stuck.write_text(f"#!/bin/sh\necho $$ > {pidfile}\necho \"frozen $3\"\n"
                     "while read x; do :; done\n")
    stuck.chmod(0o755)
    fz = host.Freeze(["/mnt/a", "/mnt/b"], timeout=0.5, command=[str(stuck)])
    with pytest.raises(ArrayError) as e:
        async with fz:
            pass
    assert e.value.errno == errno.EIO and "/mnt/b" in e.value.message
    assert "did not complete within 0.5 s" in e.value.message
    # told to thaw (its stdin closed), it ends and is reaped by the daemon
    pid = int(pidfile.read_text())
    with trio.fail_after(30):
        while os.path.exists(f"/proc/{pid}"):
            await trio.sleep(0.05)


def test_attachments_from_sysfs_and_mountinfo(tmp_path):
    """host.attachments_blocking on a made-up /sys/block and mountinfo."""
    sb = tmp_path / "block"
    for n, backing, devno in (("loop3", "/m/luns/db", "7:3"),
                              ("loop4", "/m/snapshots/s1/db (deleted)", "7:4"),
                              ("loop5", "/elsewhere/x", "7:5")):
        (sb / n / "loop").mkdir(parents=True)
        (sb / n / "loop" / "backing_file").write_text(backing + "\n")
        (sb / n / "dev").write_text(devno + "\n")
    (sb / "loop3" / "loop3p1").mkdir()
    (sb / "loop3" / "loop3p1" / "dev").write_text("259:0\n")
    mi = tmp_path / "mountinfo"
    mi.write_text("30 1 7:3 / /mnt/db\\040one rw - ext4 /dev/loop3 rw\n"
                  "31 1 259:0 / /mnt/part rw - ext4 /dev/loop3p1 rw\n"
                  "32 1 7:5 / /mnt/x rw - ext4 /dev/loop5 rw\n")
    got = host.attachments_blocking("/m", str(sb), str(mi))
    assert got == {"luns/db": [host.Attachment("/dev/loop3", ["/mnt/db one", "/mnt/part"])],
                   "snapshots/s1/db": [host.Attachment("/dev/loop4", [])]}


def test_a_slow_hook_never_blocks_other_luns_io(mount, tmp_path):
    """A pre-snapshot hook that waits for the test: meanwhile another LUN
    is written and read back through the mount and ctl/status answers;
    only then does the hook end and the set get taken. (The command runs
    in a shell of its own, as a user's would: a descriptor of ctl/snapshot
    open in this process would be closed in every child it forks, and that
    close waits for the command.)"""
    m = mount
    m.ok("create", "lun0 8M")
    m.ok("create", "lun1 8M")
    mark, started = tmp_path / "go", tmp_path / "started"
    make_hook(m, "pre-snapshot", "10-wait", f"""
        touch {started}
        while [ ! -e {mark} ]; do sleep 0.05; done
    """)
    snap = subprocess.Popen(["sh", "-c", f"echo 'lun0 set=s1' > {m.path('ctl', 'snapshot')}"])
    try:
        wait_for(started.exists, what="the hook to start")
        data = os.urandom(1 << 20)
        (tmp_path / "d").write_bytes(data)
        run(["dd", f"if={tmp_path / 'd'}", f"of={m.path('luns', 'lun1')}", "bs=1M",
             "oflag=direct", "conv=notrunc,fsync", "status=none"])
        run(["cmp", "-n", str(1 << 20), str(tmp_path / "d"), m.path("luns", "lun1")])
        assert "s1" not in set_names(m) and snap.poll() is None    # the hook still waits
    finally:
        mark.touch()
        rc = snap.wait(60)
    assert rc == 0 and "s1" in set_names(m)


def test_a_mount_does_not_make_an_untrusted_hook_trusted(make_mount, tmp_path):
    """The mount takes group and world bits off the array's files, but not
    off hooks/: a hook others could change before the mount stays refused."""
    m = make_mount().init()
    mark = tmp_path / "ran"
    d = os.path.join(m.array, "hooks", "pre-snapshot.d")
    os.makedirs(d)
    p = os.path.join(d, "10-open")
    with open(p, "w") as f:
        f.write(f"#!/bin/sh\ntouch {mark}\n")
    os.chmod(p, 0o757)
    m.start()
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o757
    m.ok("create", "lun0 8M")
    err, reply = m.ctl("snapshot", "lun0 set=s1")
    assert err == errno.EIO and "writable by group or others" in reply["message"], reply
    assert not mark.exists()


def test_a_child_forked_during_a_long_command_does_not_wait_for_it(mount, tmp_path):
    """A process with ctl/snapshot open in one thread (the command waiting
    for a slow pre-snapshot hook) forks a child in another: the child's
    close of its copy of the descriptor at exec must not wait for the
    command to end."""
    import threading
    m = mount
    m.ok("create", "lun0 8M")
    mark, started = tmp_path / "go", tmp_path / "started"
    make_hook(m, "pre-snapshot", "10-wait", f"""
        touch {started}
        while [ ! -e {mark} ]; do sleep 0.05; done
    """)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=m.ctl("snapshot", "lun0 set=s1")))
    t.start()
    try:
        wait_for(started.exists, what="the hook to start")
        run(["true"])                       # fork + exec while the command runs
        assert t.is_alive() and not mark.exists()
    finally:
        mark.touch()
        t.join(60)
    err, reply = result["r"]
    assert err == 0 and reply["set"] == "s1", reply


def _stub_freezer(tmp_path, body: str) -> list:
    """A stand-in for the freezer child (its protocol, no ioctl): the
    command Freeze runs, its arguments being `--hold S MNT...`."""
    stub = tmp_path / "stub-freezer"
    stub.write_text("#!/bin/sh\nshift 2\n" + textwrap.dedent(body))
    stub.chmod(0o755)
    return [str(stub)]


async def test_a_set_that_fails_while_frozen_still_thaws(tmp_path):
    """An error inside the frozen block (the snapshot's flush failing on a
    full or failing pack) ends it as any other end does: `thaw` is sent."""
    told = tmp_path / "told"
    cmd = _stub_freezer(tmp_path, f"""
        echo "frozen $1"; echo ready
        read line; echo "$line" > {told}; echo "thawed $1"
    """)
    fz = host.Freeze(["/mnt/a"], command=cmd)
    with pytest.raises(ArrayError) as e:
        async with fz:
            assert fz.frozen == ["/mnt/a"] and fz.held()
            raise ArrayError(errno.ENOSPC, "the pack is full")
    assert e.value.errno == errno.ENOSPC
    assert told.read_text() == "thaw\n" and not fz.thaw_errors


async def test_a_freeze_refused_aborts_with_its_errno_and_a_failed_thaw_is_reported(tmp_path):
    """A daemon without CAP_SYS_ADMIN: FIFREEZE is EPERM, the set is not
    taken and the errno is the freezer's. A thaw that fails is reported
    (the caller makes it an error event)."""
    fz = host.Freeze(["/mnt/a"], command=_stub_freezer(tmp_path, """
        echo "error $1 EPERM Operation not permitted"
    """))
    with pytest.raises(ArrayError) as e:
        async with fz:
            pass
    assert e.value.errno == errno.EPERM and "/mnt/a" in e.value.message
    assert "quiesce=no" in e.value.message
    fz = host.Freeze(["/mnt/a"], command=_stub_freezer(tmp_path, """
        echo "frozen $1"; echo ready
        read line; echo "thaw-error $1 EINVAL Invalid argument"
    """))
    async with fz:
        pass
    assert fz.thaw_errors == ["/mnt/a: EINVAL Invalid argument"]


async def test_nothing_to_freeze_has_no_hold_limit():
    """A set of LUNs no mounted file system is on (no freezer) is not
    refused for a hold limit when its instant waits long (a commit held by a
    full cluster pool): there was the misleading 'the freeze of  reached its
    hold limit' with nothing frozen."""
    fz = host.Freeze([], hold=0.0)
    async with fz:
        assert fz.held() and fz.frozen == []
    fz = host.Freeze(["/mnt/a"], hold=0.0)          # (a freezer's limit still counts)
    assert not fz.held()
