/*
 * fusearray._accel: CPython accelerators (nothing to do with libfuse).
 *
 * - xor_into: dst ^= src at memory speed (RAID-5 parity, reconstruction).
 * - hash128_many, hash64_many, hash64_128_many: XXH3 block ids (keyed
 *   128-bit) and stream record hashes (64-bit) of a batch of buffers with
 *   the GIL released; the XXH3 code is compiled in from libxxhash-dev's
 *   header (_xxh3_impl.h), AVX2 where the CPU has it.
 * - verify_mapped: blocks checked where they lie in mapped segment files,
 *   under a SIGBUS guard (a file cut short from outside fails the block
 *   instead of killing the daemon).
 * - map_stream, populate: a stream file mapped for an import, zeros past
 *   its end if it is cut short meanwhile.
 *
 * Optional: setup.py builds it when it can; without it (or with
 * FUSEARRAY_NATIVE=0) fusearray.native hands out None and each caller runs
 * its pure-Python fallback (listed in fusearray/native.py). The hashing,
 * mapped verify and stream mapping need xxhash.h (HAVE_XXHASH).
 */
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* xor_into(dst, src): dst ^= src, byte for byte (RAID-5 parity and
 * reconstruction; Python's big-int XOR runs at ~250 MB/s, this at memory
 * speed). dst is a writable buffer at least as long as src. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
static void xor_bytes(unsigned char *d, const unsigned char *s, size_t n)
{
    /* a plain loop: the compiler vectorises it (-O3), in an AVX2 and a
     * baseline version picked at load by the CPU */
    for (size_t i = 0; i < n; i++)
        d[i] ^= s[i];
}

/* Below this, keep the GIL: a 64 KiB XOR takes a few microseconds, and
 * handing the GIL over and waiting to get it back can take milliseconds
 * when the FUSE thread is busy (RAID-5 appends XOR every 64 KiB chunk). */
#define XOR_NOGIL_MIN (1 << 20)

static PyObject *xor_into(PyObject *self, PyObject *args)
{
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "w*y*", &dst, &src))
        return NULL;
    if (dst.len < src.len) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "xor_into: dst is shorter than src");
        return NULL;
    }
    if (src.len >= XOR_NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        xor_bytes(dst.buf, src.buf, (size_t)src.len);
        Py_END_ALLOW_THREADS
    } else {
        xor_bytes(dst.buf, src.buf, (size_t)src.len);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

#ifdef HAVE_XXHASH
typedef void (*xxh3_128_fn)(const void *, size_t, unsigned long long, unsigned char *);
typedef void (*xxh3_64_fn)(const void *, size_t, unsigned char *);
typedef void (*xxh3_pieces_fn)(const void *const *, const size_t *, size_t,
                               unsigned long long, unsigned char *);
#define PIECES_MAX 64      /* pieces of one block verify_mapped takes */
void fa_xxh3_128_generic(const void *, size_t, unsigned long long, unsigned char *);
void fa_xxh3_64_generic(const void *, size_t, unsigned char *);
void fa_xxh3_128_pieces_generic(const void *const *, const size_t *, size_t,
                                unsigned long long, unsigned char *);
#if defined(__x86_64__) && defined(__GNUC__)
void fa_xxh3_128_avx2(const void *, size_t, unsigned long long, unsigned char *);
void fa_xxh3_64_avx2(const void *, size_t, unsigned char *);
void fa_xxh3_128_pieces_avx2(const void *const *, const size_t *, size_t,
                             unsigned long long, unsigned char *);
#endif

/* The XXH3-128 build for this CPU (AVX2 where it has it: twice as fast). */
static xxh3_128_fn xxh3_128(void)
{
    static xxh3_128_fn fn;
    if (!fn) {
        fn = fa_xxh3_128_generic;
#if defined(__x86_64__) && defined(__GNUC__)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2"))
            fn = fa_xxh3_128_avx2;
#endif
    }
    return fn;
}

static PyObject *xxh3_build(PyObject *self, PyObject *noargs)
{
    return PyUnicode_FromString(xxh3_128() == fa_xxh3_128_generic ? "generic" : "avx2");
}

/* Hash every buffer of `seq` with the GIL released: `width` 16 (XXH3-128
 * keyed with `seed`), 8 (XXH3-64, unseeded) or 24 (both, the 64 first:
 * one buffer after the other, so the second pass reads it from the CPU's
 * cache, not from memory), in the canonical
 * (big-endian) form python-xxhash's digests give; `generic` forces the
 * baseline build whatever the CPU (the tests check both). Returns a list
 * of bytes. */
static PyObject *hash_many(PyObject *seq, unsigned long long seed, int width, int generic)
{
    xxh3_128_fn h128 = generic ? fa_xxh3_128_generic : xxh3_128();
    xxh3_64_fn h64 = fa_xxh3_64_generic;
#if defined(__x86_64__) && defined(__GNUC__)
    if (!generic && h128 == fa_xxh3_128_avx2)
        h64 = fa_xxh3_64_avx2;
#endif
    PyObject *fast = PySequence_Fast(seq, "a sequence of buffers");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), got = 0;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    unsigned char *out = PyMem_Calloc(n ? n : 1, (size_t)width);
    PyObject *result = NULL;
    if (!views || !out) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &views[got],
                               PyBUF_SIMPLE) < 0)
            goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char *o = out + (size_t)width * i;
        if (width != 16)
            h64(views[i].buf, (size_t)views[i].len, o);
        if (width != 8)
            h128(views[i].buf, (size_t)views[i].len, seed, o + (width == 24 ? 8 : 0));
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)out + (size_t)width * i, width);
        if (!b) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, b);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(out);
    Py_DECREF(fast);
    return result;
}

