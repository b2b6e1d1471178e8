"""The control protocol (DESIGN section 3, ISSUE13 #7-#10, #15-#17): lines,
atomic writes, numbers, reserved names, pack directories, the event log.
In-process units first, then a real mount driven as users do."""
import errno
import json
import os
import sqlite3
import subprocess

import pytest
import trio

from fusearray import ctl, events
from fusearray.array import Array, init_array
from fusearray.catalogue import Catalogue, Changes
from fusearray.errors import ArrayError
from fusearray.util import parse_bytes, parse_uint

from conftest import cli, run, wait_for

MiB = 1 << 20


def sh(script: str, check=False) -> subprocess.CompletedProcess:
    return run(["bash", "-c", script], check=check)


# ---- units ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ["١M", "1GB", "1gib", "1g", "1KiB", " 1M", "1M ", "+1",
                                  "-1", "1_000", "0x10", "1e3", "１", "", "M", "9" * 21,
                                  "99999999999999999999T"])
def test_sizes_are_ascii_digits_and_kmgt(text):
    with pytest.raises(ArrayError) as e:
        parse_bytes(text)
    assert e.value.errno == errno.EINVAL and "bad size" in e.value.message


def test_sizes_that_parse():
    assert [parse_bytes(t) for t in ("0", "4096", "64K", "1M", "2G", "3T")] == \
        [0, 4096, 64 << 10, 1 << 20, 2 << 30, 3 << 40]
    assert parse_uint("17", "job id") == 17
    for bad in ("١", "1 ", "", "+1", "0x1", "9" * 19):
        with pytest.raises(ArrayError):
            parse_uint(bad, "job id")


def test_event_text_is_one_printable_line():
    s = events.clean("a\x1b[31mb\nc\r\x00\u202e\xa0d")
    assert s.isprintable() and "\x1b" not in s and "\n" not in s
    assert s == "a\\x1b[31mb\\nc\\r\\x00\\u202e\\xa0d"
    long = events.clean("x" * 10000)
    assert len(long) < events.MESSAGE_MAX + 40 and long.endswith("(7952 more characters)")


def test_the_limiter_suppresses_and_then_sums_up():
    now = [0.0]
    lim = events.Limiter(burst=3, rate=1.0, total_burst=100, total_rate=100.0,
                         clock=lambda: now[0])
    assert [lim.allow("a") for _ in range(5)] == [True] * 3 + [False] * 2
    assert lim.allow("b")                       # another source has its own bucket
    assert lim.summaries() == []                # "a" may not log yet
    now[0] += 1.0
    (src, n, _), = lim.summaries()
    assert (src, n) == ("a", 2) and lim.summaries() == []
    now[0] += 10.0
    assert lim.allow("a")
    # the total bucket caps all sources together
    lim = events.Limiter(burst=10, rate=1.0, total_burst=4, total_rate=0.0,
                         clock=lambda: now[0])
    assert sum(lim.allow(f"s{i}") for i in range(10)) == 4


def test_the_catalogue_prunes_events_apart(tmp_path):
    cat = Catalogue(str(tmp_path / "c.db"), create=True)
    try:
        cat.commit_blocking(Changes(events=[(1.0, "info", "keep me")]))
        for i in range(30):
            cat.commit_blocking(Changes(events=[(2.0 + i, "error", f"noise {i}", 1)
                                                for _ in range(100)]))
        rows = cat.events(events.EVENTS_KEPT, events.NOISE_KEPT)
        assert [r[3] for r in rows if not r[4]] == ["keep me"]
        assert sum(1 for r in rows if r[4]) == events.NOISE_KEPT
        assert cat.conn.execute("SELECT count(*) FROM events").fetchone()[0] == \
            events.NOISE_KEPT + 1
        cat.commit_blocking(Changes(events=[(99.0, "info", f"real {i}")
                                            for i in range(events.EVENTS_KEPT + 5)]))
        real = [r[3] for r in cat.events(events.EVENTS_KEPT, 0)]
        assert len(real) == events.EVENTS_KEPT and real[-1] == f"real {events.EVENTS_KEPT + 4}"
    finally:
        cat.close()


