/*
 * The leaf table of fast_read (_fastread.c): leaf tree blocks verified to the
 * root hash, keyed by (hash algorithm number + file digest, leaf index).
 *
 * Included by _hashblocks.c before _fastread.c (one translation unit).
 *
 * Python's tree-block cache keeps its leaf blocks here (verifier.TreeBlockCache.
 * use_leaf_table): the one copy, which fast_read reads its expected hashes from
 * and Python reads back with fast_get_leaf.  Only Python puts blocks, and only
 * after verifying them up to the root hash; the key names exactly one tree (a
 * file digest covers the root hash and the parameters), so a leaf can never be
 * used for another file's blocks.
 *
 * Bounds: g_nsets x FR_WAYS slots (twice as many as 4 KiB leaves fit in the
 * byte budget) and g_leaf_budget bytes of blocks.  A new leaf takes the least
 * recently used slot of its set; over the byte budget, a clock hand over all
 * slots frees blocks not used since its last pass, so a full table keeps taking
 * new leaves: the files read now are the ones worth answering natively.
 *
 * Threads: touched only with the GIL held (see _fastread.c).
 */

#define FR_WAYS 8
#define FR_MIN_SETS 64
#define FR_MAX_BLOCK (64 * 1024) /* fs-verity's largest block size (the store's limit) */
#define FR_MIN_BLOCK 1024        /* the kernel's smallest */
#define FR_KEY 65                /* the algorithm's number, then the digest */

struct fr_leaf {
    unsigned char *block;        /* NULL: a free slot */
    uint64_t index, stamp;       /* stamp: last use, for the set's LRU */
    size_t size, key_len;
    int used;                    /* used since the clock hand last passed */
    unsigned char key[FR_KEY];
};

static struct fr_leaf *g_leaves;  /* g_nsets * FR_WAYS, on the first put */
/* Sets (a power of two): twice as many slots as 4 KiB leaves fit in the budget, so
 * that few leaves meet a full set below it (fr_size_table). */
static size_t g_nsets = 1024;
static size_t g_leaf_bytes, g_leaf_budget = 16 << 20;
static uint64_t g_stamp;
static size_t g_hand, g_nleaves;

static size_t fr_set(const unsigned char *key, size_t key_len, uint64_t index)
{
    uint64_t h = 0;
    /* The key ends with a digest: its bytes are already uniform. */
    memcpy(&h, key + key_len - sizeof h, sizeof h);
    h ^= index * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    return (size_t)(h * 0xBF58476D1CE4E5B9ull >> 32) & (g_nsets - 1);
}

static struct fr_leaf *fr_leaf_get(const unsigned char *key, size_t key_len, uint64_t index)
{
    if (g_leaves == NULL)
        return NULL;
    struct fr_leaf *set = g_leaves + fr_set(key, key_len, index) * FR_WAYS;
    for (int w = 0; w < FR_WAYS; w++) {
        struct fr_leaf *l = &set[w];
        if (l->block && l->index == index && l->key_len == key_len
            && memcmp(l->key, key, key_len) == 0) {
            l->stamp = ++g_stamp;
            l->used = 1;
            return l;
        }
    }
    return NULL;
}

static void fr_leaf_free(struct fr_leaf *l)
{
    g_leaf_bytes -= l->size;
    g_nleaves--;
    free(l->block);
    l->block = NULL;
}

/* Free one block the clock hand finds unused since its last pass (clearing the
 * marks it passes); 0 if there is none to free. */
static int fr_evict_one(void)
{
    if (g_leaves == NULL || g_nleaves == 0)
        return 0;
    for (size_t steps = 0; steps < 2 * g_nsets * FR_WAYS; steps++) {
        struct fr_leaf *l = &g_leaves[g_hand];
        g_hand = (g_hand + 1) % (g_nsets * FR_WAYS);
        if (l->block == NULL)
            continue;
        if (l->used) {
            l->used = 0;
            continue;
        }
        fr_leaf_free(l);
        return 1;
    }
    return 0;
}

/* Size the slot table from the budget (emptying it when that changes its size). */
static void fr_size_table(void)
{
    size_t want = FR_MIN_SETS;
    while (want * FR_WAYS < 2 * (g_leaf_budget / 4096))
        want *= 2;
    if (want == g_nsets)
        return;
    for (size_t i = 0; g_leaves && i < g_nsets * FR_WAYS; i++)
        if (g_leaves[i].block)
            fr_leaf_free(&g_leaves[i]);
    free(g_leaves);
    g_leaves = NULL;  /* allocated again by the next put */
    g_nsets = want;
    g_hand = 0;
}

