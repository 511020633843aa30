/*
 * test_torture.c - every operation at once, from many threads, for a while.
 *
 * Runs SB_TORTURE_SECONDS seconds (default 20; tests/ffi.rs sets 3 under valgrind).
 * NWORKERS threads pick random operations:
 *   publish (to named topics, created on the fly or looked up, and to topic-pool topics),
 *   publish_sync to a live subscription, subscribe (dedicated / pool / synchronous, some
 *   with a selective filter), unsubscribe, unsubscribe_and_join, topic create/unref, message
 *   type create/unref (shared and transient names, and a declined one), forward create /
 *   cancel (cycles refused), topic pool get / delete / exists, caching topic create /
 *   unsubscribe(_and_join), cache get / get_all / dump / dump_all, cache clears, router
 *   create / unsubscribe(_and_join) and route add / remove (type, cache update, default),
 *   worker groups: pool subscriptions and routers in one of two named groups (created by
 *   name each time and released at once, so a group ends and starts again whenever no
 *   subscription holds it; a short idle timeout churns its threads), tasks submitted to
 *   them (which publish, or submit a follow-up task), lookups, and creates with other
 *   limits (refused while the group lives).
 *   timed publishes (sb_publish_after, due in 0-20 ms or far away) kept in shared slots
 *   that any worker may cancel (the result must be 0 or 1) and release, or (the short
 *   ones) released at once (fire and forget); publishing callbacks schedule short timed
 *   publishes too, and cancel workers' timers.
 * Subscription callbacks have behaviors: plain; publish more (bounded hops), or
 * publish_sync to a random live subscription; unsubscribe themselves (plain or _and_join,
 * which must report SB_E_DEADLOCK); unsubscribe another live subscription;
 * unsubscribe_and_join another (plain) live subscription.
 *
 * Synchronous subscriptions take every behavior and forwards may start at "-cached"
 * topics, so callbacks on different threads publish, publish_sync and unsubscribe into
 * each other in cycles: none of that may deadlock (SB_TORTURE_SYNC_CROSS=0 keeps
 * synchronous subscriptions plain and "-cached" topics unforwarded, the narrower mix).
 *
 * A watchdog thread fails the program ("FAIL watchdog ...", _exit(1)) when a worker (or
 * the teardown, 30 s) makes no progress for 10 s (60 s and 180 s under valgrind).
 *
 * Checked on the way and at the end, for every subscription: no overlapping invocations;
 * its own Subscribe came first; its own Unsubscribe was its final message, once, and
 * nothing came after it; per-publisher order; selective filters respected; payloads
 * well-formed. For routers: routes see only their type, nothing after the router is done.
 * Self-join reports SB_E_DEADLOCK; a join from a callback completes. At the end: every
 * message dtor ran exactly once (created == destroyed), every topic name used left the
 * registry (sb_topic_get returns NULL), every submitted task ran exactly once, and both
 * groups ended (sb_pool_get returns NULL) with their threads.
 *
 * Ballast: the even-numbered topics hold NBALLAST selective pool subscriptions that
 * accept no published type and NBALLAST forwards to topics without subscribers for the
 * whole run, so their subscriber and forward lists stay longer than the length up to
 * which a removal rebuilds a list at once: there, subscriptions and forwards leave by
 * being flagged, under every other operation. (The ballast keeps those topics alive; the
 * odd-numbered ones keep their create/release churn.) Ballast must never see a payload.
 */
#include "test_util.h"

#define NWORKERS 6
#define NTOPICS 8
#define NTYPES 4
#define NTTYPES 3  /* transient type names */
#define NPOOLNAMES 6
#define MAX_LIVE 48
#define NFWD 12
#define NCT 4
#define NROUTER 4
#define HELD_TOPICS 4
#define HELD_TYPES 3
#define NBALLAST 17
#define NGROUPS 2
#define GROUP_TASK_HOPS 3

#define TP_MAGIC 0x54505459u
#define TP_DEAD 0xdeadbeefu

/* ---------------- names ---------------- */

#define NNAMES (2 * NTOPICS + 1 + NPOOLNAMES)
static char names[NNAMES][48]; /* tt.K, tt.K-cached, tt.pooled, tt.pooled/pK */
static char pool_names[NPOOLNAMES][8];

static void init_names(void)
{
    int n = 0;
    for (int i = 0; i < NTOPICS; i++)
        snprintf(names[n++], sizeof names[0], "tt.%d", i);
    for (int i = 0; i < NTOPICS; i++)
        snprintf(names[n++], sizeof names[0], "tt.%d-cached", i);
    snprintf(names[n++], sizeof names[0], "tt.pooled");
    for (int i = 0; i < NPOOLNAMES; i++) {
        snprintf(pool_names[i], sizeof pool_names[0], "p%d", i);
        snprintf(names[n++], sizeof names[0], "tt.pooled/p%d", i);
    }
}

/* ---------------- randomness ---------------- */

static inline unsigned rnd(unsigned *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static _Thread_local unsigned cb_seed; /* callbacks' own generator (per thread) */
static inline unsigned cb_rnd(void)
{
    if (cb_seed == 0)
        cb_seed = (unsigned)(uintptr_t)&cb_seed ^ 0x9e3779b9u;
    return rnd(&cb_seed);
}

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------- payloads ---------------- */

typedef struct tpay {
    unsigned magic;
    int worker; /* publishing worker, or -1 for callback publishes */
    int seq;    /* per worker, increasing */
    int hop;    /* 0: published by a worker; >0: by a callback */
    char id[8]; /* cache id */
} tpay;

static atomic_long pay_created, pay_destroyed, pay_double_dtor;
static sb_message_type *ptypes[NTYPES];
static char tnames[NTTYPES][32];

static void tpay_dtor(void *p)
{
    tpay *t = p;
    if (t->magic != TP_MAGIC)
        atomic_fetch_add(&pay_double_dtor, 1);
    t->magic = TP_DEAD;
    atomic_fetch_add(&pay_destroyed, 1);
    free(t);
}

static sb_message *make_pay(sb_message_type *type, int worker, int seq, int hop)
{
    tpay *t = malloc(sizeof *t);
    if (t == NULL)
        return NULL;
    t->magic = TP_MAGIC;
    t->worker = worker;
    t->seq = seq;
    t->hop = hop;
    snprintf(t->id, sizeof t->id, "k%d", (seq < 0 ? -seq : seq) % 5);
    sb_message *m = sb_message_create(type, t, tpay_dtor);
    if (m == NULL) {
        free(t);
        return NULL;
    }
    atomic_fetch_add(&pay_created, 1);
    return m;
}

/* a message that is neither a change, an update nor a clear must be one of our payloads */
static int is_builtin(sb_message_type *t)
{
    return t == sb_subscription_change_type() || t == sb_cache_update_type() ||
           t == sb_cache_clear_type();
}

/* ---------------- ballast ---------------- */

static sb_subscription *ballast_subs[NTOPICS / 2][NBALLAST];
static sb_forward *ballast_fwds[NTOPICS / 2][NBALLAST];
static sb_topic *ballast_dst[NTOPICS / 2][NBALLAST];
static sb_message_type *ballast_type; /* never published */
static atomic_int ballast_payloads;

static void ballast_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (!is_builtin(sb_message_get_type(msg)))
        atomic_fetch_add(&ballast_payloads, 1);
}

static void ballast_name(char *buf, size_t len, int k, int j)
{
    snprintf(buf, len, "tt.ballast.%d.%d", k, j);
}

/* ---------------- global findings ---------------- */

