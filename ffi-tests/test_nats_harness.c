/*
 * test_nats_harness.c - the nats-server test harness (nats_harness.h) against real servers.
 *
 *  - a lone server: plain client MSG and HMSG round trips; kill -9, restart keeping the
 *    store, restart with an empty store;
 *  - user/password and token servers: wrong or missing credentials get
 *    -ERR 'Authorization Violation', the right ones are accepted;
 *  - TLS: the generated certificates verify against the test CA (SAN IP:127.0.0.1), the
 *    server's INFO requires TLS and the plain client is refused; a handshake-first server
 *    that also requires client certificates completes a verified handshake with
 *    `openssl s_client`;
 *  - a three-server cluster: a message published on server 0 reaches a subscriber on
 *    server 2; server 1 killed, the other two still route and keep a JetStream meta
 *    leader; server 1 restarted rejoins;
 *  - child processes: this program run again as "node" (line exchange, exit code, kill -9,
 *    a child that subscribes through the plain client).
 *
 * At the end no child process of ours remains (waitpid(-1) reports none).
 */
#include "test_util.h"

#include "nats_harness.h"

static const char *self_name = "test_nats_harness";

/* ---- child side: argv[1] == "node" ---- */

/* node echo: "PING x" -> "PONG x", "EXIT n" -> exit(n); end of input -> exit 0.
 * node sub PORT SUBJECT: subscribes through the plain client, answers "SUBSCRIBED", then
 * "GOT <payload>" for the first message. */
static int node_main(int argc, char **argv)
{
    char line[1024];
    if (argc >= 3 && strcmp(argv[2], "echo") == 0) {
        nh_node_reply("READY %d", (int)getpid());
        while (nh_node_read_line(line, sizeof line) >= 0) {
            int v;
            if (sscanf(line, "PING %d", &v) == 1)
                nh_node_reply("PONG %d", v);
            else if (sscanf(line, "EXIT %d", &v) == 1)
                return v;
            else
                nh_node_reply("ERR unknown command: %s", line);
        }
        return 0;
    }
    if (argc >= 5 && strcmp(argv[2], "sub") == 0) {
        nh_plain c;
        nh_msg m;
        memset(&m, 0, sizeof m);
        int rc = 1;
        if (nh_plain_connect_auth(&c, atoi(argv[3]), NULL, NULL, NULL, 5000) != 0 ||
            nh_plain_sub(&c, argv[4], NULL, 1) != 0 || nh_plain_flush(&c, 5000) != 0) {
            nh_node_reply("ERR %s", c.err);
        } else {
            nh_node_reply("SUBSCRIBED");
            if (nh_plain_next_msg(&c, &m, 10000) == 0) {
                nh_node_reply("GOT %.*s", (int)m.payload_len, m.payload);
                rc = 0;
            } else {
                nh_node_reply("ERR no message: %s", c.err);
            }
        }
        nh_msg_free(&m);
        nh_plain_close(&c);
        /* wait for the parent to close our input */
        while (nh_node_read_line(line, sizeof line) >= 0) {
        }
        return rc;
    }
    fprintf(stderr, "node: unknown role\n");
    return 2;
}

/* ---- helpers ---- */

/* Publishes `payload` on pub until sub receives it on `subject` (interest crosses routes
 * asynchronously), bounded. 1 if received. */
static int round_trip(nh_plain *pub, nh_plain *sub, const char *subject, const char *payload)
{
    nh_msg m;
    memset(&m, 0, sizeof m);
    int got = 0;
    long long deadline = nh_now_ms() + nh_scale_ms(10000);
    while (!got && nh_now_ms() < deadline) {
        if (nh_plain_pub(pub, subject, NULL, payload, strlen(payload)) != 0)
            break;
        int r;
        while ((r = nh_plain_next_msg(sub, &m, 200)) == 0) {
            if (strcmp(m.subject, subject) == 0 && m.payload_len == strlen(payload) &&
                memcmp(m.payload, payload, m.payload_len) == 0) {
                got = 1;
                break;
            }
        }
        if (r == -2) {
            printf("subscriber connection: %s\n", sub->err);
            break;
        }
    }
    nh_msg_free(&m);
    return got;
}

