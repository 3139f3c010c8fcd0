/*
 * One persistent helper thread that shares a request's work with its caller.
 *
 * Included by _hashblocks.c (one translation unit, everything static).
 *
 * A request is cut into small pieces numbered 0..npieces-1; the caller posts
 * it in a one-job slot, wakes the helper, and both threads claim pieces from
 * the job's atomic counter until none is left (work stealing): however late
 * the helper joins, the two finish within one piece of each other.  Why this
 * shape:
 *  - no per-request thread hand-off: the caller never waits for the helper
 *    to start, it starts on piece 0 itself, and the helper joins when it wakes;
 *  - the idle helper sleeps on a futex at once, it never polls: an earlier
 *    version polled for up to 400 us after each job (sched_yield and
 *    clock_gettime), which was a third of a daemon's CPU for sequential reads
 *    and bought them 1% of throughput.  The wake-up costs the caller one
 *    FUTEX_WAKE (issued only when the helper has said it is asleep) and the
 *    helper tens of microseconds of latency, which the pieces absorb;
 *  - the only spinning is the caller's, after its last piece, while the
 *    helper still has one in flight (a piece is a few microseconds of work);
 *  - on a busy machine the helper may not run beside the caller at all (the
 *    other CPU runs other work, or the helper was woken on the caller's
 *    CPU): then the caller ends up waiting for the helper's piece instead of
 *    doing it, so after such a wait the caller works alone for a while
 *    (exponential back-off, see SLOW_HELPER_NS);
 *  - one slot: when another job already sits in it, the caller does all of
 *    its own work; several Python threads never queue behind each other.
 *
 * Lifetime of a job (it lives on the caller's stack): the helper touches a
 * job only after taking it out of the slot with an atomic exchange.  At the
 * end the caller tries to take its job back (compare-exchange): if it is
 * still there the helper never saw it; otherwise the caller waits until the
 * helper marks it done, which is the helper's last access to it.
 *
 * After fork() only the forking thread exists in the child: an atfork
 * handler forgets the helper and the child starts its own on first use.  The
 * thread is detached and blocks every signal; process exit just ends it.
 */
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* A caller whose pieces are done waits this long (spinning) for the helper
 * to finish its last piece before sleeping on a futex: a running helper
 * finishes a piece within ~30 us; one that takes longer was most likely
 * preempted, maybe on this very CPU, and spinning would only keep it off. */
#ifndef CALLER_SPIN_NS
#define CALLER_SPIN_NS 30000
#endif
/* When the caller had to wait longer than this for the helper's last piece,
 * the helper was not running beside it (the other CPU is busy with other
 * work, or the two threads share one): sharing cost more than it saved.
 * The next BACKOFF_MIN jobs, doubling up to BACKOFF_MAX while it goes on,
 * are run by the caller alone; one prompt helper resets that. */
#define SLOW_HELPER_NS 60000
#define BACKOFF_MIN 4
#define BACKOFF_MAX 256

struct pool_job {
    void (*work)(void *arg, size_t piece);
    void *arg;
    size_t npieces;
    atomic_size_t next;   /* next piece to claim */
    atomic_uint state;    /* futex word: JOB_RUNNING, JOB_CALLER_ASLEEP, JOB_HELPER_DONE */
    size_t helper_pieces; /* written by the helper before JOB_HELPER_DONE */
};

enum { JOB_RUNNING, JOB_CALLER_ASLEEP, JOB_HELPER_DONE };

static _Atomic(struct pool_job *) g_posted;  /* the slot: a job the helper may join */
static atomic_uint g_post_seq;               /* futex word, bumped on every post */
static atomic_int g_helper_asleep;           /* helper is (about to be) in FUTEX_WAIT */
static int g_helper_started;                 /* in this process; changed under the GIL */
static pid_t g_helper_pid;                   /* the process that started it */
static int g_atfork_done;
/* For info(): jobs the helper joined, and how the pieces of every job that
 * was offered to it were shared (the split the pool achieves). */
static atomic_ulong g_helper_jobs, g_split_pieces_caller, g_split_pieces_helper;
/* Back-off after slow helpers: jobs still to run alone, and the current run
 * length.  Concurrent callers may overwrite each other's updates, which is
 * harmless (a hint, nothing depends on its exact value); g_skip is only ever
 * decremented from a nonzero value, so it cannot wrap. */
static atomic_uint g_skip, g_backoff;
static atomic_ulong g_jobs_alone;  /* info(): jobs not offered because of it */
static atomic_ulong g_wait_ns;     /* info(): the callers' waits for the helper's last piece */

static void futex_wait(atomic_uint *word, unsigned expected)
{
    /* EAGAIN (the word changed) and EINTR are normal: callers re-check. */
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT | FUTEX_PRIVATE_FLAG, expected, NULL, NULL, 0);
}

static void futex_wake(atomic_uint *word)
{
    /* Only the address is used (private futex): safe even if the job that
     * held this word has already returned; a stray wake-up is re-checked. */
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE | FUTEX_PRIVATE_FLAG, 1, NULL, NULL, 0);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Claim and run pieces until none is left; returns how many this thread ran. */
static size_t run_pieces(struct pool_job *j)
{
    size_t ran = 0;
    for (;;) {
        /* Relaxed is enough: the job's fields were published by the slot's
         * seq_cst operations, and each piece writes disjoint output. */
        size_t p = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (p >= j->npieces)
            return ran;
        j->work(j->arg, p);
        ran++;
    }
}

