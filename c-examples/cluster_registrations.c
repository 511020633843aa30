/*
 * cluster_registrations.c - the registration directory of a PBX cluster.
 *
 * Every PBX node keeps, in a shared cache, which endpoint is registered where. Each node
 * publishes registration snapshots of its own endpoints; any node answers "where is
 * alice registered?" from its own memory, without asking the others. When a node dies,
 * its registrations vanish everywhere; when it comes back, they return.
 *
 * Run without arguments (make cluster-demo): it starts a local nats-server (the binary
 * in $SB_NATS_SERVER) on a free loopback port, three node processes (this program run
 * again as "node NAME EID URL"), and walks through the story, printing what happens.
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <switchboard.h>

/* ------------------------------------------------------------------ the node */

/* One registration: what a PBX knows about an endpoint it serves. */
struct registration {
    char endpoint[32];
    char contact[64];
    char node[16];
};

static sb_message_type *registration_type;

/* Wire codec: the struct is plain bytes already (fixed sizes, NUL-padded). */
static char *registration_encode(const sb_message *msg, size_t *len)
{
    char *b = malloc(sizeof(struct registration));
    if (b == NULL)
        return NULL;
    memcpy(b, sb_message_data(msg), sizeof(struct registration));
    *len = sizeof(struct registration);
    return b;
}

static void *registration_decode(const void *bytes, size_t len, sb_data_dtor *dtor)
{
    if (len != sizeof(struct registration))
        return NULL; /* not ours: dropped and counted */
    struct registration *r = malloc(sizeof *r);
    if (r == NULL)
        return NULL;
    memcpy(r, bytes, sizeof *r);
    r->endpoint[sizeof r->endpoint - 1] = r->contact[sizeof r->contact - 1] =
        r->node[sizeof r->node - 1] = '\0';
    *dtor = free;
    return r;
}

/* The cache's id of a snapshot: the endpoint name. */
static const char *registration_id(sb_message *msg)
{
    if (sb_message_get_type(msg) != registration_type)
        return NULL;
    return ((const struct registration *)sb_message_data(msg))->endpoint;
}

static const char *self_name;

static void on_node_event(void *data, sb_subscription *sub, sb_message *msg)
{
    (void)data;
    (void)sub;
    if (sb_message_get_type(msg) != sb_cluster_node_type())
        return;
    const sb_cluster_node *n = sb_message_data(msg);
    if (strcmp(n->name, self_name) == 0)
        return;
    const char *what = n->state == SB_NODE_UP     ? "is up"
                       : n->state == SB_NODE_DOWN ? "is DOWN (missed its heartbeats)"
                                                  : "left the cluster";
    printf("  [%s] node %s %s\n", self_name, n->name, what);
    fflush(stdout);
}

static void register_endpoint(sb_topic *topic, const char *endpoint, int port)
{
    struct registration *r = calloc(1, sizeof *r);
    snprintf(r->endpoint, sizeof r->endpoint, "%s", endpoint);
    snprintf(r->contact, sizeof r->contact, "sip:%s@127.0.0.1:%d", endpoint, port);
    snprintf(r->node, sizeof r->node, "%s", self_name);
    sb_message *m = sb_message_create(registration_type, r, free);
    sb_publish(topic, m);
    sb_message_unref(m);
}

