"""Model-based test of a real mount (ISSUE13, "tests that find the next
twenty", point a).

A Hypothesis `RuleBasedStateMachine` runs random sequences of what users and
scripts do against a real FUSE mount (daemon in a subprocess): ctl commands
written as a script does (create, delete, resize, snapshot, resync, swap,
readonly/hidden tags, pause/resume/cancel/throttle of jobs, recover), writes
with pwrite at any offset (block boundaries, the end of the LUN and past it),
punch-hole, fsync, descriptors held open, SIGKILL of the daemon and restart,
a clean unmount and remount, and the loss of one disk of the mirror pack.
A plain model of LUNs, sets, shadow copies and jobs predicts every reply.

After every step it checks: the daemon is alive; every visible LUN and
shadow copy reads exactly as the model (the whole file, compared byte for
byte); `ctl/status.json` lists exactly the model's LUNs, sets and shadow
copies with their sizes, packs, flags, contexts and stable WWNs, and its jobs
in states the model allows; `ls luns/` and `ls snapshots/` show exactly the
visible ones and hidden names are ENOENT; the packs are in the state the
model expects; no "internal error" event was logged.

Crashes: only fsync'd data is promised. Each volume keeps, per block, the
contents a SIGKILL may leave besides the newest one (every version written
since its last fsync); after a restart each block must be one of them, and
what it reads then is the model's new state. A successful ctl command is
durable (each commits before it replies): after a crash, every LUN, set and
shadow copy it made is there, and a shadow copy or resync destination reads
exactly as the volume it was taken from did when the command ran.

CI runs a bounded, derandomized budget; `tools/modelrun` runs long ones
(FUSEARRAY_MODEL_EXAMPLES / _STEPS / _SEED / _SHRINK do the same here).
"""
import collections
import ctypes
import errno
import functools
import os
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from conftest import PY, Mount, require_fuse, run, wait_for
from fallbacks import INTERPOSER, zero_range

KiB, MiB = 1 << 10, 1 << 20
LUN_NAMES = ["l0", "l1", "l2", "l3", "l4"]
SET_NAMES = ["s0", "s1", "s2"]
BAD_NAMES = ["-x", ".dot", "a" * 65, "a/b", "bad!", "sp\u00e4ce", "_u"]
BAD_SIZES = ["0", "1000", "1.5M", "1X", "-1M", "M", "12345"]
MAX_SHADOWS = 8
ACTIVE = ("queued", "running", "paused")
PACKS = ("main", "p2")

STATS = collections.Counter()
TOOLS = Path(__file__).resolve().parent.parent / "tools"

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def ename(e: int) -> str:
    return "ok" if e == 0 else errno.errorcode.get(e, str(e))


def punch(fd: int, off: int, length: int) -> int:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): 0 or the errno."""
    r = libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
    return 0 if r == 0 else ctypes.get_errno()


def read_fd(fd: int, size: int) -> bytes:
    out, pos = [], 0
    while pos < size:
        chunk = os.pread(fd, min(4 * MiB, size - pos), pos)
        if not chunk:
            break
        out.append(chunk)
        pos += len(chunk)
    return b"".join(out)


class Vol:
    """The model of a LUN or shadow copy: its newest content `cur` and, per
    block, the other contents a crash may leave (`alts`: every version
    written since the last fsync of this volume)."""
    _n = 0

    def __init__(self, size: int, bs: int, pack: str, cur=None):
        Vol._n += 1
        self.id = Vol._n
        self.size, self.bs, self.pack = size, bs, pack
        self.cur = bytearray(size) if cur is None else bytearray(cur)
        self.alts: dict[int, set] = {}
        self.readonly = self.hidden = False
        self.context = None
        self.wwn = None
        self.deleted = False
        self.copying = None         # id of the job copying it from its source pack

    def __repr__(self):
        return f"Vol#{self.id}({self.size}, bs={self.bs}, {self.pack})"

    def block(self, b: int) -> bytes:
        return bytes(self.cur[b * self.bs:(b + 1) * self.bs])

    def _before_change(self, off: int, end: int) -> None:
        for b in range(off // self.bs, (end - 1) // self.bs + 1):
            self.alts.setdefault(b, set()).add(self.block(b))

    def write(self, off: int, data: bytes) -> int:
        end = min(off + len(data), self.size)
        if off >= self.size:
            return 0
        self._before_change(off, end)
        self.cur[off:end] = data[:end - off]
        return end - off

    def zero(self, off: int, length: int) -> None:
        end = min(off + length, self.size)
        if off < end:
            self._before_change(off, end)
            self.cur[off:end] = bytes(end - off)

    def synced(self) -> None:
        self.alts.clear()

    def resize(self, size: int) -> None:
        if size < self.size:
            del self.cur[size:]
        else:
            self.cur += bytes(size - self.size)
        self.size = size
        nblocks = -(-size // self.bs)
        alts = {}
        for b, vs in self.alts.items():
            if b < nblocks:
                n = min(self.bs, size - b * self.bs)
                alts[b] = {(v[:n] + bytes(n))[:n] for v in vs}
        self.alts = alts

    def copy_of(self, src: "Vol") -> None:
        """Reads exactly as `src` now (a committed resync)."""
        self.cur = bytearray(src.cur)
        self.size, self.bs = src.size, src.bs
        self.alts = {}

    def check(self, data: bytes, what: str, after_crash: bool) -> int:
        """Compare what the volume reads with the model; after a crash each
        block may be any version written since the last fsync. Returns the
        number of bytes that are neither."""
        if len(data) != self.size:
            raise AssertionError(f"{what}: read {len(data)} bytes, the model has {self.size}")
        if data == self.cur:
            return 0
        bad = []
        for b in range(-(-self.size // self.bs)):
            got = data[b * self.bs:(b + 1) * self.bs]
            if got == self.block(b):
                continue
            if after_crash and got in self.alts.get(b, ()):
                continue
            bad.append(b)
        if bad:
            b = bad[0]
            want, got = self.block(b), data[b * self.bs:(b + 1) * self.bs]
            first = next(i for i in range(len(got)) if got[i] != want[i])
            raise AssertionError(
                f"{what}: {len(bad)} block(s) of {self.bs} differ from the model "
                f"({'after a crash, not any version written since the last fsync' if after_crash else 'not the newest content'}); "
                f"first at byte {b * self.bs + first} (block {b}): got {got[first:first + 16].hex()} "
                f"want {want[first:first + 16].hex()}; blocks {bad[:20]}")
        return 0


def counted(fn):
    """Count each rule run (the summary shows the mix)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        STATS["rule " + fn.__name__] += 1
        try:
            return fn(self, *args, **kw)
        except Exception:    # not Hypothesis's StopTest (a BaseException): a draw that
            self.failed = True   # ran out of data ends the example, it is no failure
            raise
    return wrapper


