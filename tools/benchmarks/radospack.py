"""The rados group (issue #17 point 6): a LUN on a rados pack against raw
librados on the same cluster, in the same run, and against a LUN on a
local pack of the same array.

The cluster is the bench's own: tools/ceph-up in a new directory under
/tmp (one mon, one memstore OSD on 127.0.0.1, auth none, pool `fa` of
size 1), stopped by tools/ceph-down (by its daemons' PIDs) and its
directory removed in the group's clean-up, also on failure and Ctrl-C.

The array has two packs: `loc` (one directory on a tmpfs of its own) and
`rad` (`rados:fa`), a LUN on each. Every pass is fio O_DIRECT psync 1M
over the whole LUN (a write pass ends with its fsync), the LUNs and the
raw baseline taken in turn, pass by pass.

The baseline, and why the Python binding: "raw librados with the same
object size and concurrency" is taken literally. The daemon of this group
loads tools/benchmarks/radostrace/sitecustomize.py (its PYTHONPATH), which
records every call the rados pack makes (RadosMedium.pwritev/preadv: a
segment append, a block read) and the RADOS ops each issued, and how many
calls were in flight. After each rados LUN pass, rawrados.py (a process
of its own, like the daemon) moves the same number of bytes with the
shape that carried most of that pass's bytes: the same call size cut into
the same RADOS ops (a store append of ~16 MiB: aio_writes of WRITE_CHUNK
all in flight, then waited for; a read: one 64 KiB read at a time, as the
pack reads block by block), the same calls in flight, into and out of objects
of the segment size (64 MiB), straight through the `rados` binding. That
is the same client library and binding as the pack, so the ratio is what
fusearray costs above librados (FUSE, the cache, hashing, the catalogue,
the medium layer). `rados bench` (C++) cannot take that shape: it writes
whole objects of its op size and reads them whole, its -t counts
independent ops, not a call's pieces; what the binding itself costs
against C++ is not part of the target.

The group also measures, once, what docs/scale-out.md builds on: small
RADOS ops, an omap update, a cls_lock lease renewal, mon commands
(rawrados.py's "ops").
"""
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .common import (
    MB, REPO, StepFailed, alive, array_used, daemon_pids, fmt_bytes, fmt_size, log, mount_tmpfs,
    run, start_array)
from .arrays import check_memory, setup_failed, Metric, MetricTable, SnapArray, fsync_path
from .packs import fio_pass


#: issue #17 target: seq write and read 1M of a LUN on a rados pack against
#: raw librados with the same object size and concurrency
RADOS_MIN = 0.7
HERE = Path(__file__).resolve().parent
CEPH_UP = REPO / 'tools' / 'ceph-up'
CEPH_DOWN = REPO / 'tools' / 'ceph-down'
TRACE_DIR = HERE / 'radostrace'
RAW = HERE / 'rawrados.py'
POOL = 'fa'
RAW_NS = 'fusearray-bench-raw'
#: the trace is written twice a second
TRACE_WAIT = 0.7


class Cluster:
    """tools/ceph-up in a directory of its own; stop() by tools/ceph-down,
    then each daemon's PID checked gone."""

    def __init__(self, cl, osd_bytes):
        # short: the daemons' admin socket paths must fit in sun_path
        self.dir = Path(tempfile.mkdtemp(prefix='fa-bench-ceph.', dir='/tmp'))
        self.pids = {}
        cl.push(f'remove {self.dir}', lambda: shutil.rmtree(self.dir, ignore_errors=True))
        cl.push(f'tools/ceph-down {self.dir}', self.stop)
        env = dict(os.environ, OSD_BYTES=str(osd_bytes), POOL=POOL)
        env.pop('MGR', None)
        start = time.monotonic()
        proc = run([CEPH_UP, self.dir], env=env, timeout=180)
        self.up_seconds = time.monotonic() - start
        self.conf = self.dir / 'ceph.conf'
        self.read_pids()
        log(f'rados: cluster up in {self.up_seconds:.1f} s, {self.dir}, pids {self.pids}')
        if not self.conf.is_file():
            raise StepFailed(f'tools/ceph-up printed no conf: {proc.stdout[-500:]}')

    def read_pids(self):
        for f in (self.dir / 'run').glob('*.pid'):
            try:
                self.pids[f.stem] = int(f.read_text().strip())
            except (OSError, ValueError):
                pass

    def stop(self):
        self.read_pids()
        proc = run([CEPH_DOWN, self.dir], check=False, timeout=120)
        left = [f'{n} pid {p}' for n, p in self.pids.items() if alive(p)]
        if proc.returncode or left:
            raise StepFailed(f'tools/ceph-down {self.dir}: exit {proc.returncode}, still '
                             f'running: {", ".join(left) or "none"}\n{proc.stderr[-1000:]}')


