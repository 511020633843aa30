/*
 * test_cache_concurrency.c - "Gets and dumps run concurrently with updates" and "A dump is
 * a consistent copy" (Caches section of API.md).
 *
 * One cache with aggregates, shared by two caching topics. Two publisher threads:
 *  - P0 publishes LOCAL snapshots to topic 1, in rounds: ids 0..K-1 in order, value = round
 *    number (never cleared). A dump that starts after round d finished and ends before
 *    round s+1 starts holds, for each id, a value in [d, s], and every id once d >= 1;
 *  - P1 publishes REMOTE snapshots (one foreign eid) to topic 2, same rounds, and clears
 *    the odd ids every third round.
 * Four query threads meanwhile call get / get_by_eid (local, remote, NULL = aggregate) /
 * get_all / dump / dump_by_eid (local, remote, NULL) / dump_all and check that every
 * returned message is a well-formed snapshot of the requested type, id and eid, that lists
 * have no duplicate (id, eid), stay within bounds, and that local values seen by one
 * thread never go backwards, and that dumps are consistent copies as the README defines
 * them (each entry read whole, every entry present for the whole dump listed). Two pool subscribers check every cache update. At the end
 * the cache holds exactly the last round, every aggregate equals the sum of its snapshots
 * (no stale aggregate was installed), and every message is destroyed exactly once.
 */
#include <sched.h>
#include "test_util.h"

#define K 16
#define SNAP_MAGIC 0x534e4150u
#define AGG_MAGIC 0x41474752u

typedef struct snap {
    unsigned magic;
    int idx;   /* id index 0..K-1 */
    char id[8];
    long value; /* snapshot: the round; aggregate: lv + rv */
    long lv, rv; /* aggregate: components (-1: absent) */
} snap_t;

static sb_message_type *stype;
static sb_eid local_eid, remote_eid;
static atomic_int created, destroyed;
static atomic_int calc_calls, calc_bad, publish_calls;

/* query-side findings */
static atomic_int bad_msg;        /* malformed message, wrong type / id / eid */
static atomic_int bad_list;       /* duplicates, out of bounds, bad list_get */
static atomic_int inconsistent;   /* a dump that is no point-in-time copy of P0's state */
static atomic_int went_back;      /* a local value seen going backwards by one thread */
static atomic_int bad_update;     /* malformed cache update */
static atomic_int queries;

static void snap_dtor(void *p)
{
    ((snap_t *)p)->magic = 0xdeadu;
    atomic_fetch_add(&destroyed, 1);
    free(p);
}

static sb_message *make(int idx, long value, long lv, long rv, const sb_eid *eid, int agg)
{
    snap_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->magic = agg ? AGG_MAGIC : SNAP_MAGIC;
    s->idx = idx;
    snprintf(s->id, sizeof s->id, "id%02d", idx);
    s->value = value;
    s->lv = lv;
    s->rv = rv;
    sb_message *m = agg ? sb_message_create_full(stype, s, snap_dtor, NULL)
                  : eid == NULL ? sb_message_create(stype, s, snap_dtor)
                                : sb_message_create_full(stype, s, snap_dtor, eid);
    if (m == NULL) {
        free(s);
        return NULL;
    }
    atomic_fetch_add(&created, 1);
    return m;
}

static const char *cc_id(sb_message *msg)
{
    if (sb_message_get_type(msg) != stype)
        return NULL;
    snap_t *s = sb_message_data(msg);
    if (s == NULL || (s->magic != SNAP_MAGIC && s->magic != AGG_MAGIC))
        return NULL;
    return s->id;
}

static atomic_int calc_foreign_new; /* calc got a new_snapshot its entry does not hold */

