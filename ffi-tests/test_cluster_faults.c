/*
 * test_cluster_faults.c - real faults under a cluster:
 *  - the server killed (kill -9) and restarted with an empty store: publishers never
 *    block while it is gone, both nodes reconnect, and their shared caches converge
 *    (each re-asserts its snapshots, then re-reads the others');
 *  - a three-server NATS cluster losing the server a node uses: the node moves to
 *    another server, messages and cache state keep flowing both ways;
 *  - the store not answering (its server stopped, SIGSTOP) when a node comes back from
 *    down or is killed: the others' re-read of its snapshots, or their removal of them,
 *    is tried again until the store answers;
 *  - the store stopping in the middle of a read: the read fails after a bound, and the
 *    share that made it is tried again;
 *  - the store stopping during a burst of writes: messages do not wait behind them;
 *  - a node dropping arrivals while the store does not answer: it re-reads the sender's
 *    snapshots once the sender's store writes are done, and holds them all;
 *  - the server killed during a node's writes at full speed: the acknowledgements it
 *    never sent do not hold the node's sending up;
 *  - eight caches shared while the server is down write side by side when it is back;
 *  - a leave while no server answers returns within a bound;
 *  - a leave while the node writes all its snapshots again leaves nothing in the store;
 *  - a server in lame duck mode is noticed in the log.
 */
#include "test_util.h"
#include "nats_harness.h"
#include "cluster_node.h"

#define EID_A "00:00:00:00:00:0a"
#define EID_B "00:00:00:00:00:0b"
#define EID_C "00:00:00:00:00:0c"
#define EID_D "00:00:00:00:00:0d"
#define HB_MS 200

static const char *argv0;

static long long stat_of(nh_child *n, int field)
{
    long long v[7] = {-1, -1, -1, -1, -1, -1, -1};
    if (cn_nums(n, v, 7, "stats") != 7)
        return -1;
    return v[field];
}
enum { ST_SENT, ST_RECEIVED, ST_DROPPED_OUT, ST_DROPPED_IN, ST_RECONNECTS, ST_CONNECTED, ST_UP };

static long long dump_remote(nh_child *n, const char *type)
{
    long long v[3] = {-1, -1, -1};
    if (cn_nums(n, v, 3, "dump reg %s", type) != 3)
        return -1;
    return v[2];
}

static long long get_of(nh_child *n, const char *type, const char *id, const char *eid)
{
    const char *r = cn_cmd(n, "get reg %s %s %s", type, id, eid);
    if (r == NULL || strcmp(r, "ok none") == 0)
        return -1;
    return strtoll(r + 2, NULL, 10);
}

static long long count_total(nh_child *n, const char *topic)
{
    long long v[4] = {-1, -1, -1, -1};
    if (cn_nums(n, v, 4, "count %s", topic) != 4)
        return -1;
    return v[0];
}

static void start_node(nh_child *n, const char *eid, const char *name, const char *servers,
                       const char *extra)
{
    CHECK(cn_spawn(argv0, n) == 0);
    CN_OK(n, "eid %s", eid);
    CN_OK(n, "join %s sb %s %d %s", servers, name, HB_MS, extra);
    CN_OK(n, "topic reg");
    CN_OK(n, "cache reg");
    CN_OK(n, "sharecache reg");
}

/* A lone server with JetStream and no other option (a failed start is recorded). */
static void start_lone_server(nh_server *srv)
{
    nh_server_opts opts;
    memset(&opts, 0, sizeof opts);
    CHECK(nh_server_start(srv, &opts) == 0);
}

/* A lone server, and nodes a and b on it with no other option. */
static void start_pair(nh_server *srv, nh_child *a, nh_child *b)
{
    start_lone_server(srv);
    start_node(a, EID_A, "a", srv->url, "");
    start_node(b, EID_B, "b", srv->url, "");
}

