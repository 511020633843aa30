/*
 * switchboard benchmark: the workloads W0-W9, W11 and W12 of shared/bench/WORKLOADS.md, run through
 * the public C API, and the cluster workloads C1-C5 (cluster.c). One line per workload run, `<id> key=value ...` (numbers only),
 * then ratio lines `R W1/W0=0.81`: the median over the rounds (-n) of each round's
 * ratio, so that both figures of a ratio come from the same minute.
 *
 *   bench [-w W1[,W3...]]... [-n RUNS] [-t TIMEOUT_S] [-h]
 *
 * Every workload: one message type; each message carries a malloc'd `payload`
 * {seq, t_ns} freed by the message's dtor; a warm-up before timing; CLOCK_MONOTONIC;
 * the timed part ends when the subscriber side has seen every message. Every wait is
 * bounded by the timeout (default 20 s): a workload that does not finish in time is
 * printed with `timeout=1` and the run goes on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "cluster.h"

/* W0 lives in the Rust crate bench/w0 (crossbeam ArrayQueue). */
extern double sbbench_w0(uint64_t n);
#ifdef SB_BENCH_W7
extern void bench_w7(result *r);
extern void bench_w7_dump_stall(void);
#endif
#ifdef SB_BENCH_W11
extern void bench_w11(result *r); /* w11_timers.c */
#endif

sb_message_type *g_type;
sb_message_type *g_change;
double g_timeout_s = 20.0;

/* ------------------------------------------------------------------ helpers */

uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

double secs_since(uint64_t t0)
{
    return (double)(now_ns() - t0) / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "bench: %s failed: %s\n", what, sb_last_error() ? sb_last_error() : "?");
    exit(2);
}

sb_message *make_msg(uint64_t seq)
{
    payload *p = malloc(sizeof *p);
    if (!p) {
        fprintf(stderr, "bench: out of memory\n");
        exit(2);
    }
    p->seq = seq;
    p->t_ns = now_ns();
    sb_message *m = sb_message_create(g_type, p, free);
    if (!m) {
        free(p);
        die("sb_message_create");
    }
    return m;
}

static void publish_one(sb_topic *t, uint64_t seq)
{
    sb_message *m = make_msg(seq);
    if (sb_publish(t, m) < 0)
        die("sb_publish");
    sb_message_unref(m);
}

void completion_init(completion *c)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &a);
    pthread_condattr_destroy(&a);
    pthread_mutex_init(&c->mu, NULL);
    atomic_store(&c->remaining, 0);
    atomic_store(&c->end_ns, 0);
    c->done = 0;
}

void completion_destroy(completion *c)
{
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
}

void completion_reset(completion *c, int subs)
{
    pthread_mutex_lock(&c->mu);
    c->done = 0;
    atomic_store(&c->end_ns, 0);
    atomic_store(&c->remaining, subs);
    pthread_mutex_unlock(&c->mu);
}

void completion_arrive(completion *c)
{
    if (atomic_fetch_sub(&c->remaining, 1) == 1) {
        atomic_store(&c->end_ns, now_ns());
        pthread_mutex_lock(&c->mu);
        c->done = 1;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
    }
}

int completion_wait(completion *c, uint64_t deadline_ns)
{
    struct timespec ts = { (time_t)(deadline_ns / 1000000000u), (long)(deadline_ns % 1000000000u) };
    pthread_mutex_lock(&c->mu);
    while (!c->done) {
        int rc = pthread_cond_timedwait(&c->cv, &c->mu, &ts);
        if (rc == ETIMEDOUT)
            break;
    }
    int done = c->done;
    pthread_mutex_unlock(&c->mu);
    return done;
}

static uint64_t deadline_from_now(void)
{
    return now_ns() + (uint64_t)(g_timeout_s * 1e9);
}

void res_init(result *r, const char *id)
{
    memset(r, 0, sizeof *r);
    snprintf(r->id, sizeof r->id, "%s", id);
}

void res_add(result *r, const char *key, double val, int prec)
{
    if (r->nkv >= 8)
        return;
    snprintf(r->key[r->nkv], sizeof r->key[0], "%s", key);
    r->val[r->nkv] = val;
    r->prec[r->nkv] = prec;
    r->nkv++;
}

static double res_get(const result *r, const char *key)
{
    for (int i = 0; i < r->nkv; i++)
        if (!strcmp(r->key[i], key))
            return r->val[i];
    return -1;
}

