"""Fitting the host's own tools (issue 18 points 2 and 4): the mount(8)
helper (`mount -t fuse.fusearray`, an fstab line), the systemd unit
(`fusearray install-unit`) and the CLI's conventions (--version, --help,
exit codes, ctl/status ending with a newline).

The mount tests run the real mount(8): libmount looks for the helper only
in /sbin, /sbin/fs.d and /sbin/fs (not on PATH, which it clears), so the
`helper_link` fixture makes /sbin/mount.fuse.fusearray point at this
venv's `mount.fusearray` for the test (tools/setup.sh installs it for good)
and puts back what was there before.
"""
import os
import shutil
import subprocess
import sys

import pytest

from fusearray import ctlclient, mounthelper, systemdunit
from fusearray.mounthelper import HelperError, map_options

from conftest import (cli, end_helper_mounts, exited, fusearray_mounts, require_fuse, run,
                      wait_for)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the helper's options (no mount) ---------------------------------------------------
def test_mount_options_map_onto_fusearray_mount():
    args, ignored = map_options(
        ["rw", "cache_size=300M", "owner=root", "group=disk", "mode=0640", "ctl_group=adm",
         "log=/var/log/fa", "fsync=commit", "debug", "_netdev", "nofail", "noauto",
         "x-systemd.requires=foo.service", "comment=x", "owner", "nosuid"])
    assert args == ["--cache-size", "300M", "--owner", "root", "--group", "disk",
                    "--mode", "0640", "--ctl-group", "adm", "--log", "/var/log/fa",
                    "--fsync", "commit", "--debug"]
    assert ignored == ["rw", "_netdev", "nofail", "noauto", "x-systemd.requires=foo.service",
                       "comment=x", "owner", "nosuid"]
    assert map_options(["cache-size=1G"])[0] == ["--cache-size", "1G"]   # either spelling


@pytest.mark.parametrize("opt, says", [
    ("ro", "unknown mount option 'ro'"), ("noexec", "unknown mount option 'noexec'"),
    ("bogus=1", "unknown mount option 'bogus=1'"), ("cache_size", "needs a value"),
    ("cache_size=", "needs a value"), ("debug=yes", "takes no value"),
    ("fsync=sometimes", "fsync= is log or commit")])
def test_bad_mount_options_are_refused(opt, says):
    with pytest.raises(HelperError, match=says):
        map_options(["rw", opt])


def test_sloppy_ignores_unknown_options_only():
    assert map_options(["ro", "cache_size=1G"], sloppy=True) == (["--cache-size", "1G"],
                                                                  ["ro"])
    with pytest.raises(HelperError):
        map_options(["cache_size"], sloppy=True)


def test_helper_exit_codes_without_mounting(tmp_path, capsys):
    """mount(8)'s codes: 1 for a bad invocation, 32 for a failure; -f
    (fake) checks and mounts nothing."""
    assert mounthelper.main([]) == 1                                  # no ARRAY MOUNTPOINT
    assert mounthelper.main([str(tmp_path / "no-array"), str(tmp_path)]) == 32
    assert "is not a fusearray array" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "array.json").write_text("{}")
    assert mounthelper.main([str(tmp_path / "a"), str(tmp_path), "-o", "ro"]) == 32
    assert mounthelper.main([str(tmp_path / "a"), str(tmp_path / "nodir")]) == 32
    assert mounthelper.main([str(tmp_path / "a"), str(tmp_path), "-f", "-o",
                             "cache_size=1G,_netdev"]) == 0


# ---- the systemd unit (no systemd) -----------------------------------------------------
def test_contrib_unit_is_the_template():
    with open(os.path.join(REPO, "contrib", "fusearray@.service")) as f:
        assert f.read() == systemdunit.UNIT_TEMPLATE


@pytest.mark.parametrize("path", ["/mnt/fusearray", "/", "/mnt/a b/.x-y/", "//srv//é",
                                  "/var/lib/x_y:z.1"])
def test_instance_names_are_systemd_escape_paths(path):
    want = {"/mnt/fusearray": "mnt-fusearray", "/": "-"}.get(path)
    if want is not None:
        assert systemdunit.escape_path(path) == want
    if shutil.which("systemd-escape"):
        r = run(["systemd-escape", "--path", path])
        assert systemdunit.escape_path(path) == r.stdout.strip()


