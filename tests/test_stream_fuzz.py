"""Fuzzing import streams (issue 13 (b), defects 4, 11, 12, 13, 19).

A real export of a small set (two volumes, one with a short last block) is
mutated by Hypothesis: header fields replaced by hostile values (sizes,
block sizes, heights, counts, names, WWNs, text with control characters,
deep JSON, wrong types), fields dropped or added, records dropped,
duplicated, reordered, cut, flipped, retyped or resized, with the hash
chain recomputed or not (so both the validator and the checks behind the
chain are reached). Every case checks that
- the import succeeds, or fails with a clean error: an ArrayError whose
  errno is one a user can act on and whose message is never an internal
  error;
- nothing is left behind: no staging set, no volume, no active import job,
  the pack holds the same blocks as before (what was staged is reclaimed);
- the array still takes commands: a write and a sync on a LUN.

Most cases run in process against the parser and validator (fast, many
examples); a smaller number go through a real mount, by ctl/import and by
the `fusearray import` CLI over the stream socket, checking the errno,
the reply, that the daemon lives, ctl/status.json's sets and LUNs, and a
write + fsync on a LUN file.

CI runs a fixed, derandomized budget; FUSEARRAY_LONG=1 (or
tools/fuzz-streams) runs many more. Each test prints the cases it ran.
"""
import contextlib
import errno
import json
import os
import random
import struct
import threading

import pytest
import trio
import xxhash
from hypothesis import HealthCheck, given, settings, strategies as st

from fusearray import ctlclient
from conftest import PY, run

MiB = 1 << 20
LONG = os.environ.get("FUSEARRAY_LONG") == "1"
REC = struct.Struct("<cI")
MAGIC = b"FASTRM\x00\x02"
CLEAN = {errno.EINVAL, errno.EIO, errno.EEXIST, errno.ENOENT, errno.ENOSPC,
         errno.EOPNOTSUPP}
COUNTS: dict = {}


def budget(ci: int, long: int) -> settings:
    return settings(max_examples=long if LONG else ci, deadline=None, derandomize=not LONG,
                    database=None, suppress_health_check=list(HealthCheck))


# ---- the stream, record by record (docs/stream-format.md) ------------------------------
def split(stream: bytes) -> list[tuple[bytes, bytes]]:
    assert stream[:8] == MAGIC
    out, pos = [], 8
    while pos < len(stream):
        typ, n = REC.unpack_from(stream, pos)
        out.append((typ, stream[pos + 5:pos + 5 + n]))
        pos += 5 + n
    return out


def join(records, rechain: bool = True) -> bytes:
    """Frame `records`; with `rechain` the trailer gets the chain and
    counts of what is sent (as a careful forger would)."""
    chain, n, blocks = bytes(16), 0, 0
    out = [MAGIC]
    for typ, payload in records:
        if typ == b"T" and rechain:
            payload = json.dumps({"records": n, "blocks": blocks,
                                  "chain": chain.hex()}).encode()
        out.append(REC.pack(typ, len(payload)) + payload)
        if typ != b"T":
            chain = xxhash.xxh3_128_digest(chain + typ + (payload[:16] if typ == b"B"
                                                          else payload))
            n += 1
            blocks += typ == b"B"
    return b"".join(out)


def with_header(records, header) -> list:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return [(b"H", body)] + records[1:]


# ---- hostile values ----------------------------------------------------------------------
def deep(n: int) -> str:
    return "[" * n + "]" * n


HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 3, 511, 513, 4095, 4097, 3 << 20, 256 << 20, 1 << 40, 2 ** 64,
                     10 ** 30, 1000, 7, 6, 5, 0.5, 1e308, float("inf"), float("nan"),
                     True, False, None, "", " ", "\n", "a\nb", "\x1b[31mred\x1b[0m",
                     "naa.6" + "0" * 30 + "\n", "naa.6" + "F" * 31, "naa.6" + "g" * 31,
                     "١٢٣", "x" * 65, "x" * 5000, "../etc", "a/b", ".hidden", "plex",
                     "differential", "full", "incremental", [], {}, [1, 2], {"a": 1}]),
    st.integers(), st.floats(allow_nan=True), st.text(max_size=80), st.booleans(),
    st.lists(st.integers(), max_size=3),
)

