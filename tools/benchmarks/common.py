"""Shared by every group: constants, size parsing, running commands, the clean-up stack,
tmpfs and loop devices, space watching, the three targets and their set-up,
rows and fio.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fusearray import ctlclient, default_cache_size
from fusearray.errors import ArrayError
from fusearray.util import parse_bytes




REPO = Path(__file__).resolve().parent.parent.parent
MEMFILE = REPO / 'tools' / 'memfile.py'
#: the targets, in table order: a plain file on the backing, the FUSE ceiling
#: (memfile, in memory: on the tmpfs backing only), what users would pick
#: instead (qemu-storage-daemon FUSE exports of a raw and of a qcow2 image on
#: the backing) and fusearray (its array on the backing)
TARGETS = ('file', 'memfile', 'qemu-raw', 'qemu-qcow2', 'fusearray')
#: where the targets' data lives; each target group runs once per backing
BACKINGS = ('tmpfs', 'disk')
DISK_DIR = '/var/tmp/fusearray-bench'
UNITS = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
MB = 1e6


def log(msg):
    print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


class StepFailed(Exception):
    pass


def parse_size(text):
    """A size option: fusearray's own parser (4096, 64K, 1G), also taking
    a lower-case unit and a trailing B or iB (1GiB) as the bench always did."""
    try:
        return parse_bytes(re.sub(r'(?i)(?<=[KMGT])i?B$|(?<=\d)B$', '', text.strip()).upper())
    except ArrayError:
        raise argparse.ArgumentTypeError(f'bad size {text!r}') from None


def fmt_size(n):
    for unit in 'TGMK':
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f'{n // UNITS[unit]}{unit}'
    return str(n)


# ---------------------------------------------------------------- commands

def run(cmd, timeout=120, check=True, **kw):
    """Run a command, capture its output; StepFailed with its stderr on error."""
    kw.setdefault('stdout', subprocess.PIPE)
    kw.setdefault('stderr', subprocess.PIPE)
    try:
        proc = subprocess.run([str(c) for c in cmd], text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise StepFailed(f'timed out after {timeout}s: {" ".join(map(str, cmd))}')
    except OSError as e:
        raise StepFailed(f'cannot run {cmd[0]}: {e}')
    if check and proc.returncode != 0:
        out = ((proc.stderr or '') + (proc.stdout or '')).strip()
        raise StepFailed(f'exit {proc.returncode}: {" ".join(map(str, cmd))}\n{out[-2000:]}')
    return proc


def timed(cmd, timeout):
    start = time.perf_counter()
    run(cmd, timeout=timeout)
    return time.perf_counter() - start


def mounted_paths():
    """Mount points listed in /proc/mounts (octal escapes decoded)."""
    with open('/proc/mounts') as f:
        return [re.sub(r'\\([0-7]{3})', lambda m: chr(int(m.group(1), 8)),
                       line.split()[1]) for line in f]


def is_mounted(path):
    return str(path) in mounted_paths()


def drop_caches():
    os.sync()
    Path('/proc/sys/vm/drop_caches').write_text('3\n')


# ---------------------------------------------------------------- clean-up

class Cleanup:
    """Undo actions, run newest first; each guarded so all of them run."""

    def __init__(self):
        self._undo = []
        self.problems = []

    def push(self, label, fn):
        self._undo.append((label, fn))
        return len(self._undo) - 1

    def now(self, handle):
        """Run one undo action early (normal path) and forget it."""
        label, fn = self._undo[handle]
        self._undo[handle] = None
        self._call(label, fn)

    def mark(self):
        """A point to unwind to: what a group sets up, it undoes (`unwind`)."""
        return len(self._undo)

    def unwind(self, mark=0):
        """Run, newest first, every undo action pushed since `mark`."""
        while len(self._undo) > mark:
            item = self._undo.pop()
            if item:
                self._call(*item)

    def run_all(self):
        self.unwind(0)

    def _call(self, label, fn):
        try:
            fn()
        except Exception as e:  # keep going: leave nothing behind
            self.problems.append(f'{label}: {e}')
            log(f'clean-up problem: {label}: {e}')


def unmount_fs(path):
    for _ in range(10):  # a process we just killed may still hold it briefly
        if not is_mounted(path):
            return
        if run(['umount', path], check=False).returncode == 0:
            return
        time.sleep(0.3)
    log(f'umount {path} failed, lazy unmount')
    run(['umount', '-l', path])


def unmount_fuse(path):
    """fusermount3 -u, then lazy; both only if still mounted."""
    for cmd in (['fusermount3', '-u', path], ['fusermount3', '-u', '-z', path]):
        if not is_mounted(path):
            return
        if run(cmd, check=False).returncode != 0:
            log(f'{" ".join(cmd)} failed')
    if is_mounted(path):
        raise StepFailed(f'{path} is still mounted')


def loop_backing(dev):
    """The backing file of a loop device, or None if it is not attached."""
    proc = run(['losetup', '--noheadings', '-O', 'BACK-FILE', dev], check=False)
    back = proc.stdout.strip() if proc.returncode == 0 else ''
    return os.path.realpath(back) if back else None


def detach_loop(dev, file):
    """losetup -d, only if dev is still attached to the file we attached."""
    file = os.path.realpath(file)
    if loop_backing(dev) != file:
        return
    if run(['losetup', '-d', dev], check=False).returncode != 0:
        time.sleep(0.5)  # a detach already under way finishes asynchronously
        if loop_backing(dev) == file:
            run(['losetup', '-d', dev])


def stop_process(proc, timeout=10):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def alive(pid):
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return False
    return stat.rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie is gone


def stop_pid(pid, grace=10):
    """Wait for a daemon we did not fork to exit; else terminate, then kill it."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig:
            log(f'pid {pid} still alive, sending {sig.name}')
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)
    raise StepFailed(f'pid {pid} survived SIGKILL')


