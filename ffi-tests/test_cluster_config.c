/*
 * test_cluster_config.c - joining: configuration errors name the key, unreachable or
 * silent servers give SB_E_UNAVAILABLE / SB_E_TIMEOUT with the reason, credentials
 * (user/password, token) are accepted and wrong ones refused, TLS with a test CA works
 * and an unknown CA is refused, NULL handles are refused, leaving then joining again in
 * one process works, names too long for a subject are refused or never sent, and a
 * server's refusal of a permission fails the join or the share at once with its words.
 */
#include "test_util.h"
#include "nats_harness.h"

static sb_cluster_config *cfg_for(const char *servers)
{
    sb_cluster_config *cfg = sb_cluster_config_new();
    CHECK(cfg != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "servers", servers), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "connect_timeout_ms", "3000"), SB_OK);
    return cfg;
}

static void test_bad_config(void)
{
    sb_cluster_config *cfg = sb_cluster_config_new();
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "no_such_key", "1"), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "no_such_key") != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "heartbeat_ms", "soon"), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "heartbeat_ms") != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "heartbeat_ms", "0"), SB_E_INVAL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "down_after_missed", "-1"), SB_E_INVAL);
    /* allocated at join: past 10,000,000 an allocation might abort, so refused here */
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "out_queue_limit", "10000001"), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "out_queue_limit") != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "out_queue_limit", "10000000"), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "servers", "http://127.0.0.1:1"), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "servers") != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "prefix", "has.dot"), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "prefix") != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "tls_required", "yes"), SB_E_INVAL);
    CHECK_EQ_INT(sb_cluster_config_set(NULL, "prefix", "x"), SB_E_INVAL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, NULL, "x"), SB_E_INVAL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "prefix", NULL), SB_E_INVAL);
    /* a later set of the same key overwrites */
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "heartbeat_ms", "500"), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "heartbeat_ms", "700"), SB_OK);
    /* servers is required */
    CHECK(sb_cluster_join(cfg) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "servers") != NULL);
    /* user without password */
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "servers", "nats://127.0.0.1:1"), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "user", "u"), SB_OK);
    CHECK(sb_cluster_join(cfg) == NULL);
    CHECK(strstr(sb_last_error(), "password") != NULL);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "user", ""), SB_OK); /* "" unsets */
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "tls_ca_file", "/nonexistent/ca.pem"), SB_OK);
    CHECK(sb_cluster_join(cfg) == NULL);
    CHECK(strstr(sb_last_error(), "tls_ca_file") != NULL);
    sb_cluster_config_free(cfg);
    sb_cluster_config_free(NULL);
    CHECK(sb_cluster_join(NULL) == NULL);
    /* NULL handles */
    CHECK_EQ_INT(sb_cluster_share_topic(NULL, NULL), SB_E_INVAL);
    CHECK_EQ_INT(sb_cluster_get_stats(NULL, NULL), SB_E_INVAL);
    CHECK(sb_cluster_nodes(NULL) == NULL);
    CHECK(sb_cluster_topic(NULL) == NULL);
    CHECK(sb_cluster_leave(NULL) == NULL);
    CHECK(sb_cluster_node_type() != NULL);
}

