/*
 * test_formatters.c - formatter filters (Subscriptions section of API.md).
 *
 * sb_subscription_accept_formatters(sub, SB_FORMATTER_JSON): a selective subscription
 * also receives every message whose type has to_json, listed or not, including types
 * created (or given a to_json) after the call; accepting formatters switches the filter
 * to selective; accepted types and accepted formatters add up (OR); an explicit decline
 * wins over the formatter; unknown bits give SB_E_INVAL and change nothing; 0 changes
 * nothing; sb_topic_wants counts formatter acceptance, through forwards too.
 */
#include "test_util.h"

static char *json_of(const sb_message *msg)
{
    (void)msg;
    char *s = malloc(3);
    if (s != NULL)
        strcpy(s, "{}");
    return s;
}

static const sb_message_vtable json_vtable = {json_of};

/* Counts what a synchronous subscription receives, by kind. */
typedef struct counts {
    sb_message_type *json_a;
    sb_message_type *json_b;
    sb_message_type *plain;
    atomic_int got_json_a, got_json_b, got_plain, got_change, got_other;
} counts;

static void count_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    counts *c = data;
    sb_message_type *t = sb_message_get_type(msg);
    if (t == c->json_a)
        atomic_fetch_add(&c->got_json_a, 1);
    else if (t == c->json_b)
        atomic_fetch_add(&c->got_json_b, 1);
    else if (t == c->plain)
        atomic_fetch_add(&c->got_plain, 1);
    else if (t == sb_subscription_change_type())
        atomic_fetch_add(&c->got_change, 1);
    else
        atomic_fetch_add(&c->got_other, 1);
}

static sb_message_type *make_type(const char *name, const sb_message_vtable *vt)
{
    sb_message_type *t = NULL;
    CHECK_EQ_INT(sb_message_type_create(name, vt, &t), SB_OK);
    return t;
}

/* Publishes one message of `type` (NULL data); returns sb_publish's result. */
static int publish1(sb_topic *topic, sb_message_type *type)
{
    sb_message *m = sb_message_create(type, NULL, NULL);
    if (m == NULL)
        return -1000;
    int r = sb_publish(topic, m);
    sb_message_unref(m);
    return r;
}

