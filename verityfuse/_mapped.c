/*
 * hash_mapped: the block hashes of a range of a file, hashed where the page
 * cache holds it instead of from a copy.
 *
 * Included by _hashblocks.c (one translation unit, everything static).
 *
 * Why: building a tree from pread() copies every byte once before hashing it;
 * on this project's Xeon that copy was ~0.2 s of a ~0.7 s build of 1 GiB
 * (bench/build.py), the rest hashing.  Hashing from a read-only shared mapping
 * of the range skips the copy.  This is only for building a tree (digest,
 * seal, enable): nothing hashed here is ever returned to a reader, so the
 * daemon's rule that a read returns bytes it copied and hashed itself is not
 * touched.
 *
 * What a mapping adds is SIGBUS: a page wholly past the file's end, because
 * the file was truncated after its size was taken (by the range's caller) or
 * while it is hashed, faults with SIGBUS instead of reading short.  Killing
 * the process for that is not acceptable, so the hashing runs under a guard:
 * a SIGBUS handler that, on a thread inside a guarded section, jumps back out
 * of it (siglongjmp), and otherwise behaves as the handler it replaced (the
 * default: the process dies, as before).  A guarded section touches only the
 * mapping and buffers of its own, takes no lock and allocates nothing, so
 * leaving it half-way leaves nothing inconsistent.  The handler is
 * (re)installed at every call if another one took its place (Python's
 * faulthandler, which pytest enables, installs its own), chaining to it.
 */
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The guarded section of this thread, or NULL; and where it faulted. */
static __thread sigjmp_buf *tl_guard;
static __thread void *volatile tl_fault_addr;
/* The SIGBUS disposition ours replaced: what a SIGBUS outside a guard gets. */
static struct sigaction g_prev_bus;

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    sigjmp_buf *env = tl_guard;
    if (env != NULL) {
        tl_guard = NULL;
        tl_fault_addr = info->si_addr;
        siglongjmp(*env, 1);
    }
    if ((g_prev_bus.sa_flags & SA_SIGINFO) && g_prev_bus.sa_sigaction != NULL) {
        g_prev_bus.sa_sigaction(sig, info, uctx);
        return;
    }
    if (g_prev_bus.sa_handler != SIG_DFL && g_prev_bus.sa_handler != SIG_IGN) {
        g_prev_bus.sa_handler(sig);
        return;
    }
    /* The default: back to it, and the faulting access repeats and ends the process. */
    signal(SIGBUS, SIG_DFL);
}

static int is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == on_sigbus;
}

/* Make on_sigbus the SIGBUS handler, keeping the one it replaces (unless that
 * is already ours: two threads may install at once).  -1 with errno set. */
static int guard_install(void)
{
    struct sigaction cur, sa, old;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return -1;
    if (is_ours(&cur))
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &old) != 0)
        return -1;
    if (!is_ours(&old))
        g_prev_bus = old;
    return 0;
}

/* Hash blocks of the mapping, the last (partial) one zero-padded in pad.
 * Returns 0, or 1 if a page of the mapping faulted (the file is shorter). */
static int hash_guarded(struct hctx *c, const unsigned char *map, size_t len, size_t bs,
                        unsigned char *pad, unsigned char *out)
{
    sigjmp_buf env;
    size_t whole = len / bs;
    if (sigsetjmp(env, 1) != 0)
        return 1;
    /* Set before the first touch of the mapping (the barriers keep the compiler from
     * moving it): this thread's TLS is then allocated when a handler reads it. */
    tl_guard = &env;
    __asm__ volatile("" ::: "memory");
    c->data = map;
    c->nblocks = whole;
    hash_range(c, 0, whole, out);
    if (len % bs) {
        memcpy(pad, map + whole * bs, len % bs);
        c->data = pad;
        hash_range(c, 0, 1, out + whole * c->ds);
    }
    __asm__ volatile("" ::: "memory");
    tl_guard = NULL;
    return 0;
}