/* 1 if pid is gone and reaped (no zombie of ours). */
/* 1 if a plain bind (no SO_REUSEADDR, as a "free port" pick does) to 127.0.0.1:port
 * succeeds. */
static int port_is_free(int port)
{
    int fd = nh_loopback_bind(port, 0);
    if (fd >= 0)
        close(fd);
    return fd >= 0;
}

static int reaped(pid_t pid)
{
    int st;
    return pid > 0 && waitpid(pid, &st, WNOHANG) == -1 && errno == ECHILD &&
           kill(pid, 0) == -1 && errno == ESRCH;
}

/* Runs a command, output into the server's dir/<name>.out; its exit code. */
static int run_in(const nh_server *s, const char *name, char *const argv[], char *out_path,
                  size_t len)
{
    snprintf(out_path, len, "%s/%s.out", s->dir, name);
    unlink(out_path);
    return nh_run(argv, out_path, 20000);
}

/* ---- tests ---- */

static void test_lone_server(void)
{
    nh_server s;
    CHECK(nh_server_start(&s, NULL) == 0);
    if (s.pid <= 0)
        return;
    CHECK(strncmp(s.info, "INFO {", 6) == 0);
    CHECK(strstr(s.info, "\"jetstream\":true") != NULL);
    char url[64];
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", s.port);
    CHECK_STR(s.url, url);
    CHECK(strncmp(s.dir, "/tmp/", 5) == 0);

    /* the monitoring port answers plain HTTP */
    char body[4096];
    CHECK_EQ_INT(nh_http_get(s.monitor_port, "/healthz", body, sizeof body, 2000), 200);

    nh_plain sub, pub;
    CHECK_EQ_INT(nh_plain_connect(&sub, &s, 5000), 0);
    CHECK_EQ_INT(nh_plain_connect(&pub, &s, 5000), 0);
    CHECK_EQ_INT(nh_plain_sub(&sub, "nh.test.>", NULL, 7), 0);
    CHECK_EQ_INT(nh_plain_flush(&sub, 5000), 0);

    nh_msg m;
    memset(&m, 0, sizeof m);
    CHECK_EQ_INT(nh_plain_pub(&pub, "nh.test.a", "reply.x", "hello", 5), 0);
    CHECK_EQ_INT(nh_plain_next_msg(&sub, &m, 5000), 0);
    CHECK_STR(m.subject, "nh.test.a");
    CHECK_STR(m.sid, "7");
    CHECK_STR(m.reply, "reply.x");
    CHECK_EQ_INT(m.payload_len, 5);
    CHECK_STR(m.payload, "hello");
    CHECK(m.headers == NULL);

    CHECK_EQ_INT(nh_plain_hpub(&pub, "nh.test.b", NULL, "Sb-Type: greeting\r\nSb-Eid: 0a:0b\r\n",
                               "{\"x\":1}", 7),
                 0);
    CHECK_EQ_INT(nh_plain_next_msg(&sub, &m, 5000), 0);
    CHECK_STR(m.subject, "nh.test.b");
    CHECK_STR(m.reply, "");
    CHECK(m.headers != NULL && strncmp(m.headers, "NATS/1.0\r\n", 10) == 0);
    char v[64] = "";
    CHECK_EQ_INT(nh_msg_header(&m, "sb-type", v, sizeof v), 0);
    CHECK_STR(v, "greeting");
    CHECK_EQ_INT(nh_msg_header(&m, "Sb-Eid", v, sizeof v), 0);
    CHECK_STR(v, "0a:0b");
    CHECK_EQ_INT(nh_msg_header(&m, "Missing", v, sizeof v), -1);
    CHECK_EQ_INT(nh_msg_status(&m), 0);
    CHECK_STR(m.payload, "{\"x\":1}");

    /* a message published before a flush stays queued behind the PONG */
    CHECK_EQ_INT(nh_plain_pub(&pub, "nh.test.c", NULL, "", 0), 0);
    CHECK_EQ_INT(nh_plain_flush(&pub, 5000), 0);
    CHECK_EQ_INT(nh_plain_flush(&sub, 5000), 0);
    CHECK_EQ_INT(nh_plain_next_msg(&sub, &m, 5000), 0);
    CHECK_STR(m.subject, "nh.test.c");
    CHECK_EQ_INT(m.payload_len, 0);
    /* nothing else: the read times out */
    CHECK_EQ_INT(nh_plain_next_msg(&sub, &m, 100), -1);

    /* corked publishes (throughput mode) arrive in order */
    nh_plain_cork(&pub, 1);
    for (int i = 0; i < 1000; i++) {
        char p[16];
        int n = snprintf(p, sizeof p, "%d", i);
        nh_plain_pub(&pub, "nh.test.seq", NULL, p, (size_t)n);
    }
    CHECK_EQ_INT(nh_plain_cork(&pub, 0), 0);
    int in_order = 0;
    for (int i = 0; i < 1000; i++) {
        if (nh_plain_next_msg(&sub, &m, 5000) != 0)
            break;
        if (atoi(m.payload) != i)
            break;
        in_order++;
    }
    CHECK_EQ_INT(in_order, 1000);

    /* restart keeping the store: a file in it survives */
    char marker[NH_PATH + 16];
    snprintf(marker, sizeof marker, "%s/marker", s.store);
    FILE *f = fopen(marker, "w");
    CHECK(f != NULL);
    if (f)
        fclose(f);
    int port = s.port;

    /* kill -9: the connection drops, the process is reaped */
    pid_t old = s.pid;
    nh_server_kill9(&s);
    CHECK_EQ_INT(s.pid, 0);
    CHECK(reaped(old));
    CHECK(WIFSIGNALED(s.last_status) && WTERMSIG(s.last_status) == SIGKILL);
    CHECK_EQ_INT(nh_plain_next_msg(&sub, &m, 5000), -2);
    nh_plain_close(&sub);
    nh_plain_close(&pub);
    /* until the restart its port is held: nobody answers there, and another program's
     * pick of a free port cannot take it */
    CHECK_EQ_INT(nh_tcp_connect(port, 1000), -1);
    CHECK(!port_is_free(port));

    CHECK_EQ_INT(nh_server_restart(&s, 0), 0);
    CHECK_EQ_INT(s.port, port);
    CHECK(access(marker, F_OK) == 0);
    CHECK_EQ_INT(nh_plain_connect(&sub, &s, 5000), 0);
    nh_plain_close(&sub);

    /* restart with an empty store (the server is running: stopped first) */
    old = s.pid;
    CHECK_EQ_INT(nh_server_restart(&s, 1), 0);
    CHECK(reaped(old));
    CHECK_EQ_INT(s.port, port);
    CHECK(access(marker, F_OK) != 0);
    CHECK_EQ_INT(nh_plain_connect(&sub, &s, 5000), 0);
    CHECK_EQ_INT(nh_plain_connect(&pub, &s, 5000), 0);
    CHECK_EQ_INT(nh_plain_sub(&sub, "nh.again", NULL, 1), 0);
    CHECK_EQ_INT(nh_plain_flush(&sub, 5000), 0);
    CHECK(round_trip(&pub, &sub, "nh.again", "after restart"));
    nh_plain_close(&sub);
    nh_plain_close(&pub);
    nh_msg_free(&m);

    char dir[NH_PATH];
    snprintf(dir, sizeof dir, "%s", s.dir);
    old = s.pid;
    nh_server_free(&s);
    CHECK(reaped(old));
    CHECK(access(dir, F_OK) != 0);
}

