/*
 * nats_harness.h - real nats-server processes for the C tests, child node processes and
 * a tiny plain NATS client. Header-only; include test_util.h FIRST, then this header.
 *
 * Everything runs on loopback (127.0.0.1) and every wait is bounded. What a test starts,
 * the matching call stops (nh_server_free, nh_cluster_free, nh_child_close); if the test
 * program dies first, the kernel kills its servers and children (PR_SET_PDEATHSIG), so
 * start them from the main thread (the signal follows the thread that forked).
 *
 * The server binary is $SB_NATS_SERVER (tests/ffi.rs sets it to .tools/nats/bin/nats-server,
 * which `make nats-server` installs). A test that needs it calls nh_require_server() first:
 * without the binary that records a failure saying how to install it.
 *
 * Utilities
 *   nh_require_server()            1 if $SB_NATS_SERVER is there, else a recorded failure
 *   nh_free_port() / nh_free_ports(ports, n)   free loopback ports (bind port 0, read, close)
 *   nh_loopback_bind(port, reuse) / nh_local_port(fd)   a socket bound to 127.0.0.1, its port
 *   nh_run(argv, log, ms)          run a command (openssl ...), bounded
 * Servers
 *   nh_server_start(s, opts)       temp dir, config, free ports; start and wait until it
 *                                  accepts clients and sends INFO (JetStream always on)
 *   nh_server_stop(s)              SIGTERM, bounded wait, then SIGKILL
 *   nh_server_kill9(s)             SIGKILL and reap
 *   nh_server_restart(s, wipe)     start again on the same ports, keeping or wiping the store
 *   nh_server_free(s)              stop and remove the temp dir
 *   (while no process runs on a server's ports, from their pick to its start and between a
 *   stop or kill and a restart, sockets bound to them keep other programs' picks off them)
 *   nh_cluster_start(cl, n, opts)  n servers with routes and clustered JetStream, ready
 *   nh_cluster_wait_ready(cl, ms)  every running member routed to the others, JetStream
 *                                  meta leader elected among them, /healthz ok
 *   nh_cluster_kill9 / nh_cluster_restart / nh_cluster_urls / nh_cluster_free
 *   nh_cluster_stream_leader(cl, stream)  which member leads a JetStream stream
 *   nh_http_get(port, path, ...)   plain HTTP GET (monitoring port)
 * Children (the test program run again: main() checks argv[1])
 *   nh_child_spawn / nh_child_send / nh_child_read_line / nh_child_expect /
 *   nh_child_kill9 / nh_child_wait / nh_child_close; in the child: nh_node_read_line,
 *   nh_node_reply
 * Plain client (no TLS)
 *   nh_plain_connect / nh_plain_connect_auth / nh_plain_sub / nh_plain_unsub / nh_plain_pub /
 *   nh_plain_hpub / nh_plain_flush / nh_plain_next_msg / nh_plain_cork / nh_plain_close,
 *   nh_msg_header / nh_msg_status / nh_msg_free
 */
#ifndef SB_NATS_HARNESS_H
#define SB_NATS_HARNESS_H

#ifndef SB_TEST_UTIL_H
#error "include test_util.h before nats_harness.h"
#endif

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>

#define NH_PATH 512
#define NH_DIR 64 /* the temp dir: short, so that every path under it fits NH_PATH */
#define NH_CLUSTER_MAX 5
/* Bounds of the waits the harness makes on its own (milliseconds). */
#define NH_START_TIMEOUT_MS 10000
#define NH_STOP_TIMEOUT_MS 5000
#define NH_CLUSTER_TIMEOUT_MS 20000

/* ---------------------------------------------------------------- small utilities */

static inline long long nh_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A wait bound, stretched under valgrind or ThreadSanitizer (the test program is slower,
 * the server not). */
static inline int nh_scale_ms(int ms) { return tu_checked() ? ms * 4 : ms; }

static inline void nh_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "nats_harness: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    fflush(stderr);
}

static inline void nh_set_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFD);
    if (fl >= 0)
        fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
}

/* Writes all of buf (MSG_NOSIGNAL on sockets: a closed peer is an error, not SIGPIPE). */
static inline int nh_write_all(int fd, const void *buf, size_t len, int is_socket)
{
    const char *p = (const char *)buf;
    while (len > 0) {
        ssize_t n = is_socket ? send(fd, p, len, MSG_NOSIGNAL) : write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Waits up to timeout_ms for fd to become readable: 1 readable (or EOF), 0 timeout. */
static inline int nh_poll_in(int fd, long long deadline_ms)
{
    for (;;) {
        long long left = deadline_ms - nh_now_ms();
        if (left < 0)
            left = 0;
        struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
        int r = poll(&p, 1, (int)left);
        if (r > 0)
            return 1;
        if (r == 0)
            return 0;
        if (errno != EINTR)
            return 1; /* let the read report the error */
    }
}

/* Reaps pid within timeout_ms: 1 reaped (*status set), 0 still running. */
static inline int nh_reap(pid_t pid, int timeout_ms, int *status)
{
    long long deadline = nh_now_ms() + timeout_ms;
    for (;;) {
        int st = 0;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (status)
                *status = st;
            return 1;
        }
        if (r < 0 && errno != EINTR) {
            if (status)
                *status = 0;
            return 1; /* not our child any more (already reaped) */
        }
        if (nh_now_ms() > deadline)
            return 0;
        tu_sleep_ms(5);
    }
}

/* A wait status as a shell does: the exit code, or 128 + the signal. */
static inline int nh_exit_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return -1;
}

/* Removes path and everything under it (rm -rf); missing is fine. */
static inline void nh_rm_rf(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (d != NULL) {
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                    continue;
                char sub[NH_PATH];
                if ((size_t)snprintf(sub, sizeof sub, "%s/%s", path, e->d_name) < sizeof sub)
                    nh_rm_rf(sub);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* Runs argv (PATH lookup) with stdout and stderr appended to log_path (NULL: /dev/null);
 * returns its exit code, or -1 if it could not run or took longer than timeout_ms (then
 * it is killed). */
static inline int nh_run(char *const argv[], const char *log_path, int timeout_ms)
{
    int out = open(log_path ? log_path : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0644);
    int in = open("/dev/null", O_RDONLY);
    if (out < 0 || in < 0) {
        if (out >= 0)
            close(out);
        if (in >= 0)
            close(in);
        return -1;
    }
    nh_set_cloexec(out);
    nh_set_cloexec(in);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(in, 0);
        dup2(out, 1);
        dup2(out, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(out);
    close(in);
    if (pid < 0)
        return -1;
    int st = 0;
    if (!nh_reap(pid, timeout_ms, &st)) {
        kill(pid, SIGKILL);
        nh_reap(pid, NH_STOP_TIMEOUT_MS, &st);
        nh_log("%s took longer than %d ms and was killed", argv[0], timeout_ms);
        return -1;
    }
    return nh_exit_code(st);
}

/* Prints the last `max` bytes of a file to stderr (server logs on failures). */
static inline void nh_print_tail(const char *path, long max)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        fseek(f, size > max ? size - max : 0, SEEK_SET);
    }
    fprintf(stderr, "--- %s ---\n", path);
    char buf[1024];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        fwrite(buf, 1, n, stderr);
    fprintf(stderr, "--- end of %s ---\n", path);
    fflush(stderr);
    fclose(f);
}

static inline int nh_file_contains(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char line[2048];
    int found = 0;
    while (!found && fgets(line, sizeof line, f) != NULL)
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* ---------------------------------------------------------------- sockets */

/* A TCP socket bound to 127.0.0.1:port (0: any free port), close-on-exec, not listening
 * (a connection to it is refused); with `reuse`, SO_REUSEADDR is set first. The fd, or -1. */
static inline int nh_loopback_bind(int port, int reuse)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    nh_set_cloexec(fd);
    int one = 1;
    if (reuse)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((unsigned short)port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The local port of a bound socket, or -1. */
static inline int nh_local_port(int fd)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &alen) != 0)
        return -1;
    return ntohs(a.sin_port);
}

/* Picks n distinct free TCP ports on 127.0.0.1 (binds port 0 n times at once, reads the
 * ports, closes). 0 on success. Another process may take a port before it is used: rare,
 * and nh_server_start and nh_cluster_start then retry with new ports. */
static inline int nh_free_ports(int *ports, int n)
{
    int fds[16];
    int ok = n > 0 && n <= 16;
    int i;
    for (i = 0; ok && i < n; i++) {
        fds[i] = nh_loopback_bind(0, 0);
        ports[i] = fds[i] >= 0 ? nh_local_port(fds[i]) : -1;
        if (ports[i] <= 0) {
            if (fds[i] >= 0)
                close(fds[i]);
            ok = 0;
            break;
        }
    }
    for (int j = 0; j < i; j++)
        close(fds[j]);
    return ok ? 0 : -1;
}

