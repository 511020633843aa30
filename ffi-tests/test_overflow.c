/*
 * test_overflow.c - sb_subscription_set_overflow (SB_OVERFLOW_DROP_OLDEST / DROP_NEWEST /
 * BLOCK / UNBOUNDED), sb_subscription_dropped and sb_subscription_queue_length, for
 * dedicated and pool subscriptions.
 *
 * Every scenario first publishes a "blocker" payload whose callback waits on a gate the
 * test controls, and waits until the callback is inside it: from then on nothing is taken
 * from the queue until the gate opens, so the counts are exact.
 *
 *  - DROP_NEWEST / DROP_OLDEST, limit 1000, 1,000,000 publishes (20,000 under valgrind):
 *    queue_length never exceeds the limit (sampled while publishing) and equals it at the
 *    end; dropped == published - queued exactly while stuck, and after the gate opens
 *    delivered == limit and dropped + delivered == published; DROP_OLDEST delivered
 *    exactly the newest `limit` messages, DROP_NEWEST exactly the oldest, in order. Dropped
 *    messages are destroyed at once (dtor counts while still stuck). No congestion warning
 *    is reported (high-water mark set to 3x the limit: the queue can never reach it). RSS
 *    grows by less than 64 MiB over the 1M publishes with DROP_OLDEST (not checked under
 *    valgrind).
 *  - the final message is never dropped: with the queue full and a second thread still
 *    publishing, unsubscribe_and_join (on another thread) does not complete while stuck,
 *    completes once the gate opens, and the own Unsubscribe is delivered last, once, with
 *    nothing after it.
 *  - BLOCK: the publisher stalls at exactly `limit` queued messages (progress observed not
 *    moving while stuck), then resumes and finishes when the gate opens; nothing dropped,
 *    everything delivered in order; queue_length never exceeds the limit. A publisher
 *    blocked on a full queue is released by sb_unsubscribe and by switching the policy to
 *    UNBOUNDED (while the callback is still stuck). A publish to a BLOCK subscription
 *    (limit 1) from its own callback does not deadlock. A pool callback blocked publishing
 *    to a full BLOCK subscription does not starve other pool subscriptions.
 *  - SB_E_INVAL (fresh sb_last_error) for an unknown policy, a zero limit, a NULL sub; the
 *    previous setting stays in force after a refused call.
 *  - every payload dtor ran exactly once, every topic left the registry.
 */
#include "recorder.h"

#define TAG_PLAIN 0
#define TAG_BLOCK 1   /* the callback waits on the gate */
#define TAG_SELFPUB 2 /* the callback publishes SELFPUB_N payloads to its own topic */
#define SELFPUB_N 20

static sb_message_type *ptype;

/* ---- stale-error detection (sb_last_error() is never cleared) ---- */

static void plant_error(void)
{
    sb_eid e;
    (void)sb_eid_from_str("@@stale-marker@@", &e);
}

static int fresh_error(void)
{
    const char *e = sb_last_error();
    return e != NULL && e[0] != '\0' && strstr(e, "@@stale-marker@@") == NULL;
}

#define CHECK_CODE_FRESH(expr, code)                                                    \
    do {                                                                                \
        plant_error();                                                                  \
        CHECK_EQ_INT((expr), (code));                                                   \
        tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after " #expr); \
    } while (0)

/* ---- memory ---- */

static long rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (f == NULL)
        return -1;
    long size = 0, resident = 0;
    int n = fscanf(f, "%ld %ld", &size, &resident);
    fclose(f);
    if (n != 2)
        return -1;
    return resident * sysconf(_SC_PAGESIZE);
}

/* ---- a gated subscriber ---- */

typedef struct gated {
    recorder rec; /* first: the recorder hook gets &rec */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;                /* under mu */
    atomic_int blocked;      /* inside the gated callback */
    atomic_int gate_timeout; /* the gate was never opened (would have hung) */
    atomic_int delivered;    /* payloads other than the blocker */
    atomic_int min_seq, max_seq;
    atomic_int selfpub_done;
    sb_topic *topic;
} gated;