class Job:
    def __init__(self, jid: str, kind: str, state: str, vols=()):
        self.id, self.kind, self.state = jid, kind, state   # active|paused|cancelled|done
        self.vols = list(vols)

    def __repr__(self):
        return f"Job({self.id}, {self.kind}, {self.state})"


def settings_for_ci() -> settings:
    env = os.environ
    long = env.get("FUSEARRAY_LONG") == "1"
    examples = int(env.get("FUSEARRAY_MODEL_EXAMPLES", 200 if long else 12))
    steps = int(env.get("FUSEARRAY_MODEL_STEPS", 50 if long else 35))
    seed = env.get("FUSEARRAY_MODEL_SEED")
    shrink = env.get("FUSEARRAY_MODEL_SHRINK", "1" if long else "0") == "1"
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    kw = dict(max_examples=examples, stateful_step_count=steps, deadline=None,
              phases=phases, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    if seed is None:
        kw["derandomize"] = True
    return settings(**kw), (None if seed is None else int(seed))


class ArrayMachine(RuleBasedStateMachine):
    base: Path = Path(tempfile.gettempdir())

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="model-", dir=self.base))
        self.disks = {n: str(self.dir / "disks" / n) for n in ("d1", "d2", "e1")}
        self.luns: dict[str, Vol] = {}
        self.sets: dict[str, dict[str, Vol]] = {}
        self.jobs: dict[str, Job] = {}
        self.held: list[tuple[int, Vol, bool]] = []      # (fd, vol, writable)
        self.lost = None            # (disk name, "rm" | "rename") of the mirror pack
        self.losses = 0
        self.events_seen = 0
        self.m = None
        self.failed = False
        self.steps_since_restart = 0
        STATS["examples"] += 1

    @initialize(cache=st.sampled_from([2 * MiB, 64 * MiB]),
                sizes=st.lists(st.integers(1, 12), min_size=1, max_size=3))
    def start(self, cache, sizes):
        """An array with a mirror pack `main` (2 disks) and a single pack `p2`,
        and a few LUNs; a 2 MiB cache sends most reads to the disks."""
        self.m = Mount(self.dir, cache_size=cache)
        self.m.init("--pack", f"main=mirror:{self.disks['d1']},{self.disks['d2']}",
                    "--pack", f"p2=single:{self.disks['e1']}").start()
        for i, n in enumerate(sizes):
            pack = "p2" if i == 2 else "main"
            self.cmd("create", f"l{i} {n * 512 * KiB} pack={pack}")
            self.luns[f"l{i}"] = Vol(n * 512 * KiB, 64 * KiB, pack)

    def teardown(self):
        for fd, _, _ in self.held:
            try:
                os.close(fd)
            except OSError:
                pass
        self.held.clear()
        try:
            if self.m is not None:
                self.m.close()
        finally:
            keep = os.environ.get("FUSEARRAY_MODEL_KEEP")
            if self.failed and keep:     # the daemon's output and log, for the report
                dest = Path(keep) / self.dir.name
                dest.mkdir(parents=True, exist_ok=True)
                for f in (self.dir / "daemon.out", self.dir / "array" / "daemon.log"):
                    if f.exists():
                        shutil.copy(f, dest / f.name)
                print(f"model: the failing example's logs are in {dest}")
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers ---------------------------------------------------------------------
    def vols(self):
        """(path under the mount, vol, visible) of every LUN and shadow copy."""
        for name, v in self.luns.items():
            yield ("luns", name), v, not v.hidden
        for s, members in self.sets.items():
            for name, v in members.items():
                yield ("snapshots", s, name), v, not v.hidden

    def visible(self):
        return [(p, v) for p, v, vis in self.vols() if vis]

    def n_shadows(self) -> int:
        return sum(len(m) for m in self.sets.values())

    def held_count(self, v: Vol) -> int:
        return sum(1 for _, hv, _ in self.held if hv is v)

    def cmd(self, verb: str, line: str, must=(), maybe=()) -> tuple[int, dict]:
        """Run a ctl command; `must`: errnos of which one is certain (none:
        success); `maybe`: errnos a race allows too."""
        err, reply = self.m.ctl(verb, line)
        STATS["commands"] += 1
        allowed = set(must) | set(maybe) if must else {0} | set(maybe)
        if err not in allowed:
            raise AssertionError(f"`{verb} {line}` gave {ename(err)} {reply}, the model "
                                 f"expects {' or '.join(sorted(map(ename, allowed)))}"
                                 + self.context())
        if err:
            assert reply.get("status") == "error" and reply.get("errno") == ename(err), \
                (verb, line, err, reply)
            assert reply.get("message"), (verb, line, reply)
        else:
            assert reply.get("status") == "ok", (verb, line, reply)
        return err, reply

    def context(self) -> str:
        """The daemon's last events and output, for a failure message."""
        try:
            ev = self.m.events().splitlines()[-12:]
        except OSError as e:
            ev = [f"(events unreadable: {e})"]
        return ("\nlast events:\n" + "\n".join(ev) + "\ndaemon output:\n"
                + self.m.output()[-2000:])

    def job_state(self, jid: str) -> dict:
        return self.m.job(jid)

    def refresh_jobs(self) -> None:
        """Learn which copies have ended; a job that failed is a defect here
        (nothing in the model makes a copy impossible)."""
        for job in self.jobs.values():
            if job.state in ("active", "paused"):
                j = self.job_state(job.id)
                if j["state"] == "failed":
                    raise AssertionError(f"job {job.id} ({job.kind}) failed: {j.get('error')}")
                if j["state"] == "done":
                    self.job_done(job)

    def job_done(self, job: Job) -> None:
        job.state = "done"
        for v in job.vols:
            if v.copying == job.id:
                v.copying = None

    def copy_busy(self, v: Vol, must: set, maybe: set) -> None:
        """A volume still reading from its source pack: EBUSY for snapshot or
        resync, certain if its job is not running, else a race with its end."""
        if v.copying is None:
            return
        job = self.jobs[v.copying]
        (maybe if job.state == "active" or job.state == "paused" else must).add(errno.EBUSY)

    def after_race(self, err: int) -> None:
        if err == 0:
            self.refresh_jobs()

    def new_set(self, name: str, members: dict) -> None:
        assert name not in self.sets, (name, self.sets)
        self.sets[name] = members

    def drop_vol(self, v: Vol) -> None:
        v.deleted = True

    def pick_vol(self, data, writable_only=False):
        choices = [(p, v) for p, v in self.visible()]
        return data.draw(st.sampled_from(choices), label="volume")

    def open_vol(self, parts, flags):
        return os.open(self.m.path(*parts), flags)

    def offset(self, data, v: Vol, label="offset") -> int:
        kind = data.draw(st.sampled_from(["any", "boundary", "end", "past"]), label=label + " kind")
        if kind == "any":
            return data.draw(st.integers(0, v.size - 1), label=label)
        if kind == "boundary":
            b = data.draw(st.integers(1, max(1, v.size // v.bs)), label="block")
            return max(0, min(v.size - 1, b * v.bs - data.draw(st.integers(0, 4096), label="before")))
        if kind == "end":
            return max(0, v.size - data.draw(st.integers(1, 200 * KiB), label="from end"))
        return v.size + data.draw(st.sampled_from([0, 1, 511, 4096, v.bs]), label="past end")

    def payload(self, data, n: int) -> bytes:
        kind = data.draw(st.sampled_from(["random", "random", "zeros", "pattern"]), label="data")
        if kind == "zeros":
            return bytes(n)
        if kind == "pattern":      # repeated: identical blocks, dedup
            unit = bytes([data.draw(st.integers(1, 255), label="byte")]) * 4096
            return (unit * (n // 4096 + 1))[:n]
        return random.Random(data.draw(st.integers(0, 2 ** 32), label="seed")).randbytes(n)

    # ---- LUNs ------------------------------------------------------------------------
    @rule(data=st.data())
    @counted
    def create(self, data):
        name = data.draw(st.sampled_from(LUN_NAMES), label="name")
        size = data.draw(st.integers(1, 12), label="half MiBs") * 512 * KiB \
            + data.draw(st.sampled_from([0, 0, 0, 512, 4096, 60 * KiB]), label="extra")
        block = data.draw(st.sampled_from([None, None, None, "4K", "16K", "128K"]), label="block")
        pack = data.draw(st.sampled_from([None, "main", "p2"]), label="pack")
        bad = data.draw(st.sampled_from([None] * 6 + ["name", "size", "block", "pack", "huge"]),
                        label="bad")
        size_text = str(size)
        must = set()
        if bad == "name":
            name = data.draw(st.sampled_from(BAD_NAMES), label="bad name")
            must.add(errno.EINVAL)
        elif bad == "size":
            size_text = data.draw(st.sampled_from(BAD_SIZES), label="bad size")
            must.add(errno.EINVAL)
        elif bad == "block":
            block = data.draw(st.sampled_from(["3K", "2M", "1K", "x"]), label="bad block")
            must.add(errno.EINVAL)
        elif bad == "pack":
            pack = "nopack"
            must.add(errno.ENOENT)
        elif bad == "huge":
            size_text = "64T"
            must.add(errno.ENOSPC)
        if name in self.luns:
            must.add(errno.EEXIST)
        line = f"{name} {size_text}" + (f" pack={pack}" if pack else "") \
            + (f" block={block}" if block else "")
        err, reply = self.cmd("create", line, must)
        if err == 0:
            bs = {None: 64 * KiB, "4K": 4 * KiB, "16K": 16 * KiB, "128K": 128 * KiB}[block]
            v = Vol(size, bs, pack or "main")
            v.wwn = reply.get("wwn")
            assert reply.get("lun") == name and int(reply.get("size")) == size, reply
            self.luns[name] = v

    @precondition(lambda self: self.luns)
    @rule(data=st.data())
    @counted
    def delete_lun(self, data):
        name = data.draw(st.sampled_from(sorted(self.luns) + ["nolun"]), label="lun")
        force = data.draw(st.booleans(), label="force")
        v = self.luns.get(name)
        must = set()
        if v is None:
            must.add(errno.ENOENT)
        elif self.held_count(v) and not force:
            must.add(errno.EBUSY)
        err, _ = self.cmd("delete", name + (" force=yes" if force else ""), must)
        if err == 0:
            self.drop_vol(self.luns.pop(name))

    @precondition(lambda self: self.luns)
    @rule(data=st.data())
    @counted
    def resize(self, data):
        name = data.draw(st.sampled_from(sorted(self.luns) + ["nolun"]), label="lun")
        v = self.luns.get(name)
        cur = v.size if v else MiB
        size = data.draw(st.sampled_from([cur // 2 // 512 * 512 or 512, cur - 512, cur + 512,
                                          cur + 65536, cur * 2, 3 * MiB + 4096, 1536 * KiB]),
                         label="size")
        size = max(512, min(size, 12 * MiB))
        force = data.draw(st.booleans(), label="force")
        bad = data.draw(st.sampled_from([None] * 5 + ["size", "huge"]), label="bad")
        size_text, must = str(size), set()
        if v is None:
            must.add(errno.ENOENT)
        if bad == "size":
            size_text = data.draw(st.sampled_from(BAD_SIZES), label="bad size")
            must.add(errno.EINVAL)
        elif bad == "huge":
            size_text = "64T"
        if v is not None:
            if v.readonly:
                must.add(errno.EROFS)
            if bad != "size" and bad != "huge" and size < v.size and self.held_count(v) and not force:
                must.add(errno.EBUSY)
            if bad == "huge":
                must.add(errno.ENOSPC)
        err, reply = self.cmd("resize", f"{name} {size_text}" + (" force=yes" if force else ""), must)
        if err == 0:
            v.resize(size)
            assert int(reply["size"]) == size, reply

    # ---- I/O ---------------------------------------------------------------------------
    @precondition(lambda self: any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def write(self, data):
        parts, v = self.pick_vol(data)
        off = self.offset(data, v)
        n = data.draw(st.sampled_from([1, 511, 4096, 65536, 65537, 131072, 200000]), label="length")
        payload = self.payload(data, n)
        try:
            fd = self.open_vol(parts, os.O_WRONLY)
        except OSError as e:
            assert v.readonly and e.errno == errno.EROFS, (parts, e, v.readonly)
            STATS["refused"] += 1
            return
        assert not v.readonly, f"{'/'.join(parts)} is read-only but opened for writing"
        try:
            self._pwrite(fd, v, off, payload, "/".join(parts))
        finally:
            os.close(fd)

    @precondition(lambda self: any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def write_again(self, data):
        self.write(data)

    @precondition(lambda self: any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def small_writes(self, data):
        """Sub-block writes at random offsets of one block: a partial cache
        entry (nothing read from the pack), patched again, then completed
        by a read, the write-back, a snapshot or dropped by a resync."""
        parts, v = self.pick_vol(data)
        if not v.size:
            return
        b = data.draw(st.integers(0, (v.size - 1) // v.bs), label="block")
        try:
            fd = self.open_vol(parts, os.O_WRONLY)
        except OSError as e:
            assert v.readonly and e.errno == errno.EROFS, (parts, e, v.readonly)
            STATS["refused"] += 1
            return
        try:
            for _ in range(data.draw(st.integers(1, 4), label="pieces")):
                off = b * v.bs + data.draw(st.integers(0, v.bs - 1), label="in block")
                n = data.draw(st.sampled_from([1, 512, 4096]), label="length")
                self._pwrite(fd, v, off, self.payload(data, n), "/".join(parts))
        finally:
            os.close(fd)

    def _pwrite(self, fd, v: Vol, off: int, payload: bytes, what: str) -> None:
        want_err = 0
        if v.deleted:
            want_err = errno.ENXIO
        elif v.readonly:
            want_err = errno.EROFS
        elif off >= v.size:
            want_err = errno.ENOSPC
        try:
            got = os.pwrite(fd, payload, off)
            err = 0
        except OSError as e:
            got, err = None, e.errno
        STATS["writes"] += 1
        if want_err:
            assert err == want_err, f"pwrite({what}, {len(payload)} at {off}) of " \
                f"{v.size}: got {ename(err)} ({got}), want {ename(want_err)}"
            return
        assert err == 0, f"pwrite({what}, {len(payload)} at {off}) of {v.size}: " \
            f"{ename(err)}{self.context()}"
        want = min(len(payload), v.size - off)
        assert got == want, f"pwrite({what}, {len(payload)} at {off}) of {v.size} " \
            f"returned {got}, want {want} (short at the end)"
        v.write(off, payload)
        STATS["bytes_written"] += got

    @precondition(lambda self: any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def punch_hole(self, data):
        parts, v = self.pick_vol(data)
        off = self.offset(data, v)
        n = data.draw(st.sampled_from([512, 4096, 65536, 100000, 1 << 20, 16 << 20]), label="length")
        try:
            fd = self.open_vol(parts, os.O_WRONLY)
        except OSError as e:
            assert v.readonly and e.errno == errno.EROFS, (parts, e)
            return
        try:
            err = punch(fd, off, n)
            if not INTERPOSER:      # FUSEARRAY_NATIVE=0: no fallocate op (tests/fallbacks.py)
                assert err == errno.EOPNOTSUPP, f"punch without the interposer: {ename(err)}"
                zero_range(fd, off, n)      # the documented fallback: zeros are free
                err = 0
        finally:
            os.close(fd)
        STATS["punches"] += 1
        assert err == 0, f"punch {'/'.join(parts)} {off}+{n} of {v.size}: {ename(err)}"
        v.zero(off, n)

    @precondition(lambda self: any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def fsync(self, data):
        everything = data.draw(st.booleans(), label="all")
        targets = self.visible() if everything else [self.pick_vol(data)]
        for parts, v in targets:
            fd = self.open_vol(parts, os.O_RDONLY if v.readonly else os.O_WRONLY)
            try:
                (os.fsync if data.draw(st.booleans(), label="fsync") else os.fdatasync)(fd)
            finally:
                os.close(fd)
            v.synced()
            STATS["fsyncs"] += 1

    @precondition(lambda self: any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def truncate(self, data):
        """truncate and O_TRUNC leave a LUN's size and content alone (a block
        device); on a read-only volume they are EROFS."""
        parts, v = self.pick_vol(data)
        how = data.draw(st.sampled_from(["truncate", "O_TRUNC"]), label="how")
        size = data.draw(st.sampled_from([0, 512, v.size + MiB]), label="to")
        try:
            if how == "truncate":
                os.truncate(self.m.path(*parts), size)
            else:
                os.close(os.open(self.m.path(*parts), os.O_WRONLY | os.O_TRUNC))
            err = 0
        except OSError as e:
            err = e.errno
        want = errno.EROFS if v.readonly else 0
        assert err == want, f"{how} {'/'.join(parts)} to {size}: {ename(err)}, want {ename(want)}"

    @precondition(lambda self: self.lost is None and self.luns)
    @rule(pack=st.sampled_from(PACKS))
    @counted
    def scrub(self, pack):
        """Nothing to repair and nothing lost on a healthy pack."""
        _, reply = self.cmd("scrub", pack)
        jid = reply["job"]
        j = wait_for(lambda: (j := self.job_state(jid))["state"] not in ACTIVE and j, 120,
                     f"scrub job {jid}")
        assert j["state"] == "done" and j.get("repaired") == "0" and j.get("lost") == "0", j
        self.jobs[jid] = Job(jid, "scrub", "done")

    @precondition(lambda self: len(self.held) < 2 and any(True for _ in self.visible()))
    @rule(data=st.data())
    @counted
    def hold_open(self, data):
        parts, v = self.pick_vol(data)
        writable = not v.readonly
        fd = self.open_vol(parts, os.O_RDWR if writable else os.O_RDONLY)
        self.held.append((fd, v, writable))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    @counted
    def use_held(self, data):
        i = data.draw(st.integers(0, len(self.held) - 1), label="held")
        fd, v, writable = self.held[i]
        action = data.draw(st.sampled_from(["write", "read", "close"]), label="action")
        if action == "close":
            os.close(fd)
            del self.held[i]
        elif action == "write" and writable:
            off = self.offset(data, v) if v.size else 0
            n = data.draw(st.sampled_from([100, 4096, 70000]), label="length")
            self._pwrite(fd, v, off, self.payload(data, n), f"held fd of {v}")
        elif action == "read" and not v.deleted:
            got = read_fd(fd, v.size + 4096)
            v.check(got, f"a descriptor held open on {v}", after_crash=False)
            STATS["bytes_checked"] += len(got)

    # ---- shadow copies ------------------------------------------------------------------
    @precondition(lambda self: self.luns and self.n_shadows() < MAX_SHADOWS)
    @rule(data=st.data())
    @counted
    def snapshot(self, data):
        self.refresh_jobs()
        names = data.draw(st.lists(st.sampled_from(sorted(self.luns)), min_size=1, max_size=3,
                                   unique=True), label="luns")
        bad = data.draw(st.sampled_from([None] * 6 + ["missing", "twice", "set exists"]),
                        label="bad")
        set_name = data.draw(st.sampled_from([None, None] + SET_NAMES), label="set")
        context = data.draw(st.sampled_from(["differential", "differential", "plex"]),
                            label="context")
        pack = data.draw(st.sampled_from([None, None, "main", "p2"]), label="pack")
        hidden = data.draw(st.sampled_from([False, False, False, True]), label="hidden")
        must, maybe = set(), set()
        if bad == "missing":
            names.append("nolun")
            must.add(errno.ENOENT)
        elif bad == "twice":
            names.append(names[0])
            must.add(errno.EINVAL)
        elif bad == "set exists" and self.sets:
            set_name = data.draw(st.sampled_from(sorted(self.sets)), label="existing set")
        if set_name in self.sets:
            must.add(errno.EEXIST)
        for n in names:
            v = self.luns.get(n)
            if v is None:
                continue
            if context == "differential" and pack and pack != v.pack:
                must.add(errno.EOPNOTSUPP)
            self.copy_busy(v, must, maybe)
        line = " ".join(names) + (f" set={set_name}" if set_name else "") \
            + (f" context={context}" if context != "differential" or data.draw(
                st.booleans(), label="say context") else "") \
            + (f" pack={pack}" if pack else "") + (" hidden=yes" if hidden else "")
        err, reply = self.cmd("snapshot", line, must, maybe)
        self.after_race(err)
        if err:
            return
        got = reply["set"]
        if set_name:
            assert got == set_name, reply
        members, copying = {}, []
        for n in names:
            lun = self.luns[n]
            s = Vol(lun.size, lun.bs, pack or lun.pack, lun.cur)
            s.readonly, s.hidden, s.context = True, hidden, context
            if s.pack != lun.pack:
                copying.append(s)
            members[n] = s
        self.new_set(got, members)
        if copying:
            assert "job" in reply, reply
            self.add_copy_job(reply["job"], "plex", copying, data)
        else:
            assert "job" not in reply, reply

    def add_copy_job(self, jid: str, kind: str, vols, data) -> None:
        job = Job(jid, kind, "active", vols)
        self.jobs[jid] = job
        for v in vols:
            v.copying = jid
        rate = data.draw(st.sampled_from([None, None, "256K", "1M"]), label="throttle")
        if rate:
            err, _ = self.cmd("throttle", f"{jid} {rate}", maybe={errno.EINVAL})
            if err:     # it ended first
                self.refresh_jobs()
                assert job.state == "done", job

    @precondition(lambda self: self.sets)
    @rule(data=st.data())
    @counted
    def delete_shadow(self, data):
        s = data.draw(st.sampled_from(sorted(self.sets)), label="set")
        one = data.draw(st.booleans(), label="one")
        force = data.draw(st.booleans(), label="force")
        members = self.sets[s]
        if one:
            n = data.draw(st.sampled_from(sorted(members) + ["nolun"]), label="member")
            target, vols = f"{s}/{n}", [members[n]] if n in members else []
        else:
            target, vols = s, list(members.values())
        must = set()
        if not vols:
            must.add(errno.ENOENT)
        elif any(self.held_count(v) for v in vols) and not force:
            must.add(errno.EBUSY)
        err, _ = self.cmd("delete", target + (" force=yes" if force else ""), must)
        if err == 0:
            for v in vols:
                self.drop_vol(v)
                for n, mv in list(members.items()):
                    if mv is v:
                        del members[n]
            if not members:
                del self.sets[s]

    def shadow_paths(self):
        return sorted(f"{s}/{n}" for s, m in self.sets.items() for n in m)

    def shadow(self, path: str):
        s, _, n = path.partition("/")
        return self.sets.get(s, {}).get(n)

    @precondition(lambda self: self.sets)
    @rule(data=st.data())
    @counted
    def resync(self, data):
        self.refresh_jobs()
        npairs = data.draw(st.sampled_from([1, 1, 1, 2]), label="pairs")
        pairs = []
        for _ in range(npairs):
            src = data.draw(st.sampled_from(self.shadow_paths() + ["s9/l0"]), label="source")
            dest = data.draw(st.sampled_from([None, None] + LUN_NAMES), label="dest")
            pairs.append((src, dest))
        pack = data.draw(st.sampled_from([None, None, None, "main", "p2"]), label="pack")
        force = data.draw(st.booleans(), label="force")
        undo = self.n_shadows() + npairs <= MAX_SHADOWS and data.draw(st.booleans(), label="undo")
        must, maybe, plan, dests = set(), set(), [], set()
        for src_path, dest in pairs:
            src = self.shadow(src_path)
            dname = dest or src_path.partition("/")[2]
            if src is None:
                must.add(errno.ENOENT)
                continue
            if dname in dests:
                must.add(errno.EINVAL)
            dests.add(dname)
            self.copy_busy(src, must, maybe)
            d = self.luns.get(dname)
            if d is not None:
                if self.held_count(d) and not force:
                    must.add(errno.EBUSY)
                if d.readonly:
                    must.add(errno.EROFS)
                self.copy_busy(d, must, maybe)
            dpack = pack or (d.pack if d else src.pack)
            if d is not None and d.pack != dpack:
                must.add(errno.EOPNOTSUPP)
            plan.append((src, dname, dpack))
        line = " ".join(f"{s}={d}" if d else s for s, d in pairs) \
            + (f" pack={pack}" if pack else "") + (" force=yes" if force else "") \
            + ("" if undo else " undo=no")
        err, reply = self.cmd("resync", line, must, maybe)
        self.after_race(err)
        if err:
            return
        undo_sets = reply.get("undo", "").split(",") if reply.get("undo") else []
        copying, undo_i = [], 0
        for src, dname, dpack in plan:
            d = self.luns.get(dname)
            if d is not None and undo:
                u = Vol(d.size, d.bs, d.pack, d.cur)
                u.readonly, u.context = True, "differential"
                assert undo_i < len(undo_sets), (reply, plan)
                self.new_set(undo_sets[undo_i], {dname: u})
                undo_i += 1
            if d is None:
                d = self.luns[dname] = Vol(src.size, src.bs, dpack)
            d.copy_of(src)
            if dpack != src.pack:
                copying.append(d)
        assert undo_i == len(undo_sets), (reply, plan)
        if copying:
            self.add_copy_job(reply["job"], "resync", copying, data)
        else:
            self.jobs[reply["job"]] = Job(reply["job"], "resync", "done")

    @precondition(lambda self: self.sets)
    @rule(data=st.data())
    @counted
    def swap(self, data):
        path = data.draw(st.sampled_from(self.shadow_paths() + ["s9/l0"]), label="shadow")
        as_name = data.draw(st.sampled_from([None, None] + LUN_NAMES), label="as")
        force = data.draw(st.booleans(), label="force")
        src = self.shadow(path)
        name = as_name or path.partition("/")[2]
        old = self.luns.get(name)
        must = set()
        if src is None:
            must.add(errno.ENOENT)
        else:
            if as_name and old is not None:
                must.add(errno.EEXIST)
            if old is not None and self.held_count(old) and not force:
                must.add(errno.EBUSY)
            if self.held_count(src) and not force:
                must.add(errno.EBUSY)
        err, reply = self.cmd("swap", path + (f" as={as_name}" if as_name else "")
                              + (" force=yes" if force else ""), must)
        if err:
            return
        s, _, n = path.partition("/")
        if old is not None:
            self.drop_vol(self.luns.pop(name))
        del self.sets[s][n]
        if not self.sets[s]:
            del self.sets[s]
        src.readonly = src.hidden = False
        src.context = None
        self.luns[name] = src
        assert reply.get("lun") == name and (src.wwn is None or reply.get("wwn") == src.wwn), \
            (reply, src.wwn)

    @precondition(lambda self: self.luns or self.sets)
    @rule(data=st.data())
    @counted
    def tag(self, data):
        flag = data.draw(st.sampled_from(["readonly", "hidden"]), label="flag")
        target = data.draw(st.sampled_from(sorted(self.luns) + self.shadow_paths() + ["nolun"]),
                           label="target")
        on = data.draw(st.booleans(), label="on")
        v = self.shadow(target) if "/" in target else self.luns.get(target)
        err, _ = self.cmd(flag, f"{target} {'on' if on else 'off'}",
                          {errno.ENOENT} if v is None else ())
        if err == 0:
            setattr(v, flag, on)

    # ---- jobs --------------------------------------------------------------------------
    def live_jobs(self):
        return sorted((j for j in self.jobs.values() if j.state in ("active", "paused")),
                      key=lambda j: int(j.id))

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    @counted
    def control_job(self, data):
        self.refresh_jobs()
        action = data.draw(st.sampled_from(["pause", "resume", "cancel", "throttle"]),
                           label="action")
        job = data.draw(st.sampled_from(sorted(self.jobs.values(), key=lambda j: int(j.id))
                                        + [None]), label="job")
        jid = job.id if job else "999"
        line = jid + (" " + data.draw(st.sampled_from(["0", "512K", "64M"]), label="rate")
                      if action == "throttle" else "")
        if job is None:
            self.cmd(action, line, {errno.ENOENT})
            return
        if job.state not in ("active", "paused"):
            self.cmd(action, line, {errno.EINVAL})
            return
        err, reply = self.cmd(action, line, maybe={errno.EINVAL})
        if err:          # it ended just before
            self.refresh_jobs()
            assert job.state == "done", job
            return
        if action == "pause":
            job.state = "paused"
        elif action == "resume":
            job.state = "active"
        elif action == "cancel":
            j = wait_for(lambda: (j := self.job_state(jid))["state"] not in ACTIVE and j, 60,
                         f"job {jid} to end after cancel")
            assert j["state"] in ("cancelled", "done"), j
            if j["state"] == "done":
                self.job_done(job)
            else:
                job.state = "cancelled"

    @precondition(lambda self: any(j.state in ("active", "paused") for j in self.jobs.values()))
    @rule(data=st.data())
    @counted
    def finish_job(self, data):
        job = data.draw(st.sampled_from(self.live_jobs()), label="job")
        for verb, line in (("throttle", f"{job.id} 0"), ("resume", job.id)):
            err, _ = self.cmd(verb, line, maybe={errno.EINVAL})
        wait_for(lambda: self.job_state(job.id)["state"] not in ACTIVE, 120,
                 f"job {job.id} to finish")
        self.refresh_jobs()
        assert job.state == "done", (job, self.job_state(job.id))

    # ---- crashes, remounts, disks ---------------------------------------------------------
    def close_held(self) -> None:
        for fd, _, _ in self.held:
            try:
                os.close(fd)
            except OSError:
                pass
        self.held.clear()

    @precondition(lambda self: self.steps_since_restart >= 3)
    @rule(how=st.sampled_from(["kill", "sync and kill", "unmount"]))
    @counted
    def restart(self, how):
        """SIGKILL (after an fsync of every visible volume, or not) and
        restart, or a clean unmount and mount."""
        self.steps_since_restart = 0
        if how == "unmount":
            return self.remount()
        if how == "sync and kill":
            for parts, v in self.visible():
                fd = self.open_vol(parts, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                v.synced()
        self.m.kill9(then=self.close_held)
        STATS["sigkills"] += 1
        self.m.start()
        self.events_seen = 0
        self.verify_after_restart()
        # a job's pause, resume and throttle need not survive a crash: it is
        # running or paused, and it goes on from where it was
        for job in self.live_jobs():
            j = self.job_state(job.id)
            assert j["state"] in ACTIVE + ("done",), (job, j)
            if j["state"] == "done":
                self.job_done(job)
            else:
                job.state = "paused" if j["state"] == "paused" else "active"

    def verify_after_restart(self) -> None:
        for parts, v, visible in list(self.vols()):
            target = "/".join(parts[1:])
            if not visible:
                self.cmd("hidden", f"{target} off")
            with open(self.m.path(*parts), "rb") as f:
                got = f.read()
            STATS["bytes_checked"] += len(got)
            v.check(got, f"{'/'.join(parts)} after SIGKILL and restart", after_crash=True)
            v.cur = bytearray(got)
            v.alts = {}
            if not visible:
                self.cmd("hidden", f"{target} on")

    def remount(self):
        """A clean unmount stores everything: then `tools/fsck` finds the
        array consistent, and after the mount every volume reads exactly as
        the model and counts as allocated exactly its non-zero blocks."""
        self.close_held()
        self.m.stop()
        r = run([PY, str(TOOLS / "fsck"), self.m.array], check=False)
        assert r.returncode == 0, f"fsck after a clean unmount:\n{r.stdout}{r.stderr}"
        self.m.start()
        STATS["remounts"] += 1
        self.events_seen = 0
        for _, v, _ in self.vols():
            v.synced()
        s = self.m.status()
        got = {("", v["name"]): v for v in s["luns"]}
        got.update({(st_["name"], v["name"]): v for st_ in s["sets"]
                    for v in st_["shadow_copies"]})
        for parts, v, _ in self.vols():
            key = ("", parts[1]) if parts[0] == "luns" else (parts[1], parts[2])
            nonzero = sum(1 for b in range(-(-v.size // v.bs)) if any(v.block(b)))
            want = min(nonzero * v.bs, v.size)
            assert got[key]["allocated_bytes"] == want, \
                f"{'/'.join(parts)}: allocated_bytes {got[key]['allocated_bytes']}, " \
                f"{nonzero} non-zero blocks of {v.bs} in the model ({want})"

    @precondition(lambda self: self.lost is None and self.losses < 2
                  and self.steps_since_restart >= 2)
    @rule(disk=st.sampled_from(["d1", "d2"]), how=st.sampled_from(["rm", "rename"]))
    @counted
    def lose_disk(self, disk, how):
        path = self.disks[disk]
        if how == "rm":
            shutil.rmtree(path)
        else:
            os.rename(path, path + ".away")
        self.lost = (disk, how)
        self.losses += 1
        STATS["disk_faults"] += 1
        i = 0 if disk == "d1" else 1

        def degraded():
            p = self.pack_status("main")
            return p["state"] == "degraded" and p["disks"][i]["state"] in ("missing", "failed")
        wait_for(degraded, 30, f"pack main to be degraded after disk {disk} went away")

    @precondition(lambda self: self.lost is not None)
    @rule()
    @counted
    def bring_disk_back(self):
        disk, how = self.lost
        path = self.disks[disk]
        if how == "rm":
            os.mkdir(path)
        else:
            os.rename(path + ".away", path)
        self.lost = None
        err, reply = self.cmd("recover", "main")
        jid = reply["job"]
        j = wait_for(lambda: (j := self.job_state(jid))["state"] not in ACTIVE and j, 120,
                     f"recover job {jid}")
        assert j["state"] == "done", j
        self.jobs[jid] = Job(jid, "recover", "done")
        wait_for(lambda: self.pack_status("main")["state"] == "healthy", 30,
                 "pack main healthy after recover")

    def pack_status(self, name):
        return next(p for p in self.m.status()["packs"] if p["name"] == name)

    # ---- invariants --------------------------------------------------------------------
    @invariant()
    @counted
    def daemon_alive(self):
        self.steps_since_restart += 1
        STATS["steps"] += 1
        assert self.m.proc is not None and self.m.proc.poll() is None, \
            "the daemon died:\n" + self.m.output()[-3000:]
        assert os.path.ismount(self.m.mnt)

    @invariant()
    @counted
    def status_matches(self):
        s = self.m.status()
        self.refresh_jobs()
        got = {v["name"]: v for v in s["luns"]}
        assert sorted(got) == sorted(self.luns), (sorted(got), sorted(self.luns))
        wwns = {}
        for name, v in self.luns.items():
            self._check_vol_status(got[name], v, f"LUN {name}", wwns)
        gsets = {x["name"]: x for x in s["sets"]}
        assert sorted(gsets) == sorted(self.sets), (sorted(gsets), sorted(self.sets))
        for sname, members in self.sets.items():
            gm = {x["name"]: x for x in gsets[sname]["shadow_copies"]}
            assert sorted(gm) == sorted(members), (sname, sorted(gm), sorted(members))
            for n, v in members.items():
                self._check_vol_status(gm[n], v, f"shadow copy {sname}/{n}", wwns)
                assert gm[n]["context"] == v.context, (sname, n, gm[n], v.context)
        gjobs = {str(j["id"]): j for j in s["jobs"]}
        assert sorted(gjobs) == sorted(self.jobs), (sorted(gjobs), sorted(self.jobs))
        allowed = {"active": ("queued", "running", "done"), "paused": ("paused", "done"),
                   "cancelled": ("cancelled",), "done": ("done",)}
        for jid, job in self.jobs.items():
            assert gjobs[jid]["state"] in allowed[job.state], (job, gjobs[jid])
            assert gjobs[jid]["kind"] == job.kind, (job, gjobs[jid])
        packs = {p["name"]: p for p in s["packs"]}
        assert packs["p2"]["state"] == "healthy", packs["p2"]
        main = packs["main"]
        if self.lost is None:
            assert main["state"] == "healthy" and all(
                d["state"] == "online" for d in main["disks"]), main
        else:
            assert main["state"] == "degraded", main

    def _check_vol_status(self, got: dict, v: Vol, what: str, wwns: dict) -> None:
        want = {"size": v.size, "pack": v.pack, "readonly": v.readonly, "hidden": v.hidden}
        have = {k: got[k] for k in want}
        assert have == want, f"{what} in status.json: {have}, the model has {want}"
        if v.wwn is None:
            v.wwn = got["wwn"]
        assert got["wwn"] == v.wwn, f"{what}: WWN changed from {v.wwn} to {got['wwn']}"
        assert v.wwn not in wwns, f"{what} has the WWN of {wwns.get(v.wwn)}"
        wwns[v.wwn] = what

    @invariant()
    @counted
    def listings_match(self):
        luns = sorted(os.listdir(self.m.path("luns")))
        assert luns == sorted(n for n, v in self.luns.items() if not v.hidden), luns
        for n, v in self.luns.items():
            if v.hidden:
                try:
                    os.stat(self.m.path("luns", n))
                    raise AssertionError(f"hidden LUN {n} answers a lookup")
                except FileNotFoundError:
                    pass
        want_sets = sorted(s for s, m in self.sets.items() if any(not v.hidden for v in m.values()))
        assert sorted(os.listdir(self.m.path("snapshots"))) == want_sets
        for s in want_sets:
            got = sorted(os.listdir(self.m.path("snapshots", s)))
            assert got == sorted(n for n, v in self.sets[s].items() if not v.hidden), (s, got)

    @invariant()
    @counted
    def contents_match(self):
        for parts, v in self.visible():
            fd = os.open(self.m.path(*parts), os.O_RDONLY)
            try:
                assert os.fstat(fd).st_size == v.size, (parts, os.fstat(fd).st_size, v.size)
                got = read_fd(fd, v.size + 4096)    # a read past the end returns nothing
            finally:
                os.close(fd)
            STATS["bytes_checked"] += len(got)
            try:
                v.check(got, "/".join(parts), after_crash=False)
            except AssertionError as e:
                raise AssertionError(str(e) + self.context()) from None

    @invariant()
    @counted
    def no_internal_errors(self):
        lines = self.m.events().splitlines()
        new, self.events_seen = lines[self.events_seen:], len(lines)
        bad = [l for l in new if "internal error" in l or "Traceback" in l]
        assert not bad, "internal errors logged:\n" + "\n".join(bad)


def summary() -> str:
    s = STATS
    return (f"model-based test: {s['examples']} examples, {s['steps']} steps, "
            f"{s['commands']} ctl commands "
            f"({s['refused']} writes refused as expected), {s['writes']} writes "
            f"({s['bytes_written']} bytes), {s['punches']} hole punches, {s['fsyncs']} fsyncs, "
            f"{s['bytes_checked']} bytes read and checked, {s['sigkills']} SIGKILLs, "
            f"{s['remounts']} clean remounts, {s['disk_faults']} disk losses, 0 bytes lost")


def run_model(base: Path, settings_obj=None, seed=None) -> str:
    ArrayMachine.base = Path(base)
    STATS.clear()
    if settings_obj is None:
        settings_obj, seed = settings_for_ci()
    # a seed for a long run (Hypothesis takes it from the factory's attribute)
    ArrayMachine._hypothesis_internal_use_seed = seed
    run_state_machine_as_test(ArrayMachine, settings=settings_obj)
    return summary()


def test_model_based(tmp_path, capsys):
    """Random sequences of commands, I/O, crashes, remounts and a disk loss,
    each step checked against the model (see the module docstring)."""
    require_fuse()
    line = run_model(tmp_path)
    with capsys.disabled():
        print("\n" + line)
