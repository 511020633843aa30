/*
 * test_cache.c - "Caches" section of API.md.
 *
 *  - a caching topic keeps its cache current when sb_publish returns (sb_cache_get right
 *    after the publish), and publishes sb_cache_update (type, old, new) on
 *    "<original>-cached"; a clear publishes (old, NULL); a clear of a missing entry
 *    publishes nothing;
 *  - non-cacheable messages (id NULL, aggregates with a NULL eid) are discarded: nothing is
 *    cached and no update is published;
 *  - an Unsubscribe change removes the Subscribe entry cached for it;
 *  - one cache shared by two caching topics;
 *  - sb_caching_accept_message_type / sb_caching_set_filter;
 *  - the eid / aggregate scenario: one local and two remote snapshots of one id, calc run
 *    once per put and clear, publish(original, aggregate) on every aggregate change, the
 *    aggregate update on the caching topic, get / get_by_eid / get_all / dump /
 *    dump_by_eid / dump_all with exact counts; the default aggregate publish (NULL
 *    publish fn: sb_publish to the original topic);
 *  - sb_message_list_len / get / free (lists hold references, out-of-range get);
 *  - NULL arguments of every cache function: NULL / negative and a fresh sb_last_error();
 *  - "module unload": sb_caching_unsubscribe_and_join while another thread publishes; no
 *    module function (id, calc, publish) runs once it returned;
 *  - every snapshot's dtor runs exactly once when everything is released.
 */
#include "test_util.h"

#define SNAP_MAGIC 0x534e4150u /* a snapshot */
#define AGG_MAGIC 0x41474752u  /* an aggregate made by sum_calc */

typedef struct snap {
    unsigned magic;
    char id[32];
    long value;
} snap_t;

static sb_message_type *snap_type;  /* cacheable (id fn returns snap_t.id) */
static sb_message_type *snap2_type; /* cacheable too */
static sb_message_type *other_type; /* never cacheable */
static sb_eid local_eid, r1_eid, r2_eid;

static atomic_int snaps_created;
static atomic_int snaps_destroyed;
static atomic_int id_calls;
static atomic_int id_bad_msg; /* id fn saw a malformed message */

static void snap_dtor(void *p)
{
    snap_t *s = p;
    s->magic = 0xdeadu;
    atomic_fetch_add(&snaps_destroyed, 1);
    free(p);
}

/* eid: &local_eid style pointer, or NULL for an aggregate; use_create: sb_message_create */
static sb_message *make_snap(sb_message_type *type, const char *id, long value,
                             const sb_eid *eid, int use_create, unsigned magic)
{
    snap_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->magic = magic;
    snprintf(s->id, sizeof s->id, "%s", id);
    s->value = value;
    sb_message *m = use_create ? sb_message_create(type, s, snap_dtor)
                               : sb_message_create_full(type, s, snap_dtor, eid);
    if (m == NULL) {
        free(s);
        return NULL;
    }
    atomic_fetch_add(&snaps_created, 1);
    return m;
}

/* a local snapshot (sb_message_create: default eid) */
static sb_message *snap_local(sb_message_type *type, const char *id, long value)
{
    return make_snap(type, id, value, NULL, 1, SNAP_MAGIC);
}

/* a snapshot from `eid` */
static sb_message *snap_eid(sb_message_type *type, const char *id, long value, const sb_eid *eid)
{
    return make_snap(type, id, value, eid, 0, SNAP_MAGIC);
}

/* an aggregate (NULL eid) */
static sb_message *snap_agg(sb_message_type *type, const char *id, long value)
{
    return make_snap(type, id, value, NULL, 0, AGG_MAGIC);
}

static const snap_t *snap_of(sb_message *m)
{
    return m == NULL ? NULL : (const snap_t *)sb_message_data(m);
}

static long value_of(sb_message *m)
{
    const snap_t *s = snap_of(m);
    return s == NULL ? -999999 : s->value;
}

static int is_snap_type(sb_message_type *t)
{
    return t != NULL && (t == snap_type || t == snap2_type);
}

/* The id function: called for every message the caching topic sees, so it checks types. */
static const char *snap_id(sb_message *msg)
{
    atomic_fetch_add(&id_calls, 1);
    if (msg == NULL) {
        atomic_fetch_add(&id_bad_msg, 1);
        return NULL;
    }
    if (!is_snap_type(sb_message_get_type(msg)))
        return NULL;
    snap_t *s = sb_message_data(msg);
    if (s == NULL || (s->magic != SNAP_MAGIC && s->magic != AGG_MAGIC)) {
        atomic_fetch_add(&id_bad_msg, 1);
        return NULL;
    }
    return s->id[0] != '\0' ? s->id : NULL; /* empty id: not cacheable */
}

/* As snap_id, and subscription changes are cached under their subscription's uniqueid. */
static const char *snap_or_change_id(sb_message *msg)
{
    if (msg != NULL && sb_message_get_type(msg) == sb_subscription_change_type()) {
        atomic_fetch_add(&id_calls, 1);
        const sb_subscription_change *c = sb_message_data(msg);
        return c != NULL ? c->uniqueid : NULL;
    }
    return snap_id(msg);
}

/* ---- stale-error detection: sb_last_error() is never cleared, so before each call that
 * must fail we plant a recognizable error and check afterwards that it was replaced ---- */

static void plant_error(void)
{
    sb_eid e;
    (void)sb_eid_from_str("@@stale-marker@@", &e);
}

static int fresh_error(void)
{
    const char *e = sb_last_error();
    return e != NULL && e[0] != '\0' && strstr(e, "@@stale-marker@@") == NULL;
}

#define CHECK_NULL_ERR(expr)                                                            \
    do {                                                                                \
        plant_error();                                                                  \
        CHECK((expr) == NULL);                                                          \
        tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after " #expr); \
    } while (0)

#define CHECK_NEG_ERR(expr)                                                             \
    do {                                                                                \
        plant_error();                                                                  \
        int rc_ = (expr);                                                               \
        tu_check(rc_ < 0, __FILE__, __LINE__, #expr " < 0");                            \
        tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after " #expr); \
    } while (0)

/* ---- an update recorder: a synchronous subscription to a caching topic ---- */

#define MAX_UPD 256

typedef struct upd {
    sb_message_type *type;
    sb_message *old_snapshot; /* own references */
    sb_message *new_snapshot;
} upd_t;

typedef struct updrec {
    pthread_mutex_t mu;
    upd_t u[MAX_UPD];
    int n;
    atomic_int overflow;
    atomic_int others;      /* neither an update nor a subscription change */
    atomic_int bad;         /* malformed update */
    sb_subscription *sub;
} updrec;

static void updrec_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    updrec *r = data;
    (void)sub;
    sb_message_type *t = sb_message_get_type(msg);
    if (t == sb_subscription_change_type())
        return;
    if (t != sb_cache_update_type()) {
        atomic_fetch_add(&r->others, 1);
        return;
    }
    const sb_cache_update *u = sb_message_data(msg);
    if (u == NULL) {
        atomic_fetch_add(&r->bad, 1);
        return;
    }
    pthread_mutex_lock(&r->mu);
    if (r->n < MAX_UPD) {
        r->u[r->n].type = u->type;
        r->u[r->n].old_snapshot = u->old_snapshot ? sb_message_ref(u->old_snapshot) : NULL;
        r->u[r->n].new_snapshot = u->new_snapshot ? sb_message_ref(u->new_snapshot) : NULL;
        r->n++;
    } else {
        atomic_fetch_add(&r->overflow, 1);
    }
    pthread_mutex_unlock(&r->mu);
}

static void updrec_start(updrec *r, sb_topic *caching)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    r->sub = sb_subscribe_synchronous(caching, updrec_cb, r);
    CHECK(r->sub != NULL);
}

static int updrec_count(updrec *r)
{
    pthread_mutex_lock(&r->mu);
    int n = r->n;
    pthread_mutex_unlock(&r->mu);
    return n;
}

/* 1 if an update (type, old, new) is among updates [from, n) (pointer identity). */
static int updrec_has(updrec *r, int from, sb_message_type *type, sb_message *old_s,
                      sb_message *new_s)
{
    int found = 0;
    pthread_mutex_lock(&r->mu);
    for (int i = from; i < r->n && !found; i++)
        found = r->u[i].type == type && r->u[i].old_snapshot == old_s &&
                r->u[i].new_snapshot == new_s;
    pthread_mutex_unlock(&r->mu);
    return found;
}

/* the i-th update (borrowed from the recorder) */
static upd_t updrec_get(updrec *r, int i)
{
    upd_t u = {NULL, NULL, NULL};
    pthread_mutex_lock(&r->mu);
    if (i >= 0 && i < r->n)
        u = r->u[i];
    pthread_mutex_unlock(&r->mu);
    return u;
}

static void updrec_stop(updrec *r)
{
    r->sub = sb_unsubscribe_and_join(r->sub);
    CHECK_EQ_INT(atomic_load(&r->overflow), 0);
    CHECK_EQ_INT(atomic_load(&r->bad), 0);
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n; i++) {
        sb_message_unref(r->u[i].old_snapshot);
        sb_message_unref(r->u[i].new_snapshot);
    }
    r->n = 0;
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_destroy(&r->mu);
}

