/*
 * FUSE_IOCTL for pyfuse3, which has no ioctl handler.
 *
 * pyfuse3 builds its fuse_lowlevel_ops without .ioctl and hands them to
 * fuse_session_new().  This library defines fuse_session_new() itself; when it
 * is loaded RTLD_GLOBAL *before* pyfuse3 is imported, pyfuse3's reference binds
 * here (the global scope is searched first).  We copy the ops, add .ioctl, and
 * call the real libfuse function (RTLD_NEXT: found through our own DT_NEEDED
 * on libfuse3).  libfuse copies the ops into the session, so our copy is freed
 * at once.  An existing .ioctl is left alone, so a future pyfuse3 with its own
 * handler keeps working.
 *
 * Each ioctl request goes to one Python callback (registered with
 * vf_set_handler) with the GIL held, on pyfuse3's trio thread.  Contract: the
 * callback returns 0 when it has replied or will reply later (with
 * vf_reply_ioctl / vf_reply_err, exactly once), or an errno > 0 for this file
 * to reply with.  Without a callback every ioctl answers ENOTTY.
 *
 * It also wraps .init to ask for FUSE_CAP_DONT_MASK when the daemon says it
 * applies the caller's umask itself (vf_set_dont_mask): then a default ACL on
 * the parent directory wins over the umask, as on the backing filesystem; and to
 * raise the kernel's limit of reads in flight (max_background, 12 by default)
 * when the daemon asks (vf_set_max_background): page-cache reads are background
 * requests, so that many reads waiting on a stalled registry would hold up every
 * read of the mount.
 *
 * And it wraps fuse_reply_open (interposed the same way) to mark a handle opened
 * read-only FOPEN_NOFLUSH when the daemon asks (vf_set_noflush_ro): a close of
 * it then sends no FLUSH, one request less per open+read+close, because the
 * daemon's flush has nothing to do for a handle nothing was written through.
 * Per handle, unlike answering FLUSH with ENOSYS (which the kernel remembers for
 * the whole connection): a writable handle still gets its FLUSH.  Kernels before
 * 5.16 ignore the flag and send FLUSH as before.
 *
 * FUSE_READ goes first to the native read path, FUSE_OPEN and FUSE_RELEASE to the
 * native open path, FUSE_LOOKUP to a plain call of the view's lookup, when Python
 * hands them over (vf_set_fast_read, vf_set_fast_open, vf_set_fast_lookup;
 * _fastread.c, _fastopen.c, _fastlookup.c): each answers what it can, and the rest
 * goes to pyfuse3 as before.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
/* libfuse >= 3.17 makes fuse_session_new a header inline around
 * fuse_session_new_versioned; keep its declaration out of our way. */
#define fuse_session_new vf_header_fuse_session_new
#include <fuse_lowlevel.h>
#undef fuse_session_new

#include <dlfcn.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef int (*vf_ioctl_cb)(void *req, uint64_t ino, unsigned int cmd, uint64_t fh,
                           unsigned int flags, const void *in_buf, size_t in_bufsz,
                           size_t out_bufsz);

static vf_ioctl_cb handler;
static int hooks;
static int want_dont_mask;
static unsigned max_background;
static int noflush_ro;
static void (*orig_init)(void *userdata, struct fuse_conn_info *conn);

typedef int (*vf_fast_read_fn)(uint64_t fh, size_t size, int64_t off, const void **out,
                               size_t *len, int *token);
typedef void (*vf_fast_done_fn)(int token);
static vf_fast_read_fn fast_read;
static vf_fast_done_fn fast_done;
static void (*orig_read)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         struct fuse_file_info *fi);
typedef int (*vf_fast_open_fn)(uint64_t ino, int flags, uint32_t uid, uint64_t *fh);
typedef int (*vf_fast_release_fn)(uint64_t fh);
static vf_fast_open_fn fast_open;
static vf_fast_release_fn fast_release;
static void (*orig_open)(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
static void (*orig_release)(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
typedef int (*vf_fast_lookup_fn)(uint64_t parent, const char *name, struct stat *st,
                                 double *timeout);
typedef void (*vf_fast_unlookup_fn)(uint64_t ino);
static vf_fast_lookup_fn fast_lookup;
static vf_fast_unlookup_fn fast_unlookup;
static void (*orig_lookup)(fuse_req_t req, fuse_ino_t parent, const char *name);

#include "_shimreplies.c"

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    const void *buf;
    size_t len;
    int token;
    if (fast_read != NULL && fi != NULL && fast_read(fi->fh, size, off, &buf, &len, &token) == 0) {
        if (len < RQ_MIN_BYTES || !rq_push(req, buf, len, token)) {
            fuse_reply_buf(req, buf, len);
            fast_done(token);
        }
        return;
    }
    orig_read(req, ino, size, off, fi);
}

static void shim_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    uint64_t fh;
    if (fast_open != NULL && fi != NULL
        && fast_open(ino, fi->flags, fuse_req_ctx(req)->uid, &fh) == 0) {
        struct fuse_file_info out = *fi;
        out.fh = fh;
        out.keep_cache = 1;  /* verified pages may stay cached: they were verified when filled */
        out.direct_io = 0;
        if (fuse_reply_open(req, &out) != 0)
            fast_release(fh);  /* the open was interrupted: no release will come for it */
        return;
    }
    orig_open(req, ino, fi);
}