static void test_unreachable(void)
{
    /* nothing listens: refused at once. The port is held by a socket bound to it and not
     * listening (a connection there is refused), so no other program can take it
     * meanwhile and answer. */
    int hold = nh_loopback_bind(0, 0);
    CHECK(hold >= 0);
    int port = nh_local_port(hold);
    CHECK(port > 0);
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", port);
    sb_cluster_config *cfg = cfg_for(url);
    long long t0 = nh_now_ms();
    CHECK(sb_cluster_join(cfg) == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_UNAVAILABLE);
    CHECK(nh_now_ms() - t0 < 3000 + 2000);
    CHECK(strstr(sb_last_error(), url) != NULL);
    sb_cluster_config_free(cfg);
    close(hold);

    /* something listens but never answers: SB_E_TIMEOUT after connect_timeout_ms */
    int fd = nh_loopback_bind(0, 0);
    CHECK(fd >= 0);
    CHECK(listen(fd, 4) == 0);
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", nh_local_port(fd));
    cfg = cfg_for(url);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "connect_timeout_ms", "500"), SB_OK);
    t0 = nh_now_ms();
    sb_cluster *c = sb_cluster_join(cfg);
    long long took = nh_now_ms() - t0;
    CHECK(c == NULL);
    CHECK_EQ_INT(sb_last_error_code(), SB_E_TIMEOUT);
    CHECK(strstr(sb_last_error(), "connect_timeout_ms") != NULL ||
          strstr(sb_last_error(), "timed out") != NULL);
    CHECK(took >= 400 && took < 500 + 6000);
    sb_cluster_config_free(cfg);
    close(fd);
}

/* The outcome of join_with's join (the config's free afterwards is a call of its own). */
static int join_code;
static char join_error[512];

static sb_cluster *join_with(const nh_server *s, const char *k1, const char *v1, const char *k2,
                             const char *v2, const char *url)
{
    sb_cluster_config *cfg = cfg_for(url ? url : s->url);
    if (k1)
        CHECK_EQ_INT(sb_cluster_config_set(cfg, k1, v1), SB_OK);
    if (k2)
        CHECK_EQ_INT(sb_cluster_config_set(cfg, k2, v2), SB_OK);
    sb_cluster *c = sb_cluster_join(cfg);
    join_code = sb_last_error_code();
    snprintf(join_error, sizeof join_error, "%s", sb_last_error());
    sb_cluster_config_free(cfg);
    return c;
}

static void test_credentials(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.user = "pbx";
    o.password = "s3cret";
    CHECK(nh_server_start(&s, &o) == 0);
    sb_cluster *c = join_with(&s, "user", "pbx", "password", "s3cret", NULL);
    CHECK(c != NULL);
    c = sb_cluster_leave(c);
    c = join_with(&s, "user", "pbx", "password", "wrong", NULL);
    CHECK(c == NULL);
    CHECK_EQ_INT(join_code, SB_E_UNAVAILABLE);
    CHECK(strstr(join_error, "uthoriz") != NULL); /* the server's reason */
    c = join_with(&s, NULL, NULL, NULL, NULL, NULL);
    CHECK(c == NULL);
    nh_server_free(&s);

    memset(&o, 0, sizeof o);
    o.token = "t0ken";
    CHECK(nh_server_start(&s, &o) == 0);
    c = join_with(&s, "token", "t0ken", NULL, NULL, NULL);
    CHECK(c != NULL);
    c = sb_cluster_leave(c);
    c = join_with(&s, "token", "nope", NULL, NULL, NULL);
    CHECK(c == NULL);
    CHECK_EQ_INT(join_code, SB_E_UNAVAILABLE);
    CHECK(strstr(join_error, "uthoriz") != NULL);
    nh_server_free(&s);
}

static void test_tls(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.tls = 1;
    if (nh_server_start(&s, &o) != 0) {
        CHECK(!"TLS server started");
        return;
    }
    sb_cluster *c = join_with(&s, "tls_ca_file", s.ca_file, NULL, NULL, s.tls_url);
    CHECK(c != NULL);
    if (c == NULL)
        printf("TLS join: %s\n", join_error);
    sb_cluster_stats st;
    memset(&st, 0, sizeof st);
    CHECK_EQ_INT(sb_cluster_get_stats(c, &st), SB_OK);
    CHECK_EQ_INT(st.connected, 1);
    c = sb_cluster_leave(c);
    /* without our CA the server's certificate is not trusted */
    c = join_with(&s, "tls_required", "1", NULL, NULL, s.tls_url);
    CHECK(c == NULL);
    CHECK_EQ_INT(join_code, SB_E_UNAVAILABLE);
    nh_server_free(&s);

    /* the server requires a client certificate of its CA */
    memset(&o, 0, sizeof o);
    o.tls = 1;
    o.tls_verify = 1;
    CHECK(nh_server_start(&s, &o) == 0);
    c = join_with(&s, "tls_ca_file", s.ca_file, NULL, NULL, s.tls_url);
    CHECK(c == NULL);
    sb_cluster_config *cfg = cfg_for(s.tls_url);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "tls_ca_file", s.ca_file), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "tls_cert_file", s.client_cert_file), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "tls_key_file", s.client_key_file), SB_OK);
    c = sb_cluster_join(cfg);
    CHECK(c != NULL);
    if (c == NULL)
        printf("TLS client cert join: %s\n", sb_last_error());
    sb_cluster_config_free(cfg);
    c = sb_cluster_leave(c);
    nh_server_free(&s);
}

