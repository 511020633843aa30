/*
 * test_edges.c - edges a module author meets (Conventions, Subscriptions and Caches in
 * API.md):
 *
 *  - sb_last_error_code(): the code of the latest call on this thread, 0 after a call
 *    that succeeded; sb_last_error() and sb_last_error_code() leave it alone; a call that
 *    a callback makes inside a library call does not change the outcome of that call;
 *  - sb_subscription_join returns SB_OK, or SB_E_DEADLOCK when refused from the
 *    subscription's own callback; sb_unsubscribe_and_join, sb_router_unsubscribe_and_join
 *    and sb_caching_unsubscribe_and_join refused from their own callback leave
 *    SB_E_DEADLOCK in sb_last_error_code();
 *  - messages of the library's own types (subscription change, cache update, cache
 *    clear) cannot be made with the public constructors (SB_E_INVAL), even through a type
 *    handle found by name;
 *  - yes/no functions return a negative code for a NULL or wrong handle (a `while
 *    (!is_done)` loop ends), count functions 0 with sb_last_error_code() set;
 *  - sb_cache_create_with_data: each callback gets its cache's data;
 *  - a message may carry NULL data (delivered as NULL; a dtor gets NULL).
 */
#include "test_util.h"

static sb_message_type *ptype;

/* ---- sb_last_error_code ---- */

static int nested_code_inside; /* what the callback saw right after its own failing call */

static void failing_inside_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    CHECK(sb_topic_create(NULL) == NULL);
    nested_code_inside = sb_last_error_code();
}

static void test_last_error_code(void)
{
    CHECK(sb_topic_create(NULL) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL); /* reading it does not clear it */
    char text[512];
    tu_copy_error(text, sizeof text);
    CHECK(text[0] != '\0');
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL); /* nor does reading the text */

    /* a success clears the code; the text stays until the next failure */
    sb_topic *t = sb_topic_create("edges.code");
    CHECK(t != NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK_STR(sb_last_error(), text);

    /* void, count and pointer functions set it too */
    sb_topic_unref((sb_topic *)ptype); /* wrong type */
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    sb_topic_unref(NULL); /* NULL-safe: a success */
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK_EQ_INT(sb_topic_subscribers(NULL), 0);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK(sb_version() != NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK(sb_strerror(SB_E_INTERNAL) != NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0);

    /* a NULL from a constructor is a failure */
    sb_cache *c = sb_cache_create_with_data(NULL, NULL, NULL, NULL);
    CHECK(c == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);

    /* a failing call made by a synchronous callback does not make the publish fail */
    sb_subscription *s = sb_subscribe_synchronous(t, failing_inside_cb, NULL);
    CHECK(s != NULL);
    sb_message *m = sb_message_create(ptype, NULL, NULL);
    CHECK_EQ_INT(sb_publish(t, m), 1);
    CHECK_EQ_INT(nested_code_inside, SB_E_INVAL);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    sb_message_unref(m);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    sb_topic_unref(t);
}

/* ---- joins from a callback's own thread ---- */

typedef struct self_join {
    sb_subscription *keep; /* the test's reference, joined from inside */
    sb_router *router;     /* the router, unsubscribed and joined from a route */
    atomic_int join_rc;
    atomic_int code_after_unsub_join;
    atomic_int done;
} self_join;

static void join_self_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    self_join *j = data;
    (void)sub;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_store(&j->join_rc, sb_subscription_join(j->keep));
    /* our own reference goes (the callback keeps running: the library holds one) */
    sb_subscription *mine = sb_subscription_ref(j->keep);
    CHECK(sb_unsubscribe_and_join(mine) == NULL);
    atomic_store(&j->code_after_unsub_join, sb_last_error_code());
    atomic_store(&j->done, 1);
}

