/*
 * test_log.c - sb_set_log_handler as a loadable module uses it:
 *
 *  - a slow handler does not hold up the publisher whose publish logged (a congestion
 *    warning): the handler runs on a library thread, not the publisher's;
 *  - sb_set_log_handler(NULL, NULL) returns only once the handler's call in flight
 *    returned, so the module's code could be unloaded right after; the removed handler
 *    is never called again;
 *  - a handler may replace itself from inside its call without deadlock; the next line
 *    goes to the new handler;
 *  - sb_log_dropped() is a count (0 here: nothing overflowed);
 *  - with no handler, a line goes to stderr, and a stderr that can no longer be written
 *    (a pipe whose reader went, SIGPIPE ignored, as a daemon's) changes nothing else;
 *  - a process may fork while an alert handler runs and calls the library.
 */
#include "test_util.h"
#include <signal.h>
#include <sys/wait.h>

static sb_message_type *ptype;

/* ---- a subscription whose queue crosses its high-water mark: one warning ---- */

static atomic_int hold_entered;
static atomic_int hold_open;

static void hold_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_store(&hold_entered, 1);
    double deadline = tu_now_s() + tu_wait_seconds();
    while (!atomic_load(&hold_open) && tu_now_s() < deadline)
        tu_sleep_ms(1);
}

static void publish_one(sb_topic *t)
{
    sb_message *m = sb_message_create(ptype, NULL, NULL);
    CHECK(m != NULL);
    CHECK_EQ_INT(sb_publish(t, m), 1);
    sb_message_unref(m);
}

/* Makes the library log one warning from this thread's sb_publish. */
static void provoke_warning(const char *name)
{
    uint64_t w0 = sb_warning_count();
    atomic_store(&hold_entered, 0);
    atomic_store(&hold_open, 0);
    sb_topic *t = sb_topic_create(name);
    sb_subscription *s = sb_subscribe(t, hold_cb, NULL);
    CHECK(s != NULL);
    CHECK_EQ_INT(sb_subscription_set_congestion_limits(s, 1, 2), SB_OK);
    publish_one(t);
    WAIT_UNTIL(atomic_load(&hold_entered) == 1); /* the callback holds its runner */
    for (int i = 0; i < 3; i++)                  /* 3 queued > 2: a warning, logged here */
        publish_one(t);
    CHECK_EQ_INT(sb_warning_count() - w0, 1);
    atomic_store(&hold_open, 1);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    sb_topic_unref(t);
}

/* ---- a handler held inside its call ---- */

static pthread_t main_thread;
static atomic_int handler_entered;
static atomic_int handler_returned;
static atomic_int handler_on_main;
static atomic_int handler_open;
static atomic_int handler_timed_out;

static void slow_handler(void *data, int level, const char *text)
{
    (void)data;
    (void)level;
    (void)text;
    if (pthread_equal(pthread_self(), main_thread))
        atomic_fetch_add(&handler_on_main, 1);
    atomic_fetch_add(&handler_entered, 1);
    double deadline = tu_now_s() + tu_wait_seconds();
    while (!atomic_load(&handler_open)) {
        if (tu_now_s() > deadline) {
            atomic_store(&handler_timed_out, 1);
            break;
        }
        tu_sleep_ms(1);
    }
    atomic_fetch_add(&handler_returned, 1);
}

typedef struct remover {
    atomic_int done;
    int returned_at_removal; /* handler calls finished when the removal returned */
} remover;

static void *remover_main(void *arg)
{
    remover *r = arg;
    sb_set_log_handler(NULL, NULL);
    r->returned_at_removal = atomic_load(&handler_returned);
    atomic_store(&r->done, 1);
    return NULL;
}

static void test_removal_waits_for_the_call_in_flight(void)
{
    main_thread = pthread_self();
    sb_set_log_handler(slow_handler, NULL);

    /* the handler holds its call, yet the publisher that logged is not held */
    double t0 = tu_now_s();
    provoke_warning("log.slow");
    WAIT_UNTIL(atomic_load(&handler_entered) == 1);
    CHECK(tu_now_s() - t0 < tu_wait_seconds() / 2);
    CHECK_EQ_INT(atomic_load(&handler_on_main), 0);
    CHECK_EQ_INT(atomic_load(&handler_returned), 0);

    /* removing the handler waits for that call */
    remover r;
    memset(&r, 0, sizeof r);
    pthread_t th;
    CHECK_EQ_INT(pthread_create(&th, NULL, remover_main, &r), 0);
    CHECK_STAYS(atomic_load(&r.done) == 0, 100);
    atomic_store(&handler_open, 1);
    pthread_join(th, NULL);
    CHECK_EQ_INT(r.returned_at_removal, 1);
    CHECK_EQ_INT(atomic_load(&handler_timed_out), 0);

    /* removed: never called again (the line goes to stderr) */
    provoke_warning("log.after");
    tu_sleep_ms(20);
    CHECK_EQ_INT(atomic_load(&handler_entered), 1);
}

