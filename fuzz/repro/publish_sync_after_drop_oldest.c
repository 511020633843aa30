/* sb_publish_sync on a subscription whose SB_OVERFLOW_DROP_OLDEST policy has evicted
 * messages never returns. publish_sync waits until the mailbox's "handled" counter
 * reaches the sequence number of its push, but evicted items were counted as pushed and
 * are never handled, so "handled" stays behind "pushed" for good. (Router publish_sync
 * uses the same wait.)
 *
 *   cc -I../../include publish_sync_after_drop_oldest.c -L<libdir> -lswitchboard
 * Exits 0 when fixed, 2 on the hang (alarm).
 */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include "switchboard.h"

static sb_message_type *type;

static void cb(void *d, sb_subscription *s, sb_message *m) {
    (void)d; (void)s;
    if (sb_message_get_type(m) == type)
        usleep(20 * 1000); /* a slow subscriber, so its queue fills */
}

static void on_alarm(int sig) {
    (void)sig;
    static const char text[] = "HANG: sb_publish_sync never returned\n";
    write(2, text, sizeof text - 1);
    _exit(2);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, on_alarm);
    alarm(5);
    sb_topic *t = sb_topic_create("drop-oldest-repro");
    sb_message_type_create("drop-oldest-repro-type", NULL, &type);
    sb_subscription *s = sb_subscribe(t, cb, NULL);
    sb_subscription_set_overflow(s, SB_OVERFLOW_DROP_OLDEST, 1);
    sb_message *m = sb_message_create_bytes(type, "x", 1);
    for (int i = 0; i < 5; i++)
        sb_publish(t, m);
    printf("dropped: %llu\n", (unsigned long long)sb_subscription_dropped(s));
    int r = sb_publish_sync(s, m); /* hangs */
    printf("publish_sync returned %d\n", r);
    sb_unsubscribe_and_join(s);
    sb_message_unref(m);
    sb_message_type_unref(type);
    sb_topic_unref(t);
    return 0;
}