/* One free loopback port, or -1. */
static inline int nh_free_port(void)
{
    int p;
    return nh_free_ports(&p, 1) == 0 ? p : -1;
}

/* TCP connection to 127.0.0.1:port within timeout_ms; the fd (blocking, close-on-exec,
 * sends bounded by 5 s) or -1. */
static inline int nh_tcp_connect(int port, int timeout_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    nh_set_cloexec(fd);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((unsigned short)port);
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r != 0 && errno == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
        int err = 0;
        socklen_t elen = sizeof err;
        if (poll(&p, 1, timeout_ms) == 1 &&
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 && err == 0)
            r = 0;
    }
    if (r != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fl);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 5, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

/* Reads one line ending in '\n' from fd, byte by byte (only for short handshakes), within
 * timeout_ms. Returns its length without "\r\n", or -1. */
static inline int nh_read_line_fd(int fd, char *buf, size_t len, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    size_t n = 0;
    while (n + 1 < len) {
        if (!nh_poll_in(fd, deadline))
            return -1;
        char ch;
        ssize_t r = recv(fd, &ch, 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        if (ch == '\n') {
            if (n > 0 && buf[n - 1] == '\r')
                n--;
            buf[n] = '\0';
            return (int)n;
        }
        buf[n++] = ch;
    }
    return -1;
}

/* HTTP/1.0 GET http://127.0.0.1:port<path>: the status code (body in out, NUL-terminated,
 * truncated to len), or -1 if there is no answer within timeout_ms. */
static inline int nh_http_get(int port, const char *path, char *out, size_t len, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    if (out && len)
        out[0] = '\0';
    int fd = nh_tcp_connect(port, timeout_ms);
    if (fd < 0)
        return -1;
    char req[768];
    int rl = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n", path, port);
    if (rl < 0 || (size_t)rl >= sizeof req || nh_write_all(fd, req, (size_t)rl, 1) != 0) {
        close(fd);
        return -1;
    }
    size_t cap = 16384, n = 0;
    char *resp = (char *)malloc(cap);
    int eof = 0;
    while (resp != NULL && nh_poll_in(fd, deadline)) {
        if (n + 4096 > cap) {
            char *bigger = (char *)realloc(resp, cap * 2);
            if (bigger == NULL)
                break;
            resp = bigger;
            cap *= 2;
        }
        ssize_t r = recv(fd, resp + n, cap - n - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            eof = 1;
            break;
        }
        n += (size_t)r;
    }
    close(fd);
    int status = -1;
    if (resp != NULL && eof) {
        resp[n] = '\0';
        int code = 0;
        if (sscanf(resp, "HTTP/%*d.%*d %d", &code) == 1)
            status = code;
        const char *body = strstr(resp, "\r\n\r\n");
        if (out && len && body)
            snprintf(out, len, "%s", body + 4);
    }
    free(resp);
    return status;
}

/* ---------------------------------------------------------------- servers */

typedef struct nh_server_opts {
    const char *user;       /* with password: clients must authenticate as user/password */
    const char *password;
    const char *token;      /* clients must send this token (not with user) */
    int tls;                /* generate a test CA and certificates; clients must use TLS */
    int tls_verify;         /* with tls: clients must also present a certificate of the CA */
    int tls_first;          /* with tls: TLS handshake before INFO (handshake_first) */
    const char *extra_conf; /* appended to the configuration file as is (NULL: nothing) */
    int no_jetstream;       /* a server without JetStream (no store for shared caches) */
} nh_server_opts;

typedef struct nh_server {
    pid_t pid;              /* 0 when not running */
    int port;               /* client port */
    int cluster_port;       /* route port (0 for a lone server) */
    int monitor_port;       /* HTTP monitoring (/varz, /jsz, /healthz, /routez) */
    char url[64];           /* nats://127.0.0.1:port */
    char tls_url[64];       /* tls://127.0.0.1:port */
    char name[48];          /* server_name */
    char dir[NH_DIR];       /* temp dir (mkdtemp under /tmp), removed by nh_server_free */
    char conf[NH_PATH];     /* dir/server.conf */
    char store[NH_PATH];    /* dir/jetstream: JetStream store */
    char log[NH_PATH];      /* dir/server.log: the server's output */
    char ca_file[NH_PATH];  /* TLS: test CA (dir/ca.pem) */
    char cert_file[NH_PATH], key_file[NH_PATH];               /* TLS: server (IP:127.0.0.1, DNS:localhost) */
    char client_cert_file[NH_PATH], client_key_file[NH_PATH]; /* TLS: a client cert of the CA */
    char user[64], password[64], token[128];
    nh_server_opts opts;    /* copy; its strings point at the buffers above */
    char extra_conf[1024];
    char cluster_name[32];
    int routes[NH_CLUSTER_MAX]; /* route ports of the other members */
    int nroutes;
    char info[4096];        /* the INFO line the server sent at its last start */
    int last_status;        /* wait status of its last exit */
    int held[3];            /* sockets bound to its ports while no server process runs */
    int nheld;
} nh_server;

/* The server binary from $SB_NATS_SERVER, or NULL if unset or not executable. */
static inline const char *nh_server_exe(void)
{
    const char *p = getenv("SB_NATS_SERVER");
    if (p != NULL && p[0] != '\0' && access(p, X_OK) == 0)
        return p;
    return NULL;
}

/* 1 if the server binary is there; otherwise records a failure telling how to install it. */
static inline int nh_require_server(void)
{
    if (nh_server_exe() != NULL)
        return 1;
    const char *p = getenv("SB_NATS_SERVER");
    char msg[1024];
    snprintf(msg, sizeof msg,
             "no nats-server binary (SB_NATS_SERVER=%s): run `make nats-server` "
             "(installs it in .tools/nats/bin), then run the tests again",
             p && p[0] ? p : "(unset)");
    tu_fail(__FILE__, __LINE__, msg);
    return 0;
}

static inline int nh_safe_conf_string(const char *s, size_t max)
{
    if (s == NULL)
        return 1;
    if (strlen(s) >= max)
        return 0;
    for (; *s; s++)
        if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20)
            return 0;
    return 1;
}

/* Generates ca.pem, server.pem/key (SAN IP:127.0.0.1, DNS:localhost) and client.pem/key in
 * s->dir with the openssl CLI. 0 on success. */
static inline int nh_server_make_certs(nh_server *s)
{
    char ca_key[NH_PATH], csr[NH_PATH], ccsr[NH_PATH], ext[NH_PATH], cext[NH_PATH],
        serial[NH_PATH], log[NH_PATH];
    snprintf(s->ca_file, sizeof s->ca_file, "%s/ca.pem", s->dir);
    snprintf(ca_key, sizeof ca_key, "%s/ca.key", s->dir);
    snprintf(s->cert_file, sizeof s->cert_file, "%s/server.pem", s->dir);
    snprintf(s->key_file, sizeof s->key_file, "%s/server.key", s->dir);
    snprintf(s->client_cert_file, sizeof s->client_cert_file, "%s/client.pem", s->dir);
    snprintf(s->client_key_file, sizeof s->client_key_file, "%s/client.key", s->dir);
    snprintf(csr, sizeof csr, "%s/server.csr", s->dir);
    snprintf(ccsr, sizeof ccsr, "%s/client.csr", s->dir);
    snprintf(ext, sizeof ext, "%s/server.ext", s->dir);
    snprintf(cext, sizeof cext, "%s/client.ext", s->dir);
    snprintf(serial, sizeof serial, "%s/ca.srl", s->dir);
    snprintf(log, sizeof log, "%s/openssl.log", s->dir);

    FILE *f = fopen(ext, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "basicConstraints = critical, CA:FALSE\n"
               "keyUsage = critical, digitalSignature, keyEncipherment\n"
               "extendedKeyUsage = serverAuth\n"
               "subjectAltName = IP:127.0.0.1, DNS:localhost\n");
    fclose(f);
    f = fopen(cext, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "basicConstraints = critical, CA:FALSE\n"
               "keyUsage = critical, digitalSignature, keyEncipherment\n"
               "extendedKeyUsage = clientAuth\n"
               "subjectAltName = DNS:switchboard-test-client\n");
    fclose(f);

    char *ca[] = {"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", ca_key, "-out",
                  s->ca_file, "-days", "2", "-subj", "/CN=switchboard test CA", "-addext",
                  "basicConstraints=critical,CA:TRUE", "-addext",
                  "keyUsage=critical,keyCertSign,cRLSign", NULL};
    char *req[] = {"openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", s->key_file, "-out",
                   csr, "-subj", "/CN=localhost", NULL};
    char *sign[] = {"openssl", "x509", "-req", "-in", csr, "-CA", s->ca_file, "-CAkey", ca_key,
                    "-CAserial", serial, "-CAcreateserial", "-out", s->cert_file, "-days", "2",
                    "-sha256", "-extfile", ext, NULL};
    char *creq[] = {"openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", s->client_key_file,
                    "-out", ccsr, "-subj", "/CN=switchboard-test-client", NULL};
    char *csign[] = {"openssl", "x509", "-req", "-in", ccsr, "-CA", s->ca_file, "-CAkey", ca_key,
                     "-CAserial", serial, "-CAcreateserial", "-out", s->client_cert_file, "-days",
                     "2", "-sha256", "-extfile", cext, NULL};
    char **steps[] = {ca, req, sign, creq, csign};
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        int rc = nh_run(steps[i], log, nh_scale_ms(20000));
        if (rc != 0) {
            nh_log("openssl %s failed (exit %d)%s", steps[i][1], rc,
                   rc == 127 ? ": is the openssl command installed? (apt-get install openssl)"
                             : "");
            nh_print_tail(log, 4096);
            return -1;
        }
    }
    return 0;
}

