/*
 * sealfloor: the least a seal into store format 3 can cost, for the bench.
 *
 *   sealfloor ROOT NAMES OUT WORKERS
 *
 * For every file named in NAMES (one path relative to ROOT a line), in WORKERS
 * processes: the system calls format 3 needs per small file and nothing else
 * (an O_PATH open, fstat, a reopen through /proc/self/fd, name_to_handle_at,
 * one read, two closes; an index entry created and written in OUT/tmp/, and an
 * object too for a file over one 4 KiB block), with two SHA-256 of a file of one
 * block.  Then, in one process as seal does, every file renamed into OUT/inodes/
 * or OUT/objects/ between syncfs calls.  What it writes is no store: the bytes are
 * stand-ins of the right sizes.  Exit status 1 with a message on any failure.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <openssl/sha.h>
#include <sys/stat.h>
#include <sys/wait.h>

static unsigned char buf[1 << 20];

static void die(const char *what, const char *name)
{
    fprintf(stderr, "sealfloor: %s %s: %m\n", what, name);
    exit(1);
}

static void write_new(int dirfd, const char *name, size_t len)
{
    int fd = openat(dirfd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, buf, len) != (ssize_t)len || close(fd) != 0)
        die("write", name);
}

static int open_dir(const char *out, const char *sub, int shards)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", out, sub);
    if (mkdir(p, 0700) != 0)
        die("mkdir", p);
    for (int i = 0; i < shards; i++) {
        char s[4200];
        snprintf(s, sizeof s, "%s/%02x", p, i);
        if (mkdir(s, 0700) != 0)
            die("mkdir", s);
    }
    int fd = open(p, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        die("open", p);
    return fd;
}

static void seal_one(int root, int tmp, const char *name, int i)
{
    int pfd = openat(root, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (pfd < 0 || fstat(pfd, &st) != 0)
        die("open", name);
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd);
    int fd = open(proc, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    struct {
        struct file_handle h;
        unsigned char room[128];
    } fh;
    int mount_id;
    fh.h.handle_bytes = 128;
    if (fd < 0 || name_to_handle_at(fd, "", &fh.h, &mount_id, AT_EMPTY_PATH) != 0)
        die("open", name);
    ssize_t r = pread(fd, buf, sizeof buf, 0);
    if (r < 0)
        die("read", name);
    close(fd);
    close(pfd);
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256(buf, (size_t)r, md);  /* the block's hash, then the descriptor's */
    SHA256(buf, 256, md);
    char t[64];
    snprintf(t, sizeof t, "i%02x.%d.%d", i & 255, getpid(), i);
    write_new(tmp, t, 660);  /* an index entry with its descriptor */
    if (r > 4096) {
        snprintf(t, sizeof t, "o%02x.%d.%d", i & 255, getpid(), i);
        write_new(tmp, t, 320 + 4096);  /* header, descriptor, one tree block */
    }
}

/* Rename every tmp/ file of kind ('i' or 'o') into its shard of dst. */
static void place(int tmp, int dst, char kind)
{
    DIR *d = fdopendir(dup(tmp));
    struct dirent *e;
    if (!d)
        die("list", "tmp");
    rewinddir(d);  /* a dup shares the offset, which the last listing left at the end */
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] != kind)
            continue;
        char to[300];
        snprintf(to, sizeof to, "%.2s/%s", e->d_name + 1, e->d_name + 4);
        if (renameat(tmp, e->d_name, dst, to) != 0)
            die("rename", e->d_name);
    }
    closedir(d);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: sealfloor ROOT NAMES OUT WORKERS\n");
        return 2;
    }
    int root = open(argv[1], O_PATH | O_DIRECTORY | O_CLOEXEC), workers = atoi(argv[4]);
    FILE *f = fopen(argv[2], "r");
    if (root < 0 || !f || workers < 1)
        die("open", argv[1]);
    size_t n = 0, cap = 1024;
    char **names = malloc(cap * sizeof *names), line[4096];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (n == cap)
            names = realloc(names, (cap *= 2) * sizeof *names);
        names[n++] = strdup(line);
    }
    fclose(f);
    if (mkdir(argv[3], 0700) != 0)
        die("mkdir", argv[3]);
    int tmp = open_dir(argv[3], "tmp", 0), idx = open_dir(argv[3], "inodes", 256);
    int obj = open_dir(argv[3], "objects", 256);
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0)
            die("fork", "worker");
        if (pid == 0) {
            for (size_t i = (size_t)w; i < n; i += (size_t)workers)
                seal_one(root, tmp, names[i], (int)i);
            _exit(0);
        }
    }
    int status, failed = 0;
    while (wait(&status) > 0)
        failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    if (failed)
        return 1;
    syncfs(tmp);
    place(tmp, obj, 'o');
    syncfs(tmp);
    place(tmp, idx, 'i');
    syncfs(tmp);
    /* Every file placed: tmp/ holds nothing now (a floor that skipped work would lie). */
    DIR *d = fdopendir(dup(tmp));
    struct dirent *e;
    if (!d)
        die("list", "tmp");
    rewinddir(d);
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
            fprintf(stderr, "sealfloor: %s was never placed (left in tmp/)\n", e->d_name);
            return 1;
        }
    closedir(d);
    return 0;
}
