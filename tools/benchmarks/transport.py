"""The transport group: export and import of a set, full and incremental
(issue 5).
"""
import statistics
import time

from .common import (
    MB, StepFailed, array_used, fio, fmt_bytes, fmt_size, log, mount_tmpfs, run, start_array,
    wait_until_used_below)
from .arrays import check_memory, setup_failed, Metric, MetricTable, SnapArray, fsync_path
from .packs import fio_pass


EXPORT_MIN_RATIO = 0.5
INCR_MAX_PERCENT = 2.0
INCR_FRACTION = 0.01
INCR_BLOCK = 64 << 10


def same_content(a, b, chunk=4 << 20):
    """Whether two files hold the same bytes (read through the page cache)."""
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def group_transport(ctx):
    a = ctx.args
    size = a.transport_lun
    cols = {'full': f'full stream of s1 ({fmt_size(size)} LUN, fully written)',
            'incr': f'incremental s2 --base s1 ({INCR_FRACTION:.0%} of the 64K blocks '
                    'rewritten)'}
    stream = Metric('stream size', 'MiB')
    export = Metric(f'export SET FILE (CLI, stream bytes / time), median of {a.read_repeat}',
                    'MB/s')
    imp_new = Metric('import FILE into a new array (CLI, stream bytes / time; its pack\'s '
                     'memory written for the first time)', 'MB/s')
    fresh = Metric('reference: the stream file copied to a new file on the receiver\'s tmpfs '
                   '(dd bs=4M conv=fsync, fresh memory)', 'MB/s')
    imp = Metric(f'import FILE into the receiver (CLI); full: median of {a.read_repeat}, each '
                 'after deleting the set there and waiting until its space was reclaimed',
                 'MB/s')
    seqread = Metric(f'seq read 1M of the LUN (fio O_DIRECT, one pass, median of '
                     f'{a.read_repeat})', 'MB/s')
    exp_ratio = Metric('export / seq read', 'x', goal=f'>= {EXPORT_MIN_RATIO:g}x')
    imp_ratio = Metric('import / seq read', 'x', goal=f'>= {EXPORT_MIN_RATIO:g}x')
    new_ratio = Metric('import into a new array / seq read', 'x')
    new_dd = Metric('import into a new array / dd to the same tmpfs', 'x')
    incr = Metric('incremental stream / full stream', '%', goal=f'<= {INCR_MAX_PERCENT:g} %')
    table = MetricTable(cols, [stream, export, imp_new, fresh, imp, seqread, exp_ratio,
                               imp_ratio, new_ratio, new_dd, incr])
    if 'fusearray' not in a.only:
        table.notes.append('not run: fusearray is not among the targets (--only)')
        return transport_verdicts(table)
    mark = ctx.cl.mark()
    try:
        need = 3 * size + (512 << 20)
        check_memory('transport', 'the arrays and streams', need,
                     'use a smaller --transport-lun')
        limit = size + (1 << 30)
        bases = {}
        for n in ('a', 'b', 'streams'):
            bases[n] = ctx.work / f'transport-{n}-tmpfs'
            mount_tmpfs(ctx.cl, bases[n], limit, ctx.space, f'transport {n} tmpfs')
        table.notes.append(f'arrays A (source) and B (receiver) mounted at once, each on a '
                           f'tmpfs of its own, the stream files on a third (limits '
                           f'{fmt_bytes(limit)})')
        fa, array, mnt = start_array(ctx, 'transport-a', bases['a'])
        src = SnapArray(ctx, fa, array, mnt)
        fb, array_b, mnt_b = start_array(ctx, 'transport-b', bases['b'])
        dst = SnapArray(ctx, fb, array_b, mnt_b)
        src.ctl('create', f'lun0 {size}')
        lun = src.lun('lun0')
        log(f'transport: fill {fmt_size(size)} LUN with random data')
        fill = fio_pass(lun, 'transport-fill', 'write', size, buffers='--refill_buffers')
        fsync_path(lun)
        for i in range(a.read_repeat):
            log(f'transport: seq read 1M ({i + 1}/{a.read_repeat})')
            seqread.cols.setdefault('full', []).append(
                fio_pass(lun, 'transport-seqread', 'read', size))
        src.ctl('snapshot', 'lun0 set=s1')
        start = time.perf_counter()
        fa('--help')
        startup = time.perf_counter() - start
    except (StepFailed, OSError) as e:
        setup_failed(ctx, 'transport', table, mark, e, cols)
        return transport_verdicts(table)
    try:
        files = {'full': bases['streams'] / 's1.stream', 'incr': bases['streams'] / 's2.stream'}
        sets = {'full': ('s1', []), 'incr': ('s2', ['--base', 's1'])}
        for key in ('full', 'incr'):
            name, extra = sets[key]
            step = f'export {name}'
            try:
                if key == 'incr':
                    step = 'rewrite 1 %'
                    blocks = size // INCR_BLOCK
                    n = max(1, round(blocks * INCR_FRACTION))
                    log(f'transport: rewrite {n} random 64K blocks of {blocks} (fio, fixed seed)')
                    fio(lun, 'transport-change', ['--rw=randwrite', f'--bs={INCR_BLOCK}',
                                                  f'--io_size={n * INCR_BLOCK}',
                                                  '--randseed=4242', '--randrepeat=0'],
                        size, timeout=120, buffers='--refill_buffers')
                    fsync_path(lun)
                    step = 'snapshot s2'
                    src.ctl('snapshot', 'lun0 set=s2')
                    step = f'export {name}'
                cmd = ['-m', src.mnt, 'export', name, *extra, files[key]]
                rates = []
                for i in range(a.read_repeat):      # the stream file is rewritten each time
                    files[key].unlink(missing_ok=True)
                    log(f'transport: fusearray {" ".join(map(str, cmd))} '
                        f'({i + 1}/{a.read_repeat})')
                    start = time.perf_counter()
                    fa(*cmd, timeout=600)
                    seconds = time.perf_counter() - start
                    nbytes = files[key].stat().st_size
                    rates.append(nbytes / seconds / MB)
                stream.cols[key] = [nbytes / (1 << 20)]
                export.cols[key] = rates
                step = f'import {name}'
                cmd = ['-m', dst.mnt, 'import', files[key]]
                log(f'transport: fusearray {" ".join(map(str, cmd))}')
                start = time.perf_counter()
                fb(*cmd, timeout=600)
                seconds = time.perf_counter() - start
                (imp_new if key == 'full' else imp).cols[key] = [nbytes / seconds / MB]
                step = f'compare {name}'
                got = dst.mnt / 'snapshots' / name / 'lun0'
                if not same_content(src.mnt / 'snapshots' / name / 'lun0', got):
                    raise StepFailed(f'{got} differs from the exported shadow copy')
                if key == 'full':
                    step = 'dd of the stream to the receiver\'s tmpfs'
                    copy = bases['b'] / 'fresh-memory.copy'
                    start = time.perf_counter()
                    run(['dd', f'if={files[key]}', f'of={copy}', 'bs=4M', 'conv=fsync'],
                        timeout=300)
                    fresh.cols[key] = [nbytes / (time.perf_counter() - start) / MB]
                    copy.unlink()
                    imp.cols[key] = []
                for i in range(a.read_repeat if key == 'full' else 0):
                    # into an array that holds nothing of it (dedup would flatter
                    # it) but has had its space: the set deleted, GC done
                    step = f'delete {name} on the receiver'
                    dst.ctl('delete', name)
                    wait_until_used_below(dst.mnt, size // 100, timeout=120)
                    step = f'import {name} ({i + 1}/{a.read_repeat})'
                    log(f'transport: fusearray {" ".join(map(str, cmd))} '
                        f'({i + 1}/{a.read_repeat})')
                    start = time.perf_counter()
                    fb(*cmd, timeout=600)
                    imp.cols[key].append(nbytes / (time.perf_counter() - start) / MB)
                    stored = array_used(dst.mnt)
                    if stored < 0.95 * size:
                        raise StepFailed(f'the receiver holds {fmt_bytes(stored)} after the '
                                         f'import: not a full store of {fmt_size(size)}')
                if key == 'full':
                    step = f'compare {name}'
                    if not same_content(src.mnt / 'snapshots' / name / 'lun0', got):
                        raise StepFailed(f'{got} differs from the exported shadow copy')
                table.notes.append(f'{key}: {fmt_bytes(nbytes)} stream exported in '
                                   f'{nbytes / statistics.median(rates) / MB:.2f} s (median), '
                                   f'imported in {nbytes / imp.median(key) / MB:.2f} s '
                                   f'(median), snapshots/{name}/lun0 on B bit-exact')
            except (StepFailed, OSError) as e:
                why = f'transport: {step}: {e}'
                if not isinstance(e, StepFailed):
                    why += f'\n{src.log_tail()}'
                if 'import' in step:
                    why += f'\nreceiver {dst.log_tail()}'
                ctx.fail(why)
                for metric in (stream, export, imp, imp_new, fresh):
                    metric.fail((key,))
                if key == 'full':
                    for metric in (stream, export, imp):
                        metric.fail(('incr',))
                    break
    finally:
        ctx.cl.unwind(mark)
    table.notes.append('the CLI hands the daemon the stream file\'s descriptor through its '
                       'stream socket (fusearray/streamsock.py): the stream does not cross '
                       'FUSE; ctl/export and ctl/import remain for the shell')
    table.notes.append(f'the LUN filled with fio (O_DIRECT, 1M, random data) at {fill:.0f} '
                       f'MB/s; the CLI times include starting its Python (`fusearray '
                       f'--help` took {startup:.2f} s); the 1 % change: fio randwrite 64K O_DIRECT, random data, '
                       'a fixed seed, each block once')
    return transport_verdicts(table)


def transport_verdicts(table):
    (stream, export, imp_new, fresh, imp, seqread, exp_ratio, imp_ratio, new_ratio, new_dd,
     incr) = table.rows
    for num, den, out in ((export, seqread, exp_ratio), (imp, seqread, imp_ratio),
                          (imp_new, seqread, new_ratio), (imp_new, fresh, new_dd)):
        v, ref = num.median('full'), den.median('full')
        if v is not None and ref:
            out.cols['full'] = [v / ref]
        elif num.cols.get('full') == 'failed' or den.cols.get('full') == 'failed':
            out.cols['full'] = 'failed'
        if out.goal:
            r = out.median('full')
            out.verdict = 'n/a' if r is None else 'PASS' if r >= EXPORT_MIN_RATIO else 'MISS'
    full, part = stream.median('full'), stream.median('incr')
    if full and part is not None:
        incr.cols['incr'] = [100 * part / full]
    elif stream.cols.get('incr') == 'failed':
        incr.cols['incr'] = 'failed'
    r = incr.median('incr')
    incr.verdict = 'n/a' if r is None else 'PASS' if r <= INCR_MAX_PERCENT else 'MISS'
    return table
