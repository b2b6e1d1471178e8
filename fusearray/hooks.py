"""Hooks: executables an administrator puts in ARRAY/hooks/STAGE.d/, run by
the array around its operations (the VSS writer and provider analogue, and
ZFS's zedlets for events):

- pre-snapshot.d, post-snapshot.d: around the instant of a shadow copy set;
- pre-restore.d, post-restore.d: around a resync;
- event.d: once per event (eventhooks.py, the events journal's subscriber).

A stage runs its hooks one at a time in name order (C locale), each with
the operation's facts in its environment (FUSEARRAY_*) and a time limit;
a hook that runs longer is killed (its whole process group). A pre hook
that exits non-zero, is killed or cannot be run vetoes the operation
(the caller makes it EIO and an event that carries the hook's name and its
last stderr lines); a post or event hook's failure is only an event.

Which files run (as run-parts does): regular files (a symlink to one is
followed) whose name is letters, digits, `_`, `-` and `.` not first, not
ending in `~`, with an execute bit; others are skipped silently, so
`chmod -x` disables a hook. The hooks run as the daemon (root): a hook, or
a directory holding it (STAGE.d, hooks/), that another user could change
(owned by someone other than the daemon's user or root, or writable by
group or others) is never run, and is itself a veto in a pre stage.

Threads: `find` and `run_blocking` block; `HookRunner.run` calls them in a
worker thread, one hook after the other, so a hook never stalls the trio
loop nor the I/O of any LUN (a hook may read and write LUNs through the
mount: the loop keeps serving while it runs). `run_blocking` keeps only the
last STDERR_KEPT bytes of a hook's stderr, however much it writes.
"""
import dataclasses
import os
import re
import select
import signal
import stat
import subprocess
import time

import trio

from .errors import ioerror

STAGES = ("pre-snapshot", "post-snapshot", "pre-restore", "post-restore", "event")
HOOKS_DIR = "hooks"
#: A hook's time limit, in seconds, unless its caller gives one.
HOOK_TIMEOUT = 30.0
#: Bytes of a hook's stderr kept (its end).
STDERR_KEPT = 4096
#: Lines of stderr an event quotes.
STDERR_LINES = 5
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass
class Result:
    name: str
    rc: int | None            # exit status; None: killed at its time limit or not run
    timed_out: bool = False
    stderr: str = ""          # the last STDERR_LINES lines
    error: str = ""           # why it could not be run

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def describe(self) -> str:
        if self.error:
            why = self.error
        elif self.timed_out:
            why = "did not finish within its time limit and was killed"
        elif self.rc is not None and self.rc < 0:
            why = f"was killed by signal {-self.rc}"
        else:
            why = f"exited with status {self.rc}"
        return why + (f"; stderr: {self.stderr}" if self.stderr else "")


def stage_dir(array_path: str, stage: str) -> str:
    return os.path.join(array_path, HOOKS_DIR, f"{stage}.d")