static PyObject *fast_put_leaf(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer key, block;
    unsigned long long index;
    if (!PyArg_ParseTuple(args, "y*Ky*:fast_put_leaf", &key, &index, &block))
        return NULL;
    PyObject *res = NULL;
    if (key.len < 9 || key.len > FR_KEY) {
        PyErr_SetString(PyExc_ValueError, "fast_put_leaf: key out of range");
        goto done;
    }
    if (block.len < FR_MIN_BLOCK || block.len > FR_MAX_BLOCK) {
        res = Py_NewRef(Py_False);  /* a block size fast_read never serves: kept by Python */
        goto done;
    }
    if ((size_t)block.len > g_leaf_budget) {
        res = Py_NewRef(Py_False);  /* never fits: refused before anything is evicted */
        goto done;
    }
    if (fr_leaf_get(key.buf, (size_t)key.len, index) != NULL) {
        res = Py_NewRef(Py_True);  /* already there (and now the most recent) */
        goto done;
    }
    if (g_leaves == NULL && (g_leaves = calloc(g_nsets * FR_WAYS, sizeof *g_leaves)) == NULL) {
        res = PyErr_NoMemory();
        goto done;
    }
    struct fr_leaf *set = g_leaves + fr_set(key.buf, (size_t)key.len, index) * FR_WAYS;
    struct fr_leaf *victim = &set[0];
    for (int w = 0; w < FR_WAYS; w++) {
        if (set[w].block == NULL) {
            victim = &set[w];
            break;
        }
        if (set[w].stamp < victim->stamp)
            victim = &set[w];
    }
    if (victim->block != NULL)
        fr_leaf_free(victim);
    while (g_leaf_bytes + (size_t)block.len > g_leaf_budget) {
        if (!fr_evict_one()) {
            res = Py_NewRef(Py_False);  /* cannot happen (checked above): kept by Python */
            goto done;
        }
    }
    unsigned char *copy = malloc((size_t)block.len);
    if (copy == NULL) {
        res = PyErr_NoMemory();
        goto done;
    }
    memcpy(copy, block.buf, (size_t)block.len);
    g_leaf_bytes += (size_t)block.len;
    g_nleaves++;
    victim->block = copy;
    victim->used = 1;
    victim->size = (size_t)block.len;
    victim->index = index;
    victim->stamp = ++g_stamp;
    victim->key_len = (size_t)key.len;
    memcpy(victim->key, key.buf, (size_t)key.len);
    res = Py_NewRef(Py_True);
done:
    PyBuffer_Release(&key);
    PyBuffer_Release(&block);
    return res;
}

static PyObject *fast_get_leaf(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer key;
    unsigned long long index;
    if (!PyArg_ParseTuple(args, "y*K:fast_get_leaf", &key, &index))
        return NULL;
    struct fr_leaf *l = key.len >= 9 && key.len <= FR_KEY
        ? fr_leaf_get(key.buf, (size_t)key.len, index) : NULL;
    PyObject *res = l == NULL ? Py_NewRef(Py_None)
        : PyBytes_FromStringAndSize((const char *)l->block, (Py_ssize_t)l->size);
    PyBuffer_Release(&key);
    return res;
}

static PyObject *fast_configure(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"leaf_bytes", NULL};
    Py_ssize_t budget;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n:fast_configure", names, &budget))
        return NULL;
    if (budget < 0) {
        PyErr_SetString(PyExc_ValueError, "leaf_bytes must be >= 0");
        return NULL;
    }
    g_leaf_budget = (size_t)budget;
    while (g_leaf_bytes > g_leaf_budget && fr_evict_one())
        ;
    fr_size_table();
    Py_RETURN_NONE;
}

#define LEAF_METHODS \
    {"fast_put_leaf", fast_put_leaf, METH_VARARGS, \
     "fast_put_leaf(key, index, block) -> bool: keep a leaf tree block verified to the\n" \
     "root hash (the one copy: Python's tree-block cache keeps no leaf beside it); False\n" \
     "when it is not kept (a block size fast_read does not serve, or a budget below a\n" \
     "block): then the caller keeps it."}, \
    {"fast_get_leaf", fast_get_leaf, METH_VARARGS, \
     "fast_get_leaf(key, index) -> bytes or None: a leaf block put there."}, \
    {"fast_configure", (PyCFunction)(void (*)(void))fast_configure, \
     METH_VARARGS | METH_KEYWORDS, "fast_configure(leaf_bytes): the leaf table's budget."},