/* Publish (the caller keeps its reference); returns sb_publish's result. */
static int pub(sb_topic *t, sb_message *m)
{
    int rc = sb_publish(t, m);
    return rc;
}

/* Publish a clear for `snapshot`. */
static int pub_clear(sb_topic *t, sb_message *snapshot)
{
    sb_message *c = sb_cache_clear_create(snapshot);
    CHECK(c != NULL);
    if (c == NULL)
        return -1000;
    CHECK(sb_message_get_type(c) == sb_cache_clear_type());
    int rc = sb_publish(t, c);
    sb_message_unref(c);
    return rc;
}

/* 1 if `m` is in `list` (pointer identity). */
static int list_has(const sb_message_list *list, sb_message *m)
{
    size_t n = sb_message_list_len(list);
    for (size_t i = 0; i < n; i++)
        if (sb_message_list_get(list, i) == m)
            return 1;
    return 0;
}

static size_t list_len_free(sb_message_list *list)
{
    size_t n = sb_message_list_len(list);
    sb_message_list_free(list);
    return n;
}

/* sb_cache_get / get_by_eid result compared with `expect`, dropping the new reference. */
static int get_is(sb_cache *c, sb_message_type *t, const char *id, sb_message *expect)
{
    sb_message *m = sb_cache_get(c, t, id);
    int ok = m == expect;
    sb_message_unref(m);
    return ok;
}

static int get_eid_is(sb_cache *c, sb_message_type *t, const char *id, const sb_eid *eid,
                      sb_message *expect)
{
    sb_message *m = sb_cache_get_by_eid(c, t, id, eid);
    int ok = m == expect;
    sb_message_unref(m);
    return ok;
}

/* ------------------------------------------------------------------------------------ */

static void test_basic(void)
{
    sb_topic *orig = sb_topic_create("cache.basic");
    sb_cache *cache = sb_cache_create(snap_id);
    CHECK(orig != NULL && cache != NULL);
    CHECK(sb_cache_ref(cache) == cache);
    sb_cache_unref(cache);

    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    sb_topic *ctop = sb_caching_get_topic(ct);
    CHECK(ctop != NULL && ctop != orig);
    CHECK_STR(sb_topic_name(ctop), "cache.basic-cached");
    sb_topic *byname = sb_topic_get("cache.basic-cached");
    CHECK(byname == ctop);
    sb_topic_unref(byname);
    CHECK(sb_cache_update_type() != NULL && sb_cache_clear_type() != NULL);
    CHECK(sb_cache_update_type() != sb_cache_clear_type());

    updrec rec;
    updrec_start(&rec, ctop);

    /* put: the cache is current when sb_publish returns */
    int calls0 = atomic_load(&id_calls);
    sb_message *a1 = snap_local(snap_type, "a", 1);
    CHECK(pub(orig, a1) >= 1);
    CHECK(atomic_load(&id_calls) > calls0);
    CHECK(get_is(cache, snap_type, "a", a1));
    CHECK(get_eid_is(cache, snap_type, "a", &local_eid, a1));
    CHECK(get_is(cache, snap2_type, "a", NULL)); /* keyed by type too */
    CHECK(get_is(cache, snap_type, "nope", NULL));
    WAIT_UNTIL(updrec_count(&rec) >= 1);
    CHECK_EQ_INT(updrec_count(&rec), 1);
    upd_t u = updrec_get(&rec, 0);
    CHECK(u.type == snap_type);
    CHECK(u.old_snapshot == NULL);
    CHECK(u.new_snapshot == a1);

    /* replace: (old, new) */
    sb_message *a2 = snap_local(snap_type, "a", 2);
    CHECK(pub(orig, a2) >= 1);
    CHECK(get_is(cache, snap_type, "a", a2));
    WAIT_UNTIL(updrec_count(&rec) >= 2);
    CHECK_EQ_INT(updrec_count(&rec), 2);
    CHECK(updrec_has(&rec, 1, snap_type, a1, a2));

    /* a second id, and the same id under another type */
    sb_message *b1 = snap_local(snap_type, "b", 10);
    sb_message *a_t2 = snap_local(snap2_type, "a", 20);
    pub(orig, b1);
    pub(orig, a_t2);
    CHECK(get_is(cache, snap_type, "b", b1));
    CHECK(get_is(cache, snap2_type, "a", a_t2));
    CHECK(get_is(cache, snap_type, "a", a2));
    WAIT_UNTIL(updrec_count(&rec) >= 4);
    CHECK(updrec_has(&rec, 2, snap_type, NULL, b1));
    CHECK(updrec_has(&rec, 2, snap2_type, NULL, a_t2));
    sb_message_list *l = sb_cache_dump(cache, snap_type);
    CHECK_EQ_INT(sb_message_list_len(l), 2);
    CHECK(list_has(l, a2) && list_has(l, b1));
    sb_message_list_free(l);
    l = sb_cache_dump(cache, NULL); /* every type */
    CHECK_EQ_INT(sb_message_list_len(l), 3);
    CHECK(list_has(l, a2) && list_has(l, b1) && list_has(l, a_t2));
    sb_message_list_free(l);

    /* non-cacheable messages are discarded: nothing cached, no update */
    int n_before = updrec_count(&rec);
    sb_message *other = sb_message_create(other_type, NULL, NULL);
    CHECK(pub(orig, other) >= 1);
    sb_message_unref(other);
    sb_message *noid = snap_local(snap_type, "", 5); /* id fn returns NULL */
    pub(orig, noid);
    sb_message *agg = snap_agg(snap_type, "a", 99); /* NULL eid: never cached */
    CHECK(sb_message_eid(agg) == NULL);
    pub(orig, agg);
    sb_message *agg_new = snap_agg(snap_type, "fresh", 98);
    pub(orig, agg_new);
    CHECK(get_is(cache, snap_type, "a", a2));
    CHECK(get_eid_is(cache, snap_type, "a", NULL, NULL)); /* no aggregate was stored */
    CHECK(get_eid_is(cache, snap_type, "fresh", NULL, NULL));
    CHECK(get_is(cache, snap_type, "fresh", NULL));
    CHECK(get_is(cache, snap_type, "", NULL));
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 3);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_by_eid(cache, NULL, NULL)), 0);
    CHECK_STAYS(updrec_count(&rec) == n_before, 30);
    CHECK_EQ_INT(atomic_load(&rec.others), 0); /* the caching topic forwards nothing else */

    /* a remote snapshot of the same id (no aggregate functions): its own slot */
    sb_message *ar = snap_eid(snap_type, "a", 7, &r1_eid);
    CHECK(sb_message_eid(ar) != NULL && sb_eid_cmp(sb_message_eid(ar), &r1_eid) == 0);
    pub(orig, ar);
    CHECK(get_is(cache, snap_type, "a", a2)); /* sb_cache_get: still the local one */
    CHECK(get_eid_is(cache, snap_type, "a", &r1_eid, ar));
    CHECK(get_eid_is(cache, snap_type, "a", &r2_eid, NULL));
    l = sb_cache_get_all(cache, snap_type, "a");
    CHECK_EQ_INT(sb_message_list_len(l), 2);
    CHECK(list_has(l, a2) && list_has(l, ar));
    sb_message_list_free(l);
    WAIT_UNTIL(updrec_count(&rec) >= n_before + 1);
    CHECK(updrec_has(&rec, n_before, snap_type, NULL, ar));

    /* clear: removes that (type, id, eid) only and publishes (old, NULL) */
    n_before = updrec_count(&rec);
    CHECK(pub_clear(orig, a2) >= 1);
    CHECK(get_is(cache, snap_type, "a", NULL));
    CHECK(get_eid_is(cache, snap_type, "a", &r1_eid, ar));
    CHECK(get_is(cache, snap2_type, "a", a_t2));
    WAIT_UNTIL(updrec_count(&rec) >= n_before + 1);
    CHECK_EQ_INT(updrec_count(&rec), n_before + 1);
    CHECK(updrec_has(&rec, n_before, snap_type, a2, NULL));

    /* clear of a missing entry: publishes nothing, changes nothing */
    n_before = updrec_count(&rec);
    pub_clear(orig, a2); /* already cleared */
    pub_clear(orig, a1); /* same slot, older message */
    sb_message *never = snap_local(snap_type, "never-cached", 1);
    pub_clear(orig, never);
    sb_message *never_r = snap_eid(snap_type, "b", 1, &r2_eid); /* id known, eid not */
    pub_clear(orig, never_r);
    CHECK_STAYS(updrec_count(&rec) == n_before, 30);
    CHECK(get_is(cache, snap_type, "b", b1));
    CHECK(get_eid_is(cache, snap_type, "a", &r1_eid, ar));
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 3);

    /* clear the rest */
    pub_clear(orig, ar);
    pub_clear(orig, b1);
    pub_clear(orig, a_t2);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 0);
    CHECK_EQ_INT(list_len_free(sb_cache_get_all(cache, snap_type, "a")), 0);
    WAIT_UNTIL(updrec_count(&rec) >= n_before + 3);
    CHECK(updrec_has(&rec, n_before, snap_type, ar, NULL));
    CHECK(updrec_has(&rec, n_before, snap_type, b1, NULL));
    CHECK(updrec_has(&rec, n_before, snap2_type, a_t2, NULL));
    CHECK_STAYS(updrec_count(&rec) == n_before + 3, 20);

    updrec_stop(&rec);
    ct = sb_caching_unsubscribe_and_join(ct);
    CHECK(ct == NULL);

    /* after the caching topic is gone, publishing no longer changes the cache */
    sb_message *late = snap_local(snap_type, "late", 1);
    pub(orig, late);
    CHECK(get_is(cache, snap_type, "late", NULL));

    sb_message *all[] = {a1, a2, b1, a_t2, noid, agg, agg_new, ar, never, never_r, late};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        sb_message_unref(all[i]);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- ids of every length: short ones are stored inside the key, long ones apart ---- */