static void test_server_restart_empty_store(void)
{
    nh_server srv;
    start_lone_server(&srv);
    nh_child a, b;
    /* a's outgoing queue holds 500: while the server is gone it overflows */
    start_node(&a, EID_A, "a", srv.url, "out_queue_limit=500");
    start_node(&b, EID_B, "b", srv.url, "");
    CN_OK(&a, "putn reg snapf 100 k");
    CN_OK(&b, "putn reg snapg 50 j");
    WAIT_UNTIL(dump_remote(&b, "snapf") == 100 && dump_remote(&a, "snapg") == 50);

    nh_server_kill9(&srv);
    WAIT_UNTIL(stat_of(&a, ST_CONNECTED) == 0 && stat_of(&b, ST_CONNECTED) == 0);
    /* the network is gone: publishing never waits for it */
    long long t0 = nh_now_ms();
    CN_OK(&a, "putn reg snapf 100 k"); /* same ids: values unchanged */
    CN_OK(&a, "put reg snapf k5 500");
    CN_OK(&a, "put reg snapf knew 7");
    CN_OK(&a, "pub reg text 10000 offline");
    long long took = nh_now_ms() - t0;
    if (!cn_slow())
        CHECK(took < 2000);
    printf("publishing with the server down: %lld ms\n", took);
    /* the oldest were dropped and counted, newest kept */
    CHECK(stat_of(&a, ST_DROPPED_OUT) >= 5000);

    /* back, with an empty store */
    CHECK(nh_server_restart(&srv, 1) == 0);
    WAIT_UNTIL(stat_of(&a, ST_CONNECTED) == 1 && stat_of(&b, ST_CONNECTED) == 1);
    CHECK(stat_of(&a, ST_RECONNECTS) >= 1);
    /* caches converge: b has a's current state, a has b's */
    WAIT_UNTIL(dump_remote(&b, "snapf") == 101 && get_of(&b, "snapf", "k5", EID_A) == 500 &&
               get_of(&b, "snapf", "knew", EID_A) == 7);
    WAIT_UNTIL(dump_remote(&a, "snapg") == 50);
    /* the store was refilled: a late joiner loads both nodes' state */
    nh_child c;
    start_node(&c, "00:00:00:00:00:0c", "c", srv.url, "");
    CHECK_EQ_INT(dump_remote(&c, "snapf"), 101);
    CHECK_EQ_INT(dump_remote(&c, "snapg"), 50);
    CHECK_EQ_INT(get_of(&c, "snapf", "k5", EID_A), 500);
    CHECK_EQ_INT(cn_stop(&c), 0);
    CHECK_EQ_INT(cn_stop(&a), 0);
    CHECK_EQ_INT(cn_stop(&b), 0);
    nh_server_free(&srv);
}

/* A three-server cluster; 0 (a recorded failure) when it did not start. */
static int start_three(nh_cluster *cl)
{
    nh_server_opts opts;
    memset(&opts, 0, sizeof opts);
    if (nh_cluster_start(cl, 3, &opts) == 0)
        return 1;
    CHECK(!"three-server cluster started");
    nh_cluster_free(cl);
    return 0;
}

