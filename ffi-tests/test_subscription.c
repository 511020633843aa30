/*
 * test_subscription.c - Subscriptions section of API.md, for all three kinds
 * (dedicated thread, shared pool, synchronous):
 *
 *  - lifecycle: own "Subscribe" first, own "Unsubscribe" is the final message, delivered last,
 *    nothing after it; is_subscribed / is_done / join / final_message / uniqueid / ref;
 *  - which thread runs callbacks; synchronous callbacks have run when sb_publish returns;
 *  - other subscriptions' change messages are seen;
 *  - sb_unsubscribe_and_join from the subscription's own callback returns (no deadlock) and
 *    sets the SB_E_DEADLOCK last error;
 *  - unsubscribing other subscriptions from callbacks (with and without join);
 *  - publishing from inside callbacks, to another topic and re-entrantly to the same topic;
 *  - filters: accept (switches to selective), decline with NONE, set_filter; the final
 *    message is only delivered if the change type is accepted, join/is_done work anyway;
 *  - congestion limits are accepted and nothing is dropped;
 *  - invocations never overlap and follow per-thread publish order with 4 publishing threads;
 *  - the data pointer is never touched.
 */
#include "recorder.h"

static sb_message_type *ptype; /* payload type */
static sb_message_type *otype; /* another type */

static sb_topic *kind_topic(const char *what, int kind)
{
    char name[128];
    snprintf(name, sizeof name, "sub.%s.%s", what, kind_names[kind]);
    sb_topic *t = sb_topic_create(name);
    CHECK(t != NULL);
    return t;
}

/* ---- basic lifecycle ---- */

static void test_lifecycle(int kind)
{
    printf("lifecycle %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("life", kind);
    recorder rec;
    recorder_init(&rec, ptype, t);
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    CHECK(sub != NULL);
    if (sub == NULL)
        return;
    const char *uid = sb_subscription_uniqueid(sub);
    CHECK(uid != NULL && uid[0] != '\0');
    if (uid != NULL) { /* "<topic name>:<decimal number>" */
        const char *name = sb_topic_name(t);
        size_t len = strlen(name);
        int prefix = strncmp(uid, name, len) == 0; /* then uid has at least len bytes */
        CHECK(prefix && uid[len] == ':');
        if (prefix && uid[len] == ':') {
            const char *num = uid + len + 1;
            CHECK(num[0] != '\0' && strspn(num, "0123456789") == strlen(num));
        }
    }
    CHECK_EQ_INT(sb_subscription_is_subscribed(sub), 1);
    CHECK_EQ_INT(sb_subscription_is_done(sub), 0);
    if (kind == KIND_SYNC) /* the Subscribe message was handled inside sb_subscribe */
        CHECK_EQ_INT(atomic_load(&rec.own_subscribe), 1);

    sb_subscription *extra = sb_subscription_ref(sub);
    CHECK(extra == sub);

    int n = 100;
    for (int i = 0; i < n; i++) {
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
        if (kind == KIND_SYNC) /* delivered inside sb_publish */
            CHECK_EQ_INT(atomic_load(&rec.payloads), i + 1);
    }
    /* a payload message is not the final message */
    sb_message *pm = payload_msg(ptype, 1, 0, 0);
    CHECK_EQ_INT(sb_subscription_final_message(sub, pm), 0);
    sb_message_unref(pm);

    CHECK_EQ_INT(sb_subscription_is_done(sub), 0);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    /* join returned: the final message has been handled */
    CHECK_EQ_INT(atomic_load(&rec.finished), 1);
    CHECK_EQ_INT(sb_subscription_is_done(extra), 1);
    CHECK_EQ_INT(sb_subscription_is_subscribed(extra), 0);
    CHECK_EQ_INT(atomic_load(&rec.payloads), n);
    CHECK_EQ_INT(atomic_load(&rec.total), n + 2);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_RECORDER_THREADS(&rec, kind);
    pthread_mutex_lock(&rec.mu);
    CHECK_STR(rec.uniqueid, sb_subscription_uniqueid(extra));
    pthread_mutex_unlock(&rec.mu);

    /* nothing reaches it any more */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, n, 0), 0);
    CHECK_EQ_INT(sb_topic_subscribers(t), 0);
    CHECK_STAYS(atomic_load(&rec.total) == n + 2, 20);
    CHECK_EQ_INT(atomic_load(&rec.after_final), 0);
    sb_subscription_unref(extra);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/* sb_unsubscribe returns at once; is_done / join observe the end */
static void test_unsubscribe_then_join(int kind)
{
    printf("unsubscribe+join %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("unsub", kind);

    /* poll is_done */
    recorder rec;
    recorder_init(&rec, ptype, t);
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    sb_subscription *extra = sb_subscription_ref(sub);
    for (int i = 0; i < 20; i++)
        publish_payload(t, ptype, 0, i, 0);
    CHECK(sb_unsubscribe(sub) == NULL);
    CHECK_EQ_INT(sb_subscription_is_subscribed(extra), 0);
    WAIT_UNTIL(sb_subscription_is_done(extra) == 1);
    CHECK_EQ_INT(atomic_load(&rec.finished), 1);
    CHECK_EQ_INT(atomic_load(&rec.payloads), 20);
    sb_subscription_join(extra); /* already done: returns */
    CHECK_RECORDER_LIFECYCLE(&rec);
    sb_subscription_unref(extra);
    recorder_destroy(&rec);

    /* block in join */
    recorder_init(&rec, ptype, t);
    rec.work_yields = 20;
    sub = subscribe_kind(kind, t, recorder_cb, &rec);
    extra = sb_subscription_ref(sub);
    for (int i = 0; i < 50; i++)
        publish_payload(t, ptype, 0, i, 0);
    CHECK(sb_unsubscribe(sub) == NULL);
    sb_subscription_join(extra);
    CHECK_EQ_INT(sb_subscription_is_done(extra), 1);
    CHECK_EQ_INT(atomic_load(&rec.finished), 1);
    CHECK_EQ_INT(atomic_load(&rec.payloads), 50);
    CHECK_RECORDER_LIFECYCLE(&rec);
    sb_subscription_unref(extra);
    recorder_destroy(&rec);

    /* unsubscribe_and_join with no extra reference at all */
    recorder_init(&rec, ptype, t);
    sub = subscribe_kind(kind, t, recorder_cb, &rec);
    publish_payload(t, ptype, 0, 0, 0);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(atomic_load(&rec.finished), 1);
    CHECK_RECORDER_LIFECYCLE(&rec);
    recorder_destroy(&rec);

    sb_topic_unref(t);
}

/* sb_unsubscribe returns at once, even while the subscription's callback is blocked */
typedef struct block_ctx {
    atomic_int in_gate;
    atomic_int open;
} block_ctx;

static void block_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    block_ctx *b = r->hook_data;
    if (sb_message_get_type(msg) != ptype)
        return;
    atomic_store(&b->in_gate, 1);
    double deadline = tu_now_s() + tu_wait_seconds();
    while (!atomic_load(&b->open) && tu_now_s() < deadline)
        tu_sleep_ms(1);
    atomic_store(&b->in_gate, 0);
}