/* (buffers, seed[, build]) -> hash_many of `width` (build 1: the generic code) */
static PyObject *seeded_hash_many(PyObject *args, int width)
{
    PyObject *seq;
    unsigned long long seed;
    int build = 0;
    if (!PyArg_ParseTuple(args, "OK|i", &seq, &seed, &build))
        return NULL;
    return hash_many(seq, seed, width, build == 1);
}

/* hash128_many(buffers, seed[, build]) -> [16-byte ids]: keyed XXH3-128
 * block ids. The flush thread hashes a whole batch while the FUSE thread
 * goes on taking requests. */
static PyObject *hash128_many(PyObject *self, PyObject *args)
{
    return seeded_hash_many(args, 16);
}

/* hash64_128_many(buffers, seed[, build]) -> [24 bytes: the XXH3-64 digest,
 * then the keyed XXH3-128 id]: an import checks each block against the
 * stream's hash and takes its id in one pass over the batch. */
static PyObject *hash64_128_many(PyObject *self, PyObject *args)
{
    return seeded_hash_many(args, 24);
}

/* hash64_many(buffers[, build]) -> [8-byte digests]: the stream's record
 * hashes (xxh3_64_digest), a batch at a time in a worker thread. */
static PyObject *hash64_many(PyObject *self, PyObject *args)
{
    PyObject *seq;
    int build = 0;
    if (!PyArg_ParseTuple(args, "O|i", &seq, &build))
        return NULL;
    return hash_many(seq, 0, 8, build == 1);
}

/*
 * Verifying blocks in place in mapped segment files.
 *
 * The store maps its segment files read-only and checks each block's hash
 * where it lies, so a read needs no copy before the reply's. A mapped file
 * that shrank under us (a disk's file truncated from outside) raises
 * SIGBUS on the first touch past its end, which would kill the daemon. So
 * the hashing runs under a guard: a SIGBUS in it jumps back here and the
 * block counts as failed (the caller reads it the ordinary way, which
 * reports and heals). A SIGBUS anywhere else goes to the handler that was
 * there before, or kills the process as it would have.
 */
static __thread sigjmp_buf *bus_guard __attribute__((tls_model("initial-exec")));
static struct sigaction bus_prev;
static pthread_once_t bus_once = PTHREAD_ONCE_INIT;
static int bus_ok;

/*
 * Stream files mapped for an import (map_stream). The importer parses,
 * hashes and appends the blocks straight from the mapping (no read copy).
 * If the file is cut short meanwhile, touching a page past its new end
 * raises SIGBUS, in Python's parsing or in a hashing thread alike: the
 * handler maps zeros over the rest of that mapping and returns, so the
 * bytes read as zeros, the blocks fail the stream's hashes and the import
 * fails as damaged, as it should. Slots hold [lo, hi) of each live
 * mapping; the handler only reads them (atomically).
 */
#define STREAM_SLOTS 16
static uintptr_t stream_lo[STREAM_SLOTS], stream_hi[STREAM_SLOTS];
static pthread_mutex_t stream_slots_lock = PTHREAD_MUTEX_INITIALIZER;
static uintptr_t bus_page = 4096;

