#!/usr/bin/env bash
# The fuzzers as a check (CI and `make fuzz-smoke`): builds both targets, replays their
# committed corpora (every input that ever found new coverage, the regression part), then
# fuzzes each for a bounded time with new inputs.
#
#   FUZZ_SECONDS   seconds of new inputs for api_sequence (default 120; cluster_wire gets
#                  half). 0 replays the corpora only.
#
# LeakSanitizer's reports are off (-detect_leaks=0): about once every few minutes of
# fuzzing it reports the bookkeeping of live library threads as leaked, and no such
# report has ever reproduced (see README.md, "LeakSanitizer and library threads"); the
# target's own teardown checks still catch a topic, message, subscription or thread
# left behind. New inputs go to a scratch directory, never into the committed corpora;
# a failing input is printed in base64, so it can be replayed anywhere.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-120}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
echo "# building the fuzz targets" >&2
RUSTC_BOOTSTRAP=1 cargo fuzz build api_sequence
RUSTC_BOOTSTRAP=1 cargo fuzz build cluster_wire
bin=target/$(rustc -vV | sed -n 's/^host: //p')/release

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# run TARGET SECONDS: replays the corpus, then fuzzes for SECONDS.
run() {
    local target=$1 secs=$2
    local out="$scratch/$target"
    mkdir -p "$out/new" "$out/artifacts"
    local common=(-rss_limit_mb=4096 -timeout=60 -detect_leaks=0 -artifact_prefix="$out/artifacts/")
    echo "== $target: replaying corpus/$target ($(ls "corpus/$target" | wc -l) inputs)"
    if ! ASAN_OPTIONS=detect_leaks=0 "$bin/$target" "${common[@]}" -runs=0 "corpus/$target" \
        >"$out/replay.log" 2>&1; then
        report "$target" "$out" "$out/replay.log"
        return 1
    fi
    tail -n 1 "$out/replay.log"
    [ "$secs" -gt 0 ] || return 0
    echo "== $target: $secs s of new inputs"
    if ! ASAN_OPTIONS=detect_leaks=0 "$bin/$target" "${common[@]}" \
        -max_total_time="$secs" "$out/new" "corpus/$target" >"$out/fuzz.log" 2>&1; then
        report "$target" "$out" "$out/fuzz.log"
        return 1
    fi
    tail -n 1 "$out/fuzz.log"
}

report() {
    local target=$1 out=$2 log=$3
    echo "!! $target failed; the end of its log:" >&2
    tail -n 60 "$log" >&2
    for f in "$out"/artifacts/*; do
        [ -e "$f" ] || continue
        echo "!! input $(basename "$f") (base64; decode it to a file and replay it with" \
            "'fuzz/$bin/$target FILE'; for api_sequence SB_FUZZ_TRACE=1 prints its operations):" >&2
        base64 -w 0 "$f" >&2
        echo >&2
    done
}

status=0
run api_sequence "$seconds" || status=1
run cluster_wire $((seconds / 2)) || status=1
exit $status
