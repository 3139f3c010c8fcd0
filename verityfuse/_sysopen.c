/*
 * The system calls of the per-file open path, without ctypes.
 *
 * Why native: a container start opens ~100k small files once each, and each
 * open in local mode resolves an index entry and a tree object in the store
 * (openat2 O_PATH, fstat, reopen through /proc/self/fd, close), takes a file
 * handle (name_to_handle_at) and asks statfs where the file lives.  Through
 * ctypes each call builds argument objects and a structure and fetches errno:
 * ~10 us of interpreter work per store file, more than the system calls cost.
 *
 * Policy stays in Python (fsutil.py, identity.py): these functions make the
 * same calls in the same order and report what they found, and fsutil falls
 * back to ctypes when this module is not built or VERITYFUSE_PURE_PYTHON is
 * set.  Every call that can wait on a file system (a virtio-fs share, a disk)
 * releases the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it defines _GNU_SOURCE (name_to_handle_at) */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_regular.h"

#define VF_MAX_HANDLE 128

static PyObject *os_error(int e, const char *path, Py_ssize_t len)
{
    PyObject *name = path ? PyUnicode_DecodeUTF8(path, len, "replace") : NULL;
    if (path && !name)
        return NULL;
    PyObject *exc = name ? PyObject_CallFunction(PyExc_OSError, "isO", e, strerror(e), name)
                         : PyObject_CallFunction(PyExc_OSError, "is", e, strerror(e));
    Py_XDECREF(name);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *sys_openat2(PyObject *self, PyObject *args)
{
    (void)self;
    int dirfd;
    const char *path;
    unsigned long long flags, resolve;
    /* "y": a path with an embedded NUL is a ValueError, as os.open says, not cut short */
    if (!PyArg_ParseTuple(args, "iyKK", &dirfd, &path, &flags, &resolve))
        return NULL;
    long fd;
    int e = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = openat2_retry(dirfd, path, flags, resolve);  /* EINTR is no answer about the path */
    if (fd < 0)
        e = errno;
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return os_error(e, path, (Py_ssize_t)strlen(path));
    PyObject *out = PyLong_FromLong(fd);
    if (!out)
        close((int)fd);
    return out;
}

static PyObject *sys_reopen(PyObject *self, PyObject *args)
{
    (void)self;
    int pfd;
    PyObject *flags_arg;
    if (!PyArg_ParseTuple(args, "iO", &pfd, &flags_arg))
        return NULL;
    /* From here the fd is ours (the caller handed it over): closed on every path, bad
     * flags included. */
    long flags = PyLong_AsLong(flags_arg);
    if (flags == -1 && PyErr_Occurred()) {
        close(pfd);
        return NULL;
    }
    if (flags < INT_MIN || flags > INT_MAX) {
        close(pfd);
        PyErr_SetString(PyExc_OverflowError, "flags out of range");
        return NULL;
    }
    struct stat st;
    int fd, e;
    Py_BEGIN_ALLOW_THREADS
    fd = reopen_if_regular(pfd, (int)flags, &st, &e);
    close(pfd);
    Py_END_ALLOW_THREADS
    if (e)
        return os_error(e, NULL, 0);
    PyObject *out = Py_BuildValue("(iIi)", fd, (unsigned int)st.st_mode, S_ISREG(st.st_mode));
    if (!out && fd >= 0)
        close(fd);
    return out;
}

static PyObject *sys_handle_of(PyObject *self, PyObject *arg)
{
    (void)self;
    int fd;
    if (!PyArg_Parse(arg, "i", &fd))
        return NULL;
    struct {
        struct file_handle h;
        unsigned char room[VF_MAX_HANDLE];
    } fh;
    int mount_id, rc, e = 0;
    fh.h.handle_bytes = VF_MAX_HANDLE;
    Py_BEGIN_ALLOW_THREADS
    rc = name_to_handle_at(fd, "", &fh.h, &mount_id, AT_EMPTY_PATH);
    if (rc != 0)
        e = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0) {  /* identity.py's message; callers tell "no handles here" by errno */
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iN", e,
                                              PyUnicode_FromFormat("name_to_handle_at: %s",
                                                                   strerror(e)));
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return Py_BuildValue("(iy#)", fh.h.handle_type, (const char *)fh.h.f_handle,
                         (Py_ssize_t)fh.h.handle_bytes);
}

