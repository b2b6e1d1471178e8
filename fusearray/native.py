"""The native layer's one door: which C modules are in use, and what runs
instead when they are not.

Two C extension modules, both optional (setup.py builds them when it can;
a failed build leaves the package installable):

- ``fusearray._fuseshim``, the libfuse interposer under pyfuse3 (see its
  header comment): it adds the fallocate op pyfuse3 does not register
  (punch-hole and the discard of a loop device), takes requests and sends
  large replies without the GIL, sends large read replies from a thread of
  its own and gathers multi-buffer read replies (``reply_plan``). It works
  only when loaded with RTLD_GLOBAL before pyfuse3 is imported:
  ``load_interposer()`` does that (the daemon calls it first thing).
- ``fusearray._accel``, CPython accelerators that have nothing to do with
  libfuse: XXH3 block ids and stream hashes off the GIL, XOR for RAID-5
  parity, verifying blocks in place in mapped segment files under a
  SIGBUS guard, and mapping stream files for an import.

Every other module takes these names from here only. Each accelerator
name is the C function, or None when it is not available; the caller then
runs its pure-Python fallback:

========================  ==================================================
name                      fallback (where)
========================  ==================================================
xor_into                  big-int XOR (store: _xor_at)
hash128_many              python-xxhash xxh3_128_digest, GIL held (store)
hash64_many               python-xxhash xxh3_64_digest (transport)
hash64_128_many           the two above, two passes (transport)
verify_mapped             no reads from mapped files: read() and verify (store)
map_stream, populate      the stream file is read, not mapped (streamsock)
reply_plan                the read reply's buffers joined (fs)
fallocate (interposer)    none possible: the kernel answers EOPNOTSUPP
                          (pyfuse3 registers no fallocate op); the daemon
                          says so in an event at mount
========================  ==================================================

``FUSEARRAY_NATIVE=0`` in the environment disables both modules (the
second CI leg runs the whole suite so, which proves the fallbacks).
``report()`` says what is active and why not (the daemon logs it and puts
it in its mount event; ``fusearray --version`` and ``python -m
fusearray.native`` print it).

The interposer depends on how pyfuse3 calls libfuse, so it is loaded only
for the pyfuse3 versions it was checked against (PYFUSE3_CHECKED, the same
range pyproject.toml pins) and the libfuse versions it was checked against
(LIBFUSE_CHECKED); outside them the daemon says why and runs with the
fallbacks. docs/native-contract.md lists what is relied on and the test
that proves each.
"""
import ctypes
import importlib
import logging
import os
import sys

log = logging.getLogger("fusearray")

ENV = "FUSEARRAY_NATIVE"
#: [lowest, first unchecked) pyfuse3 versions the interposer was checked with
PYFUSE3_CHECKED = ((3, 5), (3, 6))
#: [lowest, highest] libfuse versions (major, minor) checked (tools/libfuse-matrix)
LIBFUSE_CHECKED = ((3, 14), (3, 18))
INTERPOSER = "_fuseshim"
ACCEL = "_accel"


def _enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "no", "off", "false")


#: False when FUSEARRAY_NATIVE=0 (read once, at import)
ENABLED = _enabled()
_why = {}           # module -> why it is not in use


def _import(name: str):
    if not ENABLED:
        _why[name] = f"disabled ({ENV}=0)"
        return None
    try:
        return importlib.import_module("fusearray." + name)
    except ImportError as e:
        _why[name] = f"cannot be loaded ({e}): the Python fallbacks run instead"
        log.warning("native module fusearray.%s %s", name, _why[name])
        return None


accel = _import(ACCEL)


def _get(name: str):
    return getattr(accel, name, None) if accel is not None else None


xor_into = _get("xor_into")
hash128_many = _get("hash128_many")
hash64_many = _get("hash64_many")
hash64_128_many = _get("hash64_128_many")
verify_mapped = _get("verify_mapped")
map_stream = _get("map_stream")
populate = _get("populate")
if accel is not None and hash128_many is None:
    _why["xxh3"] = "built without xxhash.h (libxxhash-dev): python-xxhash hashes with the GIL held"


def xxh3_build():
    """'avx2' or 'generic' (the accelerators' XXH3 build for this CPU), or None."""
    f = _get("xxh3_build")
    return f() if f is not None else None


# ---- the interposer ---------------------------------------------------------------

def version_tuple(v: str) -> tuple:
    """(3, 5, 0) of "3.5.0"; the leading digits of each part, up to the
    first part that does not start with one ("3.6rc1": (3, 6))."""
    import re
    out = []
    for part in v.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