/* Writes s->conf from s's fields. */
static inline int nh_server_write_conf(nh_server *s)
{
    FILE *f = fopen(s->conf, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "server_name: \"%s\"\n", s->name);
    fprintf(f, "listen: \"127.0.0.1:%d\"\n", s->port);
    fprintf(f, "http: \"127.0.0.1:%d\"\n", s->monitor_port);
    if (!s->opts.no_jetstream)
        fprintf(f, "jetstream {\n  store_dir: \"%s\"\n  max_memory_store: 256MB\n"
                   "  max_file_store: 1GB\n}\n",
                s->store);
    if (s->user[0])
        fprintf(f, "authorization {\n  user: \"%s\"\n  password: \"%s\"\n}\n", s->user,
                s->password);
    else if (s->token[0])
        fprintf(f, "authorization {\n  token: \"%s\"\n}\n", s->token);
    if (s->opts.tls) {
        fprintf(f, "tls {\n  cert_file: \"%s\"\n  key_file: \"%s\"\n  ca_file: \"%s\"\n"
                   "  timeout: 5\n",
                s->cert_file, s->key_file, s->ca_file);
        if (s->opts.tls_verify)
            fprintf(f, "  verify: true\n");
        if (s->opts.tls_first)
            fprintf(f, "  handshake_first: true\n");
        fprintf(f, "}\n");
    }
    if (s->cluster_port) {
        fprintf(f, "cluster {\n  name: \"%s\"\n  listen: \"127.0.0.1:%d\"\n  routes: [\n",
                s->cluster_name, s->cluster_port);
        for (int i = 0; i < s->nroutes; i++)
            fprintf(f, "    \"nats-route://127.0.0.1:%d\"\n", s->routes[i]);
        fprintf(f, "  ]\n}\n");
    }
    if (s->extra_conf[0])
        fprintf(f, "%s\n", s->extra_conf);
    return fclose(f) == 0 ? 0 : -1;
}

/* Removes the temp dirs that test programs killed before their cleanup left behind:
 * /tmp/sb-nats-* whose owner (the pid in its "owner" file) is gone. Once per process. */
static inline void nh_sweep_stale_dirs(void)
{
    static atomic_int swept;
    if (atomic_exchange(&swept, 1))
        return;
    DIR *d = opendir("/tmp");
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "sb-nats-", 8) != 0 || strlen(e->d_name) != 14)
            continue;
        char path[NH_PATH];
        snprintf(path, sizeof path, "/tmp/%s/owner", e->d_name);
        FILE *f = fopen(path, "r");
        int pid = 0;
        if (f == NULL)
            continue;
        if (fscanf(f, "%d", &pid) != 1)
            pid = 0;
        fclose(f);
        if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH) {
            snprintf(path, sizeof path, "/tmp/%s", e->d_name);
            nh_rm_rf(path);
        }
    }
    closedir(d);
}

/* Sets s's client and monitoring ports (and the URLs made of them). */
static inline void nh_server_set_ports(nh_server *s, int port, int monitor_port)
{
    s->port = port;
    s->monitor_port = monitor_port;
    snprintf(s->url, sizeof s->url, "nats://127.0.0.1:%d", s->port);
    snprintf(s->tls_url, sizeof s->tls_url, "tls://127.0.0.1:%d", s->port);
}

/* Closes the sockets that hold s's ports (see nh_server_hold_ports). */
static inline void nh_server_release_ports(nh_server *s)
{
    for (int i = 0; i < s->nheld; i++)
        close(s->held[i]);
    s->nheld = 0;
}

/* Holds one more of s's ports (see nh_server_hold_ports). A port that cannot be held
 * (taken already) is left alone: the start then reports it. */
static inline void nh_server_hold_port(nh_server *s, int port)
{
    if (port <= 0 || s->nheld >= (int)(sizeof s->held / sizeof s->held[0]))
        return;
    int fd = nh_loopback_bind(port, 1);
    if (fd >= 0)
        s->held[s->nheld++] = fd;
}

/* While no server process runs on s's ports (from their pick to the first start, and
 * between a stop or kill -9 and a restart), a socket bound to each (SO_REUSEADDR, not
 * listening) keeps other programs' "any free port" picks off them, so the restart finds
 * them free; nh_server_spawn closes them just before the server binds. */
static inline void nh_server_hold_ports(nh_server *s)
{
    nh_server_release_ports(s);
    nh_server_hold_port(s, s->port);
    nh_server_hold_port(s, s->monitor_port);
    nh_server_hold_port(s, s->cluster_port);
}

/* Prepares s (temp dir, certificates, ports, names; no config yet) on the given client
 * and monitoring ports (0, 0: free ones it picks), and holds them. */
static inline int nh_server_init_on(nh_server *s, const nh_server_opts *opts, int port,
                                    int monitor_port)
{
    memset(s, 0, sizeof *s);
    nh_server_opts none;
    memset(&none, 0, sizeof none);
    if (opts == NULL)
        opts = &none;
    if (nh_server_exe() == NULL) {
        nh_log("no nats-server binary: run `make nats-server`");
        return -1;
    }
    if (!nh_safe_conf_string(opts->user, sizeof s->user) ||
        !nh_safe_conf_string(opts->password, sizeof s->password) ||
        !nh_safe_conf_string(opts->token, sizeof s->token) ||
        (opts->extra_conf && strlen(opts->extra_conf) >= sizeof s->extra_conf)) {
        nh_log("credentials must be short and free of quotes, backslashes and controls");
        return -1;
    }
    s->opts = *opts;
    snprintf(s->user, sizeof s->user, "%s", opts->user ? opts->user : "");
    snprintf(s->password, sizeof s->password, "%s", opts->password ? opts->password : "");
    snprintf(s->token, sizeof s->token, "%s", opts->token ? opts->token : "");
    snprintf(s->extra_conf, sizeof s->extra_conf, "%s", opts->extra_conf ? opts->extra_conf : "");
    s->opts.user = s->user[0] ? s->user : NULL;
    s->opts.password = s->user[0] ? s->password : NULL;
    s->opts.token = s->token[0] ? s->token : NULL;
    s->opts.extra_conf = NULL;

    nh_sweep_stale_dirs();
    snprintf(s->dir, sizeof s->dir, "/tmp/sb-nats-XXXXXX");
    if (mkdtemp(s->dir) == NULL) {
        nh_log("mkdtemp: %s", strerror(errno));
        s->dir[0] = '\0';
        return -1;
    }
    char owner[NH_PATH];
    snprintf(owner, sizeof owner, "%s/owner", s->dir);
    FILE *of = fopen(owner, "w");
    if (of != NULL) {
        fprintf(of, "%d\n", (int)getpid());
        fclose(of);
    }
    snprintf(s->conf, sizeof s->conf, "%s/server.conf", s->dir);
    snprintf(s->store, sizeof s->store, "%s/jetstream", s->dir);
    snprintf(s->log, sizeof s->log, "%s/server.log", s->dir);
    if (mkdir(s->store, 0700) != 0) {
        nh_log("mkdir %s: %s", s->store, strerror(errno));
        return -1;
    }
    if (s->opts.tls && nh_server_make_certs(s) != 0)
        return -1;
    int ports[2] = {port, monitor_port};
    if ((port <= 0 || monitor_port <= 0) && nh_free_ports(ports, 2) != 0)
        return -1;
    nh_server_set_ports(s, ports[0], ports[1]);
    nh_server_hold_ports(s);
    snprintf(s->name, sizeof s->name, "nh-%d", s->port);
    return 0;
}

