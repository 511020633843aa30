/*
 * test_topic.c - Topics and publishing section of API.md.
 *
 * create / create_with_detail / get / name / detail / uniqueid, same name returns the same
 * topic, the registry forgets a topic when its last reference goes (also when the last
 * reference was a subscription's), sb_topic_subscribers (incl. subscribers reached through
 * forwards), sb_topic_wants with filters and forwards, sb_publish's count, sb_publish never
 * takes the caller's reference, sb_publish_sync.
 */
#include "recorder.h"

static sb_message_type *ptype;  /* payload type */
static sb_message_type *otype;  /* another type */

static void test_create_get(void)
{
    sb_topic *a = sb_topic_create("topic.a");
    CHECK(a != NULL);
    if (a == NULL)
        return;
    CHECK_STR(sb_topic_name(a), "topic.a");
    const char *uid = sb_topic_uniqueid(a);
    CHECK(uid != NULL && uid[0] != '\0');

    /* same name: the same topic */
    sb_topic *a2 = sb_topic_create("topic.a");
    CHECK(a2 == a);
    CHECK_STR(sb_topic_uniqueid(a2), uid);
    sb_topic_unref(a2);

    /* get: a new reference to the live topic */
    sb_topic *g = sb_topic_get("topic.a");
    CHECK(g == a);
    sb_topic_unref(g);
    CHECK(sb_topic_get("topic.nonexistent") == NULL);
    CHECK_EQ_INT(sb_last_error_code(), 0); /* a lookup that found nothing: no failure */
    CHECK(sb_topic_get("") == NULL);        /* a name no topic can have: a failure */
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);

    /* detail */
    sb_topic *b = sb_topic_create_with_detail("topic.b", "the b topic");
    CHECK(b != NULL);
    CHECK_STR(sb_topic_name(b), "topic.b");
    CHECK_STR(sb_topic_detail(b), "the b topic");
    CHECK(b != a);
    CHECK(sb_topic_uniqueid(b) != NULL && strcmp(sb_topic_uniqueid(b), uid) != 0);
    /* the detail counts only when the topic is new: the live one keeps its own */
    sb_topic *b2 = sb_topic_create_with_detail("topic.b", "another detail");
    CHECK(b2 == b);
    CHECK_STR(sb_topic_detail(b2), "the b topic");
    sb_topic_unref(b2);
    sb_topic *a3 = sb_topic_create_with_detail("topic.a", "late detail");
    CHECK(a3 == a);
    CHECK_STR(sb_topic_detail(a3), ""); /* a plain topic's detail is "" */
    sb_topic_unref(a3);

    /* ref returns its argument */
    CHECK(sb_topic_ref(a) == a);
    sb_topic_unref(a);
    CHECK_STR(sb_topic_name(a), "topic.a");

    sb_topic_unref(b);
    sb_topic_unref(a);
    sb_topic_unref(NULL); /* NULL-safe */
}

static void test_registry_leaves(void)
{
    sb_topic *t = sb_topic_create("topic.temp");
    CHECK(t != NULL);
    CHECK(topic_registered("topic.temp"));
    sb_topic_ref(t);
    sb_topic_unref(t);
    CHECK(topic_registered("topic.temp")); /* one reference left */
    sb_topic_unref(t);
    CHECK(!topic_registered("topic.temp"));

    /* a new topic of that name is a new topic */
    sb_topic *t2 = sb_topic_create("topic.temp");
    CHECK(t2 != NULL);
    CHECK_STR(sb_topic_name(t2), "topic.temp");
    sb_topic_unref(t2);
    CHECK(!topic_registered("topic.temp"));

    /* a subscription keeps its topic alive */
    recorder rec;
    sb_topic *k = sb_topic_create("topic.kept");
    recorder_init(&rec, ptype, k);
    sb_subscription *sub = sb_subscribe(k, recorder_cb, &rec);
    CHECK(sub != NULL);
    sb_topic_unref(k);
    CHECK(topic_registered("topic.kept"));
    sb_topic *again = sb_topic_get("topic.kept");
    CHECK(again == k);
    if (again != NULL) {
        CHECK_EQ_INT(publish_payload(again, ptype, 0, 0, 0), 1);
        sb_topic_unref(again);
    }
    WAIT_UNTIL(atomic_load(&rec.payloads) == 1);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    /* the subscription was the last holder: the topic leaves once it is gone */
    WAIT_UNTIL(!topic_registered("topic.kept"));
    recorder_destroy(&rec);

    /* many topics created and dropped */
    for (int i = 0; i < 200; i++) {
        char name[64];
        snprintf(name, sizeof name, "topic.many.%d", i);
        sb_topic *x = sb_topic_create(name);
        CHECK(x != NULL);
        sb_topic_unref(x);
        CHECK(!topic_registered(name));
    }
}

