/*
 * fast_open: read-only opens of sealed local files, and their releases, answered from
 * the FUSE request without Python's handlers (included by _hashblocks.c after
 * _fastread.c).  In Python, opening a verity file cost the daemon ~40 us and its
 * release ~8, against ~7 and ~3 for a passthrough: most of a container start's extra
 * cost.  The shim (_fuseshim.c) hands each FUSE_OPEN and FUSE_RELEASE here first.
 * An open is answered only when:
 *
 *   - Python offered the inode at its lookup (fast_inode_put): a sealed file with its
 *     O_PATH fd (Python's, withdrawn by fast_inode_drop before it is closed), sealed
 *     size, hash parameters, tree key and read mode;
 *   - the open is read-only without O_TRUNC;
 *   - its first leaf block is verified in the leaf table (a one-block file's expected
 *     hash is its root hash), or Python's prepare callback verifies it now (only for a
 *     file of one leaf: done at the open, not the lookup, so a stat never pays for it);
 *   - the admit callback gives a handle number within the caller's budget (and none
 *     while the tripwire refuses opens);
 *   - the reopen through /proc/self/fd does not wait (a lease: O_NONBLOCK) and finds
 *     the file at its sealed size.
 *
 * Anything else declines, and pyfuse3 serves the open as before, with its errors and
 * waits.  The handle is a fast_read handle with native = 1: its fd is closed by its
 * release, unless Python adopts it first (a read the native path declined).
 *
 * Threads: everything runs with the GIL held, but the callbacks may let another thread
 * run and drop an inode: fast_open looks it up again after each, and opens through its
 * fd only with the GIL held since.  Bounds: FO_INODES offered inodes (malloc'd); native
 * handles share fast_read's table and count in Python's per-uid budget.
 */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define FO_SLOTS 16384           /* a power of two */
#define FO_INODES (FO_SLOTS / 2)

struct fo_inode {
    uint64_t ino;
    int pathfd;
    struct fr_file tmpl;  /* what fast_read needs of its handles (fh, fd, used unset) */
};

static struct fo_inode *g_inodes[FO_SLOTS];
static size_t g_ninodes, g_fo_live;
static PyObject *g_fo_admit, *g_fo_released, *g_fo_prepare;  /* NULL: opens go to Python */
static int g_fo_noatime;
static unsigned long long g_fo_opens, g_fo_releases, g_fo_adopted, g_fo_no_leaf,
    g_fo_refused, g_fo_failed;

static size_t fo_slot(uint64_t ino)
{
    return (size_t)((ino * 0x9E3779B97F4A7C15ull) >> 50) & (FO_SLOTS - 1);
}

static size_t fo_index(uint64_t ino)  /* its slot, or SIZE_MAX */
{
    for (size_t i = fo_slot(ino), n = 0; n < FO_SLOTS; i = (i + 1) & (FO_SLOTS - 1), n++) {
        if (g_inodes[i] == NULL)
            return SIZE_MAX;
        if (g_inodes[i]->ino == ino)
            return i;
    }
    return SIZE_MAX;
}

static void fo_remove(size_t i)
{
    free(g_inodes[i]);
    g_inodes[i] = NULL;
    g_ninodes--;
    for (size_t j = (i + 1) & (FO_SLOTS - 1); g_inodes[j] != NULL; j = (j + 1) & (FO_SLOTS - 1)) {
        size_t home = fo_slot(g_inodes[j]->ino);
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            g_inodes[i] = g_inodes[j];
            g_inodes[j] = NULL;
            i = j;
        }
    }
}

/* A callback's exception dropped: nothing may escape into libfuse.  A Ctrl-C is not
 * lost: it is raised again at the next bytecode. */
static void fo_clear_error(void)
{
    int interrupt = PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
    PyErr_Clear();
    if (interrupt)
        PyErr_SetInterrupt();
}

/* Python's callback fn(arg), or NULL with its exception dropped (fo_clear_error): the
 * open then goes on as if declined (Python's own handler meets the error again). */
static PyObject *fo_call(PyObject *fn, unsigned long long arg)
{
    PyObject *r = PyObject_CallFunction(fn, "K", arg);
    if (r == NULL)
        fo_clear_error();
    return r;
}

static void fo_released(uint64_t fh)
{
    if (g_fo_released != NULL)
        Py_XDECREF(fo_call(g_fo_released, fh));
}

/* The open flags Python's local view passes to the backing open (view_local._STRIP). */
#define FO_STRIP (O_CREAT | O_EXCL | O_NOCTTY | O_DIRECT | O_NOFOLLOW)

/* Answer the FUSE_OPEN of inode ino: 0 with *fh set (a registered native handle), or
 * -1: the caller hands the request to Python.  The shim's entry (fast_open_entry). */
