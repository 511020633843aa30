/*
 * test_exit.c - a process that ends with the bus busy and nothing torn down exits promptly,
 * with status 0 and no crash.
 *
 * The program re-executes itself (env SB_EXIT_CHILD=<variant>) once per variant and checks
 * each child: it must end within the usual wait bound (10 s natively), by exiting with
 * status 0 (not by a signal), after printing its own "N passed, 0 failed" line. Under
 * valgrind (SB_VALGRIND=1) the child runs under `valgrind --leak-check=no
 * --error-exitcode=99`: memory errors during exit fail it, while the live objects it never
 * released (by design) are not reported as leaks. The parent itself releases everything,
 * so it is clean under the normal memcheck run.
 *
 * In every child: subscriptions of all three kinds, a pool router and a caching topic are
 * live; a dedicated subscription whose callback sleeps 50 ms per message has a backlog of
 * 1000 messages (50 s of work; 5000 under valgrind); four pool subscriptions sleep 20 ms
 * per message with backlogs (pool threads busy); a publisher thread keeps publishing (so a
 * synchronous callback runs on it); another thread is blocked in sb_publish on a full
 * SB_OVERFLOW_BLOCK subscription whose callback never returns. Then:
 *   - "return": main prints its summary and returns;
 *   - "exit-thread": main blocks in sb_unsubscribe_and_join on the backlogged subscription
 *     while another thread prints the summary and calls exit(0);
 *   - "exit-callback": a pool callback prints the summary and calls exit(0) while main
 *     blocks in sb_unsubscribe_and_join.
 */
#include "recorder.h"

#include <sys/types.h>
#include <sys/wait.h>

#define NPOOL 4

static sb_message_type *ptype;

/* ---------------- child ---------------- */

static atomic_int slow_calls;   /* dedicated, 50 ms each */
static atomic_int pool_calls;   /* pool, 20 ms each */
static atomic_int pool_inside;  /* pool callbacks running now */
static atomic_int sync_calls;
static atomic_int route_calls;
static atomic_int bg_published;
static atomic_int stuck_entered;
static atomic_int blocked_pub_started;
static atomic_int exit_from_callback; /* variant exit-callback: armed */
static pthread_mutex_t never_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never_cv = PTHREAD_COND_INITIALIZER;

static void slow_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_fetch_add(&slow_calls, 1);
    tu_sleep_ms(50);
}

static void pool_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_fetch_add(&pool_inside, 1);
    atomic_fetch_add(&pool_calls, 1);
    if (atomic_load(&exit_from_callback) && atomic_exchange(&exit_from_callback, 0)) {
        int rc = TEST_DONE();
        exit(rc);
    }
    tu_sleep_ms(20);
    atomic_fetch_sub(&pool_inside, 1);
}

static void sync_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == ptype)
        atomic_fetch_add(&sync_calls, 1);
}

static void route_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
    atomic_fetch_add(&route_calls, 1);
}

/* never returns (until the process ends) */
static void stuck_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_store(&stuck_entered, 1);
    pthread_mutex_lock(&never_mu);
    for (;;)
        pthread_cond_wait(&never_cv, &never_mu);
}

static const char *snap_id(sb_message *msg)
{
    if (sb_message_get_type(msg) != ptype)
        return NULL;
    static const char *ids[] = {"a", "b", "c", "d"};
    payload_t *p = sb_message_data(msg);
    return ids[p->seq & 3];
}

static sb_topic *t_slow, *t_pool, *t_sync, *t_block;

static void *bg_publisher(void *arg)
{
    (void)arg;
    for (int i = 0;; i++) {
        publish_payload(t_sync, ptype, 1, i, 0);
        if (i % 8 == 0)
            publish_payload(t_pool, ptype, 2, i, 0);
        atomic_fetch_add(&bg_published, 1);
        tu_sleep_ms(1);
    }
    return NULL;
}

static void *blocked_publisher(void *arg)
{
    (void)arg;
    atomic_store(&blocked_pub_started, 1);
    /* the BLOCK subscription (limit 1) is stuck in its callback: the second of these
     * publishes waits for room forever */
    for (int i = 1; i < 100; i++)
        publish_payload(t_block, ptype, 3, i, 0);
    return NULL;
}

static sb_subscription *slow_sub;

static void *exit_thread(void *arg)
{
    (void)arg;
    tu_sleep_ms(100); /* let main block in its join */
    int rc = TEST_DONE();
    exit(rc);
    return NULL;
}

