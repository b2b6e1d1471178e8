"""The packs group: mirror and raid5 against a single disk, rebuild against cp -a
(issue 4).
"""
import os
import shutil
import time

from .common import (
    MB, StepFailed, array_used, fio, fmt_bytes, fmt_size, log, mount_tmpfs, run, start_array)
from .arrays import check_memory, setup_failed, Metric, MetricTable, SnapArray, fsync_path


#: issue 4 targets: a mirror/raid5 LUN against a single-disk LUN, and a rebuild
#: against `cp -a` of the same bytes
PACK_READ_MIN = 0.7
PACK_WRITE_MIN = 0.5
REBUILD_MIN = 0.5
#: the packs: name -> (layout, disk names); every disk on a tmpfs of its own
PACKS = {'single': ('single', ['D']), 'mirror': ('mirror', ['M1', 'M2']),
         'raid5': ('raid5', ['R1', 'R2', 'R3'])}
PACK_NAMES = {'single': 'one', 'mirror': 'mir', 'raid5': 'r5'}
DISK_MISSING_TIMEOUT = 30


def fio_pass(path, name, rw, size, buffers='--scramble_buffers=1'):
    """One O_DIRECT psync 1M pass over `size` bytes of `path`: MB/s. A
    write pass ends with an fsync, timed with it: the bytes are durable."""
    sync = ['--end_fsync=1'] if rw != 'read' else []
    job = fio(path, name, [f'--rw={rw}', '--bs=1M', *sync], size,
              timeout=max(300, size // (2 << 20)), buffers=buffers)
    return job['read' if rw == 'read' else 'write']['bw_bytes'] / MB


def tree_bytes(path):
    """Bytes in the regular files under `path` (what a copy of it moves)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if not os.path.islink(os.path.join(root, f)):
                total += st.st_size
    return total


def pack_disk_states(sa, pack):
    for p in sa.status()['packs']:
        if p['name'] == pack:
            return p['state'], {d['path']: d['state'] for d in p['disks']}
    raise StepFailed(f'pack {pack} is not in ctl/status.json')


def wait_disk_state(sa, pack, path, states, timeout=DISK_MISSING_TIMEOUT):
    """Poll ctl/status.json until disk `path` of `pack` is in one of `states`:
    seconds waited."""
    start = time.monotonic()
    while True:
        pstate, disks = pack_disk_states(sa, pack)
        if disks.get(str(path)) in states:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise StepFailed(f'disk {path} of pack {pack} still {disks.get(str(path))} '
                             f'(pack {pstate}) after {timeout}s, waiting for '
                             f'{"/".join(states)}\n{sa.log_tail()}')
        time.sleep(0.1)


def pack_rebuild(ctx, sa, key, disks, scratch):
    """Remove the last disk of the pack, wait for it to be missing, recreate
    its directory empty, recover the pack: (rebuild MB/s, cp -a MB/s, note).
    The reference is `cp -a` of a surviving disk's directory to `scratch`."""
    pack = PACK_NAMES[key]
    gone, survivor = disks[-1], disks[0]
    log(f'packs: {key}: rm -rf {gone}')
    shutil.rmtree(gone)
    waited = wait_disk_state(sa, pack, gone, ('missing', 'failed'))
    pstate, _ = pack_disk_states(sa, pack)
    gone.mkdir()
    log(f'packs: {key}: disk missing after {waited:.1f} s (pack {pstate}); recover {pack}')
    start = time.perf_counter()
    _, reply = sa.ctl('recover', pack)
    done, fields = sa.wait_job(reply['job'], timeout=300)
    seconds = done - start
    total = int(fields.get('total_bytes', 0))
    after, states = pack_disk_states(sa, pack)
    if after != 'healthy':
        raise StepFailed(f'pack {pack} is {after} after recover job {reply["job"]} '
                         f'({states})\n{sa.log_tail()}')
    rebuild = total / seconds / MB
    copy_to = scratch / key
    log(f'packs: {key}: rebuilt {fmt_bytes(total)} in {seconds:.2f} s; cp -a {survivor}')
    start = time.perf_counter()
    run(['cp', '-a', survivor, copy_to], timeout=300)
    cp_seconds = time.perf_counter() - start
    copied = tree_bytes(copy_to)
    shutil.rmtree(copy_to)
    note = (f'{key}: disk {gone.parent.name} missing {waited:.1f} s after rm -rf; rebuild '
            f'job {reply["job"]}: {fmt_bytes(total)} in {seconds:.2f} s, pack {after} '
            f'after; cp -a of disk {survivor.parent.name}: {fmt_bytes(copied)} in '
            f'{cp_seconds:.2f} s')
    return rebuild, copied / cp_seconds / MB, note


def group_packs(ctx):
    a = ctx.args
    size = a.pack_lun
    cols = {k: f'{k} ({len(d)} disk{"s" if len(d) > 1 else ""})'
            for k, (_, d) in PACKS.items()}
    write = Metric(f'seq write 1M, {fmt_size(size)} passes (the first into the new LUN, '
                   f'then overwrites), median of {a.pack_writes}', 'MB/s')
    read = Metric(f'seq read 1M, one {fmt_size(size)} pass, median of {a.read_repeat}', 'MB/s')
    wratio = Metric('seq write / single, pass by pass', 'x', goal=f'>= {PACK_WRITE_MIN:g}x')
    rratio = Metric('seq read / single, pass by pass', 'x', goal=f'>= {PACK_READ_MIN:g}x')
    rebuild = Metric(f'rebuild of one disk (job total_bytes / time to done), median of '
                     f'{a.read_repeat}', 'MB/s')
    copy = Metric(f'cp -a of a surviving disk\'s directory right after each rebuild, median '
                  f'of {a.read_repeat}', 'MB/s')
    rb_ratio = Metric('rebuild / cp -a, each rebuild against the cp -a after it', 'x',
                      goal=f'>= {REBUILD_MIN:g}x')
    table = MetricTable(cols, [write, read, wratio, rratio, rebuild, copy, rb_ratio])
    if 'fusearray' not in a.only:
        table.notes.append('not run: fusearray is not among the targets (--only)')
        return packs_verdicts(table)
    redundant = ('mirror', 'raid5')
    mark = ctx.cl.mark()
    try:
        # on tmpfs: each disk holds a LUN's worth, and the garbage of the overwrites
        # until the collector catches up; a limit, not a reservation
        disk_limit = size * a.read_repeat + (1 << 30)
        # 1 + 2 + 1.5 LUNs of data (and the overwrites' garbage), a cp -a copy
        need = int(size * 4.5 * a.read_repeat) + size
        check_memory('packs', 'the disks', need, 'use a smaller --pack-lun')
        base = ctx.work / 'packs-tmpfs'
        mount_tmpfs(ctx.cl, base, 512 << 20, ctx.space, 'packs array tmpfs')
        disks = {}
        for key, (layout, names) in PACKS.items():
            disks[key] = []
            for n in names:
                mp = ctx.work / f'packs-disk-{n}'
                mount_tmpfs(ctx.cl, mp, disk_limit, ctx.space, f'packs disk {n} tmpfs')
                disks[key].append(mp / 'disk')
        scratch = ctx.work / 'packs-scratch'
        mount_tmpfs(ctx.cl, scratch, disk_limit, ctx.space, 'packs cp -a scratch tmpfs')
        table.notes.append(
            f'every disk directory on a tmpfs of its own (limit {fmt_bytes(disk_limit)}), '
            f'the array (catalogue) on another, the cp -a copy on another; packs '
            + ', '.join(f'{PACK_NAMES[k]}={l}:{",".join(n)}' for k, (l, n) in PACKS.items()))
        specs = []
        for key, (layout, _) in PACKS.items():
            specs += ['--pack', f'{PACK_NAMES[key]}={layout}:'
                      + ','.join(str(d) for d in disks[key])]
        fa, array, mnt = start_array(ctx, 'packs', base, specs)
        sa = SnapArray(ctx, fa, array, mnt)
        for key in PACKS:
            sa.ctl('create', f'lun-{key} {size} pack={PACK_NAMES[key]}')
    except StepFailed as e:
        setup_failed(ctx, 'packs', table, mark, e, cols)
        return packs_verdicts(table)
    try:
        try:
            clean = None
            for i in range(a.pack_writes):
                for key in PACKS:
                    log(f'packs: {key}: seq write 1M, {fmt_size(size)} ({i + 1}/{a.pack_writes})')
                    write.cols.setdefault(key, []).append(
                        fio_pass(sa.lun(f'lun-{key}'), f'write-{key}', 'write', size))
                    fsync_path(sa.lun(f'lun-{key}'))
                if clean is None:
                    clean = array_used(sa.mnt)    # every LUN written once: no garbage
            for i in range(a.read_repeat):
                for key in PACKS:
                    log(f'packs: {key}: seq read 1M, {fmt_size(size)} ({i + 1}/{a.read_repeat})')
                    read.cols.setdefault(key, []).append(
                        fio_pass(sa.lun(f'lun-{key}'), f'read-{key}', 'read', size))
        except (StepFailed, OSError) as e:
            clean = None
            ctx.fail(f'packs: seq I/O: {e}' + ('' if isinstance(e, StepFailed)
                                                else f'\n{sa.log_tail()}'))
            write.fail(tuple(cols))
            read.fail(tuple(cols))
        if clean is not None:
            # the rebuild and cp -a should move the data, not the overwrites' garbage
            start = time.monotonic()
            used = sa.wait_used_below(clean + clean // 50 + (16 << 20), timeout=30)
            table.notes.append(f'before the rebuilds: the packs use {fmt_bytes(used)} '
                               f'(after the first write pass {fmt_bytes(clean)}), waited '
                               f'{time.monotonic() - start:.1f} s for garbage collection')
        for key in redundant:
            try:
                for i in range(a.read_repeat):
                    rb, cp, note = pack_rebuild(ctx, sa, key, disks[key], scratch)
                    rebuild.cols.setdefault(key, []).append(rb)
                    copy.cols.setdefault(key, []).append(cp)
                    table.notes.append(f'{note} ({i + 1}/{a.read_repeat})')
            except (StepFailed, OSError) as e:
                ctx.fail(f'packs: rebuild {key}: {e}' + ('' if isinstance(e, StepFailed)
                                                         else f'\n{sa.log_tail()}'))
                for metric in (rebuild, copy, rb_ratio):
                    metric.fail((key,))
    finally:
        ctx.cl.unwind(mark)
    table.notes.append('fio O_DIRECT, psync, iodepth 1, 1M, one pass over the LUN per '
                       'sample, the packs taken in turn; the / single ratios: the median '
                       'of pass i of the layout over pass i of the single disk (in brackets '
                       'their range); rebuild: rm -rf of the last disk\'s '
                       'directory, wait for ctl/status.json to show it missing, mkdir, '
                       'echo PACK > ctl/recover, time to ctl/jobs/ID state=done')
    return packs_verdicts(table)


def packs_verdicts(table):
    write, read, wratio, rratio, rebuild, copy, rb_ratio = table.rows
    for num, den, out in ((write, None, wratio), (read, None, rratio), (rebuild, copy, rb_ratio)):
        for key in ('mirror', 'raid5'):
            mine, ref = num.cols.get(key), (den or num).cols.get(key if den else 'single')
            if isinstance(mine, list) and isinstance(ref, list) and mine \
                    and len(mine) == len(ref):
                # pass i of a layout against pass i of the single disk (or
                # rebuild i against the cp -a right after it): the first write
                # into a new LUN, the first overwrite (old data still live:
                # all new segment files) and later ones differ by up to 4x on
                # this VM, as does writing into memory not touched for a
                # while, so medians of each column could set one kind of
                # pass against another
                out.cols[key] = [x / y for x, y in zip(mine, ref)]
                continue
            a = num.median(key)
            b = (den or num).median(key if den else 'single')
            if a is not None and b:
                out.cols[key] = [a / b]
            elif num.cols.get(key) == 'failed' or (den or num).cols.get(
                    key if den else 'single') == 'failed':
                out.cols[key] = 'failed'
    for metric, low in ((wratio, PACK_WRITE_MIN), (rratio, PACK_READ_MIN),
                        (rb_ratio, REBUILD_MIN)):
        marks = []
        for key in ('mirror', 'raid5'):
            r = metric.median(key)
            marks.append(f'{key} ' + ('n/a' if r is None else 'PASS' if r >= low else 'MISS'))
        metric.verdict = ', '.join(marks)
    return table
