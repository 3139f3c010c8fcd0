/*
 * FUSE_LOOKUP answered by one synchronous call of Python's lookup, from the FUSE shim.
 *
 * pyfuse3 answers a LOOKUP by making a coroutine of its handler, awaiting it in its
 * request loop (the handler's own coroutine and the error boundary's around it), and
 * copying the EntryAttributes it returns into the reply.  The view's lookup itself
 * never waits: the shim's lookup hook calls it here instead, as a plain function
 * (fast_lookups.py), and replies with what it returns.  Python stays the one place
 * a lookup is decided and counted; this saves only the machinery around it.
 *
 * The callback returns the entry's attributes as a tuple (ino, mode, nlink, uid, gid,
 * rdev, size, blksize, blocks, atime_ns, mtime_ns, ctime_ns, timeout), an errno
 * (int > 0) to reply with, or None: then the request goes to pyfuse3 as before (an
 * integrity failure, whose measurement waits; the view counted no lookup).  An
 * exception out of the callback (a KeyboardInterrupt, raised again at once) is
 * answered EIO, as pyfuse3's boundary answers a bug: a lookup the view may have
 * counted is not looked up twice.  Attributes out of their C types' range (a bug) are
 * not answered either: the lookup is given back and goes to pyfuse3, whose own
 * conversion fails it with its error.  A reply the kernel did not take (the request
 * interrupted) is not a lookup it counted: the shim calls fast_unlookup, which gives
 * the count back.
 *
 * Included by _hashblocks.c after _fastopen.c (fo_call).
 */

#include <sys/stat.h>

static PyObject *g_fl_lookup, *g_fl_unlookup;
static unsigned long long g_fl_answered, g_fl_errors, g_fl_declined, g_fl_undone;

static void fl_time(long long ns, struct timespec *ts)
{
    long long s = ns / 1000000000LL, r = ns % 1000000000LL;
    if (r < 0) {  /* before 1970: floor, as os.stat's st_*time_ns split */
        r += 1000000000LL;
        s--;
    }
    ts->tv_sec = (time_t)s;
    ts->tv_nsec = (long)r;
}

/* 0 with *st and *timeout set; an errno > 0 to reply with; -1: pyfuse3 answers. */
static int fast_lookup(uint64_t parent, const char *name, struct stat *st, double *timeout)
{
    PyObject *cb = g_fl_lookup;
    if (cb == NULL)
        return -1;
    Py_INCREF(cb);  /* the callback may clear itself (fast_lookup_set(None)) */
    PyObject *r = PyObject_CallFunction(cb, "Ky", (unsigned long long)parent, name);
    Py_DECREF(cb);
    if (r == NULL) {
        fo_clear_error();
        g_fl_errors++;
        return EIO;
    }
    int rc = -1;
    if (PyTuple_Check(r)) {
        /* Every integer checked (format L raises OverflowError), then its C range. */
        long long ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, at, mt, ct;
        if (PyArg_ParseTuple(r, "LLLLLLLLLLLLd", &ino, &mode, &nlink, &uid, &gid, &rdev, &size,
                             &blksize, &blocks, &at, &mt, &ct, timeout)
            && ino > 0 && mode >= 0 && mode <= 0xffffffffLL && nlink >= 0 && uid >= 0
            && uid <= 0xffffffffLL && gid >= 0 && gid <= 0xffffffffLL && rdev >= 0
            && size >= 0 && blksize >= 0 && blocks >= 0) {
            memset(st, 0, sizeof *st);
            st->st_ino = (ino_t)ino;
            st->st_mode = (mode_t)mode;
            st->st_nlink = (nlink_t)nlink;
            st->st_uid = (uid_t)uid;
            st->st_gid = (gid_t)gid;
            st->st_rdev = (dev_t)rdev;
            st->st_size = (off_t)size;
            st->st_blksize = (blksize_t)blksize;
            st->st_blocks = (blkcnt_t)blocks;
            fl_time(at, &st->st_atim);
            fl_time(mt, &st->st_mtim);
            fl_time(ct, &st->st_ctim);
            g_fl_answered++;
            rc = 0;
        } else {
            /* Attributes the callback got wrong after the view counted the lookup: give
             * it back (pyfuse3 then looks it up again and counts it once). */
            PyErr_Clear();
            unsigned long long ino0 = 0;
            if (PyTuple_Size(r) > 0 && PyLong_Check(PyTuple_GET_ITEM(r, 0)))
                ino0 = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(r, 0));
            if (PyErr_Occurred())
                PyErr_Clear();
            else if (ino0 != 0 && g_fl_unlookup != NULL)
                Py_XDECREF(fo_call(g_fl_unlookup, ino0));
            g_fl_declined++;
        }
    } else if (PyLong_Check(r)) {
        long e = PyLong_AsLong(r);
        PyErr_Clear();
        rc = e > 0 && e < 4096 ? (int)e : EIO;
        g_fl_errors++;
    } else {
        g_fl_declined++;
    }
    Py_DECREF(r);
    return rc;
}

