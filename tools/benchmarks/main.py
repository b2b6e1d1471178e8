"""fusearray benchmark: the same workloads on five targets, on two backings, in one run.

Backings (--backing): where the targets' data lives; the fio and ext4 groups
run once per backing, each with its own set of targets:
  tmpfs      a tmpfs the bench mounts itself (the software, not a disk)
  disk       a directory of the machine's disk (--disk-dir, default
             /var/tmp/fusearray-bench; a run directory is made and removed in it)

Targets:
  file       a plain file on the backing (the backing's limit)
  memfile    tools/memfile.py, a minimal pyfuse3 in-memory file (the FUSE
             ceiling; in memory, so on the tmpfs backing only)
  qemu-raw   a raw image on the backing, exported by qemu-storage-daemon
             (--export type=fuse, onto a regular file; cache.direct=off,
             aio=threads: the defaults)
  qemu-qcow2 the same with a qcow2 image (qemu-img create defaults: 64 KiB
             clusters, no preallocation). Both qemu targets' loop devices in the
             ext4 group are attached without direct-io: ext4 made on a direct-io
             loop over a qemu 7.2 FUSE export does not mount, raw or qcow2
             (issue #15; --qemu-loop-direct to try it anyway)
  fusearray  a LUN file of a fusearray mount (array dir on the backing unless
             --array-dir is given)

Groups (each a function returning rows, see GROUPS):
  steady     runs first on each backing, on the fresh targets: seq write 1M
             of the whole file once (the first pass), then --steady-passes
             overwrite passes in one fio run; MB/s of each, and the longest
             write stall (fio clat max). Goals: overwrites >= 0.9x qemu-qcow2
             and >= the first pass, longest stall <= 100 ms (#15 point 4)
  fio        O_DIRECT fio on the file, time-based: seq write (overwrite) and
             read 1M; rand write 4k QD1, QD32 libaio, 4k and 64k + fdatasync;
             rand read 4k QD1, QD32 libaio, 4 jobs. Goals against memfile
             and against qemu-qcow2
  ext4       ext4 on a loop device over the file (losetup --direct-io=on):
             write a file + fsync, cold read after remount and drop_caches;
             fio random writes 4k and 64k with fsync=1 in a file on it
  snap       shadow copies on a fusearray array of its own (issue 3): snapshot
             and same-pack resync time of a full 1 GiB LUN and of a 1 TiB thin
             LUN with 4 GiB written; resync to another pack: time to the first
             read (both LUNs; the thin LUN's copy is then cancelled), and the
             1 GiB LUN's background copy MB/s against the seq write of the run
  packs      mirror and raid5 packs on an array of its own (issue 4), every disk
             a tmpfs of its own: seq write/read 1M of a LUN on each as a ratio
             to a LUN on a single-disk pack; rebuild MB/s of one removed disk
             (mirror, raid5) as a ratio to `cp -a` of a surviving disk
  scale      (only when named in --groups) RAM and time against stored data
             (issue 16): arrays of --scale-blocks unique 4 KiB blocks built by
             tools/scalegen.py; RSS after mount and after cold 4k random
             reads, mount time, delete of 1 shadow copy of 100 and its
             collection, writes during it, fsck time and RSS
  transport  export and import of a shadow copy set between two arrays mounted
             at once (issue 5): MB/s as a ratio to the LUN's seq read 1M, and
             the incremental stream after rewriting 1 % of the blocks as a
             fraction of the full one. The import is timed into a new array
             once (and a dd of the stream to the same tmpfs beside it: both
             write memory for the first time, which this VM makes slow), then
             into the receiver after deleting the set and letting GC reclaim
             it, as a backup target that expires old sets does

Space: each thing that grows gets a tmpfs of its own, so one cannot starve
another: the bench tmpfs (the tmpfs target's file), the fusearray target's
array, the ext4 group's random source, the snap group's array and its second
pack, the packs group's array, disks and cp -a scratch, the transport group's
two arrays and its stream files. The report shows each one's limit and peak use.

Prints one Markdown table per group (and backing) with the ratios
fusearray/memfile, fusearray/file and fusearray/qcow2 and PASS/FAIL against the
goals, and draws every ratio against its goal and the peers into a chart
(--chart, default docs/bench.svg, the README's; chart.py, with matplotlib). Needs root, fio, losetup, mkfs.ext4, fusermount3, fallocate,
qemu-storage-daemon and qemu-img (tools/setup.sh installs them). Run it with
a Python that has pyfuse3 and trio (the project venv): memfile and the
fusearray CLI run as subprocesses of sys.executable (or --python). Everything
it mounts, attaches or starts is undone in a `finally`, also on failure and
Ctrl-C.
"""
import argparse
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from .common import (
    BACKINGS, DISK_DIR, REPO, Cleanup, SETUP, SpaceWatch, StepFailed, TARGETS, daemon_log_tail,
    fmt_bytes, log, make_tempdir, mem_available, mount_tmpfs, parse_size, run)
