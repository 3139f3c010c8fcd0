/*
 * A store index entry's canonical form, parsed and checked natively (store_index.py).
 *
 * Every first lookup of a sealed file in local mode reads its index entry; the
 * Python parser (a regular expression, hex decoding, the descriptor's struct and
 * its checks) was ~12 us of a ~85 us lookup in the daemon.  This is only the
 * happy path of that parser: an entry exactly as entry_bytes writes it, every
 * field valid.  Anything else (another valid JSON spelling, any damage) returns
 * None and goes through the Python parser, which says what is wrong: there is one
 * source of error messages, and tests/test_index_entry_native.py checks that both
 * routes give the same entry for every entry this accepts.
 *
 * Included by _hashblocks.c (sha256_one, OpenSSL's SHA512).
 */

#define IE_DESC_SIZE 256
#define IE_MAX_SALT 32

struct ie_cur { const unsigned char *p, *end; };

static int ie_lit(struct ie_cur *c, const char *s)
{
    size_t n = strlen(s);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, s, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

static int ie_nibble(unsigned char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;  /* upper case too: the canonical form writes lower case only */
}

/* The lower-case hex run at c->p up to the next '"' (consumed), decoded into out
 * (room for `room` bytes); its byte count, or -1 if not even-length hex that fits. */
static Py_ssize_t ie_hex(struct ie_cur *c, unsigned char *out, size_t room)
{
    const unsigned char *q = memchr(c->p, '"', (size_t)(c->end - c->p));
    if (q == NULL)
        return -1;
    size_t n = (size_t)(q - c->p);
    if (n % 2 || n / 2 > room)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = ie_nibble(c->p[2 * i]), lo = ie_nibble(c->p[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    c->p = q + 1;
    return (Py_ssize_t)(n / 2);
}

static int ie_zero(const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static uint64_t ie_le(const unsigned char *b, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

/* The checks of merkle.parse_descriptor, Params and store_index._inline_descriptor
 * on a descriptor kept in an entry of algorithm `alg` and digest `digest` (ds bytes). */
static int ie_desc_ok(const unsigned char *d, int alg, const unsigned char *digest, size_t ds,
                      long max_bs)
{
    unsigned log_bs = d[2], salt_size = d[3];
    if (d[0] != 1 || d[1] != alg || log_bs > 31 || salt_size > IE_MAX_SALT)
        return 0;
    uint64_t bs = (uint64_t)1 << log_bs, data_size = ie_le(d + 8, 8);
    if (bs < 2 * ds || bs > (uint64_t)max_bs || data_size > bs)
        return 0;
    if (!ie_zero(d + 4, 4) || !ie_zero(d + 16 + ds, 64 - ds)
        || !ie_zero(d + 80 + salt_size, 32 - salt_size) || !ie_zero(d + 112, 144))
        return 0;
    unsigned char md[SHA512_DIGEST_LENGTH];
    if (alg == ALG_SHA256)
        sha256_one(d, IE_DESC_SIZE, md);
    else
        SHA512(d, IE_DESC_SIZE, md);
    return memcmp(md, digest, ds) == 0;
}

#define INDEX_ENTRY_DOC \
    "index_entry(data, max_block_size) -> None or (alg, digest, path, signature, desc)\n\n" \
    "An index entry exactly as store_index.entry_bytes writes it, every field valid\n" \
    "(the descriptor's as merkle.parse_descriptor checks it, hashing to the digest, of\n" \
    "a file of one block of at most max_block_size): alg the fs-verity number, desc\n" \
    "None or (log_blocksize, salt, data_size, root_hash, raw).  None for anything else,\n" \
    "which store_index's Python parser reads or names as wrong."

static PyObject *index_entry(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer b;
    long max_bs;
    if (!PyArg_ParseTuple(args, "y*l:index_entry", &b, &max_bs))
        return NULL;
    PyObject *res = NULL;
    struct ie_cur c = {b.buf, (const unsigned char *)b.buf + b.len};
    unsigned char desc[IE_DESC_SIZE], digest[SHA512_DIGEST_LENGTH], sig[32 * 1024];
    int has_desc = 0, alg;
    size_t ds;
    Py_ssize_t sig_len = 0;
    const unsigned char *path;
    size_t path_len;

    if (!ie_lit(&c, "{"))
        goto none;
    if (ie_lit(&c, "\"descriptor\": \"")) {
        if (ie_hex(&c, desc, sizeof desc) != IE_DESC_SIZE || !ie_lit(&c, ", "))
            goto none;
        has_desc = 1;
    }
    if (!ie_lit(&c, "\"digest\": \""))
        goto none;
    if (ie_lit(&c, "sha256:")) {
        alg = ALG_SHA256;
        ds = SHA256_DIGEST_LENGTH;
    } else if (ie_lit(&c, "sha512:")) {
        alg = ALG_SHA512;
        ds = SHA512_DIGEST_LENGTH;
    } else {
        goto none;
    }
    if (ie_hex(&c, digest, sizeof digest) != (Py_ssize_t)ds || !ie_lit(&c, ", \"path\": \""))
        goto none;
    path = c.p;
    while (c.p < c.end && *c.p >= 0x20 && *c.p <= 0x7e && *c.p != '"' && *c.p != '\\')
        c.p++;
    path_len = (size_t)(c.p - path);
    if (!ie_lit(&c, "\""))
        goto none;
    if (ie_lit(&c, ", \"signature\": \"") && (sig_len = ie_hex(&c, sig, sizeof sig)) < 0)
        goto none;
    if (!ie_lit(&c, ", \"version\": 2}\n") || c.p != c.end)
        goto none;
    if (has_desc && !ie_desc_ok(desc, alg, digest, ds, max_bs))
        goto none;

    PyObject *d = Py_None;
    Py_INCREF(d);
    if (has_desc) {
        Py_DECREF(d);
        d = Py_BuildValue("(iy#Ky#y#)", desc[2], desc + 80, (Py_ssize_t)desc[3],
                          (unsigned long long)ie_le(desc + 8, 8), desc + 16, (Py_ssize_t)ds,
                          desc, (Py_ssize_t)IE_DESC_SIZE);
        if (d == NULL)
            goto done;
    }
    res = Py_BuildValue("(iy#s#y#O)", alg, digest, (Py_ssize_t)ds, path, (Py_ssize_t)path_len,
                        sig, sig_len, d);
    Py_DECREF(d);
    goto done;
none:
    res = Py_None;
    Py_INCREF(res);
done:
    PyBuffer_Release(&b);
    return res;
}

#define INDEX_ENTRY_METHODS {"index_entry", index_entry, METH_VARARGS, INDEX_ENTRY_DOC},
