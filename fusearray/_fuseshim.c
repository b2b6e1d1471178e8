/*
 * fusearray._fuseshim: the libfuse interposer under pyfuse3.
 *
 * Loaded with RTLD_GLOBAL before pyfuse3 is imported (fusearray.native.
 * load_interposer), its definitions of these libfuse functions come first
 * when pyfuse3 calls them; each calls libfuse's own, found with
 * dlsym(RTLD_NEXT, name) (this library links the libfuse it was built
 * against; no soname is named here):
 *
 * - fuse_session_new (libfuse < 3.17) and fuse_session_new_versioned (3.17+,
 *   where fuse_session_new is a header macro over it): copy pyfuse3's
 *   operation table, add a fallocate op (pyfuse3 registers none, so the
 *   kernel would answer every fallocate() - punch-hole from `fallocate -p`,
 *   the discard a loop device sends for `fstrim` - with EOPNOTSUPP). The op
 *   forwards the request to a Python callback (fusearray_set_fallocate) that
 *   runs in pyfuse3's FUSE thread and replies later with fuse_reply_err().
 *   Without a callback it replies ENOSYS, as libfuse would.
 * - fuse_session_receive_buf, fuse_reply_write: the real call without the
 *   GIL for large requests and replies.
 * - fuse_reply_buf: large read replies sent from a reply thread when other
 *   requests wait; replies gathered from several buffers (reply_plan).
 * - fuse_session_unmount, fuse_session_destroy: the queued replies are sent
 *   first.
 *
 * What this relies on in pyfuse3 and libfuse, the versions checked and the
 * tests that prove each: docs/native-contract.md. Only the public API of
 * <fuse_lowlevel.h> is used.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#include <fuse_lowlevel.h>

/* libfuse 3.17+ makes fuse_session_new a macro over an inline function
 * that calls fuse_session_new_versioned; this file defines both symbols */
#undef fuse_session_new

typedef void (*fallocate_cb_t)(fuse_req_t req, fuse_ino_t ino, int mode,
                               off_t offset, off_t length, uint64_t fh);
typedef struct fuse_session *(*session_new_t)(struct fuse_args *,
        const struct fuse_lowlevel_ops *, size_t, void *);

static fallocate_cb_t fallocate_cb;
static struct fuse_session *shim_session;   /* the one pyfuse3 made */
static struct fuse_lowlevel_ops shim_ops;
static int shim_installed;

void fusearray_set_fallocate(fallocate_cb_t cb) { fallocate_cb = cb; }
int fusearray_shim_installed(void) { return shim_installed; }

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
                           off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    if (!fallocate_cb) {
        fuse_reply_err(req, ENOSYS);
        return;
    }
    fallocate_cb(req, ino, mode, offset, length, fi ? fi->fh : 0);
}

/* libfuse's own `name` (the next definition after this library's: the
 * libfuse this library and pyfuse3 link), or NULL (then the interposer
 * fails the call). */
static void *real_symbol(const char *name, void *self)
{
    void *sym = dlsym(RTLD_NEXT, name);
    return sym == self ? NULL : sym;
}

/* The caller's table with a fallocate op added (when it has none). */
static const struct fuse_lowlevel_ops *with_fallocate(const struct fuse_lowlevel_ops *op,
                                                      size_t op_size)
{
    memset(&shim_ops, 0, sizeof(shim_ops));
    memcpy(&shim_ops, op, op_size < sizeof(shim_ops) ? op_size : sizeof(shim_ops));
    if (!shim_ops.fallocate) {
        shim_ops.fallocate = shim_fallocate;
        shim_installed = 1;
    }
    return &shim_ops;
}

/* libfuse before 3.17 (pyfuse3 built against its headers calls this) */
struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_t real;
    if (!real && !(real = (session_new_t)real_symbol("fuse_session_new",
                                                     (void *)fuse_session_new)))
        return NULL;
    if (!op)
        return real(args, op, op_size, userdata);
    struct fuse_session *se = real(args, with_fallocate(op, op_size), sizeof(shim_ops),
                                   userdata);
    shim_session = se;
    return se;
}

/* libfuse 3.17+: fuse_session_new() of <fuse_lowlevel.h> is an inline
 * function that calls this, passing the libfuse version the caller was
 * compiled against (a struct libfuse_version *, passed on untouched). */
#if FUSE_VERSION >= FUSE_MAKE_VERSION(3, 17)
typedef struct libfuse_version caller_version_t;
#else
typedef void caller_version_t;     /* not in these headers: never called */
#endif
typedef struct fuse_session *(*session_new_versioned_t)(struct fuse_args *,
        const struct fuse_lowlevel_ops *, size_t, caller_version_t *, void *);

