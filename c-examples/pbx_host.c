/*
 * pbx_host.c - plays a PBX core. It creates the "endpoint_state" message type,
 * the "endpoint:all" topic and a topic pool over it (one topic per endpoint,
 * forwarding into endpoint:all), keeps the latest snapshot of every endpoint in a
 * cache through a caching topic over endpoint:all (updates on "endpoint:all-cached"),
 * and runs two publisher threads. While traffic flows it dlopen()s pbx_module.so,
 * calls load_module(), lets it run, calls unload_module(), dlclose()s it, and does
 * that LOAD_CYCLES times. The module lists the cached devices, then follows the
 * updates through a router; it counts any callback that runs after unload_module()
 * returned (once the module is unmapped, such a callback would crash the host).
 *
 * usage: pbx_host [path/to/pbx_module.so]   (default: next to this program)
 * Exit status: 0 when every cycle got updates through the router, the first cache
 * dump after DUMP_AFTER_MS of traffic listed devices, the cache matches what was
 * published, no callback ran after unload_module() returned, and every update the
 * module saw was consistent. The closing summary says what the bus did.
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
#define DUMP_AFTER_MS 1000 /* a module loaded this long after traffic began must see devices */

static const char *const endpoint_names[PUBLISHERS][PER_PUB] = {
	{ "PJSIP/alice", "PJSIP/bob", "PJSIP/carol" },
	{ "PJSIP/dave", "IAX2/erin", "SIP/frank" },
};

struct publisher {
	pthread_t thread;
	sb_message_type *type;     /* borrowed from main */
	sb_topic *topics[PER_PUB]; /* own references */
	const char *const *names;
	int last_published[PER_PUB]; /* online value of the last published message, -1: none */
	long published, skipped, failed;
};

static atomic_int stop_publishers;

/* The cache's id function has no user data: it finds the type here. Set before the
 * cache exists, cleared after it is gone. */
static sb_message_type *endpoint_type;
static atomic_long id_calls_endpoint, id_calls_other;

/* Cache key of a snapshot: the endpoint name for endpoint_state messages; NULL (not
 * cacheable) for every other type - the caching topic also sees subscription changes. */
static const char *endpoint_id(sb_message *msg)
{
	if (sb_message_get_type(msg) != endpoint_type) {
		atomic_fetch_add(&id_calls_other, 1);
		return NULL;
	}
	atomic_fetch_add(&id_calls_endpoint, 1);
	const struct endpoint_state *st = sb_message_data(msg);
	return st->name; /* borrowed from the message, which outlives the call */
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) != 0)
		;
}

static long elapsed_ms(const struct timespec *since)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - since->tv_sec) * 1000L + (now.tv_nsec - since->tv_nsec) / 1000000L;
}

static void *publisher_main(void *arg)
{
	struct publisher *p = arg;
	int online[PER_PUB] = { 0 };

	for (int e = 0; e < PER_PUB; e++)
		p->last_published[e] = -1;

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
			/* The caching subscription is synchronous: the cache holds this snapshot now. */
			p->last_published[e] = st->online;
			p->published++;
		}
		sb_message_unref(msg); /* sb_publish never takes our reference */
		sleep_ms(1);
	}
	return NULL;
}

/* One dlopen / load_module / run / unload_module / dlclose cycle. Returns -1 when the
 * cycle failed; *known gets the number of devices the module's cache dump listed. */
static int run_module_once(const char *path, struct host_api *api, long *known)
{
	*known = -1;
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

	long updates_before = atomic_load(&api->updates);
	long others_before = atomic_load(&api->others);
	atomic_store(&api->known_devices, -1);
	atomic_store(&api->module_loaded, 1); /* first: callbacks may start inside load_module */
	if (load(api) != 0) {
		atomic_store(&api->module_loaded, 0);
		dlclose(handle);
		return -1;
	}
	*known = atomic_load(&api->known_devices);
	sleep_ms(LOADED_MS);
	unload();
	atomic_store(&api->module_loaded, 0); /* any callback from now on is a late one */
	long updates = atomic_load(&api->updates) - updates_before;
	long others = atomic_load(&api->others) - others_before;

	if (dlclose(handle) != 0) {
		fprintf(stderr, "dlclose: %s\n", dlerror());
		return -1;
	}
	/* Informational: the module's code is really gone, so a late callback would crash. */
	void *still = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
	printf("[host] cycle %d: the module listed %ld device%s from the cache, then its router "
	       "received %ld endpoint change%s (and %ld subscription notice%s); "
	       "unload_module() unsubscribed and joined the router, and %s\n",
	       api->generation, *known, *known == 1 ? "" : "s", updates, updates == 1 ? "" : "s",
	       others, others == 1 ? "" : "s",
	       still ? "dlclose() left its code mapped (another user holds it)"
		     : "dlclose() removed its code from memory");
	if (still)
		dlclose(still);
	return updates > 0 ? 0 : -1;
}

