/*
 * test_library.c - Library and Entity id sections of API.md:
 * sb_version (and the header's SB_VERSION_* macros), sb_strerror, sb_last_error (per thread), sb_pool_configure (incl. reconfiguring
 * while pool subscriptions run), sb_string_free, sb_eid_*.
 */
#include "recorder.h"

#include <ctype.h>
#include <dirent.h>

static void test_version(void)
{
    const char *v = sb_version();
    CHECK(v != NULL);
    if (v == NULL)
        return;
    CHECK(strlen(v) > 0);
    int digit = 0;
    for (const char *p = v; *p; p++)
        if (isdigit((unsigned char)*p))
            digit = 1;
    CHECK(digit); /* a version has a number in it */
    CHECK(sb_version() != NULL && strcmp(sb_version(), v) == 0); /* stable */

    /* the header's macros name the library this test runs with */
    char macros[64];
    snprintf(macros, sizeof macros, "%d.%d.%d", SB_VERSION_MAJOR, SB_VERSION_MINOR,
             SB_VERSION_PATCH);
    CHECK_STR(v, macros);
}

static void test_strerror(void)
{
    const int codes[] = {SB_OK, SB_E_INVAL, SB_E_NOMEM, SB_E_DECLINED, SB_E_STATE, SB_E_DEADLOCK};
    CHECK_EQ_INT(SB_OK, 0);
    CHECK_EQ_INT(SB_E_INVAL, -1);
    CHECK_EQ_INT(SB_E_NOMEM, -2);
    CHECK_EQ_INT(SB_E_DECLINED, -3);
    CHECK_EQ_INT(SB_E_STATE, -4);
    CHECK_EQ_INT(SB_E_DEADLOCK, -5);
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *s = sb_strerror(codes[i]);
        CHECK(s != NULL && s[0] != '\0');
        /* every code has its own name */
        for (size_t j = 0; j < i; j++) {
            const char *o = sb_strerror(codes[j]);
            CHECK(s != NULL && o != NULL && strcmp(s, o) != 0);
        }
    }
    /* unknown codes still get a (non-NULL) name */
    const int unknown[] = {-6, -1000, 1, 42, 2147483647, -2147483647 - 1};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        const char *s = sb_strerror(unknown[i]);
        CHECK(s != NULL);
    }
}

/* ---- sb_last_error is per thread ---- */

static char thread_err[512];
static int thread_err_ok;

static void *fail_in_thread(void *arg)
{
    (void)arg;
    sb_eid e;
    int rc = sb_eid_from_str("definitely not an eid", &e);
    thread_err_ok = rc < 0 && tu_has_error();
    tu_copy_error(thread_err, sizeof thread_err);
    return NULL;
}

static void test_last_error(void)
{
    /* a failure on this thread */
    sb_topic *t = sb_topic_create(NULL);
    CHECK(t == NULL);
    CHECK_ERR();
    char mine[512];
    tu_copy_error(mine, sizeof mine);
    CHECK(mine[0] != '\0');

    /* the pointer stays readable and the text is stable while nothing else fails */
    CHECK_STR(sb_last_error(), mine);

    /* another thread's failure does not change this thread's last error */
    pthread_t th;
    CHECK_EQ_INT(pthread_create(&th, NULL, fail_in_thread, NULL), 0);
    pthread_join(th, NULL);
    CHECK(thread_err_ok);
    CHECK(thread_err[0] != '\0');
    CHECK_STR(sb_last_error(), mine);

    /* a different kind of failure here replaces it */
    sb_eid e;
    CHECK(sb_eid_from_str("zz:zz:zz:zz:zz:zz", &e) < 0);
    CHECK_ERR();
}

/* ---- pool configuration ---- */

static void round_trip_pool(const char *topic_name, int n)
{
    sb_message_type *type = make_type("lib.payload");
    sb_topic *topic = sb_topic_create(topic_name);
    CHECK(topic != NULL);
    recorder rec;
    recorder_init(&rec, type, topic);
    sb_subscription *sub = sb_subscribe_pool(topic, recorder_cb, &rec);
    CHECK(sub != NULL);
    for (int i = 0; i < n; i++)
        CHECK_EQ_INT(publish_payload(topic, type, 0, i, 0), 1);
    WAIT_UNTIL(atomic_load(&rec.payloads) == n);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_RECORDER_LIFECYCLE(&rec);
    CHECK_RECORDER_THREADS(&rec, KIND_POOL);
    recorder_destroy(&rec);
    sb_topic_unref(topic);
    sb_message_type_unref(type);
}

