#define _DEFAULT_SOURCE
/* Regression tests for bugs found by the API fuzzer (fuzz/), one function each. The
 * harness watchdog (TEST_INIT) turns a hang into a failure. */
#include <pthread.h>
#include <string.h>
#include <unistd.h>
#include "switchboard.h"
#include "test_util.h"

/* 1. A synchronous callback publishes to its own topic while another thread publishes
 *    there: the nested message must still be delivered (after the callback returns) and
 *    later joins must not hang. */
static sb_topic *nested_topic;
static sb_message_type *nested_type;
static int nested_delivered; /* callbacks never overlap */

static void nested_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (sb_message_get_type(msg) != nested_type)
        return;
    nested_delivered++;
    if (strcmp(sb_message_data(msg), "first") == 0) {
        usleep(200 * 1000); /* let the other thread queue its message meanwhile */
        sb_message *nested = sb_message_create_bytes(nested_type, "nested", 7);
        sb_publish(nested_topic, nested);
        sb_message_unref(nested);
    }
}

static void *nested_other(void *arg) {
    (void)arg;
    usleep(50 * 1000);
    sb_message *m = sb_message_create_bytes(nested_type, "other", 6);
    sb_publish(nested_topic, m);
    sb_message_unref(m);
    return NULL;
}

static void test_sync_nested_publish_with_concurrent_publisher(void) {
    nested_topic = sb_topic_create("regress.nested");
    CHECK_EQ_INT(sb_message_type_create("regress.nested.type", NULL, &nested_type), SB_OK);
    sb_subscription *sub = sb_subscribe_synchronous(nested_topic, nested_cb, NULL);
    pthread_t th;
    pthread_create(&th, NULL, nested_other, NULL);
    sb_message *first = sb_message_create_bytes(nested_type, "first", 6);
    sb_publish(nested_topic, first);
    sb_message_unref(first);
    pthread_join(th, NULL);
    CHECK_EQ_INT(nested_delivered, 3); /* first, other, nested */
    sb_unsubscribe_and_join(sub);
    sb_message_type_unref(nested_type);
    sb_topic_unref(nested_topic);
}

/* 2. publish_sync on a subscription whose drop-oldest policy evicted messages returns. */
static sb_message_type *slow_type;

static void slow_cb(void *d, sb_subscription *s, sb_message *m) {
    (void)d; (void)s;
    if (sb_message_get_type(m) == slow_type)
        usleep(20 * 1000);
}

static void test_publish_sync_after_drop_oldest(void) {
    sb_topic *t = sb_topic_create("regress.drop_oldest");
    CHECK_EQ_INT(sb_message_type_create("regress.drop_oldest.type", NULL, &slow_type), SB_OK);
    sb_subscription *s = sb_subscribe(t, slow_cb, NULL);
    CHECK_EQ_INT(sb_subscription_set_overflow(s, SB_OVERFLOW_DROP_OLDEST, 1), SB_OK);
    sb_message *m = sb_message_create_bytes(slow_type, "x", 1);
    for (int i = 0; i < 5; i++)
        sb_publish(t, m);
    CHECK(sb_subscription_dropped(s) > 0);
    CHECK_EQ_INT(sb_publish_sync(s, m), 1);
    sb_unsubscribe_and_join(s);
    sb_message_unref(m);
    sb_message_type_unref(slow_type);
    sb_topic_unref(t);
}

/* 3. A subscription that unsubscribes while handling its own Subscribe message leaves
 *    its topic (which then leaves the registry with its last reference). */
static int self_unsub_calls;

static void self_unsub_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)msg;
    if (self_unsub_calls++ == 0)
        sb_unsubscribe(sb_subscription_ref(sub));
}

static void test_unsubscribe_in_subscribe_callback(void) {
    sb_topic *t = sb_topic_create("regress.self_unsub");
    sb_subscription *s = sb_subscribe_synchronous(t, self_unsub_cb, NULL);
    CHECK_EQ_INT(sb_subscription_is_subscribed(s), 0);
    CHECK_EQ_INT((int)sb_topic_subscribers(t), 0);
    sb_unsubscribe_and_join(s);
    sb_topic_unref(t);
    sb_topic *again = sb_topic_get("regress.self_unsub");
    CHECK(again == NULL);
    sb_topic_unref(again);
}

int main(void) {
    TEST_INIT();
    test_sync_nested_publish_with_concurrent_publisher();
    test_publish_sync_after_drop_oldest();
    test_unsubscribe_in_subscribe_callback();
    return TEST_DONE();
}