static void test_user_password(void)
{
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.user = "alice";
    o.password = "s3cret";
    nh_server s;
    CHECK(nh_server_start(&s, &o) == 0);
    if (s.pid <= 0)
        return;
    CHECK(strstr(s.info, "\"auth_required\":true") != NULL);
    nh_plain c;
    CHECK_EQ_INT(nh_plain_connect_auth(&c, s.port, "alice", "wrong", NULL, 5000), -1);
    CHECK(strstr(c.err, "Authorization Violation") != NULL);
    nh_plain_close(&c);
    CHECK_EQ_INT(nh_plain_connect_auth(&c, s.port, NULL, NULL, NULL, 5000), -1);
    CHECK(strstr(c.err, "Authorization Violation") != NULL);
    nh_plain_close(&c);
    CHECK_EQ_INT(nh_plain_connect_auth(&c, s.port, "alice", "s3cret", NULL, 5000), 0);
    CHECK_STR(c.err, "");
    nh_plain_close(&c);
    CHECK_EQ_INT(nh_plain_connect(&c, &s, 5000), 0); /* the server's own credentials */
    nh_plain_close(&c);
    nh_server_free(&s);
}

static void test_token(void)
{
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.token = "t0k3n-42";
    nh_server s;
    CHECK(nh_server_start(&s, &o) == 0);
    if (s.pid <= 0)
        return;
    nh_plain c;
    CHECK_EQ_INT(nh_plain_connect_auth(&c, s.port, NULL, NULL, "nope", 5000), -1);
    CHECK(strstr(c.err, "Authorization Violation") != NULL);
    nh_plain_close(&c);
    CHECK_EQ_INT(nh_plain_connect_auth(&c, s.port, NULL, NULL, "t0k3n-42", 5000), 0);
    nh_plain_close(&c);
    nh_server_free(&s);
}

