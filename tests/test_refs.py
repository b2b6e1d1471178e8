"""Reference counts (issue 16 point 4): a collection frees what nothing
references without walking the maps, a snapshot delete costs what that
snapshot alone held, the counts survive a crash, are made for an array
that predates them, and fsck catches a wrong one."""
import collections
import errno
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import trio

from fusearray import maps, refs
from fusearray.array import init_array
from fusearray.errors import ArrayError

from test_core import assert_clean, with_array

MiB = 1 << 20
TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


def _fsck(array, *args):
    return subprocess.run([sys.executable, os.path.join(TOOLS, "fsck"), array, *args],
                          capture_output=True, text=True)


class Spy:
    """Counts what a collection looks at: the ids whose counts it reads
    and the map nodes it reads (wraps the pack's index and the reader)."""

    def __init__(self, a, monkeypatch):
        self.ids = 0
        self.nodes_read = 0
        blocks = a.packs["main"].blocks
        orig = blocks.refs_blocking

        def counting(ids):
            ids = list(ids)
            self.ids += len(ids)
            return orig(ids)
        monkeypatch.setattr(blocks, "refs_blocking", counting)
        read = a.writeback.refs.read_locs

        async def reading(pack, bids, locs):
            self.nodes_read += len(bids)
            return await read(pack, bids, locs)
        monkeypatch.setattr(a.writeback.refs, "read_locs", reading)
        # also count every map walk: a collection must not mark
        self.walks = 0
        mark = maps.mark

        async def marking(*args, **kw):
            self.walks += 1
            return await mark(*args, **kw)
        monkeypatch.setattr(maps, "mark", marking)


