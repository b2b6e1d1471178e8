"""The control protocol (DESIGN section 3): cut what is written to a
ctl/VERB descriptor into lines, parse a command line, call the array, turn
the outcome into a `key=value` reply.

A command is `ARG... key=value...`: positionals first, then options known
to the verb. A failure is an ArrayError: its errno goes back to the writer
and its message into the reply and the event log; the array is unchanged.

Lines (Session): a command runs when its line is complete: at its newline,
or when a descriptor holding a partial line is closed (FUSE flush: close(2)
returns the command's errno) or released. Bytes split over several write(2)
calls form one line. A write that completes more than one line runs none
of them (EINVAL, "one command per write"): every verb can fail half-way
(EEXIST, ENOSPC, EBUSY found while running), and none of them can be
undone as one unit, so "all of them or none" is none. A line is UTF-8
text without control characters (tab aside), at most MAX_LINE bytes, and
not empty or only whitespace. The words are separated by ASCII spaces and
tabs only.
"""
import json
import re

from .errors import ArrayError, invalid
from .events import clean
from .util import human_bytes, iso_time, parse_bool, parse_bytes, parse_uint

#: The longest command line, in bytes (more is EINVAL when the line ends).
MAX_LINE = 4096
#: How much of a refused command is echoed in its event and reply.
ECHO_MAX = 200
#: Message of a refused command, at most (the event adds the echo).
MESSAGE_MAX = 1024
_WORDS = re.compile(r"[ \t]+")
# C0 controls but tab, DEL and the C1 controls (a raw ESC, NUL, CR, ...)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class Verb:
    def __init__(self, run, nargs: tuple[int, int], options=(), usage=""):
        self.run = run
        self.nargs = nargs
        self.options = set(options)
        self.usage = usage


def words(line: str) -> list[str]:
    """The words of a line: separated by ASCII spaces and tabs only (a
    non-breaking or other Unicode space is part of a word, and then makes
    it a bad name, size or option)."""
    return [w for w in _WORDS.split(line) if w]


def parse(verb: Verb, name: str, line: str) -> tuple[list, dict]:
    args, opts = [], {}
    for tok in words(line):
        key, eq, value = tok.partition("=")
        if eq and "/" not in key and key.isascii() and key.replace("_", "").isalpha():
            if key not in verb.options:
                known = ", ".join(sorted(verb.options)) or "none"
                raise invalid(f"{name}: unknown option {key[:40]!r} (options: {known}); "
                              f"usage: {name} {verb.usage}")
            if key in opts:
                raise invalid(f"{name}: option {key} given twice")
            opts[key] = value
        else:
            if opts:
                raise invalid(f"{name}: positional argument {tok[:60]!r} after options; "
                              f"usage: {name} {verb.usage}")
            args.append(tok)
    lo, hi = verb.nargs
    if not lo <= len(args) <= hi:
        raise invalid(f"{name}: expected {lo if lo == hi else f'{lo} to {hi}'} "
                      f"argument(s), got {len(args)}; usage: {name} {verb.usage}")
    return args, opts


def _force(opts) -> bool:
    return parse_bool(opts.get("force", "no"), "force")


def parse_block_size(text: str) -> int:
    bs = parse_bytes(text, "block size")
    if not (4096 <= bs <= 1 << 20 and bs & (bs - 1) == 0):
        raise invalid(f"bad block size {text!r}: give a power of two from 4K to 1M "
                      "(e.g. block=64K), or leave it out for the array's default")
    return bs


async def _create(array, args, opts):
    bs = parse_block_size(opts["block"]) if "block" in opts else None
    vol = await array.create_lun(args[0], args[1], opts.get("pack"), bs)
    return {"lun": vol.name, "wwn": vol.wwn, "size": vol.size}