def remove_dir(path):
    inside = [m for m in mounted_paths() if m == str(path) or m.startswith(f'{path}/')]
    if inside:
        raise StepFailed(f'not removing {path}: still mounted: {inside}')
    shutil.rmtree(path, ignore_errors=False)


# ---------------------------------------------------------------- resources

def make_tempdir(cl, parent=None, prefix='fusearray-bench.'):
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    cl.push(f'remove {path}', lambda: remove_dir(path))
    return path


def mount_tmpfs(cl, path, size, space=None, label=None):
    """A tmpfs of its own (`size` is a limit, not a reservation); watched by
    `space` under `label` when given."""
    path.mkdir(exist_ok=True)
    run(['mount', '-t', 'tmpfs', '-o', f'size={size},mode=0700', 'fusearray-bench', path])
    label = label or path.name

    def undo():
        if space is not None:
            space.forget(label)   # keep its peak, stop sampling the directory below
        unmount_fs(path)
    handle = cl.push(f'umount {path}', undo)
    if space is not None:
        space.watch(label, path)
    return handle


def mem_available():
    with open('/proc/meminfo') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('MemAvailable:'))


def fs_usage(path):
    """(used, size) in bytes of the filesystem holding path."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize


def fmt_bytes(n):
    for unit, div in (('T', 1 << 40), ('G', 1 << 30), ('M', 1 << 20), ('K', 1 << 10)):
        if abs(n) >= div:
            return f'{n / div:.1f}{unit}'
    return f'{n}B'


class SpaceWatch:
    """Samples the bench's filesystems every 0.1 s in a thread, keeping each
    one's peak use (and the group it happened in), so the report can show
    how much room every part really took, and a failure can say what was full."""

    def __init__(self):
        self.paths = {}        # label -> path
        self.peaks = {}        # label -> (used, size, group)
        self.group = 'set-up'
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name='space-watch', daemon=True)
        self._thread.start()

    def watch(self, label, path):
        with self._lock:
            self.paths[label] = Path(path)
        self.sample()

    def forget(self, label):
        self.sample()
        with self._lock:
            self.paths.pop(label, None)

    def sample(self):
        with self._lock:
            for label, path in list(self.paths.items()):
                try:
                    used, size = fs_usage(path)
                except OSError:
                    continue
                peak = self.peaks.get(label)
                if peak is None or used > peak[0]:
                    self.peaks[label] = (used, size, self.group)

    def now(self):
        """One line: every watched filesystem's use right now."""
        parts = []
        with self._lock:
            items = list(self.paths.items())
        for label, path in items:
            try:
                used, size = fs_usage(path)
                parts.append(f'{label} {fmt_bytes(used)} of {fmt_bytes(size)} used')
            except OSError as e:
                parts.append(f'{label}: {e.strerror}')
        return '; '.join(parts) or 'nothing watched'

    def _loop(self):
        while not self._stop.wait(0.1):
            self.sample()

    def stop(self):
        self._stop.set()
        self._thread.join()