def cpu_seconds(pid):
    """CPU seconds (user + system, every thread) of process `pid` so far."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def read_trace(prefix):
    """The daemon's trace snapshot (the file with the most calls)."""
    best = {}
    for f in glob.glob(f'{prefix}.*.json'):
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue
        calls = sum(s['calls'] for s in data['stats'].values())
        if calls >= sum(s['calls'] for s in best.get('stats', {}).values()):
            best = data
    return best


def call_seconds(before, after, kind):
    """Seconds spent inside the pack's `kind` calls between two snapshots."""
    return after.get('call_s', {}).get(kind, 0.0) - before.get('call_s', {}).get(kind, 0.0)


def trace_delta(before, after, kind):
    """{shape: count} and {in flight: count} of `kind` calls between two snapshots."""
    def get(snap, key):
        return snap.get('stats', {}).get(kind, {}).get(key, {})
    out = []
    for key in ('shapes', 'inflight'):
        a, b = get(before, key), get(after, key)
        out.append({k: n - a.get(k, 0) for k, n in b.items() if n - a.get(k, 0) > 0})
    return out


def parse_shape(shape):
    """'SIZE:op=N,op=N' -> (size, [op sizes], [op names])."""
    size, _, ops = shape.partition(':')
    pairs = [o.split('=') for o in ops.split(',') if o]
    return int(size), [int(n) for _, n in pairs], [op for op, _ in pairs]


def dominant(shapes, inflight):
    """The shape that carried the most bytes, and the in-flight count most
    calls started at: (size, pieces, ops, threads, share of the bytes)."""
    if not shapes:
        raise StepFailed('the trace recorded no call of the rados pack in this pass '
                         '(was the daemon started with the trace?)')
    weight = {}
    for shape, n in shapes.items():
        size, pieces, ops = parse_shape(shape)
        if not pieces:
            continue
        weight[shape] = weight.get(shape, 0) + size * n
    top = max(weight, key=weight.get)
    size, pieces, ops = parse_shape(top)
    threads = int(max(inflight, key=inflight.get)) if inflight else 1
    return size, pieces, ops, threads, weight[top] / sum(weight.values())


def describe(kind, shapes, inflight, total, inside, wall):
    """A note: what the pack issued in a pass, and how long it was inside
    those calls (`inside`) of the pass's `wall` seconds."""
    size, pieces, ops, threads, share = dominant(shapes, inflight)
    calls = sum(shapes.values())
    cut = {}
    for p in pieces:
        cut[p] = cut.get(p, 0) + 1
    how = ' + '.join(f'{n}x {fmt_bytes(p)}' for p, n in cut.items())
    mode = 'aio, all in flight, then waited for' if len(pieces) > 1 else 'one synchronous op'
    return (f'{kind}: {calls} calls of the pack ({fmt_bytes(total)} moved); '
            f'{share * 100:.0f} % of the bytes in calls of {size} bytes, each RADOS '
            f'{"/".join(sorted(set(ops)))} of {how} ({mode}); calls in flight: '
            + ', '.join(f'{k}: {v}' for k, v in sorted(inflight.items(), key=lambda x: int(x[0])))
            + f'; {inside:.2f} s inside them of the pass\'s {wall:.2f} s (fio)')


