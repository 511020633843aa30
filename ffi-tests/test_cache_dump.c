/*
 * test_cache_dump.c - dumps of a large cache under concurrent updates, and dumps by type
 * (Caches section of API.md: "A dump is a consistent copy"; README "Caches" defines it:
 * each entry read whole, every entry present for the whole dump listed exactly once).
 *
 * One cache, two types. Type A: NS stable ids updated in rounds by one thread (value =
 * round; never cleared) and NC churning ids another thread keeps inserting and clearing;
 * type B: NB ids stored once. Enough entries that a dump walks every shard in several
 * chunks while the updates go on. Each dump of A must list every stable id exactly once,
 * with a value the id held during the dump, no churning id twice, and nothing of B; each
 * dump of B exactly the B entries; a dump of every type both, without duplicates.
 */
#include "test_util.h"

#define NS 6000
#define NC 2000
#define NB 3000

typedef struct item {
    int type; /* 0: A, 1: B */
    int idx;
    char id[16];
    long value;
} item;

static sb_message_type *ta, *tb;
static atomic_int created, destroyed;
static atomic_long upd_started, upd_done; /* updater's round in progress, last finished */
static atomic_int stop;
static atomic_int dumps; /* dumps the main thread has finished */
static int rounds;

static void item_free(void *p)
{
    atomic_fetch_add(&destroyed, 1);
    free(p);
}

static sb_message *make(int type, char kind, int idx, long value)
{
    item *it = calloc(1, sizeof *it);
    it->type = type;
    it->idx = idx;
    it->value = value;
    snprintf(it->id, sizeof it->id, "%c%05d", kind, idx);
    sb_message *m = sb_message_create(type == 0 ? ta : tb, it, item_free);
    if (m == NULL)
        free(it);
    else
        atomic_fetch_add(&created, 1);
    return m;
}

static const char *item_id(sb_message *msg)
{
    sb_message_type *t = sb_message_get_type(msg);
    if (t != ta && t != tb)
        return NULL;
    return ((item *)sb_message_data(msg))->id;
}

static void publish_new(sb_topic *t, int type, char kind, int idx, long value)
{
    sb_message *m = make(type, kind, idx, value);
    sb_publish(t, m);
    sb_message_unref(m);
}

static void *updater_main(void *p)
{
    sb_topic *t = p;
    for (long g = 2; g <= rounds; g++) {
        /* Paced by the dumps, so that a slow dumper (valgrind, a loaded machine) still
         * overlaps every round, twice; bounded, so a stuck dumper fails the count below
         * instead of hanging the test. */
        double end = tu_now_s() + tu_wait_seconds();
        while (atomic_load(&dumps) < 2 * (g - 1) && tu_now_s() < end)
            tu_sleep_ms(1);
        atomic_store(&upd_started, g);
        for (int i = 0; i < NS; i++)
            publish_new(t, 0, 's', i, g);
        atomic_store(&upd_done, g);
    }
    return NULL;
}

/* Inserts every churning id, then clears them in the same order. The index reuses freed
 * positions last-freed first, and the churning ids' first positions were interleaved
 * with the stable ids' (see main), so each round puts the churning ids at one another's
 * old positions, all over the index: some behind a dump's walk, some ahead of it. */
static void *churn_main(void *p)
{
    sb_topic *t = p;
    static sb_message *all[NC];
    for (int n = 0; !atomic_load(&stop); n++) {
        for (int i = 0; i < NC; i++) {
            all[i] = make(0, 'c', i, n);
            sb_publish(t, all[i]);
        }
        for (int i = 0; i < NC; i++) {
            sb_message *clr = sb_cache_clear_create(all[i]);
            sb_publish(t, clr);
            sb_message_unref(clr);
            sb_message_unref(all[i]);
        }
    }
    return NULL;
}

/* findings */
static int bad_item, duplicates, stale, missing, wrong_type, b_count_bad;

/* Checks a dump's list: want_a / want_b say which types it may hold; done / started
 * bound the stable ids' values (see test_cache_concurrency.c). */
