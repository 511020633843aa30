/*
 * test_forward.c - Forwarding section of API.md.
 *
 * A forward delivers straight to the destination's subscriptions (a synchronous subscriber
 * of the destination has run, on the publisher's thread, when sb_publish on the source
 * returns, and it receives the very message object that was published); forwards are
 * transitive; one publish reaches a subscription once whatever the number of paths
 * (diamond, duplicate forwards); forwards closing a cycle (incl. self-forward) are refused
 * with NULL + SB_E_INVAL-style last error; cancel stops delivery; cancel(NULL) is harmless.
 */
#include "recorder.h"

static sb_message_type *ptype;

/* synchronous subscriber that remembers the last message pointer it got */
typedef struct last_msg {
    recorder rec;
    _Atomic(sb_message *) last;
} last_msg;

static void last_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    last_msg *l = r->hook_data;
    if (sb_message_get_type(msg) == ptype)
        atomic_store(&l->last, msg);
}

static void test_direct(void)
{
    printf("direct\n");
    sb_topic *src = sb_topic_create("fwd.src");
    sb_topic *dst = sb_topic_create("fwd.dst");
    last_msg l;
    recorder_init(&l.rec, ptype, dst);
    atomic_init(&l.last, NULL);
    l.rec.hook = last_hook;
    l.rec.hook_data = &l;
    sb_subscription *sub = sb_subscribe_synchronous(dst, recorder_cb, &l.rec);
    recorder drec;
    recorder_init(&drec, ptype, dst);
    sb_subscription *dsub = sb_subscribe(dst, recorder_cb, &drec);

    CHECK_EQ_INT(publish_payload(src, ptype, 0, 0, 0), 0); /* not yet forwarded */
    sb_forward *fw = sb_forward_all(src, dst);
    CHECK(fw != NULL);

    for (int i = 1; i <= 50; i++) {
        sb_message *m = payload_msg(ptype, 0, i, 0);
        CHECK_EQ_INT(sb_publish(src, m), 2);
        /* no queue hop: the synchronous subscriber of dst already ran, with this message */
        CHECK_EQ_INT(atomic_load(&l.rec.payloads), i);
        CHECK(atomic_load(&l.last) == m);
        sb_message_unref(m);
    }
    CHECK_EQ_INT(atomic_load(&l.rec.off_main), 0); /* on the publisher's thread */
    WAIT_UNTIL(atomic_load(&drec.payloads) == 50);

    /* publishing to dst directly still works, and does not flow back to src */
    recorder srec;
    recorder_init(&srec, ptype, src);
    sb_subscription *ssub = sb_subscribe_synchronous(src, recorder_cb, &srec);
    CHECK_EQ_INT(publish_payload(dst, ptype, 0, 51, 0), 2);
    CHECK_EQ_INT(atomic_load(&srec.payloads), 0);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 52, 0), 3);
    CHECK_EQ_INT(atomic_load(&srec.payloads), 1);
    CHECK(sb_unsubscribe_and_join(ssub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&srec);
    recorder_destroy(&srec);

    /* cancel: nothing reaches dst through src any more */
    CHECK(sb_forward_cancel(fw) == NULL);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 53, 0), 0);
    CHECK_EQ_INT(atomic_load(&l.rec.payloads), 52);
    CHECK_EQ_INT(sb_topic_subscribers(src), 0);
    CHECK_EQ_INT(sb_topic_wants(src, ptype), 0);
    CHECK_EQ_INT(publish_payload(dst, ptype, 0, 54, 0), 2);

    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK(sb_unsubscribe_and_join(dsub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&l.rec);
    CHECK_RECORDER_LIFECYCLE(&drec);
    CHECK_EQ_INT(atomic_load(&l.rec.payloads), 53);
    CHECK_EQ_INT(atomic_load(&drec.payloads), 53);
    recorder_destroy(&l.rec);
    recorder_destroy(&drec);

    CHECK(sb_forward_cancel(NULL) == NULL);
    sb_topic_unref(src);
    sb_topic_unref(dst);
}

/* A topic whose subscriptions all left takes new ones (the publish path skips a topic
 * with none): directly, and as the target of a forward; and the subscription left in
 * the list when the first one goes keeps receiving. */
