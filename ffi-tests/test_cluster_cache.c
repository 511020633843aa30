/*
 * test_cluster_cache.c - shared caches between node processes over a real nats-server:
 * dump / dump_all / get_by_eid / aggregates over nodes, clears, a late join of 10,000
 * entries, kill -9 of a node cleared everywhere within heartbeat_ms x down_after_missed
 * + 1 s (and not loaded by a later joiner), a clean leave seen within 1 s, and a node
 * restarted with the same eid whose new session drops what it does not re-assert, a
 * share of a cache holding 6,000 of the node's own snapshots, and a snapshot larger than
 * the server takes (counted, warned, never retried), and a burst of changes that
 * overflows the outgoing queue (the dropped changes reach the others and the store), or
 * a receiver's arrival queue (it re-reads what it dropped).
 */
#include "test_util.h"
#include "nats_harness.h"
#include "cluster_node.h"

#define EID_A "00:00:00:00:00:0a"
#define EID_B "00:00:00:00:00:0b"
#define EID_C "00:00:00:00:00:0c"
#define EID_D "00:00:00:00:00:0d"
#define EID_E "00:00:00:00:00:0e"
#define EID_F "00:00:00:00:00:0f"
#define HB_MS 200
/* Heartbeats missed before a node counts as down. Under ThreadSanitizer every node is
 * instrumented (5-20x slower) and the tests run two at a time: a node paused that long
 * was declared down while alive, and the others purged its stored snapshots (see the
 * notes: a live node does not re-assert them), which a later joiner then lacked. */
#define MISSED (tu_tsan() ? 15 : 3)

static nh_server srv;
static const char *argv0;

/* dump T TYPE -> all, local, remote */
static long long dump_of(nh_child *n, const char *type, int field)
{
    long long v[3] = {-1, -1, -1};
    if (cn_nums(n, v, 3, "dump reg %s", type) != 3)
        return -1;
    return v[field];
}
enum { D_ALL, D_LOCAL, D_REMOTE };

/* The value of eid's snapshot ID of TYPE in topic's cache; -1 when it has none. */
static long long get_in(nh_child *n, const char *topic, const char *type, const char *id,
                        const char *eid)
{
    const char *r = cn_cmd(n, "get %s %s %s %s", topic, type, id, eid);
    if (r == NULL || strcmp(r, "ok none") == 0)
        return -1;
    return strtoll(r + 2, NULL, 10);
}

static long long get_of(nh_child *n, const char *type, const char *id, const char *eid)
{
    return get_in(n, "reg", type, id, eid);
}

static long long agg_of(nh_child *n, const char *type, const char *id)
{
    const char *r = cn_cmd(n, "agg reg %s %s", type, id);
    if (r == NULL || strcmp(r, "ok none") == 0)
        return -1;
    return strtoll(r + 2, NULL, 10);
}

/* A node with topic reg and its cache (not shared yet); `extra`: more join options. */
static void start_node_with(nh_child *n, const char *eid, const char *name, const char *extra)
{
    CHECK(cn_spawn(argv0, n) == 0);
    CN_OK(n, "eid %s", eid);
    /* slow modes: a store read by instrumented processes can outlast the default 5 s */
    CN_OK(n, "join %s sb %s %d down_after_missed=%d connect_timeout_ms=%d %s", srv.url, name,
          HB_MS, MISSED, cn_slow() ? 25000 : 5000, extra);
    CN_OK(n, "topic reg");
    CN_OK(n, "cache reg agg");
}

static void start_node(nh_child *n, const char *eid, const char *name)
{
    start_node_with(n, eid, name, "");
}

