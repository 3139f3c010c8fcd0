/*
 * Batch block hashing and verification for fs-verity trees:
 * H(padded_salt || block) for every whole block of a buffer, in one call,
 * with the GIL released (above 16 KiB).
 *
 * Why native: hashing a 4 KiB block takes ~2-4 us; in Python each block also
 * costs an interpreter round trip and a GIL release/reacquire, which caps one
 * thread below fsverity-utils and makes two threads slower than one.
 *
 * Engines, chosen per call:
 *  - SHA-256 with the x86 SHA extensions, two blocks interleaved
 *    (_sha256x2.c) when CPUID reports SHA, SSSE3 and SSE4.1, the prefix and
 *    the block size are multiples of 64 bytes, and VERITYFUSE_NO_SHANI was
 *    not set when the module was imported;
 *  - otherwise libcrypto's one-shot SHA-256/512 (SHA-NI one block at a time
 *    where OpenSSL finds it), from a copy of the state after the prefix.
 * verityfuse falls back to hashlib when this module is not built.
 *
 * Large requests are shared with one helper thread (_hbpool.c).  The
 * common verified read (pread + hash + compare) is one call: read_verify
 * (_readverify.c); the FUSE shim answers most reads through fast_read
 * (_fastread.c, its leaf table in _leaftable.c) without entering Python, and
 * local mode's opens of sealed files (_fastopen.c); its lookups call the view's
 * lookup as a plain function (_fastlookup.c).  Store index entries as written are
 * parsed and checked in one call (_indexentry.c).
 * A seal worker's small files are sealed into tmp/ a chunk a call: seal_small
 * (_sealchunk.c, each file by _sealsmall.c).  A tree is built from the page
 * cache, not a copy, where the file can be mapped: hash_mapped (_mapped.c).
 *
 * Environment, read once at import: VERITYFUSE_NO_SHANI=1 forces OpenSSL for
 * SHA-256 (to compare).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* The one-shot SHA*_Init/Update/Final calls are deprecated in OpenSSL 3 in
 * favour of EVP, but EVP adds a provider round trip per call that costs ~10%
 * on 4 KiB blocks; the low-level functions are still shipped and exact. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#include "_sha256x2.c"
#include "_hbpool.c"

/* Split a request into pieces of about this many bytes (whole pairs of
 * blocks): small enough that the two threads finish close together (a piece
 * is ~15 us of hashing), large enough that claiming one costs nothing (an
 * atomic add on a shared line, well under 1% of a piece). */
#ifndef PIECE_BYTES
#define PIECE_BYTES (32 * 1024)
#endif
/* Below this the caller hashes alone: the helper would not even have
 * noticed the post before the caller is done. */
#define MIN_SPLIT_BYTES (128 * 1024)
/* Below this the GIL is kept: hashing 16 KiB takes ~6 us, while a thread
 * that drops the GIL may wait for another Python thread's switch interval
 * (5 ms) to get it back; such requests gain nothing from a second core. */
#define MIN_RELEASE_GIL_BYTES (16 * 1024)

enum { ALG_SHA256 = 1, ALG_SHA512 = 2 };  /* FS_VERITY_HASH_ALG_* */
enum { ENG_SHANI, ENG_OSSL256, ENG_OSSL512 };

static int g_shani;       /* the 2-way SHA-NI engine may be used */
static int g_cpu_shani;   /* the CPU has it (whether or not disabled) */
static int g_threads = 2; /* configure(): 1 = never use the helper */

/* Everything a piece needs; read-only while the threads work. */
struct hctx {
    int engine;
    size_t bs, ds, nblocks;
    const unsigned char *data;
    SHA256_CTX s256;
    SHA512_CTX s512;
#ifdef HAVE_SHANI_CODE
    struct sha256ni ni;
#endif
};

/* Hash blocks [first, first + n) into out (n digests). */
static void hash_range(const struct hctx *c, size_t first, size_t n, unsigned char *out)
{
    const unsigned char *p = c->data + first * c->bs;
    switch (c->engine) {
#ifdef HAVE_SHANI_CODE
    case ENG_SHANI:
        sha256ni_blocks(&c->ni, p, c->bs, n, out);
        return;
#endif
    case ENG_OSSL256:
        for (size_t i = 0; i < n; i++) {
            SHA256_CTX x = c->s256;
            SHA256_Update(&x, p + i * c->bs, c->bs);
            SHA256_Final(out + i * SHA256_DIGEST_LENGTH, &x);
        }
        return;
    default:
        for (size_t i = 0; i < n; i++) {
            SHA512_CTX x = c->s512;
            SHA512_Update(&x, p + i * c->bs, c->bs);
            SHA512_Final(out + i * SHA512_DIGEST_LENGTH, &x);
        }
        return;
    }
}

