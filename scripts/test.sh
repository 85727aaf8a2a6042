#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# Tests start their own registries and etcd servers on loopback and clean up after themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
# cargo prints one result line per test binary, the last often "0 passed" (doc-tests); close with
# the totals so the outcome reads at a glance.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