static void shim_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (fast_lookup != NULL) {
        struct fuse_entry_param e;
        double timeout = 0;
        memset(&e, 0, sizeof e);
        int rc = fast_lookup(parent, name, &e.attr, &timeout);
        if (rc == 0) {
            e.ino = e.attr.st_ino;
            e.attr_timeout = e.entry_timeout = timeout;
            if (fuse_reply_entry(req, &e) != 0)
                fast_unlookup(e.ino);  /* the kernel did not count it: neither may we */
            return;
        }
        if (rc > 0) {
            fuse_reply_err(req, rc);
            return;
        }
    }
    orig_lookup(req, parent, name);
}

static void shim_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fast_release != NULL && fi != NULL && fast_release(fi->fh) == 0) {
        fuse_reply_err(req, 0);
        return;
    }
    orig_release(req, ino, fi);
}

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    if (orig_init)
        orig_init(userdata, conn);
    if (want_dont_mask && (conn->capable & FUSE_CAP_DONT_MASK))
        conn->want |= FUSE_CAP_DONT_MASK;
    if (max_background) {
        conn->max_background = max_background;
        conn->congestion_threshold = max_background * 3 / 4;  /* the kernel's ratio */
    }
}

static void shim_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                       struct fuse_file_info *fi, unsigned flags, const void *in_buf,
                       size_t in_bufsz, size_t out_bufsz)
{
    (void)arg; /* a pointer into the caller's memory: meaningless here */
    int rc = ENOTTY;
    if (handler)
        rc = handler(req, ino, cmd, fi ? fi->fh : 0, flags, in_buf, in_bufsz, out_bufsz);
    if (rc != 0)
        fuse_reply_err(req, rc > 0 ? rc : EIO);
}

/* A copy of op with .ioctl set (and .init wrapped), or NULL to use op unchanged. */
static struct fuse_lowlevel_ops *add_ioctl(const struct fuse_lowlevel_ops *op, size_t op_size)
{
    if (op == NULL || op_size < offsetof(struct fuse_lowlevel_ops, ioctl) + sizeof(op->ioctl)
        || op->ioctl != NULL)
        return NULL;
    struct fuse_lowlevel_ops *copy = malloc(op_size);
    if (copy == NULL)
        return NULL;
    memcpy(copy, op, op_size);
    copy->ioctl = shim_ioctl;
    orig_init = op->init;
    copy->init = shim_init;
    if (op->read != NULL) {
        orig_read = op->read;
        copy->read = shim_read;
    }
    if (op->lookup != NULL) {
        orig_lookup = op->lookup;
        copy->lookup = shim_lookup;
    }
    if (op->open != NULL && op->release != NULL) {
        orig_open = op->open;
        copy->open = shim_open;
        orig_release = op->release;
        copy->release = shim_release;
    }
    return copy;
}

typedef struct fuse_session *(*new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                       size_t, void *);
typedef struct fuse_session *(*new_versioned_fn)(struct fuse_args *,
                                                 const struct fuse_lowlevel_ops *, size_t,
                                                 void *, void *);

