/*
 * W11: timed publishing. 100,000 timers (sb_publish_after) are scheduled from one thread
 * with delays spread over 1 s (pseudo-random, 0-999 ms, so the wheel sees them out of
 * order), each carrying a payload whose t_ns is its exact due time (the clock read
 * before scheduling + delay). A synchronous subscription on the topic (it runs on the
 * timer thread, as the firing itself) records how long after its due time each timer was
 * published. The run ends when every timer has fired.
 *
 * Figures: lateness_p50_us, lateness_p99_us, lateness_max_us (a timer is due at the
 * first millisecond tick at or after its due time, so up to 1 ms of each figure is that
 * rounding), ns_per_schedule (the scheduling loop's time per sb_publish_after, messages
 * made beforehand; the timer thread fires the first timers meanwhile on the other core).
 */
#include <stdlib.h>

#include "bench.h"

#define W11_N 100000
#define W11_SPREAD_MS 1000

static uint64_t *w11_late_ns;
static atomic_int w11_seen;
static atomic_int w11_target;
static completion w11_done;

static void w11_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != g_type)
        return;
    const payload *p = sb_message_data(msg);
    uint64_t now = now_ns();
    w11_late_ns[p->seq] = now > p->t_ns ? now - p->t_ns : 0;
    if (atomic_fetch_add(&w11_seen, 1) + 1 == atomic_load(&w11_target))
        completion_arrive(&w11_done);
}

static int cmp_u64(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* Schedules n timers over `spread_ms`; returns the scheduling loop's ns, or 0 if the
 * run timed out. */
static uint64_t w11_round(sb_topic *t, int n, int spread_ms)
{
    sb_message **msgs = malloc(sizeof *msgs * (size_t)n);
    sb_timer **timers = malloc(sizeof *timers * (size_t)n);
    uint64_t *delay = malloc(sizeof *delay * (size_t)n);
    if (!msgs || !timers || !delay)
        exit(2);
    uint32_t x = 2463534242u;
    for (int i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        delay[i] = x % (uint32_t)spread_ms;
        msgs[i] = make_msg((uint64_t)i);
    }
    atomic_store(&w11_seen, 0);
    atomic_store(&w11_target, n);
    completion_reset(&w11_done, 1);
    uint64_t t0 = now_ns();
    for (int i = 0; i < n; i++) {
        payload *p = (payload *)sb_message_data(msgs[i]);
        p->t_ns = now_ns() + delay[i] * 1000000u;
        timers[i] = sb_publish_after(t, msgs[i], delay[i]);
    }
    uint64_t took = now_ns() - t0;
    for (int i = 0; i < n; i++) {
        sb_timer_unref(timers[i]);
        sb_message_unref(msgs[i]);
    }
    int ok = completion_wait(&w11_done, now_ns() + (uint64_t)((g_timeout_s + 1.0) * 1e9));
    free(msgs);
    free(timers);
    free(delay);
    return ok ? (took ? took : 1) : 0;
}

void bench_w11(result *r)
{
    w11_late_ns = calloc(W11_N, sizeof *w11_late_ns);
    if (!w11_late_ns)
        exit(2);
    completion_init(&w11_done);
    sb_topic *t = sb_topic_create("W11");
    sb_subscription *s = sb_subscribe_synchronous(t, w11_cb, NULL);

    /* warm-up: the timer thread started, the wheel's memory touched */
    int ok = w11_round(t, 2000, 20) != 0;
    uint64_t took = ok ? w11_round(t, W11_N, W11_SPREAD_MS) : 0;
    if (took) {
        qsort(w11_late_ns, W11_N, sizeof *w11_late_ns, cmp_u64);
        res_add(r, "lateness_p50_us", (double)w11_late_ns[W11_N / 2] / 1e3, 1);
        res_add(r, "lateness_p99_us", (double)w11_late_ns[W11_N * 99 / 100] / 1e3, 1);
        res_add(r, "lateness_max_us", (double)w11_late_ns[W11_N - 1] / 1e3, 1);
        res_add(r, "ns_per_schedule", (double)took / W11_N, 1);
    } else {
        res_add(r, "timeout", 1, 0);
    }
    sb_unsubscribe_and_join(s);
    sb_topic_unref(t);
    completion_destroy(&w11_done);
    free(w11_late_ns);
}
