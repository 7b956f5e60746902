#!/usr/bin/env bash
# `make demo`: the local cluster with the operator and a sample ClusterApp.
# Today it starts the local control plane; the process kubelet, the operator
# and the sample app join as their issues land. Runs until Ctrl-C, then stops
# everything it started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export CLUSTERAPP_STATE="${CLUSTERAPP_STATE:-$repo/target/cluster-demo}"
# shellcheck source=tests/bed/paths.sh
source "$here/paths.sh"

cleanup() { bash "$here/cluster.sh" down || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

line="$(bash "$here/cluster.sh" up | tail -n 1)"
cat <<EOF

The local control plane is running (Kubernetes $KUBERNETES_VERSION, built from Go modules):

  export $line
  $KUBE_BIN/kubectl get namespaces

Not here yet: the process kubelet that runs Pods as local processes, the
operator and the sample counter ClusterApp with its balancer URL. They land
with their issues; until then this demo stops at the control plane.

Press Ctrl-C to stop it.
EOF
while true; do sleep 3600; done
