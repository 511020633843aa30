/*
 * test_pool_limits.c - the shared pool's limits (API.md "Library": "Defaults: min 1 thread,
 * max = number of CPUs (at least 2), idle timeout 20 s"; sb_pool_configure in the header:
 * at most max_threads workers run callbacks, workers blocked inside a library join don't
 * count, idle workers above the minimum exit after the idle timeout).
 *
 * The pool configuration is process-global and the pool starts lazily, so main() runs the
 * tests in this order:
 *
 *  1. test_default_max - before any sb_pool_configure: N+1 pool callbacks block on the
 *     test's own condvar (so, unlike a library join, they count against max), with
 *     N = max(2, online CPUs): exactly N get inside at once, never more; all N+1 finish
 *     once the gate opens.
 *
 *  2. test_stand_ins - the pool stands in for workers blocked in a library wait, and gives
 *     the stand-ins back as soon as the blocked workers return.
 *     Pool: sb_pool_configure(1, 2, 60 s idle timeout). A dedicated subscription D is held
 *     in its callback by a gate and unsubscribed (its final message waits behind the gate).
 *     Two pool callbacks then join D, so both workers block inside the library; a third
 *     pool subscription P must still get every message meanwhile (the pool starts
 *     stand-ins). When the gate opens, the joins return, and the number of "sb-pool"
 *     threads must come back to at most max_threads (2) long before the 60 s idle timeout
 *     would retire anyone: surplus workers retire at their next turn.
 *
 *  3. test_max_threads - sb_pool_configure(1, 2, 60 s): of 20 gated pool callbacks exactly
 *     2 get inside at once, on 2 distinct threads; all 20 finish once the gate opens.
 *
 *  4. test_idle_timeout - max 4: four gated callbacks keep 4 workers busy; with a 60 s idle
 *     timeout the 4 idle workers are still there a while after their release; with 50 ms
 *     the pool shrinks back to min_threads (1) and keeps that one; from there, the next
 *     burst of four gated callbacks gets 4 workers again.
 *
 *  5. test_raise_max - max 1 with one gated callback running and two queued; raising
 *     the maximum to 3 starts workers for the queued two at once.
 *
 *  6. test_stand_in_bound - 80 pool callbacks block in sb_publish_sync: the pool stands in
 *     for blocked workers only up to its bound (2 + 64 workers), and all 80 complete.
 *
 * From test_stand_ins on, every test leaves the pool configured as FILE_MIN / FILE_MAX /
 * FILE_IDLE_MS (test_stand_ins' configuration), whatever it set meanwhile.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#define _DEFAULT_SOURCE
#include <dirent.h>
#include <sched.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include "switchboard.h"
#include "test_util.h"

#define TAG_BLOCK 1
#define TAG_JOIN 2
#define TAG_PLAIN 3
#define TAG_GANG 4
#define NPLAIN 200

/* the configuration test_stand_ins runs with, and every later test restores */
#define FILE_MIN 1
#define FILE_MAX 2
#define FILE_IDLE_MS 60000

static sb_message_type *ty;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int gate_open_flag;
static atomic_int d_blocked, joins_started, joins_done, plain_seen;
static sb_subscription *d_keep; /* a reference to D for the joiners */

static int tag_of(sb_message *msg) {
    if (sb_message_get_type(msg) != ty)
        return 0;
    return *(const int *)sb_message_data(msg);
}

static void publish_tag(sb_topic *t, int tag) {
    sb_message *m = sb_message_create_bytes(ty, &tag, sizeof tag);
    CHECK(sb_publish(t, m) >= 1);
    sb_message_unref(m);
}

static void d_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) != TAG_BLOCK)
        return;
    atomic_store(&d_blocked, 1);
    pthread_mutex_lock(&mu);
    double end = tu_now_s() + 3 * tu_wait_seconds();
    while (!gate_open_flag && tu_now_s() < end) {
        pthread_mutex_unlock(&mu);
        tu_sleep_ms(5);
        pthread_mutex_lock(&mu);
    }
    pthread_mutex_unlock(&mu);
}