/* nh_server_init_on free ports. */
static inline int nh_server_init(nh_server *s, const nh_server_opts *opts)
{
    return nh_server_init_on(s, opts, 0, 0);
}

/* Forks and execs the server (not waiting for it). */
static inline int nh_server_spawn(nh_server *s)
{
    const char *exe = nh_server_exe();
    if (exe == NULL) {
        nh_log("no nats-server binary: run `make nats-server`");
        return -1;
    }
    int logfd = open(s->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    int in = open("/dev/null", O_RDONLY);
    if (logfd < 0 || in < 0) {
        if (logfd >= 0)
            close(logfd);
        if (in >= 0)
            close(in);
        return -1;
    }
    nh_set_cloexec(logfd);
    nh_set_cloexec(in);
    char exe_copy[NH_PATH];
    snprintf(exe_copy, sizeof exe_copy, "%s", exe);
    char *argv[] = {exe_copy, "-c", s->conf, NULL};
    nh_server_release_ports(s); /* the server binds them now */
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* dies with the test program; only async-signal-safe calls until exec */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(in, 0);
        dup2(logfd, 1);
        dup2(logfd, 2);
        execv(argv[0], argv);
        _exit(127);
    }
    close(logfd);
    close(in);
    if (pid < 0) {
        nh_log("fork: %s", strerror(errno));
        return -1;
    }
    s->pid = pid;
    return 0;
}

/* Waits until the server accepts a connection and sends its INFO line (kept in s->info).
 * 0 on success; -1 if it exited (its log is printed) or did not answer in time. */
static inline int nh_server_wait_ready(nh_server *s, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    for (;;) {
        int st;
        if (s->pid > 0 && nh_reap(s->pid, 0, &st)) {
            s->pid = 0;
            s->last_status = st;
            nh_log("nats-server %s (port %d) exited at start (status %d)", s->name, s->port,
                   nh_exit_code(st));
            return -1;
        }
        if (s->pid <= 0)
            return -1;
        int fd = nh_tcp_connect(s->port, 500);
        if (fd >= 0) {
            char line[sizeof s->info];
            int n = nh_read_line_fd(fd, line, sizeof line, s->opts.tls_first ? 300 : 2000);
            close(fd);
            if (n >= 5 && strncmp(line, "INFO ", 5) == 0) {
                snprintf(s->info, sizeof s->info, "%s", line);
                return 0;
            }
            if (s->opts.tls_first) { /* no INFO before the handshake: the port is enough */
                snprintf(s->info, sizeof s->info, "(handshake_first: no plain INFO)");
                return 0;
            }
        }
        if (nh_now_ms() > deadline) {
            nh_log("nats-server %s (port %d) did not answer within %d ms", s->name, s->port,
                   timeout_ms);
            return -1;
        }
        tu_sleep_ms(20);
    }
}

/* Stops the server: SIGTERM, up to NH_STOP_TIMEOUT_MS for it to exit, then SIGKILL. */
static inline void nh_server_stop(nh_server *s)
{
    if (s->pid <= 0)
        return;
    int st = 0;
    kill(s->pid, SIGTERM);
    if (!nh_reap(s->pid, NH_STOP_TIMEOUT_MS, &st)) {
        nh_log("nats-server %s ignored SIGTERM for %d ms: SIGKILL", s->name, NH_STOP_TIMEOUT_MS);
        kill(s->pid, SIGKILL);
        nh_reap(s->pid, NH_STOP_TIMEOUT_MS, &st);
    }
    s->last_status = st;
    s->pid = 0;
    nh_server_hold_ports(s);
}

/* kill -9 and reap. */
static inline void nh_server_kill9(nh_server *s)
{
    if (s->pid <= 0)
        return;
    int st = 0;
    kill(s->pid, SIGKILL);
    nh_reap(s->pid, NH_STOP_TIMEOUT_MS, &st);
    s->last_status = st;
    s->pid = 0;
    nh_server_hold_ports(s);
}

/* Stops the server and removes its temp dir (safe on a failed or zeroed nh_server). */
static inline void nh_server_free(nh_server *s)
{
    nh_server_stop(s);
    nh_server_release_ports(s);
    if (s->dir[0])
        nh_rm_rf(s->dir);
    s->dir[0] = '\0';
}

/* Starts a lone server with JetStream (and opts: auth, TLS; NULL for none) and waits until
 * it answers. 0 on success; on failure s holds nothing to clean up. */
static inline int nh_server_start(nh_server *s, const nh_server_opts *opts)
{
    if (nh_server_init(s, opts) != 0) {
        nh_server_free(s);
        return -1;
    }
    for (int attempt = 0;; attempt++) {
        if (nh_server_write_conf(s) == 0 && nh_server_spawn(s) == 0 &&
            nh_server_wait_ready(s, nh_scale_ms(NH_START_TIMEOUT_MS)) == 0)
            return 0;
        int port_taken = nh_file_contains(s->log, "address already in use");
        nh_server_kill9(s);
        if (!port_taken || attempt == 2) {
            nh_print_tail(s->log, 4096);
            nh_server_free(s);
            return -1;
        }
        /* a port was taken since it was picked: pick others */
        int ports[2];
        if (nh_free_ports(ports, 2) != 0) {
            nh_server_free(s);
            return -1;
        }
        nh_server_set_ports(s, ports[0], ports[1]);
        nh_server_hold_ports(s);
        unlink(s->log);
    }
}

/* Restarts the server on the same ports and config (stopping it first if it runs), keeping
 * its JetStream store or starting from an empty one. Waits until it answers; 0 on success. */