static int stream_zero_fill(uintptr_t addr)
{
    for (int i = 0; i < STREAM_SLOTS; i++) {
        uintptr_t lo = __atomic_load_n(&stream_lo[i], __ATOMIC_ACQUIRE);
        uintptr_t hi = __atomic_load_n(&stream_hi[i], __ATOMIC_ACQUIRE);
        if (lo && addr >= lo && addr < hi) {
            uintptr_t at = addr & ~(bus_page - 1);
            int saved = errno;
            void *p = mmap((void *)at, hi - at, PROT_READ,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            errno = saved;
            return p != MAP_FAILED;
        }
    }
    return 0;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *jb = bus_guard;
    if (jb) {
        bus_guard = NULL;
        siglongjmp(*jb, 1);
    }
    if (si && stream_zero_fill((uintptr_t)si->si_addr))
        return;         /* the access is retried and reads zeros */
    if ((bus_prev.sa_flags & SA_SIGINFO) && bus_prev.sa_sigaction) {
        bus_prev.sa_sigaction(sig, si, uc);
    } else if (bus_prev.sa_handler != SIG_DFL && bus_prev.sa_handler != SIG_IGN) {
        bus_prev.sa_handler(sig);
    } else {
        signal(SIGBUS, SIG_DFL);    /* the fault repeats on return and kills us */
    }
}

static void bus_install(void)
{
    struct sigaction sa;
    bus_page = (uintptr_t)sysconf(_SC_PAGESIZE);
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    bus_ok = sigaction(SIGBUS, &sa, &bus_prev) == 0;
}

/* Are all pages under [p, p+n) in memory (mincore)? (bus_page is set:
 * verify_mapped installs the handler first) */
static int resident(const void *p, size_t n)
{
    const uintptr_t page = bus_page;
    unsigned char vec[256];
    uintptr_t a = (uintptr_t)p & ~(page - 1), end = (uintptr_t)p + n;
    while (a < end) {
        size_t pages = (end - a + page - 1) / page;
        if (pages > sizeof(vec))
            pages = sizeof(vec);
        if (mincore((void *)a, pages * page, vec) != 0)
            return 0;
        for (size_t i = 0; i < pages; i++)
            if (!(vec[i] & 1))
                return 0;
        a += pages * page;
    }
    return 1;
}

/* The XXH3-128 over pieces taken in order, for the build xxh3_128() chose. */
static xxh3_pieces_fn xxh3_128_pieces(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (xxh3_128() == fa_xxh3_128_avx2)
        return fa_xxh3_128_pieces_avx2;
#endif
    return fa_xxh3_128_pieces_generic;
}

/* Block i lies in the pieces bufs[first[i]], ... bufs[first[i+1] - 1]:
 * hash it (one piece, or the pieces in order as one) and compare it with
 * ids[i], setting bad[i]; a SIGBUS marks the block it hit and goes on with
 * the next. */
static void verify_guarded(Py_buffer *bufs, const Py_ssize_t *first, Py_buffer *ids,
                           Py_ssize_t n, unsigned long long seed, int check_resident,
                           char *bad)
{
    xxh3_128_fn h128 = xxh3_128();
    xxh3_pieces_fn hpieces = xxh3_128_pieces();
    const void *ptrs[PIECES_MAX];
    size_t lens[PIECES_MAX];
    sigjmp_buf jb;
    volatile Py_ssize_t i = 0;
    unsigned char out[16];
    if (sigsetjmp(jb, 1)) {
        bad[i] = 1;     /* the block that faulted */
        i++;
    }
    for (; i < n; i++) {
        Py_ssize_t a = first[i], m = first[i + 1] - a;
        int ok = m >= 1 && m <= PIECES_MAX;
        for (Py_ssize_t j = 0; ok && j < m; j++) {
            ptrs[j] = bufs[a + j].buf;
            lens[j] = (size_t)bufs[a + j].len;
            ok = !check_resident || resident(ptrs[j], lens[j]);
        }
        if (!ok) {
            bad[i] = 1;
            continue;
        }
        bus_guard = &jb;
        if (m == 1)
            h128(ptrs[0], lens[0], seed, out);
        else
            hpieces(ptrs, lens, (size_t)m, seed, out);
        bus_guard = NULL;
        bad[i] = ids[i].len != 16 || memcmp(out, ids[i].buf, 16) != 0;
    }
}

/* verify_mapped(views, ids, seed, check_resident) -> [indexes that failed]:
 * each view (of a mapped file), or tuple of views (a block in pieces, up to
 * PIECES_MAX, hashed in order as one), hashed under the SIGBUS guard and
 * compared with its id; with check_resident, a block whose pages are not
 * all in memory fails without being touched (a page fault there would
 * wait for the disk on the event loop). */
static PyObject *verify_mapped(PyObject *self, PyObject *args)
{
    PyObject *vseq, *iseq, *result = NULL;
    unsigned long long seed;
    int check_resident;
    if (!PyArg_ParseTuple(args, "OOKp", &vseq, &iseq, &seed, &check_resident))
        return NULL;
    pthread_once(&bus_once, bus_install);
    if (!bus_ok) {
        PyErr_SetString(PyExc_OSError, "verify_mapped: cannot install a SIGBUS handler");
        return NULL;
    }
    PyObject *vf = PySequence_Fast(vseq, "a sequence of buffers");
    PyObject *idf = vf ? PySequence_Fast(iseq, "a sequence of ids") : NULL;
    Py_ssize_t n = vf ? PySequence_Fast_GET_SIZE(vf) : 0, nbufs = 0, got = 0, gotids = 0;
    Py_buffer *bufs = NULL, *ids = NULL;
    Py_ssize_t *first = NULL;
    char *bad = NULL;
    if (!idf)
        goto done;
    if (PySequence_Fast_GET_SIZE(idf) != n) {
        PyErr_SetString(PyExc_ValueError, "verify_mapped: as many ids as views");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_Fast_GET_ITEM(vf, i);
        nbufs += PyTuple_Check(v) ? PyTuple_GET_SIZE(v) : 1;
    }
    bufs = PyMem_Calloc(nbufs ? nbufs : 1, sizeof(Py_buffer));
    ids = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    first = PyMem_Calloc(n + 1, sizeof(Py_ssize_t));
    bad = PyMem_Calloc(n ? n : 1, 1);
    if (!bufs || !ids || !first || !bad) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PySequence_Fast_GET_ITEM(vf, i);
        first[i] = got;
        if (PyTuple_Check(v)) {
            for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(v); j++, got++)
                if (PyObject_GetBuffer(PyTuple_GET_ITEM(v, j), &bufs[got], PyBUF_SIMPLE) < 0)
                    goto done;
        } else if (PyObject_GetBuffer(v, &bufs[got++], PyBUF_SIMPLE) < 0) {
            got--;
            goto done;
        }
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(idf, i), &ids[i], PyBUF_SIMPLE) < 0)
            goto done;
        gotids++;
    }
    first[n] = got;
    verify_guarded(bufs, first, ids, n, seed, check_resident, bad);
    result = PyList_New(0);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        if (!bad[i])
            continue;
        PyObject *x = PyLong_FromSsize_t(i);
        if (!x || PyList_Append(result, x) < 0)
            Py_CLEAR(result);
        Py_XDECREF(x);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&bufs[i]);
    for (Py_ssize_t i = 0; i < gotids; i++)
        PyBuffer_Release(&ids[i]);
    PyMem_Free(bufs);
    PyMem_Free(ids);
    PyMem_Free(first);
    PyMem_Free(bad);
    Py_XDECREF(vf);
    Py_XDECREF(idf);
    return result;
}