static void gate_open(gated *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void gated_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    gated *g = (gated *)r;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    if (p->tag == TAG_BLOCK) {
        atomic_store(&g->blocked, 1);
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += (time_t)(3 * tu_wait_seconds());
        pthread_mutex_lock(&g->mu);
        while (!g->open) {
            if (pthread_cond_timedwait(&g->cv, &g->mu, &deadline) == ETIMEDOUT) {
                atomic_store(&g->gate_timeout, 1);
                break;
            }
        }
        pthread_mutex_unlock(&g->mu);
        atomic_store(&g->blocked, 0);
        return;
    }
    if (p->tag == TAG_SELFPUB) {
        /* publish to our own (BLOCK, limit 1) subscription from its callback */
        for (int i = 0; i < SELFPUB_N; i++)
            publish_payload(g->topic, ptype, 1, i, TAG_PLAIN);
        atomic_store(&g->selfpub_done, 1);
        return;
    }
    if (p->thread == 0) {
        int s = p->seq;
        atomic_fetch_add(&g->delivered, 1);
        int cur = atomic_load(&g->min_seq);
        while (s < cur && !atomic_compare_exchange_weak(&g->min_seq, &cur, s)) {
        }
        cur = atomic_load(&g->max_seq);
        while (s > cur && !atomic_compare_exchange_weak(&g->max_seq, &cur, s)) {
        }
    } else {
        atomic_fetch_add(&g->delivered, 1);
    }
}

static void gated_init(gated *g, sb_topic *t)
{
    memset(g, 0, sizeof *g);
    recorder_init(&g->rec, ptype, t);
    g->rec.hook = gated_hook;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    atomic_init(&g->min_seq, 1 << 30);
    atomic_init(&g->max_seq, -1);
    g->topic = t;
}