static inline int nh_server_restart(nh_server *s, int wipe_store)
{
    nh_server_stop(s);
    if (wipe_store) {
        nh_rm_rf(s->store);
        if (mkdir(s->store, 0700) != 0) {
            nh_log("mkdir %s: %s", s->store, strerror(errno));
            return -1;
        }
    }
    if (nh_server_spawn(s) != 0)
        return -1;
    /* the old process's ports are free at once (the server sets SO_REUSEADDR) */
    if (nh_server_wait_ready(s, nh_scale_ms(NH_START_TIMEOUT_MS)) != 0) {
        nh_print_tail(s->log, 4096);
        nh_server_kill9(s);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- clusters */

typedef struct nh_cluster {
    int n;
    char name[32];                     /* cluster name */
    nh_server servers[NH_CLUSTER_MAX]; /* server i: name "<cluster>-<i>" */
} nh_cluster;

/* "nats://127.0.0.1:a,nats://127.0.0.1:b,..." (every member, running or not) into buf. */
static inline const char *nh_cluster_urls(const nh_cluster *cl, char *buf, size_t len)
{
    size_t off = 0;
    if (len)
        buf[0] = '\0';
    for (int i = 0; i < cl->n && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%s", i ? "," : "", cl->servers[i].url);
    return buf;
}

/* The value of "key":"..." after `after` (or anywhere if NULL) in a JSON text, into out. */
static inline int nh_json_str(const char *json, const char *after, const char *key, char *out,
                              size_t len)
{
    const char *p = json;
    if (after != NULL && (p = strstr(json, after)) == NULL)
        return -1;
    char pat[96];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    p = strstr(p, pat);
    if (p == NULL)
        return -1;
    p += strlen(pat);
    while (*p == ' ')
        p++;
    if (*p != '"')
        return -1;
    p++;
    size_t n = 0;
    while (*p && *p != '"' && n + 1 < len)
        out[n++] = *p++;
    out[n] = '\0';
    return 0;
}

/* 1 once server i of cl is routed to every other running member, sees a JetStream meta
 * leader that is a running member, and its /healthz says ok. */
static inline int nh_cluster_member_ready(nh_cluster *cl, int i, char *why, size_t whylen)
{
    nh_server *s = &cl->servers[i];
    size_t cap = 65536;
    char *body = (char *)malloc(cap);
    int ok = 0;
    if (body == NULL)
        return 0;
    snprintf(why, whylen, "%s: no answer from the monitoring port", s->name);
    if (nh_http_get(s->monitor_port, "/routez", body, cap, 2000) != 200)
        goto out;
    for (int j = 0; j < cl->n; j++) {
        if (j == i || cl->servers[j].pid <= 0)
            continue;
        char pat[96];
        snprintf(pat, sizeof pat, "\"remote_name\": \"%s\"", cl->servers[j].name);
        char pat2[96];
        snprintf(pat2, sizeof pat2, "\"remote_name\":\"%s\"", cl->servers[j].name);
        if (strstr(body, pat) == NULL && strstr(body, pat2) == NULL) {
            snprintf(why, whylen, "%s: no route to %s yet", s->name, cl->servers[j].name);
            goto out;
        }
    }
    if (nh_http_get(s->monitor_port, "/jsz", body, cap, 2000) != 200)
        goto out;
    char leader[64];
    if (nh_json_str(body, "\"meta_cluster\"", "leader", leader, sizeof leader) != 0 ||
        leader[0] == '\0') {
        snprintf(why, whylen, "%s: no JetStream meta leader yet", s->name);
        goto out;
    }
    int live_leader = 0;
    for (int j = 0; j < cl->n; j++)
        if (cl->servers[j].pid > 0 && strcmp(cl->servers[j].name, leader) == 0)
            live_leader = 1;
    if (!live_leader) {
        snprintf(why, whylen, "%s: meta leader %s is not running", s->name, leader);
        goto out;
    }
    int code = nh_http_get(s->monitor_port, "/healthz", body, cap, 2000);
    if (code != 200) {
        snprintf(why, whylen, "%s: /healthz %d %.200s", s->name, code, body);
        goto out;
    }
    ok = 1;
out:
    free(body);
    return ok;
}

/* Waits until every running member is ready (nh_cluster_member_ready); 0 on success. */
static inline int nh_cluster_wait_ready(nh_cluster *cl, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    char why[512] = "";
    for (;;) {
        int ready = 1, running = 0;
        for (int i = 0; i < cl->n && ready; i++) {
            if (cl->servers[i].pid <= 0)
                continue;
            running++;
            int st;
            if (nh_reap(cl->servers[i].pid, 0, &st)) {
                cl->servers[i].pid = 0;
                cl->servers[i].last_status = st;
                nh_log("cluster member %s exited (status %d)", cl->servers[i].name,
                       nh_exit_code(st));
                nh_print_tail(cl->servers[i].log, 4096);
                return -1;
            }
            ready = nh_cluster_member_ready(cl, i, why, sizeof why);
        }
        if (ready && running > 0)
            return 0;
        if (nh_now_ms() > deadline) {
            nh_log("cluster %s not ready within %d ms: %s", cl->name, timeout_ms, why);
            return -1;
        }
        tu_sleep_ms(50);
    }
}

/* The index of the running member that leads JetStream stream `stream` (as the members'
 * /jsz reports it), or -1 when none does (yet). */
static inline int nh_cluster_stream_leader(nh_cluster *cl, const char *stream)
{
    size_t cap = 262144;
    char *body = (char *)malloc(cap);
    int found = -1;
    if (body == NULL)
        return -1;
    char name[160], leader[64];
    snprintf(name, sizeof name, "\"%s\"", stream);
    for (int i = 0; i < cl->n && found < 0; i++) {
        if (cl->servers[i].pid <= 0 ||
            nh_http_get(cl->servers[i].monitor_port, "/jsz?accounts=true&streams=true", body,
                        cap, 2000) != 200)
            continue;
        if (strstr(body, name) == NULL || nh_json_str(body, name, "leader", leader, sizeof leader))
            continue;
        for (int j = 0; j < cl->n; j++)
            if (cl->servers[j].pid > 0 && strcmp(cl->servers[j].name, leader) == 0)
                found = j;
    }
    free(body);
    return found;
}

/* Stops every member and removes their temp dirs (safe on a failed or zeroed cluster). */
static inline void nh_cluster_free(nh_cluster *cl)
{
    for (int i = 0; i < cl->n; i++)
        nh_server_free(&cl->servers[i]);
    cl->n = 0;
}

/* One attempt of nh_cluster_start. Every port (a route, a client and a monitoring port per
 * member) is picked in one nh_free_ports call, so they are distinct: picked in separate
 * calls, a port released by one pick can come back from the next (a member once got the
 * route port of another as its client port). *port_taken is set when a member could not
 * bind because another process took one of the ports since it was picked. */
static inline int nh_cluster_try_start(nh_cluster *cl, int n, const nh_server_opts *opts,
                                       int *port_taken)
{
    memset(cl, 0, sizeof *cl);
    *port_taken = 0;
    int ports[3 * NH_CLUSTER_MAX];
    if (nh_free_ports(ports, 3 * n) != 0)
        return -1;
    const int *rports = ports;          /* route port of member i */
    const int *cports = ports + n;      /* client port */
    const int *mports = ports + 2 * n;  /* monitoring port */
    snprintf(cl->name, sizeof cl->name, "nhc-%d", rports[0]);
    for (int i = 0; i < n; i++) {
        nh_server *s = &cl->servers[i];
        cl->n = i + 1;
        if (nh_server_init_on(s, opts, cports[i], mports[i]) != 0)
            goto fail;
        if (i > 0 && s->opts.tls) {
            /* one CA for the cluster: members share member 0's certificates */
            snprintf(s->ca_file, sizeof s->ca_file, "%s", cl->servers[0].ca_file);
            snprintf(s->cert_file, sizeof s->cert_file, "%s", cl->servers[0].cert_file);
            snprintf(s->key_file, sizeof s->key_file, "%s", cl->servers[0].key_file);
            snprintf(s->client_cert_file, sizeof s->client_cert_file, "%s",
                     cl->servers[0].client_cert_file);
            snprintf(s->client_key_file, sizeof s->client_key_file, "%s",
                     cl->servers[0].client_key_file);
        }
        s->cluster_port = rports[i];
        nh_server_hold_port(s, s->cluster_port);
        snprintf(s->cluster_name, sizeof s->cluster_name, "%s", cl->name);
        snprintf(s->name, sizeof s->name, "%s-%d", cl->name, i);
        for (int j = 0; j < n; j++)
            if (j != i)
                s->routes[s->nroutes++] = rports[j];
    }
    for (int i = 0; i < n; i++)
        if (nh_server_write_conf(&cl->servers[i]) != 0 || nh_server_spawn(&cl->servers[i]) != 0)
            goto fail;
    for (int i = 0; i < n; i++)
        if (nh_server_wait_ready(&cl->servers[i], nh_scale_ms(NH_START_TIMEOUT_MS)) != 0) {
            *port_taken = nh_file_contains(cl->servers[i].log, "address already in use");
            nh_print_tail(cl->servers[i].log, 4096);
            goto fail;
        }
    if (nh_cluster_wait_ready(cl, nh_scale_ms(NH_CLUSTER_TIMEOUT_MS)) != 0)
        goto fail;
    return 0;
fail:
    nh_cluster_free(cl);
    return -1;
}

/* Starts n (1..NH_CLUSTER_MAX, 3 for JetStream quorum) servers routed to each other, with
 * JetStream clustered (cluster name, server names "<cluster>-<i>"); every member gets the
 * same opts. Waits until the cluster is ready (nh_cluster_wait_ready). When another process
 * took a port between its pick and the server's bind, starts over on new ports (three
 * attempts). 0 on success; on failure nothing is left running. */
static inline int nh_cluster_start(nh_cluster *cl, int n, const nh_server_opts *opts)
{
    memset(cl, 0, sizeof *cl);
    if (n < 1 || n > NH_CLUSTER_MAX)
        return -1;
    for (int attempt = 0;; attempt++) {
        int port_taken = 0;
        if (nh_cluster_try_start(cl, n, opts, &port_taken) == 0)
            return 0;
        if (!port_taken || attempt == 2)
            return -1;
        nh_log("a port was taken since it was picked: starting the cluster on new ports");
    }
}

/* kill -9 member i (the others keep running). */
static inline void nh_cluster_kill9(nh_cluster *cl, int i) { nh_server_kill9(&cl->servers[i]); }

/* Restarts member i on its ports (keeping or wiping its store) and waits until the cluster
 * is ready again. 0 on success. */
static inline int nh_cluster_restart(nh_cluster *cl, int i, int wipe_store)
{
    if (nh_server_restart(&cl->servers[i], wipe_store) != 0)
        return -1;
    return nh_cluster_wait_ready(cl, nh_scale_ms(NH_CLUSTER_TIMEOUT_MS));
}

/* ---------------------------------------------------------------- child processes */

typedef struct nh_child {
    pid_t pid;          /* 0 once reaped */
    int fd;             /* our end of the socket pair that is the child's stdin and stdout */
    char rbuf[8192];    /* bytes read but not yet returned */
    size_t rlen;
    char line[4096];    /* the last line read (nh_child_read_line, nh_child_expect) */
    int status;         /* wait status once reaped */
    int hung;           /* a reply did not come: later commands are not sent (cn_cmd_t) */
} nh_child;

/* Runs this test program again (/proc/self/exe) with argv (argv[0] is the name it sees,
 * then its arguments, NULL-terminated; e.g. {argv0, "node", "a", url, NULL}). The child's
 * stdin and stdout are a socket to us, its stderr is ours; it is killed if we die.
 * 0 on success. */
static inline int nh_child_spawn(char *const argv[], nh_child *out)
{
    memset(out, 0, sizeof *out);
    out->fd = -1;
    char exe[NH_PATH];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        nh_log("readlink /proc/self/exe: %s", strerror(errno));
        return -1;
    }
    exe[n] = '\0';
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        nh_log("socketpair: %s", strerror(errno));
        return -1;
    }
    nh_set_cloexec(sv[0]);
    nh_set_cloexec(sv[1]);
    fflush(stdout);
    fflush(stderr);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(sv[1], 0);
        dup2(sv[1], 1);
        execv(exe, argv);
        _exit(127);
    }
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        nh_log("fork: %s", strerror(errno));
        return -1;
    }
    out->pid = pid;
    out->fd = sv[0];
    return 0;
}

