/*
 * test_router.c - "Message router" section of API.md, for both the dedicated
 * (sb_router_create) and the pool (sb_router_create_pool) variants.
 *
 *  - routing by type; a route callback gets (data, the router's subscription, msg); route
 *    replacement, removal (and removing a missing route: SB_E_INVAL);
 *  - without a default route only routed types are accepted: sb_topic_wants() is 0 and
 *    sb_publish() reaches nobody for other types when the router is the only subscriber;
 *    with a default route everything else goes there;
 *  - cache updates routed by the type of their snapshot (sb_router_add_cache_update /
 *    remove_cache_update) on a caching topic;
 *  - sb_router_publish_sync returns after the router handled the message; from the
 *    router's own route it returns SB_E_DEADLOCK instead of hanging; SB_E_STATE once
 *    unsubscribed;
 *  - sb_router_unsubscribe (returns at once, even while a route is busy), is_done,
 *    unsubscribe_and_join (final message handled last, nothing after it), and from the
 *    router's own route (no deadlock, SB_E_DEADLOCK as last error);
 *  - add / remove while running, racing two publisher threads: routes only ever see their
 *    type, never overlap, keep per-publisher order, and deliver each message at most once;
 *  - "module unload": routers (one on a caching topic, with a cache update route) torn
 *    down with unsubscribe_and_join while publishers run; no route runs afterwards;
 *  - congestion limits: a router whose route is held and whose queue crosses high_water
 *    logs one warning (through sb_set_log_handler) and sb_warning_count() grows by exactly
 *    1; once released every message is routed;
 *  - NULL arguments of every router function: NULL / negative and a fresh sb_last_error.
 */
#include "test_util.h"

#define PL_MAGIC 0x504c4f41u
#define NTHREADS 4 /* publisher indexes: 0..2 threads, 3 = main */

typedef struct pl {
    unsigned magic;
    int thread;
    int seq;
    atomic_int handled; /* times a route saw it */
    atomic_int done;    /* set by hooks */
} pl_t;

static sb_message_type *ta, *tb, *tc; /* payload types: a, b routed; c usually not */
static sb_message_type *snapA, *snapB, *snapC;
static atomic_int pl_created, pl_destroyed;

static void pl_dtor(void *p)
{
    ((pl_t *)p)->magic = 0xdeadu;
    atomic_fetch_add(&pl_destroyed, 1);
    free(p);
}

static sb_message *pl_msg(sb_message_type *t, int thread, int seq)
{
    pl_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->magic = PL_MAGIC;
    p->thread = thread;
    p->seq = seq;
    atomic_init(&p->handled, 0);
    atomic_init(&p->done, 0);
    sb_message *m = sb_message_create(t, p, pl_dtor);
    if (m == NULL) {
        free(p);
        return NULL;
    }
    atomic_fetch_add(&pl_created, 1);
    return m;
}

static int pl_publish(sb_topic *topic, sb_message_type *t, int thread, int seq)
{
    sb_message *m = pl_msg(t, thread, seq);
    int rc = sb_publish(topic, m);
    sb_message_unref(m);
    return rc;
}

static int is_payload_type(sb_message_type *t)
{
    return t == ta || t == tb || t == tc;
}

/* ---- stale-error detection (sb_last_error() is never cleared) ---- */

static void plant_error(void)
{
    sb_eid e;
    (void)sb_eid_from_str("@@stale-marker@@", &e);
}

static int fresh_error(void)
{
    const char *e = sb_last_error();
    return e != NULL && e[0] != '\0' && strstr(e, "@@stale-marker@@") == NULL;
}