static void gated_destroy(gated *g)
{
    CHECK_EQ_INT(atomic_load(&g->gate_timeout), 0);
    recorder_destroy(&g->rec);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

/* subscribes, sets the policy, publishes the blocker and waits until it is stuck */
static sb_subscription *gated_subscribe(gated *g, int kind, sb_overflow policy, size_t limit)
{
    sb_subscription *s = subscribe_kind(kind, g->topic, recorder_cb, &g->rec);
    CHECK(s != NULL);
    CHECK_EQ_INT(sb_subscription_set_overflow(s, policy, limit), SB_OK);
    CHECK_EQ_INT(publish_payload(g->topic, ptype, 0, 0, TAG_BLOCK), 1);
    WAIT_UNTIL(atomic_load(&g->blocked) == 1);
    return s;
}

/* ---- threads ---- */

typedef struct joiner {
    sb_subscription *sub; /* consumed */
    atomic_int done;
} joiner;

static void *joiner_main(void *arg)
{
    joiner *j = arg;
    CHECK(sb_unsubscribe_and_join(j->sub) == NULL);
    atomic_store(&j->done, 1);
    return NULL;
}

typedef struct publisher {
    sb_topic *topic;
    int thread; /* payload thread index */
    int first_seq;
    int count;  /* < 0: until stop */
    atomic_int published; /* calls completed */
    atomic_int stop;
    atomic_int finished;
    sb_subscription *watch; /* optional: sample its queue length */
    size_t max_qlen;
} publisher;

static void *publisher_main(void *arg)
{
    publisher *p = arg;
    for (int i = 0; p->count < 0 || i < p->count; i++) {
        if (atomic_load(&p->stop))
            break;
        int r = publish_payload(p->topic, ptype, p->thread, p->first_seq + i, TAG_PLAIN);
        if (r < 0)
            CHECK(r >= 0);
        atomic_fetch_add(&p->published, 1);
        if (p->watch != NULL) {
            size_t q = sb_subscription_queue_length(p->watch);
            if (q > p->max_qlen)
                p->max_qlen = q;
        }
    }
    atomic_store(&p->finished, 1);
    return NULL;
}

/* ---- DROP_NEWEST / DROP_OLDEST, exact accounting ---- */

static const char *policy_name(sb_overflow p)
{
    switch (p) {
    case SB_OVERFLOW_DROP_OLDEST:
        return "drop-oldest";
    case SB_OVERFLOW_DROP_NEWEST:
        return "drop-newest";
    case SB_OVERFLOW_BLOCK:
        return "block";
    default:
        return "unbounded";
    }
}

static void test_drop(int kind, sb_overflow policy)
{
    /* Under ThreadSanitizer a million publishes take about as long as the gate waits
     * (30 s) and four scenarios the whole watchdog: a tenth, as the cluster tests shrink. */
    const char *tsan = getenv("SB_TSAN");
    const int n = tsan != NULL && tsan[0] != '\0' && strcmp(tsan, "0") != 0
                      ? 100000
                      : tu_scale(1000000, 20000);
    const int limit = 1000;
    double t0 = tu_now_s();
    char name[64];
    snprintf(name, sizeof name, "ovf.drop.%s.%s", kind_names[kind], policy_name(policy));
    sb_topic *t = sb_topic_create(name);
    gated g;
    gated_init(&g, t);
    sb_subscription *s = gated_subscribe(&g, kind, policy, limit);
    sb_subscription *keep = sb_subscription_ref(s);
    /* the queue can never hold more than `limit` (+ the final message), far below this
     * high-water mark: no congestion warning may be reported */
    CHECK_EQ_INT(sb_subscription_set_congestion_limits(s, 2 * limit, 3 * limit), SB_OK);
    uint64_t warnings0 = sb_warning_count();

    int destroyed0 = atomic_load(&payload_destroyed);
    long rss0 = rss_bytes();
    size_t max_q = 0;
    for (int i = 1; i <= n; i++) {
        int r = publish_payload(t, ptype, 0, i, TAG_PLAIN);
        if (r < 0)
            CHECK(r >= 0);
        if ((i & 63) == 0 || i <= 2 * limit) {
            size_t q = sb_subscription_queue_length(s);
            if (q > max_q)
                max_q = q;
        }
    }
    long rss1 = rss_bytes();
    printf("%s %s: %d publishes in %.2f s, max queue %zu, dropped %llu, rss %+ld KiB\n",
           kind_names[kind], policy_name(policy), n, tu_now_s() - t0, max_q,
           (unsigned long long)sb_subscription_dropped(s), (rss1 - rss0) / 1024);

    /* while stuck: the queue holds exactly `limit`, the rest was dropped and destroyed */
    CHECK(max_q <= (size_t)limit);
    CHECK_EQ_INT(sb_subscription_queue_length(s), limit);
    CHECK_EQ_INT(sb_subscription_dropped(s), n - limit);
    CHECK_EQ_INT(atomic_load(&g.delivered), 0);
    CHECK_EQ_INT(atomic_load(&payload_destroyed) - destroyed0, n - limit);
    tu_check(sb_subscription_congestion_warnings(s) == 0 && sb_warning_count() == warnings0,
             __FILE__, __LINE__,
             "no congestion warning: the queue never exceeded the overflow limit, far below "
             "the high-water mark");
    if (policy == SB_OVERFLOW_DROP_OLDEST && !tu_slow()) {
        CHECK(rss0 > 0 && rss1 > 0);
        tu_check(rss1 - rss0 < 64L * 1024 * 1024, __FILE__, __LINE__,
                 "RSS grew by less than 64 MiB over the publishes (DROP_OLDEST, limit 1000)");
    }

    /* the final message is never dropped: unsubscribe_and_join on another thread cannot
     * complete while the callback is stuck; it does once the gate opens */
    joiner j = {.sub = s};
    atomic_init(&j.done, 0);
    pthread_t jt;
    pthread_create(&jt, NULL, joiner_main, &j);
    WAIT_UNTIL(sb_subscription_is_subscribed(keep) == 0);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, n + 1, TAG_PLAIN), 0); /* reaches nobody */
    CHECK_STAYS(atomic_load(&j.done) == 0 && sb_subscription_is_done(keep) == 0, 50);
    CHECK_EQ_INT(sb_subscription_dropped(keep), n - limit);
    gate_open(&g);
    WAIT_UNTIL(atomic_load(&j.done) == 1);
    pthread_join(jt, NULL);
    CHECK_EQ_INT(sb_subscription_is_done(keep), 1);

    /* exact accounting */
    int delivered = atomic_load(&g.delivered);
    long long dropped = (long long)sb_subscription_dropped(keep);
    CHECK_EQ_INT(delivered, limit);
    CHECK_EQ_INT(dropped + delivered, n);
    CHECK_EQ_INT(sb_subscription_queue_length(keep), 0);
    if (policy == SB_OVERFLOW_DROP_OLDEST) {
        CHECK_EQ_INT(atomic_load(&g.min_seq), n - limit + 1); /* kept the newest */
        CHECK_EQ_INT(atomic_load(&g.max_seq), n);
    } else {
        CHECK_EQ_INT(atomic_load(&g.min_seq), 1); /* kept the oldest */
        CHECK_EQ_INT(atomic_load(&g.max_seq), limit);
    }
    CHECK_RECORDER_LIFECYCLE(&g.rec);
    CHECK_EQ_INT(atomic_load(&g.rec.payloads), limit + 1); /* + the blocker */
    CHECK_STAYS(atomic_load(&g.rec.after_final) == 0, 20);
    sb_subscription_unref(keep);
    gated_destroy(&g);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE(name);
}

