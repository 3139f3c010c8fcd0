/*
 * fast_read: the common verified read answered from the FUSE request itself,
 * without entering Python.
 *
 * Included by _hashblocks.c after _readverify.c (one translation unit).
 *
 * A read request costs pyfuse3 a coroutine, a trio task and the handler's
 * Python (~15-40 us), more than reading and hashing 4 KiB (~3 us).  The FUSE
 * shim (_fuseshim.c) calls fast_read (its address handed over by Python) for
 * every FUSE_READ before pyfuse3 sees it; fast_read answers the read when
 * everything it needs is at hand, and otherwise declines, and the request
 * goes to Python exactly as before.  It answers only the happy path:
 *
 *   - the handle was registered by Python (fast_register) when it was opened
 *     with a verified reader: backing fd, sealed size, hash parameters and the
 *     tree's key (the hash algorithm and the file's digest);
 *   - the read lies inside the sealed size and spans at most FR_MAX_READ
 *     bytes of whole blocks;
 *   - every leaf tree block it needs is in the leaf table (fast_put_leaf),
 *     where Python puts only blocks it has verified up to the root hash (a
 *     one-block file's expected hash is its root hash, given at registration);
 *   - the data is in memory (RWF_NOWAIT where the file system can wait; where
 *     it refuses that, as FUSE and virtio-fs do, cachestat(2) says whether every
 *     page is cached, and the file's last block is left to Python);
 *   - every block hashes to its expected hash, and a read of the last block
 *     finds the file ending at its sealed size.
 *
 * Anything else (a mismatch, a truncated or extended file, a read that would
 * wait, a missing leaf) declines: Python repeats the read on its own and
 * reports what it finds, with its one error boundary, messages and counters;
 * a mismatch is also kept for the handle (its block and the hash it had), and
 * Python fails that read with it whatever its own read finds: a host that
 * flips a byte and puts it back at once must still be seen (and measured).
 * So the trust rule is unchanged: the bytes replied are the ones copied into
 * this process's buffer and hashed there, against hashes verified to the root.
 *
 * Threads: all of this state is touched with the GIL held (Python calls
 * these functions, and pyfuse3 processes requests with the GIL), so the GIL
 * orders it.  fast_read takes its reply buffer (a wait for one releases the
 * GIL) before it looks the handle up, copies what it needs (the handle's fields
 * and the expected hashes) before it may release the GIL to hash, and it is only ever
 * called on pyfuse3's request thread (one request at a time), which is also
 * the thread that forgets a handle before closing its fd.
 *
 * Replies: the answer is made in a reply buffer (_replybufs.c), kept until the
 * shim says it was sent.
 *
 * Bounds: FR_HANDLES registered handles, at most half of them in use (a
 * handle past that is served by Python), the leaf table's (_leaftable.c), the
 * reply buffers'.
 */
#define FR_HANDLES 4096          /* a power of two */
#define FR_PREFIX 128            /* a padded salt: one SHA-512 block at most */

struct fr_file {
    uint64_t fh, ino;            /* ino: a native handle's (_fastopen.c) */
    int used, fd, alg, flags, single;
    int native;                  /* opened by fast_open: its fd is closed by fast_release */
    size_t bs, hpb, prefix_len, key_len;
    long long data_size;
    /* The block of the last read that did not hash to its expected hash (-1: none) and
     * the hash it had, until Python takes them (fast_take_mismatch). */
    long long bad_off;
    unsigned char prefix[FR_PREFIX], key[FR_KEY], root[SHA512_DIGEST_LENGTH],
        bad_hash[SHA512_DIGEST_LENGTH];
};

static struct fr_file g_files[FR_HANDLES];
static size_t g_nfiles;
static unsigned char g_expected[(FR_MAX_READ + FR_MAX_BLOCK) / FR_MIN_BLOCK * SHA512_DIGEST_LENGTH];
/* What fast_read did: answered (reads, bytes, blocks), or why it declined. */
static unsigned long long g_fr_reads, g_fr_bytes, g_fr_blocks, g_fr_no_handle, g_fr_no_leaf,
    g_fr_unfit, g_fr_would_wait, g_fr_failed;

static size_t fr_slot(uint64_t fh)
{
    return (size_t)((fh * 0x9E3779B97F4A7C15ull) >> 52) & (FR_HANDLES - 1);
}

