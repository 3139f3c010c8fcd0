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
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437 /* x86_64, aarch64 and the generic table agree */
#endif

struct vf_open_how {
    unsigned long long flags, mode, resolve;
};

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
    struct vf_open_how how = {flags, 0, resolve};
    long fd;
    int e = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
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
    int fd = -1, e = 0, regular = 0;
    Py_BEGIN_ALLOW_THREADS
    if (fstat(pfd, &st) != 0) {
        e = errno;
    } else if (S_ISREG(st.st_mode)) {
        regular = 1;
        char proc[64];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
        fd = open(proc, (int)flags | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
            e = errno;
    }
    close(pfd);
    Py_END_ALLOW_THREADS
    if (e)
        return os_error(e, NULL, 0);
    PyObject *out = Py_BuildValue("(iIi)", fd, (unsigned int)st.st_mode, regular);
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
 * policy: O_PATH first, the type from its fstat, only a regular file reopened. */
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
    PyObject *buf = PyBytes_FromStringAndSize(NULL, nbytes);
    if (!buf)
        return NULL;
    struct vf_open_how how = {flags, 0, resolve};
    struct stat st;
    int pfd, fd = -1, e = 0, step = 0, regular = 0;
    ssize_t got = 0;
    char *dst = PyBytes_AS_STRING(buf);
    Py_BEGIN_ALLOW_THREADS
    pfd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    if (pfd < 0) {
        e = errno;
    } else {
        step = 1; /* errors from here on are the reopen's: named by the caller */
        if (fstat(pfd, &st) != 0) {
            e = errno;
        } else if (S_ISREG(st.st_mode)) {
            regular = 1;
            char proc[64];
            snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
            fd = open(proc, O_RDONLY | O_CLOEXEC | O_NOCTTY);
            if (fd < 0) {
                e = errno;
            } else {
                got = nbytes ? pread(fd, dst, (size_t)nbytes, 0) : 0;
                if (got < 0) {
                    e = errno;
                    close(fd);
                    fd = -1;
                } else if (!keep) {
                    close(fd);
                    fd = -1;
                }
            }
        }
        close(pfd);
    }
    Py_END_ALLOW_THREADS
    if (e) {
        Py_DECREF(buf);
        if (step == 0)
            return os_error(e, path, (Py_ssize_t)strlen(path));
        return os_error(e, NULL, 0);
    }
    if (!regular) {
        Py_DECREF(buf);
        return Py_BuildValue("(iIKO)", -1, (unsigned int)st.st_mode, 0ULL, Py_None);
    }
    if (got != nbytes && _PyBytes_Resize(&buf, got) != 0) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    PyObject *out = Py_BuildValue("(iIKN)", fd, (unsigned int)st.st_mode,
                                  (unsigned long long)st.st_size, buf);
    if (!out && fd >= 0)
        close(fd);
    return out;
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
     "OSError naming path if openat2 fails, naming nothing if a later call does."},
    {"handle_of", sys_handle_of, METH_O,
     "handle_of(fd) -> (handle type, handle bytes), by name_to_handle_at(AT_EMPTY_PATH)."},
    {"fs_type", sys_fs_type, METH_O, "fs_type(fd) -> fstatfs's f_type."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_sysopen", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__sysopen(void)
{
    return PyModule_Create(&module);
}