static void joiner_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) != TAG_JOIN)
        return;
    atomic_fetch_add(&joins_started, 1);
    sb_subscription_join(d_keep); /* blocks in the library until D's final message */
    if (sb_subscription_is_done(d_keep))
        atomic_fetch_add(&joins_done, 1);
}

static void plain_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) == TAG_PLAIN)
        atomic_fetch_add(&plain_seen, 1);
}

static int pool_threads(void) { return tu_threads_named("sb-pool"); }

/* ---- a gang: pool subscriptions whose callbacks block on a gate (the test's own
 * mutex + condvar, not a library wait, so each blocked callback holds its worker and
 * counts against max_threads) on their first payload message ---- */

#define GANG_MAX_TIDS 256

typedef struct gang gang_t;

typedef struct member {
    gang_t *g;
    atomic_int payloads; /* TAG_GANG messages this subscription got */
} member_t;

struct gang {
    sb_topic *topic;
    int n;
    member_t *members;
    sb_subscription **subs;

    pthread_mutex_t gate_mu;
    pthread_cond_t gate_cv;
    int gate_open;           /* under gate_mu */
    atomic_int gate_timeouts; /* waits that gave up: the bound only turns a hang into a FAIL */

    atomic_int changes;    /* subscription change messages seen, all members */
    atomic_int entered;    /* callbacks that reached the gate */
    atomic_int inside;     /* callbacks at the gate right now */
    atomic_int max_inside; /* the most ever at the gate at once */
    atomic_int done;       /* callbacks that passed the gate and returned */

    /* threads that ran any callback of the gang while record_tids was set */
    atomic_int record_tids;
    pthread_mutex_t tid_mu;
    pthread_t tids[GANG_MAX_TIDS]; /* under tid_mu */
    int ntids;                     /* under tid_mu: distinct threads (may exceed the array) */
};

static void gang_record_tid(gang_t *g) {
    pthread_t self = pthread_self();
    pthread_mutex_lock(&g->tid_mu);
    int seen = 0;
    int stored = g->ntids < GANG_MAX_TIDS ? g->ntids : GANG_MAX_TIDS;
    for (int i = 0; i < stored && !seen; i++)
        seen = pthread_equal(g->tids[i], self);
    if (!seen) {
        if (g->ntids < GANG_MAX_TIDS)
            g->tids[g->ntids] = self;
        g->ntids++;
    }
    pthread_mutex_unlock(&g->tid_mu);
}

static int gang_ntids(gang_t *g) {
    pthread_mutex_lock(&g->tid_mu);
    int n = g->ntids;
    pthread_mutex_unlock(&g->tid_mu);
    return n;
}

static void gang_gate_wait(gang_t *g) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)(3 * tu_wait_seconds());
    pthread_mutex_lock(&g->gate_mu);
    while (!g->gate_open) {
        if (pthread_cond_timedwait(&g->gate_cv, &g->gate_mu, &deadline) == ETIMEDOUT) {
            atomic_fetch_add(&g->gate_timeouts, 1);
            break;
        }
    }
    pthread_mutex_unlock(&g->gate_mu);
}

static void gang_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)sub;
    member_t *m = data;
    gang_t *g = m->g;
    if (atomic_load(&g->record_tids))
        gang_record_tid(g);
    if (sb_message_get_type(msg) == sb_subscription_change_type()) {
        atomic_fetch_add(&g->changes, 1);
        return;
    }
    if (tag_of(msg) != TAG_GANG || atomic_fetch_add(&m->payloads, 1) != 0)
        return; /* only the first payload is held */
    atomic_fetch_add(&g->entered, 1);
    int now = atomic_fetch_add(&g->inside, 1) + 1;
    int max = atomic_load(&g->max_inside);
    while (now > max && !atomic_compare_exchange_weak(&g->max_inside, &max, now)) {
    }
    gang_gate_wait(g);
    atomic_fetch_sub(&g->inside, 1);
    atomic_fetch_add(&g->done, 1);
}