static PyObject *hash_mapped(PyObject *self, PyObject *args)
{
    (void)self;
    int alg, fd;
    Py_buffer prefix;
    long long offset;
    Py_ssize_t length, bs;
    PyObject *out = NULL;
    unsigned char *pad = NULL;
    struct hctx c;

    if (!PyArg_ParseTuple(args, "iy*iLnn:hash_mapped", &alg, &prefix, &fd, &offset, &length,
                          &bs))
        return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (alg != ALG_SHA256 && alg != ALG_SHA512) {
        PyErr_Format(PyExc_ValueError, "unknown hash algorithm %d (1 = sha256, 2 = sha512)", alg);
        goto done;
    }
    if (bs <= 0 || length <= 0 || offset < 0 || offset % page != 0) {
        PyErr_Format(PyExc_ValueError, "need block_size > 0, length > 0 and an offset that is a "
                     "multiple of %ld, not %zd, %zd, %lld", page, bs, length, offset);
        goto done;
    }
    size_t nblocks = ((size_t)length + (size_t)bs - 1) / (size_t)bs;
    size_t ds = alg == ALG_SHA512 ? SHA512_DIGEST_LENGTH : SHA256_DIGEST_LENGTH;
    if (nblocks > (size_t)PY_SSIZE_T_MAX / ds) {
        PyErr_SetString(PyExc_OverflowError, "too many blocks");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nblocks * ds));
    pad = length % bs ? PyMem_Calloc(1, (size_t)bs) : NULL;
    if (out == NULL || (length % bs && pad == NULL)) {
        Py_CLEAR(out);
        if (pad == NULL && length % bs)
            PyErr_NoMemory();
        goto done;
    }
    if (guard_install() != 0) {
        Py_CLEAR(out);
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    hctx_init(&c, alg, prefix.buf, (size_t)prefix.len, NULL, 0, (size_t)bs);
    void *map;
    long long end = offset + (long long)length, found = end;
    struct stat st;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    /* MAP_POPULATE: the page tables in one call rather than a fault every 16 pages. */
    map = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, (off_t)offset);
    if (map != MAP_FAILED) {
        if (hash_guarded(&c, map, (size_t)length, (size_t)bs, pad, o)) {
            /* Only the mapping can fault here; anywhere else, nothing was hashed. */
            size_t at = (size_t)((unsigned char *)tl_fault_addr - (unsigned char *)map);
            found = offset + (at < (size_t)length ? (long long)(at - at % (size_t)page) : 0);
        }
        munmap(map, (size_t)length);
        /* A file cut inside a large folio (tmpfs) may read zeros past its new end
         * instead of faulting: its size after the hashing says whether it still
         * holds the whole range. */
        if (fstat(fd, &st) == 0 && st.st_size < found)
            found = st.st_size;
    }
    Py_END_ALLOW_THREADS
    if (map == MAP_FAILED) {  /* not mappable (a pipe, a file system without mmap) */
        Py_CLEAR(out);
        out = Py_NewRef(Py_None);
    } else if (found < end) {
        Py_CLEAR(out);
        out = PyLong_FromLongLong(found);
    }
done:
    PyMem_Free(pad);
    PyBuffer_Release(&prefix);
    return out;
}

#define HASH_MAPPED_DOC \
    "hash_mapped(alg, prefix, fd, offset, length, block_size) -> bytes | int | None\n\n" \
    "The hashes of the blocks of fd's bytes [offset, offset + length), the last one\n" \
    "zero-padded, as hash_blocks gives them for those bytes read; hashed from a\n" \
    "read-only mapping, not a copy.  offset: a multiple of the page size.  An int:\n" \
    "the file ended before the range did: its size after the hashing, or the offset\n" \
    "of the page that faulted (SIGBUS, caught).  None: fd cannot be mapped; read it."
