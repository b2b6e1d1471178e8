"""Transportable shadow copies: export a set as a stream, import it into any
array (DESIGN 4.5; format in docs/stream-format.md).

Both directions stream with bounded memory: `export_stream` is an async
generator of lists of byte pieces (joined only by the reader);
`Importer.feed` parses whatever arrives and keeps at most one batch of
blocks (IMPORT_BATCH) pending and one being stored.

An import builds its volumes in a staging set (namespace.is_staging: never
a user name, never listed), through the staging API of shadows.Shadows
(stage, stage_volume, store, publish, drop). It becomes visible only when
the trailer has verified; a bad stream removes the staging set and reclaims
its space. A partial import checkpoints (offset, hash chain, maps) in its
job, so an interrupted transfer resumes from the last checkpoint
(`resume=yes`).

This module uses the array's public collaborators only (`array.shadows`,
`array.ns`, `array.runner`, `array.writeback`, `array.collector`, the read
path) and no private name of another module.

Concurrency: the parser and the export generator run on the trio thread
(the task of the FUSE write or the stream socket connection feeding them).
An import's batches are verified and hashed in a worker thread without the
commit lock, then stored in order under it (the write-back's appends, in a
worker thread), up to STORE_DEPTH in flight, as tasks of the daemon's
nursery. An export's next batches are read and encoded by a producer task
in the daemon's nursery (ExportRun), its reads in worker threads; its roots
are pinned (the collector keeps their blocks) until it ends. A crash
mid-import leaves the staging set and the job as of the last checkpoint
(committed): `import --resume` goes on from there, `cancel` drops it; a
restart pauses the job until its stream comes back.
"""
import errno
import json
import logging
import re
import struct
import time

import trio
import xxhash

from . import ZERO_ID, ctl, maps
from .errors import ArrayError, exists, invalid, notfound
from .jobs import Job
from .util import NAME_RE, InFlight, check_name, human_bytes
from .writeback import block_ids

MAGIC = b"FASTRM\x00\x02"
REC = struct.Struct("<cI")
U64 = struct.Struct("<Q")
log = logging.getLogger("fusearray")
# None when not available (see fusearray.native): python-xxhash, GIL held
from .native import hash64_128_many as _shim_hash64_128_many
from .native import hash64_many as _shim_hash64_many
FORMAT = 2
EXPORT_BATCH = 64
IMPORT_BATCH = 16 << 20
STORE_DEPTH = 2            # import batches in flight: one hashed while one is appended
CHECKPOINT_BYTES = 64 << 20
MAX_RECORD = (1 << 20) + 64
EXPORT_PREFETCH = 2     # batches encoded ahead of the reader

EXPORT_OPTS = ctl.Verb(None, (1, 1), ("base",), "SET [base=SET2]")
IMPORT_OPTS = ctl.Verb(None, (0, 0), ("as", "pack", "remap", "resume", "job"),
                       "[as=SET] [pack=P] [remap=yes] [resume=yes [job=N]]")


def _chain(chain: bytes, typ: bytes, *pieces) -> bytes:
    """The next chain value: xxh3_128(chain || type || payload), where the
    payload may come in pieces (hashed as one string). A block record
    chains only its first 16 bytes (bno, xxh3_64 of the data): the hash
    binds the data (format 2; see docs/stream-format.md)."""
    h = xxhash.xxh3_128()
    h.update(chain)
    h.update(typ)
    for p in pieces:
        h.update(p)
    return h.digest()


def _block_chain(chain: bytes, head) -> bytes:
    """_chain of a block record, from its 16-byte head (bno, data hash)."""
    return xxhash.xxh3_128_digest(b"".join((chain, b"B", head)))


class Encoder:
    """Frames records and keeps the hash chain and counts."""

    def __init__(self):
        self.chain = bytes(16)
        self.records = 0
        self.blocks = 0

    def record(self, typ: bytes, payload) -> bytes:
        self.chain = _chain(self.chain, typ, payload)
        self.records += 1
        return REC.pack(typ, len(payload)) + bytes(payload)

    def json(self, typ: bytes, obj) -> bytes:
        return self.record(typ, json.dumps(obj, sort_keys=True).encode())

    def trailer(self) -> bytes:
        body = json.dumps({"records": self.records, "blocks": self.blocks,
                           "chain": self.chain.hex()}, sort_keys=True).encode()
        return REC.pack(b"T", len(body)) + body


def _vol_header(v, height: int, diff: bool) -> dict:
    return {"name": v.name, "size": v.size, "block_size": v.block_size, "wwn": v.wwn,
            "serial": v.serial, "origin": v.origin, "context": v.context,
            "readonly": v.readonly, "hidden": v.hidden, "height": height, "diff": diff}


def _diffable(base_vol, vol, height: int) -> bool:
    """Is `vol` sent as changes against `base_vol`? (same map geometry)"""
    return (base_vol is not None and base_vol.height == height
            and base_vol.block_size == vol.block_size)


