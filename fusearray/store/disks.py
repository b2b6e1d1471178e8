"""Disks: a pack's host directories, their labels and their health.

`Disk` is one directory (its label, its segment files' paths, its state:
online | missing | failed | stale | invalid). `DiskHealth` holds the rules
by which a pack's disks leave it: an I/O or checksum error counts against
a disk (ERROR_LIMIT of them fail it), a disk whose write or fsync fails
while another holds the data is failed at once, like md, and the last
disk holding the data is never failed (that would only make the rest
unreadable: its errors go to the caller). Which disks a layout can do
without is the layout's to say (`Layout.can_lose`, `Layout.failed`).

Threads: a disk leaves (`DiskHealth.lose`) in whichever thread finds it
failing: a worker thread appending or syncing (under the array's commit
lock), reading or healing a block (no lock: reads run beside appends),
checking the disks (under the commit lock from the committer, without it
from `recover`), or rebuilding and scrubbing. Its state is a single
attribute write read without a lock: a reader that sees the old state
tries the disk and fails over as for an I/O error. `lose` closes the
disk's files through the fd table's lock (files.py) and reads the
segments' unsynced bookkeeping to set `since` (segments.py). The trio
thread changes states too (recovery: stale, replace) under the commit
lock. Messages go to the pack's `notes` (list.append: safe from any
thread; the array drains them on the trio thread).
"""
import errno
import json
import os
import time

from .media import medium_for, seg_name
ERROR_LIMIT = 8           # I/O or checksum errors before a disk is failed


class Disk:
    """A medium (media.py: a host directory, or a RADOS pool namespace)
    holding a pack's segment files and its label.
    state: online | missing | failed | stale | invalid. `since`: the first
    segment it may lack (set when it leaves; a rebuild starts there)."""

    def __init__(self, idx: int, path: str, state: str = "online", since=None,
                 ceph_conf: str | None = None):
        self.idx = idx
        self.ceph_conf = ceph_conf
        self.path = path             # and its medium
        self.state = state
        self.since = since
        self.errors = 0
        self.listed = 0.0           # when the disk check last listed it (monotonic)
        # what the medium says of itself beyond a directory (a RADOS pool:
        # pool, namespace, cluster health), refreshed by the disk check
        self.info: dict | None = None

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, path: str) -> None:
        """A disk given a new place (replace) gets that place's medium."""
        self._path = path
        self.medium = medium_for(path, self.ceph_conf)

    @property
    def segdir(self) -> str:
        return os.path.join(self.path, "segments")

    def seg_path(self, seq: int) -> str:
        return os.path.join(self.segdir, f"{seq:08d}.seg")

    def write_label(self, array_uuid: str, pack: str) -> None:
        self.medium.prepare()            # raw data: the owner's alone (0700)
        self.medium.write_label(json.dumps(
            {"array": array_uuid, "pack": pack, "disk": self.idx}).encode())

    def read_label(self) -> dict:
        return json.loads(self.medium.read_label())

    def label_state(self, pack: str, array_uuid: str | None) -> str:
        """ok | missing (no directory or no label) | invalid (a label that is
        unreadable or from another pack or array) | error (reading it
        failed: the disk, not a wrong label) | fenced (a rados disk: another
        mount took it over and blocklisted this client)."""
        try:
            lab = self.read_label()
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            if e.errno == errno.ESHUTDOWN:
                return "fenced"         # this client was blocklisted: nothing answers it
            present = self.present()
            if e.errno in (errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOMEM,
                           errno.ETIMEDOUT) and present:
                return "error"          # the disk failed a read: not a wrong label
            return "invalid" if present else "missing"
        except ValueError:
            return "invalid" if self.present() else "missing"
        if lab.get("pack") == pack and lab.get("disk") == self.idx and \
                (array_uuid is None or lab.get("array") == array_uuid):
            return "ok"
        return "invalid"

    def refresh_info(self) -> None:
        """Blocking: ask the medium what it says of itself (`info`)."""
        status = getattr(self.medium, "status", None)
        if status is not None:
            self.info = status()

    def take_lease(self, seconds: float, holder: dict, break_lock: bool = False,
                   on_lost=None) -> list[str]:
        """A medium with a lease (a RADOS namespace: one mount at a time)
        takes it: rados.RadosMedium.take_lease. Others have none: []."""
        take = getattr(self.medium, "take_lease", None)
        return take(seconds, holder, break_lock, on_lost) if take is not None else []

    def release_lease(self) -> None:
        release = getattr(self.medium, "release_lease", None)
        if release is not None:
            release()

    @property
    def records_commits(self) -> bool:
        """A medium shared by hosts (RADOS) keeps the array's commit record
        (which copy of the array wrote last); a directory does not."""
        return hasattr(self.medium, "mark_commit")

    def last_commit(self) -> dict:
        """rados.RadosMedium.last_commit; {} on other media."""
        return self.medium.last_commit() if self.records_commits else {}

    def mark_commit(self, rec: dict) -> None:
        if self.records_commits:
            self.medium.mark_commit(rec)

    def why_missing(self) -> str:
        """Why a disk found missing is (for its event): a remote medium's
        cluster that does not answer is not a deleted directory."""
        health = (self.info or {}).get("health", "")
        if health.startswith("unreachable"):
            return f"its cluster does not answer ({health})"
        return "its directory (pool) or label is gone"

    def present(self) -> bool:
        """Is its directory (its pool) there?"""
        try:
            return self.medium.present()
        except OSError:
            return False