void res_print(const result *r)
{
    printf("%s", r->id);
    for (int i = 0; i < r->nkv; i++)
        printf(" %s=%.*f", r->key[i], r->prec[i], r->val[i]);
    printf("\n");
    fflush(stdout);
}

/* Warnings of the library (congestion...) are counted, and the first one of a workload
 * is shown on stderr, instead of flooding the output. */
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static char g_first_warning[512];

static void log_handler(void *data, int level, const char *text)
{
    (void)data;
    (void)level;
    pthread_mutex_lock(&g_log_mu);
    if (!g_first_warning[0])
        snprintf(g_first_warning, sizeof g_first_warning, "%s", text ? text : "");
    pthread_mutex_unlock(&g_log_mu);
}

/* Resident set size in bytes (/proc/self/statm). */
static long rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (!f)
        return -1;
    if (fscanf(f, "%ld %ld", &size, &res) != 2)
        res = -1;
    fclose(f);
    return res < 0 ? -1 : res * sysconf(_SC_PAGESIZE);
}

/* ------------------------------------------------- subscriber-side counting */

/* One subscription's state. Its callbacks never overlap, but may run on different
 * threads over time and are read by the waiter, hence the atomics (single writer). */
typedef struct sub_ctx {
    _Alignas(64) _Atomic uint64_t seen;
    _Atomic uint64_t target;
    uint64_t last_seq;
    uint64_t order_errors;
    uint64_t *lat_ns;   /* W5: latency per timed message, else NULL */
    uint64_t lat_from;  /* W5: first timed seq */
    uint64_t lat_n;
    completion *done;
} sub_ctx;

static void count_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (sb_message_get_type(msg) == g_change)
        return;
    sub_ctx *c = data;
    const payload *p = sb_message_data(msg);
    if (c->lat_ns) {
        uint64_t now = now_ns();
        if (p->seq >= c->lat_from && p->seq - c->lat_from < c->lat_n)
            c->lat_ns[p->seq - c->lat_from] = now - p->t_ns;
    }
    uint64_t seen = atomic_load_explicit(&c->seen, memory_order_relaxed) + 1;
    if (seen > 1 && p->seq <= c->last_seq)
        c->order_errors++;
    c->last_seq = p->seq;
    atomic_store_explicit(&c->seen, seen, memory_order_relaxed);
    if (seen == atomic_load_explicit(&c->target, memory_order_relaxed))
        completion_arrive(c->done);
}

enum kind { DEDICATED, POOL };

static sb_subscription *subscribe(enum kind k, sb_topic *t, sb_subscription_cb cb, void *data)
{
    sb_subscription *s = k == DEDICATED ? sb_subscribe(t, cb, data) : sb_subscribe_pool(t, cb, data);
    if (!s)
        die("subscribe");
    return s;
}

static int g_topic_serial;

static sb_topic *new_topic(const char *what)
{
    char name[96];
    snprintf(name, sizeof name, "bench/%s/%d", what, ++g_topic_serial);
    sb_topic *t = sb_topic_create(name);
    if (!t)
        die("sb_topic_create");
    return t;
}

/* Publishes seq [from, to) to t; returns 0 if it ran past the deadline. */
static int publish_range(sb_topic *t, uint64_t from, uint64_t to, uint64_t deadline)
{
    for (uint64_t i = from; i < to; i++) {
        publish_one(t, i);
        if ((i & 4095) == 0 && now_ns() > deadline)
            return 0;
    }
    return 1;
}

/* Sets every context's target and the completion for one phase. */
static void arm(sub_ctx *ctx, int nsubs, completion *done, uint64_t target)
{
    completion_reset(done, nsubs);
    for (int i = 0; i < nsubs; i++)
        atomic_store(&ctx[i].target, target);
}

static uint64_t total_seen(sub_ctx *ctx, int nsubs)
{
    uint64_t s = 0;
    for (int i = 0; i < nsubs; i++)
        s += atomic_load(&ctx[i].seen);
    return s;
}

/* Publishes seq [from, to) to t, one every gap_ns (busy-waiting on the clock); returns 0
 * if it ran past the deadline. */