def test_install_unit_writes_the_unit_and_the_array(tmp_path):
    root = tmp_path / "root"
    r = cli("install-unit", "/srv/arrays/a1", "/mnt/a 1", "--root", str(root),
            "--cache-size", "1G", "--owner", "root", "--fsync", "commit")
    inst = "mnt-a\\x201"
    unit = root / "etc/systemd/system/fusearray@.service"
    env = root / "etc/fusearray" / f"{inst}.conf"
    assert f"systemctl enable --now fusearray@{inst}.service" in r.stdout
    fusearray = os.path.join(os.path.dirname(sys.executable), "fusearray")
    text = unit.read_text()
    assert text == systemdunit.UNIT_TEMPLATE.replace("/usr/local/bin/fusearray", fusearray)
    assert f"ExecStart={fusearray} mount --background ${{ARRAY}} %f $OPTIONS" in text
    assert f"ExecStop={fusearray} umount %f" in text
    assert "EnvironmentFile=/etc/fusearray/%i.conf" in text
    lines = env.read_text().splitlines()
    assert "ARRAY=/srv/arrays/a1" in lines
    assert "OPTIONS=--cache-size 1G --owner root --fsync commit" in lines
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    # the defaults: up's array and mountpoint; a bad size is refused
    r = cli("install-unit", "--root", str(root))
    assert "fusearray@mnt-fusearray.service" in r.stdout
    assert (root / "etc/fusearray/mnt-fusearray.conf").exists()
    r = cli("install-unit", "--root", str(root), "--cache-size", "lots", check=False)
    assert r.returncode == 1 and "cache size" in r.stderr


def test_install_unit_and_the_helper_take_an_array_in_a_cluster(tmp_path, monkeypatch):
    """install-unit rados:POOL/NAME: the spec kept as it is (no path made
    of it), the cluster's conf and the cache directory written into the
    options (the unit runs without $CEPH_CONF); refused without a cluster
    named, and --cache-dir for a local array. The helper checks the same
    without mounting (-f)."""
    root = tmp_path / "root"
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    r = cli("install-unit", "rados:fa/db", "/mnt/db", "--root", str(root), "--ceph-conf",
            str(conf), "--cache-dir", str(tmp_path / "c"), "--lease", "10")
    lines = (root / "etc/fusearray/mnt-db.conf").read_text().splitlines()
    assert "ARRAY=rados:fa/db" in lines, lines
    assert f"OPTIONS=--lease 10 --ceph-conf {conf} --cache-dir {tmp_path / 'c'}" in lines, lines
    assert "rados:fa/db on /mnt/db" in r.stdout
    env = dict(os.environ)
    env.pop("CEPH_CONF", None)
    if not os.path.exists("/etc/ceph/ceph.conf"):
        r = run([sys.executable, "-m", "fusearray", "install-unit", "rados:fa/db", "/mnt/db",
                 "--root", str(root)], env=env, check=False)
        assert r.returncode == 1 and "give --ceph-conf" in r.stderr, r.stderr
    for args, says in ((["rados:bad pool/x", "/mnt/x", "--ceph-conf", str(conf)], "bad array"),
                       (["/srv/a", "/mnt/a", "--cache-dir", "/c"], "for an array in a Ceph")):
        r = cli("install-unit", *args, "--root", str(root), check=False)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the helper, checking only (-f)
    monkeypatch.delenv("CEPH_CONF", raising=False)
    assert mounthelper.main(["rados:fa/db", str(tmp_path), "-f", "-o",
                             f"ceph_conf={conf},cache_dir={tmp_path}/c,lease=10"]) == 0
    assert mounthelper.main(["rados:bad pool/db", str(tmp_path), "-f", "-o",
                             f"ceph_conf={conf}"]) == 32
    cli("init", str(tmp_path / "a"))
    assert mounthelper.main([str(tmp_path / "a"), str(tmp_path), "-f", "-o",
                             f"cache_dir={tmp_path}/c"]) == 32
    monkeypatch.setattr(mounthelper, "DEFAULT_CEPH_CONF", str(tmp_path / "none.conf"))
    assert mounthelper.main(["rados:fa/db", str(tmp_path), "-f"]) == 32


def test_installed_unit_passes_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    root = tmp_path / "root"
    cli("install-unit", str(tmp_path / "array"), "/mnt/x", "--root", str(root))
    text = (root / "etc/systemd/system/fusearray@.service").read_text()
    # an instance is verified through a file of its name (the template's text)
    (tmp_path / "units").mkdir()
    inst = tmp_path / "units" / "fusearray@mnt-x.service"
    inst.write_text(text)
    r = run(["systemd-analyze", "verify", str(inst)], check=False)
    assert r.returncode == 0, r.stderr
    assert "fusearray@mnt-x.service" not in r.stderr, r.stderr
    # and verify does see a broken unit (a command that does not exist)
    inst.write_text(text.replace(os.path.join(os.path.dirname(sys.executable), "fusearray"),
                                 str(tmp_path / "no-such-fusearray")))
    r = run(["systemd-analyze", "verify", str(inst)], check=False)
    assert r.returncode != 0 and "no-such-fusearray" in r.stderr