static void test_id_lengths(void)
{
    sb_topic *orig = sb_topic_create("cache.idlen");
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = orig && cache ? sb_caching_topic_create(orig, cache) : NULL;
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    /* prefixes of one 31-byte string around the inline limit (22 bytes), so that ids
     * differ only in length or only past the limit */
    static const char full[] = "0123456789abcdefghijklmnopqrstu";
    static const size_t lens[] = {1, 7, 21, 22, 23, 24, 30, 31};
    enum { N = sizeof lens / sizeof lens[0] };
    char ids[N][32];
    sb_message *m[N], *m2[N];
    for (int i = 0; i < N; i++) {
        memcpy(ids[i], full, lens[i]);
        ids[i][lens[i]] = '\0';
        m[i] = snap_local(snap_type, ids[i], i);
        CHECK(pub(orig, m[i]) >= 1);
    }
    for (int i = 0; i < N; i++) {
        CHECK(get_is(cache, snap_type, ids[i], m[i]));
        CHECK(get_is(cache, snap2_type, ids[i], NULL));
    }
    CHECK(get_is(cache, snap_type, "0123456789abcdefghij", NULL)); /* 20 bytes */
    CHECK(get_is(cache, snap_type, "0123456789abcdefghijklmnopqrs", NULL)); /* 29 */
    CHECK(get_is(cache, snap_type, "0123456789abcdefghijklmnopqrstX", NULL));
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap_type)), N);
    /* replace each, then clear each: the same key is found by its bytes every time */
    for (int i = 0; i < N; i++) {
        m2[i] = snap_local(snap_type, ids[i], 100 + i);
        pub(orig, m2[i]);
    }
    for (int i = 0; i < N; i++)
        CHECK(get_is(cache, snap_type, ids[i], m2[i]));
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap_type)), N);
    for (int i = 0; i < N; i++)
        pub_clear(orig, m2[i]);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 0);

    /* ids that are not UTF-8 are not cached (the getters could not name them, and
     * folding bad bytes together would make distinct objects one entry); one warning */
    uint64_t warnings = sb_warning_count();
    sb_message *bad1 = snap_local(snap_type, "k\xff", 1);
    sb_message *bad2 = snap_local(snap_type, "k\xfe", 2);
    pub(orig, bad1);
    pub(orig, bad2);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 0);
    CHECK_EQ_INT(sb_warning_count(), warnings + 1);
    sb_message_unref(bad1);
    sb_message_unref(bad2);
    /* a get of such an id is bad input; one of a valid id that is not ASCII is a miss */
    CHECK(sb_cache_get(cache, snap_type, "k\xff") == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(sb_cache_get(cache, snap_type, "k\xc3\xa9") == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_OK);

    ct = sb_caching_unsubscribe_and_join(ct);
    CHECK(ct == NULL);
    for (int i = 0; i < N; i++) {
        sb_message_unref(m[i]);
        sb_message_unref(m2[i]);
    }
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- caching subscription change messages: Unsubscribe drops the Subscribe entry ---- */

static void noop_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

static int change_cached(sb_cache *cache, const char *uid)
{
    sb_message *m = sb_cache_get(cache, sb_subscription_change_type(), uid);
    sb_message_unref(m);
    return m != NULL;
}

static void test_subscription_changes(void)
{
    sb_topic *orig = sb_topic_create("cache.subs");
    sb_cache *cache = sb_cache_create(snap_or_change_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    sb_message_type *chg = sb_subscription_change_type();

    /* the caching subscription's own Subscribe is its first message: cached */
    sb_message_list *l = sb_cache_dump(cache, chg);
    size_t base = sb_message_list_len(l);
    CHECK_EQ_INT(base, 1);
    sb_message_list_free(l);

    sb_subscription *s1 = sb_subscribe(orig, noop_cb, NULL);
    sb_subscription *s2 = sb_subscribe_pool(orig, noop_cb, NULL);
    CHECK(s1 != NULL && s2 != NULL);
    char uid1[256], uid2[256];
    snprintf(uid1, sizeof uid1, "%s", sb_subscription_uniqueid(s1));
    snprintf(uid2, sizeof uid2, "%s", sb_subscription_uniqueid(s2));

    WAIT_UNTIL(change_cached(cache, uid1) && change_cached(cache, uid2));
    sb_message *m = sb_cache_get(cache, chg, uid1);
    CHECK(m != NULL);
    if (m != NULL) {
        const sb_subscription_change *c = sb_message_data(m);
        CHECK(c != NULL);
        if (c != NULL) {
            CHECK_STR(c->description, "Subscribe");
            CHECK_STR(c->uniqueid, uid1);
            CHECK(c->topic == orig);
        }
        sb_message_unref(m);
    }
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, chg)), base + 2);

    /* Unsubscribe (joined): the Subscribe entry of s1 goes, s2's stays */
    s1 = sb_unsubscribe_and_join(s1);
    WAIT_UNTIL(!change_cached(cache, uid1));
    CHECK(!change_cached(cache, uid1));
    CHECK(change_cached(cache, uid2));
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, chg)), base + 1);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, chg)), base + 1);

    /* Unsubscribe (not joined) */
    s2 = sb_unsubscribe(s2);
    WAIT_UNTIL(!change_cached(cache, uid2));
    CHECK_STAYS(!change_cached(cache, uid1) && !change_cached(cache, uid2), 20);
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, chg)), base);

    ct = sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* With a calc function that also aggregates subscription changes, an Unsubscribe that
 * retires a Subscribe entry recomputes its aggregate too: no entry is left holding only
 * an aggregate, so the cache does not grow with every subscription ever made. */