static sb_message *cc_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    atomic_fetch_add(&calc_calls, 1);
    /* the snapshot just stored is one of the entry's (another update may have replaced
     * it since, but then calc runs on the entry that was changed, not a later one) */
    if (new_snapshot != NULL && new_snapshot != sb_cache_entry_get_local(entry) &&
        new_snapshot != sb_cache_entry_get_remote(entry, 0))
        atomic_fetch_add(&calc_foreign_new, 1);
    long lv = -1, rv = -1;
    int idx = -1;
    sb_message *l = sb_cache_entry_get_local(entry);
    if (l != NULL) {
        snap_t *s = sb_message_data(l);
        if (s == NULL || s->magic != SNAP_MAGIC)
            atomic_fetch_add(&calc_bad, 1);
        else {
            lv = s->value;
            idx = s->idx;
        }
    }
    sb_message *r = sb_cache_entry_get_remote(entry, 0);
    if (r != NULL) {
        snap_t *s = sb_message_data(r);
        if (s == NULL || s->magic != SNAP_MAGIC)
            atomic_fetch_add(&calc_bad, 1);
        else {
            rv = s->value;
            if (idx >= 0 && idx != s->idx)
                atomic_fetch_add(&calc_bad, 1);
            idx = s->idx;
        }
    }
    if (sb_cache_entry_get_remote(entry, 1) != NULL) /* one foreign eid only */
        atomic_fetch_add(&calc_bad, 1);
    if (idx < 0)
        return NULL;
    long sum = (lv > 0 ? lv : 0) + (rv > 0 ? rv : 0);
    sb_message *cur = sb_cache_entry_get_aggregate(entry);
    if (cur != NULL) {
        snap_t *c = sb_message_data(cur);
        if (c != NULL && c->lv == lv && c->rv == rv)
            return sb_message_ref(cur);
    }
    return make(idx, sum, lv, rv, NULL, 1);
}

static void cc_publish(sb_topic *topic, sb_message *aggregate)
{
    (void)topic;
    (void)aggregate;
    atomic_fetch_add(&publish_calls, 1);
}

/* ---- well-formedness ---- */

/* want_eid: 0 local, 1 remote, 2 aggregate; want_idx -1: any */
static int check_msg(sb_message *m, int want_eid, int want_idx)
{
    if (m == NULL || sb_message_get_type(m) != stype)
        return 0;
    const snap_t *s = sb_message_data(m);
    if (s == NULL || s->idx < 0 || s->idx >= K || (want_idx >= 0 && s->idx != want_idx))
        return 0;
    char id[8];
    snprintf(id, sizeof id, "id%02d", s->idx);
    if (strcmp(id, s->id) != 0)
        return 0;
    const sb_eid *e = sb_message_eid(m);
    switch (want_eid) {
    case 0:
        return s->magic == SNAP_MAGIC && e != NULL && sb_eid_cmp(e, &local_eid) == 0 &&
               s->value >= 1;
    case 1:
        return s->magic == SNAP_MAGIC && e != NULL && sb_eid_cmp(e, &remote_eid) == 0 &&
               s->value >= 1;
    default:
        return s->magic == AGG_MAGIC && e == NULL &&
               s->value == (s->lv > 0 ? s->lv : 0) + (s->rv > 0 ? s->rv : 0) &&
               (s->lv > 0 || s->rv > 0);
    }
}

static int eid_kind(sb_message *m)
{
    const sb_eid *e = sb_message_eid(m);
    if (e == NULL)
        return 2;
    return sb_eid_cmp(e, &local_eid) == 0 ? 0 : 1;
}

/* Checks a list: every element well-formed (kind -1: local or remote), no duplicate
 * (id, eid), at most `max` elements. Fills local_vals[idx] with the local values (0 when
 * absent) when local_vals is not NULL. */
static void check_list(sb_message_list *l, int kind, size_t max, long *local_vals)
{
    if (l == NULL) {
        atomic_fetch_add(&bad_list, 1);
        return;
    }
    int seen[3][K];
    memset(seen, 0, sizeof seen);
    if (local_vals != NULL)
        memset(local_vals, 0, K * sizeof *local_vals);
    size_t n = sb_message_list_len(l);
    if (n > max)
        atomic_fetch_add(&bad_list, 1);
    for (size_t i = 0; i < n; i++) {
        sb_message *m = sb_message_list_get(l, i);
        int k = m != NULL ? eid_kind(m) : -1;
        if (m == NULL || (kind >= 0 && k != kind) || (kind < 0 && k == 2) ||
            !check_msg(m, k, -1)) {
            atomic_fetch_add(&bad_msg, 1);
            continue;
        }
        const snap_t *s = sb_message_data(m);
        if (seen[k][s->idx]++)
            atomic_fetch_add(&bad_list, 1);
        if (k == 0 && local_vals != NULL)
            local_vals[s->idx] = s->value;
    }
    if (sb_message_list_get(l, n) != NULL)
        atomic_fetch_add(&bad_list, 1);
}

