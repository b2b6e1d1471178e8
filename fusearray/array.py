"""The array: the coordinator. It creates arrays (`init_array`), opens and
closes one (the array lock file, the catalogue, the packs, the previous
session's record) and builds its collaborators, each the one owner of its
state and given what it needs (never the Array):
- `reader` (reader.BlockReader): block and map-node reads (the node cache);
- `journal` (events.EventJournal): events, logged, shown and journaled;
- `runner` (jobs.JobRunner): every job, its worker, its row and journal;
- `ns` (namespace.Namespace): volumes, LUNs, shadow copy sets, identities;
- `writeback` (writeback.WriteBack): the dirty cache's write-back, dedup and
  store of blocks, merge, the commit point and its lock, durability
  (fsync), admission near a full pack, the committer task;
- `collector` (gc.Collector, the write-back's partner): garbage collection,
  plan then execute, and the roots pinned by exports;
- `shadows` (shadows.Shadows): snapshot, resync, swap, delete of shadow
  copies, the copy jobs, the staging API of an import;
- `recovery` (recovery.Recovery): recover, replace, scrub jobs.

State it owns itself: the pack table (`packs`, shared with the
write-back, collector and recovery, which read it; filled by `open`
before the committer starts, then changed only by `add_pack`, under the
commit lock), the catalogue handle (opened and closed here, written only
by the write-back's commit), the block cache and node cache it hands out,
the array lock file and running marker. Its part of each commit
(`_prepare_commit` / `_committed`, called by WriteBack.commit on the trio
thread) adds the events and their journal, the namespace's and runner's
counters, and retires those journals once the transaction is in.

Threads: everything here runs on the trio thread but, in worker threads,
`_open_blocking` (before anything is shared), `check_new_disks` and the
preparation of a new pack's disks (paths nothing else uses yet). Every
change (create, delete, resize, flags, add pack) takes the write-back's
commit lock and ends with its `commit` (a delete: with a collection);
the steps of a commit and what a crash leaves after each are in
writeback.py. The fs and ctl layers call the Array's public methods,
which delegate.
"""
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sqlite3
import time
import uuid

import trio

from . import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE, FORMAT_VERSION, maps
from .catalogue import Catalogue, CatalogueError, Changes
from .catalogue import failures as catalogue_failures
from .events import EVENTS_KEPT, NOISE_KEPT, EventJournal
from .eventhooks import EventHooks
from .errors import ArrayError, busy, exists, invalid, ioerror, nospace, notfound
from .hooks import HOOKS_DIR, HookRunner
from . import home as homes
from .host import attachments_blocking, volume_key
from .perms import FILE_MODE, private_dir, tighten
from .store import (DEFAULT_INDEX_CACHE, DEFAULT_LEASE, FILTER_SHARE, HDR, PAGE_CACHE_SHARE, Disk, Hasher, Pack,
                    close_media, is_rados, write_file_atomic)
from .util import check_name, human_bytes, iso_time, parse_size, raise_fd_limit, unlink_quietly
from . import intentlog
from .intentlog import Coverage, IntentLog
from .iscsi import Shares
from .jobs import JobRunner
from .metrics import Metrics
from .namespace import Namespace
from .reader import BlockReader, NodeCache
from . import reach
from .recovery import Recovery
from .shadows import Shadows
from .volume import BlockCache, Volume
from .writeback import Collision, WriteBack, per_volume, store_hashed
from .writeback import OVERCOMMIT  # noqa: F401  (tools/bench reads fusearray.array.OVERCOMMIT)

log = logging.getLogger("fusearray")

ARRAY_FILE = "array.json"
CATALOGUE_FILE = "catalogue.db"
JOB_JOURNAL = "jobs.journal"         # job changes not yet in the catalogue (jobs.JobJournal)
LOCK_FILE = "lock"
CRASH_FILE = "crash.json"            # what the last daemon died of (daemon.py writes it)
RUNNING_FILE = "running"             # a daemon has the array open: gone at a clean close
LOG_DIR = "log"                      # the intent log's slots, unless `--log DIR` (intentlog.py)
LAYOUTS = ("single", "mirror", "raid5")


def _bs_ok(bs: int) -> bool:
    return 4096 <= bs <= (1 << 20) and bs & (bs - 1) == 0


# ---- creating an array (blocking; used by `fusearray init`) ----------------
def parse_pack_spec(spec: str) -> tuple[str, str, list[str]]:
    """`NAME=LAYOUT:DIR[,DIR...]`, or `NAME=rados:POOL[/NAMESPACE]` (a pack
    whose one disk is a RADOS pool namespace: layout single, redundancy
    the pool's)."""
    try:
        name, rest = spec.split("=", 1)
        layout, dirs = rest.split(":", 1)
    except ValueError:
        raise invalid(f"bad pack {spec!r}: use NAME=LAYOUT:DIR[,DIR...] or "
                      "NAME=rados:POOL") from None
    if layout == "rados":
        return name, "single", [rest]
    return name, layout, [d for d in dirs.split(",") if d]


def ceph_conf_now(conf: dict | None = None) -> str | None:
    """The Ceph cluster's conf file: $CEPH_CONF, else the one array.json
    recorded when a rados pack was made."""
    env = os.environ.get("CEPH_CONF")
    if env:
        return os.path.abspath(env)
    return (conf or {}).get("ceph_conf")


def rados_disk_path(spec: str, array_uuid: str, pack: str) -> str:
    """`rados:POOL` -> `rados:POOL/fusearray.UUID.PACK` (a namespace of the
    pool for this pack alone); `rados:POOL/NAMESPACE` as given."""
    pool, _, ns = spec[len("rados:"):].partition("/")
    if not pool or not all(c.isalnum() or c in "._-" for c in pool + ns):
        raise invalid(f"bad rados pack {spec!r}: use rados:POOL or rados:POOL/NAMESPACE "
                      "(letters, digits, '.', '_', '-')")
    return f"rados:{pool}/{ns or f'fusearray.{array_uuid}.{pack}'}"


def _check_rados_disk(path: str, ceph_conf: str | None) -> None:
    """A rados disk for a new pack: the cluster answers, the pool exists
    and the namespace holds nothing yet. Blocking."""
    if not ceph_conf:
        raise invalid(f"{path}: no Ceph cluster named: set CEPH_CONF to its ceph.conf "
                      "(or give --ceph-conf at init)")
    d = Disk(0, path, ceph_conf=ceph_conf)
    try:
        if not d.medium.present():
            raise notfound(f"{path}: pool {d.medium.pool} does not exist in the cluster "
                           f"of {ceph_conf}: create it first (`ceph osd pool create`)")
        names = d.medium.names()
        if names or d.label_state("", None) != "missing":
            raise busy(f"{path} is not empty: it already holds a pack's data")
    except OSError as e:
        raise ioerror(f"{path}: the Ceph cluster of {ceph_conf} does not answer: "
                      f"{e.strerror or e}") from None


#: ctl/status lists disks found invalid under a pack of this name.
RESERVED_PACK = "INVALID"
#: The longest the checks of new disk directories may take (a directory on
#: a hung network file system): then the command fails, the mount goes on.
DISK_CHECK_TIMEOUT = 60.0


def check_pack(name: str, layout: str, dirs: list[str], used: set,
               array_uuid: str = "", ceph_conf: str | None = None) -> list[str]:
    """Validate a new pack; returns absolute disk paths (a rados disk:
    `rados:POOL/NAMESPACE`). Blocking (it looks at the directories, or
    asks the cluster): never on the trio thread of a mounted array."""
    check_name(name, "pack name")
    if name == RESERVED_PACK:
        raise invalid(f"the pack name {RESERVED_PACK} is reserved (ctl/status lists "
                      "invalid disks under it): choose another name")
    if any(is_rados(d) for d in dirs):
        if len(dirs) != 1 or layout != "single":
            raise invalid("a rados pack has one disk, its pool (redundancy is the "
                          "pool's): use NAME=rados:POOL")
        path = rados_disk_path(dirs[0], array_uuid, name)
        if path in used:
            raise busy(f"{path} is already a disk of this array")
        _check_rados_disk(path, ceph_conf)
        return [path]
    if layout not in LAYOUTS:
        raise invalid(f"unknown layout {layout!r}: use single, mirror or raid5")
    need = {"single": (1, 1), "mirror": (2, 3), "raid5": (3, 16)}[layout]
    if not need[0] <= len(dirs) <= need[1]:
        count = f"exactly {need[0]}" if need[0] == need[1] else f"{need[0]} to {need[1]}"
        raise invalid(f"layout {layout} takes {count} directories, got {len(dirs)}")
    paths = [os.path.abspath(d) for d in dirs]
    if len(set(paths)) != len(paths):
        raise invalid("the same directory is given twice: each disk needs its own")
    for p in paths:
        if p in used:
            raise busy(f"directory {p} is already a disk of this array")
        if os.path.exists(p):
            if not os.path.isdir(p):
                raise invalid(f"{p} is not a directory")
            if os.listdir(p):
                if os.path.exists(os.path.join(p, "fusearray-disk.json")):
                    raise busy(f"{p} is already a disk of a fusearray pack")
                raise invalid(f"disk directory {p} is not empty")
    return paths


