/*
 * pbx_host.c - plays a PBX core. It creates the "endpoint_state" message type,
 * the "endpoint:all" topic and a topic pool over it (one topic per endpoint,
 * forwarding into endpoint:all), and runs two publisher threads. While traffic
 * flows it dlopen()s pbx_module.so, calls load_module(), lets it run, calls
 * unload_module(), dlclose()s it, and does that LOAD_CYCLES times. The module
 * counts any callback that runs after unload_module() returned as a violation
 * (and once the module is unmapped, such a callback would crash the host).
 *
 * usage: pbx_host [path/to/pbx_module.so]   (default: next to this program)
 * Exit status: 0 when the module received messages and no violation was seen.
 */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <switchboard.h>

#include "endpoint.h"

#define LOAD_CYCLES 3
#define LOADED_MS   450 /* module loaded, traffic flowing */
#define UNLOADED_MS 150 /* module unloaded, traffic still flowing */
#define PUBLISHERS  2
#define PER_PUB     3

static const char *const endpoint_names[PUBLISHERS][PER_PUB] = {
	{ "PJSIP/alice", "PJSIP/bob", "PJSIP/carol" },
	{ "PJSIP/dave", "IAX2/erin", "SIP/frank" },
};

struct publisher {
	pthread_t thread;
	sb_message_type *type;     /* borrowed from main */
	sb_topic *topics[PER_PUB]; /* own references */
	const char *const *names;
	long published, skipped, failed;
};

static atomic_int stop_publishers;

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) != 0)
		;
}

static void *publisher_main(void *arg)
{
	struct publisher *p = arg;
	int online[PER_PUB] = { 0 };

	for (unsigned i = 0; !atomic_load(&stop_publishers); i++) {
		unsigned e = i % PER_PUB;
		online[e] = !online[e];

		/* Don't build a message nobody would read. */
		if (!sb_topic_wants(p->topics[e], p->type)) {
			p->skipped++;
			sleep_ms(1);
			continue;
		}
		struct endpoint_state *st = calloc(1, sizeof *st);
		if (!st) {
			p->failed++;
			continue;
		}
		snprintf(st->name, sizeof st->name, "%s", p->names[e]);
		st->online = online[e];

		sb_message *msg = sb_message_create(p->type, st, free);
		if (!msg) {
			fprintf(stderr, "sb_message_create: %s\n", sb_last_error());
			free(st); /* creation failed: still ours */
			p->failed++;
			continue;
		}
		if (sb_publish(p->topics[e], msg) < 0) {
			fprintf(stderr, "sb_publish: %s\n", sb_last_error());
			p->failed++;
		} else {
			p->published++;
		}
		sb_message_unref(msg); /* sb_publish never takes our reference */
		sleep_ms(1);
	}
	return NULL;
}

/* One dlopen / load_module / run / unload_module / dlclose cycle. */
static int run_module_once(const char *path, struct host_api *api)
{
	void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!handle) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		return -1;
	}
	load_module_fn load = (load_module_fn)dlsym(handle, "load_module");
	unload_module_fn unload = (unload_module_fn)dlsym(handle, "unload_module");
	if (!load || !unload) {
		fprintf(stderr, "%s: missing load_module/unload_module\n", path);
		dlclose(handle);
		return -1;
	}

	long before = atomic_load(&api->callbacks);
	atomic_store(&api->module_loaded, 1); /* first: callbacks may start inside load_module */
	if (load(api) != 0) {
		atomic_store(&api->module_loaded, 0);
		dlclose(handle);
		return -1;
	}
	sleep_ms(LOADED_MS);
	unload();
	atomic_store(&api->module_loaded, 0); /* any callback from now on is a violation */
	long got = atomic_load(&api->callbacks) - before;

	if (dlclose(handle) != 0) {
		fprintf(stderr, "dlclose: %s\n", dlerror());
		return -1;
	}
	/* Informational: the module's code is really gone, so a late callback would crash. */
	void *still = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
	printf("[host] cycle %d: module received %ld messages, unmapped after dlclose: %s\n",
	       api->generation, got, still ? "no" : "yes");
	if (still)
		dlclose(still);
	return got > 0 ? 0 : -1;
}