/* ---- the final message under fire: queue full, another thread still publishing ---- */

static void test_final_not_dropped(int kind, sb_overflow policy)
{
    const int limit = 16;
    char name[64];
    snprintf(name, sizeof name, "ovf.final.%s.%s", kind_names[kind], policy_name(policy));
    sb_topic *t = sb_topic_create(name);
    gated g;
    gated_init(&g, t);
    sb_subscription *s = gated_subscribe(&g, kind, policy, limit);
    sb_subscription *keep = sb_subscription_ref(s);

    publisher p;
    memset(&p, 0, sizeof p);
    p.topic = t;
    p.thread = 1;
    p.count = -1;
    p.watch = keep;
    pthread_t pt;
    pthread_create(&pt, NULL, publisher_main, &p);
    if (policy == SB_OVERFLOW_BLOCK) /* full, and the publisher is waiting */
        WAIT_UNTIL(sb_subscription_queue_length(keep) == (size_t)limit);
    else /* full, and dropping */
        WAIT_UNTIL(sb_subscription_dropped(keep) > 100);

    joiner j = {.sub = s};
    atomic_init(&j.done, 0);
    pthread_t jt;
    pthread_create(&jt, NULL, joiner_main, &j);
    WAIT_UNTIL(sb_subscription_is_subscribed(keep) == 0);
    int after = atomic_load(&p.published);
    WAIT_UNTIL(atomic_load(&p.published) > after + 100); /* keeps publishing meanwhile */
    CHECK_EQ_INT(atomic_load(&j.done), 0);
    CHECK_EQ_INT(atomic_load(&g.blocked), 1);
    atomic_store(&p.stop, 1);
    pthread_join(pt, NULL);
    /* the queue may now hold `limit` payloads plus the final message */
    CHECK(p.max_qlen <= (size_t)limit + 1);
    CHECK(sb_subscription_queue_length(keep) <= (size_t)limit + 1);

    gate_open(&g);
    WAIT_UNTIL(atomic_load(&j.done) == 1);
    pthread_join(jt, NULL);
    CHECK_RECORDER_LIFECYCLE(&g.rec); /* own Unsubscribe delivered last, once */
    CHECK_EQ_INT(atomic_load(&g.delivered), limit);
    CHECK_STAYS(atomic_load(&g.rec.after_final) == 0, 20);
    sb_subscription_unref(keep);
    gated_destroy(&g);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE(name);
}

