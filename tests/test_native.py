"""The native layer's façade (fusearray.native), without FUSE: the feature
flags, which implementation each caller gets with FUSEARRAY_NATIVE on and
off, the accelerators against their pure-Python fallbacks on random
inputs, and the version checks and their messages. What the interposer
does on a mount is proved by the mount tests (docs/native-contract.md
says which)."""
import json
import os
import random
import subprocess
import sys

import pytest
import xxhash

from fusearray import native

ON = native.ENABLED


def py(code: str, native_env: str | None = None) -> str:
    """Run `code` in a fresh interpreter (FUSEARRAY_NATIVE=native_env, or
    unset); its stdout."""
    env = dict(os.environ)
    env.pop(native.ENV, None)
    if native_env is not None:
        env[native.ENV] = native_env
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


CALLERS = """
import json
from fusearray import fs, native, store, streamsock, transport
print(json.dumps({
    "enabled": native.ENABLED,
    "store": [store._xor_into is native.xor_into, store._hash128_many is native.hash128_many,
              store._verify_mapped is native.verify_mapped],
    "transport": [transport._shim_hash64_many is native.hash64_many,
                  transport._shim_hash64_128_many is native.hash64_128_many],
    "streamsock": [streamsock._map_stream is native.map_stream,
                   streamsock._populate is native.populate],
    "fs": fs._reply_plan is native.reply_plan,
    "none": [n for n in ("xor_into", "hash128_many", "hash64_many", "hash64_128_many",
                         "verify_mapped", "map_stream", "populate")
             if getattr(native, n) is None],
    "report": native.report(),
}))
"""
NAMES = ["xor_into", "hash128_many", "hash64_many", "hash64_128_many", "verify_mapped",
         "map_stream", "populate"]


def test_switch_off_every_caller_gets_the_fallback():
    """FUSEARRAY_NATIVE=0: no native module is loaded, every accelerator
    name is None in the façade and in each module that uses it (so each
    runs its pure-Python fallback), and the report says why."""
    out = json.loads(py(CALLERS, "0"))
    assert out["enabled"] is False
    assert all(out["store"]) and all(out["transport"]) and all(out["streamsock"]) and out["fs"]
    assert out["none"] == NAMES
    r = out["report"]
    assert r["accel"] == "off" and r["interposer"] == "off"
    assert "FUSEARRAY_NATIVE=0" in r["why"]["_accel"]
    assert "FUSEARRAY_NATIVE=0" in r["why"]["_fuseshim"]
    code = ("import sys; from fusearray import native\n"
            "print(native.load_interposer(), 'fusearray._accel' in sys.modules,"
            " 'fusearray._fuseshim' in sys.modules)")
    assert py(code, "0").split() == ["None", "False", "False"]


def test_switch_on_every_caller_gets_the_accelerators():
    """Unset (the default): the accelerators are the C functions, and the
    modules use the façade's."""
    out = json.loads(py(CALLERS))
    assert out["enabled"] is True
    assert all(out["store"]) and all(out["transport"]) and all(out["streamsock"]) and out["fs"]
    assert out["none"] == [], "fusearray._accel is not built (or without xxhash.h)"
    assert out["report"]["accel"] == "on"


def test_the_interposer_loads_before_pyfuse3_and_uses_its_libfuse():
    """load_interposer() loads fusearray._fuseshim with RTLD_GLOBAL; pyfuse3
    then maps one libfuse only, the one the interposer links; after pyfuse3
    is imported it refuses to load, and says why."""
    code = ("import json; from fusearray import native\n"
            "sh = native.load_interposer()\n"
            "import pyfuse3\n"
            "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libfuse3.so' in l}\n"
            "print(json.dumps([sh is not None, sorted(maps), native.loaded_libfuse(),"
            " native.summary()]))")
    ok, maps, lib, summary = json.loads(py(code))
    assert ok, summary
    assert len(maps) == 1 and maps[0] == lib, maps
    assert "interposer on" in summary and lib in summary
    late = ("import pyfuse3; from fusearray import native\n"
            "print(native.load_interposer() is None, native.why()['_fuseshim'])")
    out = py(late)
    assert out.startswith("True") and "pyfuse3 was imported before" in out


