/*
 * test_bad_input.c - "Bad input never aborts the host process, never unwinds across the
 * boundary, and never corrupts state."
 *
 * NULL for every pointer argument of every function in the sections Library .. Topic pools,
 * invalid values (filter modes, pool sizes, congestion limits), and wrong-state calls
 * (publish_sync on an unsubscribed subscription, unsubscribing twice, deleting a missing
 * pool topic). Each failure returns NULL / a negative code and leaves a non-empty
 * sb_last_error(); afterwards, a normal subscribe/publish round trip of every kind works.
 */
#include "recorder.h"

static sb_message_type *ptype;

/* pointer-returning call that must fail: NULL, with a reason */
#define CHECK_NULL_ERR(expr)                                                            \
    do {                                                                                \
        CHECK((expr) == NULL);                                                          \
        CHECK_ERR();                                                                    \
    } while (0)

/* int-returning call that must fail: a negative code, with a reason */
#define CHECK_NEG_ERR(expr)                                                             \
    do {                                                                                \
        int rc_ = (expr);                                                               \
        tu_check(rc_ < 0, __FILE__, __LINE__, #expr " < 0");                            \
        CHECK_ERR();                                                                    \
    } while (0)

/* int-returning call that must fail with a given code */
#define CHECK_CODE_ERR(expr, code)                                                      \
    do {                                                                                \
        CHECK_EQ_INT((expr), (code));                                                   \
        CHECK_ERR();                                                                    \
    } while (0)

static void noop_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

static void test_library_nulls(void)
{
    sb_string_free(NULL);
    CHECK(sb_strerror(-12345) != NULL);
    CHECK(sb_strerror(SB_E_INVAL) != NULL);
    CHECK_CODE_ERR(sb_pool_configure(3, 1, 100), SB_E_INVAL);
    CHECK_CODE_ERR(sb_pool_configure(0, 0, 100), SB_E_INVAL);

    /* entity ids */
    sb_eid e = sb_eid_default();
    char buf[32];
    CHECK_CODE_ERR(sb_eid_set_default(NULL), SB_E_INVAL);
    sb_eid after = sb_eid_default();
    CHECK_EQ_INT(sb_eid_cmp(&after, &e), 0); /* unchanged */
    CHECK_CODE_ERR(sb_eid_to_str(NULL, buf, sizeof buf), SB_E_INVAL);
    CHECK_CODE_ERR(sb_eid_to_str(&e, NULL, 18), SB_E_INVAL);
    CHECK_CODE_ERR(sb_eid_from_str(NULL, &e), SB_E_INVAL);
    CHECK_CODE_ERR(sb_eid_from_str("01:02:03:04:05:06", NULL), SB_E_INVAL);
    /* comparisons with NULL do not crash (NULL sorts first) */
    (void)sb_eid_cmp(NULL, &e);
    (void)sb_eid_cmp(&e, NULL);
    (void)sb_eid_cmp(NULL, NULL);
    CHECK(1);
}

static void test_type_nulls(void)
{
    sb_message_type *out = (sb_message_type *)&out;
    CHECK_CODE_ERR(sb_message_type_create(NULL, NULL, &out), SB_E_INVAL);
    CHECK(out == NULL || out == (sb_message_type *)&out);
    CHECK_CODE_ERR(sb_message_type_create("bad.type", NULL, NULL), SB_E_INVAL);
    /* the failed create did not register the name in some broken state */
    sb_message_type *t = NULL;
    CHECK_EQ_INT(sb_message_type_create("bad.type", NULL, &t), SB_OK);
    CHECK(t != NULL);
    CHECK_STR(sb_message_type_name(t), "bad.type");
    sb_message_type_unref(t);

    CHECK_NULL_ERR(sb_message_type_name(NULL));
    CHECK_NEG_ERR(sb_message_type_id(NULL));
    CHECK_NULL_ERR(sb_message_type_ref(NULL));
    sb_message_type_unref(NULL);
    CHECK_NEG_ERR(sb_message_type_decline(NULL));
    CHECK(sb_message_type_declined(NULL) != 1);
    CHECK(sb_message_to_json(NULL) == NULL);
}

static atomic_int dtor_calls;
static void counting_dtor(void *d)
{
    atomic_fetch_add(&dtor_calls, 1);
    free(d);
}

static void test_message_nulls(void)
{
    sb_eid e = sb_eid_default();
    int *d = malloc(sizeof *d);
    CHECK_NULL_ERR(sb_message_create(NULL, d, counting_dtor));
    CHECK_NULL_ERR(sb_message_create_full(NULL, d, counting_dtor, &e));
    CHECK_NULL_ERR(sb_message_create_full(NULL, d, counting_dtor, NULL));
    CHECK_NULL_ERR(sb_message_create_bytes(NULL, "abc", 3));
    CHECK_NULL_ERR(sb_message_create_bytes(ptype, NULL, 3));
    /* a length no buffer has (a negative one cast to size_t): an error, not a read */
    CHECK_NULL_ERR(sb_message_create_bytes(ptype, "abc", (size_t)-1));
    CHECK(tu_contains_ci(sb_last_error(), "len"));
    /* a length no allocation can serve: SB_E_NOMEM's text, not an abort */
    CHECK_NULL_ERR(sb_message_create_bytes(ptype, "abc", (size_t)1 << 62));
    CHECK(tu_contains_ci(sb_last_error(), "allocate"));
    CHECK_EQ_INT(atomic_load(&dtor_calls), 0); /* failed creates never call the dtor */
    free(d);

    CHECK_NULL_ERR(sb_message_get_type(NULL));
    CHECK_NULL_ERR(sb_message_data(NULL));
    CHECK_EQ_INT(sb_message_data_len(NULL), 0);
    CHECK_EQ_INT(sb_message_timestamp_ns(NULL), 0);
    CHECK_NULL_ERR(sb_message_eid(NULL));
    CHECK_NULL_ERR(sb_message_ref(NULL));
    sb_message_unref(NULL);
}

static void test_topic_nulls(void)
{
    CHECK_NULL_ERR(sb_topic_create(NULL));
    CHECK_NULL_ERR(sb_topic_create_with_detail(NULL, "detail"));
    /* a NULL detail is either refused or treated as no detail */
    sb_topic *nd = sb_topic_create_with_detail("bad.nodetail", NULL);
    if (nd != NULL) {
        CHECK(sb_topic_detail(nd) != NULL);
        sb_topic_unref(nd);
    } else {
        CHECK_ERR();
    }
    CHECK_NULL_ERR(sb_topic_get(NULL));
    CHECK_NULL_ERR(sb_topic_name(NULL));
    CHECK_NULL_ERR(sb_topic_detail(NULL));
    CHECK_NULL_ERR(sb_topic_uniqueid(NULL));
    CHECK_EQ_INT(sb_topic_subscribers(NULL), 0);
    CHECK(sb_topic_wants(NULL, ptype) != 1);
    CHECK_NULL_ERR(sb_topic_ref(NULL));
    sb_topic_unref(NULL);

    sb_topic *t = sb_topic_create("bad.topic");
    sb_subscription *s = sb_subscribe(t, noop_cb, NULL);
    CHECK(sb_topic_wants(t, NULL) != 1);
    sb_message *m = payload_msg(ptype, 0, 0, 0);
    CHECK_NEG_ERR(sb_publish(NULL, m));
    CHECK_NEG_ERR(sb_publish(t, NULL));
    CHECK_NEG_ERR(sb_publish_sync(NULL, m));
    CHECK_NEG_ERR(sb_publish_sync(s, NULL));
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    sb_message_unref(m);
    sb_topic_unref(t);
}

static void test_subscription_nulls(void)
{
    sb_topic *t = sb_topic_create("bad.sub");
    for (int k = 0; k < KIND_COUNT; k++) {
        CHECK_NULL_ERR(subscribe_kind(k, NULL, noop_cb, NULL));
        CHECK_NULL_ERR(subscribe_kind(k, t, NULL, NULL));
    }
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);

    CHECK(sb_unsubscribe(NULL) == NULL);
    CHECK(sb_unsubscribe_and_join(NULL) == NULL);
    sb_subscription_join(NULL);
    CHECK(sb_subscription_is_done(NULL) != 1);
    CHECK(sb_subscription_is_subscribed(NULL) != 1);
    CHECK_NULL_ERR(sb_subscription_uniqueid(NULL));
    CHECK_NULL_ERR(sb_subscription_ref(NULL));
    sb_subscription_unref(NULL);
    CHECK(sb_subscription_change_type() != NULL);

    recorder rec;
    recorder_init(&rec, ptype, t);
    sb_subscription *s = sb_subscribe(t, recorder_cb, &rec);
    CHECK(s != NULL);
    sb_message *m = payload_msg(ptype, 0, 0, 0);
    CHECK(sb_subscription_final_message(NULL, m) != 1);
    CHECK(sb_subscription_final_message(s, NULL) != 1);
    CHECK_NEG_ERR(sb_subscription_accept_message_type(NULL, ptype));
    CHECK_NEG_ERR(sb_subscription_accept_message_type(s, NULL));
    CHECK_NEG_ERR(sb_subscription_decline_message_type(NULL, ptype));
    CHECK_NEG_ERR(sb_subscription_decline_message_type(s, NULL));
    CHECK_NEG_ERR(sb_subscription_set_filter(NULL, SB_FILTER_SELECTIVE));
    CHECK_CODE_ERR(sb_subscription_set_filter(s, (sb_subscription_filter)7), SB_E_INVAL);
    CHECK_CODE_ERR(sb_subscription_set_filter(s, (sb_subscription_filter)-1), SB_E_INVAL);
    CHECK_NEG_ERR(sb_subscription_set_congestion_limits(NULL, 1, 10));
    CHECK_CODE_ERR(sb_subscription_set_congestion_limits(s, 10, 5), SB_E_INVAL);
    /* none of that changed the subscription: still unfiltered, still delivering */
    CHECK_EQ_INT(sb_publish(t, m), 1);
    sb_message_unref(m);
    WAIT_UNTIL(atomic_load(&rec.payloads) == 1);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

static void test_forward_pool_nulls(void)
{
    sb_topic *t = sb_topic_create("bad.fwd");
    CHECK_NULL_ERR(sb_forward_all(NULL, t));
    CHECK_NULL_ERR(sb_forward_all(t, NULL));
    CHECK_NULL_ERR(sb_forward_all(NULL, NULL));
    CHECK(sb_forward_cancel(NULL) == NULL);

    CHECK_NULL_ERR(sb_topic_pool_create(NULL));
    sb_topic_pool *pool = sb_topic_pool_create(t);
    CHECK(pool != NULL);
    CHECK_NULL_ERR(sb_topic_pool_get_topic(NULL, "x"));
    CHECK_NULL_ERR(sb_topic_pool_get_topic(pool, NULL));
    CHECK_NEG_ERR(sb_topic_pool_delete_topic(NULL, "x"));
    CHECK_NEG_ERR(sb_topic_pool_delete_topic(pool, NULL));
    CHECK(sb_topic_pool_topic_exists(NULL, "x") != 1);
    CHECK(sb_topic_pool_topic_exists(pool, NULL) != 1);
    /* wrong state: deleting a name the pool does not have */
    CHECK_NEG_ERR(sb_topic_pool_delete_topic(pool, "absent"));
    sb_topic_pool_unref(NULL);
    /* the pool still works */
    sb_topic *x = sb_topic_pool_get_topic(pool, "x");
    CHECK(x != NULL);
    CHECK_STR(sb_topic_name(x), "bad.fwd/x");
    sb_topic_unref(x);
    sb_topic_pool_unref(pool);
    sb_topic_unref(t);
}

/* ---- wrong-state calls ---- */

static void test_wrong_state(void)
{
    for (int k = 0; k < KIND_COUNT; k++) {
        sb_topic *t = sb_topic_create("bad.state");
        recorder rec;
        recorder_init(&rec, ptype, t);
        sb_subscription *s = subscribe_kind(k, t, recorder_cb, &rec);
        sb_subscription *extra = sb_subscription_ref(s);
        sb_subscription *extra2 = sb_subscription_ref(s);
        CHECK(sb_unsubscribe_and_join(s) == NULL);

        /* publish_sync on an unsubscribed subscription */
        atomic_store(&dtor_calls, 0);
        sb_message *m = sb_message_create(ptype, calloc(1, sizeof(payload_t)), counting_dtor);
        CHECK_CODE_ERR(sb_publish_sync(extra, m), SB_E_STATE);
        sb_message_unref(m); /* the failed call did not take or leak our reference */
        CHECK_EQ_INT(atomic_load(&dtor_calls), 1);

        /* joining again returns at once, it is done and not subscribed */
        sb_subscription_join(extra);
        CHECK_EQ_INT(sb_subscription_is_done(extra), 1);
        CHECK_EQ_INT(sb_subscription_is_subscribed(extra), 0);
        CHECK(sb_subscription_uniqueid(extra) != NULL);

        /* unsubscribing again is harmless: no second final message; it still releases the
         * caller's reference (valgrind would see a leak otherwise) */
        CHECK(sb_unsubscribe(extra) == NULL);
        CHECK(sb_unsubscribe_and_join(extra2) == NULL);
        CHECK_STAYS(atomic_load(&rec.finals) == 1, 20);
        CHECK_RECORDER_LIFECYCLE(&rec);
        CHECK_EQ_INT(sb_topic_subscribers(t), 0);
        recorder_destroy(&rec);
        sb_topic_unref(t);
    }
}

/* bad input inside a callback does not break the subscription */
static void bad_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)r;
    (void)msg;
    CHECK(sb_topic_create(NULL) == NULL);
    CHECK(sb_publish(NULL, msg) < 0);
    CHECK(sb_subscription_set_filter(sub, 99) < 0);
    CHECK_ERR();
}

