"""The event log's defences (ISSUE13 #7): events are one printable line of
bounded length, the events a user can cause at will (refused commands) are
rate-limited per source, and they are kept apart from the others so that a
flood of them never pushes a real event out of ctl/events or the catalogue.

- `clean(text, limit)`: control and other non-printable characters are
  escaped as Python's repr does (`\\x1b`, `\\n`, `\\u202e`), never written
  raw; text past `limit` characters is cut and says how much was cut.
- `Limiter`: a token bucket per source (e.g. `refused ctl/create uid 1000`)
  and one for all sources together; a suppressed event is counted, and one
  summary event ("N similar events suppressed") is logged once the source
  may log again.
- `EventLog`: what ctl/events shows, the newest `EVENTS_KEPT` ordinary
  events and, apart, the newest `NOISE_KEPT` rate-limited ones, merged in
  order. The catalogue keeps the same bounds (catalogue.prune_events).
- `EventJournal`: the array's event sink (`journal.event(level, message,
  source=None)`, handed to whoever logs events) and the owner of the
  events not yet in the catalogue. Each event goes to the EventLog, the
  daemon log, the list the next commit takes (`take`) and one line of
  ARRAY/events.journal.N (appended with O_APPEND into the page cache, so a
  SIGKILL loses none; no fsync: a power loss may). A commit that carries
  events rotates to events.journal.N+1 (opened ahead: no file system call
  on the trio thread) and records "events_journal: N+1" in the same
  transaction; once it is in, `retire` closes and deletes N and opens N+2
  in a worker thread. The next open (`recover_blocking`) inserts the
  events of journals at or above the recorded number (a torn last line is
  skipped) and deletes every journal file.

  Ids: an event's number (`seq`, the id ctl/events.json shows) is given
  once, here, and travels with it: in the journal line, in the commit
  (`take`), into the catalogue's `events.seq` (inserted explicitly, not by
  AUTOINCREMENT), so it is the same number in memory, in the catalogue
  and after a SIGKILL and the next open. Numbers are dense: every number
  is one event (a rate-limited event that is suppressed gets none).
- `subscriber`: an optional callable the journal calls after logging each
  event with (seq, time, level, message), on the trio thread; it must not
  block (eventhooks.EventHooks queues it). `record_death` does not call it.
- `render_json(events)`: ctl/events.json, one JSON object a line.

  Concurrency: the trio thread owns all of it; `recover_blocking` runs in
  the array's opening worker thread before the loop uses the journal, and
  `retire`'s blocking part in a worker thread while the loop appends to
  the next journal (different descriptors). `record_death` may run after
  `close` (the daemon dying): it appends to the last journal by path.
  A crash leaves events.journal.N (and maybe N+1, N+2, empty): the next
  open puts their events in the catalogue; events of a commit that was in
  are never inserted twice (the recorded number says which are in).
"""
import collections
import heapq
import json
import logging
import os
import time

import trio

from .perms import FILE_MODE

log = logging.getLogger("fusearray")

#: ARRAY/events.journal.N: events not yet in the catalogue.
EVENT_JOURNAL = "events.journal"

#: Ordinary events kept (in memory, in the catalogue): everything the
#: array itself says.
EVENTS_KEPT = 2000
#: Events a user can cause at will (refused commands and their summaries):
#: kept apart, so they never displace the others.
NOISE_KEPT = 500
#: The longest event message, in characters.
MESSAGE_MAX = 2048
#: A source may log BURST events at once, then RATE a second.
BURST, RATE = 20, 2.0
#: All rate-limited sources together.
TOTAL_BURST, TOTAL_RATE = 60, 5.0
#: Sources remembered; idle ones (bucket full, nothing suppressed) go first.
SOURCES_MAX = 1024