static void test_leave_and_join_again(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    CHECK(nh_server_start(&s, &o) == 0);
    sb_topic *t = sb_topic_create("again");
    for (int i = 0; i < 3; i++) {
        /* a key set twice: the second value wins */
        sb_cluster *c = join_with(&s, "node_name", "first", "node_name", "again", NULL);
        CHECK(c != NULL);
        CHECK_EQ_INT(sb_cluster_share_topic(c, t), SB_OK);
        CHECK_EQ_INT(sb_cluster_share_topic(c, t), SB_OK); /* sharing twice is harmless */
        sb_message_list *l = sb_cluster_nodes(c);
        CHECK(l != NULL && sb_message_list_len(l) == 1);
        if (l && sb_message_list_len(l) == 1) {
            const sb_cluster_node *n = (const sb_cluster_node *)sb_message_data(sb_message_list_get(l, 0));
            sb_eid me = sb_eid_default();
            CHECK(sb_eid_cmp(&n->eid, &me) == 0);
            CHECK_STR(n->name, "again");
            CHECK_EQ_INT(n->state, SB_NODE_UP);
            CHECK(sb_message_get_type(sb_message_list_get(l, 0)) == sb_cluster_node_type());
        }
        sb_message_list_free(l);
        CHECK_EQ_INT(sb_cluster_unshare_topic(c, t), SB_OK);
        CHECK_EQ_INT(sb_cluster_unshare_topic(c, t), SB_E_STATE);
        c = sb_cluster_leave(c);
        CHECK(c == NULL);
    }
    sb_topic_unref(t);
    nh_server_free(&s);
}

static const char *cache_id(sb_message *msg)
{
    (void)msg;
    return "k";
}

/* A topic, a cache and the caching topic between them. */
typedef struct cached_topic {
    sb_topic *t;
    sb_cache *cache;
    sb_caching_topic *ct;
} cached_topic;

static cached_topic cached_topic_new(const char *name)
{
    cached_topic x;
    x.t = sb_topic_create(name);
    x.cache = sb_cache_create(cache_id);
    x.ct = sb_caching_topic_create(x.t, x.cache);
    CHECK(x.t != NULL && x.cache != NULL && x.ct != NULL);
    return x;
}

static void cached_topic_free(cached_topic *x)
{
    x->ct = sb_caching_unsubscribe_and_join(x->ct);
    sb_cache_unref(x->cache);
    sb_topic_unref(x->t);
}

/* A counter of the (first) live cluster in sb_stats_json ("\"store_errors\":"); -1 when
 * none is listed. */
static long long cluster_counter(const char *key)
{
    char *json = sb_stats_json();
    const char *p = json ? strstr(json, key) : NULL;
    long long v = p ? strtoll(p + strlen(key), NULL, 10) : -1;
    sb_string_free(json);
    return v;
}

static long long store_errors(void) { return cluster_counter("\"store_errors\":"); }
static long long server_errors(void) { return cluster_counter("\"server_errors\":"); }

/* Two clusters joined at once (two prefixes) cannot both tap one topic: the second
 * share, export or cache share is refused with SB_E_STATE (it used to take the first
 * one's tap: the first stopped sending what it still listed as shared). Once the first
 * gives the topic up (unshare, leave), the second may take it. */