static void test_cluster_loses_a_server(void)
{
    nh_cluster cl;
    if (!start_three(&cl))
        return;
    /* a uses server 0 first, b server 1; each lists the others to fail over to */
    char a_servers[256], b_servers[256];
    snprintf(a_servers, sizeof a_servers, "%s,%s,%s", cl.servers[0].url, cl.servers[1].url,
             cl.servers[2].url);
    snprintf(b_servers, sizeof b_servers, "%s,%s,%s", cl.servers[1].url, cl.servers[2].url,
             cl.servers[0].url);
    nh_child a, b;
    start_node(&a, EID_A, "a", a_servers, "store_replicas=3");
    start_node(&b, EID_B, "b", b_servers, "store_replicas=3");
    CN_OK(&a, "topic chat");
    CN_OK(&b, "topic chat");
    CN_OK(&a, "share chat");
    CN_OK(&b, "share chat");
    CN_OK(&a, "putn reg snapc 20 q");
    WAIT_UNTIL(dump_remote(&b, "snapc") == 20);

    nh_cluster_kill9(&cl, 0);
    /* a moves to another server */
    WAIT_UNTIL(stat_of(&a, ST_RECONNECTS) >= 1 && stat_of(&a, ST_CONNECTED) == 1);
    CN_OK(&a, "pub chat text 100 after");
    CN_OK(&a, "put reg snapc q3 333");
    CN_OK(&b, "pub chat text 100 fromb");
    WAIT_UNTIL(count_total(&b, "chat") == 200 && count_total(&a, "chat") == 200);
    WAIT_UNTIL(get_of(&b, "snapc", "q3", EID_A) == 333);
    CHECK_EQ_INT(dump_remote(&b, "snapc"), 20);
    /* neither node was ever taken for down by the other */
    const char *e = cn_cmd(&b, "nodes");
    CHECK(e != NULL && strstr(e, EID_A "=1/a") != NULL);
    /* the store survived (three replicas): a late joiner on server 2 loads a's state (the
     * store's own leader election after the loss may take seconds: a longer timeout) */
    CHECK(nh_cluster_wait_ready(&cl, 20000) == 0);
    nh_child c;
    long long t0 = nh_now_ms();
    start_node(&c, "00:00:00:00:00:0c", "c", cl.servers[2].url,
               "store_replicas=3 connect_timeout_ms=30000");
    printf("late joiner after the loss: %lld ms\n", nh_now_ms() - t0);
    CHECK_EQ_INT(dump_remote(&c, "snapc"), 20);
    /* a write made while the store had no leader is repaired: a re-writes its snapshots
     * when an acknowledgement does not come, and c re-reads them */
    WAIT_UNTIL(get_of(&c, "snapc", "q3", EID_A) == 333);
    CHECK_EQ_INT(cn_stop(&c), 0);
    CHECK_EQ_INT(cn_stop(&a), 0);
    CHECK_EQ_INT(cn_stop(&b), 0);
    nh_cluster_free(&cl);
}

static long long logged(nh_child *n, const char *word)
{
    long long v = -1;
    if (cn_nums(n, &v, 1, "logged %s", word) != 1)
        return -1;
    return v;
}

/* Three servers and the store, with one replica, on one of them: returns that server's
 * index (the nodes of a test use the two others), or -1 (a failure recorded, nothing
 * left running). */
static int start_three_store_apart(nh_cluster *cl)
{
    if (!start_three(cl))
        return -1;
    nh_child z;
    start_node(&z, "00:00:00:00:00:0f", "z", cl->servers[0].url, "store_replicas=1");
    CHECK_EQ_INT(cn_stop(&z), 0);
    int x = -1;
    WAIT_UNTIL((x = nh_cluster_stream_leader(cl, "KV_sb_state")) >= 0);
    if (x < 0)
        nh_cluster_free(cl);
    return x;
}

/* A node that others took for down comes back while the store does not answer: their
 * re-read of its snapshots fails. Nothing else would make them read it later (its
 * presence was never removed, since their purge failed too, so it does not re-assert):
 * the re-read itself is tried again until the store answers. The same for the removal
 * of a killed node's snapshots. */
