/*
 * read_verify: the common verified read in one call, without the GIL.
 *
 * Included by _hashblocks.c after the hashing core (one translation unit).
 *
 * A verified read is: pread whole blocks into a buffer, hash every block,
 * compare with the expected hashes (from the verified leaf tree blocks),
 * and answer with the bytes only if all match.  In Python that is a preadv,
 * a verify_blocks call and their glue per 256 KiB; here it is one call over
 * the whole request.  The request is cut into pieces that each thread both
 * reads and hashes: the bytes a thread hashes are the ones it has just
 * copied (hot in its own cache), the copy from the page cache is shared by
 * the two cores as well as the hashing, and the helper's wake-up latency is
 * hidden behind the caller's first pieces.
 *
 * Trust: every byte is copied from the file into the caller's buffer, in
 * this process, before it is hashed, and the buffer is what the caller
 * returns; nothing the host controls can change it after the comparison.
 *
 * A failed read (an errno, or end of file before `length`) wins over any
 * mismatch, as it would in a read-then-verify sequence: the failure at the
 * lowest buffer offset is reported.  So a mismatch only stops the hashing of
 * later pieces, never their reads, and a failure skips only the pieces that
 * start after it (those before it always run, so the lowest one is exact).
 */
#include <errno.h>
#include <pthread.h>
#include <sys/uio.h>

/* Pieces: a pread of this size costs ~1 us of syscall on top of the copy,
 * and ~30 us of copy and hashing, so the threads still finish close together. */
#ifndef READ_PIECE_BYTES
#define READ_PIECE_BYTES (64 * 1024)
#endif
/* Below this the caller works alone (see MIN_SPLIT_BYTES; the copy shares too). */
#define MIN_READ_SPLIT_BYTES (128 * 1024)

struct readreq {
    struct request r;     /* its hctx's data is buf */
    int fd, flags;
    long long offset;     /* file offset of buf[0] */
    size_t length;        /* bytes to read; the rest of buf is zero-filled */
    unsigned char *buf;
    atomic_size_t fail_hint; /* lowest failure offset so far, for skipping; SIZE_MAX = none */
    pthread_mutex_t lock; /* fail_at, fail_errno: written only on failure */
    size_t fail_at;       /* buffer offset of the lowest failure; SIZE_MAX = none */
    int fail_errno;       /* its errno; 0 = end of file */
};

static void read_failed(struct readreq *q, size_t at, int err)
{
    pthread_mutex_lock(&q->lock);
    if (at < q->fail_at) {
        q->fail_at = at;
        q->fail_errno = err;
    }
    pthread_mutex_unlock(&q->lock);
    size_t cur = atomic_load(&q->fail_hint);
    while (at < cur && !atomic_compare_exchange_weak(&q->fail_hint, &cur, at))
        ;
}

static void read_piece(void *arg, size_t piece)
{
    struct readreq *q = arg;
    const struct hctx *c = q->r.c;
    size_t first, n = piece_blocks(&q->r, piece, &first);
    size_t lo = first * c->bs, hi = lo + n * c->bs;
    if (lo >= atomic_load_explicit(&q->fail_hint, memory_order_relaxed))
        return;
    size_t stop = hi < q->length ? hi : (lo < q->length ? q->length : lo);
    for (size_t pos = lo; pos < stop;) {
        struct iovec iov = {.iov_base = q->buf + pos, .iov_len = stop - pos};
        ssize_t got = preadv2(q->fd, &iov, 1, (off_t)(q->offset + (long long)pos), q->flags);
        if (got < 0 && errno == EINTR)
            continue;  /* only the caller takes signals; Python runs the handler after */
        if (got <= 0) {
            read_failed(q, pos, got < 0 ? errno : 0);
            return;
        }
        pos += (size_t)got;
    }
    if (stop < hi)
        memset(q->buf + stop, 0, hi - stop);
    if (first < atomic_load_explicit(&q->r.first_bad, memory_order_relaxed))
        verify_range(&q->r, first, n);
}

