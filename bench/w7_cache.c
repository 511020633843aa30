/*
 * W7: cache over 10,000 ids. A caching topic over a topic, one pool subscription on the
 * caching topic; 500,000 snapshots (ids cycling) published until every cache update is
 * seen; then 2 threads doing sb_cache_get on random ids for 2 s; then one sb_cache_dump
 * of all 10,000. Built only when the header has the cache API (bench/run.sh decides).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
