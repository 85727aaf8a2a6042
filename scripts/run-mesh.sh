#!/usr/bin/env bash
# The main job: builds nsm, starts a registry on the embedded store, creates the design document's
# objects with nsmctl, shows them, and keeps the registry running until Ctrl-C.
#
#   scripts/run-mesh.sh            # registry on tcp://127.0.0.1:5002, data in ./.nsm-data
#   NSM_DATA_DIR=/var/lib/nsm/registry scripts/run-mesh.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked -p nsm -p nsmctl
bin=target/release
data=${NSM_DATA_DIR:-$PWD/.nsm-data}
url=${NSM_REGISTRY_LISTEN:-tcp://127.0.0.1:5002}
mkdir -p "$data"
"$bin/nsm" registry --listen "$url" --data-dir "$data" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT INT TERM
export NSM_REGISTRY=$url
for _ in $(seq 100); do "$bin/nsmctl" get nodes >/dev/null 2>&1 && break; sleep 0.05; done
run() { echo "\$ nsmctl $*"; "$bin/nsmctl" "$@" || true; }
# The design document's commands (the third, `client create`, needs the nsm-node daemon).
run ns create istio-namespace --namespace=istio-system
run endpoint create vm-endpoint --address=10.0.0.5
run node create physical-server-1 --address 192.0.2.10 --labels site=onprem
run ns create mesh-net --type vl3 --cidr 172.16.0.0/16
run get ns -A
run get endpoints -A
run get nodes
run describe ns istio-namespace -n istio-system
echo
echo "registry running on $url (data in $data); try: NSM_REGISTRY=$url $bin/nsmctl get ns -A"
echo "press Ctrl-C to stop"
wait $pid