/* concurrent creates of one name all return the same topic */
static sb_topic *race[8];
static void *create_race(void *arg)
{
    intptr_t i = (intptr_t)arg;
    race[i] = sb_topic_create("topic.race");
    return NULL;
}

static void test_concurrent_create(void)
{
    sb_topic *holder = sb_topic_create("topic.race");
    pthread_t th[8];
    for (intptr_t i = 0; i < 8; i++)
        pthread_create(&th[i], NULL, create_race, (void *)i);
    for (int i = 0; i < 8; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 8; i++) {
        CHECK(race[i] == holder);
        sb_topic_unref(race[i]);
    }
    sb_topic_unref(holder);
}

static void test_subscribers_and_wants(void)
{
    sb_topic *t = sb_topic_create("topic.count");
    sb_topic *src = sb_topic_create("topic.count.src");
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 0);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 0);

    recorder rec[3];
    sb_subscription *subs[3];
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rec[k], ptype, t);
        subs[k] = subscribe_kind(k, t, recorder_cb, &rec[k]);
        CHECK(subs[k] != NULL);
        CHECK_EQ_INT(sb_topic_subscribers(t), k + 1);
    }
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 1);
    CHECK_EQ_INT(sb_topic_wants(t, otype), 1);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 1, 0), 3);

    /* subscribers reached via a forward count for the source */
    CHECK_EQ_INT(sb_topic_subscribers(src), 0);
    CHECK_EQ_INT(sb_topic_wants(src, ptype), 0);
    sb_forward *fw = sb_forward_all(src, t);
    CHECK(fw != NULL);
    CHECK_EQ_INT(sb_topic_subscribers(src), 3);
    CHECK_EQ_INT(sb_topic_wants(src, ptype), 1);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 2, 0), 3);

    /* a direct subscriber of src adds to that */
    recorder srec;
    recorder_init(&srec, ptype, src);
    sb_subscription *ssub = sb_subscribe_synchronous(src, recorder_cb, &srec);
    CHECK_EQ_INT(sb_topic_subscribers(src), 4);
    CHECK_EQ_INT(sb_topic_subscribers(t), 3); /* forwards go one way */
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 3, 0), 4);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 4, 0), 3);
    CHECK(sb_unsubscribe_and_join(ssub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&srec);
    CHECK_EQ_INT(srec.payloads, 1);
    recorder_destroy(&srec);
    CHECK_EQ_INT(sb_topic_subscribers(src), 3);

    /* selective filters: the synchronous subscription only accepts ptype */
    CHECK_EQ_INT(sb_subscription_accept_message_type(subs[KIND_SYNC], ptype), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 1);
    CHECK_EQ_INT(sb_topic_wants(t, otype), 1); /* the other two still take everything */
    sb_message *om = sb_message_create(otype, malloc(4), free);
    CHECK_EQ_INT(sb_publish(t, om), 2);        /* not counted for the sync one */
    CHECK_EQ_INT(sb_publish(src, om), 2);
    sb_message_unref(om);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 5, 0), 3);

    /* the dedicated and pool ones decline otype: nobody wants it any more */
    CHECK_EQ_INT(sb_subscription_decline_message_type(subs[KIND_DEDICATED], otype), SB_OK);
    CHECK_EQ_INT(sb_subscription_decline_message_type(subs[KIND_POOL], otype), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(t, otype), 0);
    CHECK_EQ_INT(sb_topic_wants(src, otype), 0);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 1);
    CHECK_EQ_INT(sb_topic_wants(src, ptype), 1);
    om = sb_message_create(otype, malloc(4), free);
    CHECK_EQ_INT(sb_publish(t, om), 0);
    CHECK_EQ_INT(sb_publish(src, om), 0);
    sb_message_unref(om);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 6, 0), 3);
    CHECK_EQ_INT(atomic_load(&rec[KIND_SYNC].others), 0);

    /* unsubscribing lowers the counts */
    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&rec[k].payloads) == 6);
        /* otype reached them only while they accepted it: the two publishes before the
         * declines (none for the selective synchronous one) */
        CHECK_EQ_INT(atomic_load(&rec[k].others), k == KIND_SYNC ? 0 : 2);
        CHECK(sb_unsubscribe_and_join(subs[k]) == NULL);
        CHECK_EQ_INT(sb_topic_subscribers(t), 2 - k);
        CHECK_EQ_INT(sb_topic_subscribers(src), 2 - k);
        CHECK_EQ_INT(atomic_load(&rec[k].order_errors), 0);
        CHECK_EQ_INT(atomic_load(&rec[k].overlaps), 0);
        recorder_destroy(&rec[k]);
    }
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 0);
    CHECK_EQ_INT(sb_topic_wants(src, ptype), 0);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 7, 0), 0);
    CHECK_EQ_INT(publish_payload(src, ptype, 0, 8, 0), 0);

    CHECK(sb_forward_cancel(fw) == NULL);
    sb_topic_unref(src);
    sb_topic_unref(t);
}