static sb_message *any_local_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    (void)new_snapshot;
    if (sb_cache_entry_get_local(entry) == NULL)
        return NULL;
    sb_message *cur = sb_cache_entry_get_aggregate(entry);
    return cur != NULL ? sb_message_ref(cur) : snap_agg(snap_type, "agg", 1);
}

static void noop_publish(sb_topic *topic, sb_message *aggregate)
{
    (void)topic;
    (void)aggregate;
}

static void test_subscription_changes_with_aggregates(void)
{
    sb_topic *orig = sb_topic_create("cache.subchg.agg");
    sb_cache *cache = sb_cache_create_full(snap_or_change_id, any_local_calc, noop_publish);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    sb_message_type *chg = sb_subscription_change_type();
    size_t base = list_len_free(sb_cache_dump(cache, chg));
    for (int i = 0; i < 20; i++) {
        sb_subscription *s = sb_subscribe(orig, noop_cb, NULL);
        CHECK(sb_unsubscribe_and_join(s) == NULL);
    }
    /* the Unsubscribe messages were handled synchronously, within the joins */
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, chg)), base);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_by_eid(cache, chg, NULL)), base);
    ct = sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- one cache, two caching topics ---- */

static void test_shared_cache(void)
{
    sb_topic *o1 = sb_topic_create("cache.shared1");
    sb_topic *o2 = sb_topic_create("cache.shared2");
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct1 = sb_caching_topic_create(o1, cache);
    sb_caching_topic *ct2 = sb_caching_topic_create(o2, cache);
    CHECK(ct1 != NULL && ct2 != NULL);
    if (ct1 == NULL || ct2 == NULL)
        return;
    CHECK(sb_caching_get_topic(ct1) != sb_caching_get_topic(ct2));
    CHECK_STR(sb_topic_name(sb_caching_get_topic(ct2)), "cache.shared2-cached");
    {
        /* a second caching topic of the same original (another cache): an update topic
         * of its own, so neither cache's subscribers see the other's updates */
        sb_cache *other = sb_cache_create(snap_id);
        sb_caching_topic *ct3 = sb_caching_topic_create(o2, other);
        CHECK(ct3 != NULL);
        CHECK(sb_caching_get_topic(ct3) != sb_caching_get_topic(ct2));
        CHECK_STR(sb_topic_name(sb_caching_get_topic(ct3)), "cache.shared2-cached-2");
        updrec r3;
        updrec_start(&r3, sb_caching_get_topic(ct3));
        sb_message *z = snap_local(snap_type, "z", 1);
        pub(o2, z);
        WAIT_UNTIL(updrec_count(&r3) >= 1);
        CHECK_STAYS(updrec_count(&r3) == 1, 20);
        pub_clear(o2, z);
        WAIT_UNTIL(updrec_count(&r3) >= 2);
        updrec_stop(&r3);
        CHECK(sb_caching_unsubscribe_and_join(ct3) == NULL);
        sb_cache_unref(other);
        sb_message_unref(z);
    }
    updrec r1, r2;
    updrec_start(&r1, sb_caching_get_topic(ct1));
    updrec_start(&r2, sb_caching_get_topic(ct2));

    sb_message *x1 = snap_local(snap_type, "x", 1);
    sb_message *y1 = snap_local(snap_type, "y", 1);
    pub(o1, x1);
    pub(o2, y1);
    CHECK(get_is(cache, snap_type, "x", x1));
    CHECK(get_is(cache, snap_type, "y", y1));
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap_type)), 2);
    WAIT_UNTIL(updrec_count(&r1) >= 1 && updrec_count(&r2) >= 1);
    CHECK(updrec_has(&r1, 0, snap_type, NULL, x1));
    CHECK(updrec_has(&r2, 0, snap_type, NULL, y1));

    /* x updated through the other caching topic: same entry, old = x1 */
    sb_message *x2 = snap_local(snap_type, "x", 2);
    pub(o2, x2);
    CHECK(get_is(cache, snap_type, "x", x2));
    WAIT_UNTIL(updrec_count(&r2) >= 2);
    CHECK(updrec_has(&r2, 1, snap_type, x1, x2));
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap_type)), 2);

    /* cleared through the first */
    pub_clear(o1, x2);
    CHECK(get_is(cache, snap_type, "x", NULL));
    WAIT_UNTIL(updrec_count(&r1) >= 2);
    CHECK(updrec_has(&r1, 1, snap_type, x2, NULL));
    CHECK_STAYS(updrec_count(&r1) == 2 && updrec_count(&r2) == 2, 20);

    /* one caching topic goes: the other still feeds the shared cache */
    updrec_stop(&r1);
    ct1 = sb_caching_unsubscribe_and_join(ct1);
    sb_message *x3 = snap_local(snap_type, "x", 3);
    pub(o1, x3);
    CHECK(get_is(cache, snap_type, "x", NULL));
    pub(o2, x3);
    CHECK(get_is(cache, snap_type, "x", x3));

    updrec_stop(&r2);
    ct2 = sb_caching_unsubscribe(ct2);
    CHECK(ct2 == NULL);
    /* caching stopped at once, without a join: a later publish leaves the cache alone */
    sb_message *x4 = snap_local(snap_type, "x", 4);
    pub(o2, x4);
    CHECK(get_is(cache, snap_type, "x", x3));
    sb_message_unref(x4);
    /* the cache outlives its caching topics */
    CHECK(get_is(cache, snap_type, "y", y1));
    sb_message_unref(x1);
    sb_message_unref(x2);
    sb_message_unref(x3);
    sb_message_unref(y1);
    sb_cache_unref(cache);
    sb_topic_unref(o1);
    sb_topic_unref(o2);
}

/* ---- caching filter ---- */

static void test_caching_filter(void)
{
    sb_topic *orig = sb_topic_create("cache.filter");
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    CHECK_EQ_INT(sb_caching_accept_message_type(ct, snap_type), SB_OK);
    sb_message *s = snap_local(snap_type, "f", 1);
    sb_message *s2 = snap_local(snap2_type, "f", 2);
    pub(orig, s);
    pub(orig, s2);
    CHECK(get_is(cache, snap_type, "f", s));
    CHECK(get_is(cache, snap2_type, "f", NULL)); /* not accepted: not cached */
    pub_clear(orig, s);                           /* clears still reach the cache */
    CHECK(get_is(cache, snap_type, "f", NULL));

    CHECK_EQ_INT(sb_caching_set_filter(ct, SB_FILTER_NONE), SB_OK);
    pub(orig, s2);
    CHECK(get_is(cache, snap2_type, "f", s2));
    CHECK_EQ_INT(sb_caching_set_filter(ct, SB_FILTER_SELECTIVE), SB_OK);
    sb_message *s3 = snap_local(snap2_type, "g", 3);
    pub(orig, s3);
    CHECK(get_is(cache, snap2_type, "g", NULL));

    ct = sb_caching_unsubscribe_and_join(ct);
    sb_message_unref(s);
    sb_message_unref(s2);
    sb_message_unref(s3);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- aggregates ---- */

static atomic_int calc_calls;
static atomic_int calc_clear_calls; /* calls with new_snapshot == NULL */
static atomic_int calc_bad;         /* inconsistent entry seen by calc */
static atomic_int pub_calls;
static atomic_int pub_bad;
static sb_topic *_Atomic pub_last_topic;
static _Atomic long pub_last_value;

/* aggregate = sum of the values of every snapshot; NULL when there is none */
static sb_message *sum_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    atomic_fetch_add(&calc_calls, 1);
    if (new_snapshot == NULL)
        atomic_fetch_add(&calc_clear_calls, 1);
    long sum = 0;
    int n = 0, new_found = 0;
    sb_message_type *type = NULL;
    char id[32] = "";
    sb_message *loc = sb_cache_entry_get_local(entry);
    if (loc != NULL) {
        const snap_t *s = snap_of(loc);
        const sb_eid *e = sb_message_eid(loc);
        if (s == NULL || s->magic != SNAP_MAGIC || e == NULL || sb_eid_cmp(e, &local_eid) != 0)
            atomic_fetch_add(&calc_bad, 1);
        if (s != NULL) {
            sum += s->value;
            snprintf(id, sizeof id, "%s", s->id);
        }
        type = sb_message_get_type(loc);
        n++;
        new_found |= loc == new_snapshot;
    }
    const sb_eid *prev = NULL;
    for (size_t i = 0; i < 64; i++) {
        sb_message *r = sb_cache_entry_get_remote(entry, i);
        if (r == NULL)
            break;
        const snap_t *s = snap_of(r);
        const sb_eid *e = sb_message_eid(r);
        if (s == NULL || s->magic != SNAP_MAGIC || e == NULL || sb_eid_cmp(e, &local_eid) == 0 ||
            (prev != NULL && sb_eid_cmp(prev, e) >= 0)) /* remotes ordered by eid */
            atomic_fetch_add(&calc_bad, 1);
        if (s != NULL) {
            sum += s->value;
            if (id[0] != '\0' && strcmp(id, s->id) != 0)
                atomic_fetch_add(&calc_bad, 1);
            snprintf(id, sizeof id, "%s", s->id);
        }
        prev = e;
        type = sb_message_get_type(r);
        n++;
        new_found |= r == new_snapshot;
    }
    if (new_snapshot != NULL && !new_found) /* the new snapshot is in the entry */
        atomic_fetch_add(&calc_bad, 1);
    sb_message *cur = sb_cache_entry_get_aggregate(entry);
    if (cur != NULL && sb_message_eid(cur) != NULL)
        atomic_fetch_add(&calc_bad, 1);
    if (n == 0)
        return NULL;
    if (cur != NULL && value_of(cur) == sum)
        return sb_message_ref(cur); /* unchanged */
    return snap_agg(type, id, sum);
}

