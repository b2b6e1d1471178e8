"""Defects the model-based test (tests/test_model.py) found, each as a
short deterministic sequence on a real mount."""
import errno
import os

import pytest

from conftest import Mount

MiB = 1 << 20


def lun_bytes(m: Mount, name: str) -> bytes:
    with open(m.path("luns", name), "rb") as f:
        return f.read()


def fill(m: Mount, name: str, byte: int) -> bytes:
    data = bytes([byte]) * MiB
    fd = os.open(m.path("luns", name), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, 0) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    return data


@pytest.fixture
def two_packs(make_mount, tmp_path):
    m = make_mount()
    m.init("--pack", f"main=single:{tmp_path / 'd1'}", "--pack", f"p2=single:{tmp_path / 'e1'}")
    m.start()
    return m


@pytest.mark.parametrize("case", ["new LUN", "overwritten LUN"])
def test_resync_refused_by_a_later_pair_changes_nothing(two_packs, case):
    """`resync` with several pairs, the last refused with EOPNOTSUPP (its
    destination lives on another pack than pack=): the pairs before it were
    applied in memory before the check (a LUN created, or an existing LUN
    given the shadow copy's content and an undo set taken), and the next
    commit stored them. Found by the model test: `ls luns/` showed a LUN
    the refused command had made."""
    m = two_packs
    m.ok("create", f"a {MiB}")
    m.ok("create", f"b {MiB}")
    m.ok("create", f"c {MiB} pack=p2")
    old = fill(m, "a", 0x11)
    m.ok("snapshot", "a b set=s")
    now = fill(m, "a", 0x22)
    before = m.status()
    if case == "new LUN":         # s/a=new would make LUN new; s/b is refused
        line = "s/a=new s/b pack=p2"
    else:                         # s/a overwrites a; s/b=c is refused (c is on p2)
        line = "s/a s/b=c pack=main"
    err, reply = m.ctl("resync", line)
    assert err == errno.EOPNOTSUPP and reply["status"] == "error", reply

    def unchanged(when):
        s = m.status()
        assert [v["name"] for v in s["luns"]] == ["a", "b", "c"], (when, s["luns"])
        assert [x["name"] for x in s["sets"]] == ["s"], (when, s["sets"])
        assert [j["id"] for j in s["jobs"]] == [j["id"] for j in before["jobs"]], when
        assert sorted(os.listdir(m.path("luns"))) == ["a", "b", "c"], when
        assert lun_bytes(m, "a") == now, f"{when}: LUN a lost its writes"
    unchanged("right after the refused resync")
    m.ok("create", f"d {MiB}")          # a later commit must not store it either
    m.ok("delete", "d")
    m.stop()
    m.start()
    unchanged("after a remount")
    assert old != now
