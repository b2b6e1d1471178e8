"""Permissions (ISSUE13 defects 5 and 6, test d): LUN and shadow copy files
are 0660 root:disk like block devices, ctl/ verbs root's, the array
directory and everything in it the owner's alone; checked as an
unprivileged user the test creates (useradd) and removes (userdel).

The probes run as that user in a child process (subprocess user=/group=/
extra_groups=) under the system python, which it can execute."""
import errno
import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

from conftest import PY, Mount, cli, require_fuse, run

from fusearray import STREAM_SOCKET_XATTR, perms
from fusearray.array import Array, init_array
from fusearray.errors import ArrayError

MiB = 1 << 20
SYS_PY = "/usr/bin/python3"

# The probe: a list of [op, path, arg] in, one result per op out ("ok",
# a value, or the errno's name), as JSON. It never raises.
PROBE = r"""
import errno, json, os, socket, struct, sys
out = []
for op, path, arg in json.loads(sys.argv[1]):
    try:
        if op == "read":
            fd = os.open(path, os.O_RDONLY)
            try:
                r = os.pread(fd, arg or 4096, 0).hex()
            finally:
                os.close(fd)
        elif op == "write":
            fd = os.open(path, os.O_WRONLY)
            try:
                r = os.pwrite(fd, bytes.fromhex(arg), 0)
            finally:
                os.close(fd)
        elif op == "ctl":
            fd = os.open(path, os.O_RDWR)
            try:
                os.write(fd, arg.encode())
                r = os.read(fd, 65536).decode()
            finally:
                os.close(fd)
        elif op == "open_rw":
            os.close(os.open(path, os.O_RDWR))
            r = "ok"
        elif op == "truncate":
            os.truncate(path, 0)
            r = "ok"
        elif op == "listdir":
            r = sorted(os.listdir(path))
        elif op == "getxattr":
            r = os.getxattr(path, arg).decode()
        elif op == "setxattr":
            os.setxattr(path, arg, b"x")
            r = "ok"
        elif op == "chmod":
            os.chmod(path, int(arg, 8))
            r = oct(os.stat(path).st_mode & 0o7777)
        elif op == "stream":      # connect to the stream socket, ask for an export
            name = os.getxattr(path, arg)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(120)
            s.connect(name if name.startswith(b"/") else b"\0" + name)
            w = os.open("/dev/null", os.O_WRONLY)
            try:
                s.sendmsg([b"export S\n"],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", w))])
            except OSError as e:
                r = "refused:" + errno.errorcode[e.errno]
            else:
                got = b""
                try:
                    while data := s.recv(65536):
                        got += data
                except OSError as e:
                    got += ("\n" + errno.errorcode[e.errno]).encode()
                r = "reply:" + got.decode(errors="replace")
            finally:
                os.close(w)
                s.close()
        else:
            r = "bad op"
    except OSError as e:
        r = errno.errorcode.get(e.errno, str(e.errno))
    out.append(r)
print(json.dumps(out))
"""