static void test_subscriptions_come_back(void)
{
    printf("subscriptions come back\n");
    sb_topic *src = sb_topic_create("fwd.b.src");
    sb_topic *dst = sb_topic_create("fwd.b.dst");
    sb_forward *fw = sb_forward_all(src, dst);
    CHECK(fw != NULL);
    for (int round = 0; round < 3; round++) {
        recorder r1, r2;
        recorder_init(&r1, ptype, dst);
        recorder_init(&r2, ptype, dst);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 1, 0), 0);
        sb_subscription *s1 = sb_subscribe_synchronous(dst, recorder_cb, &r1);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 2, 0), 1);
        sb_subscription *s2 = sb_subscribe_synchronous(dst, recorder_cb, &r2);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 3, 0), 2);
        CHECK(sb_unsubscribe_and_join(s1) == NULL);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 4, 0), 1);
        CHECK_EQ_INT(publish_payload(dst, ptype, 0, 5, 0), 1);
        CHECK(sb_unsubscribe_and_join(s2) == NULL);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 6, 0), 0);
        CHECK_EQ_INT(publish_payload(dst, ptype, 0, 7, 0), 0);
        CHECK_EQ_INT(atomic_load(&r1.payloads), 2);
        CHECK_EQ_INT(atomic_load(&r2.payloads), 3);
        CHECK_RECORDER_LIFECYCLE(&r1);
        CHECK_RECORDER_LIFECYCLE(&r2);
        recorder_destroy(&r1);
        recorder_destroy(&r2);

        /* the source itself, which forwards too */
        recorder rs;
        recorder_init(&rs, ptype, src);
        sb_subscription *ss = sb_subscribe_synchronous(src, recorder_cb, &rs);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 8, 0), 1);
        CHECK(sb_unsubscribe_and_join(ss) == NULL);
        CHECK_EQ_INT(publish_payload(src, ptype, 0, 9, 0), 0);
        CHECK_EQ_INT(atomic_load(&rs.payloads), 1);
        CHECK_RECORDER_LIFECYCLE(&rs);
        recorder_destroy(&rs);
    }
    CHECK(sb_forward_cancel(fw) == NULL);
    sb_topic_unref(src);
    sb_topic_unref(dst);
}