/* ---- BLOCK ---- */

static void test_block_stalls_and_resumes(int kind)
{
    const int limit = 8;
    const int m = tu_scale(2000, 300);
    char name[64];
    snprintf(name, sizeof name, "ovf.block.%s", kind_names[kind]);
    sb_topic *t = sb_topic_create(name);
    gated g;
    gated_init(&g, t);
    sb_subscription *s = gated_subscribe(&g, kind, SB_OVERFLOW_BLOCK, limit);

    publisher p;
    memset(&p, 0, sizeof p);
    p.topic = t;
    p.thread = 0;
    p.first_seq = 1;
    p.count = m;
    p.watch = s;
    pthread_t pt;
    pthread_create(&pt, NULL, publisher_main, &p);

    /* the publisher fills the queue, then stalls: its progress stops at `limit` */
    WAIT_UNTIL(atomic_load(&p.published) >= limit);
    CHECK_STAYS(atomic_load(&p.published) == limit, 100);
    CHECK_EQ_INT(sb_subscription_queue_length(s), limit);
    CHECK_EQ_INT(sb_subscription_dropped(s), 0);
    CHECK_EQ_INT(atomic_load(&p.finished), 0);

    /* ... and resumes when the callback makes room */
    gate_open(&g);
    WAIT_UNTIL(atomic_load(&p.finished) == 1);
    pthread_join(pt, NULL);
    WAIT_UNTIL(atomic_load(&g.delivered) == m);
    CHECK(p.max_qlen <= (size_t)limit);
    CHECK_EQ_INT(sb_subscription_dropped(s), 0);
    CHECK_EQ_INT(atomic_load(&g.min_seq), 1);
    CHECK_EQ_INT(atomic_load(&g.max_seq), m);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&g.rec);
    CHECK_EQ_INT(atomic_load(&g.delivered), m);
    gated_destroy(&g);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE(name);
}

/* a publisher blocked on a full queue is let go by an unsubscribe (how = 0) or by a switch
 * to UNBOUNDED (how = 1), while the callback is still stuck */
static void test_block_released(int kind, int how)
{
    const int limit = 4;
    const int m = 50;
    char name[64];
    snprintf(name, sizeof name, "ovf.release.%s.%d", kind_names[kind], how);
    sb_topic *t = sb_topic_create(name);
    gated g;
    gated_init(&g, t);
    sb_subscription *s = gated_subscribe(&g, kind, SB_OVERFLOW_BLOCK, limit);
    sb_subscription *keep = sb_subscription_ref(s);

    publisher p;
    memset(&p, 0, sizeof p);
    p.topic = t;
    p.thread = 0;
    p.first_seq = 1;
    p.count = m;
    pthread_t pt;
    pthread_create(&pt, NULL, publisher_main, &p);
    WAIT_UNTIL(atomic_load(&p.published) >= limit);
    CHECK_STAYS(atomic_load(&p.published) == limit, 30);

    if (how == 0) {
        CHECK(sb_unsubscribe(s) == NULL);
        s = NULL;
    } else {
        CHECK_EQ_INT(sb_subscription_set_overflow(keep, SB_OVERFLOW_UNBOUNDED, 1), SB_OK);
    }
    WAIT_UNTIL(atomic_load(&p.finished) == 1);
    tu_check(atomic_load(&g.blocked) == 1, __FILE__, __LINE__,
             how == 0 ? "publisher released by sb_unsubscribe while the callback is stuck"
                      : "publisher released by SB_OVERFLOW_UNBOUNDED while the callback is stuck");
    pthread_join(pt, NULL);
    if (how == 1)
        CHECK_EQ_INT(sb_subscription_queue_length(keep), m); /* unbounded now */
    gate_open(&g);
    if (how == 1)
        CHECK(sb_unsubscribe_and_join(s) == NULL);
    sb_subscription_join(keep);
    CHECK_RECORDER_LIFECYCLE(&g.rec);
    CHECK_EQ_INT(atomic_load(&g.delivered), how == 0 ? limit : m);
    CHECK_EQ_INT(sb_subscription_dropped(keep), 0);
    sb_subscription_unref(keep);
    gated_destroy(&g);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE(name);
}