static void agg_publish(sb_topic *topic, sb_message *aggregate)
{
    atomic_fetch_add(&pub_calls, 1);
    atomic_store(&pub_last_topic, topic);
    if (aggregate == NULL || sb_message_eid(aggregate) != NULL || snap_of(aggregate) == NULL ||
        snap_of(aggregate)->magic != AGG_MAGIC) {
        atomic_fetch_add(&pub_bad, 1);
        return;
    }
    atomic_store(&pub_last_value, value_of(aggregate));
}

/* the aggregate of (snap_type, id): new reference or NULL */
static sb_message *aggregate_of(sb_cache *c, const char *id)
{
    return sb_cache_get_by_eid(c, snap_type, id, NULL);
}

static void test_aggregates(void)
{
    sb_topic *orig = sb_topic_create("cache.agg");
    /* the header's callback typedefs are API names too: use them by name */
    sb_snapshot_get_id id_fn = snap_id;
    sb_cache_aggregate_calc_fn calc_fn = sum_calc;
    sb_cache_aggregate_publish_fn publish_fn = agg_publish;
    sb_cache *cache = sb_cache_create_full(id_fn, calc_fn, publish_fn);
    CHECK(cache != NULL);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (cache == NULL || ct == NULL)
        return;
    updrec rec;
    updrec_start(&rec, sb_caching_get_topic(ct));
    atomic_store(&calc_calls, 0);
    atomic_store(&calc_clear_calls, 0);
    atomic_store(&pub_calls, 0);

    /* 1: local 1 -> aggregate 1 */
    sb_message *L = snap_local(snap_type, "obj", 1);
    pub(orig, L);
    CHECK_EQ_INT(atomic_load(&calc_calls), 1);
    CHECK_EQ_INT(atomic_load(&pub_calls), 1);
    CHECK(atomic_load(&pub_last_topic) == orig);
    CHECK_EQ_INT(atomic_load(&pub_last_value), 1);
    sb_message *A1 = aggregate_of(cache, "obj");
    CHECK(A1 != NULL && sb_message_eid(A1) == NULL && value_of(A1) == 1);
    WAIT_UNTIL(updrec_count(&rec) >= 2);
    CHECK_EQ_INT(updrec_count(&rec), 2);
    CHECK(updrec_has(&rec, 0, snap_type, NULL, L));
    CHECK(updrec_has(&rec, 0, snap_type, NULL, A1)); /* aggregate update */

    /* 2: remote r1 = 2 -> aggregate 3 */
    sb_message *R1 = snap_eid(snap_type, "obj", 2, &r1_eid);
    pub(orig, R1);
    CHECK_EQ_INT(atomic_load(&calc_calls), 2);
    CHECK_EQ_INT(atomic_load(&pub_calls), 2);
    CHECK(atomic_load(&pub_last_topic) == orig);
    CHECK_EQ_INT(atomic_load(&pub_last_value), 3);
    sb_message *A3 = aggregate_of(cache, "obj");
    CHECK(A3 != NULL && A3 != A1 && value_of(A3) == 3);
    WAIT_UNTIL(updrec_count(&rec) >= 4);
    CHECK_EQ_INT(updrec_count(&rec), 4);
    CHECK(updrec_has(&rec, 2, snap_type, NULL, R1));
    CHECK(updrec_has(&rec, 2, snap_type, A1, A3));
    CHECK(get_is(cache, snap_type, "obj", L)); /* the local one is unchanged */

    /* 3: remote r2 = 3 -> aggregate 6 */
    sb_message *R2 = snap_eid(snap_type, "obj", 3, &r2_eid);
    pub(orig, R2);
    CHECK_EQ_INT(atomic_load(&calc_calls), 3);
    CHECK_EQ_INT(atomic_load(&pub_calls), 3);
    CHECK_EQ_INT(atomic_load(&pub_last_value), 6);
    sb_message *A6 = aggregate_of(cache, "obj");
    CHECK(A6 != NULL && value_of(A6) == 6);
    WAIT_UNTIL(updrec_count(&rec) >= 6);
    CHECK_EQ_INT(updrec_count(&rec), 6);
    CHECK(updrec_has(&rec, 4, snap_type, NULL, R2));
    CHECK(updrec_has(&rec, 4, snap_type, A3, A6));

    /* 4: r2 again with the same value: calc runs, aggregate unchanged -> no publish, no
     * aggregate update */
    sb_message *R2b = snap_eid(snap_type, "obj", 3, &r2_eid);
    pub(orig, R2b);
    CHECK_EQ_INT(atomic_load(&calc_calls), 4);
    CHECK_EQ_INT(atomic_load(&pub_calls), 3);
    CHECK(get_eid_is(cache, snap_type, "obj", NULL, A6));
    WAIT_UNTIL(updrec_count(&rec) >= 7);
    CHECK(updrec_has(&rec, 6, snap_type, R2, R2b));
    CHECK_STAYS(updrec_count(&rec) == 7, 20);

    /* gets */
    CHECK(get_is(cache, snap_type, "obj", L));
    CHECK(get_eid_is(cache, snap_type, "obj", &local_eid, L));
    CHECK(get_eid_is(cache, snap_type, "obj", &r1_eid, R1));
    CHECK(get_eid_is(cache, snap_type, "obj", &r2_eid, R2b));
    CHECK(get_eid_is(cache, snap_type, "obj", NULL, A6));
    sb_message_list *l = sb_cache_get_all(cache, snap_type, "obj");
    CHECK_EQ_INT(sb_message_list_len(l), 3);
    CHECK(list_has(l, L) && list_has(l, R1) && list_has(l, R2b));
    CHECK(!list_has(l, A6)); /* no aggregate */
    sb_message_list_free(l);

    /* 5: a second object, local only -> its own aggregate 10 */
    sb_message *O = snap_local(snap_type, "obj2", 10);
    pub(orig, O);
    CHECK_EQ_INT(atomic_load(&calc_calls), 5);
    CHECK_EQ_INT(atomic_load(&pub_calls), 4);
    CHECK_EQ_INT(atomic_load(&pub_last_value), 10);
    sb_message *B10 = aggregate_of(cache, "obj2");
    CHECK(B10 != NULL && value_of(B10) == 10);
    WAIT_UNTIL(updrec_count(&rec) >= 9);
    CHECK(updrec_has(&rec, 7, snap_type, NULL, O));
    CHECK(updrec_has(&rec, 7, snap_type, NULL, B10));

    /* dumps, exact */
    l = sb_cache_dump(cache, snap_type); /* local snapshots */
    CHECK_EQ_INT(sb_message_list_len(l), 2);
    CHECK(list_has(l, L) && list_has(l, O));
    sb_message_list_free(l);
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, NULL)), 2);
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap2_type)), 0);
    l = sb_cache_dump_by_eid(cache, snap_type, &local_eid);
    CHECK_EQ_INT(sb_message_list_len(l), 2);
    CHECK(list_has(l, L) && list_has(l, O));
    sb_message_list_free(l);
    l = sb_cache_dump_by_eid(cache, snap_type, &r1_eid);
    CHECK_EQ_INT(sb_message_list_len(l), 1);
    CHECK(list_has(l, R1));
    sb_message_list_free(l);
    l = sb_cache_dump_by_eid(cache, snap_type, &r2_eid);
    CHECK_EQ_INT(sb_message_list_len(l), 1);
    CHECK(list_has(l, R2b));
    sb_message_list_free(l);
    l = sb_cache_dump_by_eid(cache, snap_type, NULL); /* aggregates */
    CHECK_EQ_INT(sb_message_list_len(l), 2);
    CHECK(list_has(l, A6) && list_has(l, B10));
    sb_message_list_free(l);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_by_eid(cache, NULL, NULL)), 2);
    l = sb_cache_dump_all(cache, snap_type); /* every eid, no aggregates */
    CHECK_EQ_INT(sb_message_list_len(l), 4);
    CHECK(list_has(l, L) && list_has(l, R1) && list_has(l, R2b) && list_has(l, O));
    CHECK(!list_has(l, A6) && !list_has(l, B10));
    sb_message_list_free(l);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 4);
    CHECK_EQ_INT(atomic_load(&calc_calls), 5); /* gets and dumps never run calc */

    /* 6: clear r1 -> calc with NULL new snapshot, aggregate 4 */
    int n0 = updrec_count(&rec);
    pub_clear(orig, R1);
    CHECK_EQ_INT(atomic_load(&calc_calls), 6);
    CHECK_EQ_INT(atomic_load(&calc_clear_calls), 1);
    CHECK_EQ_INT(atomic_load(&pub_calls), 5);
    CHECK_EQ_INT(atomic_load(&pub_last_value), 4);
    CHECK(atomic_load(&pub_last_topic) == orig);
    sb_message *A4 = aggregate_of(cache, "obj");
    CHECK(A4 != NULL && value_of(A4) == 4);
    CHECK(get_eid_is(cache, snap_type, "obj", &r1_eid, NULL));
    WAIT_UNTIL(updrec_count(&rec) >= n0 + 2);
    CHECK_EQ_INT(updrec_count(&rec), n0 + 2);
    CHECK(updrec_has(&rec, n0, snap_type, R1, NULL));
    CHECK(updrec_has(&rec, n0, snap_type, A6, A4));

    /* 7: clear of the missing r1 again: no calc, no publish, no update */
    n0 = updrec_count(&rec);
    pub_clear(orig, R1);
    CHECK_EQ_INT(atomic_load(&calc_calls), 6);
    CHECK_EQ_INT(atomic_load(&pub_calls), 5);
    CHECK_STAYS(updrec_count(&rec) == n0, 20);

    /* 8: clear the local one -> aggregate 3 */
    pub_clear(orig, L);
    CHECK_EQ_INT(atomic_load(&calc_calls), 7);
    CHECK_EQ_INT(atomic_load(&pub_calls), 6);
    CHECK_EQ_INT(atomic_load(&pub_last_value), 3);
    sb_message *A3b = aggregate_of(cache, "obj");
    CHECK(A3b != NULL && value_of(A3b) == 3);
    CHECK(get_is(cache, snap_type, "obj", NULL));
    WAIT_UNTIL(updrec_count(&rec) >= n0 + 2);
    CHECK(updrec_has(&rec, n0, snap_type, L, NULL));
    CHECK(updrec_has(&rec, n0, snap_type, A4, A3b));

    /* 9: clear the last snapshot -> calc returns NULL: no aggregate left */
    n0 = updrec_count(&rec);
    pub_clear(orig, R2b);
    CHECK_EQ_INT(atomic_load(&calc_calls), 8);
    CHECK_EQ_INT(atomic_load(&calc_clear_calls), 3);
    CHECK(get_eid_is(cache, snap_type, "obj", NULL, NULL));
    CHECK_EQ_INT(list_len_free(sb_cache_get_all(cache, snap_type, "obj")), 0);
    WAIT_UNTIL(updrec_count(&rec) >= n0 + 2);
    CHECK(updrec_has(&rec, n0, snap_type, R2b, NULL));
    CHECK(updrec_has(&rec, n0, snap_type, A3b, NULL)); /* (old aggregate, no aggregate) */
    l = sb_cache_dump_by_eid(cache, NULL, NULL);
    CHECK_EQ_INT(sb_message_list_len(l), 1);
    CHECK(list_has(l, B10));
    sb_message_list_free(l);
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 1);

    /* an aggregate published to the original topic is not cached as a snapshot */
    sb_message *stray = snap_agg(snap_type, "obj2", 555);
    int calls = atomic_load(&calc_calls);
    pub(orig, stray);
    CHECK_EQ_INT(atomic_load(&calc_calls), calls);
    CHECK(get_eid_is(cache, snap_type, "obj2", NULL, B10));
    CHECK(get_is(cache, snap_type, "obj2", O));

    CHECK_EQ_INT(atomic_load(&calc_bad), 0);
    CHECK_EQ_INT(atomic_load(&pub_bad), 0);
    CHECK_EQ_INT(atomic_load(&rec.others), 0);

    updrec_stop(&rec);
    ct = sb_caching_unsubscribe_and_join(ct);
    sb_message *all[] = {L, R1, R2, R2b, O, A1, A3, A6, B10, A4, A3b, stray};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        sb_message_unref(all[i]);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* NULL publish fn: a changed aggregate is sb_publish'ed to the original topic. */

