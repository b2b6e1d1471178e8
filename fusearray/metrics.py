"""The array's I/O counters and their renderings: the Prometheus text
exposition (`ctl/metrics`, and `mount --metrics-port`) and the table of
`fusearray iostat`.

What is counted, and where (everything on the trio thread: no locks; no
worker thread touches a counter):

- per volume (a LUN or a shadow copy: `Volume.stats`, an IoStats), by the
  fs layer's handlers, timed with `time.perf_counter_ns` around the array
  call: read, write and fsync requests (ops, bytes, a latency histogram,
  failures) and discards (fallocate punch-hole or zero-range);
- cache hits and misses, in Volume's read path: each block a read touches
  is a hit when the block cache serves it, a miss when it is read from the
  pack (an unmapped block, served as zeros, is neither; a partly written
  block completed from the pack is a miss);
- blocks written back and dedup hits (a block whose content its pack
  holds already, or that the same write-back stored once already), in
  WriteBack._flush_pack, from the ids the hashing thread returned;
- per pack: the sum of its volumes' counters and of the volumes forgotten
  since the mount (`Metrics.retire`, when a deleted volume leaves the
  volume table): a pack's counters never go back while the daemon runs;
- garbage collection (gc.Collector.statistics()), jobs (their progress),
  the block cache (BlockCache: its size and counters).

Counters start at zero at each mount (`fusearray_start_time_seconds`
says when). The hot path costs a few integer additions and one bisect
per request (IoStats.read/write): no allocation, no lock.

Latency histograms have fixed log-scale buckets, 1-2-5 per decade from
1 us to 10 s (BOUNDS_NS), counted as plain ints; rendered cumulative with
`le` in seconds, `_sum` and `_count`, as Prometheus expects.
"""
import bisect
import math
import re
import time

#: Upper bounds of the latency buckets, in nanoseconds (an observation x
#: falls in the first bucket with x <= bound; above the last: +Inf).
BOUNDS_NS = tuple(m * 10 ** e for e in range(3, 10) for m in (1, 2, 5)) + (10 ** 10,)
#: `le` label values, seconds, exact decimals ("0.000001" ... "10").
LE = tuple(f"{b / 1e9:.9f}".rstrip("0").rstrip(".") for b in BOUNDS_NS) + ("+Inf",)

_bucket = bisect.bisect_left
_BOUNDS = BOUNDS_NS
_NBUCKETS = len(BOUNDS_NS) + 1


class IoStats:
    """The counters of one volume (or of a pack's forgotten volumes).
    `*_hist` are per-bucket (not cumulative) counts, BOUNDS_NS's buckets
    then +Inf; `*_ns` the sum of the latencies."""
    __slots__ = ("read_ops", "read_bytes", "read_ns", "read_hist", "read_errors",
                 "write_ops", "write_bytes", "write_ns", "write_hist", "write_errors",
                 "fsync_ops", "fsync_ns", "fsync_hist", "fsync_errors",
                 "discard_ops", "discard_bytes", "cache_hits", "cache_misses",
                 "written_back", "dedup_hits")
    COUNTERS = ("read_ops", "read_bytes", "read_ns", "read_errors",
                "write_ops", "write_bytes", "write_ns", "write_errors",
                "fsync_ops", "fsync_ns", "fsync_errors", "discard_ops", "discard_bytes",
                "cache_hits", "cache_misses", "written_back", "dedup_hits")
    HISTOGRAMS = ("read_hist", "write_hist", "fsync_hist")

    def __init__(self):
        for name in self.COUNTERS:
            setattr(self, name, 0)
        for name in self.HISTOGRAMS:
            setattr(self, name, [0] * _NBUCKETS)

    # ---- the hot path (fs.py's handlers) ---------------------------------------
    def read(self, nbytes: int, ns: int) -> None:
        """A read request answered with `nbytes` bytes after `ns` ns."""
        self.read_ops += 1
        self.read_bytes += nbytes
        self.read_ns += ns
        self.read_hist[_bucket(_BOUNDS, ns)] += 1

    def write(self, nbytes: int, ns: int) -> None:
        """A write request of `nbytes` bytes acknowledged after `ns` ns."""
        self.write_ops += 1
        self.write_bytes += nbytes
        self.write_ns += ns
        self.write_hist[_bucket(_BOUNDS, ns)] += 1

    def fsync(self, ns: int) -> None:
        """An fsync that returned after `ns` ns."""
        self.fsync_ops += 1
        self.fsync_ns += ns
        self.fsync_hist[_bucket(_BOUNDS, ns)] += 1

    # ---- folding ---------------------------------------------------------------
    def add(self, other: "IoStats") -> None:
        """Add `other`'s counts to these."""
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in self.HISTOGRAMS:
            mine = getattr(self, name)
            for i, n in enumerate(getattr(other, name)):
                mine[i] += n