/* A request: hash into out, or (out == NULL) compare with expected. */
struct request {
    const struct hctx *c;
    size_t piece_blocks;
    unsigned char *out;
    const unsigned char *expected;
    atomic_size_t first_bad;  /* smallest mismatching block seen; SIZE_MAX = none */
};

#define VERIFY_BATCH 8  /* blocks hashed per compare step: even, for the 2-way engine */

/* Compare blocks [first, first + n) with their expected hashes, recording the
 * first mismatch in r->first_bad. */
static void verify_range(struct request *r, size_t first, size_t n)
{
    const struct hctx *c = r->c;
    unsigned char got[VERIFY_BATCH * SHA512_DIGEST_LENGTH];
    for (size_t i = 0; i < n; i += VERIFY_BATCH) {
        size_t k = n - i < VERIFY_BATCH ? n - i : VERIFY_BATCH;
        hash_range(c, first + i, k, got);
        for (size_t b = 0; b < k; b++) {
            size_t idx = first + i + b;
            if (memcmp(got + b * c->ds, r->expected + idx * c->ds, c->ds) != 0) {
                size_t cur = atomic_load(&r->first_bad);
                while (idx < cur && !atomic_compare_exchange_weak(&r->first_bad, &cur, idx))
                    ;
                return;
            }
        }
    }
}

/* Blocks [first, first + n) of piece number `piece` of r. */
static size_t piece_blocks(const struct request *r, size_t piece, size_t *first)
{
    *first = piece * r->piece_blocks;
    size_t left = r->c->nblocks - *first;
    return left < r->piece_blocks ? left : r->piece_blocks;
}

static void do_piece(void *arg, size_t piece)
{
    struct request *r = arg;
    size_t first, n = piece_blocks(r, piece, &first);
    if (r->out != NULL) {
        hash_range(r->c, first, n, r->out + first * r->c->ds);
        return;
    }
    /* Pieces after a known mismatch cannot change the answer (the smallest
     * bad index); pieces before it are always finished, so it is exact. */
    if (first >= atomic_load_explicit(&r->first_bad, memory_order_relaxed))
        return;
    verify_range(r, first, n);
}

/* Prepare the hashing context for arguments already checked: alg is known, bs > 0
 * and divides len. */
static void hctx_init(struct hctx *c, int alg, const void *prefix, size_t prefix_len,
                      const void *data, size_t len, size_t bs)
{
    c->bs = bs;
    c->nblocks = len / bs;
    c->data = data;
    if (alg == ALG_SHA512) {
        c->engine = ENG_OSSL512;
        c->ds = SHA512_DIGEST_LENGTH;
        SHA512_Init(&c->s512);
        SHA512_Update(&c->s512, prefix, prefix_len);
        return;
    }
    c->ds = SHA256_DIGEST_LENGTH;
#ifdef HAVE_SHANI_CODE
    /* The engine relies on whole 64-byte blocks for prefix and data. */
    if (g_shani && prefix_len % 64 == 0 && bs % 64 == 0) {
        c->engine = ENG_SHANI;
        sha256ni_setup(&c->ni, prefix, prefix_len, c->bs);
        return;
    }
#endif
    c->engine = ENG_OSSL256;
    SHA256_Init(&c->s256);
    SHA256_Update(&c->s256, prefix, prefix_len);
}

/* Check the common arguments and prepare the hashing context (GIL held). */
static int setup(struct hctx *c, int alg, const Py_buffer *prefix, const Py_buffer *data,
                 Py_ssize_t bs, int threads)
{
    if (alg != ALG_SHA256 && alg != ALG_SHA512) {
        PyErr_Format(PyExc_ValueError, "unknown hash algorithm %d (1 = sha256, 2 = sha512)", alg);
        return -1;
    }
    if (bs <= 0) {
        PyErr_Format(PyExc_ValueError, "block_size must be positive, not %zd", bs);
        return -1;
    }
    if (data->len % bs != 0) {
        PyErr_Format(PyExc_ValueError, "data (%zd bytes) is not a whole number of %zd-byte blocks",
                     data->len, bs);
        return -1;
    }
    if (threads < 0) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 0 (0 = the configured default), not %d",
                     threads);
        return -1;
    }
    hctx_init(c, alg, prefix->buf, (size_t)prefix->len, data->buf, (size_t)data->len,
              (size_t)bs);
    return 0;
}

