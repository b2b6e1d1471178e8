"""Who may touch what: the modes of the mount's files and of the array's
own files (DESIGN section 2; README "What it protects and against whom").

The mount (`allow_other,default_permissions`: the kernel checks every
access against the modes below, with the caller's supplementary groups):
- luns/NAME and snapshots/SET/NAME: 0660 owner:group, like a block device;
  the owner is the daemon's user (root), the group `disk` when the daemon
  is root (else the daemon's group); write bits dropped when read-only
  (0440). `fusearray mount --owner/--group/--mode` set them.
- directories: 0755, the daemon's user and group (names and sizes are no
  secret: ctl/status shows them; the data is).
- ctl/VERB: 0600, the daemon's user; `--ctl-group G` makes them 0660 :G
  (a member of G administers the array, export of any set included).
- ctl/status, status.json, events, jobs/ID: 0644.

The array (the raw data, the catalogue and the secret that keys the dedup
hash): directories 0700, files 0600, whoever created them; a mount
tightens what an older fusearray left group- or world-accessible, with an
event.
"""
import dataclasses
import errno
import grp
import os
import pwd
import stat

from .errors import ArrayError

DIR_MODE = 0o700          # the array directory, disk directories, segments/
FILE_MODE = 0o600         # every file of the array (data, catalogue, secret, logs)
UMASK = 0o077             # the daemon's: nothing it creates is group/world accessible

LUN_MODE = 0o660
CTL_VERB_MODE = 0o600
VIEW_MODE = 0o644
TREE_DIR_MODE = 0o755


@dataclasses.dataclass(frozen=True)
class Access:
    """Owner, group and modes of the mount's files."""
    uid: int                  # the daemon's: directories, ctl/
    gid: int
    lun_uid: int              # LUN and shadow copy files
    lun_gid: int
    lun_mode: int
    ctl_gid: int | None = None     # --ctl-group: ctl verbs 0660 to it

    def lun(self, readonly: bool) -> tuple[int, int, int]:
        """(mode bits, uid, gid) of a LUN or shadow copy file."""
        mode = self.lun_mode & ~0o222 if readonly else self.lun_mode
        return mode, self.lun_uid, self.lun_gid

    def verb(self) -> tuple[int, int, int]:
        if self.ctl_gid is None:
            return CTL_VERB_MODE, self.uid, self.gid
        return CTL_VERB_MODE | 0o060, self.uid, self.ctl_gid


def _id_of(name: str, option: str, kind: str, look_up) -> int:
    """The uid or gid `name` gives: a number as it is, else the id of the
    user or group of that name (`look_up`: pwd.getpwnam or grp.getgrnam)."""
    if name.isdigit():
        return int(name)
    try:
        return look_up(name)
    except KeyError:
        number = "uid" if kind == "user" else "gid"
        raise ArrayError(errno.EINVAL, f"{option} {name}: no such {kind} (give a {kind} "
                         f"name or a numeric {number})") from None


def _uid(name: str) -> int:
    return _id_of(name, "--owner", "user", lambda n: pwd.getpwnam(n).pw_uid)


def _gid(name: str, option: str) -> int:
    return _id_of(name, option, "group", lambda n: grp.getgrnam(n).gr_gid)


def parse_mode(text: str) -> int:
    """An octal mode of read/write bits, e.g. 0660."""
    t = text.strip()
    if not t or not all(c in "01234567" for c in t) or len(t) > 4:
        raise ArrayError(errno.EINVAL, f"--mode {text}: give an octal mode such as 0660")
    mode = int(t, 8)
    if mode & ~0o666:
        raise ArrayError(errno.EINVAL, f"--mode {text}: a LUN file takes read and write "
                         "bits only (no execute, setuid, setgid or sticky), e.g. 0660")
    return mode


def default_lun_gid() -> int:
    """`disk` when the daemon is root (as for /dev/sd*), else its own group."""
    if os.geteuid() == 0:
        try:
            return grp.getgrnam("disk").gr_gid
        except KeyError:
            pass
    return os.getegid()


def resolve(owner: str | None = None, group: str | None = None, mode: str | None = None,
            ctl_group: str | None = None) -> Access:
    """The mount's Access from the mount options (names or numbers)."""
    uid, gid = os.geteuid(), os.getegid()
    return Access(uid=uid, gid=gid,
                  lun_uid=_uid(owner) if owner else uid,
                  lun_gid=_gid(group, "--group") if group else default_lun_gid(),
                  lun_mode=parse_mode(mode) if mode else LUN_MODE,
                  ctl_gid=_gid(ctl_group, "--ctl-group") if ctl_group else None)


def mount_args(owner=None, group=None, mode=None, ctl_group=None) -> list[str]:
    """The daemon's command-line options for these mount options."""
    out = []
    for opt, val in (("--owner", owner), ("--group", group), ("--mode", mode),
                     ("--ctl-group", ctl_group)):
        if val:
            out += [opt, str(val)]
    return out


# ---- the array's own files ------------------------------------------------------------
def private_dir(path: str) -> None:
    """Make `path` (and missing parents) a directory only its owner enters."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)


def open_private(path: str, flags: int) -> int:
    """os.open for a file of the array: created 0600 whatever the umask."""
    return os.open(path, flags, FILE_MODE)


def tighten(roots, skip=()) -> list[str]:
    """Take group and world bits off every directory and file under each
    root (not following symlinks), but the trees in `skip`. Returns the
    paths changed."""
    changed = []
    skip = {os.path.realpath(p) for p in skip}

    def fix(p: str) -> None:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            return
        m = stat.S_IMODE(st.st_mode)
        if m & 0o077:
            os.chmod(p, m & ~0o077)
            changed.append(p)

    for root in roots:
        root = os.path.realpath(root)    # a disk directory given as a symlink
        if not os.path.isdir(root):
            continue
        fix(root)
        for top, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
            for n in dirs + files:
                fix(os.path.join(top, n))
    return changed
