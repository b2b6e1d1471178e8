"""The snap group: shadow copies, snapshot and resync times (issue 3).
"""
import mmap
import os
import random
import time
from pathlib import Path

from .common import (
    MB, StepFailed, fio, fmt_bytes, fmt_size, fs_usage, log, make_tempdir, mount_tmpfs,
    start_array)
from .arrays import (
    check_memory, setup_failed, Metric, MetricTable, SnapArray, ctl_reply, ctl_send,
    fsync_path, fusearray_overcommit, read_direct)


#: snapshot and same-pack resync targets (issue 3): at most this, and "flat":
#: the big LUN's median at most FLAT_RATIO times the small one's
SNAP_MAX_MS = 10.0
FLAT_RATIO = 1.5
FLAT_SLACK_MS = 1.0     # or within this of it: sub-millisecond jitter is not a slope
FIRST_IO_MAX_MS = 50.0
COPY_MIN_RATIO = 0.5

def snap_fill(ctx, sa, name, size, written):
    """Write `written` bytes of random data into LUN `name` (all of it, or
    1 MiB pieces spread evenly over it), then fsync it: fill MB/s."""
    if written >= size:
        opts = ['--rw=write', '--bs=1M']
    else:
        stride = size // (written // (1 << 20))      # one 1 MiB piece per stride
        opts = [f'--rw=write:{stride - (1 << 20)}', '--bs=1M', f'--io_size={written}']
    log(f'snap: write {fmt_size(written)} into {fmt_size(size)} LUN {name}')
    job = fio(sa.lun(name), f'fill-{name}', opts, size,
              timeout=max(600, written // (2 << 20)), buffers='--refill_buffers')
    fsync_path(sa.lun(name))
    return job['write']['bw_bytes'] / MB


def seq_write_reference(ctx, sa, table):
    """The seq write 1M MB/s of this run: the fio group's fusearray result if
    it ran, else a short O_DIRECT 1M seq write on this array's small LUN."""
    for row in ctx.results.get('fio', []):
        value = row.values.get('fusearray') if row.workload == 'seq write 1M' else None
        if isinstance(value, (int, float)):
            table.notes.append(f'seq write reference: {value:.0f} MB/s, the fio group\'s '
                               'fusearray seq write 1M of this run')
            return value
    # one pass over the written LUN (an overwrite, as in the fio group): its
    # garbage is at most the LUN's size, whatever the speed
    size = ctx.args.snap_small
    log(f'snap: seq write 1M reference (one {fmt_size(size)} pass, O_DIRECT, on LUN small)')
    job = fio(sa.lun('small'), 'seq-write-reference', ['--rw=write', '--bs=1M'], size,
              timeout=max(600, size // (2 << 20)))
    fsync_path(sa.lun('small'))
    value = job['write']['bw_bytes'] / MB
    table.notes.append(f'seq write reference: {value:.0f} MB/s, one O_DIRECT 1M seq write '
                       f'pass over the written LUN small (the fio group did not run or '
                       'failed for fusearray)')
    return value


def snap_times(ctx, sa, metric, verb, line_of, after):
    """Median-of-N timing of one ctl command on both LUNs, interleaved."""
    for i in range(ctx.args.snap_repeat):
        for key in ('small', 'big'):
            seconds, reply = sa.ctl(verb, line_of(key, i))
            metric.cols.setdefault(key, []).append(seconds * 1000)
            after(key, i, reply)


def resync_first_io(sa, line, dest, offset):
    """`echo LINE > ctl/resync` on an O_RDWR descriptor, then at once a 4k
    O_DIRECT read of `dest` at `offset` (opening it included): (seconds the
    command took, seconds to the end of the read, job id, the 4k read)."""
    buf = mmap.mmap(-1, 4096)       # page-aligned, as O_DIRECT wants
    fd = os.open(sa.mnt / 'ctl' / 'resync', os.O_RDWR)
    try:
        start = time.perf_counter()
        _, err = ctl_send(fd, line)
        returned = time.perf_counter()
        if err is None:
            dfd = os.open(sa.lun(dest), os.O_RDONLY | os.O_DIRECT)
            try:
                n = os.preadv(dfd, [buf], offset)
                first_io = time.perf_counter()
            finally:
                os.close(dfd)
        text, reply = ctl_reply(fd)
    finally:
        os.close(fd)
    if err is not None or reply.get('status') != 'ok':
        raise StepFailed(f'echo "{line}" > ctl/resync: '
                         f'{err.strerror if err else "no error, but"} '
                         f'(reply: {text.strip() or "none"})\n{sa.log_tail()}')
    return returned - start, first_io - start, reply['job'], bytes(buf[:n])


def check_read(sa, data, source, dest, offset):
    want = read_direct(sa.mnt / 'snapshots' / source, offset)
    if data != want:
        raise StepFailed(f'{dest} at offset {offset}: the first read returned {len(data)} '
                         f'bytes that differ from the shadow copy {source}')


def snap_cross_pack(ctx, sa, first, command, copy, base):
    """resync SET/LUN=DEST pack=far. The small LUN: time to the first read of
    DEST, then the background copy rate. The thin LUN: time to the first read,
    then the copy is cancelled (it would copy all that is written). Each DEST
    is checked against the shadow copy and deleted."""
    a = ctx.args
    rng = random.Random(0)
    for i in range(a.copy_repeat):
        for key, size in (('small', a.snap_small), ('big', a.snap_big)):
            dest = f'copy-{key}-{i}'
            offset = rng.randrange(min(size, a.snap_small) // 4096) * 4096
            line = f'{base}/{key}={dest} pack=far'
            log(f'snap: resync {line}')
            start = time.perf_counter()
            cmd, first_io, jid, data = resync_first_io(sa, line, dest, offset)
            command.cols.setdefault(key, []).append(cmd * 1000)
            first.cols.setdefault(key, []).append(first_io * 1000)
            if key == 'small':
                done, fields = sa.wait_job(jid, timeout=max(300, size // (2 << 20)))
                total = int(fields.get('total_bytes', 0))
                copy.cols.setdefault(key, []).append(total / (done - start) / MB)
                how = f'copied {fmt_bytes(total)} at {total / (done - start) / MB:.0f} MB/s'
            else:
                if sa.job(jid).get('state') in ('queued', 'running', 'paused'):
                    try:
                        sa.ctl('cancel', jid)
                    except StepFailed:
                        pass      # it ended meanwhile
                fields = sa.wait_ended(jid, timeout=120)
                how = f'job {fields.get("state")} at {fields.get("percent")}%'
            check_read(sa, data, f'{base}/{key}', dest, offset)
            log(f'snap: {dest}: command {cmd * 1000:.1f} ms, first read '
                f'{first_io * 1000:.1f} ms, {how}')
            sa.ctl('delete', dest, busy_retry=True)


def snap_space(ctx, need, mem_need):
    """Where the snap array goes: --array-dir, or a tmpfs of its own whose
    limit satisfies fusearray's thin provisioning check (a LUN may be at most
    OVERCOMMIT times its pack's filesystem) while only about `need` is
    written there (`mem_need`: the group's whole use of memory)."""
    a = ctx.args
    over = fusearray_overcommit(a.python)
    min_fs = -(-a.snap_big // over)
    if a.array_dir:
        ctx.space.watch(f'--array-dir {a.array_dir}', a.array_dir)
        _, size = fs_usage(a.array_dir)
        if size < min_fs:
            raise StepFailed(f'{a.array_dir} is {fmt_bytes(size)}: fusearray refuses a '
                             f'{fmt_size(a.snap_big)} LUN on a filesystem under '
                             f'{fmt_bytes(min_fs)} ({over}x thin provisioning)')
        return Path(a.array_dir), f'array dir under {a.array_dir}'
    check_memory('snap', 'the arrays', mem_need,
                 'use --array-dir, or a smaller --snap-written/--snap-small')
    path = ctx.work / 'snap-tmpfs'
    limit = max(min_fs + (1 << 30), need + (1 << 30))
    mount_tmpfs(ctx.cl, path, limit, ctx.space, 'snap array tmpfs')
    return path, (f'array on a tmpfs of its own, limit {fmt_bytes(limit)} (fusearray wants '
                  f'the pack\'s filesystem at least 1/{over} of a LUN) holding about '
                  f'{fmt_bytes(need)}')


def group_snap(ctx):
    a = ctx.args
    n, m = a.snap_repeat, a.copy_repeat
    ms_goal = (f'<= {SNAP_MAX_MS:g} ms each, flat (ratio <= {FLAT_RATIO:g} '
               f'or within {FLAT_SLACK_MS:g} ms)')
    snap = Metric(f'snapshot (differential), median of {n}', 'ms', goal=ms_goal)
    resync = Metric(f'resync SET/LUN, same pack, median of {n}', 'ms', goal=ms_goal)
    command = Metric(f'resync to another pack: command returns, median of {m}', 'ms')
    first = Metric(f'resync to another pack: command + open + first 4k O_DIRECT read of '
                   f'the destination, median of {m}', 'ms',
                   goal=f'<= {FIRST_IO_MAX_MS:g} ms each')
    copy = Metric(f'resync to another pack: background copy (bytes / time to done), '
                  f'median of {m}', 'MB/s')
    ratio = Metric('background copy / seq write 1M', 'x', goal=f'>= {COPY_MIN_RATIO:g}x')
    table = MetricTable({'small': f'{fmt_size(a.snap_small)} LUN, fully written',
                         'big': f'{fmt_size(a.snap_big)} thin LUN, '
                                f'{fmt_size(a.snap_written)} written'},
                        [snap, resync, command, first, copy, ratio])
    if 'fusearray' not in a.only:
        table.notes.append('not run: fusearray is not among the targets (--only)')
        return snap_verdicts(table, None)
    mark = ctx.cl.mark()
    try:
        written = a.snap_small + a.snap_written
        # data, the far pack's copy, garbage of the seq write reference, slack
        base, where = snap_space(ctx, written + a.snap_small,
                                 written + 2 * a.snap_small + (1 << 30))
        table.notes.append(where)
        # the far pack must pass the same thin provisioning check for the 1 TiB LUN
        far = make_tempdir(ctx.cl, parent=base, prefix='snap-far.')
        table.notes.append('second pack "far" (single) on the same filesystem, another '
                           'directory')
        fa, array, mnt = start_array(ctx, 'snap', base)
        sa = SnapArray(ctx, fa, array, mnt)
        sa.ctl('create', f'small {a.snap_small}')
        sa.ctl('create', f'big {a.snap_big}')
        fills = [snap_fill(ctx, sa, 'small', a.snap_small, a.snap_small),
                 snap_fill(ctx, sa, 'big', a.snap_big, a.snap_written)]
        alloc = {l['name']: l['allocated_bytes'] for l in sa.status()['luns']}
        table.notes.append(f'written with fio (O_DIRECT, 1M, random data; the thin LUN in '
                           f'1 MiB pieces every {fmt_bytes(a.snap_big // (a.snap_written >> 20))}) '
                           f'at {fills[0]:.0f} / {fills[1]:.0f} MB/s, then fsync; allocated '
                           f'{fmt_bytes(alloc.get("small", 0))} / {fmt_bytes(alloc.get("big", 0))}')
        reference = seq_write_reference(ctx, sa, table)
        used = sa.wait_used_below(written + (256 << 20))
        log(f'snap: array uses {fmt_bytes(used)}; {ctx.space.now()}')
    except StepFailed as e:
        setup_failed(ctx, 'snap', table, mark, e,
                     lambda m: ('small',) if m in (copy, ratio) else ('small', 'big'))
        return snap_verdicts(table, None)

    def drop_set(key, i, reply):
        name = reply['set']
        if not (sa.mnt / 'snapshots' / name / key).exists():
            raise StepFailed(f'snapshot set {name} has no {key}')
        sa.ctl('delete', name, busy_retry=True)

    def drop_undo(key, i, reply):
        if reply.get('undo'):
            for name in reply['undo'].split(','):
                sa.ctl('delete', name, busy_retry=True)

    steps = [
        ('snapshot', [snap], lambda: snap_times(
            ctx, sa, snap, 'snapshot', lambda key, i: f'{key} set=bench-{key}-{i}', drop_set)),
        ('same-pack resync', [resync], lambda: (
            sa.ctl('snapshot', 'small big set=base'),
            snap_times(ctx, sa, resync, 'resync', lambda key, i: f'base/{key}', drop_undo))),
        ('cross-pack resync', [command, first, copy], lambda: (
            sa.ctl('addpack', f'far single {far}'),
            snap_cross_pack(ctx, sa, first, command, copy, 'base'))),
    ]
    try:
        for what, metrics, fn in steps:
            log(f'snap: {what}')
            try:
                fn()
            except (StepFailed, OSError, KeyError) as e:
                ctx.fail(f'snap: {what}: {e}' + ('' if isinstance(e, StepFailed)
                                                 else f'\n{sa.log_tail()}'))
                for metric in metrics:
                    metric.fail(('small',) if metric is copy else ('small', 'big'))
    finally:
        ctx.cl.unwind(mark)
    return snap_verdicts(table, reference)


def snap_verdicts(table, reference):
    snap, resync, command, first, copy, ratio = table.rows
    copied = copy.median('small')
    if copied is not None and reference:
        ratio.cols['small'] = [copied / reference]
    elif copy.cols.get('small') == 'failed':
        ratio.cols['small'] = 'failed'
    for metric in (snap, resync):
        small, big = metric.median('small'), metric.median('big')
        if small is None or big is None:
            metric.verdict = 'n/a'
        else:
            flat = big <= FLAT_RATIO * small or big - small <= FLAT_SLACK_MS
            ok = max(small, big) <= SNAP_MAX_MS and flat
            metric.verdict = 'PASS' if ok else 'MISS'
    f = [first.median(k) for k in ('small', 'big')]
    first.verdict = ('n/a' if None in f else
                     'PASS' if max(f) <= FIRST_IO_MAX_MS else 'MISS')
    r = ratio.median('small')
    ratio.verdict = 'n/a' if r is None else ('PASS' if r >= COPY_MIN_RATIO else 'MISS')
    return table


# ---------------------------------------------------------------- packs group