/* a -> b -> c -> d: a publish to a reaches subscribers of b, c and d */
static void test_transitive(void)
{
    printf("transitive\n");
    sb_topic *t[4];
    const char *names[4] = {"fwd.t.a", "fwd.t.b", "fwd.t.c", "fwd.t.d"};
    for (int i = 0; i < 4; i++)
        t[i] = sb_topic_create(names[i]);
    sb_forward *f[3];
    for (int i = 0; i < 3; i++) {
        f[i] = sb_forward_all(t[i], t[i + 1]);
        CHECK(f[i] != NULL);
    }
    recorder rec[4];
    sb_subscription *subs[4];
    for (int i = 1; i < 4; i++) {
        recorder_init(&rec[i], ptype, t[i]);
        subs[i] = subscribe_kind(i % KIND_COUNT, t[i], recorder_cb, &rec[i]);
    }
    CHECK_EQ_INT(sb_topic_subscribers(t[0]), 3);
    CHECK_EQ_INT(sb_topic_subscribers(t[1]), 3);
    CHECK_EQ_INT(sb_topic_subscribers(t[2]), 2);
    CHECK_EQ_INT(sb_topic_subscribers(t[3]), 1);
    for (int i = 0; i < 20; i++)
        CHECK_EQ_INT(publish_payload(t[0], ptype, 0, i, 0), 3);
    CHECK_EQ_INT(publish_payload(t[2], ptype, 1, 0, 0), 2);
    for (int i = 1; i < 4; i++)
        WAIT_UNTIL(atomic_load(&rec[i].payloads) == (i >= 2 ? 21 : 20));

    /* cancelling the middle link cuts c and d off from a and b */
    CHECK(sb_forward_cancel(f[1]) == NULL);
    CHECK_EQ_INT(publish_payload(t[0], ptype, 0, 20, 0), 1);
    CHECK_EQ_INT(sb_topic_subscribers(t[0]), 1);
    for (int i = 1; i < 4; i++) {
        CHECK(sb_unsubscribe_and_join(subs[i]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec[i]);
        CHECK_EQ_INT(atomic_load(&rec[i].payloads), 21);
        recorder_destroy(&rec[i]);
    }
    CHECK(sb_forward_cancel(f[0]) == NULL);
    CHECK(sb_forward_cancel(f[2]) == NULL);
    for (int i = 0; i < 4; i++)
        sb_topic_unref(t[i]);
}

/* a -> b, a -> c, b -> d, c -> d: d's subscribers get each message once */
static void test_diamond(void)
{
    printf("diamond\n");
    sb_topic *a = sb_topic_create("fwd.d.a");
    sb_topic *b = sb_topic_create("fwd.d.b");
    sb_topic *c = sb_topic_create("fwd.d.c");
    sb_topic *d = sb_topic_create("fwd.d.d");
    sb_forward *ab = sb_forward_all(a, b);
    sb_forward *ac = sb_forward_all(a, c);
    sb_forward *bd = sb_forward_all(b, d);
    sb_forward *cd = sb_forward_all(c, d);
    CHECK(ab && ac && bd && cd);

    recorder rd[3], rb;
    sb_subscription *sd[3], *sbs;
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rd[k], ptype, d);
        sd[k] = subscribe_kind(k, d, recorder_cb, &rd[k]);
    }
    recorder_init(&rb, ptype, b);
    sbs = sb_subscribe_synchronous(b, recorder_cb, &rb);

    CHECK_EQ_INT(sb_topic_subscribers(a), 4);
    CHECK_EQ_INT(sb_topic_subscribers(d), 3);
    int n = 100;
    for (int i = 0; i < n; i++) {
        CHECK_EQ_INT(publish_payload(a, ptype, 0, i, 0), 4);
        /* synchronous subscriber of d: exactly once, already */
        CHECK_EQ_INT(atomic_load(&rd[KIND_SYNC].payloads), i + 1);
    }
    /* a duplicate a -> d path as well */
    sb_forward *ad = sb_forward_all(a, d);
    CHECK(ad != NULL);
    CHECK_EQ_INT(sb_topic_subscribers(a), 4);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, n, 0), 4);
    /* and a second, identical forward a -> b (whether or not it is accepted, nothing is
     * delivered twice) */
    sb_forward *ab2 = sb_forward_all(a, b);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, n + 1, 0), 4);
    int total = n + 2;
    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&rd[k].payloads) == total);
        CHECK(sb_unsubscribe_and_join(sd[k]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rd[k]); /* order check also catches duplicates */
        CHECK_EQ_INT(atomic_load(&rd[k].payloads), total);
        recorder_destroy(&rd[k]);
    }
    CHECK(sb_unsubscribe_and_join(sbs) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rb);
    CHECK_EQ_INT(atomic_load(&rb.payloads), total);
    recorder_destroy(&rb);

    sb_forward_cancel(ab2);
    sb_forward_cancel(ad);
    sb_forward_cancel(ab);
    sb_forward_cancel(ac);
    sb_forward_cancel(bd);
    sb_forward_cancel(cd);
    sb_topic_unref(a);
    sb_topic_unref(b);
    sb_topic_unref(c);
    sb_topic_unref(d);
}

static void test_cycles(void)
{
    printf("cycles\n");
    sb_topic *a = sb_topic_create("fwd.c.a");
    sb_topic *b = sb_topic_create("fwd.c.b");
    sb_topic *c = sb_topic_create("fwd.c.c");

    /* self-forward */
    CHECK(sb_forward_all(a, a) == NULL);
    CHECK_ERR();

    sb_forward *ab = sb_forward_all(a, b);
    CHECK(ab != NULL);
    CHECK(sb_forward_all(b, a) == NULL);
    CHECK_ERR();
    sb_forward *bc = sb_forward_all(b, c);
    CHECK(bc != NULL);
    CHECK(sb_forward_all(c, a) == NULL);
    CHECK_ERR();
    CHECK(sb_forward_all(c, b) == NULL);
    CHECK(sb_forward_all(c, c) == NULL);

    /* the refused forwards changed nothing: a -> b -> c still works, once each */
    recorder ra, rc;
    recorder_init(&ra, ptype, a);
    recorder_init(&rc, ptype, c);
    sb_subscription *sa = sb_subscribe_synchronous(a, recorder_cb, &ra);
    sb_subscription *sc = sb_subscribe_synchronous(c, recorder_cb, &rc);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, 0, 0), 2);
    CHECK_EQ_INT(publish_payload(c, ptype, 0, 1, 0), 1);
    CHECK_EQ_INT(atomic_load(&ra.payloads), 1);
    CHECK_EQ_INT(atomic_load(&rc.payloads), 2);

    /* once the path is cancelled, the reverse forward is allowed */
    CHECK(sb_forward_cancel(bc) == NULL);
    sb_forward *ca = sb_forward_all(c, a);
    CHECK(ca != NULL);
    CHECK_EQ_INT(publish_payload(c, ptype, 0, 2, 0), 2);
    CHECK_EQ_INT(atomic_load(&ra.payloads), 2);
    CHECK_EQ_INT(atomic_load(&rc.payloads), 3);
    /* and now b -> c would close c -> a -> b -> c */
    CHECK(sb_forward_all(b, c) == NULL);
    CHECK_ERR();

    CHECK(sb_unsubscribe_and_join(sa) == NULL);
    CHECK(sb_unsubscribe_and_join(sc) == NULL);
    CHECK_RECORDER_LIFECYCLE(&ra);
    CHECK_RECORDER_LIFECYCLE(&rc);
    recorder_destroy(&ra);
    recorder_destroy(&rc);
    sb_forward_cancel(ca);
    sb_forward_cancel(ab);
    sb_topic_unref(a);
    sb_topic_unref(b);
    sb_topic_unref(c);
}

