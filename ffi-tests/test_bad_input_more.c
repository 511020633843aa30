/*
 * test_bad_input_more.c - more of "Bad input never aborts the host process, never unwinds
 * across the boundary, and never corrupts state" (complements test_bad_input.c).
 *
 *  - bad names for every function taking a name (sb_topic_create, _with_detail, sb_topic_get,
 *    sb_message_type_create, _decline, _declined, sb_topic_pool_get_topic, _delete_topic,
 *    _topic_exists, sb_eid_from_str): the empty name, a 1 MiB name, and non-UTF-8 names
 *    ("\xff\xfe", a stray continuation byte, an overlong encoding, a UTF-16 surrogate).
 *    Calls that signal failure (NULL / negative) must leave a FRESH, non-empty
 *    sb_last_error() (a recognizable error is planted before each call and must have been
 *    replaced), and must not leave anything behind (no topic registered, no type declined,
 *    no pool entry). Predicates (declined, topic_exists) must answer 0.
 *  - wrong-state calls: unsubscribing twice through two references taken with
 *    sb_subscription_ref (for every kind, with sb_unsubscribe and sb_unsubscribe_and_join):
 *    the second one leaves a fresh error, there is still exactly one final message and no
 *    reference leaks; a forward cancelled and created again for the same pair works, two
 *    forwards for one pair deliver once and cancel independently, sb_forward_cancel(NULL) is
 *    a no-op; deleting a pool topic twice; publishing to a topic whose every subscription
 *    is gone returns 0 (also through a forward) and the message is still destroyed once.
 *  - afterwards a normal publish/subscribe round trip of every kind still works, every
 *    topic left the registry and every message dtor ran exactly once.
 */
#include "recorder.h"

static sb_message_type *ptype;

/* ---- stale-error detection: sb_last_error() is never cleared, so before each call that
 * must fail a recognizable error is planted; afterwards it must have been replaced ---- */

#define STALE_MARKER "@@stale-marker@@"

static void plant_error(void)
{
    sb_eid e;
    (void)sb_eid_from_str(STALE_MARKER, &e);
}

static int fresh_error(void)
{
    const char *e = sb_last_error();
    return e != NULL && e[0] != '\0' && strstr(e, STALE_MARKER) == NULL;
}

static void check_fresh(const char *file, int line, const char *what)
{
    char buf[300];
    snprintf(buf, sizeof buf, "fresh, non-empty sb_last_error after %s (got \"%.120s\")", what,
             sb_last_error() ? sb_last_error() : "(null)");
    tu_check(fresh_error(), file, line, buf);
}

