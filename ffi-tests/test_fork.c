/*
 * test_fork.c - a process sets up the bus, quiesces, then forks; every child uses the bus.
 *
 * Parent: a message type, topic "fork.t" with a pool, a dedicated and a synchronous
 * subscription, a forward "fork.src" -> "fork.t"; publishes 100 payloads and waits until
 * all are delivered (and 200 ms more, so every library thread is parked: forking is
 * supported from a quiescent moment). Then it forks 4 children, which run concurrently,
 * waits for them, and does that again (3 rounds natively, 1 under valgrind; a failed
 * round ends the series).
 *
 * Each child (bounded by its own alarm; ends with _exit(0) only if all its checks passed):
 *  - subscribes a NEW pool, dedicated and synchronous subscription to "fork.t";
 *  - publishes 1,000 payloads to "fork.t" and 1,000 to "fork.src" (through the forward),
 *    in bursts of 20 with 1 ms pauses; each publish must reach all six subscriptions (the
 *    parent's three and its own three), and each of the six must receive all 2,000, in
 *    order: the parent's subscriptions work in the child too (the library re-creates pool
 *    workers and dedicated threads on demand after fork);
 *  - creates a topic and a type of its own, with a pool subscription that gets 500
 *    payloads in bursts of 5 with 1 ms pauses (its pool worker parks and wakes many
 *    times), then releases them (registries usable, topic gone);
 *  - unsubscribes its own subscriptions and waits (bounded; no join that could hang)
 *    until each is done: own Subscribe first, own Unsubscribe last, nothing after;
 *  - child 0 of the first round then forks a grandchild (second fork generation) that
 *    does all of the above with 200 payloads, and reaps it the same way;
 *  - unsubscribes its copies of the parent's subscriptions, waits until they are done
 *    (lifecycle checked), and checks every payload it created was destroyed exactly once.
 * A child reports "result <failed checks> <valgrind errors>" through a pipe. Natively it
 * then _exit()s with 0 or 1; under valgrind see below.
 *
 * Parent: reaps every child (bounded) and requires exit status 0 and a clean result;
 * then checks its own subscriptions are unaffected (100 more payloads through the
 * forward, all delivered, nothing the children published is visible), tears everything
 * down, and checks the registry is empty and every dtor ran once.
 */
#include "recorder.h"

#include <poll.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>

/* Under valgrind, a forked child inherits the memory of threads that do not exist in it
 * (their stacks are not scanned), which memcheck reports as "definitely lost" when the
 * child exits: an artifact of fork() in a threaded process, not a leak of the library. So
 * under valgrind a child reports its result (its failed checks and valgrind's count of
 * memory errors) through a pipe and waits; the process that forked it then kills it with
 * SIGKILL, which skips the leak check (a SIGKILL sent by the child itself does not). */
#define NCHILD 4

static sb_message_type *ptype;
static sb_topic *T, *SRC;
static sb_forward *fwd;
static recorder prec[KIND_COUNT];          /* the parent's subscriptions */
static sb_subscription *psub[KIND_COUNT];

/* ---------------- child ---------------- */

static void child_watchdog(int sig)
{
    static const char msg[] = "FAIL child watchdog: child did not finish in time\n";
    (void)sig;
    ssize_t r = write(1, msg, sizeof msg - 1);
    (void)r;
    _exit(3);
}

/* waits (bounded) until a subscription is done, without a join that could hang */
static int wait_done(sb_subscription *keep)
{
    WAIT_UNTIL(sb_subscription_is_done(keep) == 1);
    return tu_last_wait_ok();
}

/* a forked child: its pid and the read end of its result pipe */
typedef struct kid {
    pid_t pid;
    int fd;
} kid;

static kid fork_child(int idx, int depth);
static int reap_child(kid *k, double deadline, const char *what);

