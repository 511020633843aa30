/*
 * switchboard benchmark, cluster workloads C1-C5 (bench.c runs them as -w C1..C5).
 *
 * The first C workload of a run starts a private nats-server (JetStream on, a temp dir
 * under /tmp, 127.0.0.1 on a free port); cluster_cleanup() stops it by its PID and
 * removes the dir. The other nodes are this program re-executed as `bench --node ...`
 * (child processes that die with us: PR_SET_PDEATHSIG); each reports on a pipe, one
 * line per event. Every workload run uses a prefix of its own, so runs never see each
 * other's nodes or stored state. Every wait is bounded by the workload timeout.
 *
 *   C1  raw NATS publish -> subscribe, 64-byte payloads (a plain client of our own):
 *       the limit for C2
 *   C2  a shared topic from this node to a child node, 64-byte bytes messages
 *   C3  cross-node latency at 10,000 msgs/s (one-way, from the message's timestamp)
 *   C4  late join: two child nodes hold 10,000 cache entries each; this node joins and
 *       times sb_cluster_share_cache
 *   C5  node-failure detection: kill -9 a child node, time until SB_NODE_DOWN here
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "cluster.h"

#define PAYLOAD 64

/* ------------------------------------------------------------------ clocks */

static uint64_t real_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static int ms_left(uint64_t deadline)
{
    uint64_t now = now_ns();
    if (now >= deadline)
        return 0;
    uint64_t ms = (deadline - now) / 1000000u + 1;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static uint64_t deadline_in(double secs)
{
    return now_ns() + (uint64_t)(secs * 1e9);
}

/* ------------------------------------------------ CPU time per thread group */

/* CPU time (ns, /proc/<pid>/task/<tid>/schedstat) of a process's threads, in groups:
 * [0] the main thread, [1] sb-cluster-io (the NATS connection and the sender),
 * [2] sb-cluster-in (decoding, local publish of arrivals), [3] subscription threads
 * (sb-sub-*, sb-pool), [4] everything else. */
#define CPU_GROUPS 5
typedef struct cpu_use {
    uint64_t ns[CPU_GROUPS];
} cpu_use;

static void cpu_read(pid_t pid, cpu_use *u)
{
    memset(u, 0, sizeof *u);
    char path[96];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char comm[64] = "", p2[320];
        unsigned long long ns = 0;
        snprintf(p2, sizeof p2, "/proc/%d/task/%s/comm", (int)pid, e->d_name);
        FILE *f = fopen(p2, "r");
        if (f) {
            if (!fgets(comm, sizeof comm, f))
                comm[0] = 0;
            fclose(f);
        }
        snprintf(p2, sizeof p2, "/proc/%d/task/%s/schedstat", (int)pid, e->d_name);
        f = fopen(p2, "r");
        if (f) {
            if (fscanf(f, "%llu", &ns) != 1)
                ns = 0;
            fclose(f);
        }
        int g = atoi(e->d_name) == (int)pid            ? 0
                : !strncmp(comm, "sb-cluster-io", 13) ? 1
                : !strncmp(comm, "sb-cluster-in", 13) ? 2
                : !strncmp(comm, "sb-sub", 6) || !strncmp(comm, "sb-pool", 7) ? 3
                                                                                : 4;
        u->ns[g] += ns;
    }
    closedir(d);
}

static uint64_t cpu_total(const cpu_use *u)
{
    uint64_t t = 0;
    for (int i = 0; i < CPU_GROUPS; i++)
        t += u->ns[i];
    return t;
}

/* ------------------------------------------------------------------ server */

static struct {
    pid_t pid;
    int port;
    char dir[64];
    char url[64];
    int tried, failed;
} srv;

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 ? 0 : 0;
}

static void rm_rf(const char *dir)
{
    if (dir[0])
        nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* SB_NATS_SERVER, else .tools/nats/bin/nats-server of the repository this program was
 * built in (bench/build/bench -> ../../), else relative to the working directory. */
static int find_server(char *out, size_t len)
{
    const char *env = getenv("SB_NATS_SERVER");
    if (env && *env) {
        snprintf(out, len, "%s", env);
        return access(out, X_OK) == 0 ? 0 : -1;
    }
    char exe[PATH_MAX - 64];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        for (int up = 0; up < 3; up++) { /* strip "bench", "build", "bench" */
            char *slash = strrchr(exe, '/');
            if (!slash)
                break;
            *slash = 0;
        }
        snprintf(out, len, "%s/.tools/nats/bin/nats-server", exe);
        if (access(out, X_OK) == 0)
            return 0;
    }
    snprintf(out, len, ".tools/nats/bin/nats-server");
    return access(out, X_OK) == 0 ? 0 : -1;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { 0 };
    socklen_t alen = sizeof a;
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &alen) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0)
        close(fd);
    return port;
}

static int tcp_connect(int port, int timeout_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = { 0 };
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((unsigned short)port);
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r != 0 && errno == EINPROGRESS) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        int err = 0;
        socklen_t elen = sizeof err;
        if (poll(&p, 1, timeout_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 &&
            err == 0)
            r = 0;
    }
    if (r != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void server_stop(void)
{
    if (srv.pid > 0) {
        kill(srv.pid, SIGTERM);
        int st;
        uint64_t d = deadline_in(5);
        while (waitpid(srv.pid, &st, WNOHANG) == 0) {
            if (now_ns() > d) {
                kill(srv.pid, SIGKILL);
                waitpid(srv.pid, &st, 0);
                break;
            }
            sleep_ms(10);
        }
        srv.pid = 0;
    }
    rm_rf(srv.dir);
    srv.dir[0] = 0;
}

/* Starts the server once per run; 0 when it answers. */
static int server_ensure(void)
{
    if (srv.pid > 0)
        return 0;
    if (srv.tried)
        return -1;
    srv.tried = 1;
    char exe[PATH_MAX];
    if (find_server(exe, sizeof exe) != 0) {
        fprintf(stderr, "# no nats-server (set SB_NATS_SERVER or run `make nats-server`): "
                        "cluster workloads skipped\n");
        return -1;
    }
    snprintf(srv.dir, sizeof srv.dir, "/tmp/sb-bench-XXXXXX");
    if (!mkdtemp(srv.dir)) {
        srv.dir[0] = 0;
        return -1;
    }
    char store[128], logf[128], port_s[16];
    snprintf(store, sizeof store, "%s/js", srv.dir);
    snprintf(logf, sizeof logf, "%s/server.log", srv.dir);
    for (int attempt = 0; attempt < 3; attempt++) {
        srv.port = free_port();
        snprintf(port_s, sizeof port_s, "%d", srv.port);
        char *argv[] = { exe, "-js", "-sd", store, "-a", "127.0.0.1", "-p", port_s, "-l", logf, NULL };
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(127);
            int nul = open("/dev/null", O_RDWR);
            if (nul >= 0) {
                dup2(nul, 0);
                dup2(nul, 1);
            }
            execv(exe, argv);
            _exit(127);
        }
        if (pid < 0)
            break;
        srv.pid = pid;
        uint64_t d = deadline_in(10);
        while (now_ns() < d) {
            int st;
            if (waitpid(pid, &st, WNOHANG) == pid) {
                srv.pid = 0;
                break;
            }
            int fd = tcp_connect(srv.port, 200);
            if (fd >= 0) {
                char c[5] = { 0 };
                struct pollfd p = { .fd = fd, .events = POLLIN };
                int ok = poll(&p, 1, 2000) == 1 && recv(fd, c, 4, MSG_WAITALL) == 4 &&
                         !memcmp(c, "INFO", 4);
                close(fd);
                if (ok) {
                    snprintf(srv.url, sizeof srv.url, "nats://127.0.0.1:%d", srv.port);
                    return 0;
                }
            }
            sleep_ms(20);
        }
        if (srv.pid > 0) {
            kill(srv.pid, SIGKILL);
            waitpid(srv.pid, NULL, 0);
            srv.pid = 0;
        }
    }
    fprintf(stderr, "# nats-server did not start (log: %s): cluster workloads skipped\n", logf);
    srv.failed = 1;
    return -1;
}

