"""The chart (--chart): every fusearray ratio of a run, against its target
and against the peers, as one SVG drawn with matplotlib.

One panel per table of the report (a group on a backing). In the target
groups (steady, fio, ext4) each workload is a cluster of bars, one per
peer: fusearray/memfile, /file, /qemu-raw, /qemu-qcow2; a black tick on a
bar is the goal against that peer (#15's targets), and the bar's label
says PASS or FAIL. A bound on fusearray's own value is a bar of its own:
a ratio row (overwrites / first pass >= 1.0) as it is, a limit in ms
(longest stall <= 100 ms) as value/limit, lower is better. In the groups
with an array of their own (snap, packs, transport) the ratio measurements
(unit x) are drawn, one bar per column, with their goal. The x axis is
logarithmic (fusearray/file spans 0.01x to 4x); 1.0x is a line.

Deterministic output for the same numbers (no date in the metadata, fixed
ids), text kept as text, so the committed docs/bench.svg diffs as text.
"""
import math
import re
import statistics
import textwrap


#: the peers, in the order of the bars of a cluster, and their colours
PEERS = ('memfile', 'file', 'qemu-raw', 'qemu-qcow2')
COLOURS = {'memfile': '#4c72b0', 'file': '#8c8c8c', 'qemu-raw': '#dd8452',
           'qemu-qcow2': '#c44e52', 'own': '#55a868'}
#: units of the rows compared with the peers (higher is better)
THROUGHPUT = ('MB/s', 'IOPS')
TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
GOAL = re.compile(r'([<>]=)\s*([0-9.]+)\s*x')


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def bars_of_rows(rows):
    """Bars of a target group's rows: [(label, key, ratio, goal, op)]
    where key is a peer (or 'own' for a bound on fusearray's own value),
    goal None when there is none, op '>=' or '<='."""
    out = []
    for row in rows:
        own = row.values.get('fusearray')
        if not _number(own):
            continue
        goals = dict(row.goals)
        # against the peers: throughput rows only (a ratio of ratios, or of
        # latencies, where lower is better, would read the wrong way)
        for peer in PEERS if row.unit in THROUGHPUT else ():
            ref = row.values.get(peer)
            if _number(ref) and ref > 0 and own > 0:
                out.append((row.workload, peer, own / ref, goals.get(peer), '>='))
        for op, limit in getattr(row, 'bounds', ()):
            if row.unit == 'x':
                out.append((row.workload, 'own', own, limit, op))
            elif limit and own > 0:
                out.append((f'{row.workload} / {limit:g} {row.unit} limit', 'own',
                            own / limit, 1.0, op))
    return out


def bars_of_metrics(mt):
    """Bars of a MetricTable: its ratio measurements (unit x), one per column."""
    out = []
    for metric in mt.rows:
        if metric.unit != 'x':
            continue
        m = GOAL.search(metric.goal or '')
        goal, op = (float(m.group(2)), m.group(1)) if m else (None, '>=')
        for key, heading in mt.columns.items():
            v = metric.cols.get(key)
            if isinstance(v, list) and v and all(_number(x) for x in v):
                med = statistics.median(v)
                if med > 0:
                    label = metric.label if len(mt.columns) == 1 else \
                        f'{metric.label} ({heading})'
                    out.append((label, 'own', med, goal, op))
    return out


def panels(results, backing_of=None):
    """[(panel title, bars)] of a run's results [(title, rows)]; tables
    with no ratio are left out."""
    from .arrays import MetricTable
    out = []
    for title, rows in results:
        bars = bars_of_metrics(rows) if isinstance(rows, MetricTable) else bars_of_rows(rows)
        if bars:
            out.append((title, bars))
    return out


def _wrap(text, width):
    return '\n'.join(textwrap.wrap(text, width)) or text


#: a workload's name is wrapped at this many characters
LABEL_WIDTH = 48


