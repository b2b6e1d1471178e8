"""The fio group: O_DIRECT fio workloads on each target's file.
"""
import statistics

from .common import MB, Row, StepFailed, fio, fmt_size, log


QCOW2 = 'qemu-qcow2'
AIO32 = ['--ioengine=libaio', '--iodepth=32']
FIO_WORKLOADS = [
    # (label, fio options, direction, unit, goals [(reference target, minimum)])
    # all time-based (--runtime), psync at iodepth 1 unless libaio QD32 is named;
    # writes end with an fsync inside the timed run (--end_fsync): what is
    # still in fusearray's write-back cache at the end is paid for. Seq write
    # overwrites the preconditioned file.
    ('seq write 1M', ['--rw=write', '--bs=1M', '--end_fsync=1'], 'write', 'MB/s',
     [('memfile', 0.7), (QCOW2, 0.9)]),
    ('seq read 1M', ['--rw=read', '--bs=1M'], 'read', 'MB/s', [('memfile', 0.7)]),
    ('rand write 4k', ['--rw=randwrite', '--bs=4k', '--end_fsync=1'], 'write', 'IOPS',
     [('memfile', 0.6), (QCOW2, 1.0)]),
    ('rand write 4k QD32 libaio', ['--rw=randwrite', '--bs=4k', *AIO32, '--end_fsync=1'],
     'write', 'IOPS', [(QCOW2, 1.0)]),
    ('rand write 4k + fdatasync', ['--rw=randwrite', '--bs=4k', '--fdatasync=1'],
     'write', 'IOPS', [(QCOW2, 1.0)]),
    ('rand write 64k + fdatasync', ['--rw=randwrite', '--bs=64k', '--fdatasync=1'],
     'write', 'IOPS', [(QCOW2, 1.0)]),
    ('rand read 4k', ['--rw=randread', '--bs=4k'], 'read', 'IOPS', [('memfile', 0.6)]),
    ('rand read 4k QD32 libaio', ['--rw=randread', '--bs=4k', *AIO32], 'read', 'IOPS',
     [(QCOW2, 1.0)]),
    ('rand read 4k x4 jobs', ['--rw=randread', '--bs=4k', '--numjobs=4',
                              '--group_reporting'], 'read', 'IOPS', [('memfile', 0.6)]),
]


def precondition(target, args):
    log(f'{target.name}: precondition (write {fmt_size(args.size)} sequentially)')
    fio(target.file, 'precondition', ['--rw=write', '--bs=1M'], args.size,
        timeout=max(600, args.size // (2 << 20)))  # at least 2 MiB/s


def fio_value(ctx, target, label, opts, direction, unit):
    job = fio(target.file, label.replace(' ', '-'), opts, ctx.args.size,
              timeout=ctx.args.runtime + 180)
    res = job[direction]
    return res['bw_bytes'] / MB if unit == 'MB/s' else res['iops']


def group_fio(ctx):
    rows = [Row(label, unit, goals=goals) for label, _, _, unit, goals in FIO_WORKLOADS]
    timed_opts = ['--time_based', f'--runtime={ctx.args.runtime}']
    for target in ctx.targets:
        try:
            precondition(target, ctx.args)
        except StepFailed as e:
            ctx.fail_target(target, f'precondition: {e}')
            for row in rows:
                row.values[target.name] = 'failed'
            continue
        for row, (label, opts, direction, unit, _) in zip(rows, FIO_WORKLOADS):
            log(f'{target.name}: fio {label}')
            try:
                runs = [fio_value(ctx, target, label, opts + timed_opts, direction, unit)
                        for _ in range(ctx.args.repeat)]
                row.values[target.name] = statistics.median(runs)
                row.samples[target.name] = runs
            except (StepFailed, KeyError, ValueError) as e:
                ctx.fail_target(target, f'fio {label}: {e}')
                row.values[target.name] = 'failed'
    return rows
