"""The tests' throw-away Ceph cluster (RADOS): the gate and the cluster
object behind the session fixture `ceph` (tests/conftest.py).

`require_ceph()` is the gate: it skips when this machine cannot run the
cluster (`ceph_available()` says why), unless FUSEARRAY_REQUIRE_CEPH=1 (CI),
where it fails instead.

`CephCluster(base).start()` runs tools/ceph-up in `base`: one mon and one
memstore OSD on 127.0.0.1, ports picked free by ceph-up, auth none, pool
size 1, no mgr; `start_rgw()` adds radosgw (S3, tools/rgw-up) to it for the
`s3` fixture, gated by `require_rgw()`. `stop()` runs tools/ceph-down (the daemons by their pid
files) and checks that none of them still runs. docs/ceph.md has the facts
(times, RAM, ports).
"""
import functools
import itertools
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CEPH_UP = ROOT / "tools" / "ceph-up"
CEPH_DOWN = ROOT / "tools" / "ceph-down"
RGW_UP = ROOT / "tools" / "rgw-up"
#: what tools/ceph-up runs (ceph-mon, ceph-osd: the daemons; the rest: its clients)
BINARIES = ("ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rados")
#: memstore's nominal capacity: RAM is taken only as objects are written; big
#: enough that a rados pack takes a thin 1 TiB LUN (at most 16x a pack's
#: capacity), as the shadow copy and transport tests make (FUSEARRAY_TEST_PACK=rados)
OSD_BYTES = 128 << 30
#: ceph-up refuses a longer directory (the admin sockets' paths must fit sun_path)
MAX_DIR = 80


@functools.cache
def ceph_available() -> str | None:
    """None if a cluster can run here and this Python can talk to it, else
    the reason."""
    for b in BINARIES:
        if not shutil.which(b):
            return f"{b} is not installed (tools/setup.sh installs the ceph packages)"
    try:
        import rados  # noqa: F401  (Debian's python3-rados, through the venv's .pth)
    except ImportError as e:
        return f"`import rados` fails ({e}); tools/setup.sh links Debian's module into the venv"
    return None


def require_ceph() -> None:
    why = ceph_available()
    if why is None:
        return
    if os.environ.get("FUSEARRAY_REQUIRE_CEPH") == "1":
        pytest.fail(f"Ceph is required (FUSEARRAY_REQUIRE_CEPH=1) but: {why}")
    pytest.skip(f"Ceph unavailable: {why}")


