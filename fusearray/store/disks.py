"""Disks: a pack's host directories and their labels.

`Disk` is one directory: its label (which array, pack and position it
belongs to), its segment files' paths, its state and error count. The
rules by which a disk leaves its pack are the pack's (see pack.py).
"""
import errno
import json
import os

from ..perms import private_dir
from .records import write_file_atomic

LABEL = "fusearray-disk.json"
ERROR_LIMIT = 8           # I/O or checksum errors before a disk is failed


class Disk:
    """A host directory holding a pack's segment files (and its label).
    state: online | missing | failed | stale | invalid. `since`: the first
    segment it may lack (set when it leaves; a rebuild starts there)."""

    def __init__(self, idx: int, path: str, state: str = "online", since=None):
        self.idx = idx
        self.path = path
        self.state = state
        self.since = since
        self.errors = 0

    @property
    def segdir(self) -> str:
        return os.path.join(self.path, "segments")

    def seg_path(self, seq: int) -> str:
        return os.path.join(self.segdir, f"{seq:08d}.seg")

    def write_label(self, array_uuid: str, pack: str) -> None:
        private_dir(self.path)           # raw data: the owner's alone (0700)
        private_dir(self.segdir)
        write_file_atomic(os.path.join(self.path, LABEL), json.dumps(
            {"array": array_uuid, "pack": pack, "disk": self.idx}).encode())

    def read_label(self) -> dict:
        with open(os.path.join(self.path, LABEL), "rb") as f:
            return json.loads(f.read())

    def label_state(self, pack: str, array_uuid: str | None) -> str:
        """ok | missing (no directory or no label) | invalid (a label that is
        unreadable or from another pack or array) | error (reading it
        failed: the disk, not a wrong label)."""
        try:
            lab = self.read_label()
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            if e.errno in (errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOMEM) and \
                    os.path.isdir(self.path):
                return "error"          # the disk failed a read: not a wrong label
            return "invalid" if os.path.isdir(self.path) else "missing"
        except ValueError:
            return "invalid" if os.path.isdir(self.path) else "missing"
        if lab.get("pack") == pack and lab.get("disk") == self.idx and \
                (array_uuid is None or lab.get("array") == array_uuid):
            return "ok"
        return "invalid"