typedef struct aggseen {
    pthread_mutex_t mu;
    long values[32];
    sb_message *msgs[32]; /* own references */
    sb_message *last;     /* borrowed from msgs */
    int n;
    atomic_int bad;
} aggseen;

static void aggseen_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    aggseen *a = data;
    (void)sub;
    if (sb_message_get_type(msg) != snap_type || sb_message_eid(msg) != NULL)
        return;
    const snap_t *s = snap_of(msg);
    if (s == NULL || s->magic != AGG_MAGIC) {
        atomic_fetch_add(&a->bad, 1);
        return;
    }
    pthread_mutex_lock(&a->mu);
    if (a->n < 32) {
        a->values[a->n] = s->value;
        a->msgs[a->n] = sb_message_ref(msg);
        a->last = msg;
    }
    a->n++;
    pthread_mutex_unlock(&a->mu);
}

static int aggseen_count(aggseen *a)
{
    pthread_mutex_lock(&a->mu);
    int n = a->n;
    pthread_mutex_unlock(&a->mu);
    return n;
}

static void test_aggregate_default_publish(void)
{
    sb_topic *orig = sb_topic_create("cache.aggpub");
    sb_cache *cache = sb_cache_create_full(snap_id, sum_calc, NULL);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(cache != NULL && ct != NULL);
    if (cache == NULL || ct == NULL)
        return;
    aggseen seen;
    memset(&seen, 0, sizeof seen);
    pthread_mutex_init(&seen.mu, NULL);
    sb_subscription *s = sb_subscribe_synchronous(orig, aggseen_cb, &seen);
    updrec rec;
    updrec_start(&rec, sb_caching_get_topic(ct));
    int calls0 = atomic_load(&calc_calls);
    int pubs0 = atomic_load(&pub_calls);

    sb_message *L = snap_local(snap_type, "p", 5);
    pub(orig, L);
    WAIT_UNTIL(aggseen_count(&seen) >= 1);
    sb_message *R = snap_eid(snap_type, "p", 1, &r1_eid);
    pub(orig, R);
    WAIT_UNTIL(aggseen_count(&seen) >= 2);
    sb_message *Rb = snap_eid(snap_type, "p", 1, &r1_eid); /* same sum: unchanged */
    pub(orig, Rb);
    CHECK_STAYS(aggseen_count(&seen) == 2, 30);
    CHECK_EQ_INT(atomic_load(&calc_calls) - calls0, 3);
    CHECK_EQ_INT(atomic_load(&pub_calls), pubs0); /* not agg_publish: another cache */
    pthread_mutex_lock(&seen.mu);
    CHECK_EQ_INT(seen.values[0], 5);
    CHECK_EQ_INT(seen.values[1], 6);
    sb_message *last = seen.last;
    pthread_mutex_unlock(&seen.mu);
    CHECK(get_eid_is(cache, snap_type, "p", NULL, last));
    /* the republished aggregate was not cached as a snapshot */
    CHECK_EQ_INT(list_len_free(sb_cache_dump_all(cache, NULL)), 2);
    CHECK(get_is(cache, snap_type, "p", L));
    /* and the aggregate updates were published on the caching topic as well */
    WAIT_UNTIL(updrec_count(&rec) >= 5);
    CHECK(updrec_has(&rec, 0, snap_type, NULL, L));
    CHECK(updrec_has(&rec, 0, snap_type, NULL, R));
    CHECK(updrec_has(&rec, 0, snap_type, R, Rb));
    CHECK(updrec_has(&rec, 0, snap_type, NULL, seen.msgs[0]));       /* aggregate 5 */
    CHECK(updrec_has(&rec, 0, snap_type, seen.msgs[0], seen.msgs[1])); /* 5 -> 6 */
    CHECK_STAYS(updrec_count(&rec) == 5, 20);
    CHECK_EQ_INT(atomic_load(&seen.bad), 0);

    updrec_stop(&rec);
    s = sb_unsubscribe_and_join(s);
    ct = sb_caching_unsubscribe_and_join(ct);
    for (int i = 0; i < seen.n && i < 32; i++)
        sb_message_unref(seen.msgs[i]);
    pthread_mutex_destroy(&seen.mu);
    sb_message_unref(L);
    sb_message_unref(R);
    sb_message_unref(Rb);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- message lists ---- */

static void test_lists(void)
{
    sb_topic *orig = sb_topic_create("cache.lists");
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;

    /* empty results are empty lists, not failures */
    sb_message_list *l = sb_cache_dump(cache, snap_type);
    CHECK(l != NULL);
    CHECK_EQ_INT(sb_message_list_len(l), 0);
    CHECK_NULL_ERR(sb_message_list_get(l, 0));
    sb_message_list_free(l);
    l = sb_cache_get_all(cache, snap_type, "none");
    CHECK(l != NULL);
    CHECK_EQ_INT(sb_message_list_len(l), 0);
    sb_message_list_free(l);

    sb_message *m[3];
    m[0] = snap_local(snap_type, "l0", 100);
    m[1] = snap_local(snap_type, "l1", 101);
    m[2] = snap_local(snap_type, "l2", 102);
    for (int i = 0; i < 3; i++)
        pub(orig, m[i]);
    l = sb_cache_dump(cache, snap_type);
    CHECK(l != NULL);
    CHECK_EQ_INT(sb_message_list_len(l), 3);
    int seen[3] = {0, 0, 0};
    for (size_t i = 0; i < 3; i++) {
        sb_message *x = sb_message_list_get(l, i);
        CHECK(x != NULL);
        for (int k = 0; k < 3; k++)
            if (x == m[k])
                seen[k]++;
    }
    CHECK(seen[0] == 1 && seen[1] == 1 && seen[2] == 1);
    CHECK_NULL_ERR(sb_message_list_get(l, 3));
    CHECK_NULL_ERR(sb_message_list_get(l, (size_t)-1));
    CHECK_EQ_INT(sb_message_list_len(l), 3); /* unchanged by the bad gets */

    /* the list holds references: clear the cache and drop ours, the snapshots live on */
    for (int i = 0; i < 3; i++)
        pub_clear(orig, m[i]);
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap_type)), 0);
    int destroyed = atomic_load(&snaps_destroyed);
    for (int i = 0; i < 3; i++)
        sb_message_unref(m[i]);
    CHECK_EQ_INT(atomic_load(&snaps_destroyed), destroyed);
    long sum = 0;
    for (size_t i = 0; i < 3; i++)
        sum += value_of(sb_message_list_get(l, i));
    CHECK_EQ_INT(sum, 303);
    sb_message_list_free(l);
    WAIT_UNTIL(atomic_load(&snaps_destroyed) == destroyed + 3);
    CHECK_EQ_INT(atomic_load(&snaps_destroyed), destroyed + 3);

    sb_message_list_free(NULL); /* NULL-safe */
    ct = sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- NULL arguments ---- */

