/*
 * pbx_module.c - a loadable PBX module (built as pbx_module.so, linked with
 * -lswitchboard). In load_module() it first lists the devices the host's endpoint
 * cache already knows (sb_cache_dump), then follows the changes through a message
 * router on the caching topic's update topic: one route for the endpoint snapshot
 * updates, one default route for everything else (subscription changes).
 * unload_module() unsubscribes the router and joins it, so that once it returns no
 * route callback can run and the host may dlclose() this object.
 */
#include <stdio.h>
#include <string.h>
#include <switchboard.h>

#include "endpoint.h"

#define PRINT_PER_LOAD 4 /* print the first few changes of each load */
#define MAX_DEVICES    16
#define MAX_COMPLAINTS 5 /* stderr lines per load about inconsistent updates */

static struct host_api *host;
static sb_router *router;
static sb_message_type *state_type;
static atomic_long handled;      /* endpoint snapshot updates in this load */
static atomic_long others;       /* default-route messages in this load */
static atomic_int final_handled; /* our "Unsubscribe" final message was delivered */

/* Per-device continuity check, touched only by the router's callbacks (which never
 * overlap) and by load_module() before the router exists: the old snapshot of an update
 * must be the new snapshot of the previous update of the same device. */
static struct {
	char name[64];
	uint64_t last_ts; /* timestamp of the latest new_snapshot seen */
} seen[MAX_DEVICES];
static int nseen;
static long complaints;

static void complain(struct host_api *api, const char *what, const char *name)
{
	atomic_fetch_add(&api->violations, 1);
	if (complaints++ < MAX_COMPLAINTS)
		fprintf(stderr, "pbx_module: %s (%s)\n", what, name ? name : "?");
}

/* The detector: the host clears module_loaded only after unload_module() returned.
 * A callback seeing 0 ran after unload - a bug in the bus. */
static void check_loaded(struct host_api *api)
{
	if (!atomic_load(&api->module_loaded))
		atomic_fetch_add(&api->late_callbacks, 1);
}

static void track(struct host_api *api, const struct endpoint_state *st, sb_message *old_snap,
		  sb_message *new_snap)
{
	int i;
	for (i = 0; i < nseen && strcmp(seen[i].name, st->name) != 0; i++)
		;
	if (i == nseen) {
		if (nseen == MAX_DEVICES)
			return;
		snprintf(seen[nseen].name, sizeof seen[nseen].name, "%s", st->name);
		nseen++;
	} else if (!old_snap || sb_message_timestamp_ns(old_snap) != seen[i].last_ts) {
		complain(api, "update does not continue the previous one of this device", st->name);
	}
	seen[i].last_ts = sb_message_timestamp_ns(new_snap);
}

/* Route: cache updates whose snapshots are endpoint_state. */
static void on_update(void *data, sb_subscription *s, sb_message *msg)
{
	struct host_api *api = data;
	(void)s;

	check_loaded(api);
	if (sb_message_get_type(msg) != sb_cache_update_type()) {
		complain(api, "non-update message on the cache update route",
			 sb_message_type_name(sb_message_get_type(msg)));
		return;
	}
	const sb_cache_update *u = sb_message_data(msg);
	if (u->type != state_type) {
		complain(api, "cache update of another type on the endpoint route",
			 sb_message_type_name(u->type));
		return;
	}
	if (!u->new_snapshot) {
		/* A clear: the host never clears, but a module should cope. */
		const struct endpoint_state *gone =
			u->old_snapshot ? sb_message_data(u->old_snapshot) : NULL;
		printf("  Device %s removed\n", gone ? gone->name : "?");
		return;
	}
	if (sb_message_get_type(u->new_snapshot) != state_type) {
		complain(api, "snapshot type differs from the update's type",
			 sb_message_type_name(sb_message_get_type(u->new_snapshot)));
		return;
	}
	const struct endpoint_state *st = sb_message_data(u->new_snapshot);
	if (u->old_snapshot) {
		const struct endpoint_state *was = sb_message_data(u->old_snapshot);
		if (sb_message_get_type(u->old_snapshot) != state_type ||
		    strcmp(was->name, st->name) != 0)
			complain(api, "old and new snapshot are of different devices", st->name);
	}
	track(api, st, u->old_snapshot, u->new_snapshot);

	atomic_fetch_add(&api->updates, 1);
	if (atomic_fetch_add(&handled, 1) < PRINT_PER_LOAD)
		printf("  Device %s (%s)\n", st->name, st->online ? "online" : "offline");
}

