/*
 * test_deep_chain.c - forwards of any depth (Forwarding section of API.md).
 *
 * A chain of 100,000 topics, each forwarding to the next: creating every forward,
 * refusing the one that would close the cycle (the cycle check walks the whole chain),
 * counting and asking through it (sb_topic_subscribers, sb_topic_wants), publishing at
 * the head to a subscription at the tail (once, even with a shortcut making a second
 * path), and tearing it all down, both from the main thread and from inside a pool
 * callback, whose thread has a small stack. A walk that recursed once per topic
 * overflowed the stack here.
 */
#include "test_util.h"

static sb_message_type *ptype;
static int chain_len;

static atomic_int tail_got;

static void tail_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == ptype)
        atomic_fetch_add(&tail_got, 1);
}

static int publish1(sb_topic *topic)
{
    sb_message *m = sb_message_create(ptype, NULL, NULL);
    if (m == NULL)
        return -1000;
    int r = sb_publish(topic, m);
    sb_message_unref(m);
    return r;
}

/* Builds, uses and tears down a chain of chain_len topics named "<prefix>.<i>". With
 * `pool_tail` the tail's subscription is a pool one (its deliveries are waited for),
 * else a synchronous one (delivered when sb_publish returns). Cancels the forwards from
 * the head when `from_head`, else from the tail. */
static void run_chain(const char *prefix, int pool_tail, int from_head)
{
    int n = chain_len;
    sb_topic **t = calloc((size_t)n, sizeof *t);
    sb_forward **f = calloc((size_t)n, sizeof *f);
    CHECK(t != NULL && f != NULL);
    if (t == NULL || f == NULL) {
        free(t);
        free(f);
        return;
    }
    char name[64];
    int made = 0;
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "%s.%d", prefix, i);
        t[i] = sb_topic_create(name);
        made += t[i] != NULL;
    }
    CHECK_EQ_INT(made, n);
    made = 0;
    for (int i = 0; i + 1 < n; i++) {
        f[i] = sb_forward_all(t[i], t[i + 1]);
        made += f[i] != NULL;
    }
    CHECK_EQ_INT(made, n - 1);

    /* Closing the cycle: the check walks all n topics, then refuses. */
    CHECK(sb_forward_all(t[n - 1], t[0]) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_forward_all(t[n / 2], t[n / 3]) == NULL);

    atomic_store(&tail_got, 0);
    sb_subscription *sub = pool_tail ? sb_subscribe_pool(t[n - 1], tail_cb, NULL)
                                     : sb_subscribe_synchronous(t[n - 1], tail_cb, NULL);
    CHECK(sub != NULL);
    CHECK_EQ_INT(sb_subscription_accept_message_type(sub, ptype), SB_OK);
    CHECK_EQ_INT(sb_topic_subscribers(t[0]), 1);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK_EQ_INT(sb_topic_subscribers(t[n / 2]), 1);
    CHECK_EQ_INT(sb_topic_wants(t[0], ptype), 1);
    CHECK_EQ_INT(sb_topic_wants(t[0], sb_subscription_change_type()), 0);

    /* The head's publish reaches the tail's subscription, once. */
    CHECK_EQ_INT(publish1(t[0]), 1);
    if (!pool_tail)
        CHECK_EQ_INT(atomic_load(&tail_got), 1);
    /* A shortcut from the head to the tail makes a second path: still once. */
    sb_forward *shortcut = sb_forward_all(t[0], t[n - 1]);
    CHECK(shortcut != NULL);
    CHECK_EQ_INT(publish1(t[0]), 1);
    CHECK_EQ_INT(publish1(t[n / 2]), 1);
    WAIT_UNTIL(atomic_load(&tail_got) == 3);
    CHECK(sb_forward_cancel(shortcut) == NULL);

    /* Cut in the middle: the head no longer reaches the tail. */
    int mid = n / 2;
    CHECK(sb_forward_cancel(f[mid]) == NULL);
    f[mid] = NULL;
    CHECK_EQ_INT(sb_topic_subscribers(t[0]), 0);
    CHECK_EQ_INT(sb_topic_wants(t[0], ptype), 0);
    CHECK_EQ_INT(publish1(t[0]), 0);
    CHECK_EQ_INT(publish1(t[mid + 1]), 1);
    WAIT_UNTIL(atomic_load(&tail_got) == 4);

    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(atomic_load(&tail_got), 4);

    /* Tear down: the topics first (the forwards keep them alive), then the forwards, so
     * that cancels release the topics' last references along the chain. */
    for (int i = 0; i < n; i++)
        sb_topic_unref(t[i]);
    for (int k = 0; k + 1 < n; k++) {
        int i = from_head ? k : n - 2 - k;
        if (f[i] != NULL)
            CHECK(sb_forward_cancel(f[i]) == NULL);
    }
    snprintf(name, sizeof name, "%s.%d", prefix, 0);
    CHECK(sb_topic_get(name) == NULL);
    snprintf(name, sizeof name, "%s.%d", prefix, n - 1);
    CHECK(sb_topic_get(name) == NULL);
    free(t);
    free(f);
}

static atomic_int pool_runs_done;

static void in_pool_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    /* On a pool thread: both tail kinds, both teardown orders. */
    run_chain("deep.pool.a", 0, 1);
    run_chain("deep.pool.b", 1, 0);
    atomic_store(&pool_runs_done, 1);
}

int main(void)
{
    TEST_INIT();
    /* under valgrind or ThreadSanitizer a walk costs 50-100x: 100,000 ran past the
     * watchdog there; the native run keeps the full chain */
    chain_len = (tu_slow() || tu_tsan()) ? 3000 : 100000;
    CHECK_EQ_INT(sb_message_type_create("deep.payload", NULL, &ptype), SB_OK);

    printf("chain of %d from main\n", chain_len);
    run_chain("deep.main.a", 1, 1);
    run_chain("deep.main.b", 0, 0);

    printf("chain of %d from a pool callback\n", chain_len);
    sb_topic *trigger = sb_topic_create("deep.trigger");
    sb_subscription *runner = sb_subscribe_pool(trigger, in_pool_cb, NULL);
    CHECK_EQ_INT(publish1(trigger), 1);
    /* Longer than WAIT_UNTIL's bound: four chains of work, in a debug build (the
     * watchdog still ends a hang). */
    double deadline = tu_now_s() + (tu_slow() || tu_tsan() ? 400.0 : 80.0);
    while (atomic_load(&pool_runs_done) == 0 && tu_now_s() < deadline)
        tu_sleep_ms(5);
    CHECK_EQ_INT(atomic_load(&pool_runs_done), 1);
    CHECK(sb_unsubscribe_and_join(runner) == NULL);
    sb_topic_unref(trigger);

    sb_message_type_unref(ptype);
    return TEST_DONE();
}
