"""Where an array lives: a host directory, or a Ceph cluster (issue 17).

`fusearray init rados:POOL/NAME` makes an array whose durable state is all
in the cluster, so that any host can mount it (one at a time) and the
host keeps only a cache directory:

- the namespace `fusearray-array.NAME` of POOL holds the array's identity
  (object `array.json`: what ARRAY/array.json holds for an array in a
  directory, less the host's ceph.conf), its catalogue (SQLite through
  Ceph's VFS, libcephsqlite: the objects `catalogue.db.*` and
  `catalogue.db-wal.*`, see catalogue.py), its intent log (objects
  `log.slot.N`, intentlog.SlotObjects: an fsync is durable on the
  cluster) and the array's lease (object `fusearray-lease`,
  store.rados.Lease: one mount at a time, a dead or stalled holder fenced
  off the cluster before another host takes over);
- its packs are rados packs (their own namespaces of pools of the same
  cluster, as for any array: store/rados.py);
- the mount's cache directory (`--cache-dir`, default
  /var/cache/fusearray/POOL/NAME) is an array directory whose array.json
  names the array's home (`"home": "rados:POOL/NAME"`) and this host's
  ceph.conf; it holds only what is the host's own: the lock file and
  running marker, daemon.log, the event and job journals (events and job
  progress since the last commit: a host lost loses those, never data),
  hooks, iSCSI shares. Another host's cache directory is made from the
  cluster at its first mount.

Init (array.init_cluster_array) runs under this host's init lock (a file
lock: `init_lock`) and the array's lease, and records itself (object
`init.json`: the new array's id and the pack disks it is about to label)
before it labels anything; array.json, written last, marks the array
made. What a killed init left (the labels of its pack namespaces, its
half-made catalogue) the next init of the name clears first
(`drop_dead_init`), so the name and any namespace given are usable again.

Opening (Array._open_blocking) takes the array's lease before anything
else, then clears a catalogue lock that a dead holder left (blocklisting
its SQLite client first: `unlock_dead`), then opens the catalogue and
replays the intent log from the cluster.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile

from .errors import ArrayError, busy, exists, invalid, ioerror, notfound
from .events import EVENT_JOURNAL
from .perms import private_dir
from .store import write_file_atomic
from .store.media import LABEL

PREFIX = "rados:"
NAMESPACE_PREFIX = "fusearray-array."
CONFIG_OBJECT = "array.json"
CATALOGUE = "catalogue.db"
#: the first object of the catalogue's database (Ceph's SQLite VFS), its
#: exclusive lock and the xattr naming the client that holds it
CATALOGUE_HEAD = CATALOGUE + ".0000000000000000"
CATALOGUE_LOCK = "striper.lock"
CATALOGUE_HOLDER = "striper.excl"
DEFAULT_CACHE_ROOT = "/var/cache/fusearray"
#: what an init in progress wrote first: its array id and the disks it labels
INIT_OBJECT = "init.json"


def is_cluster(spec: str) -> bool:
    """`rados:POOL/NAME` names an array in a cluster (a path never starts so)."""
    return spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str]:
    """(pool, name) of `rados:POOL/NAME`."""
    pool, _, name = spec[len(PREFIX):].partition("/")
    ok = lambda t: t and all(c.isalnum() or c in "._-" for c in t) and t[0] not in ".-"
    if not (ok(pool) and ok(name)) or "/" in name:
        raise invalid(f"bad array {spec!r}: use rados:POOL/NAME (letters, digits, '.', "
                      "'_', '-')")
    return pool, name


class ClusterHome:
    """An array's home in a Ceph cluster (the module docstring)."""

    def __init__(self, spec: str, ceph_conf: str | None):
        self.pool, self.name = parse(spec)
        self.spec = f"{PREFIX}{self.pool}/{self.name}"
        if not ceph_conf:
            raise invalid(f"{self.spec}: no Ceph cluster named: set CEPH_CONF to its "
                          "ceph.conf (or give --ceph-conf)")
        self.ceph_conf = os.path.abspath(ceph_conf)
        self.namespace = NAMESPACE_PREFIX + self.name
        from .store.rados import RadosMedium
        self.medium = RadosMedium(f"{PREFIX}{self.pool}/{self.namespace}", self.ceph_conf)

    def __str__(self) -> str:
        return self.spec

    def catalogue_uri(self) -> str:
        """The catalogue, for Catalogue (Ceph's SQLite VFS reads the cluster
        from $CEPH_CONF: set for this process here)."""
        from .catalogue import cluster_uri
        os.environ["CEPH_CONF"] = self.ceph_conf
        return cluster_uri(self.pool, self.namespace, CATALOGUE)

    def read_config(self) -> dict:
        """The array's array.json object: ArrayError ENOENT if there is
        none (no such array), EIO if the cluster does not answer."""
        try:
            data = self.medium.read_object(CONFIG_OBJECT)
        except FileNotFoundError:
            raise notfound(f"{self.spec} is not a fusearray array (no {CONFIG_OBJECT} in "
                           f"namespace {self.namespace} of pool {self.pool}); create one "
                           f"with `fusearray init {self.spec}`") from None
        except OSError as e:
            raise ioerror(f"{self.spec}: the Ceph cluster of {self.ceph_conf} does not "
                          f"answer: {e.strerror or e}") from None
        try:
            return json.loads(data)
        except ValueError as e:
            raise ioerror(f"{self.spec}: {CONFIG_OBJECT} is damaged: {e}") from None

    def exists(self) -> bool:
        try:
            self.read_config()
        except ArrayError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def write_config(self, conf: dict) -> None:
        """array.json in the cluster (without the host's own keys)."""
        kept = {k: v for k, v in conf.items() if k not in ("home", "ceph_conf")}
        self.medium.write_object(CONFIG_OBJECT, json.dumps(kept, indent=1).encode())

    def take_lease(self, seconds: float, holder: dict, break_lock: bool, on_lost=None):
        """The array's lease (store.rados.Lease on this namespace)."""
        return self.medium.take_lease(seconds, holder, break_lock, on_lost)

    def release_lease(self) -> None:
        self.medium.release_lease()

    def last_holder(self) -> dict:
        """The record of the mount that holds the lease or held it last and
        did not end cleanly ({} if none: a clean end takes it off)."""
        from .store.rados import LEASE_OBJECT
        try:
            _, io = self.medium.lease_io()
            return json.loads(io.get_xattr(LEASE_OBJECT, "holder"))
        except Exception:           # no object, no record, a cluster that does not answer
            return {}

    @contextlib.contextmanager
    def init_lock(self):
        """This host's lock on initialising this array, held for the whole
        init (a file lock in a directory of root's, or of the user's).
        It makes the lease's rule hold for init too (Lease.take: a holder
        of this array on this host is a dead process of it, taken over at
        once): a second init of the name on this host while one runs is
        refused here, EBUSY, instead of fencing the live one; a killed
        init's lock went with it."""
        base = "/run" if os.geteuid() == 0 else \
            os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        where = os.path.join(base, "fusearray" if os.geteuid() == 0
                             else f"fusearray-{os.geteuid()}")
        try:
            private_dir(where)
            st = os.lstat(where)
        except OSError as e:
            raise busy(f"{self.spec}: cannot use {where} for the init lock: {e.strerror}; "
                       "remove it (another user may have made it)") from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise busy(f"{self.spec}: {where} is not a directory of this user's: "
                       "remove it (another user may have made it)")
        path = os.path.join(where, f"init.{self.pool}.{self.name}.lock")
        while True:     # (the file is removed at the end: lock the one that is there)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise busy(f"{self.spec}: another `fusearray init` of it is running on "
                           "this host") from None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)

    def record_init(self, array_id: str, disks: list[str]) -> None:
        """Under the lease, before any disk is labelled: what this init is
        about to make (drop_dead_init undoes it if the init dies)."""
        self.medium.write_object(INIT_OBJECT, json.dumps(
            {"uuid": array_id, "disks": disks, "host": socket.gethostname(),
             "pid": os.getpid()}).encode())

    def drop_dead_init(self, ceph_conf: str | None) -> list[str]:
        """Under the lease, with no array.json: clear what an init that
        did not finish left (its record says what): every pack disk that
        carries its label (the label and whatever else is in that
        namespace: an init writes nothing else there), then the record.
        A disk labelled for another array is left alone. Returns the disks
        cleared. OSError if the cluster fails."""
        from .store.rados import RadosMedium
        try:
            rec = json.loads(self.medium.read_object(INIT_OBJECT))
        except FileNotFoundError:
            return []
        except ValueError:
            rec = {}
        cleared = []
        for path in rec.get("disks", []):
            m = RadosMedium(path, ceph_conf)
            try:
                label = json.loads(m.read_label())
            except (FileNotFoundError, ValueError):
                continue
            if label.get("array") != rec.get("uuid"):
                continue
            for name in m.names():
                m.unlink(name)
            m.unlink(LABEL)
            cleared.append(path)
        self.medium.unlink(INIT_OBJECT)
        return cleared

    def drop_init_record(self) -> None:
        """The init is done (array.json written): its record goes."""
        try:
            self.medium.unlink(INIT_OBJECT)
        except FileNotFoundError:
            pass

    def unlock_dead_catalogue(self) -> list[str]:
        """With the lease held: a catalogue lock left by a dead (or fenced)
        holder is broken, its client blocklisted first. Returns the
        addresses fenced."""
        return self.medium.unlock_dead(CATALOGUE_HEAD, CATALOGUE_LOCK, CATALOGUE_HOLDER)


