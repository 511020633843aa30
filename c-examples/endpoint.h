/*
 * endpoint.h - shared between pbx_host.c (the "PBX core") and pbx_module.c
 * (a loadable module), like a PBX's public module API header.
 */
#ifndef PBX_ENDPOINT_H
#define PBX_ENDPOINT_H

#include <stdatomic.h>
#include <switchboard.h>

#define ENDPOINT_STATE_TYPE   "endpoint_state"
#define ENDPOINT_ALL_TOPIC    "endpoint:all"
/* The update topic of the host's caching topic over endpoint:all ("<original>-cached"). */
#define ENDPOINT_CACHED_TOPIC "endpoint:all-cached"

/* Payload of an "endpoint_state" message (malloc'd by the publisher, freed by
 * the message's dtor when the last reference goes). */
struct endpoint_state {
	char name[64]; /* "PJSIP/alice" */
	int online;    /* 1 online, 0 offline */
};

/* What the host hands a module. Owned by the host; it outlives every load. */
struct host_api {
	int generation;           /* 1 for the first load, 2 for the second, ... */
	atomic_int module_loaded; /* host: 1 from before load_module() until unload_module() returned */

	/* Host objects, borrowed: valid from before the first load until after the last
	 * unload. The cache holds the latest endpoint_state snapshot of every endpoint
	 * (keyed by endpoint name); cached_topic is the caching topic's update topic, where
	 * every change is published as an sb_cache_update (old, new). */
	sb_message_type *state_type; /* "endpoint_state" */
	sb_cache *cache;
	sb_topic *cached_topic;

	/* Filled in by the module. */
	atomic_long known_devices; /* devices in the cache dump of the latest load (-1: none) */
	atomic_long updates;       /* endpoint snapshot updates handled by the router's cache route */
	atomic_long others;        /* messages handled by the router's default route */
	atomic_long late_callbacks; /* callbacks that ran after unload_module() returned */
	atomic_long violations;     /* misroutes, broken update sequences, a join returning early */
};

/* Entry points a module exports (looked up with dlsym). */
typedef int (*load_module_fn)(struct host_api *api);
typedef int (*unload_module_fn)(void);

int load_module(struct host_api *api);
int unload_module(void);

#endif /* PBX_ENDPOINT_H */
