/*
 * recorder.h - a reusable subscription callback that records what it receives and checks
 * the delivery rules of API.md while doing so. Include after test_util.h.
 *
 * Payload messages: a `payload_t` (thread index + sequence number) created by payload_msg();
 * its dtor counts destructions, so tests can assert every dtor ran exactly once.
 *
 * recorder_cb (data = recorder *) tracks, per subscription:
 *  - overlapping invocations (an atomic in-callback flag),
 *  - whether the first message was the subscription's own "Subscribe" change,
 *  - the final message (sb_subscription_final_message), that it is the own "Unsubscribe",
 *    and anything delivered after it,
 *  - per publishing thread ordering of payload sequence numbers,
 *  - which thread ran the callback.
 */
#ifndef SB_RECORDER_H
#define SB_RECORDER_H

#include "test_util.h"

#define REC_MAX_THREADS 16

/* ---- payload messages ---- */

typedef struct payload {
    int thread; /* publishing thread index, 0..REC_MAX_THREADS-1 */
    int seq;    /* strictly increasing per thread */
    int tag;    /* free for tests (commands to hooks) */
    atomic_int handled; /* incremented by recorder_cb */
} payload_t;

static atomic_int payload_created;
static atomic_int payload_destroyed;

static void payload_dtor(void *p)
{
    atomic_fetch_add(&payload_destroyed, 1);
    free(p);
}

static inline sb_message *payload_msg(sb_message_type *type, int thread, int seq, int tag)
{
    payload_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->thread = thread;
    p->seq = seq;
    p->tag = tag;
    atomic_init(&p->handled, 0);
    sb_message *m = sb_message_create(type, p, payload_dtor);
    if (m == NULL) {
        free(p);
        return NULL;
    }
    atomic_fetch_add(&payload_created, 1);
    return m;
}

/* Publish one payload; returns sb_publish's result (or -1000 if the message failed). */
static inline int publish_payload(sb_topic *topic, sb_message_type *type, int thread, int seq,
                                  int tag)
{
    sb_message *m = payload_msg(type, thread, seq, tag);
    if (m == NULL)
        return -1000;
    int r = sb_publish(topic, m);
    sb_message_unref(m);
    return r;
}

/* ---- the recorder ---- */

typedef struct recorder recorder;
typedef void (*recorder_hook)(recorder *r, sb_subscription *sub, sb_message *msg);

struct recorder {
    pthread_mutex_t mu;
    sb_message_type *payload_type; /* borrowed: messages of this type are payload_t */
    sb_topic *topic;               /* borrowed, optional: checked in own change messages */
    recorder_hook hook;            /* optional, called after recording, outside the lock */
    void *hook_data;
    int work_yields;               /* sched_yield() this many times per call (widen races) */

    /* thread checks */
    pthread_t main_tid;            /* thread that created the recorder */
    atomic_int on_main;            /* invocations on main_tid */
    atomic_int off_main;           /* invocations elsewhere */
    atomic_int tid_changes;        /* invocations on a different thread than the first one */
    pthread_t first_tid;           /* under mu */
    const pthread_t *publishers;   /* optional: publisher thread per payload thread index */
    atomic_int wrong_publisher_thread; /* payload not handled on its publisher's thread */

    /* counters */
    atomic_int in_cb;
    atomic_int overlaps;
    atomic_int total;
    atomic_int payloads;
    atomic_int others;             /* neither payload nor subscription change */
    atomic_int changes;            /* subscription change messages, any subscription */
    atomic_int own_subscribe;
    atomic_int own_unsubscribe;
    atomic_int other_subscribe;
    atomic_int other_unsubscribe;
    atomic_int first_not_subscribe; /* first message was not the own Subscribe */
    atomic_int finals;
    atomic_int after_final;
    atomic_int final_bad;          /* final_message() true for something not own Unsubscribe */
    atomic_int unsub_not_final;    /* own Unsubscribe for which final_message() was false */
    atomic_int bad_change;         /* malformed change message */
    atomic_int wrong_sub;          /* callback's sub has a different uniqueid than before */
    atomic_int order_errors;
    atomic_int msg_null;
    atomic_int finished;           /* set at the very end of the final message's callback */

    int count;                     /* under mu */
    int final_seen;                /* under mu */
    int last_seq[REC_MAX_THREADS]; /* under mu */
    char uniqueid[256];            /* under mu: uniqueid of the sub, from the first call */
};

static inline void recorder_init(recorder *r, sb_message_type *payload_type, sb_topic *topic)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    r->payload_type = payload_type;
    r->topic = topic;
    r->main_tid = pthread_self();
    for (int i = 0; i < REC_MAX_THREADS; i++)
        r->last_seq[i] = -1;
}