static int publish_paced(sb_topic *t, uint64_t from, uint64_t to, uint64_t gap_ns, uint64_t deadline)
{
    uint64_t next = now_ns();
    for (uint64_t i = from; i < to; i++) {
        while (now_ns() < next)
            ; /* pace: busy-wait on the clock */
        publish_one(t, i);
        next += gap_ns;
        if ((i & 1023) == 0 && now_ns() > deadline)
            return 0;
    }
    return 1;
}

/* A subscription context that records the latency of n messages (in ctx->lat_ns, which
 * the caller frees with the context). */
static sub_ctx *latency_ctx(completion *done, uint64_t n)
{
    sub_ctx *ctx = aligned_alloc(64, sizeof *ctx);
    uint64_t *lat = calloc(n, sizeof *lat);
    if (!ctx || !lat)
        die("malloc");
    memset(ctx, 0, sizeof *ctx);
    ctx->done = done;
    ctx->lat_ns = lat;
    ctx->lat_n = n;
    atomic_store(&ctx->target, UINT64_MAX);
    return ctx;
}

/* ------------------------------------------------------------ W1-W4, W6 */

/* 1 publisher (this thread) -> nsubs subscriptions of kind k, either on the topic
 * published to, or (forward) on a topic B that topic A forwards to. */
static void fanout(result *r, enum kind k, int nsubs, uint64_t n, int forward)
{
    completion done;
    completion_init(&done);
    sub_ctx *ctx = aligned_alloc(64, sizeof(sub_ctx) * (size_t)nsubs);
    sb_subscription **subs = calloc((size_t)nsubs, sizeof *subs);
    if (!ctx || !subs)
        die("malloc");
    memset(ctx, 0, sizeof(sub_ctx) * (size_t)nsubs);

    sb_topic *a = new_topic(r->id);
    sb_topic *b = NULL;
    sb_forward *fwd = NULL;
    if (forward) {
        b = new_topic(r->id);
        fwd = sb_forward_all(a, b);
        if (!fwd)
            die("sb_forward_all");
    }
    for (int i = 0; i < nsubs; i++) {
        ctx[i].done = &done;
        atomic_store(&ctx[i].target, UINT64_MAX);
        subs[i] = subscribe(k, forward ? b : a, count_cb, &ctx[i]);
    }

    uint64_t warm = n / 10 < 1000 ? 1000 : n / 10;
    uint64_t deadline = deadline_from_now();
    int ok;

    /* warm-up */
    arm(ctx, nsubs, &done, warm);
    ok = publish_range(a, 0, warm, deadline) && completion_wait(&done, deadline);

    double secs = 0, seen = 0;
    if (ok) {
        arm(ctx, nsubs, &done, warm + n);
        deadline = deadline_from_now();
        uint64_t t0 = now_ns();
        ok = publish_range(a, warm, warm + n, deadline) && completion_wait(&done, deadline);
        uint64_t t1 = ok ? atomic_load(&done.end_ns) : now_ns();
        secs = (double)(t1 - t0) / 1e9;
        seen = (double)(total_seen(ctx, nsubs) - (uint64_t)nsubs * warm) / nsubs;
    }
    if (secs <= 0) /* the warm-up did not finish */
        secs = 1e300;
    res_add(r, "msgs_per_s", (ok ? (double)n : seen) / secs, 0);
    if (nsubs > 1)
        res_add(r, "deliveries_per_s", (ok ? (double)n : seen) * nsubs / secs, 0);
    uint64_t errs = 0;
    for (int i = 0; i < nsubs; i++)
        errs += ctx[i].order_errors;
    if (errs)
        res_add(r, "order_errors", (double)errs, 0);

    if (ok) {
        for (int i = 0; i < nsubs; i++)
            sb_unsubscribe_and_join(subs[i]);
        sb_forward_cancel(fwd);
        sb_topic_unref(b);
        sb_topic_unref(a);
        free(ctx);
        free(subs);
        completion_destroy(&done);
    } else {
        /* Callbacks may still run: leak their contexts, do not wait. */
        res_add(r, "timeout", 1, 0);
        for (int i = 0; i < nsubs; i++)
            sb_unsubscribe(subs[i]);
        sb_forward_cancel(fwd);
        sb_topic_unref(b);
        sb_topic_unref(a);
        free(subs);
    }
}

/* ----------------------------------------------------------------------- W5 */