from .fio import group_fio
from .steady import group_steady
from .ext4 import group_ext4
from .snap import group_snap
from .packs import group_packs
from .transport import group_transport
from .scale import group_scale
from .radospack import group_rados
from .report import report


#: groups that make arrays of their own (no targets needed)
OWN_ARRAY_GROUPS = {'snap', 'packs', 'transport', 'scale', 'rados'}
#: groups a run leaves out unless --groups names them (minutes and tens of GiB)
NOT_BY_DEFAULT = {'scale', 'rados'}

# title, function; later issues add groups here (snapshot, resync, rebuild, ...)
GROUPS = [
    # steady first: it wants the targets fresh (its first pass writes them for the first time)
    ('steady overwrites: a fresh file written end to end, then overwritten again and again '
     '(fio seq write 1M, O_DIRECT)', group_steady),
    ('fio, O_DIRECT on the file (psync, iodepth 1 unless named)', group_fio),
    ('ext4 on a loop device over the file (losetup --direct-io=on; the qemu targets: off)',
     group_ext4),
    ('shadow copies: snapshot and resync (fusearray only, an array of its own)', group_snap),
    ('packs: mirror and raid5 against a single disk, rebuild against cp -a '
     '(fusearray only, an array of its own)', group_packs),
    ('transport: export and import of a set, full and incremental (fusearray only, two '
     'arrays of their own)', group_transport),
    ('scale: RAM and time against stored blocks (fusearray only, arrays built by '
     'tools/scalegen.py on the disk backing)', group_scale),
    ('rados: a LUN on a rados pack against raw librados (same cluster, same object size, '
     'op sizes and concurrency) and against a LUN on a local pack (fusearray, an array of '
     'its own, a Ceph cluster of its own)', group_rados),
]


# ---------------------------------------------------------------- report