/* n pool subscriptions on a fresh topic, every Subscribe change handled (so that the
 * callbacks counted afterwards are the gated ones), then a pause: the payload then meets
 * an idle pool, as any burst after a quiet period does, and the pool must start workers
 * up to max, not only wake the ones it has (no speed is measured: the pause only makes
 * that case the usual one) */
static void gang_start(gang_t *g, const char *name, int n) {
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->gate_mu, NULL);
    pthread_cond_init(&g->gate_cv, NULL);
    pthread_mutex_init(&g->tid_mu, NULL);
    g->n = n;
    g->topic = sb_topic_create(name);
    CHECK(g->topic != NULL);
    g->members = calloc((size_t)n, sizeof *g->members);
    g->subs = calloc((size_t)n, sizeof *g->subs);
    for (int i = 0; i < n; i++) {
        g->members[i].g = g;
        g->subs[i] = sb_subscribe_pool(g->topic, gang_cb, &g->members[i]);
        CHECK(g->subs[i] != NULL);
    }
    /* member i sees the Subscribe changes of members i..n-1 */
    WAIT_UNTIL(atomic_load(&g->changes) == n * (n + 1) / 2);
    tu_sleep_ms(50);
}

/* one payload to every member: each one's callback goes to the gate */
static void gang_publish(gang_t *g) {
    int tag = TAG_GANG;
    sb_message *m = sb_message_create_bytes(ty, &tag, sizeof tag);
    CHECK_EQ_INT(sb_publish(g->topic, m), g->n);
    sb_message_unref(m);
}

static void gang_open(gang_t *g) {
    pthread_mutex_lock(&g->gate_mu);
    g->gate_open = 1;
    pthread_cond_broadcast(&g->gate_cv);
    pthread_mutex_unlock(&g->gate_mu);
}

/* opens the gate (in case a check failed before), unsubscribes and frees */
static void gang_stop(gang_t *g) {
    gang_open(g);
    int not_once = 0;
    for (int i = 0; i < g->n; i++) {
        if (g->subs[i] != NULL)
            sb_unsubscribe_and_join(g->subs[i]);
        if (atomic_load(&g->members[i].payloads) != 1)
            not_once++;
    }
    CHECK_EQ_INT(not_once, 0); /* every member got the one payload, once */
    CHECK_EQ_INT(atomic_load(&g->gate_timeouts), 0);
    sb_topic_unref(g->topic);
    free(g->members);
    free(g->subs);
    pthread_mutex_destroy(&g->gate_mu);
    pthread_cond_destroy(&g->gate_cv);
    pthread_mutex_destroy(&g->tid_mu);
}

/* "exactly `max` inside at once": the gang fills the pool up to max, then no further
 * callback starts while those hold their workers (sampled for a while: a negative check
 * cannot be bounded) */
static void gang_check_full(gang_t *g, int max) {
    WAIT_UNTIL(atomic_load(&g->inside) >= max);
    if (!tu_last_wait_ok() || atomic_load(&g->inside) != max)
        printf("  %s: %d of %d callbacks inside at once, %d pool threads\n",
               sb_topic_name(g->topic), atomic_load(&g->inside), max, pool_threads());
    CHECK_STAYS(atomic_load(&g->inside) == max && atomic_load(&g->entered) == max, 200);
    CHECK_EQ_INT(atomic_load(&g->max_inside), max);
    CHECK_EQ_INT(atomic_load(&g->entered), max);
    CHECK_EQ_INT(atomic_load(&g->done), 0);
}

/* ---- 1: the default maximum, before anything configured the pool ---- */

/* "The number of CPUs" as the library counts them: the CPUs this process may run on
 * (affinity), capped by a cgroup v2 CPU quota when there is one (as in a container). */