def test_version_checks_and_their_messages():
    """The interposer is used only with the pyfuse3 and libfuse versions it
    was checked against; outside them the reason names the version and the
    range, and says what is lost."""
    lo, hi = native.PYFUSE3_CHECKED
    assert native.check_pyfuse3(f"{lo[0]}.{lo[1]}.0") is None
    assert native.check_pyfuse3(native.pyfuse3_version()) is None, \
        "the installed pyfuse3 is outside the checked range (pyproject.toml pins it)"
    msg = native.check_pyfuse3(f"{hi[0]}.{hi[1]}.0")
    assert f"pyfuse3 {hi[0]}.{hi[1]}.0" in msg and f"<{hi[0]}.{hi[1]}" in msg
    assert "fallocate" in msg
    assert native.check_pyfuse3("3.3.0") is not None
    assert native.check_pyfuse3("4.0.0rc1") is not None
    assert native.check_pyfuse3(None) == "pyfuse3 is not installed"
    for v in (314, 315, 316, 317, 318):
        assert native.check_libfuse(v) is None, v
    assert "libfuse 3.19 " in native.check_libfuse(319)
    assert "libfuse 3.13 " in native.check_libfuse(313)
    # a pyfuse3 outside the range: no interposer, the message in the report
    code = ("from fusearray import native\n"
            "native.pyfuse3_version = lambda: '3.9.1'\n"
            "print(native.load_interposer() is None); print(native.summary())")
    out = py(code)
    assert out.startswith("True") and "pyfuse3 3.9.1 is outside the range" in out


def test_version_tuple():
    assert native.version_tuple("3.5.0") == (3, 5, 0)
    assert native.version_tuple("3.4.2.post1") == (3, 4, 2)
    assert native.version_tuple("3.6rc1") == (3, 6)
    assert native.version_tuple("") == ()


def test_cli_version_reports_the_native_layer():
    exe = os.path.join(os.path.dirname(sys.executable), "fusearray")
    env = dict(os.environ, **{native.ENV: "0"})
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("fusearray ") and "accelerators off" in r.stdout
    assert "FUSEARRAY_NATIVE=0" in r.stdout


needs_accel = pytest.mark.skipif(not ON, reason="native modules disabled (FUSEARRAY_NATIVE=0)")


def _buffers(rng, n=40):
    out = []
    for _ in range(n):
        size = rng.choice([0, 1, 3, 16, 17, 128, 129, 240, 241, 1024, 4096, 65536,
                           rng.randrange(0, 200000)])
        data = rng.randbytes(size)
        kind = rng.randrange(4)
        out.append(data if kind == 0 else bytearray(data) if kind == 1 else
                   memoryview(data) if kind == 2 else bytes(size))
    return out


@needs_accel
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_accelerated_hashes_equal_the_python_fallbacks(seed):
    """hash128_many, hash64_many, hash64_128_many (both XXH3 builds) give
    exactly what their fallbacks (python-xxhash) give, on random buffers of
    random types and lengths."""
    rng = random.Random(seed)
    bufs = _buffers(rng)
    key = rng.getrandbits(64)
    want128 = [xxhash.xxh3_128_digest(b, key) for b in bufs]
    want64 = [xxhash.xxh3_64_digest(b) for b in bufs]
    for build in (0, 1):
        assert native.hash128_many(bufs, key, build) == want128
        assert native.hash64_many(bufs, build) == want64
        assert native.hash64_128_many(bufs, key, build) == \
            [a + b for a, b in zip(want64, want128)]


@needs_accel
@pytest.mark.parametrize("seed", [1, 2])
def test_accelerated_xor_equals_the_python_fallback(seed):
    rng = random.Random(seed)
    for n in (0, 1, 31, 32, 33, 4096, 65537, (1 << 20) + 5):
        dst = bytearray(rng.randbytes(n + rng.randrange(3)))
        src = rng.randbytes(n)
        want = bytearray(dst)
        x = int.from_bytes(want[:n], "little") ^ int.from_bytes(src, "little")
        want[:n] = x.to_bytes(n, "little")
        native.xor_into(dst, src)
        assert dst == want


@needs_accel
def test_accelerated_verify_mapped_equals_hashing_the_bytes(tmp_path):
    """verify_mapped flags exactly the blocks whose python-xxhash id differs,
    whole or in pieces (the fallback reads the bytes and hashes them)."""
    import mmap
    rng = random.Random(5)
    bs = 4096
    data = rng.randbytes(16 * bs)
    p = tmp_path / "seg"
    p.write_bytes(data)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        mv = memoryview(m)
        views, ids, bad = [], [], set()
        for i in range(16):
            blk = mv[i * bs:(i + 1) * bs]
            ids.append(xxhash.xxh3_128_digest(data[i * bs:(i + 1) * bs], 77))
            views.append(blk if i % 3 else (blk[:1000], blk[1000:]))
            if rng.random() < 0.3:
                ids[-1] = bytes(16)
                bad.add(i)
        got = native.verify_mapped(views, ids, 77, False)
        del views, blk, mv
    assert set(got) == bad


@needs_accel
def test_accelerated_map_stream_equals_reading_the_file(tmp_path):
    """map_stream gives the bytes a read gives (the fallback reads)."""
    data = random.Random(9).randbytes(3 << 20)
    p = tmp_path / "stream"
    p.write_bytes(data)
    with open(p, "rb") as f:
        m = native.map_stream(f.fileno(), 12345, len(data) - 12345)
        native.populate(m)
        assert bytes(memoryview(m)) == data[12345:]
        del m
