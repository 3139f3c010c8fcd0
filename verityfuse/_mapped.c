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
 * Whatever goes wrong with a mapping, the answer is None, and the caller reads
 * the range instead: the read path then says what is wrong, exactly as before
 * mappings were used (a short read, an errno).  What can go wrong:
 *  - the pages cannot be read (an I/O error; a FUSE server answering EIO):
 *    MADV_POPULATE_READ fails.  MAP_POPULATE is not used: it retries a page
 *    whose read fails forever, in the kernel, uninterruptibly by Ctrl-C;
 *  - a sparse file: in tmpfs (a memfd; through overlayfs too) or hugetlbfs, a
 *    read fault on a hole allocates a page where a read of it allocates nothing
 *    (a 2 GiB sparse file would take 2 GiB of memory, or fill its tmpfs), so a
 *    file with fewer blocks than its size is never mapped, on any file system;
 *  - the file is cut short under the mapping (it was truncated after the
 *    caller took its size, or is while it is hashed): a page wholly past its
 *    new end faults with SIGBUS.  The hashing runs under a guard (below);
 *  - a file cut inside a large tmpfs folio reads zeros past its new end
 *    instead of faulting: its size after the hashing is checked.
 *
 * The guard.  While at least one thread hashes a mapping, SIGBUS goes to
 * on_sigbus (installed by the first such thread, the previous disposition put
 * back by the last one; the GIL orders these, as both happen with it held).
 * A fault of a page of this thread's mapping, inside its guarded section,
 * siglongjmps out of it: the section touches only the mapping and buffers of
 * its own, takes no lock and allocates nothing, so leaving it half-way leaves
 * nothing inconsistent.  Any other SIGBUS ends where it would have without the
 * guard: another fault gets the previous disposition put back and repeats
 * when the handler returns (the process dies, or faulthandler reports it); a
 * sent one (kill) goes to the previous disposition without taking the guard
 * from other threads' sections (ignored, the default, or its handler called:
 * a sent signal does not repeat, so no handler can loop on it).  Its state is
 * in initial-exec TLS, which a handler can read without the allocation a
 * dlopen'ed module's TLS may need on first use.
 *
 * A handler installed while the guard is (Python's faulthandler.enable from
 * another thread) keeps the guard as its "previous" and may put it back at any
 * time (faulthandler.disable): the guard must then never save that handler as
 * the one to restore, or a later fault would loop in a disabled faulthandler.
 * So once displaced, the guard is not installed over another handler again,
 * and ranges are read, not mapped, until the disposition is the guard's own,
 * the default or SIG_IGN again.  The sections running when it is displaced
 * are unguarded: a truncation then ends the process, as it would have had
 * mappings never been used.
 */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  /* Linux 5.14; older kernels say EINVAL: reads */
#endif

#define TLS_IE __thread __attribute__((tls_model("initial-exec")))
/* This thread's guarded section, and the mapping it hashes. */
static TLS_IE sigjmp_buf *tl_guard;
static TLS_IE const unsigned char *tl_lo, *tl_hi;

/* The disposition the guard replaced, how many threads are in a section, and
 * whether another handler took the guard's place while it was installed. */
static struct sigaction g_prev_bus;
static int g_guard_users, g_displaced;

static int is_plain(const struct sigaction *sa)  /* SIG_DFL or SIG_IGN */
{
    return !(sa->sa_flags & SA_SIGINFO) &&
           (sa->sa_handler == SIG_DFL || sa->sa_handler == SIG_IGN);
}

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    sigjmp_buf *env = tl_guard;
    const unsigned char *at = info->si_addr;
    if (env != NULL && info->si_code > 0 && at >= tl_lo && at < tl_hi) {
        tl_guard = NULL;
        siglongjmp(*env, 1);
    }
    const struct sigaction *prev = &g_prev_bus;
    if (info->si_code > 0 || (is_plain(prev) && prev->sa_handler == SIG_DFL)) {
        /* A fault repeats on return; a sent signal meant for the default is raised
         * again: either way, under the disposition put back. */
        sigaction(sig, prev, NULL);
        if (info->si_code <= 0)
            raise(sig);
        return;
    }
    if (is_plain(prev))  /* SIG_IGN */
        return;
    if (prev->sa_flags & SA_SIGINFO)
        prev->sa_sigaction(sig, info, uctx);
    else
        prev->sa_handler(sig);
}

