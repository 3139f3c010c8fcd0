/*
 * ss_seal: one small file sealed into a store's tmp/, with no Python API;
 * _sealchunk.c calls it for each file of a chunk (seal_small).
 *
 * Included by _hashblocks.c after the hashing core (one translation unit).
 *
 * Why native: a seal worker's small file is a dozen system calls (~30 us in
 * tmpfs) wrapped in ~45 us of Python (open policy, tree, descriptor, key,
 * entry text, tmp files).  Here it is the same calls (but one fstat: the
 * reopened file is the inode the O_PATH fd's fstat described) and the same
 * bytes with no interpreter in between; sealing.native_stager builds the
 * Staged (and a manifest's Recorded) from what it returns.
 *
 * It handles the common case only and declines everything else (seal_small
 * gives None, every tmp file made removed): sealing.stage_path then seals the
 * file as before, and reports any error with its own message.  Declined: a
 * path that is not a str or holds a NUL (seal_small), a path with a "..",
 * anything but a regular file, a file on another device
 * than the caller named (its fsid would differ), one over SEAL_SMALL_MAX
 * bytes, a file that changed size while it was read (or read short), no file
 * handle, and any failing system call.
 *
 * The bytes are sealing.py's exactly (tests/test_seal_native.py compares
 * whole stores): the file is opened as fsutil.open_beneath +
 * reopen_regular do (openat2 O_PATH beneath SOURCE with no symlink, fstat,
 * reopen through /proc/self/fd: a FIFO or device is never opened), its
 * index key is identity.store_key, its descriptor merkle.make_descriptor,
 * its object store_object.ObjectWriter's, its entry store_index.entry_bytes.
 * Without in->index (a manifest's files, which are found by digest) it makes
 * neither key nor index entry: no file handle is asked.
 */
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "_regular.h"
#define SS_RESOLVE (0x08 | 0x04 | 0x02) /* BENEATH | NO_SYMLINKS | NO_MAGICLINKS */
#define SEAL_SMALL_MAX (1 << 20) /* seal_pool.SMALL: what a worker seals */
#define SS_MAX_LEVELS 8
#define SS_MAX_HANDLE 128
#define SS_DESC 256
#define SS_HEADER 64

struct ss_in {
    int root_fd, tmp_fd, alg, log_bs, make_object, keep_desc, index;
    const char *path, *idx_name, *obj_name, *alg_name;
    const unsigned char *salt, *prefix, *path_json;
    size_t salt_len, prefix_len, path_json_len;
    unsigned long long dev, fsid;
};

struct ss_out {
    long long size;
    char key[65];  /* with in->index only */
    unsigned char digest[SHA512_DIGEST_LENGTH], desc[SS_DESC];
    int wrote_object;
    struct stat st;  /* the file's fstat (of its O_PATH fd): what a manifest records */
};

static void ss_hex(const unsigned char *p, size_t n, char *out)
{
    static const char x[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = x[p[i] >> 4];
        out[2 * i + 1] = x[p[i] & 15];
    }
}

static int ss_has_dotdot(const char *p)
{
    for (const char *s = p; (s = strstr(s, "..")) != NULL; s += 2)
        if ((s == p || s[-1] == '/') && (s[2] == '\0' || s[2] == '/'))
            return 1;
    return 0;
}

