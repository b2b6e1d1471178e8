"""Durability under ENOSPC (issue 13, defect 1 and "Also seen"; DESIGN 4.1),
on real mounts whose pack lives on a small tmpfs:

- fsync returns 0 only when every write acknowledged before it is stored
  and committed; while any is not, EVERY fsync returns the error, until the
  data is stored (space freed) or explicitly dropped (`umount --discard`);
- after SIGKILL and a restart, every write a successful fsync covered is
  there (compared by hash), whatever failed after it;
- `fusearray umount` with data that cannot be stored fails loudly;
- writes are accepted again as soon as space is freed;
- a reserve lets a full pack take the metadata writes that free space, and
  ext4 that filled a thin pack mounts again so fstrim can free it.

Writes are 1 MiB O_DIRECT, as a database or a loop device sends them. Every
tmpfs is unmounted in `finally`, after the daemon using it has ended.
"""
import contextlib
import errno
import hashlib
import mmap
import os
import random

from conftest import cli, run
from fallbacks import INTERPOSER, fallocate_punch, fstrim, punch_hole

MiB = 1 << 20
NOT_STORED = (errno.ENOSPC, errno.EIO)


@contextlib.contextmanager
def small_tmpfs(path, size="64M"):
    path.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    try:
        yield path
    finally:
        if run(["umount", str(path)], check=False).returncode:
            run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def full_pack_mount(make_mount, tmp_path, cache_size=256 * MiB, size="64M"):
    """A mounted array whose pack `main` is one disk on a tmpfs of `size`.
    Yields (mount, tmpfs path)."""
    with small_tmpfs(tmp_path / "tmpfs", size) as t:
        m = make_mount("a", cache_size=cache_size)
        try:
            m.init("--pack", f"main=single:{t}/d").start()
            yield m, t
        finally:
            m.close()       # the daemon ends before its tmpfs goes


def digest(b) -> str:
    return hashlib.sha256(b).hexdigest()


class Writer:
    """O_DIRECT 1 MiB writes to a LUN and fsyncs, with the model of what
    was acknowledged and what a successful fsync covered."""

    def __init__(self, m, lun: str, seed: int):
        self.m, self.lun = m, lun
        self.rng = random.Random(seed)
        self.buf = mmap.mmap(-1, MiB)          # page aligned, for O_DIRECT
        self.fd = os.open(m.path("luns", lun), os.O_WRONLY | os.O_DIRECT)
        self.acked: dict = {}                  # offset -> sha256 of what was written
        self.synced: dict = {}                 # what the last successful fsync covered
        self.fsync_errors: list = []

    def write(self, off: int) -> int:
        """0, or the errno of a failed write."""
        data = self.rng.randbytes(MiB)
        self.buf[:] = data
        try:
            n = os.pwrite(self.fd, self.buf, off)
        except OSError as e:
            return e.errno
        assert n == MiB, n
        self.acked[off] = digest(data)
        return 0

    def fsync(self) -> int:
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.fsync_errors.append(e.errno)
            return e.errno
        self.synced = dict(self.acked)
        return 0

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def check(self, covered: dict | None = None, what: str = "") -> int:
        """Every write in `covered` (default: what a successful fsync
        covered) reads back as written. Returns the bytes checked."""
        covered = self.synced if covered is None else covered
        fd = os.open(self.m.path("luns", self.lun), os.O_RDONLY)
        try:
            lost = [off for off, want in sorted(covered.items())
                    if digest(os.pread(fd, MiB, off)) != want]
        finally:
            os.close(fd)
        assert not lost, (f"{len(lost)} MiB acknowledged by a successful fsync are lost "
                          f"{what} (offsets {[o // MiB for o in lost[:8]]} MiB...)")
        return len(covered) * MiB


def restart_after_kill(m, w: Writer) -> None:
    w.close()
    m.kill9()
    m.start()


def fill_until_refused(w: Writer, start: int, limit: int, fsync_every: int = 0) -> tuple:
    """Writes 1 MiB after 1 MiB from `start` until a write or an fsync
    fails. Returns (next offset, errno of the write or None, errno of the
    fsync or None)."""
    off = start
    while off < limit:
        err = w.write(off)
        if err:
            return off, err, None
        off += MiB
        if fsync_every and (off - start) % fsync_every == 0:
            err = w.fsync()
            if err:
                return off, None, err
    raise AssertionError(f"the pack took {(off - start) // MiB} MiB without refusing: "
                         "it is not full (test set-up)")