static atomic_int bad_payload;      /* malformed payload seen anywhere */
static atomic_int bad_change;
static atomic_int bad_update;
static atomic_int self_join_no_deadlock; /* self unsubscribe_and_join without SB_E_DEADLOCK */
static atomic_int cb_join_incomplete;    /* a join from a callback returned too early */
static atomic_int publish_errors;
static atomic_int forward_refusals, forward_bad_refusal;

/* ---------------- tracked subscriptions ---------------- */

enum { B_PLAIN, B_PUBLISH, B_UNSUB_SELF, B_UNSUB_OTHER, B_JOIN_OTHER, B_COUNT };
static const char *const bnames[B_COUNT] = {"plain", "publish", "unsub-self", "unsub-other",
                                            "join-other"};

typedef struct tsub {
    int kind;
    int behavior;
    int selective;
    int self_after;        /* B_UNSUB_SELF: after this many payloads */
    int self_join;         /* B_UNSUB_SELF: with _and_join */
    sb_message_type *accepted[2];
    atomic_int filter_set; /* t_filter valid */
    uint64_t t_filter;
    sb_subscription *keep; /* an extra reference, for the final checks */

    atomic_int in_cb, overlaps, count, payloads;
    atomic_int first_not_subscribe, own_subscribe, own_unsubscribe, finals, after_final;
    atomic_int final_bad, unsub_not_final, wrong_sub, wrong_type, order_errors;
    atomic_int finished;
    int final_seen;            /* callback only (never overlaps) */
    int self_done;             /* callback only */
    int last_seq[NWORKERS];    /* callback only */
    char uid[160];             /* callback only */
    struct tsub *next;
} tsub;

static pthread_mutex_t all_mu = PTHREAD_MUTEX_INITIALIZER;
static tsub *all_subs;
static int all_count;
static int by_kind[3], by_behavior[B_COUNT];

typedef struct live_entry {
    sb_subscription *sub; /* the registry's reference */
    tsub *ts;
} live_entry;

static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static live_entry live[MAX_LIVE];
static int nlive;

static int live_add(sb_subscription *sub, tsub *ts)
{
    pthread_mutex_lock(&live_mu);
    int ok = nlive < MAX_LIVE;
    if (ok)
        live[nlive++] = (live_entry){sub, ts};
    pthread_mutex_unlock(&live_mu);
    return ok;
}

/* removes a random entry (a plain one if plain_only); the caller owns its reference */
static int live_take(unsigned r, int plain_only, live_entry *out)
{
    pthread_mutex_lock(&live_mu);
    int found = 0;
    if (nlive > 0) {
        int start = (int)(r % (unsigned)nlive);
        for (int k = 0; k < nlive; k++) {
            int i = (start + k) % nlive;
            if (plain_only && live[i].ts->behavior != B_PLAIN)
                continue;
            *out = live[i];
            live[i] = live[--nlive];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&live_mu);
    return found;
}

/* a new reference to a random live subscription */
static sb_subscription *live_ref(unsigned r)
{
    sb_subscription *s = NULL;
    pthread_mutex_lock(&live_mu);
    if (nlive > 0)
        s = sb_subscription_ref(live[r % (unsigned)nlive].sub);
    pthread_mutex_unlock(&live_mu);
    return s;
}

static void publish_random_from_cb(int hop);
static void publish_sync_from_cb(int hop);
static void timer_from_cb(int hop);

static void tsub_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    tsub *ts = data;
    if (atomic_exchange(&ts->in_cb, 1))
        atomic_fetch_add(&ts->overlaps, 1);
    int idx = atomic_fetch_add(&ts->count, 1);
    const char *uid = sb_subscription_uniqueid(sub);
    if (idx == 0)
        snprintf(ts->uid, sizeof ts->uid, "%s", uid ? uid : "");
    else if (uid == NULL || strcmp(uid, ts->uid) != 0)
        atomic_fetch_add(&ts->wrong_sub, 1);
    if (ts->final_seen)
        atomic_fetch_add(&ts->after_final, 1);

    sb_message_type *type = sb_message_get_type(msg);
    int own_sub = 0, own_unsub = 0, payload = 0;
    tpay *p = NULL;
    if (type == sb_subscription_change_type()) {
        const sb_subscription_change *c = sb_message_data(msg);
        if (c == NULL || c->uniqueid == NULL || c->description == NULL || c->topic == NULL) {
            atomic_fetch_add(&bad_change, 1);
        } else if (strcmp(c->uniqueid, ts->uid) == 0) {
            if (strcmp(c->description, "Subscribe") == 0) {
                own_sub = 1;
                atomic_fetch_add(&ts->own_subscribe, 1);
            } else if (strcmp(c->description, "Unsubscribe") == 0) {
                own_unsub = 1;
                atomic_fetch_add(&ts->own_unsubscribe, 1);
            } else {
                atomic_fetch_add(&bad_change, 1);
            }
        }
    } else if (type == sb_cache_update_type()) {
        const sb_cache_update *u = sb_message_data(msg);
        if (u == NULL || u->type == NULL || (u->old_snapshot == NULL && u->new_snapshot == NULL))
            atomic_fetch_add(&bad_update, 1);
    } else if (type == sb_cache_clear_type()) {
        /* a clear published to an original topic: fine */
    } else {
        p = sb_message_data(msg);
        if (p == NULL || p->magic != TP_MAGIC) {
            atomic_fetch_add(&bad_payload, 1);
            p = NULL;
        } else {
            payload = 1;
            atomic_fetch_add(&ts->payloads, 1);
            if (p->hop == 0 && p->worker >= 0 && p->worker < NWORKERS) {
                if (p->seq <= ts->last_seq[p->worker])
                    atomic_fetch_add(&ts->order_errors, 1);
                ts->last_seq[p->worker] = p->seq;
            }
            if (ts->selective && atomic_load(&ts->filter_set) &&
                sb_message_timestamp_ns(msg) > ts->t_filter && type != ts->accepted[0] &&
                type != ts->accepted[1])
                atomic_fetch_add(&ts->wrong_type, 1);
        }
    }
    if (idx == 0 && !own_sub)
        atomic_store(&ts->first_not_subscribe, 1);

    int fin = sb_subscription_final_message(sub, msg);
    if (fin == 1) {
        atomic_fetch_add(&ts->finals, 1);
        if (!own_unsub)
            atomic_fetch_add(&ts->final_bad, 1);
        ts->final_seen = 1;
    } else if (own_unsub) {
        atomic_fetch_add(&ts->unsub_not_final, 1);
    }

    /* behaviors, on payloads only */
    if (payload && !fin) {
        switch (ts->behavior) {
        case B_PUBLISH:
            if (p->hop < 2 && cb_rnd() % 3 == 0)
                publish_random_from_cb(p->hop + 1);
            else if (p->hop < 2 && cb_rnd() % 8 == 0)
                publish_sync_from_cb(p->hop + 1);
            else if (p->hop < 2 && cb_rnd() % 8 == 0)
                timer_from_cb(p->hop + 1);
            break;
        case B_UNSUB_SELF:
            if (!ts->self_done && atomic_load(&ts->payloads) >= ts->self_after) {
                ts->self_done = 1;
                sb_subscription *me = sb_subscription_ref(sub);
                if (ts->self_join) {
                    sb_unsubscribe_and_join(me); /* must not wait on ourselves */
                    if (!tu_contains_ci(sb_last_error(), "deadlock"))
                        atomic_fetch_add(&self_join_no_deadlock, 1);
                } else {
                    sb_unsubscribe(me);
                }
            }
            break;
        case B_UNSUB_OTHER:
            if (cb_rnd() % 4 == 0) {
                live_entry e;
                if (live_take(cb_rnd(), 0, &e))
                    sb_unsubscribe(e.sub);
            }
            break;
        case B_JOIN_OTHER:
            if (cb_rnd() % 4 == 0) {
                live_entry e;
                if (live_take(cb_rnd(), 1, &e)) { /* plain ones only: never ourselves */
                    sb_unsubscribe_and_join(e.sub);
                    if (!atomic_load(&e.ts->finished))
                        atomic_fetch_add(&cb_join_incomplete, 1);
                }
            }
            break;
        default:
            break;
        }
    }
    if (fin == 1)
        atomic_store(&ts->finished, 1);
    atomic_store(&ts->in_cb, 0);
}