static int usable_cpus(void) {
    cpu_set_t set;
    int n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                       : (int)sysconf(_SC_NPROCESSORS_ONLN);
    FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r");
    if (f) {
        long quota = 0, period = 0;
        if (fscanf(f, "%ld %ld", &quota, &period) == 2 && quota > 0 && period > 0) {
            long q = quota / period > 0 ? quota / period : 1;
            if (q < n)
                n = (int)q;
        }
        fclose(f);
    }
    return n;
}

static void test_default_max(void) {
    printf("test_default_max\n");
    int cpus = usable_cpus();
    int n = cpus > 2 ? cpus : 2;
    gang_t g;
    gang_start(&g, "pl.default", n + 1);
    atomic_store(&g.record_tids, 1);
    gang_publish(&g);
    gang_check_full(&g, n); /* the (N+1)th waits for a worker */
    int tids = gang_ntids(&g);
    CHECK_EQ_INT(tids, n); /* N blocked callbacks: N distinct workers, no other ran one */
    int threads = pool_threads();
    atomic_store(&g.record_tids, 0);

    gang_open(&g);
    WAIT_UNTIL(atomic_load(&g.done) == n + 1); /* the last one ran on a freed worker */
    CHECK_EQ_INT(atomic_load(&g.inside), 0);
    CHECK_EQ_INT(atomic_load(&g.max_inside), n); /* still never more than N */
    printf("  N = %d: %d inside at once, %d threads ran callbacks, %d pool threads\n", n,
           atomic_load(&g.max_inside), tids, threads);
    gang_stop(&g);
}

/* ---- 2: stand-ins for workers blocked in a library join ---- */

static void test_stand_ins(void) {
    printf("test_stand_ins\n");
    CHECK_EQ_INT(sb_pool_configure(FILE_MIN, FILE_MAX, FILE_IDLE_MS), SB_OK);
    sb_topic *td = sb_topic_create("pl.d");
    sb_topic *tj = sb_topic_create("pl.j");
    sb_topic *tp = sb_topic_create("pl.p");

    sb_subscription *d = sb_subscribe(td, d_cb, NULL);
    d_keep = sb_subscription_ref(d);
    publish_tag(td, TAG_BLOCK);
    WAIT_UNTIL(atomic_load(&d_blocked));
    sb_unsubscribe(d); /* the final message waits behind the gate */

    sb_subscription *j1 = sb_subscribe_pool(tj, joiner_cb, NULL);
    sb_subscription *j2 = sb_subscribe_pool(tj, joiner_cb, NULL);
    sb_subscription *p = sb_subscribe_pool(tp, plain_cb, NULL);
    publish_tag(tj, TAG_JOIN);
    WAIT_UNTIL(atomic_load(&joins_started) == 2); /* both workers blocked in a join */

    for (int i = 0; i < NPLAIN; i++)
        publish_tag(tp, TAG_PLAIN);
    WAIT_UNTIL(atomic_load(&plain_seen) == NPLAIN); /* stand-ins ran P meanwhile */
    CHECK_EQ_INT(atomic_load(&joins_done), 0);
    int during = pool_threads();
    CHECK(during >= 3); /* two blocked workers and at least one stand-in */

    pthread_mutex_lock(&mu);
    gate_open_flag = 1;
    pthread_mutex_unlock(&mu);
    WAIT_UNTIL(atomic_load(&joins_done) == 2);
    /* well before the 60 s idle timeout: surplus workers retire at once */
    WAIT_UNTIL(pool_threads() <= 2);
    printf("  pool threads: %d while two workers were blocked, %d after\n", during,
           pool_threads());

    sb_unsubscribe_and_join(j1);
    sb_unsubscribe_and_join(j2);
    sb_unsubscribe_and_join(p);
    sb_subscription_unref(d_keep);
    sb_topic_unref(td);
    sb_topic_unref(tj);
    sb_topic_unref(tp);
}

/* ---- 3: a configured maximum ---- */