static void test_unsubscribe_returns_at_once(int kind)
{
    printf("unsubscribe returns at once %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("atonce", kind);
    recorder rec;
    block_ctx b;
    atomic_init(&b.in_gate, 0);
    atomic_init(&b.open, 0);
    recorder_init(&rec, ptype, t);
    rec.hook = block_hook;
    rec.hook_data = &b;
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    sb_subscription *extra = sb_subscription_ref(sub);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
    WAIT_UNTIL(atomic_load(&b.in_gate) == 1);
    CHECK(sb_unsubscribe(sub) == NULL);
    /* returned while the callback is still held */
    CHECK_EQ_INT(atomic_load(&b.in_gate), 1);
    CHECK_EQ_INT(sb_subscription_is_subscribed(extra), 0);
    CHECK_EQ_INT(sb_subscription_is_done(extra), 0);
    CHECK_EQ_INT(atomic_load(&rec.finals), 0);
    atomic_store(&b.open, 1);
    sb_subscription_join(extra);
    CHECK_EQ_INT(sb_subscription_is_done(extra), 1);
    CHECK_RECORDER_LIFECYCLE(&rec);
    sb_subscription_unref(extra);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/* every subscription sees the others' Subscribe and Unsubscribe; uniqueids are distinct */
static void test_see_others(int kind)
{
    printf("see others %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("others", kind);
    recorder watcher, rec[3];
    recorder_init(&watcher, ptype, t);
    sb_subscription *w = subscribe_kind(kind, t, recorder_cb, &watcher);
    sb_subscription *subs[3];
    for (int k = 0; k < KIND_COUNT; k++) {
        recorder_init(&rec[k], ptype, t);
        subs[k] = subscribe_kind(k, t, recorder_cb, &rec[k]);
        CHECK(subs[k] != NULL);
    }
    for (int a = 0; a < KIND_COUNT; a++) {
        CHECK(strcmp(sb_subscription_uniqueid(subs[a]), sb_subscription_uniqueid(w)) != 0);
        for (int b = 0; b < a; b++)
            CHECK(strcmp(sb_subscription_uniqueid(subs[a]), sb_subscription_uniqueid(subs[b])) != 0);
    }
    WAIT_UNTIL(atomic_load(&watcher.other_subscribe) == 3);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 4);
    for (int k = 0; k < KIND_COUNT; k++) {
        WAIT_UNTIL(atomic_load(&rec[k].payloads) == 1);
        CHECK(sb_unsubscribe_and_join(subs[k]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec[k]);
        recorder_destroy(&rec[k]);
    }
    WAIT_UNTIL(atomic_load(&watcher.other_unsubscribe) == 3);
    CHECK(sb_unsubscribe_and_join(w) == NULL);
    CHECK_RECORDER_LIFECYCLE(&watcher);
    CHECK_EQ_INT(atomic_load(&watcher.other_subscribe), 3);
    CHECK_EQ_INT(atomic_load(&watcher.other_unsubscribe), 3);
    CHECK_EQ_INT(atomic_load(&watcher.payloads), 1);
    recorder_destroy(&watcher);
    sb_topic_unref(t);
}

/* ---- unsubscribe_and_join from the own callback ---- */

enum { TAG_NONE = 0, TAG_STOP = 1, TAG_KILL = 2 };

typedef struct self_join_ctx {
    _Atomic(sb_subscription *) own; /* the reference the callback consumes */
    int plain;                      /* sb_unsubscribe instead of sb_unsubscribe_and_join */
    atomic_int ran;
    atomic_int returned_null;
    atomic_int error_set;
    atomic_int unsubscribed_after;
    atomic_int says_deadlock; /* the last error names the deadlock */
    char err[512];
} self_join_ctx;

static void self_join_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    self_join_ctx *c = r->hook_data;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    if (p->tag != TAG_STOP)
        return;
    sb_subscription *own = atomic_exchange(&c->own, NULL);
    if (own == NULL)
        return;
    if (c->plain) {
        /* a join of its own subscription, still subscribed, would wait forever: it
         * returns at once with SB_E_DEADLOCK (set a different error first, so we see
         * that the join set it) */
        CHECK(sb_topic_create(NULL) == NULL);
        sb_subscription_join(sub);
        atomic_store(&c->says_deadlock, tu_contains_ci(sb_last_error(), "deadlock"));
        CHECK(sb_unsubscribe(own) == NULL);
        atomic_store(&c->returned_null, 1);
        atomic_store(&c->error_set, 1);
        atomic_store(&c->unsubscribed_after, sb_subscription_is_subscribed(sub) == 0);
        atomic_store(&c->ran, 1);
        return;
    }
    /* set a different error first, so we can see that the join replaced it */
    CHECK(sb_topic_create(NULL) == NULL);
    char before[512];
    tu_copy_error(before, sizeof before);
    sb_subscription *res = sb_unsubscribe_and_join(own);
    tu_copy_error(c->err, sizeof c->err);
    atomic_store(&c->returned_null, res == NULL);
    atomic_store(&c->error_set, c->err[0] != '\0' && strcmp(c->err, before) != 0);
    atomic_store(&c->says_deadlock, tu_contains_ci(c->err, "deadlock"));
    atomic_store(&c->unsubscribed_after, sb_subscription_is_subscribed(sub) == 0);
    atomic_store(&c->ran, 1);
}

static void test_unsubscribe_from_own_callback(int kind, int plain)
{
    printf("%s from own callback %s\n", plain ? "unsubscribe" : "unsubscribe_and_join",
           kind_names[kind]);
    sb_topic *t = kind_topic("selfjoin", kind);
    recorder rec;
    self_join_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.plain = plain;
    recorder_init(&rec, ptype, t);
    rec.hook = self_join_hook;
    rec.hook_data = &ctx;
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    CHECK(sub != NULL);
    sb_subscription *extra = sb_subscription_ref(sub);
    atomic_store(&ctx.own, sub); /* the callback now owns `sub`'s reference */

    publish_payload(t, ptype, 0, 0, TAG_NONE);
    publish_payload(t, ptype, 0, 1, TAG_NONE);
    publish_payload(t, ptype, 0, 2, TAG_STOP);
    WAIT_UNTIL(atomic_load(&ctx.ran) == 1);
    WAIT_UNTIL(sb_subscription_is_done(extra) == 1);
    sb_subscription_join(extra);
    CHECK_EQ_INT(atomic_load(&ctx.returned_null), 1);
    CHECK_EQ_INT(atomic_load(&ctx.error_set), 1);
    CHECK_EQ_INT(atomic_load(&ctx.says_deadlock), 1);
    if (!atomic_load(&ctx.error_set) || !atomic_load(&ctx.says_deadlock))
        printf("  last error after self-join: \"%s\"\n", ctx.err);
    CHECK_EQ_INT(atomic_load(&ctx.unsubscribed_after), 1);
    CHECK_EQ_INT(sb_subscription_is_subscribed(extra), 0);

    /* published after the unsubscribe: not delivered */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 3, TAG_NONE), 0);
    CHECK_STAYS(atomic_load(&rec.payloads) == 3, 20);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_RECORDER_THREADS(&rec, kind);
    CHECK_EQ_INT(atomic_load(&rec.finished), 1);
    sb_subscription_unref(extra);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/* ---- unsubscribing another subscription from a callback ---- */

typedef struct kill_ctx {
    _Atomic(sb_subscription *) victim; /* reference consumed by the callback */
    int join;                          /* use sb_unsubscribe_and_join */
    sb_subscription *victim_extra;     /* borrowed, to check is_done after a join */
    atomic_int done;
    atomic_int done_after_join;
} kill_ctx;

static void kill_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    kill_ctx *c = r->hook_data;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    if (p->tag != TAG_KILL)
        return;
    sb_subscription *v = atomic_exchange(&c->victim, NULL);
    if (v == NULL)
        return;
    if (c->join) {
        CHECK(sb_unsubscribe_and_join(v) == NULL);
        atomic_store(&c->done_after_join, sb_subscription_is_done(c->victim_extra));
    } else {
        CHECK(sb_unsubscribe(v) == NULL);
    }
    atomic_store(&c->done, 1);
}

