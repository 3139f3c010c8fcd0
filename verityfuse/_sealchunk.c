/*
 * seal_small: a chunk of small files sealed into a store's tmp/ in one call
 * (ss_seal, _sealsmall.c, for each).
 *
 * Included by _hashblocks.c after _sealsmall.c (one translation unit).
 *
 * Why a chunk a call, not a file: what a call cost around the native work
 * (its arguments, the path's bytes and JSON, two tmp names, the GIL) was ~7 us
 * a file in Python, a third of a worker's time on a tree of small files.  Here
 * the paths' bytes (os.fsencode's), their JSON (json.dumps's) and the tmp/
 * names are made with the GIL held, then every file is sealed with it
 * released once, then the results are built.
 */

/* json.dumps(path) of the str path (ensure_ascii: json's encoder's escapes, byte for byte)
 * into a new buffer; NULL on no memory. */
static char *ss_json(PyObject *path, size_t *len)
{
    static const char x[] = "0123456789abcdef";
    Py_ssize_t n = PyUnicode_GET_LENGTH(path);
    int kind = PyUnicode_KIND(path);
    const void *data = PyUnicode_DATA(path);
    char *out = malloc((size_t)n * 12 + 3), *o = out;
    if (!out)
        return NULL;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= ' ' && c <= '~' && c != '\\' && c != '"') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '\\': case '"': *o++ = (char)c; continue;
        case '\b': *o++ = 'b'; continue;
        case '\f': *o++ = 'f'; continue;
        case '\n': *o++ = 'n'; continue;
        case '\r': *o++ = 'r'; continue;
        case '\t': *o++ = 't'; continue;
        }
        if (c >= 0x10000) {  /* a UTF-16 surrogate pair */
            Py_UCS4 v = c - 0x10000, hi = 0xd800 | ((v >> 10) & 0x3ff);
            *o++ = 'u';
            for (int s = 12; s >= 0; s -= 4)
                *o++ = x[(hi >> s) & 15];
            *o++ = '\\';
            c = 0xdc00 | (v & 0x3ff);
        }
        *o++ = 'u';
        for (int s = 12; s >= 0; s -= 4)
            *o++ = x[(c >> s) & 15];
    }
    *o++ = '"';
    *len = (size_t)(o - out);
    return out;
}

#define SS_NAME 256

/* One file of a chunk: its path (fs-encoded, trailing slashes off), JSON and tmp names. */
struct ss_file {
    PyObject *path;  /* bytes; NULL: declined before sealing (not a str, a NUL in it) */
    char *json;
    size_t json_len;
    char idx_name[SS_NAME], obj_name[SS_NAME];
    int rc;
    struct ss_out out;
};

static void ss_files_free(struct ss_file *f, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(f[i].path);
        free(f[i].json);
    }
    PyMem_Free(f);
}

/* Each file's result: None, or (size, key, digest, object tmp name or None, index tmp
 * name, mode, uid, gid, mtime s, mtime ns); key and index tmp name None without index. */
static PyObject *ss_result(const struct ss_file *f, size_t ds, int index)
{
    if (f->rc != 0)
        return Py_NewRef(Py_None);
    const struct stat *t = &f->out.st;
    /* The mtime's seconds and nanoseconds apart: in ns it overflows 64 bits after 2262,
     * and Python says so (a manifest refuses it) where C would wrap silently. */
    return Py_BuildValue("(LNy#NNIIILL)", f->out.size,
                         index ? PyUnicode_FromString(f->out.key) : Py_NewRef(Py_None),
                         (const char *)f->out.digest, (Py_ssize_t)ds,
                         f->out.wrote_object ? PyUnicode_FromString(f->obj_name)
                                             : Py_NewRef(Py_None),
                         index ? PyUnicode_FromString(f->idx_name) : Py_NewRef(Py_None),
                         (unsigned int)t->st_mode, (unsigned int)t->st_uid,
                         (unsigned int)t->st_gid, (long long)t->st_mtim.tv_sec,
                         (long long)t->st_mtim.tv_nsec);
}