static void test_pool_configure(void)
{
    /* configure before anything runs */
    CHECK_EQ_INT(sb_pool_configure(1, 2, 1000), SB_OK);
    round_trip_pool("lib.pool.a", 20);

    /* min > max is an invalid argument, reported, and changes nothing */
    CHECK_EQ_INT(sb_pool_configure(4, 2, 1000), SB_E_INVAL);
    CHECK_ERR();
    round_trip_pool("lib.pool.b", 20);

    /* a tiny idle timeout: idle threads may leave, work still gets done afterwards */
    CHECK_EQ_INT(sb_pool_configure(1, 3, 10), SB_OK);
    round_trip_pool("lib.pool.c", 10);
    tu_sleep_ms(100);
    round_trip_pool("lib.pool.d", 10);

    /* reconfigure while pool subscriptions are live and busy */
    sb_message_type *type = make_type("lib.payload");
    sb_topic *topic = sb_topic_create("lib.pool.live");
    recorder rec[4];
    sb_subscription *subs[4];
    for (int i = 0; i < 4; i++) {
        recorder_init(&rec[i], type, topic);
        rec[i].work_yields = 5;
        subs[i] = sb_subscribe_pool(topic, recorder_cb, &rec[i]);
        CHECK(subs[i] != NULL);
    }
    int n = tu_scale(400, 60);
    for (int i = 0; i < n; i++) {
        CHECK_EQ_INT(publish_payload(topic, type, 0, i, 0), 4);
        if (i == n / 3)
            CHECK_EQ_INT(sb_pool_configure(2, 6, 20000), SB_OK);
        if (i == 2 * n / 3)
            CHECK_EQ_INT(sb_pool_configure(1, 2, 5), SB_OK);
    }
    for (int i = 0; i < 4; i++) {
        WAIT_UNTIL(atomic_load(&rec[i].payloads) == n);
        CHECK(sb_unsubscribe_and_join(subs[i]) == NULL);
        CHECK_RECORDER_LIFECYCLE(&rec[i]);
        recorder_destroy(&rec[i]);
    }
    /* back to roughly the defaults */
    CHECK_EQ_INT(sb_pool_configure(1, 4, 20000), SB_OK);
    round_trip_pool("lib.pool.e", 10);
    sb_topic_unref(topic);
    sb_message_type_unref(type);
}

static void test_string_free(void)
{
    sb_string_free(NULL); /* NULL-safe */
    CHECK(1);
}

/* ---- entity ids ---- */