/* One hash per block of the request: what verify_blocks and read_verify both require. */
static int check_expected(const struct hctx *c, const Py_buffer *expected)
{
    if ((size_t)expected->len == c->nblocks * c->ds)
        return 0;
    PyErr_Format(PyExc_ValueError,
                 "expected hashes are %zd bytes, but %zu blocks need %zu bytes of hashes",
                 expected->len, c->nblocks, c->nblocks * c->ds);
    return -1;
}

/* Run a request over all blocks, in pieces of about piece_bytes, on the
 * helper too when it has at least split_bytes; without the GIL when it has
 * at least release_bytes. */
static void run_request(struct request *r, int threads, void (*work)(void *, size_t),
                        size_t piece_bytes, size_t split_bytes, size_t release_bytes)
{
    const struct hctx *c = r->c;
    /* Whole pairs, so the 2-way engine never gets an odd block mid-request. */
    size_t pb = piece_bytes / c->bs;
    pb = pb < 2 ? 2 : pb & ~(size_t)1;
    r->piece_blocks = pb;
    atomic_init(&r->first_bad, SIZE_MAX);
    struct pool_job j = {.work = work, .arg = r, .npieces = (c->nblocks + pb - 1) / pb};
    int eff = threads ? threads : g_threads;
    size_t bytes = c->nblocks * c->bs;
    int split = eff > 1 && bytes >= split_bytes && j.npieces > 1;
    if (split)
        split = pool_ensure_helper();  /* GIL still held here */
    if (bytes < release_bytes) {
        pool_run(&j, 0);
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    pool_run(&j, split);
    Py_END_ALLOW_THREADS
}

/* SHA-256 of one message: with SHA-NI where it may be used, else OpenSSL's (the same
 * bytes: tests/test_native.py compares both with hashlib). */
static void sha256_one(const void *msg, size_t len, unsigned char *out)
{
#ifdef HAVE_SHANI_CODE
    if (g_shani) {
        sha256ni_oneshot(msg, len, out);
        return;
    }
#endif
    SHA256(msg, len, out);
}

static PyObject *sha256(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer b;
    unsigned char md[SHA256_DIGEST_LENGTH];
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) != 0)
        return NULL;
    if (b.len < MIN_RELEASE_GIL_BYTES) {
        sha256_one(b.buf, (size_t)b.len, md);
    } else {
        Py_BEGIN_ALLOW_THREADS
        sha256_one(b.buf, (size_t)b.len, md);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    return PyBytes_FromStringAndSize((const char *)md, sizeof md);
}

static PyObject *hash_blocks(PyObject *self, PyObject *args)
{
    (void)self;
    int alg, threads = 0;
    Py_buffer prefix, data;
    Py_ssize_t bs;
    PyObject *out = NULL;
    struct hctx c;

    if (!PyArg_ParseTuple(args, "iy*y*n|i:hash_blocks", &alg, &prefix, &data, &bs, &threads))
        return NULL;
    if (setup(&c, alg, &prefix, &data, bs, threads) < 0)
        goto done;
    if (c.nblocks > (size_t)PY_SSIZE_T_MAX / c.ds) {
        PyErr_SetString(PyExc_OverflowError, "too many blocks");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(c.nblocks * c.ds));
    if (!out)
        goto done;
    struct request r = {.c = &c, .out = (unsigned char *)PyBytes_AS_STRING(out)};
    run_request(&r, threads, do_piece, PIECE_BYTES, MIN_SPLIT_BYTES, MIN_RELEASE_GIL_BYTES);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&data);
    return out;
}