def total(stats) -> IoStats:
    """The sum of several IoStats."""
    out = IoStats()
    for s in stats:
        out.add(s)
    return out


class Metrics:
    """The array's own part: when counting began and the counters of the
    volumes forgotten since (per pack name), so pack totals never go back."""

    def __init__(self):
        self.started = time.time()
        self.retired: dict[str, IoStats] = {}

    def retire(self, vol) -> None:
        """`vol` leaves the volume table (deleted, last handle closed)."""
        self.retired.setdefault(vol.pack.name, IoStats()).add(vol.stats)

    def pack_totals(self, volumes) -> dict:
        """{pack name: IoStats} over `volumes` (every live volume, deleted
        but open ones too) and the retired ones."""
        out: dict = {}
        for name, st in self.retired.items():
            out.setdefault(name, IoStats()).add(st)
        for v in volumes:
            out.setdefault(v.pack.name, IoStats()).add(v.stats)
        return out


# ---- the Prometheus text exposition (format 0.0.4) ------------------------------
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value) -> str:
    """A label value as the text format writes it between double quotes."""
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels) + "}"


def _value(v) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


class Exposition:
    """Families written one after another: each `# HELP`, `# TYPE`, then its
    samples. `labels` are sequences of (name, value) pairs."""

    def __init__(self):
        self.lines: list[str] = []

    def _head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def counter(self, name: str, help_text: str, samples) -> None:
        """`name` ends in _total; samples: [(labels, value)]."""
        self._head(name, "counter", help_text)
        self.lines.extend(f"{name}{_labels(l)} {_value(v)}" for l, v in samples)

    def gauge(self, name: str, help_text: str, samples) -> None:
        self._head(name, "gauge", help_text)
        self.lines.extend(f"{name}{_labels(l)} {_value(v)}" for l, v in samples)

    def histogram(self, name: str, help_text: str, samples) -> None:
        """samples: [(labels, per-bucket counts (BOUNDS_NS then +Inf), sum in ns)]."""
        self._head(name, "histogram", help_text)
        out = self.lines
        for labels, counts, sum_ns in samples:
            labels = tuple(labels)
            cum = 0
            for le, n in zip(LE, counts):
                cum += n
                out.append(f"{name}_bucket{_labels(labels + (('le', le),))} {cum}")
            out.append(f"{name}_sum{_labels(labels)} {_value(sum_ns / 1e9)}")
            out.append(f"{name}_count{_labels(labels)} {cum}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


#: The I/O families: (IoStats field, per-volume name, help); each has its
#: per-pack family too (pack_name).
IO_COUNTERS = (
    ("read_ops", "fusearray_lun_read_ops_total", "read requests answered"),
    ("read_bytes", "fusearray_lun_read_bytes_total", "bytes read"),
    ("read_errors", "fusearray_lun_read_errors_total", "read requests failed"),
    ("write_ops", "fusearray_lun_write_ops_total", "write requests acknowledged"),
    ("write_bytes", "fusearray_lun_write_bytes_total", "bytes written"),
    ("write_errors", "fusearray_lun_write_errors_total", "write requests failed"),
    ("discard_ops", "fusearray_lun_discard_ops_total",
     "discards (fallocate punch-hole or zero-range)"),
    ("discard_bytes", "fusearray_lun_discard_bytes_total", "bytes discarded"),
    ("fsync_ops", "fusearray_fsync_total", "fsync requests done"),
    ("fsync_errors", "fusearray_fsync_errors_total", "fsync requests failed"),
    ("cache_hits", "fusearray_cache_hits_total",
     "blocks of reads served by the block cache"),
    ("cache_misses", "fusearray_cache_misses_total",
     "blocks of reads read from the pack"),
    ("written_back", "fusearray_writeback_blocks_total",
     "non-zero blocks written back from the cache to the pack"),
    ("dedup_hits", "fusearray_dedup_hits_total",
     "blocks written back whose content the pack held already (not stored again)"),
)
IO_HISTOGRAMS = (
    ("read_hist", "read_ns", "fusearray_lun_read_latency_seconds",
     "read request latency in the daemon"),
    ("write_hist", "write_ns", "fusearray_lun_write_latency_seconds",
     "write request latency in the daemon (back-pressure included)"),
    ("fsync_hist", "fsync_ns", "fusearray_fsync_latency_seconds", "fsync latency"),
)


def pack_name(lun_name: str) -> str:
    """The per-pack family of a per-volume one: fusearray_lun_read_ops_total
    -> fusearray_pack_read_ops_total, fusearray_fsync_total ->
    fusearray_pack_fsync_total."""
    rest = lun_name.removeprefix("fusearray_").removeprefix("lun_")
    return "fusearray_pack_" + rest


def io_families(ex: Exposition, rows, per: str) -> None:
    """The I/O families of `rows` [(labels, IoStats)]: per volume (`per`
    "lun": labels lun, pack) or per pack (`per` "pack": label pack)."""
    for field, name, help_text in IO_COUNTERS:
        if per == "pack":
            name, help_text = pack_name(name), help_text + ", all volumes of the pack"
        else:
            help_text += ", per LUN or shadow copy (lun=SET/NAME)"
        ex.counter(name, help_text, [(l, getattr(s, field)) for l, s in rows])
    for field, sum_field, name, help_text in IO_HISTOGRAMS:
        if per == "pack":
            name, help_text = pack_name(name), help_text + ", all volumes of the pack"
        ex.histogram(name, help_text + " (seconds)",
                     [(l, getattr(s, field), getattr(s, sum_field)) for l, s in rows])


def render(array) -> bytes:
    """ctl/metrics: everything above, for the mounted `array`."""
    from .namespace import is_staging      # (the CLI's iostat needs none of this)
    ex = Exposition()
    m = array.metrics
    ex.gauge("fusearray_start_time_seconds",
             "when the daemon mounted the array (the counters start there), Unix time",
             [((), m.started)])
    # (not the deleted ones still open, whose name may be taken again, nor
    # an import's staging copies, invisible until published: both count in
    # their pack's)
    vols = [v for v in array.volumes.values()
            if not v.deleted and not (v.kind == "shadow" and is_staging(v.set_name))]
    vols.sort(key=lambda v: (v.pack.name, v.kind != "lun", v.path))
    rows = [((("lun", v.path), ("pack", v.pack.name)), v.stats) for v in vols]
    io_families(ex, rows, "lun")
    ex.gauge("fusearray_lun_size_bytes", "size of each LUN or shadow copy",
             [(l, v.size) for (l, _), v in zip(rows, vols)])
    ex.gauge("fusearray_lun_allocated_bytes", "bytes mapped non-zero (thin provisioning)",
             [(l, v.allocated_bytes()) for (l, _), v in zip(rows, vols)])
    packs = sorted(array.packs.values(), key=lambda p: p.name)
    totals = m.pack_totals(array.volumes.values())
    prow = [((("pack", p.name),), totals.get(p.name) or IoStats()) for p in packs]
    io_families(ex, prow, "pack")
    for what, fn in (("capacity", "capacity_bytes"), ("used", "used_bytes"),
                     ("free", "free_bytes")):
        ex.gauge(f"fusearray_pack_{what}_bytes", f"the pack's {what} bytes",
                 [(l, getattr(p, fn)()) for (l, _), p in zip(prow, packs)])
    ex.gauge("fusearray_pack_blocks", "blocks the pack stores (after dedup)",
             [(l, p.block_count()) for (l, _), p in zip(prow, packs)])
    ex.counter("fusearray_pack_mapped_reads_total",
               "blocks read straight from the pack's mapped segment files",
               [(l, p.mapped_reads) for (l, _), p in zip(prow, packs)])
    # the block cache
    c = array.cache
    ex.gauge("fusearray_cache_limit_bytes", "the block cache's size limit",
             [((), c.limit)])
    ex.gauge("fusearray_cache_bytes", "bytes in the block cache", [((), c.bytes)])
    ex.gauge("fusearray_cache_dirty_bytes", "bytes of the block cache not written back",
             [((), c.dirty_bytes)])
    for key, value in c.stats().items():
        ex.counter(f"fusearray_cache_{key}_total", f"block cache: {key.replace('_', ' ')}",
                   [((), value)])
    # garbage collection
    g = array.collector.statistics()
    ex.counter("fusearray_gc_runs_total", "garbage collections (reclaim: on a full pack)",
               [((("kind", k),), n) for k, n in sorted(g["runs"].items())])
    ex.counter("fusearray_gc_seconds_total", "time spent collecting garbage",
               [((), g["seconds"])])
    ex.gauge("fusearray_gc_last_run_timestamp_seconds",
             "when the last collection ended, Unix time (0: none yet)",
             [((), g["last_run"])])
    ex.counter("fusearray_gc_freed_bytes_total", "bytes freed by garbage collection",
               [((("pack", p.name),), g["freed_bytes"].get(p.name, 0)) for p in packs])
    ex.counter("fusearray_gc_compacted_bytes_total",
               "live bytes moved out of sparse segments (compaction)",
               [((("pack", p.name),), g["compacted_bytes"].get(p.name, 0)) for p in packs])
    ex.gauge("fusearray_gc_garbage_bytes",
             "bytes overwritten since the pack's last collection (what the next may free)",
             [((("pack", p.name),), g["garbage_bytes"].get(p.name, 0)) for p in packs])
    # jobs
    jobs = sorted(array.runner.jobs.values(), key=lambda j: j.id)
    jl = [(("job", str(j.id)), ("kind", j.kind)) for j in jobs]
    ex.gauge("fusearray_job_progress_ratio", "a job's progress, 0 to 1 (as ctl/jobs/ID)",
             [(l, job_ratio(j)) for l, j in zip(jl, jobs)])
    ex.gauge("fusearray_job_done_bytes", "bytes a job has done", [
        (l, j.done_bytes) for l, j in zip(jl, jobs)])
    ex.gauge("fusearray_job_total_bytes", "bytes a job has to do", [
        (l, j.total_bytes) for l, j in zip(jl, jobs)])
    states: dict = {}
    for j in jobs:
        states[j.state] = states.get(j.state, 0) + 1
    ex.gauge("fusearray_jobs", "jobs kept, by state",
             [((("state", s),), n) for s, n in sorted(states.items())])
    return ex.text()


def job_ratio(job) -> float:
    """done/total, never below the percent ctl/jobs/ID shows (which holds
    across a restart); 1 once done."""
    if job.state == "done":
        return 1.0
    ratio = job.done_bytes / job.total_bytes if job.total_bytes else 0.0
    return min(1.0, max(ratio, job.percent / 100))


# ---- reading an exposition back (fusearray iostat) --------------------------------
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = re.compile(r"\\(.)")


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def parse(text: str) -> dict:
    """The samples of an exposition: {(name, ((label, value), ...) sorted):
    float}. Comments, blank and malformed lines are skipped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, body, value = m.groups()
        labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(body or "")))
        try:
            out[(name, labels)] = float(value)
        except ValueError:
            continue
    return out


# ---- fusearray iostat -------------------------------------------------------------------
#: (group, column, how the value is shown)
COLUMNS = (("capacity", "alloc", "bytes"), ("capacity", "free", "bytes"),
           ("operations", "read", "count"), ("operations", "write", "count"),
           ("bandwidth", "read", "bytes"), ("bandwidth", "write", "bytes"),
           ("latency", "read", "ns"), ("latency", "write", "ns"),
           ("fsync", "ops", "count"), ("fsync", "wait", "ns"),
           ("cache", "hit%", "pct"), ("dedup", "hits", "count"))


def _nice(n: float, base: int = 1024) -> str:
    """zpool's style, three significant digits: 0, 12, 1.50K, 4M, 12.3G."""
    n = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < base or unit == "P":
            if not unit or n == int(n):
                return f"{n:.0f}{unit}"
            return f"{n:.{2 if abs(n) < 10 else 1 if abs(n) < 100 else 0}f}{unit}"
        n /= base
    return str(n)


def _time(ns: float | None) -> str:
    if ns is None:
        return "-"
    for unit, scale in (("ns", 1), ("us", 1e3), ("ms", 1e6)):
        if ns < 1000 * scale:
            v = ns / scale
            return f"{v:.1f}{unit}" if v < 10 and unit != "ns" else f"{v:.0f}{unit}"
    v = ns / 1e9
    return f"{v:.1f}s" if v < 10 else f"{v:.0f}s"


def _cell(kind: str, v, parsable: bool) -> str:
    if v is None:
        return "-"
    if parsable:
        return f"{v:.0f}" if kind != "pct" else f"{v:.1f}"
    if kind == "bytes":
        return _nice(v)
    if kind == "count":
        return _nice(v, 1000) if v >= 1000 else (f"{v:.0f}" if v == int(v) or v >= 10
                                                 else f"{v:.1f}")
    if kind == "ns":
        return _time(v)
    return f"{v:.0f}%"


def _get(s: dict, name: str, labels) -> float:
    return s.get((name, labels), 0.0)


def _row(cur: dict, prev: dict | None, prefix: str, labels, alloc, free,
         seconds: float | None) -> list:
    """The values of one row: totals (seconds None) or per-second rates."""
    def d(name):
        n = prefix_name(prefix, name)
        return _get(cur, n, labels) - (_get(prev, n, labels) if prev else 0.0)

    def rate(name):
        v = d(name)
        return v if seconds is None else v / seconds

    def lat(kind):
        n = d(_lat(kind) + "_count")
        return d(_lat(kind) + "_sum") * 1e9 / n if n else None
    hits, misses = d("fusearray_cache_hits_total"), d("fusearray_cache_misses_total")
    return [alloc, free, rate("fusearray_lun_read_ops_total"),
            rate("fusearray_lun_write_ops_total"), rate("fusearray_lun_read_bytes_total"),
            rate("fusearray_lun_write_bytes_total"), lat("read"), lat("write"),
            rate("fusearray_fsync_total"), lat("fsync"),
            100.0 * hits / (hits + misses) if hits + misses else None,
            rate("fusearray_dedup_hits_total")]


def _lat(kind: str) -> str:
    return ("fusearray_fsync_latency_seconds" if kind == "fsync"
            else f"fusearray_lun_{kind}_latency_seconds")


def prefix_name(prefix: str, name: str) -> str:
    return pack_name(name) if prefix == "pack" else name


def iostat(cur: dict, prev: dict | None = None, seconds: float | None = None,
           parsable: bool = False) -> str:
    """One report, as `zpool iostat -v`: a header, then each pack and,
    indented under it, its LUNs and shadow copies. Totals since the mount
    (`prev` None and `seconds` None), or per-second rates over `seconds`
    since `prev` (with `prev` None: since the mount)."""
    packs = sorted(labels[0][1] for (name, labels) in cur
                   if name == "fusearray_pack_capacity_bytes")
    vols: dict = {}
    for (name, labels) in cur:
        if name == "fusearray_lun_size_bytes":
            lab = dict(labels)
            vols.setdefault(lab["pack"], []).append((lab["lun"], labels))
    rows = []
    for p in packs:
        pl = (("pack", p),)
        used = _get(cur, "fusearray_pack_used_bytes", pl)
        rows.append((p, _row(cur, prev, "pack", pl, used,
                             _get(cur, "fusearray_pack_free_bytes", pl), seconds)))
        for lun, labels in sorted(vols.get(p, []), key=lambda x: ("/" in x[0], x[0])):
            alloc = _get(cur, "fusearray_lun_allocated_bytes", labels)
            size = _get(cur, "fusearray_lun_size_bytes", labels)
            rows.append(("  " + lun, _row(cur, prev, "lun", labels, alloc,
                                          max(size - alloc, 0), seconds)))
    cells = [[name] + [_cell(kind, v, parsable) for (_, _, kind), v in zip(COLUMNS, vals)]
             for name, vals in rows]
    widths = [max([len("name"), 10] + [len(c[0]) for c in cells])]
    for i, (_, col, _) in enumerate(COLUMNS, 1):
        widths.append(max([len(col), 5] + [len(c[i]) for c in cells]))
    # group titles centred over their columns
    top = [" " * widths[0]]
    i = 1
    while i <= len(COLUMNS):
        group = COLUMNS[i - 1][0]
        j = i
        while j <= len(COLUMNS) and COLUMNS[j - 1][0] == group:
            j += 1
        span = sum(widths[i:j]) + 2 * (j - i - 1)
        top.append(group.center(span) if len(group) <= span else group[:span])
        i = j
    lines = ["  ".join(top).rstrip(),
             "  ".join([f"{'name':<{widths[0]}}"] + [f"{c:>{w}}" for (_, c, _), w in
                                                     zip(COLUMNS, widths[1:])]),
             "  ".join("-" * w for w in widths)]
    for c in cells:
        lines.append("  ".join([f"{c[0]:<{widths[0]}}"] + [f"{v:>{w}}" for v, w in
                                                         zip(c[1:], widths[1:])]))
    lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


# ---- the HTTP endpoint (mount --metrics-port N) -------------------------------------
#: The longest request head read, and how long a client may take to send it.
HTTP_HEAD_MAX = 8192
HTTP_TIMEOUT = 10.0


async def serve_http(render, port: int, task_status=None) -> None:
    """Serve `render()` (ctl/metrics's text) at http://127.0.0.1:PORT/metrics
    (and /), HTTP/1.0, one request per connection, from trio tasks of the
    caller's nursery: the rendering runs on the trio thread between two
    requests, as a read of ctl/metrics does. Binding fails with OSError
    before `task_status.started(port)` (the port is taken). A client's
    error or silence ends its connection only (after HTTP_TIMEOUT)."""
    import logging

    import trio
    log = logging.getLogger("fusearray")
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    if task_status is not None:
        task_status.started(listeners[0].socket.getsockname()[1])

    async def client(stream) -> None:
        try:
            with trio.move_on_after(HTTP_TIMEOUT):
                await _answer(stream, render)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass                    # the client went away
        except Exception:           # a bug: never let it end the daemon
            log.exception("metrics endpoint: unexpected error answering a request")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    await trio.serve_listeners(client, listeners)


async def _answer(stream, render) -> None:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > HTTP_HEAD_MAX:
            return await _send(stream, 431, "Request Header Fields Too Large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        head += chunk
    words = head.split(b"\n", 1)[0].split()
    if len(words) < 2:
        return await _send(stream, 400, "Bad Request")
    method, path = words[0], words[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return await _send(stream, 405, "Method Not Allowed", extra="Allow: GET, HEAD\r\n")
    if path not in (b"/metrics", b"/"):
        return await _send(stream, 404, "Not Found")
    await _send(stream, 200, "OK", render(), CONTENT_TYPE, head_only=method == b"HEAD")


async def _send(stream, code: int, reason: str, body: bytes | None = None,
                ctype: str = "text/plain; charset=utf-8", head_only: bool = False,
                extra: str = "") -> None:
    if body is None:
        body = f"{code} {reason}\n".encode()
    head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode()
    await stream.send_all(head if head_only else head + body)
