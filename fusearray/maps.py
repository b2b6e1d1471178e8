"""Copy-on-write block maps: a radix tree of block ids.

A map sends a block number to a 16-byte block id (ZERO_ID: unwritten or
zero). It is a tree of fixed-size nodes of FANOUT ids each; a leaf (level 0)
holds block ids, a node at level l > 0 holds the ids of its children, each
covering FANOUT**l blocks. A map is named by (root id, height).

Nodes are content addressed and immutable: a node's id is the keyed hash of
its bytes and it is stored in the pack like any block. So
- a snapshot copies a root id (O(1), whatever the LUN size);
- an update writes new nodes on the path to the root, never in place;
- two maps share every unchanged subtree, and diff by comparing ids;
- an all-zero subtree is ZERO_ID and takes no space.

The functions here are pure over two callbacks from the array: `load(id)`
(async, returns a node's bytes) and `emit(id, bytes)` (records a new node to
be stored). They never touch files or the catalogue.
"""
import trio

from . import ZERO_ID

FANOUT = 1024
ENTRY = 16
NODE_SIZE = FANOUT * ENTRY
ZERO_NODE = bytes(NODE_SIZE)


def height_for(nblocks: int) -> int:
    """Smallest height whose tree covers `nblocks` blocks."""
    h, cap = 1, FANOUT
    while cap < nblocks:
        h += 1
        cap *= FANOUT
    return h


def child(node, i: int) -> bytes:
    return bytes(node[i * ENTRY:(i + 1) * ENTRY])


