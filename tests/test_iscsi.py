"""Serving LUNs over iSCSI (#18 point 1): `share` / `unshare`, a tgtd per
portal started and stopped by the daemon, identity on the wire (VPD pages
0x80 and 0x83), data through iSCSI against the LUN file, write protection
of read-only LUNs, capacity after a resize, EBUSY of the commands that
refuse an open LUN, shares across unmount, SIGTERM and SIGKILL.

The initiator side is libiscsi from user space (the kernel here has no
iSCSI initiator): its tools (iscsi-ls, iscsi-inq, iscsi-readcapacity16)
and, for block reads and writes and page 0x83 as bytes, libiscsi through
ctypes (tests/iscsi_client.py). Each test uses free TCP ports, and every
tgtd serving them is ended by PID in `finally`, whatever the daemon did.
"""
import json
import os
import shutil
import signal
import socket
import subprocess

import pytest

from conftest import Mount, cli, require_fuse, run, wait_for
from fusearray import iscsi
from fusearray.errors import ArrayError

TOOLS = ("tgtd", "tgtadm", "iscsi-ls", "iscsi-inq", "iscsi-readcapacity16")


def require_tools():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install tgt libiscsi-bin)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tgtd_pids(port: int) -> list[int]:
    """Live tgtds listening (or asked to listen) on `port`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"tgtd" and any(a.endswith(f":{port}".encode())
                                                        for a in argv):
            if iscsi.proc_start_time(int(d)) is not None:      # (not a zombie)
                out.append(int(d))
    return out


class Shared:
    """A mount and the ports its shares use; `close` kills every tgtd on
    them (by PID) before the mount is cleaned up."""

    def __init__(self, m: Mount):
        self.m = m
        self.ports: list[int] = []

    def portal(self) -> str:
        self.ports.append(free_port())
        return f"127.0.0.1:{self.ports[-1]}"

    def share(self, lun: str, *opts: str, portal: str | None = None) -> dict:
        portal = portal or self.portal()
        return self.m.ok("share", " ".join([lun, f"portal={portal}", *opts]))

    def share_one(self, lun: str = "lun0") -> tuple[dict, int, int]:
        """Share `lun` on a portal of its own: (reply, port, pid of its tgtd)."""
        reply = self.share(lun)
        port = int(reply["portal"].rpartition(":")[2])
        [pid] = tgtd_pids(port)
        return reply, port, pid

    def close(self):
        for port in self.ports:
            for pid in tgtd_pids(port):
                os.kill(pid, signal.SIGKILL)
        for port in self.ports:
            wait_for(lambda: not tgtd_pids(port), 10, f"tgtds on port {port} to end")


@pytest.fixture
def shared(tmp_path):
    require_fuse()
    require_tools()
    m = Mount(tmp_path)
    s = Shared(m)
    try:
        m.init().start()
        m.ok("create", "lun0 64M")
        yield s
    finally:
        s.close()
        m.close()


def url(reply: dict, lun: int = 1) -> str:
    return f"iscsi://{reply['portal']}/{reply['target']}/{lun}"


def inquiry(reply: dict, page: int) -> str:
    """iscsi-inq's text of a VPD page (binary designators printed raw)."""
    r = subprocess.run(["iscsi-inq", "-e", "1", "-c", str(page), url(reply)],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode(errors="replace")


def initiator(reply: dict, **kw):
    from iscsi_client import Initiator
    return Initiator(reply["portal"], reply["target"], **kw)


def lun_status(m: Mount, name: str) -> dict:
    return next(v for v in m.status()["luns"] if v["name"] == name)


def read_file(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# ---- units -------------------------------------------------------------------------
def test_portal_and_initiator_names_are_checked():
    assert iscsi.parse_portal("127.0.0.1:3260") == "127.0.0.1:3260"
    assert iscsi.parse_portal("[::1]:3261") == "[::1]:3261"
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "host:3260", "::1:3260",
                "[127.0.0.1]:3260", "1.2.3:4", "127.0.0.1:+5", "127.0.0.1:3260 "):
        with pytest.raises(ArrayError):
            iscsi.parse_portal(bad)
    assert iscsi.parse_initiators("iqn.2026-12.org.example:host1,eui.0123456789ABCDEF") == \
        ["iqn.2026-12.org.example:host1", "eui.0123456789ABCDEF"]
    for bad in ("host1", "iqn.2026.org.example", "iqn.2026-12.org.example:a b", "",
                "iqn.2026-12.org.example:h,", "naa.123"):
        with pytest.raises(ArrayError):
            iscsi.parse_initiators(bad)
    assert iscsi.target_name("b453094e-0000", "Data_1") == \
        "iqn.2026-12.org.fusearray:b453094e:data-1"


# ---- on a mount ------------------------------------------------------------------------
def test_share_shows_the_luns_identity_and_serves_its_data(shared):
    m = shared.m
    reply = shared.share("lun0")
    assert reply["target"].startswith("iqn.2026-12.org.fusearray:") and \
        reply["target"].endswith(":lun0")
    assert reply["initiators"] == "any"
    st = lun_status(m, "lun0")
    assert st["iscsi"] == {"target": reply["target"], "portal": reply["portal"],
                           "initiators": [], "serving": True, "error": None}
    assert f"iSCSI target {reply['target']} on {reply['portal']}" in m.view("status")
    # discovery
    ls = run(["iscsi-ls", "-s", f"iscsi://{reply['portal']}"]).stdout
    assert f"Target:{reply['target']} Portal:{reply['portal']}" in ls
    assert "Lun:1    Type:DIRECT_ACCESS" in ls
    # identity: the serial in page 0x80, the WWN in page 0x83
    wwn = os.getxattr(m.path("luns", "lun0"), "user.fusearray.wwn").decode()
    serial = os.getxattr(m.path("luns", "lun0"), "user.fusearray.serial").decode()
    assert st["serial"] == serial and st["wwn"] == wwn
    p80 = inquiry(reply, 0x80)
    assert f"Unit Serial Number:[{serial:>36}]" in p80
    p83 = inquiry(reply, 0x83)
    assert f"Designator:[{wwn}]" in p83 and "Designator Type:(3) NAA" in p83
    from iscsi_client import designators
    with initiator(reply) as s:
        assert s.inquiry(0x80)[4:].decode().strip() == serial
        found = designators(s.inquiry(0x83))
        # NAA 6 (IEEE Registered Extended), binary, 16 bytes: the WWN itself
        assert (1, 3, bytes.fromhex(wwn.removeprefix("naa."))) in found
        assert (2, 1, wwn.encode()) in found          # T10 vendor ID, ASCII
        assert s.capacity() == 64 << 20
        # data: written through iSCSI, read in the LUN file; and back
        data = os.urandom(192 * 1024)
        s.write(1 << 20, data)
        s.sync()
        assert read_file(m.path("luns", "lun0"), 1 << 20, len(data)) == data
        other = os.urandom(64 * 1024)
        with open(m.path("luns", "lun0"), "r+b") as f:
            f.seek(8 << 20)
            f.write(other)
        assert s.read(8 << 20, len(other)) == other
        assert s.read(1 << 20, len(data)) == data
        assert s.read(32 << 20, 4096) == bytes(4096)
        tail = os.urandom(4096)                      # the last blocks
        s.write((64 << 20) - 4096, tail)
        assert read_file(m.path("luns", "lun0"), (64 << 20) - 4096, 4096) == tail


def test_a_read_only_lun_is_write_protected(shared):
    m = shared.m
    reply = shared.share("lun0")
    from iscsi_client import ScsiError
    with initiator(reply) as s:
        s.write(0, b"a" * 4096)
    m.ok("readonly", "lun0 on")
    with initiator(reply) as s:
        with pytest.raises(ScsiError) as e:
            s.write(0, b"b" * 4096)
        assert e.value.sense == "DATA_PROTECT"
        assert s.read(0, 4096) == b"a" * 4096
    assert read_file(m.path("luns", "lun0"), 0, 4096) == b"a" * 4096
    m.ok("readonly", "lun0 off")
    with initiator(reply) as s:
        s.write(0, b"c" * 4096)
    assert read_file(m.path("luns", "lun0"), 0, 4096) == b"c" * 4096
    # shared while read-only: protected from the start
    m.ok("unshare", "lun0")
    m.ok("readonly", "lun0 on")
    reply = shared.share("lun0")
    with initiator(reply) as s:
        with pytest.raises(ScsiError) as e:
            s.write(4096, b"d" * 4096)
        assert e.value.sense == "DATA_PROTECT"


def test_the_target_sees_a_resize(shared):
    m = shared.m
    reply = shared.share("lun0")
    m.ok("resize", "lun0 2G")
    cap = run(["iscsi-readcapacity16", url(reply)]).stdout
    assert f"Total size:{2 << 30}" in cap
    with initiator(reply) as s:
        s.write((2 << 30) - 512, b"e" * 512)
    assert read_file(m.path("luns", "lun0"), (2 << 30) - 512, 512) == b"e" * 512
    # a shrink of a shared LUN is EBUSY unless forced (the share named)
    err, r = m.ctl("resize", "lun0 32M")
    assert err and r["errno"] == "EBUSY" and "shared over iSCSI" in r["message"]
    m.ok("resize", "lun0 32M force=yes")
    with initiator(reply) as s:
        assert s.capacity() == 32 << 20


def test_commands_on_a_shared_lun_are_ebusy_unless_forced(shared):
    m = shared.m
    m.ok("snapshot", "lun0 set=s1")
    reply = shared.share("lun0")
    for verb, line in (("resync", "s1/lun0"), ("swap", "s1/lun0"), ("delete", "lun0"),
                       ("hidden", "lun0 on")):
        err, r = m.ctl(verb, line)
        assert r.get("errno") == "EBUSY", (verb, r)
        assert f"shared over iSCSI as target {reply['target']}" in r["message"], (verb, r)
    # forced: the target goes on serving the LUN, whatever is behind its name
    with initiator(reply) as s:
        s.write(0, b"f" * 4096)
    job = m.ok("resync", "s1/lun0 force=yes")["job"]
    m.wait_job(job)
    with initiator(reply) as s:
        assert s.read(0, 4096) == bytes(4096)
    m.ok("swap", "s1/lun0 force=yes")
    new_wwn = lun_status(m, "lun0")["wwn"]
    p83 = inquiry(reply, 0x83)
    assert f"Designator:[{new_wwn}]" in p83
    # a forced delete unshares: the target is gone, and so is tgtd
    m.ok("delete", "lun0 force=yes")
    port = int(reply["portal"].rpartition(":")[2])
    assert not tgtd_pids(port)
    assert run(["iscsi-ls", f"iscsi://{reply['portal']}"], check=False).returncode
    with open(os.path.join(m.array, "shares.json")) as f:
        assert json.load(f)["shares"] == {}


def test_hidden_luns_and_shadow_copies_are_not_shared(shared):
    m = shared.m
    m.ok("hidden", "lun0 on")
    err, r = m.ctl("share", "lun0")
    assert r["errno"] == "EINVAL" and "hidden" in r["message"]
    m.ok("hidden", "lun0 off")
    m.ok("snapshot", "lun0 set=s1")
    err, r = m.ctl("share", "s1/lun0")
    assert r["errno"] == "EINVAL" and "only LUNs" in r["message"]
    for bad in ("lun0 portal=localhost:3260", "lun0 initiator=host1", "nosuch"):
        err, r = m.ctl("share", bad)
        assert r["errno"] in ("EINVAL", "ENOENT"), (bad, r)
    err, r = m.ctl("unshare", "lun0")
    assert r["errno"] == "ENOENT"
    assert lun_status(m, "lun0")["iscsi"] is None
    # two LUNs whose names make the same target name: the second is refused
    m.ok("create", "Data_1 1M")
    m.ok("create", "data-1 1M")
    portal = shared.portal()
    shared.share("Data_1", portal=portal)
    err, r = m.ctl("share", f"data-1 portal={portal}")
    assert r["errno"] == "EEXIST" and "Data_1" in r["message"], r
    assert lun_status(m, "data-1")["iscsi"] is None


def test_only_the_initiators_given_may_log_in(shared):
    allowed = "iqn.2026-12.org.example:allowed"
    reply = shared.share("lun0", f"initiator={allowed},iqn.2026-12.org.example:other")
    assert reply["initiators"] == f"{allowed},iqn.2026-12.org.example:other"
    with initiator(reply, name=allowed) as s:
        assert s.capacity() == 64 << 20
    with pytest.raises(ConnectionError):
        initiator(reply, name="iqn.2026-12.org.example:intruder")
    r = run(["iscsi-inq", "-i", "iqn.2026-12.org.example:intruder", url(reply)], check=False)
    assert r.returncode
    # sharing again with other options changes them, and keeps what is not given
    reply2 = shared.m.ok("share", "lun0 initiator=iqn.2026-12.org.example:intruder")
    assert reply2["portal"] == reply["portal"]
    with initiator(reply, name="iqn.2026-12.org.example:intruder") as s:
        assert s.capacity() == 64 << 20


def test_a_portal_in_use_is_refused_and_leaves_no_tgtd(shared):
    m = shared.m
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        shared.ports.append(port)
        err, r = m.ctl("share", f"lun0 portal=127.0.0.1:{port}")
        assert r["errno"] == "EBUSY" and "in use" in r["message"], r
        assert not tgtd_pids(port)
    assert lun_status(m, "lun0")["iscsi"] is None
    assert lun_status(m, "lun0")["open"] == 0


def test_shares_survive_unmount_and_mount_and_unshare_ends_them(shared):
    m = shared.m
    reply = shared.share("lun0")
    port = int(reply["portal"].rpartition(":")[2])
    with initiator(reply) as s:
        s.write(0, b"g" * 4096)
    m.stop()                       # fusearray umount: tgtd first, then the unmount
    assert not tgtd_pids(port)
    m.start()
    assert lun_status(m, "lun0")["iscsi"]["serving"]
    with initiator(reply) as s:
        assert s.read(0, 4096) == b"g" * 4096
    # SIGTERM: tgtd is stopped and the mount goes
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=60) == 0, m.output()
    m.proc = None
    assert not tgtd_pids(port) and not os.path.ismount(m.mnt)
    m.start()
    assert lun_status(m, "lun0")["iscsi"]["serving"]
    # unshare ends the target and tgtd, and the next mount does not share it
    m.ok("unshare", "lun0")
    assert not tgtd_pids(port)
    assert lun_status(m, "lun0")["iscsi"] is None and lun_status(m, "lun0")["open"] == 0
    assert run(["iscsi-ls", f"iscsi://{reply['portal']}"], check=False).returncode
    m.stop()
    m.start()
    assert lun_status(m, "lun0")["iscsi"] is None and not tgtd_pids(port)