/* ---------------- shared objects ---------------- */

static sb_topic *pooled_topic;
static sb_topic_pool *tpool;
static sb_cache *cache;

static pthread_mutex_t fwd_mu = PTHREAD_MUTEX_INITIALIZER;
static sb_forward *fwds[NFWD];

static pthread_mutex_t ct_mu = PTHREAD_MUTEX_INITIALIZER;
static sb_caching_topic *cts[NCT];

/* routers */
typedef struct trouter trouter;
typedef struct rctx {
    trouter *owner;
    sb_message_type *type; /* route type (snapshot type for cache update routes) */
    int cache_update;
    int is_default;
} rctx;

struct trouter {
    sb_router *keep; /* extra reference for the final checks */
    atomic_int calls, wrong, after_done, done_seen;
    rctx routes[NTYPES];
    rctx cu_routes[NTYPES];
    rctx def;
    struct trouter *next;
};

static pthread_mutex_t rt_mu = PTHREAD_MUTEX_INITIALIZER;
static sb_router *routers[NROUTER];
static trouter *router_recs[NROUTER];
static trouter *all_routers;
static int routers_made;

static void route_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    rctx *c = data;
    trouter *tr = c->owner;
    (void)sub;
    atomic_fetch_add(&tr->calls, 1);
    if (atomic_load(&tr->done_seen))
        atomic_fetch_add(&tr->after_done, 1);
    sb_message_type *type = sb_message_get_type(msg);
    if (c->cache_update) {
        const sb_cache_update *u = sb_message_data(msg);
        if (type != sb_cache_update_type() || u == NULL || u->type != c->type)
            atomic_fetch_add(&tr->wrong, 1);
    } else if (!c->is_default) {
        if (type != c->type)
            atomic_fetch_add(&tr->wrong, 1);
    }
    if (!is_builtin(type)) {
        tpay *p = sb_message_data(msg);
        if (p == NULL || p->magic != TP_MAGIC)
            atomic_fetch_add(&bad_payload, 1);
    }
}

/* the cache's id function: payloads only */
static const char *pay_id(sb_message *msg)
{
    if (msg == NULL || is_builtin(sb_message_get_type(msg)))
        return NULL;
    tpay *p = sb_message_data(msg);
    if (p == NULL || p->magic != TP_MAGIC) {
        atomic_fetch_add(&bad_payload, 1);
        return NULL;
    }
    return p->id;
}

/* ---------------- progress and watchdog ---------------- */

enum {
    OP_PUBLISH, OP_PUBLISH_SYNC, OP_SUBSCRIBE, OP_UNSUBSCRIBE, OP_UNSUB_JOIN, OP_TOPIC,
    OP_TYPE, OP_FORWARD, OP_POOL, OP_CACHING, OP_CACHE_READ, OP_CACHE_CLEAR, OP_ROUTER,
    OP_ROUTE, OP_GROUP, OP_TIMER, OP_COUNT
};
static const char *const op_names[OP_COUNT] = {
    "publish", "publish_sync", "subscribe", "unsubscribe", "unsubscribe_and_join", "topic",
    "type", "forward", "topic pool", "caching topic", "cache get/dump", "cache clear",
    "router create/unsubscribe", "route add/remove", "worker group", "timer"};

/*
 * Synchronous subscriptions serialize their callbacks across publisher threads, so a
 * synchronous callback that publishes (itself, or indirectly: unsubscribing publishes the
 * Unsubscribe change, a caching topic publishes its updates) into a topic whose synchronous
 * subscription is running on another thread, which publishes back, is the ABBA pattern
 * that must not deadlock (the publish from inside a callback is deferred to the thread
 * running the other subscription). On by default; SB_TORTURE_SYNC_CROSS=0 avoids it.
 */
static int sync_cross;

static atomic_long progress[NWORKERS + 1]; /* + teardown */
static atomic_int cur_op[NWORKERS + 1];
static atomic_int worker_done[NWORKERS + 1];
static atomic_long op_count[OP_COUNT];
static atomic_int stop_flag, watchdog_stop;

static void *watchdog(void *arg)
{
    (void)arg;
    const double stall = tu_slow() ? 60.0 : 10.0;
    long last[NWORKERS + 1];
    double since[NWORKERS + 1];
    for (int i = 0; i <= NWORKERS; i++) {
        last[i] = atomic_load(&progress[i]);
        since[i] = tu_now_s();
    }
    while (!atomic_load(&watchdog_stop)) {
        tu_sleep_ms(200);
        double now = tu_now_s();
        for (int i = 0; i <= NWORKERS; i++) {
            long p = atomic_load(&progress[i]);
            if (p != last[i] || atomic_load(&worker_done[i])) {
                last[i] = p;
                since[i] = now;
            } else if (now - since[i] > (i < NWORKERS ? stall : 3 * stall)) {
                /* the teardown's own bounded waits (WAIT_UNTIL) report what they waited
                 * for before this fires */
                printf("FAIL watchdog: %s %d made no progress for %.0f s (in %s; %ld ops "
                       "done); live subscriptions %d\n",
                       i < NWORKERS ? "worker" : "teardown", i,
                       i < NWORKERS ? stall : 3 * stall,
                       i < NWORKERS ? op_names[atomic_load(&cur_op[i])] : "teardown",
                       p, nlive);
                fflush(stdout);
                _exit(1);
            }
        }
    }
    return NULL;
}

/* ---------------- operations ---------------- */

typedef struct worker {
    int idx;
    unsigned seed;
    int seq;
    sb_topic *held_topics[HELD_TOPICS];
    sb_message_type *held_types[HELD_TYPES];
} worker;

static const char *rand_name(unsigned r) { return names[r % NNAMES]; }

/* a type to publish with: a shared one, or one of the worker's transient ones */
static sb_message_type *pick_type(worker *w, unsigned r)
{
    if (r % 5 == 0) {
        sb_message_type *t = w->held_types[(r / 5) % HELD_TYPES];
        if (t != NULL)
            return t;
    }
    return ptypes[r % NTYPES];
}

static void publish_to(sb_topic *t, sb_message_type *type, int worker_idx, int seq, int hop)
{
    sb_message *m = make_pay(type, worker_idx, seq, hop);
    if (m == NULL)
        return;
    int r = sb_publish(t, m);
    if (r < 0)
        atomic_fetch_add(&publish_errors, 1);
    sb_message_unref(m);
}

static void publish_random_from_cb(int hop)
{
    unsigned r = cb_rnd();
    sb_topic *t = sb_topic_create(rand_name(r));
    if (t == NULL)
        return;
    publish_to(t, ptypes[(r >> 8) % NTYPES], -1, 0, hop);
    sb_topic_unref(t);
}

/* From a callback, publish_sync to a random live subscription (maybe this one, maybe one
 * whose callback waits for ours): it completes, or is refused with SB_E_DEADLOCK (own
 * callback, or a wait that would close a cycle), or SB_E_STATE (unsubscribed). */
