/*
 * The one way native code opens a file it will read from a tree another process can
 * change (SOURCE for seal, the store for a mount): O_PATH first, the type from the
 * fstat of that fd, and only a regular file reopened, through /proc/self/fd.  A FIFO
 * or a device planted there is never opened (no open that waits for a writer, no
 * driver's open).  No Python API: callers run these with the GIL released.
 *
 * Included by _sysopen.c (the mount's store reads, fsutil's reopen) and, through
 * _hashblocks.c, by _sealsmall.c (a seal worker's small file).
 */
#ifndef VERITYFUSE_REGULAR_H
#define VERITYFUSE_REGULAR_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437 /* x86_64, aarch64 and the generic table agree */
#endif

struct vf_open_how {
    unsigned long long flags, mode, resolve;
};

/* fstat the O_PATH fd pfd into *st; a regular file is opened through /proc/self/fd
 * with flags and the new fd returned.  -1 otherwise: *e is the errno, or 0 when it
 * is not a regular file (nothing was opened).  pfd stays open.  An interrupted open
 * is retried (as os.open does). */
static int reopen_if_regular(int pfd, int flags, struct stat *st, int *e)
{
    *e = 0;
    if (fstat(pfd, st) != 0) {
        *e = errno;
        return -1;
    }
    if (!S_ISREG(st->st_mode))
        return -1;
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
    int fd;
    do
        fd = open(proc, flags | O_CLOEXEC | O_NOCTTY);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        *e = errno;
    return fd;
}

/* openat2(dirfd, path, flags, resolve), retried when interrupted: the fd, or -1 with
 * errno set. */
static int openat2_retry(int dirfd, const char *path, unsigned long long flags,
                         unsigned long long resolve)
{
    struct vf_open_how how = {flags, 0, resolve};
    int pfd;
    do
        pfd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    while (pfd < 0 && errno == EINTR);
    return pfd;
}

#endif
