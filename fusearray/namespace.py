"""The array's namespace: every live volume by id, LUNs by name, shadow copy
sets (typed records), and the identities (vid, WWN, serial) new volumes get.

One owner: the `Namespace` object, on the trio thread. It is changed only
under the commit lock (by the Array's LUN commands, `shadows.Shadows` and,
through the Shadows' staging API, an import), and never waits: every method
is synchronous, so a change is whole when the next task runs. What a change
must persist goes to the pending catalogue changes (`changes()`, the
write-back's) and to the rows it marks dirty (`mark_row`); the next commit
writes both. The fs and ctl layers read `volumes`, `luns` and `sets`.

Staging: an import builds its volumes in a set whose name starts with
STAGING_PREFIX (never a user name: names start with a letter or digit). Such
a set is invisible: not listed, not found by `shadow()` or `visible_set()`,
and it becomes a real set only when the import publishes it. `is_staging`
is the one place that rule is written.
"""
import math
import time
from dataclasses import dataclass, field

from . import ZERO_ID, maps
from .errors import notfound
from .util import utc_stamp

STAGING_PREFIX = "."
#: Made-up IEEE company id for our NAA-6 WWNs (`naa.6` + 31 hex digits).
WWN_OUI = "fa55a7"


def is_staging(name: str) -> bool:
    """A staging set's name (an import in progress): never shown to users."""
    return name.startswith(STAGING_PREFIX)


def staging_name(job_id: int) -> str:
    """The staging set of import job `job_id`."""
    return f"{STAGING_PREFIX}import-{job_id}"


@dataclass(eq=False)
class ShadowSet:
    """A shadow copy set: its name, when it was taken, and its shadow
    copies by LUN name."""
    name: str
    created: float
    members: dict = field(default_factory=dict)      # LUN name -> Volume

    @property
    def staging(self) -> bool:
        return is_staging(self.name)