EXPORT struct fuse_session *fuse_session_new(struct fuse_args *args,
                                             const struct fuse_lowlevel_ops *op,
                                             size_t op_size, void *userdata)
{
    new_fn real = (new_fn)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (real == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    struct fuse_lowlevel_ops *copy = add_ioctl(op, op_size);
    struct fuse_session *se = real(args, copy ? copy : op, op_size, userdata);
    if (se != NULL && copy != NULL)
        hooks++;
    free(copy);
    return se;
}

/* libfuse >= 3.17 (untested here: Debian 12 ships 3.14). */
EXPORT struct fuse_session *fuse_session_new_versioned(struct fuse_args *args,
                                                       const struct fuse_lowlevel_ops *op,
                                                       size_t op_size, void *version,
                                                       void *userdata)
{
    new_versioned_fn real =
        (new_versioned_fn)dlvsym(RTLD_NEXT, "fuse_session_new_versioned", "FUSE_3.17");
    if (real == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    struct fuse_lowlevel_ops *copy = add_ioctl(op, op_size);
    struct fuse_session *se = real(args, copy ? copy : op, op_size, version, userdata);
    if (se != NULL && copy != NULL)
        hooks++;
    free(copy);
    return se;
}

typedef void (*session_fn)(struct fuse_session *);

/* Interposed too, as fuse_session_destroy below: replies still queued are sent first.
 * Unmounting closes the session's /dev/fuse fd, whose number a later open may take:
 * a reply written after that could land in another file. */
EXPORT void fuse_session_unmount(struct fuse_session *se)
{
    session_fn real = (session_fn)dlvsym(RTLD_NEXT, "fuse_session_unmount", "FUSE_3.0");
    rq_drain();
    if (real != NULL)
        real(se);
}

/* The queued requests refer to the session. */
EXPORT void fuse_session_destroy(struct fuse_session *se)
{
    session_fn real = (session_fn)dlvsym(RTLD_NEXT, "fuse_session_destroy", "FUSE_3.0");
    rq_drain();
    if (real != NULL)
        real(se);
}

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);

EXPORT int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    static reply_open_fn real;
    if (real == NULL)
        real = (reply_open_fn)dlvsym(RTLD_NEXT, "fuse_reply_open", "FUSE_3.0");
    if (real == NULL)
        return fuse_reply_err(req, EIO);
    if (noflush_ro && fi != NULL && (fi->flags & O_ACCMODE) == O_RDONLY) {
        struct fuse_file_info copy = *fi; /* pyfuse3's copy of the request's: flags intact */
        copy.noflush = 1;
        return real(req, &copy);
    }
    return real(req, fi);
}

/* --- called from Python (ctypes) --- */

EXPORT void vf_set_handler(vf_ioctl_cb cb) { handler = cb; }

EXPORT int vf_hook_count(void) { return hooks; }

EXPORT void vf_set_dont_mask(int on) { want_dont_mask = on; }

EXPORT void vf_set_max_background(unsigned n) { max_background = n; }

EXPORT void vf_set_noflush_ro(int on) { noflush_ro = on; }

/* The fast_read signature this shim calls (with a token, and fast_done): Python hands
 * the native entry only to a shim that says it, never to one built before. */
EXPORT int vf_fast_read_abi(void) { return 2; }

/* NULL: every read goes to pyfuse3.  Only with a session hooked (orig_read set).
 * done: called with a reply's token once it was sent. */
EXPORT int vf_set_fast_read(vf_fast_read_fn fn, vf_fast_done_fn done)
{
    if (orig_read == NULL || (fn != NULL && done == NULL))
        return 0;
    rq_drain();
    fast_done = done;
    fast_read = fn;
    return 1;
}

/* The fast_open signature this shim calls. */
EXPORT int vf_fast_open_abi(void) { return 1; }

/* NULL twice: every open and release goes to pyfuse3.  Only with a session hooked. */
EXPORT int vf_set_fast_open(vf_fast_open_fn open_fn, vf_fast_release_fn release_fn)
{
    if (orig_open == NULL || (open_fn == NULL) != (release_fn == NULL))
        return 0;
    fast_open = open_fn;
    fast_release = release_fn;
    return 1;
}

EXPORT int vf_fast_lookup_abi(void) { return 1; }

/* NULL twice: every lookup goes to pyfuse3.  Only with a session hooked. */
EXPORT int vf_set_fast_lookup(vf_fast_lookup_fn lookup_fn, vf_fast_unlookup_fn unlookup_fn)
{
    if (orig_lookup == NULL || (lookup_fn == NULL) != (unlookup_fn == NULL))
        return 0;
    fast_lookup = lookup_fn;
    fast_unlookup = unlookup_fn;
    return 1;
}

EXPORT unsigned long long vf_replies_sent_apart(void)
{
    pthread_mutex_lock(&rq_lock);
    unsigned long long n = rq_sent;
    pthread_mutex_unlock(&rq_lock);
    return n;
}

EXPORT int vf_reply_ioctl(void *req, int result, const void *buf, size_t size)
{
    return fuse_reply_ioctl((fuse_req_t)req, result, size ? buf : NULL, size);
}

EXPORT int vf_reply_err(void *req, int err) { return fuse_reply_err((fuse_req_t)req, err); }

EXPORT int vf_req_interrupted(void *req) { return fuse_req_interrupted((fuse_req_t)req); }

/* The caller's credentials: uid, gid, pid. */
EXPORT void vf_req_ctx(void *req, uint32_t *uid, uint32_t *gid, uint32_t *pid)
{
    const struct fuse_ctx *ctx = fuse_req_ctx((fuse_req_t)req);
    *uid = ctx->uid;
    *gid = ctx->gid;
    *pid = (uint32_t)ctx->pid;
}