async def test_deleting_one_snapshot_of_many_touches_only_what_it_alone_held(
        tmp_path, monkeypatch):
    """A LUN of 4096 blocks (4 leaves), 30 snapshots, each holding one
    block as no other copy has it: deleting the middle one frees exactly its root, its
    changed leaf and the one block no other copy holds; the collection
    walks no map and looks at about one leaf's entries, not at the ~4100
    blocks stored; every other copy still reads as it did."""
    init_array(str(tmp_path / "arr"), block_size=4096)
    rng = random.Random(5)

    async def body(a):
        vol = await a.create_lun("l", "16M")
        await vol.write(0, rng.randbytes(16 * MiB))
        await a.sync()
        for i in range(30):
            bno = 1500 + i          # all in the second leaf
            await vol.write(bno * 4096, rng.randbytes(4096))
            await a.sync()
            await a.snapshot(["l"], set_name=f"s{i:02}", quiesce=False)
            # written again: the content it had is snapshot i's alone
            await vol.write(bno * 4096, rng.randbytes(4096))
        await a.collect_garbage()
        stored = a.packs["main"].block_count()
        victim = a.sets["s15"].members["l"]
        unique_block = await maps.lookup(victim.root, victim.height, 1515,
                                         a.reader.loader(victim))
        reads = {n: bytes(await a.sets[n].members["l"].read(1500 * 4096, 30 * 4096))
                 for n in ("s14", "s16")}
        spy = Spy(a, monkeypatch)
        await a.delete_shadow("s15")
        await a.collect_garbage()
        # the root, the changed leaf of s15, and block 1515 as s15 had it
        assert stored - a.packs["main"].block_count() == 3
        assert a.packs["main"].lookup(unique_block) is None
        assert spy.walks == 0
        assert spy.nodes_read <= 2
        assert spy.ids < 1100 < stored, (spy.ids, stored)
        for n, data in reads.items():
            assert bytes(await a.sets[n].members["l"].read(1500 * 4096, 30 * 4096)) == data
        await assert_clean(a, strict=True)
    await with_array(tmp_path / "arr", body)


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_counts_follow_dedup_overwrites_resync_swap_and_shrink(tmp_path, seed):
    """Generated sequences of what changes references (writes of repeated
    and zero content, snapshots, deletes, same-pack and cross-pack resync,
    swap, shrink, collections): after each collection, fsck --strict
    finds every count right and nothing left that nothing reaches, and
    every LUN reads as the model."""
    rng = random.Random(seed)
    init_array(str(tmp_path / "arr"), block_size=4096)
    (tmp_path / "far").mkdir()
    pool = [rng.randbytes(4096) for _ in range(6)] + [bytes(4096)]

    async def body(a):
        await a.add_pack("far", "single", [str(tmp_path / "far")])
        model = {}
        for name in ("a", "b"):
            await a.create_lun(name, "4M")
            model[name] = bytearray(4 * MiB)
        nset = 0

        async def content(v):
            return bytearray(await v.read(0, v.size))
        done = collections.Counter()
        for step in range(250):
            op = rng.choice(["write"] * 6 + ["snap", "snap", "delsnap", "resync", "swap",
                                              "resize", "gc", "xresync", "dellun"])
            sets = sorted(s for s in a.sets if a.sets[s].members)
            if (op in ("delsnap", "resync", "xresync", "swap") and not sets) \
                    or (op == "dellun" and len(model) <= 2):
                continue
            try:
                if op == "write":
                    name = rng.choice(sorted(model))
                    off = rng.randrange(0, len(model[name]) // 4096) * 4096
                    n = rng.randrange(1, 9)
                    data = b"".join(rng.choice(pool) for _ in range(n))[:len(model[name]) - off]
                    await a.luns[name].write(off, data)
                    model[name][off:off + len(data)] = data
                elif op == "snap":
                    nset += 1
                    names = rng.sample(sorted(model), rng.randrange(1, len(model) + 1))
                    await a.snapshot(names, set_name=f"s{nset}", quiesce=False)
                elif op == "delsnap":
                    await a.delete_shadow(rng.choice(sets))
                elif op == "resync":
                    s = rng.choice(sets)
                    m = rng.choice(sorted(a.sets[s].members))
                    if m not in model or a.luns[m].pack is not a.sets[s].members[m].pack:
                        continue
                    await a.resync([f"{s}/{m}"], undo=rng.random() < 0.5)
                    model[m] = await content(a.luns[m])
                elif op == "xresync":
                    s = rng.choice(sets)
                    m = rng.choice(sorted(a.sets[s].members))
                    v = a.sets[s].members[m]
                    dest = f"x{step}"
                    other = "far" if v.pack.name == "main" else "main"
                    await a.resync([f"{s}/{m}={dest}"], pack=other, undo=False)
                    model[dest] = await content(v)
                elif op == "swap":
                    s = rng.choice(sets)
                    m = rng.choice(sorted(a.sets[s].members))
                    data = await content(a.sets[s].members[m])
                    await a.swap(f"{s}/{m}")
                    model[m] = data
                elif op == "resize":
                    name = rng.choice(sorted(model))
                    size = rng.randrange(1, 6) * MiB
                    await a.resize_lun(name, f"{size // MiB}M")
                    model[name] = model[name][:size] + bytes(max(0, size - len(model[name])))
                elif op == "dellun":
                    name = rng.choice(sorted(model))
                    await a.delete_lun(name)
                    del model[name]
                elif op == "gc":
                    await a.sync()
                    await a.collect_garbage()
                    await assert_clean(a, strict=True)
                done[op] += 1
            except ArrayError as e:    # (a copy still running: refused)
                assert e.errno == errno.EBUSY, e
            if step % 25 == 0:
                for name, m in model.items():
                    assert bytes(await a.luns[name].read(0, len(m))) == bytes(m), (step, name)
        for _ in range(600):            # the copies end (their maps are counted then)
            if all(j.state not in ("queued", "running") for j in a.jobs.values()):
                break
            await trio.sleep(0.05)
        await a.sync()
        await a.collect_garbage()
        await assert_clean(a, strict=True)
        for name, m in model.items():
            assert bytes(await a.luns[name].read(0, len(m))) == bytes(m), name
        # (each kind of change ran; the ones needing a set ran when there was one)
        assert set(done) == {"write", "snap", "delsnap", "resync", "swap", "resize", "gc",
                             "xresync", "dellun"}, done
    await with_array(tmp_path / "arr", body)


def test_counts_are_made_for_an_array_that_predates_them_and_fsck_checks_them(tmp_path):
    """A catalogue without the counts (columns and meta dropped, as an
    older fusearray left it) gets them at the next open, in one walk: fsck
    --strict is clean and a collection frees a deleted snapshot's blocks.
    A count changed by hand is reported by tools/fsck."""
    arr = str(tmp_path / "arr")
    init_array(arr)
    rng = random.Random(2)

    async def write(a):
        vol = await a.create_lun("l", "8M")
        await vol.write(0, rng.randbytes(4 * MiB))
        await a.sync()
        await a.snapshot(["l"], set_name="s", quiesce=False)
        await vol.write(0, rng.randbytes(2 * MiB))
        await a.sync()
        await a.collect_garbage()
    trio.run(with_array, tmp_path / "arr", write)
    db = sqlite3.connect(os.path.join(arr, "catalogue.db"), isolation_level=None)
    db.execute("DROP INDEX blocks_unref")
    db.execute("ALTER TABLE blocks DROP COLUMN refs")
    db.execute("ALTER TABLE blocks DROP COLUMN counted")
    db.execute("DELETE FROM meta WHERE key='refs'")
    db.close()

    async def reopen(a):
        assert any("reference counts made" in str(e) for e in a.events), a.events
        await assert_clean(a, strict=True)
        before = a.packs["main"].block_count()
        await a.delete_shadow("s")
        await a.collect_garbage()
        assert a.packs["main"].block_count() <= before - 32   # the 2 MiB s alone held
        await assert_clean(a, strict=True)
    trio.run(with_array, tmp_path / "arr", reopen)
    r = _fsck(arr, "--strict")
    assert r.returncode == 0 and "0 problem(s)" in r.stdout, r.stdout + r.stderr
    db = sqlite3.connect(os.path.join(arr, "catalogue.db"), isolation_level=None)
    (bid,) = db.execute("SELECT id FROM blocks WHERE refs=1 AND counted=0 LIMIT 1").fetchone()
    db.execute("UPDATE blocks SET refs=0 WHERE id=?", (bid,))
    db.close()
    r = _fsck(arr, "--no-data")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"block {bytes(bid).hex()} counts 0 reference(s), 1 expected" in r.stdout


def test_entries_counts_repeats_and_skips_zero():
    node = bytearray(maps.NODE_SIZE)
    a, b = b"\x01" * 16, b"\x02" * 16
    node[0:16] = a
    node[16:32] = b
    node[64:80] = a
    assert refs.entries(bytes(node)) == {a: 2, b: 1}


# ---- on a real mount ----------------------------------------------------------------
def test_sigkill_during_snapshot_deletes_loses_nothing_and_leaks_nothing(make_mount):
    """Shadow copies deleted from a shell (`ctl/delete`) while the daemon
    is SIGKILLed at a random moment of the delete and the freeing it
    starts, again and again: after each restart the LUN reads as fsync'd,
    every shadow copy is either gone whole or reads as when it was taken,
    and after a clean unmount `tools/fsck --strict` finds every count right
    and nothing unreferenced."""
    rng = random.Random(3)
    m = make_mount().init("--block-size", "4K")
    m.start()
    try:
        m.ok("create", "l 8M")
        lun = m.path("luns", "l")
        data = bytearray(rng.randbytes(8 * MiB))
        with open(lun, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        taken = {}
        for i in range(12):
            with open(lun, "r+b") as f:
                off = rng.randrange(0, 8 * MiB - 65536, 4096)
                piece = rng.randbytes(rng.choice([4096, 65536]))
                f.seek(off)
                f.write(piece)
                f.flush()
                os.fsync(f.fileno())
                data[off:off + len(piece)] = piece
            m.ok("snapshot", f"l set=s{i:02} quiesce=no")
            taken[f"s{i:02}"] = bytes(data)
        for trial in range(8):
            name = rng.choice(sorted(taken))
            def delete(n=name):
                try:
                    m.ctl("delete", n)
                except OSError:
                    pass            # (the daemon died under it)
            t = threading.Thread(target=delete, daemon=True)
            t.start()
            time.sleep(rng.uniform(0, 0.08))
            m.kill9()
            t.join(10)
            m.start()
            with open(lun, "rb") as f:
                assert f.read() == bytes(data), trial
            for s, content in list(taken.items()):
                p = m.path("snapshots", s, "l")
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        assert f.read() == content, (trial, s)
                else:
                    assert s == name, (trial, s)
                    del taken[s]
        assert len(taken) < 12
    finally:
        m.stop()
    r = _fsck(m.array, "--strict")
    assert r.returncode == 0 and "0 problem(s)" in r.stdout, r.stdout + r.stderr