static void unsubscribe_other(int killer_kind, int victim_kind, int join)
{
    sb_topic *t = sb_topic_create("sub.kill");
    recorder krec, vrec;
    kill_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.join = join;
    recorder_init(&krec, ptype, t);
    recorder_init(&vrec, ptype, t);
    krec.hook = kill_hook;
    krec.hook_data = &ctx;
    sb_subscription *killer = subscribe_kind(killer_kind, t, recorder_cb, &krec);
    sb_subscription *victim = subscribe_kind(victim_kind, t, recorder_cb, &vrec);
    CHECK(killer != NULL && victim != NULL);
    sb_subscription *vextra = sb_subscription_ref(victim);
    ctx.victim_extra = vextra;
    atomic_store(&ctx.victim, victim);

    int n = 10;
    for (int i = 0; i < n; i++)
        publish_payload(t, ptype, 0, i, TAG_NONE);
    publish_payload(t, ptype, 0, n, TAG_KILL);
    for (int i = n + 1; i < 2 * n + 1; i++)
        publish_payload(t, ptype, 0, i, TAG_NONE);

    WAIT_UNTIL(atomic_load(&ctx.done) == 1);
    WAIT_UNTIL(sb_subscription_is_done(vextra) == 1);
    if (join)
        CHECK_EQ_INT(atomic_load(&ctx.done_after_join), 1);
    CHECK_RECORDER_LIFECYCLE(&vrec);
    /* the victim got everything published before the KILL message (KILL itself is being
     * published while the victim is unsubscribed, so it may or may not reach it) */
    CHECK(atomic_load(&vrec.payloads) >= n);
    CHECK(atomic_load(&vrec.payloads) <= 2 * n + 1);
    /* the killer goes on */
    WAIT_UNTIL(atomic_load(&krec.payloads) == 2 * n + 1);
    CHECK(sb_unsubscribe_and_join(killer) == NULL);
    CHECK_RECORDER_LIFECYCLE(&krec);
    CHECK_EQ_INT(atomic_load(&krec.other_unsubscribe), 1);
    sb_subscription_unref(vextra);
    recorder_destroy(&krec);
    recorder_destroy(&vrec);
    sb_topic_unref(t);
}

