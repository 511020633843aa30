/* A synchronous subscription that unsubscribes itself while handling its first message
 * (the Subscribe change, delivered inside sb_subscribe_synchronous) stays in the topic's
 * subscriber list forever: the topic and the subscription keep each other alive (leak),
 * and sb_topic_subscribers() keeps counting it.
 *
 *   cc -I../../include sync_unsubscribe_in_subscribe_callback.c -L<libdir> -lswitchboard
 */
#include <stdio.h>
#include "switchboard.h"

static int calls;

static void cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)msg;
    if (calls++ == 0)
        sb_unsubscribe(sb_subscription_ref(sub)); /* our own reference, released by it */
}

int main(void) {
    sb_topic *t = sb_topic_create("repro");
    sb_subscription *s = sb_subscribe_synchronous(t, cb, NULL);
    printf("is_subscribed=%d subscribers=%zu (expect 0, 0)\n",
           sb_subscription_is_subscribed(s), sb_topic_subscribers(t));
    sb_unsubscribe_and_join(s);
    printf("after unsubscribe_and_join: subscribers=%zu (expect 0)\n", sb_topic_subscribers(t));
    sb_topic_unref(t);
    sb_topic *again = sb_topic_get("repro");
    printf("topic still alive after its last unref: %s (expect no)\n", again ? "yes" : "no");
    sb_topic_unref(again);
    return again != NULL;
}
