/*
 * test_cache_aggregate_order.c - aggregates are published in the order they are installed
 * (Caches section of API.md: "when it changes, publish(original, aggregate) is called").
 *
 * One cache with aggregates, shared by T caching topics (one original topic each). T
 * threads update the same object ("obj"), each with its own eid, so every update changes
 * the aggregate (the sum of every eid's value). The publish function sleeps 20 us (widening the
 * window between the install and the publish) and publishes the aggregate to one topic,
 * where a dedicated subscriber keeps the last one it received. After each round, once
 * every publish has been received, the last aggregate received must be the one the cache
 * holds: two updaters never publish their aggregates in the opposite order of installing
 * them.
 */
#include <time.h>
#include "test_util.h"

#define T 4
#define PER_ROUND 20

static sb_message_type *stype, *atype;
static sb_topic *aggs;
static atomic_long published, received;
static sb_message *_Atomic last_received;

static void long_free(void *p) { free(p); }

static sb_message *make(sb_message_type *ty, long v, const sb_eid *eid)
{
    long *p = malloc(sizeof *p);
    *p = v;
    sb_message *m = sb_message_create_full(ty, p, long_free, eid);
    if (m == NULL)
        free(p);
    return m;
}

static long value_of(sb_message *m) { return *(const long *)sb_message_data(m); }

static const char *obj_id(sb_message *msg)
{
    return sb_message_get_type(msg) == stype ? "obj" : NULL;
}

/* the sum of every eid's value: a new aggregate on every change */
static sb_message *sum_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    (void)new_snapshot;
    long sum = 0;
    sb_message *m = sb_cache_entry_get_local(entry);
    if (m != NULL)
        sum += value_of(m);
    for (size_t i = 0; (m = sb_cache_entry_get_remote(entry, i)) != NULL; i++)
        sum += value_of(m);
    return make(atype, sum, NULL);
}

static void yield_then_publish(sb_topic *topic, sb_message *aggregate)
{
    (void)topic;
    struct timespec pause = {0, 20000};
    nanosleep(&pause, NULL);
    atomic_fetch_add(&published, 1);
    sb_publish(aggs, aggregate);
}

static void on_aggregate(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != atype)
        return;
    sb_message *old = atomic_exchange(&last_received, sb_message_ref(msg));
    sb_message_unref(old);
    atomic_fetch_add(&received, 1);
}

typedef struct updater {
    sb_topic *original;
    sb_eid eid;
    long base;
} updater;

static void *updater_main(void *p)
{
    updater *u = p;
    for (int i = 0; i < PER_ROUND; i++) {
        sb_message *m = make(stype, u->base + i, &u->eid);
        sb_publish(u->original, m);
        sb_message_unref(m);
    }
    return NULL;
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("ao.snap", NULL, &stype), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("ao.agg", NULL, &atype), SB_OK);
    aggs = sb_topic_create("ao.aggregates");
    sb_subscription *sub = sb_subscribe(aggs, on_aggregate, NULL);
    sb_cache *cache = sb_cache_create_full(obj_id, sum_calc, yield_then_publish);
    CHECK(aggs != NULL && sub != NULL && cache != NULL);

    updater u[T];
    sb_caching_topic *ct[T];
    for (int i = 0; i < T; i++) {
        char name[32];
        snprintf(name, sizeof name, "ao.original.%d", i);
        u[i].original = sb_topic_create(name);
        ct[i] = sb_caching_topic_create(u[i].original, cache);
        CHECK(ct[i] != NULL);
        /* thread 0 is the local node, the others remote nodes */
        u[i].eid = sb_eid_default();
        if (i > 0) {
            u[i].eid.bytes[0] ^= 0x02;
            u[i].eid.bytes[5] = (unsigned char)(0x40 + i);
        }
    }

    int rounds = tu_scale(200, 20), mismatches = 0, incomplete = 0;
    for (int r = 0; r < rounds; r++) {
        pthread_t th[T];
        for (int i = 0; i < T; i++) {
            u[i].base = 1000L * (r * T + i);
            pthread_create(&th[i], NULL, updater_main, &u[i]);
        }
        for (int i = 0; i < T; i++)
            pthread_join(th[i], NULL);
        WAIT_UNTIL(atomic_load(&received) == atomic_load(&published));
        if (!tu_last_wait_ok()) {
            incomplete++;
            break;
        }
        sb_message *cached = sb_cache_get_by_eid(cache, stype, "obj", NULL);
        sb_message *last = atomic_load(&last_received);
        if (cached == NULL || last != cached) {
            if (mismatches == 0 && cached != NULL && last != NULL)
                printf("note: round %d: last aggregate received %ld, cached %ld\n", r,
                       value_of(last), value_of(cached));
            mismatches++;
        }
        sb_message_unref(cached);
    }
    printf("%d rounds, %ld aggregates published\n", rounds, atomic_load(&published));
    CHECK_EQ_INT(incomplete, 0);
    CHECK_EQ_INT(mismatches, 0);
    CHECK(atomic_load(&published) >= rounds);

    for (int i = 0; i < T; i++) {
        ct[i] = sb_caching_unsubscribe_and_join(ct[i]);
        sb_topic_unref(u[i].original);
    }
    sub = sb_unsubscribe_and_join(sub);
    sb_message_unref(atomic_exchange(&last_received, NULL));
    sb_cache_unref(cache);
    sb_topic_unref(aggs);
    sb_message_type_unref(stype);
    sb_message_type_unref(atype);
    return TEST_DONE();
}