static PyObject *sys_fs_type(PyObject *self, PyObject *arg)
{
    (void)self;
    int fd;
    if (!PyArg_Parse(arg, "i", &fd))
        return NULL;
    struct statfs sf;
    int rc, e = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = fstatfs(fd, &sf);
    if (rc != 0)
        e = errno;
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(e, NULL, 0);
    return PyLong_FromUnsignedLong((unsigned long)sf.f_type);
}

/* read_beneath: open_beneath + reopen + pread of the head in one call: the store's
 * per-file read (an index entry, an object's header), whose Python around four
 * separate calls cost more than its system calls.  Same calls, same order, same
 * policy: O_PATH first, the type from its fstat, only a regular file reopened.
 * Errors name the path only when openat2 failed (an ENOSYS then means no openat2);
 * a failed read raises ReadError: the file was there and opened, so the error is
 * the read's (EIO, ...), never a statement about what the store holds. */
static PyObject *ReadError;

static PyObject *sys_read_beneath(PyObject *self, PyObject *args)
{
    (void)self;
    int dirfd, keep;
    const char *path;
    unsigned long long flags, resolve;
    Py_ssize_t nbytes;
    if (!PyArg_ParseTuple(args, "iyKKnp", &dirfd, &path, &flags, &resolve, &nbytes, &keep))
        return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "negative byte count");
        return NULL;
    }
    struct stat st;
    int pfd, fd = -1, e = 0, opened = 0, read_failed = 0;
    ssize_t got = 0;
    char *buf = NULL;
    Py_BEGIN_ALLOW_THREADS
    pfd = openat2_retry(dirfd, path, flags, resolve);
    if (pfd < 0) {
        e = errno;
    } else {
        opened = 1;
        fd = reopen_if_regular(pfd, O_RDONLY, &st, &e);
        close(pfd);
    }
    if (fd >= 0) {
        /* No more than the file holds, and one byte more: a file that grew since the
         * fstat shows it.  malloc, not a bytes object: no Python API here (its failure
         * is ENOMEM, a resource error as the kernel's would be). */
        size_t want = (size_t)nbytes;
        if (st.st_size >= 0 && (unsigned long long)st.st_size < (unsigned long long)nbytes)
            want = (size_t)st.st_size + 1;
        buf = malloc(want ? want : 1);
        if (!buf) {
            e = ENOMEM;
        } else if (want) {
            do
                got = pread(fd, buf, want, 0);
            while (got < 0 && errno == EINTR);
            if (got < 0) {
                e = errno;
                read_failed = 1;
            }
        }
        if (e || !keep) {
            close(fd);
            fd = -1;
        }
    }
    Py_END_ALLOW_THREADS
    if (e) {
        free(buf);
        if (read_failed) {
            PyObject *exc = PyObject_CallFunction(ReadError, "is", e, strerror(e));
            if (exc) {
                PyErr_SetObject(ReadError, exc);
                Py_DECREF(exc);
            }
            return NULL;
        }
        return opened ? os_error(e, NULL, 0) : os_error(e, path, (Py_ssize_t)strlen(path));
    }
    if (!buf)  /* not a regular file: nothing was opened */
        return Py_BuildValue("(iIKO)", -1, (unsigned int)st.st_mode, 0ULL, Py_None);
    PyObject *out = Py_BuildValue("(iIKy#)", fd, (unsigned int)st.st_mode,
                                  (unsigned long long)st.st_size, buf, (Py_ssize_t)got);
    free(buf);
    if (!out && fd >= 0)
        close(fd);
    return out;
}

/* A shard directory of base_fd for place_all: opened without following a symlink, made
 * first if missing; -1 with errno set. */