static PyObject *seal_small(PyObject *self, PyObject *args)
{
    (void)self;
    struct ss_in in;
    PyObject *paths, *res = NULL;
    Py_buffer salt, prefix, names;
    if (!PyArg_ParseTuple(args, "iO!KKiiy*y*iy*ppsp:seal_small", &in.root_fd, &PyList_Type,
                          &paths, &in.dev, &in.fsid, &in.alg, &in.log_bs, &salt, &prefix,
                          &in.tmp_fd, &names, &in.make_object, &in.keep_desc, &in.alg_name,
                          &in.index))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(paths);
    struct ss_file *f = NULL;
    if ((in.alg != ALG_SHA256 && in.alg != ALG_SHA512) || in.log_bs < 10 || in.log_bs > 16
        || salt.len > 32 || strlen(in.alg_name) > 16 || names.len > SS_NAME - 20) {
        PyErr_SetString(PyExc_ValueError, "seal_small: unsupported parameters");
        goto end;
    }
    in.salt = salt.buf;
    in.salt_len = (size_t)salt.len;
    in.prefix = prefix.buf;
    in.prefix_len = (size_t)prefix.len;
    if ((f = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof *f)) == NULL) {
        PyErr_NoMemory();
        goto end;
    }
    /* What needs the interpreter first (a path's bytes and JSON), then every file
     * sealed with the GIL released once, then the results. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(paths, i);
        f[i].rc = -1;
        snprintf(f[i].idx_name, SS_NAME, "%.*s%zx", (int)names.len, (const char *)names.buf,
                 (size_t)(2 * i));
        snprintf(f[i].obj_name, SS_NAME, "%.*s%zx", (int)names.len, (const char *)names.buf,
                 (size_t)(2 * i + 1));
        if (!PyUnicode_Check(p))
            continue;  /* not a file's path (a manifest's directory or symlink): declined */
        PyObject *b = PyUnicode_EncodeFSDefault(p);  /* os.fsencode's bytes */
        if (!b)
            goto end;
        size_t len = (size_t)PyBytes_GET_SIZE(b);
        const char *s = PyBytes_AS_STRING(b);
        while (len > 0 && s[len - 1] == '/')
            len--;
        if (memchr(s, '\0', len) != NULL) {
            Py_DECREF(b);
            continue;  /* no such path: the Python path says why */
        }
        if (len != (size_t)PyBytes_GET_SIZE(b)) {
            Py_SETREF(b, PyBytes_FromStringAndSize(s, (Py_ssize_t)len));
            if (!b)
                goto end;
        }
        f[i].path = b;
        if ((f[i].json = ss_json(p, &f[i].json_len)) == NULL) {
            PyErr_NoMemory();
            goto end;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!f[i].path)
            continue;
        struct ss_in one = in;
        one.path = PyBytes_AS_STRING(f[i].path);
        one.path_json = (const unsigned char *)f[i].json;
        one.path_json_len = f[i].json_len;
        one.idx_name = f[i].idx_name;
        one.obj_name = f[i].obj_name;
        f[i].rc = ss_seal(&one, &f[i].out);
    }
    Py_END_ALLOW_THREADS
    size_t ds = in.alg == ALG_SHA512 ? SHA512_DIGEST_LENGTH : SHA256_DIGEST_LENGTH;
    if ((res = PyList_New(n)) == NULL)
        goto unstage;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = ss_result(&f[i], ds, in.index);
        if (!r) {
            Py_CLEAR(res);
            goto unstage;
        }
        PyList_SET_ITEM(res, i, r);
    }
    goto end;
unstage:  /* nothing may be left that no Staged names */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (f[i].rc != 0)
            continue;
        if (in.index)
            unlinkat(in.tmp_fd, f[i].idx_name, 0);
        if (f[i].out.wrote_object)
            unlinkat(in.tmp_fd, f[i].obj_name, 0);
    }
end:
    if (f)
        ss_files_free(f, n);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&names);
    return res;
}

#define SEAL_SMALL_DOC \
    "seal_small(root_fd, paths, dev, fsid, alg, log_blocksize, salt, padded_salt, tmp_fd,\n" \
    "           names, objects, keep_descriptor, alg_name, index) -> list\n\n" \
    "Seal each small regular file root_fd/path of the list paths (str) into tmp/ (see\n" \
    "_sealsmall.c), named names + hex(2 i) (its index entry) and names + hex(2 i + 1)\n" \
    "(its object).  For each: (size, key, digest, object's tmp name or None, index\n" \
    "entry's tmp name, mode, uid, gid, mtime s, mtime ns), or None when it declines,\n" \
    "with nothing left behind.  Without index (a manifest's files): no key and no\n" \
    "index entry (both None)."