#define CHECK_NULL_ERR(expr)                                                            \
    do {                                                                                \
        plant_error();                                                                  \
        CHECK((expr) == NULL);                                                          \
        tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after " #expr); \
    } while (0)

#define CHECK_NEG_ERR(expr)                                                             \
    do {                                                                                \
        plant_error();                                                                  \
        int rc_ = (expr);                                                               \
        tu_check(rc_ < 0, __FILE__, __LINE__, #expr " < 0");                            \
        tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after " #expr); \
    } while (0)

#define CHECK_CODE_ERR(expr, code)                                                      \
    do {                                                                                \
        plant_error();                                                                  \
        CHECK_EQ_INT((expr), (code));                                                   \
        tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after " #expr); \
    } while (0)

/* ---- per-router state shared by its routes, and the generic route callback ---- */

typedef struct rstate {
    pthread_mutex_t mu;
    pthread_t main_tid;
    sb_topic *topic;
    int dedicated;
    int have_first; /* under mu */
    pthread_t first_tid;
    sb_subscription *_Atomic sub;
    char uid[256];  /* under mu */
    atomic_int in_cb, overlaps, on_main, thread_changes, wrong_sub, order_errors, dups,
        bad_payload, finals, after_final, final_seen, bad_final, calls;
    atomic_int last_seq[NTHREADS];
} rstate;

static void rstate_init(rstate *s, sb_topic *topic, int dedicated)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    s->main_tid = pthread_self();
    s->topic = topic;
    s->dedicated = dedicated;
    for (int i = 0; i < NTHREADS; i++)
        atomic_init(&s->last_seq[i], -1);
}

static void rstate_check(rstate *s, const char *what)
{
    char buf[128];
#define RS_ZERO(field)                                                                  \
    do {                                                                                \
        int v_ = atomic_load(&s->field);                                                \
        snprintf(buf, sizeof buf, "%s: " #field " == 0 (got %d)", what, v_);            \
        tu_check(v_ == 0, __FILE__, __LINE__, buf);                                     \
    } while (0)
    RS_ZERO(overlaps);
    RS_ZERO(on_main);
    RS_ZERO(wrong_sub);
    RS_ZERO(order_errors);
    RS_ZERO(dups);
    RS_ZERO(bad_payload);
    RS_ZERO(after_final);
    RS_ZERO(bad_final);
    if (s->dedicated)
        RS_ZERO(thread_changes);
#undef RS_ZERO
    pthread_mutex_destroy(&s->mu);
}

typedef struct route route_t;
typedef void (*route_hook)(route_t *rt, sb_subscription *sub, sb_message *msg);

struct route {
    rstate *st;
    sb_message_type *type; /* expected message type; NULL: any (a default route) */
    sb_message_type *snap; /* cache update route: expected snapshot type */
    atomic_int calls;
    atomic_int wrong;      /* message not for this route */
    atomic_int payloads;
    atomic_int updates;
    route_hook hook;
    void *hook_data;
    /* last cache update seen (borrowed pointers, compared only) */
    sb_message *_Atomic last_old;
    sb_message *_Atomic last_new;
};

static void route_init(route_t *rt, rstate *st, sb_message_type *type, sb_message_type *snap)
{
    memset(rt, 0, sizeof *rt);
    rt->st = st;
    rt->type = type;
    rt->snap = snap;
}

static void route_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    route_t *rt = data;
    rstate *st = rt->st;
    if (atomic_exchange(&st->in_cb, 1))
        atomic_fetch_add(&st->overlaps, 1);
    if (atomic_load(&st->final_seen))
        atomic_fetch_add(&st->after_final, 1);
    atomic_fetch_add(&st->calls, 1);

    /* always the same subscription: the router's */
    sb_subscription *expected = NULL;
    if (!atomic_compare_exchange_strong(&st->sub, &expected, sub) && expected != sub)
        atomic_fetch_add(&st->wrong_sub, 1);
    if (sub == NULL || msg == NULL) {
        atomic_fetch_add(&st->wrong_sub, 1);
        atomic_store(&st->in_cb, 0);
        return;
    }
    pthread_t self = pthread_self();
    if (pthread_equal(self, st->main_tid))
        atomic_fetch_add(&st->on_main, 1);
    pthread_mutex_lock(&st->mu);
    if (!st->have_first) {
        st->have_first = 1;
        st->first_tid = self;
        const char *uid = sb_subscription_uniqueid(sub);
        snprintf(st->uid, sizeof st->uid, "%s", uid ? uid : "");
    } else if (!pthread_equal(self, st->first_tid)) {
        atomic_fetch_add(&st->thread_changes, 1);
    }
    pthread_mutex_unlock(&st->mu);

    sb_message_type *t = sb_message_get_type(msg);
    int final = 0;
    if (rt->snap != NULL) {
        if (t != sb_cache_update_type()) {
            atomic_fetch_add(&rt->wrong, 1);
        } else {
            const sb_cache_update *u = sb_message_data(msg);
            if (u == NULL || u->type != rt->snap)
                atomic_fetch_add(&rt->wrong, 1);
            if (u != NULL) {
                atomic_store(&rt->last_old, u->old_snapshot);
                atomic_store(&rt->last_new, u->new_snapshot);
            }
            atomic_fetch_add(&rt->updates, 1);
        }
    } else if (rt->type != NULL && t != rt->type) {
        atomic_fetch_add(&rt->wrong, 1);
    }
    if (t == sb_cache_update_type() && rt->snap == NULL)
        atomic_fetch_add(&rt->updates, 1);

    if (t == sb_subscription_change_type()) {
        if (sb_subscription_final_message(sub, msg)) {
            final = 1;
            atomic_fetch_add(&st->finals, 1);
            const sb_subscription_change *c = sb_message_data(msg);
            const char *uid = sb_subscription_uniqueid(sub);
            if (c == NULL || c->description == NULL || strcmp(c->description, "Unsubscribe") != 0 ||
                c->uniqueid == NULL || uid == NULL || strcmp(c->uniqueid, uid) != 0 ||
                (st->topic != NULL && c->topic != st->topic))
                atomic_fetch_add(&st->bad_final, 1);
        }
    } else if (is_payload_type(t)) {
        pl_t *p = sb_message_data(msg);
        if (p == NULL || p->magic != PL_MAGIC || p->thread < 0 || p->thread >= NTHREADS) {
            atomic_fetch_add(&st->bad_payload, 1);
        } else {
            if (atomic_fetch_add(&p->handled, 1) != 0)
                atomic_fetch_add(&st->dups, 1);
            int last = atomic_load(&st->last_seq[p->thread]);
            if (p->seq <= last)
                atomic_fetch_add(&st->order_errors, 1);
            atomic_store(&st->last_seq[p->thread], p->seq);
        }
        atomic_fetch_add(&rt->payloads, 1);
    }
    atomic_fetch_add(&rt->calls, 1);
    if (rt->hook != NULL)
        rt->hook(rt, sub, msg);
    if (final)
        atomic_store(&st->final_seen, 1);
    atomic_store(&st->in_cb, 0);
}

static void noop_route(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

static sb_router *make_router(int pool, sb_topic *t)
{
    return pool ? sb_router_create_pool(t) : sb_router_create(t);
}

static const char *kind_name(int pool)
{
    return pool ? "pool" : "dedicated";
}

/* publish one payload with sb_router_publish_sync (a barrier: every earlier message of
 * this thread was handled when it returns) */
static int sync_barrier(sb_router *r, sb_message_type *t, int seq)
{
    sb_message *m = pl_msg(t, 3, seq);
    int rc = sb_router_publish_sync(r, m);
    sb_message_unref(m);
    return rc;
}

/* ------------------------------------------------------------------------------------ */

static void test_routing(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.basic.%s", kind_name(pool));
    sb_topic *topic = sb_topic_create(name);
    rstate st;
    rstate_init(&st, topic, !pool);
    sb_router *r = make_router(pool, topic);
    CHECK(r != NULL);
    if (r == NULL)
        return;
    CHECK(sb_router_ref(r) == r);
    sb_router_unref(r);
    CHECK_EQ_INT(sb_router_is_done(r), 0);
    CHECK_EQ_INT(sb_router_set_congestion_limits(r, 10, 10000), SB_OK);

    /* no routes, no default: no payload type wanted; publishing reaches nobody */
    CHECK_EQ_INT(sb_topic_subscribers(topic), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, ta), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, tc), 0);
    CHECK_EQ_INT(pl_publish(topic, ta, 3, 0), 0);

    route_t ra, rb, rchg, ra2, rdef;
    route_init(&ra, &st, ta, NULL);
    route_init(&rb, &st, tb, NULL);
    route_init(&rchg, &st, sb_subscription_change_type(), NULL);
    route_init(&ra2, &st, ta, NULL);
    route_init(&rdef, &st, NULL, NULL);
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &ra), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, tb, route_cb, &rb), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, sb_subscription_change_type(), route_cb, &rchg), SB_OK);

    /* only routed types are accepted */
    CHECK_EQ_INT(sb_topic_wants(topic, ta), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, tb), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, tc), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, snapA), 0);

    int seq = 1;
    int na = 0, nb = 0;
    for (int i = 0; i < 30; i++) {
        CHECK_EQ_INT(pl_publish(topic, ta, 3, seq++), 1);
        na++;
        if (i % 3 == 0) {
            CHECK_EQ_INT(pl_publish(topic, tb, 3, seq++), 1);
            nb++;
        }
        if (i % 5 == 0) /* unrouted: filtered at publish time, reaches nobody */
            CHECK_EQ_INT(pl_publish(topic, tc, 3, seq++), 0);
    }
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    na++;
    /* publish_sync returned: everything before was handled, by the right route */
    CHECK_EQ_INT(atomic_load(&ra.payloads), na);
    CHECK_EQ_INT(atomic_load(&rb.payloads), nb);
    CHECK_EQ_INT(atomic_load(&ra.wrong), 0);
    CHECK_EQ_INT(atomic_load(&rb.wrong), 0);
    CHECK(atomic_load(&st.sub) != NULL);
    CHECK(atomic_load(&st.sub) != NULL && sb_subscription_is_subscribed(atomic_load(&st.sub)) == 1);

    int chg0 = atomic_load(&rchg.calls);

    /* replace the route of a */
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &ra2), SB_OK);
    for (int i = 0; i < 5; i++)
        pl_publish(topic, ta, 3, seq++);
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&ra2.payloads), 6);
    CHECK_EQ_INT(atomic_load(&ra.payloads), na); /* the old route gets nothing more */

    /* remove the route of a: a is no longer wanted */
    CHECK_EQ_INT(sb_router_remove(r, ta), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(topic, ta), 0);
    CHECK_EQ_INT(pl_publish(topic, ta, 3, seq++), 0);
    CHECK_CODE_ERR(sb_router_remove(r, ta), SB_E_INVAL);
    CHECK_CODE_ERR(sb_router_remove(r, tc), SB_E_INVAL);
    CHECK_CODE_ERR(sb_router_remove_cache_update(r, snapA), SB_E_INVAL);
    CHECK(sync_barrier(r, tb, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&ra2.payloads), 6);
    CHECK_EQ_INT(atomic_load(&rb.payloads), nb + 1);
    nb++;

    /* default route: everything unrouted goes there, routed types still to their route */
    CHECK_EQ_INT(sb_router_set_default(r, route_cb, &rdef), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(topic, tc), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, ta), 1);
    CHECK_EQ_INT(pl_publish(topic, tc, 3, seq++), 1);
    CHECK_EQ_INT(pl_publish(topic, ta, 3, seq++), 1);
    CHECK_EQ_INT(pl_publish(topic, tb, 3, seq++), 1);
    nb++;
    CHECK(sync_barrier(r, tc, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&rdef.payloads), 3); /* c, a, c */
    CHECK_EQ_INT(atomic_load(&rb.payloads), nb);
    CHECK_EQ_INT(atomic_load(&ra2.payloads), 6);
    CHECK_EQ_INT(atomic_load(&rchg.calls), chg0); /* changes have their own route */

    /* another subscriber's change messages go to the change route */
    sb_subscription *s2 = sb_subscribe_synchronous(topic, noop_route, NULL);
    CHECK(s2 != NULL);
    CHECK(sync_barrier(r, tb, seq++) >= 1);
    nb++;
    CHECK_EQ_INT(atomic_load(&rchg.calls), chg0 + 1);
    s2 = sb_unsubscribe_and_join(s2);
    CHECK(sync_barrier(r, tb, seq++) >= 1);
    nb++;
    CHECK_EQ_INT(atomic_load(&rchg.calls), chg0 + 2);
    CHECK_EQ_INT(atomic_load(&st.finals), 0);

    /* unsubscribe_and_join: everything before is handled, then the final message */
    sb_router *ref = sb_router_ref(r);
    for (int i = 0; i < 10; i++) {
        pl_publish(topic, tb, 3, seq++);
        nb++;
    }
    r = sb_router_unsubscribe_and_join(r);
    CHECK(r == NULL);
    CHECK_EQ_INT(sb_router_is_done(ref), 1);
    CHECK_EQ_INT(atomic_load(&st.finals), 1);
    CHECK_EQ_INT(atomic_load(&rb.payloads), nb);
    /* nothing more: publishing reaches nobody, publish_sync is refused */
    CHECK_EQ_INT(pl_publish(topic, tb, 3, seq++), 0);
    CHECK_EQ_INT(sb_topic_subscribers(topic), 0);
    sb_message *late = pl_msg(tb, 3, seq++);
    CHECK_NEG_ERR(sb_router_publish_sync(ref, late));
    sb_message_unref(late);
    int calls = atomic_load(&st.calls);
    CHECK_STAYS(atomic_load(&st.calls) == calls, 30);
    CHECK_EQ_INT(sb_router_is_done(ref), 1);
    sb_router_unref(ref);

    /* the state each route was given was the router's subscription all along */
    rstate_check(&st, kind_name(pool));
    CHECK(atomic_load(&rdef.wrong) == 0 && atomic_load(&rchg.wrong) == 0);
    sb_topic_unref(topic);
}