class DiskHealth:
    """The pack's disks as a whole: their state, and the failing of one.
    `pack` is the pack: its name, layout strategy and notes, and, when a
    disk leaves, its segments (`since_lost`) and fd table (`close_disk`)."""

    def __init__(self, pack):
        self.pack = pack
        self.disks: list[Disk] = pack.disks

    def online(self) -> list[Disk]:
        return [d for d in self.disks if d.state == "online"]

    @property
    def state(self) -> str:
        bad = sum(d.state != "online" for d in self.disks)
        if not bad:
            return "healthy"
        return "failed" if self.pack.strategy.failed(bad) else "degraded"

    def can_lose(self, d: Disk) -> bool:
        """Would the pack's data stay readable without disk `d`? (A single
        disk, the last online copy of a mirror or a second raid5 disk
        never is failed: that would make the data unreadable, not safer.)"""
        others = sum(x is not d and x.state == "online" for x in self.disks)
        return self.pack.strategy.can_lose(others)

    def lose(self, d: Disk, state: str, why: str) -> None:
        """Disk `d` leaves the pack (`state`: missing, failed, invalid)."""
        if d.state != "online":
            return
        pack = self.pack
        d.state = state
        # what it holds but never fsynced may be gone: a rebuild starts there
        d.since = pack.segs.since_lost(d)
        pack.files.close_disk(d)
        what = {"degraded": "data is still readable (redundancy lost)",
                "failed": "some data can no longer be read"}.get(self.state, "")
        pack.note("error", f"disk {d.idx} of pack {pack.name} ({d.path}) is {state}: {why}; "
                  f"the pack is {self.state}: {what}; run `recover {pack.name}` when the "
                  f"disk is back, or `replace {pack.name} {d.idx} NEW_DIR`")

    def disk_error(self, d: Disk, what: str) -> None:
        d.errors += 1
        last = not self.can_lose(d)
        self.pack.note("warning", f"disk {d.idx} of pack {self.pack.name} ({d.path}): {what} "
                       + ("(the last disk holding the data: it stays in service)" if last
                          else f"(error {d.errors} of {ERROR_LIMIT})"))
        if d.errors >= ERROR_LIMIT and not last:
            self.lose(d, "failed", f"{d.errors} I/O or checksum errors")

    def write_failed(self, d: Disk, e: OSError, others_wrote: bool = True) -> None:
        """An append's write to `d` failed (another disk took it when
        `others_wrote`): out it goes if the pack can do without it, else it
        counts against it."""
        if others_wrote and self.can_lose(d):      # it lacks this record: out it goes
            self.lose(d, "failed", f"a write to it failed: {e.strerror}")
        else:
            self.disk_error(d, f"write failed: {e.strerror}")

    def check_blocking(self, array_uuid: str | None, segs) -> None:
        """Notice disks that vanished or came back (a worker thread, every
        few seconds). `segs`: the segments every online disk must hold."""
        pack = self.pack
        expected = {seg_name(seq) for seq in segs or ()}
        for d in self.disks:
            d.refresh_info()
            label = d.label_state(pack.name, array_uuid)
            ok = label == "ok"
            if label == "fenced":
                if d.state == "online":
                    self.lose(d, "failed", "another mount took it over and fenced this "
                              "daemon off the cluster (its client is blocklisted): unmount "
                              "this one")
                continue
            if d.state == "online" and label == "error":
                self.disk_error(d, "reading its label failed")
            elif d.state == "online" and not ok:
                self.lose(d, label, d.why_missing() if label == "missing"
                          else "its label is unreadable or belongs elsewhere")
            elif d.state == "online":
                # (a listing of a RADOS namespace walks every PG of its pool:
                # such a medium says how seldom, LIST_EVERY s, and is skipped
                # between; a directory is listed at every check)
                every = getattr(d.medium, "LIST_EVERY", 0)
                if every and time.monotonic() - d.listed < every:
                    continue
                d.listed = time.monotonic()
                try:
                    gone = expected - set(d.medium.names())
                except OSError:
                    gone = expected
                if gone:
                    self.lose(d, "missing", f"{len(gone)} segment file(s) are gone "
                              "from its directory")
            elif d.state == "missing" and ok:
                d.state = "stale"
                pack.note("warning", f"disk {d.idx} of pack {pack.name} ({d.path}) is "
                          f"back but older than the pack: run `recover {pack.name}`")
