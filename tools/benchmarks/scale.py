"""The scale group: what stored data costs in RAM and time (issue 16).

For each size of --scale-blocks (default 1M,10M: 4 GiB and 40 GiB of unique
4 KiB blocks), an array is built by tools/scalegen.py (through the package's
own layers, without FUSE: see its docstring) in a directory on the disk
backing (--scale-dir, default --disk-dir), then mounted with the bench's
fixed caches (--cache-size 64M, --index-cache 64M; the node cache is then
64M) and measured:
  - the daemon's RSS after mount, and its mount time (`fusearray mount`
    until the mount serves);
  - 4k random reads over the whole LUN from a cold page cache (fio QD1,
    O_DIRECT, 8 s): mean latency, and the RSS after them, with what the
    caches hold then (ctl/status) and the RSS less that (the caches fill
    further on a larger array up to their limits: the rest is what must
    stay flat);
  - 100 shadow copies with one block written between each, then the delete
    of one of them and the garbage collection that follows (its time, from
    ctl/metrics), and 4k random writes during that collection against
    before it;
  - tools/fsck --no-data on the unmounted array: time, peak RSS.
Goals (issue 16): RSS <= the caches (block, index and node cache) + 128 MiB and within 10 % of the
smallest size; mount <= 2 s; the delete and its collection <= 1 s.
"""
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .arrays import Metric, MetricTable
from .common import (
    REPO, FusearrayCLI, StepFailed, daemon_pids, fio, fmt_bytes, log, run, stop_daemon,
    wait_mounted)
from fusearray import ctlclient