#define MAXTEST_SUBS 20

static void test_max_threads(void) {
    printf("test_max_threads\n");
    CHECK_EQ_INT(sb_pool_configure(1, 2, 60000), SB_OK);
    gang_t g;
    gang_start(&g, "pl.max", MAXTEST_SUBS);
    atomic_store(&g.record_tids, 1);
    gang_publish(&g);
    gang_check_full(&g, 2);
    /* the two blocked callbacks hold two workers, and no third worker ran anything */
    CHECK_EQ_INT(gang_ntids(&g), 2);
    atomic_store(&g.record_tids, 0);

    gang_open(&g);
    WAIT_UNTIL(atomic_load(&g.done) == MAXTEST_SUBS);
    CHECK_EQ_INT(atomic_load(&g.inside), 0);
    CHECK_EQ_INT(atomic_load(&g.max_inside), 2); /* also while the other 18 went through */
    gang_stop(&g);
    CHECK_EQ_INT(sb_pool_configure(FILE_MIN, FILE_MAX, FILE_IDLE_MS), SB_OK);
}

/* ---- 4: the idle timeout ---- */

/* four gated callbacks: four workers busy at once, then released and finished; with
 * from_min, the burst comes only once the pool has shrunk back to one worker */
static void busy_four(const char *name, int from_min) {
    gang_t g;
    gang_start(&g, name, 4);
    if (from_min)
        WAIT_UNTIL(pool_threads() <= 1);
    gang_publish(&g);
    gang_check_full(&g, 4);
    CHECK(pool_threads() >= 4);
    gang_open(&g);
    WAIT_UNTIL(atomic_load(&g.done) == 4);
    gang_stop(&g);
}

static void test_idle_timeout(void) {
    printf("test_idle_timeout\n");
    /* a long timeout first: the four idle workers stay (so that the shrinking below is
     * the timeout's doing, not workers retiring as soon as they are idle) */
    CHECK_EQ_INT(sb_pool_configure(1, 4, 60000), SB_OK);
    busy_four("pl.idle.long", 0);
    CHECK_STAYS(pool_threads() >= 4, 200);

    /* 50 ms: once idle, the workers above min_threads retire; the last one stays however
     * often its idle timeout expires */
    CHECK_EQ_INT(sb_pool_configure(1, 4, 50), SB_OK);
    busy_four("pl.idle.short", 0);
    WAIT_UNTIL(pool_threads() <= 1);
    CHECK_STAYS(pool_threads() == 1, 200);
    printf("  pool threads after 50 ms idle: %d\n", pool_threads());

    /* and a pool shrunk to its minimum grows back to max for the next burst (one worker
     * asleep, four subscriptions runnable at once) */
    busy_four("pl.idle.again", 1);
    CHECK_EQ_INT(sb_pool_configure(FILE_MIN, FILE_MAX, FILE_IDLE_MS), SB_OK);
}

/* ---- 5: raising max_threads takes effect at once ---- */

/* max 1, three gated callbacks: one runs, two wait in the run queue; raising the maximum
 * to 3 must give those two workers now, not when the running callback returns (it never
 * would here: the gate stays closed until all three are inside) */
static void test_raise_max(void) {
    printf("test_raise_max\n");
    CHECK_EQ_INT(sb_pool_configure(1, 1, 60000), SB_OK);
    gang_t g;
    gang_start(&g, "pl.raise", 3);
    gang_publish(&g);
    gang_check_full(&g, 1);
    CHECK_EQ_INT(sb_pool_configure(1, 3, 60000), SB_OK);
    WAIT_UNTIL(atomic_load(&g.inside) == 3);
    gang_open(&g);
    WAIT_UNTIL(atomic_load(&g.done) == 3);
    gang_stop(&g);
    CHECK_EQ_INT(sb_pool_configure(FILE_MIN, FILE_MAX, FILE_IDLE_MS), SB_OK);
}