static int eid_str_format_ok(const char *s)
{
    if (strlen(s) != 17)
        return 0;
    for (int i = 0; i < 17; i++) {
        if (i % 3 == 2) {
            if (s[i] != ':')
                return 0;
        } else if (!isxdigit((unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

static sb_message_type *eid_type;

/* a message created now is stamped with `want` */
static void check_eid_stamp(const sb_eid *want)
{
    sb_message *m = sb_message_create(eid_type, malloc(4), free);
    CHECK(m != NULL);
    if (m != NULL) {
        const sb_eid *me = sb_message_eid(m);
        CHECK(me != NULL && sb_eid_cmp(me, want) == 0);
        sb_message_unref(m);
    }
}

static void *eid_thread(void *arg)
{
    const sb_eid *want = arg;
    sb_eid d = sb_eid_default();
    CHECK_EQ_INT(sb_eid_cmp(&d, want), 0);
    check_eid_stamp(want);
    return NULL;
}

static void test_eid(void)
{
    sb_eid def = sb_eid_default();
    sb_eid def2 = sb_eid_default();
    CHECK_EQ_INT(sb_eid_cmp(&def, &def2), 0);
    CHECK(memcmp(def.bytes, def2.bytes, 6) == 0);

    /* to_str format */
    char buf[64];
    CHECK_EQ_INT(sb_eid_to_str(&def, buf, sizeof buf), SB_OK);
    CHECK(eid_str_format_ok(buf));

    sb_eid e;
    memset(&e, 0, sizeof e);
    CHECK_EQ_INT(sb_eid_from_str("01:23:45:67:89:ab", &e), SB_OK);
    const uint8_t want[6] = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab};
    CHECK(memcmp(e.bytes, want, 6) == 0);
    CHECK_EQ_INT(sb_eid_to_str(&e, buf, sizeof buf), SB_OK);
    CHECK_STR(buf, "01:23:45:67:89:ab");

    /* round trip of arbitrary values */
    sb_eid r;
    sb_eid x = {{0xff, 0x00, 0x10, 0xa0, 0x0f, 0xfe}};
    CHECK_EQ_INT(sb_eid_to_str(&x, buf, sizeof buf), SB_OK);
    CHECK_STR(buf, "ff:00:10:a0:0f:fe");
    CHECK_EQ_INT(sb_eid_from_str(buf, &r), SB_OK);
    CHECK_EQ_INT(sb_eid_cmp(&x, &r), 0);

    /* exact-size buffer works; one byte short fails without writing past len */
    char small[32];
    memset(small, 'X', sizeof small);
    CHECK_EQ_INT(sb_eid_to_str(&x, small, 18), SB_OK);
    CHECK_STR(small, "ff:00:10:a0:0f:fe");
    for (size_t i = 18; i < sizeof small; i++)
        CHECK(small[i] == 'X');
    memset(small, 'X', sizeof small);
    CHECK(sb_eid_to_str(&x, small, 17) < 0);
    CHECK_ERR();
    for (size_t i = 17; i < sizeof small; i++)
        CHECK(small[i] == 'X');
    memset(small, 'X', sizeof small);
    CHECK(sb_eid_to_str(&x, small, 5) < 0);
    for (size_t i = 5; i < sizeof small; i++)
        CHECK(small[i] == 'X');
    CHECK(sb_eid_to_str(&x, small, 0) < 0);

    /* invalid strings */
    const char *bad[] = {"", "hello", "01:23:45:67:89", "01:23:45:67:89:gg", ":::::",
                         "001:23:45:67:89:ab", "xx:23:45:67:89:ab"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sb_eid o;
        int rc = sb_eid_from_str(bad[i], &o);
        if (rc >= 0)
            printf("note: sb_eid_from_str accepted \"%s\"\n", bad[i]);
        CHECK(rc < 0);
        if (rc < 0)
            CHECK_ERR();
    }

    /* comparison: memcmp-like ordering, antisymmetric */
    sb_eid a = {{0, 0, 0, 0, 0, 1}};
    sb_eid b = {{0, 0, 0, 0, 0, 2}};
    sb_eid c = {{1, 0, 0, 0, 0, 0}};
    CHECK(sb_eid_cmp(&a, &b) < 0);
    CHECK(sb_eid_cmp(&b, &a) > 0);
    CHECK(sb_eid_cmp(&b, &c) < 0);
    CHECK(sb_eid_cmp(&c, &a) > 0);
    CHECK_EQ_INT(sb_eid_cmp(&a, &a), 0);

    /* set_default changes the default eid (and what messages are stamped with) */
    sb_eid custom = {{0x02, 0x42, 0xac, 0x11, 0x00, 0x07}};
    CHECK_EQ_INT(sb_eid_set_default(&custom), SB_OK);
    sb_eid now = sb_eid_default();
    CHECK_EQ_INT(sb_eid_cmp(&now, &custom), 0);
    sb_message_type *type = make_type("lib.eid");
    eid_type = type;
    check_eid_stamp(&custom);
    /* the change is visible from other threads too */
    pthread_t th;
    CHECK_EQ_INT(pthread_create(&th, NULL, eid_thread, &custom), 0);
    pthread_join(th, NULL);
    CHECK_EQ_INT(sb_eid_set_default(&def), SB_OK);
    check_eid_stamp(&def);
    now = sb_eid_default();
    CHECK_EQ_INT(sb_eid_cmp(&now, &def), 0);
    sb_message_type_unref(type);
}

/* number of threads of this process (Linux: /proc/self/task) */
static int thread_count(void)
{
    DIR *d = opendir("/proc/self/task");
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static void sync_noop(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    (void)msg;
    atomic_fetch_add((atomic_int *)data, 1);
}

/* "The shared worker pool starts lazily": no thread before the first pool/dedicated use */
static void test_lazy_start(void)
{
    int before = thread_count();
    if (before < 0) {
        printf("note: /proc/self/task unavailable, lazy start not checked\n");
        return;
    }
    CHECK_EQ_INT(before, 1);
    /* types, messages, topics, forwards and synchronous subscriptions need no thread */
    sb_message_type *type = make_type("lib.lazy");
    sb_topic *a = sb_topic_create("lib.lazy.a");
    sb_topic *b = sb_topic_create("lib.lazy.b");
    sb_forward *f = sb_forward_all(a, b);
    atomic_int calls;
    atomic_init(&calls, 0);
    sb_subscription *s = sb_subscribe_synchronous(b, sync_noop, &calls);
    sb_message *m = sb_message_create(type, malloc(8), free);
    CHECK_EQ_INT(sb_publish(a, m), 1);
    sb_message_unref(m);
    CHECK(sb_unsubscribe_and_join(s) == NULL);
    CHECK_EQ_INT(atomic_load(&calls), 3);
    sb_forward_cancel(f);
    sb_topic_unref(a);
    sb_topic_unref(b);
    sb_message_type_unref(type);
    CHECK_EQ_INT(thread_count(), 1);
    CHECK_TOPIC_GONE("lib.lazy.a");
    CHECK_TOPIC_GONE("lib.lazy.b");
}

int main(void)
{
    TEST_INIT();
    test_lazy_start(); /* first: before anything starts a thread */
    test_version();
    test_strerror();
    test_last_error();
    test_string_free();
    test_eid();
    test_pool_configure();
    const char *topics[] = {"lib.pool.a", "lib.pool.b", "lib.pool.c", "lib.pool.d",
                            "lib.pool.live", "lib.pool.e"};
    for (size_t i = 0; i < sizeof topics / sizeof topics[0]; i++)
        CHECK_TOPIC_GONE(topics[i]);
    CHECK_EQ_INT(atomic_load(&payload_created), atomic_load(&payload_destroyed));
    return TEST_DONE();
}