def test_an_old_catalogue_gets_the_noise_column(tmp_path):
    p = str(tmp_path / "old.db")
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT "
              "NULL, level TEXT NOT NULL, message TEXT NOT NULL)")
    c.execute("INSERT INTO events (time, level, message) VALUES (1, 'info', 'old')")
    c.commit()
    c.close()
    cat = Catalogue(p)
    try:
        assert cat.events(10, 10) == [(1, 1.0, "info", "old", 0)]
    finally:
        cat.close()


class Recorder:
    """A verb table whose one verb records the lines it ran."""

    def __init__(self):
        self.ran = []

        async def run(array, args, opts):
            self.ran.append(" ".join(args))
            return {"n": len(self.ran)}
        self.verbs = {"v": ctl.Verb(run, (1, 8), (), "ARGS")}


class FakeArray:
    def __init__(self):
        self.logged = []

    def event(self, level, message, source=None):
        self.logged.append((level, message, source))


async def test_a_session_runs_complete_lines_only():
    rec, arr = Recorder(), FakeArray()
    s = ctl.Session("v", "uid 0", rec.verbs)
    await s.write(arr, b"victim")               # no newline: nothing runs
    assert rec.ran == []
    await s.write(arr, b"A")
    await s.write(arr, b" x\npart")             # completes one line, starts the next
    assert rec.ran == ["victimA x"] and s.read(100).startswith(b"status=ok\n")
    with pytest.raises(ArrayError) as e:       # two complete lines: none runs
        await s.write(arr, b"ial\nthird\n")
    assert e.value.errno == errno.EINVAL and rec.ran == ["victimA x"]
    assert b"errno=EINVAL" in s.read(1000) and "one command" in arr.logged[-1][1]
    await s.write(arr, b"tail")
    await s.close(arr)                          # the close runs the partial line
    assert rec.ran == ["victimA x", "tail"]
    await s.close(arr)                          # nothing left
    assert rec.ran == ["victimA x", "tail"]


@pytest.mark.parametrize("line", [b"\n", b"   \n", b"\t \t\n", b"a\x1bb\n", b"a\x00\n",
                                  b"\xff\xfe\n", b"a\rb\n", b"x" * 5000 + b"\n",
                                  b"\xc2\x85x\n"])
async def test_lines_that_are_refused(line):
    rec, arr = Recorder(), FakeArray()
    s = ctl.Session("v", None, rec.verbs)
    with pytest.raises(ArrayError) as e:
        for i in range(0, len(line), 1000):     # long lines arrive in pieces
            await s.write(arr, line[i:i + 1000])
    assert e.value.errno == errno.EINVAL and rec.ran == []
    (level, msg, source), = arr.logged
    assert level == "error" and msg.isprintable() and len(msg) < 1500
    assert source == "refused v commands"


# ---- on a mount -------------------------------------------------------------------
def raw(m, verb, *chunks):
    """Write `chunks` as separate write(2) calls on one descriptor, then
    read the reply and close. Returns ([errno of each write], reply,
    errno of close)."""
    errs, reply, cerr = m.ctl_writes(verb, chunks)
    return errs, reply.decode(errors="replace"), cerr


def luns(m):
    return sorted(v["name"] for v in m.status()["luns"])


def stable(m):
    """ctl/status.json without what moves by itself."""
    s = m.status()
    for k in ("pid", "cache"):
        s.pop(k, None)
    for p in s["packs"]:
        p.pop("mapped_reads", None)
    return s