typedef struct {
    PyObject_HEAD
    char *base;             /* the mapping, maplen bytes */
    size_t maplen;
    char *data;             /* the stream's bytes in it */
    Py_ssize_t len;
    int slot;
} StreamMap;

static int smap_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    StreamMap *m = (StreamMap *)self;
    return PyBuffer_FillInfo(view, self, m->data, m->len, 1, flags);
}

/* A stream slot given back (before its mapping goes). */
static void stream_slot_free(int slot)
{
    pthread_mutex_lock(&stream_slots_lock);
    __atomic_store_n(&stream_lo[slot], 0, __ATOMIC_RELEASE);
    __atomic_store_n(&stream_hi[slot], 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&stream_slots_lock);
}

static void smap_dealloc(PyObject *self)
{
    StreamMap *m = (StreamMap *)self;    /* no view left: nothing reads it now */
    if (m->slot >= 0)
        stream_slot_free(m->slot);
    if (m->base)
        munmap(m->base, m->maplen);
    Py_TYPE(self)->tp_free(self);
}

static PyBufferProcs smap_as_buffer = {smap_getbuffer, NULL};

static PyTypeObject StreamMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fusearray._accel.StreamMap",
    .tp_basicsize = sizeof(StreamMap),
    .tp_dealloc = smap_dealloc,
    .tp_as_buffer = &smap_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "a stream file mapped read-only for an import (a buffer)",
};

