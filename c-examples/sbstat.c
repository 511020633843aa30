/*
 * sbstat.c - the bus's figures for operators: a Prometheus endpoint and a top-like table.
 *
 * Runs a small PBX-style workload (endpoint state changes published through a topic
 * pool into endpoint:all, a caching topic over it, a router following the cache's
 * updates and a pool subscriber on endpoint:all), serves sb_stats_prometheus() on
 * http://127.0.0.1:PORT/metrics, and prints every few seconds the busiest topics and
 * subscriptions.
 *
 *     sbstat [-p PORT] [-n MESSAGES] [-i SECONDS] [-r REQUESTS]
 *
 * -p 0 picks a free port (printed). -n: messages to publish (0: one every millisecond,
 * until stopped). -r: exit after serving that many requests (0: never).
 *
 * A PBX module can take the two parts it needs as they are:
 *   sbstat_serve_start / sbstat_serve_stop   the /metrics endpoint (one thread; loopback)
 *   sbstat_top                               the table, from two Prometheus texts
 * The table reads the Prometheus text rather than the JSON: one line per figure, so a few
 * lines of C parse it.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <switchboard.h>

#include "endpoint.h"

/* ---- The /metrics endpoint ------------------------------------------------------- */

struct sbstat_server {
	int fd;
	int port;           /* the port it listens on (the chosen one when asked for 0) */
	int max_requests;   /* stop after that many (0: never) */
	atomic_int served;
	pthread_t thread;
};

static void sbstat_send_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w <= 0) {
			if (w < 0 && errno == EINTR)
				continue;
			return;
		}
		p += w;
		n -= (size_t)w;
	}
}

/* Answers one connection: GET /metrics gets the bus's figures, anything else a 404. */
static void sbstat_answer(int c)
{
	char req[2048];
	size_t got = 0;
	req[0] = '\0';
	while (got < sizeof req - 1 && !strstr(req, "\r\n\r\n")) {
		ssize_t r = recv(c, req + got, sizeof req - 1 - got, 0);
		if (r <= 0)
			break;
		got += (size_t)r;
		req[got] = '\0';
	}
	req[got] = '\0';
	char head[256];
	if (strncmp(req, "GET /metrics ", 13) == 0 || strncmp(req, "GET /metrics?", 13) == 0) {
		char *body = sb_stats_prometheus(); /* ours: freed below */
		if (body == NULL) {
			const char *e = "HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
			sbstat_send_all(c, e, strlen(e));
			return;
		}
		size_t n = strlen(body);
		int h = snprintf(head, sizeof head,
				 "HTTP/1.0 200 OK\r\n"
				 "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
				 "Content-Length: %zu\r\n\r\n", n);
		sbstat_send_all(c, head, (size_t)h);
		sbstat_send_all(c, body, n);
		sb_string_free(body);
	} else {
		const char *e = "HTTP/1.0 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n";
		sbstat_send_all(c, e, strlen(e));
	}
}

static void *sbstat_serve_loop(void *arg)
{
	struct sbstat_server *s = arg;
	while (s->max_requests == 0 || atomic_load(&s->served) < s->max_requests) {
		int c = accept(s->fd, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			break; /* sbstat_serve_stop shut the socket down */
		}
		sbstat_answer(c);
		close(c);
		atomic_fetch_add(&s->served, 1);
	}
	return NULL;
}

/* Listens on 127.0.0.1:port (0: a free port, then in s->port) and serves on a thread of
 * its own. 0 on success, -1 with errno. */