void cluster_cleanup(void)
{
    server_stop();
}

void cluster_emergency_cleanup(void)
{
    if (srv.pid > 0)
        kill(srv.pid, SIGKILL);
    rm_rf(srv.dir);
}

/* ------------------------------------------------- a minimal NATS client */

typedef struct nc {
    int fd;
    char *buf;
    size_t pos, len, cap;
    char err[128];
} nc;

static int send_all(int fd, const void *p, size_t n)
{
    const char *b = p;
    while (n) {
        ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads more bytes within the deadline: 1 some, 0 timeout, -1 closed. */
static int nc_fill(nc *c, uint64_t deadline)
{
    if (c->pos > 0) {
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
    }
    if (c->cap - c->len < 65536) {
        size_t cap = c->cap ? c->cap * 2 : (1u << 20);
        char *b = realloc(c->buf, cap);
        if (!b)
            return -1;
        c->buf = b;
        c->cap = cap;
    }
    struct pollfd p = { .fd = c->fd, .events = POLLIN };
    int r = poll(&p, 1, ms_left(deadline));
    if (r <= 0)
        return r < 0 && errno != EINTR ? -1 : 0;
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n <= 0)
        return -1;
    c->len += (size_t)n;
    return 1;
}

/* The next MSG (its subject and payload, borrowed until the next call), answering PING
 * and skipping other control lines. 1 a message, 0 timeout, -1 error. */
static int nc_next(nc *c, uint64_t deadline, const char **subj, size_t *subj_len, const char **data,
                   size_t *dlen)
{
    for (;;) {
        char *b = c->buf + c->pos;
        size_t n = c->len - c->pos;
        char *nl = n ? memchr(b, '\n', n) : NULL;
        if (nl) {
            size_t line = (size_t)(nl - b) + 1;
            if (n >= 4 && !memcmp(b, "MSG ", 4)) {
                /* MSG <subject> <sid> [reply] <size>\r\n */
                char *end = nl - 1; /* '\r' */
                char *sp = end;
                while (sp > b && sp[-1] != ' ')
                    sp--;
                size_t size = strtoul(sp, NULL, 10);
                if (n < line + size + 2)
                    goto more;
                char *s = b + 4;
                char *se = memchr(s, ' ', (size_t)(end - s));
                if (subj) {
                    *subj = s;
                    *subj_len = se ? (size_t)(se - s) : 0;
                }
                if (data) {
                    *data = b + line;
                    *dlen = size;
                }
                c->pos += line + size + 2;
                return 1;
            }
            if (n >= 4 && !memcmp(b, "PING", 4)) {
                if (send_all(c->fd, "PONG\r\n", 6) != 0)
                    return -1;
            } else if (n >= 4 && !memcmp(b, "-ERR", 4)) {
                snprintf(c->err, sizeof c->err, "%.*s", (int)(line > 100 ? 100 : line - 2), b);
                return -1;
            } else if (n >= 4 && !memcmp(b, "PONG", 4)) {
                c->pos += line;
                if (subj)
                    *subj = NULL;
                return 2; /* PONG */
            }
            c->pos += line;
            continue;
        }
    more:;
        int r = nc_fill(c, deadline);
        if (r <= 0)
            return r;
    }
}

static void nc_close(nc *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
}

/* Sends PING and waits for the PONG (messages before it are dropped). 0 on PONG. */
static int nc_flush(nc *c, uint64_t deadline)
{
    if (send_all(c->fd, "PING\r\n", 6) != 0)
        return -1;
    for (;;) {
        const char *s;
        size_t sl;
        int r = nc_next(c, deadline, &s, &sl, NULL, NULL);
        if (r == 2)
            return 0;
        if (r <= 0)
            return -1;
    }
}

static int nc_connect(nc *c, uint64_t deadline)
{
    memset(c, 0, sizeof *c);
    c->fd = tcp_connect(srv.port, ms_left(deadline));
    if (c->fd < 0)
        return -1;
    static const char hello[] = "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,"
                                "\"name\":\"sb-bench\"}\r\n";
    if (send_all(c->fd, hello, sizeof hello - 1) != 0)
        return -1;
    return nc_flush(c, deadline); /* INFO is skipped on the way */
}

/* ---------------------------------------------------------------------- C1 */

typedef struct c1_rx {
    nc conn;
    uint64_t target;
    uint64_t seen;
    uint64_t end_ns;
    uint64_t deadline;
    uint64_t cpu_ns;
    int ok;
} c1_rx;

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *c1_receiver(void *arg)
{
    c1_rx *rx = arg;
    uint64_t cpu0 = thread_cpu_ns();
    while (rx->seen < rx->target) {
        const char *s, *d;
        size_t sl, dl;
        int r = nc_next(&rx->conn, rx->deadline, &s, &sl, &d, &dl);
        if (r <= 0)
            return NULL;
        if (r == 1)
            rx->seen++;
    }
    rx->end_ns = now_ns();
    rx->cpu_ns = thread_cpu_ns() - cpu0;
    rx->ok = 1;
    return NULL;
}

/* Publishes n 64-byte messages in corked batches of about 64 KiB. */
static int c1_publish(nc *pub, uint64_t n)
{
    static const char hdr[] = "PUB bench.c1 64\r\n";
    const size_t one = sizeof hdr - 1 + PAYLOAD + 2;
    const size_t per = 65536 / one;
    char *batch = malloc(per * one);
    if (!batch)
        return -1;
    for (size_t i = 0; i < per; i++) {
        char *p = batch + i * one;
        memcpy(p, hdr, sizeof hdr - 1);
        memset(p + sizeof hdr - 1, 'x', PAYLOAD);
        memcpy(p + sizeof hdr - 1 + PAYLOAD, "\r\n", 2);
    }
    int rc = 0;
    for (uint64_t done = 0; done < n && rc == 0;) {
        size_t k = n - done < per ? (size_t)(n - done) : per;
        rc = send_all(pub->fd, batch, k * one);
        done += k;
    }
    free(batch);
    return rc;
}

static void c1(result *r, uint64_t n)
{
    c1_rx rx;
    nc pub;
    uint64_t warm = n / 10;
    uint64_t deadline = deadline_in(g_timeout_s);
    memset(&rx, 0, sizeof rx);
    if (nc_connect(&rx.conn, deadline) != 0 || nc_connect(&pub, deadline) != 0) {
        res_add(r, "timeout", 1, 0);
        return;
    }
    static const char sub[] = "SUB bench.c1 1\r\n";
    send_all(rx.conn.fd, sub, sizeof sub - 1);
    int ok = nc_flush(&rx.conn, deadline) == 0;
    cpu_use me0, me1, sv0, sv1;
    double secs = 1e300;
    uint64_t seen = 0;
    for (int phase = 0; ok && phase < 2; phase++) {
        uint64_t count = phase ? n : warm;
        rx.target = rx.seen + count;
        rx.deadline = deadline_in(g_timeout_s);
        rx.ok = 0;
        uint64_t from = rx.seen;
        pthread_t th;
        if (pthread_create(&th, NULL, c1_receiver, &rx) != 0) {
            ok = 0;
            break;
        }
        cpu_read(getpid(), &me0);
        cpu_read(srv.pid, &sv0);
        uint64_t t0 = now_ns();
        ok = c1_publish(&pub, count) == 0;
        pthread_join(th, NULL);
        ok = ok && rx.ok;
        cpu_read(getpid(), &me1);
        cpu_read(srv.pid, &sv1);
        if (phase && ok)
            fprintf(stderr,
                    "# C1 cpu ns/msg: publisher %.0f, subscriber %.0f, nats-server %.0f (wall %.0f ns/msg)\n",
                    (double)(me1.ns[0] - me0.ns[0]) / (double)n,
                    (double)rx.cpu_ns / (double)n,
                    (double)(cpu_total(&sv1) - cpu_total(&sv0)) / (double)n,
                    (double)(rx.end_ns - t0) / (double)n);
        if (phase) {
            secs = (double)((ok ? rx.end_ns : now_ns()) - t0) / 1e9;
            seen = rx.seen - from;
        }
    }
    res_add(r, "msgs_per_s", (double)(ok ? n : seen) / secs, 0);
    if (!ok)
        res_add(r, "timeout", 1, 0);
    nc_close(&pub);
    nc_close(&rx.conn);
}

/* ------------------------------------------------------------ child nodes */

typedef struct child {
    pid_t pid;
    int in;  /* its stdin (closing it asks it to leave) */
    int out; /* its report lines */
    char buf[512];
    size_t len;
} child;

/* Starts `bench --node ROLE URL PREFIX EID ARG`. */
static int child_start(child *ch, const char *role, const char *prefix, const char *eid, const char *arg)
{
    memset(ch, 0, sizeof *ch);
    int to[2], from[2];
    if (pipe2(to, O_CLOEXEC) != 0)
        return -1;
    if (pipe2(from, O_CLOEXEC) != 0) {
        close(to[0]);
        close(to[1]);
        return -1;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return -1;
    exe[n] = 0;
    char *argv[] = { exe, "--node", (char *)role, srv.url, (char *)prefix, (char *)eid, (char *)arg, NULL };
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(to[0], 0);
        dup2(from[1], 1);
        execv(exe, argv);
        _exit(127);
    }
    close(to[0]);
    close(from[1]);
    if (pid < 0) {
        close(to[1]);
        close(from[0]);
        return -1;
    }
    ch->pid = pid;
    ch->in = to[1];
    ch->out = from[0];
    return 0;
}

/* One report line of the child (without '\n') within the deadline: 1, or 0. */
static int child_line(child *ch, char *line, size_t len, uint64_t deadline)
{
    for (;;) {
        char *nl = memchr(ch->buf, '\n', ch->len);
        if (nl) {
            size_t l = (size_t)(nl - ch->buf);
            snprintf(line, len, "%.*s", (int)l, ch->buf);
            memmove(ch->buf, nl + 1, ch->len - l - 1);
            ch->len -= l + 1;
            return 1;
        }
        if (ch->len == sizeof ch->buf)
            ch->len = 0;
        struct pollfd p = { .fd = ch->out, .events = POLLIN };
        if (poll(&p, 1, ms_left(deadline)) <= 0)
            return 0;
        ssize_t n = read(ch->out, ch->buf + ch->len, sizeof ch->buf - ch->len);
        if (n <= 0)
            return 0;
        ch->len += (size_t)n;
    }
}

/* Waits for a line starting with `prefix`; its rest in rest (may be NULL). */
static int child_expect(child *ch, const char *prefix, char *rest, size_t len, uint64_t deadline)
{
    char line[512];
    while (child_line(ch, line, sizeof line, deadline)) {
        if (!strncmp(line, prefix, strlen(prefix))) {
            if (rest)
                snprintf(rest, len, "%s", line + strlen(prefix));
            return 1;
        }
        if (!strncmp(line, "error", 5))
            fprintf(stderr, "# node: %s\n", line);
    }
    return 0;
}

/* Asks the child to leave (its stdin closes), waits up to 3 s, then kill -9. */
static void child_stop(child *ch)
{
    if (ch->pid <= 0)
        return;
    if (ch->in >= 0)
        close(ch->in);
    ch->in = -1;
    uint64_t d = deadline_in(3);
    int st;
    while (waitpid(ch->pid, &st, WNOHANG) == 0) {
        if (now_ns() > d) {
            kill(ch->pid, SIGKILL);
            waitpid(ch->pid, &st, 0);
            break;
        }
        sleep_ms(5);
    }
    close(ch->out);
    ch->pid = 0;
}

static void child_kill9(child *ch)
{
    if (ch->pid <= 0)
        return;
    kill(ch->pid, SIGKILL);
    waitpid(ch->pid, NULL, 0);
    close(ch->in);
    close(ch->out);
    ch->pid = 0;
}

static sb_cluster *join(const char *prefix, const char *name, const char *queue_limit)
{
    sb_cluster_config *cfg = sb_cluster_config_new();
    if (!cfg)
        return NULL;
    int rc = sb_cluster_config_set(cfg, "servers", srv.url);
    if (rc == SB_OK)
        rc = sb_cluster_config_set(cfg, "prefix", prefix);
    if (rc == SB_OK)
        rc = sb_cluster_config_set(cfg, "node_name", name);
    if (rc == SB_OK && queue_limit)
        rc = sb_cluster_config_set(cfg, "out_queue_limit", queue_limit);
    sb_cluster *c = rc == SB_OK ? sb_cluster_join(cfg) : NULL;
    sb_cluster_config_free(cfg);
    if (!c)
        fprintf(stderr, "# cluster join failed: %s\n", sb_last_error() ? sb_last_error() : "?");
    return c;
}

/* ------------------------------------------------- C2, C3: a shared topic */

/* Message layout (64 bytes): seq (u64), phase (u64), filler. Phase 0: probes until the
 * receiver is subscribed; 1: warm-up; 2: timed. */
static sb_message *c23_msg(sb_message_type *ty, uint64_t seq, uint64_t phase)
{
    unsigned char b[PAYLOAD];
    memset(b, 'x', sizeof b);
    memcpy(b, &seq, 8);
    memcpy(b + 8, &phase, 8);
    sb_message *m = sb_message_create_bytes(ty, b, sizeof b);
    if (!m) {
        fprintf(stderr, "bench: sb_message_create_bytes: %s\n", sb_last_error());
        exit(2);
    }
    return m;
}

static void c23_pub(sb_topic *t, sb_message_type *ty, uint64_t seq, uint64_t phase)
{
    sb_message *m = c23_msg(ty, seq, phase);
    sb_publish(t, m);
    sb_message_unref(m);
}

#define C2_WINDOW 40000
#define C2_ACK 5000

static int g_serial;

static void make_prefix(char *out, size_t len, int w)
{
    snprintf(out, len, "sbbench%dc%dn%d", (int)getpid(), w, ++g_serial);
}

static void make_eid(char *out, size_t len, int w, int idx)
{
    snprintf(out, len, "02:5b:%02x:%02x:%02x:%02x", (unsigned)getpid() & 0xff, (unsigned)w,
             (unsigned)g_serial & 0xff, (unsigned)idx);
}

/* Sends probes until the child reports it receives; 1 when it did. */
static int c23_probe(child *ch, sb_topic *t, sb_message_type *ty, uint64_t deadline)
{
    char line[128];
    while (now_ns() < deadline) {
        c23_pub(t, ty, 0, 0);
        if (child_line(ch, line, sizeof line, deadline_in(0.02)) && !strncmp(line, "probe", 5))
            return 1;
    }
    return 0;
}

/* C2: throughput node to node. Breakdown keys: pub_s (the publish loop here), sent_s
 * (until the cluster's sender thread has sent the last one), total from first publish to
 * the receiver's last callback (msgs_per_s). */
static void c2(result *r, uint64_t n)
{
    const uint64_t warm = n / 10;
    char prefix[64], eid[32], arg[64];
    make_prefix(prefix, sizeof prefix, 2);
    make_eid(eid, sizeof eid, 2, 1);
    /* the timed burst must fit the queue: the figure is the sending rate, not drops */
    char qlimit[32];
    snprintf(qlimit, sizeof qlimit, "%" PRIu64, 2 * (n + warm) + 1000);
    uint64_t deadline = deadline_in(g_timeout_s);
    sb_cluster *c = join(prefix, "bench-a", qlimit);
    if (!c) {
        res_add(r, "timeout", 1, 0);
        return;
    }
    sb_message_type *ty = NULL;
    sb_message_type_create("bench_c2", NULL, &ty);
    sb_topic *t = sb_topic_create("bench/c2");
    sb_cluster_share_topic(c, t);
    snprintf(arg, sizeof arg, "%" PRIu64 ",%" PRIu64, warm, n);
    child ch;
    int ok = child_start(&ch, "c2", prefix, eid, arg) == 0 && child_expect(&ch, "ready", NULL, 0, deadline) &&
             c23_probe(&ch, t, ty, deadline);
    double pub_s = 0, sent_s = 0, secs = 1e300;
    uint64_t recv_count = 0;
    if (ok) {
        for (uint64_t i = 0; i < warm; i++)
            c23_pub(t, ty, i, 1);
        ok = child_expect(&ch, "warm", NULL, 0, deadline);
    }
    sb_cluster_stats st0, st1;
    cpu_use me0, me1, sv0, sv1;
    if (ok) {
        cpu_read(getpid(), &me0);
        cpu_read(srv.pid, &sv0);
        sb_cluster_get_stats(c, &st0);
        deadline = deadline_in(g_timeout_s);
        uint64_t t0r = real_ns(), t0 = now_ns();
        /* at most C2_WINDOW messages ahead of what B reported (every C2_ACK): more in
         * flight and B's client drops the excess (see BENCHMARKS.md) */
        uint64_t acked = 0;
        char line[128];
        for (uint64_t i = 0; i < n && ok; i++) {
            while (i - acked >= C2_WINDOW) {
                if (!child_line(&ch, line, sizeof line, deadline)) {
                    ok = 0;
                    break;
                }
                if (!strncmp(line, "got ", 4))
                    acked = strtoull(line + 4, NULL, 10);
            }
            c23_pub(t, ty, i, 2);
        }
        pub_s = secs_since(t0);
        /* the sender thread: until every message of the burst was sent */
        for (;;) {
            sb_cluster_get_stats(c, &st1);
            if (st1.sent - st0.sent >= n || now_ns() > deadline)
                break;
            usleep(500);
        }
        sent_s = secs_since(t0);
        char rest[128];
        ok = ok && child_expect(&ch, "done", rest, sizeof rest, deadline);
        cpu_read(getpid(), &me1);
        cpu_read(srv.pid, &sv1);
        uint64_t end_r = 0, errs = 0, b[CPU_GROUPS];
        if (ok &&
            sscanf(rest, "%" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64,
                   &end_r, &recv_count, &errs, &b[0], &b[1], &b[2], &b[3], &b[4]) == 8 &&
            end_r > t0r) {
            secs = (double)(end_r - t0r) / 1e9;
            /* where the CPU went, per message of the timed burst (ns) */
            fprintf(stderr,
                    "# C2 cpu ns/msg: node A: publisher %.0f, sb-cluster-io %.0f, other %.0f; "
                    "nats-server %.0f; node B: sb-cluster-io %.0f, sb-cluster-in %.0f, "
                    "subscription %.0f, other %.0f (wall %.0f ns/msg)\n",
                    (double)(me1.ns[0] - me0.ns[0]) / (double)n, (double)(me1.ns[1] - me0.ns[1]) / (double)n,
                    (double)(cpu_total(&me1) - cpu_total(&me0) - (me1.ns[0] - me0.ns[0]) -
                             (me1.ns[1] - me0.ns[1])) /
                        (double)n,
                    (double)(cpu_total(&sv1) - cpu_total(&sv0)) / (double)n, (double)b[1] / (double)n,
                    (double)b[2] / (double)n, (double)b[3] / (double)n, (double)(b[0] + b[4]) / (double)n,
                    secs * 1e9 / (double)n);
            if (errs)
                res_add(r, "order_errors", (double)errs, 0);
        } else {
            ok = 0;
        }
    }
    res_add(r, "msgs_per_s", ok ? (double)n / secs : 0, 0);
    res_add(r, "pub_s", pub_s, 3);
    res_add(r, "sent_s", sent_s, 3);
    res_add(r, "recv_s", ok ? secs : 0, 3);
    sb_cluster_get_stats(c, &st1);
    if (st1.dropped_out)
        res_add(r, "dropped_out", (double)st1.dropped_out, 0);
    if (!ok)
        res_add(r, "timeout", 1, 0);
    child_stop(&ch);
    sb_cluster_leave(c);
    sb_topic_unref(t);
    sb_message_type_unref(ty);
}

/* Sleeps until *next + gap (absolute, CLOCK_MONOTONIC), advancing *next. */
static void pace(struct timespec *next, long gap)
{
    next->tv_nsec += gap;
    if (next->tv_nsec >= 1000000000L) {
        next->tv_nsec -= 1000000000L;
        next->tv_sec++;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL) == EINTR)
        ;
}