/* forwards keep working when the caller drops its topic references */
static void test_forward_keeps_topics(void)
{
    printf("forward keeps topics\n");
    sb_topic *src = sb_topic_create("fwd.k.src");
    sb_topic *dst = sb_topic_create("fwd.k.dst");
    recorder rec;
    recorder_init(&rec, ptype, dst);
    sb_subscription *sub = sb_subscribe_synchronous(dst, recorder_cb, &rec);
    sb_forward *fw = sb_forward_all(src, dst);
    CHECK(fw != NULL);
    sb_topic_unref(dst);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 0, 0), 1);
    CHECK_EQ_INT(atomic_load(&rec.payloads), 1);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    recorder_destroy(&rec);
    CHECK(sb_forward_cancel(fw) == NULL);
    sb_topic_unref(src);
}

/* Many forwards out of one topic, cancelled in a scattered order. A cancelled forward may
 * stay in the source's list for a while (it leaves with others later): whatever the list
 * holds, a publish reaches exactly the live forwards, the subscriber count and the cycle
 * check see only those, and once all are cancelled every topic is released. */
#define MANY_FWD 100

static void count_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (sb_message_get_type(msg) == ptype)
        atomic_fetch_add((atomic_int *)data, 1);
}

static void test_many_forwards(void)
{
    printf("many forwards\n");
    sb_topic *src = sb_topic_create("fwd.m.src");
    sb_topic *dst[MANY_FWD];
    sb_forward *fw[MANY_FWD];
    sb_subscription *sub[MANY_FWD];
    atomic_int got[MANY_FWD];
    int live[MANY_FWD];
    char name[64];
    for (int i = 0; i < MANY_FWD; i++) {
        snprintf(name, sizeof name, "fwd.m.dst.%d", i);
        dst[i] = sb_topic_create(name);
        atomic_init(&got[i], 0);
        sub[i] = sb_subscribe_synchronous(dst[i], count_cb, &got[i]);
        fw[i] = sb_forward_all(src, dst[i]);
        CHECK(sub[i] != NULL && fw[i] != NULL);
        live[i] = 1;
    }
    CHECK_EQ_INT(sb_topic_subscribers(src), MANY_FWD);

    int nlive = MANY_FWD, published = 0;
    for (int step = 0; step < MANY_FWD; step++) {
        int k = (step * 37) % MANY_FWD; /* 37 is coprime with 100: each index once */
        CHECK(sb_forward_cancel(fw[k]) == NULL);
        if (step == 1) {
            /* a second cancel of the same handle (a caller bug), while the cancelled
             * forward still sits in src's list (the list is rebuilt only once half of
             * it is cancelled; not step 0: the first forward sits in the topic's own
             * slot, which a cancel empties at once): an error, and nothing released
             * twice (valgrind) */
            CHECK(sb_topic_create(NULL) == NULL); /* some other error first */
            CHECK(sb_forward_cancel(fw[k]) == NULL);
            CHECK(tu_contains_ci(sb_last_error(), "already cancelled"));
        }
        live[k] = 0;
        nlive--;
        /* the cancelled forward does not close a cycle: dst[k] -> src is allowed */
        if (step % 10 == 0) {
            sb_forward *back = sb_forward_all(dst[k], src);
            CHECK(back != NULL);
            /* dst[k]'s own subscriber, and through src every live forward */
            CHECK_EQ_INT(publish_payload(dst[k], ptype, 0, ++published, 0), 1 + nlive);
            for (int i = 0; i < MANY_FWD; i++)
                if (live[i])
                    CHECK_EQ_INT(atomic_load(&got[i]), published);
            atomic_fetch_sub(&got[k], 1); /* not a forwarded delivery */
            CHECK(sb_forward_cancel(back) == NULL);
        } else {
            CHECK_EQ_INT(publish_payload(src, ptype, 0, ++published, 0), nlive);
        }
        CHECK_EQ_INT(sb_topic_subscribers(src), nlive);
        CHECK_EQ_INT(sb_topic_wants(src, ptype), nlive > 0);
        int wrong = 0;
        for (int i = 0; i < MANY_FWD; i++)
            if (live[i] ? atomic_load(&got[i]) != published : atomic_load(&got[i]) >= published)
                wrong++;
        CHECK_EQ_INT(wrong, 0);
    }
    CHECK_EQ_INT(publish_payload(src, ptype, 0, ++published, 0), 0);
    for (int i = 0; i < MANY_FWD; i++) {
        CHECK(sb_unsubscribe_and_join(sub[i]) == NULL);
        sb_topic_unref(dst[i]);
    }
    sb_topic_unref(src);
    CHECK_TOPIC_GONE("fwd.m.src");
    for (int i = 0; i < MANY_FWD; i++) {
        snprintf(name, sizeof name, "fwd.m.dst.%d", i);
        CHECK_TOPIC_GONE(name);
    }
}