static atomic_long cb_sync_done, cb_sync_refused;
static void publish_sync_from_cb(int hop)
{
    unsigned r = cb_rnd();
    sb_subscription *s = live_ref(r);
    if (s == NULL)
        return;
    sb_message *m = make_pay(ptypes[(r >> 8) % NTYPES], -1, 0, hop);
    if (m != NULL) {
        int rc = sb_publish_sync(s, m);
        if (rc == SB_E_DEADLOCK)
            atomic_fetch_add(&cb_sync_refused, 1);
        else if (rc >= 0)
            atomic_fetch_add(&cb_sync_done, 1);
        else if (rc != SB_E_STATE)
            atomic_fetch_add(&publish_errors, 1);
        sb_message_unref(m);
    }
    sb_subscription_unref(s);
}

/* ---------------- worker groups ---------------- */

static const char *const group_names[NGROUPS] = {"tt.g0", "tt.g1"};
static atomic_long tasks_submitted, tasks_run, tasks_double_run, group_errors;

/* One of the two groups, by name (the same limits every time, so never refused). */
static sb_pool *group_open(unsigned r)
{
    sb_pool *g = sb_pool_create(group_names[r % NGROUPS], 1, 2, 50);
    if (g == NULL)
        atomic_fetch_add(&group_errors, 1);
    return g;
}

typedef struct ttask {
    atomic_int runs;
    int hop;
    unsigned seed;
} ttask;

static void group_task(void *data);

/* Submits a task to group `r`; counts it only if accepted (it must then run once). */
static void submit_task(unsigned r, int hop)
{
    sb_pool *g = group_open(r);
    if (g == NULL)
        return;
    ttask *t = calloc(1, sizeof *t);
    atomic_init(&t->runs, 0);
    t->hop = hop;
    t->seed = r * 2654435761u + 1;
    atomic_fetch_add(&tasks_submitted, 1);
    if (sb_pool_submit(g, group_task, t) != SB_OK) {
        atomic_fetch_sub(&tasks_submitted, 1);
        atomic_fetch_add(&group_errors, 1);
        free(t);
    }
    sb_pool_unref(g);
}

static void group_task(void *data)
{
    ttask *t = data;
    if (atomic_fetch_add(&t->runs, 1) != 0) {
        atomic_fetch_add(&tasks_double_run, 1);
        return; /* not freed twice */
    }
    unsigned r = rnd(&t->seed);
    if (r % 3 == 0 && t->hop < GROUP_TASK_HOPS) {
        submit_task(r >> 4, t->hop + 1);
    } else {
        sb_topic *tp = sb_topic_create(rand_name(r >> 4));
        if (tp != NULL) {
            publish_to(tp, ptypes[(r >> 9) % NTYPES], -1, 0, 2); /* hop 2: not republished */
            sb_topic_unref(tp);
        }
    }
    free(t);
    atomic_fetch_add(&tasks_run, 1);
}

static void op_group(worker *w, unsigned r)
{
    (void)w;
    switch (r % 4) {
    case 0:
    case 1:
        submit_task(r >> 2, 0);
        break;
    case 2: { /* a live group refuses other limits */
        sb_pool *g = sb_pool_get(group_names[(r >> 2) % NGROUPS]);
        if (g != NULL) {
            if (sb_pool_create(group_names[(r >> 2) % NGROUPS], 1, 3, 50) != NULL ||
                sb_last_error_code() != SB_E_INVAL)
                atomic_fetch_add(&group_errors, 1);
            sb_pool_unref(g);
        }
        break;
    }
    default: { /* reference churn, reconfigure with the same limits */
        sb_pool *g = group_open(r >> 2);
        if (g != NULL) {
            sb_pool *g2 = sb_pool_ref(g);
            if (g2 != g || sb_pool_reconfigure(g2, 1, 2, 50) != SB_OK)
                atomic_fetch_add(&group_errors, 1);
            sb_pool_unref(g2);
            sb_pool_unref(g);
        }
        break;
    }
    }
}

static void op_publish(worker *w, unsigned r)
{
    sb_message_type *type = pick_type(w, r >> 4);
    sb_topic *t = NULL;
    switch (r % 5) {
    case 0: /* a pool topic */
        t = sb_topic_pool_get_topic(tpool, pool_names[(r >> 8) % NPOOLNAMES]);
        break;
    case 1: /* only if it exists */
        t = sb_topic_get(rand_name(r >> 8));
        break;
    default: /* created on the fly */
        t = sb_topic_create(rand_name(r >> 8));
        break;
    }
    if (t == NULL)
        return;
    publish_to(t, type, w->idx, w->seq++, 0);
    sb_topic_unref(t);
}

static void op_publish_sync(worker *w, unsigned r)
{
    sb_subscription *s = live_ref(r);
    if (s == NULL)
        return;
    sb_message *m = make_pay(ptypes[(r >> 8) % NTYPES], w->idx, w->seq++, 0);
    if (m != NULL) {
        int rc = sb_publish_sync(s, m);
        if (rc < 0 && rc != SB_E_STATE)
            atomic_fetch_add(&publish_errors, 1);
        sb_message_unref(m);
    }
    sb_subscription_unref(s);
}

static void op_subscribe(worker *w, unsigned r)
{
    (void)w;
    sb_topic *t = sb_topic_create(rand_name(r));
    if (t == NULL)
        return;
    tsub *ts = calloc(1, sizeof *ts);
    ts->kind = (int)((r >> 8) % 3);
    unsigned b = (r >> 12) % 20;
    ts->behavior = b < 8 ? B_PLAIN : b < 11 ? B_PUBLISH : b < 14 ? B_UNSUB_SELF
                 : b < 16 ? B_UNSUB_OTHER : B_JOIN_OTHER;
    if (ts->kind == 2 && !sync_cross)
        ts->behavior = B_PLAIN;
    ts->selective = (r >> 18) % 5 == 0;
    ts->self_after = 1 + (int)((r >> 21) % 20);
    ts->self_join = (r >> 26) & 1;
    for (int i = 0; i < NWORKERS; i++)
        ts->last_seq[i] = -1;
    pthread_mutex_lock(&all_mu);
    ts->next = all_subs;
    all_subs = ts;
    all_count++;
    by_kind[ts->kind]++;
    by_behavior[ts->behavior]++;
    pthread_mutex_unlock(&all_mu);

    sb_pool *g = ts->kind == 1 && (r >> 27) % 3 == 0 ? group_open(r >> 29) : NULL;
    sb_subscription *s = ts->kind == 0   ? sb_subscribe(t, tsub_cb, ts)
                         : g != NULL     ? sb_subscribe_pool_in(t, g, tsub_cb, ts)
                         : ts->kind == 1 ? sb_subscribe_pool(t, tsub_cb, ts)
                                         : sb_subscribe_synchronous(t, tsub_cb, ts);
    sb_pool_unref(g);
    sb_topic_unref(t);
    if (s == NULL) {
        CHECK(s != NULL);
        ts->keep = NULL;
        atomic_store(&ts->finished, 1);
        return;
    }
    ts->keep = sb_subscription_ref(s);
    if (ts->selective) {
        ts->accepted[0] = ptypes[(r >> 27) % NTYPES];
        ts->accepted[1] = ptypes[(r >> 29) % NTYPES];
        CHECK_EQ_INT(sb_subscription_accept_message_type(s, sb_subscription_change_type()), SB_OK);
        CHECK_EQ_INT(sb_subscription_accept_message_type(s, ts->accepted[0]), SB_OK);
        CHECK_EQ_INT(sb_subscription_accept_message_type(s, ts->accepted[1]), SB_OK);
        ts->t_filter = realtime_ns();
        atomic_store(&ts->filter_set, 1);
    }
    if (!live_add(s, ts)) {
        /* full: end it right away */
        if (r & 1)
            sb_unsubscribe_and_join(s);
        else
            sb_unsubscribe(s);
    }
}