/* Write all of buf to a new tmp file; 0, or -1 with the file removed. */
static int ss_write_tmp(int tmp_fd, const char *name, const void *buf, size_t len)
{
    int fd = openat(tmp_fd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    const unsigned char *p = buf;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w <= 0) {
            close(fd);
            unlinkat(tmp_fd, name, 0);
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    if (close(fd) != 0) {
        unlinkat(tmp_fd, name, 0);
        return -1;
    }
    return 0;
}

/* Open the regular file beneath root_fd as SourceDir.open_regular does (_regular.h):
 * -1 to decline. */
static int ss_open(const struct ss_in *in, struct stat *st)
{
    int pfd = openat2_retry(in->root_fd, in->path, O_PATH | O_NOFOLLOW | O_CLOEXEC,
                            SS_RESOLVE);
    if (pfd < 0)
        return -1;
    int e;  /* why it failed: the Python path finds out again, and says it */
    int fd = reopen_if_regular(pfd, O_RDONLY, st, &e);
    close(pfd);
    /* No fstat of fd before the read: it is that very inode, and a size changed since
     * the one above is seen by the read (one byte more is asked); ss_unchanged after. */
    return fd;
}

/* Whether the file open as fd has the size and mtime of st still: a file written
 * while it was read (same size, other bytes) must not be sealed as what was read, a
 * mix of old and new bytes perhaps.  Not the ctime, which a rename or link moves too.
 * A write already under way at the first fstat moved the mtime before it, and can go
 * unseen (treebuild.check_unchanged says so too). */
static int ss_unchanged(int fd, const struct stat *st)
{
    struct stat now;
    return fstat(fd, &now) == 0 && now.st_size == st->st_size
           && now.st_mtim.tv_sec == st->st_mtim.tv_sec
           && now.st_mtim.tv_nsec == st->st_mtim.tv_nsec;
}

/* The tree of data (len bytes, zero-padded to whole blocks in buf) into tree
 * (tree_size bytes, zeroed here), in the kernel's layout (the level nearest the root
 * first); its descriptor and file digest into out. */
static void ss_tree(const struct ss_in *in, const unsigned char *buf, size_t len, size_t bs,
                    size_t ds, const size_t *level_blocks, int levels, unsigned char *tree,
                    size_t tree_size, struct ss_out *out)
{
    size_t nblocks = (len + bs - 1) / bs, start[SS_MAX_LEVELS];
    unsigned char root[SHA512_DIGEST_LENGTH] = {0};
    struct hctx c;
    size_t at = 0;
    for (int k = levels - 1; k >= 0; k--) {
        start[k] = at;
        at += level_blocks[k] * bs;
    }
    memset(tree, 0, tree_size);
    const unsigned char *below = buf;  /* the blocks level k hashes */
    size_t n = nblocks;
    for (int k = 0; k < levels; k++) {
        hctx_init(&c, in->alg, in->prefix, in->prefix_len, below, n * bs, bs);
        hash_range(&c, 0, n, tree + start[k]);
        below = tree + start[k];
        n = level_blocks[k];
    }
    if (nblocks > 0) {  /* the top level's one block, or the file's one block */
        hctx_init(&c, in->alg, in->prefix, in->prefix_len, below, bs, bs);
        hash_range(&c, 0, 1, root);
    }
    unsigned char *d = out->desc;  /* uapi.DESCRIPTOR_STRUCT: "<BBBBIQ64s32s144s" */
    memset(d, 0, SS_DESC);
    d[0] = 1;
    d[1] = (unsigned char)in->alg;
    d[2] = (unsigned char)in->log_bs;
    d[3] = (unsigned char)in->salt_len;
    for (int i = 0; i < 8; i++)
        d[8 + i] = (unsigned char)((unsigned long long)len >> (8 * i));
    memcpy(d + 16, root, ds);
    memcpy(d + 80, in->salt, in->salt_len);
    if (in->alg == ALG_SHA512)
        SHA512(d, SS_DESC, out->digest);
    else
        sha256_one(d, SS_DESC, out->digest);
}

/* merkle.Geometry: blocks per tree level, level 0 (the data's hashes) first. */
static int ss_levels(size_t nblocks, size_t hpb, size_t *level_blocks)
{
    int levels = 0;
    while (nblocks > 1) {
        if (levels == SS_MAX_LEVELS)
            return -1;
        nblocks = (nblocks + hpb - 1) / hpb;
        level_blocks[levels++] = nblocks;
    }
    return levels;
}

/* A buffer of at least n bytes, page-aligned (the copy from the page cache into an
 * unaligned one is several times slower), kept by the thread for its next files. */
static unsigned char *ss_buffer(size_t n)
{
    static __thread unsigned char *buf;
    static __thread size_t cap;
    if (n > cap) {
        free(buf);
        cap = 0;
        if (posix_memalign((void **)&buf, 4096, n) != 0)
            return buf = NULL;
        cap = n;
    }
    return buf;
}

/* The index key: SHA-256(le64 fsid || le32 handle type || handle). */
static int ss_key(int fd, unsigned long long fsid, char *key)
{
    struct {
        struct file_handle h;
        unsigned char room[SS_MAX_HANDLE];
    } fh;
    int mount_id;
    fh.h.handle_bytes = SS_MAX_HANDLE;
    if (name_to_handle_at(fd, "", &fh.h, &mount_id, AT_EMPTY_PATH) != 0)
        return -1;
    unsigned char msg[12 + SS_MAX_HANDLE], md[SHA256_DIGEST_LENGTH];
    for (int i = 0; i < 8; i++)
        msg[i] = (unsigned char)(fsid >> (8 * i));
    for (int i = 0; i < 4; i++)
        msg[8 + i] = (unsigned char)((unsigned int)fh.h.handle_type >> (8 * i));
    memcpy(msg + 12, fh.h.f_handle, fh.h.handle_bytes);
    sha256_one(msg, 12 + fh.h.handle_bytes, md);
    ss_hex(md, sizeof md, key);
    key[64] = '\0';
    return 0;
}

/* Seal in->path into tmp/: 0, or -1 to decline (nothing left behind).  No Python API. */
static int ss_seal(const struct ss_in *in, struct ss_out *out)
{
    size_t bs = (size_t)1 << in->log_bs;
    if (ss_has_dotdot(in->path))
        return -1;
    struct stat st;
    int fd = ss_open(in, &st);
    if (fd < 0)
        return -1;
    int rc = -1;
    unsigned char *buf, *obj = NULL;
    char *entry = NULL;
    size_t len = (size_t)st.st_size, ds = in->alg == ALG_SHA512 ? SHA512_DIGEST_LENGTH
                                                               : SHA256_DIGEST_LENGTH;
    size_t level_blocks[SS_MAX_LEVELS], tree_size = 0;
    int levels = ss_levels((len + bs - 1) / bs, bs / ds, level_blocks);
    if ((unsigned long long)st.st_dev != in->dev || st.st_size > SEAL_SMALL_MAX || levels < 0
        || (in->index && ss_key(fd, in->fsid, out->key) != 0))
        goto done;
    for (int k = 0; k < levels; k++)
        tree_size += level_blocks[k] * bs;
    /* Whole blocks, zero-padded, plus one byte to see a file that grew. */
    size_t room = (len + bs - 1) / bs * bs + 1;
    if ((buf = ss_buffer(room)) == NULL)
        goto done;
    /* One read of a byte more than the fstat's size: a regular file's read stops short
     * only at its end, so exactly len bytes is the whole file, unchanged in size.  Any
     * other count (grown, truncated, or a file system that reads short) declines: the
     * Python path (treebuild.read_small) reads on and says what changed.  One pread a
     * file, not a second one to see the end; then an fstat, for a file written meanwhile
     * in place (the Python path says that too). */
    if (pread(fd, buf, len + 1, 0) != (ssize_t)len || !ss_unchanged(fd, &st))
        goto done;
    memset(buf + len, 0, room - 1 - len);
    if ((obj = malloc(SS_HEADER + SS_DESC + tree_size)) == NULL)
        goto done;
    ss_tree(in, buf, len, bs, ds, level_blocks, levels, obj + SS_HEADER + SS_DESC, tree_size,
            out);
    out->size = (long long)len;
    out->st = st;
    out->wrote_object = in->make_object || len > bs;
    if (out->wrote_object) {
        unsigned char *h = obj;  /* store_object.OBJECT_HEADER: "<8sIIQ40s" */
        memset(h, 0, SS_HEADER);
        memcpy(h, "VFSTREE1", 8);
        h[8] = SS_HEADER;
        for (int i = 0; i < 8; i++)
            h[16 + i] = (unsigned char)((unsigned long long)tree_size >> (8 * i));
        memcpy(h + SS_HEADER, out->desc, SS_DESC);
        if (ss_write_tmp(in->tmp_fd, in->obj_name, obj, SS_HEADER + SS_DESC + tree_size) != 0)
            goto done;
    }
    if (!in->index) {  /* a manifest's file: found by its digest, never by its inode */
        rc = 0;
        goto done;
    }
    /* store_index.entry_bytes, byte for byte. */
    int keep = in->keep_desc && len <= bs;
    size_t cap = 64 + 2 * SS_DESC + 16 + 2 * ds + in->path_json_len + 32;
    entry = malloc(cap);
    if (!entry)
        goto drop_object;
    size_t n = 0;
    entry[n++] = '{';
    if (keep) {
        n += (size_t)sprintf(entry + n, "\"descriptor\": \"");
        ss_hex(out->desc, SS_DESC, entry + n);
        n += 2 * SS_DESC;
        n += (size_t)sprintf(entry + n, "\", ");
    }
    n += (size_t)sprintf(entry + n, "\"digest\": \"%s:", in->alg_name);
    ss_hex(out->digest, ds, entry + n);
    n += 2 * ds;
    n += (size_t)sprintf(entry + n, "\", \"path\": ");
    memcpy(entry + n, in->path_json, in->path_json_len);
    n += in->path_json_len;
    n += (size_t)sprintf(entry + n, ", \"version\": 2}\n");
    if (ss_write_tmp(in->tmp_fd, in->idx_name, entry, n) == 0) {
        rc = 0;
        goto done;
    }
drop_object:
    if (out->wrote_object)
        unlinkat(in->tmp_fd, in->obj_name, 0);
done:
    free(entry);
    free(obj);
    close(fd);
    return rc;
}
