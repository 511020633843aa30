/* race_canary.c - races on purpose; tests/ffi.rs runs it under ThreadSanitizer
 * (SB_TSAN=1) to prove that the sanitizer sees the threads the library starts: a
 * dedicated subscription's callback writes a plain counter that the publishing thread
 * reads without synchronization, which ThreadSanitizer must report as a data race.
 * Not a test of its own. */
#include <stdio.h>
#include "switchboard.h"

static int hits; /* written by the callback, read by main: no lock on purpose */

static void count(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
    hits++;
}

int main(void)
{
    sb_message_type *ty = NULL;
    if (sb_message_type_create("race_canary.type", NULL, &ty) != SB_OK)
        return 2;
    sb_topic *topic = sb_topic_create("race_canary.topic");
    sb_subscription *sub = topic ? sb_subscribe(topic, count, NULL) : NULL;
    if (!sub)
        return 2;
    volatile int sink = 0;
    for (int i = 0; i < 1000; i++) {
        sb_message *m = sb_message_create_bytes(ty, "x", 2);
        sb_publish(topic, m);
        sb_message_unref(m);
        sink += hits; /* the racy read */
    }
    sb_unsubscribe_and_join(sub);
    sb_topic_unref(topic);
    sb_message_type_unref(ty);
    printf("raced on purpose (%d)\n", sink > 0);
    return 0;
}