static void test_shared_cache(nh_child *a, nh_child *b)
{
    /* a snapshot cached before sharing is shared too */
    CN_OK(a, "put reg snapreg alice 1");
    CN_OK(a, "sharecache reg");
    CN_OK(b, "sharecache reg");
    CHECK_EQ_INT(get_of(b, "snapreg", "alice", EID_A), 1); /* held when share returned */
    CN_OK(a, "put reg snapreg bob 2");
    CN_OK(b, "put reg snapreg alice 10");
    WAIT_UNTIL(dump_of(b, "snapreg", D_ALL) == 3 && dump_of(a, "snapreg", D_ALL) == 3);
    CHECK_EQ_INT(dump_of(b, "snapreg", D_LOCAL), 1);
    CHECK_EQ_INT(dump_of(b, "snapreg", D_REMOTE), 2);
    CHECK_EQ_INT(dump_of(a, "snapreg", D_LOCAL), 2);
    CHECK_EQ_INT(get_of(b, "snapreg", "bob", EID_A), 2);
    CHECK_EQ_INT(get_of(a, "snapreg", "alice", EID_B), 10);
    /* the aggregate sums every node's snapshot of the object, on both nodes */
    WAIT_UNTIL(agg_of(a, "snapreg", "alice") == 11 && agg_of(b, "snapreg", "alice") == 11);
    /* an update replaces, a clear removes, everywhere */
    CN_OK(a, "put reg snapreg alice 5");
    WAIT_UNTIL(get_of(b, "snapreg", "alice", EID_A) == 5);
    WAIT_UNTIL(agg_of(b, "snapreg", "alice") == 15);
    CN_OK(a, "clear reg snapreg bob");
    WAIT_UNTIL(get_of(b, "snapreg", "bob", EID_A) == -1);
    CHECK_EQ_INT(dump_of(b, "snapreg", D_ALL), 2);
    /* remote entries go through the update path: b saw cache updates for them (on a
     * subscription of its own thread: they may still be on their way) */
    WAIT_UNTIL(cn_num(b, "updates reg") >= 4);
}

static void test_late_join(nh_child *a, nh_child *b, nh_child *c)
{
    int n = cn_scale(10000, 1000);
    CN_OK(a, "putn reg snaplate %d L", n);
    CN_OK(b, "putn reg snaplate %d M", n);
    WAIT_UNTIL(dump_of(b, "snaplate", D_REMOTE) == n);
    start_node(c, EID_C, "c");
    long long t0 = nh_now_ms();
    CN_OK(c, "sharecache reg");
    long long took = nh_now_ms() - t0;
    /* every live node's snapshots are there when sharecache returns. Under
     * ThreadSanitizer (every node instrumented, 5-20x slower) one node's snapshots were
     * seen to arrive after the return: there the test waits for them and says so (an
     * open question about the late join on a slow node, recorded in the notes; a node
     * falsely declared down, whose stored snapshots the others purged, is one cause),
     * while the native and valgrind runs keep the strict check. */
    if (tu_tsan() && dump_of(c, "snaplate", D_REMOTE) != 2 * n) {
        printf("note: late join under ThreadSanitizer: %lld of %d entries at return\n",
               dump_of(c, "snaplate", D_REMOTE), 2 * n);
        WAIT_UNTIL(dump_of(c, "snaplate", D_REMOTE) == 2 * n &&
                   dump_of(c, "snapreg", D_REMOTE) == 2);
    }
    CHECK_EQ_INT(dump_of(c, "snaplate", D_REMOTE), 2 * n);
    CHECK_EQ_INT(dump_of(c, "snapreg", D_REMOTE), 2);
    CHECK_EQ_INT(get_of(c, "snaplate", "L7", EID_A), 7);
    CHECK_EQ_INT(get_of(c, "snaplate", "M9", EID_B), 9);
    printf("late join of %d entries: %lld ms\n", 2 * n, took);
}

