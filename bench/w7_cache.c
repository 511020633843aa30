/*
 * W7: cache over 10,000 ids. A caching topic over a topic, one pool subscription on the
 * caching topic; 500,000 snapshots (ids cycling) published until every cache update is
 * seen; then 2 threads doing sb_cache_get on random ids for 2 s; then one sb_cache_dump
 * of all 10,000. Built only when the header has the cache API (bench/run.sh decides).
 * W7d (below, run with W7, on a line of its own): the longest publisher stall during
 * dumps of 50,000 and 400,000 entries.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "bench.h"

#define W7_IDS 10000
#define W7_N 500000
#define W7_GET_S 2.0

static char w7_ids[W7_IDS][8];

/* The id of a snapshot: seq modulo the id count, as a string of static storage. */
static const char *w7_id(sb_message *msg)
{
    if (sb_message_get_type(msg) != g_type)
        return NULL;
    const payload *p = sb_message_data(msg);
    return w7_ids[p->seq % W7_IDS];
}

typedef struct w7_ctx {
    _Alignas(64) _Atomic uint64_t seen;
    _Atomic uint64_t target;
    sb_message_type *update_type;
    uint64_t bad;
    completion *done;
} w7_ctx;

static void w7_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    w7_ctx *c = data;
    if (sb_message_get_type(msg) != c->update_type)
        return; /* subscription changes and anything else */
    const sb_cache_update *u = sb_message_data(msg);
    if (!u || !u->new_snapshot)
        c->bad++;
    uint64_t seen = atomic_load_explicit(&c->seen, memory_order_relaxed) + 1;
    atomic_store_explicit(&c->seen, seen, memory_order_relaxed);
    if (seen == atomic_load_explicit(&c->target, memory_order_relaxed))
        completion_arrive(c->done);
}

typedef struct w7_getter {
    sb_cache *cache;
    uint64_t seed;
    uint64_t gets;
    uint64_t misses;
    double secs;
} w7_getter;

static void *w7_get_thread(void *arg)
{
    w7_getter *g = arg;
    uint64_t x = g->seed | 1, gets = 0, misses = 0, t0 = now_ns();
    uint64_t stop = t0 + (uint64_t)(W7_GET_S * 1e9), t = t0;
    for (;;) {
        for (int k = 0; k < 256; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sb_message *m = sb_cache_get(g->cache, g_type, w7_ids[x % W7_IDS]);
            if (m)
                sb_message_unref(m);
            else
                misses++;
        }
        gets += 256;
        t = now_ns();
        if (t >= stop)
            break;
    }
    g->gets = gets;
    g->misses = misses;
    g->secs = (double)(t - t0) / 1e9;
    return NULL;
}

