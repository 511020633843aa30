/* Shared pieces of the switchboard benchmark (bench.c, w7_cache.c). */
#ifndef SB_BENCH_H
#define SB_BENCH_H

#include <stdatomic.h>
#include <stdint.h>
#include <pthread.h>
#include "switchboard.h"

/* The payload every workload's messages carry: malloc'd per message, freed by the
 * message's dtor (free). */
typedef struct payload {
    uint64_t seq;
    uint64_t t_ns; /* CLOCK_MONOTONIC when the message was built */
} payload;

extern sb_message_type *g_type;   /* the one message type of the benchmark */
extern sb_message_type *g_change; /* sb_subscription_change_type() */
extern double g_timeout_s;        /* bound on each wait of a workload */

uint64_t now_ns(void);
double secs_since(uint64_t t0);
/* A new message of g_type carrying a fresh payload; exits on failure. */
sb_message *make_msg(uint64_t seq);

/* End-to-end completion: `remaining` subscriptions still have to reach their target;
 * the last one records the end time and wakes the waiter. */
typedef struct completion {
    atomic_int remaining;
    _Atomic uint64_t end_ns;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
} completion;

void completion_init(completion *c);
void completion_destroy(completion *c);
void completion_reset(completion *c, int subs);
void completion_arrive(completion *c);
/* Waits until done or until the monotonic deadline (ns). 1: done, 0: timed out. */
int completion_wait(completion *c, uint64_t deadline_ns);

/* One result line: "<id> k=v k=v ...". */
typedef struct result {
    char id[8];
    int nkv;
    char key[8][24];
    double val[8];
    int prec[8];
} result;

void res_init(result *r, const char *id);
void res_add(result *r, const char *key, double val, int prec);
void res_print(const result *r);

#endif