def check_outside_mount(paths: list[str], mountpoint: str | None) -> None:
    """Refuse a disk directory inside the array's own mount: the daemon
    would send FUSE requests to itself. By the resolved path (symlinks
    followed) and by the device of its nearest existing ancestor (a bind
    mount of part of the mount elsewhere). Blocking, in a worker thread:
    the lookups it makes inside the mount are answered by the trio thread."""
    if not mountpoint:
        return
    mnt = os.path.realpath(mountpoint)
    dev = os.stat(mnt).st_dev
    for p in paths:
        if is_rados(p):
            continue
        real = os.path.realpath(p)
        near = real
        while True:
            try:
                st = os.stat(near)
                break
            except FileNotFoundError:
                near = os.path.dirname(near)
        if real == mnt or real.startswith(mnt.rstrip("/") + "/") or st.st_dev == dev:
            raise invalid(f"disk directory {p} is inside this array's own mount {mnt}: "
                          "a pack's disks must be host directories outside it")


def init_array(path: str, packs: list[str] | None = None,
               block_size: int = DEFAULT_BLOCK_SIZE, verify: bool = False,
               log_dir: str | None = None, ceph_conf: str | None = None) -> None:
    """Create an array directory (`fusearray init`); `log_dir`: the intent
    log's directory (`--log DIR`, default ARRAY/log); `ceph_conf`: the
    Ceph cluster of rados packs (default $CEPH_CONF), recorded. `path`
    `rados:POOL/NAME`: an array in that cluster (init_cluster_array)."""
    ceph_conf = os.path.abspath(ceph_conf) if ceph_conf else ceph_conf_now()
    if homes.is_cluster(path):
        if log_dir is not None:
            raise invalid("an array in a Ceph cluster keeps its intent log there: "
                          "--log does not apply")
        return init_cluster_array(path, packs, block_size, verify, ceph_conf)
    path = os.path.abspath(path)
    if not _bs_ok(block_size):
        raise invalid("block size must be a power of two from 4K to 1M")
    _refuse_used_dir(path)
    specs = [parse_pack_spec(s) for s in packs or []]
    if not specs:
        specs = [("main", "single", [os.path.join(path, "disks", "main.0")])]
    array_id = str(uuid.uuid4())
    checked = _check_packs(specs, array_id, ceph_conf)
    conf = _new_conf(array_id, block_size, verify)
    if any(is_rados(p) for _, _, ps in checked for p in ps):
        conf["ceph_conf"] = ceph_conf
    if log_dir is not None:
        conf["log_dir"] = check_log_dir(log_dir)
    # what this init may have to take back: the directories it makes, and
    # the local disk directories (new or empty: check_pack) it labels
    new = [p for p in [path] + [d for _, _, ps in checked for d in ps if not is_rados(d)]
           if not os.path.exists(p)]
    disks = [d for _, _, ps in checked for d in ps if not is_rados(d)]
    try:
        private_dir(path)       # the raw data, the catalogue and the secret: 0700
        lockfd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        _empty_dirs([], new)        # (the directories it made, if still empty)
        raise _init_failed(path, e) from None
    try:
        _claim_new_dir(path, lockfd)
    except ArrayError:
        os.close(lockfd)        # (another init's directory: nothing here is ours)
        raise
    try:
        _init_local(path, packs, conf, array_id, checked, ceph_conf, disks, new)
    finally:
        os.close(lockfd)


def _refuse_used_dir(path: str) -> None:
    """An init's target must be new or empty (a `lock` alone: a lock file
    an init that failed before writing anything left, or one that runs
    now, which _claim_new_dir then finds)."""
    if os.path.exists(os.path.join(path, ARRAY_FILE)):
        raise exists(f"{path} is already an array")
    left = set(os.listdir(path)) if os.path.isdir(path) else set()
    if CATALOGUE_FILE in left:
        raise invalid(f"{path} holds an array whose init did not finish (a catalogue "
                      f"but no {ARRAY_FILE}: the init was killed?), or one is running "
                      "now: when none is, remove what is in it and init again")
    if left - {LOCK_FILE} or (os.path.exists(path) and not os.path.isdir(path)):
        raise invalid(f"{path} is not empty: give a new or empty directory")


def _claim_new_dir(path: str, fd: int) -> None:
    """Take `path`'s lock for an init (held until it ends), then check
    again that the directory is still empty: of two inits racing on one
    new directory one gets it, the other is refused before it writes
    anything (it would have taken the other's catalogue for a failure of
    its own and removed it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise busy(f"{path}: another fusearray init (or a mount) is using it") from None
    _refuse_used_dir(path)


def _init_local(path, packs, conf, array_id, checked, ceph_conf, disks, new) -> None:
    """The writing part of a local init, under the directory's lock and
    its disk directories' (_claim_disk_dirs)."""
    try:
        held = _claim_disk_dirs(disks)
    except OSError as e:
        _undo_init(path, [], new)
        raise _init_failed(path, e) from None
    except ArrayError:
        _undo_init(path, [], new)       # (only its own directory: the disks are not)
        raise
    try:
        _write_new_array(path, packs, conf, array_id, checked, ceph_conf, disks, new)
    finally:
        for fd in held:
            os.close(fd)


def _claim_disk_dirs(disks: list[str]) -> list[int]:
    """Lock each local disk directory of a new array (flock of the
    directory, held until the init ends; made first if new) and check
    again that it is empty: two inits naming one disk directory at once
    would both label it (one array then finds another's label), and the
    one that failed would empty it under the other. Returns the fds."""
    fds: list[int] = []
    try:
        for d in disks:
            private_dir(d)
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy(f"disk directory {d}: another fusearray init is using it") from None
            if os.listdir(d):
                raise busy(f"disk directory {d} is not empty any more: another fusearray "
                           "init or addpack took it")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _write_new_array(path, packs, conf, array_id, checked, ceph_conf, disks, new) -> None:
    try:
        if not packs:
            private_dir(os.path.join(path, "disks"))
        _first_commit(os.path.join(path, CATALOGUE_FILE), array_id, checked, ceph_conf, path)
        write_file_atomic(os.path.join(path, ARRAY_FILE), json.dumps(conf, indent=1).encode())
    except (OSError, sqlite3.Error) as e:
        _undo_init(path, disks, new)
        raise _init_failed(path, e) from None


def _init_failed(path: str, e: Exception) -> ArrayError:
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(e, sqlite3.Error) and "full" in str(e))
    if full:
        return nospace(f"cannot initialise {path}: its file system (or a disk "
                       "directory's) is full; nothing was left behind")
    return ioerror(f"cannot initialise {path}: {getattr(e, 'strerror', None) or e}; "
                   "nothing was left behind")


def _undo_init(path: str, disks: list[str], new: list[str]) -> None:
    """A local init that failed half way (a full file system): what it
    wrote goes. `path` and the local `disks` were new or empty before it
    (init_array and check_pack refuse others), so what is in them is its
    own; the directories in `new` it made are removed too."""
    _empty_dirs([path] + disks, new)