def lookup_nowait(nodes: dict, root: bytes, height: int, bno: int):
    """The block id of `bno`, or None if a node on the path is not in
    `nodes` (then use `lookup`)."""
    nid = root
    for level in range(height - 1, -1, -1):
        if nid == ZERO_ID:
            return ZERO_ID
        node = nodes.get(nid)
        if node is None:
            return None
        i = (bno // FANOUT ** level) % FANOUT * ENTRY
        nid = node[i:i + ENTRY]
    return bytes(nid)


def ids_nowait(nodes: dict, root: bytes, height: int, first: int, last: int) -> list:
    """lookup_nowait for the run of blocks [first, last], walking to each
    leaf once (a 1 MiB read is 16 blocks of one leaf); None where a node is
    not in `nodes`."""
    out = []
    bno = first
    while bno <= last:
        base = bno - bno % FANOUT
        stop = min(last, base + FANOUT - 1)
        nid, node = root, None
        for level in range(height - 1, 0, -1):
            if nid == ZERO_ID:
                break
            node = nodes.get(nid)
            if node is None:
                nid = None
                break
            i = (bno // FANOUT ** level) % FANOUT * ENTRY
            nid = node[i:i + ENTRY]
        leaf = None if nid is None or nid == ZERO_ID else nodes.get(nid)
        if leaf is not None:
            out += [bytes(leaf[(b - base) * ENTRY:(b - base + 1) * ENTRY])
                    for b in range(bno, stop + 1)]
        else:
            out += [ZERO_ID if nid == ZERO_ID else None] * (stop - bno + 1)
        bno = stop + 1
    return out


async def lookup(root: bytes, height: int, bno: int, load) -> bytes:
    nid = root
    for level in range(height - 1, -1, -1):
        if nid == ZERO_ID:
            return ZERO_ID
        node = await load(nid)
        i = (bno // FANOUT ** level) % FANOUT * ENTRY
        nid = node[i:i + ENTRY]
    return bytes(nid)


def _seal(node: bytearray, hasher, emit) -> bytes:
    if node == ZERO_NODE:
        return ZERO_ID
    data = bytes(node)
    nid = hasher.block_id(data)
    emit(nid, data)
    return nid


async def apply(root: bytes, height: int, updates: dict, load, emit, hasher,
                stats: dict | None = None, pairs: list | None = None):
    """Write `updates` {bno: id} into the map. Returns (new root, change in
    the number of non-zero entries). `stats["replaced"]` counts non-zero
    entries that were overwritten (what may have become garbage). `pairs`
    (a list) receives (old node id, new node id, [slots written]) for each
    node rewritten into another (refs.py counts the new one from the old)."""
    st = stats if stats is not None else {}
    st.setdefault("replaced", 0)
    st["pairs"] = pairs
    if not updates:
        return root, 0
    items = sorted(updates.items())
    return await _apply(root, height - 1, 0, items, load, emit, hasher, st)


async def _apply(nid, level, base, items, load, emit, hasher, st):
    node = bytearray(ZERO_NODE) if nid == ZERO_ID else bytearray(await load(nid))
    delta = 0
    slots = []
    if level == 0:
        for bno, bid in items:
            slots.append(bno - base)
            i = (bno - base) * ENTRY
            old = node[i:i + ENTRY]
            was_zero = old == ZERO_ID
            delta += was_zero - (bid == ZERO_ID)
            if not was_zero and old != bid:
                st["replaced"] += 1
            node[i:i + ENTRY] = bid
    else:
        span = FANOUT ** level
        start = 0
        while start < len(items):
            ci = (items[start][0] - base) // span
            end = start
            while end < len(items) and (items[end][0] - base) // span == ci:
                end += 1
            new, d = await _apply(child(node, ci), level - 1, base + ci * span,
                                  items[start:end], load, emit, hasher, st)
            node[ci * ENTRY:(ci + 1) * ENTRY] = new
            slots.append(ci)
            delta += d
            start = end
    new = _seal(node, hasher, emit)
    if st.get("pairs") is not None and nid != ZERO_ID and new not in (nid, ZERO_ID):
        st["pairs"].append((bytes(nid), new, slots))
    return new, delta


def grow(root: bytes, height: int, new_height: int, emit, hasher) -> bytes:
    """Raise the tree to `new_height`: the old root becomes child 0."""
    while height < new_height:
        if root != ZERO_ID:
            node = bytearray(ZERO_NODE)
            node[0:ENTRY] = root
            root = _seal(node, hasher, emit)
        height += 1
    return root


async def count(nid: bytes, level: int, load) -> int:
    """Non-zero block entries below node `nid` at `level`."""
    if nid == ZERO_ID:
        return 0
    node = await load(nid)
    if level == 0:
        return sum(1 for i in range(FANOUT) if node[i * ENTRY:(i + 1) * ENTRY] != ZERO_ID)
    total = 0
    for i in range(FANOUT):
        total += await count(child(node, i), level - 1, load)
    return total


async def trim(root: bytes, height: int, start: int, load, emit, hasher):
    """Zero every entry at block number >= `start`. Returns (root, delta)."""
    return await _trim(root, height - 1, 0, start, load, emit, hasher)


async def _trim(nid, level, base, start, load, emit, hasher):
    if nid == ZERO_ID:
        return ZERO_ID, 0
    if base >= start:
        return ZERO_ID, -await count(nid, level, load)
    span = FANOUT ** level
    if base + FANOUT * span <= start:
        return nid, 0
    node = bytearray(await load(nid))
    delta = 0
    for ci in range(FANOUT):
        cbase = base + ci * span
        if cbase + span <= start:
            continue
        old = child(node, ci)
        if old == ZERO_ID:
            continue
        if level == 0:
            new, d = ZERO_ID, -1
        else:
            new, d = await _trim(old, level - 1, cbase, start, load, emit, hasher)
        node[ci * ENTRY:(ci + 1) * ENTRY] = new
        delta += d
    return _seal(node, hasher, emit), delta


async def mark(root: bytes, height: int, load, live: set, seen_nodes: set) -> None:
    """Add every node id and block id reachable from the map to `live`.
    Subtrees already in `seen_nodes` (shared with another map) are skipped."""
    stack = [(root, height - 1)]
    walked = 0
    while stack:
        nid, level = stack.pop()
        if nid == ZERO_ID or nid in seen_nodes:
            continue
        seen_nodes.add(nid)
        live.add(nid)
        node = await load(nid)
        walked += 1
        if walked % 16 == 0:
            await trio.sleep(0)     # a big map: let I/O in between
        ids = [node[i:i + ENTRY] for i in range(0, NODE_SIZE, ENTRY)]
        if level == 0:
            live.update(bytes(b) for b in ids if b != ZERO_ID)
        else:
            stack.extend((bytes(b), level - 1) for b in ids if b != ZERO_ID)
    live.discard(ZERO_ID)


async def entries(root: bytes, height: int, load, start: int = 0):
    """Yield (bno, id) for every non-zero entry at or after `start`, in order."""
    async for item in _entries(root, height - 1, 0, load, start):
        yield item


async def _entries(nid, level, base, load, start):
    if nid == ZERO_ID:
        return
    span = FANOUT ** level
    if base + FANOUT * span <= start:
        return
    node = await load(nid)
    for i in range(FANOUT):
        bid = node[i * ENTRY:(i + 1) * ENTRY]
        if bid == ZERO_ID or base + (i + 1) * span <= start:
            continue
        if level == 0:
            yield base + i, bytes(bid)
        else:
            async for item in _entries(bytes(bid), level - 1, base + i * span, load, start):
                yield item


async def diff(old_root: bytes, new_root: bytes, height: int, load_old, load_new):
    """Yield (bno, new id) for every entry where two maps of the same height
    differ (new id may be ZERO_ID). Subtrees with equal ids are skipped
    without being read: the cost follows the change, not the size."""
    async for item in _diff(old_root, new_root, height - 1, 0, load_old, load_new):
        yield item


async def _diff(a, b, level, base, load_a, load_b):
    if a == b:
        return
    if a == ZERO_ID:
        async for bno, bid in _entries(b, level, base, load_b, 0):
            yield bno, bid
        return
    if b == ZERO_ID:
        async for bno, _ in _entries(a, level, base, load_a, 0):
            yield bno, ZERO_ID
        return
    node_a, node_b = await load_a(a), await load_b(b)
    span = FANOUT ** level
    for i in range(FANOUT):
        ca = bytes(node_a[i * ENTRY:(i + 1) * ENTRY])
        cb = bytes(node_b[i * ENTRY:(i + 1) * ENTRY])
        if ca == cb:
            continue
        if level == 0:
            yield base + i, cb
        else:
            async for item in _diff(ca, cb, level - 1, base + i * span, load_a, load_b):
                yield item
