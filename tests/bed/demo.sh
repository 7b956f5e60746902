#!/usr/bin/env bash
# `make demo`: the local cluster (control plane + process kubelet), the
# operator installed with the Helm chart, and the sample counter ClusterApp.
# Prints what to try; the last line before it waits is URL=… (the counter
# page through the balancer). Runs until Ctrl-C, then stops everything it
# started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
export CLUSTERAPP_STATE="${CLUSTERAPP_STATE:-$repo/target/cluster-demo}"
# shellcheck source=tests/bed/paths.sh
source "$here/paths.sh"
kubectl="$KUBE_BIN/kubectl"
helm="$HELM_BIN/helm"
step() { printf '\n[demo] %s\n' "$*" >&2; }

kubelet_pid=""
cleanup() {
  trap - EXIT INT TERM
  step "stopping: the ClusterApp, the kubelet (and every Pod process), the control plane"
  if [[ -n $kubelet_pid ]] && kill -0 "$kubelet_pid" 2>/dev/null; then
    kill -TERM "$kubelet_pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$kubelet_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$kubelet_pid" 2>/dev/null || true
  fi
  bash "$here/cluster.sh" down || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "building clusterapp and the process kubelet (cargo build)"
cargo build --locked --workspace --bins

step "starting the control plane (Kubernetes $KUBERNETES_VERSION)"
line="$(bash "$here/cluster.sh" up | tail -n 1)"
export KUBECONFIG="${line#KUBECONFIG=}"

step "starting the process kubelet (Pods run as local processes, one network namespace each)"
mkdir -p "$CLUSTERAPP_STATE/kubelet-demo"
rm -f "$CLUSTERAPP_STATE/kubelet-demo/kubelet/ready"
# In its own session, like the control plane: Ctrl-C reaches this script,
# whose cleanup stops the kubelet (and its Pods) while the API server runs.
setsid "$repo/target/debug/clusterapp-kubelet" run \
  --kubeconfig "$CLUSTERAPP_STATE/node.kubeconfig" --admin-kubeconfig "$KUBECONFIG" \
  --state-dir "$CLUSTERAPP_STATE/kubelet-demo" --images "$repo/tests/kubelet/images.yaml" \
  --clusterapp-bin "$repo/target/debug/clusterapp" --owner-pid $$ \
  >"$CLUSTERAPP_STATE/kubelet-demo/kubelet.log" 2>&1 &
kubelet_pid=$!
for _ in $(seq 1 600); do
  [[ "$(cat "$CLUSTERAPP_STATE/kubelet-demo/kubelet/ready" 2>/dev/null)" == "$kubelet_pid" ]] && break
  kill -0 "$kubelet_pid" 2>/dev/null || { tail -20 "$CLUSTERAPP_STATE/kubelet-demo/kubelet.log" >&2; exit 1; }
  sleep 0.2
done

step "installing the operator and the CRD with Helm (charts/clusterapp)"
"$helm" upgrade --install clusterapp charts/clusterapp --namespace clusterapp-system --create-namespace \
  --set operator.logFormat=pretty --wait --timeout 5m

step "applying the sample ClusterApp (deploy/examples/clusterapp.yaml, balancer Service as NodePort)"
"$kubectl" create namespace demo --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
sed 's/      type: ClusterIP/      type: NodePort/' deploy/examples/clusterapp.yaml | "$kubectl" apply -n demo -f -

step "waiting for ClusterApp counter to be Ready (3 Tomcat nodes start one after another)"
"$kubectl" wait -n demo clusterapp/counter --for=condition=Ready --timeout=10m
"$kubectl" get -n demo clusterapp counter

port=""
for _ in $(seq 1 100); do
  port="$("$kubectl" get -n demo service counter -o jsonpath='{.spec.ports[0].nodePort}' 2>/dev/null || true)"
  [[ -n $port ]] && break
  sleep 0.2
done
[[ -n $port ]] || { echo "[demo] error: the balancer Service has no nodePort" >&2; exit 1; }
balancer_ip="$("$kubectl" get -n demo pods -l app.kubernetes.io/component=balancer -o jsonpath='{.items[0].status.podIP}')"

cat <<EOF

clusterapp demo is running.

  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$kubectl

Try:
  open the URL below and refresh: "Tambah = N" counts up, always on the same route
  kubectl get clusterapp -n demo -w                     # READY, routes
  kubectl scale clusterapp/counter -n demo --replicas=5 # sessions stay
  kubectl delete pod -n demo counter-1                  # drain and replace a node
  kill -9 of a node: pgrep -f 'counter-0' | head -1 | xargs kill -9
  balancer status page: http://$balancer_ip:9090/

Press Ctrl-C to stop and clean up.
URL=http://127.0.0.1:$port/counter/
EOF
# sleep in the background and wait: a signal then ends the wait at once
while true; do sleep 3600 & wait $!; done