static void check_dump(sb_message_list *l, int want_a, int want_b, long done, long started)
{
    static unsigned char seen_s[NS], seen_c[NC], seen_b[NB];
    memset(seen_s, 0, sizeof seen_s);
    memset(seen_c, 0, sizeof seen_c);
    memset(seen_b, 0, sizeof seen_b);
    size_t n = sb_message_list_len(l);
    int stable = 0, bs = 0;
    for (size_t i = 0; i < n; i++) {
        sb_message *m = sb_message_list_get(l, i);
        item *it = m ? sb_message_data(m) : NULL;
        if (it == NULL || (sb_message_get_type(m) == ta) != (it->type == 0)) {
            bad_item++;
            continue;
        }
        if ((it->type == 0 && !want_a) || (it->type == 1 && !want_b)) {
            wrong_type++;
            continue;
        }
        if (it->type == 1) {
            duplicates += seen_b[it->idx]++ != 0;
            bs++;
        } else if (it->id[0] == 'c') {
            duplicates += seen_c[it->idx]++ != 0;
        } else {
            duplicates += seen_s[it->idx]++ != 0;
            stable++;
            if (it->value < done || it->value > started)
                stale++;
        }
    }
    if (want_a)
        missing += NS - stable > 0 ? NS - stable : 0;
    if (want_b && bs != NB)
        b_count_bad++;
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("cd.a", NULL, &ta), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("cd.b", NULL, &tb), SB_OK);
    sb_cache *cache = sb_cache_create(item_id);
    sb_topic *t1 = sb_topic_create("cd.stable"), *t2 = sb_topic_create("cd.churn");
    sb_caching_topic *c1 = sb_caching_topic_create(t1, cache);
    sb_caching_topic *c2 = sb_caching_topic_create(t2, cache);
    CHECK(c1 != NULL && c2 != NULL);
    rounds = tu_scale(30, 4);

    /* round 1 of the stable ids, and B, before any dump */
    sb_message *first[NC];
    for (int i = 0; i < NS; i++) {
        publish_new(t1, 0, 's', i, 1);
        if (i % (NS / NC) == 0 && i / (NS / NC) < NC) { /* interleaved churning ids */
            first[i / (NS / NC)] = make(0, 'c', i / (NS / NC), 0);
            sb_publish(t2, first[i / (NS / NC)]);
        }
    }
    for (int i = 0; i < NC; i++) {
        sb_message *clr = sb_cache_clear_create(first[i]);
        sb_publish(t2, clr);
        sb_message_unref(clr);
        sb_message_unref(first[i]);
    }
    for (int i = 0; i < NB; i++)
        publish_new(t1, 1, 'b', i, 1);
    atomic_store(&upd_started, 1);
    atomic_store(&upd_done, 1);

    /* per type, at rest */
    sb_message_list *l = sb_cache_dump(cache, ta);
    CHECK_EQ_INT((int)sb_message_list_len(l), NS);
    check_dump(l, 1, 0, 1, 1);
    sb_message_list_free(l);
    l = sb_cache_dump(cache, tb);
    CHECK_EQ_INT((int)sb_message_list_len(l), NB);
    check_dump(l, 0, 1, 1, 1);
    sb_message_list_free(l);
    l = sb_cache_dump(cache, NULL);
    CHECK_EQ_INT((int)sb_message_list_len(l), NS + NB);
    sb_message_list_free(l);

    pthread_t up, ch;
    pthread_create(&up, NULL, updater_main, t1);
    pthread_create(&ch, NULL, churn_main, t2);
    while (atomic_load(&upd_done) < rounds) {
        long done = atomic_load(&upd_done);
        int which = atomic_load(&dumps) % 4;
        sb_message_list *d = which == 0   ? sb_cache_dump(cache, ta)
                             : which == 1 ? sb_cache_dump(cache, tb)
                             : which == 2 ? sb_cache_dump(cache, NULL)
                                          : sb_cache_dump_all(cache, ta);
        long started = atomic_load(&upd_started);
        CHECK(d != NULL);
        check_dump(d, which != 1, which == 1 || which == 2, done, started);
        sb_message_list_free(d);
        atomic_fetch_add(&dumps, 1);
    }
    atomic_store(&stop, 1);
    pthread_join(up, NULL);
    pthread_join(ch, NULL);
    printf("%d dumps during %d rounds\n", atomic_load(&dumps), rounds);
    CHECK(atomic_load(&dumps) >= 2 * (rounds - 1));
    CHECK_EQ_INT(bad_item, 0);
    CHECK_EQ_INT(wrong_type, 0);
    CHECK_EQ_INT(duplicates, 0);
    CHECK_EQ_INT(stale, 0);
    CHECK_EQ_INT(missing, 0);
    CHECK_EQ_INT(b_count_bad, 0);

    /* at rest again: the last round of A, every B, no churning id */
    l = sb_cache_dump(cache, ta);
    CHECK_EQ_INT((int)sb_message_list_len(l), NS);
    check_dump(l, 1, 0, rounds, rounds);
    sb_message_list_free(l);
    CHECK_EQ_INT(stale, 0);
    CHECK_EQ_INT(missing, 0);

    c1 = sb_caching_unsubscribe_and_join(c1);
    c2 = sb_caching_unsubscribe_and_join(c2);
    sb_cache_unref(cache);
    sb_topic_unref(t1);
    sb_topic_unref(t2);
    CHECK_EQ_INT(atomic_load(&destroyed), atomic_load(&created));
    sb_message_type_unref(ta);
    sb_message_type_unref(tb);
    return TEST_DONE();
}