static inline void recorder_destroy(recorder *r) { pthread_mutex_destroy(&r->mu); }

static inline int rec_is_change(const sb_message *msg)
{
    sb_message_type *ct = sb_subscription_change_type();
    return ct != NULL && sb_message_get_type(msg) == ct;
}

static inline void recorder_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    recorder *r = data;
    if (atomic_exchange(&r->in_cb, 1))
        atomic_fetch_add(&r->overlaps, 1);
    if (msg == NULL) {
        atomic_fetch_add(&r->msg_null, 1);
        atomic_store(&r->in_cb, 0);
        return;
    }
    pthread_t self = pthread_self();
    if (pthread_equal(self, r->main_tid))
        atomic_fetch_add(&r->on_main, 1);
    else
        atomic_fetch_add(&r->off_main, 1);

    pthread_mutex_lock(&r->mu);
    int idx = r->count++;
    atomic_fetch_add(&r->total, 1);
    if (r->final_seen)
        atomic_fetch_add(&r->after_final, 1);

    const char *uid = sb_subscription_uniqueid(sub);
    if (idx == 0) {
        snprintf(r->uniqueid, sizeof r->uniqueid, "%s", uid ? uid : "");
        r->first_tid = self;
    } else {
        if (uid == NULL || strcmp(uid, r->uniqueid) != 0)
            atomic_fetch_add(&r->wrong_sub, 1);
        if (!pthread_equal(self, r->first_tid))
            atomic_fetch_add(&r->tid_changes, 1);
    }

    int own_subscribe = 0, own_unsubscribe = 0;
    sb_message_type *type = sb_message_get_type(msg);
    if (rec_is_change(msg)) {
        atomic_fetch_add(&r->changes, 1);
        const sb_subscription_change *c = sb_message_data(msg);
        if (c == NULL || c->uniqueid == NULL || c->description == NULL) {
            atomic_fetch_add(&r->bad_change, 1);
        } else {
            int own = uid != NULL && strcmp(c->uniqueid, uid) == 0;
            int is_sub = strcmp(c->description, "Subscribe") == 0;
            int is_unsub = strcmp(c->description, "Unsubscribe") == 0;
            if (!is_sub && !is_unsub)
                atomic_fetch_add(&r->bad_change, 1);
            if (own) {
                if (r->topic != NULL && c->topic != r->topic)
                    atomic_fetch_add(&r->bad_change, 1);
                if (is_sub) {
                    own_subscribe = 1;
                    atomic_fetch_add(&r->own_subscribe, 1);
                } else if (is_unsub) {
                    own_unsubscribe = 1;
                    atomic_fetch_add(&r->own_unsubscribe, 1);
                }
            } else {
                if (is_sub)
                    atomic_fetch_add(&r->other_subscribe, 1);
                else if (is_unsub)
                    atomic_fetch_add(&r->other_unsubscribe, 1);
            }
        }
    } else if (r->payload_type != NULL && type == r->payload_type) {
        payload_t *p = sb_message_data(msg);
        if (p != NULL && p->thread >= 0 && p->thread < REC_MAX_THREADS) {
            if (p->seq <= r->last_seq[p->thread])
                atomic_fetch_add(&r->order_errors, 1);
            r->last_seq[p->thread] = p->seq;
            if (r->publishers != NULL && !pthread_equal(self, r->publishers[p->thread]))
                atomic_fetch_add(&r->wrong_publisher_thread, 1);
        }
        /* Counted last: a test that waits for the count may then read last_seq (the
         * atomic increment publishes the plain write above). */
        atomic_fetch_add(&r->payloads, 1);
    } else {
        atomic_fetch_add(&r->others, 1);
    }
    if (idx == 0 && !own_subscribe)
        atomic_store(&r->first_not_subscribe, 1);

    int fin = sb_subscription_final_message(sub, msg);
    if (fin == 1) {
        atomic_fetch_add(&r->finals, 1);
        if (!own_unsubscribe)
            atomic_fetch_add(&r->final_bad, 1);
        r->final_seen = 1;
    } else if (own_unsubscribe) {
        atomic_fetch_add(&r->unsub_not_final, 1);
    }
    pthread_mutex_unlock(&r->mu);

    for (int i = 0; i < r->work_yields; i++)
        sched_yield();

    if (r->hook != NULL)
        r->hook(r, sub, msg);

    if (r->payload_type != NULL && type == r->payload_type) {
        payload_t *p = sb_message_data(msg);
        if (p != NULL)
            atomic_fetch_add(&p->handled, 1);
    }
    if (fin == 1)
        atomic_store(&r->finished, 1);
    atomic_store(&r->in_cb, 0);
}

