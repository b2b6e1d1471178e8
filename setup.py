"""Builds the two native modules, both optional (fusearray.native has the
fallbacks, so a failed build leaves an installable package):

- fusearray._fuseshim: the libfuse interposer under pyfuse3 (see
  fusearray/_fuseshim.c), linked to the libfuse pkg-config finds;
- fusearray._accel: CPython accelerators (XOR, XXH3 hashing, mapped
  verify, stream mapping; see fusearray/_accel.c), with the XXH3 code
  compiled in when libxxhash-dev's xxhash.h is there.

FUSE3_PREFIX or PKG_CONFIG_PATH select another libfuse (tools/libfuse-matrix).
"""
import os
import subprocess

from setuptools import Extension, setup


def pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.split()


cflags = pkg_config("--cflags")
libs = pkg_config("--libs")
lib_dirs = [f[2:] for f in libs if f.startswith("-L")]
shim = Extension(
    "fusearray._fuseshim",
    sources=["fusearray/_fuseshim.c"],
    extra_compile_args=cflags + ["-O2", "-Wall"],
    libraries=[f[2:] for f in libs if f.startswith("-l")] or ["fuse3"],
    library_dirs=lib_dirs,
    extra_link_args=[f for f in libs if not f.startswith(("-l", "-L"))],
    optional=True,
)
macros = []
sources = ["fusearray/_accel.c"]
if os.path.exists(os.environ.get("XXHASH_H", "/usr/include/xxhash.h")):
    # header only, compiled in (see fusearray/_xxh3_impl.h): no libxxhash.so
    macros.append(("HAVE_XXHASH", "1"))
    sources += ["fusearray/_xxh3_generic.c", "fusearray/_xxh3_avx2.c"]
accel = Extension(
    "fusearray._accel",
    sources=sources,
    extra_compile_args=["-O3", "-Wall"],
    define_macros=macros,
    libraries=["pthread"],
    optional=True,
)
setup(ext_modules=[shim, accel])
