"""I/O counters (#18 point 3): the histograms and the Prometheus text
rendering without FUSE, then a real mount: a known workload moves
ctl/metrics by exactly the right amounts, `fusearray iostat` shows them
per pack and per LUN, and the optional HTTP endpoint serves the same text.

The exposition is checked with the Prometheus project's own parser
(prometheus_client, in the test extra only: the daemon does not use it)."""
import errno
import os
import socket
import subprocess
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fusearray import metrics
from fusearray.metrics import BOUNDS_NS, LE, Exposition, IoStats, Metrics

from conftest import PY, cli, run, wait_for
from fallbacks import INTERPOSER, fallocate_punch

KiB, MiB = 1024, 1024 * 1024


def families(text: str) -> dict:
    """{family name: Metric} as prometheus_client parses `text`."""
    return {f.name: f for f in text_string_to_metric_families(text)}


# ---- units ------------------------------------------------------------------------
def test_histogram_buckets_are_fixed_log_scale_plain_ints():
    assert BOUNDS_NS[0] == 1000 and BOUNDS_NS[-1] == 10 ** 10
    assert all(b > a for a, b in zip(BOUNDS_NS, BOUNDS_NS[1:]))
    assert LE[:4] == ("0.000001", "0.000002", "0.000005", "0.00001")
    assert LE[-3:] == ("5", "10", "+Inf") and len(LE) == len(BOUNDS_NS) + 1
    s = IoStats()
    # a bound itself is in its bucket (le: less than or equal); above the last: +Inf
    for ns in (0, 1000, 1001, 99_999, 100_000, 10 ** 10, 10 ** 10 + 1, 10 ** 12):
        s.read(4096, ns)
    h = s.read_hist
    assert all(type(n) is int for n in h)
    assert h[0] == 2 and h[1] == 1                  # 0 and 1 us; 1001 ns
    assert h[LE.index("0.0001")] == 2               # 99.999 us and 100 us
    assert h[LE.index("10")] == 1 and h[-1] == 2    # 10 s; above it
    assert sum(h) == s.read_ops == 8 and s.read_bytes == 8 * 4096
    assert s.read_ns == sum((0, 1000, 1001, 99_999, 100_000, 10 ** 10, 10 ** 10 + 1, 10 ** 12))
    s.write(65536, 5000)
    s.fsync(2_000_000)
    assert s.write_hist[LE.index("0.000005")] == 1 and s.fsync_hist[LE.index("0.002")] == 1
    t = IoStats()
    t.add(s)
    t.add(s)
    assert t.read_ops == 16 and t.read_hist == [2 * n for n in h] and t.fsync_ops == 2
    assert s.read_ops == 8                          # add() leaves its argument alone


def test_exposition_parses_with_escaped_labels_and_cumulative_buckets():
    s = IoStats()
    for ns in (500, 3000, 3000, 2 * 10 ** 9):
        s.read(65536, ns)
    s.cache_hits, s.dedup_hits = 3, 1
    odd = 'a"b\\c\nd'                               # not a LUN name, but be safe
    ex = Exposition()
    metrics.io_families(ex, [((("lun", odd), ("pack", "main")), s),
                             ((("lun", "set1/db"), ("pack", "main")), IoStats())], "lun")
    ex.gauge("fusearray_start_time_seconds", "help with \\ and\nnewline", [((), 1.5)])
    text = ex.text().decode()
    fams = families(text)
    lat = fams["fusearray_lun_read_latency_seconds"]
    assert lat.type == "histogram"
    mine = [x for x in lat.samples if x.labels.get("lun") == odd]
    buckets = [x for x in mine if x.name.endswith("_bucket")]
    assert len(buckets) == len(LE) and buckets[-1].labels["le"] == "+Inf"
    assert [float(x.labels["le"]) for x in buckets[:-1]] == [float(le) for le in LE[:-1]]
    counts = [x.value for x in buckets]
    assert counts == sorted(counts) and counts[-1] == 4          # cumulative, +Inf = count
    assert {x.name: x.value for x in mine if not x.name.endswith("_bucket")} == {
        "fusearray_lun_read_latency_seconds_count": 4,
        "fusearray_lun_read_latency_seconds_sum": pytest.approx(2.0000065)}
    by_le = {x.labels["le"]: x.value for x in buckets}
    assert by_le[[k for k in by_le if float(k) == 1e-06][0]] == 1
    assert by_le[[k for k in by_le if float(k) == 5e-06][0]] == 3
    assert by_le[[k for k in by_le if float(k) == 2][0]] == 4
    ops = fams["fusearray_lun_read_ops"]                      # the parser drops _total
    assert ops.type == "counter"
    assert {x.labels["lun"]: x.value for x in ops.samples} == {odd: 4, "set1/db": 0}
    assert fams["fusearray_cache_hits"].samples[0].value == 3
    assert fams["fusearray_dedup_hits"].samples[0].value == 1
    assert fams["fusearray_start_time_seconds"].documentation == "help with \\ and\nnewline"
    # our own reader (fusearray iostat's) agrees, labels unescaped
    ours = metrics.parse(text)
    assert ours[("fusearray_lun_read_ops_total", (("lun", odd), ("pack", "main")))] == 4
    assert ours[("fusearray_lun_read_latency_seconds_bucket",
                 (("le", "+Inf"), ("lun", odd), ("pack", "main")))] == 4
    # per pack: the same families under fusearray_pack_
    ex = Exposition()
    metrics.io_families(ex, [((("pack", "main"),), s)], "pack")
    fams = families(ex.text().decode())
    assert fams["fusearray_pack_read_ops"].samples[0].value == 4
    assert fams["fusearray_pack_cache_hits"].samples[0].value == 3
    assert "fusearray_pack_fsync_latency_seconds" in fams
    assert metrics.pack_name("fusearray_fsync_total") == "fusearray_pack_fsync_total"


