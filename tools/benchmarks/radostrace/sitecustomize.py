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

The cost: a lock, a clock read and a few dict updates per call and per
op, a few microseconds against a RADOS round trip of 100 us or more.
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
    stats = {}
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

    proxies = {}
    real_ioctx = R.RadosMedium._ioctx

    def _ioctx(self):
        io = real_ioctx(self)
        p = proxies.get(id(io))
        if p is None or p._io is not io:
            p = proxies[id(io)] = Proxy(io)
        return p

    def wrap(kind, fn):
        def traced(self, h, iov, off):
            n = sum(memoryview(b).nbytes for b in iov)
            with lock:
                state['inflight'] += 1
                if state['inflight'] == 1:
                    state['since'] = time.monotonic()
                k = state['inflight']
            local.ops = []
            t0 = time.perf_counter()
            try:
                return fn(self, h, iov, off)
            finally:
                ops, local.ops = local.ops, None
                shape = f'{n}:' + ','.join(f'{op}={m}' for op, m in ops)
                t0 = time.perf_counter() - t0
                with lock:
                    state['call_s'][kind] = state['call_s'].get(kind, 0.0) + t0
                    state['inflight'] -= 1
                    if not state['inflight']:
                        state['busy'] += time.monotonic() - state['since']
                    s = stats.setdefault(kind, {'calls': 0, 'bytes': 0, 'shapes': {},
                                                'inflight': {}})
                    s['calls'] += 1
                    s['bytes'] += n
                    s['shapes'][shape] = s['shapes'].get(shape, 0) + 1
                    s['inflight'][k] = s['inflight'].get(k, 0) + 1
        return traced

    R.RadosMedium._ioctx = _ioctx
    R.RadosMedium.pwritev = wrap('write', R.RadosMedium.pwritev)
    R.RadosMedium.preadv = wrap('read', R.RadosMedium.preadv)

    def dump():
        while True:
            time.sleep(0.5)
            with lock:
                snap = json.dumps({'stats': stats, 'busy': state['busy'],
                                   'call_s': state['call_s'],
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

