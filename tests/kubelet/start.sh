#!/usr/bin/env bash
# Starts the process kubelet for the control plane in $CLUSTERAPP_STATE
# (default <repo>/target/cluster) in the background and waits until its Node
# is registered:
#   tests/kubelet/start.sh [--owner-pid PID]
# Builds clusterapp-kubelet and clusterapp first (incremental). Log:
# $CLUSTERAPP_STATE/kubelet.log. The last line printed is KUBELET_PID=<pid>;
# stop it with `kill -TERM <pid>` (it then stops every Pod and removes its
# network namespaces, veths and bridge), or pass --owner-pid so it stops when
# that process exits. Needs root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
STATE="${CLUSTERAPP_STATE:-$repo/target/cluster}"
[[ -f $STATE/node.kubeconfig ]] || { echo "[kubelet] no $STATE/node.kubeconfig: start the control plane first (tests/bed/cluster.sh up)" >&2; exit 1; }
STATE="$(cd "$STATE" && pwd)"

echo "[kubelet] building clusterapp-kubelet and clusterapp" >&2
(cd "$repo" && cargo build --quiet -p clusterapp-kubelet --bin clusterapp-kubelet && cargo build --quiet --bin clusterapp)
target="${CARGO_TARGET_DIR:-$repo/target}"

rm -f "$STATE/kubelet/ready"
"$target/debug/clusterapp-kubelet" run \
  --kubeconfig "$STATE/node.kubeconfig" \
  --admin-kubeconfig "$STATE/admin.kubeconfig" \
  --state-dir "$STATE" \
  --images "$here/images.yaml" \
  --clusterapp-bin "$target/debug/clusterapp" \
  "$@" </dev/null >"$STATE/kubelet.log" 2>&1 &
pid=$!

deadline=$((SECONDS + 240))
until [[ "$(cat "$STATE/kubelet/ready" 2>/dev/null)" == "$pid" ]]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "[kubelet] exited before it was ready; last lines of $STATE/kubelet.log:" >&2
    tail -n 20 "$STATE/kubelet.log" >&2
    exit 1
  fi
  (( SECONDS < deadline )) || { echo "[kubelet] not ready after 240 s (log: $STATE/kubelet.log)" >&2; kill -TERM "$pid"; exit 1; }
  sleep 0.2
done
echo "[kubelet] node clusterapp-node ready (pid $pid, log $STATE/kubelet.log, pods in $STATE/kubelet/pods)" >&2
echo "KUBELET_PID=$pid"
