"""Shared fixtures: the FUSE gate, a daemon-in-a-subprocess mount, the
cost tiers and the daemon-log check.

`require_fuse()` is the one gate: it skips when the machine cannot mount
FUSE, unless FUSEARRAY_REQUIRE_FUSE=1 (CI), where it fails instead.

`ceph` (session scope) is one throw-away Ceph cluster for the tests of a
RADOS backend, started by the first test that asks for it; its gate,
`cephcluster.require_ceph()`, skips unless FUSEARRAY_REQUIRE_CEPH=1
(tests/cephcluster.py, docs/ceph.md).

`helper_link` points /sbin/mount.fuse.fusearray at this venv's mount(8)
helper for a test and puts back what was there (test_hostfit,
test_rados_array).

`Mount` starts `python -m fusearray.daemon` as a child, waits for its
readiness line, and in `close()` (always run, from `finally`) unmounts every
filesystem and detaches every loop device it recorded, unmounts the FUSE
mount and ends the daemon by PID.

Tiers (pytest markers, one per test, set here in
pytest_collection_modifyitems): `unit` (no array on disk: parsers,
formats, pure functions), `array` (an Array in this process, no FUSE),
`mount` (one FUSE mount, a daemon in a subprocess), `heavy` (ext4,
crash loops, fault injection, model runs: minutes). `pytest -m unit` is
the fast core; `pytest -m "not heavy"` everything but the long runs.

Daemon logs: after each test, every daemon log it left (ARRAY/daemon.log,
the daemon's captured output daemon.out, under the test's tmp_path or of
a Mount it made) is read, and so is what an Array in the test's own
process logged (the "fusearray" logger); a Python traceback, an "internal
error", a CRITICAL record or a fatal-signal dump fails the test. A test that
provokes one on purpose says which with
`@pytest.mark.daemon_errors("regex", ...)`: only records matching one of
them are allowed (a pattern that matches everything is refused).
"""
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fusearray import ctlclient
import packbackend

PY = sys.executable


def fuse_available() -> str | None:
    """None if FUSE mounts can work here, else the reason."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "not root (loop devices and allow_other need root)"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed"
    return None


def require_fuse() -> None:
    why = fuse_available()
    if why is None:
        return
    if os.environ.get("FUSEARRAY_REQUIRE_FUSE") == "1":
        pytest.fail(f"FUSE is required (FUSEARRAY_REQUIRE_FUSE=1) but: {why}")
    pytest.skip(f"FUSE unavailable: {why}")


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r


def cli(*args, check=True, mnt=None) -> subprocess.CompletedProcess:
    pre = ["-m", mnt] if mnt else []
    return run([PY, "-m", "fusearray", *pre, *args], check=check)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop_caches() -> None:
    """Empty the page cache: the next reads go to the disks."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def write_files(root: str, prefix: str, sizes, rng) -> dict:
    """Write files of random content; returns {path: sha256}."""
    out = {}
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        p = os.path.join(root, f"{prefix}-{i}.bin")
        with open(p, "wb") as f:
            f.write(data)
        out[p] = sha(data)
    return out


def write_synced(path: str, nbytes: int, off: int = 0) -> bytes:
    """Random bytes written at `off` of a file (a LUN) and fsync'd: what
    was written."""
    data = os.urandom(nbytes)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return data


def read_at(path: str, off: int = 0, n: int = -1) -> bytes:
    """`n` bytes of a file from `off` (-1: to its end)."""
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def end_proc(p: subprocess.Popen | None) -> None:
    """Kill a process we started (by its Popen) and reap it."""
    if p is not None and p.poll() is None:
        p.kill()
    if p is not None:
        p.wait(timeout=30)


def wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Mount:
    def __init__(self, tmp_path, array=None, cache_size=None):
        _LOGS.update((os.path.join(array or tmp_path / "array", "daemon.log"),
                      os.path.join(tmp_path, "daemon.out")))
        self.base = tmp_path
        self.array = str(array or tmp_path / "array")
        self.mnt = str(tmp_path / "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.cache_size = cache_size
        self.proc: subprocess.Popen | None = None
        self.loops: list[str] = []
        self.fs_mounts: list[str] = []
        self.warnings: list[str] = []
        self.pools: list[str] = []      # made for a rados default pack (packbackend)

    # -- lifecycle --
    def init(self, *args):
        """`fusearray init`; with no arguments the default pack is where
        FUSEARRAY_TEST_PACK says (tests/packbackend.py)."""
        cli("init", self.array, *(args or packbackend.default_pack_args(self.pools)))
        return self

    def start(self, *opts, env=None):
        """Mount; `opts` go to the daemon (e.g. "--group", "disk"), `env`:
        extra environment. Its `warning:` lines before `ok` (how the
        previous daemon ended) are kept in .warnings."""
        r, w = os.pipe()
        cmd = [PY, "-m", "fusearray.daemon", self.array, self.mnt, "--ready-fd", str(w), *opts]
        if self.cache_size:
            cmd += ["--cache-size", str(self.cache_size)]
        with open(self.base / "daemon.out", "ab") as log:
            self.proc = subprocess.Popen(cmd, pass_fds=(w,), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, **env) if env else None)
        os.close(w)
        with os.fdopen(r) as f:
            lines = f.read().strip().splitlines()
        self.warnings = [l.removeprefix("warning: ") for l in lines[:-1]]
        msg = lines[-1] if lines else ""
        if msg != "ok":
            self.proc.wait(timeout=30)
            raise AssertionError(f"mount failed: {msg!r}")
        assert os.path.ismount(self.mnt)
        return self

    def stop(self):
        """Clean unmount through the CLI; asserts it worked."""
        cli("umount", self.mnt)
        assert self.proc.wait(timeout=60) == 0, self.output()
        self.proc = None
        assert not os.path.ismount(self.mnt)

    def kill9(self, then=None):
        """SIGKILL the daemon and clear what it leaves (as a user would).
        `then` runs right after the daemon is dead, before the clean-up:
        end writers there, or after the lazy unmount they write into the
        host directory under the mountpoint and think it durable."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        if then is not None:
            then()
        for m in reversed(self.fs_mounts):
            run(["umount", "-l", m], check=False)
        self.fs_mounts.clear()
        for dev in self.loops:
            run(["losetup", "-d", dev], check=False)
        self.loops.clear()
        run(["fusermount3", "-u", "-z", self.mnt], check=False)

    def close(self):
        for m in reversed(self.fs_mounts):
            if os.path.ismount(m) and run(["umount", m], check=False).returncode:
                run(["umount", "-l", m], check=False)
        self.fs_mounts.clear()
        for dev in self.loops:
            run(["losetup", "-d", dev], check=False)
        self.loops.clear()
        if self.proc is not None:
            if run(["fusermount3", "-u", self.mnt], check=False).returncode \
                    and self.proc.poll() is None:
                self.proc.terminate()       # busy (e.g. a share's tgtd): the daemon's own way
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if os.path.ismount(self.mnt) or _stale(self.mnt):
            run(["fusermount3", "-u", "-z", self.mnt], check=False)
        packbackend.drop_pools(self.pools)

    def output(self) -> str:
        try:
            return (self.base / "daemon.out").read_text(errors="replace")
        except OSError:
            return ""

    # -- helpers --
    def path(self, *parts) -> str:
        return os.path.join(self.mnt, *parts)

    def ctl(self, verb: str, line: str) -> tuple[int, dict]:
        """Write a command as a script does; returns (errno or 0, reply)."""
        return ctlclient.call(self.mnt, verb, line)

    def ctl_writes(self, verb: str, chunks) -> tuple[list[int], bytes, int]:
        """Each chunk its own write(2) on one descriptor of ctl/VERB, then
        the reply read to its end, then the close: ([errno of each write or
        0], reply, errno of the close or 0)."""
        fd = os.open(self.path("ctl", verb), os.O_RDWR)
        errs, cerr = [], 0
        try:
            for c in chunks:
                try:
                    os.write(fd, c)
                    errs.append(0)
                except OSError as e:
                    errs.append(e.errno)
            reply = ctlclient.read_reply(fd)
        finally:
            try:
                os.close(fd)
            except OSError as e:
                cerr = e.errno
        return errs, reply, cerr

    def ok(self, verb: str, line: str) -> dict:
        err, reply = self.ctl(verb, line)
        assert err == 0 and reply.get("status") == "ok", (verb, line, reply)
        return reply

    def status(self) -> dict:
        return ctlclient.status(self.mnt)

    def events(self) -> str:
        return ctlclient.events(self.mnt)

    def view(self, name: str) -> str:
        """The text of ctl/NAME."""
        return ctlclient.read_view(self.mnt, name)

    def job(self, jid) -> dict:
        """ctl/jobs/ID's fields."""
        return ctlclient.job(self.mnt, jid)

    def wait_job(self, jid, states=("done",), timeout=60.0) -> dict:
        """Poll ctl/jobs/ID until its state is in `states`: its fields
        (AssertionError after `timeout`, or when it ended otherwise)."""
        try:
            return ctlclient.wait_job(self.mnt, jid, states, timeout)
        except TimeoutError as e:
            raise AssertionError(f"timed out waiting for {e}") from None

    def job_events(self, jid) -> list[str]:
        """The events that name job `jid`."""
        return [l for l in self.events().splitlines() if re.search(rf"\bjob {jid}\b", l)]

    def attach(self, lun: str) -> str:
        dev = cli("attach", lun, mnt=self.mnt).stdout.strip()
        assert dev.startswith("/dev/loop"), dev
        self.loops.append(dev)
        return dev

    def detach(self, lun: str, dev: str):
        cli("detach", lun, mnt=self.mnt)
        self.loops.remove(dev)

    def mount_fs(self, dev: str, where: str, *opts):
        os.makedirs(where, exist_ok=True)
        run(["mount", *opts, dev, where])
        self.fs_mounts.append(where)

    def umount_fs(self, where: str):
        run(["umount", where])
        self.fs_mounts.remove(where)


