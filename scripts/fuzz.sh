#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that take hostile input (fuzz/, cargo-fuzz):
# builds every target once, runs each for SECONDS (default 60) one after another, and
# prints per target the executions, the corpus size and whether it crashed. Exits
# nonzero when any target found a crash, panic, leak, timeout or failed invariant; the
# input is then in fuzz/artifacts/TARGET/ (replay it with
# `cargo fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-…`).
#
# Usage: scripts/fuzz.sh [SECONDS]        TARGETS="digest record" scripts/fuzz.sh 30
# Needs cargo-fuzz (`cargo install cargo-fuzz`); works on stable with --sanitizer none.
# Grown corpora stay in fuzz/corpus/TARGET (not committed); seeds are fuzz/seeds/TARGET.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
targets=${TARGETS:-"digest reference image_json record import unpack"}
# Largest input per target: archives and layers need room for a few tar blocks.
max_len() { case $1 in import | unpack) echo 65536 ;; *) echo 4096 ;; esac; }

start=$(date +%s)
cargo fuzz build --sanitizer none 2>&1 | grep -Ev '^\s+(Compiling|Downloaded|Downloading)' || true
[ -x target/x86_64-unknown-linux-gnu/release/digest ] || { echo "fuzz build failed" >&2; exit 1; }
built=$(date +%s)
echo "build: $((built - start)) s"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
summary=()
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    t0=$(date +%s)
    rc=0
    cargo fuzz run --sanitizer none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=20 \
        -rss_limit_mb=4096 -print_final_stats=1 > "$logs/$t" 2>&1 || rc=$?
    t1=$(date +%s)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t" | tail -1)
    after=$(find "artifacts/$t" -type f | wc -l)
    corpus=$(find "corpus/$t" -type f | wc -l)
    if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
        failed=1
        verdict="CRASH (exit $rc): $(find "artifacts/$t" -type f -newer "$logs" | tr '\n' ' ')"
        echo "---- $t: last lines of its log"
        grep -v '^#' "$logs/$t" | tail -30
    else
        verdict="ok"
    fi
    summary+=("$(printf '%-11s %10s execs %5s s  corpus %5s  %s' "$t" "${execs:-?}" "$((t1 - t0))" "$corpus" "$verdict")")
done
echo "== fuzz summary (${secs} s per target, total $(($(date +%s) - start)) s incl. build)"
printf '%s\n' "${summary[@]}"
exit "$failed"