static void test_store_not_answering(void)
{
    nh_cluster cl;
    int x = start_three_store_apart(&cl);
    if (x < 0)
        return;
    nh_child a, c;
    start_node(&a, EID_A, "a", cl.servers[(x + 1) % 3].url, "store_replicas=1");
    start_node(&c, EID_C, "c", cl.servers[(x + 2) % 3].url, "store_replicas=1");
    CN_OK(&a, "put reg snapr k1 5");
    WAIT_UNTIL(get_of(&c, "snapr", "k1", EID_A) == 5);

    /* the store stops answering; the other two servers still carry messages */
    CHECK(kill(cl.servers[x].pid, SIGSTOP) == 0);
    /* a pauses longer than c's patience: c takes it for down and clears its entry */
    long long a_events = -1;
    CHECK(cn_nums(&a, &a_events, 1, "events") == 1);
    CHECK(kill(a.pid, SIGSTOP) == 0);
    WAIT_UNTIL(get_of(&c, "snapr", "k1", EID_A) == -1);
    CHECK(kill(a.pid, SIGCONT) == 0);
    /* a is back and c reads its snapshots: the store does not answer */
    WAIT_UNTIL(logged(&c, "re-reading") >= 1);
    CHECK_EQ_INT(get_of(&c, "snapr", "k1", EID_A), -1);
    long long v[2] = {-1, -1};
    CHECK(cn_nums(&c, v, 2, "storeerr") == 2 && v[0] >= 1 && v[1] >= 1);
    /* the store answers again: c's re-read goes through */
    CHECK(kill(cl.servers[x].pid, SIGCONT) == 0);
    WAIT_UNTIL(get_of(&c, "snapr", "k1", EID_A) == 5);
    /* and says so after its warning */
    WAIT_UNTIL(logged(&c, "succeeded") >= 1);
    /* a itself, back from its pause, did not take c for down: the heartbeats it heard
     * nothing of while stopped say nothing about c */
    long long a_now = -2;
    CHECK(cn_nums(&a, &a_now, 1, "events") == 1);
    CHECK_EQ_INT(a_now, a_events);

    /* a killed while the store does not answer: c's removal of its stored snapshots
     * fails, and is tried again until it works, so a later joiner does not load them */
    long long removing = logged(&c, "removing"), removed = logged(&c, "removed");
    CHECK(kill(cl.servers[x].pid, SIGSTOP) == 0);
    nh_child_kill9(&a);
    CHECK_EQ_INT(nh_child_wait(&a, 5000), 137);
    WAIT_UNTIL(get_of(&c, "snapr", "k1", EID_A) == -1);
    WAIT_UNTIL(logged(&c, "removing") > removing);
    CHECK(kill(cl.servers[x].pid, SIGCONT) == 0);
    WAIT_UNTIL(logged(&c, "removed") > removed);
    nh_child d;
    start_node(&d, EID_D, "d", cl.servers[(x + 1) % 3].url, "store_replicas=1");
    CHECK_EQ_INT(get_of(&d, "snapr", "k1", EID_A), -1);
    const char *e = cn_cmd(&d, "nodes");
    CHECK(e != NULL && strstr(e, EID_A) == NULL);
    CHECK_EQ_INT(cn_stop(&d), 0);
    CHECK_EQ_INT(cn_stop(&c), 0);
    nh_cluster_free(&cl);
}

/* A number after "key": in the monitoring JSON `body`, after `after` (-1: none). */
static long long json_num_after(const char *body, const char *after, const char *key)
{
    const char *p = strstr(body, after);
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    if (p == NULL || (p = strstr(p, pat)) == NULL)
        return -1;
    return strtoll(p + strlen(pat), NULL, 10);
}

/* From srv's /jsz: the messages in the store's stream (which = 0), or the most messages
 * a reader of topic big's snapshots still has to get (which = 1); -1: no answer. */
static long long store_jsz(nh_server *srv, int which)
{
    size_t cap = 1 << 20;
    char *body = (char *)malloc(cap);
    long long v = -1;
    const char *path = "/jsz?accounts=true&streams=true&consumers=true&config=true";
    if (body != NULL && nh_http_get(srv->monitor_port, path, body, cap, 2000) == 200) {
        if (which == 0) {
            v = json_num_after(body, "\"KV_sb_state\"", "messages");
        } else {
            /* the consumers that read topic big's snapshots (a share's load) */
            v = 0;
            const char *filter = "\"filter_subject\": \"$KV.sb_state.*.c.big.";
            for (const char *p = body; (p = strstr(p, filter)) != NULL;) {
                p += strlen(filter);
                /* one reading now: it delivered its first batch (an idle consumer left
                 * from an earlier read has delivered nothing) */
                long long n = json_num_after(p, "", "num_pending");
                if (json_num_after(p, "\"delivered\"", "consumer_seq") > 0 && n > v)
                    v = n;
            }
        }
    }
    free(body);
    return v;
}

/* A node leaves while it writes all of its snapshots again (its server came back with an
 * empty store). The leave removes the node's keys from the store; the pass went on
 * writing after that until the node's thread ended, and the keys it wrote stayed in the
 * store of a node that is gone. Now the pass ends at the leave, before the removal, and
 * the store holds nothing of the node afterwards. */
