/*
 * test_topic_pool.c - Topic pools section of API.md.
 *
 * Pool topics are named "<pooled topic name>/<name>", forward into the pooled topic (a
 * synchronous subscriber of the pooled topic has run when sb_publish on the pool topic
 * returns), get_topic returns the same topic for a name while it exists, exists/delete,
 * concurrent get_topic of one name, the pool keeps working after the caller drops its
 * reference to the pooled topic.
 */
#include "recorder.h"

static sb_message_type *ptype;

static void test_basic(void)
{
    printf("basic\n");
    sb_topic *root = sb_topic_create("pool.root");
    sb_topic_pool *pool = sb_topic_pool_create(root);
    CHECK(pool != NULL);
    if (pool == NULL)
        return;

    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 0);
    sb_topic *x = sb_topic_pool_get_topic(pool, "x");
    CHECK(x != NULL);
    CHECK_STR(sb_topic_name(x), "pool.root/x");
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 1);
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "y"), 0);
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "pool.root/x"), 0);

    /* the same name gives the same topic; it is the registered topic of that full name */
    sb_topic *x2 = sb_topic_pool_get_topic(pool, "x");
    CHECK(x2 == x);
    sb_topic_unref(x2);
    sb_topic *g = sb_topic_get("pool.root/x");
    CHECK(g == x);
    sb_topic_unref(g);

    /* it forwards into the pooled topic */
    recorder rroot, rx;
    recorder_init(&rroot, ptype, root);
    recorder_init(&rx, ptype, x);
    sb_subscription *sroot = sb_subscribe_synchronous(root, recorder_cb, &rroot);
    sb_subscription *sx = sb_subscribe_synchronous(x, recorder_cb, &rx);
    CHECK_EQ_INT(sb_topic_subscribers(x), 2);
    CHECK_EQ_INT(publish_payload(x, ptype, 0, 0, 0), 2);
    CHECK_EQ_INT(atomic_load(&rroot.payloads), 1);
    CHECK_EQ_INT(atomic_load(&rx.payloads), 1);
    /* ... and not the other way */
    CHECK_EQ_INT(publish_payload(root, ptype, 1, 0, 0), 1);
    CHECK_EQ_INT(atomic_load(&rx.payloads), 1);
    CHECK_EQ_INT(atomic_load(&rroot.payloads), 2);

    /* several pool topics all feed the pooled topic */
    sb_topic *more[10];
    for (int i = 0; i < 10; i++) {
        char name[16];
        snprintf(name, sizeof name, "n%d", i);
        more[i] = sb_topic_pool_get_topic(pool, name);
        CHECK(more[i] != NULL);
        char full[64];
        snprintf(full, sizeof full, "pool.root/n%d", i);
        CHECK_STR(sb_topic_name(more[i]), full);
        CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, name), 1);
    }
    for (int i = 0; i < 10; i++)
        CHECK_EQ_INT(publish_payload(more[i], ptype, 2, i, 0), 1);
    CHECK_EQ_INT(atomic_load(&rroot.payloads), 12);
    for (int i = 0; i < 10; i++) {
        char name[16];
        snprintf(name, sizeof name, "n%d", i);
        CHECK_EQ_INT(sb_topic_pool_delete_topic(pool, name), SB_OK);
        CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, name), 0);
        sb_topic_unref(more[i]);
    }
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 1);

    CHECK(sb_unsubscribe_and_join(sx) == NULL);
    CHECK(sb_unsubscribe_and_join(sroot) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rx);
    recorder_destroy(&rx);
    recorder_destroy(&rroot);

    /* delete */
    CHECK_EQ_INT(sb_topic_pool_delete_topic(pool, "x"), SB_OK);
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 0);
    /* its forward is cancelled: a publish to the topic we still hold stays there */
    recorder_init(&rroot, ptype, root);
    sroot = sb_subscribe_synchronous(root, recorder_cb, &rroot);
    CHECK_EQ_INT(publish_payload(x, ptype, 2, 0, 0), 0);
    CHECK_EQ_INT(atomic_load(&rroot.payloads), 0);
    CHECK(sb_unsubscribe_and_join(sroot) == NULL);
    recorder_destroy(&rroot);
    sb_topic_unref(x);
    /* get after delete: exists again, with the same name, still forwarding */
    sb_topic *x3 = sb_topic_pool_get_topic(pool, "x");
    CHECK(x3 != NULL);
    CHECK_STR(sb_topic_name(x3), "pool.root/x");
    CHECK_EQ_INT(sb_topic_pool_topic_exists(pool, "x"), 1);
    recorder_init(&rroot, ptype, root);
    sroot = sb_subscribe_synchronous(root, recorder_cb, &rroot);
    CHECK_EQ_INT(publish_payload(x3, ptype, 3, 0, 0), 1);
    CHECK_EQ_INT(atomic_load(&rroot.payloads), 1);
    CHECK(sb_unsubscribe_and_join(sroot) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rroot);
    recorder_destroy(&rroot);
    sb_topic_unref(x3);

    sb_topic_pool_unref(pool);
    sb_topic_pool_unref(NULL); /* NULL-safe */
    sb_topic_unref(root);
}

