/*
 * test_stress.c - everything at once, bounded to a few seconds.
 *
 * NPUB threads publish payloads to topic T while NCHURN threads keep subscribing and
 * unsubscribing subscriptions of all three kinds (some selective, some on a topic T2 that T
 * forwards to; unsubscribed with join, with unsubscribe + join, or with a plain unsubscribe
 * checked at the end), and one thread keeps adding and cancelling a forward T -> T3.
 * Long-lived subscriptions of every kind watch the whole run. Ballast (NBALLAST selective
 * subscriptions of T and T2 that accept no published type, NBALLAST forwards out of T to
 * topics without subscribers) keeps both topics' lists longer than the length up to which
 * a removal rebuilds the list at once, so the churn runs against lists that hold flagged
 * (unsubscribed or cancelled) entries for a while.
 *
 * Checked for every subscription: its own Subscribe came first, its final message (own
 * Unsubscribe) came last and once, nothing after it, no overlapping invocations, per
 * publisher order. Long-lived ones got every payload exactly once. At the end every message
 * dtor has run exactly once.
 */
#include "recorder.h"

#define NPUB 4
#define NCHURN 3
#define MAX_CHURN_SUBS 400
#define NBALLAST 20

static sb_message_type *ptype;
static sb_topic *T, *T2, *T3;
static atomic_int publishers_done;

typedef enum { END_JOIN = 0, END_UNSUB_JOIN = 1, END_UNSUB_LATER = 2 } end_mode;

typedef struct churn_sub {
    recorder rec;
    int kind;
    int selective;
    int on_t2;
    end_mode mode;
    sb_subscription *extra; /* for END_UNSUB_LATER: checked at the end */
} churn_sub;

typedef struct churn_thread {
    int index;
    int count;
    churn_sub *subs[MAX_CHURN_SUBS];
} churn_thread;

static void *publisher(void *arg)
{
    intptr_t idx = (intptr_t)arg;
    int n = tu_scale(3000, 200);
    for (int i = 0; i < n; i++) {
        int r = publish_payload(T, ptype, (int)idx, i, 0);
        if (r < 0)
            CHECK(r >= 0);
        if (i % 20 == 19)
            tu_sleep_ms(1); /* spread the run so that churners overlap with it */
    }
    atomic_fetch_add(&publishers_done, 1);
    return NULL;
}

static void *churner(void *arg)
{
    churn_thread *ct = arg;
    unsigned seed = (unsigned)ct->index * 7919u + 1u;
    int iter = 0;
    int min_iters = tu_scale(20, 4);
    while ((atomic_load(&publishers_done) < NPUB || iter < min_iters) &&
           ct->count < MAX_CHURN_SUBS) {
        seed = seed * 1103515245u + 12345u;
        churn_sub *cs = calloc(1, sizeof *cs);
        cs->kind = (iter + ct->index) % KIND_COUNT;
        cs->selective = (seed >> 8) % 4 == 0;
        cs->on_t2 = (seed >> 12) % 3 == 0;
        cs->mode = (end_mode)((seed >> 16) % 3);
        sb_topic *topic = cs->on_t2 ? T2 : T;
        recorder_init(&cs->rec, ptype, topic);
        sb_subscription *sub = subscribe_kind(cs->kind, topic, recorder_cb, &cs->rec);
        CHECK(sub != NULL);
        if (sub == NULL) {
            recorder_destroy(&cs->rec);
            free(cs);
            break;
        }
        if (cs->selective) {
            CHECK_EQ_INT(sb_subscription_accept_message_type(sub, ptype), SB_OK);
            CHECK_EQ_INT(sb_subscription_accept_message_type(sub, sb_subscription_change_type()),
                         SB_OK);
        }
        ct->subs[ct->count++] = cs;
        tu_sleep_us((long)((seed >> 20) % 2000));
        switch (cs->mode) {
        case END_JOIN:
            CHECK(sb_unsubscribe_and_join(sub) == NULL);
            CHECK_EQ_INT(atomic_load(&cs->rec.finished), 1);
            break;
        case END_UNSUB_JOIN: {
            sb_subscription *extra = sb_subscription_ref(sub);
            CHECK(sb_unsubscribe(sub) == NULL);
            sb_subscription_join(extra);
            CHECK_EQ_INT(sb_subscription_is_done(extra), 1);
            CHECK_EQ_INT(atomic_load(&cs->rec.finished), 1);
            sb_subscription_unref(extra);
            break;
        }
        case END_UNSUB_LATER:
            cs->extra = sb_subscription_ref(sub);
            CHECK(sb_unsubscribe(sub) == NULL);
            break;
        }
        iter++;
    }
    return NULL;
}