def test_pack_totals_keep_the_counts_of_forgotten_volumes():
    pack = types.SimpleNamespace(name="main")
    a = types.SimpleNamespace(pack=pack, stats=IoStats())
    b = types.SimpleNamespace(pack=types.SimpleNamespace(name="fast"), stats=IoStats())
    a.stats.write(4096, 10)
    b.stats.read(512, 10)
    m = Metrics()
    before = m.pack_totals([a, b])
    m.retire(a)                                     # deleted: gone from the table
    after = m.pack_totals([b])
    assert before["main"].write_ops == after["main"].write_ops == 1
    assert after["fast"].read_ops == 1


# ---- a real mount -----------------------------------------------------------------
def samples(m) -> dict:
    return metrics.parse(m.view("metrics"))


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def dd(*args):
    run(["dd", *args, "status=none"])


def check_histograms(text: str) -> None:
    """Every histogram: buckets cumulative, +Inf = _count."""
    for fam in text_string_to_metric_families(text):
        if fam.type != "histogram":
            continue
        series: dict = {}       # labels but le -> suffix -> samples
        for x in fam.samples:
            key = tuple(sorted((k, v) for k, v in x.labels.items() if k != "le"))
            series.setdefault(key, {}).setdefault(x.name.removeprefix(fam.name), []).append(x)
        assert series, fam.name
        for key, parts in series.items():
            counts = [x.value for x in parts["_bucket"]]
            assert counts == sorted(counts), (fam.name, key)
            assert parts["_bucket"][-1].labels["le"] == "+Inf"
            assert counts[-1] == parts["_count"][0].value, (fam.name, key)


def iostat_rows(text: str) -> dict:
    """`fusearray iostat -p`'s rows: {name (indent kept): [fields]}."""
    rows = {}
    for line in text.splitlines()[3:]:
        if line.startswith("-") or not line.strip():
            continue
        name = line[:len(line) - len(line.lstrip())] + line.split()[0]
        rows[name] = line.split()[1:]
    return rows


