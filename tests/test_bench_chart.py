"""tools/bench's chart (tools/benchmarks/chart.py), from a small fake
result set holding every kind of row the bench makes: a target group's
rows with goals against the peers, a bound on a ratio of fusearray's own,
a bound in ms, values that failed, and a metric table (the groups with an
array of their own) with ratio measurements over one and several columns.
No FUSE, no bench run."""
import os
import sys
import xml.etree.ElementTree as ET

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

from benchmarks.arrays import Metric, MetricTable  # noqa: E402
from benchmarks.chart import panels, write_chart  # noqa: E402
from benchmarks.common import Row  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def fake_results():
    peers = {"file": 100.0, "memfile": 50.0, "qemu-raw": 40.0, "qemu-qcow2": 20.0}
    fio = [Row("rand write 4k", "IOPS", {**peers, "fusearray": 10.0},
               goals=[("memfile", 0.6), ("qemu-qcow2", 1.0)]),
           Row("seq read 1M", "MB/s", {**peers, "fusearray": 60.0}, goals=[("memfile", 0.7)]),
           Row("rand read 4k QD32 libaio", "IOPS", {**peers, "fusearray": "failed"},
               goals=[("qemu-qcow2", 1.0)]),
           Row("no peers measured", "IOPS", {"fusearray": 5.0, "memfile": "failed"})]
    steady = [Row("overwrites / first pass", "x", {"fusearray": 2.5, "qemu-qcow2": 1.1},
                  bounds=[(">=", 1.0)]),
              Row("longest write stall, overwrites (clat max)", "ms",
                  {"fusearray": 150.0, "file": 3.0}, bounds=[("<=", 100)])]
    snap = MetricTable({"small": "1G LUN", "big": "1T thin LUN"}, [
        Metric("snapshot (differential), median of 3", "ms", {"small": [1.2], "big": [1.3]},
               goal="<= 10 ms each"),
        Metric("background copy / seq write 1M", "x", {"small": [0.7, 0.8, 0.75]},
               goal=">= 0.5x", verdict="PASS")])
    packs = MetricTable({"mirror": "mirror", "raid5": "raid5"}, [
        Metric("seq write / single, pass by pass", "x",
               {"mirror": [0.8, 0.9], "raid5": [0.4, 0.45]}, goal=">= 0.5x"),
        Metric("rebuild / cp -a", "x", {"mirror": "failed", "raid5": [2.0]}, goal=">= 0.5x")])
    transport = MetricTable({"full": "full"}, [
        Metric("import into a new array / seq read", "x", {"full": [0.3]})])
    return [("steady overwrites, on tmpfs", steady),
            ("fio, O_DIRECT on the file, on tmpfs", fio),
            ("shadow copies: snapshot and resync", snap),
            ("packs: mirror and raid5", packs),
            ("transport: export and import", transport),
            ("a table without any ratio", [Row("x", "IOPS", {"file": 1.0})])]


def test_every_row_kind_becomes_its_bars():
    got = dict(panels(fake_results()))
    assert list(got) == ["steady overwrites, on tmpfs", "fio, O_DIRECT on the file, on tmpfs",
                         "shadow copies: snapshot and resync", "packs: mirror and raid5",
                         "transport: export and import"]      # the table with no ratio: none
    steady = got["steady overwrites, on tmpfs"]
    # a ratio or a latency is not compared with the peers (it would read the
    # wrong way): only its bound is drawn
    assert steady == [("overwrites / first pass", "own", 2.5, 1.0, ">="),
                      ("longest write stall, overwrites (clat max) / 100 ms limit", "own",
                       1.5, 1.0, "<=")]
    fio = got["fio, O_DIRECT on the file, on tmpfs"]
    assert [(b[0], b[1], round(b[2], 3), b[3]) for b in fio if b[0] == "rand write 4k"] == [
        ("rand write 4k", "memfile", 0.2, 0.6), ("rand write 4k", "file", 0.1, None),
        ("rand write 4k", "qemu-raw", 0.25, None), ("rand write 4k", "qemu-qcow2", 0.5, 1.0)]
    assert not [b for b in fio if b[0] in ("rand read 4k QD32 libaio", "no peers measured")]
    assert got["shadow copies: snapshot and resync"] == [
        ("background copy / seq write 1M (1G LUN)", "own", 0.75, 0.5, ">=")]
    assert [(a, b, round(r, 3), g, op) for a, b, r, g, op in got["packs: mirror and raid5"]] == [
        ("seq write / single, pass by pass (mirror)", "own", 0.85, 0.5, ">="),
        ("seq write / single, pass by pass (raid5)", "own", 0.425, 0.5, ">="),
        ("rebuild / cp -a (raid5)", "own", 2.0, 0.5, ">=")]
    assert got["transport: export and import"] == [
        ("import into a new array / seq read", "own", 0.3, None, ">=")]


def test_the_chart_is_a_valid_svg_with_every_bar(tmp_path):
    path = tmp_path / "bench.svg"
    n = write_chart(str(path), fake_results(), "tools/bench --fake (a test)")
    assert n == sum(len(b) for _, b in panels(fake_results())) == 15
    root = ET.parse(path).getroot()                 # well-formed XML
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width").removesuffix("pt")) > 100
    text = " ".join("".join(t.itertext()) for t in root.iter(f"{SVG}text"))
    for word in ("rand write 4k", "overwrites / first pass", "rebuild / cp -a (raid5)",
                 "fusearray / qemu-qcow2", "0.50x  >= 1: FAIL", "2.50x  >= 1: PASS",
                 "1.50x  <= 1: FAIL", "tools/bench --fake (a test)"):
        assert word in text, word
    # the same numbers draw the same file (it is committed as docs/bench.svg)
    again = tmp_path / "again.svg"
    write_chart(str(again), fake_results(), "tools/bench --fake (a test)")
    assert again.read_bytes() == path.read_bytes()


def test_a_run_with_no_ratio_still_draws(tmp_path):
    path = tmp_path / "empty.svg"
    assert write_chart(str(path), [("only the file", [Row("x", "IOPS", {"file": 1.0})])]) == 0
    assert ET.parse(path).getroot().tag == f"{SVG}svg"