def test_a_failed_unmount_serves_the_shares_again(shared, tmp_path):
    m = shared.m
    reply = shared.share("lun0")
    fd = os.open(m.path("luns", "lun0"), os.O_RDONLY)      # makes the unmount busy
    try:
        r = cli("umount", m.mnt, check=False)
        assert r.returncode == 1 and "cannot unmount" in r.stderr
    finally:
        os.close(fd)
    assert lun_status(m, "lun0")["iscsi"]["serving"]
    with initiator(reply) as s:
        assert s.capacity() == 64 << 20


def test_a_tgtd_left_by_a_killed_daemon_is_stopped_at_the_next_mount(shared):
    m = shared.m
    reply, port, old = shared.share_one()
    with open(os.path.join(m.array, "run", "tgtd.json")) as f:
        assert json.load(f)[reply["portal"]]["pid"] == old
    m.kill9()
    assert tgtd_pids(port) == [old]            # left running, holding the portal
    m.start()
    assert old not in tgtd_pids(port)
    [new] = tgtd_pids(port)
    assert f"stopped tgtd (pid {old}" in m.events()
    with initiator(reply) as s:
        assert s.capacity() == 64 << 20


def test_a_tgtd_that_dies_is_an_error_and_share_serves_again(shared):
    m = shared.m
    reply, port, pid = shared.share_one()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not lun_status(m, "lun0")["iscsi"]["serving"], 10, "the share to drop")
    st = lun_status(m, "lun0")["iscsi"]
    assert f"tgtd (pid {pid})" in st["error"]
    assert "not served" in m.view("status")
    assert f"tgtd (pid {pid}) for {reply['portal']} exited" in m.events()
    m.ok("share", "lun0")                     # as recorded
    with initiator(reply) as s:
        assert s.capacity() == 64 << 20