static int node_main(const char *name, const char *eid_text, const char *url, char **endpoints,
                     int nendpoints)
{
    self_name = name;
    sb_eid eid;
    if (sb_eid_from_str(eid_text, &eid) != SB_OK || sb_eid_set_default(&eid) != SB_OK)
        return 1;
    if (sb_message_type_create("registration", NULL, &registration_type) != SB_OK)
        return 1;
    sb_message_type_set_codec(registration_type, registration_encode, registration_decode);

    sb_cluster_config *cfg = sb_cluster_config_new();
    sb_cluster_config_set(cfg, "servers", url);
    sb_cluster_config_set(cfg, "node_name", name);
    sb_cluster_config_set(cfg, "prefix", "pbxdemo");
    sb_cluster_config_set(cfg, "heartbeat_ms", "250"); /* quick for the demo */
    sb_cluster *cluster = sb_cluster_join(cfg);
    sb_cluster_config_free(cfg);
    if (cluster == NULL) {
        fprintf(stderr, "[%s] cannot join: %s\n", name, sb_last_error());
        return 1;
    }
    sb_subscription *events = sb_subscribe(sb_cluster_topic(cluster), on_node_event, NULL);

    sb_topic *registrations = sb_topic_create("registrations");
    sb_cache *cache = sb_cache_create(registration_id);
    sb_caching_topic *ct = sb_caching_topic_create(registrations, cache);
    for (int i = 0; i < nendpoints; i++)
        register_endpoint(registrations, endpoints[i], 5060 + i);
    if (sb_cluster_share_cache(cluster, ct) != SB_OK)
        fprintf(stderr, "[%s] share_cache: %s\n", name, sb_last_error());
    printf("  [%s] joined; registered", name);
    for (int i = 0; i < nendpoints; i++)
        printf(" %s", endpoints[i]);
    printf("\n");
    fflush(stdout);

    /* Commands from the demo driver, one per line on stdin. */
    char line[256];
    while (fgets(line, sizeof line, stdin) != NULL) {
        char who[64];
        if (sscanf(line, "where %63s", who) == 1) {
            /* every node's snapshot of this endpoint (ours or another node's) */
            sb_message_list *where = sb_cache_get_all(cache, registration_type, who);
            if (sb_message_list_len(where) > 0) {
                const struct registration *r = sb_message_data(sb_message_list_get(where, 0));
                printf("  [%s] %s is registered on %s (contact %s)\n", name, who, r->node,
                       r->contact);
            } else {
                printf("  [%s] %s is not registered anywhere\n", name, who);
            }
            sb_message_list_free(where);
        } else if (strncmp(line, "list", 4) == 0) {
            sb_message_list *all = sb_cache_dump_all(cache, registration_type);
            printf("  [%s] %zu registrations known:", name, sb_message_list_len(all));
            for (size_t i = 0; i < sb_message_list_len(all); i++) {
                const struct registration *r = sb_message_data(sb_message_list_get(all, i));
                printf(" %s@%s", r->endpoint, r->node);
            }
            printf("\n");
            sb_message_list_free(all);
        }
        if (strncmp(line, "count", 5) == 0) {
            sb_message_list *all = sb_cache_dump_all(cache, registration_type);
            printf("count %zu\n", sb_message_list_len(all));
            sb_message_list_free(all);
        } else {
            printf(".\n"); /* end of the answer */
        }
        fflush(stdout);
    }
    /* stdin closed: leave cleanly (others clear our registrations at once) */
    cluster = sb_cluster_leave(cluster);
    events = sb_unsubscribe_and_join(events);
    ct = sb_caching_unsubscribe_and_join(ct);
    sb_cache_unref(cache);
    sb_topic_unref(registrations);
    return 0;
}

/* ------------------------------------------------------------------ the driver */

struct node {
    const char *name, *eid;
    char *endpoints[3];
    pid_t pid;
    FILE *to;   /* its stdin */
    FILE *from; /* its stdout */
};

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) != 0)
        return -1;
    close(fd);
    return ntohs(sa.sin_port);
}

/* Waits until something accepts connections on the loopback port. */
static int wait_listening(int port, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {0};
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sa.sin_port = htons((unsigned short)port);
        int ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
        if (fd >= 0)
            close(fd);
        if (ok)
            return 0;
        sleep_ms(50);
    }
    return -1;
}

static pid_t spawn(char *const argv[], FILE **to, FILE **from)
{
    int in[2], out[2];
    if (pipe(in) != 0 || pipe(out) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[1]);
        close(out[0]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    /* Our ends must not leak into nodes started later: a node sees the end of its input
     * (and leaves) only once every copy of the writing end is closed. */
    fcntl(in[1], F_SETFD, FD_CLOEXEC);
    fcntl(out[0], F_SETFD, FD_CLOEXEC);
    *to = fdopen(in[1], "w");
    *from = fdopen(out[0], "r");
    return pid;
}

static void start_node(const char *self, struct node *n, const char *url)
{
    char *argv[] = {(char *)self, "node", (char *)n->name, (char *)n->eid, (char *)url,
                    n->endpoints[0], n->endpoints[1], n->endpoints[2], NULL};
    n->pid = spawn(argv, &n->to, &n->from);
}

/* Sends a command and echoes the node's output up to the end of its answer ("."). */
static void ask(struct node *n, const char *cmd)
{
    printf("> %s: %s\n", n->name, cmd);
    fprintf(n->to, "%s\n", cmd);
    fflush(n->to);
    char line[512];
    while (fgets(line, sizeof line, n->from) != NULL && strcmp(line, ".\n") != 0)
        fputs(line, stdout);
    fflush(stdout);
}

/* The number of registrations a node knows. */
static int count(struct node *n)
{
    fprintf(n->to, "count\n");
    fflush(n->to);
    char line[512];
    while (fgets(line, sizeof line, n->from) != NULL) {
        if (strncmp(line, "count ", 6) == 0)
            return atoi(line + 6);
        fputs(line, stdout); /* node events printed meanwhile */
    }
    return -1;
}

static int wait_count(struct node *n, int want, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        if (count(n) == want)
            return 0;
        sleep_ms(50);
    }
    return -1;
}