/* wants with a selective subscription that accepts nothing, then the change type */
static void test_wants_selective(void)
{
    sb_topic *t = sb_topic_create("topic.wants");
    recorder rec;
    recorder_init(&rec, ptype, t);
    sb_subscription *sub = sb_subscribe(t, recorder_cb, &rec);
    CHECK_EQ_INT(sb_topic_wants(t, sb_subscription_change_type()), 1);
    CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_SELECTIVE), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 0);
    CHECK_EQ_INT(sb_topic_wants(t, otype), 0);
    CHECK_EQ_INT(sb_topic_wants(t, sb_subscription_change_type()), 0);
    CHECK_EQ_INT(sb_subscription_accept_message_type(sub, otype), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(t, otype), 1);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 0);
    CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_NONE), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(t, ptype), 1);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(sb_topic_wants(t, otype), 0);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/* ---- publish does not take the caller's reference ---- */

static atomic_int keep_dtor;
static void keep_dtor_fn(void *d)
{
    atomic_fetch_add(&keep_dtor, 1);
    free(d);
}

static void test_publish_keeps_ref(void)
{
    sb_topic *t = sb_topic_create("topic.keepref");
    recorder rec[3];
    sb_subscription *subs[3];
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rec[k], ptype, t);
        subs[k] = subscribe_kind(k, t, recorder_cb, &rec[k]);
    }
    int *d = malloc(sizeof *d);
    *d = 17;
    sb_message *m = sb_message_create(otype, d, keep_dtor_fn);
    for (int i = 0; i < 10; i++)
        CHECK_EQ_INT(sb_publish(t, m), 3);
    for (int k = 0; k < KIND_COUNT; k++)
        WAIT_UNTIL(atomic_load(&rec[k].others) == 10);
    /* every subscription has handled it and we still own our reference */
    CHECK_EQ_INT(atomic_load(&keep_dtor), 0);
    CHECK(sb_message_data(m) == d && *d == 17);
    for (int k = 0; k < KIND_COUNT; k++) {
        CHECK(sb_unsubscribe_and_join(subs[k]) == NULL);
        recorder_destroy(&rec[k]);
    }
    CHECK_EQ_INT(atomic_load(&keep_dtor), 0);
    sb_message_unref(m);
    CHECK_EQ_INT(atomic_load(&keep_dtor), 1);

    /* dropping our reference right after publishing: the subscribers still get the data */
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rec[k], ptype, t);
        rec[k].work_yields = 50;
        subs[k] = subscribe_kind(k, t, recorder_cb, &rec[k]);
    }
    int n = 50;
    for (int i = 0; i < n; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 3);
    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&rec[k].payloads) == n);
        CHECK(sb_unsubscribe_and_join(subs[k]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec[k]);
        recorder_destroy(&rec[k]);
    }
    sb_topic_unref(t);
}

