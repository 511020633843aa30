/*
 * cluster_node.h - a cluster node process for the C cluster tests, driven line by line.
 *
 * A cluster test runs real nats-server processes (nats_harness.h) and several node
 * processes: the test program itself run again with argv[1] == "node", whose main()
 * calls cn_node_main(). The parent sends one command per line and reads one reply line:
 * "ok ..." or "err <code> <last error>". cn_cmd() does both and returns the reply.
 *
 * Include test_util.h, then nats_harness.h, then this header.
 *
 * Node commands (names are topic names; every topic has a recorder subscription):
 *   eid E                          sb_eid_set_default
 *   join SERVERS PREFIX NAME HB_MS [key=value ...]
 *   topic T [TYPE]                 create T with a recorder (accepting only TYPE if given;
 *                                  ":json": only the types that have to_json, by formatter)
 *   share T / unshare T / json T   sb_cluster_share_topic / _unshare_topic / _export_json
 *   forward FROM TO                sb_forward_all
 *   slowsub T MS                   a synchronous subscription to T whose callback sleeps MS ms
 *                                  on each message of type "slow" (blocks the delivery thread)
 *   stallsub T MS                  the same, sleeping on the first "stall" message only
 *   pub T TYPE N TAG               N bytes messages "TAG:i" (i = 0..N-1) on T
 *   pubc T TYPE N                  N messages of a codec type (value i)
 *   pubcagg T TYPE N               N codec-type aggregates (no eid: never sent)
 *   nocodec TYPE                   sb_message_type_set_codec(TYPE, NULL, NULL)
 *   tojson TYPE                    ok JSON | ok none: sb_message_to_json of a bytes message
 *                                  "x" of TYPE, created as the other commands do (a name
 *                                  starting with "json" with to_json), as a module loaded
 *                                  again would
 *   pubto EID T TYPE TEXT          sb_cluster_publish_to
 *   count T                        ok total remote order_violations codec_values_ok
 *                                  (order: "TAG:i" per sender and tag, i = 0, 1, 2...)
 *   stats                          ok sent received dropped_out dropped_in reconnects connected nodes_up
 *   storeerr                       ok JSON PROM   this cluster's store_errors as sb_stats_json
 *                                  and sb_stats_prometheus report it (-1: not listed)
 *   logged WORDS...                ok N   log lines so far that contain WORDS (joined by one
 *                                  space; the node logs through a handler that also prints
 *                                  them on stderr, after the node's name)
 *   nodes                          ok N eid=state...   (sb_cluster_nodes)
 *   events                         ok N LAST_EID LAST_STATE (node messages seen on sb_cluster_topic)
 *   cache T [agg]                  a cache (with a sum aggregate) + caching topic on T
 *   sharecache T                   sb_cluster_share_cache
 *   put T TYPE ID VALUE            publish snapshot "ID\0VALUE" on T
 *   putn T TYPE N IDPREFIX         N snapshots IDPREFIXi = i
 *   clear T TYPE ID                publish a cache clear of our snapshot of ID
 *   dump T TYPE                    ok all local remote   (dump_all; by eid)
 *   get T TYPE ID EID              ok VALUE | ok none    (get_by_eid)
 *   agg T TYPE ID                  ok VALUE | ok none    (the aggregate)
 *   updates T                      ok N                  (cache updates seen)
 *   shareonclear T U [V]           a synchronous subscription to T's caching topic whose
 *                                  callback, at the first clear of another node's entry,
 *                                  shares topic U (sb_cluster_share_topic from a callback
 *                                  on the cluster's delivery thread), then V's cache
 *   cbshare                        ok RC [RCV SAYS]   those shares' results (1: not called
 *                                  yet, 2: running); SAYS: 1 when V's error names the
 *                                  delivery thread
 *   fork SERVERS PREFIX            fork: the child checks the inherited handle is refused,
 *                                  joins on its own and publishes one message on topic
 *                                  "forked"; ok CHILD_EXIT_CODE
 *   leave                          sb_cluster_leave
 *   quit                           clean up and exit 0
 */
#ifndef SB_CLUSTER_NODE_H
#define SB_CLUSTER_NODE_H

#ifndef SB_NATS_HARNESS_H
#error "include nats_harness.h before cluster_node.h"
#endif

#define CN_TOPICS 12
#define CN_SENDERS 8

typedef struct cn_topic {
    char name[96];
    sb_topic *topic;
    sb_subscription *sub;
    atomic_long total, remote, order_bad, codec_ok;
    /* order: per sender eid, the last index seen (callbacks are serialized per sub) */
    sb_eid senders[CN_SENDERS];
    char tags[CN_SENDERS][16];
    long last[CN_SENDERS];
    int nsenders;
    sb_cache *cache;
    sb_caching_topic *ct;
    sb_subscription *updates_sub;
    atomic_long updates;
    sb_subscription *clear_sub; /* shareonclear */
    sb_topic *share_on_clear;
    struct cn_topic *share_cache_on_clear;
} cn_topic;

/* Cluster tests also run their node processes instrumented under ThreadSanitizer (the
 * same binary): there, as under valgrind, workloads shrink and timing bounds are not
 * checked (waits stay bounded). */
static inline int cn_slow(void) { return tu_slow() || tu_tsan(); }
static inline int cn_scale(int normal, int slow) { return cn_slow() ? slow : normal; }

static void cn_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* WAIT_UNTIL with a bound of its own (seconds natively; 120 s in slow modes), for waits
 * on heavy workloads. Records a failure on timeout. */
