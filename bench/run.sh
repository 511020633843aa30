#!/usr/bin/env bash
# Builds the library (release), the W0 crate and the benchmark, then runs the benchmark
# with this script's arguments (see `bash bench/run.sh -h`).
#
#   bash bench/run.sh --stats-cost [-n ROUNDS]
# measures what the statistics cost: it also builds the library with the `no-stats`
# feature (counters compiled out) and a second copy of the benchmark against it, runs
# W1-W4 with each, alternating by round (which goes first alternates too), and prints
# `R <id> stats/no-stats=<median of the per-round ratios of msgs_per_s>`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

CC="${CC:-cc}"
out="$here/build"
mkdir -p "$out"

stats_cost=0
rounds=5
if [ "${1:-}" = "--stats-cost" ]; then
    stats_cost=1
    shift
    if [ "${1:-}" = "-n" ]; then rounds="$2"; shift 2; fi
fi

if [ "$stats_cost" = 1 ]; then
    # Same features but no-stats; the copy keeps its soname's name for the loader.
    echo "# building libswitchboard (release, no-stats)" >&2
    cargo build --release --quiet --features no-stats
    mkdir -p "$out/nostats"
    cp target/release/libswitchboard.so "$out/nostats/libswitchboard.so"
    cp target/release/libswitchboard.so "$out/nostats/libswitchboard.so.0"
fi
echo "# building libswitchboard (release)" >&2
cargo build --release --quiet
echo "# building bench/w0 (release)" >&2
cargo build --release --quiet --manifest-path "$here/w0/Cargo.toml"

libdir="$root/target/release"
w0lib="$here/w0/target/release/libsbbench_w0.a"
srcs=("$here/bench.c" "$here/cluster.c")
defs=()
if grep -q sb_cache_create "$root/include/switchboard.h"; then
    srcs+=("$here/w7_cache.c")
    defs+=(-DSB_BENCH_W7)
else
    echo "# include/switchboard.h has no cache API yet: W7 is skipped" >&2
fi

if grep -q sb_publish_after "$root/include/switchboard.h"; then
    srcs+=("$here/w11_timers.c")
    defs+=(-DSB_BENCH_W11)
else
    echo "# include/switchboard.h has no timer API yet: W11 is skipped" >&2
fi

echo "# compiling bench" >&2
"$CC" -O2 -std=c11 -pthread -Wall -Wextra -I"$root/include" -I"$here" "${defs[@]}" \
    -o "$out/bench" "${srcs[@]}" \
    -L"$libdir" -lswitchboard -Wl,-rpath,"$libdir" "$w0lib" -ldl -lm

if [ "$stats_cost" = 1 ]; then
    echo "# compiling bench against the no-stats library" >&2
    "$CC" -O2 -std=c11 -pthread -Wall -Wextra -I"$root/include" -I"$here" "${defs[@]}" \
        -o "$out/bench-nostats" "${srcs[@]}" \
        -L"$out/nostats" -lswitchboard -Wl,-rpath,"$out/nostats" "$w0lib" -ldl -lm
    log="$out/stats-cost.txt"
    : > "$log"
    for ((k = 0; k < rounds; k++)); do
        if ((k % 2 == 0)); then order="stats nostats"; else order="nostats stats"; fi
        for which in $order; do
            bin="$out/bench"; [ "$which" = nostats ] && bin="$out/bench-nostats"
            "$bin" -w W1,W2,W3,W4 -n 1 | grep '^W' | sed "s/^/$k $which /" | tee -a "$log"
        done
    done
    python3 - "$log" <<'EOF2'
import re, statistics, sys
fig = {}
for line in open(sys.argv[1]):
    k, which, wid, rest = line.split(None, 3)
    m = re.search(r"msgs_per_s=([0-9.e+]+)", rest)
    if m and "timeout=" not in rest:
        fig[(k, which, wid)] = float(m.group(1))
for wid in ("W1", "W2", "W3", "W4"):
    r = [fig[(k, "stats", w)] / fig[(k, "nostats", w)]
         for (k, which, w) in fig if w == wid and which == "stats" and (k, "nostats", w) in fig]
    if r:
        print("R %s stats/no-stats=%.3f [%.3f..%.3f] rounds=%d"
              % (wid, statistics.median(r), min(r), max(r), len(r)))
EOF2
    exit 0
fi

# C1-C5 start their own nats-server (make nats-server installs it)
if [ -z "${SB_NATS_SERVER:-}" ] && [ -x "$root/.tools/nats/bin/nats-server" ]; then
    export SB_NATS_SERVER="$root/.tools/nats/bin/nats-server"
fi

echo "# running" >&2
exec "$out/bench" "$@"