static void test_unsubscribe_others(void)
{
    for (int k = 0; k < KIND_COUNT; k++)
        for (int v = 0; v < KIND_COUNT; v++) {
            printf("unsubscribe other: %s unsubscribes %s\n", kind_names[k], kind_names[v]);
            unsubscribe_other(k, v, 0);
        }
    /* a callback of any kind may join another subscription of any kind */
    for (int k = 0; k < KIND_COUNT; k++)
        for (int v = 0; v < KIND_COUNT; v++) {
            printf("unsubscribe_and_join other: %s joins %s\n", kind_names[k], kind_names[v]);
            unsubscribe_other(k, v, 1);
        }
}

/* ---- publishing from inside callbacks ---- */

typedef struct relay_ctx {
    sb_topic *to;
    int limit;
    atomic_int bad_count;
} relay_ctx;

/* on payload seq s (< limit): publish seq s+1 to ctx->to */
static void relay_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    relay_ctx *c = r->hook_data;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    if (p->seq >= c->limit)
        return;
    int rc = publish_payload(c->to, ptype, p->thread, p->seq + 1, 0);
    if (rc != 1)
        atomic_fetch_add(&c->bad_count, 1);
}

static void test_publish_from_callback(int kind)
{
    printf("publish from callback %s\n", kind_names[kind]);
    int limit = 30;

    /* re-entrant: the callback publishes to its own topic */
    sb_topic *t = kind_topic("reentrant", kind);
    recorder rec;
    relay_ctx ctx = {t, limit, 0};
    recorder_init(&rec, ptype, t);
    rec.hook = relay_hook;
    rec.hook_data = &ctx;
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
    WAIT_UNTIL(atomic_load(&rec.payloads) == limit + 1);
    CHECK_EQ_INT(atomic_load(&ctx.bad_count), 0);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec); /* incl. no overlap, in order */
    CHECK_EQ_INT(atomic_load(&rec.payloads), limit + 1);
    recorder_destroy(&rec);

    /* to another topic, whose subscriber is of each kind */
    for (int k2 = 0; k2 < KIND_COUNT; k2++) {
        sb_topic *t2 = sb_topic_create("sub.relay.target");
        recorder r1, r2;
        relay_ctx c1 = {t2, 1000000, 0};
        recorder_init(&r1, ptype, t);
        recorder_init(&r2, ptype, t2);
        r1.hook = relay_hook;
        r1.hook_data = &c1;
        sb_subscription *s1 = subscribe_kind(kind, t, recorder_cb, &r1);
        sb_subscription *s2 = subscribe_kind(k2, t2, recorder_cb, &r2);
        for (int i = 0; i < 50; i++)
            CHECK_EQ_INT(publish_payload(t, ptype, 0, 2 * i, 0), 1);
        WAIT_UNTIL(atomic_load(&r2.payloads) == 50);
        CHECK_EQ_INT(atomic_load(&c1.bad_count), 0);
        CHECK(sb_unsubscribe_and_join(s1) == NULL);
        CHECK(sb_unsubscribe_and_join(s2) == NULL);
        CHECK_RECORDER_LIFECYCLE(&r1);
        CHECK_RECORDER_LIFECYCLE(&r2);
        recorder_destroy(&r1);
        recorder_destroy(&r2);
        sb_topic_unref(t2);
    }
    sb_topic_unref(t);
}

/* ---- filters ---- */

static void publish_other(sb_topic *t, int expect)
{
    sb_message *m = sb_message_create(otype, malloc(4), free);
    CHECK_EQ_INT(sb_publish(t, m), expect);
    sb_message_unref(m);
}