#define CN_WAIT_UNTIL(cond, secs)                                                            \
    do {                                                                                     \
        long long cn_deadline_ = nh_now_ms() + (cn_slow() ? 120000LL : (secs) * 1000LL);     \
        while (!(cond) && nh_now_ms() < cn_deadline_)                                        \
            cn_sleep_ms(5);                                                                  \
        tu_check((cond) ? 1 : 0, __FILE__, __LINE__, "timeout waiting for " #cond);          \
    } while (0)

static struct {
    sb_cluster *cluster;
    cn_topic topics[CN_TOPICS];
    int ntopics;
    sb_subscription *events_sub;
    atomic_long events;
    atomic_int last_event_state;
    sb_eid last_event_eid;
    pthread_mutex_t lock;
    atomic_int cb_share_rc; /* shareonclear: 1 until called, 2 while running */
    atomic_int cb_share_cache_rc, cb_share_cache_says;
} cn;

/* The node's log: every line goes to stderr as without a handler, and the first
 * CN_LOG_MAX are kept for "logged". */
#define CN_LOG_MAX 4096
static struct {
    pthread_mutex_t lock;
    char *lines[CN_LOG_MAX];
    int n;
} cn_log;

/* The node's name once it joined: a test's stderr interleaves several nodes' lines. */
static char cn_name_buf[64];
static _Atomic(const char *) cn_name;

static void cn_log_line(void *data, int level, const char *text)
{
    (void)data;
    static const char *const names[] = {"?", "Error", "Warning", "Notice", "Debug"};
    const char *name = atomic_load_explicit(&cn_name, memory_order_acquire);
    fprintf(stderr, "switchboard (node %s): %s: %s\n", name != NULL ? name : "-",
            names[level >= 1 && level <= 4 ? level : 0], text);
    pthread_mutex_lock(&cn_log.lock);
    if (cn_log.n < CN_LOG_MAX) {
        char *copy = strdup(text);
        if (copy != NULL)
            cn_log.lines[cn_log.n++] = copy;
    }
    pthread_mutex_unlock(&cn_log.lock);
}

static long cn_logged(const char *needle)
{
    long n = 0;
    pthread_mutex_lock(&cn_log.lock);
    for (int i = 0; i < cn_log.n; i++)
        n += strstr(cn_log.lines[i], needle) != NULL;
    pthread_mutex_unlock(&cn_log.lock);
    return n;
}

/* The codec type's data: a value, encoded as 4 bytes little-endian plus a 16-byte tag. */
typedef struct cn_value {
    int32_t value;
    char tag[16];
} cn_value;

static char *cn_encode(const sb_message *msg, size_t *len)
{
    const cn_value *v = (const cn_value *)sb_message_data(msg);
    unsigned char *b = (unsigned char *)malloc(20);
    if (b == NULL)
        return NULL;
    uint32_t u = (uint32_t)v->value;
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(u >> (8 * i));
    memcpy(b + 4, v->tag, 16);
    *len = 20;
    return (char *)b;
}

/* An encoder that returns a length no buffer has ((size_t)-1: a -1 gone through a cast). */
static char *cn_encode_huge(const sb_message *msg, size_t *len)
{
    (void)msg;
    char *b = (char *)malloc(3);
    if (b != NULL)
        memcpy(b, "big", 3);
    *len = (size_t)-1;
    return b;
}

/* An encoder whose output the decoders refuse (3 bytes). */
static char *cn_encode_short(const sb_message *msg, size_t *len)
{
    (void)msg;
    char *b = (char *)malloc(3);
    if (b != NULL)
        memcpy(b, "bad", 3);
    *len = 3;
    return b;
}

static void cn_free(void *p) { free(p); }

static void *cn_decode(const void *bytes, size_t len, sb_data_dtor *dtor)
{
    if (len != 20)
        return NULL;
    const unsigned char *b = (const unsigned char *)bytes;
    cn_value *v = (cn_value *)calloc(1, sizeof *v);
    if (v == NULL)
        return NULL;
    uint32_t u = 0;
    for (int i = 0; i < 4; i++)
        u |= (uint32_t)b[i] << (8 * i);
    v->value = (int32_t)u;
    memcpy(v->tag, b + 4, 16);
    v->tag[15] = '\0';
    *dtor = cn_free;
    return v;
}

static char *cn_to_json(const sb_message *msg)
{
    char *out = (char *)malloc(256);
    if (out != NULL)
        snprintf(out, 256, "{\"text\":\"%.*s\"}", (int)sb_message_data_len(msg),
                 (const char *)sb_message_data(msg));
    return out;
}

/* A command's word names a type; '~' in it stands for a line break (which no command
 * word can hold). */
static sb_message_type *cn_type(const char *word)
{
    char name[256];
    snprintf(name, sizeof name, "%s", word);
    for (char *c = name; *c; c++)
        if (*c == '~')
            *c = '\n';
    sb_message_type *ty = NULL;
    if (strncmp(name, "codec", 5) == 0) {
        if (sb_message_type_create(name, NULL, &ty) != SB_OK)
            return NULL;
        /* the codec is set on the type's first use only ("nocodec" removes it for good) */
        static char configured[16][256];
        static int nconfigured;
        for (int i = 0; i < nconfigured; i++)
            if (strcmp(configured[i], name) == 0)
                return ty;
        if (nconfigured < 16)
            snprintf(configured[nconfigured++], sizeof configured[0], "%s", name);
        int bad = strstr(name, "bad") != NULL, huge = strstr(name, "huge") != NULL;
        sb_message_type_set_codec(ty, bad ? cn_encode_short : huge ? cn_encode_huge : cn_encode,
                                  cn_decode);
    } else if (strncmp(name, "json", 4) == 0) {
        sb_message_vtable vt = {cn_to_json};
        if (sb_message_type_create(name, &vt, &ty) != SB_OK)
            return NULL;
    } else if (sb_message_type_create(name, NULL, &ty) != SB_OK) {
        return NULL;
    }
    return ty; /* a new reference each call: types live as long as the process anyway */
}

static cn_topic *cn_find(const char *name)
{
    for (int i = 0; i < cn.ntopics; i++)
        if (strcmp(cn.topics[i].name, name) == 0)
            return &cn.topics[i];
    return NULL;
}

static int cn_is_remote(const sb_message *msg)
{
    const sb_eid *e = sb_message_eid(msg);
    sb_eid me = sb_eid_default();
    return e != NULL && sb_eid_cmp(e, &me) != 0;
}

static void cn_on_message(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    cn_topic *t = (cn_topic *)data;
    sb_message_type *ty = sb_message_get_type(msg);
    if (ty == sb_subscription_change_type() || ty == sb_cache_clear_type())
        return;
    atomic_fetch_add(&t->total, 1);
    if (cn_is_remote(msg))
        atomic_fetch_add(&t->remote, 1);
    const char *name = sb_message_type_name(ty);
    if (strncmp(name, "codec", 5) == 0) {
        const cn_value *v = (const cn_value *)sb_message_data(msg);
        if (v != NULL && strcmp(v->tag, "cn-value") == 0)
            atomic_fetch_add(&t->codec_ok, 1);
        return;
    }
    /* bytes "TAG:i": check per-sender order */
    size_t len = sb_message_data_len(msg);
    const char *d = (const char *)sb_message_data(msg);
    const char *colon = d ? (const char *)memchr(d, ':', len) : NULL;
    const sb_eid *e = sb_message_eid(msg);
    if (colon == NULL || e == NULL)
        return;
    char num[24]; /* the data is not NUL-terminated: copy the digits out */
    size_t nlen = len - (size_t)(colon + 1 - d);
    snprintf(num, sizeof num, "%.*s", (int)(nlen < sizeof num ? nlen : sizeof num - 1), colon + 1);
    long idx = strtol(num, NULL, 10);
    char tag[16];
    snprintf(tag, sizeof tag, "%.*s", (int)(colon - d), d);
    int k;
    for (k = 0; k < t->nsenders; k++)
        if (sb_eid_cmp(&t->senders[k], e) == 0 && strcmp(t->tags[k], tag) == 0)
            break;
    if (k == t->nsenders) {
        if (k == CN_SENDERS)
            return;
        t->senders[k] = *e;
        memcpy(t->tags[k], tag, sizeof tag);
        t->last[k] = -1;
        t->nsenders++;
    }
    if (idx != t->last[k] + 1) {
        if (atomic_fetch_add(&t->order_bad, 1) < 5) {
            char es[32];
            sb_eid_to_str(e, es, sizeof es);
            fprintf(stderr, "topic %s: from %s tag %s: got %ld after %ld\n", t->name, es,
                    tag, idx, t->last[k]);
        }
    }
    t->last[k] = idx;
}

static void cn_on_slow(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (strcmp(sb_message_type_name(sb_message_get_type(msg)), "slow") == 0)
        cn_sleep_ms((long)(intptr_t)data);
}

static atomic_int cn_stalled;

static void cn_on_stall(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (strcmp(sb_message_type_name(sb_message_get_type(msg)), "stall") == 0 &&
        atomic_exchange(&cn_stalled, 1) == 0)
        cn_sleep_ms((long)(intptr_t)data);
}

static void cn_on_update(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    if (sb_message_get_type(msg) == sb_cache_update_type())
        atomic_fetch_add(&((cn_topic *)data)->updates, 1);
}

static void cn_on_update_share(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    cn_topic *t = (cn_topic *)data;
    if (sb_message_get_type(msg) != sb_cache_update_type())
        return;
    const sb_cache_update *u = (const sb_cache_update *)sb_message_data(msg);
    if (u->new_snapshot != NULL || u->old_snapshot == NULL || !cn_is_remote(u->old_snapshot))
        return;
    int expected = 1;
    if (!atomic_compare_exchange_strong(&cn.cb_share_rc, &expected, 2))
        return; /* once */
    int rc = sb_cluster_share_topic(cn.cluster, t->share_on_clear);
    if (t->share_cache_on_clear) {
        atomic_store(&cn.cb_share_cache_rc,
                     sb_cluster_share_cache(cn.cluster, t->share_cache_on_clear->ct));
        atomic_store(&cn.cb_share_cache_says, strstr(sb_last_error(), "delivery thread") != NULL);
    }
    atomic_store(&cn.cb_share_rc, rc); /* last: the test waits for it */
}

static void cn_on_event(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != sb_cluster_node_type())
        return;
    const sb_cluster_node *n = (const sb_cluster_node *)sb_message_data(msg);
    pthread_mutex_lock(&cn.lock);
    cn.last_event_eid = n->eid;
    pthread_mutex_unlock(&cn.lock);
    atomic_store(&cn.last_event_state, n->state);
    atomic_fetch_add(&cn.events, 1);
}