/* map_stream(fd, offset, length) -> StreamMap: bytes [offset, offset+length)
 * of the file, mapped read-only and guarded (see stream_zero_fill);
 * OSError when it cannot be (the caller reads the file instead). */
static PyObject *map_stream(PyObject *self, PyObject *args)
{
    int fd;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iLL", &fd, &offset, &length))
        return NULL;
    pthread_once(&bus_once, bus_install);
    if (!bus_ok || offset < 0 || length <= 0) {
        errno = bus_ok ? EINVAL : ENOSYS;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    long long aligned = offset & ~(long long)(bus_page - 1);
    size_t lead = (size_t)(offset - aligned);
    size_t maplen = (lead + (size_t)length + bus_page - 1) & ~(size_t)(bus_page - 1);
    void *p = mmap(NULL, maplen, PROT_READ, MAP_SHARED, fd, (off_t)aligned);
    if (p == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    madvise(p, maplen, MADV_SEQUENTIAL);
    int slot = -1;
    pthread_mutex_lock(&stream_slots_lock);
    for (int i = 0; i < STREAM_SLOTS && slot < 0; i++)
        if (!__atomic_load_n(&stream_lo[i], __ATOMIC_ACQUIRE)) {
            slot = i;
            __atomic_store_n(&stream_hi[i], (uintptr_t)p + maplen, __ATOMIC_RELEASE);
            __atomic_store_n(&stream_lo[i], (uintptr_t)p, __ATOMIC_RELEASE);
        }
    pthread_mutex_unlock(&stream_slots_lock);
    if (slot < 0) {
        munmap(p, maplen);
        errno = EBUSY;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    StreamMap *m = PyObject_New(StreamMap, &StreamMapType);
    if (!m) {
        stream_slot_free(slot);
        munmap(p, maplen);
        return NULL;
    }
    m->base = p;
    m->maplen = maplen;
    m->data = (char *)p + lead;
    m->len = (Py_ssize_t)length;
    m->slot = slot;
    return (PyObject *)m;
}

/* populate(buffer): fault the pages of a mapped buffer in (from a worker
 * thread, so the parser on the event loop never waits for a disk);
 * MADV_POPULATE_READ, or a read of each page where the kernel lacks it.
 * A page past a cut-short file is left to the SIGBUS handling. */
static PyObject *populate(PyObject *self, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    uintptr_t a = (uintptr_t)v.buf & ~(bus_page - 1), end = (uintptr_t)v.buf + v.len;
#ifdef MADV_POPULATE_READ
    if (madvise((void *)a, end - a, MADV_POPULATE_READ) != 0 && errno == EINVAL)
#endif
    {
        volatile const char *c = (volatile const char *)v.buf;
        for (Py_ssize_t i = 0; i < v.len; i += (Py_ssize_t)bus_page)
            (void)c[i];
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}
#endif

static PyMethodDef accel_methods[] = {
    {"xor_into", xor_into, METH_VARARGS, "dst ^= src (buffers)"},
#ifdef HAVE_XXHASH
    {"hash128_many", hash128_many, METH_VARARGS,
     "keyed XXH3-128 ids of buffers, GIL released"},
    {"hash64_many", hash64_many, METH_VARARGS,
     "XXH3-64 digests of buffers, GIL released"},
    {"hash64_128_many", hash64_128_many, METH_VARARGS,
     "XXH3-64 digest and keyed XXH3-128 id of each buffer, one pass, GIL released"},
    {"xxh3_build", xxh3_build, METH_NOARGS, "the XXH3 build in use: avx2 or generic"},
    {"verify_mapped", verify_mapped, METH_VARARGS,
     "check blocks' ids where they lie in mapped files, SIGBUS-guarded"},
    {"map_stream", map_stream, METH_VARARGS,
     "a stream file mapped read-only for an import, zeros if cut short"},
    {"populate", populate, METH_O, "fault a mapped buffer's pages in, GIL released"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "_accel",
    "CPython accelerators: XOR, XXH3 hashing off the GIL, SIGBUS-guarded "
    "verify of mapped blocks, stream mapping (see _accel.c). Optional: "
    "take them through fusearray.native, which has the fallbacks.",
    -1, accel_methods,
};

PyMODINIT_FUNC PyInit__accel(void)
{
#ifdef HAVE_XXHASH
    if (PyType_Ready(&StreamMapType) < 0)
        return NULL;
#endif
    return PyModule_Create(&accel_module);
}
