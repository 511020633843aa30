/* A synchronous subscription's callback publishes to its own topic (a "nested" publish,
 * documented to be delivered after the callback returns) while another thread publishes
 * to the same topic. The other thread's item is queued first, so the runner hands the
 * run to that thread and stops; that thread delivers its own item and then hands the run
 * back to the first thread, which is no longer running anything. The nested message is
 * never delivered and the mailbox stays "running" on a thread that left: every later
 * publish from another thread and every join waits forever.
 *
 *   cc -pthread -I../../include sync_nested_publish_orphaned.c -L<libdir> -lswitchboard
 * Exits 0 when fixed; 1 (wrong count) or 2 (hang, via alarm) when broken.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "switchboard.h"

static sb_topic *topic;
static sb_message_type *type;
static int delivered; /* data messages handled (callbacks never overlap) */

static void cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (sb_message_get_type(msg) != type)
        return;
    delivered++;
    const char *text = sb_message_data(msg);
    if (strcmp(text, "first") == 0) {
        usleep(200 * 1000); /* let the other thread queue its message meanwhile */
        sb_message *nested = sb_message_create_bytes(type, "nested", 7);
        sb_publish(topic, nested); /* delivered after this callback returns */
        sb_message_unref(nested);
    }
}

static void *other(void *arg) {
    (void)arg;
    usleep(50 * 1000);
    sb_message *m = sb_message_create_bytes(type, "other", 6);
    sb_publish(topic, m);
    sb_message_unref(m);
    return NULL;
}

static void on_alarm(int sig) {
    (void)sig;
    static const char text[] = "HANG: nested message orphaned, join never returns\n";
    write(2, text, sizeof text - 1);
    _exit(2);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGALRM, on_alarm);
    alarm(5);
    topic = sb_topic_create("nested-repro");
    sb_message_type_create("nested-repro-type", NULL, &type);
    sb_subscription *sub = sb_subscribe_synchronous(topic, cb, NULL);

    pthread_t th;
    pthread_create(&th, NULL, other, NULL);
    sb_message *first = sb_message_create_bytes(type, "first", 6);
    sb_publish(topic, first);
    sb_message_unref(first);
    pthread_join(th, NULL);

    printf("delivered %d of 3 (first, other, nested)\n", delivered);
    sb_unsubscribe_and_join(sub);
    printf("unsubscribe_and_join returned\n");
    sb_message_type_unref(type);
    sb_topic_unref(topic);
    return delivered == 3 ? 0 : 1;
}