/* a callback publishing to its own BLOCK (limit 1) subscription does not deadlock */
static void test_block_self_publish(int kind)
{
    char name[64];
    snprintf(name, sizeof name, "ovf.selfpub.%s", kind_names[kind]);
    sb_topic *t = sb_topic_create(name);
    gated g;
    gated_init(&g, t);
    sb_subscription *s = subscribe_kind(kind, t, recorder_cb, &g.rec);
    CHECK(s != NULL);
    /* synchronous subscriptions never queue: the header says the policy is recorded
     * there and has no effect (so the self-publishes below must not block either) */
    CHECK_EQ_INT(sb_subscription_set_overflow(s, SB_OVERFLOW_BLOCK, 1), SB_OK);
    CHECK(publish_payload(t, ptype, 0, 0, TAG_SELFPUB) >= 0);
    WAIT_UNTIL(atomic_load(&g.selfpub_done) == 1);
    WAIT_UNTIL(atomic_load(&g.delivered) == SELFPUB_N);
    /* and the subscription still works from outside */
    for (int i = 1; i <= 5; i++)
        CHECK(publish_payload(t, ptype, 0, i, TAG_PLAIN) >= 0);
    WAIT_UNTIL(atomic_load(&g.delivered) == SELFPUB_N + 5);
    CHECK_EQ_INT(sb_subscription_dropped(s), 0);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&g.rec);
    gated_destroy(&g);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE(name);
}

/* pool callbacks blocked publishing to a full BLOCK subscription don't starve the pool */
static atomic_int relay_done;
static sb_topic *relay_target;

static void relay_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    publish_payload(relay_target, ptype, 2, p->seq, TAG_PLAIN); /* blocks while full */
    atomic_fetch_add(&relay_done, 1);
}

static atomic_int bystander_count;
static void bystander_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == ptype)
        atomic_fetch_add(&bystander_count, 1);
}