/* Sends one line to the child (printf format; the newline is added). 0 on success. */
static inline int nh_child_send(nh_child *c, const char *fmt, ...)
{
    if (c->fd < 0)
        return -1;
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof buf - 1)
        return -1;
    if (n == 0 || buf[n - 1] != '\n')
        buf[n++] = '\n';
    return nh_write_all(c->fd, buf, (size_t)n, 1);
}

/* Reads the child's next line (without the newline) into buf and c->line, waiting at most
 * timeout_ms. Returns its length, or -1 on timeout or end of output. */
static inline int nh_child_read_line(nh_child *c, char *buf, size_t len, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    for (;;) {
        char *nl = (char *)memchr(c->rbuf, '\n', c->rlen);
        if (nl == NULL && c->rlen == sizeof c->rbuf)
            nl = c->rbuf + c->rlen - 1; /* over-long line: cut it */
        if (nl != NULL) {
            size_t n = (size_t)(nl - c->rbuf);
            size_t keep = n;
            if (keep > 0 && c->rbuf[keep - 1] == '\r')
                keep--;
            snprintf(c->line, sizeof c->line, "%.*s", (int)keep, c->rbuf);
            if (buf && len) {
                size_t k = strlen(c->line) < len ? strlen(c->line) : len - 1;
                memcpy(buf, c->line, k);
                buf[k] = '\0';
            }
            memmove(c->rbuf, nl + 1, c->rlen - n - 1);
            c->rlen -= n + 1;
            return (int)keep;
        }
        if (c->fd < 0 || !nh_poll_in(c->fd, deadline))
            return -1;
        ssize_t r = recv(c->fd, c->rbuf + c->rlen, sizeof c->rbuf - c->rlen, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        c->rlen += (size_t)r;
    }
}

/* Reads the first line of a /proc file into buf (newline cut); "?" when unreadable. */
static inline void nh_proc_line(const char *path, char *buf, size_t len)
{
    snprintf(buf, len, "?");
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    if (fgets(buf, (int)len, f) != NULL)
        buf[strcspn(buf, "\n")] = '\0';
    else
        snprintf(buf, len, "?");
    fclose(f);
}

/* Logs what each thread of a child that stopped answering is doing, from /proc: its
 * name, scheduler state (R running, S sleeping, D in the kernel, T stopped), the kernel
 * function it waits in, and its system call (number and arguments; "running" when in
 * user space). A hang then says whether it is a lock (futex waits everywhere), a spin
 * (R) or a stop (T). */
static inline void nh_child_describe(const nh_child *c)
{
    if (c->pid <= 0)
        return;
    char dir[64];
    snprintf(dir, sizeof dir, "/proc/%d/task", (int)c->pid);
    DIR *d = opendir(dir);
    if (d == NULL) {
        nh_log("child %d: gone (no %s)", (int)c->pid, dir);
        return;
    }
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        char path[400], comm[64], stat[512], wchan[64], sys[128];
        snprintf(path, sizeof path, "%s/%s/comm", dir, e->d_name);
        nh_proc_line(path, comm, sizeof comm);
        snprintf(path, sizeof path, "%s/%s/stat", dir, e->d_name);
        nh_proc_line(path, stat, sizeof stat);
        snprintf(path, sizeof path, "%s/%s/wchan", dir, e->d_name);
        nh_proc_line(path, wchan, sizeof wchan);
        snprintf(path, sizeof path, "%s/%s/syscall", dir, e->d_name);
        nh_proc_line(path, sys, sizeof sys);
        const char *paren = strrchr(stat, ')');
        char state = paren != NULL && paren[1] == ' ' ? paren[2] : '?';
        nh_log("child %d thread %s (%s): state %c, waits in %s, syscall %s", (int)c->pid,
               e->d_name, comm, state, wchan, sys);
    }
    closedir(d);
}

/* Reads lines until one starts with prefix (kept in c->line), within timeout_ms; other
 * lines are echoed to stderr. 0 when found, -1 on timeout or end of output. */
static inline int nh_child_expect(nh_child *c, const char *prefix, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    for (;;) {
        long long left = deadline - nh_now_ms();
        if (nh_child_read_line(c, NULL, 0, (int)(left > 0 ? left : 0)) < 0) {
            nh_log("child %d: no line starting with \"%s\" within %d ms", (int)c->pid, prefix,
                   timeout_ms);
            nh_child_describe(c);
            return -1;
        }
        if (strncmp(c->line, prefix, strlen(prefix)) == 0)
            return 0;
        nh_log("child %d: %s", (int)c->pid, c->line);
    }
}

/* kill -9 the child (nh_child_wait reaps it). */
static inline void nh_child_kill9(nh_child *c)
{
    if (c->pid > 0)
        kill(c->pid, SIGKILL);
}

/* Reaps the child within timeout_ms: its exit code (128 + signal if killed), or -1 if it
 * is still running. Once reaped, returns the same code again. */
static inline int nh_child_wait(nh_child *c, int timeout_ms)
{
    if (c->pid > 0) {
        int st = 0;
        if (!nh_reap(c->pid, timeout_ms, &st))
            return -1;
        c->status = st;
        c->pid = 0;
    }
    return nh_exit_code(c->status);
}

/* Closes our end (the child reads end of input), waits up to timeout_ms for the child to
 * exit, kills it otherwise; returns its exit code (as nh_child_wait). */
static inline int nh_child_close(nh_child *c, int timeout_ms)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    if (c->pid <= 0)
        return nh_exit_code(c->status);
    int code = nh_child_wait(c, timeout_ms);
    if (code < 0) {
        nh_child_kill9(c);
        code = nh_child_wait(c, NH_STOP_TIMEOUT_MS);
    }
    return code;
}

/* In a child: reads one line from the parent (stdin) without its newline; -1 at the end
 * (the parent closed its end or died). */
static inline int nh_node_read_line(char *buf, size_t len)
{
    size_t n = 0;
    while (n + 1 < len) {
        char ch;
        ssize_t r = read(0, &ch, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (n == 0)
                return -1;
            break;
        }
        if (ch == '\n')
            break;
        buf[n++] = ch;
    }
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    buf[n] = '\0';
    return (int)n;
}

/* In a child: sends one line to the parent (printf format; the newline is added), unbuffered.
 * 0 on success. */
static inline int nh_node_reply(const char *fmt, ...)
{
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof buf - 1)
        return -1;
    if (n == 0 || buf[n - 1] != '\n')
        buf[n++] = '\n';
    return nh_write_all(1, buf, (size_t)n, 1);
}

/* ---------------------------------------------------------------- plain NATS client */

typedef struct nh_plain {
    int fd;
    char info[4096];    /* the server's INFO line */
    char err[256];      /* the last -ERR (e.g. "'Authorization Violation'") or local reason */
    char *rbuf;         /* received bytes [rpos, rlen) not yet parsed */
    size_t rpos, rlen, rcap;
    char *wbuf;         /* corked output */
    size_t wlen, wcap;
    int cork;
    unsigned long long msgs; /* MSG/HMSG returned so far */
} nh_plain;

typedef struct nh_msg {
    char subject[256];
    char sid[32];
    char reply[256];
    char *headers;      /* HMSG: the header block "NATS/1.0...\r\n...\r\n\r\n" (NUL-terminated); MSG: NULL */
    size_t headers_len;
    char *payload;      /* NUL-terminated (the payload may hold NULs: use payload_len) */
    size_t payload_len;
    char *mem;          /* storage behind headers and payload, reused by the next read */
    size_t mem_cap;
} nh_msg;

