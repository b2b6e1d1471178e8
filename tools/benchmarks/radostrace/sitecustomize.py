"""Loaded at start-up by the fusearray daemon of the bench's rados group
only (its PYTHONPATH names this directory, $FUSEARRAY_RADOS_TRACE names
the output): records what the rados pack asks of RADOS, so the raw
librados baseline (tools/benchmarks/rawrados.py) can ask the same.

It wraps RadosMedium.pwritev and .preadv (one call of the store: a
segment append or a block read) and the I/O context they use (a proxy
whose write/aio_write/read/aio_read record each RADOS op's size), and
keeps, per kind of call: how many, their bytes, and their shapes
(call size, the sizes of the RADOS ops it issued) with a count each, and
how many calls of either kind were in flight when one started, and the
seconds spent inside the calls of each kind. A snapshot goes to
$FUSEARRAY_RADOS_TRACE.PID.json twice a second.

The cost, measured around a no-op call on the (loaded) bench VM: 6-9 us
per call (the wrapper, the I/O context proxy, two lock acquisitions, two
clock reads, a few dict updates), against a RADOS round trip of 100 us or
more: a 512 MiB read pass (8192 calls of 64 KiB) pays 50-75 ms of its ~2 s,
a write pass (~32 appends) nothing measurable. The rados LUN's read ratio
carries that 2-4 % against it.
"""
import json
import os
import threading
import time

_path = os.environ.get('FUSEARRAY_RADOS_TRACE')


def _install():
    from fusearray.store import rados as R
    from fusearray.store import segments

    lock = threading.Lock()
    local = threading.local()
    stats = {}              # kind -> {'calls', 'bytes', 'shapes': {(size, ops): n}, 'inflight'}
    state = {'inflight': 0, 'since': 0.0, 'busy': 0.0, 'call_s': {}}

    class Proxy:
        """An Ioctx whose data ops are recorded against the current call."""

        def __init__(self, io):
            self._io = io

        def __getattr__(self, name):
            return getattr(self._io, name)

        def _note(self, op, n):
            ops = getattr(local, 'ops', None)
            if ops is not None:
                ops.append((op, n))

        def write(self, obj, data, off=0):
            self._note('write', len(data))
            return self._io.write(obj, data, off)

        def aio_write(self, obj, data, off=0, *a, **kw):
            self._note('aio_write', len(data))
            return self._io.aio_write(obj, data, off, *a, **kw)

        def read(self, obj, length=8192, off=0):
            self._note('read', length)
            return self._io.read(obj, length, off)

        def aio_read(self, obj, length, off, *a, **kw):
            self._note('aio_read', length)
            return self._io.aio_read(obj, length, off, *a, **kw)

    def wrap(kind, fn):
        s = stats[kind] = {'calls': 0, 'bytes': 0, 'shapes': {}, 'inflight': {}}
        shapes, inflights = s['shapes'], s['inflight']

        def traced(self, h, iov, off):
            n = 0
            for b in iov:
                n += len(b) if type(b) is bytes else memoryview(b).nbytes
            ops = local.ops = []
            with lock:
                k = state['inflight'] = state['inflight'] + 1
                if k == 1:
                    state['since'] = t0 = time.perf_counter()
                else:
                    t0 = time.perf_counter()
            try:
                return fn(self, h, iov, off)
            finally:
                local.ops = None
                key = (n, tuple(ops))
                with lock:
                    t1 = time.perf_counter()
                    state['call_s'][kind] = state['call_s'].get(kind, 0.0) + t1 - t0
                    state['inflight'] -= 1
                    if not state['inflight']:
                        state['busy'] += t1 - state['since']
                    s['calls'] += 1
                    s['bytes'] += n
                    shapes[key] = shapes.get(key, 0) + 1
                    inflights[k] = inflights.get(k, 0) + 1
        return traced

    R.RadosMedium.wrap_ioctx = Proxy        # (its public hook: each context as opened)
    R.RadosMedium.pwritev = wrap('write', R.RadosMedium.pwritev)
    R.RadosMedium.preadv = wrap('read', R.RadosMedium.preadv)

    def dump():
        while True:
            time.sleep(0.5)
            with lock:
                out = {kind: {'calls': v['calls'], 'bytes': v['bytes'],
                              'shapes': dict(v['shapes']), 'inflight': dict(v['inflight'])}
                       for kind, v in stats.items() if v['calls']}
                busy, call_s = state['busy'], dict(state['call_s'])
            for v in out.values():      # 'SIZE:op=N,op=N' for the JSON
                v['shapes'] = {f'{n}:' + ','.join(f'{op}={m}' for op, m in ops): c
                               for (n, ops), c in v['shapes'].items()}
            snap = json.dumps({'stats': out, 'busy': busy, 'call_s': call_s,
                               'segment': segments.SEGMENT_LIMIT})
            tmp = f'{_path}.{os.getpid()}.tmp'
            try:
                with open(tmp, 'w') as f:
                    f.write(snap)
                os.replace(tmp, f'{_path}.{os.getpid()}.json')
            except OSError:
                pass

    threading.Thread(target=dump, name='rados-trace', daemon=True).start()


if _path:
    _install()