static void test_filters(int kind)
{
    printf("filters %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("filter", kind);

    /* (a) accept ptype only: switches to selective; otype and the final message are not
     * delivered, join and is_done still work */
    {
        recorder rec;
        recorder_init(&rec, ptype, t);
        sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
        sb_subscription *extra = sb_subscription_ref(sub);
        CHECK_EQ_INT(sb_subscription_accept_message_type(sub, ptype), SB_OK);
        for (int i = 0; i < 10; i++) {
            CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
            publish_other(t, 0);
        }
        WAIT_UNTIL(atomic_load(&rec.payloads) == 10);
        CHECK(sb_unsubscribe_and_join(sub) == NULL);
        CHECK_EQ_INT(sb_subscription_is_done(extra), 1);
        CHECK_EQ_INT(sb_subscription_is_subscribed(extra), 0);
        CHECK_EQ_INT(atomic_load(&rec.others), 0);
        CHECK_EQ_INT(atomic_load(&rec.finals), 0);
        CHECK_EQ_INT(atomic_load(&rec.own_unsubscribe), 0);
        CHECK_EQ_INT(atomic_load(&rec.overlaps), 0);
        CHECK_EQ_INT(atomic_load(&rec.order_errors), 0);
        sb_subscription_unref(extra);
        recorder_destroy(&rec);
    }
    /* (a') same, with pool-style polling of is_done after a plain unsubscribe */
    {
        recorder rec;
        recorder_init(&rec, ptype, t);
        sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
        sb_subscription *extra = sb_subscription_ref(sub);
        CHECK_EQ_INT(sb_subscription_accept_message_type(sub, ptype), SB_OK);
        publish_payload(t, ptype, 0, 0, 0);
        CHECK(sb_unsubscribe(sub) == NULL);
        WAIT_UNTIL(sb_subscription_is_done(extra) == 1);
        sb_subscription_join(extra);
        CHECK_EQ_INT(atomic_load(&rec.finals), 0);
        WAIT_UNTIL(atomic_load(&rec.payloads) == 1);
        sb_subscription_unref(extra);
        recorder_destroy(&rec);
    }
    /* (b) accept ptype and the change type: the final message is delivered */
    {
        recorder rec;
        recorder_init(&rec, ptype, t);
        sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
        CHECK_EQ_INT(sb_subscription_accept_message_type(sub, ptype), SB_OK);
        CHECK_EQ_INT(sb_subscription_accept_message_type(sub, sb_subscription_change_type()), SB_OK);
        for (int i = 0; i < 10; i++) {
            CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
            publish_other(t, 0);
        }
        CHECK(sb_unsubscribe_and_join(sub) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec);
        CHECK_EQ_INT(atomic_load(&rec.payloads), 10);
        CHECK_EQ_INT(atomic_load(&rec.others), 0);
        recorder_destroy(&rec);
    }
    /* (c) selective with nothing accepted, then back to NONE */
    {
        recorder rec;
        recorder_init(&rec, ptype, t);
        sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
        CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_SELECTIVE), SB_OK);
        CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 0);
        publish_other(t, 0);
        CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_NONE), SB_OK);
        CHECK_EQ_INT(publish_payload(t, ptype, 0, 1, 0), 1);
        publish_other(t, 1);
        CHECK(sb_unsubscribe_and_join(sub) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec);
        CHECK_EQ_INT(atomic_load(&rec.payloads), 1);
        CHECK_EQ_INT(atomic_load(&rec.others), 1);
        recorder_destroy(&rec);
    }
    /* (d) NONE filter with a declined type: everything except that type */
    {
        recorder rec;
        recorder_init(&rec, ptype, t);
        sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
        CHECK_EQ_INT(sb_subscription_decline_message_type(sub, otype), SB_OK);
        for (int i = 0; i < 10; i++) {
            CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
            publish_other(t, 0);
        }
        CHECK(sb_unsubscribe_and_join(sub) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec); /* change messages still delivered */
        CHECK_EQ_INT(atomic_load(&rec.payloads), 10);
        CHECK_EQ_INT(atomic_load(&rec.others), 0);
        recorder_destroy(&rec);
    }
    /* (e) a selective subscription next to an unfiltered one: counts per publish */
    {
        recorder a, b;
        recorder_init(&a, ptype, t);
        recorder_init(&b, ptype, t);
        sb_subscription *sa = subscribe_kind(kind, t, recorder_cb, &a);
        sb_subscription *sb = subscribe_kind(kind, t, recorder_cb, &b);
        CHECK_EQ_INT(sb_subscription_accept_message_type(sa, otype), SB_OK);
        CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
        publish_other(t, 2);
        CHECK(sb_unsubscribe_and_join(sa) == NULL);
        CHECK(sb_unsubscribe_and_join(sb) == NULL);
        CHECK_EQ_INT(atomic_load(&a.payloads), 0);
        CHECK_EQ_INT(atomic_load(&a.others), 1);
        CHECK_EQ_INT(atomic_load(&b.payloads), 1);
        CHECK_EQ_INT(atomic_load(&b.others), 1);
        CHECK_RECORDER_LIFECYCLE(&b);
        recorder_destroy(&a);
        recorder_destroy(&b);
    }
    sb_topic_unref(t);
}

/* ---- congestion limits ---- */

static void test_congestion(int kind)
{
    printf("congestion %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("congestion", kind);
    recorder rec;
    recorder_init(&rec, ptype, t);
    /* a slow consumer; each yield may give up the CPU for a time slice on a busy machine,
     * so the callbacks' total stays well inside the wait bound */
    rec.work_yields = 50;
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    CHECK_EQ_INT(sb_subscription_set_congestion_limits(sub, 5, 20), SB_OK);
    int n = tu_scale(500, 100);
    for (int i = 0; i < n; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
    /* limits can be changed while running */
    CHECK_EQ_INT(sb_subscription_set_congestion_limits(sub, 100, 1000), SB_OK);
    for (int i = n; i < 2 * n; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), 1);
    /* warnings never drop messages */
    WAIT_UNTIL(atomic_load(&rec.payloads) == 2 * n);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_EQ_INT(atomic_load(&rec.payloads), 2 * n);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/*
 * "When a subscription's queue grows past high_water a warning is reported once (log line
 * and counter) until it falls below low_water." Uses the library's counter
 * (sb_subscription_congestion_warnings) and log handler (sb_set_log_handler) from the
 * header. A gate holds the callback so that the queue length is known.
 */
enum { TAG_GATE = 3 };

typedef struct gate_ctx {
    atomic_int entered;
    atomic_int open;
} gate_ctx;

static void gate_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    gate_ctx *g = r->hook_data;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    if (p->tag != TAG_GATE)
        return;
    atomic_fetch_add(&g->entered, 1);
    double deadline = tu_now_s() + tu_wait_seconds();
    while (!atomic_load(&g->open) && tu_now_s() < deadline)
        tu_sleep_ms(1);
}

typedef struct log_capture {
    pthread_mutex_t mu;
    char needle[256];
    int warnings; /* warning lines mentioning the needle */
} log_capture;

static void log_handler(void *data, int level, const char *text)
{
    log_capture *c = data;
    pthread_mutex_lock(&c->mu);
    if (level == SB_LOG_WARNING && text != NULL && c->needle[0] && strstr(text, c->needle))
        c->warnings++;
    pthread_mutex_unlock(&c->mu);
}

static int captured_warnings(log_capture *c)
{
    pthread_mutex_lock(&c->mu);
    int n = c->warnings;
    pthread_mutex_unlock(&c->mu);
    return n;
}

static void test_congestion_warning_once(int kind)
{
    printf("congestion warning once %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("congestion.once", kind);
    recorder rec;
    gate_ctx gate;
    atomic_init(&gate.entered, 0);
    atomic_init(&gate.open, 0);
    recorder_init(&rec, ptype, t);
    rec.hook = gate_hook;
    rec.hook_data = &gate;
    log_capture cap;
    memset(&cap, 0, sizeof cap);
    pthread_mutex_init(&cap.mu, NULL);
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    snprintf(cap.needle, sizeof cap.needle, "%s", sb_subscription_uniqueid(sub));
    sb_set_log_handler(log_handler, &cap);
    CHECK_EQ_INT(sb_subscription_set_congestion_limits(sub, 5, 20), SB_OK);
    CHECK_EQ_INT(sb_subscription_congestion_warnings(sub), 0);

    int seq = 0;
    for (int round = 1; round <= 2; round++) {
        atomic_store(&gate.open, 0);
        int entered = atomic_load(&gate.entered);
        CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, TAG_GATE), 1);
        WAIT_UNTIL(atomic_load(&gate.entered) == entered + 1); /* callback held */
        for (int i = 0; i < 60; i++)                             /* queue: 60 > 20 */
            CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, 0), 1);
        /* crossed once: one warning, not one per message above the mark */
        CHECK_EQ_INT(sb_subscription_congestion_warnings(sub), round);
        WAIT_UNTIL(captured_warnings(&cap) == round); /* the log thread calls the handler */
        atomic_store(&gate.open, 1);
        WAIT_UNTIL(atomic_load(&rec.payloads) == seq); /* drained below low_water */
    }
    /* below high_water: no new warning */
    atomic_store(&gate.open, 0);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, TAG_GATE), 1);
    WAIT_UNTIL(atomic_load(&gate.entered) == 3);
    for (int i = 0; i < 15; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, 0), 1);
    CHECK_EQ_INT(sb_subscription_congestion_warnings(sub), 2);
    atomic_store(&gate.open, 1);
    WAIT_UNTIL(atomic_load(&rec.payloads) == seq);
    sb_set_log_handler(NULL, NULL);
    CHECK_EQ_INT(captured_warnings(&cap), 2);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    recorder_destroy(&rec);
    pthread_mutex_destroy(&cap.mu);
    sb_topic_unref(t);
}