/* pointer-returning call that must fail: NULL and a fresh reason */
#define CHECK_NULL_FRESH(expr)                                                          \
    do {                                                                                \
        plant_error();                                                                  \
        const void *p_ = (expr);                                                        \
        tu_check(p_ == NULL, __FILE__, __LINE__, #expr " == NULL");                     \
        check_fresh(__FILE__, __LINE__, #expr);                                         \
    } while (0)

/* int-returning call that must fail: negative and a fresh reason */
#define CHECK_NEG_FRESH(expr)                                                           \
    do {                                                                                \
        plant_error();                                                                  \
        int rc_ = (expr);                                                               \
        tu_check(rc_ < 0, __FILE__, __LINE__, #expr " < 0");                            \
        check_fresh(__FILE__, __LINE__, #expr);                                         \
    } while (0)

/* a "void" call that must report a failure only through sb_last_error */
#define CHECK_VOID_FRESH(stmt)                                                          \
    do {                                                                                \
        plant_error();                                                                  \
        stmt;                                                                           \
        check_fresh(__FILE__, __LINE__, #stmt);                                         \
    } while (0)

/* ---- bad names ---- */

typedef struct bad_name {
    const char *label;
    const char *name;
} bad_name;

static char *huge_name;     /* 1 MiB of 'x' */
static char *huge_name_bad; /* 1 MiB, valid prefix, then an invalid byte */

static size_t errlen_max; /* longest error text seen, for the report */
static void note_error_len(void)
{
    size_t n = strlen(sb_last_error());
    if (n > errlen_max)
        errlen_max = n;
}

/* A name the library cannot have registered as a topic / type / pool entry. */
static void check_nothing_registered(const char *label, const char *name, sb_topic_pool *pool)
{
    sb_topic *t = sb_topic_get(name);
    if (t != NULL) {
        printf("FAIL: topic registered for bad name (%s)\n", label);
        CHECK(t == NULL);
        sb_topic_unref(t);
    }
    /* "no", or a negative code for a name that is not text */
    CHECK(sb_message_type_declined(name) <= 0);
    CHECK(sb_topic_pool_topic_exists(pool, name) <= 0);
}

static void test_bad_names(void)
{
    sb_topic *pooled = sb_topic_create("bim.pooled");
    sb_topic_pool *pool = sb_topic_pool_create(pooled);
    CHECK(pool != NULL);

    huge_name = malloc((1u << 20) + 1);
    memset(huge_name, 'x', 1u << 20);
    huge_name[1u << 20] = '\0';
    huge_name_bad = malloc((1u << 20) + 1);
    memset(huge_name_bad, 'y', 1u << 20);
    huge_name_bad[(1u << 20) - 1] = (char)0xff;
    huge_name_bad[1u << 20] = '\0';

    const bad_name names[] = {
        {"empty", ""},
        {"1 MiB", huge_name},
        {"1 MiB, not UTF-8", huge_name_bad},
        {"\\xff\\xfe", "\xff\xfe"},
        {"stray continuation byte", "bim.\x80name"},
        {"overlong encoding of '/'", "bim.\xc0\xaf"},
        {"UTF-16 surrogate", "bim.\xed\xa0\x80"},
        {"truncated sequence", "bim.\xe2\x82"},
    };
    const size_t n = sizeof names / sizeof names[0];

    for (size_t i = 0; i < n; i++) {
        const char *nm = names[i].name;
        int empty = nm[0] == '\0';
        printf("bad name: %s\n", names[i].label);

        /* topics */
        CHECK_NULL_FRESH(sb_topic_create(nm));
        note_error_len();
        CHECK_NULL_FRESH(sb_topic_create_with_detail(nm, "some detail"));
        note_error_len();
        CHECK_NULL_FRESH(sb_topic_get(nm));
        note_error_len();

        /* message types */
        sb_message_type *out = (sb_message_type *)&out; /* poison: must be set to NULL */
        plant_error();
        int rc = sb_message_type_create(nm, NULL, &out);
        CHECK(rc < 0);
        CHECK_EQ_INT(rc, SB_E_INVAL);
        check_fresh(__FILE__, __LINE__, "sb_message_type_create(bad name)");
        CHECK(out == NULL);
        if (rc == SB_OK && out != NULL && out != (sb_message_type *)&out)
            sb_message_type_unref(out);
        note_error_len();
        plant_error();
        CHECK_EQ_INT(sb_message_type_decline(nm), SB_E_INVAL);
        check_fresh(__FILE__, __LINE__, "sb_message_type_decline(bad name)");
        note_error_len();
        CHECK(sb_message_type_declined(nm) <= 0);

        /* topic pools */
        CHECK_NULL_FRESH(sb_topic_pool_get_topic(pool, nm));
        note_error_len();
        plant_error();
        CHECK_EQ_INT(sb_topic_pool_delete_topic(pool, nm), SB_E_INVAL);
        check_fresh(__FILE__, __LINE__, "sb_topic_pool_delete_topic(bad name)");
        note_error_len();
        CHECK(sb_topic_pool_topic_exists(pool, nm) <= 0);

        /* entity ids: out is left alone */
        sb_eid e;
        memset(&e, 0xab, sizeof e);
        plant_error();
        CHECK_EQ_INT(sb_eid_from_str(nm, &e), SB_E_INVAL);
        check_fresh(__FILE__, __LINE__, "sb_eid_from_str(bad name)");
        note_error_len();
        for (int b = 0; b < 6; b++)
            CHECK_EQ_INT(e.bytes[b], 0xab);

        /* nothing was left behind, and the name did not become declined */
        check_nothing_registered(names[i].label, nm, pool);
        if (!empty) {
            /* the pooled topic's name + "/" + bad name did not get registered either */
            size_t len = strlen(nm) + 32;
            char *full = malloc(len);
            snprintf(full, len, "bim.pooled/%s", nm);
            CHECK(!topic_registered(full));
            free(full);
        }
    }

    /* a bad detail (not UTF-8) is either refused with a reason or accepted; never a crash */
    plant_error();
    sb_topic *bd = sb_topic_create_with_detail("bim.baddetail", "\xff\xfe");
    if (bd == NULL) {
        check_fresh(__FILE__, __LINE__, "sb_topic_create_with_detail(bad detail)");
        CHECK(!topic_registered("bim.baddetail"));
    } else {
        CHECK(sb_topic_detail(bd) != NULL);
        sb_topic_unref(bd);
    }

    /* a long but sane name still works (well under any sane limit) */
    char longish[200];
    memset(longish, 'n', sizeof longish - 1);
    longish[sizeof longish - 1] = '\0';
    memcpy(longish, "bim.", 4);
    sb_topic *lt = sb_topic_create(longish);
    CHECK(lt != NULL);
    CHECK_STR(sb_topic_name(lt), longish);
    sb_topic_unref(lt);
    CHECK_TOPIC_GONE(longish);

    /* a valid name that is not ASCII (the check's general path) is taken as it is */
    const char *utf8 = "bim.caf\xc3\xa9/\xe2\x82\xac";
    sb_topic *ut = sb_topic_create(utf8);
    CHECK(ut != NULL);
    CHECK_STR(sb_topic_name(ut), utf8);
    sb_topic_unref(ut);
    CHECK_TOPIC_GONE(utf8);

    /* the pool still works after all that */
    sb_topic *x = sb_topic_pool_get_topic(pool, "x");
    CHECK(x != NULL);
    CHECK_STR(sb_topic_name(x), "bim.pooled/x");
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 1);
    /* wrong state: deleting twice */
    CHECK_EQ_INT(sb_topic_pool_delete_topic(pool, "x"), SB_OK);
    CHECK_NEG_FRESH(sb_topic_pool_delete_topic(pool, "x"));
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 0);
    sb_topic_unref(x);
    sb_topic_pool_unref(pool);
    sb_topic_unref(pooled);

    /* a valid type name still works, and can still be declined */
    sb_message_type *t = NULL;
    CHECK_EQ_INT(sb_message_type_create("bim.type", NULL, &t), SB_OK);
    CHECK(t != NULL);
    sb_message_type_unref(t);
    CHECK_EQ_INT(sb_message_type_decline("bim.declined"), SB_OK);
    CHECK_EQ_INT(sb_message_type_declined("bim.declined"), 1);
    t = (sb_message_type *)&t;
    CHECK_EQ_INT(sb_message_type_create("bim.declined", NULL, &t), SB_E_DECLINED);
    CHECK(t == NULL);

    printf("longest error text seen: %zu bytes\n", errlen_max);
    free(huge_name);
    free(huge_name_bad);
}

/* ---- wrong state: unsubscribing twice through two references ---- */

static void test_double_unsubscribe(void)
{
    for (int k = 0; k < KIND_COUNT; k++) {
        for (int join = 0; join < 2; join++) {
            sb_topic *t = sb_topic_create("bim.twice");
            recorder rec;
            recorder_init(&rec, ptype, t);
            sb_subscription *s = subscribe_kind(k, t, recorder_cb, &rec);
            CHECK(s != NULL);
            sb_subscription *r1 = sb_subscription_ref(s);
            sb_subscription *r2 = sb_subscription_ref(s);
            CHECK(r1 == s && r2 == s);
            CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);

            if (join)
                CHECK(sb_unsubscribe_and_join(r1) == NULL);
            else
                CHECK(sb_unsubscribe(r1) == NULL);
            /* second unsubscribe through the other reference: a fresh error, no crash */
            if (join)
                CHECK_VOID_FRESH(CHECK(sb_unsubscribe_and_join(r2) == NULL));
            else
                CHECK_VOID_FRESH(CHECK(sb_unsubscribe(r2) == NULL));
            /* a failed unsubscribe_and_join still waited: with join, done now */
            if (join)
                CHECK_EQ_INT(sb_subscription_is_done(s), 1);
            sb_subscription_join(s);
            CHECK_EQ_INT(sb_subscription_is_done(s), 1);
            CHECK_EQ_INT(sb_subscription_is_subscribed(s), 0);
            CHECK_EQ_INT(sb_topic_subscribers(t), 0);

            /* after both: publish reaches nobody, exactly one final, nothing after it */
            CHECK_EQ_INT(publish_payload(t, ptype, 0, 1, 0), 0);
            CHECK_STAYS(atomic_load(&rec.finals) == 1, 20);
            CHECK_RECORDER_LIFECYCLE(&rec);
            CHECK_EQ_INT(atomic_load(&rec.payloads), 1);
            sb_subscription_unref(s); /* the last reference: valgrind sees a leak otherwise */
            recorder_destroy(&rec);
            sb_topic_unref(t);
            CHECK_TOPIC_GONE("bim.twice");
        }
    }
}

/* ---- wrong state: forwards ---- */

static void test_forward_states(void)
{
    sb_topic *a = sb_topic_create("bim.fa");
    sb_topic *b = sb_topic_create("bim.fb");
    recorder rec;
    recorder_init(&rec, ptype, b);
    sb_subscription *s = sb_subscribe_synchronous(b, recorder_cb, &rec);
    CHECK(s != NULL);
    int seq = 0;

    /* create, cancel, create again for the same pair: works */
    sb_forward *f1 = sb_forward_all(a, b);
    CHECK(f1 != NULL);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 1);
    CHECK(sb_forward_cancel(f1) == NULL);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 0);
    sb_forward *f2 = sb_forward_all(a, b);
    CHECK(f2 != NULL);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 1);

    /* two live forwards for one pair: one publish still reaches the subscription once,
     * and cancelling one leaves the other working */
    sb_forward *f3 = sb_forward_all(a, b);
    CHECK(f3 != NULL);
    CHECK_EQ_INT(sb_topic_subscribers(a), 1);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 1);
    CHECK(sb_forward_cancel(f2) == NULL);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 1);
    CHECK(sb_forward_cancel(f3) == NULL);
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 0);
    CHECK_EQ_INT(sb_topic_subscribers(a), 0);

    /* cancel of NULL: a no-op returning NULL */
    CHECK(sb_forward_cancel(NULL) == NULL);

    /* a refused (cyclic) forward leaves the graph alone */
    sb_forward *ab = sb_forward_all(a, b);
    CHECK(ab != NULL);
    CHECK_NULL_FRESH(sb_forward_all(b, a));
    CHECK_NULL_FRESH(sb_forward_all(a, a));
    CHECK_EQ_INT(publish_payload(a, ptype, 0, seq++, 0), 1);
    CHECK(sb_forward_cancel(ab) == NULL);

    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_EQ_INT(atomic_load(&rec.payloads), 5);
    recorder_destroy(&rec);
    sb_topic_unref(a);
    sb_topic_unref(b);
    CHECK_TOPIC_GONE("bim.fa");
    CHECK_TOPIC_GONE("bim.fb");
}