static void round_trip(int kind, int with_bad_hook)
{
    sb_topic *t = sb_topic_create("bad.roundtrip");
    recorder rec;
    recorder_init(&rec, ptype, t);
    if (with_bad_hook)
        rec.hook = bad_hook;
    sb_subscription *s = subscribe_kind(kind, t, recorder_cb, &rec);
    CHECK(s != NULL);
    for (int i = 0; i < 10; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
    WAIT_UNTIL(atomic_load(&rec.payloads) == 10);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_RECORDER_THREADS(&rec, kind);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/* last error is per thread: bad input on another thread leaves ours alone */
static void *bad_thread(void *arg)
{
    (void)arg;
    for (int i = 0; i < 100; i++) {
        CHECK(sb_topic_create(NULL) == NULL);
        CHECK_ERR();
    }
    return NULL;
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("bad.payload");
    test_library_nulls();
    test_type_nulls();
    test_message_nulls();
    test_topic_nulls();
    test_subscription_nulls();
    test_forward_pool_nulls();
    test_wrong_state();

    sb_eid e;
    CHECK(sb_eid_from_str("nope", &e) < 0);
    char mine[512];
    tu_copy_error(mine, sizeof mine);
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, bad_thread, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    CHECK_STR(sb_last_error(), mine);

    /* afterwards, everything still works */
    for (int k = 0; k < KIND_COUNT; k++) {
        round_trip(k, 0);
        round_trip(k, 1);
    }
    sb_message_type_unref(ptype);
    const char *topics[] = {"bad.nodetail", "bad.topic", "bad.sub", "bad.fwd", "bad.fwd/x",
                            "bad.state", "bad.roundtrip"};
    for (size_t i = 0; i < sizeof topics / sizeof topics[0]; i++)
        CHECK_TOPIC_GONE(topics[i]);
    WAIT_UNTIL(atomic_load(&payload_created) == atomic_load(&payload_destroyed));
    return TEST_DONE();
}