static void test_join_results(void)
{
    sb_topic *t = sb_topic_create("edges.join");
    self_join j;
    memset(&j, 0, sizeof j);
    atomic_store(&j.join_rc, 1);
    atomic_store(&j.code_after_unsub_join, 1);
    sb_subscription *s = sb_subscribe(t, join_self_cb, &j);
    CHECK(s != NULL);
    j.keep = s;
    sb_message *m = sb_message_create(ptype, NULL, NULL);
    CHECK_EQ_INT(sb_publish(t, m), 1);
    sb_message_unref(m);
    WAIT_UNTIL(atomic_load(&j.done) == 1);
    CHECK_EQ_INT(atomic_load(&j.join_rc), SB_E_DEADLOCK);
    CHECK_EQ_INT(atomic_load(&j.code_after_unsub_join), SB_E_DEADLOCK);
    /* from outside: the join waits and succeeds */
    CHECK_EQ_INT(sb_subscription_join(s), SB_OK);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK_EQ_INT(sb_subscription_is_done(s), 1);
    CHECK_EQ_INT(sb_subscription_join(NULL), SB_E_INVAL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    sb_subscription_unref(s);
    sb_topic_unref(t);
}

static void router_self_join(void *data, sb_subscription *sub, sb_message *msg)
{
    self_join *j = data;
    (void)sub;
    (void)msg;
    sb_router *mine = sb_router_ref(j->router);
    CHECK(sb_router_unsubscribe_and_join(mine) == NULL);
    atomic_store(&j->code_after_unsub_join, sb_last_error_code());
    atomic_store(&j->done, 1);
}

static void test_router_join_refused(void)
{
    sb_topic *t = sb_topic_create("edges.router");
    self_join j;
    memset(&j, 0, sizeof j);
    atomic_store(&j.code_after_unsub_join, 1);
    sb_router *r = sb_router_create(t);
    CHECK(r != NULL);
    j.router = r;
    CHECK_EQ_INT(sb_router_add(r, ptype, router_self_join, &j), SB_OK);
    sb_message *m = sb_message_create(ptype, NULL, NULL);
    CHECK_EQ_INT(sb_publish(t, m), 1);
    sb_message_unref(m);
    WAIT_UNTIL(atomic_load(&j.done) == 1);
    CHECK_EQ_INT(atomic_load(&j.code_after_unsub_join), SB_E_DEADLOCK);
    WAIT_UNTIL(sb_router_is_done(r) == 1);
    sb_router_unref(r);
    sb_topic_unref(t);
}

/* the caching topic is stopped from inside its own id function */
static sb_caching_topic *ct_to_stop;
static atomic_int ct_code = 1;
static atomic_int ct_stopped;

static const char *stopping_id(void *data, sb_message *msg)
{
    (void)data;
    if (sb_message_get_type(msg) != ptype || ct_to_stop == NULL)
        return NULL;
    sb_caching_topic *ct = ct_to_stop;
    ct_to_stop = NULL;
    CHECK(sb_caching_unsubscribe_and_join(ct) == NULL);
    atomic_store(&ct_code, sb_last_error_code());
    atomic_store(&ct_stopped, 1);
    return NULL;
}

static void test_caching_join_refused(void)
{
    sb_topic *t = sb_topic_create("edges.caching");
    sb_cache *cache = sb_cache_create_with_data(stopping_id, NULL, NULL, NULL);
    CHECK(cache != NULL);
    ct_to_stop = sb_caching_topic_create(t, cache);
    CHECK(ct_to_stop != NULL);
    sb_message *m = sb_message_create(ptype, NULL, NULL);
    CHECK(sb_publish(t, m) >= 0); /* synchronous: the id function runs in here */
    sb_message_unref(m);
    CHECK_EQ_INT(atomic_load(&ct_stopped), 1);
    CHECK_EQ_INT(atomic_load(&ct_code), SB_E_DEADLOCK);
    sb_cache_unref(cache);
    sb_topic_unref(t);
}

/* ---- the library's own types ---- */

static atomic_int dtor_calls;
static void count_dtor(void *p)
{
    (void)p;
    atomic_fetch_add(&dtor_calls, 1);
}

static void test_library_owned_types(void)
{
    sb_message_type *owned[3];
    owned[0] = sb_subscription_change_type();
    owned[1] = sb_cache_update_type();
    owned[2] = sb_cache_clear_type();
    sb_eid eid = sb_eid_default();
    int data = 7;
    for (int i = 0; i < 3; i++) {
        CHECK(owned[i] != NULL);
        CHECK(sb_message_create(owned[i], &data, count_dtor) == NULL);
        CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
        CHECK(tu_contains_ci(sb_last_error(), "library"));
        CHECK(sb_message_create_full(owned[i], &data, count_dtor, &eid) == NULL);
        CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
        CHECK(sb_message_create_full(owned[i], &data, count_dtor, NULL) == NULL);
        CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
        CHECK(sb_message_create_bytes(owned[i], "abc", 3) == NULL);
        CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    }
    CHECK_EQ_INT(atomic_load(&dtor_calls), 0); /* a failed create leaves data to us */

    /* the same type found by name */
    const char *names[3];
    for (int i = 0; i < 3; i++)
        names[i] = sb_message_type_name(owned[i]);
    for (int i = 0; i < 3; i++) {
        sb_message_type *byname = NULL;
        int rc = sb_message_type_create(names[i], NULL, &byname);
        if (rc == SB_OK) {
            CHECK(sb_message_create(byname, NULL, NULL) == NULL);
            CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
            sb_message_type_unref(byname);
        }
    }

    /* the library's own way still works */
    sb_message *snap = sb_message_create(ptype, NULL, NULL);
    sb_message *clear = sb_cache_clear_create(snap);
    CHECK(clear != NULL);
    CHECK(sb_message_get_type(clear) == sb_cache_clear_type());
    sb_message_unref(clear);
    sb_message_unref(snap);
}

/* ---- yes/no and counts on bad handles ---- */

static void test_bad_handles(void)
{
    sb_topic *t = sb_topic_create("edges.bad");
    sb_subscription *wrong = (sb_subscription *)t; /* a live object of another type */

    CHECK(sb_subscription_is_done(NULL) < 0);
    CHECK(sb_subscription_is_done(wrong) < 0);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    int rounds = 0;
    while (!sb_subscription_is_done(NULL) && rounds < 3) /* ends at once */
        rounds++;
    CHECK_EQ_INT(rounds, 0);
    CHECK(sb_subscription_is_subscribed(NULL) < 0);
    CHECK(sb_subscription_is_subscribed(wrong) < 0);
    CHECK(sb_subscription_final_message(NULL, NULL) < 0);
    CHECK(sb_topic_wants(NULL, ptype) < 0);
    CHECK(sb_topic_wants(t, NULL) < 0);
    CHECK(sb_topic_wants((sb_topic *)ptype, ptype) < 0);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 0); /* a real "no" */
    CHECK_EQ_INT(sb_last_error_code(), 0);
    CHECK(sb_router_is_done(NULL) < 0);
    CHECK(sb_topic_pool_topic_exists(NULL, "x") < 0);
    CHECK(sb_message_type_declined(NULL) < 0);

    /* counts: 0, and the code tells a bad handle from an empty one */
    CHECK_EQ_INT(sb_subscription_queue_length(NULL), 0);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_EQ_INT(sb_subscription_queue_length(wrong), 0);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_EQ_INT(sb_topic_subscribers(NULL), 0);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    sb_topic_unref(t);
}

