/*
 * test_message.c - Message types and Messages sections of API.md.
 *
 * Types: create/ref/unref/name/id, same name returns the same type, ids small and distinct,
 * decline/declined, to_json through the vtable (library frees the callback's text, the
 * caller frees the result with sb_string_free), types without to_json.
 * Messages: create/create_full/create_bytes, data/len/timestamp/eid, aggregate (NULL eid),
 * ref/unref, the dtor runs exactly once on whichever thread drops the last reference, a
 * message keeps its type alive, failed creation does not call the dtor.
 */
#include "recorder.h"

/* ---- dtor accounting ---- */

static atomic_int dtor_calls;
static atomic_int dtor_wrong_data;
static void *volatile expected_data;

static void counting_dtor(void *data)
{
    if (data != expected_data)
        atomic_fetch_add(&dtor_wrong_data, 1);
    atomic_fetch_add(&dtor_calls, 1);
    free(data);
}

static atomic_int plain_dtor_calls;
static void plain_dtor(void *data)
{
    atomic_fetch_add(&plain_dtor_calls, 1);
    free(data);
}

/* ---- to_json ---- */

typedef struct point {
    int x, y;
} point;

static atomic_int to_json_calls;

static char *point_to_json(const sb_message *msg)
{
    atomic_fetch_add(&to_json_calls, 1);
    const point *p = sb_message_data(msg);
    if (p == NULL)
        return NULL;
    char *s = malloc(64);
    if (s == NULL)
        return NULL;
    snprintf(s, 64, "{\"x\":%d,\"y\":%d}", p->x, p->y);
    return s;
}

static char *null_to_json(const sb_message *msg)
{
    (void)msg;
    atomic_fetch_add(&to_json_calls, 1);
    return NULL;
}

static const sb_message_vtable point_vtable = {.to_json = point_to_json};
static const sb_message_vtable empty_vtable = {.to_json = NULL};
static const sb_message_vtable null_json_vtable = {.to_json = null_to_json};

/* ---- message types ---- */

static void test_type_basics(void)
{
    sb_message_type *a = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.alpha", NULL, &a), SB_OK);
    CHECK(a != NULL);
    if (a == NULL)
        return;
    CHECK_STR(sb_message_type_name(a), "msg.alpha");
    int ida = sb_message_type_id(a);
    CHECK(ida >= 0);

    /* same name: the same type (a new reference to it) */
    sb_message_type *a2 = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.alpha", NULL, &a2), SB_OK);
    CHECK(a2 == a);
    CHECK_EQ_INT(sb_message_type_id(a2), ida);
    sb_message_type_unref(a2);
    /* still alive through the first reference */
    CHECK_STR(sb_message_type_name(a), "msg.alpha");

    /* a different name: a different type with a different id */
    sb_message_type *b = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.beta", &point_vtable, &b), SB_OK);
    CHECK(b != NULL && b != a);
    CHECK_STR(sb_message_type_name(b), "msg.beta");
    CHECK(sb_message_type_id(b) >= 0 && sb_message_type_id(b) != ida);

    /* ids are small and dense: 50 new types all get distinct ids below a small bound */
    sb_message_type *many[50];
    int max_id = 0;
    for (int i = 0; i < 50; i++) {
        char name[32];
        snprintf(name, sizeof name, "msg.many.%d", i);
        many[i] = NULL;
        CHECK_EQ_INT(sb_message_type_create(name, NULL, &many[i]), SB_OK);
        int id = many[i] ? sb_message_type_id(many[i]) : -1;
        CHECK(id >= 0);
        if (id > max_id)
            max_id = id;
        for (int j = 0; j < i; j++)
            if (many[j] && many[i])
                CHECK(sb_message_type_id(many[j]) != id);
    }
    CHECK(max_id < 4096);
    for (int i = 0; i < 50; i++)
        sb_message_type_unref(many[i]);

    /* ref returns its argument; balanced unrefs keep it alive */
    CHECK(sb_message_type_ref(a) == a);
    CHECK(sb_message_type_ref(a) == a);
    sb_message_type_unref(a);
    sb_message_type_unref(a);
    CHECK_STR(sb_message_type_name(a), "msg.alpha");
    CHECK_EQ_INT(sb_message_type_id(a), ida);

    sb_message_type_unref(b);
    sb_message_type_unref(a);
    sb_message_type_unref(NULL); /* NULL-safe */

    /* after the last reference is gone, the name can be created again */
    sb_message_type *again = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.alpha", NULL, &again), SB_OK);
    CHECK(again != NULL);
    CHECK_STR(sb_message_type_name(again), "msg.alpha");
    sb_message_type_unref(again);
}