/* A gate that lets gate messages through one at a time: the n-th one to arrive waits
 * until `passes` reaches n. Holding the runner inside a batch makes the batch
 * boundaries, where the queue's length decides whether congestion ended, predictable. */
typedef struct ticket_gate {
    atomic_int entered;
    atomic_int passes;
} ticket_gate;

static void ticket_hook(recorder *r, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    ticket_gate *g = r->hook_data;
    if (sb_message_get_type(msg) != ptype)
        return;
    payload_t *p = sb_message_data(msg);
    if (p->tag != TAG_GATE)
        return;
    int me = atomic_fetch_add(&g->entered, 1) + 1;
    double deadline = tu_now_s() + tu_wait_seconds();
    while (atomic_load(&g->passes) < me && tu_now_s() < deadline)
        tu_sleep_ms(1);
}

/* Hysteresis: once over high_water, a queue is congested until a batch ends with fewer
 * than low_water queued. Falling between the marks and climbing over high_water again
 * is the same congestion: no second warning; a crossing after it fell below low_water
 * is a new one. With low <= 0, the default marks (5000 / 10000), which are far apart: a
 * subscriber keeping up with bursts whose backlog swings between 7,500 and 10,000+ is
 * warned once, not at every burst (marks a tenth apart flooded the log). */
static void congestion_swing(int kind, const char *what, long low, long high)
{
    printf("congestion %s %s\n", what, kind_names[kind]);
    int defaults = low <= 0;
    if (defaults) {
        low = 5000;
        high = 10000;
    }
    const long mid = (low + high) / 2; /* between the marks */
    char name[64];
    snprintf(name, sizeof name, "congestion.%s", what);
    sb_topic *t = kind_topic(name, kind);
    recorder rec;
    ticket_gate gate;
    atomic_init(&gate.entered, 0);
    atomic_init(&gate.passes, 0);
    recorder_init(&rec, ptype, t);
    rec.hook = ticket_hook;
    rec.hook_data = &gate;
    log_capture cap;
    memset(&cap, 0, sizeof cap);
    pthread_mutex_init(&cap.mu, NULL);
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    snprintf(cap.needle, sizeof cap.needle, "%s", sb_subscription_uniqueid(sub));
    sb_set_log_handler(log_handler, &cap);
    if (!defaults)
        CHECK_EQ_INT(sb_subscription_set_congestion_limits(sub, low, high), SB_OK);

    int seq = 0;
    /* G1 held; high + 5 behind it: over high, the first warning */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, TAG_GATE), 1);
    WAIT_UNTIL(atomic_load(&gate.entered) == 1);
    for (long i = 0; i < high + 5; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, 0), 1);
    CHECK_EQ_INT(sb_subscription_congestion_warnings(sub), 1);
    /* G2 queued behind them; G1 goes: its batch ends with all those queued (still
     * congested), and the next batch, them and G2, is held at G2 */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, TAG_GATE), 1);
    atomic_store(&gate.passes, 1);
    WAIT_UNTIL(atomic_load(&gate.entered) == 2);
    /* mid - 1 and G3 queued; G2 goes: its batch ends with mid queued, between the marks */
    for (long i = 0; i < mid - 1; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, 0), 1);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, TAG_GATE), 1);
    atomic_store(&gate.passes, 2);
    WAIT_UNTIL(atomic_load(&gate.entered) == 3);
    /* held at G3 with mid in flight; more, to over high again: the same congestion */
    for (long i = 0; i < high - mid + 5; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, 0), 1);
    CHECK_EQ_INT(sb_subscription_congestion_warnings(sub), 1);
    WAIT_UNTIL(captured_warnings(&cap) >= 1);
    CHECK_EQ_INT(captured_warnings(&cap), 1);
    /* everything drains (the last batch ends with nothing queued, below low) */
    atomic_store(&gate.passes, 3);
    WAIT_UNTIL(atomic_load(&rec.payloads) == seq);
    CHECK_EQ_INT(sb_subscription_queue_length(sub), 0);
    /* a new crossing after that is a new congestion: a second warning */
    CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, TAG_GATE), 1);
    WAIT_UNTIL(atomic_load(&gate.entered) == 4);
    for (long i = 0; i < high + 5; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, seq++, 0), 1);
    CHECK_EQ_INT(sb_subscription_congestion_warnings(sub), 2);
    atomic_store(&gate.passes, 4);
    WAIT_UNTIL(atomic_load(&rec.payloads) == seq);
    sb_set_log_handler(NULL, NULL);
    CHECK_EQ_INT(captured_warnings(&cap), 2);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    recorder_destroy(&rec);
    pthread_mutex_destroy(&cap.mu);
    sb_topic_unref(t);
}