struct fuse_session *fuse_session_new_versioned(struct fuse_args *args,
                                                const struct fuse_lowlevel_ops *op,
                                                size_t op_size,
                                                caller_version_t *version,
                                                void *userdata)
{
    static session_new_versioned_t real;
    if (!real && !(real = (session_new_versioned_t)real_symbol(
                       "fuse_session_new_versioned", (void *)fuse_session_new_versioned)))
        return NULL;
    if (!op)
        return real(args, op, op_size, version, userdata);
    struct fuse_session *se = real(args, with_fallocate(op, op_size), sizeof(shim_ops),
                                   version, userdata);
    shim_session = se;
    return se;
}

/*
 * Request intake and read replies without the GIL.
 *
 * pyfuse3 calls fuse_session_receive_buf() (the read() of a request from
 * /dev/fuse: for a 1 MiB write, a 1 MiB copy in the kernel) and
 * fuse_reply_buf()/fuse_reply_write() (the replies) with the GIL held, so the
 * write-back thread (hashing, appends) stalls behind every copy. These
 * interposers drop the GIL around the real call when the calling thread
 * holds it; pyfuse3 keeps the buffers alive meanwhile (its own fuse_buf, a
 * Py_buffer it holds until the reply returns). Small replies keep the GIL:
 * handing it over costs more than the copy.
 */
#define REPLY_NOGIL_MIN (32 * 1024)

static int holds_gil(void)
{
    return Py_IsInitialized() && PyGILState_Check();
}

/* Call the real function: without the GIL when this thread holds it and
 * `big`, else as is. `real` is resolved once. */
#define CALL_REAL(type, name, big, ...)                                     \
    do {                                                                   \
        static type real;                                                  \
        if (!real && !(real = (type)real_symbol(#name, (void *)name)))     \
            return -ENOSYS;                                                \
        if (!(big) || !holds_gil())                                        \
            return real(__VA_ARGS__);                                      \
        int res;                                                           \
        Py_BEGIN_ALLOW_THREADS                                             \
        res = real(__VA_ARGS__);                                           \
        Py_END_ALLOW_THREADS                                               \
        return res;                                                        \
    } while (0)

typedef int (*receive_buf_t)(struct fuse_session *, struct fuse_buf *);
typedef int (*reply_buf_t)(fuse_req_t, const char *, size_t);
typedef int (*reply_write_t)(fuse_req_t, size_t);

int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    CALL_REAL(receive_buf_t, fuse_session_receive_buf, 1, se, buf);
}

/*
 * Large read replies from a thread of their own.
 *
 * A 1 MiB read reply is a writev to /dev/fuse in which the kernel copies the
 * data page by page into the request: about 0.3 ms, during which the FUSE
 * thread (pyfuse3's trio thread) can take no other request. Measured on an
 * ext4 cold read over a loop device: 60 % of that thread's time, with the
 * other core half idle. So a reply of REPLY_ASYNC_MIN bytes or more is
 * copied into one of REPLY_SLOTS buffers (a memcpy is a third of the
 * writev) and sent by the reply thread; the FUSE thread goes on at once
 * to the next request. Only when there is one: with nothing else waiting
 * on /dev/fuse (a reader at queue depth 1) the copy would only add to the
 * reply's latency, so the reply is sent in place.
 * The data is what the handler returned, copied before the handler's
 * buffer is released, so a later write cannot change a reply in flight.
 * When every slot is busy (or the thread cannot start, or
 * FUSEARRAY_ASYNC_REPLY=0) the reply is sent in place as before.
 * fuse_session_unmount/destroy wait for the queue to drain first: the
 * replies refer to the session.
 */
#define REPLY_ASYNC_MIN (256 * 1024)
#define REPLY_SLOTS 4

struct reply_slot {
    fuse_req_t req;
    char *buf;
    size_t cap, size;
    int busy;
};

static struct reply_slot slots[REPLY_SLOTS];
static int rq_fifo[REPLY_SLOTS];            /* slot indices, oldest first */
static unsigned rq_head, rq_count;
static unsigned rq_pending;                  /* queued or being sent */
static unsigned long long rq_sent;          /* replies the thread has sent */
static int rq_state;                         /* 0 not started, 1 running, -1 off */
static pthread_mutex_t rq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t rq_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t rq_idle = PTHREAD_COND_INITIALIZER;
static reply_buf_t rq_real;

static void *reply_thread(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&rq_lock);
    for (;;) {
        while (!rq_count)
            pthread_cond_wait(&rq_work, &rq_lock);
        struct reply_slot *s = &slots[rq_fifo[rq_head]];
        rq_head = (rq_head + 1) % REPLY_SLOTS;
        rq_count--;
        pthread_mutex_unlock(&rq_lock);
        rq_real(s->req, s->buf, s->size);   /* an error: the request is gone */
        pthread_mutex_lock(&rq_lock);
        s->busy = 0;
        rq_sent++;
        if (!--rq_pending)
            pthread_cond_broadcast(&rq_idle);
    }
    return NULL;
}

/* A free slot with room for `size` bytes, marked busy; NULL: reply in place.
 * Called with rq_lock held. */
static struct reply_slot *take_slot(size_t size)
{
    if (rq_state == 0) {
        const char *env = getenv("FUSEARRAY_ASYNC_REPLY");
        pthread_t t;
        pthread_attr_t attr;
        rq_state = -1;
        if (!(env && env[0] == '0') && pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &attr, reply_thread, NULL) == 0)
                rq_state = 1;
            pthread_attr_destroy(&attr);
        }
    }
    if (rq_state != 1)
        return NULL;
    for (int i = 0; i < REPLY_SLOTS; i++) {
        struct reply_slot *s = &slots[i];
        if (s->busy)
            continue;
        if (s->cap < size) {
            char *b = realloc(s->buf, size);
            if (!b)
                return NULL;
            s->buf = b;
            s->cap = size;
        }
        s->busy = 1;
        return s;
    }
    return NULL;
}