def pyfuse3_version():
    """The installed pyfuse3's version string (without importing it), or None."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pyfuse3")
    except PackageNotFoundError:
        return None


def check_pyfuse3(v) -> str | None:
    """Why the interposer must not be used with pyfuse3 `v`, or None."""
    lo, hi = PYFUSE3_CHECKED
    if v is None:
        return "pyfuse3 is not installed"
    if not lo <= version_tuple(v)[:2] < hi:
        return (f"pyfuse3 {v} is outside the range the libfuse interposer was checked "
                f"against (>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}): fallocate (punch-hole, "
                f"discard) is not available and read replies are sent by pyfuse3 alone")
    return None


def check_libfuse(v: int) -> str | None:
    """Why the interposer must not be used with libfuse fuse_version() `v`, or None."""
    got = divmod(v, 100) if v < 1000 else divmod(v, 1000)
    lo, hi = LIBFUSE_CHECKED
    if not lo <= got <= hi:
        return (f"libfuse {got[0]}.{got[1]} is outside the versions the interposer was "
                f"checked against ({lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}): it is not used")
    return None


class Interposer:
    """The libfuse interposer, loaded with RTLD_GLOBAL (see _fuseshim.c)."""

    def __init__(self, lib, mod):
        self.lib, self.mod = lib, mod
        self.fallocate_cb = None
        lib.fusearray_set_fallocate.argtypes = (ctypes.c_void_p,)
        lib.fusearray_async_replies.restype = ctypes.c_ulonglong
        lib.fusearray_planned_replies.restype = ctypes.c_ulonglong

    def set_fallocate(self, cb) -> None:
        """Route fallocate requests to the ctypes callback `cb` (kept
        alive here: the C side holds only its pointer)."""
        self.fallocate_cb = cb
        self.lib.fusearray_set_fallocate(cb)

    def installed(self) -> bool:
        """Whether pyfuse3's fuse_session_new went through the interposer."""
        return bool(self.lib.fusearray_shim_installed())

    def libfuse_function(self, name: str, restype, argtypes):
        """libfuse's `name` (the library the interposer and pyfuse3 use)."""
        f = getattr(self.lib, name)
        f.restype, f.argtypes = restype, argtypes
        return f

    def async_replies(self) -> int:
        return self.lib.fusearray_async_replies()

    def planned_replies(self) -> int:
        return self.lib.fusearray_planned_replies()


_interposer = None


def load_interposer():
    """Load the libfuse interposer with RTLD_GLOBAL, before pyfuse3 is
    imported: an Interposer, or None (then why() says why)."""
    global _interposer
    if _interposer is not None:
        return _interposer
    if not ENABLED:
        _why[INTERPOSER] = f"disabled ({ENV}=0)"
        return None
    if "pyfuse3" in sys.modules:
        _why[INTERPOSER] = "pyfuse3 was imported before it could be loaded"
        log.warning("libfuse interposer: %s", _why[INTERPOSER])
        return None
    bad = check_pyfuse3(pyfuse3_version())
    if bad:
        _why[INTERPOSER] = bad
        log.warning("libfuse interposer: %s", bad)
        return None
    from importlib.util import find_spec
    spec = find_spec("fusearray." + INTERPOSER)
    if spec is None or not spec.origin:
        _why[INTERPOSER] = "not built: the Python fallbacks run instead"
        log.warning("libfuse interposer: %s", _why[INTERPOSER])
        return None
    try:
        # RTLD_LOCAL first: ask the libfuse it links to for its version
        # before its definitions can interpose on anything
        probe = ctypes.CDLL(spec.origin, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        probe.fuse_version.restype = ctypes.c_int
        bad = check_libfuse(probe.fuse_version())
        if bad:
            _why[INTERPOSER] = bad
            log.warning("libfuse interposer: %s", bad)
            return None
        lib = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        mod = importlib.import_module("fusearray." + INTERPOSER)
    except (OSError, ImportError, AttributeError) as e:
        _why[INTERPOSER] = f"cannot be loaded ({e}): the Python fallbacks run instead"
        log.warning("libfuse interposer: %s", _why[INTERPOSER])
        return None
    _interposer = Interposer(lib, mod)
    _why.pop(INTERPOSER, None)
    return _interposer


def reply_plan(parts):
    """A read reply sent straight from `parts` (the interposer's
    reply_plan: a memoryview to return to pyfuse3), or None: join them."""
    if _interposer is None:
        return None
    return _interposer.mod.reply_plan(parts)


def loaded_libfuse() -> str | None:
    """The path of the libfuse this process has mapped (after pyfuse3 or the
    interposer loaded it), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libfuse3.so" in path:
                    return path
    except OSError:
        pass
    return None


def why() -> dict:
    """{module: why it is not in use} for the native modules not in use."""
    out = dict(_why)
    if INTERPOSER not in out and _interposer is None:
        out[INTERPOSER] = (f"disabled ({ENV}=0)" if not ENABLED else
                           "not loaded in this process (the daemon loads it)")
    return out


def report() -> dict:
    """What is active: {"enabled", "accel", "interposer", "xxh3", "pyfuse3",
    "libfuse", "why"} (accel/interposer: "on" or "off")."""
    w = why()
    return {"enabled": ENABLED,
            "accel": "on" if accel is not None else "off",
            "interposer": "on" if _interposer is not None else "off",
            "xxh3": xxh3_build(),
            "pyfuse3": pyfuse3_version(),
            "libfuse": loaded_libfuse(),
            "why": w}


def summary() -> str:
    """report() as one line."""
    r = report()
    s = (f"native: accelerators {r['accel']}"
         + (f" (xxh3 {r['xxh3']})" if r["xxh3"] else "")
         + f", libfuse interposer {r['interposer']}; pyfuse3 {r['pyfuse3']}")
    if r["libfuse"]:
        s += f", libfuse {r['libfuse']}"
    for name, reason in sorted(r["why"].items()):
        s += f"; {name}: {reason}"
    return s


if __name__ == "__main__":
    import json
    if "--load" in sys.argv:
        load_interposer()
        import pyfuse3  # noqa: F401  (maps libfuse)
    print(json.dumps(report(), indent=1) if "--json" in sys.argv else summary())