def test_a_command_runs_when_its_line_is_complete(mount):
    """#9: write("victimA") must not delete victimA; bytes over several
    writes form one line; the close of a descriptor holding a partial line
    runs it and close(2) returns its errno."""
    m = mount
    m.ok("create", "victimA 1M")
    m.ok("create", "victimAX 1M")
    errs, reply, cerr = raw(m, "delete", b"victim", b"A")
    assert errs == [0, 0] and reply == ""       # nothing ran before the close...
    assert cerr == 0 and luns(m) == ["victimAX"]    # ...and the close ran it
    m.ok("create", "victimA 1M")
    fd = os.open(m.path("ctl", "delete"), os.O_RDWR)
    try:
        os.write(fd, b"victimA")
        assert luns(m) == ["victimA", "victimAX"]   # a partial line waits
        os.write(fd, b"X\n")
        assert luns(m) == ["victimA"]
        assert os.read(fd, 4096).decode().splitlines() == ["status=ok", "deleted=victimAX"]
    finally:
        os.close(fd)
    # a partial line that fails at the close: close(2) says so
    errs, _, cerr = raw(m, "delete", b"nope")
    assert errs == [0] and cerr == errno.ENOENT
    assert "delete nope: no LUN named 'nope'" in m.events()
    # from the shell: printf without a newline runs at the close
    r = sh(f"printf 'shell 1M' > {m.mnt}/ctl/create; ls {m.mnt}/luns")
    assert "shell" in r.stdout.split()
    # a dup'ed descriptor: the reply of a command run at one close is read on the other
    r = sh(f"exec 3<>{m.mnt}/ctl/delete; printf shell >&3; cat <&3; exec 3>&-")
    assert r.stdout.splitlines() == ["status=ok", "deleted=shell"], r


def test_a_write_of_several_lines_runs_none(mount):
    """#8: all or none; here, none, with EINVAL, for every verb."""
    m = mount
    m.ok("create", "a 1M")
    before = stable(m)
    for verb, text in [("create", "twoA 1M\ntwo/B 1M\n"), ("create", "x 1M\ny 1M\n"),
                       ("snapshot", "a set=s1\na set=s2\n"), ("snapshot", "a set=s3\nnope\n"),
                       ("delete", "a\nnope\n"), ("resize", "a 2M\na 3M\n"),
                       ("readonly", "a on\na off\n")]:
        # dash (/bin/sh) writes printf's output once; bash's builtin would
        # write it line by line: one command per write(2) each (README)
        r = run(["dash", "-c", f"printf '{text}' > {m.mnt}/ctl/{verb}"], check=False)
        assert r.returncode != 0, (verb, r)
        assert stable(m) == before, (verb, text)
        errs, reply, _ = raw(m, verb, text.encode())
        assert errs == [errno.EINVAL] and "errno=EINVAL" in reply
        assert "one command" in reply, reply
        assert stable(m) == before, (verb, text)
    # one line per write, in one open: each runs
    errs, reply, _ = raw(m, "create", b"b 1M\n", b"c 1M\n")
    assert errs == [0, 0] and luns(m) == ["a", "b", "c"] and "lun=c" in reply


@pytest.mark.parametrize("text", ["   ", "\t", "", " \t "])
def test_a_line_of_only_whitespace_is_einval(mount, text):
    """#17."""
    m = mount
    r = sh(f"printf '{text}\\n' > {m.mnt}/ctl/create")
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    errs, reply, _ = raw(m, "snapshot", text.encode() + b"\n")
    assert errs == [errno.EINVAL] and "empty command" in reply
    if text:                                     # only whitespace, at the close
        errs, reply, cerr = raw(m, "create", text.encode())
        assert errs == [0] and cerr == errno.EINVAL
    assert luns(m) == [] and m.status()["sets"] == []