static void op_unsubscribe(worker *w, unsigned r, int join)
{
    (void)w;
    live_entry e;
    if (!live_take(r, 0, &e))
        return;
    if (join) {
        sb_unsubscribe_and_join(e.sub);
        tu_check(atomic_load(&e.ts->finished) == 1, __FILE__, __LINE__,
                 "final message handled when sb_unsubscribe_and_join returns");
    } else {
        sb_unsubscribe(e.sub);
    }
}

static void op_topic(worker *w, unsigned r)
{
    int slot = (int)(r % HELD_TOPICS);
    if (w->held_topics[slot] != NULL) {
        sb_topic_unref(w->held_topics[slot]);
        w->held_topics[slot] = NULL;
    } else {
        const char *n = rand_name(r >> 4);
        w->held_topics[slot] = (r >> 12) & 1 ? sb_topic_create(n)
                                             : sb_topic_create_with_detail(n, "torture");
        CHECK(w->held_topics[slot] != NULL);
    }
}

static void op_type(worker *w, unsigned r)
{
    int slot = (int)(r % HELD_TYPES);
    if (w->held_types[slot] != NULL) {
        sb_message_type_unref(w->held_types[slot]);
        w->held_types[slot] = NULL;
        return;
    }
    sb_message_type *t = NULL;
    if ((r >> 4) % 10 == 0) {
        CHECK_EQ_INT(sb_message_type_create("tt.declined", NULL, &t), SB_E_DECLINED);
        CHECK(t == NULL);
        return;
    }
    const char *n = (r >> 8) & 1 ? tnames[(r >> 9) % NTTYPES]
                                 : sb_message_type_name(ptypes[(r >> 9) % NTYPES]);
    CHECK_EQ_INT(sb_message_type_create(n, NULL, &t), SB_OK);
    CHECK(t != NULL);
    w->held_types[slot] = t;
}

static void op_forward(worker *w, unsigned r)
{
    (void)w;
    int slot = (int)(r % NFWD);
    pthread_mutex_lock(&fwd_mu);
    sb_forward *f = fwds[slot];
    fwds[slot] = NULL;
    pthread_mutex_unlock(&fwd_mu);
    if (f != NULL) {
        CHECK(sb_forward_cancel(f) == NULL);
        return;
    }
    const char *from = rand_name(r >> 4);
    if (!sync_cross && strstr(from, "-cached") != NULL)
        from = names[(r >> 4) % NTOPICS];
    sb_topic *a = sb_topic_create(from);
    sb_topic *b = sb_topic_create(rand_name(r >> 12));
    if (a != NULL && b != NULL) {
        f = sb_forward_all(a, b);
        if (f == NULL) {
            atomic_fetch_add(&forward_refusals, 1);
            if (!tu_contains_ci(sb_last_error(), "cycle"))
                atomic_fetch_add(&forward_bad_refusal, 1);
        } else {
            pthread_mutex_lock(&fwd_mu);
            if (fwds[slot] == NULL) {
                fwds[slot] = f;
                f = NULL;
            }
            pthread_mutex_unlock(&fwd_mu);
            if (f != NULL)
                sb_forward_cancel(f);
        }
    }
    sb_topic_unref(a);
    sb_topic_unref(b);
}

static void op_pool(worker *w, unsigned r)
{
    const char *n = pool_names[(r >> 4) % NPOOLNAMES];
    switch (r % 4) {
    case 0: {
        int rc = sb_topic_pool_delete_topic(tpool, n);
        CHECK(rc == SB_OK || rc == SB_E_INVAL);
        break;
    }
    case 1: {
        int e = sb_topic_pool_topic_exists(tpool, n);
        CHECK(e == 0 || e == 1);
        break;
    }
    default: {
        sb_topic *t = sb_topic_pool_get_topic(tpool, n);
        if (t == NULL) {
            /* legitimate only when the pool's forward would close a cycle (a random
             * forward from the pooled topic to this pool topic exists) */
            atomic_fetch_add(&forward_refusals, 1);
            if (!tu_contains_ci(sb_last_error(), "cycle")) {
                printf("FAIL sb_topic_pool_get_topic: %s\n", sb_last_error());
                CHECK(t != NULL);
            }
        } else {
            publish_to(t, ptypes[(r >> 8) % NTYPES], w->idx, w->seq++, 0);
            sb_topic_unref(t);
        }
        break;
    }
    }
}

static void op_caching(worker *w, unsigned r)
{
    (void)w;
    int slot = (int)(r % NCT);
    pthread_mutex_lock(&ct_mu);
    sb_caching_topic *ct = cts[slot];
    cts[slot] = NULL;
    pthread_mutex_unlock(&ct_mu);
    if (ct != NULL) {
        if ((r >> 4) & 1)
            sb_caching_unsubscribe_and_join(ct);
        else
            sb_caching_unsubscribe(ct);
        return;
    }
    sb_topic *orig = sb_topic_create(names[(r >> 5) % NTOPICS]);
    if (orig == NULL)
        return;
    ct = sb_caching_topic_create(orig, cache);
    sb_topic_unref(orig);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    CHECK(sb_caching_get_topic(ct) != NULL);
    if ((r >> 9) % 3 == 0)
        CHECK_EQ_INT(sb_caching_accept_message_type(ct, ptypes[(r >> 11) % NTYPES]), SB_OK);
    pthread_mutex_lock(&ct_mu);
    if (cts[slot] == NULL) {
        cts[slot] = ct;
        ct = NULL;
    }
    pthread_mutex_unlock(&ct_mu);
    if (ct != NULL)
        sb_caching_unsubscribe_and_join(ct);
}

static void check_list(sb_message_list *l)
{
    size_t n = sb_message_list_len(l);
    for (size_t i = 0; i < n; i++) {
        sb_message *m = sb_message_list_get(l, i);
        tpay *p = m ? sb_message_data(m) : NULL;
        if (p == NULL || p->magic != TP_MAGIC || is_builtin(sb_message_get_type(m)))
            atomic_fetch_add(&bad_payload, 1);
    }
    sb_message_list_free(l);
}

static void op_cache_read(worker *w, unsigned r)
{
    (void)w;
    sb_message_type *t = ptypes[(r >> 4) % NTYPES];
    char id[8];
    snprintf(id, sizeof id, "k%u", (r >> 8) % 5);
    switch (r % 4) {
    case 0: {
        sb_message *m = sb_cache_get(cache, t, id);
        if (m != NULL) {
            tpay *p = sb_message_data(m);
            if (p == NULL || p->magic != TP_MAGIC || strcmp(p->id, id) != 0 ||
                sb_message_get_type(m) != t)
                atomic_fetch_add(&bad_payload, 1);
            sb_message_unref(m);
        }
        break;
    }
    case 1:
        check_list(sb_cache_get_all(cache, t, id));
        break;
    case 2:
        check_list(sb_cache_dump(cache, (r >> 12) & 1 ? NULL : t));
        break;
    default:
        check_list(sb_cache_dump_all(cache, NULL));
        break;
    }
}