static int cmp_u64(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

static void w5(result *r)
{
    const uint64_t n = 100000, warm = 10000, gap_ns = 10000;
    completion done;
    completion_init(&done);
    sub_ctx *ctx = latency_ctx(&done, n);
    uint64_t *lat = ctx->lat_ns;
    ctx->lat_from = warm;

    sb_topic *t = new_topic("W5");
    sb_subscription *s = subscribe(DEDICATED, t, count_cb, ctx);
    uint64_t deadline = deadline_from_now();
    arm(ctx, 1, &done, warm + n);
    int ok = publish_paced(t, 0, warm + n, gap_ns, deadline) && completion_wait(&done, deadline);
    if (ok) {
        qsort(lat, n, sizeof *lat, cmp_u64);
        res_add(r, "p50_us", lat[n / 2] / 1e3, 2);
        res_add(r, "p99_us", lat[n * 99 / 100] / 1e3, 2);
        res_add(r, "p999_us", lat[n * 999 / 1000] / 1e3, 2);
        res_add(r, "max_us", lat[n - 1] / 1e3, 2);
        if (ctx->order_errors)
            res_add(r, "order_errors", (double)ctx->order_errors, 0);
        sb_unsubscribe_and_join(s);
        free(lat);
        free(ctx);
        completion_destroy(&done);
    } else {
        res_add(r, "timeout", 1, 0);
        sb_unsubscribe(s);
    }
    sb_topic_unref(t);
}

/* ---------------------------------------------------------------------- W12 */

/*
 * W12: worker groups keep a slow module from delaying another. Group "bench.slow"
 * (max 2 workers) runs 4 pool subscriptions whose callback sleeps 10 ms on every
 * message; group "bench.fast" runs one pool subscription that records latency as W5
 * does (messages paced one every 10 µs). The fast group's latency is measured twice in
 * the same run: with the slow group idle, then with it busy (a second thread publishes to
 * the slow topic every 10 ms: 40 ms of callbacks per 10 ms for 2 workers, so its queue
 * never empties). Target: busy figures as idle ones.
 * Figures: idle_p50_us idle_p99_us busy_p50_us busy_p99_us slow_calls (slow callbacks
 * that ran during the busy phase).
 */
#define W12_SLOW_SUBS 4

static _Atomic uint64_t w12_slow_calls;
static _Atomic int w12_busy;

static void w12_slow_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == g_change)
        return;
    struct timespec ts = { 0, 10 * 1000 * 1000 };
    nanosleep(&ts, NULL);
    atomic_fetch_add(&w12_slow_calls, 1);
}