def _untrusted(path: str, st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (0, uid):
        return f"{path} is owned by uid {st.st_uid}, not by the daemon's user or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def find(array_path: str, stage: str) -> tuple[list[str], list[str]]:
    """(hooks to run in order, problems): blocking. A problem is a hook
    (or its directory) not run because another user could change it."""
    if stage not in STAGES:
        raise ValueError(stage)
    d = stage_dir(array_path, stage)
    uid = os.geteuid()
    try:
        names = sorted(os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    except OSError as e:
        return [], [f"cannot list {d}: {e.strerror}"]
    problems = []
    for dpath in (os.path.dirname(d), d):
        try:
            why = _untrusted(dpath, os.stat(dpath), uid)
        except OSError as e:
            why = f"cannot stat {dpath}: {e.strerror}"
        if why:
            return [], [why + ": none of its hooks is run"]
    hooks = []
    for name in names:
        if not _NAME.fullmatch(name) or name.endswith("~"):
            continue
        path = os.path.join(d, name)
        try:
            st = os.stat(path)
        except OSError:
            continue                    # a dangling symlink: nothing to run
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            continue
        why = _untrusted(path, st, uid)
        if why is None and os.path.islink(path):
            real = os.path.realpath(path)
            try:
                why = _untrusted(os.path.dirname(real), os.stat(os.path.dirname(real)), uid)
            except OSError as e:
                why = f"cannot stat the directory of {real}: {e.strerror}"
        if why:
            problems.append(f"hook {stage}.d/{name} not run: {why}")
        else:
            hooks.append(path)
    return hooks, problems


def _tail(data: bytes) -> str:
    lines = data.decode(errors="backslashreplace").strip().splitlines()
    return " | ".join(line.strip() for line in lines[-STDERR_LINES:] if line.strip())


def run_blocking(path: str, env: dict, timeout: float = HOOK_TIMEOUT,
                 started=None) -> Result:
    """Run one hook: no stdin, stdout discarded, the end of stderr kept;
    killed with its process group after `timeout` seconds. Blocking.
    `started(pid)`, if given, is called once it runs (its process group
    is `pid`: a caller that gives up on it may kill the group)."""
    name = os.path.basename(path)
    try:
        p = subprocess.Popen([path], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             cwd="/", close_fds=True, start_new_session=True)
    except OSError as e:
        return Result(name, None, error=f"could not be run: {e.strerror or e}")
    if started is not None:
        started(p.pid)
    deadline = time.monotonic() + timeout
    tail = bytearray()
    fd = p.stderr.fileno()
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = p.poll() is None
                break
            r, _, _ = select.select([fd], [], [], min(left, 0.1))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                tail += chunk
                del tail[:-STDERR_KEPT]
            elif p.poll() is not None:
                break       # exited; a child it left may hold stderr open
        if not timed_out:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if timed_out or p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()
        p.stderr.close()
    return Result(name, None if timed_out else p.returncode, timed_out, _tail(bytes(tail)))


class HookRunner:
    """Runs a stage's hooks for the array at `array_path`; `event(level,
    message)` is the array's event sink; `mountpoint()` its mount."""

    def __init__(self, array_path: str, event, mountpoint=lambda: None):
        self.path = array_path
        self.event = event
        self.mountpoint = mountpoint

    def environment(self, stage: str, facts: dict) -> dict:
        env = {"PATH": PATH, "LANG": "C.UTF-8", "FUSEARRAY_ARRAY": self.path,
               "FUSEARRAY_MOUNT": self.mountpoint() or "", "FUSEARRAY_STAGE": stage}
        env.update({f"FUSEARRAY_{k.upper()}": str(v) for k, v in facts.items()})
        return env

    async def run(self, stage: str, facts: dict, what: str, veto: bool,
                  timeout: float = HOOK_TIMEOUT) -> list[Result]:
        """Run `stage`'s hooks for operation `what` (a phrase for the
        events) with `facts` as FUSEARRAY_<KEY> variables. With `veto`,
        the first failure (or a hook not run because it is not trusted)
        raises EIO naming the hook and quoting its stderr (the refused
        command's event says it), and no later hook runs; else failures
        are warning events. Returns the results."""
        hooks, problems = await trio.to_thread.run_sync(find, self.path, stage)
        if problems:
            if veto:         # the refused command's event says it
                raise ioerror(f"{what} vetoed: {problems[0]}; nothing was done")
            for p in problems:
                self.event("warning", f"{what}: {p}")
        env = self.environment(stage, facts)
        results = []
        for path in hooks:
            r = await trio.to_thread.run_sync(run_blocking, path, env, timeout)
            results.append(r)
            if r.ok:
                self.event("info", f"{what}: hook {stage}.d/{r.name} succeeded")
                continue
            msg = f"hook {stage}.d/{r.name} {r.describe()}"
            if veto:
                raise ioerror(f"{what} vetoed by {msg}; nothing was done")
            self.event("warning", f"{what}: {msg}")
        return results