def _empty_dirs(dirs: list[str], new: list[str]) -> None:
    """Empty `dirs` (what is in them is the caller's own), then remove
    those of `new` (made by the caller) that are empty."""
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                unlink_quietly(p)
    for d in sorted(new, key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _check_packs(specs, array_id: str, ceph_conf: str | None) -> list:
    """check_pack of each (name, layout, dirs) of a new array: [(name,
    layout, paths)]."""
    used: set = set()
    checked: list = []
    for name, layout, dirs in specs:
        if name in {c[0] for c in checked}:
            raise exists(f"pack {name} given twice")
        paths = check_pack(name, layout, dirs, used, array_id, ceph_conf)
        used.update(paths)
        checked.append((name, layout, paths))
    return checked


def _new_conf(array_id: str, block_size: int, verify: bool) -> dict:
    """array.json of a new array."""
    return {"format": FORMAT_VERSION, "uuid": array_id,
            "seed": secrets.randbits(64), "block_size": block_size,
            "verify": verify, "vendor": secrets.token_hex(5)[:9]}


def _first_commit(where: str, array_id: str, checked: list, ceph_conf: str | None,
                  shown) -> None:
    """A new array's catalogue at `where` (a path or a cluster URI) with its
    packs, their disks labelled first."""
    cat = Catalogue(where, create=True)
    try:
        now = time.time()
        ch = Changes(meta={"format": FORMAT_VERSION, "uuid": array_id,
                           "next_serial": 1, "next_vid": 1, "refs": 1},
                     packs_add=[(n, l, now, p) for n, l, p in checked],
                     events=[(now, "info", f"array created at {shown}")])
        for name, _, paths in checked:
            for i, p in enumerate(paths):
                Disk(i, p, ceph_conf=ceph_conf).write_label(array_id, name)
        cat.commit_blocking(ch)
    finally:
        cat.close()


def init_cluster_array(spec: str, packs: list[str] | None, block_size: int, verify: bool,
                       ceph_conf: str | None) -> None:
    """`fusearray init rados:POOL/NAME`: an array wholly in the cluster
    (home.py): its packs rados packs (default: `main=rados:POOL`), its
    catalogue, intent log and identity in the namespace of NAME. Taken
    under the array's lease (two inits of one name: one wins); array.json
    in the cluster, written last, marks it done."""
    if not _bs_ok(block_size):
        raise invalid("block size must be a power of two from 4K to 1M")
    home = homes.ClusterHome(spec, ceph_conf)
    ceph_conf = home.ceph_conf
    specs = [parse_pack_spec(s) for s in packs or [f"main=rados:{home.pool}"]]
    for name, _, dirs in specs:
        if not all(is_rados(d) for d in dirs):
            raise invalid(f"pack {name}: an array in a Ceph cluster keeps its packs there "
                          f"too (a host directory would tie it to this host): use "
                          f"{name}=rados:POOL")
    with home.init_lock():
        _init_in_cluster(home, specs, block_size, verify)


def _init_in_cluster(home, specs, block_size: int, verify: bool) -> None:
    """init_cluster_array under this host's init lock."""
    ceph_conf = home.ceph_conf
    try:
        if not home.medium.present():
            raise notfound(f"{home}: pool {home.pool} does not exist in the cluster of "
                           f"{ceph_conf}: create it first (`ceph osd pool create`)")
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "array": home.spec,
                  "doing": "init"}
        home.take_lease(DEFAULT_LEASE, holder, False)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise busy(f"{home}: {e.strerror}") from None
        raise ioerror(f"{home}: the Ceph cluster of {ceph_conf} does not answer: "
                      f"{e.strerror or e}") from None
    try:
        if home.exists():
            raise exists(f"{home} is already an array")
        # what an init that died half-way left: its catalogue's lock, its labels
        home.unlock_dead_catalogue()
        home.drop_dead_init(ceph_conf)
        array_id = str(uuid.uuid4())
        checked = _check_packs(specs, array_id, ceph_conf)
        home.record_init(array_id, [p for _, _, paths in checked for p in paths])
        conf = _new_conf(array_id, block_size, verify)
        try:
            _first_commit(home.catalogue_uri(), array_id, checked, ceph_conf, home)
            home.write_config(conf)
        except BaseException:
            with contextlib.suppress(OSError):      # (else the next init does it)
                home.drop_dead_init(ceph_conf)
            raise
        home.drop_init_record()
    except OSError as e:
        raise ioerror(f"{home}: {e.strerror or e}") from None
    finally:
        home.release_lease()
        close_media()


def read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, ARRAY_FILE)) as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise notfound(f"{path} is not a fusearray array (no {ARRAY_FILE}); "
                       "create one with `fusearray init`") from None
    except (OSError, ValueError) as e:
        raise ioerror(f"cannot read {path}/{ARRAY_FILE}: {e}") from None
    if conf.get("format") != FORMAT_VERSION:
        raise invalid(f"{path} has array format {conf.get('format')}, "
                      f"this fusearray reads format {FORMAT_VERSION}")
    return conf


def written_since(rec: dict, meta: dict, array_uuid: str) -> bool:
    """Does a pack's commit record (`rec`, RadosMedium.mark_commit) name a
    commit of this array that the catalogue (its `meta`) lacks? It has
    the commits of its last session up to its count, and those of the
    session before up to where that one ended (the record may lag a
    crash between the catalogue's commit and its own). No record, or
    another array's: False."""
    if not rec or rec.get("array") != array_uuid:
        return False
    session, n = rec.get("session"), int(rec.get("commits", 0))
    known = [(meta.get(k), int(meta.get(c, 0) or 0))
             for k, c in (("session", "commits"), ("prev_session", "prev_commits"))]
    return not any(session == s and n <= c for s, c in known if s)