async def _delete(array, args, opts):
    target = args[0]
    if "/" in target or target not in array.luns and target in array.sets:
        return await array.delete_shadow(target, _force(opts))
    await array.delete_lun(target, _force(opts))
    return {"deleted": target}


async def _resize(array, args, opts):
    vol = await array.resize_lun(args[0], args[1], _force(opts))
    return {"lun": vol.name, "size": vol.size}


def _target(array, text):
    if "/" in text:
        return array.shadow(text)
    return array.lun(text)


def _host_dir(d: str) -> str:
    """A host directory: an absolute path (the daemon does not know the
    writer's working directory)."""
    if not d.startswith("/"):
        raise invalid(f"bad directory {d[:80]!r}: give an absolute path (the "
                      "array does not know your working directory)")
    return d


def _host_dirs(text: str) -> list[str]:
    return [_host_dir(d) for d in text.split(",")]


async def _addpack(array, args, opts):
    if args[1] == "rados":       # addpack NAME rados POOL[/NAMESPACE]
        pack = await array.add_pack(args[0], "single", [f"rados:{args[2]}"])
        return {"pack": pack.name}
    pack = await array.add_pack(args[0], args[1], _host_dirs(args[2]))
    return {"pack": pack.name}


async def _snapshot(array, args, opts):
    set_name, job, info = await array.snapshot(
        args, opts.get("set"), opts.get("context", "differential"), opts.get("pack"),
        parse_bool(opts.get("hidden", "no"), "hidden"),
        parse_bool(opts.get("quiesce", "yes"), "quiesce"))
    reply = {"set": set_name, "consistency": info["consistency"]}
    if info["frozen"]:
        reply["frozen"] = ",".join(info["frozen"])
    if job is not None:
        reply["job"] = job.id
    return reply


async def _resync(array, args, opts):
    job, undo = await array.resync(args, opts.get("pack"), _force(opts),
                                   parse_bool(opts.get("undo", "yes"), "undo"))
    reply = {"job": job.id}
    if undo:
        reply["undo"] = ",".join(undo)
    return reply


async def _swap(array, args, opts):
    vol = await array.swap(args[0], opts.get("as"), _force(opts))
    return {"lun": vol.name, "wwn": vol.wwn}


def _job_verb(action):
    async def run(array, args, opts):
        jid = parse_uint(args[0], "job id")
        rate = None
        if len(args) > 1:
            parse_bytes(args[1], "rate")      # checked here: ASCII digits, K/M/G/T, bounded
            rate = args[1]
        job = await array.control_job(str(jid), action, rate)
        return {"job": job.id, "state": job.state}
    return run


async def _recover(array, args, opts):
    job = await array.recover(args[0])
    return {"job": job.id, "state": job.state}


async def _replace(array, args, opts):
    disk = parse_uint(args[1], "disk number")
    job = await array.replace(args[0], str(disk), _host_dir(args[2]), _force(opts))
    return {"job": job.id}


async def _scrub(array, args, opts):
    job = await array.scrub(args[0])
    return {"job": job.id}


async def _sync(array, args, opts):
    if args[0] != "all":
        raise invalid(f"sync: expected `all`, got {args[0]!r}; usage: sync all [discard=yes]")
    return await array.sync_all(parse_bool(opts.get("discard", "no"), "discard"))


async def _share(array, args, opts):
    share = await array.share(args[0], opts.get("portal"), opts.get("initiator"))
    return {"lun": share.lun, "target": share.target, "portal": share.portal,
            "initiators": ",".join(share.initiators) or "any"}


async def _unshare(array, args, opts):
    keep = parse_bool(opts.get("keep", "no"), "keep")
    await array.unshare(args[0], keep)
    return {"lun": args[0], "unshared": "kept for the next mount" if keep else "yes"}