/* ---- publishing to a topic whose every subscription is gone ---- */

static atomic_int ep_dtor;
static void ep_dtor_fn(void *p)
{
    atomic_fetch_add(&ep_dtor, 1);
    free(p);
}

static void test_publish_to_emptied_topic(void)
{
    sb_topic *t = sb_topic_create("bim.empty");
    sb_topic *src = sb_topic_create("bim.empty.src");
    sb_forward *f = sb_forward_all(src, t);
    CHECK(f != NULL);
    recorder rec[KIND_COUNT];
    sb_subscription *subs[KIND_COUNT];
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rec[k], ptype, t);
        subs[k] = subscribe_kind(k, t, recorder_cb, &rec[k]);
        CHECK(subs[k] != NULL);
    }
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), KIND_COUNT);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 1, 0), KIND_COUNT);
    /* gone in different ways: unsubscribe + join later, unsubscribe_and_join, and one
     * unsubscribed through an extra reference that is released afterwards */
    sb_subscription *keep = sb_subscription_ref(subs[KIND_DEDICATED]);
    CHECK(sb_unsubscribe(subs[KIND_DEDICATED]) == NULL);
    CHECK(sb_unsubscribe_and_join(subs[KIND_POOL]) == NULL);
    sb_subscription *extra = sb_subscription_ref(subs[KIND_SYNC]);
    CHECK(sb_unsubscribe(extra) == NULL);
    sb_subscription_unref(subs[KIND_SYNC]);

    /* right away (the dedicated one may not even be done yet): nobody is reached */
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);
    CHECK_EQ_INT(sb_topic_subscribers(src), 0);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 0);
    CHECK_EQ_INT(sb_topic_wants(src, ptype), 0);
    atomic_store(&ep_dtor, 0);
    sb_message *m = sb_message_create(ptype, calloc(1, sizeof(payload_t)), ep_dtor_fn);
    CHECK(m != NULL);
    CHECK_EQ_INT(sb_publish(t, m), 0);
    CHECK_EQ_INT(sb_publish(src, m), 0);
    CHECK_EQ_INT(sb_publish(t, m), 0);
    CHECK_EQ_INT(atomic_load(&ep_dtor), 0); /* publish never takes our reference */
    sb_message_unref(m);
    CHECK_EQ_INT(atomic_load(&ep_dtor), 1);

    sb_subscription_join(keep);
    CHECK_EQ_INT(sb_subscription_is_done(keep), 1);
    sb_subscription_unref(keep);
    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&rec[k].finished) == 1);
        CHECK_RECORDER_LIFECYCLE(&rec[k]);
        CHECK_EQ_INT(atomic_load(&rec[k].payloads), 2);
        recorder_destroy(&rec[k]);
    }
    /* a publish now (everything done) still reaches nobody */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 2, 0), 0);
    CHECK(sb_forward_cancel(f) == NULL);
    sb_topic_unref(t);
    sb_topic_unref(src);
    CHECK_TOPIC_GONE("bim.empty");
    CHECK_TOPIC_GONE("bim.empty.src");
}