def test_numbers_are_ascii_digits_and_suffixes_kmgt(mount):
    """#15: Unicode digits, 1GB, 1gib, block=0 are EINVAL and make nothing."""
    m = mount
    for line in ["x ١M", "x 1GB", "x 1gib", "x 1g", "x 1M block=0", "x 1M block=3K",
                 "x 1M block=2M", "x 1M block=١K", "x ９M", "x 1M\u00a0"]:
        err, reply = m.ctl("create", line)
        assert err == errno.EINVAL, (line, err, reply)
        assert reply["message"].isprintable()
    assert luns(m) == []
    m.ok("create", "x 1M block=4K")
    assert m.status()["luns"][0]["block_size"] == 4096
    # job ids and rates: ASCII digits (a job that does not exist: ENOENT)
    assert m.ctl("pause", "١")[0] == errno.EINVAL
    assert m.ctl("throttle", "1 ١M")[0] == errno.EINVAL
    assert m.ctl("throttle", "1 99999999999999999999T")[0] == errno.EINVAL
    assert m.ctl("pause", "4711")[0] == errno.ENOENT
    assert m.ctl("replace", "main ١ /tmp/nowhere")[0] == errno.EINVAL


def test_invalid_is_a_reserved_pack_name(mount, tmp_path):
    """#16: at addpack and at init."""
    m = mount
    err, reply = m.ctl("addpack", f"INVALID single {tmp_path}/d1")
    assert err == errno.EINVAL and "reserved" in reply["message"]
    assert not os.path.exists(tmp_path / "d1")
    assert [p["name"] for p in m.status()["packs"]] == ["main"]
    r = cli("init", str(tmp_path / "arr2"), "--pack", f"INVALID=single:{tmp_path}/d2",
            check=False)
    assert r.returncode != 0 and "reserved" in r.stderr
    assert not os.path.exists(tmp_path / "arr2" / "array.json")