/* concurrent forward/cancel while publishing: never a duplicate, never out of order */
typedef struct churn_arg {
    sb_topic *src, *dst;
    atomic_int *stop;
} churn_arg;

static void *forward_churn(void *arg)
{
    churn_arg *a = arg;
    while (!atomic_load(a->stop)) {
        sb_forward *f1 = sb_forward_all(a->src, a->dst);
        sb_forward *f2 = sb_forward_all(a->src, a->dst);
        CHECK(f1 != NULL);
        sched_yield();
        sb_forward_cancel(f1);
        sched_yield();
        sb_forward_cancel(f2);
    }
    return NULL;
}

static void test_concurrent_forwarding(void)
{
    printf("concurrent forwarding\n");
    sb_topic *src = sb_topic_create("fwd.cc.src");
    sb_topic *dst = sb_topic_create("fwd.cc.dst");
    recorder rec[3];
    sb_subscription *subs[3];
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rec[k], ptype, dst);
        subs[k] = subscribe_kind(k, dst, recorder_cb, &rec[k]);
    }
    atomic_int stop;
    atomic_init(&stop, 0);
    churn_arg ca = {src, dst, &stop};
    pthread_t th;
    pthread_create(&th, NULL, forward_churn, &ca);
    int n = tu_scale(5000, 300);
    for (int i = 0; i < n; i++) {
        int r = publish_payload(src, ptype, 0, i, 0);
        if (r != 0 && r != 3)
            CHECK(r == 0 || r == 3);
    }
    atomic_store(&stop, 1);
    pthread_join(th, NULL);
    for (int k = 0; k < KIND_COUNT; k++) {
        CHECK(sb_unsubscribe_and_join(subs[k]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec[k]);
        CHECK(atomic_load(&rec[k].payloads) <= n);
        recorder_destroy(&rec[k]);
    }
    sb_topic_unref(src);
    sb_topic_unref(dst);
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("fwd.payload");
    test_direct();
    test_subscriptions_come_back();
    test_transitive();
    test_diamond();
    test_cycles();
    test_forward_keeps_topics();
    test_many_forwards();
    test_concurrent_forwarding();
    sb_message_type_unref(ptype);
    /* cancelled forwards and finished subscriptions released every topic */
    const char *topics[] = {"fwd.src", "fwd.dst", "fwd.t.a", "fwd.t.b", "fwd.t.c", "fwd.t.d",
                            "fwd.d.a", "fwd.d.b", "fwd.d.c", "fwd.d.d", "fwd.c.a", "fwd.c.b",
                            "fwd.c.c", "fwd.k.src", "fwd.k.dst", "fwd.cc.src", "fwd.cc.dst",
                            "fwd.b.src", "fwd.b.dst"};
    for (size_t i = 0; i < sizeof topics / sizeof topics[0]; i++)
        CHECK_TOPIC_GONE(topics[i]);
    WAIT_UNTIL(atomic_load(&payload_created) == atomic_load(&payload_destroyed));
    return TEST_DONE();
}