/* The local snapshots of a consistent copy (README, "Caches"): each entry's snapshot is
 * one it held during the dump, and every entry present for the whole dump is there.
 * P0 had finished round `done` when the dump started and had not gone past round
 * `started` when it ended: every id present holds a value in [done, started], and once
 * the first round is done every id is present (local snapshots are never cleared). */
static int consistent_copy(const long *v, long done, long started)
{
    for (int i = 0; i < K; i++) {
        if (v[i] == 0) {
            if (done >= 1)
                return 0; /* present for the whole dump, missing from it */
            continue;
        }
        if (v[i] < done || v[i] > started)
            return 0; /* not a value the id held during the dump */
    }
    return 1;
}

/* the first inconsistent copy seen, printed as a diagnostic */
static pthread_mutex_t example_mu = PTHREAD_MUTEX_INITIALIZER;
static long example[K];
static const char *example_what;

static void note_inconsistent(const long *v, const char *what)
{
    atomic_fetch_add(&inconsistent, 1);
    pthread_mutex_lock(&example_mu);
    if (example_what == NULL) {
        memcpy(example, v, sizeof example);
        example_what = what;
    }
    pthread_mutex_unlock(&example_mu);
}

/* ---- threads ---- */

typedef struct ctx {
    sb_cache *cache;
    sb_topic *t1, *t2;
    int rounds;
    atomic_long p0_started, p0_done; /* P0's round in progress, last round finished */
    atomic_int stop;
    atomic_int publishers_done;
} ctx_t;

static void *p0_main(void *arg)
{
    ctx_t *c = arg;
    for (int g = 1; g <= c->rounds; g++) {
        atomic_store(&c->p0_started, g);
        for (int i = 0; i < K; i++) {
            sb_message *m = make(i, g, 0, 0, NULL, 0);
            sb_publish(c->t1, m);
            sb_message_unref(m);
        }
        atomic_store(&c->p0_done, g);
    }
    atomic_fetch_add(&c->publishers_done, 1);
    return NULL;
}

static void *p1_main(void *arg)
{
    ctx_t *c = arg;
    sb_message *last[K] = {NULL};
    for (int g = 1; g <= c->rounds; g++) {
        for (int i = 0; i < K; i++) {
            sb_message *m = make(i, g, 0, 0, &remote_eid, 0);
            sb_publish(c->t2, m);
            sb_message_unref(last[i]);
            last[i] = m;
        }
        if (g % 3 == 0 && g < c->rounds) {
            for (int i = 1; i < K; i += 2) {
                sb_message *clr = sb_cache_clear_create(last[i]);
                sb_publish(c->t2, clr);
                sb_message_unref(clr);
            }
        }
    }
    for (int i = 0; i < K; i++)
        sb_message_unref(last[i]);
    atomic_fetch_add(&c->publishers_done, 1);
    return NULL;
}

