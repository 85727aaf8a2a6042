#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# Tests start their own registries and etcd servers on loopback and clean up after themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --workspace --locked "$@"