def test_a_known_workload_moves_the_counters_by_exactly_its_amounts(mount, tmp_path):
    m = mount
    m.ok("create", "db 64M")
    m.ok("create", "tmp 16M")
    lun = m.path("luns", "db")
    s0 = samples(m)
    L = {"lun": "db", "pack": "main"}

    # 4 MiB in 64 direct writes of 64 KiB: exactly 64 write requests
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 * MiB))
    dd(f"if={src}", f"of={lun}", "bs=64K", "oflag=direct", "conv=notrunc")
    # 1 MiB in 16 direct reads of 64 KiB
    dd(f"if={lun}", "of=/dev/null", "bs=64K", "count=16", "iflag=direct")
    # one fsync
    fd = os.open(lun, os.O_RDWR)
    try:
        os.fsync(fd)
        # the same new 64 KiB block at two places: one is a dedup hit
        block = os.urandom(64 * KiB)
        assert os.pwrite(fd, block, 8 * MiB) == 64 * KiB
        assert os.pwrite(fd, block, 16 * MiB) == 64 * KiB
        # a write past the end: ENOSPC, counted as a failed write
        with pytest.raises(OSError) as e:
            os.pwrite(fd, block, 64 * MiB)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    m.ok("sync", "all")         # every block written back: dedup decided
    s1 = samples(m)
    d = lambda name, **kw: delta(s1, s0, name, **(kw or L))     # noqa: E731
    assert d("fusearray_lun_write_ops_total") == 64 + 2
    assert d("fusearray_lun_write_bytes_total") == 4 * MiB + 2 * 64 * KiB
    assert d("fusearray_lun_write_errors_total") == 1
    assert d("fusearray_lun_read_ops_total") == 16
    assert d("fusearray_lun_read_bytes_total") == 1 * MiB
    assert d("fusearray_lun_read_errors_total") == 0
    assert d("fusearray_fsync_total") == 1
    assert d("fusearray_fsync_latency_seconds_count") == 1
    assert d("fusearray_fsync_latency_seconds_sum") > 0
    # each block read is served by the cache or read from the pack
    assert d("fusearray_cache_hits_total") + d("fusearray_cache_misses_total") == 16
    assert d("fusearray_writeback_blocks_total") == 64 + 2
    assert d("fusearray_dedup_hits_total") == 1
    assert d("fusearray_lun_write_latency_seconds_count") == 66
    assert d("fusearray_lun_read_latency_seconds_count") == 16
    assert d("fusearray_lun_write_latency_seconds_sum") > 0
    # nothing moved on the other LUN; the pack's counters are its LUNs'
    assert d("fusearray_lun_write_ops_total", lun="tmp", pack="main") == 0
    P = {"pack": "main"}
    for name in ("read_ops", "write_ops", "read_bytes", "write_bytes", "fsync",
                 "cache_hits", "cache_misses", "dedup_hits", "writeback_blocks"):
        lun_name = (f"fusearray_{name}_total" if name in ("fsync", "cache_hits",
                                                          "cache_misses", "dedup_hits",
                                                          "writeback_blocks")
                    else f"fusearray_lun_{name}_total")
        assert d(f"fusearray_pack_{name}_total", **P) == d(lun_name), name
    assert s1[("fusearray_lun_allocated_bytes", (("lun", "db"), ("pack", "main")))] \
        == 4 * MiB + 2 * 64 * KiB
    text = m.view("metrics")
    check_histograms(text)

    # fusearray iostat: the pack, then its LUNs indented, with these totals
    out = cli("iostat", "-p", mnt=m.mnt).stdout
    assert out.splitlines()[1].split()[:5] == ["name", "alloc", "free", "read", "write"]
    rows = iostat_rows(out)
    assert list(rows) == ["main", "  db", "  tmp"], out
    for name in ("main", "  db"):
        alloc, free, r, w, rb, wb, rlat, wlat, fs, fslat, hit, dedup = rows[name]
        assert (r, w, rb, wb, fs, dedup) == ("16", "66", str(MiB),
                                             str(4 * MiB + 128 * KiB), "1", "1"), out
        assert int(rlat) > 0 and int(wlat) > 0 and int(fslat) > 0
    assert rows["  db"][:2] == [str(4 * MiB + 128 * KiB), str(60 * MiB - 128 * KiB)]
    assert rows["  tmp"][2:6] == ["0", "0", "0", "0"] and rows["  tmp"][6] == "-"
    human = cli("iostat", mnt=m.mnt).stdout
    assert "  db " in human and "4.12M" in human and "1M" in human, human

    # a shadow copy counts as a volume (read side), named SET/NAME
    m.ok("snapshot", "db set=s1")
    s2 = samples(m)
    dd(f"if={m.path('snapshots', 's1', 'db')}", "of=/dev/null", "bs=64K", "count=2",
       "iflag=direct")
    s3 = samples(m)
    S = {"lun": "s1/db", "pack": "main"}
    assert delta(s3, s2, "fusearray_lun_read_ops_total", **S) == 2
    assert delta(s3, s2, "fusearray_lun_read_bytes_total", **S) == 128 * KiB
    assert delta(s3, s2, "fusearray_cache_hits_total", **S) \
        + delta(s3, s2, "fusearray_cache_misses_total", **S) == 2
    assert delta(s3, s2, "fusearray_pack_read_ops_total", pack="main") == 2
    assert "  s1/db" in iostat_rows(cli("iostat", "-p", mnt=m.mnt).stdout)

    # a discard (punch-hole) is counted; without the interposer it is refused
    fd = os.open(lun, os.O_RDWR)
    try:
        err = fallocate_punch(fd, 8 * MiB, 64 * KiB)
    finally:
        os.close(fd)
    s4 = samples(m)
    if INTERPOSER:
        assert err == 0
        assert delta(s4, s3, "fusearray_lun_discard_ops_total", **L) == 1
        assert delta(s4, s3, "fusearray_lun_discard_bytes_total", **L) == 64 * KiB
    else:
        assert err == errno.EOPNOTSUPP
        assert delta(s4, s3, "fusearray_lun_discard_ops_total", **L) == 0

    # a deleted LUN's counts stay in its pack's; its collection is counted
    fd = os.open(m.path("luns", "tmp"), os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(64 * KiB), 0)
    finally:
        os.close(fd)
    m.ok("sync", "all")
    s5 = samples(m)
    assert delta(s5, s4, "fusearray_pack_write_ops_total", pack="main") == 1
    m.ok("delete", "tmp")
    s6 = samples(m)
    assert ("fusearray_lun_write_ops_total", (("lun", "tmp"), ("pack", "main"))) not in s6
    for name in ("write_ops", "write_bytes", "writeback_blocks", "read_ops"):
        key = (f"fusearray_pack_{name}_total", (("pack", "main"),))
        assert s6[key] == s5[key], name
    assert delta(s6, s5, "fusearray_gc_runs_total", kind="collect") >= 1
    assert delta(s6, s5, "fusearray_gc_freed_bytes_total", pack="main") >= 64 * KiB
    assert s6[("fusearray_gc_last_run_timestamp_seconds", ())] > 0

    # a job's progress
    jid = m.ok("scrub", "main")["job"]
    m.wait_job(jid)
    s7 = samples(m)
    J = (("job", str(jid)), ("kind", "scrub"))
    assert s7[("fusearray_job_progress_ratio", J)] == 1.0
    assert s7[("fusearray_job_done_bytes", J)] == s7[("fusearray_job_total_bytes", J)]
    check_histograms(m.view("metrics"))


