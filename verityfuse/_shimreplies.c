/*
 * The FUSE shim's reply thread, included by _fuseshim.c (which declares fast_done).
 *
 * The replies of large fast reads are sent from a thread of their own.  Sending
 * one is the kernel copying it into the page cache (~150 us a MiB here); on
 * pyfuse3's one request thread that copy kept the next readahead request from
 * being read and hashed meanwhile.  Small replies are sent at once:
 * a thread hand-off costs more than their copy, and a lone 4 KiB read would wait
 * for it.  The queue holds no more entries than fast_read has buffers, so it
 * never fills; its thread starts with the first large reply (after any fork of
 * the daemon), and replies still queued are sent before the session is unmounted
 * (which closes its fd) or destroyed.
 */
#define RQ_SIZE 8                   /* >= fast_read's reply buffers */
#define RQ_MIN_BYTES (256 * 1024)   /* smaller replies are sent on the request thread */

struct rq_item { fuse_req_t req; const void *buf; size_t len; int token; };
static struct rq_item rq[RQ_SIZE];
static unsigned rq_head, rq_tail;   /* queued: rq_tail .. rq_head - 1 */
static int rq_sending, rq_started, rq_failed, rq_atfork_set;
static unsigned long long rq_sent;  /* replies the thread sent (the status shows it) */
static pthread_mutex_t rq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t rq_more = PTHREAD_COND_INITIALIZER, rq_idle = PTHREAD_COND_INITIALIZER;

static void *rq_loop(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&rq_lock);
    for (;;) {
        while (rq_head == rq_tail)
            pthread_cond_wait(&rq_more, &rq_lock);
        struct rq_item it = rq[rq_tail % RQ_SIZE];
        rq_tail++;
        rq_sending = 1;
        pthread_mutex_unlock(&rq_lock);
        fuse_reply_buf(it.req, it.buf, it.len);
        fast_done(it.token);
        pthread_mutex_lock(&rq_lock);
        rq_sending = 0;
        rq_sent++;
        if (rq_head == rq_tail)
            pthread_cond_broadcast(&rq_idle);
    }
    return NULL;
}

static void rq_atfork_child(void)
{
    /* The thread is not in the child: a child that serves starts its own. */
    rq_head = rq_tail = 0;
    rq_sending = rq_started = rq_failed = 0;
    pthread_mutex_init(&rq_lock, NULL);
    pthread_cond_init(&rq_more, NULL);
    pthread_cond_init(&rq_idle, NULL);
}

/* Queue a reply for the reply thread; 0 if it must be sent here instead. */
static int rq_push(fuse_req_t req, const void *buf, size_t len, int token)
{
    int queued = 0;
    pthread_mutex_lock(&rq_lock);
    if (!rq_started && !rq_failed) {
        pthread_t t;
        pthread_attr_t attr;
        rq_failed = 1;
        if (pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &attr, rq_loop, NULL) == 0) {
                rq_started = 1;
                rq_failed = 0;
                if (!rq_atfork_set)
                    rq_atfork_set = pthread_atfork(NULL, NULL, rq_atfork_child) == 0;
            }
            pthread_attr_destroy(&attr);
        }
    }
    if (rq_started && rq_head - rq_tail < RQ_SIZE) {
        rq[rq_head % RQ_SIZE] = (struct rq_item){req, buf, len, token};
        rq_head++;
        pthread_cond_signal(&rq_more);
        queued = 1;
    }
    pthread_mutex_unlock(&rq_lock);
    return queued;
}

/* Every queued reply sent: before the session (which the requests refer to) goes. */
static void rq_drain(void)
{
    pthread_mutex_lock(&rq_lock);
    while (rq_started && (rq_head != rq_tail || rq_sending))
        pthread_cond_wait(&rq_idle, &rq_lock);
    pthread_mutex_unlock(&rq_lock);
}