def test_addpack_inside_the_mount_is_refused_and_the_mount_lives(mount, tmp_path):
    """#10: a pack directory inside the array's own mount hung the mount
    (the daemon sent FUSE requests to itself from its trio thread). Each
    attempt runs under `timeout`, so a hang fails the test instead."""
    m = mount
    m.ok("create", "l 1M")
    link = tmp_path / "link"
    os.symlink(m.mnt, link)
    bind = tmp_path / "bind"
    bind.mkdir()
    run(["mount", "--bind", m.path("luns"), str(bind)])
    try:
        for d in [m.path("luns", "x"), m.path("ctl"), m.mnt, f"{m.mnt}/snapshots/a/b",
                  f"{link}/luns/y", f"{bind}/z"]:
            p = subprocess.Popen(["bash", "-c", f"exec 3<>{m.mnt}/ctl/addpack; "
                                  f"echo 'p2 single {d}' >&3; cat <&3"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, _ = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                m.kill9()           # the hung mount: SIGKILL frees the writer
                p.kill()
                p.communicate()
                pytest.fail(f"addpack with {d} hung the mount")
            assert "errno=EINVAL" in out and "inside this array's own mount" in out, out
            assert m.proc.poll() is None
        assert [p["name"] for p in m.status()["packs"]] == ["main"]
        assert os.listdir(m.path("luns")) == ["l"]
    finally:
        run(["umount", "-l", str(bind)], check=False)
    m.ok("addpack", f"p2 single {tmp_path}/outside")  # outside: fine
    assert [p["name"] for p in m.status()["packs"]] == ["main", "p2"]


def test_a_flood_of_refused_commands_neither_grows_nor_hides_the_log(mount):
    """#7: 3,000 refused commands of 4 KB with terminal escapes: events
    are rate-limited (a summary says how many were suppressed), escaped,
    cut short, kept apart from the array's own events (which stay in
    ctl/events and the catalogue), and the catalogue stays small."""
    m = mount
    m.ok("create", "keep 1M")
    payload = "\x1b[2J\x1b]0;pwned\x07" + "A" * 4000
    fd = os.open(m.path("ctl", "create"), os.O_RDWR)
    try:
        for i in range(3000):
            with pytest.raises(OSError) as e:
                os.write(fd, f"{payload}{i} 1M\n".encode())
            assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    m.ok("create", "after 1M")
    text = m.events()
    assert "\x1b" not in text and "\x07" not in text
    lines = text.splitlines()
    assert all(len(line) < events.MESSAGE_MAX + 100 for line in lines)
    assert sum("bad LUN name" in line for line in lines) <= events.NOISE_KEPT
    assert "created LUN keep" in text and "created LUN after" in text
    # the summary comes once the source may log again: at its next refused
    # command or the committer's next round, up to 1/RATE + 1 s after the
    # flood (a flood faster than that left none yet: CI, NATIVE=0 leg)
    wait_for(lambda: any("similar event(s) suppressed" in line
                         for line in m.events().splitlines()),
             1 / events.RATE + 5, "the summary of the suppressed events")
    m.stop()            # the final commit: everything is in the catalogue
    db = sqlite3.connect(f"file:{m.array}/catalogue.db?mode=ro", uri=True)
    try:
        n, size = db.execute("SELECT count(*), sum(length(message)) FROM events").fetchone()
    finally:
        db.close()
    assert n <= events.EVENTS_KEPT + events.NOISE_KEPT
    assert size < 2 * MiB
    m.start()
    text = m.events()
    assert "created LUN keep" in text and "\x1b" not in text


async def test_events_from_one_source_are_rate_limited_in_process(tmp_path):
    """The same through Array.event: a source's flood costs at most its
    burst plus summaries, and the array's own events all stay."""
    init_array(str(tmp_path / "arr"))
    async with trio.open_nursery() as n:
        a = Array(str(tmp_path / "arr"), 8 * MiB)
        await a.open(n)
        try:
            for i in range(events.EVENTS_KEPT + 10):
                a.event("info", f"real {i}")
                a.event("error", f"refused {i}\x1b", source="refused create commands")
            logged = [e[3] for e in a.events]
            assert sum(msg.startswith("real ") for msg in logged) == events.EVENTS_KEPT
            assert logged[-2:] == [f"real {events.EVENTS_KEPT + 8}",
                                   f"real {events.EVENTS_KEPT + 9}"]
            noise = [msg for msg in logged if msg.startswith("refused ")]
            assert 0 < len(noise) <= events.BURST + 2 and noise[0] == "refused 0\\x1b"
            assert a.journal.limiter.suppressed_total >= events.EVENTS_KEPT - events.BURST
        finally:
            await a.close()
            n.cancel_scope.cancel()


def test_a_flood_through_the_stream_socket_is_bounded_too(mount):
    """#7 as found: refused stream-socket commands of 4 KB each (here
    2,500 of them) go through the same refusal: cut, escaped, rate-limited."""
    import socket
    from fusearray import STREAM_SOCKET_XATTR
    m = mount
    m.ok("create", "keep 1M")
    name = os.getxattr(m.path("ctl"), STREAM_SOCKET_XATTR)
    line = b"export \x1b[2J" + b"B" * 4000 + b"\n"
    for _ in range(2500):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(name if name.startswith(b"/") else b"\0" + name)
            s.sendall(line)                    # no descriptor: refused
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert b"status=error" in reply and len(reply) < 1000
    text = m.events()
    assert "\x1b" not in text and "created LUN keep" in text
    assert sum("export \\x1b[2J" in line for line in text.splitlines()) <= events.NOISE_KEPT
    assert "similar event(s) suppressed" in text
    assert len(text) < 400 * 1024


def test_pack_directories_are_absolute_paths(mount, tmp_path):
    """A relative directory would be taken from the daemon's working
    directory, which the writer does not know: EINVAL, nothing made."""
    m = mount
    cwd = os.getcwd()
    for verb, line in [("addpack", "p2 single reldir"), ("addpack", f"p2 mirror {tmp_path}/x,rel"),
                       ("replace", "main 0 reldir")]:
        err, reply = m.ctl(verb, line)
        assert err == errno.EINVAL and "absolute path" in reply["message"], (line, reply)
    assert not os.path.exists(os.path.join(cwd, "reldir")) and not os.path.exists(tmp_path / "x")
    assert [p["name"] for p in m.status()["packs"]] == ["main"]