static int fast_open(uint64_t ino, int flags, uint32_t uid, uint64_t *fh_out)
{
    size_t i = fo_index(ino);
    if (g_fo_admit == NULL || i == SIZE_MAX)
        return -1;
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC) || g_nfiles >= FR_HANDLES / 2) {
        g_fo_refused++;
        return -1;
    }
    struct fo_inode *n = g_inodes[i];
    if (!n->tmpl.single && fr_leaf_get(n->tmpl.key, n->tmpl.key_len, 0) == NULL) {
        PyObject *ok = fo_call(g_fo_prepare, ino);
        int ready = ok == Py_True;
        Py_XDECREF(ok);
        if (!ready || fo_index(ino) == SIZE_MAX || g_fo_admit == NULL) {
            g_fo_no_leaf++;  /* its reads could not be answered: Python opens it */
            return -1;
        }
    }
    PyObject *r = fo_call(g_fo_admit, uid);
    if (r == NULL || r == Py_None) {
        Py_XDECREF(r);
        g_fo_refused++;
        return -1;
    }
    uint64_t fh = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    if (fh == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        g_fo_refused++;
        return -1;
    }
    /* The callback may have let another thread drop the inode and close its fd: look it
     * up again; from here on the GIL is held until the fd is registered. */
    i = fo_index(ino);
    if (i == SIZE_MAX || g_nfiles >= FR_HANDLES / 2 || fr_find(fh) != NULL)
        goto fail;
    n = g_inodes[i];
    char path[40];
    snprintf(path, sizeof path, "/proc/self/fd/%d", n->pathfd);
    int oflags = (flags & ~FO_STRIP) | O_CLOEXEC | O_NONBLOCK, fd = -1;
    if (g_fo_noatime)
        fd = open(path, oflags | O_NOATIME);
    if (fd < 0 && (!g_fo_noatime || errno == EPERM))
        fd = open(path, oflags);
    if (fd < 0)
        goto fail;  /* a lease (EWOULDBLOCK: Python waits for it) or an error it names */
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size != n->tmpl.data_size) {
        close(fd);  /* truncated or extended: Python's open names it */
        goto fail;
    }
    size_t s = fr_slot(fh);
    while (g_files[s].used)
        s = (s + 1) & (FR_HANDLES - 1);
    struct fr_file *f = &g_files[s];
    g_nfiles++;
    *f = n->tmpl;
    f->fh = fh;
    f->ino = ino;
    f->fd = fd;
    f->used = f->native = 1;
    g_fo_live++;
    g_fo_opens++;
    *fh_out = fh;
    return 0;
fail:
    g_fo_failed++;
    fo_released(fh);
    return -1;
}

/* Answer the FUSE_RELEASE of handle fh: 0 if fast_open opened it and Python did not
 * adopt it (its fd closed now), -1: the caller hands the request to Python. */
static int fast_release(uint64_t fh)
{
    struct fr_file *f = fr_find(fh);
    if (f == NULL || !f->native)
        return -1;
    int fd = f->fd;
    fr_remove((size_t)(f - g_files));
    close(fd);
    g_fo_live--;
    g_fo_releases++;
    fo_released(fh);
    return 0;
}

/* --- Python interface --- */

static PyObject *fast_open_set(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *admit, *released, *prepare;
    int noatime;
    if (!PyArg_ParseTuple(args, "OOOp:fast_open_set", &admit, &released, &prepare, &noatime))
        return NULL;
    int off = admit == Py_None;
    if ((released == Py_None) != off || (prepare == Py_None) != off
        || (!off && (!PyCallable_Check(admit) || !PyCallable_Check(released)
                     || !PyCallable_Check(prepare)))) {
        PyErr_SetString(PyExc_TypeError, "fast_open_set: three callables, or None thrice");
        return NULL;
    }
    Py_CLEAR(g_fo_admit);
    Py_CLEAR(g_fo_released);
    Py_CLEAR(g_fo_prepare);
    if (!off) {
        g_fo_admit = Py_NewRef(admit);
        g_fo_released = Py_NewRef(released);
        g_fo_prepare = Py_NewRef(prepare);
    }
    g_fo_noatime = noatime;
    Py_RETURN_NONE;
}

static PyObject *fast_inode_put(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int pathfd;
    struct fr_file parsed;
    if (fr_parse(args, "Kiiy*nLy*y*i:fast_inode_put", &ino, &pathfd, &parsed) < 0)
        return NULL;
    if (pathfd < 0 || (!parsed.single && parsed.data_size <= (long long)parsed.bs)) {
        PyErr_SetString(PyExc_ValueError, "a file of one block needs its root hash");
        return NULL;
    }
    if (fr_map_buffers() < 0)  /* its reads need fast_read's buffers */
        return NULL;
    size_t i = fo_index(ino);
    struct fo_inode *n = i == SIZE_MAX ? NULL : g_inodes[i];
    if (n == NULL) {
        if (g_ninodes >= FO_INODES)
            Py_RETURN_FALSE;
        n = malloc(sizeof *n);
        if (n == NULL)
            return PyErr_NoMemory();
        for (i = fo_slot(ino); g_inodes[i] != NULL; i = (i + 1) & (FO_SLOTS - 1))
            ;
        g_inodes[i] = n;
        g_ninodes++;
    }
    n->ino = ino;
    n->pathfd = pathfd;
    n->tmpl = parsed;
    Py_RETURN_TRUE;
}