static PyObject *verify_blocks(PyObject *self, PyObject *args)
{
    (void)self;
    int alg, threads = 0;
    Py_buffer prefix, data, expected;
    Py_ssize_t bs;
    PyObject *res = NULL;
    struct hctx c;

    if (!PyArg_ParseTuple(args, "iy*y*ny*|i:verify_blocks", &alg, &prefix, &data, &bs,
                          &expected, &threads))
        return NULL;
    if (setup(&c, alg, &prefix, &data, bs, threads) < 0)
        goto done;
    if (check_expected(&c, &expected) < 0)
        goto done;
    struct request r = {.c = &c, .expected = expected.buf};
    run_request(&r, threads, do_piece, PIECE_BYTES, MIN_SPLIT_BYTES, MIN_RELEASE_GIL_BYTES);
    size_t bad = atomic_load(&r.first_bad);
    res = bad == SIZE_MAX ? PyLong_FromLong(-1) : PyLong_FromSize_t(bad);
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&data);
    PyBuffer_Release(&expected);
    return res;
}

static PyObject *configure(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"threads", NULL};
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i:configure", names, &threads))
        return NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 1, not %d", threads);
        return NULL;
    }
    g_threads = threads > 2 ? 2 : threads;  /* one helper: at most two threads per request */
    Py_RETURN_NONE;
}

static PyObject *info(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:s,s:s,s:i,s:O,s:O,s:k,s:(kk),s:k,s:K}",
                         "sha256", g_shani ? "sha-ni-2way" : "openssl",
                         "sha512", "openssl",
                         "threads", g_threads,
                         "cpu_sha_ni", g_cpu_shani ? Py_True : Py_False,
                         "helper_running", g_helper_started ? Py_True : Py_False,
                         "helper_jobs", (unsigned long)atomic_load(&g_helper_jobs),
                         "split_pieces", (unsigned long)atomic_load(&g_split_pieces_caller),
                         (unsigned long)atomic_load(&g_split_pieces_helper),
                         "jobs_alone", (unsigned long)atomic_load(&g_jobs_alone),
                         "wait_us", (unsigned long long)(atomic_load(&g_wait_ns) / 1000));
}

#include "_readverify.c"
#include "_leaftable.c"
#include "_replybufs.c"
#include "_fastread.c"
#include "_fastopen.c"
#include "_fastlookup.c"
#include "_indexentry.c"
#include "_sealsmall.c"
#include "_sealchunk.c"
#include "_mapped.c"

static PyMethodDef methods[] = {
    {"hash_blocks", hash_blocks, METH_VARARGS,
     "hash_blocks(alg, prefix, data, block_size, threads=0) -> bytes\n\n"
     "The concatenated H(prefix || block) of every block of data.  alg: 1 = sha256,\n"
     "2 = sha512.  threads: 0 = the configured default, 1 = this thread only."},
    {"verify_blocks", verify_blocks, METH_VARARGS,
     "verify_blocks(alg, prefix, data, block_size, expected, threads=0) -> int\n\n"
     "Hash every block of data and compare with expected (the concatenated hashes).\n"
     "Returns -1 if all match, else the index of the first mismatching block."},
    {"read_verify", read_verify, METH_VARARGS, READ_VERIFY_DOC},
    {"seal_small", seal_small, METH_VARARGS, SEAL_SMALL_DOC},
    {"sha256", sha256, METH_O,
     "sha256(data) -> bytes\n\nSHA-256 of data, as sealing hashes a descriptor or a key "
     "(SHA-NI or OpenSSL:\nwhat hashlib gives)."},
    {"hash_mapped", hash_mapped, METH_VARARGS, HASH_MAPPED_DOC},
    FAST_METHODS
    FAST_OPEN_METHODS
    FAST_LOOKUP_METHODS
    INDEX_ENTRY_METHODS
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(threads) -> None\n\n"
     "threads: 1 = never use the helper thread, 2 = use it for large requests."},
    {"info", info, METH_NOARGS,
     "info() -> dict: the engines in use, the thread setting, and the helper's share:\n"
     "helper_jobs (requests it joined), split_pieces ((caller, helper) pieces of the\n"
     "requests offered to it), jobs_alone (large requests not offered to it because\n"
     "it had been slow to help: the machine's other CPU was busy), wait_us (total time\n"
     "callers waited for the helper's last piece: how close together the two finish)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_hashblocks", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__hashblocks(void)
{
#ifdef HAVE_SHANI_CODE
    g_cpu_shani = sha256ni_cpu_ok();
#endif
    const char *off = getenv("VERITYFUSE_NO_SHANI");
    g_shani = g_cpu_shani && !(off && *off && strcmp(off, "0") != 0);
    pthread_atfork(NULL, NULL, guard_atfork_child);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) < 2)
        g_threads = 1;
    return PyModule_Create(&module);
}