static struct fr_file *fr_find(uint64_t fh)
{
    for (size_t i = fr_slot(fh), n = 0; n < FR_HANDLES; i = (i + 1) & (FR_HANDLES - 1), n++) {
        if (!g_files[i].used)
            return NULL;
        if (g_files[i].fh == fh)
            return &g_files[i];
    }
    return NULL;
}

/* Remove slot i of the linear-probing table, moving later entries of its run back. */
static void fr_remove(size_t i)
{
    g_files[i].used = 0;
    g_nfiles--;
    for (size_t j = (i + 1) & (FR_HANDLES - 1); g_files[j].used; j = (j + 1) & (FR_HANDLES - 1)) {
        size_t home = fr_slot(g_files[j].fh);
        /* j may move to the hole i unless its home lies cyclically in (i, j]. */
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            g_files[i] = g_files[j];
            g_files[j].used = 0;
            i = j;
        }
    }
}

#define FR_CACHESTAT (-1)  /* fast_register's flags: ask cachestat(2), then read with 0 */

struct fr_cachestat_range { uint64_t off, len; };
struct fr_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

/* Whether every page of [off, off + len) of fd is in the page cache now. */
static int fr_all_cached(int fd, long long off, size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t first = (uint64_t)off / (uint64_t)page;
    uint64_t last = ((uint64_t)off + len - 1) / (uint64_t)page;
    struct fr_cachestat_range r = {first * (uint64_t)page, (last + 1 - first) * (uint64_t)page};
    struct fr_cachestat cs;
    if (len == 0)
        return 1;
    if (syscall(451 /* cachestat */, fd, &r, &cs, 0) != 0)
        return 0;
    return cs.nr_cache >= last + 1 - first;
}

/* Answer the read of `size` bytes at `off` of handle fh: 0 with *out and *len set, in
 * reply buffer *token (kept until fast_done(*token)), or -1: the caller hands the request
 * to Python.  The shim's entry (fast_entry): on pyfuse3's request thread, GIL held. */
static int fast_read(uint64_t fh, size_t size, int64_t off, const void **out, size_t *len,
                     int *token)
{
    /* The buffer first: a wait for one releases the GIL, and the handle table may change
     * meanwhile (a handle forgotten, its fh registered again for another file), so the
     * handle is looked up, and everything of it read, only after it. */
    int slot_buf = fr_take();
    struct fr_file *f = fr_find(fh);
    if (f == NULL) {
        g_fr_no_handle++;
        goto decline;
    }
    long long data_size = f->data_size, bs = (long long)f->bs;
    if (off < 0 || off >= data_size || size == 0 || size > FR_MAX_READ) {
        g_fr_unfit++;  /* at or past the end: Python's end-of-file check answers */
        goto decline;
    }
    /* Without overflow: off < data_size, and nothing is added past data_size. */
    long long end = (long long)size > data_size - off ? data_size : off + (long long)size;
    long long start = off - off % bs, rem = end % bs, stop = end;
    if (rem != 0)  /* up to a whole block, or to the short last block (hashed zero-padded) */
        stop = data_size - end > bs - rem ? end + (bs - rem) : data_size;
    size_t n = (size_t)(stop - start), padded = (n + f->bs - 1) / f->bs * f->bs;
    size_t first = (size_t)(start / bs), nb = padded / f->bs, ds = f->alg == ALG_SHA512
        ? SHA512_DIGEST_LENGTH : SHA256_DIGEST_LENGTH;
    if (padded > FR_BUF_BYTES || g_frbuf == NULL) {
        g_fr_unfit++;
        goto decline;
    }
    unsigned char *buf = g_frbuf + (size_t)slot_buf * FR_BUF_BYTES;
    if (f->single) {
        if (first != 0 || nb != 1) {
            g_fr_unfit++;
            goto decline;
        }
        memcpy(g_expected, f->root, ds);
    } else {
        for (size_t b = first; b < first + nb;) {
            size_t leaf = b / f->hpb, slot = b % f->hpb, count = f->hpb - slot;
            if (count > first + nb - b)
                count = first + nb - b;
            struct fr_leaf *l = fr_leaf_get(f->key, f->key_len, leaf);
            if (l == NULL || (slot + count) * ds > l->size) {
                g_fr_no_leaf++;
                goto decline;
            }
            memcpy(g_expected + (b - first) * ds, l->block + slot * ds, count * ds);
            b += count;
        }
    }
    /* Copies: the GIL may be released while the blocks are read and hashed. */
    int fd = f->fd, flags = f->flags, may_block = 0;
    if (flags == FR_CACHESTAT) {
        /* RWF_NOWAIT refused (FUSE, virtio-fs): the page cache must hold every page, and
         * never the last block, whose end-of-file check could ask the file system.  A
         * page evicted in between makes the read wait: the GIL is released for it. */
        if (stop == data_size || !fr_all_cached(fd, start, n)) {
            g_fr_would_wait++;
            goto decline;
        }
        flags = 0;
        may_block = 1;
    }
    struct hctx c;
    hctx_init(&c, f->alg, f->prefix, f->prefix_len, buf, padded, f->bs);
    size_t fail_at;
    int fail_errno;
    size_t bad = read_verify_core(&c, g_expected, fd, flags, may_block, start, n, buf, 0,
                                  &fail_at, &fail_errno);
    if (fail_at != SIZE_MAX) {
        if (fail_errno == EAGAIN)
            g_fr_would_wait++;
        else
            g_fr_failed++;  /* an error or a truncated file: Python names it */
        goto decline;
    }
    if (bad != SIZE_MAX) {
        /* Python fails this read with it (fast_take_mismatch).  The handle looked up
         * again: the GIL may have been released while the blocks were read and hashed. */
        struct fr_file *g = fr_find(fh);
        if (g != NULL) {
            g->bad_off = start + (long long)bad * bs;
            hash_range(&c, bad, 1, g->bad_hash);
        }
        g_fr_failed++;
        goto decline;
    }
    if (stop == data_size) {
        /* The file must end at its sealed size (Python names an extension). */
        unsigned char one;
        struct iovec iov = {.iov_base = &one, .iov_len = 1};
        ssize_t more = preadv2(fd, &iov, 1, (off_t)data_size, flags);
        if (more != 0) {
            if (more < 0 && errno == EAGAIN)
                g_fr_would_wait++;
            else
                g_fr_failed++;
            goto decline;
        }
    }
    g_fr_reads++;
    g_fr_blocks += nb;
    g_fr_bytes += (unsigned long long)(end - off);
    *out = buf + (off - start);
    *len = (size_t)(end - off);
    *token = slot_buf;
    return 0;
decline:
    fast_done(slot_buf);
    return -1;
}

