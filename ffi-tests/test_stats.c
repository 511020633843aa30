/* Statistics and alerts (API.md, "Statistics and alerts"): topic and subscription
 * figures after known traffic (a router's and a caching topic's subscriptions too), the
 * longest callback and its type, the bus-wide JSON (parsed by python3) and Prometheus
 * text (every line checked), alerts entering and leaving with hysteresis, the alert
 * count, and NULL handles. */
#include "test_util.h"

#include <libgen.h>

static sb_message_type *fast_type, *slow_type;

static void noop(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data; (void)sub; (void)msg;
}

static void slow_or_fast(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data; (void)sub;
    if (sb_message_get_type(msg) == slow_type)
        tu_sleep_ms(30);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* A slow callback that reports how long it took by its own clock. */
static void slow_timed(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (sb_message_get_type(msg) != slow_type)
        return;
    uint64_t t0 = mono_ns();
    tu_sleep_ms(30);
    *(uint64_t *)data = mono_ns() - t0;
}

static sb_message *msg_of(sb_message_type *t)
{
    return sb_message_create(t, NULL, NULL);
}

static void publish_n(sb_topic *t, sb_message_type *ty, int n)
{
    for (int i = 0; i < n; i++) {
        sb_message *m = msg_of(ty);
        sb_publish(t, m);
        sb_message_unref(m);
    }
}

static void test_topic_stats(void)
{
    sb_topic *t = sb_topic_create("stats:topic");
    sb_topic_stats s0, s;
    CHECK_EQ_INT(sb_topic_get_stats(t, &s0), SB_OK);
    CHECK_EQ_INT(s0.published, 0);
    CHECK(s0.created_ns > 1600000000ull * 1000000000ull);
    publish_n(t, fast_type, 3); /* nobody listens */
    CHECK_EQ_INT(sb_topic_get_stats(t, &s), SB_OK);
    CHECK_EQ_INT(s.published, 3);
    CHECK_EQ_INT(s.not_dispatched, 3);
    CHECK_EQ_INT(s.dispatched, 0);
    CHECK_EQ_INT(s.subscribers, 0);

    sb_subscription *a = sb_subscribe_synchronous(t, noop, NULL);
    sb_subscription *b = sb_subscribe_synchronous(t, noop, NULL);
    CHECK_EQ_INT(sb_topic_get_stats(t, &s0), SB_OK);
    publish_n(t, fast_type, 5);
    CHECK_EQ_INT(sb_topic_get_stats(t, &s), SB_OK);
    CHECK_EQ_INT(s.published - s0.published, 5);
    CHECK_EQ_INT(s.dispatched - s0.dispatched, 5);
    CHECK_EQ_INT(s.not_dispatched - s0.not_dispatched, 0);
    CHECK_EQ_INT(s.published, s.dispatched + s.not_dispatched);
    CHECK_EQ_INT(s.subscribers, 2);

    /* A publish forwarded in counts on both topics. */
    sb_topic *from = sb_topic_create("stats:from");
    sb_forward *f = sb_forward_all(from, t);
    sb_topic_stats fs;
    CHECK_EQ_INT(sb_topic_get_stats(t, &s0), SB_OK);
    publish_n(from, fast_type, 4);
    CHECK_EQ_INT(sb_topic_get_stats(t, &s), SB_OK);
    CHECK_EQ_INT(sb_topic_get_stats(from, &fs), SB_OK);
    CHECK_EQ_INT(s.published - s0.published, 4);
    CHECK_EQ_INT(fs.published, 4);
    CHECK_EQ_INT(fs.dispatched, 4);

    sb_subscription_stats ss;
    CHECK_EQ_INT(sb_subscription_get_stats(a, &ss), SB_OK);
    /* Subscribe, b's Subscribe, 5 + 4 messages. */
    CHECK_EQ_INT(ss.delivered, 11);
    CHECK_EQ_INT(ss.dropped, 0);
    CHECK_EQ_INT(ss.queued, 0);

    sb_forward_cancel(f);
    sb_topic_unref(from);
    sb_unsubscribe_and_join(a);
    sb_unsubscribe_and_join(b);
    sb_topic_unref(t);
}

static void test_subscription_stats(void)
{
    sb_topic *t = sb_topic_create("stats:sub");
    sb_subscription *sub = sb_subscribe(t, slow_or_fast, NULL);
    publish_n(t, fast_type, 10);
    publish_n(t, slow_type, 1);
    publish_n(t, fast_type, 10);
    sb_subscription *keep = sb_subscription_ref(sub);
    sb_unsubscribe_and_join(sub);
    sb_subscription_stats s;
    CHECK_EQ_INT(sb_subscription_get_stats(keep, &s), SB_OK);
    CHECK_EQ_INT(s.delivered, 23); /* Subscribe, 21, Unsubscribe */
    CHECK(s.callback_max_ns >= 30000000ull);
    CHECK(s.callback_max_ns < 30000000000ull);
    CHECK(s.callback_max_type == slow_type);
    CHECK(s.queued_max >= 1);
    CHECK_EQ_INT(s.queued, 0);
    sb_subscription_unref(keep);

    /* A synchronous subscription's callbacks run inside the publish: the longest one lies
     * between what the callback measured of itself and what the publish around it took,
     * give or take 0.2 % (its callbacks are timed with the CPU's counter where the kernel
     * uses it, converted at a rate measured to 0.1 %). */
    uint64_t inside = 0;
    sub = sb_subscribe_synchronous(t, slow_timed, &inside);
    publish_n(t, fast_type, 10);
    sb_message *slow = msg_of(slow_type);
    uint64_t t0 = mono_ns();
    CHECK_EQ_INT(sb_publish(t, slow), 1);
    uint64_t around = mono_ns() - t0;
    sb_message_unref(slow);
    publish_n(t, fast_type, 10);
    CHECK_EQ_INT(sb_subscription_get_stats(sub, &s), SB_OK);
    CHECK(inside >= 30000000ull);
    CHECK(s.callback_max_ns >= inside - inside / 500);
    CHECK(s.callback_max_ns <= around + around / 500);
    CHECK(s.callback_max_type == slow_type);
    sb_unsubscribe_and_join(sub);

    /* Drops are counted. */
    sub = sb_subscribe(t, slow_or_fast, NULL);
    sb_subscription_set_overflow(sub, SB_OVERFLOW_DROP_NEWEST, 2);
    publish_n(t, slow_type, 1);
    publish_n(t, fast_type, 20);
    CHECK_EQ_INT(sb_subscription_get_stats(sub, &s), SB_OK);
    CHECK(s.dropped >= 15);
    CHECK(s.queued_max <= 2);
    keep = sb_subscription_ref(sub);
    sb_unsubscribe_and_join(sub);
    sb_subscription_get_stats(keep, &s);
    CHECK_EQ_INT(s.delivered + s.dropped, 23);
    sb_subscription_unref(keep);
    sb_topic_unref(t);
}

static _Atomic(sb_subscription *) router_sub; /* written by the route, read by main */

static void route(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data; (void)msg;
    if (atomic_load(&router_sub) == NULL)
        atomic_store(&router_sub, sb_subscription_ref(sub));
}

static const char *cache_id(sb_message *msg)
{
    return sb_message_get_type(msg) == fast_type ? "one" : NULL;
}

static char *write_tmp(const char *text, char *path, size_t len);

/* Runs the python3 `script` with the file `path` and `arg` as its arguments; its exit
 * status. */
static int python_check(const char *script, const char *path, const char *arg)
{
    char spath[128], cmd[512];
    if (write_tmp(script, spath, sizeof spath) == NULL)
        return -1;
    snprintf(cmd, sizeof cmd, "python3 %s %s %s", spath, path, arg);
    int rc = system(cmd);
    unlink(spath);
    return rc;
}

static char *write_tmp(const char *text, char *path, size_t len)
{
    snprintf(path, len, "/tmp/sb_stats_%d_XXXXXX", (int)getpid());
    int fd = mkstemp(path);
    if (fd < 0)
        return NULL;
    size_t n = strlen(text);
    CHECK(write(fd, text, n) == (ssize_t)n);
    close(fd);
    return path;
}

static const char *JSON_CHECK =
    "import json,sys\n"
    "d = json.load(open(sys.argv[1]))\n"
    "t = {x[\"name\"]: x for x in d[\"topics\"]}\n"
    "r = t[\"stats:routed\"]\n"
    "assert r[\"published\"] >= 7, r\n"
    "subs = r[\"subscriptions\"]\n"
    "assert len(subs) == 1 and subs[0][\"kind\"] == \"dedicated\", subs\n"
    "assert subs[0][\"delivered\"] == 7, subs\n"
    "o = t[\"stats:orig\"]\n"
    "sy = [s for s in o[\"subscriptions\"] if s[\"kind\"] == \"synchronous\"]\n"
    "assert len(sy) == 1 and sy[0][\"delivered\"] == 6, o\n"
    "assert sy[0][\"callback_max_type\"] is not None\n"
    "ty = {x[\"name\"]: x[\"published\"] for x in d[\"types\"]}\n"
    "assert ty[\"stats_fast\"] >= 12, ty\n"
    "assert d[\"pools\"][0][\"name\"] == \"default\"\n"
    "assert \"count\" in d[\"alerts\"] and isinstance(d[\"clusters\"], list)\n";

static void test_router_cache_and_listings(void)
{
    sb_topic *rt = sb_topic_create("stats:routed");
    sb_router *r = sb_router_create(rt);
    sb_router_add(r, fast_type, route, NULL);
    publish_n(rt, fast_type, 6);
    WAIT_UNTIL(atomic_load(&router_sub) != NULL);
    sb_subscription *rsub = atomic_load(&router_sub);

    sb_topic *orig = sb_topic_create("stats:orig");
    sb_cache *cache = sb_cache_create(cache_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    publish_n(orig, fast_type, 5);

    sb_subscription_stats s;
    WAIT_UNTIL(sb_subscription_get_stats(rsub, &s) == SB_OK && s.delivered == 7);
    CHECK(s.callback_max_type == fast_type || s.callback_max_type == sb_subscription_change_type());
    publish_n(rt, slow_type, 1); /* no route and no default: not accepted */
    CHECK_STAYS(sb_subscription_get_stats(rsub, &s) == SB_OK && s.delivered == 7, 20);
    sb_topic_stats ts;
    CHECK_EQ_INT(sb_topic_get_stats(rt, &ts), SB_OK);
    CHECK_EQ_INT(ts.published, 7); /* 6, 1 (change messages are not counted) */
    char published[32];
    snprintf(published, sizeof published, "%llu", (unsigned long long)ts.published);

    char *json = sb_stats_json();
    CHECK(json != NULL);
    char path[128];
    if (json != NULL && write_tmp(json, path, sizeof path) != NULL) {
        CHECK_EQ_INT(python_check(JSON_CHECK, path, ""), 0);
        unlink(path);
    }
    sb_string_free(json);

    char *prom = sb_stats_prometheus();
    CHECK(prom != NULL);
    if (prom != NULL && write_tmp(prom, path, sizeof path) != NULL) {
        /* Every line valid; the routed topic's counter as read above. */
        char src[] = __FILE__, cmd[1024];
        snprintf(cmd, sizeof cmd,
                 "python3 %s/prom_check.py %s 'switchboard_topic_published_total{topic=\"stats:routed\"}=%s'",
                 dirname(src), path, published);
        CHECK_EQ_INT(system(cmd), 0);
        unlink(path);
    }
    sb_string_free(prom);

    sb_router_unsubscribe_and_join(r);
    sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_subscription_unref(rsub);
    sb_topic_unref(orig);
    sb_topic_unref(rt);
}

/* Alerts. */
static atomic_int enters, leaves, permits, started, finished;
static char last_subsystem[64];
static pthread_mutex_t sys_lock = PTHREAD_MUTEX_INITIALIZER;

static atomic_int in_call, calls_done, slow_handler;

static void on_alert(void *data, int in_alert, const char *subsystem)
{
    CHECK(data == (void *)&enters);
    atomic_store(&in_call, 1);
    /* No library lock is held: the handler may read the figures. */
    CHECK(sb_alert_count() >= 0);
    char *json = sb_stats_json();
    CHECK(json != NULL && strstr(json, "\"alerts\"") != NULL);
    sb_string_free(json);
    if (atomic_load(&slow_handler))
        tu_sleep_ms(200);
    pthread_mutex_lock(&sys_lock);
    snprintf(last_subsystem, sizeof last_subsystem, "%s", subsystem);
    pthread_mutex_unlock(&sys_lock);
    atomic_fetch_add(in_alert ? &enters : &leaves, 1);
    atomic_fetch_add(&calls_done, 1);
    atomic_store(&in_call, 0);
}

static void gated(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data; (void)sub;
    if (sb_message_get_type(msg) == sb_subscription_change_type())
        return;
    atomic_fetch_add(&started, 1);
    while (atomic_load(&permits) <= atomic_load(&finished))
        tu_sleep_ms(1);
    atomic_fetch_add(&finished, 1);
}

static int subsystem_is(const char *want)
{
    pthread_mutex_lock(&sys_lock);
    int ok = strcmp(last_subsystem, want) == 0;
    pthread_mutex_unlock(&sys_lock);
    return ok;
}

static void test_alerts(void)
{
    sb_set_alert_handler(on_alert, &enters);
    CHECK_EQ_INT(sb_alert_count(), 0);
    sb_topic *t = sb_topic_create("alerttest:one/two");
    sb_subscription *sub = sb_subscribe(t, gated, NULL);
    CHECK_EQ_INT(sb_subscription_set_congestion_limits(sub, 2, 5), SB_OK);

    publish_n(t, fast_type, 1);
    WAIT_UNTIL(atomic_load(&started) == 1); /* blocked in its first message */
    publish_n(t, fast_type, 9);             /* backlog 10 > 5: enters alert */
    WAIT_UNTIL(atomic_load(&enters) == 1);
    CHECK(subsystem_is("alerttest"));
    CHECK_EQ_INT(sb_alert_count(), 1);
    sb_subscription_stats s;
    sb_subscription_get_stats(sub, &s);
    CHECK_EQ_INT(s.congestion_warnings, 1);
    CHECK_EQ_INT(s.queued, 9);
    CHECK(s.queued_max >= 9);

    atomic_store(&permits, 1); /* the batch of 9 is taken: 9 in flight, none queued */
    WAIT_UNTIL(atomic_load(&started) == 2);
    publish_n(t, fast_type, 3); /* 3 queued: under the high-water mark, not under the low */
    atomic_store(&permits, 10);
    WAIT_UNTIL(atomic_load(&started) == 11); /* the 9 done; the batch of 3 taken */
    CHECK_STAYS(atomic_load(&leaves) == 0 && sb_alert_count() == 1, 100);
    atomic_store(&permits, 13); /* all done: under the low-water mark */
    WAIT_UNTIL(atomic_load(&leaves) == 1);
    CHECK(subsystem_is("alerttest"));
    CHECK_EQ_INT(sb_alert_count(), 0);
    CHECK_EQ_INT(atomic_load(&enters), 1);

    /* A subscription that ends in alert leaves it. */
    atomic_store(&permits, 13);
    publish_n(t, fast_type, 1);
    WAIT_UNTIL(atomic_load(&started) == 14);
    publish_n(t, fast_type, 8);
    WAIT_UNTIL(atomic_load(&enters) == 2);
    CHECK_EQ_INT(sb_alert_count(), 1);
    sb_unsubscribe(sub);
    atomic_store(&permits, 1000);
    WAIT_UNTIL(atomic_load(&leaves) == 2);
    CHECK_EQ_INT(sb_alert_count(), 0);

    /* Removing the handler waits for its call in flight: a slow call of the leave. */
    atomic_store(&slow_handler, 1);
    atomic_store(&started, 0);
    atomic_store(&finished, 0);
    atomic_store(&permits, 0);
    sub = sb_subscribe(t, gated, NULL);
    sb_subscription_set_congestion_limits(sub, 1, 2);
    publish_n(t, fast_type, 1);
    WAIT_UNTIL(atomic_load(&started) == 1);
    publish_n(t, fast_type, 5);
    WAIT_UNTIL(atomic_load(&enters) == 3 && atomic_load(&in_call) == 0);
    atomic_store(&permits, 1000);
    sb_unsubscribe_and_join(sub);
    WAIT_UNTIL(atomic_load(&in_call) == 1); /* the leave's call, sleeping */
    int done_before = atomic_load(&calls_done);
    /* Once removed, the handler is never called again. */
    sb_set_alert_handler(NULL, NULL);
    CHECK_EQ_INT(atomic_load(&in_call), 0);
    CHECK_EQ_INT(atomic_load(&calls_done), done_before + 1);
    CHECK_EQ_INT(atomic_load(&leaves), 3);
    atomic_store(&slow_handler, 0);
    atomic_store(&started, 0);
    atomic_store(&finished, 0);
    atomic_store(&permits, 0);
    sub = sb_subscribe(t, gated, NULL);
    sb_subscription_set_congestion_limits(sub, 1, 2);
    publish_n(t, fast_type, 1);
    WAIT_UNTIL(atomic_load(&started) == 1);
    publish_n(t, fast_type, 5);
    CHECK_EQ_INT(sb_alert_count(), 1);
    CHECK_STAYS(atomic_load(&enters) == 3, 50);
    atomic_store(&permits, 1000);
    sb_unsubscribe_and_join(sub);
    CHECK_EQ_INT(sb_alert_count(), 0);
    CHECK_EQ_INT(atomic_load(&leaves), 3);
    sb_topic_unref(t);
}

static void test_bad_handles(void)
{
    sb_topic_stats ts;
    sb_subscription_stats ss;
    CHECK_EQ_INT(sb_topic_get_stats(NULL, &ts), SB_E_INVAL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_ERR();
    CHECK_EQ_INT(sb_subscription_get_stats(NULL, &ss), SB_E_INVAL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    sb_topic *t = sb_topic_create("stats:bad");
    CHECK_EQ_INT(sb_topic_get_stats(t, NULL), SB_E_INVAL);
    CHECK_EQ_INT(sb_subscription_get_stats((sb_subscription *)t, &ss), SB_E_INVAL);
    sb_subscription *sub = sb_subscribe_synchronous(t, noop, NULL);
    CHECK_EQ_INT(sb_subscription_get_stats(sub, NULL), SB_E_INVAL);
    sb_unsubscribe_and_join(sub);
    sb_topic_unref(t);
    CHECK(sb_alert_count() >= 0);
    CHECK_EQ_INT(sb_last_error_code(), 0);
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("stats_fast", NULL, &fast_type), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("stats_slow", NULL, &slow_type), SB_OK);
    test_topic_stats();
    test_subscription_stats();
    test_router_cache_and_listings();
    test_alerts();
    test_bad_handles();
    sb_message_type_unref(fast_type);
    sb_message_type_unref(slow_type);
    return TEST_DONE();
}