/* Read `length` bytes of fd at `offset` into buf (c->nblocks whole blocks; the tail
 * zeroed), hash and compare with expected.  Returns the first mismatching block
 * (SIZE_MAX: none); a failed read sets *fail_at (buffer offset; SIZE_MAX: none) and
 * *fail_errno (0: end of file), and then the mismatch does not count.  With the GIL
 * held; released while it works unless the request is small and cannot block
 * (may_block 0: RWF_NOWAIT in flags, or a file in memory). */
static size_t read_verify_core(const struct hctx *c, const unsigned char *expected, int fd,
                               int flags, int may_block, long long offset, size_t length,
                               unsigned char *buf, int threads, size_t *fail_at,
                               int *fail_errno)
{
    struct readreq q = {
        .r = {.c = c, .expected = expected},
        .fd = fd, .flags = flags, .offset = offset, .length = length,
        .buf = buf, .fail_at = SIZE_MAX,
    };
    atomic_init(&q.fail_hint, SIZE_MAX);
    pthread_mutex_init(&q.lock, NULL);
    /* A small read that cannot block keeps the GIL (see MIN_RELEASE_GIL_BYTES); one
     * that may wait for the disk releases it. */
    size_t release = may_block ? 0 : MIN_RELEASE_GIL_BYTES;
    run_request(&q.r, threads, read_piece, READ_PIECE_BYTES, MIN_READ_SPLIT_BYTES, release);
    pthread_mutex_destroy(&q.lock);
    *fail_at = q.fail_at;
    *fail_errno = q.fail_errno;
    return atomic_load(&q.r.first_bad);
}

#define READ_VERIFY_DOC \
    "read_verify(alg, prefix, buf, block_size, expected, fd, offset, length, flags=0,\n" \
    "            threads=0) -> int\n\n" \
    "Read `length` bytes of fd at `offset` into buf (preadv2 with `flags`, e.g.\n" \
    "os.RWF_NOWAIT), zero its tail up to len(buf) (whole blocks), hash every block as\n" \
    "verify_blocks does and compare with expected.  Returns -1 if all match, else the\n" \
    "index of the first mismatching block.  Raises OSError for a failed read (e.g.\n" \
    "BlockingIOError with RWF_NOWAIT when the data is not cached) and EOFError when\n" \
    "the file ends before offset + length; these win over a mismatch.  The GIL is\n" \
    "released unless the request is small and RWF_NOWAIT is set."

static PyObject *read_verify(PyObject *self, PyObject *args)
{
    (void)self;
    int alg, fd, flags = 0, threads = 0;
    Py_buffer prefix, buf, expected;
    Py_ssize_t bs, length;
    long long offset;
    PyObject *res = NULL;
    struct hctx c;

    if (!PyArg_ParseTuple(args, "iy*w*ny*iLn|ii:read_verify", &alg, &prefix, &buf, &bs,
                          &expected, &fd, &offset, &length, &flags, &threads))
        return NULL;
    if (setup(&c, alg, &prefix, &buf, bs, threads) < 0)
        goto done;
    if (check_expected(&c, &expected) < 0)
        goto done;
    if (length < 0 || length > buf.len) {
        PyErr_Format(PyExc_ValueError, "length %zd is not between 0 and the buffer's %zd bytes",
                     length, buf.len);
        goto done;
    }
    if (offset < 0 || offset > LLONG_MAX - buf.len) {
        PyErr_Format(PyExc_ValueError, "offset %lld is out of range", offset);
        goto done;
    }
    size_t fail_at;
    int fail_errno;
    size_t bad = read_verify_core(&c, expected.buf, fd, flags, !(flags & RWF_NOWAIT), offset,
                                  (size_t)length, buf.buf, threads, &fail_at, &fail_errno);
    if (fail_at != SIZE_MAX) {
        if (fail_errno) {
            errno = fail_errno;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {
            PyErr_Format(PyExc_EOFError, "end of file at byte %lld: %zd bytes wanted at offset %lld",
                         offset + (long long)fail_at, length, offset);
        }
        goto done;
    }
    res = bad == SIZE_MAX ? PyLong_FromLong(-1) : PyLong_FromSize_t(bad);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&expected);
    return res;
}