static int sbstat_serve_start(struct sbstat_server *s, int port, int max_requests)
{
	memset(s, 0, sizeof *s);
	s->max_requests = max_requests;
	s->fd = socket(AF_INET, SOCK_STREAM, 0);
	if (s->fd < 0)
		return -1;
	int one = 1;
	setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* never exposed beyond the host */
	a.sin_port = htons((uint16_t)port);
	socklen_t len = sizeof a;
	if (bind(s->fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(s->fd, 16) != 0 ||
	    getsockname(s->fd, (struct sockaddr *)&a, &len) != 0) {
		close(s->fd);
		return -1;
	}
	s->port = ntohs(a.sin_port);
	if (pthread_create(&s->thread, NULL, sbstat_serve_loop, s) != 0) {
		close(s->fd);
		return -1;
	}
	return 0;
}

/* Stops serving (a request being answered is finished first) and joins the thread. */
static void sbstat_serve_stop(struct sbstat_server *s)
{
	shutdown(s->fd, SHUT_RDWR); /* wakes the accept */
	pthread_join(s->thread, NULL);
	close(s->fd);
}

/* ---- The table ------------------------------------------------------------------- */

struct sbstat_row {
	char name[192];
	double value;
	double rate;
};

/* Reads the samples of `metric` from a Prometheus text: one row per sample, named by
 * its `label` (first in the sample's labels); returns the number read (at most max). */
static int sbstat_parse(const char *text, const char *metric, const char *label,
			struct sbstat_row *rows, int max)
{
	char prefix[128], key[64];
	snprintf(prefix, sizeof prefix, "switchboard_%s{", metric);
	snprintf(key, sizeof key, "%s=\"", label);
	int n = 0;
	for (const char *line = text; line != NULL && *line != '\0' && n < max;) {
		const char *end = strchr(line, '\n');
		if (strncmp(line, prefix, strlen(prefix)) == 0) {
			const char *v = strstr(line, key);
			const char *close = strstr(line, "} ");
			if (v != NULL && close != NULL && (end == NULL || close < end)) {
				v += strlen(key);
				size_t k = 0;
				while (*v != '\0' && *v != '"' && k < sizeof rows[n].name - 1) {
					if (*v == '\\' && v[1] != '\0')
						v++; /* \" \\ \n: the escaped character */
					rows[n].name[k++] = *v++;
				}
				rows[n].name[k] = '\0';
				rows[n].value = strtod(close + 2, NULL);
				rows[n].rate = 0;
				n++;
			}
		}
		line = end ? end + 1 : NULL;
	}
	return n;
}

static int sbstat_by_rate(const void *a, const void *b)
{
	const struct sbstat_row *x = a, *y = b;
	if (x->rate != y->rate)
		return x->rate < y->rate ? 1 : -1;
	return x->value < y->value ? 1 : (x->value > y->value ? -1 : 0);
}

/* Rates of `cur` against `prev` (NULL: since the start) over `seconds`, busiest first. */
static int sbstat_rank(const char *prev, const char *cur, const char *metric, const char *label,
		       double seconds, struct sbstat_row *rows, int max)
{
	int n = sbstat_parse(cur, metric, label, rows, max);
	struct sbstat_row *old = calloc((size_t)max, sizeof *old);
	int m = (prev != NULL && old != NULL) ? sbstat_parse(prev, metric, label, old, max) : 0;
	for (int i = 0; i < n; i++) {
		double before = 0;
		for (int j = 0; j < m; j++)
			if (strcmp(old[j].name, rows[i].name) == 0)
				before = old[j].value;
		rows[i].rate = seconds > 0 ? (rows[i].value - before) / seconds : 0;
	}
	free(old);
	qsort(rows, (size_t)n, sizeof *rows, sbstat_by_rate);
	return n;
}

/* Looks up one sample of `metric` whose `label` is `name`; 0 if none. */
static double sbstat_value(const char *text, const char *metric, const char *label,
			   const char *name)
{
	static struct sbstat_row rows[4096];
	int n = sbstat_parse(text, metric, label, rows, 4096);
	for (int i = 0; i < n; i++)
		if (strcmp(rows[i].name, name) == 0)
			return rows[i].value;
	return 0;
}

/* Prints the `top` busiest topics and subscriptions of `cur` (rates against `prev`,
 * taken `seconds` before; NULL: totals only). */
static void sbstat_top(FILE *out, const char *prev, const char *cur, double seconds, int top)
{
	enum { MAX = 4096 };
	struct sbstat_row *rows = calloc(MAX, sizeof *rows);
	if (rows == NULL)
		return;
	int n = sbstat_rank(prev, cur, "topic_published_total", "topic", seconds, rows, MAX);
	fprintf(out, "%-44s %12s %10s\n", "TOPIC", "PUBLISHED", "MSG/S");
	for (int i = 0; i < n && i < top; i++)
		fprintf(out, "%-44s %12.0f %10.1f\n", rows[i].name, rows[i].value, rows[i].rate);
	n = sbstat_rank(prev, cur, "subscription_delivered_total", "subscription", seconds, rows,
			MAX);
	fprintf(out, "%-44s %12s %10s %8s %10s\n", "SUBSCRIPTION", "DELIVERED", "MSG/S", "QUEUED",
		"CB_MAX_US");
	for (int i = 0; i < n && i < top; i++)
		fprintf(out, "%-44s %12.0f %10.1f %8.0f %10.1f\n", rows[i].name, rows[i].value,
			rows[i].rate,
			sbstat_value(cur, "subscription_queued", "subscription", rows[i].name),
			sbstat_value(cur, "subscription_callback_max_nanoseconds", "subscription",
				     rows[i].name) / 1000.0);
	fprintf(out, "alerts: %d\n", sb_alert_count());
	free(rows);
}

/* ---- The PBX-style workload ------------------------------------------------------ */

#define SBSTAT_ENDPOINTS 4
static const char *sbstat_endpoint_names[SBSTAT_ENDPOINTS] = {
	"PJSIP/alice", "PJSIP/bob", "PJSIP/carol", "PJSIP/dave"};

struct sbstat_demo {
	sb_message_type *state_type;
	sb_topic *all;
	sb_topic_pool *pool;
	sb_topic *endpoints[SBSTAT_ENDPOINTS];
	sb_cache *cache;
	sb_caching_topic *ct;
	sb_router *router;
	sb_subscription *presence;
	atomic_long updates;
	long published;
};

static sb_message_type *sbstat_state_type;

static const char *sbstat_endpoint_id(sb_message *msg)
{
	if (sb_message_get_type(msg) != sbstat_state_type)
		return NULL;
	return ((const struct endpoint_state *)sb_message_data(msg))->name;
}

static void sbstat_on_update(void *data, sb_subscription *sub, sb_message *msg)
{
	(void)sub; (void)msg;
	atomic_fetch_add(&((struct sbstat_demo *)data)->updates, 1);
}

static void sbstat_on_presence(void *data, sb_subscription *sub, sb_message *msg)
{
	(void)data; (void)sub; (void)msg;
}

static int sbstat_demo_start(struct sbstat_demo *d)
{
	memset(d, 0, sizeof *d);
	if (sb_message_type_create(ENDPOINT_STATE_TYPE, NULL, &d->state_type) != SB_OK)
		return -1;
	sbstat_state_type = d->state_type;
	d->all = sb_topic_create(ENDPOINT_ALL_TOPIC);
	d->pool = d->all ? sb_topic_pool_create(d->all) : NULL;
	d->cache = sb_cache_create(sbstat_endpoint_id);
	d->ct = (d->all && d->cache) ? sb_caching_topic_create(d->all, d->cache) : NULL;
	if (d->pool == NULL || d->ct == NULL)
		return -1;
	for (int i = 0; i < SBSTAT_ENDPOINTS; i++)
		if (!(d->endpoints[i] = sb_topic_pool_get_topic(d->pool, sbstat_endpoint_names[i])))
			return -1;
	d->router = sb_router_create(sb_caching_get_topic(d->ct));
	if (d->router == NULL ||
	    sb_router_add_cache_update(d->router, d->state_type, sbstat_on_update, d) != SB_OK)
		return -1;
	d->presence = sb_subscribe_pool(d->all, sbstat_on_presence, d);
	return d->presence ? 0 : -1;
}

/* Publishes `count` state changes, round robin over the endpoints. */
static void sbstat_demo_publish(struct sbstat_demo *d, long count)
{
	for (long i = 0; i < count; i++, d->published++) {
		int e = (int)(d->published % SBSTAT_ENDPOINTS);
		struct endpoint_state *st = malloc(sizeof *st);
		if (st == NULL)
			return;
		snprintf(st->name, sizeof st->name, "%s", sbstat_endpoint_names[e]);
		st->online = (int)((d->published / SBSTAT_ENDPOINTS) % 2);
		sb_message *m = sb_message_create(d->state_type, st, free);
		if (m == NULL) {
			free(st);
			return;
		}
		sb_publish(d->endpoints[e], m);
		sb_message_unref(m);
	}
}

static void sbstat_demo_stop(struct sbstat_demo *d)
{
	d->presence = sb_unsubscribe_and_join(d->presence);
	d->router = sb_router_unsubscribe_and_join(d->router);
	d->ct = sb_caching_unsubscribe_and_join(d->ct);
	for (int i = 0; i < SBSTAT_ENDPOINTS; i++)
		sb_topic_unref(d->endpoints[i]);
	sb_topic_pool_unref(d->pool);
	sb_cache_unref(d->cache);
	sb_topic_unref(d->all);
	sb_message_type_unref(d->state_type);
}

#ifndef SBSTAT_NO_MAIN
static double sbstat_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	int port = 9184, requests = 0;
	long messages = 0;
	double interval = 2;
	int opt;
	while ((opt = getopt(argc, argv, "p:n:i:r:")) != -1) {
		switch (opt) {
		case 'p': port = atoi(optarg); break;
		case 'n': messages = atol(optarg); break;
		case 'i': interval = atof(optarg); break;
		case 'r': requests = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-p PORT] [-n MESSAGES] [-i SECONDS] [-r REQUESTS]\n",
				argv[0]);
			return 2;
		}
	}
	struct sbstat_demo demo;
	if (sbstat_demo_start(&demo) != 0) {
		fprintf(stderr, "sbstat: cannot start the workload: %s\n", sb_last_error());
		return 1;
	}
	struct sbstat_server server;
	if (sbstat_serve_start(&server, port, requests) != 0) {
		perror("sbstat: cannot listen");
		return 1;
	}
	printf("serving http://127.0.0.1:%d/metrics\n", server.port);
	fflush(stdout);
	if (messages > 0)
		sbstat_demo_publish(&demo, messages);
	char *prev = NULL;
	double prev_t = sbstat_now(), next = prev_t + interval;
	while (requests == 0 || atomic_load(&server.served) < requests) {
		if (messages == 0)
			sbstat_demo_publish(&demo, 1);
		struct timespec ms = {0, 1000000};
		nanosleep(&ms, NULL);
		double t = sbstat_now();
		if (t < next)
			continue;
		char *cur = sb_stats_prometheus();
		if (cur == NULL)
			continue;
		printf("\n");
		sbstat_top(stdout, prev, cur, t - prev_t, 5);
		fflush(stdout);
		sb_string_free(prev);
		prev = cur;
		prev_t = t;
		next = t + interval;
	}
	char *cur = sb_stats_prometheus();
	printf("\n");
	sbstat_top(stdout, prev, cur, sbstat_now() - prev_t, 5);
	sb_string_free(cur);
	sb_string_free(prev);
	sbstat_serve_stop(&server);
	sbstat_demo_stop(&demo);
	return 0;
}
#endif