static void *w12_slow_publisher(void *arg)
{
    sb_topic *t = arg;
    uint64_t seq = 0;
    while (atomic_load(&w12_busy)) {
        publish_one(t, seq++);
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* One paced latency phase on the fast subscription: seqs [base, base + warm + n). */
static int w12_phase(sb_topic *t, sub_ctx *ctx, completion *done, uint64_t base, uint64_t warm,
                     uint64_t n, double *p50, double *p99)
{
    const uint64_t gap_ns = 10000;
    memset(ctx->lat_ns, 0, n * sizeof *ctx->lat_ns);
    ctx->lat_from = base + warm;
    ctx->lat_n = n;
    atomic_store(&ctx->seen, 0);
    arm(ctx, 1, done, warm + n);
    uint64_t deadline = deadline_from_now();
    if (!publish_paced(t, base, base + warm + n, gap_ns, deadline) || !completion_wait(done, deadline))
        return 0;
    qsort(ctx->lat_ns, n, sizeof *ctx->lat_ns, cmp_u64);
    *p50 = ctx->lat_ns[n / 2] / 1e3;
    *p99 = ctx->lat_ns[n * 99 / 100] / 1e3;
    return 1;
}

static void w12(result *r)
{
    const uint64_t n = 50000, warm = 5000;
    sb_pool *slow = sb_pool_create("bench.slow", 1, 2, 20000);
    sb_pool *fast = sb_pool_create("bench.fast", 1, 2, 20000);
    if (!slow || !fast)
        die("sb_pool_create");
    completion done;
    completion_init(&done);
    sub_ctx *ctx = latency_ctx(&done, n);
    uint64_t *lat = ctx->lat_ns;

    sb_topic *ft = new_topic("W12-fast");
    sb_topic *st = new_topic("W12-slow");
    sb_subscription *fs = sb_subscribe_pool_in(ft, fast, count_cb, ctx);
    sb_subscription *ss[W12_SLOW_SUBS];
    for (int i = 0; i < W12_SLOW_SUBS; i++)
        ss[i] = sb_subscribe_pool_in(st, slow, w12_slow_cb, NULL);
    if (!fs)
        die("sb_subscribe_pool_in");
    for (int i = 0; i < W12_SLOW_SUBS; i++)
        if (!ss[i])
            die("sb_subscribe_pool_in");

    double ip50 = 0, ip99 = 0, bp50 = 0, bp99 = 0;
    int ok = w12_phase(ft, ctx, &done, 0, warm, n, &ip50, &ip99);
    pthread_t pub;
    atomic_store(&w12_busy, 1);
    if (pthread_create(&pub, NULL, w12_slow_publisher, st) != 0)
        die("pthread_create");
    /* the slow group's workers are all in callbacks before the timed phase starts */
    struct timespec settle = { 0, 50 * 1000 * 1000 };
    nanosleep(&settle, NULL);
    uint64_t slow0 = atomic_load(&w12_slow_calls);
    ok = ok && w12_phase(ft, ctx, &done, warm + n, warm, n, &bp50, &bp99);
    uint64_t slow_calls = atomic_load(&w12_slow_calls) - slow0;
    atomic_store(&w12_busy, 0);
    pthread_join(pub, NULL);

    if (ok) {
        res_add(r, "idle_p50_us", ip50, 2);
        res_add(r, "idle_p99_us", ip99, 2);
        res_add(r, "busy_p50_us", bp50, 2);
        res_add(r, "busy_p99_us", bp99, 2);
        res_add(r, "slow_calls", (double)slow_calls, 0);
        if (ctx->order_errors)
            res_add(r, "order_errors", (double)ctx->order_errors, 0);
        sb_unsubscribe_and_join(fs);
        free(lat);
        free(ctx);
        completion_destroy(&done);
    } else {
        res_add(r, "timeout", 1, 0);
        sb_unsubscribe(fs);
    }
    /* waits for the slow backlog (about 0.6 s of callbacks) */
    for (int i = 0; i < W12_SLOW_SUBS; i++)
        sb_unsubscribe_and_join(ss[i]);
    sb_topic_unref(ft);
    sb_topic_unref(st);
    sb_pool_unref(slow);
    sb_pool_unref(fast);
}

/* ----------------------------------------------------------------------- W8 */

static _Atomic uint64_t w8_calls;

static void w8_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg; /* only Subscribe change messages arrive here: counted to see the pool drain */
    atomic_fetch_add_explicit(&w8_calls, 1, memory_order_relaxed);
}

typedef struct w8_set {
    size_t n;
    sb_topic **topics;
    sb_forward **fwds;
    sb_subscription **subs;
} w8_set;

/* Creates up to n (topic, forward into agg, pool subscription); returns how many. */
static size_t w8_create(w8_set *s, sb_topic *agg, size_t n, const char *prefix, uint64_t deadline)
{
    char name[64];
    size_t i;
    for (i = 0; i < n; i++) {
        snprintf(name, sizeof name, "%s/%zu", prefix, i);
        s->topics[i] = sb_topic_create(name);
        if (!s->topics[i])
            die("sb_topic_create");
        s->fwds[i] = sb_forward_all(s->topics[i], agg);
        if (!s->fwds[i])
            die("sb_forward_all");
        s->subs[i] = sb_subscribe_pool(s->topics[i], w8_cb, NULL);
        if (!s->subs[i])
            die("sb_subscribe_pool");
        if ((i & 1023) == 1023 && now_ns() > deadline) {
            i++;
            break;
        }
    }
    return i;
}

/* Tears down the first n; past the deadline it stops joining (unsubscribe only). Returns
 * 0 if it had to. */
static int w8_teardown(w8_set *s, size_t n, uint64_t deadline)
{
    int joined_all = 1;
    for (size_t i = 0; i < n; i++) {
        if (joined_all && (i & 1023) == 1023 && now_ns() > deadline)
            joined_all = 0;
        if (joined_all)
            sb_unsubscribe_and_join(s->subs[i]);
        else
            sb_unsubscribe(s->subs[i]);
    }
    for (size_t i = 0; i < n; i++)
        sb_forward_cancel(s->fwds[i]);
    for (size_t i = 0; i < n; i++)
        sb_topic_unref(s->topics[i]);
    return joined_all;
}

static void w8(result *r)
{
    const size_t n = 100000, warm = 2000;
    w8_set s = { n, calloc(n, sizeof(void *)), calloc(n, sizeof(void *)), calloc(n, sizeof(void *)) };
    if (!s.topics || !s.fwds || !s.subs)
        die("malloc");
    /* touch our own arrays so they are resident before the baseline */
    memset(s.topics, 0, n * sizeof(void *));
    memset(s.fwds, 0, n * sizeof(void *));
    memset(s.subs, 0, n * sizeof(void *));
    int ok = 1;
    char prefix[64];

    sb_topic *agg = new_topic("W8-aggregate");
    snprintf(prefix, sizeof prefix, "bench/W8-warm/%d", ++g_topic_serial);
    size_t m = w8_create(&s, agg, warm, prefix, deadline_from_now());
    w8_teardown(&s, m, deadline_from_now());

    malloc_trim(0);
    long rss0 = rss_bytes();
    atomic_store(&w8_calls, 0);
    snprintf(prefix, sizeof prefix, "bench/W8/%d", ++g_topic_serial);

    uint64_t deadline = deadline_from_now();
    uint64_t t0 = now_ns();
    size_t created = w8_create(&s, agg, n, prefix, deadline);
    double create_s = secs_since(t0);
    if (created < n)
        ok = 0;

    /* let the pool deliver every Subscribe message before reading RSS */
    while (atomic_load(&w8_calls) < created && now_ns() < deadline)
        usleep(1000);
    long rss1 = rss_bytes();

    deadline = deadline_from_now();
    t0 = now_ns();
    if (!w8_teardown(&s, created, deadline))
        ok = 0;
    double teardown_s = secs_since(t0);
    sb_topic_unref(agg);

    res_add(r, "create_s", create_s, 3);
    res_add(r, "rss_bytes_per_sub", created ? (double)(rss1 - rss0) / (double)created : 0, 0);
    res_add(r, "teardown_s", teardown_s, 3);
    if (!ok) {
        res_add(r, "created", (double)created, 0);
        res_add(r, "timeout", 1, 0);
    }
    free(s.topics);
    free(s.fwds);
    free(s.subs);
}

/* ----------------------------------------------------------------------- W9 */

typedef struct w9_pub {
    sb_topic *topic;
    atomic_int stop;
    uint64_t published;
} w9_pub;

static void *w9_publisher(void *arg)
{
    w9_pub *p = arg;
    uint64_t i = 0;
    while (!atomic_load_explicit(&p->stop, memory_order_relaxed))
        publish_one(p->topic, i++);
    p->published = i;
    return NULL;
}

static _Atomic uint64_t w9_seen;

static void w9_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) == g_change)
        return;
    const payload *p = sb_message_data(msg);
    (void)p->seq;
    atomic_fetch_add_explicit(&w9_seen, 1, memory_order_relaxed);
}

