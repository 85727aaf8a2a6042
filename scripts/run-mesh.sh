#!/usr/bin/env bash
# The main job: builds nsm, nsmctl and nsm-demo (which `nsm demo` runs) and runs `nsm demo` (as
# root) — a test bed on this machine with a Kubernetes-like host and its pod, a physical server
# running nsm, and a VM at 10.0.0.5 without nsm; a registry on the embedded store and an
# `nsm node` per host; the design document's nsmctl commands; and proof that traffic flows (ping,
# TCP, counters). The mesh stays up until Ctrl-C, then everything it created is removed.
#
#   scripts/run-mesh.sh             # keep the mesh up until Ctrl-C
#   scripts/run-mesh.sh --once      # build, prove, tear down, exit
#   scripts/run-mesh.sh --down      # remove what a killed demo left behind
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "run-mesh.sh needs root: the demo creates network namespaces and links" >&2
  exit 1
fi
scripts/deps.sh
cargo build --release --locked -p nsm -p nsmctl -p nsm-demo
exec target/release/nsm demo "$@"
