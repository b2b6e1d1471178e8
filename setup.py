"""Builds the one native piece: the libfuse shim that adds the fallocate op
pyfuse3 does not register (see fusearray/_fuseshim.c)."""
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


flags = pkg_config("--cflags")
libs = [f[2:] for f in pkg_config("--libs") if f.startswith("-l")] or ["fuse3"]
macros = []
sources = ["fusearray/_fuseshim.c"]
if os.path.exists("/usr/include/xxhash.h"):    # libxxhash-dev: block ids off the GIL
    # header only, compiled in (see fusearray/_xxh3_impl.h): no libxxhash.so
    macros.append(("HAVE_XXHASH", "1"))
    sources += ["fusearray/_xxh3_generic.c", "fusearray/_xxh3_avx2.c"]
setup(ext_modules=[Extension(
    "fusearray._fuseshim",
    sources=sources,
    extra_compile_args=flags + ["-O3", "-Wall"],
    define_macros=macros,
    libraries=libs + ["dl", "pthread"],
)])
