"""The freezer: a child process that freezes file systems (FIFREEZE, as
`fsfreeze -f`) for the instant of a shadow copy set and thaws them (FITHAW)
in every case (host.Freezer starts and drives it; #19 point 1).

    python -m fusearray.freezer --hold SECONDS MOUNTPOINT...

It freezes the mountpoints in order, printing `frozen MNT` after each (or
`already MNT` when it was frozen by someone else: left frozen, never
thawed by us), then `ready`. A failure prints `error MNT ERRNO MESSAGE`,
thaws what it froze and exits 1. Then it waits on stdin, and thaws what it
froze (`thawed MNT`, or `thaw-error MNT ERRNO MESSAGE`) at the first of:

- a line `thaw` (the shadow copy is taken, or failed);
- end of file: the daemon closed the pipe or died (a SIGKILL closes it);
- `--hold` seconds after `ready` (`expired` is printed first): a daemon
  that hangs cannot keep writers frozen.

Why a separate process: the freeze's own sync writes through the loop
device into the array's FUSE mount, which the daemon must keep serving
(the ioctl is made outside its trio loop), and a thaw that lives in the
daemon dies with it. The child runs in a session of its own (a signal to
the daemon's process group does not reach it) and holds none of the
daemon's descriptors but the two pipes. If both the daemon and the child
are killed while frozen, `fsfreeze -u MNT` thaws (README).
"""
import errno
import fcntl
import os
import select
import sys
import time

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def say(line: str) -> None:
    """One line to the daemon; nobody may be listening any more (it died:
    EPIPE), and the thaw goes on regardless."""
    try:
        os.write(1, (line + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def ioctl_path(path: str, request: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


def thaw_all(frozen: list[str]) -> int:
    bad = 0
    for mnt in reversed(frozen):
        try:
            ioctl_path(mnt, FITHAW)
            say(f"thawed {mnt}")
        except OSError as e:
            bad += 1
            say(f"thaw-error {mnt} {errno.errorcode.get(e.errno, 'EIO')} {e.strerror}")
    return bad


def main(argv: list[str]) -> int:
    hold = 60.0
    if len(argv) >= 2 and argv[0] == "--hold":
        hold = float(argv[1])
        argv = argv[2:]
    frozen: list[str] = []
    for mnt in argv:
        try:
            ioctl_path(mnt, FIFREEZE)
        except OSError as e:
            if e.errno == errno.EBUSY:      # frozen already (fsfreeze -f): not ours
                say(f"already {mnt}")
                continue
            say(f"error {mnt} {errno.errorcode.get(e.errno, 'EIO')} {e.strerror}")
            thaw_all(frozen)
            return 1
        frozen.append(mnt)
        say(f"frozen {mnt}")
    say("ready")
    deadline = time.monotonic() + hold
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            say("expired")
            break
        r, _, _ = select.select([0], [], [], left)
        if not r:
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            break                       # the daemon closed the pipe, or died
        buf += chunk
        if b"thaw\n" in buf:
            break
    return 2 if thaw_all(frozen) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
