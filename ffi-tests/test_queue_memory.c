/*
 * test_queue_memory.c - a subscription's queue gives its memory back once a backlog
 * drained.
 *
 * A dedicated and a pool subscription each get their callback stuck on a gate the test
 * controls, then a backlog of 1,000,000 messages (20,000 under valgrind or
 * ThreadSanitizer) is published to them. The bytes the process has allocated (mallinfo2: arena plus mmapped blocks)
 * are taken before the backlog and after the gate opened and both queues drained; the
 * growth must stay under an eighth of what the backlog's queue slots took (24 bytes a
 * message and subscription), and at least 1 MiB is allowed: a queue that keeps its grown
 * buffer keeps all of it. (Not under valgrind or ThreadSanitizer, whose allocators
 * mallinfo2 does not describe.) Everything published is delivered, in order, and the subscriptions keep
 * working afterwards.
 */
#include "test_util.h"

#include <malloc.h>

static atomic_int gate_open;
static atomic_int stuck;

typedef struct counter {
    atomic_llong seen; /* payload messages delivered */
    atomic_int out_of_order;
} counter;

static sb_message_type *ptype;

static void on_msg(void *data, sb_subscription *sub, sb_message *msg)
{
    counter *c = data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    long long n = (long long)(intptr_t)sb_message_data(msg);
    if (n == 0) {
        /* the blocker: wait for the gate (bounded: the watchdog catches a hang) */
        atomic_fetch_add(&stuck, 1);
        double deadline = tu_now_s() + 3 * tu_wait_seconds();
        while (!atomic_load(&gate_open) && tu_now_s() < deadline)
            tu_sleep_ms(1);
        return;
    }
    if (n != atomic_load(&c->seen) + 1)
        atomic_store(&c->out_of_order, 1);
    atomic_fetch_add(&c->seen, 1);
}

static size_t allocated_bytes(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

static atomic_int publish_failures;

static void publish_n(sb_topic *t, long long n)
{
    sb_message *m = sb_message_create(ptype, (void *)(intptr_t)n, NULL);
    if (m == NULL || sb_publish(t, m) != 2)
        atomic_fetch_add(&publish_failures, 1);
    sb_message_unref(m);
}

int main(void)
{
    TEST_INIT();
    const int instrumented = tu_slow() || tu_tsan();
    const long long n = instrumented ? 20000 : 1000000;
    const int measure = !instrumented;
    CHECK_EQ_INT(sb_message_type_create("queue_memory/payload", NULL, &ptype), 0);
    sb_topic *t = sb_topic_create("queue_memory/topic");
    CHECK(t != NULL);
    counter dc = {0}, pc = {0};
    sb_subscription *ded = sb_subscribe(t, on_msg, &dc);
    sb_subscription *pool = sb_subscribe_pool(t, on_msg, &pc);
    CHECK(ded != NULL && pool != NULL);

    /* Warm up the delivery paths (and whatever they allocate once), then get stuck. */
    for (long long i = 1; i <= 1000; i++)
        publish_n(t, i);
    WAIT_UNTIL(atomic_load(&dc.seen) == 1000 && atomic_load(&pc.seen) == 1000);
    atomic_store(&dc.seen, 0);
    atomic_store(&pc.seen, 0);
    publish_n(t, 0);
    WAIT_UNTIL(atomic_load(&stuck) == 2);
    malloc_trim(0);
    size_t before = allocated_bytes();

    for (long long i = 1; i <= n; i++)
        publish_n(t, i);
    sb_subscription_stats st;
    CHECK_EQ_INT(sb_subscription_get_stats(ded, &st), 0);
    CHECK(st.queued >= (uint64_t)n);
    size_t during = allocated_bytes();
    if (measure)
        CHECK(during > before + (size_t)n * 24); /* the backlog is there */

    atomic_store(&gate_open, 1);
    WAIT_UNTIL(atomic_load(&dc.seen) == n && atomic_load(&pc.seen) == n);
    sb_subscription_stats sp;
    WAIT_UNTIL(sb_subscription_get_stats(ded, &st) == 0 && st.queued == 0 &&
               sb_subscription_get_stats(pool, &sp) == 0 && sp.queued == 0 &&
               sb_alert_count() == 0);
    CHECK(st.queued_max >= (uint64_t)n && sp.queued_max >= (uint64_t)n);
    CHECK(!atomic_load(&dc.out_of_order) && !atomic_load(&pc.out_of_order));
    /* a message in flight between the two loads is freed on its runner's thread */
    tu_sleep_ms(50);
    size_t after = allocated_bytes();
    size_t bound = (size_t)n * 3;
    if (bound < (1u << 20))
        bound = 1u << 20;
    printf("allocated: before %zu, backlog %zu, after %zu (growth bound %zu)\n", before,
           during, after, bound);
    if (measure)
        CHECK(after < before + bound);

    /* still working */
    atomic_store(&dc.seen, 0);
    atomic_store(&pc.seen, 0);
    for (long long i = 1; i <= 100; i++)
        publish_n(t, i);
    WAIT_UNTIL(atomic_load(&dc.seen) == 100 && atomic_load(&pc.seen) == 100);

    CHECK_EQ_INT(atomic_load(&publish_failures), 0);
    ded = sb_unsubscribe_and_join(ded);
    pool = sb_unsubscribe_and_join(pool);
    sb_topic_unref(t);
    sb_message_type_unref(ptype);
    return TEST_DONE();
}