static void test_leave_during_reassertion(void)
{
    nh_server srv;
    start_lone_server(&srv);
    nh_child a;
    start_node(&a, EID_A, "a", srv.url, "");
    int n = cn_scale(50000, 5000);
    CN_OK(&a, "putn reg snapz %d z", n);
    WAIT_UNTIL(store_jsz(&srv, 0) == n + 1); /* every snapshot and the presence */

    nh_server_kill9(&srv);
    WAIT_UNTIL(stat_of(&a, ST_CONNECTED) == 0);
    CHECK(nh_server_restart(&srv, 1) == 0);
    /* the pass began: some of the snapshots are back */
    long long written = -1;
    WAIT_UNTIL((written = store_jsz(&srv, 0)) > 0);
    CN_OK(&a, "leave");
    long long after_leave = store_jsz(&srv, 0);
    cn_sleep_ms(500);
    long long later = store_jsz(&srv, 0);
    printf("left during a pass of %d writes (%lld written when the leave began): %lld keys "
           "stored after the leave, %lld 0.5 s later\n",
           n, written, after_leave, later);
    CHECK_EQ_INT(after_leave, 0);
    CHECK_EQ_INT(later, 0);
    CHECK_EQ_INT(cn_stop(&a), 0);
    nh_server_free(&srv);
}

/* Stops child c and waits until it is stopped (kill only asks): 1, or 0 if it exited. */
static int pause_child(nh_child *c)
{
    int st = 0;
    if (c->pid <= 0 || kill(c->pid, SIGSTOP) != 0 || waitpid(c->pid, &st, WUNTRACED) != c->pid)
        return 0;
    if (WIFSTOPPED(st))
        return 1;
    c->status = st;
    c->pid = 0;
    return 0;
}

#define MID_READ_KEYS 10000
#define MID_READ_LEFT 1500 /* three of the client's batches: more pulls must follow */

/* The store stops answering in the middle of a read (a share's load of 10,000
 * snapshots): the client's reader would wait for it forever (it recreates its consumer
 * again and again), and the share would neither fail, nor say so, nor try again. The
 * read fails after a request's time without a message: the share is warned about and
 * tried again, and goes through once the store answers. */
static void test_store_stops_mid_read(void)
{
    nh_server srv;
    start_lone_server(&srv);
    nh_child a, c;
    start_node(&a, EID_A, "a", srv.url, "");
    start_node(&c, EID_C, "c", srv.url, "connect_timeout_ms=2000");
    CN_OK(&a, "topic big");
    CN_OK(&a, "cache big");
    CN_OK(&a, "sharecache big");
    CN_OK(&a, "putn big snapm %d m", MID_READ_KEYS);
    WAIT_UNTIL(store_jsz(&srv, 0) >= MID_READ_KEYS);
    CN_OK(&c, "topic big");
    CN_OK(&c, "cache big");
    /* c loads them; c is paused (for a moment each time) until the server says its
     * read has batches left to deliver: then the server stops */
    int caught = 0, tries = 0;
    long long deadline = nh_now_ms() + nh_scale_ms(60000);
    while (!caught && tries < 20 && nh_now_ms() < deadline) {
        tries++;
        CHECK(nh_child_send(&c, "sharecache big") == 0);
        for (;;) {
            if (!pause_child(&c)) {
                CHECK(!"node c paused");
                deadline = 0;
                break;
            }
            caught = store_jsz(&srv, 1) >= MID_READ_LEFT;
            if (caught)
                CHECK(kill(srv.pid, SIGSTOP) == 0);
            CHECK(kill(c.pid, SIGCONT) == 0);
            /* a reply: the load went through before it was caught; again */
            if (caught || nh_child_read_line(&c, NULL, 0, 1) >= 0 || nh_now_ms() > deadline)
                break;
        }
    }
    printf("store stopped in the middle of a read: %s (try %d)\n", caught ? "yes" : "no",
           tries);
    CHECK(caught);
    if (caught) {
        /* the share gives up for now (the caller gets its error) and says so */
        CHECK(nh_child_read_line(&c, NULL, 0, nh_scale_ms(30000)) >= 0 &&
              strncmp(c.line, "err", 3) == 0);
        WAIT_UNTIL(logged(&c, "sharing cache of topic 'big' failed") >= 1);
        CHECK(kill(srv.pid, SIGCONT) == 0);
        long long t0 = nh_now_ms();
        /* it is tried again, and goes through once the store answers */
        WAIT_UNTIL(logged(&c, "sharing cache of topic 'big' went through") >= 1);
        long long v[3] = {-1, -1, -1};
        WAIT_UNTIL(cn_nums(&c, v, 3, "dump big snapm") == 3 && v[2] == MID_READ_KEYS);
        printf("the server running again: all %lld loaded after %lld ms\n", v[2],
               nh_now_ms() - t0);
    }
    CHECK_EQ_INT(cn_stop(&c), 0);
    CHECK_EQ_INT(cn_stop(&a), 0);
    nh_server_free(&srv);
}