static void test_clean_leave(nh_child *a, nh_child *b, nh_child *c)
{
    CN_OK(c, "put reg snapreg carol 3");
    WAIT_UNTIL(get_of(b, "snapreg", "carol", EID_C) == 3);
    /* A callback that the clears of c's entries run on b's delivery thread shares a
     * topic: it returns (the clears once held the lock a share takes). It then shares a
     * cache, whose load ends on that very thread: SB_E_TIMEOUT at once, saying so (it
     * used to hold every arrival for connect_timeout_ms first), and the load follows
     * once the callback returned. */
    CN_OK(a, "topic fromcb");
    CN_OK(a, "cache fromcb");
    CN_OK(a, "sharecache fromcb");
    CN_OK(a, "put fromcb snapcb k 5");
    CN_OK(b, "topic fromcallback");
    CN_OK(b, "topic fromcb");
    CN_OK(b, "cache fromcb");
    CN_OK(b, "shareonclear reg fromcallback fromcb");
    long long t0 = nh_now_ms();
    CN_OK(c, "leave");
    WAIT_UNTIL(get_of(b, "snapreg", "carol", EID_C) == -1 &&
               dump_of(b, "snaplate", D_REMOTE) == cn_scale(10000, 1000));
    WAIT_UNTIL(cn_num(b, "cbshare") == SB_OK);
    long long took = nh_now_ms() - t0;
    long long rc[3] = {-1, -1, -1};
    CHECK_EQ_INT(cn_nums(b, rc, 3, "cbshare"), 3);
    CHECK_EQ_INT(rc[1], SB_E_TIMEOUT);
    CHECK_EQ_INT(rc[2], 1);
    WAIT_UNTIL(get_in(b, "fromcb", "snapcb", "k", EID_A) == 5);
    if (!cn_slow())
        CHECK(took < 1000);
    printf("clean leave cleared in %lld ms\n", took);
    /* c (still a process) cleared the remote entries of its own caches when leaving */
    CHECK_EQ_INT(dump_of(c, "snaplate", D_REMOTE), 0);
    CHECK_EQ_INT(cn_stop(c), 0);
}

static void test_kill9(nh_child *a, nh_child *b)
{
    int n = cn_scale(10000, 1000);
    CHECK_EQ_INT(dump_of(b, "snaplate", D_REMOTE), n);
    long long t0 = nh_now_ms();
    nh_child_kill9(a);
    CHECK_EQ_INT(nh_child_wait(a, 5000), 137);
    WAIT_UNTIL(dump_of(b, "snaplate", D_REMOTE) == 0 && dump_of(b, "snapreg", D_REMOTE) == 0);
    long long took = nh_now_ms() - t0;
    long long bound = HB_MS * MISSED + 1000;
    if (!cn_slow())
        CHECK(took <= bound);
    printf("kill -9: entries cleared in %lld ms (bound %lld ms)\n", took, bound);
    /* aggregates recomputed without a's snapshot */
    WAIT_UNTIL(agg_of(b, "snapreg", "alice") == 10);
    const char *e = cn_cmd(b, "events");
    CHECK(e != NULL && strstr(e, EID_A " 2") != NULL); /* SB_NODE_DOWN */
    /* a later joiner does not load the dead node's snapshots */
    nh_child d;
    start_node(&d, EID_D, "d");
    CN_OK(&d, "sharecache reg");
    CHECK_EQ_INT(dump_of(&d, "snaplate", D_REMOTE), n); /* b's only */
    CHECK_EQ_INT(get_of(&d, "snaplate", "L1", EID_A), -1);
    CHECK_EQ_INT(cn_stop(&d), 0);
}

static void test_new_session(nh_child *b)
{
    /* a node restarted with the same eid before the others noticed it was gone: what the
     * new session does not re-assert is cleared everywhere */
    nh_child a2, a3;
    start_node(&a2, EID_A, "a2");
    CN_OK(&a2, "put reg snapsess x1 1");
    CN_OK(&a2, "put reg snapsess x2 2");
    CN_OK(&a2, "sharecache reg");
    WAIT_UNTIL(get_of(b, "snapsess", "x1", EID_A) == 1 && get_of(b, "snapsess", "x2", EID_A) == 2);
    nh_child_kill9(&a2);
    nh_child_wait(&a2, 5000);
    start_node(&a3, EID_A, "a3");
    CN_OK(&a3, "put reg snapsess x1 11");
    CN_OK(&a3, "sharecache reg");
    WAIT_UNTIL(get_of(b, "snapsess", "x1", EID_A) == 11 && get_of(b, "snapsess", "x2", EID_A) == -1);
    /* and it stays that way (a3 keeps heartbeating: not marked down) */
    cn_sleep_ms(HB_MS * (MISSED + 2));
    CHECK_EQ_INT(get_of(b, "snapsess", "x1", EID_A), 11);
    const char *r = cn_cmd(b, "nodes");
    CHECK(r != NULL && strstr(r, EID_A "=1/a3") != NULL);
    CHECK_EQ_INT(cn_stop(&a3), 0);
}