static void *query_main(void *arg)
{
    ctx_t *c = arg;
    long last_local[K] = {0};
    long vals[K];
    char id[8];
    int iter = 0;
    /* run while the publishers run, and at least a few rounds after */
    int tail = 3;
    while (tail > 0) {
        if (atomic_load(&c->publishers_done) == 2)
            tail--;
        int i = iter % K;
        snprintf(id, sizeof id, "id%02d", i);
        switch (iter % 9) {
        case 0: {
            sb_message *m = sb_cache_get(c->cache, stype, id);
            if (m != NULL) {
                if (!check_msg(m, 0, i))
                    atomic_fetch_add(&bad_msg, 1);
                else {
                    long v = ((const snap_t *)sb_message_data(m))->value;
                    if (v < last_local[i])
                        atomic_fetch_add(&went_back, 1);
                    last_local[i] = v;
                }
            }
            sb_message_unref(m);
            break;
        }
        case 1: {
            sb_message *m = sb_cache_get_by_eid(c->cache, stype, id, &remote_eid);
            if (m != NULL && !check_msg(m, 1, i))
                atomic_fetch_add(&bad_msg, 1);
            sb_message_unref(m);
            m = sb_cache_get_by_eid(c->cache, stype, id, &local_eid);
            if (m != NULL && !check_msg(m, 0, i))
                atomic_fetch_add(&bad_msg, 1);
            sb_message_unref(m);
            break;
        }
        case 2: {
            sb_message *m = sb_cache_get_by_eid(c->cache, stype, id, NULL);
            if (m != NULL && !check_msg(m, 2, i))
                atomic_fetch_add(&bad_msg, 1);
            sb_message_unref(m);
            break;
        }
        case 3: {
            sb_message_list *l = sb_cache_get_all(c->cache, stype, id);
            check_list(l, -1, 2, NULL);
            size_t n = sb_message_list_len(l);
            for (size_t k = 0; k < n; k++) {
                sb_message *m = sb_message_list_get(l, k);
                if (m != NULL && ((const snap_t *)sb_message_data(m))->idx != i)
                    atomic_fetch_add(&bad_msg, 1);
            }
            sb_message_list_free(l);
            break;
        }
        case 4: {
            long done = atomic_load(&c->p0_done);
            sb_message_list *l = sb_cache_dump(c->cache, stype);
            long started = atomic_load(&c->p0_started);
            check_list(l, 0, K, vals);
            if (l != NULL && !consistent_copy(vals, done, started))
                note_inconsistent(vals, "sb_cache_dump(cache, type)");
            sb_message_list_free(l);
            break;
        }
        case 5: {
            sb_message_list *l = sb_cache_dump_by_eid(c->cache, stype, &remote_eid);
            check_list(l, 1, K, NULL);
            sb_message_list_free(l);
            long done = atomic_load(&c->p0_done);
            l = sb_cache_dump_by_eid(c->cache, stype, &local_eid);
            long started = atomic_load(&c->p0_started);
            check_list(l, 0, K, vals);
            if (l != NULL && !consistent_copy(vals, done, started))
                note_inconsistent(vals, "sb_cache_dump_by_eid(cache, type, local eid)");
            sb_message_list_free(l);
            break;
        }
        case 6: {
            sb_message_list *l = sb_cache_dump_by_eid(c->cache, stype, NULL);
            check_list(l, 2, K, NULL);
            sb_message_list_free(l);
            break;
        }
        case 7: {
            long done = atomic_load(&c->p0_done);
            sb_message_list *l = sb_cache_dump_all(c->cache, stype);
            long started = atomic_load(&c->p0_started);
            check_list(l, -1, 2 * K, vals);
            if (l != NULL && !consistent_copy(vals, done, started))
                note_inconsistent(vals, "sb_cache_dump_all(cache, type)");
            sb_message_list_free(l);
            break;
        }
        case 8: {
            long done = atomic_load(&c->p0_done);
            sb_message_list *l = sb_cache_dump(c->cache, NULL);
            long started = atomic_load(&c->p0_started);
            check_list(l, 0, K, vals);
            if (l != NULL && !consistent_copy(vals, done, started))
                note_inconsistent(vals, "sb_cache_dump(cache, NULL)");
            sb_message_list_free(l);
            break;
        }
        }
        iter++;
        atomic_fetch_add(&queries, 1);
    }
    return NULL;
}

/* ---- update checkers (pool subscriptions on the caching topics) ---- */

static atomic_int updates_seen;

static void update_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    sb_message_type *t = sb_message_get_type(msg);
    if (t == sb_subscription_change_type())
        return;
    if (t != sb_cache_update_type()) {
        atomic_fetch_add(&bad_update, 1);
        return;
    }
    const sb_cache_update *u = sb_message_data(msg);
    if (u == NULL || u->type != stype || (u->old_snapshot == NULL && u->new_snapshot == NULL)) {
        atomic_fetch_add(&bad_update, 1);
        return;
    }
    sb_message *s = u->new_snapshot != NULL ? u->new_snapshot : u->old_snapshot;
    int k = eid_kind(s);
    if (!check_msg(s, k, -1) ||
        (u->old_snapshot != NULL && u->new_snapshot != NULL &&
         (eid_kind(u->old_snapshot) != k ||
          ((const snap_t *)sb_message_data(u->old_snapshot))->idx !=
              ((const snap_t *)sb_message_data(u->new_snapshot))->idx)))
        atomic_fetch_add(&bad_update, 1);
    atomic_fetch_add(&updates_seen, 1);
}

/* ---- one object updated through two caching topics at once, with a slow calc ----
 * Two threads publish local snapshots of the same object to the two originals of one
 * cache; calc yields a few times, so updates overlap while it runs. calc must only ever
 * be handed a new_snapshot that its entry holds, and the aggregate left at the end must
 * be computed from the snapshot left at the end. */
static sb_message_type *race_type, *race_agg_type;
static atomic_int race_calls, race_foreign_new;