typedef struct raw_rx {
    nc conn;
    uint64_t n, seen;
    uint64_t *lat;
    uint64_t deadline;
} raw_rx;

static void *c3_raw_receiver(void *arg)
{
    raw_rx *rx = arg;
    while (rx->seen < rx->n) {
        const char *s, *d;
        size_t sl, dl;
        int r = nc_next(&rx->conn, rx->deadline, &s, &sl, &d, &dl);
        if (r <= 0)
            return NULL;
        if (r != 1 || dl != PAYLOAD)
            continue;
        uint64_t now_r = real_ns(), ts, seq;
        memcpy(&seq, d, 8);
        memcpy(&ts, d + 8, 8);
        if (seq < rx->n)
            rx->lat[seq] = now_r > ts ? now_r - ts : 0;
        rx->seen++;
    }
    return NULL;
}

/* The limit of C3: plain NATS publish -> subscribe of 64-byte messages at the same rate,
 * one PUB per write, latency from the send time in the payload. p[0..2]: p50, p99,
 * p99.9 (us); 0 on success. */
static int c3_raw(uint64_t rate, uint64_t n, double *p)
{
    raw_rx rx;
    nc pub;
    memset(&rx, 0, sizeof rx);
    uint64_t deadline = deadline_in(g_timeout_s);
    rx.n = n;
    rx.deadline = deadline;
    rx.lat = calloc(n, sizeof *rx.lat);
    int ok = rx.lat && nc_connect(&rx.conn, deadline) == 0 && nc_connect(&pub, deadline) == 0;
    static const char sub[] = "SUB bench.c3 1\r\n";
    ok = ok && send_all(rx.conn.fd, sub, sizeof sub - 1) == 0 && nc_flush(&rx.conn, deadline) == 0;
    pthread_t th;
    ok = ok && pthread_create(&th, NULL, c3_raw_receiver, &rx) == 0;
    if (ok) {
        static const char hdr[] = "PUB bench.c3 64\r\n";
        char m[sizeof hdr - 1 + PAYLOAD + 2];
        memcpy(m, hdr, sizeof hdr - 1);
        memset(m + sizeof hdr - 1, 'x', PAYLOAD);
        memcpy(m + sizeof hdr - 1 + PAYLOAD, "\r\n", 2);
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        for (uint64_t i = 0; i < n && ok; i++) {
            uint64_t ts = real_ns();
            memcpy(m + sizeof hdr - 1, &i, 8);
            memcpy(m + sizeof hdr - 1 + 8, &ts, 8);
            ok = send_all(pub.fd, m, sizeof m) == 0;
            pace(&next, (long)(1000000000u / rate));
        }
        pthread_join(th, NULL);
        ok = ok && rx.seen == n;
    }
    if (ok) {
        qsort(rx.lat, n, sizeof *rx.lat, cmp_u64_asc);
        p[0] = rx.lat[n / 2] / 1e3;
        p[1] = rx.lat[n * 99 / 100] / 1e3;
        p[2] = rx.lat[n * 999 / 1000] / 1e3;
    }
    nc_close(&pub);
    nc_close(&rx.conn);
    free(rx.lat);
    return ok ? 0 : -1;
}