/* The store stops answering (its server stopped; the two others carry messages) while a
 * node writes a burst of snapshots. The client grants 5,000 unacknowledged writes, and a
 * write waits for a grant until the acknowledgements it waits for time out (2 s for each
 * batch of 4,096). Messages do not wait behind the store's writes: a plain message
 * published after the burst reaches the other node while the store is still stopped (it
 * waited 2 s per 4,096 writes of the burst, 24 s for 50,000: past the wait's bound). The
 * node's queue of store writes, as long as its outgoing queue (20,000), overflows
 * meanwhile: once the store answers, every snapshot gets there all the same, and the
 * other node has them all. */
static void test_store_stopped_messages_flow(void)
{
    nh_cluster cl;
    int x = start_three_store_apart(&cl);
    if (x < 0)
        return;
    int n = cn_scale(50000, 5000);
    char opts[64];
    snprintf(opts, sizeof opts, "store_replicas=1 out_queue_limit=%d", n * 2 / 5);
    nh_child a, c;
    start_node(&a, EID_A, "a", cl.servers[(x + 1) % 3].url, opts);
    start_node(&c, EID_C, "c", cl.servers[(x + 2) % 3].url, "store_replicas=1");
    CN_OK(&a, "topic chat");
    CN_OK(&c, "topic chat");
    CN_OK(&a, "share chat");
    CN_OK(&c, "share chat");

    CHECK(kill(cl.servers[x].pid, SIGSTOP) == 0);
    CN_OK(&a, "putn reg snaps %d s", n);
    CN_OK(&a, "pub chat text 1 after");
    WAIT_UNTIL(count_total(&c, "chat") == 1);
    long long dropped = stat_of(&a, ST_DROPPED_OUT);
    printf("store stopped during %d writes: the message crossed; %lld writes dropped\n", n,
           dropped);
    CHECK(dropped > 0);
    CHECK(kill(cl.servers[x].pid, SIGCONT) == 0);
    long long in_store = -1;
    WAIT_UNTIL((in_store = store_jsz(&cl.servers[x], 0)) >= n);
    WAIT_UNTIL(dump_remote(&c, "snaps") == n);
    CHECK_EQ_INT(cn_stop(&a), 0);
    CHECK_EQ_INT(cn_stop(&c), 0);
    nh_cluster_free(&cl);
}

/* The server killed (kill -9) while a node writes snapshots to the store at full speed,
 * and restarted with its store: the writes it took but never acknowledged are thousands.
 * Each acknowledgement's wait (2 s) began only when the one before it ended, and the
 * sender waited for them: the node sent nothing, not even a plain message, for hours.
 * Now they are awaited together: a message published after the reconnect crosses at
 * once, and the store gets every snapshot again. */
static void test_server_killed_mid_writes(void)
{
    nh_server srv;
    nh_child a, b;
    start_pair(&srv, &a, &b);
    CN_OK(&a, "topic chat");
    CN_OK(&b, "topic chat");
    CN_OK(&a, "share chat");
    CN_OK(&b, "share chat");
    int n = cn_scale(50000, 5000);
    CN_OK(&a, "putn reg snapw %d w", n); /* returns before the writes are done */
    nh_server_kill9(&srv);
    long long stored = -1;
    CHECK(nh_server_restart(&srv, 0) == 0);
    WAIT_UNTIL(stat_of(&a, ST_CONNECTED) == 1 && stat_of(&b, ST_CONNECTED) == 1);
    CN_OK(&a, "pub chat text 1 after");
    WAIT_UNTIL(count_total(&b, "chat") == 1);
    /* every snapshot reaches the store (a writes them all again after the reconnect) */
    WAIT_UNTIL((stored = store_jsz(&srv, 0)) >= n);
    printf("server killed during %d writes: %lld in the store after the restart\n", n, stored);
    CHECK_EQ_INT(cn_stop(&a), 0);
    CHECK_EQ_INT(cn_stop(&b), 0);
    nh_server_free(&srv);
}