/* Runs in a forked child; returns its number of failed checks. */
static int child_work(int idx, int depth)
{
    int failed0 = atomic_load(&tu_failed);
    int passed0 = atomic_load(&tu_passed);
    /* depth: 1 = child of the first round, 2 = grandchild, 3 = child of a later round */
    const int n = depth == 2 ? tu_scale(200, 50) : tu_scale(1000, 200);
    /* payload thread index for this process's publishes: 1..NCHILD, grandchild NCHILD+1 */
    const int pthread_idx = depth == 2 ? NCHILD + 1 : 1 + idx;
    int base_parent[KIND_COUNT];
    for (int k = 0; k < KIND_COUNT; k++)
        base_parent[k] = atomic_load(&prec[k].payloads);
    int created0 = atomic_load(&payload_created);
    CHECK_EQ_INT(created0, atomic_load(&payload_destroyed)); /* forked quiescent */

    /* new subscriptions of every kind */
    recorder nrec[KIND_COUNT];
    sb_subscription *nsub[KIND_COUNT], *nkeep[KIND_COUNT];
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&nrec[k], ptype, T);
        nsub[k] = subscribe_kind(k, T, recorder_cb, &nrec[k]);
        CHECK(nsub[k] != NULL);
        nkeep[k] = sb_subscription_ref(nsub[k]);
    }

    /* publish directly and through the forward: each reaches the parent's three and our
     * three subscriptions */
    CHECK_EQ_INT(sb_topic_subscribers(T), 2 * KIND_COUNT);
    CHECK_EQ_INT(sb_topic_subscribers(SRC), 2 * KIND_COUNT);
    int bad = 0;
    for (int i = 0; i < n; i++) {
        bad += publish_payload(T, ptype, pthread_idx, 2 * i, 0) != 2 * KIND_COUNT;
        bad += publish_payload(SRC, ptype, pthread_idx, 2 * i + 1, 0) != 2 * KIND_COUNT;
        if (i % 10 == 9)
            tu_sleep_ms(1); /* in bursts: library threads park and are woken again */
    }
    CHECK_EQ_INT(bad, 0);

    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&nrec[k].payloads) == 2 * n);
        if (!tu_last_wait_ok())
            printf("child %d.%d: new %s subscription got %d of %d\n", idx, depth,
                   kind_names[k], atomic_load(&nrec[k].payloads), 2 * n);
        WAIT_UNTIL(atomic_load(&prec[k].payloads) == base_parent[k] + 2 * n);
        if (!tu_last_wait_ok())
            printf("child %d.%d: the parent's %s subscription got %d of %d\n", idx, depth,
                   kind_names[k], atomic_load(&prec[k].payloads) - base_parent[k], 2 * n);
        CHECK_EQ_INT(nrec[k].last_seq[pthread_idx], 2 * n - 1);
        CHECK_EQ_INT(prec[k].last_seq[pthread_idx], 2 * n - 1);
    }

    /* registries work: a topic and a type of the child's own */
    char tname[64], yname[64];
    snprintf(tname, sizeof tname, "fork.child%d.%d", idx, depth);
    snprintf(yname, sizeof yname, "fork.type%d.%d", idx, depth);
    sb_topic *own = sb_topic_create(tname);
    CHECK(own != NULL);
    sb_message_type *oty = make_type(yname);
    recorder orec;
    recorder_init(&orec, oty, own);
    sb_subscription *osub = sb_subscribe_pool(own, recorder_cb, &orec);
    CHECK(osub != NULL);
    /* in bursts of 5 with pauses: the child's pool worker parks and is woken many times */
    const int own_n = tu_scale(500, 50);
    bad = 0;
    for (int i = 0; i < own_n; i++) {
        bad += publish_payload(own, oty, 0, i, 0) != 1;
        if (i % 5 == 4)
            tu_sleep_ms(1);
    }
    CHECK_EQ_INT(bad, 0);
    WAIT_UNTIL(atomic_load(&orec.payloads) == own_n);
    if (!tu_last_wait_ok())
        printf("child %d.%d: pool subscription on its own topic got %d of %d\n", idx, depth,
               atomic_load(&orec.payloads), own_n);
    sb_subscription *okeep = sb_subscription_ref(osub);
    CHECK(sb_unsubscribe(osub) == NULL);
    if (wait_done(okeep)) {
        CHECK_RECORDER_LIFECYCLE(&orec);
    }
    sb_subscription_unref(okeep);
    sb_topic_unref(own);
    sb_message_type_unref(oty);
    CHECK(!topic_registered(tname));

    /* unsubscribe the new subscriptions */
    for (int k = 0; k < KIND_COUNT; k++)
        CHECK(sb_unsubscribe(nsub[k]) == NULL);
    for (int k = 0; k < KIND_COUNT; k++) {
        if (wait_done(nkeep[k])) {
            CHECK_RECORDER_LIFECYCLE(&nrec[k]);
        } else {
            printf("child %d.%d: new %s subscription not done\n", idx, depth, kind_names[k]);
        }
        CHECK_EQ_INT(atomic_load(&nrec[k].payloads), 2 * n);
        sb_subscription_unref(nkeep[k]);
        recorder_destroy(&nrec[k]);
    }
    CHECK_EQ_INT(sb_topic_subscribers(T), KIND_COUNT); /* the parent's */

    /* a grandchild (second fork generation), forked from a quiescent moment */
    if (idx == 0 && depth == 1) {
        tu_sleep_ms(100);
        fflush(stdout);
        kid g = fork_child(0, 2);
        CHECK(g.pid > 0);
        if (g.pid > 0)
            tu_check(reap_child(&g, tu_now_s() + 2 * tu_wait_seconds() + 30, "grandchild"),
                     __FILE__, __LINE__, "grandchild ended with all its checks passed");
    }

    /* unsubscribe (this process's copies of) the parent's subscriptions */
    sb_subscription *pkeep[KIND_COUNT];
    for (int k = 0; k < KIND_COUNT; k++) {
        pkeep[k] = sb_subscription_ref(psub[k]);
        CHECK(sb_unsubscribe(psub[k]) == NULL);
    }
    for (int k = 0; k < KIND_COUNT; k++) {
        if (wait_done(pkeep[k])) {
            CHECK_RECORDER_LIFECYCLE(&prec[k]);
        } else {
            printf("child %d.%d: parent's %s subscription not done\n", idx, depth,
                   kind_names[k]);
        }
        /* pkeep[k] is deliberately kept: in a child, the vanished parent thread's
         * reference to it can never be dropped, and a global pointer keeps the object
         * visibly reachable (no false "definitely lost" under valgrind) */
        psub[k] = pkeep[k];
    }
    CHECK_EQ_INT(sb_topic_subscribers(T), 0);

    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    CHECK_EQ_INT(atomic_load(&payload_created) - created0, 2 * n + own_n);

    int failed = atomic_load(&tu_failed) - failed0;
    printf("child %d.%d (pid %d): %d checks passed, %d failed.\n", idx, depth, (int)getpid(),
           atomic_load(&tu_passed) - passed0, failed);
    fflush(stdout);
    return failed;
}