static void test_two_clusters_one_topic(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    CHECK(nh_server_start(&s, &o) == 0);
    sb_cluster *c1 = join_with(&s, "prefix", "one", NULL, NULL, NULL);
    sb_cluster *c2 = join_with(&s, "prefix", "two", NULL, NULL, NULL);
    CHECK(c1 != NULL && c2 != NULL);
    if (!c1 || !c2) {
        sb_cluster_leave(c1);
        sb_cluster_leave(c2);
        nh_server_free(&s);
        return;
    }
    sb_topic *t = sb_topic_create("twice");
    CHECK_EQ_INT(sb_cluster_share_topic(c1, t), SB_OK);
    CHECK_EQ_INT(sb_cluster_share_topic(c2, t), SB_E_STATE);
    CHECK(strstr(sb_last_error(), "another cluster handle") != NULL);
    CHECK_EQ_INT(sb_cluster_export_json(c2, t), SB_E_STATE);
    CHECK_EQ_INT(sb_cluster_unshare_topic(c2, t), SB_E_STATE); /* never its own */
    CHECK_EQ_INT(sb_cluster_share_topic(c1, t), SB_OK);        /* again: still c1's */
    /* given up by c1: c2 takes it */
    CHECK_EQ_INT(sb_cluster_unshare_topic(c1, t), SB_OK);
    CHECK_EQ_INT(sb_cluster_share_topic(c2, t), SB_OK);
    CHECK_EQ_INT(sb_cluster_share_topic(c1, t), SB_E_STATE);
    CHECK_EQ_INT(sb_cluster_unshare_topic(c2, t), SB_OK);

    /* a shared cache: its topic and its caching topic are both claimed */
    cached_topic x = cached_topic_new("twice_cached");
    CHECK_EQ_INT(sb_cluster_share_cache(c1, x.ct), SB_OK);
    CHECK_EQ_INT(sb_cluster_share_cache(c1, x.ct), SB_OK); /* twice: harmless */
    CHECK_EQ_INT(sb_cluster_share_cache(c2, x.ct), SB_E_STATE);
    CHECK_EQ_INT(sb_cluster_share_topic(c2, x.t), SB_E_STATE);
    /* one topic has one tap: c1 cannot also share its caching topic as a topic */
    CHECK_EQ_INT(sb_cluster_share_topic(c1, sb_caching_get_topic(x.ct)), SB_E_STATE);
    CHECK_EQ_INT(sb_cluster_export_json(c1, sb_caching_get_topic(x.ct)), SB_E_STATE);
    /* another cache fed by a topic c1 shares: refused, and its caching topic is not
     * left claimed by c2 (c1 may take it) */
    sb_cache *cache2 = sb_cache_create(cache_id);
    sb_caching_topic *ct2 = sb_caching_topic_create(x.t, cache2);
    CHECK_EQ_INT(sb_cluster_share_cache(c2, ct2), SB_E_STATE);
    CHECK_EQ_INT(sb_cluster_share_topic(c1, sb_caching_get_topic(ct2)), SB_OK);
    CHECK_EQ_INT(sb_cluster_unshare_topic(c1, sb_caching_get_topic(ct2)), SB_OK);
    /* a cache whose caching topic c1 shares as a topic: not shared through it */
    cached_topic y = cached_topic_new("twice_cached_y");
    CHECK_EQ_INT(sb_cluster_share_topic(c1, sb_caching_get_topic(y.ct)), SB_OK);
    CHECK_EQ_INT(sb_cluster_share_cache(c1, y.ct), SB_E_STATE);
    CHECK_EQ_INT(sb_cluster_unshare_topic(c1, sb_caching_get_topic(y.ct)), SB_OK);
    CHECK_EQ_INT(sb_cluster_unshare_topic(c1, y.t), SB_E_STATE); /* never shared */
    cached_topic_free(&y);
    /* c1 leaves: everything it held is free */
    c1 = sb_cluster_leave(c1);
    CHECK(c1 == NULL);
    CHECK_EQ_INT(sb_cluster_share_cache(c2, x.ct), SB_OK);
    CHECK_EQ_INT(sb_cluster_unshare_topic(c2, x.t), SB_OK);
    CHECK_EQ_INT(sb_cluster_share_cache(c2, ct2), SB_OK);
    c2 = sb_cluster_leave(c2);
    CHECK(c2 == NULL);
    ct2 = sb_caching_unsubscribe_and_join(ct2);
    sb_cache_unref(cache2);
    cached_topic_free(&x);
    sb_topic_unref(t);
    nh_server_free(&s);
}

