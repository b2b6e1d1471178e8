"""The control protocol (DESIGN section 3): parse a command line, call the
array, turn the outcome into a `key=value` reply.

A command is `ARG... key=value...`: positionals first, then options known
to the verb. A failure is an ArrayError: its errno goes back to the writer
and its message into the reply and the event log; the array is unchanged.
"""
import json

from .errors import ArrayError, invalid
from .util import human_bytes, iso_time, parse_bool, parse_bytes


class Verb:
    def __init__(self, run, nargs: tuple[int, int], options=(), usage=""):
        self.run = run
        self.nargs = nargs
        self.options = set(options)
        self.usage = usage


def parse(verb: Verb, name: str, line: str) -> tuple[list, dict]:
    args, opts = [], {}
    for tok in line.split():
        key, eq, value = tok.partition("=")
        if eq and "/" not in key and key.replace("_", "").isalpha():
            if key not in verb.options:
                known = ", ".join(sorted(verb.options)) or "none"
                raise invalid(f"{name}: unknown option {key!r} (options: {known}); "
                              f"usage: {name} {verb.usage}")
            if key in opts:
                raise invalid(f"{name}: option {key} given twice")
            opts[key] = value
        else:
            if opts:
                raise invalid(f"{name}: positional argument {tok!r} after options; "
                              f"usage: {name} {verb.usage}")
            args.append(tok)
    lo, hi = verb.nargs
    if not lo <= len(args) <= hi:
        raise invalid(f"{name}: expected {lo if lo == hi else f'{lo} to {hi}'} "
                      f"argument(s), got {len(args)}; usage: {name} {verb.usage}")
    return args, opts


def _force(opts) -> bool:
    return parse_bool(opts.get("force", "no"), "force")


async def _create(array, args, opts):
    bs = parse_bytes(opts["block"], "block size") if "block" in opts else None
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


async def _addpack(array, args, opts):
    pack = await array.add_pack(args[0], args[1], args[2].split(","))
    return {"pack": pack.name}


async def _snapshot(array, args, opts):
    set_name, job = await array.snapshot(
        args, opts.get("set"), opts.get("context", "differential"), opts.get("pack"),
        parse_bool(opts.get("hidden", "no"), "hidden"))
    reply = {"set": set_name}
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
        job = await array.control_job(args[0], action, args[1] if len(args) > 1 else None)
        return {"job": job.id, "state": job.state}
    return run


async def _recover(array, args, opts):
    job = await array.recover(args[0])
    return {"job": job.id, "state": job.state}


async def _replace(array, args, opts):
    job = await array.replace(args[0], args[1], args[2], _force(opts))
    return {"job": job.id}


async def _scrub(array, args, opts):
    job = await array.scrub(args[0])
    return {"job": job.id}


VERBS: dict[str, Verb] = {
    "create": Verb(_create, (2, 2), ("pack", "block"), "NAME SIZE [pack=P] [block=64K]"),
    "delete": Verb(_delete, (1, 1), ("force",), "NAME|SET|SET/NAME [force=yes]"),
    "resize": Verb(_resize, (2, 2), ("force",), "NAME SIZE [force=yes]"),
    "addpack": Verb(_addpack, (3, 3), (), "NAME LAYOUT DIR[,DIR...]"),
    "snapshot": Verb(_snapshot, (1, 256), ("set", "context", "pack", "hidden"),
                     "LUN... [set=NAME] [context=differential|plex] [pack=P] [hidden=yes]"),
    "resync": Verb(_resync, (1, 256), ("pack", "force", "undo"),
                   "SET/NAME[=DEST]... [pack=P] [force=yes] [undo=no]"),
    "swap": Verb(_swap, (1, 1), ("as", "force"), "SET/NAME [as=NAME] [force=yes]"),
    "recover": Verb(_recover, (1, 1), (), "PACK"),
    "replace": Verb(_replace, (3, 3), ("force",), "PACK OLD_DISK NEW_DIR [force=yes]"),
    "scrub": Verb(_scrub, (1, 1), (), "PACK"),
    "cancel": Verb(_job_verb("cancel"), (1, 1), (), "JOB"),
    "pause": Verb(_job_verb("pause"), (1, 1), (), "JOB"),
    "resume": Verb(_job_verb("resume"), (1, 1), (), "JOB"),
    "throttle": Verb(_job_verb("throttle"), (2, 2), (), "JOB RATE (e.g. 50M per second, 0 for none)"),
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


def failure(array, verb: str, line: bytes, err: ArrayError) -> bytes:
    """Log a refused stream command as an event; the error reply."""
    text = line.decode(errors="replace").strip()
    array.event("error", f"{verb}{' ' + text if text else ''}: {err.message} [{err.errname}]")
    return format_error(err)


def format_reply(pairs: dict) -> bytes:
    lines = ["status=ok"] + [f"{k}={v}" for k, v in pairs.items()]
    return ("\n".join(lines) + "\n").encode()


def format_error(err: ArrayError) -> bytes:
    msg = " ".join(err.message.split())
    return f"status=error\nerrno={err.errname}\nmessage={msg}\n".encode()


async def execute(array, verb_name: str, text: str) -> bytes:
    """Run every non-empty line of `text`; the reply of the last one (or the
    first failure, which stops the rest) is returned. Raises ArrayError with
    the reply attached as `.reply`."""
    verb = VERBS[verb_name]
    reply = format_reply({})
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            args, opts = parse(verb, verb_name, line)
            pairs = await verb.run(array, args, opts)
        except ArrayError as err:
            err.message = f"{verb_name} {line.strip()}: {err.message}"
            array.event("error", f"{err.message} [{err.errname}]")
            err.reply = format_error(err)
            raise
        reply = format_reply(pairs or {})
    return reply


# ---- renderings of ctl/status, ctl/status.json and ctl/events ---------------
def render_status_json(status: dict) -> bytes:
    return (json.dumps(status, indent=1, sort_keys=True) + "\n").encode()


def render_status(s: dict) -> bytes:
    out = [f"fusearray {s['array']} (pid {s['pid']})", ""]
    out.append("packs:")
    for p in s["packs"]:
        out.append(f"  {p['name']}: {p['layout']} {p['state']}  used "
                   f"{human_bytes(p['used_bytes'])} of {human_bytes(p['capacity_bytes'])}"
                   f"  ({p['blocks']} blocks)")
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
    extra = f" [{','.join(flags)}]" if flags else ""
    return (f"{v['name']:16} {human_bytes(v['size']):>8}  alloc "
            f"{human_bytes(v['allocated_bytes']):>8}  pack {v['pack']}  {v['wwn']}"
            f"{'  open' if v['open'] else ''}{extra}")


def render_events(events) -> bytes:
    lines = [f"{iso_time(t)} {level} {msg}" for _, t, level, msg in events]
    return ("\n".join(lines) + "\n").encode() if lines else b""