/* ---- a handler replacing itself ---- */

static atomic_int first_calls, second_calls;

static void second_handler(void *data, int level, const char *text)
{
    (void)data;
    (void)level;
    (void)text;
    atomic_fetch_add(&second_calls, 1);
}

static void first_handler(void *data, int level, const char *text)
{
    (void)data;
    (void)level;
    (void)text;
    atomic_fetch_add(&first_calls, 1);
    sb_set_log_handler(second_handler, NULL); /* from inside: must not wait for itself */
}

static void test_handler_replaces_itself(void)
{
    sb_set_log_handler(first_handler, NULL);
    provoke_warning("log.first");
    WAIT_UNTIL(atomic_load(&first_calls) == 1);
    provoke_warning("log.second");
    WAIT_UNTIL(atomic_load(&second_calls) == 1);
    sb_set_log_handler(NULL, NULL);
    CHECK_EQ_INT(atomic_load(&first_calls), 1);
    CHECK_EQ_INT(atomic_load(&second_calls), 1);
    CHECK_EQ_INT(sb_log_dropped(), 0);
}

/* A forked child's end: its result through `fd`, then, under valgrind, a wait to be
 * killed (tu_reap_reported_child: the leak check of a child's exit would report the
 * memory of its parent's threads). */
static void child_report(int fd, int failed)
{
    char c = failed ? 'F' : 'K';
    ssize_t w = write(fd, &c, 1);
    (void)w;
    if (RUNNING_ON_VALGRIND)
        for (;;)
            pause();
    _exit(failed ? 1 : 0);
}

/* Forks; in the child runs `body` and reports. In the parent: 1 when the child
 * reported no failure (a child that died first reports nothing), 0 otherwise. */
static int in_child(void (*body)(void))
{
    int fds[2];
    if (pipe(fds) != 0)
        return 0;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        return 0;
    if (pid == 0) {
        close(fds[0]);
        body();
        child_report(fds[1], atomic_load(&tu_failed) > 0);
    }
    close(fds[1]);
    char c = 0;
    ssize_t r;
    do
        r = read(fds[0], &c, 1);
    while (r < 0 && errno == EINTR);
    close(fds[0]);
    int reaped = tu_reap_reported_child(pid);
    return r == 1 && c == 'K' && reaped;
}

static void stderr_closed_body(void)
{
    int fds[2];
    signal(SIGPIPE, SIG_IGN);
    if (pipe(fds) != 0 || dup2(fds[1], 2) < 0)
        _exit(3);
    close(fds[0]);
    close(fds[1]);
    provoke_warning("log.stderr.closed");
}

/* In a child, so that the test's own stderr stays: stderr becomes a pipe nobody reads
 * any more. The warning's write fails (EPIPE); the publish that logged it, and the
 * subscription, go on as ever (before: the failed write panicked, the publish failed
 * with SB_E_INTERNAL, and the panic's own log line aborted the process). */
static void test_stderr_closed(void) { CHECK(in_child(stderr_closed_body)); }

/* An alert handler that calls the library (the alert registry's lock, through
 * sb_stats_json) a while after it was entered; the process forks meanwhile (a PBX's
 * System() does, at any time). Before: the fork's preparation took the alert registry's
 * lock, then waited for the handler to return, while the handler waited for that lock. */
static atomic_int alert_entered;

static void alert_then_stats(void *data, int in_alert, const char *subsystem)
{
    (void)data;
    (void)in_alert;
    (void)subsystem;
    if (atomic_fetch_add(&alert_entered, 1) != 0)
        return;
    tu_sleep_ms(200);
    char *j = sb_stats_json();
    CHECK(j != NULL);
    sb_string_free(j);
}

static void nothing(void) {}

static void test_fork_while_alert_handler_runs(void)
{
    sb_set_alert_handler(alert_then_stats, NULL);
    provoke_warning("alertfork/t"); /* its subsystem enters alert, then leaves it */
    WAIT_UNTIL(atomic_load(&alert_entered) >= 1);
    /* the child does nothing: the fork's own return is the test (a deadlocked fork
     * hangs, and TEST_INIT's alarm ends the test) */
    CHECK(in_child(nothing));
    sb_set_alert_handler(NULL, NULL);
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("log.payload", NULL, &ptype), SB_OK);
    test_stderr_closed();
    test_fork_while_alert_handler_runs();
    test_removal_waits_for_the_call_in_flight();
    test_handler_replaces_itself();
    sb_message_type_unref(ptype);
    return TEST_DONE();
}