async def export_stream(array, set_name: str, base_name: str | None = None):
    """Yield the stream of set `set_name` (incremental against `base_name`)."""
    s = array.ns.visible_set(set_name)
    if s is None:
        raise notfound(f"no shadow copy set named {set_name!r}")
    base = None
    if base_name is not None:
        base = array.ns.visible_set(base_name)
        if base is None:
            raise notfound(f"no base set named {base_name!r}")
    vols = [s.members[n] for n in sorted(s.members)]
    for v in vols:
        array.shadows.check_copy_free(v, "shadow copy")
    # the roots as they are now; pinned so GC keeps their blocks meanwhile
    snap = [(v, v.root, v.height) for v in vols]
    base_vols = dict(base.members) if base else {}
    pins = [(v, v.root, v.height) for v in vols] + \
        [(v, v.root, v.height) for v in base_vols.values()]
    array.collector.pin(pins)
    try:
        enc = Encoder()
        header = {"format": FORMAT, "kind": "incremental" if base else "full",
                  "set": {"name": set_name, "created": s.created},
                  "base": ({"name": base_name, "wwns": sorted(v.wwn for v in base_vols.values())}
                           if base else None),
                  "volumes": [_vol_header(v, h, _diffable(base_vols.get(v.name), v, h))
                              for v, _, h in snap],
                  "total_bytes": None if base else sum(v.allocated_bytes() for v in vols),
                  "source": {"array": array.conf["uuid"]}}   # no time: a re-export is identical
        yield [MAGIC + enc.json(b"H", header)]
        for i, (v, root, height) in enumerate(snap):
            yield [enc.json(b"V", {"index": i})]
            b = base_vols.get(v.name)
            if _diffable(b, v, height):
                load = array.reader.loader
                changes = maps.diff(b.root, root, height, load(b), load(v))
            else:
                changes = maps.entries(root, height, array.reader.loader(v))
            batch = []
            async for bno, bid in changes:
                if bno * v.block_size >= v.size:
                    continue
                batch.append((bno, bid))
                if len(batch) >= EXPORT_BATCH:
                    yield await _encode_batch(array, enc, v, batch)
                    batch = []
            if batch:
                yield await _encode_batch(array, enc, v, batch)
        yield [enc.trailer()]
        array.event("info", f"exported set {set_name}"
                    + (f" (incremental against {base_name})" if base else "")
                    + f": {enc.blocks} blocks")
    finally:
        array.collector.unpin(pins)


def header_total(first) -> int | None:
    """The size estimate (`total_bytes`) in a stream's first bytes, for a
    progress bar; None when they hold no whole header."""
    try:
        n = int.from_bytes(first[9:13], "little")
        total = json.loads(bytes(first[13:13 + n])).get("total_bytes")
        return total if isinstance(total, int) else None
    except (ValueError, IndexError, AttributeError):
        return None