static const char *race_id(sb_message *msg)
{
    return sb_message_get_type(msg) == race_type ? "obj" : NULL;
}

static sb_message *race_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    atomic_fetch_add(&race_calls, 1);
    sb_message *l = sb_cache_entry_get_local(entry);
    if (new_snapshot != NULL && new_snapshot != l)
        atomic_fetch_add(&race_foreign_new, 1);
    for (int i = 0; i < 20; i++)
        sched_yield();
    if (l == NULL)
        return NULL;
    long v = *(const long *)sb_message_data(l);
    sb_message *cur = sb_cache_entry_get_aggregate(entry);
    if (cur != NULL && *(const long *)sb_message_data(cur) == v)
        return sb_message_ref(cur); /* unchanged */
    long *a = malloc(sizeof *a);
    *a = v;
    return sb_message_create_full(race_agg_type, a, free, NULL);
}

static void race_publish(sb_topic *topic, sb_message *aggregate)
{
    (void)topic;
    (void)aggregate;
}

typedef struct race_arg {
    sb_topic *t;
    long base;
    int n;
} race_arg;

static void *race_main(void *p)
{
    race_arg *a = p;
    for (int i = 0; i < a->n; i++) {
        long *v = malloc(sizeof *v);
        *v = a->base + i;
        sb_message *m = sb_message_create(race_type, v, free);
        sb_publish(a->t, m);
        sb_message_unref(m);
    }
    return NULL;
}