static int result_fd = -1; /* in a child: write end of its result pipe */

static void child_end(int failed)
{
    unsigned vg_errors = 0;
    if (RUNNING_ON_VALGRIND)
        vg_errors = (unsigned)VALGRIND_COUNT_ERRORS;
    char line[64];
    int len = snprintf(line, sizeof line, "result %d %u\n", failed, vg_errors);
    ssize_t w = write(result_fd, line, (size_t)len);
    (void)w;
    fflush(stdout);
    if (RUNNING_ON_VALGRIND) {
        alarm(0);
        for (;;) /* see above: the forking process kills us */
            pause();
    }
    _exit(failed == 0 ? 0 : 1);
}

static kid fork_child(int idx, int depth)
{
    kid k = {-1, -1};
    int fds[2];
    if (pipe(fds) != 0)
        return k;
    pid_t parent = getpid();
    fflush(stdout);
    pid_t pid = fork();
    if (pid != 0) {
        close(fds[1]);
        k.pid = pid;
        k.fd = fds[0];
        if (pid < 0)
            close(fds[0]);
        return k;
    }
    /* child: never outlive the process that forked it (no orphan holding the output pipe) */
    close(fds[0]);
    result_fd = fds[1];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(4);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = child_watchdog;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm(tu_checked() ? 400 : 60);
    child_end(child_work(idx, depth));
    return k; /* not reached */
}

/* Waits for a child until `deadline` (then kills it), reads its result; 1 when it ended
 * well: exit status 0 (natively) or SIGKILL after reporting (under valgrind), with 0
 * failed checks and 0 memory errors reported. */