VERBS: dict[str, Verb] = {
    "create": Verb(_create, (2, 2), ("pack", "block"), "NAME SIZE [pack=P] [block=64K]"),
    "delete": Verb(_delete, (1, 1), ("force",), "NAME|SET|SET/NAME [force=yes]"),
    "resize": Verb(_resize, (2, 2), ("force",), "NAME SIZE [force=yes]"),
    "addpack": Verb(_addpack, (3, 3), (), "NAME LAYOUT DIR[,DIR...] | NAME rados POOL"),
    "snapshot": Verb(_snapshot, (1, 256), ("set", "context", "pack", "hidden", "quiesce"),
                     "LUN... [set=NAME] [context=differential|plex] [pack=P] [hidden=yes] "
                     "[quiesce=no]"),
    "resync": Verb(_resync, (1, 256), ("pack", "force", "undo"),
                   "SET/NAME[=DEST]... [pack=P] [force=yes] [undo=no]"),
    "swap": Verb(_swap, (1, 1), ("as", "force"), "SET/NAME [as=NAME] [force=yes]"),
    "recover": Verb(_recover, (1, 1), (), "PACK"),
    "replace": Verb(_replace, (3, 3), ("force",), "PACK OLD_DISK NEW_DIR [force=yes]"),
    "scrub": Verb(_scrub, (1, 1), (), "PACK"),
    "cancel": Verb(_job_verb("cancel"), (1, 1), (), "JOB"),
    "pause": Verb(_job_verb("pause"), (1, 1), (), "JOB"),
    "resume": Verb(_job_verb("resume"), (1, 1), (), "JOB"),
    "sync": Verb(_sync, (1, 1), ("discard",), "all [discard=yes]"),
    "throttle": Verb(_job_verb("throttle"), (2, 2), (), "JOB RATE (e.g. 50M per second, 0 for none)"),
    "share": Verb(_share, (1, 1), ("portal", "initiator"),
                  "LUN [portal=ADDR:PORT] [initiator=IQN[,IQN...]]"),
    "unshare": Verb(_unshare, (1, 1), ("keep",), "LUN [keep=yes]"),
}


def _register_flags():
    for flag in ("readonly", "hidden"):
        async def run(array, args, opts, _flag=flag):
            vol = _target(array, args[0])
            value = parse_bool(args[1], _flag)
            await array.set_flag(vol, _flag, value)
            return {vol.kind: vol.path, _flag: "on" if value else "off"}
        VERBS[flag] = Verb(run, (2, 2), (), "NAME|SET/NAME on|off")


_register_flags()


def _room_first(run):
    """A verb that asks whether the catalogue has room for a commit
    before it changes anything (Array.check_room: ENOSPC with nothing
    half done, not a change that waits for room after its refusal)."""
    async def checked(array, args, opts):
        await array.check_room()
        return await run(array, args, opts)
    return checked


for _name, _verb in VERBS.items():
    if _name != "sync":         # (its discard=yes is the way out of a full one)
        _verb.run = _room_first(_verb.run)

#: The verbs, in one place: the CLI's subcommands and the ctl/ files are these.
VERB_NAMES: tuple[str, ...] = tuple(VERBS)


def echo(line) -> str:
    """A command as its event and reply quote it: decoded whatever its
    bytes, control characters escaped, cut at ECHO_MAX characters."""
    if isinstance(line, (bytes, bytearray, memoryview)):
        line = bytes(line).decode(errors="backslashreplace")
    return clean(line.strip(" \t\n"), ECHO_MAX)


def refuse(array, verb: str, line, err: ArrayError, origin: str | None = None) -> ArrayError:
    """A refused command: its message says which (the echo), an event is
    logged (rate-limited per source: the verb and who sent it), and the
    error reply is attached as `err.reply`. Returns `err`."""
    text = echo(line)
    err.message = clean(f"{verb}{' ' + text if text else ''}: {clean(err.message, MESSAGE_MAX)}")
    array.event("error", f"{err.message} [{err.errname}]",
                source=f"refused {verb} commands" + (f" from {origin}" if origin else ""))
    err.reply = format_error(err)
    return err