/* concurrent creates of one name all get the same type */
static sb_message_type *race_types[8];

static void *create_race(void *arg)
{
    intptr_t i = (intptr_t)arg;
    CHECK_EQ_INT(sb_message_type_create("msg.race", NULL, &race_types[i]), SB_OK);
    return NULL;
}

static void test_type_concurrent_create(void)
{
    pthread_t th[8];
    for (intptr_t i = 0; i < 8; i++)
        pthread_create(&th[i], NULL, create_race, (void *)i);
    for (int i = 0; i < 8; i++)
        pthread_join(th[i], NULL);
    for (int i = 1; i < 8; i++)
        CHECK(race_types[i] != NULL && race_types[i] == race_types[0]);
    for (int i = 0; i < 8; i++)
        sb_message_type_unref(race_types[i]);
}

static void test_decline(void)
{
    CHECK_EQ_INT(sb_message_type_declined("msg.declined"), 0);
    CHECK_EQ_INT(sb_message_type_decline("msg.declined"), SB_OK);
    CHECK_EQ_INT(sb_message_type_declined("msg.declined"), 1);
    CHECK_EQ_INT(sb_message_type_declined("msg.not-declined"), 0);

    sb_message_type *t = (sb_message_type *)&t; /* sentinel: must be overwritten with NULL */
    CHECK_EQ_INT(sb_message_type_create("msg.declined", NULL, &t), SB_E_DECLINED);
    CHECK(t == NULL);
    CHECK_ERR();
    /* declining again is fine and it stays declined */
    CHECK_EQ_INT(sb_message_type_decline("msg.declined"), SB_OK);
    CHECK_EQ_INT(sb_message_type_declined("msg.declined"), 1);
    t = (sb_message_type *)&t;
    CHECK_EQ_INT(sb_message_type_create("msg.declined", &point_vtable, &t), SB_E_DECLINED);
    CHECK(t == NULL);

    /* other names are unaffected */
    sb_message_type *ok = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.not-declined", NULL, &ok), SB_OK);
    CHECK(ok != NULL);
    sb_message_type_unref(ok);
}

/* Declining a name a live type holds: the decline wins for later creates (they fail,
 * even though a live type holds the name), while the handles already out keep working:
 * a module that declined a type others still hold does not pull it from under them. */
static void test_decline_live_type(void)
{
    sb_message_type *held = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.live-then-declined", NULL, &held), SB_OK);
    CHECK(held != NULL);
    CHECK_EQ_INT(sb_message_type_decline("msg.live-then-declined"), SB_OK);
    CHECK_EQ_INT(sb_message_type_declined("msg.live-then-declined"), 1);

    sb_message_type *again = (sb_message_type *)&again; /* sentinel */
    CHECK_EQ_INT(sb_message_type_create("msg.live-then-declined", NULL, &again), SB_E_DECLINED);
    CHECK(again == NULL);
    CHECK(tu_contains_ci(sb_last_error(), "declined"));

    /* the held handle is untouched */
    CHECK_STR(sb_message_type_name(held), "msg.live-then-declined");
    sb_message *m = sb_message_create_bytes(held, "x", 2);
    CHECK(m != NULL);
    CHECK(sb_message_get_type(m) == held);
    sb_message_unref(m);
    sb_message_type_unref(held);
}