static int is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == on_sigbus;
}

/* With the GIL held.  -1 if this section cannot be guarded (then it is not mapped). */
static int guard_enter(void)
{
    struct sigaction cur, sa, old;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return -1;
    if (is_ours(&cur)) {
        g_displaced = 0;
        g_guard_users++;
        return 0;
    }
    if (g_guard_users > 0 || (g_displaced && !is_plain(&cur))) {
        g_displaced = 1;  /* taken from another thread's section, or still */
        return -1;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &old) != 0 || is_ours(&old))
        return -1;
    g_prev_bus = old;
    g_displaced = 0;
    g_guard_users = 1;
    return 0;
}

/* With the GIL held: the last thread out puts back the disposition it found,
 * unless another handler has taken the guard's place since (displaced). */
static void guard_leave(void)
{
    struct sigaction cur;
    if (--g_guard_users > 0 || sigaction(SIGBUS, NULL, &cur) != 0)
        return;
    if (is_ours(&cur))
        sigaction(SIGBUS, &g_prev_bus, NULL);
    else
        g_displaced = 1;
}

/* A child forked while other threads hashed has none of them: no section. */
static void guard_atfork_child(void)
{
    if (g_guard_users > 0) {
        g_guard_users = 1;
        guard_leave();
    }
}

/* Hash blocks of the mapping, the last (partial) one zero-padded in pad.
 * Returns 0, or 1 if a page of the mapping faulted. */
static int hash_guarded(struct hctx *c, const unsigned char *map, size_t len, size_t bs,
                        unsigned char *pad, unsigned char *out)
{
    sigjmp_buf env;
    size_t whole = len / bs;
    tl_lo = map;
    tl_hi = map + len;
    if (sigsetjmp(env, 1) != 0)
        return 1;
    tl_guard = &env;
    __asm__ volatile("" ::: "memory");  /* set before the first touch of the mapping */
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

/* Whether [offset, end) of fd may be mapped: a regular file still that long, with
 * blocks for all of it (a hole would be allocated: see above). */
static int mappable(int fd, long long end)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size < end)
        return 0;
    return (long long)st.st_blocks * 512 >= st.st_size;
}

/* The hashes of [offset, offset + length) of fd into out, or -1: read it instead. */
static int hash_range_mapped(struct hctx *c, int fd, long long offset, size_t length,
                             size_t bs, unsigned char *pad, unsigned char *out)
{
    long long end = offset + (long long)length;
    if (!mappable(fd, end))
        return -1;
    void *map = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, (off_t)offset);
    if (map == MAP_FAILED)
        return -1;
    /* A child forked meanwhile (seal's worker processes) has no use for it. */
    madvise(map, length, MADV_DONTFORK);
    int ok = madvise(map, length, MADV_POPULATE_READ) == 0 &&
             hash_guarded(c, map, length, bs, pad, out) == 0;
    munmap(map, length);
    return ok && mappable(fd, end) ? 0 : -1;
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
    if (bs <= 0 || length <= 0 || offset < 0 || offset % page != 0 ||
        offset > LLONG_MAX - length) {
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
    if (out == NULL)
        goto done;
    if (length % bs && (pad = PyMem_Calloc(1, (size_t)bs)) == NULL) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    int r = -1;
    if (guard_enter() == 0) {
        hctx_init(&c, alg, prefix.buf, (size_t)prefix.len, NULL, 0, (size_t)bs);
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        r = hash_range_mapped(&c, fd, offset, (size_t)length, (size_t)bs, pad, o);
        Py_END_ALLOW_THREADS
        guard_leave();
    }
    if (r != 0) {
        Py_CLEAR(out);
        out = Py_NewRef(Py_None);
    }
done:
    PyMem_Free(pad);
    PyBuffer_Release(&prefix);
    return out;
}

#define HASH_MAPPED_DOC \
    "hash_mapped(alg, prefix, fd, offset, length, block_size) -> bytes | None\n\n" \
    "The hashes of the blocks of fd's bytes [offset, offset + length), the last one\n" \
    "zero-padded, as hash_blocks gives them for those bytes read; hashed from a\n" \
    "read-only mapping, not a copy.  offset: a multiple of the page size.  None: the\n" \
    "range could not be hashed mapped (not mappable, a read error, the file shorter\n" \
    "than the range, a sparse file, a SIGBUS handler not the guard's): read it instead."
