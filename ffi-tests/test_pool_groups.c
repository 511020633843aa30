/*
 * test_pool_groups.c - worker groups (API.md "Worker groups and timed publishing"):
 * sb_pool_create / get / reconfigure / ref / unref, sb_subscribe_pool_in,
 * sb_router_create_in, sb_pool_submit.
 *
 *  - test_bad_input: NULL / empty names, bad limits, NULL or dead handles, NULL
 *    functions give NULL or SB_E_INVAL (and a last error), and nothing runs.
 *  - test_names: creating a name that exists returns that group (same handle), other
 *    limits give SB_E_INVAL; reconfigure changes what "the same limits" are; "default"
 *    is the shared pool (sb_pool_configure's limits); once the last use is gone the name
 *    is free again (another group with other limits can take it).
 *  - test_isolation: every worker of group "gSlow" is held in its callbacks (by a gate,
 *    as a slow callback would hold it); meanwhile a subscription of group "gFast" and
 *    one of the shared pool get every message, before the gate opens.
 *  - test_lifetime: a group lives while a reference, a subscription (until its final
 *    message was handled) or a queued task uses it; its threads ("sb-grp-<name>") exit
 *    once nothing does, and sb_pool_get no longer finds it.
 *  - test_tasks_once: 4 threads submit 2,000 tasks each; every task runs exactly once,
 *    on a worker of its group.
 *  - test_nested_submit: a task submits the next (a chain), a callback submits a task,
 *    and a task submits to another group.
 *  - test_cross_group_join: callbacks in group "gA" (one worker) join / unsubscribe and
 *    join subscriptions of group "gB" and of the shared pool; a task of a one-worker
 *    group joins a subscription of its own group (the blocked worker gets a stand-in).
 *  - test_ordering: one subscription in a four-worker group, four publishers: its
 *    callbacks never overlap, and each publisher's messages arrive in order.
 *  - test_router: a router in a group routes by type on the group's workers.
 *  - test_stats: sb_stats_json / sb_stats_prometheus list each group by name.
 *  - test_fork (last): with a group alive (a subscription in it), the process forks;
 *    the child's deliveries and tasks run on new workers of the same group.
 */
#define _GNU_SOURCE
#include "recorder.h"

#include <dirent.h>
#include <sys/types.h>
#include <sys/wait.h>

static sb_message_type *ptype;

/* ---- helpers ---- */

/* The calling thread's name starts with `prefix`. */
static int on_thread_named(const char *prefix)
{
    char name[32] = "";
    pthread_getname_np(pthread_self(), name, sizeof name);
    return strncmp(name, prefix, strlen(prefix)) == 0;
}

static int group_exists(const char *name)
{
    sb_pool *p = sb_pool_get(name);
    if (p == NULL)
        return 0;
    sb_pool_unref(p);
    return 1;
}

/* A gate callbacks and tasks wait at until it opens. */
typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
    atomic_int waiting;
} gate;

static void gate_init(gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->open = 0;
    atomic_init(&g->waiting, 0);
}

static void gate_pass(gate *g)
{
    atomic_fetch_add(&g->waiting, 1);
    pthread_mutex_lock(&g->mu);
    while (!g->open)
        pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    atomic_fetch_sub(&g->waiting, 1);
}

