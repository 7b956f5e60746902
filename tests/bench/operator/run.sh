#!/usr/bin/env bash
# Operator benchmark: applies N ClusterApps (N = 1, 100, 300 by default) to
# the local control plane and reports, per N:
#   children_ready_s   seconds from the first create of the N apps until
#                      every child of every app exists (15 per app); the
#                      apps are POSTed by curl, 8 at a time, through
#                      `kubectl proxy` (kubectl's own start-up takes ~2 s
#                      on a loaded machine); create_s is that part
#   rss_mb             the operator's RSS once settled (peak: VmHWM)
#   api_requests_per_steady_reconcile
#                      requests (reads + writes) the operator sends per
#                      reconcile of a converged app: every app is touched
#                      (a label, no spec change) and the operator's own
#                      /metrics counters are compared
#   requests_to_converge, apiserver_cpu_s, operator_cpu_s
#                      what creating the N apps cost (operator requests,
#                      CPU seconds of kube-apiserver and of the operator)
# The operator runs like in a cluster: under its own ServiceAccount bound to
# deploy/operator-rbac.yaml (so the API server's priority and fairness
# treats it as a workload, not as an exempt admin); APF rejections and
# queueing of that priority level are printed.
#
#   tests/bench/operator/run.sh [N ...]
# Env: CLUSTERAPP_TEST_KUBECONFIG (use a running control plane),
#      PROFILE=release|debug (default release), CLUSTERAPP_BIN (a built
#      binary: no cargo build), ADMIN_PORT (default 19190; +1 for kubectl proxy),
#      OPERATOR_ARGS (extra flags, e.g. --max-concurrent-reconciles 32).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 100 300)
profile=${PROFILE:-release}
port=${ADMIN_PORT:-19190}

if [ -n "${CLUSTERAPP_BIN:-}" ]; then bin=$CLUSTERAPP_BIN
elif [ "$profile" = release ]; then cargo build --release --quiet; bin=target/release/clusterapp
else cargo build --quiet; bin=target/debug/clusterapp; fi

state=""
if [ -n "${CLUSTERAPP_TEST_KUBECONFIG:-}" ]; then
  kubeconfig=$CLUSTERAPP_TEST_KUBECONFIG
else
  state="$root/target/test-clusters/bench-operator"
  export CLUSTERAPP_STATE=$state
  kubeconfig=$(bash tests/bed/cluster.sh up --owner-pid $$ | tail -1 | sed 's/^KUBECONFIG=//')
fi
export KUBECONFIG=$kubeconfig
source tests/bed/paths.sh 2>/dev/null || true
kubectl=${KUBECTL:-$(ls "$HOME"/.cache/clusterapp/kubernetes-*/bin/kubectl | tail -1)}

# CPU seconds (user + system) of a process.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo "?"; }
apiserver_pid=""
if [ -n "$state" ] && [ -f "$state/pids" ]; then apiserver_pid=$(awk '$1=="kube-apiserver" {print $2}' "$state/pids"); fi
[ -n "$apiserver_pid" ] || apiserver_pid=$(pgrep -n -f "kube-apiserver.*$(sed -n 's/^ *server: https:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$kubeconfig" | head -1)" || true)

"$bin" crd | "$kubectl" apply --server-side --force-conflicts -f - >/dev/null
"$kubectl" wait --for=condition=Established crd/clusterapps.clusterapp.io --timeout=30s >/dev/null
# Refresh kubectl's discovery cache (it predates the CRD), so the timed
# `kubectl create` below does not rediscover the API first.
"$kubectl" get clusterapps -A >/dev/null 2>&1 || true

# The operator's identity: a ServiceAccount bound to the shipped ClusterRole.
lease_ns=bench-operator-$$
"$kubectl" create namespace "$lease_ns" >/dev/null
"$kubectl" -n "$lease_ns" create serviceaccount clusterapp-operator >/dev/null
sed "s/namespace: clusterapp-system/namespace: $lease_ns/" deploy/operator-rbac.yaml | "$kubectl" apply --server-side --force-conflicts -f - >/dev/null
"$kubectl" create clusterrolebinding "$lease_ns" --clusterrole clusterapp-operator --serviceaccount "$lease_ns:clusterapp-operator" >/dev/null
"$kubectl" -n "$lease_ns" create rolebinding leader-election --role clusterapp-operator-leader-election --serviceaccount "$lease_ns:clusterapp-operator" >/dev/null
token=$("$kubectl" -n "$lease_ns" create token clusterapp-operator --duration 2h)
operator_kubeconfig=$(mktemp)
"$kubectl" config view --raw --minify >"$operator_kubeconfig"
KUBECONFIG=$operator_kubeconfig "$kubectl" config set-credentials bench-operator --token "$token" >/dev/null
KUBECONFIG=$operator_kubeconfig "$kubectl" config set-context --current --user bench-operator >/dev/null