/* ---- 6: stand-ins for blocked workers are bounded ---- */

/* Pool callbacks that block in a library wait (sb_publish_sync to a dedicated
 * subscription held at a gate) each get a stand-in worker, but not without bound: with
 * max_threads 2 the pool stops at 2 + 64 workers (the bound is max(64, 8 x max)), the
 * rest of the burst waits in the run queue, and everything completes once the consumer
 * moves again. */
#define SI_SUBS 80
#define SI_LIMIT (2 + 64)
static sb_subscription *si_target;
static atomic_int si_inside, si_done;
static pthread_mutex_t si_mu = PTHREAD_MUTEX_INITIALIZER;
static int si_open;

static void si_target_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) != TAG_GANG)
        return;
    double end = tu_now_s() + 3 * tu_wait_seconds();
    pthread_mutex_lock(&si_mu);
    while (!si_open && tu_now_s() < end) {
        pthread_mutex_unlock(&si_mu);
        tu_sleep_ms(2);
        pthread_mutex_lock(&si_mu);
    }
    pthread_mutex_unlock(&si_mu);
}

static void si_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) != TAG_GANG)
        return;
    atomic_fetch_add(&si_inside, 1);
    int tag = TAG_GANG;
    sb_message *m = sb_message_create_bytes(ty, &tag, sizeof tag);
    sb_publish_sync(si_target, m); /* blocks in the library until the target handled it */
    sb_message_unref(m);
    atomic_fetch_add(&si_done, 1);
}

static void test_stand_in_bound(void) {
    printf("test_stand_in_bound\n");
    CHECK_EQ_INT(sb_pool_configure(1, 2, 60000), SB_OK);
    sb_topic *tt = sb_topic_create("pl.si.target");
    sb_topic *ts = sb_topic_create("pl.si");
    si_target = sb_subscribe(tt, si_target_cb, NULL);
    sb_subscription *subs[SI_SUBS];
    for (int i = 0; i < SI_SUBS; i++)
        subs[i] = sb_subscribe_pool(ts, si_cb, NULL);
    tu_sleep_ms(50); /* the Subscribe messages handled */
    int tag = TAG_GANG;
    sb_message *m = sb_message_create_bytes(ty, &tag, sizeof tag);
    CHECK_EQ_INT(sb_publish(ts, m), SI_SUBS);
    sb_message_unref(m);
    /* every worker ends up blocked: the two, then each stand-in, up to the bound */
    WAIT_UNTIL(atomic_load(&si_inside) >= SI_LIMIT);
    CHECK_STAYS(atomic_load(&si_inside) == SI_LIMIT, 200);
    CHECK(pool_threads() <= SI_LIMIT);
    CHECK_EQ_INT(atomic_load(&si_done), 0);
    printf("  %d callbacks blocked, %d pool threads\n", atomic_load(&si_inside), pool_threads());

    pthread_mutex_lock(&si_mu);
    si_open = 1;
    pthread_mutex_unlock(&si_mu);
    WAIT_UNTIL(atomic_load(&si_done) == SI_SUBS);
    for (int i = 0; i < SI_SUBS; i++)
        CHECK(sb_unsubscribe_and_join(subs[i]) == NULL);
    CHECK(sb_unsubscribe_and_join(si_target) == NULL);
    sb_topic_unref(tt);
    sb_topic_unref(ts);
    /* the stand-ins retire at their next turn: back to at most max_threads */
    WAIT_UNTIL(pool_threads() <= 2);
    CHECK_EQ_INT(sb_pool_configure(FILE_MIN, FILE_MAX, FILE_IDLE_MS), SB_OK);
}

int main(void) {
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("pl.tag", NULL, &ty), SB_OK);
    test_default_max(); /* first: nothing may call sb_pool_configure before it */
    test_stand_ins();
    test_max_threads();
    test_idle_timeout();
    test_raise_max();
    test_stand_in_bound();
    sb_message_type_unref(ty);
    return TEST_DONE();
}