def _alive(pid: int, conf: str) -> bool:
    """Is `pid` a ceph daemon run with `-c conf` that has not ended? (A
    zombie has ended: it only waits for its parent to reap it; a pid taken
    meanwhile by another process is not ours.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(") ", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    name = os.path.basename(args[0])
    return (name.startswith(b"ceph-") or name == b"radosgw") and conf.encode() in args


def rgw_available() -> str | None:
    """None if radosgw can run here and boto3 is importable, else the reason."""
    why = ceph_available()
    if why is not None:
        return why
    for b in ("radosgw", "radosgw-admin", "curl"):
        if not shutil.which(b):
            return f"{b} is not installed (tools/setup.sh installs radosgw)"
    try:
        import boto3  # noqa: F401
    except ImportError as e:
        return f"`import boto3` fails ({e}); tools/setup.sh installs the package with it"
    return None


def require_rgw() -> None:
    """The gate of the `s3` fixture: as require_ceph (FUSEARRAY_REQUIRE_CEPH=1
    makes it fail instead of skipping)."""
    why = rgw_available()
    if why is None:
        return
    if os.environ.get("FUSEARRAY_REQUIRE_CEPH") == "1":
        pytest.fail(f"radosgw is required (FUSEARRAY_REQUIRE_CEPH=1) but: {why}")
    pytest.skip(f"radosgw unavailable: {why}")


class CephCluster:
    """One running cluster. Public: `dir`, `conf`, `pids`, `mon_port`,
    `mon_v2_port`, `new_pool()`, `health()`, `running()`, `start_rgw()`,
    `stop()`."""

    def __init__(self, base: str | os.PathLike):
        base = pathlib.Path(base)
        self._own_dir = len(str(base)) > MAX_DIR
        if self._own_dir:       # a long basetemp: a short directory of our own
            base = pathlib.Path(tempfile.mkdtemp(prefix="fa-ceph-", dir="/tmp"))
        #: the cluster's directory: ceph.conf, run/ (pid files, sockets), log/
        self.dir = base
        #: path of ceph.conf: all a client needs (rados.Rados(conffile=...))
        self.conf = str(base / "ceph.conf")
        #: {"mon.a": pid, "osd.0": pid}: the daemons, from their pid files
        self.pids: dict[str, int] = {}
        self.mon_port = self.mon_v2_port = None
        self._admin = None
        self._names = itertools.count(1)

    def start(self, timeout: float = 180) -> "CephCluster":
        env = {k: v for k, v in os.environ.items()
               if k not in ("MGR", "MON_PORT", "MON_V2_PORT", "POOL", "OSD_BYTES")}
        env["OSD_BYTES"] = str(OSD_BYTES)
        r = subprocess.run([str(CEPH_UP), str(self.dir)], capture_output=True, text=True,
                           env=env, timeout=timeout)
        last = r.stdout.strip().splitlines()[-1:] or [""]
        if r.returncode or last[0] != f"CEPH_CONF={self.conf}":
            raise AssertionError(f"tools/ceph-up failed ({r.returncode}):\n{r.stderr}{r.stdout}")
        for f in sorted((self.dir / "run").glob("*.pid")):
            self.pids[f.name.removesuffix(".pid")] = int(f.read_text())
        text = pathlib.Path(self.conf).read_text()
        m = re.search(r"^mon host = \[v2:127\.0\.0\.1:(\d+),v1:127\.0\.0\.1:(\d+)\]", text, re.M)
        self.mon_v2_port, self.mon_port = int(m.group(1)), int(m.group(2))
        import rados
        self._admin = rados.Rados(conffile=self.conf)
        self._admin.connect(timeout=30)
        return self

    def start_rgw(self, timeout: float = 180) -> dict:
        """Start radosgw on this cluster (tools/rgw-up: a free port, one S3
        user); returns the AWS_* variables of a client of it (DIR/s3.env).
        Its pid joins `pids` ("client.rgw.a"); stop() stops it first."""
        r = subprocess.run([str(RGW_UP), str(self.dir)], capture_output=True, text=True,
                           timeout=timeout)
        env_file = self.dir / "s3.env"
        last = r.stdout.strip().splitlines()[-1:] or [""]
        if r.returncode or last[0] != f"S3_ENV={env_file}":
            raise AssertionError(f"tools/rgw-up failed ({r.returncode}):\n{r.stderr}{r.stdout}")
        self.pids["client.rgw.a"] = int((self.dir / "run" / "client.rgw.a.pid").read_text())
        return dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                    if "=" in line)

    def stop_rgw(self, timeout: float = 60) -> None:
        """Stop radosgw only (RGW_ONLY=1 tools/ceph-down); fails if it survives."""
        pid = self.pids.pop("client.rgw.a", None)
        if pid is None:
            return
        r = subprocess.run([str(CEPH_DOWN), str(self.dir)], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "RGW_ONLY": "1"})
        if r.returncode or _alive(pid, self.conf):
            raise AssertionError(f"radosgw (pid {pid}) not stopped ({r.returncode}):\n"
                                 f"{r.stderr}{r.stdout}")

    def _mon(self, **cmd) -> bytes:
        ret, out, errs = self._admin.mon_command(json.dumps(cmd), b"", timeout=60)
        if ret:
            raise AssertionError(f"mon command {cmd} failed ({ret}): {errs}")
        return out

    def new_pool(self) -> str:
        """A fresh pool of its own (a unique name), ready for writes: its
        name. Pools may be deleted (`mon allow pool delete`)."""
        name = f"t{next(self._names)}-{uuid.uuid4().hex[:8]}"
        self._admin.create_pool(name)
        self._mon(prefix="osd pool application enable", pool=name, app="rados")
        with self._admin.open_ioctx(name) as io:     # returns once its PGs are active
            io.write_full("pool-ready-probe", b"x")
            io.remove_object("pool-ready-probe")
        return name

    def client(self):
        """The cluster's own connected rados.Rados (the tests' admin client:
        use it, do not shut it down)."""
        return self._admin

    def drop_pool(self, name: str) -> None:
        """Delete a pool new_pool made (memstore keeps its data in RAM)."""
        self._admin.delete_pool(name)

    def health(self) -> dict:
        """The mon's health: {"status": "HEALTH_OK" | "HEALTH_WARN" |
        "HEALTH_ERR", "checks": {check name: its summary}}."""
        h = json.loads(self._mon(prefix="health", format="json"))
        return {"status": h["status"],
                "checks": {k: v["summary"]["message"] for k, v in h.get("checks", {}).items()}}

    def running(self) -> list[str]:
        """The names of `pids` whose daemon still runs."""
        return [n for n, p in self.pids.items() if _alive(p, self.conf)]

    def stop(self, timeout: float = 120) -> None:
        """Stop every daemon (tools/ceph-down, by PID); fails if one survives."""
        if self._admin is not None:
            self._admin.shutdown()
            self._admin = None
        try:
            r = subprocess.run([str(CEPH_DOWN), str(self.dir)], capture_output=True, text=True,
                               timeout=timeout)
            left = {n: self.pids[n] for n in self.running()}
            if r.returncode or left:
                raise AssertionError(f"tools/ceph-down failed ({r.returncode}), still running: "
                                     f"{left}:\n{r.stderr}{r.stdout}")
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
