#!/usr/bin/env bash
# `make demo`: the local cluster (control plane + three real nodes, each a
# kubelet with its own containerd), our images built from the repository's
# Dockerfiles and pulled from the local registry, the operator installed
# with the Helm chart, and the sample counter ClusterApp. Prints what to
# try; the last line before it waits is URL=… (the counter page through
# the balancer). Runs until Ctrl-C, then stops everything it started and
# checks that nothing is left.
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

cleanup() {
  trap - EXIT INT TERM
  step "stopping: the nodes (every container), the registry, the control plane"
  bash "$here/nodes/nodes.sh" down || true
}
trap 'exit 130' INT TERM

step "building our images with buildah (make images: cached, nothing rebuilds when nothing changed)"
bash "$here/nodes/images.sh"

step "starting the control plane (Kubernetes $KUBERNETES_VERSION) and three nodes"
trap cleanup EXIT
line="$(bash "$here/nodes/nodes.sh" up | tail -n 1)"
export KUBECONFIG="${line#KUBECONFIG=}"
"$kubectl" get nodes -o wide

step "installing the operator and the CRD with Helm (charts/clusterapp)"
"$helm" upgrade --install clusterapp charts/clusterapp --namespace clusterapp-system --create-namespace \
  --set operator.logFormat=pretty --wait --timeout 5m

step "applying the sample ClusterApp (deploy/examples/clusterapp.yaml, balancer Service as NodePort)"
"$kubectl" create namespace demo --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
sed 's/      type: ClusterIP/      type: NodePort/' deploy/examples/clusterapp.yaml | "$kubectl" apply -n demo -f -

step "waiting for ClusterApp counter to be Ready (3 Tomcat nodes start one after another)"
"$kubectl" wait -n demo clusterapp/counter --for=condition=Ready --timeout=10m
"$kubectl" get -n demo clusterapp counter
"$kubectl" get -n demo pods -o wide

port=""
for _ in $(seq 1 100); do
  port="$("$kubectl" get -n demo service counter -o jsonpath='{.spec.ports[0].nodePort}' 2>/dev/null || true)"
  [[ -n $port ]] && break
  sleep 0.2
done
[[ -n $port ]] || { echo "[demo] error: the balancer Service has no nodePort" >&2; exit 1; }
balancer_ip="$("$kubectl" get -n demo pods -l app.kubernetes.io/component=balancer -o jsonpath='{.items[0].status.podIP}')"
node_of_counter0="$("$kubectl" get -n demo pod counter-0 -o jsonpath='{.spec.nodeName}')"
node_number="${node_of_counter0##*node}"

cat <<EOF

clusterapp demo is running on three real nodes (10.201.0.11-13).

  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$kubectl
  alias crictl="$CRICTL_BIN/crictl"

Try:
  open the URL below and refresh: "Tambah = N" counts up, always on the same route
  kubectl get clusterapp -n demo -w                     # READY, SESSIONS per node, routes
  kubectl scale clusterapp/counter -n demo --replicas=5 # sessions stay, and move to the new nodes
  kubectl delete pod -n demo counter-1                  # drain and replace a node
  kubectl drain $node_of_counter0 --ignore-daemonsets --delete-emptydir-data   # a whole node
  kubectl logs -n demo counter-0 ; kubectl exec -n demo counter-0 -- ls /usr/local/tomcat
  kill -9 of a node's Tomcat:
    crictl --runtime-endpoint unix://$CLUSTERAPP_STATE/nodes/$node_number/containerd/containerd.sock ps --name tomcat
    crictl --runtime-endpoint ... inspect -o go-template --template '{{.info.pid}}' <id> | xargs kill -9
  balancer status page: http://$balancer_ip:9090/

Press Ctrl-C to stop and clean up.
URL=http://10.201.0.11:$port/counter/
EOF
# sleep in the background and wait: a signal then ends the wait at once
while true; do sleep 3600 & wait $!; done
