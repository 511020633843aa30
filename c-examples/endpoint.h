/*
 * endpoint.h - shared between pbx_host.c (the "PBX core") and pbx_module.c
 * (a loadable module), like a PBX's public module API header.
 */
#ifndef PBX_ENDPOINT_H
#define PBX_ENDPOINT_H

#include <stdatomic.h>

#define ENDPOINT_STATE_TYPE "endpoint_state"
#define ENDPOINT_ALL_TOPIC  "endpoint:all"

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
	atomic_long callbacks;    /* module: endpoint_state messages handled */
	atomic_long violations;   /* module: callbacks that ran while module_loaded == 0, etc. */
};

/* Entry points a module exports (looked up with dlsym). */
typedef int (*load_module_fn)(struct host_api *api);
typedef int (*unload_module_fn)(void);

int load_module(struct host_api *api);
int unload_module(void);

#endif /* PBX_ENDPOINT_H */