def _stale(path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True


@pytest.fixture
def mount(tmp_path):
    """An initialised, mounted array (default: one pack `main`)."""
    require_fuse()
    m = Mount(tmp_path)
    try:
        m.init().start()
        yield m
    finally:
        m.close()


@pytest.fixture
def make_mount(tmp_path):
    """Factory for tests that control init/start themselves."""
    require_fuse()
    made = []

    def make(sub="a", **kw):
        d = tmp_path / sub
        d.mkdir(exist_ok=True)
        m = Mount(d, **kw)
        made.append(m)
        return m
    try:
        yield make
    finally:
        for m in made:
            m.close()


# ---- tiers ---------------------------------------------------------------------------
TIERS = ("unit", "array", "mount", "heavy")
#: Files whose tests are all long runs (ext4, crash loops, faults, the model).
HEAVY_FILES = {"test_ext4.py", "test_faults.py", "test_durability.py", "test_model.py"}
MOUNT_FIXTURES = {"mount", "make_mount"}
_MOUNT_WORDS = re.compile(r"\b(require_fuse\(|Mount\(|fusermount3)")
_ARRAY_WORDS = re.compile(r"\b(Array\(|init_array|open_array|Arrays\(|_with_array)")


def _sources(item) -> str:
    """The source of the test and of the fixtures it uses (theirs first)."""
    import inspect
    out = []
    for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values():
        for d in defs:
            try:
                out.append(inspect.getsource(d.func))
            except (OSError, TypeError):
                pass
    try:
        out.append(inspect.getsource(item.function))
    except (OSError, TypeError, AttributeError):
        pass
    return "\n".join(out)


def tier_of(item) -> str:
    if any(item.get_closest_marker(t) for t in TIERS):        # set by the test itself
        return next(t for t in TIERS if item.get_closest_marker(t))
    src = _sources(item)
    fuse = bool(MOUNT_FIXTURES & set(item.fixturenames)) or bool(_MOUNT_WORDS.search(src))
    if item.path.name in HEAVY_FILES or item.get_closest_marker("slow"):
        return "heavy" if fuse else "array"
    if fuse:
        return "mount"
    if (_ARRAY_WORDS.search(src) or getattr(item.function, "__code__", None) and
            item.function.__code__.co_flags & 0x80):        # a coroutine: trio
        return "array"
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = tier_of(item)
        if not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))


# ---- daemon logs ---------------------------------------------------------------------
_LOGS: set[str] = set()             # daemon logs of the Mounts made (checked after every test)
_SEEN: dict[str, int] = {}          # log file -> bytes already checked
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ", re.M)
_BAD = re.compile(r"Traceback \(most recent call last\)|internal error|Fatal Python error|"
                  r"Exception ignored in")