static void *helper_main(void *unused)
{
    (void)unused;
    for (;;) {
        struct pool_job *j = atomic_exchange(&g_posted, NULL);
        if (j != NULL) {
            atomic_fetch_add_explicit(&g_helper_jobs, 1, memory_order_relaxed);
            j->helper_pieces = run_pieces(j);
            /* The last access to *j; the caller may return right after. */
            if (atomic_exchange(&j->state, JOB_HELPER_DONE) == JOB_CALLER_ASLEEP)
                futex_wake(&j->state);
            continue;
        }
        /* Sleep.  With seq_cst, either we see the post below, or the poster
         * sees g_helper_asleep and wakes us; a post between our read of the
         * sequence and FUTEX_WAIT makes the wait return at once. */
        unsigned seq = atomic_load(&g_post_seq);
        atomic_store(&g_helper_asleep, 1);
        if (atomic_load(&g_posted) == NULL)
            futex_wait(&g_post_seq, seq);
        atomic_store(&g_helper_asleep, 0);
    }
    return NULL;
}

static void pool_atfork_child(void)
{
    /* The helper did not survive the fork; jobs of other threads neither. */
    g_helper_started = 0;
    atomic_store(&g_posted, NULL);
    atomic_store(&g_helper_asleep, 0);
}

/* Start the helper if it is not running in this process.  Call with the GIL
 * held (it serializes starts).  Returns 0 if no helper is available. */
static int pool_ensure_helper(void)
{
    /* The pid check backs up the atfork handler for a child made by a raw
     * clone() that skips it. */
    if (g_helper_started && g_helper_pid == getpid())
        return 1;
    if (g_helper_started)
        pool_atfork_child();
    if (!g_atfork_done) {
        if (pthread_atfork(NULL, NULL, pool_atfork_child) != 0)
            return 0;
        g_atfork_done = 1;
    }
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return 0;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    /* Signals stay with Python's threads: create the helper with all blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t tid;
    int rc = pthread_create(&tid, &attr, helper_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0)
        return 0;
    g_helper_started = 1;
    g_helper_pid = getpid();
    return 1;
}

/* Run every piece of j, with the helper's help if use_helper (the caller has
 * checked pool_ensure_helper()).  Returns when every piece is done.  Called
 * without the GIL. */
static void pool_run(struct pool_job *j, int use_helper)
{
    atomic_init(&j->next, 0);
    atomic_init(&j->state, JOB_RUNNING);
    j->helper_pieces = 0;
    int posted = 0;
    if (use_helper && j->npieces > 1) {
        /* Take one job off the back-off; never below zero with concurrent callers. */
        unsigned k = atomic_load_explicit(&g_skip, memory_order_relaxed);
        while (k && !atomic_compare_exchange_weak_explicit(&g_skip, &k, k - 1,
                                                           memory_order_relaxed,
                                                           memory_order_relaxed))
            ;
        if (k) {
            atomic_fetch_add_explicit(&g_jobs_alone, 1, memory_order_relaxed);
            use_helper = 0;
        }
    }
    if (use_helper && j->npieces > 1) {
        struct pool_job *empty = NULL;
        if (atomic_compare_exchange_strong(&g_posted, &empty, j)) {
            posted = 1;
            atomic_fetch_add(&g_post_seq, 1);
            if (atomic_load(&g_helper_asleep))
                futex_wake(&g_post_seq);
        }
    }
    size_t mine_ran = run_pieces(j);
    if (!posted)
        return;
    atomic_fetch_add_explicit(&g_split_pieces_caller, mine_ran, memory_order_relaxed);
    struct pool_job *mine = j;
    if (atomic_compare_exchange_strong(&g_posted, &mine, NULL))
        return;  /* the helper never took it */
    /* The helper has it: it finishes at most the piece it is on. */
    uint64_t start = now_ns(), waited;
    while (atomic_load(&j->state) != JOB_HELPER_DONE) {
        if (now_ns() - start >= CALLER_SPIN_NS) {
            unsigned expect = JOB_RUNNING;
            if (atomic_compare_exchange_strong(&j->state, &expect, JOB_CALLER_ASLEEP)) {
                while (atomic_load(&j->state) != JOB_HELPER_DONE)
                    futex_wait(&j->state, JOB_CALLER_ASLEEP);
            }
            break;
        }
        for (int i = 0; i < 8; i++)
            cpu_relax();
    }
    waited = now_ns() - start;
    atomic_fetch_add_explicit(&g_wait_ns, waited, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_split_pieces_helper, j->helper_pieces, memory_order_relaxed);
    if (waited > SLOW_HELPER_NS) {
        unsigned b = atomic_load_explicit(&g_backoff, memory_order_relaxed) * 2;
        b = b < BACKOFF_MIN ? BACKOFF_MIN : b > BACKOFF_MAX ? BACKOFF_MAX : b;
        atomic_store_explicit(&g_backoff, b, memory_order_relaxed);
        atomic_store_explicit(&g_skip, b, memory_order_relaxed);
    } else {
        atomic_store_explicit(&g_backoff, 0, memory_order_relaxed);
    }
}