/* A node paused longer than the others' patience is declared down, and they purge its
 * stored snapshots (late joiners must not load a gone node's). Alive all along, it
 * finds its presence gone once it runs again and writes everything back: the others
 * read its snapshots again, and a later joiner loads them. */
static void test_paused_node(nh_child *b)
{
    nh_child e, f;
    start_node(&e, EID_E, "e");
    CN_OK(&e, "put reg snappause k1 5");
    CN_OK(&e, "sharecache reg");
    WAIT_UNTIL(get_of(b, "snappause", "k1", EID_E) == 5);
    CHECK(kill(e.pid, SIGSTOP) == 0);
    WAIT_UNTIL(get_of(b, "snappause", "k1", EID_E) == -1); /* down: cleared */
    /* the purge is b's own, started when it saw e down: give it time to land */
    cn_sleep_ms(HB_MS * 2);
    CHECK(kill(e.pid, SIGCONT) == 0);
    WAIT_UNTIL(get_of(b, "snappause", "k1", EID_E) == 5);
    start_node(&f, EID_F, "f");
    CN_OK(&f, "sharecache reg");
    WAIT_UNTIL(get_of(&f, "snappause", "k1", EID_E) == 5);
    CHECK_EQ_INT(cn_stop(&f), 0);
    CHECK_EQ_INT(cn_stop(&e), 0);
}

/* A cache that holds more of its own snapshots than the client lets await their store
 * acknowledgement at once (5,000) when it is shared: the share writes them all (it used
 * to keep every acknowledgement until the end, and the 5,001st write waited forever for
 * one of them: the share timed out and the store never got the rest; a node re-asserting
 * that many after a reconnect hung the same way). */
#define MANY_OWN 6000
static void test_share_many_own(nh_child *b)
{
    nh_child g;
    start_node(&g, "00:00:00:00:00:1b", "g");
    CN_OK(&g, "putn reg snapmany %d m", MANY_OWN);
    CN_OK(&g, "sharecache reg");
    WAIT_UNTIL(dump_of(b, "snapmany", D_REMOTE) == MANY_OWN);
    /* the store has them: a later joiner loads them all */
    nh_child h;
    start_node(&h, "00:00:00:00:00:1c", "h");
    CN_OK(&h, "sharecache reg");
    CHECK_EQ_INT(dump_of(&h, "snapmany", D_REMOTE), MANY_OWN);
    CHECK_EQ_INT(get_of(&h, "snapmany", "m5999", "00:00:00:00:00:1b"), 5999);
    CHECK_EQ_INT(cn_stop(&h), 0);
    CHECK_EQ_INT(cn_stop(&g), 0);
}

static long long dropped_out_of(nh_child *n)
{
    long long v[7] = {-1, -1, -1, -1, -1, -1, -1};
    if (cn_nums(n, v, 7, "stats") != 7)
        return -1;
    return v[2];
}

static long long store_errors_of(nh_child *n)
{
    long long v[2] = {-1, -1};
    if (cn_nums(n, v, 2, "storeerr") != 2)
        return -1;
    return v[0];
}

/* A snapshot larger than the server takes (its max_payload, 1 MB by default) cannot
 * cross: it is counted in dropped_out and warned once, the others keep its previous
 * value, the store too (a late joiner loads the same), nothing is retried (a store write
 * that failed that way was retried forever, rewriting every snapshot each time), and
 * what comes after it still crosses (a message was lost without a trace before). Then
 * cache ids that make no store key. */