def failure(array, verb: str, line: bytes, err: ArrayError, origin: str | None = None) -> bytes:
    """Log a refused stream command as an event; the error reply."""
    return refuse(array, verb, line, err, origin).reply


def format_reply(pairs: dict) -> bytes:
    lines = ["status=ok"] + [f"{k}={v}" for k, v in pairs.items()]
    return ("\n".join(lines) + "\n").encode()


def format_error(err: ArrayError) -> bytes:
    return f"status=error\nerrno={err.errname}\nmessage={clean(err.message)}\n".encode()


def decode_line(data: bytes, length: int | None = None) -> str:
    """The text of one command line, or EINVAL saying what is wrong."""
    if length is not None and length > MAX_LINE:
        raise invalid(f"the line is {length} bytes long; a command is at most {MAX_LINE}")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise invalid(f"the command is not valid UTF-8 text (byte {e.start})") from None
    m = _CONTROL.search(text)
    if m:
        raise invalid(f"control character {m.group()!r} at column {m.start() + 1}: a "
                      "command is one line of printable text (words separated by "
                      "spaces or tabs)")
    if not words(text):
        raise invalid("empty command (the line is empty or only whitespace): write "
                      "NAME and arguments, e.g. `echo \"lun0 1G\" > ctl/create`")
    return text


class LineBuffer:
    """Bytes written to one descriptor, cut into lines at newlines. A
    partial line is kept (at most MAX_LINE + 1 bytes of it; its length is
    counted on) until its newline or the descriptor's close."""
    __slots__ = ("partial", "length")

    KEEP = 4        # complete lines of one write kept (the rest are counted)

    def __init__(self):
        self.partial = bytearray()
        self.length = 0

    def feed(self, data: bytes) -> tuple[list, int]:
        """([(bytes, length)] of the first KEEP lines this write completes,
        how many it completes)."""
        lines, count, start = [], 0, 0
        while (nl := data.find(b"\n", start)) >= 0:
            self._add(data, start, nl)
            count += 1
            if len(lines) < self.KEEP:
                lines.append((bytes(self.partial), self.length))
            self.partial.clear()
            self.length = 0
            start = nl + 1
        self._add(data, start, len(data))
        return lines, count

    def _add(self, data: bytes, start: int, end: int) -> None:
        room = MAX_LINE + 1 - len(self.partial)
        if room > 0:
            self.partial += data[start:min(end, start + room)]
        self.length += end - start

    def take(self) -> tuple[bytes, int] | None:
        """The partial line (and its length), emptied; None when empty."""
        if not self.length:
            return None
        line = (bytes(self.partial), self.length)
        self.partial.clear()
        self.length = 0
        return line


class Session:
    """One open ctl/VERB descriptor: its line buffer and its reply. The
    caller serialises `write` and `close` (fs.CtlHandle's lock)."""
    __slots__ = ("verb", "origin", "verbs", "buf", "reply", "pos")

    def __init__(self, verb: str, origin: str | None = None, verbs=None):
        self.verb = verb
        self.origin = origin        # who writes: "uid N" (source of its events)
        self.verbs = VERBS if verbs is None else verbs
        self.buf = LineBuffer()
        self.reply = b""
        self.pos = 0

    async def write(self, array, data: bytes) -> None:
        """Buffer `data`; run the line it completes. Raises ArrayError (the
        reply attached and set) when the command failed or was refused."""
        lines, count = self.buf.feed(data)
        if count:
            await self._run(array, lines, count)

    async def close(self, array) -> None:
        """The descriptor holding a partial line is closed: run it."""
        line = self.buf.take()
        if line is not None:
            await self._run(array, [line], 1)

    def pending(self) -> bool:
        """A partial line is buffered (the close would run it)."""
        return bool(self.buf.length)

    def read(self, size: int) -> bytes:
        data = self.reply[self.pos:self.pos + size]
        self.pos += len(data)
        return data

    async def _run(self, array, lines: list, count: int) -> None:
        self.pos = 0
        data, length = lines[0]
        try:
            if count > 1:
                raise invalid(f"this write carries {count} command lines; nothing was "
                              "run: a write runs one command, all or none (write each "
                              "line with its own write, e.g. one echo per command)")
            text = decode_line(data, length)
            verb = self.verbs[self.verb]
            args, opts = parse(verb, self.verb, text)
            pairs = await verb.run(array, args, opts)
        except ArrayError as err:
            self.reply = refuse(array, self.verb, data, err, self.origin).reply
            raise
        self.reply = format_reply(pairs or {})