/* ---- cache updates routed by snapshot type ---- */

typedef struct snap {
    char id[16];
} snap_t;

static const char *snap_id(sb_message *msg)
{
    sb_message_type *t = sb_message_get_type(msg);
    if (t != snapA && t != snapB && t != snapC)
        return NULL;
    snap_t *s = sb_message_data(msg);
    return s != NULL ? s->id : NULL;
}

static sb_message *snap_msg(sb_message_type *t, const char *id)
{
    snap_t *s = calloc(1, sizeof *s);
    snprintf(s->id, sizeof s->id, "%s", id);
    sb_message *m = sb_message_create(t, s, free);
    if (m == NULL)
        free(s);
    return m;
}

static void test_cache_update_routes(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.cu.%s", kind_name(pool));
    sb_topic *orig = sb_topic_create(name);
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    sb_topic *ctop = sb_caching_get_topic(ct);
    rstate st;
    rstate_init(&st, ctop, !pool);
    sb_router *r = make_router(pool, ctop);
    CHECK(r != NULL);
    if (r == NULL)
        return;
    route_t cuA, cuB, rbar, rdef;
    route_init(&cuA, &st, NULL, snapA);
    route_init(&cuB, &st, NULL, snapB);
    route_init(&rbar, &st, ta, NULL); /* barrier messages published straight to ctop */
    route_init(&rdef, &st, NULL, NULL);
    CHECK_EQ_INT(sb_topic_wants(ctop, sb_cache_update_type()), 0);
    CHECK_EQ_INT(sb_router_add_cache_update(r, snapA, route_cb, &cuA), SB_OK);
    CHECK_EQ_INT(sb_router_add_cache_update(r, snapB, route_cb, &cuB), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &rbar), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(ctop, sb_cache_update_type()), 1);
    CHECK_EQ_INT(sb_topic_wants(ctop, snapA), 0); /* the snapshot type itself is not routed */
    CHECK_EQ_INT(sb_topic_wants(ctop, tb), 0);

    int seq = 0;
    sb_message *xa = snap_msg(snapA, "x");
    sb_message *yb = snap_msg(snapB, "y");
    sb_message *zc = snap_msg(snapC, "z");
    sb_publish(orig, xa);
    sb_publish(orig, yb);
    sb_publish(orig, zc); /* cached, but no route and no default */
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&cuA.updates), 1);
    CHECK(atomic_load(&cuA.last_old) == NULL && atomic_load(&cuA.last_new) == xa);
    CHECK_EQ_INT(atomic_load(&cuB.updates), 1);
    CHECK(atomic_load(&cuB.last_old) == NULL && atomic_load(&cuB.last_new) == yb);
    CHECK_EQ_INT(atomic_load(&cuA.wrong) + atomic_load(&cuB.wrong), 0);
    sb_message *g = sb_cache_get(cache, snapC, "z");
    CHECK(g == zc);
    sb_message_unref(g);

    /* clear x: (x, NULL) to the snapA route */
    sb_message *clr = sb_cache_clear_create(xa);
    sb_publish(orig, clr);
    sb_message_unref(clr);
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&cuA.updates), 2);
    CHECK(atomic_load(&cuA.last_old) == xa && atomic_load(&cuA.last_new) == NULL);
    CHECK_EQ_INT(atomic_load(&cuB.updates), 1);

    /* default route: updates of unrouted snapshot types go there */
    CHECK_EQ_INT(sb_router_set_default(r, route_cb, &rdef), SB_OK);
    sb_message *zc2 = snap_msg(snapC, "z");
    sb_message *xa2 = snap_msg(snapA, "x");
    sb_publish(orig, zc2);
    sb_publish(orig, xa2);
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&rdef.updates), 1);
    CHECK_EQ_INT(atomic_load(&cuA.updates), 3);
    CHECK(atomic_load(&cuA.last_new) == xa2);

    /* remove the snapA route: its updates now go to the default */
    CHECK_EQ_INT(sb_router_remove_cache_update(r, snapA), SB_OK);
    CHECK_CODE_ERR(sb_router_remove_cache_update(r, snapA), SB_E_INVAL);
    sb_message *xa3 = snap_msg(snapA, "x");
    sb_publish(orig, xa3);
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&cuA.updates), 3);
    CHECK_EQ_INT(atomic_load(&rdef.updates), 2);
    CHECK_EQ_INT(sb_router_remove_cache_update(r, snapB), SB_OK);

    r = sb_router_unsubscribe_and_join(r);
    rstate_check(&st, "cache update router");

    /* a second router without default: removing its last cache update route stops
     * cache updates from being wanted */
    rstate st2;
    rstate_init(&st2, ctop, !pool);
    sb_router *r2 = make_router(pool, ctop);
    route_t cu2;
    route_init(&cu2, &st2, NULL, snapB);
    CHECK_EQ_INT(sb_router_add_cache_update(r2, snapB, route_cb, &cu2), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(ctop, sb_cache_update_type()), 1);
    sb_message *yb2 = snap_msg(snapB, "y");
    sb_publish(orig, yb2);
    WAIT_UNTIL(atomic_load(&cu2.updates) == 1);
    CHECK(atomic_load(&cu2.last_old) == yb && atomic_load(&cu2.last_new) == yb2);
    CHECK_EQ_INT(sb_router_remove_cache_update(r2, snapB), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(ctop, sb_cache_update_type()), 0);
    r2 = sb_router_unsubscribe_and_join(r2);
    rstate_check(&st2, "cache update router 2");

    ct = sb_caching_unsubscribe_and_join(ct);
    sb_message *all[] = {xa, yb, zc, zc2, xa2, xa3, yb2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        sb_message_unref(all[i]);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- publish_sync ---- */

static void hook_slow_mark(route_t *rt, sb_subscription *sub, sb_message *msg)
{
    (void)rt;
    (void)sub;
    tu_sleep_ms(3);
    pl_t *p = sb_message_data(msg);
    if (p != NULL && p->magic == PL_MAGIC)
        atomic_store(&p->done, 1);
}

static atomic_int self_sync_rc;
static atomic_int self_sync_err_fresh;
static atomic_int self_sync_calls;

/* publish_sync to the router from one of its own routes: must not hang */
static void hook_self_sync(route_t *rt, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    (void)msg;
    if (atomic_fetch_add(&self_sync_calls, 1) != 0)
        return; /* only once (the nested message comes back here) */
    sb_router *r = rt->hook_data;
    sb_message *m = pl_msg(tc, 2, 1000000);
    plant_error();
    int rc = sb_router_publish_sync(r, m);
    atomic_store(&self_sync_rc, rc);
    atomic_store(&self_sync_err_fresh, fresh_error());
    sb_message_unref(m);
}

static void test_publish_sync(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.sync.%s", kind_name(pool));
    sb_topic *topic = sb_topic_create(name);
    rstate st;
    rstate_init(&st, topic, !pool);
    sb_router *r = make_router(pool, topic);
    CHECK(r != NULL);
    if (r == NULL)
        return;
    route_t ra, rb, rc_route;
    route_init(&ra, &st, ta, NULL);
    route_init(&rb, &st, tb, NULL);
    route_init(&rc_route, &st, tc, NULL);
    ra.hook = hook_slow_mark;
    rb.hook = hook_self_sync;
    rb.hook_data = r;
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &ra), SB_OK);

    int n = tu_scale(20, 5);
    int all_done = 1;
    for (int i = 0; i < n; i++) {
        sb_message *m = pl_msg(ta, 3, i);
        pl_t *p = sb_message_data(m);
        int rc = sb_router_publish_sync(r, m);
        CHECK(rc >= 1);
        all_done &= atomic_load(&p->done) == 1; /* handled (slowly) before the return */
        sb_message_unref(m);
    }
    CHECK(all_done);
    CHECK_EQ_INT(atomic_load(&ra.payloads), n);

    /* an unrouted type (no default): filtered out, publish_sync returns without waiting */
    sb_message *mc = pl_msg(tc, 3, n);
    CHECK(sb_router_publish_sync(r, mc) >= 0);
    sb_message_unref(mc);
    CHECK_EQ_INT(atomic_load(&st.calls), n);

    /* from the router's own route: SB_E_DEADLOCK instead of a hang; the message is
     * still delivered (after that callback returns) */
    CHECK_EQ_INT(sb_router_add(r, tb, route_cb, &rb), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, tc, route_cb, &rc_route), SB_OK);
    sb_message *mb = pl_msg(tb, 3, n + 1);
    CHECK(sb_router_publish_sync(r, mb) >= 1);
    sb_message_unref(mb);
    CHECK_EQ_INT(atomic_load(&self_sync_calls), 1);
    CHECK_EQ_INT(atomic_load(&self_sync_rc), SB_E_DEADLOCK);
    CHECK(atomic_load(&self_sync_err_fresh));
    WAIT_UNTIL(atomic_load(&rc_route.payloads) == 1);

    sb_router *ref = sb_router_ref(r);
    r = sb_router_unsubscribe_and_join(r);
    sb_message *late = pl_msg(ta, 3, n + 2);
    CHECK_CODE_ERR(sb_router_publish_sync(ref, late), SB_E_STATE);
    sb_message_unref(late);
    sb_router_unref(ref);
    rstate_check(&st, "publish_sync router");
    sb_topic_unref(topic);
}

