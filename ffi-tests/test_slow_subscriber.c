/*
 * test_slow_subscriber.c - a pool subscription whose callback blocks must not delay anybody
 * else (pool configured with sb_pool_configure(1, 4, ...)).
 *
 * Scenario 1: on topic T, a slow pool subscription S, a dedicated D, another pool P and a
 * synchronous Y; on three other topics, two pool subscriptions each. S's first payload
 * blocks its callback on a gate the test controls; the test keeps it blocked for ~2 s
 * (natively; longer under valgrind) and meanwhile publishes round after round to T and to
 * the other topics, each time waiting (bounded wait) until D, P, Y and every pool
 * subscription on the other topics got the whole round, and checking that S is still
 * blocked, with its queue growing. Nothing is asserted about timing: only "the others got
 * everything while S was still stuck". Then the gate opens and S catches up: it gets every
 * payload, in order.
 *
 * Scenario 2: three slow pool subscriptions (separate topics) block at once, leaving one
 * of the four workers: the other pool subscriptions still get everything meanwhile.
 *
 * Every subscription's lifecycle is checked (own Subscribe first, own Unsubscribe last and
 * once, nothing after, no overlap, per-publisher order); every payload dtor runs once;
 * every topic leaves the registry.
 */
#include "recorder.h"

#define TAG_PLAIN 0
#define TAG_BLOCK 1
#define NOTHER 3 /* other topics */
#define PER_OTHER 2 /* pool subscriptions per other topic */

static sb_message_type *ptype;

typedef struct gated {
    recorder rec; /* first: the hook gets &rec */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
    atomic_int blocked;
    atomic_int times_blocked;
    atomic_int gate_timeout;
} gated;

static void gated_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    gated *g = (gated *)r;
    (void)sub;
    if (sb_message_get_type(msg) != ptype || ((payload_t *)sb_message_data(msg))->tag != TAG_BLOCK)
        return;
    atomic_fetch_add(&g->times_blocked, 1);
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
}

static void gated_init(gated *g, sb_topic *t)
{
    memset(g, 0, sizeof *g);
    recorder_init(&g->rec, ptype, t);
    g->rec.hook = gated_hook;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
}