static sb_message *dummy_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    (void)entry;
    (void)new_snapshot;
    return NULL;
}

static void dummy_publish(sb_topic *topic, sb_message *aggregate)
{
    (void)topic;
    (void)aggregate;
}

static void test_null_args(void)
{
    sb_topic *orig = sb_topic_create("cache.nulls");
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(ct != NULL);
    if (ct == NULL)
        return;
    sb_message *snap = snap_local(snap_type, "n", 1);
    sb_eid e = r1_eid;

    CHECK_NULL_ERR(sb_cache_create(NULL));
    CHECK_NULL_ERR(sb_cache_create_full(NULL, dummy_calc, dummy_publish));
    CHECK_NULL_ERR(sb_cache_create_full(NULL, NULL, NULL));
    CHECK_NULL_ERR(sb_cache_ref(NULL));
    sb_cache_unref(NULL); /* NULL-safe */
    CHECK_NULL_ERR(sb_cache_entry_get_aggregate(NULL));
    CHECK_NULL_ERR(sb_cache_entry_get_local(NULL));
    CHECK_NULL_ERR(sb_cache_entry_get_remote(NULL, 0));

    CHECK_NULL_ERR(sb_caching_topic_create(NULL, cache));
    CHECK_NULL_ERR(sb_caching_topic_create(orig, NULL));
    CHECK_NULL_ERR(sb_caching_topic_create(NULL, NULL));
    CHECK_NULL_ERR(sb_caching_get_topic(NULL));
    CHECK_NEG_ERR(sb_caching_accept_message_type(NULL, snap_type));
    CHECK_NEG_ERR(sb_caching_accept_message_type(ct, NULL));
    CHECK_NEG_ERR(sb_caching_set_filter(NULL, SB_FILTER_NONE));
    CHECK_NEG_ERR(sb_caching_set_filter(ct, 77)); /* not a filter mode */
    CHECK_NULL_ERR(sb_caching_unsubscribe(NULL));
    CHECK_NULL_ERR(sb_caching_unsubscribe_and_join(NULL));

    CHECK_NULL_ERR(sb_cache_clear_create(NULL));

    CHECK_NULL_ERR(sb_cache_get(NULL, snap_type, "n"));
    CHECK_NULL_ERR(sb_cache_get(cache, NULL, "n"));
    CHECK_NULL_ERR(sb_cache_get(cache, snap_type, NULL));
    CHECK_NULL_ERR(sb_cache_get_by_eid(NULL, snap_type, "n", &e));
    CHECK_NULL_ERR(sb_cache_get_by_eid(cache, NULL, "n", &e));
    CHECK_NULL_ERR(sb_cache_get_by_eid(cache, snap_type, NULL, &e));
    CHECK_NULL_ERR(sb_cache_get_by_eid(cache, snap_type, NULL, NULL));
    CHECK_NULL_ERR(sb_cache_get_all(NULL, snap_type, "n"));
    CHECK_NULL_ERR(sb_cache_get_all(cache, NULL, "n"));
    CHECK_NULL_ERR(sb_cache_get_all(cache, snap_type, NULL));
    CHECK_NULL_ERR(sb_cache_dump(NULL, snap_type));
    CHECK_NULL_ERR(sb_cache_dump(NULL, NULL));
    CHECK_NULL_ERR(sb_cache_dump_by_eid(NULL, snap_type, &e));
    CHECK_NULL_ERR(sb_cache_dump_by_eid(NULL, NULL, NULL));
    CHECK_NULL_ERR(sb_cache_dump_all(NULL, snap_type));
    CHECK_NULL_ERR(sb_cache_dump_all(NULL, NULL));

    plant_error();
    CHECK_EQ_INT(sb_message_list_len(NULL), 0);
    tu_check(fresh_error(), __FILE__, __LINE__, "fresh sb_last_error after sb_message_list_len(NULL)");
    CHECK_NULL_ERR(sb_message_list_get(NULL, 0));
    sb_message_list_free(NULL);

    /* wrong-type handles are refused too (a topic passed as a cache) */
    CHECK_NULL_ERR(sb_cache_get((sb_cache *)orig, snap_type, "n"));
    CHECK_NULL_ERR(sb_caching_get_topic((sb_caching_topic *)cache));

    /* nothing was broken: the caching topic still works */
    pub(orig, snap);
    CHECK(get_is(cache, snap_type, "n", snap));
    CHECK(sb_caching_get_topic(ct) != NULL);

    ct = sb_caching_unsubscribe_and_join(ct);
    sb_message_unref(snap);
    sb_cache_unref(cache);
    sb_topic_unref(orig);
}