class Context:
    def __init__(self, args, cl):
        self.args, self.cl = args, cl
        self.work = None
        self.backing = None        # the directory of the backing being run
        self.backing_name = None   # 'tmpfs' or 'disk'
        self.backing_dirs = {}     # backing -> directory, for the report
        self.target_notes = {}     # 'target on backing' -> notes, for the report
        self.group_backing = {}    # group title -> backing, for the JSON
        self.plan = {}             # tmpfs limits, see plan_space
        self.space = None          # SpaceWatch
        self.targets = []
        self.results = {}          # group name -> rows, for groups that build on others
        self.done = []             # (title, rows) in the order run
        self.errors = []
        self.elapsed = 0.0

    def fail(self, msg):
        log(f'FAILED: {msg}')
        self.errors.append(msg)

    def fail_target(self, target, msg):
        """A failed step on a target: for fusearray with its daemon.log, and
        with the space left everywhere (ENOSPC is the usual suspect)."""
        extra = f'\nspace now: {self.space.now()}' if self.space else ''
        if target.array is not None:
            extra += f'\n{daemon_log_tail(target.array)}'
        self.fail(f'{target.name}: {msg}{extra}')


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--only', default=','.join(TARGETS),
                    help=f'comma-separated targets (default: all of {",".join(TARGETS)})')
    ap.add_argument('--backing', default=','.join(BACKINGS),
                    help='comma-separated backings for the fio and ext4 groups '
                    '(default: tmpfs,disk)')
    ap.add_argument('--disk-dir', default=DISK_DIR,
                    help=f'the disk backing\'s directory (default {DISK_DIR})')
    ap.add_argument('--qemu-loop-direct', action='store_true',
                    help='attach the qemu targets\' loop devices with direct-io like the '
                    'others (ext4 made on them does not mount with qemu 7.2)')
    ap.add_argument('--quick', action='store_true',
                    help='smoke run: size 256M, runtime 3 s, ext4 file 128M; snap: 256M LUN, '
                    '512M written in the 1T LUN, 3 repeats, 1 cross-pack copy; packs and '
                    'transport: 256M LUNs, 1 pass')
    ap.add_argument('--size', type=parse_size, help='file/LUN size (default 1G)')
    ap.add_argument('--runtime', type=int, help='seconds per fio workload (default 10)')
    ap.add_argument('--steady-passes', type=int,
                    help='steady group: overwrite passes after the first (default 3, quick 2)')
    ap.add_argument('--repeat', type=int, default=1,
                    help='runs of each fio workload, the median is shown (default 1)')
    ap.add_argument('--ext4-size', type=parse_size,
                    help='file written in the ext4 group (default 512M; at most half of --size)')
    ap.add_argument('--ext4-runs', type=int,
                    help='ext4 passes per target after a warm-up pass, the median is shown '
                    '(default 3, quick 1)')
    ap.add_argument('--snap-small', type=parse_size,
                    help='snap group: the fully written LUN (default 1G)')
    ap.add_argument('--snap-big', type=parse_size, default=1 << 40,
                    help='snap group: the thin LUN (default 1T)')
    ap.add_argument('--snap-written', type=parse_size,
                    help='snap group: bytes written into the thin LUN (default 4G)')
    ap.add_argument('--snap-repeat', type=int,
                    help='snap group: snapshots and resyncs per LUN, the median is shown '
                    '(default 9)')
    ap.add_argument('--copy-repeat', type=int,
                    help='snap group: resyncs to another pack, the median is shown (default 3)')
    ap.add_argument('--pack-lun', type=parse_size,
                    help='packs group: the LUN on each pack (default 512M, quick 256M)')
    ap.add_argument('--pack-writes', type=int,
                    help='packs group: seq write passes per LUN, the packs taken in turn '
                         '(default 5, quick 2: the first write, the first overwrite, which '
                         'needs new segment files for all of it, and steady overwrites)')
    ap.add_argument('--transport-lun', type=parse_size,
                    help='transport group: the exported LUN (default 512M, quick 256M)')
    ap.add_argument('--read-repeat', type=int,
                    help='packs and transport groups: seq read passes per LUN, the median '
                    'is shown (default 3, quick 1)')
    ap.add_argument('--rados-lun', type=parse_size,
                    help='rados group: the LUN on each pack (default 512M, quick 256M)')
    ap.add_argument('--rados-passes', type=int,
                    help='rados group: seq write and read passes of each LUN and of raw '
                    'librados, the median is shown (default 3, quick 1)')
    ap.add_argument('--array-dir', help='put the fusearray arrays under this directory '
                    '(default: on tmpfs mounts of their own)')
    ap.add_argument('--cache-size', help='pass --cache-size to fusearray mount')
    ap.add_argument('--groups', default=','.join(
        f.__name__.removeprefix('group_') for _, f in GROUPS
        if f.__name__.removeprefix('group_') not in NOT_BY_DEFAULT),
        help='comma-separated groups to run (default: all but scale and rados)')
    ap.add_argument('--scale-blocks', default='1M,10M',
                    help='scale group: stored 4 KiB blocks of each array built '
                         '(default 1M,10M; K, M, G suffixes are powers of ten here)')
    ap.add_argument('--scale-dir', help='scale group: where the arrays are built '
                    '(default: --disk-dir)')
    ap.add_argument('--scale-pack-dir', help='scale group: where the arrays\' segments '
                    'go (default: in the array; 100M blocks are 400 GB of data: give a '
                    'file system with compression, e.g. btrfs -o compress=lzo)')
    ap.add_argument('--scale-gen', choices=('auto', 'layers', 'direct'), default='auto',
                    help='scale group: build arrays through the package\'s layers or '
                         'with tools/scalegen.py --direct (auto: direct above 10M blocks)')
    ap.add_argument('--scale-fsck-max', default='10M',
                    help='scale group: run tools/fsck only on arrays up to this many '
                         'blocks (about 65 us a block; default 10M)')
    ap.add_argument('--python', default=sys.executable,
                    help='interpreter for memfile and the fusearray CLI (default: this one)')
    ap.add_argument('--json', help='also save the raw numbers to this file')
    ap.add_argument('--chart', metavar='PATH',
                    help='draw every fusearray ratio against its goal and the peers into '
                    'PATH (SVG; PNG if it ends in .png) with matplotlib (default: beside '
                    '--json, with .svg for its suffix, else docs/bench.svg: the README\'s)')
    ap.add_argument('--no-chart', action='store_true', help='draw no chart')
    args = ap.parse_args(argv)
    if args.no_chart:
        args.chart = None
    elif not args.chart:
        args.chart = (str(Path(args.json).with_suffix('.svg')) if args.json
                      else str(REPO / 'docs' / 'bench.svg'))
    quick = args.quick
    args.size = args.size or (256 << 20 if quick else 1 << 30)
    args.runtime = args.runtime or (3 if quick else 10)
    args.ext4_size = args.ext4_size or (128 << 20 if quick else 512 << 20)
    args.ext4_runs = args.ext4_runs or (1 if quick else 3)
    args.snap_small = args.snap_small or (256 << 20 if quick else 1 << 30)
    args.snap_written = args.snap_written or (512 << 20 if quick else 4 << 30)
    args.snap_repeat = args.snap_repeat or (3 if quick else 9)
    args.copy_repeat = args.copy_repeat or (1 if quick else 3)
    args.pack_lun = args.pack_lun or (256 << 20 if quick else 512 << 20)
    args.transport_lun = args.transport_lun or (256 << 20 if quick else 512 << 20)
    args.read_repeat = args.read_repeat or (1 if quick else 3)
    args.rados_lun = args.rados_lun or (256 << 20 if quick else 512 << 20)
    args.rados_passes = args.rados_passes or (1 if quick else 3)
    args.pack_writes = args.pack_writes or (2 if quick else 5)
    args.steady_passes = args.steady_passes or (2 if quick else 3)
    args.only = [{'tmpfs': 'file'}.get(t.strip(), t.strip())   # the old name of 'file'
                 for t in args.only.split(',') if t.strip()]
    args.backing = [b.strip() for b in args.backing.split(',') if b.strip()]
    if set(args.backing) - set(BACKINGS) or not args.backing:
        ap.error(f'--backing: choose from {",".join(BACKINGS)}')
    args.groups = [g.strip() for g in args.groups.split(',') if g.strip()]
    try:
        args.scale_blocks = [count_arg(x) for x in args.scale_blocks.split(',') if x.strip()]
    except (ValueError, KeyError):
        ap.error('--scale-blocks: counts like 1M,10M or 200000')
    try:
        args.scale_fsck_max = count_arg(args.scale_fsck_max)
    except (ValueError, KeyError):
        ap.error('--scale-fsck-max: a count like 10M or 200000')
    bad = set(args.only) - set(TARGETS)
    if bad:
        ap.error(f'unknown target(s) {",".join(sorted(bad))}; choose from {",".join(TARGETS)}')
    known = {f.__name__.removeprefix('group_') for _, f in GROUPS}
    if set(args.groups) - known:
        ap.error(f'unknown group(s); choose from {",".join(sorted(known))}')
    if args.size % (1 << 20) or args.ext4_size % (1 << 20):
        ap.error('--size and --ext4-size must be multiples of 1M')
    if args.ext4_size * 2 > args.size:
        ap.error('--ext4-size must be at most half of --size (ext4 goes on the same file)')
    if (args.snap_small % (1 << 20) or args.snap_written % (1 << 20) or args.snap_big % (1 << 20)
            or not 0 < args.snap_written <= args.snap_big):
        ap.error('--snap-small, --snap-big, --snap-written: multiples of 1M, '
                 'with --snap-written at most --snap-big')
    if args.pack_lun % (1 << 20) or args.transport_lun % (1 << 20) \
            or args.rados_lun % (1 << 20):
        ap.error('--pack-lun, --transport-lun and --rados-lun must be multiples of 1M')
    return args