static void op_cache_clear(worker *w, unsigned r)
{
    (void)w;
    char id[8];
    snprintf(id, sizeof id, "k%u", (r >> 8) % 5);
    sb_message *snap = sb_cache_get(cache, ptypes[(r >> 4) % NTYPES], id);
    if (snap == NULL)
        return;
    sb_message *clr = sb_cache_clear_create(snap);
    CHECK(clr != NULL);
    sb_topic *t = sb_topic_create(names[(r >> 12) % NTOPICS]);
    if (clr != NULL && t != NULL && sb_publish(t, clr) < 0)
        atomic_fetch_add(&publish_errors, 1);
    sb_topic_unref(t);
    sb_message_unref(clr);
    sb_message_unref(snap);
}

static void router_add_random(sb_router *r, trouter *tr, unsigned x)
{
    int ti = (int)(x % NTYPES);
    switch ((x >> 4) % 3) {
    case 0:
        sb_router_add(r, ptypes[ti], route_cb, &tr->routes[ti]);
        break;
    case 1:
        sb_router_add_cache_update(r, ptypes[ti], route_cb, &tr->cu_routes[ti]);
        break;
    default:
        if ((x >> 8) % 4 == 0)
            sb_router_set_default(r, route_cb, &tr->def);
        else
            sb_router_add(r, ptypes[ti], route_cb, &tr->routes[ti]);
        break;
    }
}

static void op_router(worker *w, unsigned r)
{
    (void)w;
    int slot = (int)(r % NROUTER);
    pthread_mutex_lock(&rt_mu);
    sb_router *rt = routers[slot];
    trouter *tr = router_recs[slot];
    routers[slot] = NULL;
    router_recs[slot] = NULL;
    pthread_mutex_unlock(&rt_mu);
    if (rt != NULL) {
        if ((r >> 4) & 1) {
            sb_router_unsubscribe_and_join(rt);
            CHECK_EQ_INT(sb_router_is_done(tr->keep), 1);
            atomic_store(&tr->done_seen, 1);
        } else {
            sb_router_unsubscribe(rt);
        }
        return;
    }
    sb_topic *t = sb_topic_create(rand_name(r >> 5));
    if (t == NULL)
        return;
    sb_pool *g = (r >> 12) % 4 == 2 ? group_open(r >> 14) : NULL;
    rt = g != NULL           ? sb_router_create_in(t, g)
         : (r >> 12) & 1     ? sb_router_create(t)
                             : sb_router_create_pool(t);
    sb_pool_unref(g);
    sb_topic_unref(t);
    CHECK(rt != NULL);
    if (rt == NULL)
        return;
    tr = calloc(1, sizeof *tr);
    for (int i = 0; i < NTYPES; i++) {
        tr->routes[i] = (rctx){tr, ptypes[i], 0, 0};
        tr->cu_routes[i] = (rctx){tr, ptypes[i], 1, 0};
    }
    tr->def = (rctx){tr, NULL, 0, 1};
    tr->keep = sb_router_ref(rt);
    router_add_random(rt, tr, r >> 13);
    router_add_random(rt, tr, r >> 19);
    pthread_mutex_lock(&rt_mu);
    tr->next = all_routers;
    all_routers = tr;
    routers_made++;
    if (routers[slot] == NULL) {
        routers[slot] = rt;
        router_recs[slot] = tr;
        rt = NULL;
    }
    pthread_mutex_unlock(&rt_mu);
    if (rt != NULL)
        sb_router_unsubscribe_and_join(rt);
}

static void op_route(worker *w, unsigned r)
{
    (void)w;
    int slot = (int)(r % NROUTER);
    pthread_mutex_lock(&rt_mu);
    sb_router *rt = routers[slot] ? sb_router_ref(routers[slot]) : NULL;
    trouter *tr = router_recs[slot];
    pthread_mutex_unlock(&rt_mu);
    if (rt == NULL)
        return;
    if ((r >> 4) & 1) {
        router_add_random(rt, tr, r >> 5);
    } else {
        int ti = (int)((r >> 5) % NTYPES);
        int rc = (r >> 7) & 1 ? sb_router_remove(rt, ptypes[ti])
                              : sb_router_remove_cache_update(rt, ptypes[ti]);
        CHECK(rc == SB_OK || rc == SB_E_INVAL);
    }
    sb_router_unref(rt);
}

/* Timers: each slot holds one reference; whoever takes it out owns it. */
#define NTIMERS 16
static sb_timer *_Atomic timer_slots[NTIMERS];
static atomic_long timers_cancelled, timers_bad_cancel;

static void cancel_and_release(sb_timer *tm)
{
    if (tm == NULL)
        return;
    int rc = sb_timer_cancel(tm);
    if (rc == 1) {
        atomic_fetch_add(&timers_cancelled, 1);
        if (sb_timer_cancel(tm) != 0 || sb_timer_fired(tm) != 0)
            atomic_fetch_add(&timers_bad_cancel, 1);
    } else if (rc != 0) {
        atomic_fetch_add(&timers_bad_cancel, 1);
    }
    sb_timer_unref(tm);
}

/* From a callback: a short timed publish (fire and forget), and maybe a cancel of a
 * worker's timer. */
static void timer_from_cb(int hop)
{
    unsigned r = cb_rnd();
    sb_topic *t = sb_topic_create(rand_name(r));
    sb_message *m = make_pay(ptypes[(r >> 8) % NTYPES], -1, 0, hop);
    if (t != NULL && m != NULL) {
        sb_timer *tm = sb_publish_after(t, m, (r >> 12) % 6);
        if (tm == NULL)
            atomic_fetch_add(&publish_errors, 1);
        sb_timer_unref(tm);
    }
    sb_message_unref(m);
    sb_topic_unref(t);
    if ((r >> 16) % 2 == 0)
        cancel_and_release(atomic_exchange(&timer_slots[(r >> 17) % NTIMERS], NULL));
}