/* ---- sb_router_unsubscribe returns at once; is_done; join from the router's own route ---- */

static atomic_int gate_open;
static atomic_int gate_waiting;

static void hook_gate(route_t *rt, sb_subscription *sub, sb_message *msg)
{
    (void)rt;
    (void)sub;
    (void)msg;
    atomic_fetch_add(&gate_waiting, 1);
    double deadline = tu_now_s() + tu_wait_seconds();
    while (!atomic_load(&gate_open) && tu_now_s() < deadline)
        tu_sleep_ms(1);
}

static atomic_int join_self_done;
static atomic_int join_self_fresh;
static atomic_int join_self_calls;

static void hook_join_self(route_t *rt, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    pl_t *p = sb_message_data(msg);
    if (p == NULL || p->magic != PL_MAGIC || p->seq != 202) /* the last one published */
        return;
    if (atomic_fetch_add(&join_self_calls, 1) != 0)
        return;
    sb_router *r = rt->hook_data; /* the module's own reference */
    plant_error();
    sb_router *ret = sb_router_unsubscribe_and_join(r);
    atomic_store(&join_self_fresh, fresh_error() && ret == NULL);
    atomic_store(&join_self_done, 1);
}

static void test_unsubscribe(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.unsub.%s", kind_name(pool));
    sb_topic *topic = sb_topic_create(name);

    /* 1: sb_router_unsubscribe while a route is blocked: returns at once, not done yet */
    rstate st;
    rstate_init(&st, topic, !pool);
    sb_router *r = make_router(pool, topic);
    route_t ra, rchg;
    route_init(&ra, &st, ta, NULL);
    route_init(&rchg, &st, sb_subscription_change_type(), NULL);
    ra.hook = hook_gate;
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &ra), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, sb_subscription_change_type(), route_cb, &rchg), SB_OK);
    atomic_store(&gate_open, 0);
    for (int i = 0; i < 5; i++)
        pl_publish(topic, ta, 3, i);
    WAIT_UNTIL(atomic_load(&gate_waiting) >= 1); /* the first one is blocked */
    sb_router *ref = sb_router_ref(r);
    r = sb_router_unsubscribe(r);
    CHECK(r == NULL);
    CHECK_EQ_INT(sb_router_is_done(ref), 0); /* a route is still blocked */
    CHECK_EQ_INT(sb_topic_wants(topic, ta), 0);
    CHECK_EQ_INT(pl_publish(topic, ta, 3, 100), 0); /* no longer subscribed */
    atomic_store(&gate_open, 1);
    WAIT_UNTIL(sb_router_is_done(ref) == 1);
    CHECK_EQ_INT(atomic_load(&ra.payloads), 5);
    CHECK_EQ_INT(atomic_load(&st.finals), 1);
    CHECK_STAYS(atomic_load(&ra.payloads) == 5, 20);
    sb_router_unref(ref);
    rstate_check(&st, "unsubscribe");

    /* 2: unsubscribe_and_join from the router's own route: no deadlock */
    rstate st2;
    rstate_init(&st2, topic, !pool);
    sb_router *r2 = make_router(pool, topic);
    sb_router *ref2 = sb_router_ref(r2);
    route_t rj, rchg2;
    route_init(&rj, &st2, ta, NULL);
    route_init(&rchg2, &st2, sb_subscription_change_type(), NULL);
    rj.hook = hook_join_self;
    rj.hook_data = r2; /* the route releases this reference */
    CHECK_EQ_INT(sb_router_add(r2, ta, route_cb, &rj), SB_OK);
    CHECK_EQ_INT(sb_router_add(r2, sb_subscription_change_type(), route_cb, &rchg2), SB_OK);
    for (int i = 0; i < 3; i++)
        pl_publish(topic, ta, 3, 200 + i);
    WAIT_UNTIL(atomic_load(&join_self_done) == 1);
    CHECK(atomic_load(&join_self_fresh)); /* returned NULL, last error set (SB_E_DEADLOCK) */
    WAIT_UNTIL(sb_router_is_done(ref2) == 1);
    CHECK_EQ_INT(atomic_load(&st2.finals), 1);
    /* messages published before the unsubscribe were still delivered, then the final one */
    CHECK_EQ_INT(atomic_load(&rj.payloads), 3);
    sb_router_unref(ref2);
    rstate_check(&st2, "join from own route");

    sb_topic_unref(topic);
}