/* After the publishers stopped: the cache must hold exactly the last published state of
 * every endpoint. Returns the number of mismatches. */
static int check_cache(sb_cache *cache, sb_message_type *type, const struct publisher *pubs)
{
	int bad = 0, expected = 0;
	for (int p = 0; p < PUBLISHERS; p++) {
		for (int e = 0; e < PER_PUB; e++) {
			int want = pubs[p].last_published[e];
			if (want < 0)
				continue; /* never published */
			expected++;
			sb_message *snap = sb_cache_get(cache, type, pubs[p].names[e]);
			const struct endpoint_state *st = snap ? sb_message_data(snap) : NULL;
			if (!st || st->online != want || strcmp(st->name, pubs[p].names[e]) != 0) {
				fprintf(stderr, "[host] cache: %s is %s, last published %s\n",
					pubs[p].names[e],
					!st ? "missing" : st->online ? "online" : "offline",
					want ? "online" : "offline");
				bad++;
			}
			sb_message_unref(snap);
		}
	}
	sb_message_list *all = sb_cache_dump(cache, type);
	size_t n = sb_message_list_len(all);
	if (!all || n != (size_t)expected) {
		fprintf(stderr, "[host] cache dump: %zu snapshots, expected %d\n", n, expected);
		bad++;
	}
	sb_message_list_free(all);
	if (bad == 0)
		printf("[host] the cache holds the last published state of all %zu endpoints\n", n);
	else
		printf("[host] the cache disagrees with what was published (%d difference%s)\n",
		       bad, bad == 1 ? "" : "s");
	return bad;
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
	sb_cache *cache = NULL;
	sb_caching_topic *ct = NULL;
	struct publisher pubs[PUBLISHERS];
	struct host_api api = { 0 };
	struct timespec traffic_start;
	int started = 0, failed_cycles = 0, cache_bad = 0, rc = 1;
	int dump_checked = 0;  /* a load DUMP_AFTER_MS into the traffic was seen */
	long late_known = -1;  /* devices its dump listed */

	setvbuf(stdout, NULL, _IOLBF, 0); /* keep the log readable when piped, even on a crash */
	memset(pubs, 0, sizeof pubs);
	atomic_store(&api.known_devices, -1);
	printf("[host] switchboard %s\n", sb_version());
	if (!module_path)
		goto out;
	if (sb_message_type_create(ENDPOINT_STATE_TYPE, NULL, &type) != SB_OK) {
		fprintf(stderr, "sb_message_type_create: %s\n", sb_last_error());
		goto out;
	}
	endpoint_type = type;
	if (!(all = sb_topic_create(ENDPOINT_ALL_TOPIC)) || !(pool = sb_topic_pool_create(all))) {
		fprintf(stderr, "topic setup: %s\n", sb_last_error());
		goto out;
	}
	/* The endpoint cache: endpoint:all -> (synchronous caching subscription) -> cache,
	 * each change republished as an sb_cache_update on endpoint:all-cached. */
	if (!(cache = sb_cache_create(endpoint_id)) || !(ct = sb_caching_topic_create(all, cache))) {
		fprintf(stderr, "cache setup: %s\n", sb_last_error());
		goto out;
	}
	api.state_type = type;
	api.cache = cache;
	api.cached_topic = sb_caching_get_topic(ct); /* borrowed: lives as long as ct */
	if (!api.cached_topic) {
		fprintf(stderr, "sb_caching_get_topic: %s\n", sb_last_error());
		goto out;
	}
	printf("[host] caching %s, updates on %s\n", ENDPOINT_ALL_TOPIC,
	       sb_topic_name(api.cached_topic));
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
	clock_gettime(CLOCK_MONOTONIC, &traffic_start);
	for (; started < PUBLISHERS; started++) {
		if (pthread_create(&pubs[started].thread, NULL, publisher_main, &pubs[started]) != 0) {
			fprintf(stderr, "pthread_create failed\n");
			goto out;
		}
	}

	for (int cycle = 1; cycle <= LOAD_CYCLES; cycle++) {
		long known, at = elapsed_ms(&traffic_start);
		api.generation = cycle;
		if (run_module_once(module_path, &api, &known) != 0)
			failed_cycles++;
		if (!dump_checked && at >= DUMP_AFTER_MS) {
			dump_checked = 1;
			late_known = known;
			printf("[host] cycle %d loaded %ld ms into the traffic: its dump listed %ld devices\n",
			       cycle, at, known);
		}
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
	}
	/* Every publisher is done, so the cache is final: compare it with what was sent. */
	if (cache && rc == 0)
		cache_bad = check_cache(cache, type, pubs);
	ct = sb_caching_unsubscribe_and_join(ct); /* NULL-safe; no cache update after this */
	sb_cache_unref(cache);
	for (int p = 0; p < PUBLISHERS; p++)
		for (int e = 0; e < PER_PUB; e++)
			sb_topic_unref(pubs[p].topics[e]);
	sb_topic_pool_unref(pool);
	sb_topic_unref(all);
	endpoint_type = NULL;
	sb_message_type_unref(type);
	free(module_path);

	long updates = atomic_load(&api.updates), others = atomic_load(&api.others);
	long late = atomic_load(&api.late_callbacks);
	long violations = atomic_load(&api.violations);
	printf("[host] summary:\n");
	printf("[host]   %d threads published %ld endpoint state changes on the %d per-endpoint "
	       "topics; the topic pool forwarded each into %s%s\n",
	       PUBLISHERS, published, PUBLISHERS * PER_PUB, ENDPOINT_ALL_TOPIC,
	       skipped ? " (some were not built: nobody was listening)" : "");
	printf("[host]   the caching topic filed every one in the cache before sb_publish "
	       "returned (its id function saw %ld endpoint states and skipped %ld other "
	       "message%s) and republished each change on %s\n",
	       atomic_load(&id_calls_endpoint), atomic_load(&id_calls_other),
	       atomic_load(&id_calls_other) == 1 ? "" : "s", ENDPOINT_CACHED_TOPIC);
	printf("[host]   the module was loaded and unloaded %d times while that traffic flowed; "
	       "its router handled %ld endpoint changes and %ld other messages\n",
	       LOAD_CYCLES, updates, others);
	if (late == 0)
		printf("[host]   no module callback ran after unload_module() returned: "
		       "dlclose() was safe every time\n");
	else
		printf("[host]   PROBLEM: %ld module callback%s ran after unload_module() returned "
		       "(with the module's code gone, the host would have crashed)\n",
		       late, late == 1 ? "" : "s");
	if (violations > 0)
		printf("[host]   PROBLEM: the module saw %ld inconsistenc%s (see above)\n",
		       violations, violations == 1 ? "y" : "ies");
	if (failed > 0)
		printf("[host]   PROBLEM: %ld message%s could not be created or published\n", failed,
		       failed == 1 ? "" : "s");
	if (failed_cycles > 0)
		printf("[host]   PROBLEM: %d load cycle%s failed or got no updates\n", failed_cycles,
		       failed_cycles == 1 ? "" : "s");
	if (rc == 0 && !dump_checked)
		printf("[host]   PROBLEM: no module load happened %d ms into the traffic\n",
		       DUMP_AFTER_MS);
	else if (rc == 0 && late_known <= 0)
		printf("[host]   PROBLEM: a module loaded %d ms into the traffic found the cache "
		       "empty\n", DUMP_AFTER_MS);
	if (rc != 0 || late > 0 || violations > 0 || updates == 0 || failed > 0 ||
	    failed_cycles > 0 || !dump_checked || late_known <= 0 || cache_bad > 0) {
		printf("[host] FAIL\n");
		return 1;
	}
	printf("[host] OK\n");
	return 0;
}