#define MANY_CACHES 8
#define MANY_CACHE_KEYS 1500
/* Eight caches of 1,500 own snapshots each, shared while the server is down: each share
 * returns its error (subscribing timed out) and goes on in the background, as API.md
 * says (it used to stop there: nothing was ever stored), and all write when the server
 * is back. Each write pass keeps up to 1,024 acknowledgements it has not awaited yet,
 * and the client grants 5,000: passes running side by side took them all and waited for
 * each other forever (the store stopped at 4,300-5,200 of 12,000). One pass writes at a
 * time now. */
static void test_many_shares_at_once(void)
{
    nh_server srv;
    start_lone_server(&srv);
    nh_child g;
    start_node(&g, EID_A, "g", srv.url, "connect_timeout_ms=1000");
    for (int i = 0; i < MANY_CACHES; i++) {
        CN_OK(&g, "topic many%d", i);
        CN_OK(&g, "cache many%d", i);
        CN_OK(&g, "putn many%d snapmany %d m", i, MANY_CACHE_KEYS);
    }
    nh_server_kill9(&srv);
    WAIT_UNTIL(stat_of(&g, ST_CONNECTED) == 0);
    for (int i = 0; i < MANY_CACHES; i++) {
        const char *r = cn_cmd(&g, "sharecache many%d", i);
        CHECK(r != NULL && strncmp(r, "err", 3) == 0);
    }
    CHECK(nh_server_restart(&srv, 0) == 0);
    long long want = (long long)MANY_CACHES * MANY_CACHE_KEYS;
    long long stored = -1;
    WAIT_UNTIL((stored = store_jsz(&srv, 0)) >= want);
    printf("%d caches shared while the server was down: %lld of %lld stored\n", MANY_CACHES,
           stored, want);
    CHECK_EQ_INT(cn_stop(&g), 0);
    nh_server_free(&srv);
}

/* Leaving while no server answers: the client's buffer is full of messages no server
 * takes (a publish into it waits for a reconnect that does not come), and the cluster
 * thread is still on a share it could not finish. The leave returns within a bound
 * (it waited forever), and the process goes on. */
static void test_leave_without_servers(void)
{
    nh_server srv;
    start_lone_server(&srv);
    nh_child a;
    start_node(&a, EID_A, "a", srv.url, "connect_timeout_ms=1000");
    CN_OK(&a, "put reg snapl k1 1");
    CN_OK(&a, "topic later");
    nh_server_kill9(&srv);
    WAIT_UNTIL(stat_of(&a, ST_CONNECTED) == 0);
    CN_OK(&a, "pub reg text 200000 nobody");
    const char *r = cn_cmd(&a, "share later");
    CHECK(r != NULL && strncmp(r, "err -6", 6) == 0); /* SB_E_TIMEOUT: goes on behind */
    long long t0 = nh_now_ms();
    CN_OK(&a, "leave");
    long long took = nh_now_ms() - t0;
    printf("leave with no server: %lld ms (%lld warning(s) it was cut short)\n", took,
           logged(&a, "leaving"));
    /* six seconds for the cluster thread's part, then it is stopped where it waits */
    CHECK(took < nh_scale_ms(9000));
    CHECK(stat_of(&a, ST_SENT) == -1); /* no cluster any more */
    CN_OK(&a, "count reg");            /* the bus goes on */
    CHECK_EQ_INT(cn_stop(&a), 0);
    nh_server_free(&srv);
}

/* A server put in lame duck mode (SIGUSR2: a rolling upgrade's first step) tells its
 * clients it is going away: the node says so in its log, and goes on working meanwhile. */
