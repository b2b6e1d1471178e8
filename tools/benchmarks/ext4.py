"""The ext4 group: ext4 on a loop device over each target's file.
"""
import os
import statistics
import time

from .common import (
    MB, Row, StepFailed, array_used, drop_caches, fio, fmt_bytes, fmt_size, log, mount_dev,
    mount_tmpfs, run, timed)


#: fio in a file on the ext4: random writes, each followed by an fsync
#: (buffered, psync; a database's commit pattern), time-based
FSYNC_WORKLOADS = [('4k', '4k'), ('64k', '64k')]


def random_source(ctx):
    """A file of random data (not zeros: fusearray elides them) on a tmpfs of
    its own, sized for it, so whatever the arrays grow to cannot starve it."""
    path = ctx.work / 'source-tmpfs'
    src = path / 'ext4-source'
    if not src.exists():
        mount_tmpfs(ctx.cl, path, ctx.args.ext4_size + (16 << 20), ctx.space,
                    'ext4 source tmpfs')
        try:
            with open(src, 'wb') as f:
                for _ in range(ctx.args.ext4_size // (1 << 20)):
                    f.write(os.urandom(1 << 20))
        except OSError as e:
            raise StepFailed(f'cannot write the random source {src}: {e} '
                             f'({ctx.space.now()})')
    return src


def empty_fusearray_lun(ctx, target):
    """Punch the whole LUN (what fstrim would do): the fio group's data and the
    garbage it left go back to the pack before ext4 writes more."""
    before = array_used(target.mnt)
    run(['fallocate', '--punch-hole', '--offset', '0', '--length', str(ctx.args.size),
         target.file])
    deadline = time.monotonic() + 30
    after = array_used(target.mnt)
    while after > (16 << 20) and time.monotonic() < deadline:
        time.sleep(0.2)   # garbage collection runs in the background
        after = array_used(target.mnt)
    log(f'fusearray: LUN punched before ext4: array used {fmt_bytes(before)} -> '
        f'{fmt_bytes(after)}; {ctx.space.now()}')


def ext4_pass(ctx, target, dev, src):
    """mkfs, write a file + fsync, remount cold, read it: (write MB/s, read MB/s)."""
    n_mib = ctx.args.ext4_size // (1 << 20)
    mnt = ctx.work / f'ext4-{target.name}'
    # nodiscard: keep the backing file's memory mapped, as after the fio group
    run(['mkfs.ext4', '-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0',
         dev], timeout=300)
    handle = mount_dev(ctx.cl, dev, mnt)
    seconds = timed(['dd', f'if={src}', f'of={mnt}/data', 'bs=1M', f'count={n_mib}',
                     'conv=fsync', 'status=none'], timeout=900)
    write = n_mib * (1 << 20) / seconds / MB
    ctx.cl.now(handle)
    drop_caches()
    handle = mount_dev(ctx.cl, dev, mnt)
    seconds = timed(['dd', f'if={mnt}/data', 'of=/dev/null', 'bs=1M', 'status=none'],
                    timeout=900)
    read = n_mib * (1 << 20) / seconds / MB
    ctx.cl.now(handle)
    return write, read


def ext4_fsync(ctx, target, dev):
    """fio fsync=1 random writes in a file of --ext4-size on the ext4 the
    passes left (their file removed first): [[IOPS...] per FSYNC_WORKLOADS]."""
    mnt = ctx.work / f'ext4-{target.name}'
    handle = mount_dev(ctx.cl, dev, mnt)
    (mnt / 'data').unlink(missing_ok=True)
    out = []
    for label, bs in FSYNC_WORKLOADS:
        log(f'{target.name}: ext4 fio randwrite {label} fsync=1')
        runs = []
        for _ in range(ctx.args.repeat):
            job = fio(mnt / 'fio-fsync', f'ext4-fsync-{label}',
                      ['--rw=randwrite', f'--bs={bs}', '--fsync=1', '--time_based',
                       f'--runtime={ctx.args.runtime}'],
                      ctx.args.ext4_size, timeout=ctx.args.runtime + 300, direct=False)
            runs.append(job['write']['iops'])
        out.append(runs)
    ctx.cl.now(handle)
    return out


def ext4_one(ctx, target, src):
    """A warm-up and --ext4-runs passes on one loop device, then the fsync=1
    workloads: ([write MB/s...], [read MB/s...], [IOPS...] per fsync workload)."""
    dev, loop_handle = target.attach()
    log(f'{target.name}: ext4 on {dev}, 1 warm-up + {ctx.args.ext4_runs} pass(es)')
    # the first pass on fresh page cache is slow and erratic in a VM (host page faults)
    ext4_pass(ctx, target, dev, src)
    passes = [ext4_pass(ctx, target, dev, src) for _ in range(ctx.args.ext4_runs)]
    fsyncs = ext4_fsync(ctx, target, dev)
    target.detach(dev, loop_handle)
    return [p[0] for p in passes], [p[1] for p in passes], *fsyncs


def group_ext4(ctx):
    n = fmt_size(ctx.args.ext4_size)
    rows = [Row(f'ext4 write {n} + fsync', 'MB/s', goals=[('file', 0.5)]),
            Row(f'ext4 cold read {n}', 'MB/s', goals=[('file', 0.5)])]
    rows += [Row(f'ext4 fio randwrite {label} fsync=1', 'IOPS', goals=[('qemu-qcow2', 1.0)])
             for label, _ in FSYNC_WORKLOADS]
    mark = ctx.cl.mark()
    try:
        src = random_source(ctx)
    except StepFailed as e:
        ctx.fail(f'ext4: {e}')
        ctx.cl.unwind(mark)
        for row in rows:
            row.values = {t.name: 'failed' for t in ctx.targets}
        return rows
    for target in ctx.targets:
        try:
            if target.name == 'fusearray':
                empty_fusearray_lun(ctx, target)
            samples = ext4_one(ctx, target, src)
        except (StepFailed, OSError) as e:
            ctx.fail_target(target, f'ext4: {e}')
            samples = (None,) * len(rows)
        for row, runs in zip(rows, samples):
            row.values[target.name] = statistics.median(runs) if runs else 'failed'
            row.samples[target.name] = runs
    ctx.cl.unwind(mark)   # the random source's tmpfs
    return rows


# ---------------------------------------------------------------- snap group