static int open_shard(int base_fd, const char *shard)
{
    int fd = openat(base_fd, shard, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        if (mkdirat(base_fd, shard, 0700) != 0 && errno != EEXIST)
            return -1;
        fd = openat(base_fd, shard, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    }
    return fd;
}

static void raise_os_error3(int e, PyObject *a, PyObject *b)
{
    PyObject *exc = b ? PyObject_CallFunction(PyExc_OSError, "isOOO", e, strerror(e), a, Py_None, b)
                      : PyObject_CallFunction(PyExc_OSError, "isO", e, strerror(e), a);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* place_all(tmp_fd, base_fd, items): for each (tmp name, shard, name) of the list items,
 * renameat it from tmp_fd into base_fd/shard/name, in order, the GIL released once for all
 * (a seal's batch publishes thousands of files from a thread of its own, which would
 * otherwise wait for the GIL after every rename).  A shard is opened when it changes
 * (items come sorted by shard), never through a symlink, and made if missing.  The first
 * failure raises: a shard's OSError names the shard alone, a rename's is os.rename's
 * (both names); what was renamed before it stays. */
static PyObject *sys_place_all(PyObject *self, PyObject *args)
{
    (void)self;
    int tmp_fd, base_fd;
    PyObject *items, *res = NULL;
    if (!PyArg_ParseTuple(args, "iiO!", &tmp_fd, &base_fd, &PyList_Type, &items))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items), failed = -1;
    PyObject **enc = PyMem_Calloc(3 * (size_t)n + 1, sizeof *enc);
    if (!enc)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 3) {
            PyErr_SetString(PyExc_TypeError, "place_all: items must be (tmp name, shard, name)");
            goto end;
        }
        for (int k = 0; k < 3; k++)  /* os.fsencode's bytes; a NUL is a ValueError */
            if (!PyUnicode_FSConverter(PyTuple_GET_ITEM(it, k), &enc[3 * i + k]))
                goto end;
    }
    int e = 0, in_shard = 0, dfd = -1;
    const char *shard = NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *sh = PyBytes_AS_STRING(enc[3 * i + 1]);
        if (!shard || strcmp(sh, shard) != 0) {
            if (dfd >= 0)
                close(dfd);
            shard = sh;
            if ((dfd = open_shard(base_fd, sh)) < 0) {
                e = errno;
                failed = i;
                break;
            }
        }
        if (renameat(tmp_fd, PyBytes_AS_STRING(enc[3 * i]), dfd,
                     PyBytes_AS_STRING(enc[3 * i + 2])) != 0) {
            e = errno;
            failed = i;
            in_shard = 1;
            break;
        }
    }
    if (dfd >= 0)
        close(dfd);
    Py_END_ALLOW_THREADS
    if (failed >= 0) {
        PyObject *it = PyList_GET_ITEM(items, failed);
        if (in_shard)
            raise_os_error3(e, PyTuple_GET_ITEM(it, 0), PyTuple_GET_ITEM(it, 2));
        else
            raise_os_error3(e, PyTuple_GET_ITEM(it, 1), NULL);
        goto end;
    }
    res = Py_NewRef(Py_None);
end:
    for (Py_ssize_t i = 0; i < 3 * n; i++)
        Py_XDECREF(enc[i]);
    PyMem_Free(enc);
    return res;
}

static PyMethodDef methods[] = {
    {"openat2", sys_openat2, METH_VARARGS,
     "openat2(dirfd, path, flags, resolve) -> fd; OSError naming path."},
    {"reopen", sys_reopen, METH_VARARGS,
     "reopen(path_fd, flags) -> (fd, st_mode, regular)\n\n"
     "fstat the O_PATH fd; if it is a regular file, open /proc/self/fd/N with flags\n"
     "(| O_CLOEXEC | O_NOCTTY), else fd is -1 and nothing is opened.  path_fd is\n"
     "closed in every case.  OSError (no file name) if fstat or the open fails."},
    {"read_beneath", sys_read_beneath, METH_VARARGS,
     "read_beneath(dirfd, path, flags, resolve, nbytes, keep) -> (fd, st_mode, st_size, head)\n\n"
     "openat2(flags, resolve) (O_PATH), fstat; a regular file is reopened through\n"
     "/proc/self/fd and its first nbytes read (one pread); its fd is returned if keep,\n"
     "else closed (-1).  Not a regular file: (-1, st_mode, 0, None), nothing opened.\n"
     "OSError naming path if openat2 fails, naming nothing if fstat or the reopen\n"
     "does; ReadError (an OSError) if the read does.  EINTR is retried."},
    {"handle_of", sys_handle_of, METH_O,
     "handle_of(fd) -> (handle type, handle bytes), by name_to_handle_at(AT_EMPTY_PATH)."},
    {"fs_type", sys_fs_type, METH_O, "fs_type(fd) -> fstatfs's f_type."},
    {"place_all", sys_place_all, METH_VARARGS,
     "place_all(tmp_fd, base_fd, items) -> None\n\n"
     "renameat each (tmp name, shard, name) of the list items (sorted by shard) from\n"
     "tmp_fd into base_fd/shard/name, the shard opened with O_NOFOLLOW (made if missing).\n"
     "The first failure raises OSError: the shard's (naming it), or os.rename's."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_sysopen", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__sysopen(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    ReadError = PyErr_NewException("verityfuse._sysopen.ReadError", PyExc_OSError, NULL);
    if (!ReadError || PyModule_AddObjectRef(m, "ReadError", ReadError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