static int child_main(const char *variant)
{
    TEST_INIT();
    int backlog = tu_scale(1000, 5000);
    ptype = make_type("exit.payload");
    t_slow = sb_topic_create("exit.slow");
    t_pool = sb_topic_create("exit.pool");
    t_sync = sb_topic_create("exit.sync");
    t_block = sb_topic_create("exit.block");
    CHECK(t_slow && t_pool && t_sync && t_block);

    /* live objects of every kind, never released */
    slow_sub = sb_subscribe(t_slow, slow_cb, NULL);
    CHECK(slow_sub != NULL);
    for (int i = 0; i < NPOOL; i++)
        CHECK(sb_subscribe_pool(t_pool, pool_cb, NULL) != NULL);
    CHECK(sb_subscribe_synchronous(t_sync, sync_cb, NULL) != NULL);
    sb_router *router = sb_router_create_pool(t_sync);
    CHECK(router != NULL);
    CHECK_EQ_INT(sb_router_add(router, ptype, route_cb, NULL), SB_OK);
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(t_sync, cache);
    CHECK(ct != NULL);
    sb_subscription *stuck = sb_subscribe(t_block, stuck_cb, NULL);
    CHECK(stuck != NULL);
    CHECK_EQ_INT(sb_subscription_set_overflow(stuck, SB_OVERFLOW_BLOCK, 1), SB_OK);
    sb_forward *fwd = sb_forward_all(t_block, t_slow);
    CHECK(fwd != NULL);

    /* backlogs */
    for (int i = 0; i < backlog; i++)
        CHECK_EQ_INT(publish_payload(t_slow, ptype, 0, i, 0), 1);
    for (int i = 0; i < 50; i++)
        CHECK_EQ_INT(publish_payload(t_pool, ptype, 0, i, 0), NPOOL);
    CHECK_EQ_INT(publish_payload(t_block, ptype, 0, 0, 0), 2);
    WAIT_UNTIL(atomic_load(&stuck_entered) == 1);

    pthread_t bg, bp;
    pthread_create(&bg, NULL, bg_publisher, NULL);
    pthread_detach(bg);
    pthread_create(&bp, NULL, blocked_publisher, NULL);
    pthread_detach(bp);

    WAIT_UNTIL(atomic_load(&slow_calls) >= 1);
    WAIT_UNTIL(atomic_load(&pool_inside) >= 1);
    WAIT_UNTIL(atomic_load(&bg_published) >= 20);
    WAIT_UNTIL(atomic_load(&sync_calls) >= 20);
    WAIT_UNTIL(atomic_load(&blocked_pub_started) == 1);
    WAIT_UNTIL(sb_subscription_queue_length(stuck) == 1); /* full: the publisher waits */
    CHECK(atomic_load(&slow_calls) < backlog / 2);         /* backlog still there */
    (void)cache;
    (void)fwd;
    (void)router;
    (void)ct;

    if (strcmp(variant, "return") == 0) {
        printf("child %s: returning from main with %d of %d messages not yet handled\n",
               variant, backlog - atomic_load(&slow_calls), backlog);
        return TEST_DONE();
    }
    if (strcmp(variant, "exit-thread") == 0) {
        printf("child %s: exit(0) from a thread while main joins\n", variant);
        pthread_t et;
        pthread_create(&et, NULL, exit_thread, NULL);
        sb_unsubscribe_and_join(slow_sub); /* would take the whole backlog */
        printf("FAIL: the join returned before exit()\n");
        return 1;
    }
    if (strcmp(variant, "exit-callback") == 0) {
        printf("child %s: exit(0) from a pool callback while main joins\n", variant);
        atomic_store(&exit_from_callback, 1);
        for (int i = 0; i < 20; i++)
            publish_payload(t_pool, ptype, 0, 1000 + i, 0);
        sb_unsubscribe_and_join(slow_sub);
        printf("FAIL: the join returned before exit()\n");
        return 1;
    }
    printf("FAIL: unknown variant %s\n", variant);
    return 1;
}

/* ---------------- parent ---------------- */

static const char *self_path(const char *argv0)
{
    static char buf[4096];
    if (argv0 != NULL && strchr(argv0, '/') != NULL)
        return argv0;
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0)
        return argv0;
    buf[n] = '\0';
    return buf;
}

static void run_child(const char *self, const char *variant)
{
    int fds[2];
    if (pipe(fds) != 0) {
        CHECK(0);
        return;
    }
    fflush(stdout);
    double start = tu_now_s();
    pid_t pid = fork();
    if (pid < 0) {
        CHECK(pid >= 0);
        return;
    }
    if (pid == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        setenv("SB_EXIT_CHILD", variant, 1);
        tu_exec_self(self);
    }
    close(fds[1]);

    /* wait (bounded) for the child to end, reading what it prints */
    char out[8192];
    size_t used = 0;
    int status = 0, ended = 0;
    double deadline = start + tu_wait_seconds();
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            ended = 1;
            break;
        }
        if (tu_now_s() > deadline)
            break;
        tu_sleep_ms(5);
    }
    double took = tu_now_s() - start;
    if (!ended) {
        printf("FAIL: child '%s' still running after %.1f s: killing it\n", variant, took);
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    /* the child is gone: its end of the pipe is closed, read everything */
    for (;;) {
        ssize_t n = read(fds[0], out + used, sizeof out - 1 - used);
        if (n <= 0)
            break;
        used += (size_t)n;
        if (used >= sizeof out - 1)
            break;
    }
    out[used] = '\0';
    close(fds[0]);
    int clean = strstr(out, " passed, 0 failed") != NULL;

    printf("child '%s' ended after %.2f s; it printed:\n", variant, took);
    for (char *line = strtok(out, "\n"); line != NULL; line = strtok(NULL, "\n"))
        printf("  | %s\n", line);
    tu_check(ended, __FILE__, __LINE__, "child exited within the wait bound");
    tu_check(ended && WIFEXITED(status), __FILE__, __LINE__, "child exited (no signal)");
    if (ended && WIFSIGNALED(status))
        printf("  child '%s' killed by signal %d\n", variant, WTERMSIG(status));
    if (ended && WIFEXITED(status) && WEXITSTATUS(status) != 0)
        printf("  child '%s' exit status %d\n", variant, WEXITSTATUS(status));
    tu_check(ended && WIFEXITED(status) && WEXITSTATUS(status) == 0, __FILE__, __LINE__,
             "child exit status 0");
    tu_check(clean, __FILE__, __LINE__, "child printed a clean summary line before exiting");
}

int main(int argc, char **argv)
{
    (void)argc;
    const char *variant = getenv("SB_EXIT_CHILD");
    if (variant != NULL && variant[0] != '\0')
        return child_main(variant);

    TEST_INIT();
    const char *self = self_path(argv[0]);
    run_child(self, "return");
    run_child(self, "exit-thread");
    run_child(self, "exit-callback");
    return TEST_DONE();
}