def settle(sa, clean):
    """Wait (30 s at most) until garbage collection has brought the array
    back near `clean` bytes used, so that a pass does not pay for the
    collection of the one before (in the same daemon, on the CPU it shares)."""
    sa.wait_used_below(clean + clean // 20 + (64 << 20), timeout=30)


def raw(ctx, conf, spec):
    spec = dict(spec, conf=str(conf), pool=POOL, namespace=RAW_NS)
    proc = run([ctx.args.python, RAW, json.dumps(spec)], timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def group_rados(ctx):
    a = ctx.args
    size = a.rados_lun
    passes = a.rados_passes
    cols = {'local': 'LUN on a local pack (tmpfs)', 'rados': 'LUN on the rados pack',
            'raw': 'raw librados, the pack\'s object size, op sizes and concurrency'}
    write = Metric(f'seq write 1M, {fmt_size(size)} passes (the first into the new LUN, '
                   f'then overwrites), median of {passes}', 'MB/s')
    read = Metric(f'seq read 1M, one {fmt_size(size)} pass, median of {passes}', 'MB/s')
    w_raw = Metric('seq write: rados LUN / raw librados, pass by pass', 'x',
                   goal=f'>= {RADOS_MIN:g}x')
    r_raw = Metric('seq read: rados LUN / raw librados, pass by pass', 'x',
                   goal=f'>= {RADOS_MIN:g}x')
    w_loc = Metric('seq write: rados LUN / local LUN, pass by pass', 'x')
    r_loc = Metric('seq read: rados LUN / local LUN, pass by pass', 'x')
    gib = size / (1 << 30)
    cpu_w = Metric('CPU seconds per GiB written: the fusearray daemon (both LUNs), the raw '
                   'librados process', 's/GiB')
    cpu_r = Metric('CPU seconds per GiB read: the fusearray daemon, the raw process', 's/GiB')
    osd_w = Metric('CPU seconds per GiB written: the OSD', 's/GiB')
    osd_r = Metric('CPU seconds per GiB read: the OSD', 's/GiB')
    bound_w = Metric('seq write: the ratio the CPU allows, (raw process + OSD) / (daemon '
                     '+ OSD) CPU seconds per GiB, pass by pass', 'x')
    bound_r = Metric('seq read: the ratio the CPU allows, the same for reads', 'x')
    read_1m = Metric('seq read, raw librados reading 1 MiB at a time instead of the pack\'s '
                     'shape (what one RADOS read per 1M request would ask; not the target\'s '
                     'baseline), median', 'MB/s')
    table = MetricTable(cols, [write, read, w_raw, r_raw, w_loc, r_loc, read_1m,
                               cpu_w, cpu_r, osd_w, osd_r, bound_w, bound_r])
    if 'fusearray' not in a.only:
        table.notes.append('not run: fusearray is not among the targets (--only)')
        return rados_verdicts(table)
    mark = ctx.cl.mark()
    try:
        for tool in (CEPH_UP, CEPH_DOWN):
            if not tool.exists():
                raise StepFailed(f'{tool} is missing')
        for binary in ('ceph-mon', 'ceph-osd'):
            if not shutil.which(binary):
                raise StepFailed(f'{binary} not found (bash tools/setup.sh installs Ceph)')
        probe = run([a.python, '-c', 'import rados'], check=False)
        if probe.returncode:
            raise StepFailed(f'{a.python} cannot import rados (Debian\'s python3-rados, '
                             f'linked into the venv by tools/setup.sh): {probe.stderr[-300:]}')
        # memstore keeps about twice what is written in the OSD's RAM: the
        # LUN, the garbage of an overwrite until GC removes it, the raw objects;
        # the local pack's tmpfs holds the same
        need = size * (4 * 2 + 3) + (1 << 30)
        check_memory('rados', 'the OSD (memstore) and the local pack', need,
                     'use a smaller --rados-lun')
        cluster = Cluster(ctx.cl, max(8 << 30, size * 16))
        base = ctx.work / 'rados-tmpfs'
        mount_tmpfs(ctx.cl, base, 512 << 20, ctx.space, 'rados array tmpfs')
        disk = ctx.work / 'rados-local-disk'
        mount_tmpfs(ctx.cl, disk, size * 3 + (1 << 30), ctx.space, 'rados group local pack tmpfs')
        trace = ctx.work / 'rados-trace' / 'calls'
        trace.parent.mkdir()
        fa, array, mnt = start_array(
            ctx, 'rados', base,
            ['--pack', f'loc=single:{disk / "d"}', '--pack', f'rad=rados:{POOL}',
             '--ceph-conf', cluster.conf],
            env={'PYTHONPATH': str(TRACE_DIR), 'FUSEARRAY_RADOS_TRACE': str(trace),
                 'CEPH_CONF': str(cluster.conf)})
        sa = SnapArray(ctx, fa, array, mnt)
        pids = daemon_pids(mnt)
        if not pids:
            raise StepFailed(f'no daemon process found for {mnt}')
        daemon, osd = pids[0], cluster.pids.get('osd.0')
        sa.ctl('create', f'lun-local {size} pack=loc')
        sa.ctl('create', f'lun-rados {size} pack=rad')
        table.notes.append(
            f'cluster: tools/ceph-up (one mon, one OSD on memstore, 127.0.0.1, auth none, '
            f'pool {POOL} of size 1, 8 PGs) up in {cluster.up_seconds:.1f} s; pack rad='
            f'rados:{POOL}, pack loc=single: a tmpfs of its own; the array (catalogue) on '
            f'another tmpfs; one daemon serves both LUNs')
    except StepFailed as e:
        setup_failed(ctx, 'rados', table, mark, e, cols)
        return rados_verdicts(table)
    try:
        try:
            notes = {}
            raw_objects, raw_prefix = 0, None
            clean = None
            for i in range(passes):
                for key in ('local', 'rados'):
                    if clean is not None:   # the last pass's garbage collected first
                        settle(sa, clean)
                    log(f'rados: {key} LUN: seq write 1M, {fmt_size(size)} ({i + 1}/{passes})')
                    if key == 'rados':
                        time.sleep(TRACE_WAIT)
                        before = read_trace(trace)
                    c0, o0 = cpu_seconds(daemon), cpu_seconds(osd)
                    write.cols.setdefault(key, []).append(
                        fio_pass(sa.lun(f'lun-{key}'), f'write-{key}', 'write', size))
                    fsync_path(sa.lun(f'lun-{key}'))
                    wall = size / MB / write.cols[key][-1]
                    cpu_w.cols.setdefault(key, []).append((cpu_seconds(daemon) - c0) / gib)
                    osd_w.cols.setdefault(key, []).append((cpu_seconds(osd) - o0) / gib)
                time.sleep(TRACE_WAIT)
                after = read_trace(trace)
                shapes, inflight = trace_delta(before, after, 'write')
                notes['write'] = describe('rados LUN write pass', shapes, inflight, size,
                                          call_seconds(before, after, 'write'), wall)
                call, pieces, _, threads, _ = dominant(shapes, inflight)
                prefix = f'w{i}'
                log(f'rados: raw librados: write {fmt_size(size)} in calls of {call} bytes '
                    f'({len(pieces)} op(s)), {threads} in flight ({i + 1}/{passes})')
                got = raw(ctx, cluster.conf, {
                    'op': 'write', 'bytes': size, 'object': read_trace(trace)['segment'],
                    'pieces': pieces, 'threads': threads, 'prefix': prefix, 'osd_pid': osd,
                    'remove': [raw_prefix] if raw_prefix else []})
                write.cols.setdefault('raw', []).append(got['bytes'] / got['seconds'] / MB)
                cpu_w.cols.setdefault('raw', []).append(got['cpu'] / gib)
                osd_w.cols.setdefault('raw', []).append(got['osd_cpu'] / gib)
                raw_objects, raw_prefix = got['objects'], prefix
                if clean is None:
                    clean = array_used(sa.mnt)      # both LUNs written once: no garbage
            if clean is not None:
                settle(sa, clean)
            for i in range(passes):
                for key in ('local', 'rados'):
                    log(f'rados: {key} LUN: seq read 1M, {fmt_size(size)} ({i + 1}/{passes})')
                    if key == 'rados':
                        time.sleep(TRACE_WAIT)
                        before = read_trace(trace)
                    c0, o0 = cpu_seconds(daemon), cpu_seconds(osd)
                    read.cols.setdefault(key, []).append(
                        fio_pass(sa.lun(f'lun-{key}'), f'read-{key}', 'read', size))
                    wall = size / MB / read.cols[key][-1]
                    cpu_r.cols.setdefault(key, []).append((cpu_seconds(daemon) - c0) / gib)
                    osd_r.cols.setdefault(key, []).append((cpu_seconds(osd) - o0) / gib)
                time.sleep(TRACE_WAIT)
                after = read_trace(trace)
                shapes, inflight = trace_delta(before, after, 'read')
                notes['read'] = describe('rados LUN read pass', shapes, inflight, size,
                                         call_seconds(before, after, 'read'), wall)
                call, pieces, _, threads, _ = dominant(shapes, inflight)
                log(f'rados: raw librados: read {fmt_size(size)} in calls of {call} bytes '
                    f'({len(pieces)} op(s)), {threads} in flight ({i + 1}/{passes})')
                got = raw(ctx, cluster.conf, {
                    'op': 'read', 'bytes': size, 'object': read_trace(trace)['segment'],
                    'pieces': pieces, 'threads': threads, 'prefix': raw_prefix, 'osd_pid': osd,
                    'objects': raw_objects})
                read.cols.setdefault('raw', []).append(got['bytes'] / got['seconds'] / MB)
                cpu_r.cols.setdefault('raw', []).append(got['cpu'] / gib)
                osd_r.cols.setdefault('raw', []).append(got['osd_cpu'] / gib)
                # for comparison, not the target: the same objects read 1 MiB at a
                # time, what one read per 1M request would ask of RADOS
                got = raw(ctx, cluster.conf, {
                    'op': 'read', 'bytes': size, 'object': read_trace(trace)['segment'],
                    'pieces': [1 << 20], 'threads': threads, 'prefix': raw_prefix,
                    'objects': raw_objects})
                read_1m.cols.setdefault('raw', []).append(got['bytes'] / got['seconds'] / MB)
            table.notes += [f'the last {notes["write"]}', f'the last {notes["read"]}']
        except (StepFailed, OSError) as e:
            ctx.fail(f'rados: seq I/O: {e}' + ('' if isinstance(e, StepFailed)
                                                else f'\n{sa.log_tail()}'))
            for metric in (write, read, read_1m, cpu_w, cpu_r, osd_w, osd_r):
                metric.fail(tuple(cols))
        try:
            log('rados: small ops, omap, cls_lock renewal, mon commands (raw librados)')
            table.ops = raw(ctx, cluster.conf, {'op': 'ops', 'remove': [raw_prefix]
                                                if raw_prefix else []})
            table.notes.append('the cluster\'s own numbers (raw librados, one client, medians; '
                               'docs/scale-out.md): ' + '; '.join(
                                   f'{k}: ' + (f'{v["ms"]:.2f} ms' if 'ms' in v
                                               else f'{v["ops_s"]:.0f} ops/s')
                                   for k, v in table.ops.items()))
        except StepFailed as e:
            ctx.fail(f'rados: ops: {e}')
    finally:
        ctx.cl.unwind(mark)
    table.notes.append(
        'fio O_DIRECT, psync, iodepth 1, 1M, one pass over the LUN per sample (a write '
        'pass ends with its fsync); pass i of the local LUN, the rados LUN and raw '
        'librados in turn; the ratios: the median of pass i over pass i (in brackets '
        'their range). Raw librados: tools/benchmarks/rawrados.py, a process of its '
        'own, the Python `rados` binding the pack uses, after each rados LUN pass the '
        'same bytes in the shape that carried most of that pass\'s bytes (the trace of '
        'RadosMedium.pwritev/preadv and their RADOS ops, radostrace/sitecustomize.py '
        'loaded by this daemon only), into new objects of the segment size for writes '
        '(the pack writes every segment anew: RADOS has no rename, no spare files), '
        'reading back what its last write pass wrote. The trace costs the rados LUN '
        '6-9 us per call (2-4 % of a read pass of 64 KiB calls, nothing measurable on '
        'writes)')
    table.notes.append(
        'CPU: utime + stime in /proc/PID/stat of the daemon (every thread: the FUSE loop, '
        'the workers, librados\'s) and of the OSD over each LUN pass; the raw process\'s '
        'own CPU (time.process_time) and the OSD\'s over its timed part. The client and the '
        'OSD share this machine\'s cores: the ratio the CPU allows is what the rados LUN '
        'could reach against raw librados if the cores were the only limit (CPU seconds '
        'per GiB of both, the OSD\'s included)')
    return rados_verdicts(table)


def rados_verdicts(table):
    write, read, w_raw, r_raw, w_loc, r_loc = table.rows[:6]
    for num, ref, out in ((write, 'raw', w_raw), (read, 'raw', r_raw),
                          (write, 'local', w_loc), (read, 'local', r_loc)):
        mine, base = num.cols.get('rados'), num.cols.get(ref)
        if isinstance(mine, list) and isinstance(base, list) and mine \
                and len(mine) == len(base):
            out.cols['rados'] = [x / y for x, y in zip(mine, base)]
        elif mine == 'failed' or base == 'failed':
            out.cols['rados'] = 'failed'
    cpu_w, cpu_r, osd_w, osd_r, bound_w, bound_r = table.rows[7:13]
    for cpu, osd, out in ((cpu_w, osd_w, bound_w), (cpu_r, osd_r, bound_r)):
        d, o = cpu.cols.get('rados'), osd.cols.get('rados')
        rd, ro = cpu.cols.get('raw'), osd.cols.get('raw')
        if all(isinstance(v, list) and v for v in (d, o, rd, ro)) \
                and len({len(d), len(o), len(rd), len(ro)}) == 1:
            out.cols['rados'] = [(a + b) / (c + e) for a, b, c, e in zip(rd, ro, d, o)
                                 if c + e > 0]
    for metric in (w_raw, r_raw):
        r = metric.median('rados')
        metric.verdict = 'n/a' if r is None else 'PASS' if r >= RADOS_MIN else 'FAIL'
    return table