FIELDS = ["format", "kind", "set", "set.name", "set.created", "base", "base.name",
          "base.wwns", "volumes", "total_bytes", "source", "source.array", "extra"] + \
    [f"volumes.{i}.{k}" for i in (0, 1) for k in
     ("name", "size", "block_size", "height", "wwn", "serial", "origin", "context",
      "readonly", "hidden", "diff", "extra")] + ["volumes.0", "volumes.1"]


def mutate_header(header: dict, path: str, value, how: str) -> dict:
    h = json.loads(json.dumps(header))
    *parents, key = path.split(".")
    obj = h
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj.get(p)
        if obj is None:
            return h
    if isinstance(obj, list):
        key = int(key)
        if key >= len(obj):
            return h
    if how == "drop":
        if isinstance(obj, list):
            obj.pop(key)
        else:
            obj.pop(key, None)
    elif how == "dup" and isinstance(obj, list):
        obj.append(obj[key])
    else:
        obj[key] = value
    return h


# ---- the receiving array, in process (a trio loop in a thread) ---------------------------
class Arrays:
    """Arrays a (the sender) and b (the receiver) opened in a trio loop
    that runs in its own thread, so Hypothesis's synchronous test bodies
    can run coroutines there (trio.from_thread)."""

    def __init__(self, tmp):
        from fusearray.array import init_array
        self.tmp = tmp
        init_array(str(tmp / "a"))
        init_array(str(tmp / "b"))
        self.token = None
        self.ready = threading.Event()
        self.stop = None
        self.failed = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(60)
        if self.failed:
            raise self.failed

    def _run(self):
        try:
            trio.run(self._main)
        except BaseException as e:        # re-raised by the test
            self.failed = e
            self.ready.set()

    async def _main(self):
        from fusearray.array import Array
        self.stop = trio.Event()
        async with trio.open_nursery() as n:
            self.a, self.b = Array(str(self.tmp / "a"), 8 * MiB), Array(str(self.tmp / "b"),
                                                                        8 * MiB)
            await self.a.open(n)
            await self.b.open(n)
            try:
                self.token = trio.lowlevel.current_trio_token()
                self.ready.set()
                await self.stop.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await self.a.close()
                    await self.b.close()
                n.cancel_scope.cancel()

    def call(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def close(self):
        if self.token is not None:
            trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(60)
        if self.failed:
            raise self.failed


async def _make_source(a) -> bytes:
    """Set s1 of LUNs d0 (1 MiB + 512 bytes: a short last block, part
    zero) and d1 (256 KiB, 4K blocks) on array a; its stream."""
    from fusearray import transport
    rng = random.Random(13)
    d0 = await a.create_lun("d0", str(MiB + 512))
    await d0.write(0, rng.randbytes(MiB // 2))
    await d0.write(MiB, rng.randbytes(512))
    d1 = await a.create_lun("d1", "256K", None, 4096)
    await d1.write(0, rng.randbytes(64 << 10))
    await a.snapshot(["d0", "d1"], "s1")
    return b"".join([bytes(p) async for batch in transport.export_stream(a, "s1")
                     for p in batch])


async def _state(b) -> dict:
    """What a refused import must leave as it was."""
    await b.collect_garbage()
    s = b.status()
    return {"sets": sorted(b.sets), "volumes": sorted(b.volumes),
            "luns": [(v["name"], v["wwn"], v["size"]) for v in s["luns"]],
            "blocks": {p["name"]: p["blocks"] for p in s["packs"]},
            "active": [j["id"] for j in s["jobs"] if j["state"] in ("running", "paused",
                                                                   "queued")]}


async def _import(b, stream: bytes, line: str = "", step: int = 0) -> tuple[int, str]:
    """Import `stream` as one write (or in pieces of `step` bytes);
    (0, set name) or (errno, message)."""
    from fusearray import transport
    from fusearray.errors import ArrayError
    try:
        imp = transport.start_import(b, line)
        pieces = [stream] if not step else [stream[i:i + step]
                                           for i in range(0, len(stream), step)]
        for p in pieces:
            await imp.feed(p)
        await imp.end_of_input()
        return 0, imp.as_name or imp.header["set"]["name"]
    except ArrayError as e:
        return e.errno, e.message


async def _undo(b, name: str) -> None:
    await b.delete_shadow(name)


async def _probe(b) -> None:
    """The array still takes changes: a write and a sync, read back."""
    lun = b.luns.get("probe") or await b.create_lun("probe", "1M")
    data = os.urandom(4096)
    await lun.write(4096, data)
    await b.sync(lun)
    assert await lun.read(4096, 4096) == data


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    arr = Arrays(tmp_path_factory.mktemp("fuzz"))
    try:
        arr.source = arr.call(_make_source, arr.a)
        arr.records = split(arr.source)
        arr.header = json.loads(arr.records[0][1])
        arr.call(_probe, arr.b)
        arr.base = arr.call(_state, arr.b)
        yield arr
    finally:
        arr.close()
        print(f"\nstream fuzz cases run: {COUNTS}")


def check_case(arr, stream: bytes, line: str = "", step: int = 0, kind: str = "case") -> int:
    err, msg = arr.call(_import, arr.b, stream, line, step)
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    if err == 0:
        arr.call(_undo, arr.b, msg)
    else:
        assert err in CLEAN, (errno.errorcode.get(err), msg)
        assert "internal error" not in msg and "Traceback" not in msg, msg
    after = arr.call(_state, arr.b)
    assert after == arr.base, (msg, after, arr.base)
    assert not [s for s in arr.b.sets if s.startswith(".")]
    arr.call(_probe, arr.b)
    return err


# ---- in process: many cases ----------------------------------------------------------------
def test_the_unmutated_stream_imports(arrays):
    assert check_case(arrays, arrays.source, kind="valid") == 0
    assert check_case(arrays, arrays.source, step=777, kind="valid") == 0


@budget(300, 20000)
@given(path=st.sampled_from(FIELDS), value=HOSTILE,
       how=st.sampled_from(["set", "set", "set", "drop", "dup"]), rechain=st.booleans())
def test_hostile_header_fields(arrays, path, value, how, rechain):
    h = mutate_header(arrays.header, path, value, how)
    try:
        recs = with_header(arrays.records, h)
    except ValueError:              # a value JSON cannot carry
        return
    check_case(arrays, join(recs, rechain), kind="header fields")


@budget(60, 2000)
@given(body=st.one_of(
    st.integers(1, 200000).map(lambda n: deep(n).encode()),
    st.integers(1, 5000).map(lambda n: ('{"a":' * n + "1" + "}" * n).encode()),
    st.binary(max_size=300),
    st.sampled_from([b"null", b"[]", b"1", b'"x"', b"\xff\xfe", b"{}", b'{"format": 2}',
                     b"NaN", b"1" * 5000])))
def test_hostile_header_bodies(arrays, body):
    check_case(arrays, join(with_header(arrays.records, body)), kind="header bodies")


RECORD_OPS = st.sampled_from(["drop", "dup", "swap", "retype", "resize", "flip", "cut",
                              "insert", "vindex", "bno", "shorten"])


@budget(300, 20000)
@given(op=RECORD_OPS, data=st.data(), rechain=st.booleans())
def test_mutated_records(arrays, op, data, rechain):
    recs = list(arrays.records)
    i = data.draw(st.integers(1, len(recs) - 1), "record")
    typ, payload = recs[i]
    if op == "drop":
        del recs[i]
    elif op == "dup":
        recs.insert(i, recs[i])
    elif op == "swap":
        j = data.draw(st.integers(1, len(recs) - 1), "other")
        recs[i], recs[j] = recs[j], recs[i]
    elif op == "retype":
        recs[i] = (data.draw(st.sampled_from([b"H", b"V", b"B", b"Z", b"T", b"X", b"\0"])),
                   payload)
    elif op == "insert":
        recs.insert(i, (data.draw(st.sampled_from([b"H", b"V", b"B", b"Z"])),
                        data.draw(st.binary(max_size=64))))
    elif op == "vindex":
        recs[i] = (b"V", json.dumps({"index": data.draw(HOSTILE)}).encode())
    elif op == "bno" and len(payload) >= 8:
        bno = data.draw(st.one_of(st.integers(0, 300), st.just(2 ** 64 - 1)))
        recs[i] = (typ, struct.pack("<Q", bno) + payload[8:])
    elif op == "shorten":
        recs[i] = (typ, payload[:data.draw(st.integers(0, max(len(payload) - 1, 0)))])
    stream = join(recs, rechain)
    if op == "flip":
        pos = data.draw(st.integers(0, len(stream) - 1), "pos")
        stream = stream[:pos] + bytes([stream[pos] ^ data.draw(st.integers(1, 255))]) + \
            stream[pos + 1:]
    elif op == "cut":
        stream = stream[:data.draw(st.integers(0, len(stream) - 1), "cut")]
    elif op == "resize":
        pos = len(join(recs[:i], False)) + 1         # the record's length field
        n = data.draw(st.sampled_from([0, 1, 15, 16, 2 ** 20 + 65, 2 ** 32 - 1]))
        stream = stream[:pos] + struct.pack("<I", n) + stream[pos + 4:]
    step = data.draw(st.sampled_from([0, 0, 4093, 65541]), "write size")
    check_case(arrays, stream, step=step, kind="records")


@budget(60, 2000)
@given(line=st.one_of(st.text(max_size=60), st.sampled_from([
    "as=", "as=a/b", "as=s1x\x1b", "pack=", "pack=nope", "pack=INVALID", "remap=maybe",
    "job=1", "resume=yes job=x", "resume=yes job=١", "resume=yes", "bogus=1", "x y",
    "as=s1 as=s2", "as=.hidden"])))
def test_hostile_command_lines(arrays, line):
    """The command line is checked before any stream byte: a refused one
    changes nothing (the valid stream is then imported and removed)."""
    check_case(arrays, arrays.source, line=line, kind="command lines")


# ---- the known defects, named ------------------------------------------------------------
def _vol(arrays, **changes):
    h = json.loads(json.dumps(arrays.header))
    h["volumes"][0].update(changes)
    return join(with_header(arrays.records, h))


@pytest.mark.parametrize("changes, text", [
    ({"height": 1000}, "height"),                                   # defect 4
    ({"block_size": 1 << 40}, "block_size"),                        # defect 11
    ({"block_size": 1}, "block_size"), ({"block_size": 3}, "block_size"),   # defect 12
    ({"block_size": 256 << 20}, "block_size"),
    ({"size": MiB + 511}, "multiple of 512"),
    ({"wwn": "naa.6" + "0" * 30 + "\n"}, "wwn"),
    ({"context": "\x1b[2Jdifferential"}, "context"),
    ({"name": "d1"}, "given twice"),                                # defect 13
])
def test_known_bad_headers_are_refused_before_staging(arrays, changes, text):
    err, msg = arrays.call(_import, arrays.b, _vol(arrays, **changes))
    assert err == errno.EINVAL and text in msg, msg
    assert arrays.call(_state, arrays.b) == arrays.base
    arrays.call(_probe, arrays.b)


def test_deep_json_header_is_einval(arrays):                        # defect 19
    err, msg = arrays.call(_import, arrays.b, join(with_header(arrays.records,
                                                               deep(100000).encode())))
    assert err == errno.EINVAL and "RecursionError" in msg, msg


def test_a_short_block_that_is_not_the_last_is_refused(arrays):
    """Each block record holds exactly its block (only a volume's last is
    short): a stream of tiny block records cannot make the receiver store
    and hold a whole block for each (defect 12's pack growth)."""
    recs = list(arrays.records)
    i = next(k for k, (t, p) in enumerate(recs) if t == b"B")
    recs[i] = (b"B", recs[i][1][:16 + 100])
    err, msg = arrays.call(_import, arrays.b, join(recs))
    assert err == errno.EINVAL and "holds 100 bytes" in msg, msg
    assert arrays.call(_state, arrays.b) == arrays.base


@pytest.mark.daemon_errors(r"MemoryError: staging")
def test_an_error_while_staging_leaves_nothing_and_the_next_import_works(arrays, monkeypatch):
    """Defect 11: a failure after the staging set was added (here the
    volume's construction raises MemoryError) is undone: no staging set,
    no volume, the job failed, and the next import of the same stream
    works (no UNIQUE constraint on a reused staging name)."""
    from fusearray import namespace
    real = namespace.Namespace.add_shadow
    calls = []

    def failing(self, row, pack, source):
        calls.append(row["name"])
        if len(calls) == 2:
            raise MemoryError("staging")
        return real(self, row, pack, source)
    monkeypatch.setattr(namespace.Namespace, "add_shadow", failing)
    err, msg = arrays.call(_import, arrays.b, arrays.source)
    assert err == errno.EIO and "MemoryError" in msg, msg
    monkeypatch.setattr(namespace.Namespace, "add_shadow", real)
    assert arrays.call(_state, arrays.b) == arrays.base
    assert check_case(arrays, arrays.source, kind="valid") == 0


# ---- through a real mount: fewer cases -----------------------------------------------------
class Live:
    def __init__(self, make_mount, tmp):
        self.m = make_mount("live").init().start()
        self.tmp = tmp
        with open(self.m.path("ctl", "create"), "w") as f:
            f.write("probe 1M\n")

    def state(self) -> dict:
        s = self.m.status()
        return {"sets": s["sets"], "luns": [(v["name"], v["wwn"], v["size"])
                                            for v in s["luns"]]}

    def probe(self) -> None:
        data = os.urandom(4096)
        fd = os.open(self.m.path("luns", "probe"), os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 8192) == 4096
            os.fsync(fd)
            assert os.pread(fd, 4096, 8192) == data
        finally:
            os.close(fd)

    def by_ctl(self, line: str, stream: bytes) -> tuple[int, dict]:
        fd = os.open(self.m.path("ctl", "import"), os.O_RDWR)
        err = 0
        try:
            try:
                data = (line + "\n").encode() + stream
                for i in range(0, len(data), 128 << 10):
                    os.write(fd, data[i:i + 128 << 10])
            except OSError as e:
                err = e.errno
            reply = ctlclient.read_reply(fd)
        finally:
            os.close(fd)
        return err, ctlclient.parse_reply(reply)

    def by_cli(self, args: list, stream: bytes) -> tuple[int, str]:
        path = self.tmp / "case.fas"
        path.write_bytes(stream)
        r = run([PY, "-m", "fusearray", "-m", self.m.mnt, "import", str(path), *args],
                check=False)
        return r.returncode, r.stdout + r.stderr


@budget(24, 500)
@given(path=st.sampled_from(FIELDS), value=HOSTILE, cli=st.booleans(),
       rechain=st.booleans(), records=st.booleans(), data=st.data())
def test_hostile_streams_through_the_mount(make_mount, tmp_path, arrays, path, value, cli,
                                           rechain, records, data):
    """Header fields, or records (dropped, duplicated, cut, a byte
    flipped), through ctl/import or the CLI over the stream socket."""
    live = getattr(test_hostile_streams_through_the_mount, "live", None)
    if live is None or live.m.proc is None or live.m.proc.poll() is not None:
        live = test_hostile_streams_through_the_mount.live = Live(make_mount, tmp_path)
        live.base = live.state()
    if records:
        recs = list(arrays.records)
        i = data.draw(st.integers(1, len(recs) - 1), "record")
        op = data.draw(st.sampled_from(["drop", "dup", "cut", "flip"]), "op")
        if op == "drop":
            del recs[i]
        elif op == "dup":
            recs.insert(i, recs[i])
        stream = join(recs, rechain)
        if op == "cut":
            stream = stream[:data.draw(st.integers(0, len(stream) - 1), "cut")]
        elif op == "flip":
            pos = data.draw(st.integers(0, len(stream) - 1), "pos")
            stream = stream[:pos] + bytes([stream[pos] ^ 0x40]) + stream[pos + 1:]
    else:
        try:
            recs = with_header(arrays.records, mutate_header(arrays.header, path, value,
                                                             "set"))
        except ValueError:
            return
        stream = join(recs, rechain)
    name = None
    if cli:
        code, out = live.by_cli(["--remap"], stream)
        COUNTS["mount cli"] = COUNTS.get("mount cli", 0) + 1
        assert code in (0, 1) and "Traceback" not in out and "internal error" not in out, out
        if code == 0:
            name = out.split("imported set ")[1].split()[0]
    else:
        err, reply = live.by_ctl("remap=yes", stream)
        COUNTS["mount ctl"] = COUNTS.get("mount ctl", 0) + 1
        if reply.get("status") == "ok":
            assert err == 0
            name = reply["set"]
        else:
            assert reply.get("status") == "error", reply
            assert reply["errno"] in ("EINVAL", "EIO", "EEXIST", "ENOENT", "ENOSPC"), reply
            assert "internal error" not in reply["message"], reply
    assert live.m.proc.poll() is None, live.m.output()
    if name:
        live.m.ok("delete", name)
    assert live.state() == live.base
    live.probe()


@pytest.fixture(autouse=True)
def _end_live():
    yield
    test_hostile_streams_through_the_mount.__dict__.pop("live", None)