/* ---- add / remove while running, racing two publishers ---- */

typedef struct rpub {
    sb_topic *topic;
    int idx;
    int n;               /* at least this many */
    atomic_int *published;
    atomic_int *stop;    /* then until this is set */
} rpub_t;

static void *race_publisher(void *arg)
{
    rpub_t *p = arg;
    for (int s = 0; s < p->n || !atomic_load(p->stop); s++) {
        sb_message_type *t = (s % 3 == 2) ? tc : ((s & 1) ? tb : ta);
        pl_publish(p->topic, t, p->idx, s);
        atomic_fetch_add(p->published, 1);
        if (s % 64 == 63)
            tu_sleep_us(50); /* keep the router's backlog bounded */
    }
    return NULL;
}

static void test_add_remove_race(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.race.%s", kind_name(pool));
    sb_topic *topic = sb_topic_create(name);
    rstate st;
    rstate_init(&st, topic, !pool);
    sb_router *r = make_router(pool, topic);
    CHECK(r != NULL);
    if (r == NULL)
        return;
    route_t a1, a2, b1, c1;
    route_init(&a1, &st, ta, NULL);
    route_init(&a2, &st, ta, NULL);
    route_init(&b1, &st, tb, NULL);
    route_init(&c1, &st, tc, NULL);
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &a1), SB_OK);

    atomic_int published, stop;
    atomic_init(&published, 0);
    atomic_init(&stop, 0);
    int per = tu_scale(20000, 1000);
    int min_ops = tu_scale(2000, 200);
    rpub_t pubs[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        pubs[i].topic = topic;
        pubs[i].idx = i;
        pubs[i].n = per;
        pubs[i].published = &published;
        pubs[i].stop = &stop;
        pthread_create(&th[i], NULL, race_publisher, &pubs[i]);
    }
    int ops = 0, bad_rc = 0;
    while (ops < min_ops || atomic_load(&published) < 2 * per) {
        int rc = SB_OK;
        switch (ops % 6) {
        case 0: rc = sb_router_add(r, ta, route_cb, &a2); break;
        case 1: rc = sb_router_add(r, tb, route_cb, &b1); break;
        case 2: rc = sb_router_add(r, tc, route_cb, &c1); break;
        case 3: rc = sb_router_remove(r, tb); break;
        case 4: rc = sb_router_add(r, ta, route_cb, &a1); break;
        case 5: rc = sb_router_remove(r, tc); break;
        }
        if (rc != SB_OK)
            bad_rc++;
        ops++;
        if (ops % 16 == 0)
            tu_sleep_us(20);
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    CHECK_EQ_INT(bad_rc, 0);
    int npub = atomic_load(&published);

    /* settle: every type routed, then a barrier */
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &a1), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, tb, route_cb, &b1), SB_OK);
    CHECK_EQ_INT(sb_router_add(r, tc, route_cb, &c1), SB_OK);
    int seq = 0;
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    int total = atomic_load(&a1.payloads) + atomic_load(&a2.payloads) +
                atomic_load(&b1.payloads) + atomic_load(&c1.payloads);
    CHECK(total <= npub + 1);
    CHECK(total > 0);
    CHECK_EQ_INT(atomic_load(&a1.wrong) + atomic_load(&a2.wrong) + atomic_load(&b1.wrong) +
                     atomic_load(&c1.wrong), 0);

    /* with the routes stable, every message is delivered to its route */
    int a0 = atomic_load(&a1.payloads), b0 = atomic_load(&b1.payloads),
        c0 = atomic_load(&c1.payloads);
    for (int i = 0; i < 10; i++) {
        pl_publish(topic, ta, 3, seq++);
        pl_publish(topic, tb, 3, seq++);
        pl_publish(topic, tc, 3, seq++);
    }
    CHECK(sync_barrier(r, tc, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&a1.payloads) - a0, 10);
    CHECK_EQ_INT(atomic_load(&b1.payloads) - b0, 10);
    CHECK_EQ_INT(atomic_load(&c1.payloads) - c0, 11);

    r = sb_router_unsubscribe_and_join(r);
    rstate_check(&st, pool ? "race (pool)" : "race (dedicated)");
    sb_topic_unref(topic);
}