static void w9(result *r)
{
    const uint64_t n = 100000, warm = 2000;
    w9_pub pub = { new_topic("W9"), 0, 0 };
    pthread_t th;
    if (pthread_create(&th, NULL, w9_publisher, &pub))
        die("pthread_create");
    for (uint64_t i = 0; i < warm; i++)
        sb_unsubscribe_and_join(subscribe(POOL, pub.topic, w9_cb, NULL));

    uint64_t deadline = deadline_from_now();
    uint64_t t0 = now_ns(), i;
    int ok = 1;
    for (i = 0; i < n; i++) {
        sb_unsubscribe_and_join(subscribe(POOL, pub.topic, w9_cb, NULL));
        if ((i & 255) == 255 && now_ns() > deadline) {
            ok = 0;
            i++;
            break;
        }
    }
    double secs = secs_since(t0);
    atomic_store(&pub.stop, 1);
    pthread_join(th, NULL);
    sb_topic_unref(pub.topic);
    res_add(r, "churn_per_s", (double)i / secs, 0);
    if (!ok)
        res_add(r, "timeout", 1, 0);
}

/* ----------------------------------------------------------------- driver */

/* Last resort against a hang inside the library (a join that never returns): past its
 * hard limit a workload is reported `timeout=1 hung=1` and the process exits. */