static void test_tls(void)
{
    nh_server_opts o;
    memset(&o, 0, sizeof o);
    o.tls = 1;
    nh_server s;
    CHECK(nh_server_start(&s, &o) == 0);
    if (s.pid <= 0)
        return;
    CHECK(strstr(s.info, "\"tls_required\":true") != NULL);
    char tls_url[64];
    snprintf(tls_url, sizeof tls_url, "tls://127.0.0.1:%d", s.port);
    CHECK_STR(s.tls_url, tls_url);
    nh_plain c;
    CHECK_EQ_INT(nh_plain_connect(&c, &s, 5000), -1);
    CHECK(strstr(c.err, "TLS") != NULL);
    nh_plain_close(&c);

    char out[NH_PATH + 32];
    char *verify[] = {"openssl", "verify", "-CAfile", s.ca_file, s.cert_file,
                      s.client_cert_file, NULL};
    CHECK_EQ_INT(run_in(&s, "verify", verify, out, sizeof out), 0);
    char *san[] = {"openssl", "x509", "-in", s.cert_file, "-noout", "-text", NULL};
    CHECK_EQ_INT(run_in(&s, "san", san, out, sizeof out), 0);
    CHECK(nh_file_contains(out, "IP Address:127.0.0.1"));
    CHECK(nh_file_contains(out, "DNS:localhost"));
    nh_server_free(&s);

    /* TLS first, client certificates required: a full verified handshake */
    o.tls_first = 1;
    o.tls_verify = 1;
    CHECK(nh_server_start(&s, &o) == 0);
    if (s.pid <= 0)
        return;
    char connect[64];
    snprintf(connect, sizeof connect, "127.0.0.1:%d", s.port);
    char *client[] = {"openssl", "s_client", "-connect", connect, "-CAfile", s.ca_file,
                      "-verify_return_error", "-verify_ip", "127.0.0.1", "-cert",
                      s.client_cert_file, "-key", s.client_key_file, "-brief", NULL};
    CHECK_EQ_INT(run_in(&s, "s_client", client, out, sizeof out), 0);
    CHECK(nh_file_contains(out, "Verification: OK"));
    /* without a client certificate the server ends the handshake */
    char *anon[] = {"openssl", "s_client", "-connect", connect, "-CAfile", s.ca_file,
                    "-verify_return_error", "-brief", NULL};
    run_in(&s, "s_client_anon", anon, out, sizeof out);
    CHECK(!nh_file_contains(out, "INFO {"));
    nh_server_free(&s);
}