def preflight(args):
    if os.geteuid() != 0:
        raise StepFailed('run as root (mount, losetup, drop_caches)')
    for tool in ('fio', 'losetup', 'mkfs.ext4', 'fusermount3', 'mount', 'umount', 'dd',
                 'fallocate', *(('qemu-storage-daemon', 'qemu-img')
                                if {'qemu-raw', 'qemu-qcow2'} & set(args.only) else ())):
        if not shutil.which(tool):
            raise StepFailed(f'{tool} not found (bash tools/setup.sh installs it)')
    if {'memfile', 'fusearray'} & set(args.only):
        probe = run([args.python, '-c', 'import pyfuse3, trio'], check=False)
        if probe.returncode != 0:
            raise StepFailed(f'{args.python} cannot import pyfuse3/trio: run the bench with '
                             f'the project venv\'s python (or pass --python)')


#: Room for the garbage a fusearray array holds until its collector catches up
#: with a fio workload (1 GiB LUN, 10 s: about 3.5 GiB seen after seq write 1M)
ARRAY_SLACK = 8 << 30


def plan_space(args):
    """The tmpfs backing's limit (a limit is not a reservation): the file,
    the two qemu images (qcow2 with its metadata), the fusearray array and
    its garbage. Capped by half the free memory. (The ext4 source and the
    snap group's array get theirs when those groups run.)"""
    avail = mem_available()
    need = (256 << 20) + sum(args.size for t in ('file', 'qemu-raw', 'qemu-qcow2')
                             if t in args.only)
    if 'fusearray' in args.only and not args.array_dir:
        need += args.size + ARRAY_SLACK
    plan = {'tmpfs backing': min(need, avail // 2)}
    log('tmpfs limits: ' + ', '.join(f'{k} {fmt_bytes(v)}' for k, v in plan.items())
        + f' (memory available {fmt_bytes(avail)})')
    return plan


def make_backing(ctx, name):
    """The backing's directory, undone by ctx.cl: a tmpfs of its own, or a
    new directory under --disk-dir."""
    if name == 'tmpfs':
        path = ctx.work / 'backing-tmpfs'
        mount_tmpfs(ctx.cl, path, ctx.plan['tmpfs backing'], ctx.space, 'tmpfs backing')
        ctx.backing_dirs[name] = f'a tmpfs of its own, limit {fmt_bytes(ctx.plan["tmpfs backing"])}'
        return path
    base = Path(ctx.args.disk_dir)
    base.mkdir(parents=True, exist_ok=True)
    fstype = run(['stat', '-f', '-c', '%T', base]).stdout.strip()
    path = make_tempdir(ctx.cl, parent=base, prefix='run.')
    ctx.space.watch('disk backing', path)
    ctx.cl.push('stop watching the disk backing', lambda: ctx.space.forget('disk backing'))
    ctx.backing_dirs[name] = f'{path}, {fstype}'
    return path


def on_sigterm(signum, frame):
    raise KeyboardInterrupt(f'signal {signum}')


def run_group(ctx, title, fn, name):
    ctx.space.group = name
    log(f'group {name}: {ctx.space.now()}')
    mark = ctx.cl.mark()
    try:
        rows = fn(ctx)
    except Exception as e:  # a bug or a surprise: report it, go on with the next group
        ctx.fail(f'{name} group: {type(e).__name__}: {e}; {ctx.space.now()}\n'
                 + traceback.format_exc())
        return
    finally:
        ctx.cl.unwind(mark)   # what a group sets up, it undoes
    ctx.results.setdefault(name, rows)   # the first backing's (snap reads the fio group)
    ctx.done.append((title, rows))
    ctx.group_backing[title] = ctx.backing_name


def run_backing(ctx, backing, groups):
    """The target groups on one backing: its directory, its targets, the
    groups, then everything undone (the next backing starts clean)."""
    cl = ctx.cl
    mark = cl.mark()
    top = ctx.work
    try:
        ctx.work = top / backing     # mount points and logs of this backing's targets
        ctx.work.mkdir()
        ctx.backing_name = backing
        try:
            ctx.backing = make_backing(ctx, backing)
        except (StepFailed, OSError) as e:
            ctx.fail(f'{backing} backing: {e}')
            return
        ctx.targets = []
        for name in ctx.args.only:
            if name == 'memfile' and backing != 'tmpfs':
                continue      # in memory whatever the backing: measured once
            log(f'set up {name} on {backing}')
            try:
                target = SETUP[name](ctx)
            except (StepFailed, OSError) as e:
                ctx.fail(f'{name} on {backing}: set-up: {e}')
                continue
            ctx.targets.append(target)
            notes = target.notes + ([target.loop_note + ' (ext4 group)']
                                    if target.loop_note else [])
            if notes:
                ctx.target_notes[f'{name} on {backing}'] = notes
        if not ctx.targets:
            return
        for title, fn in groups:
            run_group(ctx, f'{title}, on {backing}', fn, fn.__name__.removeprefix('group_'))
    finally:
        cl.unwind(mark)
        ctx.targets = []
        ctx.work = top
        ctx.backing = ctx.backing_name = None


def run_bench(ctx):
    args = ctx.args
    ctx.work = make_tempdir(ctx.cl)
    ctx.plan = plan_space(args)
    wanted = [(title, fn) for title, fn in GROUPS
              if fn.__name__.removeprefix('group_') in args.groups]
    target_groups = [(t, f) for t, f in wanted
                     if f.__name__.removeprefix('group_') not in OWN_ARRAY_GROUPS]
    if target_groups and args.only:
        for backing in args.backing:
            run_backing(ctx, backing, target_groups)
    # the snap, packs and transport groups make their own arrays (on tmpfs)
    for title, fn in wanted:
        name = fn.__name__.removeprefix('group_')
        if name in OWN_ARRAY_GROUPS:
            run_group(ctx, title, fn, name)


def draw_chart(ctx, argv):
    """The chart of the run (--chart); a chart that cannot be drawn is said
    on stderr and leaves the report as it is."""
    import datetime
    from .chart import write_chart
    when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')
    shown, skip = [], False
    for a in argv:          # how to run it again, without where this run wrote
        if skip or a == '--no-chart' or a.startswith(('--chart=', '--json=')):
            skip = False
        elif a in ('--chart', '--json'):
            skip = True
        else:
            shown.append(a)
    cmd = ' '.join(['tools/bench', *shown])
    note = (f'{cmd}  ({when}, {len(os.sched_getaffinity(0))} cores, '
            f'{ctx.elapsed / 60:.0f} min; one run: compare ratios within a workload)')
    try:
        n = write_chart(ctx.args.chart, ctx.done, note)
    except ImportError as e:
        print(f'no chart: {e} (bash tools/setup.sh installs matplotlib)', file=sys.stderr)
        return
    except (OSError, ValueError) as e:
        print(f'no chart: {ctx.args.chart}: {e}', file=sys.stderr)
        return
    log(f'chart: {n} ratios drawn into {ctx.args.chart}')


def count_arg(text: str) -> int:
    """'1M' -> 1000000 (K, M, G: powers of ten), '200000' -> 200000."""
    x = text.strip()
    if x[-1:].isalpha():
        return int(float(x[:-1]) * {'K': 1e3, 'M': 1e6, 'G': 1e9}[x[-1].upper()])
    return int(x)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    cl = Cleanup()
    ctx = Context(args, cl)
    ctx.space = SpaceWatch()
    start = time.monotonic()
    try:
        preflight(args)
        run_bench(ctx)
    except StepFailed as e:
        ctx.fail(str(e))
    except KeyboardInterrupt:
        ctx.fail('interrupted')
    finally:
        # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log('clean-up')
        cl.run_all()
        ctx.space.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    ctx.elapsed = time.monotonic() - start
    if ctx.done:
        report(ctx, ctx.done)   # what was measured, also after a failure or Ctrl-C
        if args.chart:
            draw_chart(ctx, argv)
    elif ctx.errors:
        for e in ctx.errors:
            print(f'FAILED: {e}', file=sys.stderr)
    if cl.problems:
        print('Clean-up problems (check `grep fuse /proc/mounts; losetup -a`):', file=sys.stderr)
        for p in cl.problems:
            print(f'  {p}', file=sys.stderr)
    return 1 if ctx.errors or cl.problems else 0