def _positions(bars):
    """The y of each bar: one unit a bar, half a unit between workloads, a
    unit more where a workload's name takes two lines or more."""
    ys, y, last = [], 0.0, None
    for label, *_ in bars:
        if last is not None and label != last:
            lines = max(len(textwrap.wrap(label, LABEL_WIDTH)),
                        len(textwrap.wrap(last, LABEL_WIDTH)))
            y += 0.5 if lines < 2 else 1.2
        ys.append(y)
        y += 1.0
        last = label
    return ys


def write_chart(path, results, subtitle=''):
    """Draw the panels of `results` into `path` (SVG, or PNG by suffix).
    Returns the number of bars drawn."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    matplotlib.rcParams.update({'svg.fonttype': 'none', 'svg.hashsalt': 'fusearray-bench',
                                'font.size': 8, 'font.family': 'DejaVu Sans'})
    ps = panels(results)
    if not ps:
        ps = [('no fusearray ratio in this run', [])]
    layouts = [_positions(bars) for _, bars in ps]
    heights = [(max(ys) + 1 if ys else 1) * 0.2 + 0.6 + 0.15 * (len(t) > 110)
               for (t, _), ys in zip(ps, layouts)]
    fig, axes = plt.subplots(len(ps), 1, figsize=(12, sum(heights) + 1.2),
                             gridspec_kw={'height_ratios': heights}, squeeze=False,
                             layout='constrained')
    every = [r for _, bars in ps for _, _, r, _, _ in bars] + \
        [g for _, bars in ps for *_, g, _ in bars if g]
    lo = min(every + [0.5]) / 1.6
    hi = max(every + [2.0]) * 2.2
    drawn = 0
    for ax, (title, bars), ys in zip(axes[:, 0], ps, layouts):
        for (label, key, ratio, goal, op), yy in zip(bars, ys):
            ax.barh(yy, ratio - lo, height=0.8, color=COLOURS[key], left=lo)
            text, colour = (f'{ratio:.2f}x' if ratio >= 0.1 else f'{ratio:.3f}x'), 'black'
            if goal is not None:
                ok = ratio >= goal if op == '>=' else ratio <= goal
                text += f'  {op} {goal:g}: {"PASS" if ok else "FAIL"}'
                colour = '#1a7f37' if ok else '#b31d28'
                ax.plot([goal, goal], [yy - 0.45, yy + 0.45], color='black', lw=2.2)
            ax.text(max(ratio, goal or 0) * 1.12, yy, text, va='center', fontsize=7,
                    color=colour)
            drawn += 1
        # one tick label per workload, at the middle of its cluster
        ticks, names = [], []
        for label in dict.fromkeys(b[0] for b in bars):
            pos = [yy for b, yy in zip(bars, ys) if b[0] == label]
            ticks.append(sum(pos) / len(pos))
            names.append(label)
        ax.set_yticks(ticks, [_wrap(n, LABEL_WIDTH) for n in names])
        ax.set_xscale('log')
        ax.set_xlim(lo, hi)
        ax.set_ylim((max(ys) + 0.7) if ys else 1, -0.7)
        ax.axvline(1.0, color='#333333', lw=0.8, ls='--')
        ax.set_title(_wrap(title, 110), loc='left', fontsize=9)
        ax.grid(axis='x', which='major', color='#dddddd', lw=0.6)
        ax.set_axisbelow(True)
        ax.set_xticks([t for t in TICKS if lo <= t <= hi])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}x'))
    axes[-1, 0].set_xlabel('fusearray / peer (bars; log scale); a black tick is the goal, '
                           '1.0x the dashed line')
    handles = [Patch(color=COLOURS[p], label=f'fusearray / {p}') for p in PEERS]
    handles += [Patch(color=COLOURS['own'], label='fusearray\'s own ratio or value / limit'),
                Line2D([], [], color='black', lw=2.2, label='goal')]
    fig.legend(handles=handles, loc='outside lower center', ncol=6, fontsize=7,
               frameon=False)
    fig.suptitle('fusearray against its targets and its peers' +
                 (f'\n{subtitle}' if subtitle else ''), fontsize=10)
    fig.savefig(path, metadata={'Date': None} if str(path).endswith('.svg') else None)
    plt.close(fig)
    return drawn

