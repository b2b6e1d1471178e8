#!/usr/bin/env bash
# Set up everything fusearray needs on a Debian machine, as root:
# system packages, a venv in .venv, and the package with its two optional
# native modules (the libfuse interposer, the accelerators: fusearray.native).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(libfuse3-dev libxxhash-dev fuse3 e2fsprogs util-linux pkg-config gcc python3-venv python3-dev attr fio
      tgt libiscsi-bin)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  # fusearray starts a tgtd of its own per portal (`fusearray share`); the
  # tgt service the package starts would hold port 3260 on every address
  if [[ " ${missing[*]} " == *" tgt "* ]] && command -v systemctl >/dev/null \
      && systemctl is-active --quiet tgt 2>/dev/null; then
    systemctl disable --now tgt >/dev/null 2>&1 \
      && echo "setup: stopped and disabled the tgt service just installed (fusearray runs its own tgtd)"
  fi
fi
# tools/bench compares with qemu-storage-daemon FUSE exports of raw and qcow2
# images (bookworm: qemu-storage-daemon is in qemu-system-common, qemu-img in
# qemu-utils); without recommends (no qemu-system, no GUI libraries)
qemu_pkgs=(qemu-system-common qemu-utils)
missing=()
for p in "${qemu_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (for tools/bench)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v qemu-storage-daemon >/dev/null && command -v qemu-img >/dev/null \
  || { echo "setup: qemu-storage-daemon or qemu-img missing after install" >&2; exit 1; }
# The tests' throw-away Ceph cluster (tools/ceph-up, tests/cephcluster.py,
# docs/ceph.md): a mon and a memstore OSD (they pull in ceph-base and
# uuid-runtime), ceph-common for the `ceph`/`rados` clients, ceph-authtool and
# monmaptool, python3-rados for librados in Python (made importable from the
# venv below); ceph-mgr only for `MGR=1 tools/ceph-up`; radosgw (S3, with
# radosgw-admin) and curl for tools/rgw-up (`RGW=1 tools/ceph-up`, the tests'
# `s3` fixture); libsqlite3-mod-ceph (Ceph's SQLite VFS, libcephsqlite) for
# an array wholly in the cluster (`fusearray init rados:POOL/NAME`: its
# catalogue is SQLite in RADOS). No daemon starts by itself on install.
ceph_pkgs=(ceph-mon ceph-osd ceph-mgr ceph-common python3-rados libsqlite3-mod-ceph radosgw curl)
missing=()
for p in "${ceph_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (for the tests' Ceph cluster)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for b in ceph-mon ceph-osd ceph ceph-authtool monmaptool rados radosgw radosgw-admin curl; do
  command -v "$b" >/dev/null || { echo "setup: $b missing after install" >&2; exit 1; }
done
[ -e /usr/lib/x86_64-linux-gnu/libcephsqlite.so ] || ldconfig -p | grep -q libcephsqlite.so \
  || { echo "setup: libcephsqlite.so missing after install" >&2; exit 1; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,bench]'   # bench: matplotlib, tools/bench --chart
.venv/bin/python -c 'import fusearray.native, pyfuse3, trio, xxhash, boto3' \
  || { echo "setup: the package did not install correctly" >&2; exit 1; }
# Debian's librados binding (python3-rados) is one extension module in
# /usr/lib/python3/dist-packages, built for CPython 3.11; no binding on PyPI
# builds for 3.11. The venv gets it through a .pth file naming a directory
# that holds only a symlink to that module (putting all of dist-packages on
# the path would bring Debian's other packages in too).
ext=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
so=/usr/lib/python3/dist-packages/rados$ext
[ -f "$so" ] || { echo "setup: $so missing (python3-rados is built for Debian's" \
                       "python3; is the venv's Python another version?)" >&2; exit 1; }
binding=$PWD/.venv/ceph-binding
mkdir -p "$binding"
ln -sfn "$so" "$binding/rados$ext"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$binding" >"$site/fusearray-ceph-binding.pth"
.venv/bin/python -c 'import rados' \
  || { echo "setup: the venv cannot import rados (through $site/fusearray-ceph-binding.pth)" >&2; exit 1; }
# `mount -t fuse.fusearray ARRAY MNT` and fstab lines: libmount runs
# /sbin/mount.fuse.fusearray (it looks in /sbin, /sbin/fs.d, /sbin/fs only)
ln -sfn "$PWD/.venv/bin/mount.fusearray" /sbin/mount.fuse.fusearray
# what of the native layer is built and usable (a failed native build is not
# fatal: the Python fallbacks run; the first CI leg's tests require it)
.venv/bin/python -m fusearray.native --load
echo "setup: ready (.venv/bin/fusearray)"