# ---- 1. fsync on a full pack ------------------------------------------------------
def check_fsyncs(w: Writer, results: list) -> None:
    """The contract on a run of fsyncs with nothing freed in between: once
    one fails, every later one fails too."""
    failed = [i for i, r in enumerate(results) if r]
    assert all(r in NOT_STORED for r in results if r), results
    if failed:
        assert all(results[failed[0]:]), (
            f"fsync #{results.index(0, failed[0]) + 1} returned 0 after fsync "
            f"#{failed[0] + 1} failed, with nothing freed: {results}")


def test_fsync_after_enospc_never_lies(make_mount, tmp_path):
    """ISSUE13 #1: 1 MiB O_DIRECT writes until ENOSPC (115 were acknowledged
    on a 64 MiB pack, fsync returned 0 twice and after SIGKILL only 48 MiB
    were there). Now the pack refuses the write itself, so what it
    acknowledged is stored: fsync returns 0 and SIGKILL loses nothing;
    had fsync failed, it would have had to fail every time."""
    with full_pack_mount(make_mount, tmp_path) as (m, t):
        m.ok("create", "l 256M")
        w = Writer(m, "l", 1)
        try:
            for off in range(0, 8 * MiB, MiB):
                assert w.write(off) == 0
            assert w.fsync() == 0
            off, werr, _ = fill_until_refused(w, 8 * MiB, 256 * MiB)
            assert werr == errno.ENOSPC, errno.errorcode.get(werr)
            assert len(w.acked) > 8
            results = [w.fsync() for _ in range(3)]
            check_fsyncs(w, results)
            assert results[0] == 0, ("the pack acknowledged writes it could not store "
                                     f"({len(w.acked)} MiB on a 64 MiB pack): {results}")
            restart_after_kill(m, w)
            w.check(what="after SIGKILL on a full pack")
        finally:
            w.close()


def test_fsync_every_8m_on_a_full_pack(make_mount, tmp_path):
    """ISSUE13 #1: fsync every 8 MiB (the first fsync got ENOSPC, the next
    returned 0: 8 MiB lost). Every fsync that returns 0 covers all that
    was acknowledged, checked after SIGKILL."""
    with full_pack_mount(make_mount, tmp_path) as (m, t):
        m.ok("create", "l 256M")
        w = Writer(m, "l", 2)
        try:
            off, werr, ferr = fill_until_refused(w, 0, 256 * MiB, fsync_every=8 * MiB)
            assert werr in (None, errno.ENOSPC) and (werr or ferr)
            results = [ferr] if ferr else []
            for i in range(3):            # with no new write, and after more writes
                results.append(w.fsync())
                w.write(off)
                off += MiB
            check_fsyncs(w, results)
            restart_after_kill(m, w)
            w.check(what="after SIGKILL (fsync every 8 MiB)")
        finally:
            w.close()