/* Default route: whatever no other route takes (subscription changes here). */
static void on_other(void *data, sb_subscription *s, sb_message *msg)
{
	struct host_api *api = data;

	check_loaded(api);
	if (sb_subscription_final_message(s, msg))
		atomic_store(&final_handled, 1);

	sb_message_type *ty = sb_message_get_type(msg);
	if (ty == state_type) {
		complain(api, "raw endpoint_state on the update topic", NULL);
	} else if (ty == sb_cache_update_type()) {
		const sb_cache_update *u = sb_message_data(msg);
		if (u->type == state_type)
			complain(api, "endpoint snapshot update reached the default route", NULL);
	}
	atomic_fetch_add(&api->others, 1);
	atomic_fetch_add(&others, 1);
}

/* Prints what the cache knows now; returns the number of devices, or -1. */
static long list_known_devices(struct host_api *api)
{
	sb_message_list *list = sb_cache_dump(api->cache, state_type);
	if (!list) {
		fprintf(stderr, "pbx_module: sb_cache_dump: %s\n", sb_last_error());
		return -1;
	}
	size_t n = sb_message_list_len(list);
	long known = 0;
	for (size_t i = 0; i < n; i++) {
		sb_message *snap = sb_message_list_get(list, i); /* borrowed from the list */
		if (!snap || sb_message_get_type(snap) != state_type) {
			complain(api, "cache dump returned a foreign message", NULL);
			continue;
		}
		const struct endpoint_state *st = sb_message_data(snap);
		printf("  Known device %s (%s)\n", st->name, st->online ? "online" : "offline");
		known++;
	}
	sb_message_list_free(list); /* drops the list's references */
	return known;
}

static void release(void)
{
	router = sb_router_unsubscribe_and_join(router); /* NULL-safe: returns NULL */
	sb_message_type_unref(state_type);
	state_type = NULL;
}

int load_module(struct host_api *api)
{
	host = api;
	atomic_store(&handled, 0);
	atomic_store(&others, 0);
	atomic_store(&final_handled, 0);
	nseen = 0;
	complaints = 0;

	/* A name identifies a type: this returns the host's "endpoint_state". */
	if (sb_message_type_create(ENDPOINT_STATE_TYPE, NULL, &state_type) != SB_OK) {
		fprintf(stderr, "pbx_module: message type: %s\n", sb_last_error());
		return -1;
	}
	if (state_type != api->state_type)
		complain(api, "type by name differs from the host's", ENDPOINT_STATE_TYPE);

	/* The update topic can also be found by name; it must be the host's. */
	sb_topic *by_name = sb_topic_get(ENDPOINT_CACHED_TOPIC);
	if (by_name != api->cached_topic)
		complain(api, "sb_topic_get returned another topic", ENDPOINT_CACHED_TOPIC);
	sb_topic_unref(by_name);

	/* 1. What is known now. */
	printf("[pbx_module] load #%d: devices in the endpoint cache:\n", api->generation);
	long known = list_known_devices(api);
	if (known < 0) {
		release();
		return -1;
	}
	atomic_store(&api->known_devices, known);
	printf("[pbx_module] load #%d: %ld known device%s\n", api->generation, known,
	       known == 1 ? "" : "s");

	/* 2. Follow the changes. The router's routes are in place before load returns;
	 * changes made between the dump and the router's subscription are not seen. */
	router = sb_router_create(api->cached_topic);
	if (!router) {
		fprintf(stderr, "pbx_module: sb_router_create: %s\n", sb_last_error());
		release();
		return -1;
	}
	if (sb_router_add_cache_update(router, state_type, on_update, api) != SB_OK ||
	    sb_router_set_default(router, on_other, api) != SB_OK) {
		fprintf(stderr, "pbx_module: router routes: %s\n", sb_last_error());
		release();
		return -1;
	}
	printf("[pbx_module] load #%d: routing %s\n", api->generation,
	       sb_topic_name(api->cached_topic));
	return 0;
}

int unload_module(void)
{
	/* Returns once the router's final message has been handled: no route callback
	 * runs after this. */
	router = sb_router_unsubscribe_and_join(router);
	if (!atomic_load(&final_handled)) {
		fprintf(stderr,
			"pbx_module: sb_router_unsubscribe_and_join returned before the final message\n");
		atomic_fetch_add(&host->violations, 1);
	}
	sb_message_type_unref(state_type);
	state_type = NULL;
	printf("[pbx_module] unload #%d: handled %ld endpoint updates, %ld other messages\n",
	       host->generation, atomic_load(&handled), atomic_load(&others));
	host = NULL;
	return 0;
}
