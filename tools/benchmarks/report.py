"""The report: one Markdown table per group, ratios and verdicts, JSON.
"""
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

from .common import TARGETS, fmt_bytes, fmt_size, run
from .arrays import MetricTable


def fmt_value(value, unit):
    if value is None:
        return '-'
    if isinstance(value, str):
        return value
    if unit == 'IOPS':
        return f'{value / 1000:.1f}k' if value >= 1000 else f'{value:.0f}'
    if unit == 'x':
        return f'{value:.2f}x'
    if unit == 'ms':
        return f'{value:.1f}'
    return f'{value:.0f}'


def ratio(row, ref):
    a, b = row.values.get('fusearray'), row.values.get(ref)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return a / b
    return None


def verdict(row):
    """PASS/FAIL of each goal of the row (n/a when a value is missing)."""
    out = []
    for ref, minimum in row.goals:
        r = ratio(row, ref)
        mark = 'n/a' if r is None else ('PASS' if r >= minimum else 'FAIL')
        out.append(f'>= {minimum}x {ref}: {mark}')
    own = row.values.get('fusearray')
    for op, limit in getattr(row, 'bounds', ()):
        if not isinstance(own, (int, float)):
            mark = 'n/a'
        else:
            mark = 'PASS' if (own >= limit if op == '>=' else own <= limit) else 'FAIL'
        out.append(f'fusearray {op} {limit:g}{"" if row.unit == "x" else " " + row.unit}: {mark}')
    return '; '.join(out)


#: the ratio columns, fusearray over each of these (when the table has it)
RATIO_REFS = ('memfile', 'file', 'qemu-qcow2')


def table(rows):
    present = [t for t in TARGETS if any(t in row.values for row in rows)]
    refs = [r for r in RATIO_REFS if r in present and r != 'fusearray']
    head = ['workload', 'unit', *present, *(f'fusearray/{r.removeprefix("qemu-")}' for r in refs),
            'goal']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for row in rows:
        cells = [row.workload, row.unit]
        cells += [fmt_value(row.values.get(t), row.unit) for t in present]
        for ref in refs:
            r = ratio(row, ref)
            cells.append('-' if r is None else f'{r:.2f}x')
        cells.append(verdict(row))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def machine():
    mem = 0
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemTotal:'):
                mem = int(line.split()[1]) * 1024
    fio_version = run(['fio', '--version'], check=False).stdout.strip()
    return {
        'nproc': len(os.sched_getaffinity(0)),
        'memory': f'{mem / (1 << 30):.1f} GiB',
        'kernel': platform.release(),
        'python': platform.python_version(),
        'fio': fio_version,
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    }


def fmt_metric(metric, key):
    v = metric.cols.get(key)
    if v is None:
        return '-'
    if isinstance(v, str):
        return v
    fmt = {'ms': '{:.1f}', 'MB/s': '{:.0f}', 'x': '{:.2f}x'}.get(metric.unit, '{:.2f}')
    med = fmt.format(statistics.median(v))
    if len(v) > 1:
        med += f' ({fmt.format(min(v))}–{fmt.format(max(v))})'
    return med


def metric_table(mt):
    """Columns are sizes; the median, with (min–max) when repeated."""
    keys = list(mt.columns)
    head = ['measurement', 'unit', *mt.columns.values(), 'ratio of the medians', 'goal']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for metric in mt.rows:
        cells = [metric.label, metric.unit] + [fmt_metric(metric, k) for k in keys]
        a, b = metric.median(keys[0]), metric.median(keys[-1])
        cells.append(f'{b / a:.2f}x' if a and b is not None and len(keys) == 2 else '-')
        cells.append(f'{metric.goal}: {metric.verdict}' if metric.goal else '')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines + [''] + [f'- {n}' for n in mt.notes])


def as_json(rows):
    if isinstance(rows, MetricTable):
        return {'columns': rows.columns, 'rows': [m.__dict__ for m in rows.rows],
                'notes': rows.notes}
    return {'rows': [row.__dict__ for row in rows]}


def report(ctx, results):
    m = machine()
    print('# fusearray bench\n')
    print(f'Machine: nproc {m["nproc"]}, memory {m["memory"]}, kernel {m["kernel"]}, '
          f'Python {m["python"]}, {m["fio"]}; {m["date"]}.')
    a = ctx.args
    print(f'Settings: size {fmt_size(a.size)}, runtime {a.runtime} s per fio workload '
          f'(median of {a.repeat}), '
          f'ext4 file {fmt_size(a.ext4_size)}, median of {a.ext4_runs} pass(es) after a warm-up; '
          f'snap: {a.snap_repeat} repeats, {a.copy_repeat} cross-pack '
          f'cop{"y" if a.copy_repeat == 1 else "ies"}; '
          f'packs: {fmt_size(a.pack_lun)} LUNs; transport: {fmt_size(a.transport_lun)} LUN; '
          f'packs/transport seq reads: median of {a.read_repeat}; '
          f'rados: {fmt_size(a.rados_lun)} LUNs, {a.rados_passes} pass(es); '
          f'MB/s are 10^6 bytes/s; run took {ctx.elapsed / 60:.1f} min.')
    print(f'Backings: {", ".join(f"{b} ({d})" for b, d in ctx.backing_dirs.items())}: '
          'the fio and ext4 groups run once per backing, every target\'s data on it '
          '(the file, the qemu images, fusearray\'s array; memfile is in memory, on the '
          'tmpfs run only).')
    for name, notes in ctx.target_notes.items():
        print(f'{name}: {", ".join(notes)}.')
    for title, rows in results:
        print(f'\n## {title}\n')
        print(metric_table(rows) if isinstance(rows, MetricTable) else table(rows))
    if ctx.space.peaks:
        print('\n## Space (peak use of each filesystem the bench made)\n')
        for label, (used, size, group) in ctx.space.peaks.items():
            print(f'- {label}: {fmt_bytes(used)} of {fmt_bytes(size)} (in the {group} group)')
    if ctx.errors:
        print('\n## Failed steps\n')
        for e in ctx.errors:
            first, *rest = e.splitlines()
            print(f'- {first}')
            for line in rest[:40]:
                print(f'      {line}')
    if a.json:
        data = {'machine': m, 'settings': {'size': a.size, 'runtime': a.runtime,
                                           'ext4_size': a.ext4_size,
                                           'ext4_runs': a.ext4_runs, 'repeat': a.repeat,
                                           'only': a.only, 'groups': a.groups,
                                           'snap_small': a.snap_small,
                                           'snap_big': a.snap_big,
                                           'snap_written': a.snap_written,
                                           'snap_repeat': a.snap_repeat,
                                           'copy_repeat': a.copy_repeat,
                                           'pack_lun': a.pack_lun,
                                           'transport_lun': a.transport_lun,
                                           'read_repeat': a.read_repeat,
                                           'pack_writes': a.pack_writes,
                                           'steady_passes': a.steady_passes,
                                           'rados_lun': a.rados_lun,
                                           'rados_passes': a.rados_passes,
                                           'array_dir': a.array_dir,
                                           'backing': a.backing, 'disk_dir': a.disk_dir,
                                           'cache_size': a.cache_size},
                'groups': [{'title': title, 'backing': ctx.group_backing.get(title),
                            **as_json(rows)} for title, rows in results],
                'space': {label: {'peak_used': u, 'size': sz, 'group': g}
                          for label, (u, sz, g) in ctx.space.peaks.items()},
                'errors': ctx.errors, 'seconds': ctx.elapsed}
        Path(a.json).write_text(json.dumps(data, indent=2) + '\n')