/* C3: latency at `rate` msgs/s for `secs` seconds (after a 0.2 s warm-up). */
static void c3(result *r, uint64_t rate, double secs)
{
    const uint64_t warm = rate / 5, n = (uint64_t)((double)rate * secs);
    char prefix[64], eid[32], arg[64];
    make_prefix(prefix, sizeof prefix, 3);
    make_eid(eid, sizeof eid, 3, 1);
    uint64_t deadline = deadline_in(g_timeout_s);
    sb_cluster *c = join(prefix, "bench-a", NULL);
    if (!c) {
        res_add(r, "timeout", 1, 0);
        return;
    }
    sb_message_type *ty = NULL;
    sb_message_type_create("bench_c3", NULL, &ty);
    sb_topic *t = sb_topic_create("bench/c3");
    sb_cluster_share_topic(c, t);
    snprintf(arg, sizeof arg, "%" PRIu64 ",%" PRIu64, warm, n);
    child ch;
    int ok = child_start(&ch, "c3", prefix, eid, arg) == 0 && child_expect(&ch, "ready", NULL, 0, deadline) &&
             c23_probe(&ch, t, ty, deadline);
    char rest[256] = "";
    if (ok) {
        /* paced by absolute sleeps (not a spin: 2 cores, and the sender needs one) */
        prctl(PR_SET_TIMERSLACK, 1000UL);
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        for (uint64_t i = 0; i < warm + n; i++) {
            c23_pub(t, ty, i < warm ? i : i - warm, i < warm ? 1 : 2);
            pace(&next, (long)(1000000000u / rate));
        }
        ok = child_expect(&ch, "lat", rest, sizeof rest, deadline_in(g_timeout_s));
    }
    double p50, p99, p999, mx, w50, w99, w999;
    if (ok && sscanf(rest, "%lf %lf %lf %lf %lf %lf %lf", &p50, &p99, &p999, &mx, &w50, &w99, &w999) == 7) {
        res_add(r, "p50_us", p50, 1);
        res_add(r, "p99_us", p99, 1);
        res_add(r, "p999_us", p999, 1);
        /* the same messages seen by a plain NATS subscriber in the receiving process */
        res_add(r, "wire_p50_us", w50, 1);
        res_add(r, "wire_p99_us", w99, 1);
        (void)w999;
        (void)mx;
    } else {
        res_add(r, "timeout", 1, 0);
    }
    child_stop(&ch);
    sb_cluster_leave(c);
    sb_topic_unref(t);
    sb_message_type_unref(ty);
    /* the limit: the plain NATS hop at the same rate, 1 s */
    double raw[3];
    if (ok && c3_raw(rate, rate, raw) == 0) {
        res_add(r, "raw_p50_us", raw[0], 1);
        res_add(r, "raw_p99_us", raw[1], 1);
        res_add(r, "raw_p999_us", raw[2], 1);
    }
    prctl(PR_SET_TIMERSLACK, 50000UL);
}