static void test_block_pool_not_starved(void)
{
    CHECK_EQ_INT(sb_pool_configure(1, 2, 20000), SB_OK);
    sb_topic *x = sb_topic_create("ovf.starve.x");
    sb_topic *a = sb_topic_create("ovf.starve.a");
    sb_topic *c = sb_topic_create("ovf.starve.c");
    relay_target = x;
    gated g;
    gated_init(&g, x);
    sb_subscription *b = gated_subscribe(&g, KIND_POOL, SB_OVERFLOW_BLOCK, 2); /* 1 worker */
    /* fill B's queue */
    CHECK_EQ_INT(publish_payload(x, ptype, 0, 1, TAG_PLAIN), 1);
    CHECK_EQ_INT(publish_payload(x, ptype, 0, 2, TAG_PLAIN), 1);
    CHECK_EQ_INT(sb_subscription_queue_length(b), 2);
    /* A's pool callbacks relay to X and block there (2 of them, on separate workers?
     * no: one subscription runs one callback at a time, so one worker is blocked) */
    sb_subscription *asub = sb_subscribe_pool(a, relay_cb, NULL);
    sb_subscription *csub = sb_subscribe_pool(c, bystander_cb, NULL);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, 1, TAG_PLAIN), 1);
    CHECK_STAYS(atomic_load(&relay_done) == 0, 30); /* really blocked */
    /* a third pool subscription still gets its messages */
    for (int i = 0; i < 10; i++)
        CHECK_EQ_INT(publish_payload(c, ptype, 0, i, TAG_PLAIN), 1);
    WAIT_UNTIL(atomic_load(&bystander_count) == 10);
    CHECK_EQ_INT(atomic_load(&g.blocked), 1);
    CHECK_EQ_INT(atomic_load(&relay_done), 0);
    gate_open(&g);
    WAIT_UNTIL(atomic_load(&relay_done) == 1);
    WAIT_UNTIL(atomic_load(&g.delivered) == 3);
    CHECK(sb_unsubscribe_and_join(asub) == NULL);
    CHECK(sb_unsubscribe_and_join(csub) == NULL);
    CHECK(sb_unsubscribe_and_join(b) == NULL);
    CHECK_RECORDER_LIFECYCLE(&g.rec);
    gated_destroy(&g);
    sb_topic_unref(x);
    sb_topic_unref(a);
    sb_topic_unref(c);
    CHECK_TOPIC_GONE("ovf.starve.x");
    CHECK_TOPIC_GONE("ovf.starve.a");
    CHECK_TOPIC_GONE("ovf.starve.c");
}

/* ---- invalid arguments ---- */

static void test_invalid(int kind)
{
    sb_topic *t = sb_topic_create("ovf.invalid");
    gated g;
    gated_init(&g, t);
    sb_subscription *s = gated_subscribe(&g, kind, SB_OVERFLOW_DROP_NEWEST, 3);

    CHECK_CODE_FRESH(sb_subscription_set_overflow(s, (sb_overflow)4, 10), SB_E_INVAL);
    CHECK_CODE_FRESH(sb_subscription_set_overflow(s, (sb_overflow)-1, 10), SB_E_INVAL);
    CHECK_CODE_FRESH(sb_subscription_set_overflow(s, (sb_overflow)1000, 1), SB_E_INVAL);
    CHECK_CODE_FRESH(sb_subscription_set_overflow(s, SB_OVERFLOW_DROP_OLDEST, 0), SB_E_INVAL);
    CHECK_CODE_FRESH(sb_subscription_set_overflow(s, SB_OVERFLOW_DROP_NEWEST, 0), SB_E_INVAL);
    CHECK_CODE_FRESH(sb_subscription_set_overflow(s, SB_OVERFLOW_BLOCK, 0), SB_E_INVAL);
    CHECK_CODE_FRESH(sb_subscription_set_overflow(NULL, SB_OVERFLOW_BLOCK, 10), SB_E_INVAL);
    plant_error();
    CHECK_EQ_INT(sb_subscription_dropped(NULL), 0);
    CHECK(fresh_error());
    plant_error();
    CHECK_EQ_INT(sb_subscription_queue_length(NULL), 0);
    CHECK(fresh_error());

    /* the refused calls changed nothing: still DROP_NEWEST, limit 3 */
    for (int i = 1; i <= 10; i++)
        CHECK(publish_payload(t, ptype, 0, i, TAG_PLAIN) >= 0);
    CHECK_EQ_INT(sb_subscription_queue_length(s), 3);
    CHECK_EQ_INT(sb_subscription_dropped(s), 7);

    /* switching to UNBOUNDED at run time lets the queue grow again */
    CHECK_EQ_INT(sb_subscription_set_overflow(s, SB_OVERFLOW_UNBOUNDED, 1), SB_OK);
    for (int i = 11; i <= 20; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, TAG_PLAIN), 1);
    CHECK_EQ_INT(sb_subscription_queue_length(s), 13);
    CHECK_EQ_INT(sb_subscription_dropped(s), 7);
    gate_open(&g);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&g.rec);
    CHECK_EQ_INT(atomic_load(&g.delivered), 13);
    CHECK_EQ_INT(atomic_load(&g.min_seq), 1);
    CHECK_EQ_INT(atomic_load(&g.max_seq), 20);
    gated_destroy(&g);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE("ovf.invalid");
}