def test_iostat_with_an_interval_prints_rates(mount):
    m = mount
    m.ok("create", "db 16M")
    dd("if=/dev/urandom", f"of={m.path('luns', 'db')}", "bs=64K", "count=16",
       "oflag=direct", "conv=notrunc")
    r = cli("iostat", "-w", "0.5", "2", mnt=m.mnt)
    assert r.returncode == 0
    reports = r.stdout.split("\n\n")
    assert len(reports) == 2, r.stdout
    for rep in reports:
        assert list(iostat_rows(rep)) == ["main", "  db"], rep
    # the second covers the interval, with no I/O in it
    assert iostat_rows(reports[1])["  db"][2:6] == ["0", "0", "0", "0"], reports[1]
    assert iostat_rows(reports[0])["  db"][3] != "0"        # writes/s since the mount
    bad = cli("iostat", "3", check=False, mnt=m.mnt)
    assert bad.returncode == 2 and "COUNT needs -w" in bad.stderr
    bad = cli("iostat", "-w", "0", check=False, mnt=m.mnt)
    assert bad.returncode == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[str, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body


def test_metrics_over_http_on_loopback(make_mount):
    m = make_mount()
    port = _free_port()
    m.init().start("--metrics-port", str(port))
    m.ok("create", "db 16M")
    head, body = _http_get(port)
    assert head.startswith("HTTP/1.0 200") and "text/plain; version=0.0.4" in head, head
    fams = families(body.decode())
    assert "fusearray_lun_write_ops" in fams and "fusearray_pack_read_latency_seconds" in fams
    assert f"Content-Length: {len(body)}" in head
    assert _http_get(port, "/nothing")[0].startswith("HTTP/1.0 404")
    head, body = _http_get(port, method="HEAD")
    assert head.startswith("HTTP/1.0 200") and body == b""
    assert _http_get(port, method="POST")[0].startswith("HTTP/1.0 405")
    # a client that connects and says nothing, or hangs up mid-request,
    # does not disturb the mount
    quiet = socket.create_connection(("127.0.0.1", port))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /met")
    assert os.listdir(m.path("luns")) == ["db"]
    assert _http_get(port)[0].startswith("HTTP/1.0 200")
    quiet.close()
    # a port that is taken: the mount fails and says why
    m2 = make_mount("b")
    with pytest.raises(AssertionError, match="metrics"):
        m2.init().start("--metrics-port", str(port))
    m.stop()
    wait_for(lambda: subprocess.run([PY, "-c", f"import socket; socket.create_connection("
                                     f"('127.0.0.1', {port}), timeout=1)"],
                                    capture_output=True).returncode != 0,
             what="the metrics port closed with the mount")