static void test_lame_duck(void)
{
    nh_server srv;
    nh_child a, b;
    start_pair(&srv, &a, &b);
    WAIT_UNTIL(stat_of(&a, ST_UP) == 2);
    CHECK_EQ_INT(logged(&a, "lame"), 0);
    CHECK(kill(srv.pid, SIGUSR2) == 0);
    WAIT_UNTIL(logged(&a, "lame") == 1);
    WAIT_UNTIL(logged(&b, "lame") == 1);
    /* still connected during the server's grace period: messages keep flowing */
    CN_OK(&a, "pub reg text 100 lameduck");
    WAIT_UNTIL(count_total(&b, "reg") >= 100);
    CHECK_EQ_INT(cn_stop(&a), 0);
    CHECK_EQ_INT(cn_stop(&b), 0);
    nh_server_free(&srv);
}

/* A node drops arrivals (its delivery stalls during a burst of 100,000 cache changes from
 * another node) while the store does not answer (its server stopped until after the
 * receiver's first possible re-read): the sender's store writes of the burst wait, then
 * land, some of them failed and written again. The receiver re-reads the sender's
 * snapshots once its heartbeats report those writes done (the wait's own steps are
 * unit-tested in catch_up.rs), and ends up holding every one. */
static void test_store_lags_dropped_arrivals(void)
{
    nh_cluster cl;
    int x = start_three_store_apart(&cl);
    if (x < 0)
        return;
    nh_child a, c;
    start_node(&a, EID_A, "a", cl.servers[(x + 1) % 3].url,
               "store_replicas=1 out_queue_limit=1000000");
    start_node(&c, EID_C, "c", cl.servers[(x + 2) % 3].url, "store_replicas=1");
    CN_OK(&c, "topic stallt");
    CN_OK(&c, "stallsub stallt 2500");
    CN_OK(&c, "share stallt");
    CN_OK(&a, "topic stallt");
    CN_OK(&a, "share stallt");
    long long drop0 = stat_of(&c, ST_DROPPED_IN);

    int n = cn_scale(100000, 20000);
    long long t0 = nh_now_ms();
    CHECK(kill(cl.servers[x].pid, SIGSTOP) == 0);
    CN_OK(&a, "pub stallt stall 1 s");
    CN_OK(&a, "putn reg snapl %d l", n);
    /* the receiver's drops end with its stall (2.5 s), and its first possible re-read is
     * 1 s later: the store answers after that (slow modes: no timing, convergence) */
    long long resume_at = t0 + cn_scale(3700, 1000);
    while (nh_now_ms() < resume_at)
        cn_sleep_ms(5);
    long long held = dump_remote(&c, "snapl");
    CHECK(kill(cl.servers[x].pid, SIGCONT) == 0);
    long long dropped = stat_of(&c, ST_DROPPED_IN) - drop0;
    printf("%d cache changes, %lld arrivals dropped; the receiver held %lld when the store "
           "answered again, %lld ms after the burst began\n",
           n, dropped, held, nh_now_ms() - t0);
    if (!cn_slow())
        CHECK(dropped > 0); /* the arrival queue did overflow */
    CN_WAIT_UNTIL(dump_remote(&c, "snapl") == n, 30);
    printf("the receiver holds all %d after %lld ms\n", n, nh_now_ms() - t0);
    CHECK_EQ_INT(cn_stop(&a), 0);
    CHECK_EQ_INT(cn_stop(&c), 0);
    nh_cluster_free(&cl);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "node") == 0)
        return cn_node_main();
    argv0 = argv[0];
    TEST_INIT();
    if (cn_slow())
        alarm(540); /* the node processes are instrumented too: everything is slower */
    if (!nh_require_server())
        return TEST_DONE();
    test_server_restart_empty_store();
    test_cluster_loses_a_server();
    test_store_not_answering();
    test_store_stops_mid_read();
    test_store_stopped_messages_flow();
    test_store_lags_dropped_arrivals();
    test_leave_during_reassertion();
    test_server_killed_mid_writes();
    test_many_shares_at_once();
    test_leave_without_servers();
    test_lame_duck();
    return TEST_DONE();
}