/* --------------------------------------------------------- C4: late join */

static const char *c4_id(sb_message *msg)
{
    size_t len = sb_message_data_len(msg);
    const char *d = sb_message_data(msg);
    if (len == 0 || !d || strncmp(sb_message_type_name(sb_message_get_type(msg)), "bench_snap", 10))
        return NULL;
    return memchr(d, 0, len) ? d : NULL; /* "id\0value" */
}

/* Number of messages in the stream KV_<prefix>_state (a JetStream API request), or -1. */
static long kv_count(nc *c, const char *prefix, uint64_t deadline)
{
    char req[256];
    int n = snprintf(req, sizeof req, "PUB $JS.API.STREAM.INFO.KV_%s_state _INBOX.bench 0\r\n\r\n", prefix);
    if (send_all(c->fd, req, (size_t)n) != 0)
        return -1;
    for (;;) {
        const char *s, *d;
        size_t sl, dl;
        int r = nc_next(c, deadline, &s, &sl, &d, &dl);
        if (r <= 0)
            return -1;
        if (r != 1)
            continue;
        char *json = strndup(d, dl);
        char *m = json ? strstr(json, "\"messages\":") : NULL;
        long v = m ? strtol(m + 11, NULL, 10) : -1;
        free(json);
        return v;
    }
}