/* Snapshots are bytes "ID\0VALUE" of types whose name starts with "snap". */
static const char *cn_snapshot_id(sb_message *msg)
{
    const char *name = sb_message_type_name(sb_message_get_type(msg));
    if (strncmp(name, "snap", 4) != 0 || sb_message_data_len(msg) == 0)
        return NULL;
    return (const char *)sb_message_data(msg);
}

static long cn_snapshot_value(const sb_message *msg)
{
    const char *d = (const char *)sb_message_data(msg);
    size_t len = sb_message_data_len(msg);
    size_t idlen = strnlen(d, len);
    if (idlen + 1 >= len)
        return 0;
    return strtol(d + idlen + 1, NULL, 10);
}

static sb_message *cn_snapshot(sb_message_type *ty, const char *id, const char *value,
                               const sb_eid *eid, int aggregate)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "%s%c%s", id, '\0', value);
    if (!aggregate)
        return sb_message_create_bytes(ty, buf, (size_t)n + 1);
    char *copy = (char *)malloc((size_t)n + 1);
    memcpy(copy, buf, (size_t)n + 1);
    (void)eid;
    return sb_message_create_full(ty, copy, cn_free, NULL);
}

/* Aggregate: sum of the values of every node's snapshot. Aggregates are not bytes
 * messages, so their value sits at the same place: "ID\0SUM" in malloc'd data. */
