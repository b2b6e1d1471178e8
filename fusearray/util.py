"""Parsing of names and sizes, time formats (DESIGN section 2, 6), and a
small pipeline for the trio thread."""
import collections
import os
import re
import time

import trio

from .errors import invalid

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# ASCII digits only (\d would take any Unicode digit, `١M`), at most 20 of
# them (int() of thousands of digits is slow and then refused), and one of
# the binary suffixes K, M, G, T in capitals: no `1GB`, `1gib` (DESIGN 2, 3).
_SIZE_RE = re.compile(r"([0-9]{1,20})([KMGT]?)\Z")
_UINT_RE = re.compile(r"[0-9]{1,18}\Z")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: Byte counts at or above this are refused: they would not fit the
#: catalogue's 64-bit integers (a throttle rate of 10^20 stopped the commits).
MAX_BYTES = 1 << 62


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name):
        raise invalid(f"bad {what} {name!r}: use 1-64 characters "
                      "[A-Za-z0-9._-], starting with a letter or digit")
    return name


def parse_bytes(text: str, what: str = "size") -> int:
    """`1G`, `512K`, `4096` -> bytes (binary suffixes K, M, G, T only)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise invalid(f"bad {what} {text[:40]!r}: give bytes in ASCII digits, or a "
                      "number with K, M, G or T (binary), e.g. 4096, 64K or 1G")
    n = int(m.group(1)) * _UNITS[m.group(2)]
    if n >= MAX_BYTES:
        raise invalid(f"bad {what} {text!r}: too large (the limit is 4096P)")
    return n


def parse_uint(text: str, what: str) -> int:
    """A count or an identifier (job id, disk number): ASCII digits only."""
    if not _UINT_RE.match(text):
        raise invalid(f"bad {what} {text[:40]!r}: give a number in ASCII digits")
    return int(text)


def parse_size(text: str) -> int:
    """A LUN size: positive and a multiple of 512."""
    size = parse_bytes(text)
    if size <= 0 or size % 512:
        raise invalid(f"bad size {text!r}: it must be a positive multiple "
                      "of 512 bytes")
    return size


def parse_bool(text: str, what: str) -> bool:
    t = text.lower()
    if t in ("on", "yes", "true", "1"):
        return True
    if t in ("off", "no", "false", "0"):
        return False
    raise invalid(f"bad value {text!r} for {what}: use on/off or yes/no")


def utc_stamp(t: float | None = None) -> str:
    """Set names: YYYYMMDDTHHMMSSZ."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if t is None else t))


def iso_time(t: float | None) -> str:
    if not t:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def human_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


class InFlight:
    """Up to `depth` steps running in the background while the caller
    prepares the next (import: store batches while parsing the next;
    background copy: store a batch while reading the next). A step's error
    is raised by the next `room` or `wait`."""

    def __init__(self, depth: int = 1):
        self.depth = depth
        self._running: collections.deque = collections.deque()   # done events, oldest first
        self._error: Exception | None = None

    def start(self, nursery, fn, *args) -> None:
        """Run `await fn(*args)` in `nursery`. Call `room` (or `wait`) first."""
        done = trio.Event()
        self._running.append(done)

        async def step() -> None:
            try:
                await fn(*args)
            except Exception as e:     # raised to the caller at its next room/wait
                if self._error is None:
                    self._error = e
            finally:
                done.set()
        nursery.start_soon(step)

    def last(self) -> trio.Event | None:
        """The end of the newest step in flight (None when none is)."""
        return self._running[-1] if self._running else None

    async def room(self) -> None:
        """Until fewer than `depth` steps run; then the error of any that failed."""
        while self._running and (len(self._running) >= self.depth
                                 or self._running[0].is_set()):
            await self._running.popleft().wait()
        self._raise(True)

    async def wait(self, raise_error: bool = True) -> None:
        """Until every step in flight has ended; then the first error."""
        while self._running:
            await self._running.popleft().wait()
        self._raise(raise_error)

    def _raise(self, raise_error: bool) -> None:
        err, self._error = self._error, None
        if err is not None and raise_error:
            raise err


def unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    """Unlink `path` (relative to `dir_fd` if given); gone already is fine.
    Blocking: a worker thread's, or the opening's."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files (RLIMIT_NOFILE) to
    its hard limit; returns the soft limit now. An open array holds every
    segment file open (the store's fd table), one per 64 MiB stored at
    most: a stock soft limit of 1024 (a login shell, a systemd unit)
    stopped a mount at about 64 GB stored. Raising the soft limit to the
    hard one needs no privilege."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want