static void test_too_large(nh_child *b)
{
    nh_child g, h;
    start_node(&g, "00:00:00:00:00:1a", "g");
    CN_OK(&g, "sharecache reg");
    CN_OK(&g, "put reg snapbig k 1");
    WAIT_UNTIL(get_of(b, "snapbig", "k", "00:00:00:00:00:1a") == 1);
    long long dropped = dropped_out_of(&g), errors = store_errors_of(&g);
    CN_OK(&g, "putbig reg snapbig k 2000000");
    CN_OK(&g, "put reg snapbig after 2");
    WAIT_UNTIL(get_of(b, "snapbig", "after", "00:00:00:00:00:1a") == 2);
    CHECK_EQ_INT(get_of(b, "snapbig", "k", "00:00:00:00:00:1a"), 1);
    CHECK_EQ_INT(get_of(&g, "snapbig", "k", "00:00:00:00:00:1a"), 0); /* g's own: the big one */
    /* one message, one snapshot write */
    WAIT_UNTIL(dropped_out_of(&g) == dropped + 2);
    long long warned = -1;
    CHECK(cn_nums(&g, &warned, 1, "logged larger") == 1 && warned == 2);
    /* no retry: the store errors stay where they were over several retry periods */
    cn_sleep_ms(HB_MS * 10);
    CHECK_EQ_INT(store_errors_of(&g), errors);
    CHECK_EQ_INT(dropped_out_of(&g), dropped + 2);

    /* cache ids that make no store key (empty; over 1024 bytes): shared with the nodes
     * up (messages carry no id in their subject), not stored, warned once, never
     * retried; a 5,000-byte key made the server close the connection, again at every
     * reconnect, and the empty one made a store write fail forever */
    long long reconnects = -1;
    {
        long long v[7] = {-1, -1, -1, -1, -1, -1, -1};
        CHECK(cn_nums(&g, v, 7, "stats") == 7);
        reconnects = v[4];
    }
    dropped = dropped_out_of(&g);
    CN_OK(&g, "putid reg snapid 0 7");
    CN_OK(&g, "putid reg snapid 5000 8");
    CN_OK(&g, "put reg snapid k 9");
    WAIT_UNTIL(dump_of(b, "snapid", D_REMOTE) == 3);
    WAIT_UNTIL(dropped_out_of(&g) == dropped + 2);
    CHECK(cn_nums(&g, &warned, 1, "logged makes") == 1 && warned == 1);
    /* their clears reach the others too; the store has nothing to remove (a removal of
     * a key that cannot be was retried forever) */
    CN_OK(&g, "clearid reg snapid 0");
    CN_OK(&g, "clearid reg snapid 5000");
    WAIT_UNTIL(dump_of(b, "snapid", D_REMOTE) == 1);
    cn_sleep_ms(HB_MS * 10);
    {
        long long v[7] = {-1, -1, -1, -1, -1, -1, -1};
        CHECK(cn_nums(&g, v, 7, "stats") == 7);
        CHECK_EQ_INT(v[4], reconnects);
        CHECK_EQ_INT(v[5], 1);
    }
    CHECK_EQ_INT(store_errors_of(&g), errors);

    start_node(&h, "00:00:00:00:00:1b", "h");
    CN_OK(&h, "sharecache reg");
    CHECK_EQ_INT(get_of(&h, "snapbig", "k", "00:00:00:00:00:1a"), 1);
    CHECK_EQ_INT(get_of(&h, "snapbig", "after", "00:00:00:00:00:1a"), 2);
    CHECK_EQ_INT(dump_of(&h, "snapid", D_REMOTE), 1); /* only k */
    CHECK_EQ_INT(get_of(&h, "snapid", "k", "00:00:00:00:00:1a"), 9);
    CHECK_EQ_INT(cn_stop(&h), 0);
    CHECK_EQ_INT(cn_stop(&g), 0);
}

/* A burst of changes to a shared cache faster than the network takes them, through an
 * outgoing queue of 2: the queue drops its oldest items (counted in dropped_out), store
 * writes and messages to the others among them. Nothing sent those changes again: the
 * others and the store kept the old values, or none, for good. The node now writes its
 * snapshots again when it dropped one, the others re-read them, and every node, the
 * store and a later joiner converge on the last value of each. */