static void op_timer(worker *w, unsigned r)
{
    unsigned slot = (r >> 8) % NTIMERS;
    if (r % 3 == 0) { /* cancel someone's timer */
        cancel_and_release(atomic_exchange(&timer_slots[slot], NULL));
        return;
    }
    sb_topic *t = sb_topic_create(rand_name(r >> 12));
    sb_message *m = make_pay(pick_type(w, r >> 4), -1, 0, 0);
    if (t != NULL && m != NULL) {
        uint64_t delay = (r >> 16) % 8 == 0 ? 60000u : (r >> 16) % 21;
        sb_timer *tm = sb_publish_after(t, m, delay);
        if (tm == NULL)
            atomic_fetch_add(&publish_errors, 1);
        else if (r % 3 == 1 && delay < 60000u) /* fire and forget */
            sb_timer_unref(tm);
        else /* kept for a cancel; the slot's previous timer is cancelled */
            cancel_and_release(atomic_exchange(&timer_slots[slot], tm));
    }
    sb_message_unref(m);
    sb_topic_unref(t);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    while (!atomic_load(&stop_flag)) {
        unsigned r = rnd(&w->seed);
        unsigned pick = r % 100;
        unsigned x = rnd(&w->seed);
        int op = pick < 30   ? OP_PUBLISH
                 : pick < 34 ? OP_PUBLISH_SYNC
                 : pick < 44 ? OP_SUBSCRIBE
                 : pick < 49 ? OP_UNSUBSCRIBE
                 : pick < 54 ? OP_UNSUB_JOIN
                 : pick < 59 ? OP_TOPIC
                 : pick < 63 ? OP_TYPE
                 : pick < 70 ? OP_FORWARD
                 : pick < 76 ? OP_POOL
                 : pick < 80 ? OP_CACHING
                 : pick < 86 ? OP_CACHE_READ
                 : pick < 88 ? OP_CACHE_CLEAR
                 : pick < 92 ? OP_ROUTER
                 : pick < 96 ? OP_ROUTE
                 : pick < 98 ? OP_GROUP
                             : OP_TIMER;
        atomic_store(&cur_op[w->idx], op);
        switch (op) {
        case OP_PUBLISH: op_publish(w, x); break;
        case OP_PUBLISH_SYNC: op_publish_sync(w, x); break;
        case OP_SUBSCRIBE: op_subscribe(w, x); break;
        case OP_UNSUBSCRIBE: op_unsubscribe(w, x, 0); break;
        case OP_UNSUB_JOIN: op_unsubscribe(w, x, 1); break;
        case OP_TOPIC: op_topic(w, x); break;
        case OP_TYPE: op_type(w, x); break;
        case OP_FORWARD: op_forward(w, x); break;
        case OP_POOL: op_pool(w, x); break;
        case OP_CACHING: op_caching(w, x); break;
        case OP_CACHE_READ: op_cache_read(w, x); break;
        case OP_CACHE_CLEAR: op_cache_clear(w, x); break;
        case OP_ROUTER: op_router(w, x); break;
        case OP_ROUTE: op_route(w, x); break;
        case OP_GROUP: op_group(w, x); break;
        default: op_timer(w, x); break;
        }
        atomic_fetch_add(&op_count[op], 1);
        atomic_fetch_add(&progress[w->idx], 1);
    }
    for (int i = 0; i < HELD_TOPICS; i++)
        sb_topic_unref(w->held_topics[i]);
    for (int i = 0; i < HELD_TYPES; i++)
        sb_message_type_unref(w->held_types[i]);
    atomic_store(&worker_done[w->idx], 1);
    return NULL;
}

/* ---------------- teardown checks ---------------- */

#define TEARDOWN NWORKERS
static void step(void) { atomic_fetch_add(&progress[TEARDOWN], 1); }

static int check_tsub(tsub *ts)
{
    int bad = 0;
#define TS_EXPECT(cond)                                                                 \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            bad = 1;                                                                    \
            printf("FAIL subscription %s (%s, %s%s): %s\n", ts->uid, kind_names_[ts->kind], \
                   bnames[ts->behavior], ts->selective ? ", selective" : "", #cond);   \
        }                                                                               \
    } while (0)
    static const char *const kind_names_[3] = {"dedicated", "pool", "synchronous"};
    TS_EXPECT(atomic_load(&ts->overlaps) == 0);
    TS_EXPECT(atomic_load(&ts->first_not_subscribe) == 0);
    TS_EXPECT(atomic_load(&ts->own_subscribe) == 1);
    TS_EXPECT(atomic_load(&ts->own_unsubscribe) == 1);
    TS_EXPECT(atomic_load(&ts->finals) == 1);
    TS_EXPECT(atomic_load(&ts->after_final) == 0);
    TS_EXPECT(atomic_load(&ts->final_bad) == 0);
    TS_EXPECT(atomic_load(&ts->unsub_not_final) == 0);
    TS_EXPECT(atomic_load(&ts->wrong_sub) == 0);
    TS_EXPECT(atomic_load(&ts->wrong_type) == 0);
    TS_EXPECT(atomic_load(&ts->order_errors) == 0);
    TS_EXPECT(atomic_load(&ts->finished) == 1);
    TS_EXPECT(atomic_load(&ts->in_cb) == 0);
#undef TS_EXPECT
    return bad;
}

static int topic_registered(const char *name)
{
    sb_topic *t = sb_topic_get(name);
    if (t == NULL)
        return 0;
    sb_topic_unref(t);
    return 1;
}

static double torture_seconds(void)
{
    const char *s = getenv("SB_TORTURE_SECONDS");
    if (s != NULL && s[0] != '\0') {
        double v = atof(s);
        if (v > 0)
            return v;
    }
    return tu_slow() ? 3.0 : 20.0;
}

