"""Reference counts: what a collection frees without walking the maps.

Each pack's index row carries `refs`, the number of references to that
block or node from the pack's own metadata, and `counted`, set on a map
node whose entries are counted (catalogue.py, blocks table):

    refs(x) = the map roots equal to x among the pack's volumes that are
              not being copied (vol.source is None), with multiplicity
            + the entries equal to x in the pack's counted nodes, with
              multiplicity (reachable or not yet freed).

Nodes are content addressed and immutable, so a node's entries are
counted once, when it is first stored as a node (`count_nodes`), and
uncounted once, when it is freed (`free`), as in Rodeh's B-tree
reference counting (btrfs): a snapshot adds one reference to a root, a
write adds the new path's nodes, and freeing a root frees only what no
other root shares (the cascade stops at the first node still referenced).
So a collection costs what it frees, not what is stored, and a snapshot
delete touches only the nodes and blocks that snapshot alone held.

What is never freed although its count is 0 (`protect`): the blocks in
the volumes' overlays (flushed, not merged into a map yet), the roots an
export pinned, and everything a volume being copied reaches (its own
pack's copy arrives uncounted: `count_nodes` counts nothing for it, and
the copy's end counts its map: `adopt`).

Invariants (fsck checks them): every entry of a counted node is stored in
the pack; a counted node's child nodes are counted; refs is as above. A
count too high leaks space (fsck says so); one too low would lose data,
so every change goes through this module, and the counts change in the
same transaction as the rows and roots they describe.

The counts of an array made before them are made at its first open
(`recount`: one walk of every map, the same as a full collection once).

Owns (trio thread, commit lock): `roots`, the roots counted so far
(pack name, root id) -> multiplicity. The changes themselves are the
index's pending changes (store.index.BlockIndex.ref / mark_counted),
committed with it.
"""
import collections
import logging

import trio

from . import ZERO_ID, maps
from .errors import ArrayError, ioerror

log = logging.getLogger("fusearray")

#: freed nodes read, and their entries' counts looked up, at a time
FREE_BATCH = 64


def entries(node: bytes) -> collections.Counter:
    """The non-zero entries of a map node, with multiplicity."""
    mv = memoryview(node)
    c = collections.Counter(bytes(mv[i:i + maps.ENTRY])
                            for i in range(0, len(node), maps.ENTRY))
    c.pop(ZERO_ID, None)
    return c


def counted_roots(volumes) -> collections.Counter:
    """The roots the counts include: of each volume not being copied."""
    return collections.Counter((v.pack.name, v.root) for v in volumes
                               if v.source is None and v.root != ZERO_ID
                               and not v.deleted)


def at(node: bytes, slots) -> collections.Counter:
    """The non-zero entries of `node` at `slots`, with multiplicity."""
    c = collections.Counter(bytes(node[i * maps.ENTRY:(i + 1) * maps.ENTRY]) for i in slots)
    c.pop(ZERO_ID, None)
    return c


class Debts:
    """One pack's nodes counted from the node they replaced, until the
    commit (see RefCounts.count_nodes): `debt` new -> (old, slots): the
    new node's entries at `slots` are counted, the others are owed (they
    equal the old node's there); `debtor` old -> new."""

    def __init__(self):
        self.debt: dict = {}
        self.debtor: dict = {}

    def owe(self, new: bytes, old: bytes, slots) -> None:
        self.debt[new], self.debtor[old] = (old, frozenset(slots)), new

    def paid(self, new: bytes) -> None:
        """`new` counts all its entries now."""
        old, _ = self.debt.pop(new)
        del self.debtor[old]

    def freed(self, x: bytes, data: bytes) -> collections.Counter:
        """Node `x` (bytes `data`) is freed: the references to take back
        (what the counts hold for x, less what passes to the node that owes
        x's entries, which then owes what x owed, or nothing)."""
        new = self.debtor.pop(x, None)
        mine = self.debt.pop(x, None)
        if mine is not None and self.debtor.get(mine[0]) == x:
            del self.debtor[mine[0]]
        if new is not None:
            _, theirs = self.debt[new]
            if mine is None:            # x counted whole: new is now, by x's counts
                del self.debt[new]
                return at(data, theirs)
            older, own = mine           # x counted at `own`: new owes what x owed
            self.debt[new] = (older, own | theirs)
            self.debtor[older] = new
            return at(data, own & theirs)
        if mine is not None:
            return at(data, mine[1])
        return entries(data)