static void test_queue_overflow(nh_child *b)
{
    nh_child g, h;
    const char *eid = "00:00:00:00:00:1d";
    start_node_with(&g, eid, "g", "out_queue_limit=2");
    CN_OK(&g, "sharecache reg");
    int n = cn_scale(20000, 2000);
    long long dropped = dropped_out_of(&g);
    CN_OK(&g, "putn reg snapover %d o", n);
    CN_OK(&g, "put reg snapover o7 777"); /* the last change of o7 */
    WAIT_UNTIL(dump_of(b, "snapover", D_REMOTE) == n);
    WAIT_UNTIL(get_of(b, "snapover", "o7", eid) == 777);
    CHECK_EQ_INT(get_of(b, "snapover", "o1", eid), 1);
    CHECK_EQ_INT(get_of(b, "snapover", "o0", eid), 0);
    long long now_dropped = dropped_out_of(&g);
    printf("a burst of %d cache changes through a queue of 2: %lld items dropped\n", n,
           now_dropped - dropped);
    CHECK(now_dropped > dropped); /* the burst did overflow the queue */
    long long warned = -1;
    CHECK(cn_nums(&g, &warned, 1, "logged dropped changes") == 1 && warned >= 1);
    /* the store has them all, each at its last value */
    start_node(&h, "00:00:00:00:00:1e", "h");
    CN_OK(&h, "sharecache reg");
    CHECK_EQ_INT(dump_of(&h, "snapover", D_REMOTE), n);
    CHECK_EQ_INT(get_of(&h, "snapover", "o7", eid), 777);
    CHECK_EQ_INT(cn_stop(&h), 0);
    CHECK_EQ_INT(cn_stop(&g), 0);
}

/* The receiving side of the same: b's delivery thread stalls (a synchronous subscriber
 * sleeps 5 s) while another node sends a burst of 100,000 cache changes; b's arrival
 * queue (65,536) overflows and drops some (counted in dropped_in). Nothing sent those
 * changes again: b kept the old values, or none, for good. Once the drops stop, b now
 * re-reads the other nodes' stored snapshots and catches up. (Slow modes send slower
 * than b drains: no overflow there, the convergence only.) */
static void test_arrivals_dropped(nh_child *b)
{
    nh_child g;
    const char *eid = "00:00:00:00:00:1f";
    start_node_with(&g, eid, "g", "out_queue_limit=1000000");
    CN_OK(&g, "sharecache reg");
    CN_OK(b, "topic stallt");
    CN_OK(b, "stallsub stallt 5000");
    CN_OK(b, "share stallt");
    CN_OK(&g, "topic stallt");
    CN_OK(&g, "share stallt");
    long long drop0 = -1;
    {
        long long v[7] = {-1, -1, -1, -1, -1, -1, -1};
        CHECK(cn_nums(b, v, 7, "stats") == 7);
        drop0 = v[3];
    }
    int n = cn_scale(100000, 20000);
    CN_OK(&g, "pub stallt stall 1 s");
    CN_OK(&g, "putn reg snapin %d i", n);
    CN_OK(&g, "put reg snapin i7 777"); /* the last change of i7 */
    CN_WAIT_UNTIL(dump_of(b, "snapin", D_REMOTE) == n, 60);
    CN_WAIT_UNTIL(get_of(b, "snapin", "i7", eid) == 777, 30);
    CHECK_EQ_INT(get_of(b, "snapin", "i0", eid), 0);
    long long dropped = -1;
    {
        long long v[7] = {-1, -1, -1, -1, -1, -1, -1};
        CHECK(cn_nums(b, v, 7, "stats") == 7);
        dropped = v[3] - drop0;
    }
    printf("a burst of %d cache changes during a stall: %lld arrivals dropped\n", n, dropped);
    if (!cn_slow())
        CHECK(dropped > 0); /* the arrival queue did overflow */
    CHECK_EQ_INT(cn_stop(&g), 0);
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
    nh_server_opts opts;
    memset(&opts, 0, sizeof opts);
    CHECK(nh_server_start(&srv, &opts) == 0);
    nh_child a, b, c;
    start_node(&a, EID_A, "a");
    start_node(&b, EID_B, "b");

    test_shared_cache(&a, &b);
    test_late_join(&a, &b, &c);
    test_clean_leave(&a, &b, &c);
    test_kill9(&a, &b);
    test_new_session(&b);
    test_paused_node(&b);
    test_share_many_own(&b);
    test_too_large(&b);
    test_queue_overflow(&b);
    test_arrivals_dropped(&b);

    CHECK_EQ_INT(cn_stop(&b), 0);
    nh_child_close(&a, 1000);
    nh_server_free(&srv);
    return TEST_DONE();
}