def fill_host_fs(t, name="filler") -> str:
    """Fill the tmpfs holding the pack from outside (a file next to the
    disk directory) until ENOSPC."""
    p = os.path.join(t, name)
    chunk = b"\xa5" * MiB
    with open(p, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return p


def test_fsync_fails_when_the_host_fs_is_filled_from_outside(make_mount, tmp_path):
    """ISSUE13 #1: the pack's filesystem filled by another writer (4 MiB
    were lost so); once the space is back, the next fsync stores it all."""
    with full_pack_mount(make_mount, tmp_path) as (m, t):
        m.ok("create", "l 256M")
        w = Writer(m, "l", 3)
        filler = None
        try:
            for off in range(0, 8 * MiB, MiB):
                assert w.write(off) == 0
            assert w.fsync() == 0
            filler = fill_host_fs(t)
            for off in range(8 * MiB, 12 * MiB, MiB):
                w.write(off)          # taken by the cache, or refused: either is fine
            assert len(w.acked) > 8, "no write was acknowledged after the fill"
            for i in range(2):
                err = w.fsync()
                assert err in NOT_STORED, (f"fsync #{i + 1} returned 0 with the pack's "
                                           "filesystem full")
            os.unlink(filler)
            filler = None
            assert w.fsync() == 0, "fsync still fails after the space came back"
            restart_after_kill(m, w)
            w.check(w.acked, "after the space came back, an fsync and SIGKILL")
        finally:
            w.close()
            if filler:
                os.unlink(filler)


# ---- 4. writes are accepted again as soon as space is freed -------------------------
def refused_write(w: Writer, off: int) -> None:
    for _ in range(64):       # the cache takes some before the pack refuses
        err = w.write(off)
        if err:
            assert err == errno.ENOSPC, errno.errorcode.get(err)
            return
        off += MiB
    raise AssertionError("the full pack took 64 MiB more")


def test_first_write_after_space_freed_outside_succeeds(make_mount, tmp_path):
    """ISSUE13 "Also seen": writes got ENOSPC for about 3 s after space was
    freed on the host file system (the flush retry back-off)."""
    with full_pack_mount(make_mount, tmp_path, cache_size=32 * MiB) as (m, t):
        m.ok("create", "l 256M")
        w = Writer(m, "l", 4)
        filler = None
        try:
            for off in range(0, 4 * MiB, MiB):
                assert w.write(off) == 0
            assert w.fsync() == 0
            filler = fill_host_fs(t)
            refused_write(w, 4 * MiB)
            os.unlink(filler)
            filler = None
            err = w.write(100 * MiB)
            assert err == 0, (f"the first write after space was freed got "
                              f"{errno.errorcode.get(err)}")
            assert w.fsync() == 0
            restart_after_kill(m, w)
            w.check(w.acked, "after the space came back")
        finally:
            w.close()
            if filler:
                os.unlink(filler)


def test_first_write_after_a_punch_hole_on_a_full_pack_succeeds(make_mount, tmp_path):
    """A punch hole (fstrim through a loop device) on a full pack: the
    next write is taken, without waiting for a collection or a back-off."""
    with full_pack_mount(make_mount, tmp_path, cache_size=32 * MiB) as (m, t):
        m.ok("create", "l 256M")
        w = Writer(m, "l", 5)
        try:
            off = 0
            while w.write(off) == 0 and off < 200 * MiB:
                off += MiB
            assert off < 200 * MiB, "the pack never filled"
            assert w.fsync() == 0, "the full pack acknowledged writes it cannot store"
            if not INTERPOSER:
                # FUSEARRAY_NATIVE=0: no punch-hole (EOPNOTSUPP), and zeros
                # are refused like any write while the pack is full: the
                # space must be freed another way (README); nothing is lost
                fd = os.open(m.path("luns", "l"), os.O_WRONLY)
                try:
                    assert fallocate_punch(fd, 0, 32 * MiB) == errno.EOPNOTSUPP
                finally:
                    os.close(fd)
                restart_after_kill(m, w)
                w.check(w.acked, "after a refused punch hole")
                return
            punch_hole(m.path("luns", "l"), 0, 32 * MiB)     # no fsync after it
            for o in range(0, 32 * MiB, MiB):
                w.acked.pop(o, None)
            err = w.write(off)
            assert err == 0, (f"the first write after a 32 MiB punch hole got "
                              f"{errno.errorcode.get(err)}")
            assert w.fsync() == 0, "fsync fails after 32 MiB were punched out"
            restart_after_kill(m, w)
            w.check(w.acked, "after a punch hole freed space")
            fd = os.open(m.path("luns", "l"), os.O_RDONLY)
            try:
                assert os.pread(fd, 32 * MiB, 0) == bytes(32 * MiB)
            finally:
                os.close(fd)
        finally:
            w.close()


# ---- 2. umount with data that cannot be stored ---------------------------------------
def stuck_after_outside_fill(m, t, seed: int) -> tuple:
    """LUN `l` with 4 MiB synced, then the pack's file system filled from
    outside and 4 MiB more written: acknowledged (the cache took them),
    not storable. Returns (writer, path of the filler file)."""
    m.ok("create", "l 256M")
    w = Writer(m, "l", seed)
    for off in range(0, 4 * MiB, MiB):
        assert w.write(off) == 0
    assert w.fsync() == 0
    filler = fill_host_fs(t)
    for off in range(4 * MiB, 8 * MiB, MiB):
        w.write(off)
    assert len(w.acked) > len(w.synced), "no write was acknowledged after the fill"
    assert w.fsync() in NOT_STORED
    return w, filler


def test_umount_refuses_while_writes_are_not_stored(make_mount, tmp_path):
    """ISSUE13 #1: a clean `fusearray umount` with 66 MiB dirty exited 0
    and dropped it with no event. Now it exits non-zero, says why, the
    array stays mounted with the data; once space is freed it unmounts and
    everything acknowledged is there after a restart. (The pack's file
    system is filled from outside: the pack itself refuses writes it
    cannot store.)"""
    with full_pack_mount(make_mount, tmp_path, cache_size=32 * MiB) as (m, t):
        w, filler = stuck_after_outside_fill(m, t, 6)
        try:
            w.close()                 # nothing open: only the data keeps it mounted
            r = cli("umount", m.mnt, check=False)
            assert r.returncode == 1, (r.returncode, r.stderr)
            assert "not stored" in r.stderr and "--discard" in r.stderr, r.stderr
            assert os.path.ismount(m.mnt) and m.proc.poll() is None
            assert any("not stored" in l and "error" in l for l in m.events().splitlines())
            w.check(w.acked, "while the array refused to unmount (read from the cache)")
            os.unlink(filler)                 # space: the data is stored now
            m.stop()                          # exit 0, asserted
            m.start()
            w.check(w.acked, "after the unmount that waited for space")
        finally:
            w.close()


def test_umount_discard_drops_and_says_how_much(make_mount, tmp_path):
    """`fusearray umount --discard`: the unstored writes are dropped, an
    event says how much of which LUN; what fsync covered is there."""
    with full_pack_mount(make_mount, tmp_path, cache_size=32 * MiB) as (m, t):
        w, filler = stuck_after_outside_fill(m, t, 7)
        try:
            w.close()
            r = cli("umount", "--discard", m.mnt, check=False)
            assert r.returncode == 0, r.stderr
            assert "dropped" in r.stderr, r.stderr
            assert m.proc.wait(timeout=60) == 0
            m.proc = None
            m.start()
            w.check(what="after umount --discard")
            ev = [l for l in m.events().splitlines() if "dropped" in l]
            assert ev and "LUN l " in ev[-1] and "discard" in ev[-1], ev
        finally:
            w.close()


def test_daemon_ended_with_unstored_writes_exits_nonzero_and_says_so(make_mount,
                                                                        tmp_path):
    """An unmount that bypasses `fusearray umount` (SIGTERM here) with
    writes that cannot be stored: an error event and a non-zero exit."""
    with full_pack_mount(make_mount, tmp_path, cache_size=32 * MiB) as (m, t):
        w, filler = stuck_after_outside_fill(m, t, 8)
        try:
            w.close()
            m.proc.terminate()
            assert m.proc.wait(timeout=60) != 0, m.output()
            m.proc = None
            m.start()
            w.check(what="after SIGTERM")
            ev = [l for l in m.events().splitlines() if "not stored" in l and "lost" in l]
            assert ev and "LUN l " in ev[-1], m.events()[-3000:]
        finally:
            w.close()


# ---- 3. the reserve: a full pack frees itself, ext4 that filled it mounts again ------
def test_ext4_that_filled_a_thin_pack_mounts_again_and_fstrim_frees_it(make_mount,
                                                                       tmp_path):
    """ISSUE13 "Also seen": ext4 that filled a thin pack could not be
    mounted again (its superblock write got ENOSPC), so fstrim could not
    free it. Fill until the pack refuses, unmount ext4 (its writes may
    fail), mount it again, rm, fstrim: the pack takes writes again."""
    with full_pack_mount(make_mount, tmp_path, cache_size=32 * MiB) as (m, t):
        m.ok("create", "vol 128M")
        dev = m.attach("vol")
        run(["mkfs.ext4", "-q", "-E", "nodiscard", dev])
        where = str(tmp_path / "fs")
        m.mount_fs(dev, where)
        n = 0
        while n < 40:
            r = run(["dd", "if=/dev/urandom", f"of={where}/f{n}", "bs=1M", "count=4",
                     "conv=fsync", "status=none"], check=False)
            n += 1
            if r.returncode:
                break
        assert n < 40, "ext4 filled 160 MiB on a 64 MiB pack without an error"
        run(["umount", where], check=False)          # may fail to write back
        m.fs_mounts.remove(where)
        r = run(["mount", dev, where], check=False)
        assert r.returncode == 0, f"ext4 cannot be mounted again: {r.stderr}"
        m.fs_mounts.append(where)
        for i in range(n):
            try:
                os.unlink(f"{where}/f{i}")
            except FileNotFoundError:
                pass
        run(["sync"])            # the freed blocks are committed: fstrim sees them
        if not INTERPOSER:
            # FUSEARRAY_NATIVE=0: no discard, and zeros are refused like any
            # write while the pack is full, so the space stays used (README:
            # free it another way); ext4 mounted again and is consistent
            fstrim(where, fill=False)
            m.umount_fs(where)
            r = run(["e2fsck", "-fy", dev], check=False)
            assert r.returncode in (0, 1), r.stdout + r.stderr     # 1: errors fixed
            return
        fstrim(where)
        data = os.urandom(8 * MiB)
        with open(f"{where}/after", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        m.umount_fs(where)
        r = run(["e2fsck", "-fy", dev], check=False)
        assert r.returncode in (0, 1), r.stdout + r.stderr     # 1: errors fixed
        m.mount_fs(dev, where, "-o", "ro")
        with open(f"{where}/after", "rb") as f:
            assert f.read() == data
        m.umount_fs(where)
        m.detach("vol", dev)
