"""What the groups with an array of their own share (snap, packs, transport):
metric tables and SnapArray, a mount driven through its ctl/ files with
fusearray.ctlclient.
"""
import errno
import mmap
import os
import statistics
import time
from dataclasses import dataclass, field

from fusearray import ctlclient

from .common import (
    REPO, StepFailed, fmt_bytes, mem_available, array_used, daemon_log_tail, run)


JOB_POLL = 0.02


@dataclass
class Metric:
    """A measurement that is not per target: samples per column of its table."""
    label: str
    unit: str                                      # 'ms', 'MB/s' or 'x'
    cols: dict = field(default_factory=dict)       # column key -> [samples] | str (error)
    goal: str = ''
    verdict: str = ''

    def median(self, key):
        v = self.cols.get(key)
        return statistics.median(v) if isinstance(v, list) and v else None

    def fail(self, keys=('small', 'big')):
        for k in keys:
            if not isinstance(self.cols.get(k), list) or not self.cols[k]:
                self.cols[k] = 'failed'


@dataclass
class MetricTable:
    """A group's result when its columns are sizes, not targets."""
    columns: dict                                  # key -> heading
    rows: list
    notes: list = field(default_factory=list)


def check_memory(group, what, need, advice):
    """StepFailed unless `need` bytes (what the group's tmpfs file systems
    will hold) fit in the memory available with 2 GiB kept free."""
    avail = mem_available()
    if avail < need + (2 << 30):
        raise StepFailed(f'{group}: {what} on tmpfs will hold about {fmt_bytes(need)} '
                         f'and only {fmt_bytes(avail)} of memory is available (2 GiB kept '
                         f'free): {advice}')


def setup_failed(ctx, group, table, mark, err, keys):
    """A group's set-up failed: say so, every metric failed (in columns
    `keys`, or keys(metric)), undo what it set up."""
    ctx.fail(f'{group}: set-up: {err}')
    for metric in table.rows:
        metric.fail(keys(metric) if callable(keys) else tuple(keys))
    ctx.cl.unwind(mark)


def fusearray_overcommit(python):
    """fusearray.array.OVERCOMMIT: a LUN may be at most that many times the
    size of its pack's filesystem (16 when this was written)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p))
    proc = run([python, '-c', 'from fusearray.array import OVERCOMMIT; print(OVERCOMMIT)'],
               check=False, env=env)
    try:
        return int(proc.stdout.strip())
    except ValueError:
        return 16


def ctl_send(fd, line):
    """Write one command line; (seconds the write took, OSError or None)."""
    data = f'{line}\n'.encode()
    start = time.perf_counter()
    try:
        os.write(fd, data)
        err = None
    except OSError as e:
        err = e
    return time.perf_counter() - start, err


def ctl_reply(fd):
    """The reply readable on the command's descriptor: (text, {key: value})."""
    text = ctlclient.read_reply(fd).decode(errors='replace')
    return text, ctlclient.parse_reply(text)


def fsync_path(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(path, offset, length=4096):
    buf = mmap.mmap(-1, length)     # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    return bytes(buf[:n])


class SnapArray:
    """The snap group's own fusearray mount, driven through its ctl/ files."""

    def __init__(self, ctx, fa, array, mnt):
        self.ctx, self.fa, self.array, self.mnt = ctx, fa, array, mnt

    def ctl(self, verb, line, busy_retry=False):
        """`echo LINE > ctl/VERB` on an O_RDWR descriptor: (seconds the write
        took, reply dict); StepFailed with the reply and daemon.log if it failed."""
        for attempt in range(50 if busy_retry else 1):
            fd = os.open(self.mnt / 'ctl' / verb, os.O_RDWR)
            try:
                seconds, err = ctl_send(fd, line)
                text, reply = ctl_reply(fd)
            finally:
                os.close(fd)
            # a descriptor closed just before may not be released yet (FUSE
            # RELEASE is asynchronous): EBUSY from an untimed clean-up is retried
            if busy_retry and err is not None and err.errno == errno.EBUSY:
                time.sleep(0.1)
                continue
            break
        if err is not None or reply.get('status') != 'ok':
            raise StepFailed(f'echo "{line}" > ctl/{verb}: '
                             f'{err.strerror if err else "no error, but"} '
                             f'(reply: {text.strip() or "none"})\n{self.log_tail()}')
        return seconds, reply

    def log_tail(self):
        return daemon_log_tail(self.array)

    def lun(self, name):
        return self.mnt / 'luns' / name

    def status(self):
        return ctlclient.status(self.mnt)

    def job(self, jid):
        return ctlclient.job(self.mnt, jid)

    def wait_job(self, jid, timeout):
        """Poll ctl/jobs/ID every 20 ms until it ends: (perf_counter at done, fields)."""
        try:
            fields = ctlclient.wait_job(self.mnt, jid, ('done',), timeout, JOB_POLL)
        except TimeoutError as e:
            fields = e.fields
            state = fields.get('state')
            if state in ('failed', 'cancelled'):
                raise StepFailed(f'job {jid} {state}: {fields.get("error")}\n{self.log_tail()}')
            raise StepFailed(f'job {jid} not done after {timeout}s: {fields}\n'
                             f'{self.log_tail()}')
        return time.perf_counter(), fields

    def wait_ended(self, jid, timeout):
        """Poll ctl/jobs/ID until it is no longer active: its fields."""
        try:
            return ctlclient.wait_job(self.mnt, jid, ctlclient.ENDED, timeout, JOB_POLL)
        except TimeoutError as e:
            raise StepFailed(f'job {jid} still {e.fields.get("state")} after {timeout}s\n'
                             f'{self.log_tail()}')

    def wait_used_below(self, limit, timeout=60):
        """Wait for garbage collection to bring the array's use under `limit`
        (a snapshot waiting on a collection would time the collection)."""
        deadline = time.monotonic() + timeout
        used = array_used(self.mnt)
        while used > limit and time.monotonic() < deadline:
            time.sleep(0.2)
            used = array_used(self.mnt)
        return used