static void gate_open(gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void gate_destroy(gate *g)
{
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

static void count_task(void *data) { atomic_fetch_add((atomic_int *)data, 1); }

/* ---- bad input ---- */

static void test_bad_input(void)
{
    atomic_int ran;
    atomic_init(&ran, 0);
    CHECK(sb_pool_create(NULL, 1, 2, 1000) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_ERR();
    CHECK(sb_pool_create("", 1, 2, 1000) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_pool_create("gBad", 1, 0, 1000) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_pool_create("gBad", 3, 2, 1000) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(!group_exists("gBad"));

    CHECK(sb_pool_get(NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_pool_get("gNone") == NULL);
    CHECK_ERR();

    CHECK_EQ_INT(sb_pool_reconfigure(NULL, 1, 2, 10), SB_E_INVAL);
    CHECK(sb_pool_ref(NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    sb_pool_unref(NULL);
    CHECK_EQ_INT(sb_pool_submit(NULL, count_task, &ran), SB_E_INVAL);

    sb_pool *p = sb_pool_create("gBad", 1, 2, 1000);
    CHECK(p != NULL);
    /* bad limits leave the group's as they were */
    CHECK_EQ_INT(sb_pool_reconfigure(p, 1, 0, 10), SB_E_INVAL);
    CHECK_EQ_INT(sb_pool_reconfigure(p, 5, 4, 10), SB_E_INVAL);
    sb_pool *same = sb_pool_create("gBad", 1, 2, 1000);
    CHECK(same == p);
    sb_pool_unref(same);
    CHECK_EQ_INT(sb_pool_submit(p, NULL, &ran), SB_E_INVAL);

    sb_topic *t = sb_topic_create("groups.bad");
    CHECK(sb_subscribe_pool_in(t, NULL, recorder_cb, NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_subscribe_pool_in(NULL, p, recorder_cb, NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_subscribe_pool_in(t, p, NULL, NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_router_create_in(t, NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_router_create_in(NULL, p) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    /* a handle of another type is refused, not used */
    CHECK_EQ_INT(sb_pool_submit((sb_pool *)t, count_task, &ran), SB_E_INVAL);
    CHECK(sb_subscribe_pool_in(t, (sb_pool *)t, recorder_cb, NULL) == NULL);
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);

    sb_pool_unref(p);
    CHECK(!group_exists("gBad"));
    sb_topic_unref(t);
    CHECK_STAYS(atomic_load(&ran) == 0, 20);
    CHECK_TOPIC_GONE("groups.bad");
}

/* ---- names ---- */

static void test_names(void)
{
    sb_pool *a = sb_pool_create("gName", 1, 2, 1000);
    CHECK(a != NULL);
    sb_pool *b = sb_pool_create("gName", 1, 2, 1000);
    CHECK(b == a);
    CHECK(sb_pool_create("gName", 1, 3, 1000) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_pool_create("gName", 1, 2, 999) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    sb_pool *c = sb_pool_get("gName");
    CHECK(c == a);
    CHECK(sb_pool_ref(a) == a);

    /* reconfigured: the new limits are the group's */
    CHECK_EQ_INT(sb_pool_reconfigure(a, 2, 3, 500), SB_OK);
    CHECK(sb_pool_create("gName", 1, 2, 1000) == NULL);
    sb_pool *d = sb_pool_create("gName", 2, 3, 500);
    CHECK(d == a);

    /* four references (a, b, c, the sb_pool_ref) and d: the group lives until the last */
    sb_pool_unref(a);
    sb_pool_unref(b);
    sb_pool_unref(c);
    sb_pool_unref(d);
    CHECK(group_exists("gName"));
    sb_pool_unref(a);
    CHECK(!group_exists("gName"));
    /* the name is free: a new group with other limits */
    sb_pool *e = sb_pool_create("gName", 1, 1, 100);
    CHECK(e != NULL);
    sb_pool_unref(e);
    CHECK(!group_exists("gName"));

    /* "default" is the shared pool */
    CHECK_EQ_INT(sb_pool_configure(1, 4, 20000), SB_OK);
    sb_pool *def = sb_pool_get("default");
    CHECK(def != NULL);
    sb_pool *def2 = sb_pool_create("default", 1, 4, 20000);
    CHECK(def2 == def);
    CHECK(sb_pool_create("default", 1, 3, 20000) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    /* reconfiguring it is sb_pool_configure */
    CHECK_EQ_INT(sb_pool_reconfigure(def, 1, 3, 20000), SB_OK);
    sb_pool *def3 = sb_pool_create("default", 1, 3, 20000);
    CHECK(def3 == def);
    CHECK_EQ_INT(sb_pool_configure(1, 4, 20000), SB_OK);
    sb_pool_unref(def3);
    sb_pool_unref(def2);
    sb_pool_unref(def);
    /* the shared pool never ends */
    CHECK(group_exists("default"));
}

/* ---- isolation ---- */

static gate slow_gate;

static void slow_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_fetch_add((atomic_int *)data, 1);
    gate_pass(&slow_gate);
}

static void test_isolation(void)
{
    gate_init(&slow_gate);
    sb_pool *slow = sb_pool_create("gSlow", 1, 2, 60000);
    sb_pool *fast = sb_pool_create("gFast", 1, 2, 60000);
    CHECK(slow != NULL && fast != NULL);
    sb_topic *t = sb_topic_create("groups.iso");
    /* three slow subscriptions for two workers: both held, one waiting */
    atomic_int slow_calls[3];
    sb_subscription *ss[3];
    for (int i = 0; i < 3; i++) {
        atomic_init(&slow_calls[i], 0);
        ss[i] = sb_subscribe_pool_in(t, slow, slow_cb, &slow_calls[i]);
        CHECK(ss[i] != NULL);
    }
    recorder fr, dr;
    recorder_init(&fr, ptype, t);
    recorder_init(&dr, ptype, t);
    sb_subscription *fs = sb_subscribe_pool_in(t, fast, recorder_cb, &fr);
    sb_subscription *ds = sb_subscribe_pool(t, recorder_cb, &dr);
    CHECK(fs != NULL && ds != NULL);

    const int n = tu_scale(500, 50);
    for (int i = 0; i < n; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 5);
    /* the slow group's two workers are stuck in callbacks ... */
    WAIT_UNTIL(atomic_load(&slow_gate.waiting) == 2);
    /* ... and the other groups deliver everything meanwhile */
    WAIT_UNTIL(atomic_load(&fr.payloads) == n);
    WAIT_UNTIL(atomic_load(&dr.payloads) == n);
    CHECK_EQ_INT(atomic_load(&slow_gate.waiting), 2);
    CHECK(slow_gate.open == 0);

    gate_open(&slow_gate);
    for (int i = 0; i < 3; i++)
        CHECK(sb_unsubscribe_and_join(ss[i]) == NULL);
    CHECK(sb_unsubscribe_and_join(fs) == NULL);
    CHECK(sb_unsubscribe_and_join(ds) == NULL);
    for (int i = 0; i < 3; i++)
        CHECK_EQ_INT(atomic_load(&slow_calls[i]), n);
    CHECK_RECORDER_LIFECYCLE(&fr);
    CHECK_RECORDER_LIFECYCLE(&dr);
    CHECK_RECORDER_THREADS(&fr, KIND_POOL);
    recorder_destroy(&fr);
    recorder_destroy(&dr);
    sb_pool_unref(slow);
    sb_pool_unref(fast);
    sb_topic_unref(t);
    WAIT_UNTIL(tu_threads_named("sb-grp-gSlow") == 0);
    WAIT_UNTIL(tu_threads_named("sb-grp-gFast") == 0);
    gate_destroy(&slow_gate);
    CHECK_TOPIC_GONE("groups.iso");
}

/* ---- lifetime ---- */

static void on_group_thread_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    (void)msg;
    if (!on_thread_named("sb-grp-gLife"))
        atomic_fetch_add((atomic_int *)data, 1000000);
    atomic_fetch_add((atomic_int *)data, 1);
}

static gate task_gate;

static void gated_task(void *data)
{
    gate_pass(&task_gate);
    atomic_fetch_add((atomic_int *)data, 1);
}

static void test_lifetime(void)
{
    if (tu_threads_named("sb") < 0) {
        printf("note: /proc/self/task unavailable, thread checks skipped\n");
        return;
    }
    /* a reference keeps it: min 2 workers, long idle timeout, so they would stay */
    sb_pool *p = sb_pool_create("gLife", 2, 2, 60000);
    CHECK(p != NULL);
    CHECK_EQ_INT(tu_threads_named("sb-grp-gLife"), 0); /* workers start as work arrives */
    sb_topic *t = sb_topic_create("groups.life");
    atomic_int calls;
    atomic_init(&calls, 0);
    sb_subscription *s = sb_subscribe_pool_in(t, p, on_group_thread_cb, &calls);
    CHECK(s != NULL);
    WAIT_UNTIL(atomic_load(&calls) == 1); /* its Subscribe, on a worker of the group */
    CHECK(tu_threads_named("sb-grp-gLife") >= 1);

    /* a subscription keeps it after the last reference went */
    sb_pool_unref(p);
    CHECK(group_exists("gLife"));
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
    WAIT_UNTIL(atomic_load(&calls) == 2);
    CHECK(tu_threads_named("sb-grp-gLife") >= 1);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_EQ_INT(atomic_load(&calls), 3);
    /* the final message handled, nothing uses it: gone, and so are its threads */
    CHECK(!group_exists("gLife"));
    WAIT_UNTIL(tu_threads_named("sb-grp-gLife") == 0);

    /* queued tasks keep it */
    gate_init(&task_gate);
    atomic_int ran;
    atomic_init(&ran, 0);
    p = sb_pool_create("gLife", 1, 1, 60000);
    CHECK(p != NULL);
    CHECK_EQ_INT(sb_pool_submit(p, gated_task, &ran), SB_OK);
    CHECK_EQ_INT(sb_pool_submit(p, gated_task, &ran), SB_OK);
    WAIT_UNTIL(atomic_load(&task_gate.waiting) == 1); /* one worker: the other queued */
    sb_pool_unref(p);
    CHECK(group_exists("gLife"));
    CHECK_STAYS(tu_threads_named("sb-grp-gLife") == 1, 50);
    gate_open(&task_gate);
    WAIT_UNTIL(atomic_load(&ran) == 2);
    WAIT_UNTIL(!group_exists("gLife"));
    WAIT_UNTIL(tu_threads_named("sb-grp-gLife") == 0);
    CHECK_STAYS(atomic_load(&ran) == 2, 20);
    gate_destroy(&task_gate);

    sb_topic_unref(t);
    CHECK_TOPIC_GONE("groups.life");
}

/* ---- tasks ---- */

#define SUBMITTERS 4

typedef struct task_slot {
    atomic_int runs;
    atomic_int wrong_thread;
} task_slot;

static task_slot *slots;
static int tasks_per_thread;
static sb_pool *task_pool;
static atomic_int submit_failures;

static void slot_task(void *data)
{
    task_slot *s = data;
    if (!on_thread_named("sb-grp-gTask"))
        atomic_fetch_add(&s->wrong_thread, 1);
    atomic_fetch_add(&s->runs, 1);
}

static void *submitter(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (int i = 0; i < tasks_per_thread; i++)
        if (sb_pool_submit(task_pool, slot_task, &slots[id * tasks_per_thread + i]) != SB_OK)
            atomic_fetch_add(&submit_failures, 1);
    return NULL;
}

static void test_tasks_once(void)
{
    tasks_per_thread = tu_scale(2000, 200);
    int total = SUBMITTERS * tasks_per_thread;
    slots = calloc((size_t)total, sizeof *slots);
    atomic_init(&submit_failures, 0);
    task_pool = sb_pool_create("gTask", 1, 3, 60000);
    CHECK(task_pool != NULL);
    pthread_t th[SUBMITTERS];
    for (int i = 0; i < SUBMITTERS; i++)
        pthread_create(&th[i], NULL, submitter, (void *)(intptr_t)i);
    for (int i = 0; i < SUBMITTERS; i++)
        pthread_join(th[i], NULL);
    CHECK_EQ_INT(atomic_load(&submit_failures), 0);
    /* the caller's reference goes while tasks may still be queued: they run anyway */
    sb_pool_unref(task_pool);
    WAIT_UNTIL(!group_exists("gTask"));
    int once = 0, wrong = 0;
    for (int i = 0; i < total; i++) {
        once += atomic_load(&slots[i].runs) == 1;
        wrong += atomic_load(&slots[i].wrong_thread);
    }
    CHECK_EQ_INT(once, total);
    CHECK_EQ_INT(wrong, 0);
    WAIT_UNTIL(tu_threads_named("sb-grp-gTask") == 0);
    free(slots);
}

/* ---- submit from tasks and callbacks ---- */

typedef struct chain {
    sb_pool *pool;  /* own reference */
    sb_pool *other; /* own reference */
    atomic_int links;
    atomic_int other_ran;
    int length;
} chain;

static void other_task(void *data)
{
    chain *c = data;
    if (on_thread_named("sb-grp-gOther"))
        atomic_fetch_add(&c->other_ran, 1);
}

static void chain_task(void *data)
{
    chain *c = data;
    int n = atomic_fetch_add(&c->links, 1) + 1;
    if (n < c->length) {
        CHECK_EQ_INT(sb_pool_submit(c->pool, chain_task, c), SB_OK);
    } else {
        CHECK_EQ_INT(sb_pool_submit(c->other, other_task, c), SB_OK);
    }
}

static void submitting_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    chain *c = data;
    if (sb_message_get_type(msg) == ptype)
        CHECK_EQ_INT(sb_pool_submit(c->pool, chain_task, c), SB_OK);
}

static void test_nested_submit(void)
{
    chain c;
    c.pool = sb_pool_create("gChain", 1, 1, 60000);
    c.other = sb_pool_create("gOther", 1, 1, 60000);
    atomic_init(&c.links, 0);
    atomic_init(&c.other_ran, 0);
    c.length = tu_scale(200, 50);
    CHECK(c.pool != NULL && c.other != NULL);

    /* a task submits the next one, the last one submits to another group */
    CHECK_EQ_INT(sb_pool_submit(c.pool, chain_task, &c), SB_OK);
    WAIT_UNTIL(atomic_load(&c.other_ran) == 1);
    CHECK_EQ_INT(atomic_load(&c.links), c.length);

    /* a callback (of the chain's own group) starts a chain */
    atomic_store(&c.links, 0);
    sb_topic *t = sb_topic_create("groups.nested");
    sb_subscription *s = sb_subscribe_pool_in(t, c.pool, submitting_cb, &c);
    CHECK(s != NULL);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
    WAIT_UNTIL(atomic_load(&c.other_ran) == 2);
    CHECK_EQ_INT(atomic_load(&c.links), c.length);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    sb_topic_unref(t);
    sb_pool_unref(c.pool);
    sb_pool_unref(c.other);
    WAIT_UNTIL(!group_exists("gChain") && !group_exists("gOther"));
    WAIT_UNTIL(tu_threads_named("sb-grp-gChain") == 0);
    WAIT_UNTIL(tu_threads_named("sb-grp-gOther") == 0);
    CHECK_TOPIC_GONE("groups.nested");
}

/* ---- joins across groups ---- */

typedef struct joiner {
    sb_subscription *target; /* own reference, handed to the callback */
    int how;                 /* 0: join, 1: unsubscribe and join */
    atomic_int result;       /* SB_OK once joined; 1 until then */
    atomic_int target_done;  /* sb_subscription_is_done(target) right after */
} joiner;

static void joining_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    joiner *j = data;
    if (sb_message_get_type(msg) != ptype)
        return;
    if (j->how == 0) {
        int rc = sb_subscription_join(j->target);
        atomic_store(&j->target_done, sb_subscription_is_done(j->target));
        sb_subscription_unref(j->target);
        atomic_store(&j->result, rc);
    } else {
        sb_subscription *keep = sb_subscription_ref(j->target);
        sb_unsubscribe_and_join(j->target);
        atomic_store(&j->target_done, sb_subscription_is_done(keep));
        sb_subscription_unref(keep);
        atomic_store(&j->result, SB_OK);
    }
}

static void noop_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

typedef struct self_join {
    sb_subscription *target;
    atomic_int result;
} self_join;

static void self_join_task(void *data)
{
    self_join *sj = data;
    atomic_store(&sj->result, sb_unsubscribe_and_join(sj->target) == NULL ? SB_OK : -1);
}

static void test_cross_group_join(void)
{
    sb_pool *a = sb_pool_create("gA", 1, 1, 60000);
    sb_pool *b = sb_pool_create("gB", 1, 1, 60000);
    sb_topic *t = sb_topic_create("groups.join");
    sb_topic *tb = sb_topic_create("groups.join.b");
    for (int how = 0; how < 2; how++) {
        for (int target_group = 0; target_group < 2; target_group++) {
            joiner j;
            j.how = how;
            atomic_init(&j.result, 1);
            atomic_init(&j.target_done, 0);
            sb_subscription *target = target_group == 0
                                          ? sb_subscribe_pool_in(tb, b, noop_cb, NULL)
                                          : sb_subscribe_pool(tb, noop_cb, NULL);
            CHECK(target != NULL);
            if (how == 0) {
                /* join waits for an unsubscribe made elsewhere */
                j.target = sb_subscription_ref(target);
            } else {
                j.target = target;
            }
            sb_subscription *s = sb_subscribe_pool_in(t, a, joining_cb, &j);
            CHECK(s != NULL);
            CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
            if (how == 0)
                CHECK(sb_unsubscribe(target) == NULL);
            WAIT_UNTIL(atomic_load(&j.result) != 1);
            CHECK_EQ_INT(atomic_load(&j.result), SB_OK);
            CHECK_EQ_INT(atomic_load(&j.target_done), 1);
            CHECK(sb_unsubscribe_and_join(s) == NULL);
        }
    }

    /* a task of a one-worker group joins a subscription of that group */
    sb_pool *one = sb_pool_create("gOne", 1, 1, 60000);
    self_join sj;
    atomic_init(&sj.result, 1);
    recorder r;
    recorder_init(&r, ptype, tb);
    sj.target = sb_subscribe_pool_in(tb, one, recorder_cb, &r);
    CHECK(sj.target != NULL);
    CHECK_EQ_INT(sb_pool_submit(one, self_join_task, &sj), SB_OK);
    WAIT_UNTIL(atomic_load(&sj.result) != 1);
    CHECK_EQ_INT(atomic_load(&sj.result), SB_OK);
    CHECK_EQ_INT(atomic_load(&r.finished), 1);
    CHECK_RECORDER_LIFECYCLE(&r);
    recorder_destroy(&r);

    sb_pool_unref(one);
    sb_pool_unref(a);
    sb_pool_unref(b);
    sb_topic_unref(t);
    sb_topic_unref(tb);
    WAIT_UNTIL(tu_threads_named("sb-grp-gA") == 0);
    WAIT_UNTIL(tu_threads_named("sb-grp-gB") == 0);
    WAIT_UNTIL(tu_threads_named("sb-grp-gOne") == 0);
    CHECK_TOPIC_GONE("groups.join");
    CHECK_TOPIC_GONE("groups.join.b");
}

/* ---- ordering and no overlap ---- */

#define PUBLISHERS 4

static sb_topic *order_topic;
static int order_n;

static void *order_publisher(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (int i = 0; i < order_n; i++)
        publish_payload(order_topic, ptype, id, i, 0);
    return NULL;
}

static void test_ordering(void)
{
    sb_pool *p = sb_pool_create("gOrder", 1, 4, 60000);
    order_topic = sb_topic_create("groups.order");
    /* ThreadSanitizer: 40,000 instrumented deliveries with yields are slow on a loaded machine. */
    order_n = tu_tsan() ? 1000 : tu_scale(5000, 300);
    recorder r[2];
    sb_subscription *s[2];
    for (int i = 0; i < 2; i++) {
        recorder_init(&r[i], ptype, order_topic);
        r[i].work_yields = 2;
        s[i] = sb_subscribe_pool_in(order_topic, p, recorder_cb, &r[i]);
        CHECK(s[i] != NULL);
    }
    pthread_t th[PUBLISHERS];
    for (int i = 0; i < PUBLISHERS; i++)
        pthread_create(&th[i], NULL, order_publisher, (void *)(intptr_t)i);
    for (int i = 0; i < PUBLISHERS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++)
        WAIT_UNTIL(atomic_load(&r[i].payloads) == PUBLISHERS * order_n);
    for (int i = 0; i < 2; i++) {
        CHECK(sb_unsubscribe_and_join(s[i]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&r[i]);
        for (int k = 0; k < PUBLISHERS; k++)
            CHECK_EQ_INT(r[i].last_seq[k], order_n - 1);
        recorder_destroy(&r[i]);
    }
    sb_pool_unref(p);
    sb_topic_unref(order_topic);
    WAIT_UNTIL(tu_threads_named("sb-grp-gOrder") == 0);
    CHECK_TOPIC_GONE("groups.order");
}

/* ---- routers ---- */

static void route_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    (void)msg;
    atomic_fetch_add((atomic_int *)data, on_thread_named("sb-grp-gRoute") ? 1 : 1000000);
}

static void test_router(void)
{
    sb_pool *p = sb_pool_create("gRoute", 1, 2, 60000);
    sb_topic *t = sb_topic_create("groups.router");
    sb_message_type *other = make_type("groups.other");
    atomic_int routed, defaulted;
    atomic_init(&routed, 0);
    atomic_init(&defaulted, 0);
    sb_router *r = sb_router_create_in(t, p);
    CHECK(r != NULL);
    /* the router keeps the group: our reference may go */
    sb_pool_unref(p);
    CHECK(group_exists("gRoute"));
    CHECK_EQ_INT(sb_router_add(r, ptype, route_cb, &routed), SB_OK);
    CHECK_EQ_INT(sb_router_set_default(r, route_cb, &defaulted), SB_OK);
    const int n = tu_scale(300, 30);
    for (int i = 0; i < n; i++) {
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
        sb_message *m = sb_message_create(other, NULL, NULL);
        CHECK_EQ_INT(sb_publish(t, m), 1);
        sb_message_unref(m);
    }
    WAIT_UNTIL(atomic_load(&routed) == n);
    WAIT_UNTIL(atomic_load(&defaulted) >= n);
    CHECK(sb_router_unsubscribe_and_join(r) == NULL);
    CHECK_EQ_INT(atomic_load(&routed), n);
    CHECK(atomic_load(&defaulted) < 1000000);
    WAIT_UNTIL(!group_exists("gRoute"));
    WAIT_UNTIL(tu_threads_named("sb-grp-gRoute") == 0);
    sb_message_type_unref(other);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE("groups.router");
}

/* ---- statistics ---- */

static void test_stats(void)
{
    sb_pool *p = sb_pool_create("gStats", 1, 3, 60000);
    atomic_int ran;
    atomic_init(&ran, 0);
    CHECK_EQ_INT(sb_pool_submit(p, count_task, &ran), SB_OK);
    char *json = sb_stats_json();
    char *prom = sb_stats_prometheus();
    CHECK(json != NULL && prom != NULL);
    CHECK(strstr(json, "{\"name\":\"default\",") != NULL);
    CHECK(strstr(json, "{\"name\":\"gStats\",\"min_threads\":1,\"max_threads\":3,") != NULL);
    CHECK(strstr(prom, "switchboard_pool_max_threads{pool=\"gStats\"} 3\n") != NULL);
    CHECK(strstr(prom, "switchboard_pool_threads{pool=\"default\"} ") != NULL);
    sb_string_free(json);
    sb_string_free(prom);
    sb_pool_unref(p);
    WAIT_UNTIL(!group_exists("gStats"));
    CHECK_EQ_INT(atomic_load(&ran), 1);
    json = sb_stats_json();
    prom = sb_stats_prometheus();
    CHECK(strstr(json, "gStats") == NULL);
    CHECK(strstr(prom, "gStats") == NULL);
    sb_string_free(json);
    sb_string_free(prom);
    WAIT_UNTIL(tu_threads_named("sb-grp-gStats") == 0);
}

/* ---- fork ---- */

static void test_fork(void)
{
    sb_pool *p = sb_pool_create("gFork", 1, 2, 60000);
    sb_topic *t = sb_topic_create("groups.fork");
    recorder r;
    recorder_init(&r, ptype, t);
    sb_subscription *s = sb_subscribe_pool_in(t, p, recorder_cb, &r);
    CHECK(s != NULL);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
    WAIT_UNTIL(atomic_load(&r.payloads) == 1);
    tu_sleep_ms(100); /* quiescent: the workers parked */

    int fds[2];
    CHECK_EQ_INT(pipe(fds), 0);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        /* the child: the parent's group and subscription work, on new workers */
        alarm(tu_checked() ? 300 : 60);
        close(fds[0]);
        int failed0 = atomic_load(&tu_failed);
        const int n = tu_scale(200, 20);
        for (int i = 1; i <= n; i++)
            CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
        WAIT_UNTIL(atomic_load(&r.payloads) == n + 1);
        atomic_int ran;
        atomic_init(&ran, 0);
        CHECK_EQ_INT(sb_pool_submit(p, count_task, &ran), SB_OK);
        WAIT_UNTIL(atomic_load(&ran) == 1);
        CHECK(tu_threads_named("sb-grp-gFork") >= 1);
        sb_subscription *keep = sb_subscription_ref(s);
        CHECK(sb_unsubscribe(s) == NULL);
        WAIT_UNTIL(sb_subscription_is_done(keep) == 1);
        CHECK_RECORDER_LIFECYCLE(&r);
        sb_subscription_unref(keep);
        sb_pool_unref(p);
        WAIT_UNTIL(tu_threads_named("sb-grp-gFork") == 0);
        char result = atomic_load(&tu_failed) == failed0 ? 'k' : 'f';
        ssize_t w = write(fds[1], &result, 1);
        (void)w;
        if (RUNNING_ON_VALGRIND) {
            /* the parent kills us: a forked child's leak report is an artifact */
            for (;;)
                pause();
        }
        _exit(result == 'k' ? 0 : 1);
    }
    CHECK(pid > 0);
    close(fds[1]);
    char result = 0;
    ssize_t got = read(fds[0], &result, 1);
    close(fds[0]);
    CHECK_EQ_INT(got, 1);
    CHECK_EQ_INT(result, 'k');
    CHECK(tu_reap_reported_child(pid));

    /* the parent's own group is unaffected */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 1, 0), 1);
    WAIT_UNTIL(atomic_load(&r.payloads) == 2);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&r);
    recorder_destroy(&r);
    sb_pool_unref(p);
    sb_topic_unref(t);
    WAIT_UNTIL(tu_threads_named("sb-grp-gFork") == 0);
    CHECK_TOPIC_GONE("groups.fork");
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("groups.payload");
    test_bad_input();
    test_names();
    test_isolation();
    test_lifetime();
    test_tasks_once();
    test_nested_submit();
    test_cross_group_join();
    test_ordering();
    test_router();
    test_stats();
    test_fork();
    sb_message_type_unref(ptype);
    WAIT_UNTIL(atomic_load(&payload_created) == atomic_load(&payload_destroyed));
    CHECK_EQ_INT(tu_threads_named("sb-grp-"), 0);
    return TEST_DONE();
}