int main(void)
{
    TEST_INIT();
    double secs = torture_seconds();
    const char *sc = getenv("SB_TORTURE_SYNC_CROSS");
    sync_cross = sc == NULL || strcmp(sc, "0") != 0;
    alarm((unsigned)secs + (tu_slow() ? 540 : 100)); /* harness watchdog, re-armed */
    init_names();
    double start = tu_now_s();

    for (int i = 0; i < NTYPES; i++) {
        char n[32];
        snprintf(n, sizeof n, "tt.type.%d", i);
        CHECK_EQ_INT(sb_message_type_create(n, NULL, &ptypes[i]), SB_OK);
    }
    for (int i = 0; i < NTTYPES; i++)
        snprintf(tnames[i], sizeof tnames[0], "tt.ttype.%d", i);
    CHECK_EQ_INT(sb_message_type_decline("tt.declined"), SB_OK);
    pooled_topic = sb_topic_create("tt.pooled");
    tpool = sb_topic_pool_create(pooled_topic);
    cache = sb_cache_create(pay_id);
    CHECK(pooled_topic && tpool && cache);

    CHECK_EQ_INT(sb_message_type_create("tt.ballast", NULL, &ballast_type), SB_OK);
    for (int k = 0; k < NTOPICS / 2; k++) {
        sb_topic *t = sb_topic_create(names[2 * k]);
        for (int j = 0; j < NBALLAST; j++) {
            char n[48];
            ballast_name(n, sizeof n, k, j);
            ballast_dst[k][j] = sb_topic_create(n);
            ballast_fwds[k][j] = sb_forward_all(t, ballast_dst[k][j]);
            ballast_subs[k][j] = sb_subscribe_pool(t, ballast_cb, NULL);
            CHECK(ballast_fwds[k][j] != NULL && ballast_subs[k][j] != NULL);
            CHECK_EQ_INT(sb_subscription_accept_message_type(ballast_subs[k][j], ballast_type),
                         SB_OK);
        }
        sb_topic_unref(t); /* the ballast keeps it */
    }

    pthread_t wd;
    pthread_create(&wd, NULL, watchdog, NULL);
    worker ws[NWORKERS];
    pthread_t th[NWORKERS];
    memset(ws, 0, sizeof ws);
    for (int i = 0; i < NWORKERS; i++) {
        ws[i].idx = i;
        ws[i].seed = 2654435761u * (unsigned)(i + 1) ^ (unsigned)time(NULL);
        pthread_create(&th[i], NULL, worker_main, &ws[i]);
    }
    while (tu_now_s() - start < secs) {
        tu_sleep_ms(100);
        step();
    }
    atomic_store(&stop_flag, 1);
    for (int i = 0; i < NWORKERS; i++) {
        pthread_join(th[i], NULL);
        step();
    }
    double run = tu_now_s() - start;

    /* ---- teardown, watched by the watchdog (progress[TEARDOWN]) ---- */
    for (int i = 0; i < NTIMERS; i++)
        cancel_and_release(atomic_exchange(&timer_slots[i], NULL));
    CHECK_EQ_INT(atomic_load(&timers_bad_cancel), 0);
    for (int k = 0; k < NTOPICS / 2; k++) {
        for (int j = 0; j < NBALLAST; j++) {
            CHECK(sb_forward_cancel(ballast_fwds[k][j]) == NULL);
            CHECK(sb_unsubscribe_and_join(ballast_subs[k][j]) == NULL);
            sb_topic_unref(ballast_dst[k][j]);
        }
        step();
    }
    sb_message_type_unref(ballast_type);
    CHECK_EQ_INT(atomic_load(&ballast_payloads), 0);
    for (int i = 0; i < NFWD; i++) {
        if (fwds[i] != NULL)
            CHECK(sb_forward_cancel(fwds[i]) == NULL);
        fwds[i] = NULL;
        step();
    }
    for (int i = 0; i < NCT; i++) {
        if (cts[i] != NULL)
            sb_caching_unsubscribe_and_join(cts[i]);
        cts[i] = NULL;
        step();
    }
    for (int i = 0; i < NROUTER; i++) {
        if (routers[i] != NULL) {
            sb_router_unsubscribe_and_join(routers[i]);
            CHECK_EQ_INT(sb_router_is_done(router_recs[i]->keep), 1);
            atomic_store(&router_recs[i]->done_seen, 1);
        }
        routers[i] = NULL;
        step();
    }
    for (;;) {
        live_entry e;
        if (!live_take(0, 0, &e))
            break;
        sb_unsubscribe_and_join(e.sub);
        step();
    }
    /* every subscription ever made: done, lifecycle as required */
    int nbad = 0, n = 0;
    for (tsub *ts = all_subs; ts != NULL; ts = ts->next) {
        if (ts->keep != NULL) {
            /* say which one before the watchdog (same 10 s) cuts the wait short */
            double until = tu_now_s() + 3.0;
            while (!sb_subscription_is_done(ts->keep) && tu_now_s() < until)
                tu_sleep_ms(1);
            if (!sb_subscription_is_done(ts->keep)) {
                printf("  not done after 3 s: %s, kind %d, behavior %s, subscribed %d, "
                       "queued %zu, %d calls, %d own unsubscribe\n",
                       sb_subscription_uniqueid(ts->keep), ts->kind, bnames[ts->behavior],
                       sb_subscription_is_subscribed(ts->keep),
                       sb_subscription_queue_length(ts->keep), atomic_load(&ts->count),
                       atomic_load(&ts->own_unsubscribe));
                fflush(stdout);
            }
            WAIT_UNTIL(sb_subscription_is_done(ts->keep) == 1);
            sb_subscription_join(ts->keep);
        }
        nbad += check_tsub(ts);
        n++;
        step();
    }
    tu_check(nbad == 0, __FILE__, __LINE__, "every subscription's lifecycle as required");
    for (trouter *tr = all_routers; tr != NULL; tr = tr->next) {
        WAIT_UNTIL(sb_router_is_done(tr->keep) == 1);
        atomic_store(&tr->done_seen, 1);
        step();
    }
    /* a little later: still nothing after any final message / router end */
    tu_sleep_ms(50);
    long route_calls = 0;
    int route_wrong = 0, route_after = 0;
    for (tsub *ts = all_subs; ts != NULL; ts = ts->next) {
        if (atomic_load(&ts->after_final) != 0 || atomic_load(&ts->in_cb) != 0)
            nbad++;
    }
    for (trouter *tr = all_routers; tr != NULL; tr = tr->next) {
        route_calls += atomic_load(&tr->calls);
        route_wrong += atomic_load(&tr->wrong);
        route_after += atomic_load(&tr->after_done);
    }
    CHECK_EQ_INT(nbad, 0);
    CHECK_EQ_INT(route_wrong, 0);
    CHECK_EQ_INT(route_after, 0);
    CHECK_EQ_INT(atomic_load(&bad_payload), 0);
    CHECK_EQ_INT(atomic_load(&bad_change), 0);
    CHECK_EQ_INT(atomic_load(&bad_update), 0);
    CHECK_EQ_INT(atomic_load(&self_join_no_deadlock), 0);
    CHECK_EQ_INT(atomic_load(&cb_join_incomplete), 0);
    CHECK_EQ_INT(atomic_load(&publish_errors), 0);
    CHECK_EQ_INT(atomic_load(&forward_bad_refusal), 0);

    /* every accepted task ran once; with no subscription, router or task left, both
     * groups ended */
    WAIT_UNTIL(atomic_load(&tasks_run) == atomic_load(&tasks_submitted));
    CHECK_EQ_INT(atomic_load(&tasks_double_run), 0);
    CHECK_EQ_INT(atomic_load(&group_errors), 0);
    for (int i = 0; i < NGROUPS; i++) {
        sb_pool *g = NULL;
        WAIT_UNTIL((g = sb_pool_get(group_names[i])) == NULL || (sb_pool_unref(g), 0));
        step();
    }

    /* release the shared objects */
    for (tsub *ts = all_subs; ts != NULL; ts = ts->next)
        sb_subscription_unref(ts->keep);
    for (trouter *tr = all_routers; tr != NULL; tr = tr->next)
        sb_router_unref(tr->keep);
    sb_topic_pool_unref(tpool);
    sb_topic_unref(pooled_topic);
    sb_cache_unref(cache);
    for (int i = 0; i < NTYPES; i++)
        sb_message_type_unref(ptypes[i]);
    step();

    /* every topic left the registry, every message was destroyed exactly once */
    for (int i = 0; i < NNAMES; i++) {
        WAIT_UNTIL(!topic_registered(names[i]));
        if (!tu_last_wait_ok())
            printf("  topic still registered: %s\n", names[i]);
        step();
    }
    for (int k = 0; k < NTOPICS / 2; k++) {
        for (int j = 0; j < NBALLAST; j++) {
            char n[48];
            ballast_name(n, sizeof n, k, j);
            WAIT_UNTIL(!topic_registered(n));
            if (!tu_last_wait_ok())
                printf("  topic still registered: %s\n", n);
        }
    }
    WAIT_UNTIL(atomic_load(&pay_destroyed) == atomic_load(&pay_created));
    CHECK_EQ_INT(atomic_load(&pay_double_dtor), 0);
    atomic_store(&watchdog_stop, 1);
    pthread_join(wd, NULL);

    long total_ops = 0;
    for (int i = 0; i < OP_COUNT; i++)
        total_ops += atomic_load(&op_count[i]);
    printf("torture: %.1f s with %d workers%s, %ld operations:", run, NWORKERS,
           sync_cross ? " (synchronous cross-publishing on)" : "", total_ops);
    for (int i = 0; i < OP_COUNT; i++)
        printf(" %s %ld%s", op_names[i], atomic_load(&op_count[i]), i + 1 < OP_COUNT ? "," : "\n");
    printf("  %ld tasks submitted to worker groups, all run once\n", atomic_load(&tasks_run));
    printf("  timers cancelled before they fired: %ld\n", atomic_load(&timers_cancelled));
    printf("  publish_sync from callbacks: %ld completed, %ld refused (would deadlock)\n",
           atomic_load(&cb_sync_done), atomic_load(&cb_sync_refused));
    printf("  %d subscriptions (dedicated %d, pool %d, synchronous %d; ", n, by_kind[0],
           by_kind[1], by_kind[2]);
    for (int b = 0; b < B_COUNT; b++)
        printf("%s %d%s", bnames[b], by_behavior[b], b + 1 < B_COUNT ? ", " : ")\n");
    printf("  %d routers (%ld route calls), %ld payloads created and destroyed, %d forwards "
           "refused (cycles), teardown %.1f s\n",
           routers_made, route_calls, atomic_load(&pay_created),
           atomic_load(&forward_refusals), tu_now_s() - start - run);

    while (all_subs != NULL) {
        tsub *ts = all_subs;
        all_subs = ts->next;
        free(ts);
    }
    while (all_routers != NULL) {
        trouter *tr = all_routers;
        all_routers = tr->next;
        free(tr);
    }
    (void)all_count;
    return TEST_DONE();
}
