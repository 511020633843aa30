/* Two synchronous subscriptions whose callbacks publish to each other's topic deadlock
 * when two threads publish at the same time: thread A runs S1's callback (holding S1's
 * run) and its publish to T2 waits for S2's turn; thread B runs S2's callback and its
 * publish to T1 waits for S1's turn. A lock-order inversion through user callbacks,
 * although the header presents publishing from a callback as supported ("a nested
 * publish from the callback is delivered after the callback returns"). The same happens
 * with one topic and two synchronous subscriptions that both sb_publish_sync() to
 * themselves from their callbacks (the fuzzer's case), and can happen between caching
 * topics whose "-cached" topics are forwarded into each other's originals.
 *
 *   cc -pthread -I../../include sync_callbacks_publish_abba.c -L<libdir> -lswitchboard
 * Exits 0 when fixed (or made an error), 2 on the deadlock (alarm).
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include "switchboard.h"

static sb_topic *t1, *t2;
static sb_message_type *ping, *pong;

/* data: the topic to answer on */
static void cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)sub;
    if (sb_message_get_type(msg) != ping)
        return;
    usleep(100 * 1000); /* both threads get inside their callback */
    sb_message *m = sb_message_create_bytes(pong, "pong", 5);
    sb_publish((sb_topic *)data, m);
    sb_message_unref(m);
}

static void *publish_ping(void *topic) {
    sb_message *m = sb_message_create_bytes(ping, "ping", 5);
    sb_publish(topic, m);
    sb_message_unref(m);
    return NULL;
}

static void on_alarm(int sig) {
    (void)sig;
    static const char text[] = "DEADLOCK: both publishers wait for the other's synchronous subscription\n";
    write(2, text, sizeof text - 1);
    _exit(2);
}

int main(void) {
    signal(SIGALRM, on_alarm);
    alarm(5);
    t1 = sb_topic_create("abba-1");
    t2 = sb_topic_create("abba-2");
    sb_message_type_create("abba-ping", NULL, &ping);
    sb_message_type_create("abba-pong", NULL, &pong);
    sb_subscription *s1 = sb_subscribe_synchronous(t1, cb, t2);
    sb_subscription *s2 = sb_subscribe_synchronous(t2, cb, t1);

    pthread_t a, b;
    pthread_create(&a, NULL, publish_ping, t1);
    pthread_create(&b, NULL, publish_ping, t2);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("both publishes returned\n");

    sb_unsubscribe_and_join(s1);
    sb_unsubscribe_and_join(s2);
    sb_topic_unref(t1);
    sb_topic_unref(t2);
    return 0;
}
