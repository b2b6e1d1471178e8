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
"""
import collections
import heapq
import time

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