/* ---- module unload: no module function runs once sb_caching_unsubscribe_and_join
 * returned, even with publishers still running ---- */

static atomic_int mod_loaded;
static atomic_int mod_calls;
static atomic_int mod_calls_unloaded;

/* Every module function: it must neither start nor still be running once the module is
 * unloaded (the sleep keeps calls in flight long enough for an early return to show). */
static void mod_touch(void)
{
    atomic_fetch_add(&mod_calls, 1);
    if (!atomic_load(&mod_loaded))
        atomic_fetch_add(&mod_calls_unloaded, 1);
    tu_sleep_us(100);
    if (!atomic_load(&mod_loaded))
        atomic_fetch_add(&mod_calls_unloaded, 1);
}

static const char *mod_id(sb_message *msg)
{
    mod_touch();
    return snap_id(msg);
}

static sb_message *mod_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    mod_touch();
    sb_message *cur = sb_cache_entry_get_aggregate(entry);
    (void)new_snapshot;
    if (sb_cache_entry_get_local(entry) == NULL)
        return NULL;
    return cur != NULL ? sb_message_ref(cur) : snap_agg(snap_type, "m", 0);
}

static void mod_publish(sb_topic *topic, sb_message *aggregate)
{
    (void)topic;
    (void)aggregate;
    mod_touch();
}

typedef struct module {
    sb_cache *cache;
    sb_caching_topic *ct;
} module_t;

static void module_load(module_t *m, sb_topic *orig)
{
    atomic_store(&mod_loaded, 1);
    m->cache = sb_cache_create_full(mod_id, mod_calc, mod_publish);
    m->ct = sb_caching_topic_create(orig, m->cache);
    CHECK(m->cache != NULL && m->ct != NULL);
}

static void module_unload(module_t *m)
{
    m->ct = sb_caching_unsubscribe_and_join(m->ct);
    sb_cache_unref(m->cache);
    m->cache = NULL;
    atomic_store(&mod_loaded, 0); /* "dlclose": the functions are gone */
}

typedef struct pubthr {
    sb_topic *topic;
    atomic_int stop;
    atomic_int published;
} pubthr_t;

static void *publisher(void *arg)
{
    pubthr_t *p = arg;
    long v = 0;
    char id[16];
    while (!atomic_load(&p->stop)) {
        snprintf(id, sizeof id, "m%ld", v % 8);
        sb_message *m = snap_local(snap_type, id, v++);
        sb_publish(p->topic, m);
        sb_message_unref(m);
        atomic_fetch_add(&p->published, 1);
    }
    return NULL;
}

static void test_module_unload(void)
{
    sb_topic *orig = sb_topic_create("cache.module");
    int rounds = tu_scale(20, 3);
    for (int round = 0; round < rounds; round++) {
        module_t mod;
        module_load(&mod, orig);
        pubthr_t p;
        p.topic = orig;
        atomic_init(&p.stop, 0);
        atomic_init(&p.published, 0);
        pthread_t th[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&th[i], NULL, publisher, &p);
        WAIT_UNTIL(atomic_load(&p.published) >= 50); /* traffic flows */
        WAIT_UNTIL(atomic_load(&mod_calls) > 0);
        module_unload(&mod);
        int after_unload = atomic_load(&mod_calls);
        int published = atomic_load(&p.published);
        WAIT_UNTIL(atomic_load(&p.published) >= published + 50); /* traffic goes on */
        atomic_store(&p.stop, 1);
        for (int i = 0; i < 2; i++)
            pthread_join(th[i], NULL);
        CHECK_EQ_INT(atomic_load(&mod_calls), after_unload);
        CHECK_EQ_INT(atomic_load(&mod_calls_unloaded), 0);
    }
    sb_topic_unref(orig);
}

/* A module unloading its cache frees its snapshots at once, even on a busy topic: after
 * sb_caching_unsubscribe_and_join and the last sb_cache_unref, every snapshot's dtor (the
 * module's code) has run, although the finished caching subscription may stay in the
 * original topic's subscriber list until the list is rebuilt (a topic with 40 other
 * subscriptions keeps it there until 20 of them leave). */
static void nop_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

static void test_unload_frees_snapshots_at_once(void)
{
    sb_topic *orig = sb_topic_create("cache.busy");
    sb_subscription *others[40];
    for (int i = 0; i < 40; i++)
        others[i] = sb_subscribe_synchronous(orig, nop_cb, NULL);
    sb_cache *cache = sb_cache_create(snap_id);
    sb_caching_topic *ct = sb_caching_topic_create(orig, cache);
    CHECK(cache != NULL && ct != NULL);
    int destroyed_before = atomic_load(&snaps_destroyed);
    for (int i = 0; i < 5; i++) {
        char id[8];
        snprintf(id, sizeof id, "b%d", i);
        sb_message *m = snap_local(snap_type, id, i);
        sb_publish(orig, m);
        sb_message_unref(m); /* the cache holds the only reference now */
    }
    CHECK_EQ_INT(list_len_free(sb_cache_dump(cache, snap_type)), 5);
    CHECK_EQ_INT(atomic_load(&snaps_destroyed), destroyed_before);

    CHECK(sb_caching_unsubscribe_and_join(ct) == NULL);
    sb_cache_unref(cache);
    /* no wait: the dtors ran before those calls returned */
    CHECK_EQ_INT(atomic_load(&snaps_destroyed), destroyed_before + 5);

    for (int i = 0; i < 40; i++)
        CHECK(sb_unsubscribe_and_join(others[i]) == NULL);
    CHECK_EQ_INT(atomic_load(&snaps_destroyed), destroyed_before + 5);
    sb_topic_unref(orig);
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(sb_message_type_create("cache.snap", NULL, &snap_type), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("cache.snap2", NULL, &snap2_type), SB_OK);
    CHECK_EQ_INT(sb_message_type_create("cache.other", NULL, &other_type), SB_OK);
    local_eid = sb_eid_default();
    /* two foreign eids, different from ours and ordered r1 < r2 */
    memset(&r1_eid, 0, sizeof r1_eid);
    memset(&r2_eid, 0, sizeof r2_eid);
    r1_eid.bytes[0] = 0x02;
    r1_eid.bytes[5] = 0x01;
    r2_eid.bytes[0] = 0x02;
    r2_eid.bytes[5] = 0x02;
    if (sb_eid_cmp(&local_eid, &r1_eid) == 0 || sb_eid_cmp(&local_eid, &r2_eid) == 0) {
        r1_eid.bytes[0] = 0x06;
        r2_eid.bytes[0] = 0x06;
    }
    CHECK(sb_eid_cmp(&local_eid, &r1_eid) != 0 && sb_eid_cmp(&local_eid, &r2_eid) != 0);
    CHECK(sb_eid_cmp(&r1_eid, &r2_eid) < 0);

    test_basic();
    test_id_lengths();
    test_subscription_changes();
    test_subscription_changes_with_aggregates();
    test_shared_cache();
    test_caching_filter();
    test_aggregates();
    test_aggregate_default_publish();
    test_lists();
    test_null_args();
    test_module_unload();
    test_unload_frees_snapshots_at_once();

    CHECK_EQ_INT(atomic_load(&id_bad_msg), 0);
    /* every snapshot and aggregate was destroyed exactly once */
    WAIT_UNTIL(atomic_load(&snaps_destroyed) == atomic_load(&snaps_created));
    CHECK_EQ_INT(atomic_load(&snaps_destroyed), atomic_load(&snaps_created));

    sb_message_type_unref(snap_type);
    sb_message_type_unref(snap2_type);
    sb_message_type_unref(other_type);
    return TEST_DONE();
}