/* ---- module unload: no route runs after sb_router_unsubscribe_and_join returned ---- */

static atomic_int mod_loaded;
static atomic_int mod_calls;
static atomic_int mod_calls_unloaded;

static void mod_route(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
    /* must neither start nor still be running once the module is unloaded (the sleep
     * keeps calls in flight long enough for an early return to show) */
    atomic_fetch_add(&mod_calls, 1);
    if (!atomic_load(&mod_loaded))
        atomic_fetch_add(&mod_calls_unloaded, 1);
    tu_sleep_us(100);
    if (!atomic_load(&mod_loaded))
        atomic_fetch_add(&mod_calls_unloaded, 1);
}

typedef struct module {
    sb_router *r_orig;   /* routes a and b on the original topic */
    sb_router *r_cached; /* routes cache updates of snapA */
} module_t;

static void module_load(module_t *m, sb_topic *orig, sb_topic *cached, int pool)
{
    atomic_store(&mod_loaded, 1);
    m->r_orig = make_router(pool, orig);
    m->r_cached = make_router(!pool, cached);
    CHECK(m->r_orig != NULL && m->r_cached != NULL);
    CHECK_EQ_INT(sb_router_add(m->r_orig, ta, mod_route, NULL), SB_OK);
    CHECK_EQ_INT(sb_router_add(m->r_orig, tb, mod_route, NULL), SB_OK);
    CHECK_EQ_INT(sb_router_add_cache_update(m->r_cached, snapA, mod_route, NULL), SB_OK);
    CHECK_EQ_INT(sb_router_set_default(m->r_cached, mod_route, NULL), SB_OK);
}

static void module_unload(module_t *m)
{
    m->r_orig = sb_router_unsubscribe_and_join(m->r_orig);
    m->r_cached = sb_router_unsubscribe_and_join(m->r_cached);
    atomic_store(&mod_loaded, 0); /* "dlclose" */
}

typedef struct modpub {
    sb_topic *topic;
    atomic_int stop;
    atomic_int published;
    int idx;
} modpub_t;

static void *mod_publisher(void *arg)
{
    modpub_t *p = arg;
    int s = 0;
    char id[8];
    while (!atomic_load(&p->stop)) {
        if (s % 2 == 0) {
            pl_publish(p->topic, (s & 2) ? ta : tb, p->idx, s);
        } else {
            snprintf(id, sizeof id, "k%d", s % 5);
            sb_message *m = snap_msg(snapA, id);
            sb_publish(p->topic, m);
            sb_message_unref(m);
        }
        s++;
        atomic_fetch_add(&p->published, 1);
        if (s % 8 == 0)
            tu_sleep_us(tu_slow() ? 2000 : 200); /* keep the routers' backlog bounded */
    }
    return NULL;
}