static void test_json_formatter(void)
{
    printf("json formatter\n");
    counts c;
    memset(&c, 0, sizeof c);
    c.json_a = make_type("fmt.json_a", &json_vtable);
    c.plain = make_type("fmt.plain", NULL);
    sb_topic *topic = sb_topic_create("fmt.topic");
    sb_subscription *sub = sb_subscribe_synchronous(topic, count_cb, &c);
    CHECK(sub != NULL);
    CHECK_EQ_INT(atomic_load(&c.got_change), 1); /* its Subscribe: no filter yet */

    CHECK_EQ_INT(sb_subscription_accept_formatters(sub, SB_FORMATTER_JSON), SB_OK);
    CHECK_EQ_INT(sb_last_error_code(), 0);
    /* Selective now: the type with to_json passes, the one without does not. */
    CHECK_EQ_INT(publish1(topic, c.json_a), 1);
    CHECK_EQ_INT(publish1(topic, c.plain), 0);
    CHECK_EQ_INT(atomic_load(&c.got_json_a), 1);
    CHECK_EQ_INT(atomic_load(&c.got_plain), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, c.json_a), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, c.plain), 0);
    /* Subscription changes have no to_json: another subscriber's Subscribe is filtered. */
    sb_subscription *other = sb_subscribe_synchronous(topic, count_cb, &c);
    CHECK_EQ_INT(atomic_load(&c.got_change), 2); /* only `other`'s own Subscribe */
    other = sb_unsubscribe_and_join(other);
    CHECK_EQ_INT(atomic_load(&c.got_change), 3); /* `other`'s final message, not `sub`'s */

    /* A type created later with to_json is accepted too; one without is not. */
    c.json_b = make_type("fmt.json_b_later", &json_vtable);
    sb_message_type *plain_later = make_type("fmt.plain_later", NULL);
    CHECK_EQ_INT(sb_topic_wants(topic, c.json_b), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, plain_later), 0);
    CHECK_EQ_INT(publish1(topic, c.json_b), 1);
    CHECK_EQ_INT(publish1(topic, plain_later), 0);
    CHECK_EQ_INT(atomic_load(&c.got_json_b), 1);
    CHECK_EQ_INT(atomic_load(&c.got_other), 0);

    /* Types and formatters add up: accepting `plain` by name adds it. */
    CHECK_EQ_INT(sb_subscription_accept_message_type(sub, c.plain), SB_OK);
    CHECK_EQ_INT(publish1(topic, c.plain), 1);
    CHECK_EQ_INT(publish1(topic, c.json_a), 1);
    CHECK_EQ_INT(atomic_load(&c.got_plain), 1);
    CHECK_EQ_INT(atomic_load(&c.got_json_a), 2);

    /* An explicit decline wins over the formatter, for that type only ... */
    CHECK_EQ_INT(sb_subscription_decline_message_type(sub, c.json_a), SB_OK);
    CHECK_EQ_INT(publish1(topic, c.json_a), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, c.json_a), 0);
    CHECK_EQ_INT(publish1(topic, c.json_b), 1);
    CHECK_EQ_INT(atomic_load(&c.got_json_a), 2);
    CHECK_EQ_INT(atomic_load(&c.got_json_b), 2);
    /* ... until the type is accepted by name again. */
    CHECK_EQ_INT(sb_subscription_accept_message_type(sub, c.json_a), SB_OK);
    CHECK_EQ_INT(publish1(topic, c.json_a), 1);
    CHECK_EQ_INT(atomic_load(&c.got_json_a), 3);

    /* SB_FILTER_NONE delivers everything; selective again brings the formatter back. */
    CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_NONE), SB_OK);
    CHECK_EQ_INT(publish1(topic, plain_later), 1);
    CHECK_EQ_INT(atomic_load(&c.got_other), 1);
    CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_SELECTIVE), SB_OK);
    CHECK_EQ_INT(publish1(topic, plain_later), 0);
    CHECK_EQ_INT(publish1(topic, c.json_b), 1);
    CHECK_EQ_INT(atomic_load(&c.got_json_b), 3);

    /* No change type accepted: the final message is filtered, the join still works. */
    int changes = atomic_load(&c.got_change);
    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(atomic_load(&c.got_change), changes);
    CHECK_EQ_INT(atomic_load(&c.got_other), 1);
    sb_topic_unref(topic);
    sb_message_type_unref(c.json_a);
    sb_message_type_unref(c.json_b);
    sb_message_type_unref(c.plain);
    sb_message_type_unref(plain_later);
}