static void test_cluster(void)
{
    nh_cluster cl;
    double t0 = tu_now_s();
    CHECK_EQ_INT(nh_cluster_start(&cl, 3, NULL), 0);
    if (cl.n != 3)
        return;
    printf("cluster of 3 ready in %.1f s\n", tu_now_s() - t0);
    /* every member's client, monitoring and route port differs from every other port */
    int all[9], distinct = 1;
    for (int i = 0; i < 3; i++) {
        all[3 * i] = cl.servers[i].port;
        all[3 * i + 1] = cl.servers[i].monitor_port;
        all[3 * i + 2] = cl.servers[i].cluster_port;
    }
    for (int i = 0; i < 9; i++)
        for (int j = 0; j < i; j++)
            if (all[i] == all[j])
                distinct = 0;
    CHECK(distinct);
    char urls[256], want[256];
    snprintf(want, sizeof want, "%s,%s,%s", cl.servers[0].url, cl.servers[1].url,
             cl.servers[2].url);
    CHECK_STR(nh_cluster_urls(&cl, urls, sizeof urls), want);
    char body[65536];
    CHECK_EQ_INT(nh_http_get(cl.servers[0].monitor_port, "/jsz", body, sizeof body, 2000), 200);
    CHECK(strstr(body, "\"meta_cluster\"") != NULL);

    nh_plain a, c;
    CHECK_EQ_INT(nh_plain_connect(&a, &cl.servers[0], 5000), 0);
    CHECK_EQ_INT(nh_plain_connect(&c, &cl.servers[2], 5000), 0);
    CHECK_EQ_INT(nh_plain_sub(&c, "nh.cluster", NULL, 1), 0);
    CHECK_EQ_INT(nh_plain_flush(&c, 5000), 0);
    CHECK(round_trip(&a, &c, "nh.cluster", "A to C"));

    /* member 1 killed: 0 and 2 still route, and keep (or elect) a meta leader */
    pid_t b = cl.servers[1].pid;
    nh_cluster_kill9(&cl, 1);
    CHECK(reaped(b));
    CHECK_EQ_INT(nh_cluster_wait_ready(&cl, nh_scale_ms(NH_CLUSTER_TIMEOUT_MS)), 0);
    CHECK(round_trip(&a, &c, "nh.cluster", "A to C without B"));

    /* member 1 back (its store kept): it routes again */
    CHECK_EQ_INT(nh_cluster_restart(&cl, 1, 0), 0);
    nh_plain bsub;
    CHECK_EQ_INT(nh_plain_connect(&bsub, &cl.servers[1], 5000), 0);
    CHECK_EQ_INT(nh_plain_sub(&bsub, "nh.cluster", NULL, 1), 0);
    CHECK_EQ_INT(nh_plain_flush(&bsub, 5000), 0);
    CHECK(round_trip(&a, &bsub, "nh.cluster", "A to B again"));
    nh_plain_close(&bsub);

    /* and with an empty store */
    CHECK_EQ_INT(nh_server_restart(&cl.servers[1], 1), 0);
    CHECK_EQ_INT(nh_cluster_wait_ready(&cl, nh_scale_ms(NH_CLUSTER_TIMEOUT_MS)), 0);
    CHECK(round_trip(&a, &c, "nh.cluster", "A to C, B wiped"));

    nh_plain_close(&a);
    nh_plain_close(&c);
    pid_t pids[3];
    for (int i = 0; i < 3; i++)
        pids[i] = cl.servers[i].pid;
    nh_cluster_free(&cl);
    for (int i = 0; i < 3; i++)
        CHECK(reaped(pids[i]));
}