static void on_msg(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    (void)msg;
}

/* Names that make no subject token a server takes (over 1024 bytes once escaped) are
 * refused where an error can be returned and never sent where none can: a server closes
 * the connection on a protocol line over 4 KB, and the client sends it again on each
 * reconnect (a node sharing such a topic, or importing such a type, never stayed
 * connected). */
static void test_names_too_long(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    CHECK(nh_server_start(&s, &o) == 0);
    sb_cluster *c = join_with(&s, NULL, NULL, NULL, NULL, NULL);
    CHECK(c != NULL);
    if (c == NULL) {
        nh_server_free(&s);
        return;
    }
    static char name[2048];
    memset(name, 'a', 1025);
    name[1025] = '\0';
    sb_topic *too_long = sb_topic_create(name);
    CHECK_EQ_INT(sb_cluster_share_topic(c, too_long), SB_E_INVAL);
    CHECK(strstr(sb_last_error(), "too long") != NULL);
    CHECK_EQ_INT(sb_cluster_export_json(c, too_long), SB_E_INVAL);
    memset(name, ':', 1400); /* escaped: 4,200 bytes, a protocol line over 4 KB */
    name[1400] = '\0';
    sb_topic *escaped_too_long = sb_topic_create(name);
    CHECK_EQ_INT(sb_cluster_share_topic(c, escaped_too_long), SB_E_INVAL);
    memset(name, 'a', 1024);
    name[1024] = '\0';
    sb_topic *longest = sb_topic_create(name);
    CHECK_EQ_INT(sb_cluster_share_topic(c, longest), SB_OK);

    /* a type too long: a subscriber that asks for it alone is not subscribed on the
     * server for it, its messages are counted and not sent */
    memset(name, ';', 1400);
    name[1400] = '\0';
    sb_message_type *ty = NULL;
    CHECK_EQ_INT(sb_message_type_create(name, NULL, &ty), SB_OK);
    sb_subscription *sub = sb_subscribe(longest, on_msg, NULL);
    CHECK_EQ_INT(sb_subscription_accept_message_type(sub, ty), SB_OK);
    CHECK_EQ_INT(sb_subscription_set_filter(sub, SB_FILTER_SELECTIVE), SB_OK);
    sb_message *m = sb_message_create_bytes(ty, "x", 1);
    sb_publish(longest, m);
    sb_eid other;
    CHECK_EQ_INT(sb_eid_from_str("00:00:00:00:00:99", &other), SB_OK);
    CHECK_EQ_INT(sb_cluster_publish_to(c, &other, longest, m), SB_E_INVAL);
    CHECK_EQ_INT(sb_cluster_publish_to(c, &other, too_long, m), SB_E_INVAL);
    sb_message_unref(m);
    sb_cluster_stats st;
    memset(&st, 0, sizeof st);
    WAIT_UNTIL(sb_cluster_get_stats(c, &st) == SB_OK && st.dropped_out == 1);
    tu_sleep_ms(1500);
    CHECK_EQ_INT(sb_cluster_get_stats(c, &st), SB_OK);
    CHECK_EQ_INT(st.reconnects, 0);
    CHECK_EQ_INT(st.connected, 1);
    CHECK_EQ_INT(st.dropped_out, 1);

    sub = sb_unsubscribe_and_join(sub);
    CHECK(sub == NULL);
    c = sb_cluster_leave(c);
    sb_message_type_unref(ty);
    sb_topic_unref(too_long);
    sb_topic_unref(escaped_too_long);
    sb_topic_unref(longest);
    nh_server_free(&s);
}