static void gate_open(gated *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void gated_destroy(gated *g)
{
    CHECK_EQ_INT(atomic_load(&g->gate_timeout), 0);
    recorder_destroy(&g->rec);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

/* ---- scenario 1 ---- */

static void scenario_one(void)
{
    const int k = tu_scale(50, 20); /* payloads per topic per round */
    const double hold_s = tu_slow() ? 4.0 : 2.0;
    sb_topic *t = sb_topic_create("slow.t");
    sb_topic *other[NOTHER];
    char names[NOTHER][32];
    for (int i = 0; i < NOTHER; i++) {
        snprintf(names[i], sizeof names[i], "slow.other%d", i);
        other[i] = sb_topic_create(names[i]);
    }

    gated s_rec;
    gated_init(&s_rec, t);
    recorder d_rec, p_rec, y_rec, o_rec[NOTHER][PER_OTHER];
    recorder_init(&d_rec, ptype, t);
    recorder_init(&p_rec, ptype, t);
    recorder_init(&y_rec, ptype, t);
    sb_subscription *s = sb_subscribe_pool(t, recorder_cb, &s_rec.rec);
    sb_subscription *d = sb_subscribe(t, recorder_cb, &d_rec);
    sb_subscription *p = sb_subscribe_pool(t, recorder_cb, &p_rec);
    sb_subscription *y = sb_subscribe_synchronous(t, recorder_cb, &y_rec);
    CHECK(s != NULL && d != NULL && p != NULL && y != NULL);
    sb_subscription *o[NOTHER][PER_OTHER];
    for (int i = 0; i < NOTHER; i++) {
        for (int j = 0; j < PER_OTHER; j++) {
            recorder_init(&o_rec[i][j], ptype, other[i]);
            o[i][j] = sb_subscribe_pool(other[i], recorder_cb, &o_rec[i][j]);
            CHECK(o[i][j] != NULL);
        }
    }

    /* S blocks on its first payload (seq 0) */
    int seq_t = 0;
    CHECK_EQ_INT(publish_payload(t, ptype, 0, seq_t++, TAG_BLOCK), 4);
    WAIT_UNTIL(atomic_load(&s_rec.blocked) == 1);
    double blocked_at = tu_now_s();
    int seq_o = 0;
    int rounds = 0;
    int all_ok = 1;
    do {
        int bad = 0;
        for (int i = 0; i < k; i++) {
            bad += publish_payload(t, ptype, 0, seq_t++, TAG_PLAIN) != 4;
            for (int j = 0; j < NOTHER; j++)
                bad += publish_payload(other[j], ptype, 1, seq_o, TAG_PLAIN) != PER_OTHER;
            seq_o++;
        }
        CHECK_EQ_INT(bad, 0); /* every publish reached every subscription of its topic */
        rounds++;
        /* everybody but S gets the whole round while S is still stuck */
        WAIT_UNTIL(atomic_load(&d_rec.payloads) == seq_t);
        all_ok &= tu_last_wait_ok();
        WAIT_UNTIL(atomic_load(&p_rec.payloads) == seq_t);
        all_ok &= tu_last_wait_ok();
        CHECK_EQ_INT(atomic_load(&y_rec.payloads), seq_t);
        for (int i = 0; i < NOTHER; i++) {
            for (int j = 0; j < PER_OTHER; j++) {
                WAIT_UNTIL(atomic_load(&o_rec[i][j].payloads) == seq_o);
                all_ok &= tu_last_wait_ok();
            }
        }
        tu_check(atomic_load(&s_rec.blocked) == 1, __FILE__, __LINE__,
                 "the slow subscription is still blocked while the others got the round");
        CHECK_EQ_INT(atomic_load(&s_rec.rec.payloads), 1);
        /* S's messages wait in its queue (pool kind: nothing taken while it runs) */
        CHECK_EQ_INT(sb_subscription_queue_length(s), seq_t - 1);
        if (!all_ok)
            break;
        tu_sleep_ms(10); /* keep S's backlog moderate */
    } while (tu_now_s() - blocked_at < hold_s);
    printf("%d rounds of %d payloads per topic delivered to the others while the slow one "
           "was blocked (%.2f s)\n",
           rounds, k, tu_now_s() - blocked_at);

    /* S catches up */
    gate_open(&s_rec);
    WAIT_UNTIL(atomic_load(&s_rec.rec.payloads) == seq_t);
    CHECK_EQ_INT(atomic_load(&s_rec.times_blocked), 1);
    CHECK_EQ_INT(s_rec.rec.last_seq[0], seq_t - 1);

    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK(sb_unsubscribe_and_join(d) == NULL);
    CHECK(sb_unsubscribe_and_join(p) == NULL);
    CHECK(sb_unsubscribe_and_join(y) == NULL);
    CHECK_RECORDER_LIFECYCLE(&s_rec.rec);
    CHECK_RECORDER_LIFECYCLE(&d_rec);
    CHECK_RECORDER_LIFECYCLE(&p_rec);
    CHECK_RECORDER_LIFECYCLE(&y_rec);
    CHECK_RECORDER_THREADS(&s_rec.rec, KIND_POOL);
    CHECK_RECORDER_THREADS(&d_rec, KIND_DEDICATED);
    CHECK_RECORDER_THREADS(&p_rec, KIND_POOL);
    CHECK_RECORDER_THREADS(&y_rec, KIND_SYNC);
    CHECK_EQ_INT(atomic_load(&d_rec.payloads), seq_t);
    CHECK_EQ_INT(atomic_load(&p_rec.payloads), seq_t);
    CHECK_EQ_INT(atomic_load(&y_rec.payloads), seq_t);
    gated_destroy(&s_rec);
    recorder_destroy(&d_rec);
    recorder_destroy(&p_rec);
    recorder_destroy(&y_rec);
    for (int i = 0; i < NOTHER; i++) {
        for (int j = 0; j < PER_OTHER; j++) {
            CHECK(sb_unsubscribe_and_join(o[i][j]) == NULL);
            CHECK_RECORDER_LIFECYCLE(&o_rec[i][j]);
            CHECK_RECORDER_THREADS(&o_rec[i][j], KIND_POOL);
            CHECK_EQ_INT(atomic_load(&o_rec[i][j].payloads), seq_o);
            CHECK_EQ_INT(o_rec[i][j].last_seq[1], seq_o - 1);
            recorder_destroy(&o_rec[i][j]);
        }
        sb_topic_unref(other[i]);
    }
    sb_topic_unref(t);
    CHECK_TOPIC_GONE("slow.t");
    for (int i = 0; i < NOTHER; i++)
        CHECK_TOPIC_GONE(names[i]);
}

/* ---- scenario 2: three of four workers stuck ---- */

#define NSLOW 3
#define NFAST 4

static void scenario_three_stuck(void)
{
    const int k = tu_scale(300, 30);
    sb_topic *st[NSLOW], *ft[NFAST];
    char sn[NSLOW][32], fn[NFAST][32];
    gated g[NSLOW];
    sb_subscription *ss[NSLOW], *fs[NFAST];
    recorder fr[NFAST];
    for (int i = 0; i < NSLOW; i++) {
        snprintf(sn[i], sizeof sn[i], "slow.stuck%d", i);
        st[i] = sb_topic_create(sn[i]);
        gated_init(&g[i], st[i]);
        ss[i] = sb_subscribe_pool(st[i], recorder_cb, &g[i].rec);
        CHECK(ss[i] != NULL);
    }
    for (int i = 0; i < NFAST; i++) {
        snprintf(fn[i], sizeof fn[i], "slow.fast%d", i);
        ft[i] = sb_topic_create(fn[i]);
        recorder_init(&fr[i], ptype, ft[i]);
        fs[i] = sb_subscribe_pool(ft[i], recorder_cb, &fr[i]);
        CHECK(fs[i] != NULL);
    }
    for (int i = 0; i < NSLOW; i++)
        CHECK_EQ_INT(publish_payload(st[i], ptype, 0, 0, TAG_BLOCK), 1);
    for (int i = 0; i < NSLOW; i++)
        WAIT_UNTIL(atomic_load(&g[i].blocked) == 1);

    int bad = 0;
    for (int n = 0; n < k; n++) {
        for (int i = 0; i < NFAST; i++)
            bad += publish_payload(ft[i], ptype, 0, n, TAG_PLAIN) != 1;
        for (int i = 0; i < NSLOW; i++)
            bad += publish_payload(st[i], ptype, 0, n + 1, TAG_PLAIN) != 1;
    }
    CHECK_EQ_INT(bad, 0);
    for (int i = 0; i < NFAST; i++)
        WAIT_UNTIL(atomic_load(&fr[i].payloads) == k);
    for (int i = 0; i < NSLOW; i++) {
        tu_check(atomic_load(&g[i].blocked) == 1, __FILE__, __LINE__,
                 "slow subscription still blocked while the fast ones got everything");
        CHECK_EQ_INT(atomic_load(&g[i].rec.payloads), 1);
    }
    for (int i = 0; i < NSLOW; i++)
        gate_open(&g[i]);
    for (int i = 0; i < NSLOW; i++) {
        WAIT_UNTIL(atomic_load(&g[i].rec.payloads) == k + 1);
        CHECK(sb_unsubscribe_and_join(ss[i]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&g[i].rec);
        CHECK_EQ_INT(g[i].rec.last_seq[0], k);
        gated_destroy(&g[i]);
        sb_topic_unref(st[i]);
        CHECK_TOPIC_GONE(sn[i]);
    }
    for (int i = 0; i < NFAST; i++) {
        CHECK(sb_unsubscribe_and_join(fs[i]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&fr[i]);
        CHECK_EQ_INT(fr[i].last_seq[0], k - 1);
        recorder_destroy(&fr[i]);
        sb_topic_unref(ft[i]);
        CHECK_TOPIC_GONE(fn[i]);
    }
}

int main(void)
{
    TEST_INIT();
    double start = tu_now_s();
    CHECK_EQ_INT(sb_pool_configure(1, 4, 2000), SB_OK);
    ptype = make_type("slow.payload");

    scenario_one();
    scenario_three_stuck();

    sb_message_type_unref(ptype);
    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    printf("slow subscriber took %.2f s\n", tu_now_s() - start);
    return TEST_DONE();
}