class ExportRun:
    """One export command, its stream run ahead of the reader: the next
    batches are read and encoded while the reader is busy sending the last
    (a channel of EXPORT_PREFETCH batches: bounded memory). Shared by
    ctl/export and the stream socket."""

    def __init__(self, gen, first):
        self.gen = gen
        self.first = first          # the header's pieces, read by `start`
        self.recv = None
        self.scope = None

    @classmethod
    async def start(cls, array, line: str) -> "ExportRun":
        """Parse `SET [base=SET2]` and start the stream; a bad command (or a
        set that is not there) raises here, before any stream byte."""
        args, opts = ctl.parse(EXPORT_OPTS, "export", line.strip())
        gen = export_stream(array, args[0], opts.get("base"))
        run = cls(gen, await gen.__anext__())
        send, run.recv = trio.open_memory_channel(EXPORT_PREFETCH)
        await array.nursery.start(run.produce, send)
        return run

    @property
    def total(self) -> int | None:
        return header_total(self.first[0]) if self.first else None

    async def produce(self, send, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The producer task (in the daemon's nursery): the stream's
        batches into `send`, an error as its last item."""
        with trio.CancelScope() as self.scope:
            task_status.started()
            try:
                async with send:
                    try:
                        async for pieces in self.gen:
                            await send.send(pieces)
                    except ArrayError as e:
                        await send.send(e)
                    except Exception as e:      # a bug: fail this stream, not the mount
                        log.exception("export stream failed")
                        await send.send(ArrayError(errno.EIO, f"internal error in the "
                                                   f"export: {type(e).__name__}: {e}"))
            finally:
                with trio.CancelScope(shield=True):
                    await self.gen.aclose()     # unpins the roots

    async def next_batch(self):
        """The next batch of pieces, or None at the end; raises the
        producer's error."""
        if self.first is not None:
            first, self.first = self.first, None
            return first
        try:
            item = await self.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        if isinstance(item, ArrayError):
            raise item
        return item

    def close(self) -> None:
        """The reader went away: stop the producer (it closes the generator)."""
        if self.scope is not None:
            self.scope.cancel()
        if self.recv is not None:
            self.recv.close()


def start_import(array, line: str) -> "Importer":
    """Parse `[as=SET] [pack=P] [remap=yes] [resume=yes [job=N]]`: a new
    import, or the interrupted one it resumes. Every option is checked
    here, before any stream byte: a set name that is bad or taken, a pack
    that is not there, a job that is not a number are refused at once."""
    args, opts = ctl.parse(IMPORT_OPTS, "import", line.strip())
    remap = ctl.parse_bool(opts.get("remap", "no"), "remap")
    if ctl.parse_bool(opts.get("resume", "no"), "resume"):
        jid = opts.get("job")
        if jid is not None and not (jid.isascii() and jid.isdigit()):
            raise invalid(f"import: bad job {jid!r}: give the number of the interrupted "
                          "import job (see ctl/jobs)")
        return Importer.resume(array, jid)
    if "job" in opts:
        raise invalid("import: job= names the import to resume: use it with resume=yes")
    as_name = opts.get("as")
    if as_name is not None:
        check_name(as_name, "set name")
        if as_name in array.ns.sets:
            raise exists(f"import: a shadow copy set named {as_name} already exists here: "
                         "choose another name with as=")
    pack = opts.get("pack")
    if pack is not None:
        check_name(pack, "pack name")
        array.pack(pack)                    # ENOENT, naming the packs there are
    return Importer(array, as_name, pack, remap)


class BatchBuffer(bytearray):
    """The buffer of one encoded batch. The reader gives it back with
    `recycle` once it has sent its last byte, so a long export reuses a few
    buffers instead of faulting in fresh memory for every batch."""


_FREE: list = []          # recycled BatchBuffers
_FREE_DEPTH = 4


def _batch_buffer(n: int) -> BatchBuffer:
    while _FREE:
        buf = _FREE.pop()
        if len(buf) == n:
            return buf
    return BatchBuffer(n)


def recycle(buf) -> None:
    """Give back a batch's buffer: no view of it may be used after the
    current FUSE reply (which is sent before any other task runs)."""
    if type(buf) is BatchBuffer and len(_FREE) < _FREE_DEPTH:
        _FREE.append(buf)


async def _encode_batch(array, enc: Encoder, vol, batch) -> list:
    """The records of `batch` ([(bno, id)]) as one buffer: the blocks are
    read straight into their places in it (verified there), and the reader
    gets views of it, so the stream's bytes are copied once on the way out."""
    bs = vol.block_size
    layout = []                # (bno, id, record offset, data length)
    pos = 0
    for bno, bid in batch:
        n = 0 if bid == ZERO_ID else min(bs, vol.size - bno * bs)
        layout.append((bno, bid, pos, n))
        pos += REC.size + U64.size + (8 + n if n else 0)
    buf = _batch_buffer(pos)
    mv = memoryview(buf)
    reads, short = [], []
    for bno, bid, off, n in layout:
        if not n:
            continue
        data = off + REC.size + 16
        if n == bs:
            reads.append((mv[data:data + n], bid))
        else:                  # the volume's last block, cut at its end
            tmp = memoryview(bytearray(bs))
            reads.append((tmp, bid))
            short.append((mv[data:data + n], tmp[:n]))
    if reads:       # a worker thread reads (and verifies) while the loop goes on
        await array.reader.read_into(vol, reads, in_thread=True)
    for dst, src in short:
        dst[:] = src
    datas = [mv[off + REC.size + 16:off + REC.size + 16 + n] for _, _, off, n in layout if n]
    h64s = iter(await trio.to_thread.run_sync(_hash64_many, datas) if datas else ())
    for bno, bid, off, n in layout:
        if not n:
            REC.pack_into(buf, off, b"Z", U64.size)
            U64.pack_into(buf, off + REC.size, bno)
            enc.chain = _chain(enc.chain, b"Z", mv[off + REC.size:off + REC.size + U64.size])
        else:
            p = off + REC.size
            REC.pack_into(buf, off, b"B", 16 + n)
            U64.pack_into(buf, p, bno)
            buf[p + 8:p + 16] = next(h64s)
            enc.chain = _block_chain(enc.chain, mv[p:p + 16])
            enc.blocks += 1
        enc.records += 1
    return [mv]


def _hash64_many(datas) -> list:
    """xxh3_64 digests of the blocks, without the GIL where the shim has XXH3."""
    if _shim_hash64_many is not None:
        return _shim_hash64_many(datas)
    return [xxhash.xxh3_64_digest(d) for d in datas]


def _check_and_ids(hasher, items, checks) -> list:
    """The import's hashing of a batch: each block sent checked against
    the stream's xxh3_64 (ArrayError EIO naming the first that differs),
    and every block's id (ZERO_ID for a zero block). A block sent whole is
    hashed both ways in one pass (the shim's hash64_128_many: the second
    hash reads it from the CPU's cache); a short last block is padded,
    so its id is taken from the padded copy."""
    sent = [c[1] for c in checks]
    both = _shim_hash64_128_many(sent, hasher.seed) if _shim_hash64_128_many else None
    for (i, _, want, off), got in zip(checks, (b[:8] for b in both) if both is not None
                                      else _hash64_many(sent)):
        if got != want:
            v, bno, _ = items[i]
            raise ArrayError(errno.EIO, f"the stream is damaged: block {bno} of {v.name} "
                             f"(stream offset {off}) does not match its hash")
    datas = [d for _, _, d in items]
    if both is None:
        return block_ids(hasher, datas)
    ids: list = [None] * len(items)
    for (i, data, _, _), b in zip(checks, both):
        if data is datas[i]:
            ids[i] = hasher.block_id_from(data, b[8:])
    rest = [k for k, d in enumerate(datas) if ids[k] is None and d is not None]
    for k, bid in zip(rest, hasher.block_ids([datas[k] for k in rest])):
        ids[k] = bid
    return [ZERO_ID if d is None else bid for d, bid in zip(datas, ids)]


# ---- bounds of an import stream (docs/stream-format.md, "Bounds") ----------------------
#: Block sizes: those `create` allows (a power of two from 4 KiB to 1 MiB).
MIN_BLOCK, MAX_BLOCK = 4096, 1 << 20
#: Largest volume size a stream may declare (also bounded by the pack: thin
#: provisioning allows at most OVERCOMMIT x its capacity).
MAX_VOLUME_SIZE = 1 << 60
#: Volumes in one set (a snapshot takes at most 256 LUNs).
MAX_VOLUMES = 256
#: Tallest map: the height of the largest volume in the smallest blocks.
MAX_HEIGHT = maps.height_for(MAX_VOLUME_SIZE // MIN_BLOCK)
#: Set creation times: from the epoch to year 2286.
MAX_TIME = 1e10
WWN_RE = re.compile(r"naa\.6[0-9a-f]{31}\Z")
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")
CONTEXTS = ("differential", "plex")


class HeaderError(ValueError):
    """A header field out of its bounds (the message names it)."""


def _show(value) -> str:
    """A value for a message: short, with control characters escaped."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(obj, key: str, where: str):
    if not isinstance(obj, dict):
        raise HeaderError(f"{where} is not an object")
    if key not in obj:
        raise HeaderError(f"{where} has no {key!r}")
    return obj[key]


def _int(obj, key: str, where: str, lo: int, hi: int) -> int:
    v = _field(obj, key, where)
    if type(v) is not int or not lo <= v <= hi:
        raise HeaderError(f"{where}.{key} is {_show(v)}: it must be an integer from {lo} to {hi}")
    return v


def _bool(obj, key: str, where: str) -> bool:
    v = _field(obj, key, where)
    if type(v) is not bool:
        raise HeaderError(f"{where}.{key} is {_show(v)}: it must be true or false")
    return v


def _text(obj, key: str, where: str, pattern, what: str, optional: bool = False):
    v = _field(obj, key, where) if not optional or (isinstance(obj, dict) and key in obj) else None
    if v is None and optional:
        return None
    if not isinstance(v, str) or not pattern.match(v):
        raise HeaderError(f"{where}.{key} is {_show(v)}: it must be {what}")
    return v


NAME_WHAT = "1-64 characters [A-Za-z0-9._-], starting with a letter or digit"
WWN_WHAT = "'naa.6' and 31 lower-case hex digits"


def check_header(h) -> dict:
    """The header of an import stream, every field within its bounds;
    returns it rebuilt from the known fields only (unknown ones dropped).
    Raises HeaderError naming the first field out of bounds. Nothing is
    staged before this passed, so a refused header changes nothing."""
    if not isinstance(h, dict):
        raise HeaderError("the header is not a JSON object")
    fmt = _field(h, "format", "header")
    if fmt != FORMAT or type(fmt) is not int:
        raise HeaderError(f"format {_show(fmt)} is not supported (this fusearray reads {FORMAT})")
    kind = _field(h, "kind", "header")
    if kind not in ("full", "incremental"):
        raise HeaderError(f"kind {_show(kind)}: it must be full or incremental")
    s = _field(h, "set", "header")
    set_name = _text(s, "name", "set", NAME_RE, NAME_WHAT)
    created = _field(s, "created", "set")
    if type(created) not in (int, float) or not 0 <= created <= MAX_TIME:
        raise HeaderError(f"set.created is {_show(created)}: it must be a time in seconds "
                          f"since the epoch, from 0 to {MAX_TIME:.0f}")
    base = _field(h, "base", "header")
    if kind == "full":
        if base is not None:
            raise HeaderError("a full stream has no base (base must be null)")
    else:
        base_name = _text(base, "name", "base", NAME_RE, NAME_WHAT)
        wwns = _field(base, "wwns", "base")
        if not isinstance(wwns, list) or not 1 <= len(wwns) <= MAX_VOLUMES:
            raise HeaderError(f"base.wwns must be a list of 1 to {MAX_VOLUMES} WWNs")
        for w in wwns:
            if not isinstance(w, str) or not WWN_RE.match(w):
                raise HeaderError(f"base.wwns holds {_show(w)}: a WWN is {WWN_WHAT}")
        base = {"name": base_name, "wwns": list(wwns)}
    vols = _field(h, "volumes", "header")
    if not isinstance(vols, list) or not 1 <= len(vols) <= MAX_VOLUMES:
        raise HeaderError(f"volumes must be a list of 1 to {MAX_VOLUMES} volumes")
    out_vols, names, ids = [], set(), set()
    for i, vh in enumerate(vols):
        where = f"volumes[{i}]"
        name = _text(vh, "name", where, NAME_RE, NAME_WHAT)
        if name in names:
            raise HeaderError(f"{where}: the name {name} is given twice (one volume per "
                              "name in a set)")
        names.add(name)
        bs = _int(vh, "block_size", where, MIN_BLOCK, MAX_BLOCK)
        if bs & (bs - 1):
            raise HeaderError(f"{where}.block_size is {bs}: it must be a power of two "
                              f"from {MIN_BLOCK} to {MAX_BLOCK} (the sizes create allows)")
        size = _int(vh, "size", where, 512, MAX_VOLUME_SIZE)
        if size % 512:
            raise HeaderError(f"{where}.size is {size}: it must be a multiple of 512")
        need = maps.height_for(-(-size // bs))
        height = _int(vh, "height", where, 1, MAX_HEIGHT)
        if height < need:
            raise HeaderError(f"{where}.height is {height}: a volume of {size} bytes in "
                              f"blocks of {bs} needs a map of height {need} to {MAX_HEIGHT}")
        wwn = _text(vh, "wwn", where, WWN_RE, WWN_WHAT)
        if wwn in ids:
            raise HeaderError(f"{where}: the WWN {wwn} is given twice")
        ids.add(wwn)
        serial = _text(vh, "serial", where, SERIAL_RE, NAME_WHAT)
        origin = _field(vh, "origin", where)
        if origin not in (None, "") and not (isinstance(origin, str) and WWN_RE.match(origin)):
            raise HeaderError(f"{where}.origin is {_show(origin)}: it must be null or "
                              f"a WWN ({WWN_WHAT})")
        context = _field(vh, "context", where)
        if context not in CONTEXTS:
            raise HeaderError(f"{where}.context is {_show(context)}: it must be "
                              "differential or plex")
        diff = _bool(vh, "diff", where)
        if diff and kind != "incremental":
            raise HeaderError(f"{where}: only an incremental stream sends changes (diff)")
        out_vols.append({"name": name, "size": size, "block_size": bs, "height": height,
                         "wwn": wwn, "serial": serial, "origin": origin or None,
                         "context": context, "readonly": _bool(vh, "readonly", where),
                         "hidden": _bool(vh, "hidden", where), "diff": diff})
    total = h.get("total_bytes")
    limit = sum(v["size"] for v in out_vols)
    if total is not None and (type(total) is not int or not 0 <= total <= limit):
        raise HeaderError(f"total_bytes is {_show(total)}: it must be null or an integer "
                          f"from 0 to the volumes' total size ({limit})")
    source = h.get("source")
    array_id = None
    if source is not None:
        array_id = _text(source, "array", "source", SOURCE_RE, "an array id", optional=True)
    return {"format": FORMAT, "kind": kind, "set": {"name": set_name, "created": created},
            "base": base, "volumes": out_vols, "total_bytes": total,
            "source": {"array": array_id}}


class Importer:
    """Receives one stream (or the rest of one, when resuming). Given the
    array, it keeps its collaborators: the namespace, the shadows (whose
    staging API it uses), the job runner, the write-back (commit lock,
    commit) and the collector."""

    def __init__(self, array, as_name: str | None, pack: str | None, remap: bool):
        self.ns = array.ns
        self.shadows = array.shadows
        self.runner = array.runner
        self.wb = array.writeback
        self.collector = array.collector
        self.event = array.event
        self.pack = array.pack
        self.hasher = array.hasher
        self.verify = array.verify
        self.as_name = as_name
        self.pack_name = pack
        self.remap = remap
        self.buf = bytearray()
        self.offset = 0               # stream bytes consumed
        self.chain = bytes(16)
        self.records = 0
        self.blocks = 0
        self.header = None
        self.vols: list = []
        self.current = None
        self.pending: list = []       # [(vol, bno, data)]; data None: a zero block
        self.checks: list = []        # [(index in pending, data as sent, its xxh3_64, offset)]
        self.pending_bytes = 0
        self.job: Job | None = None
        self.finished = False
        self.verified = False         # the trailer matched; the set is made at the end
        self.failed: ArrayError | None = None
        self.resumed = False
        self._since_checkpoint = 0
        # batches being verified and hashed (no lock) and stored (in order,
        # under the array's lock) while the next is parsed
        self._storing = InFlight(depth=STORE_DEPTH)
        self.batches = 0              # batches taken from `pending` so far
        self.stored = 0               # of which stored (in order: one in flight at a time)

    # ---- resume ---------------------------------------------------------------------
    @classmethod
    def resume(cls, array, jid: str | None):
        jobs = [j for j in array.runner.jobs.values() if j.kind == "import" and j.active
                and (jid is None or str(j.id) == jid)]
        if not jobs:
            raise notfound("no interrupted import to resume" + (f" with job {jid}" if jid else ""))
        job = jobs[-1]
        p = job.params
        imp = cls(array, p.get("as"), p.get("pack"), p.get("remap", False))
        imp.job = job
        imp.header = p["header"]
        imp.offset, imp.chain = p["offset"], bytes.fromhex(p["chain"])
        imp.records, imp.blocks = p["records"], p["blocks"]
        imp.vols = [array.ns.volumes[v] for v in p["vids"]]
        imp.current = imp.vols[p["current"]] if p.get("current") is not None else None
        imp.resumed = True
        job.resume()
        array.event("info", f"import job {job.id} resumes at stream offset {imp.offset}")
        return imp

    # ---- parsing -----------------------------------------------------------------------
    async def feed(self, data) -> None:
        if self.failed:
            raise self.failed
        if self.finished:
            raise invalid("data after the end of the stream")
        try:
            try:
                if self.verified and len(data):
                    raise invalid(f"corrupt stream: data after its trailer (offset "
                                  f"{self.offset})")
                await self._take(data)
            except ArrayError:
                raise
            except Exception as e:      # a bug or exhaustion: fail this import, not the array
                log.exception("import failed")
                raise ArrayError(errno.EIO, f"internal error in the import at stream offset "
                                 f"{self.offset}: {type(e).__name__}: {e}") from None
        except ArrayError as e:
            if self.resumed and not self.finished:
                # maybe not the same stream: keep what the first run stored
                self.failed = e
                self.buf.clear()
                self.job.pause()
                self.event("warning", f"import job {self.job.id}: the resumed stream "
                           f"does not continue it ({e.message}); the partial import "
                           f"is kept: resume with the same stream, or cancel "
                           f"{self.job.id}")
                raise
            await self.abort(e)
            raise

    async def _take(self, data) -> None:
        """Parse what a write brought. Records wholly inside it are parsed
        in place (a block's payload stays a view of the write's bytes: no
        copy); only a record split across writes, and the stream's start,
        go through `buf`."""
        mv = memoryview(data)
        if self.buf or (self.offset == 0 and self.header is None):
            take = self._to_complete(mv)
            self.buf += mv[:take]
            await self._parse()
            mv = mv[take:]
            if self.buf or not len(mv):
                self.buf += mv
                return
        used = await self._parse_view(mv)
        self.buf += mv[used:]

    def _to_complete(self, mv) -> int:
        """How much of `mv` completes the record begun in `buf` (all of
        it at the stream's start, or while even its header is unknown)."""
        if self.offset == 0 and self.header is None:
            return len(mv)
        have = len(self.buf)
        head = bytes(self.buf[:REC.size]) + bytes(mv[:max(REC.size - have, 0)])
        if len(head) < REC.size:
            return len(mv)
        n = REC.unpack(head)[1]
        if n > MAX_RECORD:
            return len(mv)          # _parse reports it
        return min(max(REC.size + n - have, 0), len(mv))

    async def _parse_view(self, mv, copy: bool = False) -> int:
        """Parse the whole records at the start of `mv`; returns the bytes
        used (the rest is an incomplete record). A block's payload stays a
        view of `mv` unless `copy`."""
        pos = 0
        while len(mv) - pos >= REC.size:
            if self.verified:
                raise invalid(f"corrupt stream: data after its trailer (offset {self.offset})")
            typ, n = REC.unpack_from(mv, pos)
            if n > MAX_RECORD or typ not in b"HVBZT":
                raise invalid(f"corrupt stream at offset {self.offset}: bad record "
                              f"{typ!r} of {n} bytes")
            if len(mv) - pos < REC.size + n:
                break
            if typ == b"B" and self.current is not None and n >= 16:
                # the bulk of a stream: no coroutine per block
                self.offset += REC.size + n
                self._block(mv[pos + REC.size:pos + REC.size + n], copy)
                pos += REC.size + n
                if self.pending_bytes >= IMPORT_BATCH:
                    await self._flush_pending()
                continue
            payload = mv[pos + REC.size:pos + REC.size + n]
            if copy or typ != b"B":
                payload = bytes(payload)      # (non-block records are small)
            pos += REC.size + n
            self.offset += REC.size + n
            await self._record(typ, payload)
        return pos

    async def _parse(self) -> None:
        if self.offset == 0 and self.header is None:
            if len(self.buf) < len(MAGIC):
                if bytes(self.buf[:6]) != MAGIC[:min(len(self.buf), 6)]:
                    raise invalid("this is not a fusearray stream (bad magic; the command "
                                  "is one line, and the stream follows it)")
                return
            if bytes(self.buf[:6]) != MAGIC[:6]:
                raise invalid("this is not a fusearray stream (bad magic)")
            if bytes(self.buf[:8]) != MAGIC:
                raise invalid(f"stream version {self.buf[7]} is not supported "
                              f"(this fusearray reads version {MAGIC[7]})")
            del self.buf[:8]
            self.offset = 8
        with memoryview(self.buf) as mv:     # payloads copied: buf is trimmed next
            used = await self._parse_view(mv, copy=True)
        del self.buf[:used]             # once per feed, not per record

    def _block(self, payload, copy: bool) -> None:
        """A block record (payload: bno, xxh3_64 of the data, the data)."""
        self.chain = _block_chain(self.chain, payload[:16])
        self.records += 1
        bno = U64.unpack_from(payload)[0]
        v = self.current
        if bno * v.block_size >= v.size:
            raise invalid(f"corrupt stream: block {bno} is past the end of {v.name}")
        data = payload[16:]
        want = min(v.block_size, v.size - bno * v.block_size)
        if len(data) != want:       # only the volume's last block is short
            raise invalid(f"corrupt stream at offset {self.offset}: block {bno} of {v.name} "
                          f"holds {len(data)} bytes, not {want}")
        if copy:                # a view of `buf`, which is trimmed after the parse
            data = bytes(data)
        # its hash is checked with the batch, in the store's worker thread
        self.checks.append((len(self.pending), data, bytes(payload[8:16]), self.offset))
        if len(data) < v.block_size:
            data = bytes(data) + bytes(v.block_size - len(data))
        self.pending.append((v, bno, data))
        self.pending_bytes += len(data)
        self.blocks += 1

    async def _record(self, typ: bytes, payload: bytes) -> None:
        try:
            await self._record_inner(typ, payload)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
                RecursionError, struct.error) as e:
            # RecursionError: JSON nested too deeply for the decoder
            raise invalid(f"corrupt stream at offset {self.offset}: record {typ!r} "
                          f"is not valid ({type(e).__name__})") from None

    async def _record_inner(self, typ: bytes, payload: bytes) -> None:
        if typ == b"T":
            await self._trailer(payload)
            return
        if typ == b"B" and self.current is not None:
            self._block(memoryview(payload), False)
            if self.pending_bytes >= IMPORT_BATCH:
                await self._flush_pending()
            return
        self.chain = _chain(self.chain, typ, payload)
        self.records += 1
        if typ == b"H":
            if self.header is not None:
                raise invalid("corrupt stream: a second header")
            await self._start(json.loads(payload))
        elif self.header is None:
            raise invalid("corrupt stream: records before the header")
        elif typ == b"V":
            i = json.loads(payload)["index"]
            if type(i) is not int or not 0 <= i < len(self.vols):
                raise invalid(f"corrupt stream: volume index {_show(i)}")
            await self._flush_pending()
            self.current = self.vols[i]
        elif self.current is None:
            raise invalid("corrupt stream: a block before any volume")
        else:
            if typ != b"Z" or len(payload) != U64.size:
                raise invalid(f"corrupt stream at offset {self.offset}: a {typ!r} record "
                              f"of {len(payload)} bytes")
            bno = U64.unpack_from(payload)[0]
            v = self.current
            if bno * v.block_size >= v.size:
                raise invalid(f"corrupt stream: block {bno} is past the end of {v.name}")
            self.pending.append((v, bno, None))        # a Z record
            if self.pending_bytes >= IMPORT_BATCH:
                await self._flush_pending()

    async def _start(self, h) -> None:
        try:
            h = check_header(h)
        except HeaderError as e:
            raise invalid(f"corrupt stream: its header is refused: {e}") from None
        await self.wb.check_room()      # (before anything is staged: ENOSPC, nothing left)
        ns, wb = self.ns, self.wb
        name = self.as_name or h["set"]["name"]
        check_name(name, "set name")
        if name in ns.sets:
            raise exists(f"a shadow copy set named {name} already exists here: "
                         "import it with --as NEW_NAME")
        base = None
        if h["kind"] == "incremental":
            base = ns.visible_set(h["base"]["name"])
            have = sorted(v.wwn for v in base.members.values()) if base else None
            if have != sorted(h["base"]["wwns"]):
                raise notfound(f"this incremental stream needs base set "
                               f"{h['base']['name']!r} (the same shadow copies, by WWN) "
                               "on this array: import that set first")
        pack = self.pack(self.pack_name) if self.pack_name or not base else \
            next(iter(base.members.values())).pack
        used = {v.wwn: v for v in ns.volumes.values()}
        starts = []
        for vh in h["volumes"]:
            if vh["wwn"] in used and not self.remap:
                other = used[vh["wwn"]]
                raise exists(f"WWN {vh['wwn']} of {vh['name']} is already used here by "
                             f"{other.kind} {other.path}: refuse to create a duplicate "
                             "identity (import with --remap to give the copies new WWNs)")
            wb.check_fits(pack, vh["size"])
            bv = base.members.get(vh["name"]) if base and vh["diff"] else None
            if vh["diff"]:
                if bv is None or bv.height != vh["height"] or bv.block_size != vh["block_size"]:
                    raise invalid(f"corrupt stream: {vh['name']} is sent as changes against "
                                  "a base volume that does not match")
                if bv.pack is not pack:
                    raise ArrayError(errno.EOPNOTSUPP, f"an incremental stream builds on its "
                                     f"base set, which is on pack {bv.pack.name}: import it "
                                     f"there (not on {pack.name})")
            starts.append(bv)
        async with wb.lock:
            if name in ns.sets:
                raise exists(f"a shadow copy set named {name} was created meanwhile")
            # the job first: its id names the staging set, and a failure from
            # here on is undone by `abort` (staging set, volumes, job)
            self.job = self.runner.new("import", [])
            self.header = h
            staging = self.shadows.stage(self.job)
            for vh, bv in zip(h["volumes"], starts):
                self.vols.append(self.shadows.stage_volume(staging, vh, pack, self.remap, bv))
            self.job.state = "running"
            self.job.total_bytes = h["total_bytes"] or 0
            self._save_params()
            self.event("info", f"import job {self.job.id} started: set {h['set']['name']}"
                       + (f" as {name}" if self.as_name else "")
                       + f", {len(self.vols)} shadow copies, {h['kind']}")
            await wb.commit()

    def _save_params(self) -> None:
        j = self.job
        j.params.update(header=self.header, offset=self.offset, chain=self.chain.hex(),
                        records=self.records, blocks=self.blocks,
                        vids=[v.vid for v in self.vols], **{"as": self.as_name},
                        pack=self.pack_name, remap=self.remap,
                        current=self.vols.index(self.current) if self.current in self.vols else None)
        self.wb.mark_job(j)

    async def _flush_pending(self, wait: bool = False) -> None:
        """Store the pending blocks. In the background by default, up to
        STORE_DEPTH batches in flight, so that parsing the next 16 MiB of
        the stream overlaps verifying and hashing one batch and appending
        the one before; at once with wait=True or when a checkpoint is due.
        A background store's error surfaces at the next call (and the
        import is aborted as before)."""
        checkpoint = (self._since_checkpoint + self.pending_bytes >= CHECKPOINT_BYTES
                      and not self.buf)
        nursery = self.runner.nursery
        background = not (wait or checkpoint) and nursery is not None
        if background:
            await self._storing.room()
        else:
            await self._storing.wait()
        if not self.pending:
            return
        items, self.pending, n = self.pending, [], self.pending_bytes
        checks, self.checks = self.checks, []
        self.pending_bytes = 0
        self._since_checkpoint += n
        self.batches += 1
        if background:
            self._storing.start(nursery, self._store, items, checks, n, self.batches,
                                self._storing.last())
            return
        await self._store(items, checks, n, self.batches, None)
        if checkpoint:
            await self._checkpoint()

    def holding(self) -> int:
        """The batch that holds the last block parsed so far: every view
        of what was fed until now is let go once `stored` reaches it (the
        caller may then reuse the buffer it fed)."""
        return self.batches + (1 if self.pending else 0)

    async def _store(self, items, checks, n: int, seq: int, after) -> None:
        """Verify the blocks against the stream's hashes and compute their
        ids in a worker thread (no lock: the data is the import's own);
        then, once the batch before (`after`) is stored, dedup and append
        them under the commit lock (Shadows.store). Nothing is referenced
        before this succeeds (a checkpoint or the trailer waits for it), so a
        damaged block fails the import."""
        ids = await trio.to_thread.run_sync(_check_and_ids, self.hasher, items, checks)
        if after is not None:
            await after.wait()
            if self.stored != seq - 1:
                return          # the batch before failed: so does the import
        await self.shadows.store(items, ids, self.verify)
        self.stored = seq
        self.job.done_bytes += n
        self.wb.mark_job(self.job)

    async def _checkpoint(self) -> None:
        """Persist the maps and where the stream is, for resume. Only at a
        record boundary with nothing buffered."""
        await self._storing.wait()
        self._since_checkpoint = 0
        self._save_params()
        async with self.wb.lock:
            await self.wb.commit()

    async def _trailer(self, payload: bytes) -> None:
        t = json.loads(payload)
        # every block checked first, so a block's own damage is named (with
        # its offset) whether or not its batch's check ended before the
        # parser got here: a mapped stream is parsed faster than checked
        await self._flush_pending(wait=True)
        if (t.get("chain") != self.chain.hex() or t.get("records") != self.records
                or t.get("blocks") != self.blocks):
            raise ArrayError(errno.EIO, "the stream is damaged: its checksum or counts do "
                             "not match the data received")
        # the set is made visible at the end of the input (`end_of_input`):
        # a stream with anything after its trailer is refused whole
        self.verified = True

    async def _finish(self) -> None:
        """The verified stream ended: its set becomes visible."""
        wb = self.wb
        h = self.header
        name = self.as_name or h["set"]["name"]
        async with wb.lock:
            if name in self.ns.sets:
                raise exists(f"a shadow copy set named {name} was created meanwhile")
            self.shadows.publish(self.vols, name, h["set"]["created"])
            self.job.state, self.job.finished = "done", time.time()
            self.job.total_bytes = self.job.done_bytes
            wb.mark_job(self.job)
            self.event("info", f"imported set {name}: {len(self.vols)} shadow copies, "
                       f"{self.blocks} blocks ({human_bytes(self.job.done_bytes)}) verified")
            await wb.commit()
        self.finished = True

    # ---- the end ---------------------------------------------------------------------
    async def abort(self, err: ArrayError) -> None:
        """Remove the partial set and reclaim its space: whatever was
        staged (the staging set, its volumes, the job) goes, so a refused
        stream leaves nothing behind."""
        self.failed = err
        await self._storing.wait(raise_error=False)    # let the batch in flight land first
        if self.job is None:
            return
        async with self.wb.lock:
            self.shadows.drop(self.job, self.vols)
            self.job.state, self.job.finished = "failed", time.time()
            self.job.error = err.message
            self.wb.mark_job(self.job)
            self.event("error", f"import job {self.job.id} failed and was removed: "
                       f"{err.message}")
            await self.collector.collect()

    async def end_of_input(self) -> None:
        """The writer asked for the reply: the stream must be complete."""
        if self.failed:
            raise self.failed
        if self.finished:
            return
        if self.verified and not self.buf:
            try:
                await self._finish()
                return
            except ArrayError as e:
                await self.abort(e)
                raise
        if self.verified:
            err = invalid(f"corrupt stream: data after its trailer (offset {self.offset})")
        else:
            err = ArrayError(errno.EIO, "the stream ended without its trailer: it is "
                             "truncated" + (f" after {self.offset} bytes" if self.offset
                                            else ""))
        await self.abort(err)
        raise err

    async def interrupted(self) -> None:
        """The writer went away without asking: keep the partial import for
        `import --resume` (its staging set stays invisible)."""
        if self.finished or self.failed or self.job is None or not self.job.active:
            return
        if self.verified:       # it was all there: the set is made, as if asked
            try:
                await self.end_of_input()
            except ArrayError:
                pass            # removed, with its event
            return
        try:
            await self._flush_pending(wait=True)
        except ArrayError as e:              # a background store had failed
            await self.abort(e)
            return
        self.buf.clear()
        self.job.pause()
        await self._checkpoint()
        self.event("warning", f"import job {self.job.id} interrupted at stream offset "
                   f"{self.offset}: resume with `fusearray import FILE --resume`, or "
                   f"cancel it with `cancel {self.job.id}`")