class Namespace:
    """Volumes, LUNs, sets and identities (see the module docstring).

    `make_volume(row, pack, source)` builds a Volume (the Array's wiring);
    `changes()` is the pending catalogue Changes of the next commit;
    `mark_row(vol)` has the next commit write a volume's row;
    `volume_dropped(vol)` is told of every volume deleted (its copy job ends);
    `volume_forgotten(vol)` when a deleted one leaves the volume table (its
    I/O counters go to its pack's: metrics.Metrics.retire)."""

    def __init__(self, uuid: str, vendor: str, *, make_volume, changes, mark_row,
                 volume_dropped, volume_forgotten=lambda vol: None):
        self.uuid = uuid
        self.vendor = vendor
        self.make_volume = make_volume
        self.changes = changes
        self.mark_row = mark_row
        self.volume_dropped = volume_dropped
        self.volume_forgotten = volume_forgotten
        self.volumes: dict = {}       # vid -> Volume: every live one, also deleted-but-open
        self.luns: dict = {}          # name -> Volume
        self.sets: dict[str, ShadowSet] = {}
        self.next_serial = 1
        self.next_vid = 1

    # ---- loading (at open) --------------------------------------------------------
    def load(self, meta: dict, sets, rows, packs: dict) -> None:
        """The catalogue's counters, set rows [(name, created)] and volume rows."""
        self.next_serial = int(meta.get("next_serial", 1))
        self.next_vid = int(meta.get("next_vid", 1))
        for name, created in sets:
            self.sets[name] = ShadowSet(name, created)
        for row in rows:
            vol = self.make_volume(row, packs[row["pack"]],
                                   packs[row["source"]] if row["source"] else None)
            self.volumes[vol.vid] = vol
            if vol.kind == "lun":
                self.luns[vol.name] = vol
            else:
                s = self.sets.setdefault(vol.set_name, ShadowSet(vol.set_name, vol.created))
                s.members[vol.name] = vol

    # ---- identity -----------------------------------------------------------------
    def new_identity(self) -> tuple[str, str]:
        n = self.next_serial
        self.next_serial += 1
        wwn = f"naa.6{WWN_OUI}{self.vendor}{n:016x}"
        serial = f"FA{self.uuid[:8].upper()}{n:08d}"
        return wwn, serial

    def new_vid(self) -> int:
        vid = self.next_vid
        self.next_vid += 1
        return vid

    # ---- lookups ------------------------------------------------------------------
    def lun(self, name: str):
        vol = self.luns.get(name)
        if vol is None:
            raise notfound(f"no LUN named {name!r}")
        return vol

    def visible_set(self, name: str) -> ShadowSet | None:
        """The set named `name`, unless it is a staging set (or none)."""
        return None if is_staging(name) else self.sets.get(name)

    def visible_sets(self) -> list[ShadowSet]:
        """The sets users see, oldest first (then by name)."""
        return sorted((s for s in self.sets.values() if not s.staging),
                      key=lambda s: (s.created, s.name))

    def shadow(self, path: str):
        set_name, _, name = path.partition("/")
        s = self.visible_set(set_name)
        if s is None:
            raise notfound(f"no shadow copy set named {set_name!r}")
        vol = s.members.get(name)
        if vol is None:
            raise notfound(f"set {set_name} has no shadow copy of {name!r}")
        return vol

    def new_set_name(self, base: str | None = None) -> str:
        """`base` (default: the UTC time), or `base-N` when taken."""
        base = base or utc_stamp()
        name, n = base, 1
        while name in self.sets:
            n += 1
            name = f"{base}-{n}"
        return name

    # ---- changes (caller holds the commit lock) ------------------------------------
    def add_set(self, name: str, created: float) -> ShadowSet:
        s = self.sets[name] = ShadowSet(name, created)
        self.changes().sets_add.append((name, created))
        return s

    def remove_set(self, name: str) -> None:
        del self.sets[name]
        self.changes().sets_del.append(name)

    def remove_member(self, vol, set_name: str | None = None) -> None:
        """Take `vol` out of its set (or `set_name`); an emptied set goes."""
        set_name = set_name or vol.set_name
        s = self.sets.get(set_name)
        if s is None:
            return
        s.members.pop(vol.name, None)
        if not s.members:
            self.remove_set(set_name)

    def create_lun(self, name: str, size: int, pack, block_size: int):
        """A new, empty LUN."""
        wwn, serial = self.new_identity()
        row = {"vid": self.new_vid(), "name": name, "kind": "lun", "set_name": None,
               "size": size, "block_size": block_size, "root": ZERO_ID,
               "height": maps.height_for(math.ceil(size / block_size)),
               "allocated": 0, "wwn": wwn, "serial": serial, "readonly": 0, "hidden": 0,
               "origin": None, "context": None, "created": time.time(), "source": None}
        vol = self.make_volume(row, pack, None)
        self.volumes[vol.vid] = vol
        self.luns[name] = vol
        self.mark_row(vol)
        return vol

    def shadow_row(self, src, set_name: str, context: str, hidden: bool,
                   readonly: bool = True) -> dict:
        """A catalogue row for a shadow copy of volume `src` (same map)."""
        wwn, serial = self.new_identity()
        return {"vid": self.new_vid(), "name": src.name, "kind": "shadow",
                "set_name": set_name, "size": src.size, "block_size": src.block_size,
                "root": src.root, "height": src.height, "allocated": src.allocated,
                "wwn": wwn, "serial": serial, "readonly": int(readonly),
                "hidden": int(hidden),
                "origin": src.wwn if src.kind == "lun" else src.origin,
                "context": context, "created": time.time(), "source": None}

    def imported_row(self, vh: dict, set_name: str, remap: bool) -> dict:
        """A catalogue row for an imported shadow copy (stream header `vh`)."""
        wwn, serial = self.new_identity()
        if not remap:
            wwn, serial = vh["wwn"], vh["serial"]
        bs = vh["block_size"]
        return {"vid": self.new_vid(), "name": vh["name"], "kind": "shadow",
                "set_name": set_name, "size": vh["size"], "block_size": bs,
                "root": ZERO_ID, "height": maps.height_for(math.ceil(vh["size"] / bs)),
                "allocated": 0, "wwn": wwn, "serial": serial,
                "readonly": int(vh["readonly"]), "hidden": int(vh["hidden"]),
                "origin": vh["origin"], "context": vh["context"], "created": time.time(),
                "source": None}

    def add_shadow(self, row: dict, pack, source):
        """A shadow copy from `row`, in its (existing) set."""
        vol = self.make_volume(row, pack, source)
        self.volumes[vol.vid] = vol
        self.sets[vol.set_name].members[vol.name] = vol
        self.mark_row(vol)
        return vol

    def drop_volume(self, vol) -> None:
        """Delete `vol` (its set membership is the caller's): forgotten at
        once, or when its last handle closes (`released`)."""
        vol.deleted = True
        vol.discard_cache()
        self.changes().volumes_del.append(vol.vid)
        if not vol.open_count and self.volumes.pop(vol.vid, None) is not None:
            self.volume_forgotten(vol)
        self.volume_dropped(vol)

    def released(self, vol) -> bool:
        """The last handle of a deleted volume closed: forget it. True if it was."""
        if vol.deleted and not vol.open_count and vol.vid in self.volumes:
            del self.volumes[vol.vid]
            self.volume_forgotten(vol)
            return True
        return False
