#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds (default 600) with nightly cargo-fuzz. New inputs go to a
# scratch corpus (not the committed seeds); crashes land in fuzz/artifacts/<target>/. Add a crash
# input to fuzz/corpus/<target>/ once fixed: the normal test suite replays that corpus on stable.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs="${SECS:-600}"
scratch="${SCRATCH:-/tmp/cfr-fuzz-corpus}"
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo +nightly fuzz list)
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "==> $t for ${secs}s"
    cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
        | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::average_exec_per_sec|==[0-9]+==|SUMMARY|Done)" || true
done