static void drain_replies(void)
{
    pthread_mutex_lock(&rq_lock);
    while (rq_pending)
        pthread_cond_wait(&rq_idle, &rq_lock);
    pthread_mutex_unlock(&rq_lock);
}

/* Whether another request is waiting to be read from /dev/fuse. */
static int requests_waiting(void)
{
    struct pollfd p;
    if (!shim_session)
        return 0;
    p.fd = fuse_session_fd(shim_session);
    p.events = POLLIN;
    p.revents = 0;
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* Hand a large reply to the reply thread when another request waits: the
 * data (`n` buffers, `size` bytes in all) is gathered into a free slot.
 * 1: queued; 0: send it in place. */
static int queue_reply(fuse_req_t req, const struct iovec *iov, int n, size_t size)
{
    if (size < REPLY_ASYNC_MIN || rq_state < 0 || !requests_waiting())
        return 0;
    if (!rq_real && !(rq_real = (reply_buf_t)real_symbol("fuse_reply_buf",
                                                         (void *)fuse_reply_buf)))
        return 0;
    pthread_mutex_lock(&rq_lock);
    struct reply_slot *s = take_slot(size);
    pthread_mutex_unlock(&rq_lock);
    if (!s)
        return 0;
    int gil = holds_gil();
    PyThreadState *ts = gil ? PyEval_SaveThread() : NULL;
    char *p = s->buf;
    for (int i = 0; i < n; i++) {
        memcpy(p, iov[i].iov_base, iov[i].iov_len);
        p += iov[i].iov_len;
    }
    s->req = req;
    s->size = size;
    pthread_mutex_lock(&rq_lock);
    rq_fifo[(rq_head + rq_count) % REPLY_SLOTS] = (int)(s - slots);
    rq_count++;
    rq_pending++;
    pthread_cond_signal(&rq_work);
    pthread_mutex_unlock(&rq_lock);
    if (ts)
        PyEval_RestoreThread(ts);
    return 1;
}

/*
 * Read replies gathered from several buffers.
 *
 * A multi-block read is a list of buffers: blocks verified where they lie
 * in the store's mapped segment files, copies of cached blocks, zeros.
 * Joining them would copy every byte once more before the reply's own
 * copy into the reader's pages. reply_plan(buffers) instead keeps the
 * buffers (Py_buffer, so they stay alive and unchanged in size) and returns
 * a read-only memoryview of the same length over `plan_marker`, which the
 * handler returns to pyfuse3. pyfuse3 passes that pointer to
 * fuse_reply_buf() at once, in the same thread, before any other task runs;
 * the interposer below recognises it and sends the plan with
 * fuse_reply_iov() (or gathers it into a reply slot). The marker is a
 * PROT_NONE reservation: if its pointer ever reached the kernel by any
 * other way, the reply would fail with EFAULT rather than carry zeros.
 * Only pyfuse3's FUSE thread makes and sends plans, so they need no lock.
 */
#define PLAN_MAX 512
#define PLAN_MARKER_SIZE ((size_t)64 << 20)

static char *plan_marker;
static Py_buffer plan_bufs[PLAN_MAX];
static struct iovec plan_iov[PLAN_MAX];
static int plan_n;              /* buffers held */
static size_t plan_total;
static int plan_armed;          /* made and not yet sent */
static unsigned long long plan_sent;

/* Let go of the plan's buffers (needs the GIL). */
static void plan_release(void)
{
    for (int i = 0; i < plan_n; i++)
        PyBuffer_Release(&plan_bufs[i]);
    plan_n = 0;
    plan_armed = 0;
}

static int reply_planned(fuse_req_t req, size_t size)
{
    int res;
    if (!plan_armed || size != plan_total) {
        res = fuse_reply_err(req, EIO);     /* cannot happen: never send the marker */
    } else {
        plan_armed = 0;
        plan_sent++;
        if (queue_reply(req, plan_iov, plan_n, size)) {
            res = 0;
        } else if (size >= REPLY_NOGIL_MIN && holds_gil()) {
            Py_BEGIN_ALLOW_THREADS
            res = fuse_reply_iov(req, plan_iov, plan_n);
            Py_END_ALLOW_THREADS
        } else {
            res = fuse_reply_iov(req, plan_iov, plan_n);
        }
    }
    if (holds_gil())
        plan_release();
    return res;
}

int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
{
    if (plan_marker && buf == plan_marker)
        return reply_planned(req, size);
    struct iovec one = {(void *)buf, size};
    if (queue_reply(req, &one, 1, size))
        return 0;
    CALL_REAL(reply_buf_t, fuse_reply_buf, size >= REPLY_NOGIL_MIN, req, buf, size);
}

/* reply_plan(buffers) -> memoryview, or None (the shim is not interposed,
 * too many buffers or bytes: join them instead). See above. */
static PyObject *reply_plan(PyObject *self, PyObject *seq)
{
    plan_release();
    if (!shim_installed)
        Py_RETURN_NONE;
    if (!plan_marker) {
        void *m = mmap(NULL, PLAN_MARKER_SIZE, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED)
            Py_RETURN_NONE;
        plan_marker = m;
    }
    PyObject *fast = PySequence_Fast(seq, "a sequence of buffers");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    size_t total = 0;
    if (n > PLAN_MAX) {
        Py_DECREF(fast);
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &plan_bufs[i],
                               PyBUF_SIMPLE) < 0) {
            Py_DECREF(fast);
            plan_release();
            return NULL;
        }
        plan_n = (int)i + 1;
        plan_iov[i].iov_base = plan_bufs[i].buf;
        plan_iov[i].iov_len = (size_t)plan_bufs[i].len;
        total += (size_t)plan_bufs[i].len;
    }
    Py_DECREF(fast);
    if (total > PLAN_MARKER_SIZE) {
        plan_release();
        Py_RETURN_NONE;
    }
    plan_total = total;
    plan_armed = 1;
    return PyMemoryView_FromMemory(plan_marker, (Py_ssize_t)total, PyBUF_READ);
}

