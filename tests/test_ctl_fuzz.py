"""Fuzzing ctl command lines (issue 13 (b); defects 7, 8, 9, 15, 17).

Generated lines per verb: plausible words (names of what exists and of
what does not, sizes good and bad, options of the verb and others), and
hostile ones (invalid UTF-8, control characters, NUL, Unicode digits and
spaces, lines past 4096 bytes, several lines in one write), written in one
write(2), split over several, left without a newline (run at the close),
or through `sh -c 'printf ... > ctl/VERB'`.

In process (fast, many examples):
- `ctl.parse` and `parse_bytes` only ever refuse with EINVAL; what they
  accept is what the grammar says (ASCII digits, K/M/G/T);
- a `ctl.Session` runs exactly the lines a simple model says (complete,
  valid, one per write), whatever the write boundaries;
- with the real verb table over an array that trips on any call, a line
  reaches the array only if it is one printable line of at most 4096
  bytes, and every refusal's event is one printable bounded line.

On a mount (fewer examples), each case checks: the write's and close's
errno are documented ones (DESIGN section 3), the reply is `key=value`
lines with `status` first (and `errno`, a one-line `message` on error,
never an internal error), the daemon is alive and the mount answers, and a
refused command changed nothing (ctl/status.json before == after, minus
what moves by itself). At the end the daemon log holds no traceback.

CI runs a fixed, derandomized budget; FUSEARRAY_LONG=1 (or tools/fuzz-ctl)
runs many more. Each test prints the cases it ran.
"""
import errno
import os
import re
import shlex
import subprocess

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from fusearray import ctl, events
from fusearray.errors import ArrayError
from fusearray.util import MAX_BYTES, parse_bytes

from conftest import run

LONG = os.environ.get("FUSEARRAY_LONG") == "1"
DOCUMENTED = {0, errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.ENOSPC, errno.EBUSY,
              errno.EROFS, errno.EOPNOTSUPP, errno.EIO}
COUNTS: dict = {}


def budget(ci: int, long: int) -> settings:
    return settings(max_examples=long if LONG else ci, deadline=None, derandomize=not LONG,
                    database=None, suppress_health_check=list(HealthCheck))


def count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


# ---- what lines are made of ----------------------------------------------------------
NAMES = ["a", "b", "S", "S/a", "S/b", "T", "nope", "main", "p2", "INVALID", "1", "0",
         "x" * 65, "a.b-c_d", "-a", ".S", "S/", "/a", "a/b/c", "lun\u00e9", "a=b"]
SIZES = ["1M", "512", "511", "0", "64K", "2M", "4K", "١M", "1GB", "1gib", "1m", "4096T",
         "9" * 21, "99999999999999999999", "1.5M", "-1M", "+1M", "0x10", "1 M", "１M",
         "1M\u00a0"]
VALUES = ["yes", "no", "on", "off", "0", "1", "maybe", "", "64K", "0", "١", "S2", "a",
          "main", "nope", "plex", "differential", "4K", "1M", "x" * 70, "\u202e"]
KEYS = ["force", "set", "pack", "block", "as", "undo", "hidden", "context", "color",
        "Ω", "FORCE", "force_", "_"]
HOSTILE = ["\x00", "\x1b[31m", "\x1b]0;t\x07", "\r", "\x7f", "\x85", "\u00a0", "\u2028",
           "\u202e", "١", "\t", "  ", "=", "==", "/", "//", "a=b=c", "\\", "'", '"', "$(id)",
           "%s%n", "\ufeff", "\U0001f600"]
JOBS = ["1", "2", "3", "99", "١", "0", "-1", "1.0", "9" * 30, "01"]
ODD_BYTES = [b"\xff", b"\xc0\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\x00", b"\x1b", b"\r\n",
             b"\n", b"\n\n", b"\xf4\x90\x80\x80"]