static void test_module_unload(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.module.%s", kind_name(pool));
    sb_topic *orig = sb_topic_create(name);
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    sb_topic *cached = sb_caching_get_topic(ct);
    int rounds = tu_scale(10, 2);
    for (int round = 0; round < rounds; round++) {
        module_t mod;
        module_load(&mod, orig, cached, pool);
        modpub_t p[2];
        pthread_t th[2];
        for (int i = 0; i < 2; i++) {
            p[i].topic = orig;
            p[i].idx = i;
            atomic_init(&p[i].stop, 0);
            atomic_init(&p[i].published, 0);
            pthread_create(&th[i], NULL, mod_publisher, &p[i]);
        }
        WAIT_UNTIL(atomic_load(&p[0].published) + atomic_load(&p[1].published) >= 100);
        WAIT_UNTIL(atomic_load(&mod_calls) > 0);
        module_unload(&mod);
        int after = atomic_load(&mod_calls);
        int pubd = atomic_load(&p[0].published) + atomic_load(&p[1].published);
        WAIT_UNTIL(atomic_load(&p[0].published) + atomic_load(&p[1].published) >= pubd + 100);
        for (int i = 0; i < 2; i++) {
            atomic_store(&p[i].stop, 1);
            pthread_join(th[i], NULL);
        }
        CHECK_EQ_INT(atomic_load(&mod_calls), after);
        CHECK_EQ_INT(atomic_load(&mod_calls_unloaded), 0);
    }
    ct = sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- congestion: a blocked router warns once when its queue crosses high_water ---- */

#define CONG_LOW 2
#define CONG_HIGH 10
#define CONG_BELOW 5          /* queued behind the blocked one: below the mark */
#define CONG_TOTAL (3 * CONG_HIGH) /* in all, while blocked: well past the mark */

static atomic_int cong_open;
static atomic_int cong_waiting;

/* holds the route on the first payload (seq 0), so the rest queues up behind it */
static void hook_cong_gate(route_t *rt, sb_subscription *sub, sb_message *msg)
{
    (void)rt;
    (void)sub;
    pl_t *p = sb_message_data(msg);
    if (p == NULL || p->magic != PL_MAGIC || p->seq != 0)
        return;
    atomic_fetch_add(&cong_waiting, 1);
    double deadline = tu_now_s() + tu_wait_seconds();
    while (!atomic_load(&cong_open) && tu_now_s() < deadline)
        tu_sleep_ms(1);
}

/* every line the library logs while the handler is installed */
typedef struct log_cap {
    pthread_mutex_t mu;
    char needle[256];  /* the router subscription's uniqueid */
    int warnings;      /* warning / error lines (those sb_warning_count counts) */
    int matching;      /* ... of them naming the router's subscription */
    char first[512];   /* the first warning / error line */
} log_cap_t;

static void cap_log(void *data, int level, const char *text)
{
    log_cap_t *c = data;
    pthread_mutex_lock(&c->mu);
    if (level <= SB_LOG_WARNING) {
        if (c->warnings++ == 0)
            snprintf(c->first, sizeof c->first, "%d: %s", level, text ? text : "(null)");
        if (level == SB_LOG_WARNING && text != NULL && c->needle[0] && strstr(text, c->needle))
            c->matching++;
    }
    pthread_mutex_unlock(&c->mu);
}

static void cap_counts(log_cap_t *c, int *warnings, int *matching)
{
    pthread_mutex_lock(&c->mu);
    *warnings = c->warnings;
    *matching = c->matching;
    pthread_mutex_unlock(&c->mu);
}

/*
 * sb_router_set_congestion_limits acts on the router's subscription: "when a
 * subscription's queue grows past high_water a warning is reported once (log line and
 * counter)". The route is held on the first message so that the backlog is known: a few
 * messages below the mark warn nothing; going well past it warns exactly once (one log
 * line naming the router's subscription, sb_warning_count() + 1), not once per message
 * above the mark; once released every message is routed, and draining warns nothing.
 */
static void test_congestion(int pool)
{
    char name[64];
    snprintf(name, sizeof name, "router.congestion.%s", kind_name(pool));
    sb_topic *topic = sb_topic_create(name);
    rstate st;
    rstate_init(&st, topic, !pool);
    sb_router *r = make_router(pool, topic);
    CHECK(r != NULL);
    if (r == NULL)
        return;
    route_t ra;
    route_init(&ra, &st, ta, NULL);
    ra.hook = hook_cong_gate;
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &ra), SB_OK);
    CHECK_EQ_INT(sb_router_set_congestion_limits(r, CONG_LOW, CONG_HIGH), SB_OK);

    log_cap_t cap;
    memset(&cap, 0, sizeof cap);
    pthread_mutex_init(&cap.mu, NULL);
    sb_set_log_handler(cap_log, &cap);
    uint64_t w0 = sb_warning_count();
    int warnings, matching;

    atomic_store(&cong_open, 0);
    atomic_store(&cong_waiting, 0);
    int seq = 0;
    CHECK_EQ_INT(pl_publish(topic, ta, 3, seq++), 1);
    WAIT_UNTIL(atomic_load(&cong_waiting) == 1); /* the route is held */
    pthread_mutex_lock(&st.mu);                  /* route_cb noted the uniqueid */
    pthread_mutex_lock(&cap.mu);
    snprintf(cap.needle, sizeof cap.needle, "%s", st.uid);
    pthread_mutex_unlock(&cap.mu);
    pthread_mutex_unlock(&st.mu);
    CHECK(cap.needle[0] != '\0');

    /* below high_water (the held batch counts too, but holds at most the Subscribe
     * change and seq 0): no warning */
    while (seq <= CONG_BELOW)
        CHECK_EQ_INT(pl_publish(topic, ta, 3, seq++), 1);
    cap_counts(&cap, &warnings, &matching);
    CHECK_EQ_INT(warnings, 0);
    CHECK_EQ_INT(sb_warning_count() - w0, 0);

    /* well past high_water: one warning for the crossing */
    while (seq < CONG_TOTAL)
        CHECK_EQ_INT(pl_publish(topic, ta, 3, seq++), 1);
    WAIT_UNTIL(sb_warning_count() - w0 >= 1);
    CHECK_STAYS(sb_warning_count() - w0 == 1, 20); /* still held: nothing drains */
    CHECK_EQ_INT(sb_warning_count() - w0, 1);
    /* the line reaches the handler from the library's log thread */
    WAIT_UNTIL((cap_counts(&cap, &warnings, &matching), warnings >= 1));
    cap_counts(&cap, &warnings, &matching);
    CHECK_EQ_INT(warnings, 1);
    CHECK_EQ_INT(matching, 1); /* a warning-level line naming the router's subscription */
    if (matching != 1) {
        pthread_mutex_lock(&cap.mu);
        printf("  uniqueid %s, first warning line: %s\n", cap.needle, cap.first);
        pthread_mutex_unlock(&cap.mu);
    }
    sb_subscription *sub = atomic_load(&st.sub);
    CHECK(sub != NULL && sb_subscription_congestion_warnings(sub) == 1);
    CHECK_EQ_INT(atomic_load(&ra.payloads), 1); /* only the held one so far */

    /* released: everything is routed, in order (rstate_check), and draining is silent */
    atomic_store(&cong_open, 1);
    CHECK(sync_barrier(r, ta, seq++) >= 1);
    CHECK_EQ_INT(atomic_load(&ra.payloads), seq);
    CHECK_EQ_INT(atomic_load(&ra.wrong), 0);
    CHECK_EQ_INT(sb_warning_count() - w0, 1);
    cap_counts(&cap, &warnings, &matching);
    CHECK_EQ_INT(warnings, 1);

    /* back to stderr, the handler the rest of this program runs with (the API has no
     * getter for the previous one, and nothing else here installs one) */
    sb_set_log_handler(NULL, NULL);
    r = sb_router_unsubscribe_and_join(r);
    rstate_check(&st, pool ? "congestion (pool)" : "congestion (dedicated)");
    pthread_mutex_destroy(&cap.mu);
    sb_topic_unref(topic);
}

