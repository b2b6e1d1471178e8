"""The systemd unit: a template service `fusearray@.service` whose instance
is the systemd-escaped mountpoint (`systemd-escape --path /mnt/fusearray`
is `mnt-fusearray`), and one environment file per instance,
/etc/fusearray/INSTANCE.conf, naming the array and the mount options.

`fusearray install-unit [ARRAY] [MOUNTPOINT]` (and `fusearray up
--install-unit`) writes both (under --root DIR for tests and images) and
prints the `systemctl enable --now` line. The template is UNIT_TEMPLATE;
contrib/fusearray@.service is the same text (a test keeps them equal),
with the command's path /usr/local/bin/fusearray, which install-unit
replaces with the path of the fusearray it runs as.

Type=forking: `fusearray mount --background` returns once the mount serves
requests (the daemon tells it through a pipe), so units ordered after
this one find the mount there. ExecStop is `fusearray umount`: every
acknowledged write stored and committed, then the unmount, then it waits
for the daemon to end.
"""
import os
import shlex
import shutil
import sys

#: the command's path in UNIT_TEMPLATE (and contrib/), replaced on install
PLACEHOLDER = "/usr/local/bin/fusearray"
UNIT_NAME = "fusearray@.service"
ENV_DIR = "/etc/fusearray"
UNIT_DIR = "/etc/systemd/system"

UNIT_TEMPLATE = """\
# fusearray@.service: mount a fusearray array; the instance is the
# systemd-escaped mountpoint (systemd-escape --path /mnt/fusearray:
# mnt-fusearray), the array and the mount options are in
# /etc/fusearray/INSTANCE.conf:
#   ARRAY=/var/lib/fusearray/default
#   OPTIONS=--cache-size 1G --owner qemu
# (an array in a Ceph cluster: ARRAY=rados:POOL/NAME,
#  OPTIONS=--ceph-conf /etc/ceph/ceph.conf ...)
# `fusearray install-unit ARRAY MOUNTPOINT` writes both; then
#   systemctl enable --now fusearray@mnt-fusearray.service
[Unit]
Description=fusearray array mounted on %f
# the array and its packs may be on any local or network file system
# (stopped before them at shutdown: the final commit still reaches them)
After=local-fs.target remote-fs.target network-online.target
Wants=network-online.target

[Service]
# `mount --background` returns once the mount serves requests
Type=forking
EnvironmentFile=/etc/fusearray/%i.conf
ExecStartPre=/bin/mkdir -p %f
ExecStart=/usr/local/bin/fusearray mount --background ${ARRAY} %f $OPTIONS
# stores and commits every acknowledged write, unmounts, waits for the daemon
ExecStop=/usr/local/bin/fusearray umount %f
# the final commit of a large write-back cache can take a while
TimeoutStopSec=5min

[Install]
WantedBy=multi-user.target
"""


def escape_path(path: str) -> str:
    """`systemd-escape --path PATH`: the instance name of a mountpoint."""
    parts = [p for p in os.path.normpath("/" + path).split("/") if p]
    if not parts:
        return "-"
    s = "/".join(parts)
    out = []
    for i, ch in enumerate(s):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_.")) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def fusearray_command() -> str:
    """The absolute path of the fusearray command running now (the venv's)."""
    exe = os.path.join(os.path.dirname(sys.executable), "fusearray")
    if os.access(exe, os.X_OK):
        return exe
    found = shutil.which("fusearray")
    return os.path.abspath(found) if found else exe


def unit_text(command: str) -> str:
    return UNIT_TEMPLATE.replace(PLACEHOLDER, command)


def env_text(array: str, mnt: str, options: list[str]) -> str:
    # systemd reads ARRAY=... as one word (quotes allowed); $OPTIONS is split
    # at whitespace in ExecStart, so each option is one word
    for o in options:
        if any(c.isspace() for c in o):
            raise ValueError(f"mount option {o!r} holds whitespace: not allowed in a unit")
    return (f"# fusearray@{escape_path(mnt)}.service: the array mounted on {mnt}\n"
            f"ARRAY={shlex.quote(array)}\n"
            f"OPTIONS={' '.join(options)}\n")


def install(array: str, mnt: str, options: list[str], root: str = "/",
            command: str | None = None) -> tuple[str, list[str]]:
    """Write the template and this instance's environment file under
    `root`; returns (the instance's unit name, the files written)."""
    from .home import is_cluster
    mnt = os.path.abspath(mnt)
    if not is_cluster(array):       # (rados:POOL/NAME: an array in a Ceph cluster)
        array = os.path.abspath(array)
    inst = escape_path(mnt)
    unit_dir = os.path.join(root, UNIT_DIR.lstrip("/"))
    env_dir = os.path.join(root, ENV_DIR.lstrip("/"))
    os.makedirs(unit_dir, exist_ok=True)
    os.makedirs(env_dir, exist_ok=True)
    written = []
    for path, text in ((os.path.join(unit_dir, UNIT_NAME),
                        unit_text(command or fusearray_command())),
                       (os.path.join(env_dir, f"{inst}.conf"), env_text(array, mnt, options))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return f"fusearray@{inst}.service", written