def _nearly_full(path: str) -> bool:
    """Less than 1 MiB free for the user on `path`'s file system (SQLite
    says "disk I/O error", not "full", when its WAL index cannot grow)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def check_log_dir(log_dir: str) -> str:
    """`--log DIR`: an existing directory, absolute."""
    log_dir = os.path.abspath(log_dir)
    if not os.path.isdir(log_dir):
        raise notfound(f"log directory {log_dir} does not exist (give a directory on "
                       "the device for the intent log)")
    return log_dir


class Array:
    def __init__(self, path: str, cache_size: int = DEFAULT_CACHE_SIZE,
                 log_dir: str | None = None, fsync: str = "log", *,
                 index_cache: int | None = None, lease: float = DEFAULT_LEASE,
                 break_lock: bool = False, accept_stale: bool = False):
        self.path = os.path.abspath(path)
        # rados packs: the mount's exclusive lease on each (rados.Lease):
        # its length (--lease) and whether to fence a live holder (--break-lock)
        self.lease = lease
        self.break_lock = break_lock
        # --accept-stale: open although another copy of the array directory
        # wrote its rados packs since (_check_not_stale)
        self.accept_stale = accept_stale
        # the namespace is loaded from the catalogue (open): close commits
        self._loaded = False
        self._filters_idle = trio.Event()       # no dedup filter build running
        self._filters_idle.set()
        # --index-cache: RAM for the block index (on disk, in the catalogue):
        # a share for SQLite's pages, one for the packs' dedup filters, the
        # rest split among the packs' caches
        self.index_cache = index_cache or DEFAULT_INDEX_CACHE
        self.conf = read_config(self.path)
        self.ceph_conf = ceph_conf_now(self.conf)   # rados packs' cluster
        # an array in a Ceph cluster (home.py): this directory is the host's
        # cache of it; the catalogue, the intent log and the lease are there
        self.home = (homes.ClusterHome(self.conf["home"], self.ceph_conf)
                     if self.conf.get("home") else None)
        if self.home is not None and log_dir is not None:
            raise invalid(f"{self.home} keeps its intent log in the cluster: --log does "
                          "not apply")
        self.hasher = Hasher(self.conf["seed"])
        self.verify = bool(self.conf.get("verify"))
        self.default_block_size = self.conf["block_size"]
        # the intent log's records share --cache-size with the block cache
        log_share = min(cache_size // 8, intentlog.SLOT_SIZE // 2)
        self.cache = BlockCache(cache_size - log_share)
        # where the log is (array.json's log_dir), and where `--log` moves it
        self.log_moved_to = check_log_dir(log_dir) if log_dir is not None else None
        self.intent = IntentLog(None if self.home else self._log_path(self.conf.get("log_dir")),
                                self.conf["uuid"], log_share,
                                event=lambda lv, msg: self.event(lv, msg),
                                medium=self.home.medium if self.home else None)
        self.nodes = NodeCache(max(64 << 20, min(cache_size // 4, 512 << 20)))
        self.packs: dict[str, Pack] = {}
        self.journal = EventJournal(self.path)   # events: logged, shown, journaled (events.py)
        self.events = self.journal.log           # what ctl/events shows
        # event.d hooks: each event queued for them (eventhooks.py; its task starts in open)
        self.event_hooks = EventHooks(self.path, self.journal.event, lambda: self.mountpoint)
        self.journal.subscriber = self.event_hooks.subscribe
        self.reader = BlockReader(self.nodes, self.journal.event, self.drain_notes)
        self.started = time.time()
        self._lockfd = None
        self._open_infos: list = []              # (level, message) found while opening
        self._home_notes: list = []              # (level, message) from other threads: the home's lease, a failed catalogue read
        self.catalogue: Catalogue | None = None
        self.nursery = None                      # the daemon's: set by `open`
        self.notify = lambda vol: None   # the fs layer invalidates kernel caches
        self.mountpoint: str | None = None       # set by the daemon (disks must be outside)
        self.previous_session: list[str] = []    # how the last daemon ended, if badly
        # I/O counters: each volume's own (Volume.stats), those of the
        # volumes forgotten since the mount per pack (ctl/metrics: metrics.py)
        self.metrics = Metrics()
        # ---- the collaborators (each given what it needs, none the Array) ----
        # (the runner and the namespace are made before the write-back whose
        # mark_job/mark_row they are given: the write-back takes the
        # namespace's volume table)
        self.runner = JobRunner(os.path.join(self.path, JOB_JOURNAL), event=self.journal.event,
                                mark_dirty=lambda job: self.writeback.mark_job(job))
        self.ns = Namespace(self.conf["uuid"], self.conf["vendor"],
                            make_volume=self._make_volume,
                            changes=lambda: self.writeback.changes,
                            mark_row=lambda vol: self.writeback.mark_row(vol),
                            volume_dropped=self.runner.volume_dropped,
                            volume_forgotten=self.metrics.retire)
        self.volumes = self.ns.volumes           # every live volume, also deleted-but-open
        self.writeback = WriteBack(self.packs, self.volumes, self.cache, self.nodes,
                                   self.hasher, self.verify, reader=self.reader,
                                   event=self.journal.event, drain_notes=self.drain_notes,
                                   round_start=self.journal.flush_summaries,
                                   uncommitted=lambda: bool(self.journal.uncommitted),
                                   prepare_commit=self._prepare_commit,
                                   committed=self._committed, array_uuid=self.conf["uuid"],
                                   intent=self.intent, fsync_log=fsync == "log",
                                   catalogue_room=self._catalogue_room_blocking)
        self.collector = self.writeback.collector
        self.luns = self.ns.luns
        self.sets = self.ns.sets                 # name -> namespace.ShadowSet
        self.jobs = self.runner.jobs
        self.hooks = HookRunner(self.path, self.journal.event, lambda: self.mountpoint)
        self.host_view: dict = {}    # attachments as last read (refresh_host_view)
        self.shadows = Shadows(self.ns, self.runner, wb=self.writeback,
                               collector=self.collector, read_locs=self.reader.read_locs,
                               lookups=self.reader.lookups,
                               loader=self.reader.loader, pack=self.pack, event=self.journal.event,
                               notify=lambda vol: self.notify(vol),
                               store_hashed=store_hashed, collision=Collision,
                               hooks=self.hooks, attachments=self.attachments,
                               shared=self.shared_as)
        self.recovery = Recovery(self.conf["uuid"], packs=self.packs, pack=self.pack,
                                 runner=self.runner, lock=self.writeback.lock,
                                 commit=self.writeback.commit, event=self.journal.event,
                                 drain_notes=self.drain_notes,
                                 check_new_disks=self.check_new_disks)
        # iSCSI: the shares and the tgtds serving them (iscsi.py)
        self.iscsi = Shares(self.path, self.conf["uuid"], lun=self.lun,
                            mountpoint=lambda: self.mountpoint, event=self.journal.event)

    def _make_volume(self, row: dict, pack: Pack, source: Pack | None) -> Volume:
        """A Volume of catalogue row `row`, wired to the cache, the reader
        and write admission (the write-back's admit/pack_writable)."""
        return Volume(row, pack, cache=self.cache, reader=self.reader,
                      admission=self.writeback, source=source, intent=self.intent)

    def _log_path(self, log_dir: str | None) -> str:
        """The intent log's directory: ARRAY/log, or DIR/<uuid> with --log
        DIR (so two arrays may share DIR)."""
        if log_dir is None:
            return os.path.join(self.path, LOG_DIR)
        return os.path.join(log_dir, self.conf["uuid"])

    @property
    def job_journal(self):
        return self.runner.journal

    def _prepare_commit(self, ch: Changes):
        """The coordinator's part of a commit, on the trio thread just before
        the transaction (WriteBack.commit): the events and the events
        journal they came from, the namespace's and the runner's counters,
        how far the job journal goes. Returns the token for `_committed`."""
        ch.events, journal = self.journal.take()
        if journal is not None:
            ch.meta["events_journal"] = journal + 1   # journals below are in the catalogue
        ch.meta.update(next_serial=self.ns.next_serial, next_vid=self.ns.next_vid,
                       next_job=self.runner.next_id)     # the counters the commit persists
        noted = self.job_journal.notes if self.job_journal is not None else 0
        return journal, noted

    async def _committed(self, token) -> None:
        """After the transaction: the journals it covers are retired."""
        journal, noted = token
        if journal is not None:
            await self.journal.retire(journal)
        if self.job_journal is not None:
            self.job_journal.committed(noted)

    # ---- open / close --------------------------------------------------------
    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise busy(f"array {self.path} is already mounted (daemon pid {other or '?'}); "
                       "unmount it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lockfd = fd

    def _take_leases_blocking(self, pack: Pack) -> list[str]:
        """Take the exclusive lease of each of `pack`'s rados disks (one
        mount at a time; rados.Lease): ArrayError EBUSY naming the holder
        if another mount has it (unless --break-lock). A cluster that does
        not answer leaves the lease to be taken before the first write.
        Returns notes (the earlier holders fenced)."""
        notes = []
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "array": self.path}

        def lost(why, pack=pack):
            pack.note("error", f"pack {pack.name}: this daemon lost its lease on the "
                      f"cluster: {why}; writes to the pack fail with EIO from now on "
                      "(another mount serves the array): unmount this one")
        for d in pack.disks:
            try:
                fenced = d.take_lease(self.lease, holder, self.break_lock, lost)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise busy(f"pack {pack.name}: {e.strerror}") from None
                continue        # not answering: the disk check says so
            if fenced:
                notes.append(f"pack {pack.name}: fenced the earlier holder(s) of "
                             f"{d.path} off the cluster (blocklisted: {', '.join(fenced)}) "
                             "before taking it over")
        return notes

    def _check_not_stale(self, pack: Pack, meta: dict) -> list[str]:
        """Opening, with `pack`'s leases held: the commit record its disks
        keep (rados: which mount of the array committed last, and how many
        commits its catalogue then held; WriteBack.open_lineage) must be
        one this catalogue has: its own last session's, or the one before
        (a crash between the catalogue's commit and the record's). Else
        another copy of this array directory (another host's, or a copy
        taken earlier) has written the pack since this one was taken, and
        opening this one would remove what that copy stored as garbage:
        ArrayError ESTALE saying whose and how to go on; with
        --accept-stale, a note saying what is dropped. Returns notes."""
        for d in pack.disks:
            try:
                rec = d.last_commit()
            except OSError:
                continue            # not answering: the disk check says so
            if not written_since(rec, meta, self.conf["uuid"]):
                continue
            n = int(rec.get("commits", 0))
            have = int(meta.get("commits", 0) or 0)
            if self.home is not None and rec.get("session") and \
                    rec.get("session") == meta.get("session"):
                # one catalogue (in the cluster) and the same mount wrote both:
                # the catalogue lost commits it had acknowledged (a VFS that
                # lied about a sync: rados.VFS_OSD_OP_TIMEOUT), not another copy
                lost = (f"the catalogue of {self.home or self.path} ends at commit {have} "
                        f"of its last mount (of {rec.get('dir', '?')} on host "
                        f"{rec.get('host', '?')}), but pack {pack.name} records that mount's "
                        f"commit {n}: the catalogue's storage lost writes it had "
                        "acknowledged, and what commits "
                        f"{have + 1}-{n} stored is not in the catalogue")
                if self.accept_stale:
                    return [f"pack {pack.name}: opened with --accept-stale although {lost}"]
                raise ArrayError(errno.ESTALE, (
                    f"{lost}. Nothing was opened. To open the catalogue as it is (the blocks "
                    "only those commits referenced are freed), mount with --accept-stale"))
            whose = (f"the mount of {rec.get('dir', '?')} on host {rec.get('host', '?')} "
                     f"made commit {n} of it, which the catalogue of {self.path} (commit "
                     f"{have}) does not have")
            if self.accept_stale:
                return [f"pack {pack.name}: opened with --accept-stale although another "
                        f"copy of this array wrote it since ({whose}): what that copy "
                        "stored since is dropped"]
            raise ArrayError(errno.ESTALE, (
                f"pack {pack.name} was written since by another copy of this array: "
                f"{whose}. This directory is an older copy: opening it would drop what "
                "the other copy stored since. Mount the copy that wrote last (or copy its "
                "directory here); to open this one anyway, dropping that, mount with "
                "--accept-stale"))
        return []

    def _take_home_blocking(self) -> list[str]:
        """An array in a cluster: its lease (as a pack's, _take_leases_blocking),
        then the catalogue lock a dead holder left, broken after fencing
        it. Returns notes."""
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "array": self.path}

        def lost(why):      # (the lease's thread): noted, an event at the next drain
            msg = (f"this daemon lost the lease of {self.home}: {why}; nothing more it "
                   "does reaches the cluster (another host serves the array): unmount "
                   "this one")
            # no commit is tried from now on: the catalogue is another host's
            self.writeback.stop(OSError(errno.EIO, msg))
            self._home_notes.append(("error", msg))
        try:
            fenced = self.home.take_lease(self.lease, holder, self.break_lock, lost)
            fenced += self.home.unlock_dead_catalogue()
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise busy(f"array {self.home}: {e.strerror}") from None
            raise ioerror(f"array {self.home}: the Ceph cluster of {self.home.ceph_conf} "
                          f"does not answer: {e.strerror or e}") from None
        if fenced:
            return [f"array {self.home}: fenced the earlier holder(s) off the cluster "
                    f"(blocklisted: {', '.join(sorted(set(fenced)))}) before taking it over"]
        return []

    def _previous_session_blocking(self) -> list[str]:
        """How the last daemon ended, if not cleanly: its crash record (it
        died of an error and wrote one), or its running marker alone (it
        was killed: SIGKILL, out of memory, the machine stopped). Then this
        daemon's marker. Caller holds the array lock."""
        notes = []
        crash = os.path.join(self.path, CRASH_FILE)
        running = os.path.join(self.path, RUNNING_FILE)
        try:
            with open(crash) as f:
                c = json.load(f)
            notes.append(f"the previous daemon (pid {c.get('pid', '?')}) died at "
                         f"{c.get('time', '?')}: {c.get('error', '?')}; its mount was "
                         f"detached; see {os.path.join(self.path, 'daemon.log')} for the "
                         "traceback")
        except FileNotFoundError:
            try:
                with open(running) as f:
                    pid, _, started = f.read().strip().partition(" ")
                notes.append(f"the previous daemon (pid {pid or '?'}, started "
                             f"{iso_time(float(started)) if started else '?'}) did not end "
                             "cleanly: it was killed (SIGKILL, out of memory) or the machine "
                             "stopped; writes it acknowledged without an fsync may be lost "
                             "(every fsync'd write is kept)")
            except FileNotFoundError:
                pass
            except (OSError, ValueError):
                notes.append("the previous daemon did not end cleanly (its marker file "
                             f"{running} is unreadable)")
        except (OSError, ValueError) as e:
            notes.append(f"the previous daemon died (its crash record {crash} is "
                         f"unreadable: {e}); see {os.path.join(self.path, 'daemon.log')}")
        write_file_atomic(running, f"{os.getpid()} {time.time()}\n".encode())
        unlink_quietly(crash)
        return notes

    def record_death(self, message: str) -> None:
        """The daemon is dying of an unexpected error: an event, written to
        the events journal even after `close` (the next open puts it in the
        catalogue), and to the log."""
        self.journal.record_death(message)

    def _open_blocking(self):
        self._take_lock()
        self.previous_session = self._previous_session_blocking()
        notes = self._take_home_blocking() if self.home is not None else []
        where = self.home.catalogue_uri() if self.home else os.path.join(self.path,
                                                                          CATALOGUE_FILE)
        cat = self.catalogue = self.writeback.catalogue = Catalogue(where,
                                                                    record_header=HDR.size)
        cat.on_failure = self._catalogue_failed
        meta = cat.meta()
        if meta.get("uuid") != self.conf["uuid"]:
            raise invalid(f"catalogue of {self.home or self.path} belongs to another array")
        self._meta = meta
        self.writeback.open_lineage(meta, {"host": socket.gethostname(), "dir": self.path})
        reach.remove_stale(self.path)       # a collection's or fsck's table a crash left
        self._job_rows = cat.jobs()
        self._journaled_jobs = self.runner.load_blocking(self._job_rows,
                                                         int(meta.get("next_job", 1)))
        pack_rows = cat.packs()
        for name, layout, _created in pack_rows:
            disks = [Disk(i, p, s, since, ceph_conf=self.ceph_conf)
                     for i, p, s, since in cat.disks(name)]
            pack = Pack(name, layout, disks, self.hasher,
                        self._pack_index_cache(len(pack_rows)),
                        self.index_cache // FILTER_SHARE // max(1, len(pack_rows)))
            notes += self._take_leases_blocking(pack)   # before anything is written
            try:
                notes += self._check_not_stale(pack, meta)  # before anything is removed
                removed = pack.open_blocking(self._pack_rows(name), self.conf["uuid"])
                pack.load_filter_blocking(self._filter_path(name), self._filter_tag(
                    meta.get("session", ""), int(meta.get("commits", 0))))
            except BaseException:
                for d in pack.disks:                # (not in self.packs: close() skips it)
                    d.release_lease()
                raise
            if removed:
                notes.append(f"pack {name}: removed {len(removed)} segment file(s) "
                             "left unreferenced by an interrupted session")
            if pack.state != "healthy":
                notes.append(f"pack {name} is {pack.state}: "
                             + ", ".join(f"disk {d.idx} {d.state} ({d.path})"
                                         for d in pack.disks if d.state != "online")
                             + f"; run `recover {name}`")
            self.packs[name] = pack
        self._tighten_modes(cat)
        notes += self.previous_session
        rows = cat.volumes()
        replayed = self.journal.recover_blocking(
            int(meta.get("events_journal", 0)),
            lambda events, n: cat.commit_blocking(Changes(events=events,
                                                          meta={"events_journal": n})))
        if replayed:
            notes.append(f"recovered {replayed} event(s) logged after the last commit "
                         "of the previous session")
        self.journal.load(cat.events(EVENTS_KEPT, NOISE_KEPT))
        self._set_rows = cat.sets()
        self._log_records = self._open_log_blocking(meta)
        return rows, notes

    def _pack_index_cache(self, npacks: int) -> int:
        """Each pack's index cache: its share of --index-cache after
        SQLite's page cache and the dedup filters."""
        rest = (self.index_cache - self.index_cache // PAGE_CACHE_SHARE
                - self.index_cache // FILTER_SHARE)
        return rest // max(1, npacks)

    def _catalogue_room_blocking(self):
        """(free bytes, catalogue bytes, where) where the catalogue writes:
        the array directory's file system. None for an array in a cluster:
        its commits wait for room in a full pool, as every Ceph client's
        writes do (docs/scale-out.md)."""
        if self.home is not None:
            return None
        st = os.statvfs(self.path)
        size = 0
        for suffix in ("", "-wal"):
            try:
                size += os.path.getsize(os.path.join(self.path, CATALOGUE_FILE + suffix))
            except OSError:
                pass
        # (root's writes may use the blocks a file system keeps for root)
        free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
        return free * st.f_frsize, size, f"the file system of {self.path}"

    def _filter_path(self, pack: str) -> str:
        """Where a clean unmount keeps pack `pack`'s dedup filter (in the
        array directory; for an array in a cluster, this host's cache)."""
        return os.path.join(self.path, f"dedup-filter.{pack}")

    def _filter_tag(self, session: str, commits: int) -> str:
        """The catalogue state a saved filter covers: the array, the
        session of its last commit and the commit count."""
        return f"{self.conf['uuid']} {session} {commits}"

    def _save_filters_blocking(self) -> None:
        """After the close's last commit: each built filter kept for the
        next open (a failure only means a build then)."""
        wb = self.writeback
        try:
            st = os.statvfs(self.path)
            room = st.f_bavail * st.f_frsize
        except OSError:
            return
        for name, pack in self.packs.items():
            size = pack.filter_bytes()
            if size * 4 > room:
                continue        # (a nearly full file system: its space is for commits)
            try:
                pack.save_filter_blocking(self._filter_path(name),
                                          self._filter_tag(wb.session, wb.commits))
            except OSError as e:
                log.warning("dedup filter of pack %s not kept: %s", name, e)

    def _filter_room(self) -> int:
        """A new pack's dedup filter: what the packs' filters leave of
        their share of --index-cache (theirs keep their size until the
        next mount shares it anew)."""
        used = sum(p.filter_bytes() for p in self.packs.values())
        return max(0, self.index_cache // FILTER_SHARE - used)

    async def _build_filters(self) -> None:
        """The packs' dedup filters, one pack at a time in a worker thread
        (a pass over its committed ids); each serves from the moment it is
        built. An event says when, with what it cost. `close` stops it
        and waits for its worker's current batch."""
        self._filters_idle = trio.Event()
        try:
            for pack in list(self.packs.values()):
                await self._build_filter(pack)
        finally:
            self._filters_idle.set()

    async def _build_filter(self, pack) -> None:
        st = pack.filter_status()
        if st is None or st["ready"]:
            return
        t0 = time.monotonic()
        try:
            with catalogue_failures():
                built = await trio.to_thread.run_sync(pack.build_filter_blocking,
                                                      abandon_on_cancel=True)
        except CatalogueError:
            return      # (the array stopped and said so; the filter stays unused)
        if built and pack.block_count():
            st = pack.filter_status()
            self.event("info", f"pack {pack.name}: dedup filter ready "
                       f"({human_bytes(st['bytes'])}, {pack.block_count()} ids, "
                       f"{time.monotonic() - t0:.1f} s, est. "
                       f"{100 * st['false_positive_rate']:.2g} % false positives)")

    def _pack_rows(self, name: str):
        """Pack `name`'s committed index: the catalogue's blocks table."""
        return self.catalogue.pack_rows(name, self.index_cache // PAGE_CACHE_SHARE)

    def _open_log_blocking(self, meta: dict) -> list:
        """Open the intent log; its records no commit covers (replayed by
        `open`). A `--log` directory that is gone after a daemon that did
        not end cleanly may hold acknowledged writes: refused."""
        conf_dir = self.conf.get("log_dir")
        if conf_dir is not None and not os.path.isdir(self.intent.dir):
            if not os.path.isdir(conf_dir) or self.previous_session:
                raise ioerror(f"the intent log directory {self.intent.dir} is missing"
                              + (" and the previous daemon did not end cleanly: it may "
                                 "hold acknowledged writes" if self.previous_session else "")
                              + "; make it available (mount its device) and mount again")
        covered = Coverage.from_meta(meta)
        try:
            return self.intent.open_blocking(covered)
        except OSError as e:
            where = self.intent.dir
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            if full and self.log_moved_to is not None \
                    and self.log_moved_to != self.conf.get("log_dir") \
                    and self.intent.uncovered_blocking(covered) == 0:
                return self._open_moved_log_blocking(covered)
            if full:
                raise nospace(
                    f"the intent log cannot be made in {where}: its file system is full "
                    f"({e.strerror}; the log needs "
                    f"{human_bytes(intentlog.SLOTS_MIN * intentlog.SLOT_SIZE)}); free "
                    "space there, or mount with --log DIR on another file system") from None
            raise ioerror(f"the intent log in {where} cannot be opened: "
                          f"{e.strerror or e}") from None

    def _open_moved_log_blocking(self, covered: Coverage) -> list:
        """The log's directory has no room for it, `--log` names another,
        and the old one holds nothing a commit does not cover: the log
        opens in the new directory at once (what _move_log does after the
        open otherwise, which needs the old log open first)."""
        old = self.intent
        new = IntentLog(self._log_path(self.log_moved_to), self.conf["uuid"],
                        old.buffer_limit, event=old.event)
        records = new.open_blocking(covered)
        conf = dict(self.conf, log_dir=self.log_moved_to)
        try:
            write_file_atomic(os.path.join(self.path, ARRAY_FILE),
                              json.dumps(conf, indent=1).encode())
        except OSError as e:
            new.close_blocking()
            raise nospace(f"{self.path}: cannot record the intent log's new directory "
                          f"in {ARRAY_FILE}: {e.strerror}; free space there") from None
        self.conf = conf
        try:
            old.remove_blocking()
        except OSError:
            pass                # (empty slots left behind: nothing in them)
        self.intent = self.writeback.intent = new
        self._open_infos.append(("info", f"the intent log is now in {new.dir} (no room "
                                 f"for it in {old.dir})"))
        return records

    def _tighten_modes(self, cat: Catalogue) -> None:
        """An array made by an older fusearray let other users read its
        data, catalogue and secret: take the group and world bits off
        (directories 0700, files 0600), and say so in an event."""
        disks = [p for name, _, _ in cat.packs() for _, p, _, _ in cat.disks(name)
                 if not is_rados(p)]
        try:
            # (not hooks/: a hook another user could change must stay
            # refused by hooks.find, not be made trusted by a chmod here)
            changed = tighten([self.path] + disks, skip=[os.path.join(self.path, HOOKS_DIR)])
        except OSError as e:
            self._open_infos.append(("warning", f"cannot restrict the modes of the array's "
                                     f"files to their owner: {e}; fix with "
                                     f"`chmod -R go= {self.path}` and each disk directory"))
            return
        if changed:
            shown = ", ".join(os.path.relpath(p, self.path) if p.startswith(self.path + "/")
                              else p for p in changed[:5])
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            self._open_infos.append(("info", f"restricted {len(changed)} file(s) and "
                                     f"directories of the array to their owner (they were "
                                     f"readable by other users): {shown}{more}"))

    async def open(self, nursery) -> None:
        raise_fd_limit()        # (every segment file is held open)
        try:
            with catalogue_failures():
                rows, notes = await trio.to_thread.run_sync(self._open_blocking)
        except CatalogueError as e:
            # (nothing to commit at the close that follows: the leases go)
            self.writeback.stop(e)
            where = (f"{self.home} (in the Ceph cluster of {self.home.ceph_conf}: does it "
                     "answer?)" if self.home else os.path.join(self.path, CATALOGUE_FILE))
            if e.errno == errno.ENOSPC or (self.home is None and _nearly_full(self.path)):
                raise nospace(f"{where}: its file system is full ({e.strerror}); free "
                              "space there and mount again") from None
            raise ioerror(f"{e.strerror}: {where}; the array cannot be opened (its "
                          "catalogue, the LUNs' maps and the block index, is unreadable: "
                          "restore it from a backup, or mount again once its disk or "
                          "cluster answers)") from None
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            err = ArrayError(e.errno, f"{self.path}: too many files to open ({e.strerror}): "
                             "the array holds each segment file open; raise the limit of "
                             "open files (ulimit -n, LimitNOFILE=) and mount again")
            self.writeback.stop(err)    # (nothing opened is committed: the close lets go)
            raise err from None
        self.ns.load(self._meta, self._set_rows, rows, self.packs)
        self._loaded = True         # from here on, a close commits (see close)
        self.nursery = nursery
        self.runner.load(self._job_rows, self._journaled_jobs)
        self.drain_notes()              # what the packs found at open, in detail
        for n in notes:
            self.event("warning", n)
        for level, n in self._open_infos:
            self.event(level, n)
        self.event("info", f"array opened: {len(self.luns)} LUN(s), "
                   f"{len(self.packs)} pack(s)")
        await self.writeback.open_refs(self._meta)
        await self._replay_log()
        self.intent.start()
        self.writeback.last_commit = time.monotonic()
        nursery.start_soon(self.writeback.run_committer)
        nursery.start_soon(self.event_hooks.run)
        nursery.start_soon(self._build_filters)
        self.runner.resume_all(nursery)   # each worker says it resumes, and where
        await self.iscsi.open(nursery)    # (the shares are served once the mount is up)

    async def _replay_log(self) -> None:
        """The intent log's records no commit covered (a daemon that did not
        end cleanly) written again, in order, each with its own sequence
        number, and committed, before the mount appears; then, if `--log`
        moved the log, the new directory is taken."""
        records, self._log_records = self._log_records, []
        wb = self.writeback
        cache = self.cache
        applied = skipped = 0
        async with wb.lock:
            for seq, vid, kind, off, span, data in records:
                vol = self.volumes.get(vid)
                if vol is None or vol.deleted or off >= vol.size:
                    skipped += 1
                    continue
                cache.resume_after(seq - 1)
                if kind == intentlog.ZERO:
                    await vol.zero(off, span, replay=True)
                else:
                    await vol.write(off, data, replay=True)
                applied += 1
                if cache.dirty_bytes > cache.flush_at:
                    await wb.commit(cover=False)   # a crash now replays it all again
            # numbers go on above everything the log and the catalogue have
            # seen: a record is never mistaken for an older or newer one
            cache.resume_after(self.intent.last)
            if records:
                await wb.commit()
        for slot, pos in self.intent.damaged:
            self.event("warning", f"intent log: {slot} stops at a damaged record at byte "
                       f"{pos} (a write in flight when the daemon stopped, or damage on "
                       "its device): it and anything after it were not replayed")
        if records:
            self.event("warning" if applied else "info",
                       f"intent log: replayed {applied} write(s) acknowledged after the "
                       f"last commit of the previous session"
                       + (f" ({skipped} of deleted LUNs skipped)" if skipped else ""))
        if self.log_moved_to is not None and self.log_moved_to != self.conf.get("log_dir"):
            await self._move_log(self.log_moved_to)

    async def _move_log(self, log_dir: str) -> None:
        """`mount --log DIR` names another directory than the array's: with
        everything committed, the old log's slots are removed and the new
        directory recorded in array.json."""
        async with self.writeback.lock:
            await self.writeback.commit()
            if self.writeback.unstored():
                self.event("warning", f"the intent log stays in {self.intent.dir}: "
                           "some acknowledged writes are not stored yet")
                return
            old = self.intent
            new = IntentLog(self._log_path(log_dir), self.conf["uuid"], old.buffer_limit,
                            event=old.event)
            await trio.to_thread.run_sync(new.open_blocking, old.covered)
            await trio.to_thread.run_sync(old.remove_blocking)
            self.intent = self.writeback.intent = new
            for v in self.volumes.values():
                v.intent = new
            conf = dict(self.conf, log_dir=log_dir)
            await trio.to_thread.run_sync(write_file_atomic, os.path.join(self.path, ARRAY_FILE),
                                          json.dumps(conf, indent=1).encode())
            self.conf = conf
            self.event("info", f"the intent log is now in {new.dir}")

    async def close(self) -> int:
        """Final commit, then release files. Safe to call once. Returns the
        bytes of acknowledged writes that could not be stored (a full or
        failed pack) and are lost with the process: an error event says so
        (the daemon then exits non-zero). `fusearray umount` runs `sync all`
        first and refuses to unmount while any is left, so this happens
        only to an unmount or SIGTERM that bypassed it."""
        lost = 0
        try:
            for pack in self.packs.values():
                pack.stop_filter()
            await self._filters_idle.wait()     # (its worker reads the catalogue)
            wb = self.writeback
            # an open that failed before the namespace was loaded (a refusal
            # after the catalogue was opened: ESTALE, a lease) has nothing of
            # its own to commit, and its empty state would overwrite the
            # catalogue's (counters, LUN ids): it only lets go
            if wb.fatal is None and self.catalogue is not None and self._loaded:
                async with wb.lock:
                    try:
                        await wb.commit()
                    except ArrayError as e:
                        if wb.catalogue_full is None:
                            raise
                        self.event("error", f"closed without a last commit: {e.message}. "
                                   "Writes fsync'd before are replayed from the intent log "
                                   "at the next mount; others since the last commit are "
                                   "lost")
                        return 0
                    unstored = wb.unstored()
                    lost = sum(unstored.values())
                    if lost:
                        err = wb.not_stored_error(None)
                        self.event("error", f"unmounted with {human_bytes(lost)} of "
                                   f"acknowledged writes not stored ({per_volume(unstored)}):"
                                   f" they are lost; {err.message}. `fusearray umount` "
                                   "refuses this unless given --discard")
                    self.event("info", "array closed")
                    await wb.commit(flush=False)
                    if wb.fatal is None:
                        await trio.to_thread.run_sync(self._save_filters_blocking)
        finally:
            for pack in self.packs.values():
                pack.close_blocking()
            if self.catalogue is not None:
                self.catalogue.close()
                self.catalogue = self.writeback.catalogue = None
            self.intent.close_blocking()
            if self.home is not None:   # after the catalogue and the log: then another may
                self.home.release_lease()
            close_media()               # a rados pack's cluster connection
            self.journal.close()
            self.runner.close()
            self.iscsi.close_fds()
            if self._lockfd is not None:
                unlink_quietly(os.path.join(self.path, RUNNING_FILE))   # ended cleanly
            if self._lockfd is not None:
                os.close(self._lockfd)
                self._lockfd = None
        return lost

    def _catalogue_failed(self, err: OSError) -> None:
        """(any thread) A read of the catalogue failed (catalogue.CatalogueError):
        the write-back stops (a commit could not be trusted to see what is
        committed), once, with an error event at the next drain. What was
        fsync'd is committed or in the intent log: the next mount has it."""
        if self.writeback.fatal is not None:
            return
        where = f"in the Ceph cluster of {self.home.ceph_conf}" if self.home else \
            "on this host"
        msg = (f"{err.strerror} (the catalogue {where}); the array stopped accepting "
               "changes: every write fsync'd before is safe; unmount it (`fusearray umount "
               "--discard` gives up what was not) and mount it again")
        self.writeback.stop(OSError(errno.EIO, msg))
        self._home_notes.append(("error", msg))

    # ---- events ----------------------------------------------------------------
    def event(self, level: str, message: str, source: str | None = None) -> None:
        """Log an event: EventJournal.event (collaborators are given
        `journal.event` itself)."""
        self.journal.event(level, message, source)

    def flush_event_summaries(self) -> None:
        self.journal.flush_summaries()

    def drain_notes(self) -> None:
        """Pack messages from worker threads -> events."""
        while self._home_notes:
            self.event(*self._home_notes.pop(0))
        for pack in self.packs.values():
            while pack.notes:
                level, msg = pack.notes.pop(0)
                self.event(level, msg)
                self.writeback.mark_meta()

    # ---- the write-back's, for the fs and ctl layers -----------------------------
    async def sync(self, vol: Volume | None = None, log: bool = False) -> None:
        """fsync of `vol` (None: of every volume): WriteBack.sync; `log`:
        through the intent log where it can (an fsync on the mount)."""
        await self.writeback.sync(vol, log)

    async def sync_all(self, discard: bool = False) -> dict:
        """ctl `sync all [discard=yes]`: WriteBack.sync_all."""
        return await self.writeback.sync_all(discard)

    async def check_room(self) -> None:
        """ENOSPC now if the catalogue's storage has no room for a commit
        (WriteBack.check_room): ctl commands ask before they change
        anything, so a refusal leaves nothing half done."""
        await self.writeback.check_room()

    async def collect_garbage(self) -> None:
        async with self.writeback.lock:
            await self.collector.collect()

    # ---- commands ---------------------------------------------------------------
    def pack(self, name: str | None) -> Pack:
        name = name or ("main" if "main" in self.packs else next(iter(self.packs)))
        try:
            return self.packs[name]
        except KeyError:
            raise notfound(f"no pack named {name!r} (packs: {', '.join(self.packs)})") from None

    def lun(self, name: str) -> Volume:
        return self.ns.lun(name)

    def shadow(self, path: str) -> Volume:
        return self.ns.shadow(path)

    def new_identity(self) -> tuple[str, str]:
        return self.ns.new_identity()

    async def create_lun(self, name: str, size_text: str, pack: str | None = None,
                         block_size: int | None = None) -> Volume:
        check_name(name, "LUN name")
        size = parse_size(size_text)
        bs = self.default_block_size if block_size is None else block_size
        if not _bs_ok(bs):
            raise invalid("block size must be a power of two from 4K to 1M")
        p = self.pack(pack)
        async with self.writeback.lock:
            if name in self.luns:
                raise exists(f"a LUN named {name} already exists")
            self.writeback.check_fits(p, size)
            vol = self.ns.create_lun(name, size, p, bs)
            self.event("info", f"created LUN {name}: {human_bytes(size)} on pack "
                       f"{p.name}, block size {bs // 1024}K, {vol.wwn}")
            await self.writeback.commit()
        return vol

    async def delete_lun(self, name: str, force: bool = False) -> None:
        vol = self.lun(name)
        if self.shared_as(vol):
            if not force:
                raise busy(f"LUN {name} is {self.shared_as(vol)}: `unshare {name}` first, "
                           "or use force=yes (which unshares it)")
            await self.iscsi.unshare(name, vol=vol)
        if vol.open_count and not force:
            raise busy(f"LUN {name} is open ({vol.open_by()}; e.g. a loop "
                       "device): detach it first or use force=yes")
        async with self.writeback.lock:
            if self.luns.get(name) is not vol:
                raise notfound(f"no LUN named {name!r}")
            del self.luns[name]
            self.ns.drop_volume(vol)      # (a copy job of it ends)
            self.event("info", f"deleted LUN {name} ({vol.wwn})")
            await self.collector.collect()

    def released(self, vol: Volume) -> None:
        """The last handle of a deleted volume closed: forget it."""
        if self.ns.released(vol):
            self.collector.want()

    async def resize_lun(self, name: str, size_text: str, force: bool = False) -> Volume:
        vol = self.lun(name)
        size = parse_size(size_text)
        if vol.readonly:
            raise ArrayError(errno.EROFS, f"LUN {name} is read-only")
        if size < vol.size and vol.open_count and not force:
            raise busy(f"LUN {name} is {self._held(vol)}: shrinking it under a "
                       "user could cut off data in use; detach it first or use force=yes")
        async with self.writeback.lock:
            self.writeback.check_fits(vol.pack, size)
            old = vol.size
            if size < old:
                await self._shrink(vol, size)
            vol.size = size
            self.writeback.mark_row(vol)
            self.event("info", f"resized LUN {name} from {human_bytes(old)} to "
                       f"{human_bytes(size)}")
            await self.writeback.commit()
        self.notify(vol)
        await self.iscsi.refresh()          # the target sees the new capacity
        return vol

    async def _shrink(self, vol: Volume, size: int) -> None:
        """Drop content past `size` so a later grow reads zeros there."""
        bs = vol.block_size
        keep = math.ceil(size / bs)
        if size % bs:
            await vol.zero_tail(size)
        vol.discard_cache(keep)
        await self.writeback.flush()
        await self.writeback.merge()
        new_nodes = []

        def emit(nid, data):
            self.nodes.add(nid, data)
            new_nodes.append((nid, data))
        root, delta = await maps.trim(vol.root, vol.height, keep, self.reader.loader(vol),
                                      emit, self.hasher)
        await self.writeback.store_nodes(vol, new_nodes)
        vol.root = root
        vol.allocated += delta
        self.collector.want()

    async def check_new_disks(self, name: str, layout: str, dirs: list[str]) -> list[str]:
        """check_pack and check_outside_mount, in a worker thread (they look
        at user-given paths, perhaps inside this very mount); bounded in time.
        Returns the absolute disk paths."""
        check_name(name, "pack name")
        used = {d.path for p in self.packs.values() for d in p.disks}

        def work():
            check_outside_mount([d if is_rados(d) else os.path.abspath(d) for d in dirs],
                                self.mountpoint)
            return check_pack(name, layout, dirs, used, self.conf["uuid"], self.ceph_conf)
        with trio.move_on_after(DISK_CHECK_TIMEOUT):
            try:
                return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
            except OSError as e:
                raise ioerror(f"cannot check the disk directories {', '.join(dirs)}: "
                              f"{e}") from None
        raise ioerror(f"checking the disk directories {', '.join(dirs)} took more than "
                      f"{DISK_CHECK_TIMEOUT:.0f} s (a hung file system?): nothing was done")

    async def add_pack(self, name: str, layout: str, dirs: list[str]) -> Pack:
        if name in self.packs:          # before asking disks (or a cluster) anything
            raise exists(f"a pack named {name} already exists")
        if self.home is not None and not all(is_rados(d) for d in dirs):
            raise invalid(f"{self.home} is an array in a Ceph cluster: its packs are there "
                          "too (a host directory would tie it to this host): use addpack "
                          "NAME rados POOL")
        paths = await self.check_new_disks(name, layout, dirs)
        async with self.writeback.lock:
            # (checked again: another addpack may have run while these were checked)
            if name in self.packs:
                raise exists(f"a pack named {name} already exists")
            taken = set(paths) & {d.path for p in self.packs.values() for d in p.disks}
            if taken:
                raise busy(f"{', '.join(sorted(taken))} became a disk of this array "
                           "while it was checked")
            disks = [Disk(i, p, ceph_conf=self.ceph_conf) for i, p in enumerate(paths)]
            if any(is_rados(p) for p in paths) and self.conf.get("ceph_conf") != self.ceph_conf:
                conf = dict(self.conf, ceph_conf=self.ceph_conf)   # a later mount finds it
                await trio.to_thread.run_sync(write_file_atomic,
                                              os.path.join(self.path, ARRAY_FILE),
                                              json.dumps(conf, indent=1).encode())
                self.conf = conf
            try:
                await trio.to_thread.run_sync(_make_disks, disks, self.conf["uuid"], name)
            except OSError as e:
                raise ioerror(f"cannot prepare disk directories for pack {name}: {e}") from None
            pack = Pack(name, layout, disks, self.hasher,
                        self._pack_index_cache(len(self.packs) + 1), self._filter_room())
            for n in await trio.to_thread.run_sync(self._take_leases_blocking, pack):
                self.event("warning", n)
            await trio.to_thread.run_sync(pack.open_blocking, self._pack_rows(name))
            await trio.to_thread.run_sync(pack.build_filter_blocking)     # (a new pack: no rows)
            for p in self.packs.values():       # the same --index-cache, shared by one more
                p.resize_index_cache(self._pack_index_cache(len(self.packs) + 1))
            self.packs[name] = pack
            self.writeback.changes.packs_add.append((name, layout, time.time(), paths))
            self.event("info", f"added pack {name}: {layout} over {', '.join(paths)}")
            await self.writeback.commit()
        return pack

    async def set_flag(self, vol: Volume, flag: str, value: bool) -> None:
        if flag == "hidden" and value and self.shared_as(vol):
            raise busy(f"LUN {vol.name} is {self.shared_as(vol)}: a hidden LUN is not "
                       f"offered to hosts; `unshare {vol.name}` first")
        async with self.writeback.lock:
            setattr(vol, flag, value)
            self.writeback.mark_row(vol)
            self.event("info", f"{vol.kind} {vol.path}: {flag} {'on' if value else 'off'}")
            await self.writeback.commit()
        await self.iscsi.refresh()          # a read-only LUN is write-protected on the wire

    # ---- iSCSI (iscsi.py) ------------------------------------------------------------
    def shared_as(self, vol: Volume) -> str | None:
        """`shared over iSCSI as target IQN on PORTAL` when LUN `vol` is, else None."""
        if vol.kind != "lun" or self.luns.get(vol.name) is not vol:
            return None
        return self.iscsi.describe(vol.name)

    def _held(self, vol: Volume) -> str:
        """Who holds `vol`, for an EBUSY: its share and its open handles."""
        return ", ".join(filter(None, (self.shared_as(vol), f"open ({vol.open_by()})")))

    async def share(self, name: str, portal: str | None, initiators: str | None):
        """ctl `share NAME [portal=ADDR:PORT] [initiator=IQN[,IQN...]]` (the
        options as written, None when not given): Shares.share."""
        if "/" in name:
            raise invalid("only LUNs are shared over iSCSI, not shadow copies (resync or "
                          "swap the shadow copy to a LUN)")
        return await self.iscsi.share(self.lun(name), portal, initiators)

    async def unshare(self, name: str, keep: bool = False) -> None:
        await self.iscsi.unshare(name, keep, self.luns.get(name))

    def render_job(self, jid: int) -> bytes:
        return self.runner.render(jid)

    # ---- delegates: the commands of the fs and ctl layers ---------------------------
    async def snapshot(self, *args, **kw):
        return await self.shadows.snapshot(*args, **kw)

    async def resync(self, *args, **kw):
        out = await self.shadows.resync(*args, **kw)
        await self.iscsi.refresh()      # (forced onto a shared LUN: its size may differ)
        return out

    async def swap(self, *args, **kw) -> Volume:
        vol = await self.shadows.swap(*args, **kw)
        await self.iscsi.refresh()      # (forced onto a shared LUN: the target serves it)
        return vol

    async def delete_shadow(self, target: str, force: bool = False) -> dict:
        return await self.shadows.delete_shadow(target, force)

    async def recover(self, name: str):
        return await self.recovery.recover(name)

    async def replace(self, name: str, old: str, new_dir: str, force: bool = False):
        return await self.recovery.replace(name, old, new_dir, force)

    async def scrub(self, name: str):
        return await self.recovery.scrub(name)

    def job(self, text: str):
        return self.runner.get(text)

    async def control_job(self, text: str, action: str, rate: str | None = None):
        return await self.runner.control(text, action, rate)

    def pin(self, roots) -> None:
        self.collector.pin(roots)

    def unpin(self, roots) -> None:
        self.collector.unpin(roots)

    # ---- the host: loop devices and mounts over our files (host.py) -------------
    async def attachments(self) -> dict:
        """{path under the mount: [host.Attachment]}, read in a worker thread."""
        if not self.mountpoint:
            return {}
        return await trio.to_thread.run_sync(attachments_blocking, self.mountpoint)

    async def refresh_host_view(self) -> None:
        """Read the attachments again for `status` (before it is rendered)."""
        self.host_view = await self.attachments()

    # ---- status ------------------------------------------------------------------
    def status(self) -> dict:
        packs = []
        for p in self.packs.values():
            packs.append({"name": p.name, "layout": p.layout, "state": p.state,
                          "capacity_bytes": p.capacity_bytes(),
                          "used_bytes": p.used_bytes(),
                          "free_bytes": p.free_bytes(),
                          "blocks": p.block_count(),
                          "index_cache": p.index_status(),
                          "dedup_filter": p.filter_status(),
                          "mapped_reads": p.mapped_reads,
                          "disks": [dict({"id": d.idx, "path": d.path, "state": d.state},
                                         **({"rados": d.info} if d.info else {}))
                                    for d in p.disks]})
        luns = [self._vol_status(v) for v in sorted(self.luns.values(), key=lambda v: v.name)]
        sets = [{"name": s.name, "created": s.created,      # (an import in progress:
                 "shadow_copies": [self._vol_status(v)     # shown as its job)
                                   for v in s.members.values()]}
                for s in self.ns.visible_sets()]
        invalid_disks = [{"id": d.idx, "path": d.path, "state": d.state, "pack": p.name}
                         for p in self.packs.values() for d in p.disks
                         if d.state == "invalid"]
        if invalid_disks:
            packs.append({"name": "INVALID", "layout": "-", "state": "invalid",
                          "capacity_bytes": 0, "used_bytes": 0, "free_bytes": 0,
                          "blocks": 0, "mapped_reads": 0, "disks": invalid_disks})
        # an array in a cluster: `array` is its home there, `cache_dir` this host's
        where = ({"array": self.home.spec, "cache_dir": self.path} if self.home
                 else {"array": self.path})
        return {"pid": os.getpid(), **where, "uuid": self.conf["uuid"],
                "packs": packs, "luns": luns, "sets": sets,
                "jobs": self.runner.status(),
                # --cache-size: the block cache and the intent log's records
                "cache": {"limit_bytes": self.cache.limit + self.intent.buffer_limit,
                          "log_records_limit_bytes": self.intent.buffer_limit,
                          "bytes": self.cache.bytes,
                          "dirty_bytes": self.cache.dirty_bytes, **self.cache.stats()},
                "intent_log": self.intent.status(),
                # --index-cache: SQLite's pages and each pack's cache of the index
                "index": {"limit_bytes": self.index_cache,
                          "page_cache_bytes": self.index_cache // PAGE_CACHE_SHARE,
                          "filter_bytes": sum(p.filter_bytes()
                                              for p in self.packs.values()),
                          "bytes": sum(p.index_status()["bytes"]
                                       + p.filter_bytes()
                                       for p in self.packs.values())},
                # a quarter of --cache-size (64 MiB to 512 MiB): map nodes
                "node_cache": self.nodes.status()}

    def _vol_status(self, v: Volume) -> dict:
        d = {"name": v.name, "size": v.size, "pack": v.pack.name, "wwn": v.wwn,
             "serial": v.serial, "readonly": v.readonly, "hidden": v.hidden,
             "allocated_bytes": v.allocated_bytes(), "block_size": v.block_size,
             "open": v.open_count, "state": self.shadows.state(v),
             "iscsi": self.iscsi.status(v.name) if self.shared_as(v) else None,
             "attached": [{"device": a.device, "mounts": a.mounts}
                          for a in self.host_view.get(volume_key(v), [])]}
        if v.kind == "shadow":
            d.update(origin=v.origin, context=v.context, set=v.set_name,
                     consistency=v.consistency)
        return d


def _make_disks(disks, array_uuid: str, pack: str) -> None:
    """Label the disks of a pack added to an open array, its local
    directories locked meanwhile (an init naming one at the same time is
    refused, and so is this if an init holds it)."""
    local = [d.path for d in disks if not is_rados(d.path)]
    new = [p for p in local if not os.path.exists(p)]
    try:
        held = _claim_disk_dirs(local)
    except BaseException:
        _empty_dirs([], new)        # (made for the claim; another's are not emptied)
        raise
    try:
        for d in disks:
            d.write_label(array_uuid, pack)     # makes the directory (0700) first
    except BaseException:
        _empty_dirs(local, new)     # (locked and empty before: only labels of its own)
        raise
    finally:
        for fd in held:
            os.close(fd)

