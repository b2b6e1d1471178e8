"""Shared fixtures: the FUSE gate and a daemon-in-a-subprocess mount.

`require_fuse()` is the one gate: it skips when the machine cannot mount
FUSE, unless FUSEARRAY_REQUIRE_FUSE=1 (CI), where it fails instead.

`Mount` starts `python -m fusearray.daemon` as a child, waits for its
readiness line, and in `close()` (always run, from `finally`) unmounts every
filesystem and detaches every loop device it recorded, unmounts the FUSE
mount and ends the daemon by PID.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

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
        self.base = tmp_path
        self.array = str(array or tmp_path / "array")
        self.mnt = str(tmp_path / "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.cache_size = cache_size
        self.proc: subprocess.Popen | None = None
        self.loops: list[str] = []
        self.fs_mounts: list[str] = []
        self.warnings: list[str] = []

    # -- lifecycle --
    def init(self, *args):
        cli("init", self.array, *args)
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
            run(["fusermount3", "-u", self.mnt], check=False)
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
        fd = os.open(self.path("ctl", verb), os.O_RDWR)
        try:
            err = 0
            try:
                os.write(fd, (line + "\n").encode())
            except OSError as e:
                err = e.errno
            reply = b""
            while chunk := os.read(fd, 65536):
                reply += chunk
        finally:
            os.close(fd)
        pairs = dict(l.split("=", 1) for l in reply.decode().splitlines() if "=" in l)
        return err, pairs

    def ok(self, verb: str, line: str) -> dict:
        err, reply = self.ctl(verb, line)
        assert err == 0 and reply.get("status") == "ok", (verb, line, reply)
        return reply

    def status(self) -> dict:
        with open(self.path("ctl", "status.json")) as f:
            return json.load(f)

    def events(self) -> str:
        with open(self.path("ctl", "events")) as f:
            return f.read()

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