static inline void nh_msg_free(nh_msg *m)
{
    free(m->mem);
    memset(m, 0, sizeof *m);
}

/* The HMSG status code ("NATS/1.0 503" gives 503), 0 if none. */
static inline int nh_msg_status(const nh_msg *m)
{
    int code = 0;
    if (m->headers == NULL || sscanf(m->headers, "NATS/1.0 %d", &code) != 1)
        return 0;
    return code;
}

/* The value of header `name` (case-insensitive) into out; 0 if present, -1 if not. */
static inline int nh_msg_header(const nh_msg *m, const char *name, char *out, size_t len)
{
    if (m->headers == NULL)
        return -1;
    size_t nl = strlen(name);
    const char *p = strstr(m->headers, "\r\n");
    while (p != NULL && p[2] != '\0' && p[2] != '\r') {
        p += 2;
        const char *end = strstr(p, "\r\n");
        if (end == NULL)
            end = p + strlen(p);
        if ((size_t)(end - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (v < end && *v == ' ')
                v++;
            snprintf(out, len, "%.*s", (int)(end - v), v);
            return 0;
        }
        p = *end ? end : NULL;
    }
    return -1;
}

static inline int nh_plain_send_raw(nh_plain *c, const char *data, size_t len)
{
    if (c->fd < 0)
        return -1;
    if (nh_write_all(c->fd, data, len, 1) != 0) {
        snprintf(c->err, sizeof c->err, "send failed: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* Sends what is corked. */
static inline int nh_plain_uncork_send(nh_plain *c)
{
    if (c->wlen == 0)
        return 0;
    int r = nh_plain_send_raw(c, c->wbuf, c->wlen);
    c->wlen = 0;
    return r;
}

/* Sends, or appends to the cork buffer (sent past 64 KiB, on flush and on uncork). */
static inline int nh_plain_out(nh_plain *c, const char *data, size_t len)
{
    if (!c->cork)
        return nh_plain_send_raw(c, data, len);
    if (c->wlen + len > c->wcap) {
        size_t cap = c->wcap ? c->wcap : 65536;
        while (cap < c->wlen + len)
            cap *= 2;
        char *w = (char *)realloc(c->wbuf, cap);
        if (w == NULL)
            return -1;
        c->wbuf = w;
        c->wcap = cap;
    }
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += len;
    return c->wlen >= 65536 ? nh_plain_uncork_send(c) : 0;
}

/* Cork on: publishes are buffered (for throughput); off: what is buffered is sent. */
static inline int nh_plain_cork(nh_plain *c, int on)
{
    c->cork = on;
    return on ? 0 : nh_plain_uncork_send(c);
}

/* Reads more bytes within the deadline: 1 got some, 0 timeout, -1 closed or error. */
static inline int nh_plain_fill(nh_plain *c, long long deadline)
{
    if (c->fd < 0)
        return -1;
    if (c->rpos > 0 && (c->rpos == c->rlen || c->rpos > c->rcap / 2)) {
        memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
        c->rlen -= c->rpos;
        c->rpos = 0;
    }
    if (c->rcap - c->rlen < 65536) {
        size_t cap = c->rcap ? c->rcap * 2 : 131072;
        char *r = (char *)realloc(c->rbuf, cap);
        if (r == NULL)
            return -1;
        c->rbuf = r;
        c->rcap = cap;
    }
    if (!nh_poll_in(c->fd, deadline))
        return 0;
    for (;;) {
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (!c->err[0])
                snprintf(c->err, sizeof c->err, "connection closed by the server");
            return -1;
        }
        c->rlen += (size_t)n;
        return 1;
    }
}

enum { NH_F_MORE, NH_F_INFO, NH_F_MSG, NH_F_HMSG, NH_F_PING, NH_F_PONG, NH_F_OK, NH_F_ERR,
       NH_F_BAD };

/* Parses one protocol frame at c->rbuf + at: its kind (NH_F_MORE if incomplete), its total
 * length in *flen and the control line's length (without CRLF) in *llen. For MSG/HMSG the
 * control line's fields go to m (if not NULL). */
static inline int nh_plain_frame(nh_plain *c, size_t at, size_t *flen, size_t *llen, nh_msg *m)
{
    const char *b = c->rbuf + at;
    size_t n = c->rlen - at;
    const char *nl = (const char *)memchr(b, '\n', n);
    if (nl == NULL)
        return n > 8192 ? NH_F_BAD : NH_F_MORE;
    size_t line = (size_t)(nl - b) + 1;
    size_t ll = line - 1;
    if (ll > 0 && b[ll - 1] == '\r')
        ll--;
    *llen = ll;
    *flen = line;
    if (ll >= 4 && strncasecmp(b, "PING", 4) == 0)
        return NH_F_PING;
    if (ll >= 4 && strncasecmp(b, "PONG", 4) == 0)
        return NH_F_PONG;
    if (ll >= 3 && strncasecmp(b, "+OK", 3) == 0)
        return NH_F_OK;
    if (ll >= 4 && strncasecmp(b, "-ERR", 4) == 0)
        return NH_F_ERR;
    if (ll >= 5 && strncasecmp(b, "INFO ", 5) == 0)
        return NH_F_INFO;
    int hmsg = ll >= 5 && strncasecmp(b, "HMSG ", 5) == 0;
    if (!hmsg && !(ll >= 4 && strncasecmp(b, "MSG ", 4) == 0))
        return NH_F_BAD;
    char ctl[1024];
    if (ll >= sizeof ctl)
        return NH_F_BAD;
    memcpy(ctl, b, ll);
    ctl[ll] = '\0';
    char *tok[7];
    int nt = 0;
    char *save = NULL;
    for (char *t = strtok_r(ctl, " \t", &save); t != NULL && nt < 7; t = strtok_r(NULL, " \t", &save))
        tok[nt++] = t;
    /* MSG subj sid [reply] size | HMSG subj sid [reply] hsize size */
    int base = hmsg ? 5 : 4;
    if (nt != base && nt != base + 1)
        return NH_F_BAD;
    int has_reply = nt == base + 1;
    size_t total = strtoul(tok[nt - 1], NULL, 10);
    size_t hsize = hmsg ? strtoul(tok[nt - 2], NULL, 10) : 0;
    if (hsize > total)
        return NH_F_BAD;
    if (n < line + total + 2)
        return NH_F_MORE;
    *flen = line + total + 2;
    if (m != NULL) {
        snprintf(m->subject, sizeof m->subject, "%s", tok[1]);
        snprintf(m->sid, sizeof m->sid, "%s", tok[2]);
        snprintf(m->reply, sizeof m->reply, "%s", has_reply ? tok[3] : "");
        if (m->mem_cap < total + 2) {
            char *mem = (char *)realloc(m->mem, total + 2);
            if (mem == NULL)
                return NH_F_BAD;
            m->mem = mem;
            m->mem_cap = total + 2;
        }
        const char *data = b + line;
        memcpy(m->mem, data, hsize);
        m->mem[hsize] = '\0';
        memcpy(m->mem + hsize + 1, data + hsize, total - hsize);
        m->mem[total + 1] = '\0';
        m->headers = hmsg ? m->mem : NULL;
        m->headers_len = hsize;
        m->payload = m->mem + hsize + 1;
        m->payload_len = total - hsize;
    }
    return hmsg ? NH_F_HMSG : NH_F_MSG;
}

/* Removes the frame [at, at + len) from the receive buffer. */
static inline void nh_plain_cut(nh_plain *c, size_t at, size_t len)
{
    memmove(c->rbuf + at, c->rbuf + at + len, c->rlen - at - len);
    c->rlen -= len;
}

static inline void nh_plain_close(nh_plain *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    free(c->rbuf);
    free(c->wbuf);
    c->rbuf = c->wbuf = NULL;
    c->rpos = c->rlen = c->rcap = c->wlen = c->wcap = 0;
}

/* Handles frames other than messages at `at` (PING answered, INFO kept, -ERR recorded).
 * Returns the frame kind; a handled frame is removed from the buffer. */
static inline int nh_plain_control(nh_plain *c, size_t at, int kind, size_t flen, size_t llen)
{
    const char *b = c->rbuf + at;
    if (kind == NH_F_PING) {
        nh_plain_cut(c, at, flen);
        nh_plain_out(c, "PONG\r\n", 6);
        if (c->cork)
            nh_plain_uncork_send(c);
    } else if (kind == NH_F_INFO) {
        snprintf(c->info, sizeof c->info, "%.*s", (int)llen, b);
        nh_plain_cut(c, at, flen);
    } else if (kind == NH_F_ERR) {
        const char *e = b + 4;
        while (*e == ' ' && e < b + llen)
            e++;
        snprintf(c->err, sizeof c->err, "%.*s", (int)(llen - (size_t)(e - b)), e);
        nh_plain_cut(c, at, flen);
    } else if (kind == NH_F_OK || kind == NH_F_PONG) {
        nh_plain_cut(c, at, flen);
    }
    return kind;
}

/* Sends PING and waits for its PONG (so everything sent before was processed by the
 * server); messages arriving meanwhile stay queued for nh_plain_next_msg. 0 on PONG, -1 on
 * timeout, -2 on -ERR or a closed connection (c->err tells). */
static inline int nh_plain_flush(nh_plain *c, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    if (nh_plain_out(c, "PING\r\n", 6) != 0 || nh_plain_uncork_send(c) != 0)
        return -2;
    size_t at = c->rpos;
    for (;;) {
        size_t flen = 0, llen = 0;
        int kind = at < c->rlen ? nh_plain_frame(c, at, &flen, &llen, NULL) : NH_F_MORE;
        if (kind == NH_F_MORE) {
            size_t rel = at - c->rpos; /* nh_plain_fill may move the buffer's contents */
            int r = nh_plain_fill(c, deadline);
            at = c->rpos + rel;
            if (r == 0) {
                snprintf(c->err, sizeof c->err, "no PONG within %d ms", timeout_ms);
                return -1;
            }
            if (r < 0)
                return -2;
            continue;
        }
        if (kind == NH_F_BAD) {
            snprintf(c->err, sizeof c->err, "protocol error");
            return -2;
        }
        if (kind == NH_F_MSG || kind == NH_F_HMSG) {
            at += flen;
            continue;
        }
        nh_plain_control(c, at, kind, flen, llen);
        if (kind == NH_F_PONG)
            return 0;
        if (kind == NH_F_ERR)
            return -2;
    }
}

/* Connects to 127.0.0.1:port as a plain (non-TLS) client: reads INFO, sends CONNECT (with
 * user/password or token when not NULL; headers on), then PING, and waits for the PONG that
 * proves the server accepted us. 0 on success; -1 with c->err set (the server's -ERR, e.g.
 * "'Authorization Violation'", or a local reason). Close with nh_plain_close either way. */
static inline int nh_plain_connect_auth(nh_plain *c, int port, const char *user,
                                        const char *password, const char *token, int timeout_ms)
{
    memset(c, 0, sizeof *c);
    c->fd = nh_tcp_connect(port, timeout_ms);
    if (c->fd < 0) {
        snprintf(c->err, sizeof c->err, "cannot connect to 127.0.0.1:%d", port);
        return -1;
    }
    if (nh_read_line_fd(c->fd, c->info, sizeof c->info, timeout_ms) < 5 ||
        strncmp(c->info, "INFO ", 5) != 0) {
        snprintf(c->err, sizeof c->err, "no INFO from 127.0.0.1:%d", port);
        return -1;
    }
    if (strstr(c->info, "\"tls_required\":true") != NULL) {
        snprintf(c->err, sizeof c->err, "the server requires TLS (the plain client has none)");
        return -1;
    }
    if (!nh_safe_conf_string(user, 128) || !nh_safe_conf_string(password, 128) ||
        !nh_safe_conf_string(token, 256)) {
        snprintf(c->err, sizeof c->err, "credentials with quotes or backslashes");
        return -1;
    }
    char cred[512] = "";
    if (user != NULL)
        snprintf(cred, sizeof cred, ",\"user\":\"%s\",\"pass\":\"%s\"", user,
                 password ? password : "");
    else if (token != NULL)
        snprintf(cred, sizeof cred, ",\"auth_token\":\"%s\"", token);
    char connect[1024];
    int n = snprintf(connect, sizeof connect,
                     "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,"
                     "\"no_responders\":true,\"protocol\":1,\"name\":\"nh_plain\"%s}\r\n",
                     cred);
    if (n < 0 || (size_t)n >= sizeof connect || nh_plain_send_raw(c, connect, (size_t)n) != 0)
        return -1;
    if (nh_plain_flush(c, timeout_ms) != 0) {
        if (!c->err[0])
            snprintf(c->err, sizeof c->err, "no answer to CONNECT");
        return -1;
    }
    return 0;
}

/* nh_plain_connect_auth with s's port and credentials. */
static inline int nh_plain_connect(nh_plain *c, const nh_server *s, int timeout_ms)
{
    return nh_plain_connect_auth(c, s->port, s->opts.user, s->opts.password, s->opts.token,
                                 timeout_ms);
}

/* SUB subject [queue] sid (queue may be NULL). */
static inline int nh_plain_sub(nh_plain *c, const char *subject, const char *queue, int sid)
{
    char buf[640];
    int n = snprintf(buf, sizeof buf, "SUB %s %s%s%d\r\n", subject, queue ? queue : "",
                     queue ? " " : "", sid);
    if (n < 0 || (size_t)n >= sizeof buf)
        return -1;
    return nh_plain_out(c, buf, (size_t)n);
}

static inline int nh_plain_unsub(nh_plain *c, int sid)
{
    char buf[64];
    int n = snprintf(buf, sizeof buf, "UNSUB %d\r\n", sid);
    return nh_plain_out(c, buf, (size_t)n);
}

/* HPUB if headers is not NULL: header lines "Name: value\r\n..." (the "NATS/1.0" line and
 * the blank line are added). reply may be NULL. */
static inline int nh_plain_hpub(nh_plain *c, const char *subject, const char *reply,
                                const char *headers, const void *data, size_t len)
{
    char ctl[640];
    size_t hlen = headers ? strlen("NATS/1.0\r\n") + strlen(headers) + 2 : 0;
    int n;
    if (headers)
        n = snprintf(ctl, sizeof ctl, "HPUB %s %s%s%zu %zu\r\nNATS/1.0\r\n", subject,
                     reply ? reply : "", reply ? " " : "", hlen, hlen + len);
    else
        n = snprintf(ctl, sizeof ctl, "PUB %s %s%s%zu\r\n", subject, reply ? reply : "",
                     reply ? " " : "", len);
    if (n < 0 || (size_t)n >= sizeof ctl)
        return -1;
    int was_corked = c->cork;
    c->cork = 1; /* one write for the whole frame */
    int r = nh_plain_out(c, ctl, (size_t)n);
    if (r == 0 && headers)
        r = nh_plain_out(c, headers, strlen(headers));
    if (r == 0 && headers)
        r = nh_plain_out(c, "\r\n", 2);
    if (r == 0 && len)
        r = nh_plain_out(c, (const char *)data, len);
    if (r == 0)
        r = nh_plain_out(c, "\r\n", 2);
    c->cork = was_corked;
    if (r == 0 && !was_corked)
        r = nh_plain_uncork_send(c);
    return r;
}

/* PUB subject [reply] with a payload. */
static inline int nh_plain_pub(nh_plain *c, const char *subject, const char *reply,
                               const void *data, size_t len)
{
    return nh_plain_hpub(c, subject, reply, NULL, data, len);
}

/* Reads the next MSG or HMSG into m (reused between calls; nh_msg_free at the end), within
 * timeout_ms, answering the server's PINGs meanwhile. 0 on a message, -1 on timeout, -2 on
 * -ERR or a closed connection (c->err tells). */
static inline int nh_plain_next_msg(nh_plain *c, nh_msg *m, int timeout_ms)
{
    long long deadline = nh_now_ms() + timeout_ms;
    if (c->cork && nh_plain_uncork_send(c) != 0)
        return -2;
    for (;;) {
        size_t flen = 0, llen = 0;
        int kind = c->rpos < c->rlen ? nh_plain_frame(c, c->rpos, &flen, &llen, m) : NH_F_MORE;
        if (kind == NH_F_MORE) {
            int r = nh_plain_fill(c, deadline);
            if (r == 0)
                return -1;
            if (r < 0)
                return -2;
            continue;
        }
        if (kind == NH_F_BAD) {
            snprintf(c->err, sizeof c->err, "protocol error");
            return -2;
        }
        if (kind == NH_F_MSG || kind == NH_F_HMSG) {
            c->rpos += flen;
            c->msgs++;
            return 0;
        }
        nh_plain_control(c, c->rpos, kind, flen, llen);
        if (kind == NH_F_ERR)
            return -2;
    }
}

#endif /* SB_NATS_HARNESS_H */
