/*
 * The reply buffers of fast_read (_fastread.c).
 *
 * Included by _hashblocks.c before _fastread.c (one translation unit).
 *
 * An answer stays in one of FR_BUFS buffers until the FUSE shim says it was
 * sent (fast_done).  The shim sends a large answer from a thread of its own,
 * so that the kernel's copy of one reply overlaps the reading and hashing of
 * the next request; a buffer is not written again before its reply was sent,
 * so what is sent is what was hashed.  When every buffer is still being sent,
 * fast_read waits for one, without the GIL (the reply thread never takes it).
 *
 * Bounds: FR_BUFS buffers of FR_MAX_READ plus a block, mapped at the first
 * registration; only the first is touched unless replies overlap.
 */
#include <pthread.h>
#include <sys/mman.h>

#define FR_MAX_READ (1 << 20)    /* the kernel's largest read (max_pages 256) */
#define FR_BUFS 4                /* one being filled, up to three being sent */
#define FR_BUF_BYTES (FR_MAX_READ + FR_MAX_BLOCK)

static unsigned char *g_frbuf;    /* FR_BUFS buffers of FR_BUF_BYTES, page-aligned */
/* Which buffers hold an answer not yet sent; only the lock orders it (fast_done
 * runs on the shim's reply thread, without the GIL). */
static int g_frbusy[FR_BUFS];
static pthread_mutex_t g_frlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_frfreed = PTHREAD_COND_INITIALIZER;
static unsigned long long g_fr_buf_waits;

/* The first free reply buffer marked busy, or -1; g_frlock held. */
static int fr_take_locked(void)
{
    for (int i = 0; i < FR_BUFS; i++) {
        if (!g_frbusy[i]) {
            g_frbusy[i] = 1;
            return i;
        }
    }
    return -1;
}

/* The first free reply buffer, marked busy: waits (without the GIL) while every
 * one is still being sent.  The lowest is taken, so without overlapping replies
 * only the first buffer is ever touched. */
static int fr_take(void)
{
    pthread_mutex_lock(&g_frlock);
    int got = fr_take_locked();
    pthread_mutex_unlock(&g_frlock);
    if (got >= 0)
        return got;
    g_fr_buf_waits++;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&g_frlock);
    while ((got = fr_take_locked()) < 0)
        pthread_cond_wait(&g_frfreed, &g_frlock);
    pthread_mutex_unlock(&g_frlock);
    Py_END_ALLOW_THREADS
    return got;
}

/* In a child forked while replies were in flight: no reply thread is there to free
 * their buffers, so none is busy, and the lock is a fresh one. */
static void fr_atfork_child(void)
{
    memset(g_frbusy, 0, sizeof g_frbusy);
    pthread_mutex_init(&g_frlock, NULL);
    pthread_cond_init(&g_frfreed, NULL);
}

/* Reply buffer `token` was sent (or its answer declined): it may be filled again.
 * The shim's vf_fast_done_fn; any thread, GIL or not. */
static void fast_done(int token)
{
    if (token < 0 || token >= FR_BUFS)
        return;
    pthread_mutex_lock(&g_frlock);
    g_frbusy[token] = 0;
    pthread_cond_signal(&g_frfreed);
    pthread_mutex_unlock(&g_frlock);
}

/* Map the buffers once (GIL held); -1 with a Python error if that fails. */
static int fr_map_buffers(void)
{
    if (g_frbuf != NULL)
        return 0;
    void *p = mmap(NULL, (size_t)FR_BUFS * FR_BUF_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    g_frbuf = p;
    pthread_atfork(NULL, NULL, fr_atfork_child);
    return 0;
}