/* the pool keeps the pooled topic alive; the pooled topic name may contain '/' */
static void test_pool_keeps_root(void)
{
    printf("pool keeps root\n");
    sb_topic *root = sb_topic_create("pool/nested");
    sb_topic_pool *pool = sb_topic_pool_create(root);
    CHECK(pool != NULL);
    sb_topic_unref(root);
    sb_topic *t = sb_topic_pool_get_topic(pool, "leaf");
    CHECK(t != NULL);
    CHECK_STR(sb_topic_name(t), "pool/nested/leaf");
    sb_topic *r = sb_topic_get("pool/nested");
    CHECK(r != NULL);
    if (r != NULL) {
        recorder rec;
        recorder_init(&rec, ptype, r);
        sb_subscription *s = sb_subscribe_synchronous(r, recorder_cb, &rec);
        CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
        CHECK_EQ_INT(atomic_load(&rec.payloads), 1);
        CHECK(sb_unsubscribe_and_join(s) == NULL);
        recorder_destroy(&rec);
        sb_topic_unref(r);
    }
    sb_topic_unref(t);
    sb_topic_pool_unref(pool);
}

/* concurrent get_topic of the same and different names */
typedef struct getter_arg {
    sb_topic_pool *pool;
    sb_topic *got[20];
} getter_arg;

static void *getter(void *arg)
{
    getter_arg *a = arg;
    for (int i = 0; i < 20; i++) {
        char name[16];
        snprintf(name, sizeof name, "c%d", i);
        a->got[i] = sb_topic_pool_get_topic(a->pool, name);
    }
    return NULL;
}

static void test_concurrent_get(void)
{
    printf("concurrent get\n");
    sb_topic *root = sb_topic_create("pool.cc");
    sb_topic_pool *pool = sb_topic_pool_create(root);
    getter_arg args[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        args[i].pool = pool;
        pthread_create(&th[i], NULL, getter, &args[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    recorder rec;
    recorder_init(&rec, ptype, root);
    sb_subscription *s = sb_subscribe_synchronous(root, recorder_cb, &rec);
    for (int n = 0; n < 20; n++) {
        for (int i = 0; i < 4; i++)
            CHECK(args[i].got[n] != NULL && args[i].got[n] == args[0].got[n]);
        /* one topic per name: a publish reaches the root subscriber exactly once */
        CHECK_EQ_INT(publish_payload(args[0].got[n], ptype, 0, n, 0), 1);
    }
    CHECK_EQ_INT(atomic_load(&rec.payloads), 20);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    recorder_destroy(&rec);
    for (int i = 0; i < 4; i++)
        for (int n = 0; n < 20; n++)
            sb_topic_unref(args[i].got[n]);
    sb_topic_pool_unref(pool);
    sb_topic_unref(root);
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("pool.payload");
    test_basic();
    test_pool_keeps_root();
    test_concurrent_get();
    sb_message_type_unref(ptype);
    /* the pools are gone: their topics and the pooled topics were released */
    const char *topics[] = {"pool.root", "pool.root/x", "pool.root/n0", "pool.root/n9",
                            "pool/nested", "pool/nested/leaf", "pool.cc", "pool.cc/c0",
                            "pool.cc/c19"};
    for (size_t i = 0; i < sizeof topics / sizeof topics[0]; i++)
        CHECK_TOPIC_GONE(topics[i]);
    WAIT_UNTIL(atomic_load(&payload_created) == atomic_load(&payload_destroyed));
    return TEST_DONE();
}