def verb_words(verb: str, dirs: list[str]):
    """Words of a plausible line for `verb`."""
    word = st.sampled_from(NAMES)
    if verb in ("create", "resize"):
        pos = st.tuples(word, st.sampled_from(SIZES)).map(list)
    elif verb == "addpack":
        pos = st.tuples(word, st.sampled_from(["single", "mirror", "raid5", "zigzag", ""]),
                        st.lists(st.sampled_from(dirs), min_size=1, max_size=4)
                        .map(",".join)).map(list)
    elif verb == "replace":
        pos = st.tuples(word, st.sampled_from(JOBS), st.sampled_from(dirs)).map(list)
    elif verb in ("cancel", "pause", "resume"):
        pos = st.lists(st.sampled_from(JOBS), min_size=1, max_size=2)
    elif verb == "throttle":
        pos = st.tuples(st.sampled_from(JOBS), st.sampled_from(SIZES)).map(list)
    elif verb in ("readonly", "hidden"):
        pos = st.tuples(word, st.sampled_from(VALUES)).map(list)
    elif verb == "resync":
        pos = st.lists(st.one_of(word, st.tuples(word, word).map("=".join)), min_size=1,
                       max_size=3)
    else:
        pos = st.lists(word, min_size=1, max_size=3)
    opt = st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)).map("=".join)
    extra = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))
    return st.tuples(pos, st.lists(opt, max_size=3), st.lists(extra, max_size=2),
                     st.booleans()).map(
        lambda t: t[0] + t[1] + (t[2] if t[3] else []))


@st.composite
def line_bytes(draw, verb: str, dirs: list[str]) -> bytes:
    """One line's bytes (no newline), sometimes mangled."""
    ws = draw(verb_words(verb, dirs))
    if draw(st.integers(0, 9)) == 0:
        ws = draw(st.permutations(ws))
    seps = [draw(st.sampled_from([" ", " ", "\t", "  ", " \t"])) for _ in ws]
    text = "".join(w + s for w, s in zip(ws, seps)).rstrip(" \t") \
        if draw(st.booleans()) else " ".join(ws)
    data = text.encode("utf-8", "surrogatepass")
    how = draw(st.integers(0, 11))
    if how == 0:                                 # raw odd bytes somewhere
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(ODD_BYTES)) + data[at:]
    elif how == 1:                               # a huge line
        data = data + b" " + b"y" * draw(st.sampled_from([4000, 4097, 9000, 70000]))
    elif how == 2:                               # only whitespace
        data = draw(st.sampled_from([b"", b" ", b"\t", b"   \t "]))
    elif how == 3:                               # anything at all
        data = draw(st.binary(max_size=64))
    return data


@st.composite
def writes(draw, verb: str, dirs: list[str]):
    """(chunks for write(2), how to send): lines joined by newlines, the
    last one perhaps without, cut at random places."""
    n = draw(st.sampled_from([1, 1, 1, 1, 2, 3]))
    lines = [draw(line_bytes(verb, dirs)) for _ in range(n)]
    data = b"\n".join(lines) + (b"\n" if draw(st.integers(0, 5)) else b"")
    mode = draw(st.sampled_from(["one", "one", "split", "split", "shell"]))
    if mode == "split" and len(data) > 1:
        cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=4))))
        chunks = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]
    else:
        chunks = [data]
    if mode == "shell" and (b"\x00" in data or len(data) > 30000):
        mode = "one"                             # argv cannot carry NUL; keep it small
    return chunks, mode


# ---- a model of the line rules -----------------------------------------------------
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def model_valid(line: bytes) -> bool:
    """One command line as DESIGN section 3 states it."""
    if len(line) > ctl.MAX_LINE:
        return False
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return False
    if CONTROL.search(line) or any(0x80 <= ord(c) <= 0x9f for c in text):
        return False
    return bool(text.replace(" ", "").replace("\t", ""))