static PyObject *fast_inode_drop(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long ino = PyLong_AsUnsignedLongLong(arg);
    if (ino == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    size_t i = fo_index(ino);
    if (i != SIZE_MAX)
        fo_remove(i);
    Py_RETURN_NONE;
}

static PyObject *fast_native(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct fr_file *f = fr_find(fh);
    if (f == NULL || !f->native)
        Py_RETURN_NONE;
    return Py_BuildValue("(Kii)", (unsigned long long)f->ino, f->fd, f->flags);
}

static PyObject *fast_adopted(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    struct fr_file *f = fr_find(fh);
    if (f != NULL && f->native) {
        f->native = 0;
        g_fo_live--;
        g_fo_adopted++;
    }
    Py_RETURN_NONE;
}

static PyObject *fast_open_close(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    for (size_t i = 0; i < FR_HANDLES; i++) {
        if (g_files[i].used && g_files[i].native) {
            close(g_files[i].fd);
            g_files[i].native = 0;
            g_files[i].fd = -1;
        }
    }
    for (size_t i = 0; i < FR_HANDLES; i++)  /* no native handle's fd stays registered */
        while (g_files[i].used && g_files[i].fd < 0)
            fr_remove(i);
    for (size_t i = 0; i < FO_SLOTS; i++) {
        free(g_inodes[i]);
        g_inodes[i] = NULL;
    }
    g_ninodes = g_fo_live = 0;
    Py_RETURN_NONE;
}

static PyObject *fast_open_info(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n}",
                         "opens", g_fo_opens, "releases", g_fo_releases, "adopted", g_fo_adopted,
                         "declined_no_leaf", g_fo_no_leaf, "declined_refused", g_fo_refused,
                         "declined_failed", g_fo_failed, "open", (Py_ssize_t)g_fo_live,
                         "inodes", (Py_ssize_t)g_ninodes);
}

static PyObject *fast_open_entry(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    /* the shim's vf_fast_open_fn and vf_fast_release_fn */
    return Py_BuildValue("(NN)", PyLong_FromVoidPtr((void *)fast_open),
                         PyLong_FromVoidPtr((void *)fast_release));
}

static PyObject *fast_open_py(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long ino;
    int flags;
    unsigned int uid;
    uint64_t fh;
    if (!PyArg_ParseTuple(args, "KiI:fast_open", &ino, &flags, &uid))
        return NULL;
    if (fast_open(ino, flags, uid, &fh) != 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(fh);
}

#define FAST_OPEN_METHODS \
    {"fast_open_set", fast_open_set, METH_VARARGS, \
     "fast_open_set(admit, released, prepare, noatime)\n\n" \
     "Let fast_open answer opens of offered inodes: admit(uid) -> a new handle number, or\n" \
     "None to let Python open; released(fh) once a native handle is closed; prepare(ino)\n" \
     "-> True once the file's first leaf block is in the leaf table (None thrice: every\n" \
     "open goes to Python).  noatime: reopen with O_NOATIME where permitted."}, \
    {"fast_inode_put", fast_inode_put, METH_VARARGS, \
     "fast_inode_put(ino, pathfd, alg, prefix, block_size, data_size, key, root, flags)\n" \
     "-> bool\n\nOffer inode ino (its O_PATH fd, kept open until fast_inode_drop) for native\n" \
     "opens; fast_register's other parameters.  False when the table is full."}, \
    {"fast_inode_drop", fast_inode_drop, METH_O, \
     "fast_inode_drop(ino): before its O_PATH fd is closed."}, \
    {"fast_native", fast_native, METH_O, \
     "fast_native(fh) -> (ino, fd, flags) or None: a handle fast_open opened and still\n" \
     "holds (flags: its read mode, as fast_register's)."}, \
    {"fast_adopted", fast_adopted, METH_O, \
     "fast_adopted(fh): Python holds the native handle fh now (its fd, its release)."}, \
    {"fast_open_close", fast_open_close, METH_NOARGS, \
     "fast_open_close(): close every native handle and forget every offered inode."}, \
    {"fast_open_info", fast_open_info, METH_NOARGS, \
     "fast_open_info() -> dict: counters, handles open, inodes offered."}, \
    {"fast_open_entry", fast_open_entry, METH_NOARGS, \
     "fast_open_entry() -> (int, int): the addresses of fast_open and fast_release."}, \
    {"fast_open", fast_open_py, METH_VARARGS, \
     "fast_open(ino, flags, uid) -> fh or None: what the FUSE hook would answer (tests;\n" \
     "the handle is released as any other, by fast_open_close)."},
