"""Raw librados, the baseline of the bench's rados group: writes or reads
the bytes a LUN pass moves, in the shape the rados pack issued them (the
trace of tools/benchmarks/radostrace), straight through the `rados`
binding, no fusearray code on the way. Run as a process of its own (like
the daemon): `python rawrados.py JSON` with JSON
  {"conf", "pool", "namespace", "op": "write"|"read", "bytes",
   "object": object size, "pieces": [RADOS op sizes of one call],
   "threads": calls in flight, "prefix": object name prefix,
   "objects": number of objects to read (a read pass reads what the
   last write pass wrote)}
A call is what RadosMedium.pwritev/preadv does with it: one piece as
one synchronous write/read; several as aio_write/aio_read all in flight,
then waited for. Calls go in order through objects of `object` bytes
(the last call of an object shorter if the object ends, as an append
rolls to a new segment), `threads` threads each with objects of its own.
Prints {"seconds", "cpu" (this process's CPU seconds meanwhile, librados's
threads with it), "osd_cpu" (that of the process "osd_pid" of the spec,
if given), "bytes", "objects"} as JSON.

With "op": "ops" it measures instead what docs/scale-out.md builds on,
each a few seconds at most: small RADOS ops (4 KiB writes and reads, one
and 16 in flight), an omap update (one key), the renewal of an exclusive
`cls_lock` lock with a lease (what a mount's lease would cost), and mon
commands: a read (`health`) and a map change (`osd blocklist add` of an
address nobody uses, then `rm`: what fencing a dead host costs). Prints
{name: {"ms": median latency} or {"ops_s": ops per second}}.
"""
import json
import os
import sys
import threading
import time

import rados

#: librados.h LIBRADOS_LOCK_FLAG_MAY_RENEW (the binding has no name for it)
LOCK_FLAG_MAY_RENEW = 1


def shaped(total, pieces):
    """A call of `total` bytes cut as `pieces` cuts a full call (the last
    pieces dropped or shortened)."""
    out, left = [], total
    for p in pieces:
        if left <= 0:
            break
        out.append(min(p, left))
        left -= out[-1]
    if left > 0:
        out.append(left)
    return out


def run(spec):
    c = rados.Rados(conffile=spec['conf'])
    c.connect()
    try:
        io = c.open_ioctx(spec['pool'])
        io.set_namespace(spec['namespace'])
        try:
            for name in spec.get('remove', ()):     # an earlier pass's objects, untimed
                for o in [o.key for o in io.list_objects() if o.key.startswith(name + '.')]:
                    io.remove_object(o)
            if spec['op'] == 'ops':
                return ops(c, io, spec)
            return bench(io, spec)
        finally:
            io.close()
    finally:
        c.shutdown()