/* A server without JetStream: sharing a cache fails with the server's reason (it was a
 * timeout: the answer came after the caller stopped waiting), and sharing goes on behind
 * it with pauses that grow (it retried ten times a second, forever). */
static void test_no_jetstream(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.no_jetstream = 1;
    CHECK(nh_server_start(&s, &o) == 0);
    sb_cluster *c = join_with(&s, "connect_timeout_ms", "1000", NULL, NULL, NULL);
    CHECK(c != NULL);
    if (c == NULL) {
        nh_server_free(&s);
        return;
    }
    cached_topic x = cached_topic_new("nojs");
    CHECK_EQ_INT(sb_cluster_share_cache(c, x.ct), SB_E_UNAVAILABLE);
    CHECK(strstr(sb_last_error(), "JetStream") != NULL);
    long long before = store_errors();
    tu_sleep_ms(3000);
    long long grew = store_errors() - before;
    printf("store errors in 3 s of sharing a cache without JetStream: %lld\n", grew);
    /* pauses of 1, 2, 4 s (heartbeat_ms 1000): a few tries of a few requests each */
    CHECK(grew >= 0 && grew <= 10);
    c = sb_cluster_leave(c);
    cached_topic_free(&x);
    nh_server_free(&s);
}

/* The accounts of test_permissions. "readme" has exactly the permissions the README lists
 * for a node of prefix "sb" (its "Permissions" paragraph): keep the two the same. */
#define PERMISSION_USERS                                                                  \
    "authorization {\n  users = [\n"                                                       \
    "    { user: readme, password: pw, permissions: {\n"                                  \
    "        publish: { allow: [\"sb.>\", \"$JS.API.>\", \"$KV.sb_state.>\"] }\n"          \
    "        subscribe: { allow: [\"sb.>\", \"_INBOX.>\"] } } }\n"                         \
    "    { user: nopub, password: pw, permissions: { publish: { deny: [\"sb.>\"] } } }\n"   \
    "    { user: nosub, password: pw, permissions: { subscribe: { deny: [\"sb.>\"] } } }\n" \
    "    { user: nomsg, password: pw, permissions: { subscribe: { deny: [\"sb.m.>\"] } } }\n" \
    "    { user: nojs, password: pw, permissions: { publish: { deny: [\"$JS.API.>\"] } } }\n" \
    "    { user: noinbox, password: pw, permissions: { subscribe: { deny: [\"_INBOX.>\"] } } }\n" \
    "  ]\n}\n"

/* A server refusing this node an operation answers -ERR and goes on: the join and a share
 * fail at once with the server's words (not after connect_timeout_ms, not "no answer"),
 * the refusal is logged and counted in server_errors, and a node with the README's
 * permissions works. */