static int reap_child(kid *k, double deadline, const char *what)
{
    int st = 0, ended = 0, killed_by_us = 0;
    char buf[128];
    size_t used = 0;
    while (!ended && tu_now_s() < deadline) {
        if (waitpid(k->pid, &st, WNOHANG) == k->pid) {
            ended = 1;
            break;
        }
        struct pollfd pfd = {.fd = k->fd, .events = POLLIN};
        if (poll(&pfd, 1, 5) == 1 && used < sizeof buf - 1) {
            ssize_t n = read(k->fd, buf + used, sizeof buf - 1 - used);
            if (n > 0)
                used += (size_t)n;
            buf[used] = '\0';
            if (RUNNING_ON_VALGRIND && strchr(buf, '\n') != NULL) {
                kill(k->pid, SIGKILL); /* reported: end it without a leak check */
                waitpid(k->pid, &st, 0);
                ended = killed_by_us = 1;
            }
        }
    }
    if (!ended) {
        printf("%s (pid %d) did not end in time: killing it\n", what, (int)k->pid);
        kill(k->pid, SIGKILL);
        waitpid(k->pid, &st, 0);
    }
    for (;;) {
        ssize_t n = used < sizeof buf - 1 ? read(k->fd, buf + used, sizeof buf - 1 - used) : 0;
        if (n <= 0)
            break;
        used += (size_t)n;
    }
    buf[used] = '\0';
    close(k->fd);
    int failed = -1;
    unsigned vg = 0;
    int reported = sscanf(buf, "result %d %u", &failed, &vg) == 2;
    int status_ok = WIFEXITED(st) ? WEXITSTATUS(st) == 0
                                  : (killed_by_us && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    if (WIFSIGNALED(st) && !status_ok)
        printf("%s (pid %d) killed by signal %d\n", what, (int)k->pid, WTERMSIG(st));
    else if (WIFEXITED(st) && WEXITSTATUS(st) != 0)
        printf("%s (pid %d) exited with status %d\n", what, (int)k->pid, WEXITSTATUS(st));
    if (!reported)
        printf("%s (pid %d) reported no result\n", what, (int)k->pid);
    else if (failed != 0 || vg != 0)
        printf("%s (pid %d): %d failed checks, %u valgrind errors\n", what, (int)k->pid,
               failed, vg);
    return ended && status_ok && reported && failed == 0 && vg == 0;
}

/* ---------------- parent ---------------- */

int main(void)
{
    TEST_INIT();
    double start = tu_now_s();
    ptype = make_type("fork.payload");
    T = sb_topic_create("fork.t");
    SRC = sb_topic_create("fork.src");
    fwd = sb_forward_all(SRC, T);
    CHECK(fwd != NULL);
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&prec[k], ptype, T);
        psub[k] = subscribe_kind(k, T, recorder_cb, &prec[k]);
        CHECK(psub[k] != NULL);
    }
    for (int i = 0; i < 100; i++)
        CHECK_EQ_INT(publish_payload(T, ptype, 0, i, 0), KIND_COUNT);
    for (int k = 0; k < KIND_COUNT; k++)
        WAIT_UNTIL(atomic_load(&prec[k].payloads) == 100);
    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    tu_sleep_ms(200); /* quiescent: spinning library threads have parked */

    /* NCHILD children at a time, in a few rounds (each from a quiescent moment) */
    const int rounds = tu_scale(3, 1);
    for (int round = 0; round < rounds; round++) {
        kid kids[NCHILD];
        for (int i = 0; i < NCHILD; i++) {
            kids[i] = fork_child(i, round == 0 ? 1 : 3);
            CHECK(kids[i].pid > 0);
        }
        /* wait for every child (bounded: each child has its own alarm too) */
        double deadline = tu_now_s() + (tu_checked() ? 420 : 75);
        int round_ok = 1;
        for (int i = 0; i < NCHILD; i++) {
            if (kids[i].pid <= 0)
                continue;
            char what[64];
            snprintf(what, sizeof what, "round %d child %d", round, i);
            int ok = reap_child(&kids[i], deadline, what);
            tu_check(ok, __FILE__, __LINE__,
                     "child exited with status 0 and all its checks passed");
            round_ok &= ok;
        }
        if (!round_ok) {
            printf("round %d failed: no further rounds\n", round);
            break;
        }
    }

    /* the parent is unaffected: its subscriptions saw only its own payloads */
    for (int i = 100; i < 200; i++)
        CHECK_EQ_INT(publish_payload(SRC, ptype, 0, i, 0), KIND_COUNT);
    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&prec[k].payloads) == 200);
        CHECK(sb_unsubscribe_and_join(psub[k]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&prec[k]);
        CHECK_RECORDER_THREADS(&prec[k], k);
        CHECK_EQ_INT(atomic_load(&prec[k].payloads), 200);
        CHECK_EQ_INT(prec[k].last_seq[0], 199);
        for (int c = 1; c <= NCHILD; c++)
            CHECK_EQ_INT(prec[k].last_seq[c], -1);
        recorder_destroy(&prec[k]);
    }
    CHECK(sb_forward_cancel(fwd) == NULL);
    sb_topic_unref(T);
    sb_topic_unref(SRC);
    sb_message_type_unref(ptype);
    CHECK_TOPIC_GONE("fork.t");
    CHECK_TOPIC_GONE("fork.src");
    for (int i = 0; i < NCHILD; i++) {
        char name[64];
        for (int d = 1; d <= 3; d++) {
            snprintf(name, sizeof name, "fork.child%d.%d", i, d);
            CHECK(!topic_registered(name)); /* children's topics never existed here */
        }
    }
    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    CHECK_EQ_INT(atomic_load(&payload_created), 200);
    printf("fork took %.2f s\n", tu_now_s() - start);
    return TEST_DONE();
}
