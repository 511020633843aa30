/* Waits made from inside callbacks never deadlock.
 *
 * Two subscriptions S1 (on t1) and S2 (on t2) run their callbacks on two threads at the
 * same time; each callback, while the other is still running, reaches for the other
 * subscription. Without care each would wait for the other's callback to return (ABBA):
 *
 *   publish      synchronous S1, S2: a publish to the other one's topic. From inside a
 *                callback that is deferred (the thread running the other one delivers it
 *                after its callback): both publishes return, both messages are delivered.
 *   publish_sync sb_publish_sync(other, msg): the second waiter would close a cycle of
 *                waits, so it returns SB_E_DEADLOCK at once (the message is still
 *                delivered); the first one completes normally. Synchronous and pool kinds.
 *   join         pool S1, S2: sb_unsubscribe_and_join(other). The second join would close
 *                the cycle and returns at once (last error SB_E_DEADLOCK); the first
 *                completes once the other callback returned.
 *   block        dedicated S1, S2 with SB_OVERFLOW_BLOCK (limit 1): three publishes to the
 *                other's full queue. The publisher that would close the cycle is let
 *                through; nothing is dropped.
 *   self sync    two synchronous subscriptions on one topic, both publish_sync to
 *                themselves from their callbacks on two threads (a fuzzer finding).
 *   caching      two caching topics on one topic whose "-cached" topics forward back
 *                into it, with publishers on two threads (a fuzzer finding).
 *
 * A deadlock hangs the test until the harness watchdog (TEST_INIT) fails it. */
#define _DEFAULT_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include "switchboard.h"
#include "test_util.h"

enum action { A_PUBLISH, A_PUBLISH_SYNC, A_JOIN, A_BLOCK };

static sb_message_type *ping, *pong;

struct side {
    sb_topic *topic;
    sb_subscription *sub;
    struct side *other;
    atomic_int in_cb, overlaps, pongs, entered, acted;
    int rc;          /* result of the action */
    int other_done;  /* A_JOIN: the other subscription was done when the join returned */
    int error_says_deadlock; /* a refused wait's sb_last_error() mentions the deadlock */
};

static enum action action;
static struct side s1, s2;
static atomic_int entered_total;

/* Both callbacks are inside at once: wait (bounded) for the other to arrive. */
static void meet(void) {
    atomic_fetch_add(&entered_total, 1);
    double end = tu_now_s() + 5.0;
    while (atomic_load(&entered_total) < 2 && tu_now_s() < end)
        tu_sleep_us(100);
    tu_sleep_ms(20); /* let the other one reach its action too */
}

static void cb(void *data, sb_subscription *sub, sb_message *msg) {
    struct side *me = data;
    (void)sub;
    if (atomic_fetch_add(&me->in_cb, 1) != 0)
        atomic_fetch_add(&me->overlaps, 1);
    const sb_message_type *ty = sb_message_get_type(msg);
    if (ty == pong) {
        atomic_fetch_add(&me->pongs, 1);
    } else if (ty == ping) {
        atomic_store(&me->entered, 1);
        meet();
        struct side *o = me->other;
        sb_message *m = sb_message_create_bytes(pong, "pong", 5);
        switch (action) {
        case A_PUBLISH:
            me->rc = sb_publish(o->topic, m);
            break;
        case A_PUBLISH_SYNC:
            me->rc = sb_publish_sync(o->sub, m);
            if (me->rc == SB_E_DEADLOCK)
                me->error_says_deadlock = tu_contains_ci(sb_last_error(), "deadlock");
            break;
        case A_JOIN: {
            sb_subscription *keep = sb_subscription_ref(o->sub);
            sb_unsubscribe_and_join(sb_subscription_ref(o->sub));
            me->other_done = sb_subscription_is_done(keep);
            sb_subscription_unref(keep);
            break;
        }
        case A_BLOCK:
            me->rc = 0;
            for (int i = 0; i < 3; i++)
                if (sb_publish(o->topic, m) == 1)
                    me->rc++;
            break;
        }
        sb_message_unref(m);
        atomic_store(&me->acted, 1);
    }
    atomic_fetch_sub(&me->in_cb, 1);
}

static void *publish_ping(void *arg) {
    struct side *s = arg;
    sb_message *m = sb_message_create_bytes(ping, "ping", 5);
    CHECK(sb_publish(s->topic, m) >= 0);
    sb_message_unref(m);
    return NULL;
}

typedef sb_subscription *(*subscribe_fn)(sb_topic *, sb_subscription_cb, void *);

static void reset(struct side *s, struct side *other, const char *name) {
    sb_topic *t = s->topic;
    memset(s, 0, sizeof *s);
    s->topic = t != NULL ? t : sb_topic_create(name);
    s->other = other;
}