LOG_NAMES = ("daemon.log", "daemon.out")


def _records(text: str) -> list[str]:
    """A log cut into records: a logging record with its continuation lines
    (daemon.log), or, for text without logging headers, blocks separated
    by blank lines (a traceback printed to stderr)."""
    starts = [m.start() for m in _RECORD.finditer(text)]
    out = []
    if not starts or starts[0] > 0:
        head = text[:starts[0]] if starts else text
        out += [b for b in re.split(r"\n\s*\n", head) if b.strip()]
    for a, b in zip(starts, starts[1:] + [len(text)]):
        out.append(text[a:b])
    return out


def bad_records(text: str) -> list[str]:
    """The records of a daemon log that show a bug."""
    out = []
    for rec in _records(text):
        m = _RECORD.match(rec)
        if _BAD.search(rec) or (m and m.group(1) == "CRITICAL"):
            out.append(rec.rstrip())
    return out


def _log_files(roots) -> list[str]:
    found = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in ("mnt", "segments", "packs")
                       and not os.path.ismount(os.path.join(d, x))]
            found += [os.path.join(d, f) for f in files if f in LOG_NAMES]
    return found


def _new_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(_SEEN.get(path, 0))
            data = f.read()
    except OSError:
        return ""
    _SEEN[path] = _SEEN.get(path, 0) + len(data)
    return data.decode(errors="replace")


class _Bugs(logging.Handler):
    """Records of the "fusearray" logger in this process that show a bug."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record):
        try:
            text = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)
        except Exception:       # a record that cannot be formatted is a bug too
            text = f"{record.levelname} {record.name}: {record.msg!r} {record.args!r}"
        if record.exc_info or record.levelno >= logging.CRITICAL or _BAD.search(text):
            self.found.append(text)


@pytest.fixture(autouse=True)
def _daemon_logs(request):
    """Fails the test if a daemon log it left shows a bug (module doc)."""
    marker = request.node.get_closest_marker("daemon_errors")
    allowed = []
    if marker is not None:
        for p in marker.args:
            if not p or re.search(p, "") or re.search(p, "Traceback (most recent call "
                                                         "last)\ninternal error\n"):
                raise pytest.UsageError(f"daemon_errors({p!r}) allows anything: name "
                                        "the error the test expects")
            allowed.append(re.compile(p))
        if not allowed:
            raise pytest.UsageError("daemon_errors() needs the pattern(s) of the "
                                    "expected error")
    bugs = _Bugs()
    logger = logging.getLogger("fusearray")
    logger.addHandler(bugs)
    try:
        yield
    finally:
        logger.removeHandler(bugs)
    tmp = getattr(request.node, "funcargs", {}).get("tmp_path")
    if tmp is not None:         # e.g. the CLI's `mount --background` writes ARRAY/daemon.log
        _LOGS.update(_log_files([str(tmp)]))
    bad = [f"in this process:\n{rec}" for rec in bugs.found
           if not any(a.search(rec) for a in allowed)]
    for path in sorted(_LOGS):
        for rec in bad_records(_new_text(path)):
            if not any(a.search(rec) for a in allowed):
                bad.append(f"{path}:\n{rec}")
    if bad:
        pytest.fail("a daemon (or an Array in this process) logged a bug (a traceback or "
                    "an internal error); if the test provokes it, mark it "
                    "@pytest.mark.daemon_errors(PATTERN):\n"
                    + "\n\n".join(b[-4000:] for b in bad[:5]), pytrace=False)


# ---- Ceph ----------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _pack_backend(request):
    """FUSEARRAY_TEST_PACK=rados: default arrays get a rados pack on the
    session's cluster (tests/packbackend.py)."""
    if packbackend.BACKEND == "rados":
        packbackend.cluster = request.getfixturevalue("ceph")
    yield