/* ---- concurrent publishers: no overlap, per-thread order ---- */

#define NPUB 4

typedef struct pub_arg {
    sb_topic *topic;
    int thread;
    int n;
    int check_sync; /* synchronous subscription: handled when sb_publish returns */
    atomic_int *go;
} pub_arg;

static void *publisher(void *arg)
{
    pub_arg *a = arg;
    while (!atomic_load(a->go))
        sched_yield();
    for (int i = 0; i < a->n; i++) {
        sb_message *m = payload_msg(ptype, a->thread, i, 0);
        payload_t *p = sb_message_data(m);
        int rc = sb_publish(a->topic, m);
        if (rc != 1)
            CHECK_EQ_INT(rc, 1);
        if (a->check_sync && atomic_load(&p->handled) != 1)
            CHECK_EQ_INT(atomic_load(&p->handled), 1);
        sb_message_unref(m);
    }
    return NULL;
}

static void test_concurrent_publishers(int kind)
{
    printf("concurrent publishers %s\n", kind_names[kind]);
    sb_topic *t = kind_topic("concurrent", kind);
    recorder rec;
    recorder_init(&rec, ptype, t);
    rec.work_yields = 3;
    pthread_t th[NPUB];
    rec.publishers = kind == KIND_SYNC ? th : NULL;
    sb_subscription *sub = subscribe_kind(kind, t, recorder_cb, &rec);
    int n = tu_scale(2000, 150);
    atomic_int go;
    atomic_init(&go, 0);
    pub_arg args[NPUB];
    for (int i = 0; i < NPUB; i++) {
        args[i] = (pub_arg){t, i, n, kind == KIND_SYNC, &go};
        pthread_create(&th[i], NULL, publisher, &args[i]);
    }
    atomic_store(&go, 1);
    for (int i = 0; i < NPUB; i++)
        pthread_join(th[i], NULL);
    if (kind == KIND_SYNC)
        CHECK_EQ_INT(atomic_load(&rec.payloads), NPUB * n);
    WAIT_UNTIL(atomic_load(&rec.payloads) == NPUB * n);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_EQ_INT(atomic_load(&rec.overlaps), 0);
    CHECK_EQ_INT(atomic_load(&rec.order_errors), 0);
    if (kind == KIND_SYNC)
        CHECK_EQ_INT(atomic_load(&rec.wrong_publisher_thread), 0);
    if (kind == KIND_DEDICATED)
        CHECK_EQ_INT(atomic_load(&rec.tid_changes), 0);
    for (int i = 0; i < NPUB; i++)
        CHECK_EQ_INT(rec.last_seq[i], n - 1);
    recorder_destroy(&rec);
    sb_topic_unref(t);
}

/* ---- the data pointer is never touched ---- */

#define BOGUS_DATA ((void *)(uintptr_t)0x7)
static atomic_int bogus_calls;
static atomic_int bogus_wrong;

static void bogus_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    (void)msg;
    if (data != BOGUS_DATA)
        atomic_fetch_add(&bogus_wrong, 1);
    atomic_fetch_add(&bogus_calls, 1);
}

static void test_data_untouched(int kind)
{
    sb_topic *t = kind_topic("bogus", kind);
    atomic_store(&bogus_calls, 0);
    sb_subscription *sub = subscribe_kind(kind, t, bogus_cb, BOGUS_DATA);
    CHECK(sub != NULL);
    CHECK_EQ_INT(publish_payload(t, ptype, 0, 0, 0), 1);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(atomic_load(&bogus_calls), 3); /* Subscribe, payload, Unsubscribe */
    CHECK_EQ_INT(atomic_load(&bogus_wrong), 0);

    /* NULL data is fine too */
    atomic_store(&bogus_calls, 0);
    sub = subscribe_kind(kind, t, bogus_cb, NULL);
    CHECK(sub != NULL);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(atomic_load(&bogus_calls), 2);
    CHECK_EQ_INT(atomic_load(&bogus_wrong), 2);
    atomic_store(&bogus_wrong, 0);
    sb_topic_unref(t);
}

/* ---- once joined, the library holds nothing of the subscription ---- */

static void noop_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

/* The join returns after the runner (pool worker, dedicated thread) let go of the
 * subscription, not merely after the final callback: the subscription's reference to its
 * topic is gone at once, so the topic leaves the registry the moment the caller drops the
 * last reference (no wait here). A runner that still held the subscription for a moment
 * after the final callback made a process that exits right after its joins report the
 * topic as leaked under valgrind. */
static void test_join_releases(int kind)
{
    char name[64];
    snprintf(name, sizeof name, "sub.release.%s", kind_names[kind]);
    int held = 0;
    for (int i = 0; i < 300; i++) {
        sb_topic *t = sb_topic_create(name);
        sb_subscription *sub = subscribe_kind(kind, t, noop_cb, NULL);
        CHECK(sub != NULL);
        publish_payload(t, ptype, 0, 0, 0);
        CHECK(sb_unsubscribe_and_join(sub) == NULL);
        sb_topic_unref(t);
        sb_topic *again = sb_topic_get(name);
        if (again != NULL) {
            held++;
            sb_topic_unref(again);
            CHECK_TOPIC_GONE(name);
        }
    }
    CHECK_EQ_INT(held, 0);
}