# ---- the CLI's conventions (no mount) ----------------------------------------------------
def test_version_help_and_usage_exit_codes():
    r = cli("--version")
    assert r.stdout.startswith("fusearray 0.1.0\n") and "native:" in r.stdout
    help_text = cli("--help").stdout
    for cmd, what in (("status", "ctl/status"), ("events", "events"), ("jobs", "jobs"),
                      ("install-unit", "systemd")):
        line = next(ln for ln in help_text.splitlines() if ln.split()[:1] == [cmd])
        assert what in line, line
    assert cli(check=False).returncode == 2                       # no command
    assert cli("frobnicate", check=False).returncode == 2         # unknown command
    assert cli("mount", "only-one-arg", check=False).returncode == 2
    r = cli("status", mnt="/nonexistent-fusearray-mount", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("fusearray: /nonexistent-fusearray-mount is not a mounted "
                               "fusearray")


# ---- real mounts through mount(8) ----------------------------------------------------------
def test_mount_t_and_fstab_through_the_helper(tmp_path, helper_link):
    array, mnt = str(tmp_path / "array"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    cli("init", array)
    pids = []
    try:
        # mount -t, with fusearray's options and generic ones
        r = run(["mount", "-t", "fuse.fusearray", array, mnt, "-o",
                 "defaults,_netdev,nofail,cache_size=300M,mode=0640,fsync=commit"])
        assert f"mounted {array} on {mnt}" in r.stdout
        assert [ln.split()[2] for ln in fusearray_mounts(mnt)] == ["fuse.fusearray"]
        st = ctlclient.status(mnt)
        pids.append(st["pid"])
        assert st["array"] == array and st["cache"]["limit_bytes"] == 300 << 20
        with open(f"/proc/{st['pid']}/cmdline") as f:
            cmdline = f.read().split("\0")
        assert cmdline[cmdline.index("--mode") + 1] == "0640"
        assert cmdline[cmdline.index("--fsync") + 1] == "commit"
        # ctl/status, status.json and events end with a newline (point 4)
        for view in ("status", "status.json", "events"):
            with open(os.path.join(mnt, "ctl", view), "rb") as f:
                assert f.read().endswith(b"\n"), view
        assert cli("status", mnt=mnt).stdout.endswith("\n")
        # exit codes of a refused verb: 1, the errno named (point 4)
        cli("create", "lun0", "16M", mnt=mnt)
        r = cli("create", "lun0", "16M", mnt=mnt, check=False)
        assert r.returncode == 1 and r.stderr.startswith("fusearray: ") and "[EEXIST]" \
            in r.stderr
        # mounting it again is a no-op (mount -a cannot tell: the source is "fusearray")
        run(["mount", "-t", "fuse.fusearray", array, mnt])
        assert len(fusearray_mounts(mnt)) == 1
        # umount(8): the daemon commits and exits, the mount is gone
        run(["umount", mnt])
        wait_for(lambda: exited(pids[-1]), 60, "the daemon to exit after umount")
        assert not fusearray_mounts(mnt)

        # an fstab line (mount --fstab FILE MOUNTPOINT: the same path as /etc/fstab)
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# a test fstab\n{array} {mnt} fuse.fusearray "
                         "defaults,_netdev,nofail,x-systemd.requires=foo.service,"
                         "cache_size=280M 0 0\n")
        run(["mount", "--fstab", str(fstab), mnt])
        st = ctlclient.status(mnt)
        pids.append(st["pid"])
        assert st["cache"]["limit_bytes"] == 280 << 20
        assert [v["name"] for v in st["luns"]] == ["lun0"]       # the same array
        run(["mount", "-a", "--fstab", str(fstab)])              # already mounted: fine
        assert len(fusearray_mounts(mnt)) == 1
        run(["umount", mnt])
        wait_for(lambda: exited(pids[-1]), 60, "the daemon to exit after umount")
        assert not fusearray_mounts(mnt)

        # a bad option: exit 32, said why, nothing mounted, no daemon started
        for opts, says in (("ro", "unknown mount option 'ro'"),
                           ("cache_size=300M,bogus=1", "unknown mount option 'bogus=1'"),
                           ("owner=no-such-user-here", "no such user")):
            r = run(["mount", "-t", "fuse.fusearray", array, mnt, "-o", opts], check=False)
            assert r.returncode == 32, (opts, r.stderr)
            assert says in r.stderr, r.stderr
            assert not fusearray_mounts(mnt) and not os.path.ismount(mnt)
        fstab.write_text(f"{array} {mnt} fuse.fusearray defaults,noexec 0 0\n")
        r = run(["mount", "--fstab", str(fstab), mnt], check=False)
        assert r.returncode == 32 and "noexec" in r.stderr
        assert not fusearray_mounts(mnt)
    finally:
        end_helper_mounts(mnt, pids)


def test_up_install_unit(tmp_path):
    require_fuse()
    array, mnt, root = tmp_path / "array", tmp_path / "mnt", tmp_path / "root"
    r = cli("up", "--array", str(array), "--mountpoint", str(mnt), "--install-unit",
            "--root", str(root))
    try:
        inst = systemdunit.escape_path(str(mnt))
        assert f"systemctl daemon-reload && systemctl enable --now fusearray@{inst}.service" \
            in r.stdout
        assert f"fusearray umount {mnt}` first" in r.stdout
        assert (root / "etc/systemd/system/fusearray@.service").exists()
        assert f"ARRAY={array}" in (root / "etc/fusearray" / f"{inst}.conf").read_text()
    finally:
        cli("umount", str(mnt), check=False)
        if fusearray_mounts(str(mnt)):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