/* Ballast subscriptions accept no published type: they must never see a payload. */
static atomic_int ballast_payloads;

static void ballast_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == ptype)
        atomic_fetch_add(&ballast_payloads, 1);
}

static void *forwarder(void *arg)
{
    (void)arg;
    while (atomic_load(&publishers_done) < NPUB) {
        sb_forward *f = sb_forward_all(T, T3);
        CHECK(f != NULL);
        tu_sleep_us(200);
        sb_forward_cancel(f);
        tu_sleep_us(100);
    }
    return NULL;
}

int main(void)
{
    TEST_INIT();
    double start = tu_now_s();
    ptype = make_type("stress.payload");
    T = sb_topic_create("stress.t");
    T2 = sb_topic_create("stress.t2");
    T3 = sb_topic_create("stress.t3");
    sb_forward *f12 = sb_forward_all(T, T2);
    CHECK(f12 != NULL);

    /* ballast: never delivered to, never forwarded onwards */
    sb_message_type *none = make_type("stress.none");
    sb_subscription *ballast_sub[2 * NBALLAST];
    sb_topic *ballast_topic[NBALLAST];
    sb_forward *ballast_fwd[NBALLAST];
    for (int i = 0; i < 2 * NBALLAST; i++) {
        ballast_sub[i] = subscribe_kind(i % KIND_COUNT, i % 2 ? T2 : T, ballast_cb, NULL);
        CHECK(ballast_sub[i] != NULL);
        CHECK_EQ_INT(sb_subscription_accept_message_type(ballast_sub[i], none), SB_OK);
    }
    for (int i = 0; i < NBALLAST; i++) {
        char name[64];
        snprintf(name, sizeof name, "stress.b.%d", i);
        ballast_topic[i] = sb_topic_create(name);
        ballast_fwd[i] = sb_forward_all(T, ballast_topic[i]);
        CHECK(ballast_fwd[i] != NULL);
    }

    /* long-lived watchers: one per kind on T, one per kind on T2, one on T3 */
    recorder watch[7];
    sb_subscription *wsub[7];
    for (int i = 0; i < 7; i++) {
        sb_topic *topic = i < 3 ? T : i < 6 ? T2 : T3;
        recorder_init(&watch[i], ptype, topic);
        wsub[i] = subscribe_kind(i % KIND_COUNT, topic, recorder_cb, &watch[i]);
        CHECK(wsub[i] != NULL);
    }

    pthread_t pubs[NPUB], churns[NCHURN], fwd;
    churn_thread *cts = calloc(NCHURN, sizeof *cts);
    for (int i = 0; i < NCHURN; i++) {
        cts[i].index = i;
        pthread_create(&churns[i], NULL, churner, &cts[i]);
    }
    pthread_create(&fwd, NULL, forwarder, NULL);
    for (intptr_t i = 0; i < NPUB; i++)
        pthread_create(&pubs[i], NULL, publisher, (void *)i);

    for (int i = 0; i < NPUB; i++)
        pthread_join(pubs[i], NULL);
    for (int i = 0; i < NCHURN; i++)
        pthread_join(churns[i], NULL);
    pthread_join(fwd, NULL);

    int n = tu_scale(3000, 200);
    /* watchers of T and T2 got everything exactly once and in order */
    for (int i = 0; i < 7; i++) {
        if (i < 6)
            WAIT_UNTIL(atomic_load(&watch[i].payloads) == NPUB * n);
        CHECK(sb_unsubscribe_and_join(wsub[i]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&watch[i]);
        if (i < 6) {
            CHECK_EQ_INT(atomic_load(&watch[i].payloads), NPUB * n);
            for (int p = 0; p < NPUB; p++)
                CHECK_EQ_INT(watch[i].last_seq[p], n - 1);
        } else {
            CHECK(atomic_load(&watch[i].payloads) <= NPUB * n);
        }
    }

    /* every churned subscription */
    int total_subs = 0, by_kind[KIND_COUNT] = {0, 0, 0};
    for (int t = 0; t < NCHURN; t++) {
        for (int i = 0; i < cts[t].count; i++) {
            churn_sub *cs = cts[t].subs[i];
            total_subs++;
            by_kind[cs->kind]++;
            if (cs->mode == END_UNSUB_LATER) {
                WAIT_UNTIL(sb_subscription_is_done(cs->extra) == 1);
                sb_subscription_join(cs->extra);
                CHECK_EQ_INT(sb_subscription_is_subscribed(cs->extra), 0);
                sb_subscription_unref(cs->extra);
            }
            CHECK_EQ_INT(atomic_load(&cs->rec.finished), 1);
            CHECK_RECORDER_LIFECYCLE(&cs->rec);
            CHECK_EQ_INT(atomic_load(&cs->rec.others), 0);
        }
    }
    /* a little later: still nothing delivered after any final message */
    tu_sleep_ms(20);
    for (int t = 0; t < NCHURN; t++) {
        for (int i = 0; i < cts[t].count; i++) {
            churn_sub *cs = cts[t].subs[i];
            CHECK_EQ_INT(atomic_load(&cs->rec.after_final), 0);
            CHECK_EQ_INT(atomic_load(&cs->rec.in_cb), 0);
            recorder_destroy(&cs->rec);
            free(cs);
        }
    }
    free(cts);
    printf("churned %d subscriptions (dedicated %d, pool %d, synchronous %d)\n", total_subs,
           by_kind[0], by_kind[1], by_kind[2]);
    CHECK(total_subs >= 3);

    CHECK(sb_forward_cancel(f12) == NULL);
    for (int i = 0; i < 2 * NBALLAST; i++)
        CHECK(sb_unsubscribe_and_join(ballast_sub[i]) == NULL);
    for (int i = 0; i < NBALLAST; i++) {
        CHECK(sb_forward_cancel(ballast_fwd[i]) == NULL);
        sb_topic_unref(ballast_topic[i]);
    }
    sb_message_type_unref(none);
    CHECK_EQ_INT(atomic_load(&ballast_payloads), 0);
    CHECK_EQ_INT(sb_topic_subscribers(T), 0);
    CHECK_EQ_INT(sb_topic_subscribers(T2), 0);
    sb_topic_unref(T);
    sb_topic_unref(T2);
    sb_topic_unref(T3);
    sb_message_type_unref(ptype);
    CHECK_TOPIC_GONE("stress.t");
    CHECK_TOPIC_GONE("stress.t2");
    CHECK_TOPIC_GONE("stress.t3");
    for (int i = 0; i < NBALLAST; i++) {
        char name[64];
        snprintf(name, sizeof name, "stress.b.%d", i);
        CHECK_TOPIC_GONE(name);
    }

    /* every message's dtor ran exactly once */
    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    CHECK_EQ_INT(atomic_load(&payload_created), NPUB * n);
    CHECK_STAYS(atomic_load(&payload_destroyed) == NPUB * n, 50);
    printf("stress took %.2f s\n", tu_now_s() - start);
    return TEST_DONE();
}