/* ---- afterwards, everything still works ---- */

static void round_trip(int kind)
{
    sb_topic *t = sb_topic_create("bim.roundtrip");
    CHECK(t != NULL);
    recorder rec;
    recorder_init(&rec, ptype, t);
    sb_subscription *s = subscribe_kind(kind, t, recorder_cb, &rec);
    CHECK(s != NULL);
    for (int i = 0; i < 20; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
    WAIT_UNTIL(atomic_load(&rec.payloads) == 20);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_RECORDER_THREADS(&rec, kind);
    CHECK_EQ_INT(rec.last_seq[0], 19);
    recorder_destroy(&rec);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE("bim.roundtrip");
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("bim.payload");

    test_bad_names();
    test_double_unsubscribe();
    test_forward_states();
    test_publish_to_emptied_topic();

    for (int k = 0; k < KIND_COUNT; k++)
        round_trip(k);

    sb_message_type_unref(ptype);
    const char *topics[] = {"bim.pooled", "bim.pooled/x", "bim.baddetail", "bim.twice",
                            "bim.fa",     "bim.fb",       "bim.empty",     "bim.roundtrip"};
    for (size_t i = 0; i < sizeof topics / sizeof topics[0]; i++)
        CHECK_TOPIC_GONE(topics[i]);
    WAIT_UNTIL(atomic_load(&payload_destroyed) == atomic_load(&payload_created));
    return TEST_DONE();
}