/* --- Python interface --- */

/* The arguments (id, fd, alg, prefix, block_size, data_size, key, root, flags) of
 * fast_register (id: the handle) and fast_inode_put (id: the inode), `fmt` their
 * PyArg format, into *f (fh, ino, used left 0): 0, or -1 with an exception set. */
static int fr_parse(PyObject *args, const char *fmt, unsigned long long *id, int *fd,
                    struct fr_file *f)
{
    int alg, flags, rc = -1;
    Py_ssize_t bs;
    long long data_size;
    Py_buffer prefix, key, root;
    if (!PyArg_ParseTuple(args, fmt, id, fd, &alg, &prefix, &bs, &data_size, &key, &root,
                          &flags))
        return -1;
    size_t ds = alg == ALG_SHA512 ? SHA512_DIGEST_LENGTH : SHA256_DIGEST_LENGTH;
    if ((alg != ALG_SHA256 && alg != ALG_SHA512) || bs < FR_MIN_BLOCK || bs > FR_MAX_BLOCK
        || (bs & (bs - 1)) || data_size <= 0 || prefix.len > FR_PREFIX
        || key.len < 9 || key.len > FR_KEY || (root.len != 0 && (size_t)root.len != ds)
        /* the root hash is the one block's hash only for a file of one block */
        || (root.len != 0 && data_size > bs)) {
        PyErr_SetString(PyExc_ValueError, "parameters out of range");
        goto done;
    }
    *f = (struct fr_file){
        .fd = *fd, .alg = alg, .flags = flags, .single = root.len != 0, .bs = (size_t)bs,
        .hpb = (size_t)bs / ds, .prefix_len = (size_t)prefix.len, .key_len = (size_t)key.len,
        .data_size = data_size, .bad_off = -1,
    };
    memcpy(f->prefix, prefix.buf, (size_t)prefix.len);
    memcpy(f->key, key.buf, (size_t)key.len);
    memcpy(f->root, root.buf, (size_t)root.len);
    rc = 0;
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&key);
    PyBuffer_Release(&root);
    return rc;
}

