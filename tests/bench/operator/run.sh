#!/usr/bin/env bash
# Operator benchmark: applies N ClusterApps (N = 1, 100, 300 by default) to
# the local control plane and prints, per N: seconds until every app's
# children exist, the operator's RSS, and API writes per steady-state
# reconcile (from the operator's own /metrics; each reconcile also makes one
# read: the app's Secret).
#
#   tests/bench/operator/run.sh [N ...]
# Env: CLUSTERAPP_TEST_KUBECONFIG (use a running control plane),
#      PROFILE=release|debug (default release), ADMIN_PORT (default 19190).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 100 300)
profile=${PROFILE:-release}
port=${ADMIN_PORT:-19190}

if [ "$profile" = release ]; then cargo build --release --quiet; bin=target/release/clusterapp
else cargo build --quiet; bin=target/debug/clusterapp; fi

if [ -n "${CLUSTERAPP_TEST_KUBECONFIG:-}" ]; then
  kubeconfig=$CLUSTERAPP_TEST_KUBECONFIG
else
  export CLUSTERAPP_STATE="$root/target/test-clusters/bench-operator"
  kubeconfig=$(bash tests/bed/cluster.sh up --owner-pid $$ | tail -1 | sed 's/^KUBECONFIG=//')
fi
export KUBECONFIG=$kubeconfig
source tests/bed/paths.sh 2>/dev/null || true
kubectl=${KUBECTL:-$(ls "$HOME"/.cache/clusterapp/kubernetes-*/bin/kubectl | tail -1)}

"$bin" crd | "$kubectl" apply --server-side --force-conflicts -f - >/dev/null
"$kubectl" wait --for=condition=Established crd/clusterapps.clusterapp.io --timeout=30s >/dev/null

lease_ns=bench-operator-$$
"$kubectl" create namespace "$lease_ns" >/dev/null
RUST_LOG=warn "$bin" operator --admin-listen "127.0.0.1:$port" --lease-namespace "$lease_ns" --identity bench >/tmp/clusterapp-bench-operator.log 2>&1 &
operator=$!
cleanup() { kill "$operator" 2>/dev/null || true; "$kubectl" delete namespace "$lease_ns" --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT

metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1==m {print $2}'; }
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && [ "$(metric clusterapp_operator_leader)" = 1 ]; do sleep 0.2; done

printf '%-6s %-22s %-14s %-30s\n' N seconds_to_children operator_RSS_MB api_writes_per_steady_reconcile
for n in "${counts[@]}"; do
  ns=bench-$n-$$
  "$kubectl" create namespace "$ns" >/dev/null
  manifest=$(mktemp)
  for i in $(seq 1 "$n"); do
    printf 'apiVersion: clusterapp.io/v1alpha1\nkind: ClusterApp\nmetadata: {name: app%d, namespace: %s}\nspec: {replicas: 1, image: registry.example/app:1}\n---\n' "$i" "$ns"
  done >"$manifest"
  start=$(date +%s.%N)
  "$kubectl" apply -f "$manifest" >/dev/null
  # The RoleBindings and the NetworkPolicy are the last children applied.
  until [ "$("$kubectl" -n "$ns" get rolebindings,networkpolicies -l app.kubernetes.io/managed-by=clusterapp-operator --no-headers 2>/dev/null | wc -l)" -ge $((n * 3)) ] \
     && [ "$("$kubectl" -n "$ns" get statefulsets,deployments,poddisruptionbudgets -l app.kubernetes.io/managed-by=clusterapp-operator --no-headers 2>/dev/null | wc -l)" -ge $((n * 3)) ]; do
    sleep 0.1
  done
  elapsed=$(echo "$(date +%s.%N) - $start" | bc)
  sleep 5 # let statuses settle
  rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$operator/status")
  # Steady state: touch every app (a label: no spec change) and count writes.
  r0=$(metric clusterapp_operator_reconciles_total); w0=$(metric clusterapp_operator_api_writes_total)
  "$kubectl" -n "$ns" label clusterapp --all "bench-touch=$(date +%s)" --overwrite >/dev/null
  sleep 5
  r1=$(metric clusterapp_operator_reconciles_total); w1=$(metric clusterapp_operator_api_writes_total)
  per=$(echo "scale=1; ($w1 - $w0) / ($r1 - $r0)" | bc 2>/dev/null || echo "?")
  printf '%-6s %-22.2f %-14s %-30s\n' "$n" "$elapsed" "$rss" "$per (over $((r1 - r0)) reconciles)"
  "$kubectl" delete namespace "$ns" --wait=false >/dev/null
  rm -f "$manifest"
done