static sb_message *cn_calc(sb_cache_entry *entry, sb_message *new_snapshot)
{
    long sum = 0;
    sb_message *any = NULL, *m = sb_cache_entry_get_local(entry);
    if (m) {
        sum += cn_snapshot_value(m);
        any = m;
    }
    for (size_t i = 0; (m = sb_cache_entry_get_remote(entry, i)) != NULL; i++) {
        sum += cn_snapshot_value(m);
        any = m;
    }
    (void)new_snapshot;
    if (any == NULL)
        return NULL;
    char v[32];
    snprintf(v, sizeof v, "%ld", sum);
    return cn_snapshot(sb_message_get_type(any), (const char *)sb_message_data(any), v, NULL, 1);
}

static void cn_publish_agg(sb_topic *topic, sb_message *agg)
{
    (void)topic;
    (void)agg;
}

static long cn_agg_value(sb_message *m)
{
    const char *d = (const char *)sb_message_data(m);
    return strtol(d + strlen(d) + 1, NULL, 10);
}

/* Publishes the clear of this node's snapshot (type, id) on t; 0 when there is none. */
static int cn_clear_local(cn_topic *t, sb_message_type *ty, const char *id)
{
    sb_eid me = sb_eid_default();
    sb_message *snap = sb_cache_get_by_eid(t->cache, ty, id, &me);
    if (snap == NULL)
        return 0;
    sb_message *clear = sb_cache_clear_create(snap);
    sb_publish(t->topic, clear);
    sb_message_unref(clear);
    sb_message_unref(snap);
    return 1;
}

static void cn_reply_err(int code)
{
    nh_node_reply("err %d %s", code, sb_last_error());
}

static int cn_topic_new(const char *name, const char *only_type)
{
    if (cn_find(name))
        return 0;
    if (cn.ntopics == CN_TOPICS)
        return -1;
    cn_topic *t = &cn.topics[cn.ntopics];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->topic = sb_topic_create(name);
    if (t->topic == NULL)
        return -1;
    t->sub = sb_subscribe(t->topic, cn_on_message, t);
    if (only_type != NULL && strcmp(only_type, ":json") == 0) {
        sb_subscription_accept_formatters(t->sub, SB_FORMATTER_JSON);
    } else if (only_type != NULL) {
        sb_message_type *ty = cn_type(only_type);
        sb_subscription_accept_message_type(t->sub, ty);
        sb_message_type_unref(ty);
    }
    cn.ntopics++;
    return 0;
}