void bench_w7(result *r)
{
    for (int i = 0; i < W7_IDS; i++)
        snprintf(w7_ids[i], sizeof w7_ids[i], "%d", i);

    completion done;
    completion_init(&done);
    w7_ctx *ctx = aligned_alloc(64, sizeof *ctx);
    if (!ctx) {
        fprintf(stderr, "bench: out of memory\n");
        exit(2);
    }
    memset(ctx, 0, sizeof *ctx);
    ctx->update_type = sb_cache_update_type();
    ctx->done = &done;
    atomic_store(&ctx->target, UINT64_MAX);

    sb_cache *cache = sb_cache_create(w7_id);
    sb_topic *topic = sb_topic_create("bench/W7/original");
    sb_caching_topic *ct = cache && topic ? sb_caching_topic_create(topic, cache) : NULL;
    sb_topic *ctopic = ct ? sb_caching_get_topic(ct) : NULL;
    sb_subscription *sub = ctopic ? sb_subscribe_pool(ctopic, w7_cb, ctx) : NULL;
    if (!sub) {
        fprintf(stderr, "bench: W7 setup failed: %s\n", sb_last_error());
        res_add(r, "error", 1, 0);
        sb_caching_unsubscribe_and_join(ct);
        sb_cache_unref(cache);
        sb_topic_unref(topic);
        return;
    }

    int ok = 1;
    uint64_t deadline = now_ns() + (uint64_t)(g_timeout_s * 1e9);
    /* warm-up: one snapshot per id, so the timed part replaces entries */
    completion_reset(&done, 1);
    atomic_store(&ctx->target, W7_IDS);
    for (uint64_t i = 0; i < W7_IDS; i++) {
        sb_message *m = make_msg(i);
        sb_publish(topic, m);
        sb_message_unref(m);
    }
    ok = completion_wait(&done, deadline);

    double updates_per_s = 0;
    if (ok) {
        completion_reset(&done, 1);
        atomic_store(&ctx->target, W7_IDS + W7_N);
        deadline = now_ns() + (uint64_t)(g_timeout_s * 1e9);
        uint64_t t0 = now_ns();
        for (uint64_t i = W7_IDS; i < W7_IDS + W7_N; i++) {
            sb_message *m = make_msg(i);
            sb_publish(topic, m);
            sb_message_unref(m);
            if ((i & 4095) == 0 && now_ns() > deadline) {
                ok = 0;
                break;
            }
        }
        ok = ok && completion_wait(&done, deadline);
        uint64_t t1 = ok ? atomic_load(&done.end_ns) : now_ns();
        double seen = (double)atomic_load(&ctx->seen) - W7_IDS;
        updates_per_s = (ok ? W7_N : seen) / ((double)(t1 - t0) / 1e9);
    }
    res_add(r, "updates_per_s", updates_per_s, 0);

    /* gets: 2 threads, random ids, 2 s */
    w7_getter g[2] = { { cache, 0x9e3779b97f4a7c15ull, 0, 0, 0 }, { cache, 0xdeadbeefcafef00dull, 0, 0, 0 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, w7_get_thread, &g[i]);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    double gets_per_s = 0;
    uint64_t misses = 0;
    for (int i = 0; i < 2; i++) {
        gets_per_s += g[i].secs > 0 ? (double)g[i].gets / g[i].secs : 0;
        misses += g[i].misses;
    }
    res_add(r, "gets_per_s", gets_per_s, 0);

    /* one dump of everything */
    uint64_t t0 = now_ns();
    sb_message_list *list = sb_cache_dump(cache, g_type);
    double dump_ms = (double)(now_ns() - t0) / 1e6;
    size_t len = list ? sb_message_list_len(list) : 0;
    sb_message_list_free(list);
    res_add(r, "dump_ms", dump_ms, 3);

    if (len != W7_IDS)
        res_add(r, "dump_len", (double)len, 0);
    if (misses)
        res_add(r, "get_misses", (double)misses, 0);
    if (ctx->bad)
        res_add(r, "bad_updates", (double)ctx->bad, 0);
    if (ok) {
        sb_unsubscribe_and_join(sub);
        sb_caching_unsubscribe_and_join(ct);
        free(ctx);
        completion_destroy(&done);
    } else {
        res_add(r, "timeout", 1, 0);
        sb_unsubscribe(sub);
        sb_caching_unsubscribe(ct);
    }
    sb_cache_unref(cache);
    sb_topic_unref(topic);
}

/*
 * W7d: what a dump costs publishers. A cache of N entries (50,000, then 400,000) behind
 * a caching topic with no subscriber; one thread publishes updates of its ids non-stop
 * and times every sb_publish (leaving out the calls during which the thread was
 * preempted: RUSAGE_THREAD's involuntary switches), while the main thread first waits (the machine's own
 * stalls: preemption) and then dumps the whole cache, at least W7D_DUMPS times and for as
 * long. Reports the longest publish while idle, the longest during the dumps, how many
 * publishes took over 100 us in each phase (the idle ones: both 200 ms idle phases), and
 * the median of the first W7D_DUMPS dump times:
 *   W7d idle_max_us= idle_slow= stall_50k_us= slow_50k= dump_50k_ms= stall_400k_us=
 *       slow_400k= dump_400k_ms=
 */
#define W7D_DUMPS 5
#define W7D_IDLE_MS 200

static uint64_t w7d_n; /* entries of the cache under test */

static const char *w7d_id(sb_message *msg)
{
    static _Thread_local char buf[24];
    if (sb_message_get_type(msg) != g_type)
        return NULL;
    const payload *p = sb_message_data(msg);
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)(p->seq % w7d_n));
    return buf;
}

typedef struct w7d_pub {
    sb_topic *topic;
    _Atomic int phase; /* 0 idle, 1 dumping, 2 stop */
    uint64_t max_ns[2];
    uint64_t slow[2];      /* publishes over 100 us */
    uint64_t preempted[2]; /* publishes left out: preempted during the call */
} w7d_pub;

