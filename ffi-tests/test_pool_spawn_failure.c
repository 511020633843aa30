/*
 * test_pool_spawn_failure.c - the pool when the system refuses a new thread.
 *
 * RLIMIT_NPROC makes thread creation fail (the process first leaves root, which the
 * limit does not bind). Then:
 *  - the failure is reported through the log handler, and the handler may publish:
 *    the library must not call it with its pool lock held (a publish from the handler
 *    that makes a pool subscription runnable takes that lock: it would wait forever on
 *    its own thread);
 *  - the failure is reported once, not once per retry;
 *  - the work that needed the worker is not lost: once threads can be created again,
 *    the next subscription made runnable starts a worker, which also runs what waited.
 *
 * The pool: one worker, held in a gated callback (A) throughout, then max 2, so every
 * other delivery needs a second worker.
 */
#define _GNU_SOURCE
#include <grp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include "switchboard.h"
#include "test_util.h"

static sb_message_type *ty;
static sb_topic *t_log;
static atomic_int a_inside, a_open;
static atomic_int got_b, got_l, got_c, got_d;
static atomic_int failures_logged, handler_published, handler_returned;

static int is_payload(sb_message *msg) { return sb_message_get_type(msg) == ty; }

static void publish_one(sb_topic *t)
{
    sb_message *m = sb_message_create_bytes(ty, "x", 2);
    sb_publish(t, m);
    sb_message_unref(m);
}

static void gate_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (!is_payload(msg))
        return;
    atomic_store(&a_inside, 1);
    double deadline = tu_now_s() + 3 * tu_wait_seconds();
    while (!atomic_load(&a_open) && tu_now_s() < deadline)
        tu_sleep_ms(1);
}

static void count_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (is_payload(msg))
        atomic_fetch_add((atomic_int *)data, 1);
}

/* The host's log handler: on the first failure report it publishes to a topic with an
 * idle pool subscription, as a handler forwarding log lines onto the bus would. */
static void log_handler(void *data, int level, const char *text)
{
    (void)data;
    if (level != SB_LOG_WARNING || text == NULL || !strstr(text, "cannot start a pool worker"))
        return;
    if (atomic_fetch_add(&failures_logged, 1) == 0) {
        publish_one(t_log);
        atomic_store(&handler_published, 1);
    }
    atomic_store(&handler_returned, 1);
}

/* Root is not bound by RLIMIT_NPROC: leave it for an unprivileged id. */
static int leave_root(void)
{
    if (geteuid() != 0)
        return 1;
    return setgroups(0, NULL) == 0 && setgid(65534) == 0 && setuid(65534) == 0;
}

int main(void)
{
    TEST_INIT();
    CHECK(leave_root());
    CHECK_EQ_INT(sb_message_type_create("psf.payload", NULL, &ty), SB_OK);
    CHECK_EQ_INT(sb_pool_configure(1, 1, 60000), SB_OK); /* one worker until A holds it */
    sb_topic *t_a = sb_topic_create("psf.a");
    sb_topic *t_b = sb_topic_create("psf.b");
    sb_topic *t_c = sb_topic_create("psf.c");
    sb_topic *t_d = sb_topic_create("psf.d");
    t_log = sb_topic_create("psf.log");
    sb_subscription *a = sb_subscribe_pool(t_a, gate_cb, NULL);
    sb_subscription *b = sb_subscribe_pool(t_b, count_cb, &got_b);
    sb_subscription *l = sb_subscribe_pool(t_log, count_cb, &got_l);
    sb_subscription *c = sb_subscribe_pool(t_c, count_cb, &got_c);
    sb_subscription *d = sb_subscribe_pool(t_d, count_cb, &got_d);
    CHECK(a && b && l && c && d);
    /* every Subscribe message handled: all four are idle (so a publish schedules them) */
    WAIT_UNTIL(sb_subscription_queue_length(a) == 0 && sb_subscription_queue_length(b) == 0 &&
               sb_subscription_queue_length(l) == 0 && sb_subscription_queue_length(c) == 0 &&
               sb_subscription_queue_length(d) == 0);
    tu_sleep_ms(20);

    publish_one(t_a);
    WAIT_UNTIL(atomic_load(&a_inside) == 1); /* the pool's one worker is held */
    CHECK_EQ_INT(sb_pool_configure(1, 2, 60000), SB_OK); /* room for a second, not started */

    /* installed while threads can still be created, as a host does at startup: the
     * library's log thread, which calls the handler, starts now */
    sb_set_log_handler(log_handler, NULL);
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_NPROC, &saved) == 0);
    struct rlimit one = {1, saved.rlim_max};
    CHECK(setrlimit(RLIMIT_NPROC, &one) == 0);
    unsigned long long warnings_before = sb_warning_count();

    /* B needs a second worker, which cannot start: the failure is logged, and the
     * handler's own publish (to L, idle) returns instead of waiting on the pool lock */
    publish_one(t_b);
    CHECK(sb_warning_count() > warnings_before);
    WAIT_UNTIL(atomic_load(&handler_returned) == 1);
    CHECK(atomic_load(&failures_logged) >= 1);
    CHECK_EQ_INT(atomic_load(&handler_published), 1);
    CHECK_EQ_INT(atomic_load(&handler_returned), 1);
    CHECK(sb_warning_count() > warnings_before);
    CHECK_STAYS(atomic_load(&got_b) == 0 && atomic_load(&got_l) == 0, 50);
    /* more work while threads are still refused: retried, not reported again (a
     * warning per attempt would flood the log) */
    publish_one(t_d);
    CHECK_EQ_INT(atomic_load(&failures_logged), 1);
    CHECK_EQ_INT(sb_warning_count(), warnings_before + 1);

    /* threads can be created again: the next subscription made runnable (C) starts a
     * worker, and B and L, waiting in the run queue, get delivered too, while A still
     * holds the first worker */
    CHECK(setrlimit(RLIMIT_NPROC, &saved) == 0);
    publish_one(t_c);
    WAIT_UNTIL(atomic_load(&got_c) == 1);
    WAIT_UNTIL(atomic_load(&got_b) == 1 && atomic_load(&got_l) == 1 &&
               atomic_load(&got_d) == 1);
    CHECK_EQ_INT(atomic_load(&a_open), 0);

    atomic_store(&a_open, 1);
    sb_set_log_handler(NULL, NULL);
    CHECK(sb_unsubscribe_and_join(a) == NULL);
    CHECK(sb_unsubscribe_and_join(b) == NULL);
    CHECK(sb_unsubscribe_and_join(l) == NULL);
    CHECK(sb_unsubscribe_and_join(c) == NULL);
    CHECK(sb_unsubscribe_and_join(d) == NULL);
    sb_topic_unref(t_d);
    sb_topic_unref(t_a);
    sb_topic_unref(t_b);
    sb_topic_unref(t_c);
    sb_topic_unref(t_log);
    sb_message_type_unref(ty);
    return TEST_DONE();
}