def default_cache_dir(spec: str) -> str:
    pool, name = parse(spec)
    return os.path.join(DEFAULT_CACHE_ROOT, pool, name)


def prepare_cache_dir(spec: str, cache_dir: str | None, ceph_conf: str | None) -> str:
    """The cache directory of a mount of array `spec` on this host (made
    or refreshed from the cluster's array.json); returns its path. An
    existing directory must be this array's cache or empty."""
    home = ClusterHome(spec, ceph_conf)
    conf = home.read_config()
    path = os.path.abspath(cache_dir or default_cache_dir(spec))
    mine = os.path.join(path, "array.json")
    if os.path.exists(mine):
        try:
            with open(mine) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ioerror(f"cannot read {mine}: {e}") from None
        if old.get("home") != home.spec or old.get("uuid") != conf.get("uuid"):
            raise exists(f"{path} holds another array ({old.get('home') or 'a local one'}, "
                         f"uuid {old.get('uuid')}): give another --cache-dir")
        # its journals (events and job changes after its last commit) are
        # only this cache's to replay if it was the last to hold the array:
        # after another host served it, they would undo that host's work
        from .array import JOB_JOURNAL
        last = home.last_holder()
        if (last.get("array"), last.get("host")) != (path, socket.gethostname()):
            for fn in os.listdir(path):
                if fn.startswith((EVENT_JOURNAL, JOB_JOURNAL)):
                    os.unlink(os.path.join(path, fn))
    elif os.path.isdir(path) and os.listdir(path):
        raise invalid(f"{path} is not empty: give a new or empty --cache-dir")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    private_dir(path)
    write_file_atomic(mine, json.dumps(dict(conf, home=home.spec, ceph_conf=home.ceph_conf),
                                       indent=1).encode())
    return path