def attach_loop(cl, file, direct=True):
    proc = run(['losetup', f'--direct-io={"on" if direct else "off"}', '--find', '--show',
                file])
    dev = proc.stdout.strip()
    if 'direct' in proc.stderr.lower():
        log(f'losetup: {proc.stderr.strip()}')
    return dev, cl.push(f'losetup -d {dev}', lambda: detach_loop(dev, file))


def mount_dev(cl, dev, path):
    path.mkdir(exist_ok=True)
    run(['mount', dev, path])
    return cl.push(f'umount {path}', lambda: unmount_fs(path))


def wait_mounted(path, proc=None, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        if proc is not None and proc.poll() is not None:
            raise StepFailed(f'exited with {proc.returncode} before mounting {path}')
        time.sleep(0.05)
    raise StepFailed(f'{path} not mounted after {timeout}s')


# ---------------------------------------------------------------- targets

@dataclass
class Target:
    """A file to benchmark, and how to put a loop device over it."""
    name: str
    file: Path
    attach: object = None        # () -> (device, cleanup handle)
    detach: object = None        # (device, handle) -> None
    notes: list = field(default_factory=list)
    array: Path = None           # fusearray: the array directory (daemon.log is there)
    mnt: Path = None             # fusearray: the mount point
    loop_note: str = ''          # how its loop device differs from the others, if it does


def loop_target(cl, name, file, direct=True):
    def detach(dev, handle):
        cl.now(handle)
    return Target(name, file, attach=lambda: attach_loop(cl, file, direct), detach=detach,
                  loop_note='' if direct else 'loop without direct-io')


def setup_file(ctx):
    file = ctx.backing / 'file.img'
    with open(file, 'wb') as f:
        f.truncate(ctx.args.size)
    return loop_target(ctx.cl, 'file', file)


#: qemu-storage-daemon's block node options: what a user gets without tuning
#: (cache.direct=off: the backing's page cache; flushes are passed on;
#: aio=threads); qcow2 with qemu-img's defaults (64 KiB clusters, no
#: preallocation, lazy refcounts off)
QEMU_FILE_OPTS = 'driver=file,node-name=file0,filename={image}'


def setup_qemu(ctx, fmt):
    """An image FMT (raw, qcow2) on the backing, exported by a
    qemu-storage-daemon FUSE export onto a regular file (its mount point),
    stopped by its PID."""
    name = f'qemu-{fmt}'
    image = ctx.backing / f'qemu.{fmt}'
    run(['qemu-img', 'create', '-q', '-f', fmt, image, str(ctx.args.size)])
    export = ctx.work / f'{name}.export'
    export.touch()
    logpath = ctx.work / f'{name}.log'
    logf = open(logpath, 'ab')
    ctx.cl.push(f'close {name} log', logf.close)
    blockdevs = ['--blockdev', QEMU_FILE_OPTS.format(image=image)]
    node = 'file0'
    if fmt != 'raw':
        blockdevs += ['--blockdev', f'driver={fmt},node-name=fmt0,file=file0']
        node = 'fmt0'
    cmd = ['qemu-storage-daemon', *blockdevs, '--export',
           f'type=fuse,id=exp0,node-name={node},mountpoint={export},writable=on']
    proc = subprocess.Popen([str(c) for c in cmd], stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    # newest first: stop the daemon (it unmounts on SIGTERM), then make sure
    ctx.cl.push(f'unmount {export}', lambda: unmount_fuse(export))
    ctx.cl.push(f'stop {name} pid {proc.pid}', lambda: stop_process(proc))
    try:
        wait_mounted(export, proc)
    except StepFailed as e:
        raise StepFailed(f'{name}: {e}\n{tail(logpath)}')
    log(f'{name}: qemu-storage-daemon pid {proc.pid}, image {image}')
    # ext4 made on a direct-io loop device over a qemu-storage-daemon FUSE
    # export (qemu 7.2; raw and qcow2 alike) does not mount (corrupt, issue
    # #15): its loop device is attached without direct-io
    direct = ctx.args.qemu_loop_direct
    target = loop_target(ctx.cl, name, export, direct=direct)
    target.notes = [f'{fmt} image {image.name} on the backing ({"qemu-img defaults" if fmt != "raw" else "sparse"}), '
                    'qemu-storage-daemon FUSE export, cache.direct=off, aio=threads']
    return target


def setup_memfile(ctx):
    mnt = ctx.work / 'memfile'
    mnt.mkdir()
    logf = open(ctx.work / 'memfile.log', 'wb')
    ctx.cl.push('close memfile log', logf.close)
    proc = subprocess.Popen(
        [ctx.args.python, MEMFILE, mnt, '--size', str(ctx.args.size)],
        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    # newest first: stop the server, then make sure the mount is gone
    ctx.cl.push(f'unmount {mnt}', lambda: unmount_fuse(mnt))
    ctx.cl.push(f'stop memfile pid {proc.pid}', lambda: stop_process(proc))
    try:
        wait_mounted(mnt, proc)
    except StepFailed as e:
        raise StepFailed(f'memfile: {e}\n{tail(ctx.work / "memfile.log")}')
    return loop_target(ctx.cl, 'memfile', mnt / 'file')


def tail(path, n=2000):
    try:
        return Path(path).read_text(errors='replace')[-n:]
    except OSError:
        return ''


class FusearrayCLI:
    """`python -m fusearray ...` with the repository importable."""

    def __init__(self, python, logfile):
        self.python = python
        self.logfile = logfile
        self.env = dict(os.environ)
        self.env['PYTHONPATH'] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p)

    def __call__(self, *args, timeout=120):
        return run([self.python, '-m', 'fusearray', *args], timeout=timeout, env=self.env)

    def mount(self, array, mnt, extra):
        # the daemon may keep inherited pipes open: send output to a file
        with open(self.logfile, 'ab') as f:
            run([self.python, '-m', 'fusearray', 'mount', array, mnt, '--background', *extra],
                timeout=60, env=self.env, stdout=f, stderr=subprocess.STDOUT)


def daemon_pids(mnt):
    """PIDs whose argv names our (unique, temporary) mount point."""
    pids = []
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / 'cmdline').read_bytes().split(b'\0')
        except OSError:
            continue
        if str(mnt).encode() in argv:
            pids.append(int(proc.name))
    return pids


def daemon_log_tail(array, lines=15):
    """The last lines of ARRAY/daemon.log, indented, for a failure message;
    a message repeated on consecutive lines is shown once, with its count."""
    text = tail(Path(array) / 'daemon.log', 65536).splitlines()[1:]  # first may be cut
    runs = []            # [line, message without its time stamp, count]
    for line in text:
        msg = re.sub(r'^\S+ \S+ ', '', line)
        if runs and runs[-1][1] == msg:
            runs[-1][0] = line
            runs[-1][2] += 1
        else:
            runs.append([line, msg, 1])
    shown = [line + (f'   [{n} times in a row, the last shown]' if n > 1 else '')
             for line, _, n in runs[-lines:]]
    return f'{array}/daemon.log (tail):\n' + '\n'.join(f'    {l}' for l in shown)


def start_array(ctx, name, base, init_args=(), env=None):
    """`fusearray init` a new array under `base` (with `init_args`, e.g.
    --pack specs) and mount it at WORK/name (`mount --background`), every
    step undone by ctx.cl: (cli, array, mnt). `env`: variables added to the
    CLI's and so the daemon's environment (PYTHONPATH is put before the
    repository's)."""
    args, cl = ctx.args, ctx.cl
    array = make_tempdir(cl, parent=base, prefix=f'{name}.') / 'array'
    mnt = ctx.work / name
    mnt.mkdir()
    fa = FusearrayCLI(args.python, ctx.work / f'{name}.log')
    for key, value in (env or {}).items():
        fa.env[key] = (os.pathsep.join((value, fa.env[key])) if key == 'PYTHONPATH'
                       else value)
    try:
        fa('init', array, *init_args)
        extra = ['--cache-size', args.cache_size] if args.cache_size else []
        pids = []
        cl.push(f'stop fusearray daemon of {mnt}', lambda: stop_daemon(fa, mnt, pids))
        fa.mount(array, mnt, extra)
        pids.extend(daemon_pids(mnt))
        log(f'{name}: fusearray daemon pid(s): {pids or "not found"}, array {array}')
        wait_mounted(mnt, timeout=5)
    except StepFailed as e:
        raise StepFailed(f'fusearray {name}: {e}\n{tail(fa.logfile)}\n{daemon_log_tail(array)}')
    return fa, array, mnt


def wait_until_used_below(mnt, limit, timeout):
    """Poll ctl/status.json until the array's packs use less than `limit`
    bytes (GC has reclaimed a deleted set); StepFailed after `timeout` s."""
    deadline = time.monotonic() + timeout
    while (used := array_used(mnt)) >= limit:
        if time.monotonic() > deadline:
            raise StepFailed(f'{mnt}: still {fmt_bytes(used)} used {timeout} s after the '
                             'delete (GC did not reclaim the set)')
        time.sleep(0.1)


def array_used(mnt):
    """Physical bytes used by every pack of a mounted array (ctl/status.json)."""
    status = ctlclient.status(mnt)
    return sum(p['used_bytes'] for p in status['packs'])


def setup_fusearray(ctx):
    args, cl = ctx.args, ctx.cl
    if args.array_dir:
        base = Path(args.array_dir)
        where = f'array dir under {base} (--array-dir, not the backing)'
        ctx.space.watch(f'--array-dir {base}', base)
    else:
        base = ctx.backing
        where = f'array dir on the {ctx.backing_name} backing'
    fa, array, mnt = start_array(ctx, 'fusearray', base)
    try:
        fa('-m', mnt, 'create', 'lun0', fmt_size(args.size))
    except StepFailed as e:
        raise StepFailed(f'fusearray: {e}\n{daemon_log_tail(array)}')
    lun = mnt / 'luns' / 'lun0'
    if not lun.is_file() or lun.stat().st_size != args.size:
        raise StepFailed(f'fusearray: {lun} missing or of the wrong size')

    def attach():
        out = fa('-m', mnt, 'attach', 'lun0').stdout
        m = re.search(r'/dev/loop\d+', out)
        if not m:
            raise StepFailed(f'fusearray attach printed no loop device: {out!r}')
        dev = m.group(0)
        return dev, cl.push(f'detach {dev}', lambda: detach_lun(fa, mnt, dev, lun))

    def detach(dev, handle):
        cl.now(handle)

    return Target('fusearray', lun, attach=attach, detach=detach,
                  notes=[where, f'cache-size {args.cache_size or default_cache()}'],
                  array=array, mnt=mnt)


def default_cache():
    """What `fusearray mount` picks without --cache-size (1/8 of RAM,
    256M-4G), for the table's notes."""
    return f'default ({fmt_bytes(default_cache_size())}: 1/8 of RAM, 256M-4G)'


def detach_lun(fa, mnt, dev, lun):
    try:
        fa('-m', mnt, 'detach', 'lun0', timeout=60)
    finally:
        detach_loop(dev, lun)  # no-op if detach worked


def stop_daemon(fa, mnt, pids):
    try:
        if is_mounted(mnt):
            fa('umount', mnt, timeout=60)
    except StepFailed as e:
        log(f'fusearray umount failed: {e}')
    finally:
        unmount_fuse(mnt)
        for pid in pids:
            stop_pid(pid)


SETUP = {'file': setup_file, 'memfile': setup_memfile,
         'qemu-raw': lambda ctx: setup_qemu(ctx, 'raw'),
         'qemu-qcow2': lambda ctx: setup_qemu(ctx, 'qcow2'),
         'fusearray': setup_fusearray}


# ---------------------------------------------------------------- groups

@dataclass
class Row:
    """One workload: a value (or an error) per target, and its goal."""
    workload: str
    unit: str                     # 'MB/s' or 'IOPS'
    values: dict = field(default_factory=dict)   # target -> float | str (error)
    goals: list = field(default_factory=list)   # [(reference target, minimum fusearray/reference)]
    samples: dict = field(default_factory=dict)  # target -> every measurement, if several
    bounds: list = field(default_factory=list)   # [('>=' or '<=', limit)] on fusearray's own value


def fio(file, name, extra, size, timeout, buffers='--scramble_buffers=1', direct=True):
    engine = [] if any(o.startswith('--ioengine=') for o in extra) else ['--ioengine=psync']
    cmd = ['fio', f'--name={name}', f'--filename={file}', f'--size={size}',
           f'--direct={int(direct)}', *engine, buffers, '--output-format=json', *extra]
    proc = run(cmd, timeout=timeout, check=False)
    out = proc.stdout
    try:
        data = json.loads(out[out.index('{'):])  # fio may print warnings first
        job = data['jobs'][0]
    except (ValueError, KeyError, IndexError):
        data, job = None, {}
    if proc.returncode != 0 or job.get('error') or data is None:
        # fio's own words are on stderr ("io_u error on file ...: No space left
        # on device: write offset=..."); its JSON on stdout says only the errno
        err = job.get('error')
        why = f'errno {err} ({os.strerror(err)})' if err else f'exit {proc.returncode}'
        msg = '\n'.join(l for l in proc.stderr.strip().splitlines()[-8:])
        raise StepFailed(f'fio {name}: {why}: {" ".join(map(str, cmd))}'
                         + (f'\n{msg}' if msg else ''))
    return job