static void test_same_object_two_topics(void)
{
    CHECK_EQ_INT(sb_message_type_create("cc.race", NULL, &race_type), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("cc.race.agg", NULL, &race_agg_type), SB_OK);
    sb_topic *o1 = sb_topic_create("cc.race.o1"), *o2 = sb_topic_create("cc.race.o2");
    sb_cache *cache = sb_cache_create_full(race_id, race_calc, race_publish);
    sb_caching_topic *c1 = sb_caching_topic_create(o1, cache);
    sb_caching_topic *c2 = sb_caching_topic_create(o2, cache);
    CHECK(c1 != NULL && c2 != NULL);
    int rounds = tu_scale(300, 20), stale = 0;
    for (int r = 0; r < rounds; r++) {
        race_arg a1 = {o1, 1000000L * (2 * r + 1), 3}, a2 = {o2, 1000000L * (2 * r + 2), 3};
        pthread_t t1, t2;
        pthread_create(&t1, NULL, race_main, &a1);
        pthread_create(&t2, NULL, race_main, &a2);
        pthread_join(t1, NULL);
        pthread_join(t2, NULL);
        sb_message *local = sb_cache_get(cache, race_type, "obj");
        sb_message *agg = sb_cache_get_by_eid(cache, race_type, "obj", NULL);
        if (local == NULL || agg == NULL ||
            *(const long *)sb_message_data(local) != *(const long *)sb_message_data(agg))
            stale++;
        sb_message_unref(local);
        sb_message_unref(agg);
    }
    CHECK(atomic_load(&race_calls) >= 6 * rounds);
    CHECK_EQ_INT(atomic_load(&race_foreign_new), 0);
    CHECK_EQ_INT(stale, 0);
    sb_caching_unsubscribe_and_join(c1);
    sb_caching_unsubscribe_and_join(c2);
    sb_cache_unref(cache);
    sb_topic_unref(o1);
    sb_topic_unref(o2);
    sb_message_type_unref(race_type);
    sb_message_type_unref(race_agg_type);
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("cc.snap", NULL, &stype), SB_OK);
    local_eid = sb_eid_default();
    memset(&remote_eid, 0, sizeof remote_eid);
    remote_eid.bytes[0] = 0x02;
    remote_eid.bytes[5] = 0x77;
    if (sb_eid_cmp(&remote_eid, &local_eid) == 0)
        remote_eid.bytes[4] = 0x55;

    ctx_t c;
    memset(&c, 0, sizeof c);
    c.cache = sb_cache_create_full(cc_id, cc_calc, cc_publish);
    c.t1 = sb_topic_create("cc.orig1");
    c.t2 = sb_topic_create("cc.orig2");
    c.rounds = tu_scale(1000, 40);
    sb_caching_topic *ct1 = sb_caching_topic_create(c.t1, c.cache);
    sb_caching_topic *ct2 = sb_caching_topic_create(c.t2, c.cache);
    CHECK(c.cache != NULL && ct1 != NULL && ct2 != NULL);
    if (c.cache == NULL || ct1 == NULL || ct2 == NULL)
        return TEST_DONE();
    sb_subscription *u1 = sb_subscribe_pool(sb_caching_get_topic(ct1), update_cb, NULL);
    sb_subscription *u2 = sb_subscribe_pool(sb_caching_get_topic(ct2), update_cb, NULL);

    pthread_t q[4], p0, p1;
    double t0 = tu_now_s();
    for (int i = 0; i < 4; i++)
        pthread_create(&q[i], NULL, query_main, &c);
    pthread_create(&p0, NULL, p0_main, &c);
    pthread_create(&p1, NULL, p1_main, &c);
    pthread_join(p0, NULL);
    pthread_join(p1, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(q[i], NULL);
    if (getenv("SB_TEST_TIMING") != NULL)
        fprintf(stderr, "%.2f s, %d queries, %d calc calls\n", tu_now_s() - t0,
                atomic_load(&queries), atomic_load(&calc_calls));

    CHECK(atomic_load(&queries) >= 4 * 3);
    CHECK_EQ_INT(atomic_load(&bad_msg), 0);
    CHECK_EQ_INT(atomic_load(&bad_list), 0);
    /* "A dump is a consistent copy": per entry, and complete (README, "Caches") */
    CHECK_EQ_INT(atomic_load(&inconsistent), 0);
    if (example_what != NULL) {
        printf("note: first non-point-in-time copy, from %s; local values by id index:",
               example_what);
        for (int i = 0; i < K; i++)
            printf(" %ld", example[i]);
        printf("\n");
    }
    CHECK_EQ_INT(atomic_load(&went_back), 0);
    CHECK_EQ_INT(atomic_load(&calc_bad), 0);
    CHECK_EQ_INT(atomic_load(&calc_foreign_new), 0);

    /* final state: exactly the last round, and every aggregate is current */
    int G = c.rounds;
    int clears = 0;
    for (int g = 3; g < G; g += 3)
        clears += K / 2;
    int puts = 2 * G * K;
    CHECK(atomic_load(&calc_calls) >= puts + clears); /* at least once per change */
    CHECK(atomic_load(&publish_calls) >= 1);
    CHECK(atomic_load(&publish_calls) <= puts + clears);
    sb_message_list *l = sb_cache_dump(c.cache, stype);
    CHECK_EQ_INT(sb_message_list_len(l), K);
    for (size_t i = 0; i < sb_message_list_len(l); i++)
        CHECK_EQ_INT(((const snap_t *)sb_message_data(sb_message_list_get(l, i)))->value, G);
    sb_message_list_free(l);
    l = sb_cache_dump_by_eid(c.cache, stype, &remote_eid);
    CHECK_EQ_INT(sb_message_list_len(l), K);
    sb_message_list_free(l);
    CHECK_EQ_INT(sb_message_list_len(l = sb_cache_dump_all(c.cache, stype)), 2 * K);
    sb_message_list_free(l);
    l = sb_cache_dump_by_eid(c.cache, stype, NULL);
    CHECK_EQ_INT(sb_message_list_len(l), K);
    int stale = 0;
    for (size_t i = 0; i < sb_message_list_len(l); i++) {
        const snap_t *a = sb_message_data(sb_message_list_get(l, i));
        if (a->lv != G || a->rv != G || a->value != 2L * G)
            stale++;
    }
    CHECK_EQ_INT(stale, 0);
    sb_message_list_free(l);

    u1 = sb_unsubscribe_and_join(u1);
    u2 = sb_unsubscribe_and_join(u2);
    CHECK(atomic_load(&updates_seen) >= puts + clears);
    CHECK_EQ_INT(atomic_load(&bad_update), 0);
    ct1 = sb_caching_unsubscribe_and_join(ct1);
    ct2 = sb_caching_unsubscribe_and_join(ct2);
    sb_cache_unref(c.cache);
    sb_topic_unref(c.t1);
    sb_topic_unref(c.t2);
    WAIT_UNTIL(atomic_load(&destroyed) == atomic_load(&created));
    CHECK_EQ_INT(atomic_load(&destroyed), atomic_load(&created));
    sb_message_type_unref(stype);
    test_same_object_two_topics();
    return TEST_DONE();
}