/* Runs one command line; replies exactly once. Returns 0 to go on, 1 to quit. */
static int cn_command(char *line)
{
    char *argv[16];
    int argc = 0;
    for (char *save = NULL, *tok = strtok_r(line, " ", &save); tok && argc < 16;
         tok = strtok_r(NULL, " ", &save))
        argv[argc++] = tok;
    if (argc == 0)
        return nh_node_reply("err 0 empty command"), 0;
    const char *cmd = argv[0];
    cn_topic *t = argc > 1 ? cn_find(argv[1]) : NULL;

    if (strcmp(cmd, "eid") == 0 && argc == 2) {
        sb_eid e;
        if (sb_eid_from_str(argv[1], &e) != SB_OK || sb_eid_set_default(&e) != SB_OK)
            return cn_reply_err(sb_last_error_code()), 0;
    } else if (strcmp(cmd, "join") == 0 && argc >= 5) {
        sb_cluster_config *cfg = sb_cluster_config_new();
        int rc = sb_cluster_config_set(cfg, "servers", argv[1]);
        if (rc == SB_OK)
            rc = sb_cluster_config_set(cfg, "prefix", argv[2]);
        if (rc == SB_OK)
            rc = sb_cluster_config_set(cfg, "node_name", argv[3]);
        if (rc == SB_OK && argc > 4)
            rc = sb_cluster_config_set(cfg, "heartbeat_ms", argv[4]);
        for (int i = 5; rc == SB_OK && i < argc; i++) {
            char *eq = strchr(argv[i], '=');
            if (eq == NULL)
                continue;
            *eq = '\0';
            rc = sb_cluster_config_set(cfg, argv[i], eq + 1);
        }
        if (rc != SB_OK) {
            cn_reply_err(rc);
            sb_cluster_config_free(cfg);
            return 0;
        }
        if (atomic_load_explicit(&cn_name, memory_order_acquire) == NULL) {
            snprintf(cn_name_buf, sizeof cn_name_buf, "%s", argv[3]);
            atomic_store_explicit(&cn_name, cn_name_buf, memory_order_release);
        }
        cn.cluster = sb_cluster_join(cfg);
        sb_cluster_config_free(cfg);
        if (cn.cluster == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
        if (cn.events_sub == NULL)
            cn.events_sub = sb_subscribe(sb_cluster_topic(cn.cluster), cn_on_event, NULL);
    } else if (strcmp(cmd, "topic") == 0 && argc >= 2) {
        if (cn_topic_new(argv[1], argc > 2 ? argv[2] : NULL) != 0)
            return cn_reply_err(-1), 0;
    } else if ((strcmp(cmd, "share") == 0 || strcmp(cmd, "unshare") == 0 ||
                strcmp(cmd, "json") == 0) &&
               t) {
        int rc = cmd[0] == 's'   ? sb_cluster_share_topic(cn.cluster, t->topic)
                 : cmd[0] == 'u' ? sb_cluster_unshare_topic(cn.cluster, t->topic)
                                 : sb_cluster_export_json(cn.cluster, t->topic);
        if (rc != SB_OK)
            return cn_reply_err(rc), 0;
    } else if (strcmp(cmd, "forward") == 0 && argc == 3 && t && cn_find(argv[2])) {
        if (sb_forward_all(t->topic, cn_find(argv[2])->topic) == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
    } else if (strcmp(cmd, "slowsub") == 0 && argc == 3 && t) {
        sb_subscription *slow =
            sb_subscribe_synchronous(t->topic, cn_on_slow, (void *)(intptr_t)atol(argv[2]));
        if (slow == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
        sb_subscription_unref(slow); /* lives until the process exits */
    } else if (strcmp(cmd, "stallsub") == 0 && argc == 3 && t) {
        sb_subscription *stall =
            sb_subscribe_synchronous(t->topic, cn_on_stall, (void *)(intptr_t)atol(argv[2]));
        if (stall == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
        sb_subscription_unref(stall); /* lives until the process exits */
    } else if (strcmp(cmd, "pub") == 0 && argc == 5 && t) {
        sb_message_type *ty = cn_type(argv[2]);
        long n = atol(argv[3]);
        for (long i = 0; i < n; i++) {
            char buf[128];
            int len = snprintf(buf, sizeof buf, "%s:%ld", argv[4], i);
            sb_message *m = sb_message_create_bytes(ty, buf, (size_t)len);
            sb_publish(t->topic, m);
            sb_message_unref(m);
        }
        sb_message_type_unref(ty);
    } else if ((strcmp(cmd, "pubc") == 0 || strcmp(cmd, "pubcagg") == 0) && argc == 4 && t) {
        /* pubcagg: aggregates (no eid) */
        int aggregate = strcmp(cmd, "pubcagg") == 0;
        sb_message_type *ty = cn_type(argv[2]);
        long n = atol(argv[3]);
        for (long i = 0; i < n; i++) {
            cn_value *v = (cn_value *)calloc(1, sizeof *v);
            v->value = (int32_t)i;
            snprintf(v->tag, sizeof v->tag, "cn-value");
            sb_message *m = aggregate ? sb_message_create_full(ty, v, cn_free, NULL)
                                      : sb_message_create(ty, v, cn_free);
            sb_publish(t->topic, m);
            sb_message_unref(m);
        }
        sb_message_type_unref(ty);
    } else if (strcmp(cmd, "nocodec") == 0 && argc == 2) {
        sb_message_type *ty = cn_type(argv[1]);
        int rc = sb_message_type_set_codec(ty, NULL, NULL);
        sb_message_type_unref(ty);
        if (rc != SB_OK)
            return cn_reply_err(rc), 0;
    } else if (strcmp(cmd, "tojson") == 0 && argc == 2) {
        sb_message_type *ty = cn_type(argv[1]);
        sb_message *m = sb_message_create_bytes(ty, "x", 1);
        char *j = sb_message_to_json(m);
        sb_message_unref(m);
        sb_message_type_unref(ty);
        nh_node_reply("ok %s", j != NULL ? j : "none");
        sb_string_free(j);
        return 0;
    } else if (strcmp(cmd, "pubto") == 0 && argc == 5) {
        cn_topic *to = cn_find(argv[2]);
        sb_eid e;
        if (to == NULL || sb_eid_from_str(argv[1], &e) != SB_OK)
            return cn_reply_err(-1), 0;
        sb_message_type *ty = cn_type(argv[3]);
        sb_message *m = sb_message_create_bytes(ty, argv[4], strlen(argv[4]));
        int rc = sb_cluster_publish_to(cn.cluster, &e, to->topic, m);
        sb_message_unref(m);
        sb_message_type_unref(ty);
        if (rc != SB_OK)
            return cn_reply_err(rc), 0;
    } else if (strcmp(cmd, "count") == 0 && t) {
        return nh_node_reply("ok %ld %ld %ld %ld", atomic_load(&t->total),
                             atomic_load(&t->remote), atomic_load(&t->order_bad),
                             atomic_load(&t->codec_ok)),
               0;
    } else if (strcmp(cmd, "stats") == 0) {
        sb_cluster_stats s;
        memset(&s, 0, sizeof s);
        int rc = sb_cluster_get_stats(cn.cluster, &s);
        if (rc != SB_OK)
            return cn_reply_err(rc), 0;
        return nh_node_reply("ok %llu %llu %llu %llu %llu %u %u", (unsigned long long)s.sent,
                             (unsigned long long)s.received, (unsigned long long)s.dropped_out,
                             (unsigned long long)s.dropped_in,
                             (unsigned long long)s.reconnects, s.connected, s.nodes_up),
               0;
    } else if (strcmp(cmd, "busstats") == 0) {
        /* The bus-wide figures: clusters listed in sb_stats_prometheus() and their sent and
         * received counters (summed), and whether sb_stats_json() lists a cluster. */
        char *prom = sb_stats_prometheus();
        char *json = sb_stats_json();
        unsigned long long sent = 0, received = 0;
        int clusters = 0;
        for (const char *l = prom; l != NULL && *l != '\0';) {
            const char *v = strstr(l, "} ");
            if (strncmp(l, "switchboard_cluster_sent_total{", 31) == 0 && v != NULL) {
                clusters++;
                sent += strtoull(v + 2, NULL, 10);
            } else if (strncmp(l, "switchboard_cluster_received_total{", 35) == 0 && v != NULL) {
                received += strtoull(v + 2, NULL, 10);
            }
            l = strchr(l, '\n');
            l = l ? l + 1 : NULL;
        }
        int in_json = json != NULL && strstr(json, "\"clusters\":[{\"prefix\":") != NULL;
        sb_string_free(prom);
        sb_string_free(json);
        return nh_node_reply("ok %d %llu %llu %d", clusters, sent, received, in_json), 0;
    } else if (strcmp(cmd, "storeerr") == 0) {
        char *prom = sb_stats_prometheus();
        char *json = sb_stats_json();
        long long in_json = -1, in_prom = -1;
        const char *j = json != NULL ? strstr(json, "\"store_errors\":") : NULL;
        if (j != NULL)
            in_json = strtoll(j + strlen("\"store_errors\":"), NULL, 10);
        const char *p = prom != NULL ? strstr(prom, "\nswitchboard_cluster_store_errors_total{")
                                     : NULL;
        const char *v = p != NULL ? strstr(p, "} ") : NULL;
        if (v != NULL)
            in_prom = strtoll(v + 2, NULL, 10);
        sb_string_free(prom);
        sb_string_free(json);
        return nh_node_reply("ok %lld %lld", in_json, in_prom), 0;
    } else if (strcmp(cmd, "logged") == 0 && argc >= 2) {
        char words[512] = "";
        for (int i = 1; i < argc; i++)
            snprintf(words + strlen(words), sizeof words - strlen(words), "%s%s", i > 1 ? " " : "",
                     argv[i]);
        return nh_node_reply("ok %ld", cn_logged(words)), 0;
    } else if (strcmp(cmd, "nodes") == 0) {
        sb_message_list *l = sb_cluster_nodes(cn.cluster);
        if (l == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
        char out[2048];
        int off = snprintf(out, sizeof out, "ok %zu", sb_message_list_len(l));
        for (size_t i = 0; i < sb_message_list_len(l) && off < (int)sizeof out - 64; i++) {
            const sb_cluster_node *n =
                (const sb_cluster_node *)sb_message_data(sb_message_list_get(l, i));
            char e[32];
            sb_eid_to_str(&n->eid, e, sizeof e);
            off += snprintf(out + off, sizeof out - (size_t)off, " %s=%d/%s", e, n->state,
                            n->name);
        }
        sb_message_list_free(l);
        return nh_node_reply("%s", out), 0;
    } else if (strcmp(cmd, "events") == 0) {
        char e[32];
        pthread_mutex_lock(&cn.lock);
        sb_eid_to_str(&cn.last_event_eid, e, sizeof e);
        pthread_mutex_unlock(&cn.lock);
        return nh_node_reply("ok %ld %s %d", atomic_load(&cn.events), e,
                             atomic_load(&cn.last_event_state)),
               0;
    } else if (strcmp(cmd, "cache") == 0 && t) {
        int agg = argc > 2 && strcmp(argv[2], "agg") == 0;
        t->cache = agg ? sb_cache_create_full(cn_snapshot_id, cn_calc, cn_publish_agg)
                       : sb_cache_create(cn_snapshot_id);
        t->ct = sb_caching_topic_create(t->topic, t->cache);
        if (t->ct == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
        t->updates_sub = sb_subscribe(sb_caching_get_topic(t->ct), cn_on_update, t);
    } else if (strcmp(cmd, "shareonclear") == 0 && (argc == 3 || argc == 4) && t && t->ct &&
               !t->clear_sub) {
        cn_topic *u = cn_find(argv[2]);
        cn_topic *v = argc == 4 ? cn_find(argv[3]) : NULL;
        if (u == NULL || (argc == 4 && (v == NULL || v->ct == NULL)))
            return cn_reply_err(-1), 0;
        t->share_on_clear = u->topic;
        t->share_cache_on_clear = v;
        atomic_store(&cn.cb_share_cache_rc, 1);
        atomic_store(&cn.cb_share_cache_says, 0);
        atomic_store(&cn.cb_share_rc, 1);
        t->clear_sub = sb_subscribe_synchronous(sb_caching_get_topic(t->ct), cn_on_update_share, t);
        if (t->clear_sub == NULL)
            return cn_reply_err(sb_last_error_code()), 0;
    } else if (strcmp(cmd, "cbshare") == 0) {
        return nh_node_reply("ok %d %d %d", atomic_load(&cn.cb_share_rc),
                             atomic_load(&cn.cb_share_cache_rc),
                             atomic_load(&cn.cb_share_cache_says)),
               0;
    } else if (strcmp(cmd, "sharecache") == 0 && t && t->ct) {
        int rc = sb_cluster_share_cache(cn.cluster, t->ct);
        if (rc != SB_OK)
            return cn_reply_err(rc), 0;
    } else if (strcmp(cmd, "put") == 0 && argc == 5 && t) {
        sb_message_type *ty = cn_type(argv[2]);
        sb_message *m = cn_snapshot(ty, argv[3], argv[4], NULL, 0);
        sb_publish(t->topic, m);
        sb_message_unref(m);
        sb_message_type_unref(ty);
    } else if (strcmp(cmd, "putbig") == 0 && argc == 5 && t) {
        /* a snapshot "ID\0xxx...x\0" of BYTES bytes or more (its value reads as 0) */
        sb_message_type *ty = cn_type(argv[2]);
        size_t idlen = strlen(argv[3]), n = (size_t)atol(argv[4]);
        char *buf = (char *)malloc(idlen + n + 2);
        if (buf == NULL)
            return cn_reply_err(SB_E_NOMEM), 0;
        memcpy(buf, argv[3], idlen + 1);
        memset(buf + idlen + 1, 'x', n);
        buf[idlen + 1 + n] = '\0';
        sb_message *m = sb_message_create_bytes(ty, buf, idlen + n + 2);
        free(buf);
        sb_publish(t->topic, m);
        sb_message_unref(m);
        sb_message_type_unref(ty);
    } else if (strcmp(cmd, "putid") == 0 && argc == 5 && t) {
        /* a snapshot whose id is LEN times 'i' (0: the empty id) */
        sb_message_type *ty = cn_type(argv[2]);
        size_t n = (size_t)atol(argv[3]), vlen = strlen(argv[4]);
        char *buf = (char *)malloc(n + vlen + 2);
        if (buf == NULL)
            return cn_reply_err(SB_E_NOMEM), 0;
        memset(buf, 'i', n);
        buf[n] = '\0';
        memcpy(buf + n + 1, argv[4], vlen + 1);
        sb_message *m = sb_message_create_bytes(ty, buf, n + vlen + 2);
        free(buf);
        sb_publish(t->topic, m);
        sb_message_unref(m);
        sb_message_type_unref(ty);
    } else if (strcmp(cmd, "clearid") == 0 && argc == 4 && t && t->cache) {
        /* clears the local snapshot whose id is LEN times 'i' (0: the empty id) */
        sb_message_type *ty = cn_type(argv[2]);
        size_t n = (size_t)atol(argv[3]);
        char *id = (char *)malloc(n + 1);
        if (id == NULL)
            return cn_reply_err(SB_E_NOMEM), 0;
        memset(id, 'i', n);
        id[n] = '\0';
        int found = cn_clear_local(t, ty, id);
        free(id);
        sb_message_type_unref(ty);
        if (!found)
            return nh_node_reply("err 0 no such snapshot"), 0;
    } else if (strcmp(cmd, "putn") == 0 && argc == 5 && t) {
        sb_message_type *ty = cn_type(argv[2]);
        long n = atol(argv[3]);
        for (long i = 0; i < n; i++) {
            char id[128], v[32];
            snprintf(id, sizeof id, "%s%ld", argv[4], i);
            snprintf(v, sizeof v, "%ld", i);
            sb_message *m = cn_snapshot(ty, id, v, NULL, 0);
            sb_publish(t->topic, m);
            sb_message_unref(m);
        }
        sb_message_type_unref(ty);
    } else if (strcmp(cmd, "clear") == 0 && argc == 4 && t && t->cache) {
        sb_message_type *ty = cn_type(argv[2]);
        int found = cn_clear_local(t, ty, argv[3]);
        sb_message_type_unref(ty);
        if (!found)
            return nh_node_reply("err 0 no such snapshot"), 0;
    } else if (strcmp(cmd, "dump") == 0 && argc == 3 && t && t->cache) {
        sb_message_type *ty = cn_type(argv[2]);
        sb_eid me = sb_eid_default();
        sb_message_list *all = sb_cache_dump_all(t->cache, ty);
        sb_message_list *local = sb_cache_dump_by_eid(t->cache, ty, &me);
        size_t na = sb_message_list_len(all), nl = sb_message_list_len(local);
        sb_message_list_free(all);
        sb_message_list_free(local);
        sb_message_type_unref(ty);
        return nh_node_reply("ok %zu %zu %zu", na, nl, na - nl), 0;
    } else if ((strcmp(cmd, "get") == 0 && argc == 5 && t && t->cache) ||
               (strcmp(cmd, "agg") == 0 && argc == 4 && t && t->cache)) {
        sb_message_type *ty = cn_type(argv[2]);
        sb_eid e;
        int is_agg = cmd[0] == 'a';
        if (!is_agg && sb_eid_from_str(argv[4], &e) != SB_OK)
            return cn_reply_err(-1), 0;
        sb_message *m = sb_cache_get_by_eid(t->cache, ty, argv[3], is_agg ? NULL : &e);
        sb_message_type_unref(ty);
        if (m == NULL)
            return nh_node_reply("ok none"), 0;
        long v = is_agg ? cn_agg_value(m) : cn_snapshot_value(m);
        sb_message_unref(m);
        return nh_node_reply("ok %ld", v), 0;
    } else if (strcmp(cmd, "updates") == 0 && t) {
        return nh_node_reply("ok %ld", atomic_load(&t->updates)), 0;
    } else if (strcmp(cmd, "fork") == 0 && argc == 3) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            /* The inherited handle is refused; a join of our own works. (Fork from a
             * quiescent moment, as the README says: the parent delivers nothing now.) */
            sb_topic *forked = sb_topic_create("forked");
            int rc = cn.cluster ? sb_cluster_share_topic(cn.cluster, forked) : 0;
            int code = rc == SB_E_STATE ? 0 : 10;
            sb_cluster_stats st;
            if (sb_cluster_get_stats(cn.cluster, &st) != SB_E_STATE)
                code = 11;
            sb_eid e;
            sb_eid_from_str("0f:0f:0f:0f:0f:0f", &e);
            sb_eid_set_default(&e);
            sb_cluster_config *cfg = sb_cluster_config_new();
            sb_cluster_config_set(cfg, "servers", argv[1]);
            sb_cluster_config_set(cfg, "prefix", argv[2]);
            sb_cluster_config_set(cfg, "node_name", "forked-child");
            sb_cluster *c = sb_cluster_join(cfg);
            sb_cluster_config_free(cfg);
            if (c == NULL) {
                fprintf(stderr, "forked child: join failed: %s\n", sb_last_error());
                _exit(12);
            }
            sb_topic *topic = forked;
            if (sb_cluster_share_topic(c, topic) != SB_OK)
                code = 13;
            sb_message_type *ty = cn_type("frombaby");
            sb_message *m = sb_message_create_bytes(ty, "child:0", 7);
            int reached = sb_publish(topic, m);
            sb_message_unref(m);
            if (getenv("CN_TRACE")) {
                cn_sleep_ms(300);
                sb_cluster_stats cs;
                sb_cluster_get_stats(c, &cs);
                fprintf(stderr, "forked child: publish reached %d, sent %llu, up %u\n", reached,
                        (unsigned long long)cs.sent, cs.nodes_up);
            }
            c = sb_cluster_leave(c);
            _exit(code);
        }
        int st = 0;
        long long deadline = nh_now_ms() + 20000;
        while (waitpid(pid, &st, WNOHANG) == 0 && nh_now_ms() < deadline)
            cn_sleep_ms(10);
        return nh_node_reply("ok %d", WIFEXITED(st) ? WEXITSTATUS(st) : 99), 0;
    } else if (strcmp(cmd, "leave") == 0) {
        cn.cluster = sb_cluster_leave(cn.cluster);
    } else if (strcmp(cmd, "quit") == 0) {
        return 1;
    } else {
        return nh_node_reply("err 0 unknown or malformed command '%s'", cmd), 0;
    }
    nh_node_reply("ok");
    return 0;
}

/* The node process's main loop; returns its exit code. */
static int cn_node_main(void)
{
    pthread_mutex_init(&cn.lock, NULL);
    pthread_mutex_init(&cn_log.lock, NULL);
    sb_set_log_handler(cn_log_line, NULL);
    char line[4096];
    while (nh_node_read_line(line, sizeof line) >= 0) {
        if (cn_command(line))
            break;
    }
    if (cn.cluster)
        cn.cluster = sb_cluster_leave(cn.cluster);
    for (int i = 0; i < cn.ntopics; i++) {
        cn_topic *t = &cn.topics[i];
        if (t->updates_sub)
            t->updates_sub = sb_unsubscribe_and_join(t->updates_sub);
        if (t->clear_sub)
            t->clear_sub = sb_unsubscribe_and_join(t->clear_sub);
        if (t->ct)
            t->ct = sb_caching_unsubscribe_and_join(t->ct);
        sb_cache_unref(t->cache);
        t->sub = sb_unsubscribe_and_join(t->sub);
        sb_topic_unref(t->topic);
    }
    if (cn.events_sub)
        cn.events_sub = sb_unsubscribe_and_join(cn.events_sub);
    sb_set_log_handler(NULL, NULL); /* returns once no call of ours is running */
    for (int i = 0; i < cn_log.n; i++)
        free(cn_log.lines[i]);
    nh_node_reply("bye");
    return 0;
}

/* ---------------------------------------------------------------- parent side */

/* Sends a command to a node and returns its reply line (in c->line), or NULL (and a
 * recorded failure) when none came within timeout_ms. A node that left a command
 * unanswered is hung: what its threads do is logged, and later commands return NULL
 * without being sent (a reply that came late would answer the wrong command, and a
 * caller polling it would fill the log with failures until its deadline). */
static const char *cn_cmd_t(nh_child *c, int timeout_ms, const char *fmt, ...)
{
    if (c->hung)
        return NULL;
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (nh_child_send(c, "%s", buf) != 0) {
        tu_fail(__FILE__, __LINE__, "sending a command to a node failed");
        c->hung = 1;
        return NULL;
    }
    if (nh_child_read_line(c, NULL, 0, timeout_ms) < 0) {
        char what[4200];
        snprintf(what, sizeof what, "no reply from node %d to '%s'", (int)c->pid, buf);
        tu_fail(__FILE__, __LINE__, what);
        nh_child_describe(c);
        c->hung = 1;
        return NULL;
    }
    return c->line;
}

#define cn_cmd(c, ...) cn_cmd_t((c), nh_scale_ms(30000), __VA_ARGS__)

/* A command that must answer "ok": records a check, returns 1 when it did. */
static int cn_ok_at(nh_child *c, const char *file, int line, const char *cmdline)
{
    const char *r = cn_cmd(c, "%s", cmdline);
    int ok = r != NULL && strncmp(r, "ok", 2) == 0;
    if (!ok) {
        char what[4300];
        snprintf(what, sizeof what, "'%s' -> '%s'", cmdline, r ? r : "(no reply)");
        tu_check(0, file, line, what);
    } else {
        tu_pass();
    }
    return ok;
}
#define CN_OK(c, ...)                                                                       \
    do {                                                                                    \
        char cn_line_[4096];                                                                \
        snprintf(cn_line_, sizeof cn_line_, __VA_ARGS__);                                   \
        cn_ok_at((c), __FILE__, __LINE__, cn_line_);                                        \
    } while (0)

/* Reads up to n numbers that follow "ok" in the node's reply to cmd. Returns how many. */
static inline int cn_nums(nh_child *c, long long *out, int n, const char *fmt, ...)
{
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    const char *r = cn_cmd(c, "%s", buf);
    if (r == NULL || strncmp(r, "ok", 2) != 0)
        return 0;
    int k = 0;
    const char *p = r + 2;
    while (k < n) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p)
            break;
        out[k++] = v;
        p = end;
    }
    return k;
}

/* The first number of the reply to cmd (-1 if none). */
static inline long long cn_num(nh_child *c, const char *cmdline)
{
    long long v = -1;
    if (cn_nums(c, &v, 1, "%s", cmdline) != 1)
        return -1;
    return v;
}

/* Starts a node process (this program with argv[1] = "node"). */
static inline int cn_spawn(const char *argv0, nh_child *c)
{
    char *args[] = {(char *)argv0, (char *)"node", NULL};
    return nh_child_spawn(args, c);
}

/* Ends a node: "quit", wait for it; kills it if it does not go (at once when it is hung,
 * see cn_cmd_t). Returns its exit code. */
static inline int cn_stop(nh_child *c)
{
    if (c->hung)
        nh_child_kill9(c);
    else if (c->pid > 0 && c->fd >= 0) {
        nh_child_send(c, "quit");
        nh_child_expect(c, "bye", nh_scale_ms(20000));
    }
    return nh_child_close(c, nh_scale_ms(20000));
}

#endif
