/*
 * test_pool_limits.c - the pool stands in for workers blocked in a library wait, and gives
 * the stand-ins back as soon as the blocked workers return.
 *
 * Pool: sb_pool_configure(1, 2, 60 s idle timeout). A dedicated subscription D is held in
 * its callback by a gate and unsubscribed (its final message waits behind the gate). Two
 * pool callbacks then join D, so both workers block inside the library; a third pool
 * subscription P must still get every message meanwhile (the pool starts stand-ins). When
 * the gate opens, the joins return, and the number of "sb-pool" threads must come back to
 * at most max_threads (2) long before the 60 s idle timeout would retire anyone: surplus
 * workers retire at their next turn.
 */
#define _DEFAULT_SOURCE
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include "switchboard.h"
#include "test_util.h"

#define TAG_BLOCK 1
#define TAG_JOIN 2
#define TAG_PLAIN 3
#define NPLAIN 200

static sb_message_type *ty;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int gate_open_flag;
static atomic_int d_blocked, joins_started, joins_done, plain_seen;
static sb_subscription *d_keep; /* a reference to D for the joiners */

static int tag_of(sb_message *msg) {
    if (sb_message_get_type(msg) != ty)
        return 0;
    return *(const int *)sb_message_data(msg);
}

static void publish_tag(sb_topic *t, int tag) {
    sb_message *m = sb_message_create_bytes(ty, &tag, sizeof tag);
    CHECK(sb_publish(t, m) >= 1);
    sb_message_unref(m);
}

static void d_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) != TAG_BLOCK)
        return;
    atomic_store(&d_blocked, 1);
    pthread_mutex_lock(&mu);
    double end = tu_now_s() + 3 * tu_wait_seconds();
    while (!gate_open_flag && tu_now_s() < end) {
        pthread_mutex_unlock(&mu);
        tu_sleep_ms(5);
        pthread_mutex_lock(&mu);
    }
    pthread_mutex_unlock(&mu);
}

static void joiner_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) != TAG_JOIN)
        return;
    atomic_fetch_add(&joins_started, 1);
    sb_subscription_join(d_keep); /* blocks in the library until D's final message */
    if (sb_subscription_is_done(d_keep))
        atomic_fetch_add(&joins_done, 1);
}

static void plain_cb(void *data, sb_subscription *sub, sb_message *msg) {
    (void)data; (void)sub;
    if (tag_of(msg) == TAG_PLAIN)
        atomic_fetch_add(&plain_seen, 1);
}

static int pool_threads(void) {
    DIR *dir = opendir("/proc/self/task");
    if (dir == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            continue; /* the thread just exited */
        if (fgets(comm, sizeof comm, f) != NULL && strncmp(comm, "sb-pool", 7) == 0)
            n++;
        fclose(f);
    }
    closedir(dir);
    return n;
}

int main(void) {
    TEST_INIT();
    CHECK_EQ_INT(sb_pool_configure(1, 2, 60000), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("pl.tag", NULL, &ty), SB_OK);
    sb_topic *td = sb_topic_create("pl.d");
    sb_topic *tj = sb_topic_create("pl.j");
    sb_topic *tp = sb_topic_create("pl.p");

    sb_subscription *d = sb_subscribe(td, d_cb, NULL);
    d_keep = sb_subscription_ref(d);
    publish_tag(td, TAG_BLOCK);
    WAIT_UNTIL(atomic_load(&d_blocked));
    sb_unsubscribe(d); /* the final message waits behind the gate */

    sb_subscription *j1 = sb_subscribe_pool(tj, joiner_cb, NULL);
    sb_subscription *j2 = sb_subscribe_pool(tj, joiner_cb, NULL);
    sb_subscription *p = sb_subscribe_pool(tp, plain_cb, NULL);
    publish_tag(tj, TAG_JOIN);
    WAIT_UNTIL(atomic_load(&joins_started) == 2); /* both workers blocked in a join */

    for (int i = 0; i < NPLAIN; i++)
        publish_tag(tp, TAG_PLAIN);
    WAIT_UNTIL(atomic_load(&plain_seen) == NPLAIN); /* stand-ins ran P meanwhile */
    CHECK_EQ_INT(atomic_load(&joins_done), 0);
    int during = pool_threads();
    CHECK(during >= 3); /* two blocked workers and at least one stand-in */

    pthread_mutex_lock(&mu);
    gate_open_flag = 1;
    pthread_mutex_unlock(&mu);
    WAIT_UNTIL(atomic_load(&joins_done) == 2);
    /* well before the 60 s idle timeout: surplus workers retire at once */
    WAIT_UNTIL(pool_threads() <= 2);
    printf("pool threads: %d while two workers were blocked, %d after\n", during,
           pool_threads());

    sb_unsubscribe_and_join(j1);
    sb_unsubscribe_and_join(j2);
    sb_unsubscribe_and_join(p);
    sb_subscription_unref(d_keep);
    sb_topic_unref(td);
    sb_topic_unref(tj);
    sb_topic_unref(tp);
    sb_message_type_unref(ty);
    return TEST_DONE();
}