log=/tmp/clusterapp-bench-operator.log
# shellcheck disable=SC2086
KUBECONFIG=$operator_kubeconfig RUST_LOG=warn "$bin" operator --admin-listen "127.0.0.1:$port" --lease-namespace "$lease_ns" --identity bench ${OPERATOR_ARGS:-} >"$log" 2>&1 &
operator=$!
proxy=""
cleanup() {
  kill "$operator" 2>/dev/null || true
  [ -z "$proxy" ] || kill "$proxy" 2>/dev/null || true
  "$kubectl" delete clusterrolebinding "$lease_ns" --ignore-not-found >/dev/null 2>&1 || true
  "$kubectl" delete namespace "$lease_ns" --wait=false >/dev/null 2>&1 || true
  rm -f "$operator_kubeconfig"
  # A control plane this run started goes with it (the owner-pid watchdog
  # would stop it too, but only after a poll: a next run must not reuse it).
  [ -z "$state" ] || bash tests/bed/cluster.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1==m {print $2}'; }
# Sum of an API server metric over the series matching a label filter.
apf_metric() {
  "$kubectl" get --raw /metrics 2>/dev/null | awk -v m="$1" -v f="$2" 'index($1, m"{")==1 && index($1, f) {s += $2} END {printf "%g", s}'
}
# apiserver_request_total by verb and resource, summed over the other labels.
requests_by_kind() {
  "$kubectl" get --raw /metrics 2>/dev/null | awk '
    index($1, "apiserver_request_total{") == 1 {
      match($1, /resource="[^"]*"/); r = substr($1, RSTART + 10, RLENGTH - 11)
      match($1, /verb="[^"]*"/); v = substr($1, RSTART + 6, RLENGTH - 7)
      n[v " " r] += $2
    }
    END { for (k in n) print k, n[k] }' | sort
}
# Admin access without kubectl start-up per request.
proxy_port=$((port + 1))
"$kubectl" proxy --port "$proxy_port" >/dev/null 2>&1 &
proxy=$!
until curl -sf "http://127.0.0.1:$proxy_port/version" >/dev/null; do sleep 0.2; done
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && [ "$(metric clusterapp_operator_leader)" = 1 ]; do sleep 0.2; done

# How many children of ours exist in a namespace: metadata-only lists (what
# a poll costs the API server matters: it shares the cores being measured),
# each kind polled only until it has all of its objects (per app: 1 Secret,
# 1 ConfigMap, 3 Services, 2 ServiceAccounts, 2 Roles, 2 RoleBindings,
# 1 StatefulSet, 1 Deployment, 1 PodDisruptionBudget, 1 NetworkPolicy).
children_kinds="api/v1/secrets=1 api/v1/configmaps=1 api/v1/services=3 api/v1/serviceaccounts=2
  apis/rbac.authorization.k8s.io/v1/roles=2 apis/rbac.authorization.k8s.io/v1/rolebindings=2
  apis/apps/v1/statefulsets=1 apis/apps/v1/deployments=1 apis/policy/v1/poddisruptionbudgets=1
  apis/networking.k8s.io/v1/networkpolicies=1"
count_kind() {
  curl -s -H 'Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1' \
    "http://127.0.0.1:$proxy_port/${1%/*}/namespaces/$2/${1##*/}?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dclusterapp-operator" \
    | grep -oE '"kind": ?"PartialObjectMetadata"' | wc -l
}
count_children() {
  local entry total=0
  for entry in $children_kinds; do
    total=$((total + $(count_kind "${entry%=*}" "$1")))
  done
  echo "$total"
}
# Waits until every app in namespace $1 ($2 apps) has all its children.
wait_children() {
  local pending=$children_kinds entry left
  while [ -n "$pending" ]; do
    left=""
    for entry in $pending; do
      [ "$(count_kind "${entry%=*}" "$1")" -ge $(($2 * ${entry#*=})) ] || left="$left $entry"
    done
    pending=$left
    [ -z "$pending" ] || sleep 0.1
  done
}
summary=()
for n in "${counts[@]}"; do
  ns=bench-$n-$$
  "$kubectl" create namespace "$ns" >/dev/null
  # A curl config: one POST per app.
  manifest=$(mktemp)
  for i in $(seq 1 "$n"); do
    printf 'url = "http://127.0.0.1:%s/apis/clusterapp.io/v1alpha1/namespaces/%s/clusterapps"\n' "$proxy_port" "$ns"
    printf 'header = "Content-Type: application/json"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n'
    printf 'data = "{\\"apiVersion\\":\\"clusterapp.io/v1alpha1\\",\\"kind\\":\\"ClusterApp\\",\\"metadata\\":{\\"name\\":\\"app%d\\"},\\"spec\\":{\\"replicas\\":1,\\"image\\":\\"registry.example/app:1\\"}}"\n' "$i"
    [ "$i" = "$n" ] || printf 'next\n'
  done >"$manifest"
  q0=$(metric clusterapp_operator_api_requests_total)
  api0=$(cpu_s "$apiserver_pid"); op0=$(cpu_s "$operator")
  rejected0=$(apf_metric apiserver_flowcontrol_rejected_requests_total 'priority_level="workload-low"')
  # The API server compiles a CRD's schema and CEL rules on first use
  # (~2 s here): warm it with a dry-run create, so the first round measures
  # the operator, not that.
  curl -s -o /dev/null -X POST -H 'Content-Type: application/json' "http://127.0.0.1:$proxy_port/apis/clusterapp.io/v1alpha1/namespaces/$ns/clusterapps?dryRun=All" \
    -d '{"apiVersion":"clusterapp.io/v1alpha1","kind":"ClusterApp","metadata":{"name":"warm-up"},"spec":{"replicas":1,"image":"registry.example/app:1"}}'
  requests_by_kind >/tmp/clusterapp-bench-requests-before
  start=$(date +%s.%N)
  codes=$(curl -s --no-progress-meter --parallel --parallel-max 8 -K "$manifest" 2>/dev/null)
  [ "$(grep -c '^201$' <<<"$codes")" = "$n" ] || { echo "creating the apps failed: $(sort <<<"$codes" | uniq -c | tr '\n' ' ')" >&2; exit 1; }
  created=$(date +%s.%N)
  wait_children "$ns" "$n"
  end=$(date +%s.%N)
  elapsed=$(echo "$end - $start" | bc)
  create_s=$(echo "$created - $start" | bc)
  # Settled: no reconcile for 3 s (statuses written, controller-manager's
  # first updates of the StatefulSets/Deployments seen).
  prev=-1
  for _ in $(seq 1 60); do
    r=$(metric clusterapp_operator_reconciles_total)
    [ "$r" = "$prev" ] && break
    prev=$r; sleep 3
  done
  q1=$(metric clusterapp_operator_api_requests_total)
  api1=$(cpu_s "$apiserver_pid"); op1=$(cpu_s "$operator")
  rejected1=$(apf_metric apiserver_flowcontrol_rejected_requests_total 'priority_level="workload-low"')
  # What the API server served while the apps converged (every client:
  # operator, kubectl, controller-manager, scheduler), largest first.
  requests_by_kind >/tmp/clusterapp-bench-requests-after
  echo "apps=$n API server requests while converging (verb resource count), top 12:"
  join -a2 -e0 -o 0,1.2,2.2 <(awk '{print $1"/"$2, $3}' /tmp/clusterapp-bench-requests-before | sort) \
    <(awk '{print $1"/"$2, $3}' /tmp/clusterapp-bench-requests-after | sort) \
    | awk '{d = $3 - $2; if (d > 0) print d, $1}' | sort -rn | head -12 | sed 's/^/  /'
  rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$operator/status")
  hwm=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$operator/status")
  # Steady state: touch every app (a label: no spec change), wait until
  # each was reconciled, count requests.
  r0=$(metric clusterapp_operator_reconciles_total); w0=$(metric clusterapp_operator_api_requests_total)
  "$kubectl" -n "$ns" label clusterapp --all "bench-touch=$(date +%s)" --overwrite >/dev/null
  for _ in $(seq 1 100); do
    [ $(( $(metric clusterapp_operator_reconciles_total) - r0 )) -ge "$n" ] && break
    sleep 0.2
  done
  sleep 1
  r1=$(metric clusterapp_operator_reconciles_total); w1=$(metric clusterapp_operator_api_requests_total)
  per=$(echo "scale=2; ($w1 - $w0) / ($r1 - $r0)" | bc 2>/dev/null || echo "?")
  api_cpu=$(echo "$api1 - $api0" | bc 2>/dev/null || echo "?")
  op_cpu=$(echo "$op1 - $op0" | bc 2>/dev/null || echo "?")
  line=$(printf 'operator apps=%s children_ready_s=%.2f rss_mb=%s peak_rss_mb=%s api_requests_per_steady_reconcile=%s steady_reconciles=%s requests_to_converge=%s create_s=%.2f apiserver_cpu_s=%s operator_cpu_s=%s apf_rejected=%s' \
    "$n" "$elapsed" "$rss" "$hwm" "$per" "$((r1 - r0))" "$((q1 - q0))" "$create_s" "$api_cpu" "$op_cpu" "$(echo "$rejected1 - $rejected0" | bc)")
  echo "$line"
  summary+=("$line")
  # Remove this round's apps before the next one, so each N starts clean
  # (and its RSS is not inflated by the previous round's objects): the apps
  # first (the garbage collector removes their children), then the
  # namespace, without waiting for the namespace controller.
  "$kubectl" -n "$ns" delete clusterapps --all --wait=false >/dev/null
  for _ in $(seq 1 600); do
    [ "$(count_children "$ns")" -eq 0 ] && break
    sleep 0.5
  done
  "$kubectl" delete namespace "$ns" --wait=false >/dev/null
  rm -f "$manifest"
done
echo "APF (priority level workload-low, the operator's ServiceAccount): rejected=$(apf_metric apiserver_flowcontrol_rejected_requests_total 'priority_level="workload-low"') waited_requests=$(apf_metric apiserver_flowcontrol_request_wait_duration_seconds_count 'priority_level="workload-low"') wait_seconds_sum=$(apf_metric apiserver_flowcontrol_request_wait_duration_seconds_sum 'priority_level="workload-low"')"
echo "--- summary ---"
printf '%s\n' "${summary[@]}"