def _median_ms(fn, n):
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    times.sort()
    return {'ms': times[len(times) // 2] * 1e3, 'n': n}


def _rate(io, op, n, depth, data):
    """`n` 4 KiB aio ops, `depth` in flight, over `depth` objects: ops/s."""
    sem = threading.Semaphore(depth)
    left, lk, done = [n], threading.Lock(), threading.Event()

    def cb(comp, *_):
        sem.release()
        with lk:
            left[0] -= 1
            if not left[0]:
                done.set()
    start = time.perf_counter()
    for i in range(n):
        sem.acquire()
        name, off = f'ops.{i % depth}', (i // depth % 256) * len(data)
        if op == 'write':
            io.aio_write(name, data, off, oncomplete=cb)
        else:
            io.aio_read(name, len(data), off, cb)
    done.wait()
    return {'ops_s': n / (time.perf_counter() - start), 'n': n, 'in_flight': depth}


def ops(c, io, spec):
    data = os.urandom(4096)
    out = {}
    out['write 4 KiB, 1 in flight'] = _median_ms(
        lambda i: io.write('ops.0', data, (i % 256) * 4096), 300)
    out['read 4 KiB, 1 in flight'] = _median_ms(
        lambda i: io.read('ops.0', 4096, (i % 256) * 4096), 300)
    out['write 4 KiB, 16 in flight'] = _rate(io, 'write', 4000, 16, data)
    out['read 4 KiB, 16 in flight'] = _rate(io, 'read', 4000, 16, data)

    def omap(i):
        with rados.WriteOpCtx() as op:
            io.set_omap(op, (f'k{i % 64}',), (data[:100],))
            io.operate_write_op(op, 'ops.omap')
    out['omap set, one 100-byte key'] = _median_ms(omap, 200)
    lockobj = f'ops.lock.{os.getpid()}'   # a lease a crashed run left runs out alone
    io.lock_exclusive(lockobj, 'fusearray', 'bench', duration=30)
    # a renewal: the same lock, name and cookie again with the renew flag
    # (LIBRADOS_LOCK_FLAG_MAY_RENEW = 1; without it cls_lock says EEXIST)
    out['cls_lock exclusive renewal (30 s lease)'] = _median_ms(
        lambda i: io.lock_exclusive(lockobj, 'fusearray', 'bench', duration=30,
                                    flags=LOCK_FLAG_MAY_RENEW), 200)
    io.unlock(lockobj, 'fusearray', 'bench')

    def mon(cmd):
        ret, _, err = c.mon_command(json.dumps(cmd), b'')
        if ret:
            raise SystemExit(f'mon command {cmd}: {ret} {err}')
    out['mon command, read (health)'] = _median_ms(
        lambda i: mon({'prefix': 'health', 'format': 'json'}), 50)
    addr = '192.0.2.1:0/{}'       # TEST-NET-1: nobody's address

    def fence(i):
        mon({'prefix': 'osd blocklist', 'blocklistop': 'add', 'addr': addr.format(i)})
    out['mon command, map change (osd blocklist add)'] = _median_ms(fence, 20)
    for i in range(20):
        mon({'prefix': 'osd blocklist', 'blocklistop': 'rm', 'addr': addr.format(i)})
    for name in [f'ops.{i}' for i in range(16)] + ['ops.omap', lockobj]:
        try:
            io.remove_object(name)
        except rados.ObjectNotFound:
            pass
    return out


def proc_cpu(pid):
    """CPU seconds of process `pid` so far (0 if none named)."""
    if not pid:
        return 0.0
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def bench(io, spec):
    total, obj_size, pieces = spec['bytes'], spec['object'], spec['pieces']
    call = sum(pieces)
    threads = max(1, spec['threads'])
    write = spec['op'] == 'write'
    data = os.urandom(max(pieces))
    # the objects, dealt to the threads: a write pass makes as many as it
    # fills; a read pass reads those the write pass left
    nobj = -(-total // obj_size) if write else spec['objects']
    names = [f"{spec['prefix']}.{i:08d}" for i in range(nobj)]
    share = [names[t::threads] for t in range(threads)]
    per_thread = [total // threads + (t < total % threads) for t in range(threads)]
    errors = []

    def one_call(name, off, n):
        cut = shaped(n, pieces)
        if len(cut) == 1:
            if write:
                io.write(name, data[:n], off)
            else:
                got = io.read(name, n, off)
                if len(got) != n:
                    raise IOError(f'short read {len(got)} of {n} at {off} of {name}')
            return
        if write:
            comps, pos = [], off
            for p in cut:
                comps.append(io.aio_write(name, data[:p], pos))
                pos += p
            for cp in comps:
                cp.wait_for_complete()
                if cp.get_return_value() < 0:
                    raise IOError(f'aio_write: {cp.get_return_value()}')
            return
        left, lk, done = [len(cut)], threading.Lock(), threading.Event()

        def cb(comp, buf):
            with lk:
                left[0] -= 1
                if not left[0]:
                    done.set()
        pos = off
        for p in cut:
            io.aio_read(name, p, pos, cb)
            pos += p
        done.wait()

    def worker(t):
        try:
            todo = per_thread[t]
            for name in share[t]:
                off = 0
                while off < obj_size and todo > 0:
                    n = min(call, obj_size - off, todo)
                    one_call(name, off, n)
                    off += n
                    todo -= n
                if todo <= 0:
                    return
        except Exception as e:     # noqa: BLE001  (said in the output)
            errors.append(f'{type(e).__name__}: {e}')

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    osd = spec.get('osd_pid')
    start, cpu, osd0 = time.perf_counter(), time.process_time(), proc_cpu(osd)
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    osd_cpu = proc_cpu(osd) - osd0
    if errors:
        raise SystemExit('raw librados: ' + '; '.join(errors[:3]))
    return {'seconds': seconds, 'cpu': cpu, 'osd_cpu': osd_cpu, 'bytes': total,
            'objects': nobj}


if __name__ == '__main__':
    print(json.dumps(run(json.loads(sys.argv[1]))))