static void test_permissions(void)
{
    nh_server s;
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.extra_conf = PERMISSION_USERS;
    CHECK(nh_server_start(&s, &o) == 0);
    /* no publishing, no subscribing to its subjects, no answers to its requests */
    const char *deaf_or_mute[] = {"nopub", "nosub", "noinbox"};
    for (int i = 0; i < 3; i++) {
        long long t0 = nh_now_ms();
        sb_cluster *c = join_with(&s, "user", deaf_or_mute[i], "password", "pw", NULL);
        long long took = nh_now_ms() - t0;
        printf("join as %s: %lld ms, '%s'\n", deaf_or_mute[i], took, join_error);
        CHECK(c == NULL);
        CHECK_EQ_INT(join_code, SB_E_UNAVAILABLE);
        CHECK(strstr(join_error, "Permissions Violation") != NULL);
        CHECK(strstr(join_error, i < 2 ? "\"sb." : "\"_INBOX.") != NULL); /* the subject */
        CHECK(took < 2500);                         /* connect_timeout_ms is 3000 */
        c = sb_cluster_leave(c);
    }

    /* heartbeat_ms 10: the io loop looks at the node's interest every 5 ms, so it often
     * makes a share's subscription before the share's own request reaches it */
    sb_cluster_config *cfg = cfg_for(s.url);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "user", "nomsg"), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "password", "pw"), SB_OK);
    CHECK_EQ_INT(sb_cluster_config_set(cfg, "heartbeat_ms", "10"), SB_OK);
    sb_cluster *c = sb_cluster_join(cfg);
    sb_cluster_config_free(cfg);
    CHECK(c != NULL);
    if (c != NULL) {
        sb_topic *t = sb_topic_create("perm/denied");
        /* a local subscriber: the node subscribes to what it has subscribers for */
        sb_subscription *sub = sb_subscribe(t, on_msg, NULL);
        CHECK(sub != NULL);
        int refused = 0;
        for (int i = 0; i < 40; i++) {
            int rc = sb_cluster_share_topic(c, t);
            refused += rc == SB_E_UNAVAILABLE &&
                       strstr(sb_last_error(), "Permissions Violation for Subscription") &&
                       strstr(sb_last_error(), "sb.m.perm/denied");
            CHECK_EQ_INT(sb_cluster_unshare_topic(c, t), SB_OK);
        }
        CHECK_EQ_INT(refused, 40);
        CHECK(server_errors() >= 1); /* a topic shared again may keep its subscription */
        c = sb_cluster_leave(c);
        sb_unsubscribe_and_join(sub);
        sb_topic_unref(t);
    }

    c = join_with(&s, "user", "nojs", "password", "pw", NULL);
    CHECK(c != NULL);
    if (c != NULL) {
        cached_topic x = cached_topic_new("perm/nojs");
        long long t0 = nh_now_ms();
        CHECK_EQ_INT(sb_cluster_share_cache(c, x.ct), SB_E_UNAVAILABLE);
        long long took = nh_now_ms() - t0;
        printf("share_cache as nojs: %lld ms, '%s'\n", took, sb_last_error());
        CHECK(strstr(sb_last_error(), "Permissions Violation") != NULL);
        CHECK(strstr(sb_last_error(), "$JS.API.") != NULL);
        CHECK(took < 2500); /* not a timeout */
        c = sb_cluster_leave(c);
        cached_topic_free(&x);
    }

    c = join_with(&s, "user", "readme", "password", "pw", NULL);
    CHECK(c != NULL);
    if (c != NULL) {
        cached_topic x = cached_topic_new("perm/readme");
        CHECK_EQ_INT(sb_cluster_share_cache(c, x.ct), SB_OK);
        sb_message_type *ty = NULL;
        CHECK_EQ_INT(sb_message_type_create("perm.bytes", NULL, &ty), SB_OK);
        for (int i = 0; i < 20; i++) {
            sb_message *m = sb_message_create_bytes(ty, "state", 5);
            CHECK(sb_publish(x.t, m) >= 0);
            sb_message_unref(m);
        }
        tu_sleep_ms(1500); /* a heartbeat, the store's acknowledgements */
        sb_cluster_stats st;
        CHECK_EQ_INT(sb_cluster_get_stats(c, &st), SB_OK);
        CHECK(st.sent >= 20);
        CHECK_EQ_INT(server_errors(), 0);
        CHECK_EQ_INT(store_errors(), 0);
        c = sb_cluster_leave(c);
        cached_topic_free(&x);
        sb_message_type_unref(ty);
    }
    nh_server_free(&s);
}

int main(void)
{
    TEST_INIT();
    test_bad_config();
    test_unreachable();
    if (nh_require_server()) {
        test_credentials();
        test_tls();
        test_leave_and_join_again();
        test_two_clusters_one_topic();
        test_names_too_long();
        test_no_jetstream();
        test_permissions();
    }
    return TEST_DONE();
}