static _Atomic uint64_t c4_updates, c4_first_ns, c4_last_ns;

static void c4_update_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != sb_cache_update_type())
        return;
    uint64_t now = now_ns();
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&c4_first_ns, &zero, now);
    atomic_store(&c4_last_ns, now);
    atomic_fetch_add(&c4_updates, 1);
}

static void c4(result *r, int per_node)
{
    char prefix[64], eid[2][32], arg[32];
    make_prefix(prefix, sizeof prefix, 4);
    snprintf(arg, sizeof arg, "%d", per_node);
    uint64_t deadline = deadline_in(g_timeout_s);
    child ch[2];
    memset(ch, 0, sizeof ch);
    int ok = 1;
    for (int i = 0; i < 2; i++) {
        make_eid(eid[i], sizeof eid[i], 4, i + 1);
        ok = ok && child_start(&ch[i], "c4", prefix, eid[i], arg) == 0;
    }
    for (int i = 0; i < 2; i++)
        ok = ok && child_expect(&ch[i], "ready", NULL, 0, deadline);
    /* until the store holds both nodes' snapshots (and presence keys) */
    nc q;
    long stored = -1;
    if (ok && nc_connect(&q, deadline) == 0) {
        static const char sub[] = "SUB _INBOX.bench 1\r\n";
        send_all(q.fd, sub, sizeof sub - 1);
        while (now_ns() < deadline) {
            stored = kv_count(&q, prefix, deadline);
            if (stored >= 2L * per_node + 2)
                break;
            sleep_ms(20);
        }
        nc_close(&q);
    }
    ok = ok && stored >= 2L * per_node;

    double secs = 0, first_s = 0, last_s = 0;
    size_t entries = 0;
    sb_cluster *c = ok ? join(prefix, "bench-a", NULL) : NULL;
    if (c) {
        sb_message_type *ty = NULL;
        sb_message_type_create("bench_snap", NULL, &ty);
        sb_topic *t = sb_topic_create("bench/c4");
        sb_cache *cache = sb_cache_create(c4_id);
        sb_caching_topic *ct = sb_caching_topic_create(t, cache);
        atomic_store(&c4_updates, 0);
        atomic_store(&c4_first_ns, 0);
        atomic_store(&c4_last_ns, 0);
        sb_subscription *s = sb_subscribe(sb_caching_get_topic(ct), c4_update_cb, NULL);
        uint64_t t0 = now_ns();
        int rc = sb_cluster_share_cache(c, ct);
        uint64_t t1 = now_ns();
        secs = (double)(t1 - t0) / 1e9;
        ok = rc == SB_OK;
        sb_message_list *all = sb_cache_dump_all(cache, ty);
        sb_eid self = sb_eid_default();
        for (size_t i = 0; i < sb_message_list_len(all); i++) {
            const sb_eid *e = sb_message_eid(sb_message_list_get(all, i));
            if (e && sb_eid_cmp(e, &self) != 0)
                entries++;
        }
        sb_message_list_free(all);
        if (entries != (size_t)(2 * per_node))
            ok = 0;
        /* the caching topic's subscriber: when the updates reached it */
        uint64_t d = deadline_in(2);
        while (atomic_load(&c4_updates) < entries && now_ns() < d)
            sleep_ms(1);
        if (atomic_load(&c4_first_ns))
            first_s = (double)(atomic_load(&c4_first_ns) - t0) / 1e9;
        if (atomic_load(&c4_last_ns))
            last_s = (double)(atomic_load(&c4_last_ns) - t0) / 1e9;
        sb_cluster_leave(c);
        sb_unsubscribe_and_join(s);
        sb_caching_unsubscribe_and_join(ct);
        sb_cache_unref(cache);
        sb_topic_unref(t);
        sb_message_type_unref(ty);
    } else {
        ok = 0;
    }
    res_add(r, "seconds", secs, 3);
    res_add(r, "entries", (double)entries, 0);
    res_add(r, "first_update_s", first_s, 3);
    res_add(r, "last_update_s", last_s, 3);
    if (!ok)
        res_add(r, "timeout", 1, 0);
    for (int i = 0; i < 2; i++)
        child_stop(&ch[i]);
}