static void *w7d_publisher(void *arg)
{
    w7d_pub *p = arg;
    uint64_t seq = 0;
    int phase;
    while ((phase = atomic_load_explicit(&p->phase, memory_order_relaxed)) != 2) {
        sb_message *m = make_msg(seq++);
        struct rusage r0, r1;
        getrusage(RUSAGE_THREAD, &r0);
        uint64_t t0 = now_ns();
        sb_publish(p->topic, m);
        uint64_t d = now_ns() - t0;
        getrusage(RUSAGE_THREAD, &r1);
        sb_message_unref(m);
        /* Preempted meanwhile (the machine is shared): the time is the scheduler's, not
         * the library's; counted apart. A wait for a lock is a voluntary switch. */
        if (r1.ru_nivcsw != r0.ru_nivcsw) {
            p->preempted[phase]++;
            continue;
        }
        if (d > p->max_ns[phase])
            p->max_ns[phase] = d;
        p->slow[phase] += d > 100000;
    }
    return NULL;
}

/* One cache of n entries: longest publish idle and during dumps (us), median dump (ms). */
static int w7d_run(uint64_t n, double *idle_us, double *stall_us, double *dump_ms,
                   double *idle_slow, double *dump_slow)
{
    w7d_n = n;
    sb_cache *cache = sb_cache_create(w7d_id);
    sb_topic *topic = sb_topic_create("bench/W7d/original");
    sb_caching_topic *ct = cache && topic ? sb_caching_topic_create(topic, cache) : NULL;
    if (!ct) {
        fprintf(stderr, "bench: W7d setup failed: %s\n", sb_last_error());
        sb_cache_unref(cache);
        sb_topic_unref(topic);
        return 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        sb_message *m = make_msg(i);
        sb_publish(topic, m);
        sb_message_unref(m);
    }
    w7d_pub p = { topic, 0, { 0, 0 }, { 0, 0 }, { 0, 0 } };
    pthread_t th;
    pthread_create(&th, NULL, w7d_publisher, &p);
    struct timespec idle = { 0, W7D_IDLE_MS * 1000000L };
    nanosleep(&idle, NULL);
    atomic_store(&p.phase, 1);
    double ms[W7D_DUMPS];
    size_t len_ok = 1;
    /* at least W7D_IDLE_MS of dumping too, so the publisher runs through several */
    uint64_t until = now_ns() + W7D_IDLE_MS * 1000000ull;
    for (int k = 0; k < W7D_DUMPS || now_ns() < until; k++) {
        uint64_t t0 = now_ns();
        sb_message_list *l = sb_cache_dump(cache, g_type);
        if (k < W7D_DUMPS)
            ms[k] = (double)(now_ns() - t0) / 1e6; /* the first W7D_DUMPS are timed */
        len_ok &= l != NULL && sb_message_list_len(l) == n;
        sb_message_list_free(l);
    }
    atomic_store(&p.phase, 2);
    pthread_join(th, NULL);
    for (int i = 1; i < W7D_DUMPS; i++) /* insertion sort, for the median */
        for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
            double x = ms[j];
            ms[j] = ms[j - 1];
            ms[j - 1] = x;
        }
    *idle_us = (double)p.max_ns[0] / 1e3;
    *stall_us = (double)p.max_ns[1] / 1e3;
    *dump_ms = ms[W7D_DUMPS / 2];
    *idle_slow = (double)p.slow[0];
    *dump_slow = (double)p.slow[1];
    sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(topic);
    if (!len_ok)
        fprintf(stderr, "bench: W7d: a dump of %llu entries had another length\n",
                (unsigned long long)n);
    return (int)len_ok;
}

void bench_w7_dump_stall(void)
{
    result r;
    res_init(&r, "W7d");
    double idle50, stall50, dump50, idle400, stall400, dump400, islow50, slow50, islow400,
        slow400;
    int ok = w7d_run(50000, &idle50, &stall50, &dump50, &islow50, &slow50);
    ok &= w7d_run(400000, &idle400, &stall400, &dump400, &islow400, &slow400);
    res_add(&r, "idle_max_us", idle50 > idle400 ? idle50 : idle400, 1);
    res_add(&r, "idle_slow", islow50 + islow400, 0);
    res_add(&r, "stall_50k_us", stall50, 1);
    res_add(&r, "slow_50k", slow50, 0);
    res_add(&r, "dump_50k_ms", dump50, 2);
    res_add(&r, "stall_400k_us", stall400, 1);
    res_add(&r, "slow_400k", slow400, 0);
    res_add(&r, "dump_400k_ms", dump400, 2);
    if (!ok)
        res_add(&r, "bad_dump_len", 1, 0);
    res_print(&r);
}