/* How many replies were sent from plans (logged at unmount). */
unsigned long long fusearray_planned_replies(void)
{
    return plan_sent;
}

/* How many replies the reply thread has sent (logged at unmount). */
unsigned long long fusearray_async_replies(void)
{
    pthread_mutex_lock(&rq_lock);
    unsigned long long n = rq_sent;
    pthread_mutex_unlock(&rq_lock);
    return n;
}

typedef void (*session_fn_t)(struct fuse_session *);

/* Send the queued replies, then call libfuse's `name` (cached in *real). */
static void drain_then(session_fn_t *real, const char *name, void *self,
                       struct fuse_session *se)
{
    drain_replies();
    if (!*real && !(*real = (session_fn_t)real_symbol(name, self)))
        return;
    (*real)(se);
}

void fuse_session_unmount(struct fuse_session *se)
{
    static session_fn_t real;
    drain_then(&real, "fuse_session_unmount", (void *)fuse_session_unmount, se);
}

void fuse_session_destroy(struct fuse_session *se)
{
    static session_fn_t real;
    drain_then(&real, "fuse_session_destroy", (void *)fuse_session_destroy, se);
}

int fuse_reply_write(fuse_req_t req, size_t count)
{
    CALL_REAL(reply_write_t, fuse_reply_write, count >= REPLY_NOGIL_MIN, req, count);
}

static PyMethodDef shim_methods[] = {
    {"reply_plan", reply_plan, METH_O,
     "a read reply gathered from buffers: return the memoryview it gives"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shim_module = {
    PyModuleDef_HEAD_INIT, "_fuseshim",
    "The libfuse interposer under pyfuse3 (fallocate op, GIL-free request "
    "intake and large replies, a reply thread, gathered read replies). It "
    "interposes only when loaded with RTLD_GLOBAL before pyfuse3 "
    "(fusearray.native.load_interposer); see _fuseshim.c.",
    -1, shim_methods,
};

PyMODINIT_FUNC PyInit__fuseshim(void)
{
    return PyModule_Create(&shim_module);
}