/* --------------------------------------------------- C5: failure detection */

typedef struct c5_watch {
    sb_eid target;
    _Atomic int up;
    _Atomic uint64_t down_ns;
} c5_watch;

static void c5_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)sub;
    c5_watch *w = data;
    if (sb_message_get_type(msg) != sb_cluster_node_type())
        return;
    const sb_cluster_node *n = sb_message_data(msg);
    if (sb_eid_cmp(&n->eid, &w->target) != 0)
        return;
    if (n->state == SB_NODE_UP)
        atomic_store(&w->up, 1);
    else if (n->state == SB_NODE_DOWN && !atomic_load(&w->down_ns))
        atomic_store(&w->down_ns, now_ns());
}

static void c5(result *r)
{
    char prefix[64], eid[32];
    make_prefix(prefix, sizeof prefix, 5);
    make_eid(eid, sizeof eid, 5, 1);
    uint64_t deadline = deadline_in(g_timeout_s);
    sb_cluster *c = join(prefix, "bench-a", NULL);
    if (!c) {
        res_add(r, "timeout", 1, 0);
        return;
    }
    c5_watch w = { .up = 0, .down_ns = 0 };
    sb_eid_from_str(eid, &w.target);
    sb_subscription *s = sb_subscribe(sb_cluster_topic(c), c5_cb, &w);
    child ch;
    int ok = child_start(&ch, "c5", prefix, eid, "0") == 0 && child_expect(&ch, "ready", NULL, 0, deadline);
    while (ok && !atomic_load(&w.up) && now_ns() < deadline)
        sleep_ms(5);
    ok = ok && atomic_load(&w.up);
    double secs = 0;
    if (ok) {
        /* kill right after one of its heartbeats would be the worst case; any moment is
         * as good for the average: just after it reported up */
        uint64_t t0 = now_ns();
        child_kill9(&ch);
        uint64_t d = deadline_in(g_timeout_s);
        while (!atomic_load(&w.down_ns) && now_ns() < d)
            sleep_ms(1);
        uint64_t down = atomic_load(&w.down_ns);
        ok = down != 0;
        secs = ((double)((ok ? down : now_ns()) - t0)) / 1e9;
    }
    res_add(r, "seconds", secs, 3);
    if (!ok)
        res_add(r, "timeout", 1, 0);
    child_stop(&ch);
    sb_unsubscribe_and_join(s);
    sb_cluster_leave(c);
}

/* ------------------------------------------------------------------ driver */

int bench_cluster(int w, result *r)
{
    if (server_ensure() != 0) {
        res_add(r, "skipped", 1, 0);
        return -1;
    }
    switch (w) {
    case 1: c1(r, 1000000); break;
    case 2: c2(r, 200000); break;
    case 3: c3(r, 10000, 2.0); break;
    case 4: c4(r, 10000); break;
    case 5: c5(r); break;
    }
    return 0;
}

/* ------------------------------------------------------ the child's side */

static struct {
    sb_message_type *ty;
    uint64_t warm, n;
    uint64_t seen1, seen2, last_seq, order_errors;
    int probed, lat;
    uint64_t *lat_ns;
    cpu_use cpu0;
    /* C3: a plain NATS subscriber to the same subject beside the node: the wire's share */
    nc raw;
    pthread_t raw_th;
    int raw_on;
    uint64_t *raw_lat;
    _Atomic uint64_t raw_seen;
} nd;

static void *raw_receiver(void *arg)
{
    (void)arg;
    uint64_t deadline = deadline_in(60);
    while (atomic_load(&nd.raw_seen) < nd.n) {
        const char *s, *d;
        size_t sl, dl;
        int r = nc_next(&nd.raw, deadline, &s, &sl, &d, &dl);
        if (r <= 0)
            break;
        if (r != 1 || dl != 28 + PAYLOAD)
            continue;
        uint64_t now_r = real_ns(), ts, seq, phase;
        memcpy(&ts, d + 20, 8); /* the envelope's timestamp (little-endian, as this host) */
        memcpy(&seq, d + 28, 8);
        memcpy(&phase, d + 36, 8);
        if (phase == 2 && seq < nd.n) {
            nd.raw_lat[seq] = now_r > ts ? now_r - ts : 0;
            atomic_fetch_add(&nd.raw_seen, 1);
        }
    }
    return NULL;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

static void node_cb(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != nd.ty || sb_message_data_len(msg) != PAYLOAD)
        return;
    uint64_t now_r = real_ns();
    const unsigned char *b = sb_message_data(msg);
    uint64_t seq, phase;
    memcpy(&seq, b, 8);
    memcpy(&phase, b + 8, 8);
    if (phase == 0) {
        if (!nd.probed)
            say("probe\n");
        nd.probed = 1;
    } else if (phase == 1) {
        if (++nd.seen1 == nd.warm) {
            cpu_read(getpid(), &nd.cpu0);
            say("warm\n");
        }
    } else {
        if (nd.seen2 && seq <= nd.last_seq)
            nd.order_errors++;
        nd.last_seq = seq;
        if (!nd.lat && (nd.seen2 + 1) % C2_ACK == 0 && nd.seen2 + 1 < nd.n)
            say("got %" PRIu64 "\n", nd.seen2 + 1);
        if (nd.lat && seq < nd.n) {
            uint64_t ts = sb_message_timestamp_ns(msg);
            nd.lat_ns[seq] = now_r > ts ? now_r - ts : 0;
        }
        if (++nd.seen2 == nd.n) {
            if (nd.lat) {
                qsort(nd.lat_ns, nd.n, sizeof *nd.lat_ns, cmp_u64_asc);
                /* the raw subscriber saw the same messages (or times out: zeros) */
                uint64_t d = deadline_in(2);
                while (atomic_load(&nd.raw_seen) < nd.n && now_ns() < d)
                    sleep_ms(1);
                int raw_ok = nd.raw_on && nd.raw_seen >= nd.n;
                if (raw_ok)
                    qsort(nd.raw_lat, nd.n, sizeof *nd.raw_lat, cmp_u64_asc);
                say("lat %.1f %.1f %.1f %.1f %.1f %.1f %.1f\n", nd.lat_ns[nd.n / 2] / 1e3,
                    nd.lat_ns[nd.n * 99 / 100] / 1e3, nd.lat_ns[nd.n * 999 / 1000] / 1e3,
                    nd.lat_ns[nd.n - 1] / 1e3, raw_ok ? nd.raw_lat[nd.n / 2] / 1e3 : 0,
                    raw_ok ? nd.raw_lat[nd.n * 99 / 100] / 1e3 : 0,
                    raw_ok ? nd.raw_lat[nd.n * 999 / 1000] / 1e3 : 0);
            } else {
                cpu_use u;
                cpu_read(getpid(), &u);
                say("done %" PRIu64 " %" PRIu64 " %" PRIu64, now_r, nd.seen2, nd.order_errors);
                for (int i = 0; i < CPU_GROUPS; i++)
                    say(" %" PRIu64, u.ns[i] - nd.cpu0.ns[i]);
                say("\n");
            }
        }
    }
}