def test_the_cli_share_and_unshare(shared):
    m = shared.m
    portal = shared.portal()
    r = cli("share", "lun0", "--portal", portal, "--initiator", "iqn.2026-12.org.example:a",
            "--initiator", "iqn.2026-12.org.example:b", mnt=m.mnt)
    assert f"portal={portal}" in r.stdout
    assert "initiators=iqn.2026-12.org.example:a,iqn.2026-12.org.example:b" in r.stdout
    cli("unshare", "lun0", "--keep", mnt=m.mnt)
    st = lun_status(m, "lun0")["iscsi"]
    assert not st["serving"] and st["initiators"] == ["iqn.2026-12.org.example:a",
                                                      "iqn.2026-12.org.example:b"]
    cli("unshare", "lun0", mnt=m.mnt)
    assert lun_status(m, "lun0")["iscsi"] is None
    r = cli("share", "lun0", "--portal", "nowhere", mnt=m.mnt, check=False)
    assert r.returncode == 1 and "bad portal" in r.stderr


def test_a_share_that_cannot_be_served_at_mount_is_a_warning(shared):
    m = shared.m
    reply = shared.share("lun0")
    port = int(reply["portal"].rpartition(":")[2])
    m.stop()
    with socket.socket() as holder:         # someone took the portal meanwhile
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        m.start()
        assert any("lun0 is not served over iSCSI" in w and "in use" in w
                   for w in m.warnings), m.warnings
        st = lun_status(m, "lun0")["iscsi"]
        assert not st["serving"] and "in use" in st["error"]
        assert not tgtd_pids(port) and lun_status(m, "lun0")["open"] == 0
    m.ok("share", "lun0")                   # as recorded, now that the port is free
    with initiator(reply) as s:
        assert s.capacity() == 64 << 20
