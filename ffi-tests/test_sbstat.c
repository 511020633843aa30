/* c-examples/sbstat.c: its /metrics endpoint serves valid Prometheus text whose counters
 * match the traffic published, and its table ranks the busiest topic first. */
#include "test_util.h"

#define SBSTAT_NO_MAIN
#include "../c-examples/sbstat.c"

#include <libgen.h>

/* GET `path` from 127.0.0.1:port; the whole answer (malloc'd) or NULL. */
static char *http_get(int port, const char *path)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		return NULL;
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((uint16_t)port);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
		close(fd);
		return NULL;
	}
	char req[256];
	int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
	sbstat_send_all(fd, req, (size_t)n);
	size_t cap = 1 << 16, len = 0;
	char *buf = malloc(cap);
	for (;;) {
		if (len + 4096 > cap)
			buf = realloc(buf, cap *= 2);
		ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
		if (r <= 0)
			break;
		len += (size_t)r;
	}
	buf[len] = '\0';
	close(fd);
	return buf;
}

int main(void)
{
	TEST_INIT();
	struct sbstat_demo d;
	CHECK_EQ_INT(sbstat_demo_start(&d), 0);
	const long N = 1000;
	sbstat_demo_publish(&d, N);
	WAIT_UNTIL(atomic_load(&d.updates) == N); /* every change reached the router */

	struct sbstat_server s;
	CHECK_EQ_INT(sbstat_serve_start(&s, 0, 0), 0);
	CHECK(s.port > 0);
	char *answer = http_get(s.port, "/metrics");
	CHECK(answer != NULL);
	if (answer != NULL) {
		CHECK(strncmp(answer, "HTTP/1.0 200 OK\r\n", 17) == 0);
		CHECK(strstr(answer, "Content-Type: text/plain; version=0.0.4") != NULL);
		char *body = strstr(answer, "\r\n\r\n");
		CHECK(body != NULL);
		if (body != NULL) {
			body += 4;
			char path[] = "/tmp/sb_sbstat_XXXXXX";
			int fd = mkstemp(path);
			CHECK(fd >= 0);
			CHECK(write(fd, body, strlen(body)) == (ssize_t)strlen(body));
			close(fd);
			/* Known traffic: N state changes, a quarter through each endpoint topic,
			 * all forwarded into endpoint:all; the router on the cache's topic got one
			 * update per change (plus its Subscribe message). */
			char src[] = __FILE__, cmd[2048];
			snprintf(cmd, sizeof cmd,
				 "python3 %s/prom_check.py %s"
				 " 'switchboard_type_published_total{type=\"endpoint_state\"}=%ld'"
				 " 'switchboard_topic_published_total{topic=\"endpoint:all/PJSIP/alice\"}=%ld'"
				 " 'switchboard_topic_dispatched_total{topic=\"endpoint:all/PJSIP/dave\"}=%ld'"
				 " 'switchboard_topic_not_dispatched_total{topic=\"endpoint:all/PJSIP/bob\"}=0'"
				 " 'switchboard_alerts=0'",
				 dirname(src), path, N, N / 4, N / 4);
			CHECK_EQ_INT(system(cmd), 0);
			unlink(path);
			/* The router's subscription (on endpoint:all-cached): N updates + Subscribe. */
			struct sbstat_row rows[64];
			int n = sbstat_parse(body, "subscription_delivered_total", "subscription", rows, 64);
			int found = 0;
			for (int i = 0; i < n; i++)
				if (strncmp(rows[i].name, ENDPOINT_CACHED_TOPIC ":",
					    strlen(ENDPOINT_CACHED_TOPIC) + 1) == 0) {
					found++;
					CHECK_EQ_INT((long)rows[i].value, N + 1);
				}
			CHECK_EQ_INT(found, 1);

			/* The table: endpoint:all is the busiest topic (every change reached it). */
			char *table = NULL;
			size_t tlen = 0;
			FILE *f = open_memstream(&table, &tlen);
			sbstat_top(f, NULL, body, 1.0, 3);
			fclose(f);
			CHECK(strncmp(table, "TOPIC", 5) == 0);
			char *first = strchr(table, '\n') + 1;
			CHECK(strncmp(first, "endpoint:all ", 13) == 0);
			CHECK(strstr(table, "SUBSCRIPTION") != NULL);
			CHECK(strstr(table, "alerts: 0\n") != NULL);
			free(table);
		}
	}
	free(answer);
	answer = http_get(s.port, "/other");
	CHECK(answer != NULL && strncmp(answer, "HTTP/1.0 404", 12) == 0);
	free(answer);
	sbstat_serve_stop(&s);
	CHECK_EQ_INT(atomic_load(&s.served), 2);
	sbstat_demo_stop(&d);
	return TEST_DONE();
}