/* ---- sb_cache_create_with_data ---- */

typedef struct cache_ctx {
    const char *label;
    atomic_int id_calls, calc_calls, publish_calls;
    atomic_int wrong_data;
} cache_ctx;

static const char *ctx_id(void *data, sb_message *msg)
{
    cache_ctx *c = data;
    if (c == NULL)
        return NULL;
    if (strncmp(c->label, "ctx", 3) != 0) {
        atomic_fetch_add(&c->wrong_data, 1);
        return NULL;
    }
    atomic_fetch_add(&c->id_calls, 1);
    if (sb_message_get_type(msg) != ptype)
        return NULL;
    return (const char *)sb_message_data(msg);
}

static sb_message *ctx_calc(void *data, sb_cache_entry *entry, sb_message *new_snapshot)
{
    cache_ctx *c = data;
    (void)entry;
    atomic_fetch_add(&c->calc_calls, 1);
    if (new_snapshot == NULL)
        return NULL;
    return sb_message_create_full(ptype, (void *)c->label, NULL, NULL); /* an aggregate */
}

static void ctx_publish(void *data, sb_topic *topic, sb_message *aggregate)
{
    cache_ctx *c = data;
    (void)topic;
    (void)aggregate;
    atomic_fetch_add(&c->publish_calls, 1);
}