static void test_children(void)
{
    char line[256];
    nh_child ch;
    char *echo[] = {(char *)self_name, "node", "echo", NULL};
    CHECK_EQ_INT(nh_child_spawn(echo, &ch), 0);
    CHECK_EQ_INT(nh_child_expect(&ch, "READY ", 10000), 0);
    CHECK_EQ_INT(atoi(ch.line + 6), ch.pid);
    CHECK_EQ_INT(nh_child_send(&ch, "PING %d", 42), 0);
    CHECK(nh_child_read_line(&ch, line, sizeof line, 10000) > 0);
    CHECK_STR(line, "PONG 42");
    /* nothing more to read: a bounded wait */
    CHECK_EQ_INT(nh_child_read_line(&ch, line, sizeof line, 100), -1);
    CHECK_EQ_INT(nh_child_send(&ch, "EXIT 7"), 0);
    CHECK_EQ_INT(nh_child_wait(&ch, 10000), 7);
    CHECK_EQ_INT(nh_child_read_line(&ch, line, sizeof line, 1000), -1); /* EOF */
    CHECK_EQ_INT(nh_child_close(&ch, 1000), 7);

    /* kill -9 and reap */
    CHECK_EQ_INT(nh_child_spawn(echo, &ch), 0);
    CHECK_EQ_INT(nh_child_expect(&ch, "READY", 10000), 0);
    pid_t pid = ch.pid;
    CHECK_EQ_INT(nh_child_wait(&ch, 50), -1); /* still running */
    nh_child_kill9(&ch);
    CHECK_EQ_INT(nh_child_wait(&ch, 10000), 128 + SIGKILL);
    CHECK(reaped(pid));
    CHECK_EQ_INT(nh_child_close(&ch, 1000), 128 + SIGKILL);

    /* end of input: the child exits 0 */
    CHECK_EQ_INT(nh_child_spawn(echo, &ch), 0);
    CHECK_EQ_INT(nh_child_expect(&ch, "READY", 10000), 0);
    CHECK_EQ_INT(nh_child_close(&ch, 10000), 0);

    /* a child using a server */
    nh_server s;
    CHECK(nh_server_start(&s, NULL) == 0);
    if (s.pid <= 0)
        return;
    char port[16];
    snprintf(port, sizeof port, "%d", s.port);
    char *sub[] = {(char *)self_name, "node", "sub", port, "nh.child", NULL};
    CHECK_EQ_INT(nh_child_spawn(sub, &ch), 0);
    CHECK_EQ_INT(nh_child_expect(&ch, "SUBSCRIBED", 10000), 0);
    nh_plain p;
    CHECK_EQ_INT(nh_plain_connect(&p, &s, 5000), 0);
    CHECK_EQ_INT(nh_plain_pub(&p, "nh.child", NULL, "to the child", 12), 0);
    CHECK_EQ_INT(nh_child_expect(&ch, "GOT ", 10000), 0);
    CHECK_STR(ch.line, "GOT to the child");
    nh_plain_close(&p);
    CHECK_EQ_INT(nh_child_close(&ch, 10000), 0);
    nh_server_free(&s);
}

static void test_ports(void)
{
    int ports[8];
    CHECK_EQ_INT(nh_free_ports(ports, 8), 0);
    int distinct = 1;
    for (int i = 0; i < 8; i++) {
        if (ports[i] <= 0 || ports[i] > 65535)
            distinct = 0;
        for (int j = 0; j < i; j++)
            if (ports[i] == ports[j])
                distinct = 0;
    }
    CHECK(distinct);
    int p = nh_free_port();
    CHECK(p > 0);
    /* nobody listens there */
    CHECK_EQ_INT(nh_tcp_connect(p, 1000), -1);

    /* a server's ports are held from their pick until it starts (and again while it is
     * stopped): nobody answers there, and a plain bind (another program's pick) fails */
    nh_server s;
    CHECK_EQ_INT(nh_server_init(&s, NULL), 0);
    CHECK(!port_is_free(s.port));
    CHECK(!port_is_free(s.monitor_port));
    CHECK_EQ_INT(nh_tcp_connect(s.port, 1000), -1);
    int client = s.port, monitor = s.monitor_port;
    nh_server_free(&s);
    CHECK(port_is_free(client));
    CHECK(port_is_free(monitor));
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "node") == 0)
        return node_main(argc, argv);
    TEST_INIT();
    if (argc >= 1)
        self_name = argv[0];
    if (!nh_require_server())
        return TEST_DONE();

    struct {
        const char *name;
        void (*fn)(void);
    } tests[] = {{"ports", test_ports},   {"lone server", test_lone_server},
                 {"user/password", test_user_password}, {"token", test_token},
                 {"TLS", test_tls},       {"children", test_children},
                 {"cluster", test_cluster}};
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        double t0 = tu_now_s();
        tests[i].fn();
        printf("%s: %.1f s\n", tests[i].name, tu_now_s() - t0);
    }

    /* every server and child we started has been reaped */
    int st;
    errno = 0;
    CHECK(waitpid(-1, &st, WNOHANG) == -1 && errno == ECHILD);
    return TEST_DONE();
}