static void run(const char *what, enum action a, subscribe_fn subscribe) {
    action = a;
    atomic_store(&entered_total, 0);
    reset(&s1, &s2, "dl.t1");
    reset(&s2, &s1, "dl.t2");
    s1.sub = subscribe(s1.topic, cb, &s1);
    s2.sub = subscribe(s2.topic, cb, &s2);
    CHECK(s1.sub != NULL && s2.sub != NULL);
    if (a == A_BLOCK) {
        CHECK_EQ_INT(sb_subscription_set_overflow(s1.sub, SB_OVERFLOW_BLOCK, 1), SB_OK);
        CHECK_EQ_INT(sb_subscription_set_overflow(s2.sub, SB_OVERFLOW_BLOCK, 1), SB_OK);
    }

    pthread_t x, y;
    pthread_create(&x, NULL, publish_ping, &s1);
    pthread_create(&y, NULL, publish_ping, &s2);
    pthread_join(x, NULL);
    pthread_join(y, NULL);
    /* pool and dedicated callbacks run after the publishes returned */
    WAIT_UNTIL(atomic_load(&s1.acted) && atomic_load(&s2.acted));

    switch (a) {
    case A_PUBLISH:
        CHECK_EQ_INT(s1.rc, 1);
        CHECK_EQ_INT(s2.rc, 1);
        WAIT_UNTIL(atomic_load(&s1.pongs) == 1 && atomic_load(&s2.pongs) == 1);
        break;
    case A_PUBLISH_SYNC: {
        /* exactly one waiter closes the cycle and is refused; the other completes */
        int refused = (s1.rc == SB_E_DEADLOCK) + (s2.rc == SB_E_DEADLOCK);
        int completed = (s1.rc == 1) + (s2.rc == 1);
        CHECK_EQ_INT(refused, 1);
        CHECK_EQ_INT(completed, 1);
        CHECK_EQ_INT(s1.error_says_deadlock + s2.error_says_deadlock, 1);
        WAIT_UNTIL(atomic_load(&s1.pongs) == 1 && atomic_load(&s2.pongs) == 1);
        break;
    }
    case A_JOIN:
        /* one join completed (the other was done when it returned), one was refused */
        CHECK_EQ_INT(s1.other_done + s2.other_done, 1);
        break;
    case A_BLOCK:
        CHECK_EQ_INT(s1.rc, 3);
        CHECK_EQ_INT(s2.rc, 3);
        WAIT_UNTIL(atomic_load(&s1.pongs) == 3 && atomic_load(&s2.pongs) == 3);
        CHECK_EQ_INT((int)sb_subscription_dropped(s1.sub), 0);
        CHECK_EQ_INT((int)sb_subscription_dropped(s2.sub), 0);
        break;
    }
    CHECK_EQ_INT(atomic_load(&s1.overlaps), 0);
    CHECK_EQ_INT(atomic_load(&s2.overlaps), 0);

    if (a == A_JOIN) {
        /* both were unsubscribed from the callbacks: join the handles we still hold */
        sb_subscription_join(s1.sub);
        sb_subscription_join(s2.sub);
        CHECK(sb_subscription_is_done(s1.sub) && sb_subscription_is_done(s2.sub));
        sb_subscription_unref(s1.sub);
        sb_subscription_unref(s2.sub);
    } else {
        sb_unsubscribe_and_join(s1.sub);
        sb_unsubscribe_and_join(s2.sub);
    }
    printf("%s ok\n", what);
}

/* ---- two synchronous subscriptions on one topic publish_sync to themselves ---- */

static sb_topic *shared_topic;
static atomic_int self_refused, self_other_rc_bad;
static atomic_int a_entries, in_b, crossed, published_a, published_b;

static void wait_flag(atomic_int *flag) {
    double end = tu_now_s() + 5.0;
    while (!atomic_load(flag) && tu_now_s() < end)
        tu_sleep_us(100);
}

static void publish_sync_self(sb_subscription *sub) {
    sb_message *m = sb_message_create_bytes(pong, "pong", 5);
    int rc = sb_publish_sync(sub, m); /* own callback: refused, never a hang */
    if (rc == SB_E_DEADLOCK)
        atomic_fetch_add(&self_refused, 1);
    else
        atomic_fetch_add(&self_other_rc_bad, 1);
    sb_message_unref(m);
}

/* data: NULL for the first subscription (a), non-NULL for the second (b). Both
 * publishers reach a first, so they cross like this: thread X runs a (and moves on), then
 * waits in b until thread Y is inside a; then each publish_syncs to its own subscription,
 * which also reaches the other one, run by the other thread; each stays inside until the
 * other has published. */
static void self_cb(void *data, sb_subscription *sub, sb_message *msg) {
    if (sb_message_get_type(msg) != ping)
        return;
    if (data != NULL) { /* b */
        if (atomic_exchange(&in_b, 1) != 0)
            return; /* the second ping: the crossing is over */
        wait_flag(&crossed);
        publish_sync_self(sub);
        atomic_store(&published_b, 1);
        wait_flag(&published_a);
    } else if (atomic_fetch_add(&a_entries, 1) == 1) { /* a, the second thread (Y) */
        wait_flag(&in_b); /* X, done with a, is on its way into b */
        atomic_store(&crossed, 1);
        publish_sync_self(sub);
        atomic_store(&published_a, 1);
        wait_flag(&published_b);
    }
}