#: small enough that the random reads fill it at every size (the RSS is then
#: the caches' limits, and compares across sizes)
CACHE = 64 << 20
INDEX_CACHE = 64 << 20
#: the map node cache a mount of --cache-size CACHE gets (Array: a quarter,
#: at least 64 MiB)
NODE_CACHE = max(64 << 20, min(CACHE // 4, 512 << 20))
RSS_SLACK = 128 << 20
MOUNT_MAX = 2.0
DELETE_MAX = 1.0
#: --scale-gen auto: arrays above this many blocks are built --direct
DIRECT_ABOVE = 10_000_000
BS = 4096
SNAPSHOTS = 100


def rss(pid, field='VmRSS'):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
    raise StepFailed(f'no {field} for pid {pid}')


def drop_caches():
    os.sync()
    Path('/proc/sys/vm/drop_caches').write_text('3\n')


def gc_counters(mnt):
    """(collections run, seconds spent) from ctl/metrics."""
    text = (Path(mnt) / 'ctl' / 'metrics').read_text()
    runs = sum(float(m) for m in re.findall(r'^fusearray_gc_runs_total\{[^}]*\} (\S+)',
                                            text, re.M))
    secs = sum(float(m) for m in re.findall(r'^fusearray_gc_seconds_total(?:\{[^}]*\})? (\S+)',
                                            text, re.M))
    return runs, secs


def wait_gc(mnt, runs0, timeout=600):
    deadline = time.monotonic() + timeout
    while gc_counters(mnt)[0] <= runs0:
        if time.monotonic() > deadline:
            raise StepFailed(f'no garbage collection within {timeout} s of the delete')
        time.sleep(0.2)


def ctl(mnt, verb, line):
    err, reply = ctlclient.call(str(mnt), verb, line)
    if err or reply.get('status') != 'ok':
        raise StepFailed(f'ctl/{verb} {line}: {reply}')
    return reply


def write_block(lun, bno):
    fd = os.open(lun, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(BS), bno * BS)
        os.fsync(fd)
    finally:
        os.close(fd)


def randwrite_iops(lun, seconds, nblocks, name):
    job = fio(lun, name, ['--rw=randwrite', '--bs=4k', '--time_based',
                          f'--runtime={seconds}'], nblocks * BS, timeout=seconds + 120)
    return job['write']['iops']


def fsck_run(python, array):
    """(seconds, peak RSS bytes, output) of tools/fsck --no-data (not
    --strict: the garbage of the last writes is not collected yet)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([python, str(REPO / 'tools' / 'fsck'), str(array), '--no-data'],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise StepFailed(f'tools/fsck {array}: exit {proc.returncode}\n{out[-2000:]}')
    return time.monotonic() - t0, usage.ru_maxrss * 1024, out.strip().splitlines()[-1]


def one_size(ctx, n, m, base):
    a = ctx.args
    key = str(n)
    array = Path(tempfile.mkdtemp(prefix='scale.', dir=base)) / 'array'
    direct = direct_build(a, n)
    cmd = [a.python, REPO / 'tools' / 'scalegen.py', array, str(n)]
    disks = None
    if a.scale_pack_dir:
        disks = Path(tempfile.mkdtemp(prefix='scale.', dir=a.scale_pack_dir))
        ctx.cl.push(f'remove {disks}', lambda: shutil.rmtree(disks, ignore_errors=True))
        cmd += ['--pack-dir', disks / 'main.0']
    log(f'scale: building {n} blocks in {array}' + (' (--direct)' if direct else ''))
    t0 = time.monotonic()
    gen = run(cmd + (['--direct'] if direct else []), timeout=max(600, n // 2000))
    m['build'].cols[key] = [time.monotonic() - t0]
    log(f'scale: built: {gen.stdout.strip()}')
    mnt = ctx.work / f'scale-{n}'
    mnt.mkdir()
    fa = FusearrayCLI(a.python, ctx.work / f'scale-{n}.log')
    pids = []
    mark = ctx.cl.mark()
    ctx.cl.push(f'stop fusearray daemon of {mnt}', lambda: stop_daemon(fa, mnt, pids))
    try:
        drop_caches()
        t0 = time.monotonic()
        fa.mount(array, mnt, ['--cache-size', str(CACHE), '--index-cache', str(INDEX_CACHE)])
        wait_mounted(mnt, timeout=60)
        m['mount'].cols[key] = [time.monotonic() - t0]
        pids.extend(daemon_pids(mnt))
        pid = ctlclient.status(str(mnt))['pid']
        m['rss_mount'].cols[key] = [rss(pid) / (1 << 20)]
        lun = mnt / 'luns' / 'big'
        drop_caches()
        job = fio(lun, 'scale-read', ['--rw=randread', '--bs=4k', '--time_based',
                                      '--runtime=8'], n * BS, timeout=200)
        m['read'].cols[key] = [job['read']['clat_ns']['mean'] / 1e6]
        m['rss_read'].cols[key] = [rss(pid) / (1 << 20)]
        st = ctlclient.status(str(mnt))
        held = (st['cache']['bytes'] + st['index']['bytes'] + st['node_cache']['bytes'])
        m['rss_held'].cols[key] = [held / (1 << 20)]
        m['rss_rest'].cols[key] = [(rss(pid) - held) / (1 << 20)]
        t0 = time.monotonic()
        for i in range(SNAPSHOTS):
            write_block(lun, (i * 7919) % n)
            ctl(mnt, 'snapshot', f'big set=s{i:03d} quiesce=no')
        m['snaps'].cols[key] = [time.monotonic() - t0]
        # the delete alone: the command, then the collection it asks for
        # (on the committer's next GC interval), timed by ctl/metrics
        runs0, secs0 = gc_counters(mnt)
        t0 = time.monotonic()
        ctl(mnt, 'delete', 's050')
        cmd = time.monotonic() - t0
        wait_gc(mnt, runs0)
        runs1, secs1 = gc_counters(mnt)
        m['delete'].cols[key] = [cmd + (secs1 - secs0)]
        # writes while a collection runs, against writes before
        before = randwrite_iops(lun, 5, n, 'scale-w0')
        during = []
        runs0 = gc_counters(mnt)[0]
        ctl(mnt, 'delete', 's051')
        writer = threading.Thread(target=lambda: during.append(
            randwrite_iops(lun, 12, n, 'scale-w1')))
        writer.start()
        try:
            wait_gc(mnt, runs0)
        finally:
            writer.join()
        m['gcwrite'].cols[key] = [during[0] / before if during and before else 0.0]
        ctx.cl.unwind(mark)
        if n > a.scale_fsck_max:
            m['fsck'].cols[key] = m['fsck_rss'].cols[key] = 'not run'
            log(f'scale: fsck not run on {n} blocks (over --scale-fsck-max)')
            return
        secs, peak, line = fsck_run(a.python, array)
        log(f'scale: fsck: {line}')
        m['fsck'].cols[key] = [secs]
        m['fsck_rss'].cols[key] = [peak / (1 << 20)]
    finally:
        ctx.cl.unwind(mark)
        shutil.rmtree(array.parent, ignore_errors=True)
        log(f'scale: {n} blocks: ' + ', '.join(f'{k} {v.cols[key]}' for k, v in m.items()
                                               if key in v.cols))


def direct_build(args, n) -> bool:
    """Is the array of n blocks built by tools/scalegen.py --direct?"""
    return args.scale_gen == 'direct' or (args.scale_gen == 'auto' and n > DIRECT_ABOVE)


def group_scale(ctx):
    a = ctx.args
    sizes = a.scale_blocks
    cols = {str(n): f'{n / 1e6:g}M blocks ({fmt_bytes(n * BS)})'
            + (', --direct' if direct_build(a, n) else '') for n in sizes}
    caches = (CACHE + INDEX_CACHE + NODE_CACHE) / (1 << 20)
    m = {
        'build': Metric('build (tools/scalegen.py; --direct where the column says)', 's'),
        'mount': Metric('mount time (until served)', 's', goal=f'<= {MOUNT_MAX:g} s'),
        'rss_mount': Metric('daemon RSS after mount', 'MiB',
                            goal=f'<= {caches + RSS_SLACK / (1 << 20):.0f}, +-10 % of '
                                 'the smallest'),
        'read': Metric('4k random read, whole LUN, cold, QD1: mean latency', 'ms'),
        'rss_read': Metric('daemon RSS after the random reads', 'MiB',
                           goal=f'<= {caches + RSS_SLACK / (1 << 20):.0f}, +-10 % of '
                                'the smallest'),
        'rss_held': Metric('what the caches hold then (block, index entries, map nodes; '
                           'ctl/status)', 'MiB'),
        'rss_rest': Metric('daemon RSS after the random reads less what the caches hold',
                           'MiB', goal='+-10 % of the smallest'),
        'snaps': Metric(f'{SNAPSHOTS} shadow copies, a block written before each', 's'),
        'delete': Metric('delete 1 shadow copy of 100 + the collection after it', 's',
                         goal=f'<= {DELETE_MAX:g} s'),
        'gcwrite': Metric('4k random write QD1 during that collection / before', 'x'),
        'fsck': Metric('tools/fsck --no-data', 's'),
        'fsck_rss': Metric('tools/fsck peak RSS', 'MiB'),
    }
    table = MetricTable(cols, list(m.values()))
    base = Path(a.scale_dir or a.disk_dir)
    base.mkdir(parents=True, exist_ok=True)
    table.notes.append(f'arrays built on {base} ({run(["stat", "-f", "-c", "%T", base]).stdout.strip()}); '
                       f'mounted with --cache-size {CACHE >> 20}M --index-cache '
                       f'{INDEX_CACHE >> 20}M')
    if a.scale_pack_dir:
        table.notes.append(f'their segments (the disk of the pack) on {a.scale_pack_dir} ('
                           + run(['findmnt', '-no', 'FSTYPE,OPTIONS', '--target',
                                  a.scale_pack_dir]).stdout.strip() + ')')
    for n in sizes:
        try:
            one_size(ctx, n, m, base)
        except (StepFailed, OSError) as e:    # (OSError: the daemon died under a ctl call)
            ctx.fail(f'scale {n}: {e}')
            for metric in m.values():
                if not isinstance(metric.cols.get(str(n)), list):
                    metric.cols[str(n)] = 'failed'
    return scale_verdicts(table, m, sizes, caches)


def scale_verdicts(table, m, sizes, caches):
    keys = [str(n) for n in sizes]
    limit = caches + RSS_SLACK / (1 << 20)
    for name in ('rss_mount', 'rss_read'):
        vals = [m[name].median(k) for k in keys]
        if None in vals:
            m[name].verdict = 'n/a'
            continue
        flat = all(abs(v - vals[0]) <= 0.1 * vals[0] for v in vals)
        m[name].verdict = 'PASS' if max(vals) <= limit and flat else 'FAIL'
    vals = [m['rss_rest'].median(k) for k in keys]
    m['rss_rest'].verdict = 'n/a' if None in vals else (
        'PASS' if all(abs(v - vals[0]) <= 0.1 * vals[0] for v in vals) else 'FAIL')
    for name, top in (('mount', MOUNT_MAX), ('delete', DELETE_MAX)):
        vals = [m[name].median(k) for k in keys]
        m[name].verdict = 'n/a' if None in vals else (
            'PASS' if max(vals) <= top else 'FAIL')
    return table