@pytest.fixture
def rados_pool(ceph):
    """A fresh pool of the session's cluster (its name), deleted after."""
    name = ceph.new_pool()
    try:
        yield name
    finally:
        ceph.drop_pool(name)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """One throw-away Ceph cluster (a mon, a memstore OSD, no mgr, auth none)
    for the whole session, started by the first test that asks for it (a
    session that never does starts none): a tests/cephcluster.CephCluster
    with `.conf` (ceph.conf's path), `.new_pool()` (a fresh pool of its own:
    its name), `.pids`, `.health()`. Skipped where Ceph cannot run, unless
    FUSEARRAY_REQUIRE_CEPH=1. Stopped by PID (tools/ceph-down) at the end."""
    from cephcluster import CephCluster, require_ceph
    require_ceph()
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class S3Server:
    """The `s3` fixture: radosgw on the session's cluster. `env`: the AWS_*
    variables of a client (endpoint, keys, region), to pass to the CLI;
    `client()`: a boto3 client; `new_bucket()`: a fresh bucket's name
    (emptied and deleted at the end of the session, or by drop_bucket)."""

    def __init__(self, env: dict):
        self.env = env
        self.endpoint = env["AWS_ENDPOINT_URL"]
        self._buckets: list[str] = []
        self._n = 0
        self._client = None

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config
            self._client = boto3.session.Session(
                aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                region_name=self.env["AWS_DEFAULT_REGION"]).client(
                "s3", endpoint_url=self.endpoint,
                config=Config(request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"))
        return self._client

    def new_bucket(self) -> str:
        import uuid
        self._n += 1
        name = f"fa-t{self._n}-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        self._buckets.append(name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Empty and delete a bucket (memstore keeps objects in RAM)."""
        c = self.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        c.delete_bucket(Bucket=name)
        if name in self._buckets:
            self._buckets.remove(name)

    def close(self) -> None:
        for name in list(self._buckets):
            try:
                self.drop_bucket(name)
            except Exception:       # radosgw may be gone already: the cluster goes too
                pass
        self._client = None


@pytest.fixture(scope="session")
def s3(ceph):
    """radosgw (S3) on the session's Ceph cluster (tools/rgw-up: a free port
    on 127.0.0.1, one user), started by the first test that asks: an
    S3Server with `.env` (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), `.client()`, `.new_bucket()`.
    Skipped where radosgw or boto3 is missing, unless FUSEARRAY_REQUIRE_CEPH=1.
    radosgw is stopped by PID at the end (before the cluster)."""
    from cephcluster import require_rgw
    require_rgw()
    server = None
    try:
        server = S3Server(ceph.start_rgw())
        yield server
    finally:
        if server is not None:
            server.close()
        ceph.stop_rgw()


# ---- the mount(8) helper ------------------------------------------------------------------
HELPER_LINK = "/sbin/mount.fuse.fusearray"
HELPER = os.path.join(os.path.dirname(sys.executable), "mount.fusearray")


@pytest.fixture
def helper_link():
    """/sbin/mount.fuse.fusearray -> this venv's helper for the test; what
    was there before (nothing, or another checkout's) is put back."""
    require_fuse()
    if not shutil.which("mount"):
        pytest.skip("util-linux mount is not installed")
    assert os.access(HELPER, os.X_OK), f"{HELPER} missing: pip install -e . (tools/setup.sh)"
    before = os.readlink(HELPER_LINK) if os.path.islink(HELPER_LINK) else None
    if os.path.exists(HELPER_LINK) and not os.path.islink(HELPER_LINK):
        pytest.skip(f"{HELPER_LINK} is a file, not fusearray's link: leaving it alone")
    if before != HELPER:
        tmp = HELPER_LINK + ".test-tmp"
        os.symlink(HELPER, tmp)
        os.replace(tmp, HELPER_LINK)
    try:
        yield HELPER_LINK
    finally:
        if before is None:
            os.unlink(HELPER_LINK)
        elif before != HELPER:
            tmp = HELPER_LINK + ".test-tmp"
            os.symlink(before, tmp)
            os.replace(tmp, HELPER_LINK)


def exited(pid: int) -> bool:
    """The process is gone or a zombie (a daemon the helper started is not
    our child: its end is seen in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def fusearray_mounts(mnt: str) -> list[str]:
    """The /proc/self/mounts lines of mounts on `mnt`."""
    with open("/proc/self/mounts") as f:
        return [ln for ln in f if ln.split()[1] == mnt]


def end_helper_mounts(mnt: str, pids: list) -> None:
    """A test's clean-up after mounts made through mount(8): `mnt`
    unmounted if still mounted, each daemon of `pids` still there killed."""
    if fusearray_mounts(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
    for pid in pids:
        if not exited(pid):
            os.kill(pid, 9)
