"""The steady group: a LUN overwritten end to end, again and again (#15 point 4).

On each backing this group runs first, on the fresh targets (a new
fusearray LUN, a new qcow2 image, a sparse file): fio seq write 1M,
O_DIRECT, psync,

- the first pass: the whole file once (`--size`), end_fsync;
- the overwrites: --steady-passes more passes in one fio run (`--io_size`
  = passes x size, fio wraps around the file), end_fsync;

and the longest write stall of the overwrites: fio's largest completion
latency of one 1M write (clat max; a writer waiting for room in the
write-back cache, or for a collection holding the commit lock, shows here;
so does the scheduler of a loaded machine: the 99.9th percentile is shown
beside it).
Goals: overwrites >= 0.9x qemu-qcow2, overwrites >= the first pass (steady
/ first >= 1.0), longest stall <= 100 ms.
"""
from .common import MB, Row, StepFailed, fio, fmt_size, log
from .fio import QCOW2

SEQ = ['--rw=write', '--bs=1M', '--end_fsync=1']
STALL_MS = 100


def steady_runs(target, args):
    """(first pass MB/s, overwrites MB/s, first pass clat max ms, overwrites
    clat max ms, overwrites clat 99.9th percentile ms) of one target."""
    size = args.size
    timeout = max(600, args.size * (args.steady_passes + 1) // (2 << 20))
    first = fio(target.file, 'steady-first', SEQ, size, timeout=timeout)['write']
    over = fio(target.file, 'steady-over', SEQ + [f'--io_size={size * args.steady_passes}'],
               size, timeout=timeout)['write']
    return (first['bw_bytes'] / MB, over['bw_bytes'] / MB,
            first['clat_ns']['max'] / 1e6, over['clat_ns']['max'] / 1e6,
            over['clat_ns']['percentile']['99.900000'] / 1e6)


def group_steady(ctx):
    n = ctx.args.steady_passes
    rows = [Row('first pass (fresh file) seq write 1M', 'MB/s'),
            Row(f'overwrites ({n} passes) seq write 1M', 'MB/s', goals=[(QCOW2, 0.9)]),
            Row('overwrites / first pass', 'x', bounds=[('>=', 1.0)]),
            Row('longest write stall, first pass (clat max)', 'ms'),
            Row('longest write stall, overwrites (clat max)', 'ms',
                bounds=[('<=', STALL_MS)]),
            Row('write latency, overwrites (clat 99.9th percentile)', 'ms')]
    for target in ctx.targets:
        log(f'{target.name}: steady overwrites, {fmt_size(ctx.args.size)} '
            f'x (1 + {n})')
        try:
            first, over, first_ms, over_ms, over_p999 = steady_runs(target, ctx.args)
        except (StepFailed, KeyError, ValueError) as e:
            ctx.fail_target(target, f'steady overwrites: {e}')
            for row in rows:
                row.values[target.name] = 'failed'
            continue
        for row, v in zip(rows, (first, over, over / first if first else None,
                                 first_ms, over_ms, over_p999)):
            row.values[target.name] = v
    return rows