static char *default_module_path(const char *argv0)
{
	const char *slash = strrchr(argv0, '/');
	size_t dir = slash ? (size_t)(slash - argv0) + 1 : 0;
	char *path = malloc(dir + sizeof "./pbx_module.so");
	if (path)
		snprintf(path, dir + sizeof "./pbx_module.so", "%.*s%s", (int)dir, argv0,
			 dir ? "pbx_module.so" : "./pbx_module.so");
	return path;
}

int main(int argc, char **argv)
{
	char *module_path = argc > 1 ? strdup(argv[1]) : default_module_path(argv[0]);
	sb_message_type *type = NULL;
	sb_topic *all = NULL;
	sb_topic_pool *pool = NULL;
	struct publisher pubs[PUBLISHERS];
	struct host_api api = { 0 };
	int started = 0, failed_cycles = 0, rc = 1;

	setvbuf(stdout, NULL, _IOLBF, 0); /* keep the log readable when piped, even on a crash */
	memset(pubs, 0, sizeof pubs);
	printf("[host] switchboard %s\n", sb_version());
	if (!module_path)
		goto out;
	if (sb_message_type_create(ENDPOINT_STATE_TYPE, NULL, &type) != SB_OK) {
		fprintf(stderr, "sb_message_type_create: %s\n", sb_last_error());
		goto out;
	}
	if (!(all = sb_topic_create(ENDPOINT_ALL_TOPIC)) || !(pool = sb_topic_pool_create(all))) {
		fprintf(stderr, "topic setup: %s\n", sb_last_error());
		goto out;
	}
	for (int p = 0; p < PUBLISHERS; p++) {
		pubs[p].type = type;
		pubs[p].names = endpoint_names[p];
		for (int e = 0; e < PER_PUB; e++) {
			/* "endpoint:all/PJSIP/alice", forwarding into endpoint:all */
			pubs[p].topics[e] = sb_topic_pool_get_topic(pool, endpoint_names[p][e]);
			if (!pubs[p].topics[e]) {
				fprintf(stderr, "sb_topic_pool_get_topic: %s\n", sb_last_error());
				goto out;
			}
			printf("[host] endpoint topic %s\n", sb_topic_name(pubs[p].topics[e]));
		}
	}
	for (; started < PUBLISHERS; started++) {
		if (pthread_create(&pubs[started].thread, NULL, publisher_main, &pubs[started]) != 0) {
			fprintf(stderr, "pthread_create failed\n");
			goto out;
		}
	}

	for (int cycle = 1; cycle <= LOAD_CYCLES; cycle++) {
		api.generation = cycle;
		if (run_module_once(module_path, &api) != 0)
			failed_cycles++;
		sleep_ms(UNLOADED_MS);
	}
	rc = 0;

out:
	atomic_store(&stop_publishers, 1);
	long published = 0, skipped = 0, failed = 0;
	for (int p = 0; p < PUBLISHERS; p++) {
		if (p < started)
			pthread_join(pubs[p].thread, NULL);
		published += pubs[p].published;
		skipped += pubs[p].skipped;
		failed += pubs[p].failed;
		for (int e = 0; e < PER_PUB; e++)
			sb_topic_unref(pubs[p].topics[e]);
	}
	sb_topic_pool_unref(pool);
	sb_topic_unref(all);
	sb_message_type_unref(type);
	free(module_path);

	long callbacks = atomic_load(&api.callbacks), violations = atomic_load(&api.violations);
	printf("[host] messages published=%ld skipped(no subscriber)=%ld failed=%ld\n",
	       published, skipped, failed);
	printf("[host] callbacks=%ld violations=%ld failed_cycles=%d\n", callbacks, violations,
	       failed_cycles);
	if (rc != 0 || violations > 0 || callbacks == 0 || failed > 0 || failed_cycles > 0) {
		printf("[host] FAIL\n");
		return 1;
	}
	printf("[host] OK\n");
	return 0;
}