static void test_to_json(void)
{
    sb_message_type *pt = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.point", &point_vtable, &pt), SB_OK);
    sb_message_type *plain = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.plain", NULL, &plain), SB_OK);
    sb_message_type *empty = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.emptyvt", &empty_vtable, &empty), SB_OK);
    sb_message_type *nj = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.nulljson", &null_json_vtable, &nj), SB_OK);
    if (!pt || !plain || !empty || !nj)
        return;

    point *p = malloc(sizeof *p);
    p->x = 3;
    p->y = -7;
    sb_data_dtor dtor = plain_dtor; /* the typedef is an API name too */
    sb_message *m = sb_message_create(pt, p, dtor);
    CHECK(m != NULL);
    int before = atomic_load(&to_json_calls);
    char *json = sb_message_to_json(m);
    CHECK(atomic_load(&to_json_calls) == before + 1);
    CHECK_STR(json, "{\"x\":3,\"y\":-7}");
    sb_string_free(json);
    /* again: a fresh string each time */
    char *j1 = sb_message_to_json(m);
    char *j2 = sb_message_to_json(m);
    CHECK_STR(j1, "{\"x\":3,\"y\":-7}");
    CHECK_STR(j2, "{\"x\":3,\"y\":-7}");
    sb_string_free(j1);
    sb_string_free(j2);
    sb_message_unref(m);

    /* no vtable / vtable without to_json: NULL, and nothing is called */
    int *d = malloc(sizeof *d);
    sb_message *mp = sb_message_create(plain, d, plain_dtor);
    CHECK(mp != NULL);
    CHECK(sb_message_to_json(mp) == NULL);
    sb_message_unref(mp);
    d = malloc(sizeof *d);
    sb_message *me = sb_message_create(empty, d, plain_dtor);
    CHECK(me != NULL);
    CHECK(sb_message_to_json(me) == NULL);
    sb_message_unref(me);

    /* to_json returning NULL gives NULL */
    d = malloc(sizeof *d);
    sb_message *mn = sb_message_create(nj, d, plain_dtor);
    before = atomic_load(&to_json_calls);
    CHECK(sb_message_to_json(mn) == NULL);
    CHECK(atomic_load(&to_json_calls) == before + 1);
    sb_message_unref(mn);

    /* the vtable comes from the type: a second create of the name keeps it */
    sb_message_type *pt2 = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.point", NULL, &pt2), SB_OK);
    CHECK(pt2 == pt);
    p = malloc(sizeof *p);
    p->x = 1;
    p->y = 2;
    sb_message *m2 = sb_message_create(pt2, p, plain_dtor);
    json = sb_message_to_json(m2);
    CHECK_STR(json, "{\"x\":1,\"y\":2}");
    sb_string_free(json);
    sb_message_unref(m2);
    sb_message_type_unref(pt2);

    sb_message_type_unref(pt);
    sb_message_type_unref(plain);
    sb_message_type_unref(empty);
    sb_message_type_unref(nj);
}

/* ---- messages ---- */

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void test_message_create(void)
{
    sb_message_type *t = make_type("msg.create");
    int *data = malloc(sizeof *data);
    *data = 1234;
    expected_data = data;
    atomic_store(&dtor_calls, 0);

    uint64_t t0 = realtime_ns();
    sb_message *m = sb_message_create(t, data, counting_dtor);
    uint64_t t1 = realtime_ns();
    CHECK(m != NULL);
    if (m == NULL)
        return;
    CHECK(sb_message_data(m) == data);
    CHECK_EQ_INT(*(int *)sb_message_data(m), 1234);
    CHECK_EQ_INT(sb_message_data_len(m), 0);
    CHECK(sb_message_get_type(m) == t);
    uint64_t ts = sb_message_timestamp_ns(m);
    CHECK(ts >= t0 && ts <= t1);
    CHECK(sb_message_timestamp_ns(m) == ts); /* immutable */

    /* stamped with the default eid */
    const sb_eid *eid = sb_message_eid(m);
    sb_eid def = sb_eid_default();
    CHECK(eid != NULL && sb_eid_cmp(eid, &def) == 0);

    /* ref/unref: dtor exactly once, when the last reference goes */
    CHECK(sb_message_ref(m) == m);
    CHECK(sb_message_ref(m) == m);
    sb_message_unref(m);
    sb_message_unref(m);
    CHECK_EQ_INT(atomic_load(&dtor_calls), 0);
    CHECK(sb_message_data(m) == data);
    sb_message_unref(m);
    CHECK_EQ_INT(atomic_load(&dtor_calls), 1);
    CHECK_EQ_INT(atomic_load(&dtor_wrong_data), 0);
    sb_message_unref(NULL); /* NULL-safe */

    /* without a dtor nothing is called, the data stays the caller's */
    static int static_data = 5;
    sb_message *ms = sb_message_create(t, &static_data, NULL);
    CHECK(ms != NULL);
    CHECK(sb_message_data(ms) == &static_data);
    sb_message_unref(ms);
    CHECK_EQ_INT(static_data, 5);

    sb_message_type_unref(t);
}