class RefCounts:
    """The reference counts' bookkeeping (see the module docstring)."""

    def __init__(self, packs: dict, volumes: dict, *, read_locs, lookups, nodes):
        self.packs = packs            # the coordinator's: name -> Pack
        self.volumes = volumes        # the coordinator's: vid -> Volume
        self.read_locs = read_locs    # reader.read_locs(pack, ids, locs)
        self.lookups = lookups        # reader.lookups(pack, ids): locations, off the loop
        self.nodes = nodes            # the map node cache (reader.NodeCache)
        self.roots: collections.Counter = collections.Counter()
        self.books: dict = {}         # pack name -> Debts (count_nodes, settle)

    # ---- open ----------------------------------------------------------------------
    def load(self) -> None:
        """The roots the committed counts include (at open)."""
        self.roots = counted_roots(self.volumes.values())

    async def recount(self, loader) -> dict:
        """The counts of every pack from scratch: one walk of every map
        (an array made before the counts existed). Returns the catalogue
        rows {pack: [(refs, counted, id)]} (Changes.recount); the caller
        commits them. RAM: one entry per stored block, once."""
        refs = {name: collections.Counter() for name in self.packs}
        counted = {name: set() for name in self.packs}
        for vol in list(self.volumes.values()):
            if vol.source is not None or vol.deleted or vol.root == ZERO_ID:
                continue
            name = vol.pack.name
            refs[name][vol.root] += 1
            stack = [(vol.root, vol.height - 1)]
            load = loader(vol)
            while stack:
                nid, level = stack.pop()
                if nid in counted[name]:
                    continue
                counted[name].add(nid)
                node = await load(nid)
                kids = entries(node)
                refs[name].update(kids)
                if level > 0:
                    stack.extend((k, level - 1) for k in kids)
                await trio.sleep(0)
        self.load()
        return {name: [(refs[name][b], int(b in counted[name]), b)
                       for b in set(refs[name]) | counted[name]]
                for name in self.packs}

    # ---- what adds and removes references ------------------------------------------
    def update_roots(self) -> None:
        """The volumes' roots as they are now counted: a root gained is a
        reference more, one lost a reference less (to commit with the
        volume rows that say so). Caller holds the commit lock."""
        now = counted_roots(self.volumes.values())
        for key in set(now) | set(self.roots):
            d = now[key] - self.roots[key]
            name, root = key
            if d and name in self.packs:
                self.packs[name].ref(root, d)
        self.roots = now

    async def count_nodes(self, vol, nodes, pairs=()) -> None:
        """`nodes` [(id, bytes)] were just emitted for `vol`'s map and are
        stored in its pack: those not counted there yet are counted now
        (each entry a reference). Nothing for a volume being copied (its
        map is counted when the copy ends: `adopt`). Caller holds the
        commit lock.

        A node that replaced a counted one (`pairs` from maps.apply: old
        id, new id, slots written) is counted from it: only its changed
        entries now, and a debt of the old node's entries (`debts`),
        settled for nothing if the old node is freed before the commit
        (the usual case: a LUN's path rewritten by a merge; its entries'
        +1 and -1 would cancel), else paid at the commit (`settle`: the
        old node is shared, e.g. with a snapshot)."""
        if vol.source is not None or not nodes:
            return
        pack = vol.pack
        todo = dict(nodes)
        pred = {new: (old, slots) for old, new, slots in pairs if new in todo}
        now = await trio.to_thread.run_sync(
            pack.refs_blocking, list(todo) + [old for old, _ in pred.values()])
        book = self.books.setdefault(pack.name, Debts())
        for nid, data in todo.items():
            r = now.get(nid)
            if r is None:
                raise ioerror(f"map node {nid.hex()} is not stored in pack "
                              f"{pack.name}: its references cannot be counted")
            if r[1]:
                continue
            old, slots = pred.get(nid, (None, ()))
            if (old is not None and old != nid and now.get(old, (0, False))[1]
                    and old not in book.debtor):
                pack.mark_counted(nid)
                for kid, n in at(data, set(slots)).items():
                    pack.ref(kid, n)
                book.owe(nid, old, slots)
            else:
                self._count(pack, nid, data)

    async def settle(self) -> None:
        """Before a commit's transaction: the debts still open are paid
        (each old node's entries counted for the new node that owes them),
        so that what is written is the whole count. Caller holds the commit
        lock."""
        for name, book in list(self.books.items()):
            pack = self.packs.get(name)
            if pack is None:
                self.books.pop(name)
                continue
            for nid, (old, slots) in list(book.debt.items()):
                data = self.nodes.get(old)
                if data is None:
                    loc = (await self.lookups(pack, [old]))[0]
                    if loc is None:
                        raise ioerror(f"map node {old.hex()} of pack {name} is gone before "
                                      "its entries were counted for the node that replaced it")
                    data = bytes((await self.read_locs(pack, [old], [loc]))[0])
                owed = entries(data)
                owed.subtract(at(data, slots))
                for kid, n in owed.items():
                    if n:
                        pack.ref(kid, n)
                book.paid(nid)

    @staticmethod
    def _count(pack, nid: bytes, data: bytes) -> None:
        pack.mark_counted(nid)
        for kid, n in entries(data).items():
            pack.ref(kid, n)

    async def adopt(self, vol, loader) -> None:
        """Volume `vol`'s copy into its own pack ended (its source is
        cleared next): count its map's nodes that are not counted yet (a
        counted node's subtree is counted already). Every entry of those
        nodes is checked to be in the pack before anything is counted: a
        copy that missed something fails here and counts nothing. Caller
        holds the commit lock and then calls update_roots (its root)."""
        pack = vol.pack
        load = loader(vol)
        todo = []
        level_nodes = [vol.root] if vol.root != ZERO_ID else []
        level = vol.height - 1
        while level_nodes:
            now = await trio.to_thread.run_sync(pack.refs_blocking, level_nodes)
            nxt = []
            for nid in level_nodes:
                if nid not in now:
                    raise ioerror(f"map node {nid.hex()} of {vol.path} is not in pack "
                                  f"{pack.name} at the end of its copy")
                if now[nid][1]:
                    continue
                data = await load(nid)
                kids = list(entries(data))
                have = await trio.to_thread.run_sync(pack.refs_blocking, kids)
                if len(have) != len(kids):
                    raise ioerror(f"block {next(k for k in kids if k not in have).hex()} "
                                  f"of {vol.path} is not in pack {pack.name} at the end "
                                  "of its copy")
                todo.append((nid, data))
                if level > 0:
                    nxt += kids
            level_nodes = list(dict.fromkeys(nxt))
            level -= 1
        for nid, data in todo:
            self._count(pack, nid, data)

    # ---- the collection ------------------------------------------------------------
    async def free(self, pack, protect: set, eager: bool = False) -> list:
        """Every entry [(id, loc)] of `pack` with no reference and not in
        `protect`, with what freeing it leaves without one (a freed
        counted node's entries lose a reference each: the cascade). The
        caller drops them and commits. Caller holds the commit lock.

        eager: only what the changes since the last commit may have left
        unreferenced (rows added, and ids that lost references: a commit's
        own garbage, e.g. the nodes a merge replaced), not the committed
        rows with no reference (the collection's). Either way, an entry of
        a freed node is looked at again only if its count went down since
        the last commit or it was a candidate to begin with: an entry
        whose count did not fall cannot have reached 0 (the +1 of a new
        node and the -1 of the node it replaced cancel out, and neither is
        written to the catalogue)."""
        start = pack.changed_since_commit()
        if not eager:
            start |= set(await trio.to_thread.run_sync(pack.unreferenced_blocking))
        queue = list(start)
        freed: dict = {}
        while queue:
            batch, queue = queue[:FREE_BATCH * 16], queue[FREE_BATCH * 16:]
            batch = [b for b in dict.fromkeys(batch) if b not in freed and b not in protect]
            now = await trio.to_thread.run_sync(pack.refs_blocking, batch)
            zero = [bid for bid, (r, _) in now.items() if r == 0]
            nodes = []
            for bid, loc in zip(zero, await self.lookups(pack, zero)):
                k = now[bid][1]
                if loc is None:
                    continue
                if k:
                    nodes.append((bid, loc))
                else:
                    freed[bid] = loc
            book = self.books.get(pack.name) or Debts()
            lost = collections.Counter()
            for i in range(0, len(nodes), FREE_BATCH):
                part = nodes[i:i + FREE_BATCH]
                missing = [(b, loc) for b, loc in part if self.nodes.get(b) is None]
                read = {}
                if missing:
                    try:
                        got = await self.read_locs(pack, [b for b, _ in missing],
                                                   [loc for _, loc in missing])
                        read = {b: bytes(d) for (b, _), d in zip(missing, got)}
                    except ArrayError as e:
                        # its entries' counts cannot be lowered: it stays
                        # (a leak, never a loss); a later collection retries
                        log.warning("collection: pack %s: %d unreferenced map node(s) "
                                    "kept, unreadable: %s", pack.name, len(missing), e)
                for b, loc in part:
                    data = self.nodes.get(b) or read.get(b)
                    if data is None:
                        continue
                    freed[b] = loc
                    lost.update(book.freed(b, data))
            for kid, n in lost.items():
                if n:
                    pack.ref(kid, -n)
            # the entries that may be without a reference now, in turn
            queue += [k for k, n in lost.items() if n > 0 and k not in freed
                      and (pack.count_change(k) < 0 or k in start)]
            await trio.sleep(0)
        return list(freed.items())