async def execute(array, verb_name: str, text: str) -> bytes:
    """Run one command line (no newline needed); its reply. Raises
    ArrayError with the reply attached as `.reply`."""
    s = Session(verb_name)
    await s.write(array, text.encode() if text.endswith("\n") else text.encode() + b"\n")
    return s.reply


# ---- renderings of ctl/status, ctl/status.json and ctl/events ---------------
def render_status_json(status: dict) -> bytes:
    return (json.dumps(status, indent=1, sort_keys=True) + "\n").encode()


def render_status(s: dict) -> bytes:
    out = [f"fusearray {s['array']} (pid {s['pid']})", ""]
    out.append("packs:")
    for p in s["packs"]:
        out.append(f"  {p['name']}: {p['layout']} {p['state']}  used "
                   f"{human_bytes(p['used_bytes'])} of {human_bytes(p['capacity_bytes'])}, "
                   f"{human_bytes(p['free_bytes'])} free  ({p['blocks']} blocks)")
        for d in p["disks"]:
            out.append(f"    disk {d['id']} {d['state']:8} {d['path']}")
    out.append("luns:")
    for v in s["luns"]:
        out.append("  " + _vol_line(v))
    out.append("sets:")
    for st in s["sets"]:
        out.append(f"  {st['name']} (created {iso_time(st['created'])})")
        for v in st["shadow_copies"]:
            out.append("    " + _vol_line(v))
    out.append("jobs:")
    for j in s["jobs"]:
        bar = "#" * (j["percent"] // 5)
        out.append(f"  {j['id']} {j['kind']} {j['state']} [{bar:20}] {j['percent']}%")
    c = s["cache"]
    out.append(f"cache: {human_bytes(c['bytes'])} of {human_bytes(c['limit_bytes'])}, "
               f"{human_bytes(c['dirty_bytes'])} dirty")
    return ("\n".join(out) + "\n").encode()


def _vol_line(v: dict) -> str:
    flags = [f for f in ("readonly", "hidden") if v[f]]
    if v.get("consistency"):
        flags.append(f"{v['consistency']}-consistent")
    extra = f" [{','.join(flags)}]" if flags else ""
    state = f"  {v['state']}" if v["state"] != "online" else ""
    att = "".join(f"\n      attached {a['device']}" + (f" mounted on {', '.join(a['mounts'])}"
                                                       if a["mounts"] else "")
                  for a in v.get("attached", ()))
    if (sh := v.get("iscsi")):
        att += (f"\n      iSCSI target {sh['target']} on {sh['portal']}, initiators "
                f"{', '.join(sh['initiators']) or 'any'}"
                + ("" if sh["serving"] else f" (not served: {sh['error']})"))
    return (f"{v['name']:16} {human_bytes(v['size']):>8}  alloc "
            f"{human_bytes(v['allocated_bytes']):>8}  pack {v['pack']}  {v['wwn']}"
            f"{'  open' if v['open'] else ''}{state}{extra}{att}")


def render_events(events) -> bytes:
    lines = [f"{iso_time(t)} {level} {msg}" for _, t, level, msg in events]
    return ("\n".join(lines) + "\n").encode() if lines else b""
