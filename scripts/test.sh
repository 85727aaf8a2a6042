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
# boringtun's timers (rekey, reject) on a mocked clock: a workspace of its own, so the mock never
# reaches a build of the nsm binaries; it shares the target directory to reuse their dependencies.
cargo test --manifest-path crates/wireguard/clock-tests/Cargo.toml --locked \
    --target-dir "${CARGO_TARGET_DIR:-target}" 2>&1 | tee -a "$log" || status=$?
# Kernel WireGuard: this machine's kernel has none, so those two tests run again in a QEMU guest
# whose kernel has it (there they must find it; here they only check its absence is handled).
if [[ "$(id -u)" -eq 0 ]]; then
  scripts/kernel-wg-test.sh 2>&1 | tee -a "$log" || status=$?
fi
# cargo prints one result line per test binary, the last often "0 passed" (doc-tests); close with
# the totals so the outcome reads at a glance.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