/* ---- NULL arguments ---- */

static void test_null_args(void)
{
    sb_topic *topic = sb_topic_create("router.nulls");
    sb_router *r = sb_router_create(topic);
    CHECK(r != NULL);
    if (r == NULL)
        return;
    sb_message *m = pl_msg(ta, 3, 0);

    CHECK_NULL_ERR(sb_router_create(NULL));
    CHECK_NULL_ERR(sb_router_create_pool(NULL));
    CHECK_NEG_ERR(sb_router_add(NULL, ta, noop_route, NULL));
    CHECK_NEG_ERR(sb_router_add(r, NULL, noop_route, NULL));
    CHECK_NEG_ERR(sb_router_add(r, ta, NULL, NULL));
    CHECK_NEG_ERR(sb_router_add_cache_update(NULL, snapA, noop_route, NULL));
    CHECK_NEG_ERR(sb_router_add_cache_update(r, NULL, noop_route, NULL));
    CHECK_NEG_ERR(sb_router_add_cache_update(r, snapA, NULL, NULL));
    CHECK_NEG_ERR(sb_router_remove(NULL, ta));
    CHECK_NEG_ERR(sb_router_remove(r, NULL));
    CHECK_NEG_ERR(sb_router_remove_cache_update(NULL, snapA));
    CHECK_NEG_ERR(sb_router_remove_cache_update(r, NULL));
    CHECK_NEG_ERR(sb_router_set_default(NULL, noop_route, NULL));
    CHECK_NEG_ERR(sb_router_set_default(r, NULL, NULL));
    CHECK_NEG_ERR(sb_router_set_congestion_limits(NULL, 1, 10));
    CHECK_NEG_ERR(sb_router_set_congestion_limits(r, -1, 10));
    CHECK_NEG_ERR(sb_router_set_congestion_limits(r, 5, 0));
    CHECK_NEG_ERR(sb_router_set_congestion_limits(r, 20, 10));
    CHECK_NEG_ERR(sb_router_publish_sync(NULL, m));
    CHECK_NEG_ERR(sb_router_publish_sync(r, NULL));
    CHECK_NULL_ERR(sb_router_unsubscribe(NULL));
    CHECK_NULL_ERR(sb_router_unsubscribe_and_join(NULL));
    plant_error();
    CHECK(sb_router_is_done(NULL) != 1);
    tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after sb_router_is_done(NULL)");
    CHECK_NULL_ERR(sb_router_ref(NULL));
    sb_router_unref(NULL); /* NULL-safe */
    /* a wrong-type handle (a topic passed as a router) is refused */
    CHECK_NEG_ERR(sb_router_add((sb_router *)topic, ta, noop_route, NULL));

    /* the failed calls changed nothing: no route was added (a is not wanted) */
    CHECK_EQ_INT(sb_topic_wants(topic, ta), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, snapA), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, sb_cache_update_type()), 0);
    /* and the router still works */
    rstate st;
    rstate_init(&st, topic, 1);
    route_t ra;
    route_init(&ra, &st, ta, NULL);
    CHECK_EQ_INT(sb_router_add(r, ta, route_cb, &ra), SB_OK);
    CHECK(sb_router_publish_sync(r, m) >= 1);
    CHECK_EQ_INT(atomic_load(&ra.payloads), 1);

    r = sb_router_unsubscribe_and_join(r);
    rstate_check(&st, "nulls");
    sb_message_unref(m);
    sb_topic_unref(topic);
}

/* run one test; with SB_TEST_TIMING set, print its duration on stderr */
#define TIMED(call)                                                                     \
    do {                                                                                \
        double t0_ = tu_now_s();                                                        \
        call;                                                                           \
        if (getenv("SB_TEST_TIMING") != NULL)                                           \
            fprintf(stderr, "%-40s %.2f s\n", #call, tu_now_s() - t0_);                \
    } while (0)

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("router.a", NULL, &ta), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("router.b", NULL, &tb), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("router.c", NULL, &tc), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("router.snapA", NULL, &snapA), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("router.snapB", NULL, &snapB), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("router.snapC", NULL, &snapC), SB_OK);

    for (int pool = 0; pool < 2; pool++) {
        TIMED(test_routing(pool));
        TIMED(test_cache_update_routes(pool));
        TIMED(test_publish_sync(pool));
        atomic_store(&self_sync_calls, 0);
        TIMED(test_unsubscribe(pool));
        atomic_store(&gate_waiting, 0);
        atomic_store(&join_self_calls, 0);
        atomic_store(&join_self_done, 0);
        TIMED(test_add_remove_race(pool));
        TIMED(test_module_unload(pool));
        TIMED(test_congestion(pool));
    }
    TIMED(test_null_args());

    WAIT_UNTIL(atomic_load(&pl_destroyed) == atomic_load(&pl_created));
    CHECK_EQ_INT(atomic_load(&pl_destroyed), atomic_load(&pl_created));
    sb_message_type_unref(ta);
    sb_message_type_unref(tb);
    sb_message_type_unref(tc);
    sb_message_type_unref(snapA);
    sb_message_type_unref(snapB);
    sb_message_type_unref(snapC);
    return TEST_DONE();
}