/*
 * Checks for a subscription whose whole life was observed with filter NONE (or a selective
 * filter accepting the change type): own Subscribe first, own Unsubscribe as the single
 * final message, delivered last, no overlap, per-thread order.
 */
#define CHECK_RECORDER_LIFECYCLE(r)                                                     \
    do {                                                                                \
        CHECK_EQ_INT(atomic_load(&(r)->overlaps), 0);                                   \
        CHECK_EQ_INT(atomic_load(&(r)->first_not_subscribe), 0);                        \
        CHECK_EQ_INT(atomic_load(&(r)->own_subscribe), 1);                              \
        CHECK_EQ_INT(atomic_load(&(r)->own_unsubscribe), 1);                            \
        CHECK_EQ_INT(atomic_load(&(r)->finals), 1);                                     \
        CHECK_EQ_INT(atomic_load(&(r)->after_final), 0);                                \
        CHECK_EQ_INT(atomic_load(&(r)->final_bad), 0);                                  \
        CHECK_EQ_INT(atomic_load(&(r)->unsub_not_final), 0);                            \
        CHECK_EQ_INT(atomic_load(&(r)->bad_change), 0);                                 \
        CHECK_EQ_INT(atomic_load(&(r)->wrong_sub), 0);                                  \
        CHECK_EQ_INT(atomic_load(&(r)->order_errors), 0);                               \
        CHECK_EQ_INT(atomic_load(&(r)->msg_null), 0);                                   \
    } while (0)

/* ---- subscription kinds ---- */

typedef sb_subscription *(*subscribe_fn)(sb_topic *topic, sb_subscription_cb cb, void *data);

enum { KIND_DEDICATED = 0, KIND_POOL = 1, KIND_SYNC = 2, KIND_COUNT = 3 };

static const char *const kind_names[KIND_COUNT] = {"dedicated", "pool", "synchronous"};

static inline sb_subscription *subscribe_kind(int kind, sb_topic *topic, sb_subscription_cb cb,
                                              void *data)
{
    switch (kind) {
    case KIND_DEDICATED:
        return sb_subscribe(topic, cb, data);
    case KIND_POOL:
        return sb_subscribe_pool(topic, cb, data);
    default:
        return sb_subscribe_synchronous(topic, cb, data);
    }
}

/* Thread checks that hold for messages published from the recorder's main thread. */
static inline void check_recorder_threads(recorder *r, int kind, const char *file, int line)
{
    char what[160];
    switch (kind) {
    case KIND_DEDICATED:
        snprintf(what, sizeof what, "dedicated callbacks off the publisher thread, one thread");
        tu_check(atomic_load(&r->on_main) == 0 && atomic_load(&r->tid_changes) == 0, file,
                 line, what);
        break;
    case KIND_POOL:
        snprintf(what, sizeof what, "pool callbacks off the publisher thread");
        tu_check(atomic_load(&r->on_main) == 0, file, line, what);
        break;
    default:
        snprintf(what, sizeof what, "synchronous callbacks on the publisher thread");
        tu_check(atomic_load(&r->off_main) == 0, file, line, what);
        break;
    }
}

#define CHECK_RECORDER_THREADS(r, kind) check_recorder_threads((r), (kind), __FILE__, __LINE__)

/* Is a live topic of this name registered? (sb_topic_get returns a new reference.) */
static inline int topic_registered(const char *name)
{
    sb_topic *t = sb_topic_get(name);
    if (t == NULL)
        return 0;
    sb_topic_unref(t);
    return 1;
}

/*
 * Once every reference (ours, subscriptions', forwards', pools') is gone, a topic leaves the
 * registry. Valgrind cannot see a leaked topic (the registry still points at it), so the
 * programs check this explicitly at the end.
 */
#define CHECK_TOPIC_GONE(name)                                                          \
    do {                                                                                \
        WAIT_UNTIL(!topic_registered(name));                                            \
        if (!tu_last_wait_ok())                                                         \
            printf("  topic still registered: %s\n", (const char *)(name));             \
    } while (0)

/* Create (or fetch) a message type, recording a failure if that does not work. */
static inline sb_message_type *make_type(const char *name)
{
    sb_message_type *t = NULL;
    int rc = sb_message_type_create(name, NULL, &t);
    CHECK_EQ_INT(rc, SB_OK);
    CHECK(t != NULL);
    return t;
}

#endif /* SB_RECORDER_H */