static PyObject *fast_register(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long fh;
    int fd;
    struct fr_file parsed;
    if (fr_parse(args, "Kiiy*nLy*y*i:fast_register", &fh, &fd, &parsed) < 0
        || fr_map_buffers() < 0)
        return NULL;
    struct fr_file *f = fr_find(fh);
    if (f == NULL) {
        if (g_nfiles >= FR_HANDLES / 2)  /* full enough: Python serves this one */
            Py_RETURN_FALSE;
        size_t i = fr_slot(fh);
        while (g_files[i].used)
            i = (i + 1) & (FR_HANDLES - 1);
        f = &g_files[i];
        g_nfiles++;
    }
    *f = parsed;
    f->fh = fh;
    f->used = 1;
    Py_RETURN_TRUE;
}

static PyObject *fast_forget(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct fr_file *f = fr_find(fh);
    if (f != NULL)
        fr_remove((size_t)(f - g_files));
    Py_RETURN_NONE;
}

static PyObject *fast_take_mismatch(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct fr_file *f = fr_find(fh);
    if (f == NULL || f->bad_off < 0)
        Py_RETURN_NONE;
    long long off = f->bad_off;
    f->bad_off = -1;
    Py_ssize_t ds = f->alg == ALG_SHA512 ? SHA512_DIGEST_LENGTH : SHA256_DIGEST_LENGTH;
    return Py_BuildValue("(Ly#)", off, (const char *)f->bad_hash, ds);
}

static PyObject *fast_read_py(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long fh;
    Py_ssize_t size;
    long long off;
    if (!PyArg_ParseTuple(args, "KnL:fast_read", &fh, &size, &off))
        return NULL;
    const void *out;
    size_t len;
    int token;
    if (size < 0 || fast_read(fh, (size_t)size, off, &out, &len, &token) != 0)
        Py_RETURN_NONE;
    PyObject *res = PyBytes_FromStringAndSize(out, (Py_ssize_t)len);
    fast_done(token);
    return res;
}

static PyObject *fast_info(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    size_t leaves = g_nleaves;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n,s:n,s:n,s:n}",
                         "reads", g_fr_reads, "bytes", g_fr_bytes, "blocks", g_fr_blocks,
                         "buffer_waits", g_fr_buf_waits,
                         "declined_no_handle", g_fr_no_handle, "declined_no_leaf", g_fr_no_leaf,
                         "declined_unfit", g_fr_unfit, "declined_would_wait", g_fr_would_wait,
                         "declined_failed", g_fr_failed, "handles", (Py_ssize_t)g_nfiles,
                         "leaves", (Py_ssize_t)leaves, "leaf_bytes", (Py_ssize_t)g_leaf_bytes,
                         "leaf_budget", (Py_ssize_t)g_leaf_budget,
                         "leaf_slots", (Py_ssize_t)(g_nsets * FR_WAYS));
}

static PyObject *fast_entry(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    /* the shim's vf_fast_read_fn and vf_fast_done_fn */
    return Py_BuildValue("(NN)", PyLong_FromVoidPtr((void *)fast_read),
                         PyLong_FromVoidPtr((void *)fast_done));
}

#define FAST_METHODS LEAF_METHODS \
    {"fast_register", fast_register, METH_VARARGS, \
     "fast_register(fh, fd, alg, prefix, block_size, data_size, key, root, flags) -> bool\n\n" \
     "Let fast_read answer reads of handle fh: fd (open for the handle's life, until\n" \
     "fast_forget), the sealed size, the tree's key (algorithm number + digest), root =\n" \
     "the root hash for a one-block file (else b''), flags for preadv2 (RWF_NOWAIT\n" \
     "where a read could wait; -1: ask cachestat(2) first, where RWF_NOWAIT is refused).\n" \
     "False when the table is full (Python serves it)."}, \
    {"fast_forget", fast_forget, METH_O, "fast_forget(fh): before its fd is closed."}, \
    {"fast_take_mismatch", fast_take_mismatch, METH_O, \
     "fast_take_mismatch(fh) -> (offset, actual hash) or None: the block of handle fh\n" \
     "that the last declined read found not hashing to its expected hash (forgotten\n" \
     "once taken)."}, \
    {"fast_read", fast_read_py, METH_VARARGS, \
     "fast_read(fh, size, offset) -> bytes or None: what the FUSE hook would reply\n" \
     "(None: it declines, Python serves the read).  For tests, on the one thread that\n" \
     "serves FUSE requests (it shares their buffers)."}, \
    {"fast_info", fast_info, METH_NOARGS, "fast_info() -> dict: counters and sizes."}, \
    {"fast_entry", fast_entry, METH_NOARGS, \
     "fast_entry() -> (int, int): the addresses of the C functions the FUSE shim calls\n" \
     "(fast_read, and fast_done once a reply buffer was sent)."},