/* ---- publish_sync ---- */

static atomic_int slow_first;

static void slow_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)r;
    (void)sub;
    (void)msg;
    if (atomic_exchange(&slow_first, 0))
        tu_sleep_ms(50);
}

typedef struct {
    sb_subscription *sub;
    sb_topic *topic;
    int thread;
    int n;
} sync_arg;

static void *sync_publisher(void *arg)
{
    sync_arg *a = arg;
    for (int i = 0; i < a->n; i++) {
        sb_message *m = payload_msg(ptype, a->thread, i, 0);
        payload_t *p = sb_message_data(m);
        int rc = sb_publish_sync(a->sub, m);
        CHECK(rc >= 0);
        /* handled by this subscription before publish_sync returned */
        CHECK_EQ_INT(atomic_load(&p->handled) >= 1, 1);
        sb_message_unref(m);
    }
    return NULL;
}

static void test_publish_sync(void)
{
    for (int k = 0; k < KIND_COUNT; k++) {
        char name[64];
        snprintf(name, sizeof name, "topic.sync.%s", kind_names[k]);
        sb_topic *t = sb_topic_create(name);
        recorder rec, other;
        recorder_init(&rec, ptype, t);
        /* `other` does not treat payloads as payloads (it counts them in `others`), so
         * payload_t.handled only counts the subscription under test */
        recorder_init(&other, NULL, t);
        rec.hook = slow_hook;
        sb_subscription *sub = subscribe_kind(k, t, recorder_cb, &rec);
        sb_subscription *osub = sb_subscribe(t, recorder_cb, &other);
        CHECK(sub != NULL && osub != NULL);

        /* a slow message is in front: publish_sync still waits for its own */
        atomic_store(&slow_first, 1);
        CHECK(publish_payload(t, ptype, 1, 0, 0) >= 0);
        sb_message *m = payload_msg(ptype, 0, 0, 0);
        payload_t *p = sb_message_data(m);
        int rc = sb_publish_sync(sub, m);
        CHECK(rc >= 0);
        CHECK_EQ_INT(atomic_load(&p->handled) >= 1, 1);
        CHECK_EQ_INT(atomic_load(&rec.payloads), 2);
        sb_message_unref(m);

        /* from several threads at once */
        pthread_t th[3];
        sync_arg args[3];
        for (int i = 0; i < 3; i++) {
            args[i] = (sync_arg){sub, t, 2 + i, tu_scale(100, 10)};
            pthread_create(&th[i], NULL, sync_publisher, &args[i]);
        }
        for (int i = 0; i < 3; i++)
            pthread_join(th[i], NULL);
        int total = 2 + 3 * tu_scale(100, 10);
        CHECK_EQ_INT(atomic_load(&rec.payloads), total);
        /* it was published to the topic: the other subscriber gets it too */
        WAIT_UNTIL(atomic_load(&other.others) == total);

        CHECK(sb_unsubscribe_and_join(sub) == NULL);
        CHECK(sb_unsubscribe_and_join(osub) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec);
        CHECK_RECORDER_LIFECYCLE(&other);
        recorder_destroy(&rec);
        recorder_destroy(&other);
        sb_topic_unref(t);
    }
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("topic.payload");
    otype = make_type("topic.other");
    test_create_get();
    test_registry_leaves();
    test_concurrent_create();
    test_subscribers_and_wants();
    test_wants_selective();
    test_publish_keeps_ref();
    test_publish_sync();
    sb_message_type_unref(ptype);
    sb_message_type_unref(otype);
    const char *topics[] = {"topic.a", "topic.b", "topic.race", "topic.count", "topic.count.src",
                            "topic.wants", "topic.keepref", "topic.sync.dedicated",
                            "topic.sync.pool", "topic.sync.synchronous"};
    for (size_t i = 0; i < sizeof topics / sizeof topics[0]; i++)
        CHECK_TOPIC_GONE(topics[i]);
    WAIT_UNTIL(atomic_load(&payload_created) == atomic_load(&payload_destroyed));
    return TEST_DONE();
}