static void *publish_shared(void *arg) {
    (void)arg;
    sb_message *m = sb_message_create_bytes(ping, "ping", 5);
    CHECK(sb_publish(shared_topic, m) >= 0);
    sb_message_unref(m);
    return NULL;
}

static void self_sync(void) {
    shared_topic = sb_topic_create("dl.shared");
    /* each subscription's callback runs on the thread of whichever publish reaches it
     * first; ping A and ping B cross on the two subscriptions */
    sb_subscription *a = sb_subscribe_synchronous(shared_topic, self_cb, NULL);
    sb_subscription *b = sb_subscribe_synchronous(shared_topic, self_cb, (void *)1);
    pthread_t x, y;
    pthread_create(&x, NULL, publish_shared, NULL);
    pthread_create(&y, NULL, publish_shared, NULL);
    pthread_join(x, NULL);
    pthread_join(y, NULL);
    CHECK_EQ_INT(atomic_load(&crossed), 1); /* the two threads were inside at once */
    CHECK_EQ_INT(atomic_load(&self_refused), 2);
    CHECK_EQ_INT(atomic_load(&self_other_rc_bad), 0);
    sb_unsubscribe_and_join(a);
    sb_unsubscribe_and_join(b);
    sb_topic_unref(shared_topic);
    printf("publish_sync to self from two synchronous callbacks ok\n");
}

/* ---- caching topics whose updates forward back into their original ---- */

static const char *ping_id(sb_message *msg) {
    return sb_message_get_type(msg) == ping ? "obj" : NULL;
}

static sb_topic *cache_origin;
static atomic_int publishers_done;

static void *publish_many(void *arg) {
    (void)arg;
    for (int i = 0; i < 2000; i++) {
        sb_message *m = sb_message_create_bytes(ping, &i, sizeof i);
        CHECK(sb_publish(cache_origin, m) >= 0);
        sb_message_unref(m);
    }
    atomic_fetch_add(&publishers_done, 1);
    return NULL;
}

static void caching_cross(void) {
    cache_origin = sb_topic_create("dl.origin");
    sb_cache *c1 = sb_cache_create(ping_id);
    sb_cache *c2 = sb_cache_create(ping_id);
    sb_caching_topic *ct1 = sb_caching_topic_create(cache_origin, c1);
    sb_caching_topic *ct2 = sb_caching_topic_create(cache_origin, c2);
    CHECK(ct1 != NULL && ct2 != NULL);
    /* each caching topic's updates flow back into the original, where the other
     * caching topic's synchronous subscription handles them (and ignores them: no id) */
    sb_forward *f1 = sb_forward_all(sb_caching_get_topic(ct1), cache_origin);
    sb_forward *f2 = sb_forward_all(sb_caching_get_topic(ct2), cache_origin);
    CHECK(f1 != NULL && f2 != NULL);
    pthread_t x, y;
    pthread_create(&x, NULL, publish_many, NULL);
    pthread_create(&y, NULL, publish_many, NULL);
    pthread_join(x, NULL);
    pthread_join(y, NULL);
    CHECK_EQ_INT(atomic_load(&publishers_done), 2);
    atomic_store(&publishers_done, 0);
    sb_message *got = sb_cache_get(c1, ping, "obj");
    CHECK(got != NULL);
    sb_message_unref(got);
    sb_forward_cancel(f1);
    sb_forward_cancel(f2);
    sb_caching_unsubscribe_and_join(ct1);
    sb_caching_unsubscribe_and_join(ct2);
    sb_cache_unref(c1);
    sb_cache_unref(c2);
    sb_topic_unref(cache_origin);
    printf("caching topics forwarding back into their original ok\n");
}

int main(void) {
    TEST_INIT();
    CHECK_EQ_INT(sb_pool_configure(4, 4, 20000), SB_OK); /* room for both pool callbacks */
    CHECK_EQ_INT(sb_message_type_create("dl.ping", NULL, &ping), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("dl.pong", NULL, &pong), SB_OK);
    for (int round = 0; round < tu_scale(5, 2); round++) {
        run("synchronous callbacks publishing to each other", A_PUBLISH, sb_subscribe_synchronous);
        run("synchronous callbacks publish_sync to each other", A_PUBLISH_SYNC,
            sb_subscribe_synchronous);
        run("pool callbacks publish_sync to each other", A_PUBLISH_SYNC, sb_subscribe_pool);
        run("dedicated callbacks publish_sync to each other", A_PUBLISH_SYNC, sb_subscribe);
        run("pool callbacks joining each other", A_JOIN, sb_subscribe_pool);
        run("dedicated callbacks blocked on each other's full queue", A_BLOCK, sb_subscribe);
        atomic_store(&self_refused, 0);
        atomic_store(&a_entries, 0);
        atomic_store(&in_b, 0);
        atomic_store(&crossed, 0);
        atomic_store(&published_a, 0);
        atomic_store(&published_b, 0);
        self_sync();
        caching_cross();
    }
    sb_topic_unref(s1.topic);
    sb_topic_unref(s2.topic);
    sb_message_type_unref(ping);
    sb_message_type_unref(pong);
    return TEST_DONE();
}