static _Atomic uint64_t g_watch_deadline;
static _Atomic int g_watch_w = -1;

#define NW 13 /* W0..W12 (W10: not defined) */
#define NC 5  /* C1..C5, indices NW..NW+NC-1 */

/* W10 has no definition yet: never selected, never run. */
static int workload_defined(int w) { return w != 10; }

static void workload_id(int w, char *id, size_t len)
{
    if (w < NW)
        snprintf(id, len, "W%u", (unsigned)(unsigned char)w);
    else
        snprintf(id, len, "C%u", (unsigned)(unsigned char)(w - NW + 1));
}

static void *watchdog(void *arg)
{
    (void)arg;
    for (;;) {
        usleep(100000);
        uint64_t d = atomic_load(&g_watch_deadline);
        if (d && now_ns() > d) {
            char id[8];
            workload_id(atomic_load(&g_watch_w), id, sizeof id);
            printf("%s timeout=1 hung=1\n", id);
            fflush(stdout);
            fprintf(stderr, "bench: %s still running past its hard limit; giving up\n", id);
            cluster_emergency_cleanup();
            _exit(3);
        }
    }
    return NULL;
}

static void run_workload(int w, result *r)
{
    char id[8];
    workload_id(w, id, sizeof id);
    res_init(r, id);
    if (w >= NW) {
        bench_cluster(w - NW + 1, r);
        return;
    }
    switch (w) {
    case 0: {
        double v = sbbench_w0(1000000);
        res_add(r, "msgs_per_s", v, 0);
        break;
    }
    case 1: fanout(r, DEDICATED, 1, 1000000, 0); break;
    case 2: fanout(r, POOL, 1, 1000000, 0); break;
    case 3: fanout(r, POOL, 10, 200000, 0); break;
    case 4: fanout(r, POOL, 100, 20000, 0); break;
    case 5: w5(r); break;
    case 6: fanout(r, POOL, 1, 500000, 1); break;
    case 7:
#ifdef SB_BENCH_W7
        bench_w7_dump_stall(); /* its own line, W7d */
        bench_w7(r);
#else
        res_add(r, "skipped", 1, 0);
#endif
        break;
    case 8: w8(r); break;
    case 9: w9(r); break;
    case 11:
#ifdef SB_BENCH_W11
        bench_w11(r);
#else
        res_add(r, "skipped", 1, 0);
#endif
        break;
    case 12: w12(r); break;
    default: res_add(r, "skipped", 1, 0); break;
    }
}

static int cmp_d(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: bench [-w W1[,W3...]]... [-n RUNS] [-t TIMEOUT_S] [-h]\n"
            "  -w LIST  run only these workloads (W0..W9, W11, W12, C1..C5; repeatable, comma-separated)\n"
            "  -n RUNS  RUNS rounds, each running every selected workload once (default 1)\n"
            "  -t SECS  bound on each wait of a workload (default 20)\n"
            "Prints `<id> key=value ...` per run, then ratios `R W1/W0=...` (the median\n"
            "of the rounds' ratios). C1-C5 start their own nats-server (SB_NATS_SERVER, else\n"
            ".tools/nats/bin/nats-server of the repository: `make nats-server`).\n");
}

