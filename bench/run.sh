#!/usr/bin/env bash
# Builds the library (release), the W0 crate and the benchmark, then runs the benchmark
# with this script's arguments (see `bash bench/run.sh -h`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

CC="${CC:-cc}"
out="$here/build"
mkdir -p "$out"

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

echo "# compiling bench" >&2
"$CC" -O2 -std=c11 -pthread -Wall -Wextra -I"$root/include" -I"$here" "${defs[@]}" \
    -o "$out/bench" "${srcs[@]}" \
    -L"$libdir" -lswitchboard -Wl,-rpath,"$libdir" "$w0lib" -ldl -lm

# C1-C5 start their own nats-server (make nats-server installs it)
if [ -z "${SB_NATS_SERVER:-}" ] && [ -x "$root/.tools/nats/bin/nats-server" ]; then
    export SB_NATS_SERVER="$root/.tools/nats/bin/nats-server"
fi

echo "# running" >&2
exec "$out/bench" "$@"