static void test_cache_with_data(void)
{
    cache_ctx a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    a.label = "ctx-a";
    b.label = "ctx-b";
    sb_topic *ta = sb_topic_create("edges.cache.a");
    sb_topic *tb = sb_topic_create("edges.cache.b");
    /* one set of functions, two caches, each with its own data */
    sb_cache *ca = sb_cache_create_with_data(ctx_id, ctx_calc, ctx_publish, &a);
    sb_cache *cb = sb_cache_create_with_data(ctx_id, NULL, NULL, &b);
    CHECK(ca != NULL && cb != NULL);
    sb_caching_topic *cta = sb_caching_topic_create(ta, ca);
    sb_caching_topic *ctb = sb_caching_topic_create(tb, cb);
    CHECK(cta != NULL && ctb != NULL);

    int before_a = atomic_load(&a.id_calls), before_b = atomic_load(&b.id_calls);
    sb_message *m = sb_message_create(ptype, "alice", NULL);
    CHECK(sb_publish(ta, m) >= 1);
    sb_message_unref(m);
    CHECK(atomic_load(&a.id_calls) > before_a);
    CHECK_EQ_INT(atomic_load(&b.id_calls), before_b);
    CHECK_EQ_INT(atomic_load(&a.calc_calls), 1);
    CHECK_EQ_INT(atomic_load(&a.publish_calls), 1);

    sb_message *got = sb_cache_get(ca, ptype, "alice");
    CHECK(got != NULL && strcmp((const char *)sb_message_data(got), "alice") == 0);
    sb_message_unref(got);
    sb_message *agg = sb_cache_get_by_eid(ca, ptype, "alice", NULL);
    CHECK(agg != NULL && strcmp((const char *)sb_message_data(agg), "ctx-a") == 0);
    sb_message_unref(agg);
    CHECK(sb_cache_get(cb, ptype, "alice") == NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0); /* not found is not an error */

    m = sb_message_create(ptype, "bob", NULL);
    CHECK(sb_publish(tb, m) >= 1);
    sb_message_unref(m);
    got = sb_cache_get(cb, ptype, "bob");
    CHECK(got != NULL);
    sb_message_unref(got);
    CHECK(atomic_load(&b.id_calls) > before_b);
    CHECK_EQ_INT(atomic_load(&b.calc_calls), 0);
    CHECK_EQ_INT(atomic_load(&a.wrong_data) + atomic_load(&b.wrong_data), 0);

    CHECK(sb_caching_unsubscribe_and_join(cta) == NULL);
    CHECK(sb_caching_unsubscribe_and_join(ctb) == NULL);
    sb_cache_unref(ca);
    sb_cache_unref(cb);
    sb_topic_unref(ta);
    sb_topic_unref(tb);
}

/* ---- NULL data ---- */

static atomic_int null_seen;
static atomic_int null_dtor_calls;

static void null_data_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == ptype && sb_message_data(msg) == NULL)
        atomic_fetch_add(&null_seen, 1);
}

static void null_dtor(void *p)
{
    if (p == NULL)
        atomic_fetch_add(&null_dtor_calls, 1);
}

static void test_null_data(void)
{
    sb_topic *t = sb_topic_create("edges.null");
    sb_subscription *s = sb_subscribe(t, null_data_cb, NULL);
    sb_message *a = sb_message_create(ptype, NULL, NULL);
    sb_message *b = sb_message_create(ptype, NULL, null_dtor);
    CHECK(a != NULL && b != NULL);
    CHECK(sb_message_data(a) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0); /* NULL data, not a failure */
    CHECK_EQ_INT(sb_message_data_len(a), 0);
    CHECK_EQ_INT(sb_publish(t, a), 1);
    CHECK_EQ_INT(sb_publish(t, b), 1);
    sb_message_unref(a);
    sb_message_unref(b);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_EQ_INT(atomic_load(&null_seen), 2);
    CHECK_EQ_INT(atomic_load(&null_dtor_calls), 1);
    sb_topic_unref(t);
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("edges.payload", NULL, &ptype), SB_OK);
    test_last_error_code();
    test_join_results();
    test_router_join_refused();
    test_caching_join_refused();
    test_library_owned_types();
    test_bad_handles();
    test_cache_with_data();
    test_null_data();
    sb_message_type_unref(ptype);
    return TEST_DONE();
}
