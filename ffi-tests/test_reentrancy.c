/* Re-entrancy of synchronous subscriptions: a callback that publishes to its own topic,
 * or to a topic that forwards back to it, neither deadlocks nor overlaps itself; the
 * nested message is delivered after the current callback returns. */
#define _DEFAULT_SOURCE
#include <stdatomic.h>
#include <string.h>
#include "switchboard.h"
#include "test_util.h"

static sb_message_type *type;
static sb_topic *publish_to; /* where the callback publishes */
static atomic_int in_cb, overlaps, delivered;
static int order[8], norder; /* depth values in delivery order */

static void cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (sb_message_get_type(msg) != type)
        return;
    if (atomic_fetch_add(&in_cb, 1) != 0)
        atomic_fetch_add(&overlaps, 1);
    int depth = *(const int *)sb_message_data(msg);
    if (norder < 8) {
        order[norder++] = depth;
    }
    atomic_fetch_add(&delivered, 1);
    if (depth < 3) {
        int next = depth + 1;
        sb_message *m = sb_message_create_bytes(type, &next, sizeof next);
        /* nested: must return without running the callback (it is running now) */
        int before = atomic_load(&delivered);
        CHECK(sb_publish(publish_to, m) >= 1);
        CHECK_EQ_INT(atomic_load(&delivered), before);
        sb_message_unref(m);
    }
    atomic_fetch_sub(&in_cb, 1);
}

static void run(const char *what, int via_forward) {
    atomic_store(&delivered, 0);
    atomic_store(&overlaps, 0);
    norder = 0;
    sb_topic *a = sb_topic_create("reent.a");
    sb_topic *b = sb_topic_create("reent.b");
    sb_forward *back = via_forward ? sb_forward_all(b, a) : NULL;
    publish_to = via_forward ? b : a;
    sb_subscription *sub = sb_subscribe_synchronous(a, cb, NULL);
    int zero = 0;
    sb_message *m = sb_message_create_bytes(type, &zero, sizeof zero);
    CHECK_EQ_INT(sb_publish(a, m), 1);
    sb_message_unref(m);
    /* all four (depth 0..3) were delivered before sb_publish returned, in order */
    CHECK_EQ_INT(atomic_load(&delivered), 4);
    CHECK_EQ_INT(atomic_load(&overlaps), 0);
    for (int i = 0; i < 4 && i < norder; i++)
        CHECK_EQ_INT(order[i], i);
    printf("%s ok\n", what);
    sb_unsubscribe_and_join(sub);
    sb_forward_cancel(back);
    sb_topic_unref(b);
    sb_topic_unref(a);
}

int main(void) {
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("reent.type", NULL, &type), SB_OK);
    run("publish to own topic", 0);
    run("publish to a topic that forwards back", 1);
    sb_message_type_unref(type);
    return TEST_DONE();
}