class User:
    """An unprivileged user made for this test: useradd with a unique name
    and its own group; `remove()` deletes both (userdel)."""

    def __init__(self):
        if not shutil.which("useradd") or not os.path.exists(SYS_PY):
            pytest.skip("useradd or /usr/bin/python3 missing")
        self.name = f"fa-perm-{secrets.token_hex(4)}"
        run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
             self.name])
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        assert self.uid != 0 and self.gid != 0
        assert self.name not in grp.getgrnam("disk").gr_mem

    def remove(self):
        run(["userdel", self.name], check=False)
        with pytest.raises(KeyError):
            pwd.getpwnam(self.name)

    def probe(self, ops, gid=None, groups=()):
        """Run `ops` as this user: its own group by default, or `gid` with
        the supplementary `groups`."""
        r = subprocess.run([SYS_PY, "-c", PROBE, json.dumps(ops)], capture_output=True,
                           text=True, user=self.uid, group=self.gid if gid is None else gid,
                           extra_groups=list(groups), cwd="/", env={"PATH": "/usr/bin:/bin"},
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@pytest.fixture
def user():
    require_fuse()
    u = User()
    try:
        yield u
    finally:
        u.remove()


@pytest.fixture
def base():
    """A directory other users may traverse (pytest's tmp_path is 0700:
    the user would be stopped there, not by the mount's modes)."""
    d = tempfile.mkdtemp(prefix="fusearray-perms-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def modes(root) -> dict:
    """{relative path: mode bits} of everything under root (and root)."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for top, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(top, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def assert_private(root):
    """Directories 0700, files 0600: nothing for group or others."""
    found = modes(root)
    bad = {p: oct(m) for p, m in found.items()
           if m != (0o700 if os.path.isdir(os.path.join(root, p)) else 0o600)}
    assert not bad, bad
    return found


def ls_l(path) -> dict:
    """{name: (mode string, owner, group)} from `ls -l`, as a user sees it."""
    out = {}
    for line in run(["ls", "-l", path]).stdout.splitlines()[1:]:
        f = line.split()
        out[f[-1]] = (f[0], f[2], f[3])
    return out


# ---- the mount, as an unprivileged user -------------------------------------------------
def test_unprivileged_user_is_kept_out(user, base):
    m = Mount(base)
    try:
        m.init()
        os.chmod(m.mnt, 0o755)
        m.start()
        m.ok("create", "lun0 8M")
        data = os.urandom(4096)
        with open(m.path("luns", "lun0"), "r+b") as f:
            f.write(data)
        m.ok("snapshot", "lun0 set=S")
        job = m.ok("resync", "S/lun0=copy").get("job")
        lun, shadow = m.path("luns", "lun0"), m.path("snapshots", "S", "lun0")
        views = [m.path("ctl", v) for v in ("status", "status.json", "events")]
        if job:
            views.append(m.path("ctl", "jobs", job))
        ops = ([["read", lun, 0], ["write", lun, "00" * 512], ["open_rw", lun, None],
                ["truncate", lun, None], ["getxattr", lun, "user.fusearray.wwn"],
                ["read", shadow, 0], ["write", shadow, "00"],
                ["ctl", m.path("ctl", "create"), "evil 1M\n"],
                ["ctl", m.path("ctl", "delete"), "lun0 force=yes\n"],
                ["ctl", m.path("ctl", "export"), "S\n"],
                ["listdir", m.path("luns"), None],
                ["listdir", m.array, None],
                ["read", os.path.join(m.array, "array.json"), 0],
                ["read", os.path.join(m.array, "catalogue.db"), 0],
                ["setxattr", lun, "user.fusearray.readonly"],
                ["setxattr", m.path("ctl"), "user.fusearray.stream_socket"],
                ["chmod", lun, "666"]]
               + [["read", v, 0] for v in views])
        got = user.probe(ops)
        assert got[:10] == ["EACCES"] * 10, list(zip([o[:2] for o in ops], got))
        assert got[10] == ["copy", "lun0"]            # names are no secret (like /dev)
        assert got[11:14] == ["EACCES"] * 3           # the array directory: nothing
        assert got[14:17] == ["EACCES", "EACCES", "EPERM"], got   # not the owner: no chmod
        assert all(len(r) > 0 and r not in errno.errorcode.values() for r in got[17:]), got
        assert json.loads(bytes.fromhex(got[18]))["luns"]   # status.json is readable
        # root sees root:disk 0660, and 0440 for the read-only shadow copy
        assert ls_l(m.path("luns"))["lun0"] == ("-rw-rw----", "root", "disk")
        assert ls_l(m.path("snapshots", "S"))["lun0"] == ("-r--r-----", "root", "disk")
        assert ls_l(m.path("ctl"))["create"][0] == "-rw-------"
        assert ls_l(m.path("ctl"))["status"][0] == "-rw-r--r--"
        # nothing changed: root reads the data, no LUN `evil`, lun0 still there
        with open(lun, "rb") as f:
            assert f.read(4096) == data
        assert sorted(os.listdir(m.path("luns"))) == ["copy", "lun0"]
        # a user who cannot open the LUN cannot hold it busy: root's delete works
        m.ok("delete", "copy")

        # the stream socket refuses the user (root and the daemon's user only)
        if STREAM_SOCKET_XATTR.encode() in [x.encode() for x in os.listxattr(m.path("ctl"))]:
            r = user.probe([["stream", m.path("ctl"), STREAM_SOCKET_XATTR]])[0]
            assert "status=ok" not in r, r
            assert r.startswith("refused:") or "EACCES" in r or r == "reply:" \
                or "ECONNRESET" in r, r
        m.stop()
    finally:
        m.close()


def test_mount_group_owner_mode_options(user, base):
    """--group gives a group read-write (primary or supplementary), --ctl-group
    the verbs, --owner/--mode the owner alone; root still works throughout."""
    m = Mount(base)
    try:
        m.init()
        os.chmod(m.mnt, 0o755)
        g = grp.getgrgid(user.gid).gr_name
        m.start("--group", g, "--ctl-group", g)
        lun, create = m.path("luns", "lun0"), m.path("ctl", "create")
        data = os.urandom(1024)
        got = user.probe([["ctl", create, "lun0 4M\n"], ["write", lun, data.hex()],
                          ["read", lun, 1024]])
        assert got[0].startswith("status=ok") and got[1:] == [1024, data.hex()], got
        assert ls_l(m.path("luns"))["lun0"] == ("-rw-rw----", "root", g)
        assert ls_l(m.path("ctl"))["create"] == ("-rw-rw----", "root", g)
        m.ok("snapshot", "lun0 set=S")
        shadow = m.path("snapshots", "S", "lun0")
        # a supplementary member reads too; the shadow copy is read-only (0440)
        got = user.probe([["read", lun, 1024], ["read", shadow, 1024], ["write", shadow, "00"]],
                         gid=65534, groups=[user.gid])
        assert got == [data.hex(), data.hex(), "EACCES"], got
        # not a member: nothing (its own group is not the file's once 65534 is primary)
        got = user.probe([["read", lun, 16], ["ctl", create, "x 1M\n"]], gid=65534)
        assert got == ["EACCES", "EACCES"], got
        # while the member holds lun0 open, root's delete is EBUSY, naming the holder
        holder = subprocess.Popen([SYS_PY, "-c", "import os,sys; fd=os.open(sys.argv[1], "
                                   "os.O_RDONLY); print('open', flush=True); sys.stdin.read()",
                                   lun], user=user.uid, group=user.gid, cwd="/",
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            err, reply = m.ctl("delete", "lun0")
            assert err == errno.EBUSY, reply
            assert f"uid {user.uid}" in reply["message"] and f"pid {holder.pid}" in reply["message"], reply
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
            holder.stdout.close()
        with open(lun, "rb") as f:                # root
            assert f.read(1024) == data
        m.stop()

        m.start("--owner", user.name, "--mode", "0600")
        assert ls_l(m.path("luns"))["lun0"] == ("-rw-------", user.name, "disk")
        assert ls_l(m.path("snapshots", "S"))["lun0"] == ("-r--------", user.name, "disk")
        assert ls_l(m.path("ctl"))["create"] == ("-rw-------", "root", "root")
        got = user.probe([["read", lun, 1024], ["write", lun, "ab"], ["ctl", create, "y 1M\n"],
                          ["chmod", lun, "666"]], gid=65534)
        # the owner's chmod changes nothing: modes are the mount's
        assert got == [data.hex(), 1, "EACCES", "0o600"], got
        m.stop()
    finally:
        m.close()


def test_exported_stream_file_is_private(mount, tmp_path):
    """A stream file holds the set's data: created 0600 whatever the umask,
    through the stream socket and through ctl/export."""
    mount.ok("create", "lun0 4M")
    with open(mount.path("luns", "lun0"), "r+b") as f:
        f.write(os.urandom(MiB))
    mount.ok("snapshot", "lun0 set=S")
    old = os.umask(0)
    try:
        for via, env in (("socket", "1"), ("ctl", "0")):
            out = tmp_path / f"S-{via}.fas"
            r = run([PY, "-m", "fusearray", "-m", mount.mnt, "export", "S", str(out)],
                    env=dict(os.environ, FUSEARRAY_STREAM_SOCKET=env))
            assert out.stat().st_size > MiB, r.stdout
            assert oct(stat.S_IMODE(out.stat().st_mode)) == "0o600", via
    finally:
        os.umask(old)


def test_bad_mount_options_refused(base):
    require_fuse()
    m = Mount(base)
    m.init()
    for opts, what in ((["--group", "no-such-group-fa"], "no such group"),
                       (["--owner", "no-such-user-fa"], "no such user"),
                       (["--mode", "0777"], "read and write bits only"),
                       (["--mode", "rw"], "octal mode"),
                       (["--ctl-group", "no-such-group-fa"], "no such group")):
        r = cli("mount", m.array, m.mnt, "--background", *opts, check=False)
        assert r.returncode == 1 and what in r.stderr, (opts, r.stderr)
        assert not os.path.ismount(m.mnt)
    # and good ones reach the daemon through `fusearray mount --background`
    r = cli("mount", m.array, m.mnt, "--background", "--group", "0", "--mode", "0640",
            "--ctl-group", "disk")
    pid = int(r.stdout.rsplit("(pid ", 1)[1].split(")")[0])
    try:
        cli("create", "lun0", "1M", mnt=m.mnt)
        assert ls_l(m.path("luns"))["lun0"] == ("-rw-r-----", "root", "root")
        assert ls_l(m.path("ctl"))["create"] == ("-rw-rw----", "root", "disk")
        cli("umount", m.mnt)
    finally:
        if os.path.ismount(m.mnt):
            run(["fusermount3", "-u", "-z", m.mnt], check=False)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        else:
            subprocess.run(["timeout", "60", "tail", f"--pid={pid}", "-f", "/dev/null"])
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


# ---- the array directory ----------------------------------------------------------------
def test_array_files_private_after_init_and_mount(base):
    """Under a permissive umask (0), init and a mount leave nothing to
    group or others: directories 0700, files 0600 (data, catalogue and its
    WAL, the secret, lock, event journals, daemon.log)."""
    require_fuse()
    m = Mount(base)
    old = os.umask(0)
    try:
        m.init("--pack", f"fast=mirror:{base}/d1,{base}/d2")
        before = assert_private(m.array)
        assert {"array.json", "catalogue.db"} <= set(before)
        for d in ("d1", "d2"):
            assert_private(base / d)
        m.start()
        os.umask(old)
        # a fresh array had nothing to restrict (daemon.log, made before the
        # array opens, takes the daemon's umask)
        assert "restricted" not in m.events()
        m.ok("create", "lun0 4M pack=fast")
        m.ok("create", "lun1 4M")
        for n in ("lun0", "lun1"):
            with open(m.path("luns", n), "r+b") as f:
                f.write(os.urandom(MiB))
                os.fsync(f.fileno())
        m.ok("addpack", f"extra single {base}/d3")
        found = assert_private(m.array)
        for d in ("d1", "d2", "d3"):
            assert_private(base / d)
        assert {"daemon.log", "lock", "catalogue.db-wal"} <= set(found), sorted(found)
        assert any(p.endswith(".seg") for p in modes(base / "d1"))
        m.stop()
        assert_private(m.array)
    finally:
        os.umask(old)
        m.close()


def test_mount_tightens_an_array_made_with_old_modes(base):
    require_fuse()
    m = Mount(base)
    try:
        m.init().start()
        m.ok("addpack", f"p2 single {base}/d1")
        m.ok("create", "lun0 4M")
        m.ok("create", "lun1 4M pack=p2")
        for n in ("lun0", "lun1"):
            with open(m.path("luns", n), "r+b") as f:
                f.write(os.urandom(MiB))
                os.fsync(f.fileno())
        m.stop()
        # what an older fusearray left: world-readable directories and files
        for root in (m.array, str(base / "d1")):
            run(["chmod", "-R", "go+rX", root])
        loose = [p for p, mode in modes(m.array).items() if mode & 0o044]
        assert "array.json" in loose and any(p.endswith(".seg") for p in loose)
        assert any(p.endswith(".seg") and mode & 0o044 for p, mode in modes(base / "d1").items())
        m.start()
        assert_private(m.array)
        assert_private(base / "d1")
        ev = [l for l in m.events().splitlines() if "restricted" in l]
        assert len(ev) == 1 and "info" in ev[0] and "readable by other users" in ev[0], ev
        m.stop()
        m.start()        # nothing left to restrict: no second event
        assert len([l for l in m.events().splitlines() if "restricted" in l]) == 1
        m.stop()
    finally:
        m.close()


# ---- without FUSE --------------------------------------------------------------------------
def test_resolve_and_parse_mode():
    acc = perms.resolve()
    assert (acc.lun_uid, acc.lun_mode, acc.ctl_gid) == (os.geteuid(), 0o660, None)
    if os.geteuid() == 0:
        assert acc.lun_gid == grp.getgrnam("disk").gr_gid
    assert acc.lun(False)[0] == 0o660 and acc.lun(True)[0] == 0o440
    assert acc.verb()[0] == 0o600
    acc = perms.resolve(owner="12345", group="54321", mode="604", ctl_group="777")
    assert acc.lun(False) == (0o604, 12345, 54321) and acc.lun(True)[0] == 0o404
    assert acc.verb() == (0o660, os.geteuid(), 777)
    for bad in ("0777", "1660", "4600", "66x", "", "0o660", "06600", "-1"):
        with pytest.raises(ArrayError) as e:
            perms.parse_mode(bad)
        assert e.value.errno == errno.EINVAL
    assert perms.mount_args(group="disk", mode="0640") == ["--group", "disk", "--mode", "0640"]


def test_init_and_tighten_without_fuse(tmp_path):
    old = os.umask(0)
    try:
        arr = tmp_path / "arr"
        init_array(str(arr))
    finally:
        os.umask(old)
    assert_private(arr)
    os.chmod(arr / "array.json", 0o644)
    os.chmod(arr, 0o755)
    (arr / "link").symlink_to("/etc/passwd")          # not followed
    mode_passwd = os.stat("/etc/passwd").st_mode
    changed = perms.tighten([str(arr)])
    assert sorted(changed) == sorted([str(arr), str(arr / "array.json")])
    assert os.stat("/etc/passwd").st_mode == mode_passwd
    (arr / "link").unlink()
    assert_private(arr)
    assert perms.tighten([str(arr), str(tmp_path / "missing")]) == []
    # a disk directory reached through a symlink is restricted, the link kept
    disk = tmp_path / "disk"
    (disk / "segments").mkdir(parents=True, mode=0o755)
    (disk / "segments" / "00000001.seg").write_bytes(b"x")
    os.chmod(disk / "segments" / "00000001.seg", 0o644)
    (tmp_path / "disklink").symlink_to(disk)
    assert len(perms.tighten([str(tmp_path / "disklink")])) == 3
    assert_private(disk)


async def test_array_creates_its_files_private_whatever_the_umask(tmp_path):
    """In process, without the daemon's umask: the store, catalogue, lock
    and event journals create their files 0600 and directories 0700
    themselves (umask 0 here)."""
    old = os.umask(0)
    try:
        init_array(str(tmp_path / "arr"))
        async with trio.open_nursery() as n:
            a = Array(str(tmp_path / "arr"), 8 * MiB)
            await a.open(n)
            try:
                vol = await a.create_lun("lun0", "4M")
                await vol.write(0, os.urandom(2 * MiB))
                await a.sync()
                await a.add_pack("m2", "mirror", [str(tmp_path / "d1"), str(tmp_path / "d2")])
                a.event("info", "a journalled event")
                found = assert_private(tmp_path / "arr")
                assert_private(tmp_path / "d1")
                assert any(p.endswith(".seg") for p in found), sorted(found)
                assert {"lock", "catalogue.db-wal", "catalogue.db-shm"} <= set(found)
                assert any(p.startswith("events.journal.") for p in found), sorted(found)
                assert not [e for e in a.events if "restricted" in e[3]]
            finally:
                await a.close()
                n.cancel_scope.cancel()
    finally:
        os.umask(old)