/* The kernel did not take the entry of ino fast_lookup answered: uncount it. */
static void fast_unlookup(uint64_t ino)
{
    g_fl_undone++;
    if (g_fl_unlookup != NULL)
        Py_XDECREF(fo_call(g_fl_unlookup, ino));
}

static PyObject *fast_lookup_set(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *lookup, *unlookup;
    if (!PyArg_ParseTuple(args, "OO:fast_lookup_set", &lookup, &unlookup))
        return NULL;
    if ((lookup == Py_None) != (unlookup == Py_None)
        || (lookup != Py_None && (!PyCallable_Check(lookup) || !PyCallable_Check(unlookup)))) {
        PyErr_SetString(PyExc_TypeError, "two callables, or None twice");
        return NULL;
    }
    Py_CLEAR(g_fl_lookup);
    Py_CLEAR(g_fl_unlookup);
    if (lookup != Py_None) {
        Py_INCREF(lookup);
        Py_INCREF(unlookup);
        g_fl_lookup = lookup;
        g_fl_unlookup = unlookup;
    }
    Py_RETURN_NONE;
}

static PyObject *fast_lookup_entry(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    /* the shim's vf_fast_lookup_fn and vf_fast_unlookup_fn */
    return Py_BuildValue("(NN)", PyLong_FromVoidPtr((void *)fast_lookup),
                         PyLong_FromVoidPtr((void *)fast_unlookup));
}

static PyObject *fast_lookup_info(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("{sKsKsKsK}", "answered", g_fl_answered, "errors", g_fl_errors,
                         "declined", g_fl_declined, "undone", g_fl_undone);
}

/* What the tests call as the shim would: (0, attrs tuple), (errno, None) or (-1, None). */
static PyObject *fast_lookup_py(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long parent;
    const char *name;
    if (!PyArg_ParseTuple(args, "Ky:fast_lookup", &parent, &name))
        return NULL;
    struct stat st;
    double timeout = 0;
    int rc = fast_lookup(parent, name, &st, &timeout);
    if (rc != 0)
        return Py_BuildValue("(iO)", rc, Py_None);
    return Py_BuildValue("(i(KIKIIKLlLLLLLLLd))", 0, (unsigned long long)st.st_ino,
                         (unsigned int)st.st_mode, (unsigned long long)st.st_nlink,
                         (unsigned int)st.st_uid, (unsigned int)st.st_gid,
                         (unsigned long long)st.st_rdev, (long long)st.st_size,
                         (long)st.st_blksize, (long long)st.st_blocks,
                         (long long)st.st_atim.tv_sec, (long long)st.st_atim.tv_nsec,
                         (long long)st.st_mtim.tv_sec, (long long)st.st_mtim.tv_nsec,
                         (long long)st.st_ctim.tv_sec, (long long)st.st_ctim.tv_nsec, timeout);
}

#define FAST_LOOKUP_METHODS \
    {"fast_lookup_set", fast_lookup_set, METH_VARARGS, \
     "fast_lookup_set(lookup, unlookup): the callbacks of the shim's LOOKUP hook (None, None:\n" \
     "every lookup to pyfuse3).  lookup(parent, name) -> attribute tuple, errno or None;\n" \
     "unlookup(ino) gives back a lookup the kernel did not take."}, \
    {"fast_lookup_entry", fast_lookup_entry, METH_NOARGS, \
     "fast_lookup_entry() -> (lookup, unlookup): the C functions for the FUSE shim."}, \
    {"fast_lookup_info", fast_lookup_info, METH_NOARGS, \
     "fast_lookup_info() -> dict: lookups answered, errors replied, declined, undone."}, \
    {"fast_lookup", fast_lookup_py, METH_VARARGS, \
     "fast_lookup(parent, name) -> (rc, stat fields or None), as the shim's hook calls it."},