static void test_message_keeps_type(void)
{
    sb_message_type *t = make_type("msg.keeps-type");
    int *d = malloc(sizeof *d);
    sb_message *m = sb_message_create(t, d, plain_dtor);
    CHECK(m != NULL);
    sb_message_type_unref(t); /* the message still holds the type */
    CHECK(sb_message_get_type(m) != NULL);
    CHECK_STR(sb_message_type_name(sb_message_get_type(m)), "msg.keeps-type");
    /* and the name is still held by the live type */
    sb_message_type *t2 = NULL;
    CHECK_EQ_INT(sb_message_type_create("msg.keeps-type", NULL, &t2), SB_OK);
    CHECK(t2 == sb_message_get_type(m));
    sb_message_type_unref(t2);
    sb_message_unref(m);
}

static void test_message_full(void)
{
    sb_message_type *t = make_type("msg.full");
    sb_eid other = {{0xde, 0xad, 0xbe, 0xef, 0x00, 0x01}};
    int *d = malloc(sizeof *d);
    int before = atomic_load(&plain_dtor_calls);
    sb_message *m = sb_message_create_full(t, d, plain_dtor, &other);
    CHECK(m != NULL);
    other.bytes[0] = 0; /* the message keeps its own copy of the eid */
    const sb_eid *e = sb_message_eid(m);
    sb_eid expect = {{0xde, 0xad, 0xbe, 0xef, 0x00, 0x01}};
    CHECK(e != NULL && sb_eid_cmp(e, &expect) == 0);
    CHECK(sb_message_data(m) == d);
    CHECK(sb_message_get_type(m) == t);
    sb_message_unref(m);
    CHECK_EQ_INT(atomic_load(&plain_dtor_calls), before + 1);

    /* NULL eid: an aggregate */
    d = malloc(sizeof *d);
    sb_message *agg = sb_message_create_full(t, d, plain_dtor, NULL);
    CHECK(agg != NULL);
    CHECK(sb_message_eid(agg) == NULL);
    CHECK(sb_message_data(agg) == d);
    CHECK(sb_message_timestamp_ns(agg) > 0);
    sb_message_unref(agg);
    CHECK_EQ_INT(atomic_load(&plain_dtor_calls), before + 2);

    /* the default eid explicitly */
    sb_eid def = sb_eid_default();
    d = malloc(sizeof *d);
    sb_message *md = sb_message_create_full(t, d, plain_dtor, &def);
    CHECK(md != NULL && sb_message_eid(md) != NULL && sb_eid_cmp(sb_message_eid(md), &def) == 0);
    sb_message_unref(md);
    sb_message_type_unref(t);
}

static void test_message_bytes(void)
{
    sb_message_type *t = make_type("msg.bytes");
    char src[16] = "hello, world";
    sb_message *m = sb_message_create_bytes(t, src, 12);
    CHECK(m != NULL);
    if (m == NULL)
        return;
    memset(src, 'Z', sizeof src); /* the message has its own copy */
    CHECK_EQ_INT(sb_message_data_len(m), 12);
    const void *data = sb_message_data(m);
    CHECK(data != NULL && data != (void *)src);
    CHECK(data != NULL && memcmp(data, "hello, world", 12) == 0);
    CHECK(sb_message_get_type(m) == t);
    CHECK(sb_message_eid(m) != NULL);
    sb_message_unref(m);

    /* binary content incl. NUL bytes */
    const unsigned char bin[5] = {0, 1, 0, 255, 0};
    sb_message *mb = sb_message_create_bytes(t, bin, sizeof bin);
    CHECK(mb != NULL);
    CHECK_EQ_INT(sb_message_data_len(mb), 5);
    CHECK(sb_message_data(mb) != NULL && memcmp(sb_message_data(mb), bin, 5) == 0);
    sb_message_unref(mb);

    /* a large buffer */
    size_t big = 1 << 20;
    unsigned char *buf = malloc(big);
    for (size_t i = 0; i < big; i++)
        buf[i] = (unsigned char)(i * 31u);
    sb_message *ml = sb_message_create_bytes(t, buf, big);
    CHECK(ml != NULL);
    CHECK_EQ_INT(sb_message_data_len(ml), big);
    CHECK(sb_message_data(ml) != NULL && memcmp(sb_message_data(ml), buf, big) == 0);
    free(buf);
    sb_message_unref(ml);
    sb_message_type_unref(t);
}