def model_runs(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """The lines that run, in order, with the call that runs each (index
    len(chunks): the close): a write completing exactly one valid line
    runs it; more than one, none; at the close, the partial line."""
    out, partial = [], b""
    for i, c in enumerate(chunks):
        *done, partial = (partial + c).split(b"\n")
        if len(done) == 1 and model_valid(done[0]):
            out.append((i, done[0]))
    if partial and model_valid(partial):
        out.append((len(chunks), partial))
    return out


# ---- in process ------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.ran = []

        async def run(array, args, opts):
            self.ran.append(args)
            return {"n": len(self.ran)}
        self.verbs = {"v": ctl.Verb(run, (0, 100000), (), "ANY")}


class Events:
    def __init__(self):
        self.logged = []

    def event(self, level, message, source=None):
        assert source is not None and level == "error"
        self.logged.append(message)


class Tripwire(Events):
    """An array that refuses everything with a sentinel EIO: reached only
    by lines that passed ctl's own checks."""
    luns: dict = {}
    sets: dict = {}
    reached = 0

    def __getattr__(self, name):
        def call(*args, **kw):
            Tripwire.reached += 1
            raise ArrayError(errno.EIO, "tripwire")
        return call


def test_parse_and_numbers_refuse_only_with_einval():
    verbs = sorted(ctl.VERBS)

    @budget(1500, 30000)
    @given(st.sampled_from(verbs), st.text(max_size=80), st.text(max_size=24))
    def case(verb, text, number):
        count("parse")
        try:
            args, opts = ctl.parse(ctl.VERBS[verb], verb, text)
        except ArrayError as e:
            assert e.errno == errno.EINVAL and e.message.startswith(verb)
        else:
            lo, hi = ctl.VERBS[verb].nargs
            assert lo <= len(args) <= hi and set(opts) <= ctl.VERBS[verb].options
            assert all(w and not re.search(r"[ \t]", w) for w in args)
        try:
            n = parse_bytes(number)
        except ArrayError as e:
            assert e.errno == errno.EINVAL
            assert not re.fullmatch(r"[0-9]{1,20}[KMGT]?", number) or \
                int(number.rstrip("KMGT")) << {"K": 10, "M": 20, "G": 30, "T": 40}.get(
                    number[-1], 0) >= MAX_BYTES
        else:
            assert re.fullmatch(r"[0-9]{1,20}[KMGT]?", number) and 0 <= n < MAX_BYTES
    case()
    print(f"\nctl.parse / parse_bytes cases: {COUNTS['parse']}")


def test_a_session_runs_what_the_model_says():
    @budget(1500, 30000)
    @given(st.lists(st.one_of(st.binary(max_size=40),
                              st.sampled_from([b"\n", b"a b\n", b"x", b" ", b"\t\n", b"\xff",
                                               b"y" * 5000, b"c\nd\n", b"\x1b", b"\xc2",
                                               b"\x85"])),
                    max_size=8))
    def case(chunks):
        chunks = [c.replace(b"=", b"-") for c in chunks]     # no options: any word runs
        count("session")
        rec, arr = Recorder(), Events()
        s = ctl.Session("v", "uid 0", rec.verbs)

        async def main():
            for c in chunks:
                try:
                    await s.write(arr, c)
                except ArrayError as e:
                    assert e.errno == errno.EINVAL
            try:
                await s.close(arr)
            except ArrayError as e:
                assert e.errno == errno.EINVAL
        trio.run(main)
        want = [ctl.words(line.decode()) for _, line in model_runs(chunks)]
        assert rec.ran == want, (chunks, rec.ran, want)
        for msg in arr.logged:
            assert msg.isprintable() and len(msg) <= events.MESSAGE_MAX + 40
    case()
    print(f"\nsession cases (split writes): {COUNTS['session']}")


def test_only_checked_lines_reach_the_array():
    verbs = sorted(ctl.VERBS)

    @budget(1500, 30000)
    @given(st.data())
    def case(data):
        count("tripwire")
        verb = data.draw(st.sampled_from(verbs))
        chunks, _ = data.draw(writes(verb, ["/tmp/fz/d1", "/tmp/fz/d2", "rel", "/"]))
        arr = Tripwire()
        s = ctl.Session(verb, "uid 0")
        before = Tripwire.reached

        async def main():
            for c in chunks + [None]:
                try:
                    await (s.write(arr, c) if c is not None else s.close(arr))
                except ArrayError as e:
                    assert e.errno in (errno.EINVAL, errno.EIO), e
                    assert e.errno == errno.EINVAL or e.message.endswith("tripwire")
                    assert s.reply.startswith(b"status=error\nerrno=")
        trio.run(main)
        assert Tripwire.reached - before <= len(model_runs(chunks))
        for msg in arr.logged:
            assert msg.isprintable() and len(msg) <= events.MESSAGE_MAX + 40
    case()
    print(f"\nverb-table cases: {COUNTS['tripwire']}")


# ---- on a mount --------------------------------------------------------------------------
def shape(m) -> dict:
    """ctl/status.json without what moves by itself (job progress, cache,
    counters)."""
    s = m.status()
    return {"packs": sorted((p["name"], p["layout"], tuple(d["path"] for d in p["disks"]))
                            for p in s["packs"]),
            "luns": sorted((v["name"], v["size"], v["wwn"], v["readonly"], v["hidden"],
                            v["pack"], v["block_size"]) for v in s["luns"]),
            "sets": sorted((st_["name"], tuple(sorted((v["name"], v["wwn"], v["readonly"],
                                                       v["hidden"])
                                                      for v in st_["shadow_copies"])))
                           for st_ in s["sets"]),
            "jobs": sorted(j["id"] for j in s["jobs"])}


def check_reply(reply: bytes, err: int) -> None:
    if not reply:
        return
    text = reply.decode()
    lines = text.splitlines()
    assert text.endswith("\n") and all("=" in line for line in lines), text
    keys = [line.split("=", 1)[0] for line in lines]
    assert keys[0] == "status" and len(set(keys)) == len(keys), text
    status = lines[0].split("=", 1)[1]
    if status == "ok":
        return
    assert status == "error" and keys[1:3] == ["errno", "message"], text
    msg = lines[2].split("=", 1)[1]
    assert msg.isprintable() and len(msg) <= events.MESSAGE_MAX + 40, msg
    assert "internal error" not in msg, msg


def send(m, verb: str, chunks: list[bytes], mode: str):
    """([errno of each write], errno of close, reply) as a script sees them."""
    path = m.path("ctl", verb)
    if mode == "shell":
        data = b"".join(chunks)
        fmt = "".join(f"\\{b:03o}" for b in data)
        r = subprocess.run(["dash", "-c", f"printf {shlex.quote(fmt)} > {path}"],
                           capture_output=True, timeout=120)
        return [0 if r.returncode == 0 else -1], 0, b""
    errs, reply, cerr = m.ctl_writes(verb, chunks)
    return errs, cerr, reply


VERBS = sorted(ctl.VERBS)


def test_fuzzed_lines_on_a_mount(mount, tmp_path):
    m = mount
    link = tmp_path / "link"
    os.symlink(m.mnt, link)
    dirs = [f"{tmp_path}/d1", f"{tmp_path}/d2", f"{tmp_path}/d3", m.path("luns", "x"),
            m.mnt, f"{link}/ctl", "rel/dir", "/", f"{tmp_path}/a,b"]

    def base():
        """What the lines talk about: LUN a (with set S of it), LUN b."""
        luns = {v["name"] for v in m.status()["luns"]}
        for name in ("a", "b"):
            if name not in luns:
                m.ctl("create", f"{name} 1M")
        if "S" not in {s["name"] for s in m.status()["sets"]}:
            m.ctl("snapshot", "a b set=S")      # may be busy (a job): then without

    @budget(250, 5000)
    @given(st.data())
    def case(data):
        verb = data.draw(st.sampled_from(VERBS))
        chunks, mode = data.draw(writes(verb, dirs))
        base()
        before = shape(m)
        errs, cerr, reply = send(m, verb, chunks, mode)
        count("mount")
        count(f"mount {mode}")
        assert m.proc.poll() is None and os.path.ismount(m.mnt), "the daemon died"
        after = shape(m)                         # the mount answers
        for e in errs + [cerr]:
            assert e in DOCUMENTED or (mode == "shell" and e == -1), (verb, chunks, errs, cerr)
        check_reply(reply, errs[-1])
        if mode != "shell":
            results = errs + [cerr]
            ran = model_runs(chunks)
            count("mount lines past the checks", len(ran))
            if all(results[i] for i, _ in ran):  # every command refused (or none ran)
                assert after == before, (verb, chunks, errs, cerr, reply)
                count("mount refused, state unchanged")
            else:
                count("mount commands done")
    try:
        case()
    finally:
        print(f"\nctl lines on a mount: {COUNTS}")
    log = os.path.join(m.array, "daemon.log")
    with open(log, errors="replace") as f:
        text = f.read()
    assert "Traceback" not in text and "unexpected error" not in text, text[-3000:]
    assert "internal error" not in m.events()
