/* Cluster workloads C1-C5 of the benchmark (cluster.c). */
#ifndef SB_BENCH_CLUSTER_H
#define SB_BENCH_CLUSTER_H

#include "bench.h"

/* Runs C<w> (1..5) into r; starts the run's nats-server on first use. -1 (and
 * `skipped=1` in r) when no server is available. */
int bench_cluster(int w, result *r);
/* Stops the run's nats-server (by its PID) and removes its temp dir. */
void cluster_cleanup(void);
/* The same from the watchdog, about to _exit: SIGKILL and remove. */
void cluster_emergency_cleanup(void);
/* `bench --node ...`: the child node's main. */
int cluster_node_main(int argc, char **argv);
int cmp_u64_asc(const void *x, const void *y);

#endif