def clean(text: str, limit: int = MESSAGE_MAX) -> str:
    """One printable line: non-printable characters escaped repr-style,
    cut at `limit` characters (with a note of how many were cut)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


def _escape(c: str) -> str:
    return repr(c)[1:-1]          # a non-printable character: always an escape


class _Bucket:
    __slots__ = ("tokens", "at", "suppressed", "since")

    def __init__(self, burst: float, now: float):
        self.tokens, self.at = float(burst), now
        self.suppressed, self.since = 0, 0.0

    def refill(self, burst: float, rate: float, now: float) -> None:
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now


class Limiter:
    """Token buckets per source and in total. `allow(source)` says whether
    an event of `source` may be logged now; `summaries()` gives, for the
    sources that suppressed events and may log again, (source, count,
    since): each once."""

    def __init__(self, burst=BURST, rate=RATE, total_burst=TOTAL_BURST,
                 total_rate=TOTAL_RATE, clock=time.monotonic):
        self.burst, self.rate = burst, rate
        self.clock = clock
        self.total = _Bucket(total_burst, clock())
        self.total_burst, self.total_rate = total_burst, total_rate
        self.sources: dict[str, _Bucket] = {}
        self.suppressed_total = 0          # since the start, for tests and status

    def allow(self, source: str) -> bool:
        now = self.clock()
        b = self.sources.get(source)
        if b is None:
            if len(self.sources) >= SOURCES_MAX:
                self._forget(now)
            b = self.sources[source] = _Bucket(self.burst, now)
        b.refill(self.burst, self.rate, now)
        self.total.refill(self.total_burst, self.total_rate, now)
        if b.tokens >= 1 and self.total.tokens >= 1:
            b.tokens -= 1
            self.total.tokens -= 1
            return True
        if not b.suppressed:
            b.since = time.time()
        b.suppressed += 1
        self.suppressed_total += 1
        return False

    def summaries(self, source: str | None = None) -> list:
        """(source, count, since) of sources that suppressed events and may
        log again (one token, taken by the summary): `source` only, or all."""
        now = self.clock()
        out = []
        keys = [source] if source is not None else list(self.sources)
        self.total.refill(self.total_burst, self.total_rate, now)
        for key in keys:
            b = self.sources.get(key)
            if b is None or not b.suppressed:
                continue
            b.refill(self.burst, self.rate, now)
            if b.tokens < 1:
                continue
            b.tokens -= 1
            out.append((key, b.suppressed, b.since))
            b.suppressed = 0
        return out

    def _forget(self, now: float) -> None:
        for key, b in list(self.sources.items()):
            b.refill(self.burst, self.rate, now)
            if not b.suppressed and b.tokens >= self.burst:
                del self.sources[key]
        if len(self.sources) >= SOURCES_MAX:     # all busy: drop the oldest
            for key in list(self.sources)[:len(self.sources) // 2]:
                del self.sources[key]


class EventLog:
    """The events ctl/events shows: (seq, time, level, message), oldest
    first. Ordinary and rate-limited ("noise") events are bounded apart."""

    def __init__(self, kept: int = EVENTS_KEPT, noise_kept: int = NOISE_KEPT):
        self.main: collections.deque = collections.deque(maxlen=kept)
        self.noise: collections.deque = collections.deque(maxlen=noise_kept)

    def append(self, ev: tuple, noise: bool = False) -> None:
        (self.noise if noise else self.main).append(ev)

    def __iter__(self):
        return heapq.merge(self.main, self.noise, key=lambda e: e[0])

    def __len__(self) -> int:
        return len(self.main) + len(self.noise)

    def __getitem__(self, i):
        return list(self)[i]


class EventJournal:
    """The array's events: logged, shown, journaled until committed (see
    the module docstring). `path` is the array directory."""

    def __init__(self, path: str):
        self.path = path
        self.log = EventLog()              # what ctl/events shows
        self.limiter = Limiter()           # events users cause at will
        self.seq = 0                       # the last event's number
        self.uncommitted: list = []        # (time, level, message, noise, seq) for the next commit
        self._no = 0                       # events.journal.N being appended
        self._fd = None
        self._next = None                  # N+1, opened ahead for the rotation
        self._ready = False                # recovered: events.journal.N is ours
        self._retiring: dict = {}          # N -> fd of a rotated journal, until its commit is in
        self.subscriber = None             # (seq, time, level, message) -> None, or None

    # ---- logging -----------------------------------------------------------
    def event(self, level: str, message: str, source: str | None = None) -> None:
        """Log an event (one printable line: see `clean`). `source` names
        who caused it when a user can cause it at will (a refused command:
        `refused ctl/create uid 1000`): such events are rate-limited per
        source, one summary says how many were suppressed, and they are
        kept apart so they never push others out."""
        if source is not None:
            self._summaries(source)
            if not self.limiter.allow(source):
                return
        self._log(level, clean(message), source is not None)

    def flush_summaries(self) -> None:
        """The summaries of sources that suppressed events and went quiet."""
        self._summaries(None)

    def _summaries(self, source: str | None) -> None:
        for src, n, since in self.limiter.summaries(source):
            self._log("warning", clean(f"{n} similar event(s) suppressed since "
                                       f"{time.strftime('%H:%M:%SZ', time.gmtime(since))}"
                                       f" (rate limit): {src}"), True)

    def _log(self, level: str, message: str, noise: bool) -> None:
        t = time.time()
        self.seq += 1
        seq = self.seq
        self.log.append((seq, t, level, message), noise)
        self.uncommitted.append((t, level, message, int(noise), seq))
        getattr(log, "info" if level == "info" else "warning")(message)
        if self._fd is not None:     # a line in the page cache: survives SIGKILL
            try:
                os.write(self._fd, _line(t, level, message, int(noise), seq))
            except OSError:
                pass         # the daemon log has it; the catalogue gets it at the commit
        if self.subscriber is not None:
            try:
                self.subscriber(seq, t, level, message)
            except Exception:        # a subscriber never stops the logging
                log.exception("event subscriber failed")

    def record_death(self, message: str) -> None:
        """The daemon is dying of an unexpected error: an event, written to
        the journal even after `close` (the next open puts it in the
        catalogue), and to the log."""
        t = time.time()
        message = clean(message)
        self.seq += 1                   # its own number, as any event's
        self.log.append((self.seq, t, "error", message))
        log.error("%s", message)
        line = _line(t, "error", message, 0, self.seq)
        try:
            if self._fd is not None:
                os.write(self._fd, line)
            elif self._ready:           # closed already: its journal still counts
                fd = self._open(self._no)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError:
            pass

    # ---- open ----------------------------------------------------------------
    def recover_blocking(self, done: int, store) -> int:
        """At open, in a worker thread: journals numbered `done` or above
        hold events not in the catalogue yet: `store(events, n)` inserts
        them and records `n` as the journal now appended (one catalogue
        transaction); then every journal file goes and events.journal.n
        and n+1 are opened. Returns the number of events recovered."""
        nums = []
        for fn in os.listdir(self.path):
            head, _, tail = fn.rpartition(".")
            if head == EVENT_JOURNAL and tail.isdigit():
                nums.append(int(tail))
        events = []
        for n in sorted(x for x in nums if x >= done):
            with open(self._path(n), "rb") as f:
                for line in f:
                    try:
                        t, level, msg, *rest = json.loads(line)
                        noise = int(bool(rest and rest[0]))
                        # the number the old daemon showed (None: a journal
                        # written before lines carried it)
                        seq = int(rest[1]) if len(rest) > 1 else None
                        events.append((float(t), str(level), str(msg), noise, seq))
                    except (ValueError, TypeError):
                        continue
        self._no = max(nums + [done - 1]) + 1
        if events or nums:
            store(events, self._no)
        for n in nums:
            os.unlink(self._path(n))
        self._fd = self._open(self._no)
        self._ready = True
        self._next = self._open(self._no + 1)
        return len(events)

    def load(self, rows) -> None:
        """The catalogue's last events, (seq, time, level, message, noise)
        oldest first, for ctl/events."""
        for seq, t, level, msg, noise in rows:
            self.log.append((seq, t, level, msg), noise)
            self.seq = max(self.seq, seq)

    # ---- commit --------------------------------------------------------------
    def take(self):
        """At a commit: (events, n). `events` go into the commit; if any,
        later ones go to the next journal and `n` is the number of the old
        one (record "events_journal: n + 1" in the commit, call `retire(n)`
        once it is in), else n is None."""
        events, self.uncommitted = self.uncommitted, []
        if not events or self._fd is None:
            return events, None
        n, fd = self._no, self._fd
        nxt = self._next
        if nxt is None:              # rare: opening it ahead failed
            try:
                nxt = self._open(self._no + 1)
            except OSError:
                nxt = None           # journaling stops; the catalogue still gets events
        self._fd, self._next = nxt, None
        self._no += 1
        self._retiring[n] = fd
        return events, n

    async def retire(self, n: int) -> None:
        """The commit of journal `n`'s events is in: close and delete it
        and open the one after next, in a worker thread."""
        self._next = await trio.to_thread.run_sync(self._retire_blocking, n,
                                                   self._retiring.pop(n))

    def _retire_blocking(self, n: int, fd: int):
        os.close(fd)
        try:
            try:
                os.unlink(self._path(n))
            except FileNotFoundError:
                pass
            return self._open(n + 2)
        except OSError:
            return None

    def close(self) -> None:
        for fd in (self._fd, self._next, *self._retiring.values()):
            if fd is not None:
                os.close(fd)
        self._fd = self._next = None
        self._retiring = {}

    def _path(self, n: int) -> str:
        return os.path.join(self.path, f"{EVENT_JOURNAL}.{n}")

    def _open(self, n: int) -> int:
        return os.open(self._path(n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)


def _line(t: float, level: str, message: str, noise: int, seq: int) -> bytes:
    """One line of events.journal.N: [time, level, message, noise, seq]."""
    return (json.dumps([t, level, message, noise, seq]) + "\n").encode()


def render_json(events) -> bytes:
    """ctl/events.json: the kept events (the same as ctl/events), oldest
    first, one JSON object a line: {"id", "time" (seconds since the
    epoch), "level", "message"}."""
    return "".join(json.dumps({"id": seq, "time": t, "level": level, "message": msg}) + "\n"
                   for seq, t, level, msg in events).encode()