/* Reads the node's lines until its "joined" line. */
static void wait_joined(struct node *n)
{
    char line[512];
    while (fgets(line, sizeof line, n->from) != NULL) {
        fputs(line, stdout);
        if (strstr(line, "joined") != NULL)
            break;
    }
}

int main(int argc, char **argv)
{
    if (argc >= 5 && strcmp(argv[1], "node") == 0)
        return node_main(argv[2], argv[3], argv[4], argv + 5, argc - 5);

    const char *server = getenv("SB_NATS_SERVER");
    if (server == NULL || access(server, X_OK) != 0) {
        fprintf(stderr, "set SB_NATS_SERVER to a nats-server binary (make cluster-demo does)\n");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int port = free_port();
    char url[64], portarg[16], store[] = "/tmp/sb-demo-XXXXXX";
    snprintf(url, sizeof url, "nats://127.0.0.1:%d", port);
    snprintf(portarg, sizeof portarg, "%d", port);
    if (mkdtemp(store) == NULL)
        return 1;
    printf("== Starting a NATS server on %s (JetStream store in %s)\n", url, store);
    char *sargv[] = {(char *)server, "-a", "127.0.0.1", "-p", portarg, "-js", "-sd", store, NULL};
    pid_t srv = fork();
    if (srv == 0) {
        if (freopen("/dev/null", "w", stdout) == NULL || freopen("/dev/null", "w", stderr) == NULL)
            _exit(127);
        execv(server, sargv);
        _exit(127);
    }
    if (wait_listening(port, 10000) != 0) {
        fprintf(stderr, "the NATS server did not start\n");
        kill(srv, SIGKILL);
        return 1;
    }

    struct node nodes[3] = {
        {"pbx-1", "02:00:00:00:00:01", {"alice", "bob", NULL}, 0, NULL, NULL},
        {"pbx-2", "02:00:00:00:00:02", {"carol", "dave", NULL}, 0, NULL, NULL},
        {"pbx-3", "02:00:00:00:00:03", {"erin", "frank", NULL}, 0, NULL, NULL},
    };
    printf("== Starting three PBX nodes; each registers its own endpoints\n");
    for (int i = 0; i < 3; i++) {
        start_node(argv[0], &nodes[i], url);
        wait_joined(&nodes[i]);
    }
    int rc = 0;
    rc |= wait_count(&nodes[0], 6, 10000);
    printf("== Any node answers from its own cache\n");
    ask(&nodes[0], "where carol");
    ask(&nodes[2], "where alice");
    ask(&nodes[1], "list");

    printf("== kill -9 pbx-2: its registrations vanish everywhere once it misses its heartbeats\n");
    kill(nodes[1].pid, SIGKILL);
    waitpid(nodes[1].pid, NULL, 0);
    fclose(nodes[1].to);
    fclose(nodes[1].from);
    rc |= wait_count(&nodes[0], 4, 10000);
    rc |= wait_count(&nodes[2], 4, 10000);
    ask(&nodes[0], "where carol");
    ask(&nodes[2], "list");

    printf("== pbx-2 comes back: its registrations return\n");
    start_node(argv[0], &nodes[1], url);
    wait_joined(&nodes[1]);
    rc |= wait_count(&nodes[0], 6, 10000);
    rc |= wait_count(&nodes[2], 6, 10000);
    ask(&nodes[0], "where carol");
    ask(&nodes[2], "list");

    printf("== pbx-3 leaves cleanly: the others drop its registrations at once\n");
    fclose(nodes[2].to);
    waitpid(nodes[2].pid, NULL, 0);
    fclose(nodes[2].from);
    rc |= wait_count(&nodes[0], 4, 10000);
    ask(&nodes[0], "where erin");

    for (int i = 0; i < 2; i++) {
        fclose(nodes[i].to);
        waitpid(nodes[i].pid, NULL, 0);
        fclose(nodes[i].from);
    }
    kill(srv, SIGTERM);
    waitpid(srv, NULL, 0);
    char rm[128];
    snprintf(rm, sizeof rm, "rm -rf %s", store);
    if (system(rm) != 0)
        fprintf(stderr, "could not remove %s\n", store);
    printf(rc == 0 ? "== Done: every node saw the same directory at each step\n"
                   : "== FAILED: a node's directory did not converge in time\n");
    return rc == 0 ? 0 : 1;
}
