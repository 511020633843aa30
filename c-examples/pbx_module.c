/*
 * pbx_module.c - a loadable PBX module (built as pbx_module.so, linked with
 * -lswitchboard). It subscribes to "endpoint:all" in load_module() and prints
 * device state changes; unload_module() unsubscribes and joins, so that once it
 * returns no callback can run and the host may dlclose() this object.
 */
#include <stdio.h>
#include <string.h>
#include <switchboard.h>

#include "endpoint.h"

#define PRINT_PER_LOAD 4 /* print the first few changes of each load */

static struct host_api *host;
static sb_subscription *sub;
static sb_message_type *state_type;
static atomic_long handled;      /* endpoint_state messages in this load */
static atomic_int final_handled; /* our "Unsubscribe" final message was delivered */

static void on_endpoint(void *data, sb_subscription *s, sb_message *msg)
{
	struct host_api *api = data;

	/* The detector: the host clears module_loaded only after unload_module()
	 * returned. A callback seeing 0 ran after unload - a bug in the bus. */
	if (!atomic_load(&api->module_loaded))
		atomic_fetch_add(&api->violations, 1);

	if (sb_subscription_final_message(s, msg))
		atomic_store(&final_handled, 1);
	if (sb_message_get_type(msg) != state_type)
		return; /* subscription changes, other types */

	const struct endpoint_state *st = sb_message_data(msg);
	atomic_fetch_add(&api->callbacks, 1);
	if (atomic_fetch_add(&handled, 1) < PRINT_PER_LOAD)
		printf("  Device %s (%s)\n", st->name, st->online ? "online" : "offline");
}

int load_module(struct host_api *api)
{
	host = api;
	atomic_store(&handled, 0);
	atomic_store(&final_handled, 0);

	/* A name identifies a type: this returns the host's "endpoint_state". */
	if (sb_message_type_create(ENDPOINT_STATE_TYPE, NULL, &state_type) != SB_OK) {
		fprintf(stderr, "pbx_module: message type: %s\n", sb_last_error());
		return -1;
	}
	sb_topic *all = sb_topic_get(ENDPOINT_ALL_TOPIC);
	if (!all) {
		fprintf(stderr, "pbx_module: no topic %s: %s\n", ENDPOINT_ALL_TOPIC, sb_last_error());
		sb_message_type_unref(state_type);
		state_type = NULL;
		return -1;
	}
	/* The data pointer is the host's struct, never touched by the library. */
	sub = sb_subscribe(all, on_endpoint, api);
	sb_topic_unref(all); /* the subscription keeps the topic alive */
	if (!sub) {
		fprintf(stderr, "pbx_module: subscribe: %s\n", sb_last_error());
		sb_message_type_unref(state_type);
		state_type = NULL;
		return -1;
	}
	printf("[pbx_module] load #%d: subscribed to %s\n", api->generation, ENDPOINT_ALL_TOPIC);
	return 0;
}

int unload_module(void)
{
	/* Returns once our final message has been handled: no callback after this. */
	sub = sb_unsubscribe_and_join(sub);
	if (!atomic_load(&final_handled)) {
		fprintf(stderr, "pbx_module: sb_unsubscribe_and_join returned before the final message\n");
		atomic_fetch_add(&host->violations, 1);
	}
	sb_message_type_unref(state_type);
	state_type = NULL;
	printf("[pbx_module] unload #%d: handled %ld endpoint messages\n", host->generation,
	       atomic_load(&handled));
	host = NULL;
	return 0;
}