/* ---- many subscriptions of all kinds on one topic ---- */

static void test_many_subscriptions(void)
{
    printf("many subscriptions\n");
    sb_topic *t = sb_topic_create("sub.many");
    enum { M = 30 };
    recorder *rec = calloc(M, sizeof *rec);
    sb_subscription *subs[M];
    for (int i = 0; i < M; i++) {
        recorder_init(&rec[i], ptype, t);
        subs[i] = subscribe_kind(i % KIND_COUNT, t, recorder_cb, &rec[i]);
    }
    CHECK_EQ_INT(sb_topic_subscribers(t), M);
    int n = tu_scale(200, 20);
    for (int i = 0; i < n; i++)
        CHECK_EQ_INT(publish_payload(t, ptype, 0, i, 0), M);
    for (int i = 0; i < M; i++) {
        CHECK(sb_unsubscribe_and_join(subs[i]) == NULL);
        CHECK_EQ_INT(atomic_load(&rec[i].payloads), n);
        CHECK_RECORDER_LIFECYCLE(&rec[i]);
        /* saw the Subscribe of everyone after it and the Unsubscribe of everyone before it */
        CHECK_EQ_INT(atomic_load(&rec[i].other_subscribe), M - 1 - i);
        CHECK_EQ_INT(atomic_load(&rec[i].other_unsubscribe), i);
        recorder_destroy(&rec[i]);
    }
    free(rec);
    sb_topic_unref(t);
}

/* Unsubscribes in a scattered order from a topic with many subscriptions, publishing
 * between them. An unsubscribed subscription may stay in the topic's list for a while
 * (it leaves with others later): whatever the list holds, each publish reaches exactly the
 * live subscriptions, an unsubscribed one never gets anything after its final message,
 * and the topic is released at the end. */
static void test_unsubscribe_scattered(void)
{
    printf("unsubscribe scattered\n");
    sb_topic *t = sb_topic_create("sub.scattered");
    enum { M = 60 };
    recorder *rec = calloc(M, sizeof *rec);
    sb_subscription *subs[M];
    int got_at_unsub[M];
    for (int i = 0; i < M; i++) {
        recorder_init(&rec[i], ptype, t);
        subs[i] = subscribe_kind(i % KIND_COUNT, t, recorder_cb, &rec[i]);
        CHECK(subs[i] != NULL);
        got_at_unsub[i] = -1;
    }
    int published = 0, nlive = M;
    for (int step = 0; step < M; step++) {
        int k = (step * 7) % M; /* 7 is coprime with 60: each index once */
        CHECK(sb_unsubscribe_and_join(subs[k]) == NULL);
        nlive--;
        /* everything published before the unsubscribe, nothing after */
        CHECK_EQ_INT(atomic_load(&rec[k].payloads), published);
        got_at_unsub[k] = published;
        CHECK_EQ_INT(sb_topic_subscribers(t), nlive);
        CHECK_EQ_INT(sb_topic_wants(t, ptype), nlive > 0);
        CHECK_EQ_INT(publish_payload(t, ptype, 0, ++published, 0), nlive);
    }
    for (int i = 0; i < M; i++) {
        CHECK_EQ_INT(atomic_load(&rec[i].payloads), got_at_unsub[i]);
        CHECK_RECORDER_LIFECYCLE(&rec[i]);
        recorder_destroy(&rec[i]);
    }
    free(rec);
    sb_topic_unref(t);
    CHECK_TOPIC_GONE("sub.scattered");
}

int main(void)
{
    TEST_INIT();
    ptype = make_type("sub.payload");
    otype = make_type("sub.other");
    for (int k = 0; k < KIND_COUNT; k++) {
        test_lifecycle(k);
        test_unsubscribe_then_join(k);
        if (k != KIND_SYNC) /* a synchronous callback blocks its publisher, i.e. us */
            test_unsubscribe_returns_at_once(k);
        test_see_others(k);
        test_unsubscribe_from_own_callback(k, 0);
        test_unsubscribe_from_own_callback(k, 1);
        test_publish_from_callback(k);
        test_filters(k);
        test_congestion(k);
        if (k != KIND_SYNC) /* a synchronous subscription has no queue to congest */
            test_congestion_warning_once(k);
        if (k != KIND_SYNC)
            congestion_swing(k, "hyst", 5, 20);
        if (k == KIND_POOL)
            congestion_swing(k, "defaults", 0, 0);
        test_concurrent_publishers(k);
        test_data_untouched(k);
        test_join_releases(k);
    }
    test_unsubscribe_others();
    test_many_subscriptions();
    test_unsubscribe_scattered();
    /* subscriptions released their topics */
    const char *what[] = {"life", "unsub", "atonce", "others", "selfjoin", "reentrant", "filter",
                          "congestion", "congestion.once", "congestion.hyst", "congestion.defaults",
                          "concurrent",
                          "bogus"};
    for (size_t w = 0; w < sizeof what / sizeof what[0]; w++)
        for (int k = 0; k < KIND_COUNT; k++) {
            char name[128];
            snprintf(name, sizeof name, "sub.%s.%s", what[w], kind_names[k]);
            CHECK_TOPIC_GONE(name);
        }
    CHECK_TOPIC_GONE("sub.kill");
    CHECK_TOPIC_GONE("sub.relay.target");
    CHECK_TOPIC_GONE("sub.many");
    sb_message_type_unref(ptype);
    sb_message_type_unref(otype);
    WAIT_UNTIL(atomic_load(&payload_created) == atomic_load(&payload_destroyed));
    return TEST_DONE();
}