/* ---- dtor runs once, on whichever thread drops the last reference ---- */

static pthread_t dtor_thread;
static atomic_int dtor_thread_ok;
static atomic_int threaded_dtor_calls;

static void thread_checking_dtor(void *data)
{
    if (pthread_equal(pthread_self(), dtor_thread))
        atomic_fetch_add(&dtor_thread_ok, 1);
    atomic_fetch_add(&threaded_dtor_calls, 1);
    free(data);
}

static void *drop_last(void *arg)
{
    sb_message_unref(arg);
    return NULL;
}

typedef struct {
    sb_message *m;
    int n;
} hammer_arg;

static void *ref_unref_hammer(void *arg)
{
    hammer_arg *h = arg;
    for (int i = 0; i < h->n; i++) {
        sb_message_ref(h->m);
        sb_message_unref(h->m);
    }
    sb_message_unref(h->m); /* each thread owns one reference */
    return NULL;
}

static void test_dtor_threads(void)
{
    sb_message_type *t = make_type("msg.dtor");
    sb_message *m = sb_message_create(t, malloc(8), thread_checking_dtor);
    CHECK(m != NULL);
    pthread_create(&dtor_thread, NULL, drop_last, m);
    pthread_join(dtor_thread, NULL);
    CHECK_EQ_INT(atomic_load(&threaded_dtor_calls), 1);
    CHECK_EQ_INT(atomic_load(&dtor_thread_ok), 1);

    /* many threads ref/unref concurrently: still exactly one dtor call */
    for (int round = 0; round < 20; round++) {
        atomic_store(&threaded_dtor_calls, 0);
        dtor_thread = pthread_self(); /* not checked here */
        sb_message *mm = sb_message_create(t, malloc(8), thread_checking_dtor);
        CHECK(mm != NULL);
        pthread_t th[4];
        hammer_arg h = {mm, tu_scale(2000, 100)};
        for (int i = 0; i < 4; i++)
            sb_message_ref(mm);
        sb_message_unref(mm); /* the threads hold the 4 remaining references */
        for (int i = 0; i < 4; i++)
            pthread_create(&th[i], NULL, ref_unref_hammer, &h);
        for (int i = 0; i < 4; i++)
            pthread_join(th[i], NULL);
        CHECK_EQ_INT(atomic_load(&threaded_dtor_calls), 1);
    }
    sb_message_type_unref(t);
}

static void test_failed_create(void)
{
    /* creation fails (NULL type): NULL, the dtor is not called, the caller still owns data */
    atomic_store(&dtor_calls, 0);
    int *d = malloc(sizeof *d);
    *d = 99;
    expected_data = d;
    sb_message *m = sb_message_create(NULL, d, counting_dtor);
    CHECK(m == NULL);
    CHECK_ERR();
    CHECK_EQ_INT(atomic_load(&dtor_calls), 0);
    sb_eid e = sb_eid_default();
    m = sb_message_create_full(NULL, d, counting_dtor, &e);
    CHECK(m == NULL);
    CHECK_ERR();
    m = sb_message_create_full(NULL, d, counting_dtor, NULL);
    CHECK(m == NULL);
    CHECK_EQ_INT(atomic_load(&dtor_calls), 0);
    CHECK_EQ_INT(*d, 99); /* still ours, untouched */
    free(d);
}

int main(void)
{
    TEST_INIT();
    test_type_basics();
    test_type_concurrent_create();
    test_decline();
    test_decline_live_type();
    test_to_json();
    test_message_create();
    test_message_keeps_type();
    test_message_full();
    test_message_bytes();
    test_dtor_threads();
    test_failed_create();
    return TEST_DONE();
}