static int parse_list(char *arg, int *sel)
{
    for (char *tok = strtok(arg, ", "); tok; tok = strtok(NULL, ", ")) {
        if (!strcasecmp(tok, "all")) {
            for (int i = 0; i < NW + NC; i++)
                sel[i] = workload_defined(i);
            continue;
        }
        int cluster = tok[0] == 'C' || tok[0] == 'c';
        if (cluster || tok[0] == 'W' || tok[0] == 'w')
            tok++;
        char *end;
        long v = strtol(tok, &end, 10);
        if (!*tok || *end)
            return -1;
        if (cluster) {
            if (v < 1 || v > NC)
                return -1;
            sel[NW + v - 1] = 1;
        } else {
            if (v < 0 || v >= NW || !workload_defined((int)v))
                return -1;
            sel[v] = 1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    /* a child node of a cluster workload (cluster.c) */
    if (argc > 1 && !strcmp(argv[1], "--node"))
        return cluster_node_main(argc, argv);

    int sel[NW + NC] = { 0 }, any = 0, runs = 1, opt;
    while ((opt = getopt(argc, argv, "w:n:t:h")) != -1) {
        switch (opt) {
        case 'w':
            if (parse_list(optarg, sel) < 0) {
                fprintf(stderr, "bench: bad workload list\n");
                usage(stderr);
                return 2;
            }
            any = 1;
            break;
        case 'n':
            runs = atoi(optarg);
            if (runs < 1) {
                fprintf(stderr, "bench: -n needs a positive count\n");
                return 2;
            }
            break;
        case 't':
            g_timeout_s = atof(optarg);
            if (g_timeout_s <= 0) {
                fprintf(stderr, "bench: -t needs a positive number of seconds\n");
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        usage(stderr);
        return 2;
    }
    if (!any)
        for (int i = 0; i < NW + NC; i++)
            sel[i] = workload_defined(i);

    sb_set_log_handler(log_handler, NULL);
    sb_message_vtable vt = { 0 };
    if (sb_message_type_create("bench_payload", &vt, &g_type) != SB_OK)
        die("sb_message_type_create");
    g_change = sb_subscription_change_type();

    /* primary figure of each run (-1: none), for the ratio lines */
    double *prim[NW + NC];
    for (int w = 0; w < NW + NC; w++) {
        prim[w] = malloc((size_t)runs * sizeof(double));
        if (!prim[w])
            die("malloc");
        for (int k = 0; k < runs; k++)
            prim[w][k] = -1;
    }

    pthread_t wd;
    if (pthread_create(&wd, NULL, watchdog, NULL) == 0)
        pthread_detach(wd);

    /* Rounds: every selected workload once per round, so that a ratio pairs figures
     * taken minutes apart at most, not a whole -n series apart (this machine's speed
     * changes by several times between phases). */
    uint64_t start = now_ns();
    for (int k = 0; k < runs; k++) {
        for (int w = 0; w < NW + NC; w++) {
            if (!sel[w])
                continue;
            result r;
            uint64_t warn0 = sb_warning_count();
            pthread_mutex_lock(&g_log_mu);
            g_first_warning[0] = 0;
            pthread_mutex_unlock(&g_log_mu);

            atomic_store(&g_watch_w, w);
            /* the longest workload (W8) waits up to 3 times the timeout */
            atomic_store(&g_watch_deadline, now_ns() + (uint64_t)((4 * g_timeout_s + 10) * 1e9));
            run_workload(w, &r);
            atomic_store(&g_watch_deadline, 0);

            uint64_t warns = sb_warning_count() - warn0;
            if (warns)
                res_add(&r, "warnings", (double)warns, 0);
            res_print(&r);
            if (warns) {
                pthread_mutex_lock(&g_log_mu);
                fprintf(stderr, "# %s: %" PRIu64 " library warning(s), first: %s\n", r.id, warns,
                        g_first_warning);
                pthread_mutex_unlock(&g_log_mu);
            }
            double v = res_get(&r, "msgs_per_s");
            if (v > 0 && res_get(&r, "timeout") < 0)
                prim[w][k] = v;
        }
    }

    /* Each ratio: the median over the rounds of that round's ratio. */
    static const int ratios[][2] = { { 1, 0 }, { 2, 0 }, { 6, 2 }, { 6, 1 }, { NW + 1, NW } };
    double *per_round = malloc((size_t)runs * sizeof(double));
    if (!per_round)
        die("malloc");
    for (size_t i = 0; i < sizeof ratios / sizeof ratios[0]; i++) {
        int a = ratios[i][0], b = ratios[i][1], n = 0;
        for (int k = 0; k < runs; k++)
            if (prim[a][k] > 0 && prim[b][k] > 0)
                per_round[n++] = prim[a][k] / prim[b][k];
        if (!n)
            continue;
        qsort(per_round, (size_t)n, sizeof(double), cmp_d);
        double med = n % 2 ? per_round[n / 2] : (per_round[n / 2 - 1] + per_round[n / 2]) / 2;
        char ida[8], idb[8];
        workload_id(a, ida, sizeof ida);
        workload_id(b, idb, sizeof idb);
        printf("R %s/%s=%.2f\n", ida, idb, med);
    }
    free(per_round);
    cluster_cleanup();
    fprintf(stderr, "# total %.1f s\n", secs_since(start));
    for (int w = 0; w < NW + NC; w++)
        free(prim[w]);
    sb_message_type_unref(g_type);
    return 0;
}