int cmp_u64_asc(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* The library's warnings in a node: the first one on stderr, as a diagnostic line. */
static void node_log(void *data, int level, const char *text)
{
    static int shown;
    (void)data;
    (void)level;
    if (!shown++)
        fprintf(stderr, "# node %d: %s\n", (int)getpid(), text ? text : "");
}

/* bench --node ROLE URL PREFIX EID ARG: joins, does its part, reports on stdout, then
 * waits for stdin to close and leaves. */
int cluster_node_main(int argc, char **argv)
{
    if (argc != 7)
        return 2;
    const char *role = argv[2], *prefix = argv[4], *arg = argv[6];
    snprintf(srv.url, sizeof srv.url, "%s", argv[3]);
    sb_eid e;
    if (sb_eid_from_str(argv[5], &e) != SB_OK || sb_eid_set_default(&e) != SB_OK) {
        say("error bad eid\n");
        return 2;
    }
    sb_set_log_handler(node_log, NULL);
    char name[32];
    snprintf(name, sizeof name, "bench-%s-%d", role, (int)getpid());
    sb_cluster *c = join(prefix, name, NULL);
    if (!c) {
        say("error join: %s\n", sb_last_error());
        return 2;
    }
    sb_topic *t = NULL;
    sb_subscription *s = NULL;
    sb_caching_topic *ct = NULL;
    sb_cache *cache = NULL;
    if (!strcmp(role, "c2") || !strcmp(role, "c3")) {
        if (sscanf(arg, "%" SCNu64 ",%" SCNu64, &nd.warm, &nd.n) != 2)
            return 2;
        nd.lat = role[1] == '3';
        if (nd.lat && (!(nd.lat_ns = calloc(nd.n, sizeof *nd.lat_ns)) ||
                       !(nd.raw_lat = calloc(nd.n, sizeof *nd.raw_lat))))
            return 2;
        const char *colon = strrchr(srv.url, ':');
        srv.port = colon ? atoi(colon + 1) : 0;
        if (nd.lat && nc_connect(&nd.raw, deadline_in(5)) == 0) {
            char sub[160];
            int len = snprintf(sub, sizeof sub, "SUB %s.m.bench/c3.bench_c3 1\r\n", prefix);
            nd.raw_on = send_all(nd.raw.fd, sub, (size_t)len) == 0 && nc_flush(&nd.raw, deadline_in(5)) == 0 &&
                        pthread_create(&nd.raw_th, NULL, raw_receiver, NULL) == 0;
        }
        sb_message_type_create(nd.lat ? "bench_c3" : "bench_c2", NULL, &nd.ty);
        t = sb_topic_create(nd.lat ? "bench/c3" : "bench/c2");
        s = sb_subscribe(t, node_cb, NULL);
        if (sb_cluster_share_topic(c, t) != SB_OK) {
            say("error share: %s\n", sb_last_error());
            return 2;
        }
        say("ready\n");
    } else if (!strcmp(role, "c4")) {
        int per = atoi(arg);
        sb_message_type_create("bench_snap", NULL, &nd.ty);
        t = sb_topic_create("bench/c4");
        cache = sb_cache_create(c4_id);
        ct = sb_caching_topic_create(t, cache);
        if (sb_cluster_share_cache(c, ct) != SB_OK) {
            say("error share_cache: %s\n", sb_last_error());
            return 2;
        }
        for (int i = 0; i < per; i++) {
            char b[64];
            int len = snprintf(b, sizeof b, "%s-%d", argv[5], i);
            len += 1 + snprintf(b + len + 1, sizeof b - (size_t)len - 1, "value-%d", i);
            sb_message *m = sb_message_create_bytes(nd.ty, b, (size_t)len);
            sb_publish(t, m);
            sb_message_unref(m);
        }
        say("ready\n");
    } else {
        say("ready\n");
    }
    /* until the parent closes our stdin (or kills us) */
    char buf[64];
    while (read(0, buf, sizeof buf) > 0)
        ;
    if (nd.n && nd.seen2 < nd.n) {
        sb_cluster_stats st;
        sb_cluster_get_stats(c, &st);
        fprintf(stderr,
                "# node %d: got %" PRIu64 " of %" PRIu64 " (warm-up %" PRIu64 " of %" PRIu64 "); received %" PRIu64
                ", dropped_in %" PRIu64 ", reconnects %" PRIu64 ", connected %u\n",
                (int)getpid(), nd.seen2, nd.n, nd.seen1, nd.warm, st.received, st.dropped_in, st.reconnects,
                st.connected);
    }
    sb_cluster_leave(c);
    if (s)
        sb_unsubscribe_and_join(s);
    if (ct)
        sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(t);
    return 0;
}