/* ---- DROP_OLDEST never evicts the Subscribe change message ---- */

/* The pool's only worker is held in a gated callback, so a new pool subscription's
 * Subscribe message waits in its queue while publishes overflow it (limit 1). The
 * oldest payloads are dropped, never the Subscribe message: the subscription still
 * starts with it, then gets the newest payload. */
static void test_first_not_dropped(void)
{
    CHECK_EQ_INT(sb_pool_configure(1, 1, 20000), SB_OK);
    sb_topic *gt = sb_topic_create("ovf.first.gate");
    gated g;
    gated_init(&g, gt);
    sb_subscription *gs = gated_subscribe(&g, KIND_POOL, SB_OVERFLOW_UNBOUNDED, 0);

    sb_topic *t = sb_topic_create("ovf.first");
    recorder r;
    recorder_init(&r, ptype, t);
    sb_subscription *s = sb_subscribe_pool(t, recorder_cb, &r);
    CHECK(s != NULL);
    CHECK_EQ_INT(sb_subscription_set_overflow(s, SB_OVERFLOW_DROP_OLDEST, 1), SB_OK);
    for (int i = 0; i < 5; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, TAG_PLAIN), 1);
    CHECK_EQ_INT(atomic_load(&r.total), 0); /* nothing ran yet: the worker is held */
    CHECK_EQ_INT((int)sb_subscription_dropped(s), 4);

    gate_open(&g);
    WAIT_UNTIL(atomic_load(&r.payloads) == 1);
    CHECK_EQ_INT(atomic_load(&r.own_subscribe), 1);
    CHECK_EQ_INT(atomic_load(&r.first_not_subscribe), 0);
    pthread_mutex_lock(&r.mu);
    CHECK_EQ_INT(r.last_seq[0], 4); /* the newest one was kept */
    pthread_mutex_unlock(&r.mu);

    sb_unsubscribe_and_join(s);
    sb_unsubscribe_and_join(gs);
    CHECK_EQ_INT(atomic_load(&r.payloads), 1);
    CHECK_EQ_INT(atomic_load(&r.overlaps), 0);
    recorder_destroy(&r);
    gated_destroy(&g);
    sb_topic_unref(t);
    sb_topic_unref(gt);
    CHECK_EQ_INT(sb_pool_configure(1, 4, 20000), SB_OK);
    printf("DROP_OLDEST keeps the Subscribe message ok\n");
}

int main(void)
{
    TEST_INIT();
    double start = tu_now_s();
    ptype = make_type("ovf.payload");

    for (int k = KIND_DEDICATED; k <= KIND_POOL; k++) {
        test_invalid(k);
        test_drop(k, SB_OVERFLOW_DROP_NEWEST);
        test_drop(k, SB_OVERFLOW_DROP_OLDEST);
        test_final_not_dropped(k, SB_OVERFLOW_DROP_NEWEST);
        test_final_not_dropped(k, SB_OVERFLOW_DROP_OLDEST);
        test_final_not_dropped(k, SB_OVERFLOW_BLOCK);
        test_block_stalls_and_resumes(k);
        test_block_released(k, 0);
        test_block_released(k, 1);
    }
    for (int k = 0; k < KIND_COUNT; k++)
        test_block_self_publish(k);
    test_block_pool_not_starved();
    test_first_not_dropped();

    sb_message_type_unref(ptype);
    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    CHECK_STAYS(atomic_load(&payload_destroyed) == atomic_load(&payload_created), 20);
    printf("overflow took %.2f s\n", tu_now_s() - start);
    return TEST_DONE();
}