static void test_bad_bits(void)
{
    printf("bad bits\n");
    counts c;
    memset(&c, 0, sizeof c);
    c.plain = make_type("fmt.bits.plain", NULL);
    sb_topic *topic = sb_topic_create("fmt.bits");
    sb_subscription *sub = sb_subscribe_synchronous(topic, count_cb, &c);

    CHECK_EQ_INT(sb_subscription_accept_formatters(sub, 2), SB_E_INVAL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK_ERR();
    CHECK_EQ_INT(sb_subscription_accept_formatters(sub, SB_FORMATTER_JSON | 0x80000000u),
                 SB_E_INVAL);
    CHECK_EQ_INT(sb_subscription_accept_formatters(NULL, SB_FORMATTER_JSON), SB_E_INVAL);
    CHECK_ERR();
    /* Refused calls changed nothing, and 0 changes nothing: not selective. */
    CHECK_EQ_INT(sb_subscription_accept_formatters(sub, 0), SB_OK);
    CHECK_EQ_INT(publish1(topic, c.plain), 1);
    CHECK_EQ_INT(atomic_load(&c.got_plain), 1);
    CHECK_EQ_INT(sb_topic_wants(topic, c.plain), 1);

    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    sb_topic_unref(topic);
    sb_message_type_unref(c.plain);
}

/* A type that was created without to_json and, once nobody used it, is created again
 * with one (a module reloaded with a newer version) is accepted from then on. */
static void test_revived_type(void)
{
    printf("revived type\n");
    counts c;
    memset(&c, 0, sizeof c);
    sb_message_type *t = make_type("fmt.revived", NULL);
    c.plain = t;
    sb_topic *topic = sb_topic_create("fmt.revived.topic");
    sb_subscription *sub = sb_subscribe_synchronous(topic, count_cb, &c);
    CHECK_EQ_INT(sb_subscription_accept_formatters(sub, SB_FORMATTER_JSON), SB_OK);
    CHECK_EQ_INT(publish1(topic, t), 0);
    CHECK_EQ_INT(sb_topic_wants(topic, t), 0);
    sb_message_type_unref(t); /* dormant: nobody holds it */

    sb_message_type *again = make_type("fmt.revived", &json_vtable);
    CHECK(again == t); /* a name means one type */
    char *j = NULL;
    sb_message *m = sb_message_create(again, NULL, NULL);
    j = sb_message_to_json(m);
    CHECK_STR(j, "{}");
    sb_string_free(j);
    CHECK_EQ_INT(sb_publish(topic, m), 1);
    sb_message_unref(m);
    CHECK_EQ_INT(sb_topic_wants(topic, again), 1);
    CHECK_EQ_INT(atomic_load(&c.got_plain), 1);

    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    sb_topic_unref(topic);
    sb_message_type_unref(again);
}

/* sb_topic_wants and delivery through a forward: the formatter-accepting subscription
 * of the destination counts for the source. A pool subscription, to cover the queued
 * path as well as the synchronous one. */
static void test_through_forward(void)
{
    printf("through a forward\n");
    counts c;
    memset(&c, 0, sizeof c);
    c.json_a = make_type("fmt.fw.json", &json_vtable);
    c.plain = make_type("fmt.fw.plain", NULL);
    sb_topic *src = sb_topic_create("fmt.fw.src");
    sb_topic *dst = sb_topic_create("fmt.fw.dst");
    sb_forward *fw = sb_forward_all(src, dst);
    CHECK(fw != NULL);
    sb_subscription *sub = sb_subscribe_pool(dst, count_cb, &c);
    WAIT_UNTIL(atomic_load(&c.got_change) == 1);
    CHECK_EQ_INT(sb_subscription_accept_formatters(sub, SB_FORMATTER_JSON), SB_OK);
    CHECK_EQ_INT(sb_topic_wants(src, c.json_a), 1);
    CHECK_EQ_INT(sb_topic_wants(src, c.plain), 0);
    for (int i = 0; i < 10; i++) {
        CHECK_EQ_INT(publish1(src, c.json_a), 1);
        CHECK_EQ_INT(publish1(src, c.plain), 0);
    }
    WAIT_UNTIL(atomic_load(&c.got_json_a) == 10);
    CHECK_STAYS(atomic_load(&c.got_plain) == 0, 50);

    CHECK(sb_unsubscribe_and_join(sub) == NULL);
    CHECK_EQ_INT(atomic_load(&c.got_json_a), 10);
    CHECK_EQ_INT(sb_topic_wants(src, c.json_a), 0);
    CHECK(sb_forward_cancel(fw) == NULL);
    sb_topic_unref(src);
    sb_topic_unref(dst);
    sb_message_type_unref(c.json_a);
    sb_message_type_unref(c.plain);
}

int main(void)
{
    TEST_INIT();
    CHECK_EQ_INT(SB_FORMATTER_JSON, 1);
    test_json_formatter();
    test_bad_bits();
    test_revived_type();
    test_through_forward();
    return TEST_DONE();
}
