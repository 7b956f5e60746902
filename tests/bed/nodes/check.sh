#!/usr/bin/env bash
# Checks that the real nodes work (not yet part of `make test`):
#   1. every Node is Ready; CoreDNS is available
#   2. the counter-app image, pulled from the local registry, runs as uid 1000
#      with a read-only root (a write to / fails) and becomes Ready (time printed)
#   3. a client Pod on another node: `kubectl exec` and `kubectl logs` work
#   4. a ClusterIP Service answers from that Pod, by name (cluster DNS)
#   4a. a NodePort on a node IP answers from the host; kubectl port-forward works
#   4b. the clusterapp image (static binary, nothing else) runs `clusterapp crd`
#   5. idle CPU and RSS of each kubelet and containerd (after the test Pods are gone)
#   6. with --down: `nodes.sh down`, which fails when anything is left
#      (processes, mounts, netns, bridges, nft tables, KUBE-* chains, cgroups,
#      host paths, sysctls)
#
#   tests/bed/nodes/check.sh [--up] [--down]    (--up: start the nodes first)
set -euo pipefail
LOG_TAG=check
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bed/nodes/lib.sh
source "$here/lib.sh"
repo="$NODES_REPO"
export CLUSTERAPP_STATE="${CLUSTERAPP_STATE:-$repo/target/cluster-nodes}"

do_up=0 do_down=0
for a in "$@"; do
  case "$a" in
    --up) do_up=1 ;;
    --down) do_down=1 ;;
    *) die "usage: check.sh [--up] [--down]" ;;
  esac
done

failures=0
pass() { printf '[check] ok    %s\n' "$*" >&2; }
fail() { printf '[check] FAIL  %s\n' "$*" >&2; failures=$((failures + 1)); }

# the images this check runs (cached: nothing is built when nothing changed)
bash "$here/images.sh" counter-app clusterapp

if (( do_up )); then
  t=$SECONDS
  line="$(bash "$here/nodes.sh" up | tail -n 1)"
  log "nodes.sh up took $((SECONDS - t)) s"
else
  line="$(bash "$here/nodes.sh" status | tail -n 1)" || die "the nodes are not running (tests/bed/nodes/nodes.sh up, or pass --up)"
fi
export KUBECONFIG="${line#KUBECONFIG=}"
k() { "$KUBE_BIN/kubectl" --request-timeout=20s "$@"; }
NS=nodes-check

# 1. Nodes
ready="$(k get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')"
n_ready="$(grep -c '=True$' <<< "$ready" || true)"
if (( n_ready >= 3 )); then pass "$n_ready nodes Ready: $(echo $ready)"; else fail "nodes Ready: $(echo $ready)"; fi
if k -n kube-system rollout status deployment/coredns --timeout=60s >/dev/null 2>&1; then pass "CoreDNS available"; else fail "CoreDNS not available"; fi

# 2. The counter app from the local registry, uid 1000, read-only root
k delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
k create namespace "$NS" >/dev/null
t_apply=$(date +%s.%N)
k apply -n "$NS" -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: counter, labels: {app: counter}}
spec:
  securityContext: {runAsUser: 1000, runAsGroup: 1000, runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: tomcat
    image: ghcr.io/clusterapp/counter-app:1.0
    imagePullPolicy: Always
    ports: [{containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /counter/, port: 8080}
      periodSeconds: 1
    securityContext:
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
    volumeMounts:
    - {name: logs, mountPath: /usr/local/tomcat/logs}
    - {name: temp, mountPath: /usr/local/tomcat/temp}
    - {name: work, mountPath: /usr/local/tomcat/work}
  volumes:
  - {name: logs, emptyDir: {}}
  - {name: temp, emptyDir: {}}
  - {name: work, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: counter}
spec:
  selector: {app: counter}
  ports: [{port: 80, targetPort: 8080}]
EOF
if k wait -n "$NS" pod/counter --for=condition=Ready --timeout=120s >/dev/null; then
  t_ready=$(date +%s.%N)
  pass "counter-app Pod Ready $(awk -v a="$t_apply" -v b="$t_ready" 'BEGIN {printf "%.1f", b - a}') s after apply (pull from the local registry included) on $(k get pod -n "$NS" counter -o jsonpath='{.spec.nodeName}')"
else
  fail "counter-app Pod not Ready"; k describe pod -n "$NS" counter | tail -n 20 >&2
fi
pulled="$(k get events -n "$NS" --field-selector involvedObject.name=counter,reason=Pulled -o jsonpath='{.items[*].message}' 2>/dev/null)"
[[ -n $pulled ]] && pass "image pulled: $pulled" || fail "no Pulled event for the counter Pod"
uid="$(k exec -n "$NS" counter -- id -u 2>&1)"
[[ $uid == 1000 ]] && pass "counter-app runs as uid 1000" || fail "counter-app uid: $uid"
if k exec -n "$NS" counter -- sh -c 'echo x > /probe' >/dev/null 2>&1; then
  fail "a write to / in the counter-app container succeeded"
else
  pass "a write to / in the counter-app container fails (read-only root)"
fi
if [[ "$(k logs -n "$NS" counter 2>/dev/null)" == *'Server startup in'* ]]; then pass "kubectl logs shows Tomcat's startup line"; else fail "kubectl logs: no 'Server startup in'"; fi

# 3. A client on another node
counter_node="$(k get pod -n "$NS" counter -o jsonpath='{.spec.nodeName}')"
k apply -n "$NS" -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  securityContext: {runAsUser: 1000, runAsNonRoot: true}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: NotIn, values: [$counter_node]}]}]
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: bed.clusterapp.local/debian:bookworm-jdk17
    command: [sleep, infinity]
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
EOF
if k wait -n "$NS" pod/client --for=condition=Ready --timeout=90s >/dev/null; then
  pass "client Pod Ready on $(k get pod -n "$NS" client -o jsonpath='{.spec.nodeName}') (counter on $counter_node)"
else
  fail "client Pod not Ready"; k describe pod -n "$NS" client | tail -n 20 >&2
fi
out="$(k exec -n "$NS" client -- sh -c 'id -u; cat /etc/resolv.conf' 2>&1)"
[[ $(head -1 <<< "$out") == 1000 ]] && pass "kubectl exec works (client uid 1000)" || fail "kubectl exec: $out"

# 4. Service by name (CoreDNS), from another node; kube-proxy programs a
# Service about a second after its Pod is Ready, so try for a while.
svc_ip="$(k get service -n "$NS" counter -o jsonpath='{.spec.clusterIP}')"
resolved=""
for _ in $(seq 1 20); do
  resolved="$(k exec -n "$NS" client -- getent hosts "counter.$NS.svc.cluster.local" 2>/dev/null | awk '{print $1}')" && [[ -n $resolved ]] && break
  sleep 0.5
done
[[ $resolved == "$svc_ip" ]] && pass "DNS: counter.$NS.svc.cluster.local -> $resolved (the ClusterIP)" || fail "DNS: counter.$NS.svc.cluster.local -> '$resolved', ClusterIP $svc_ip"
api="$(k exec -n "$NS" client -- getent hosts kubernetes.default 2>/dev/null | awk '{print $1}')"
[[ -n $api ]] && pass "DNS: kubernetes.default -> $api (short name through the search path)" || fail "DNS: kubernetes.default did not resolve"
answer=""
for _ in $(seq 1 20); do
  answer="$(k exec -n "$NS" client -- bash -c 'exec 3<>/dev/tcp/counter/80 && printf "GET /counter/ HTTP/1.0\r\nHost: counter\r\n\r\n" >&3 && head -n 1 <&3' 2>/dev/null | tr -d '\r')" || true
  [[ $answer == *" 200"* ]] && break
  sleep 0.5
done
[[ $answer == *" 200"* ]] && pass "the ClusterIP Service answers from a Pod on another node: $answer" || fail "Service http://counter/counter/ from the client: '$answer'"
code="$(k exec -n "$NS" client -- bash -c 'exec 3<>/dev/tcp/kubernetes.default.svc/443 && echo open' 2>/dev/null || true)"
[[ $code == open ]] && pass "the API server is reachable from a Pod through the kubernetes Service" || fail "kubernetes.default.svc:443 not reachable from a Pod"

# NodePort on a node IP (nftables mode has no 127.0.0.1 NodePorts), from the host.
k expose -n "$NS" pod counter --name counter-np --type NodePort --port 80 --target-port 8080 >/dev/null
np="$(k get service -n "$NS" counter-np -o jsonpath='{.spec.ports[0].nodePort}')"
code=""
for _ in $(seq 1 20); do
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://10.201.0.12:$np/counter/" || true)"
  [[ $code == 200 ]] && break
  sleep 0.5
done
[[ $code == 200 ]] && pass "NodePort $np on node IP 10.201.0.12 answers 200 (Pod on $counter_node)" || fail "NodePort 10.201.0.12:$np: '$code'"

# kubectl port-forward through the API server and the kubelet.
pf_log="$(mktemp)"
k port-forward -n "$NS" pod/counter 0:8080 >"$pf_log" 2>&1 &
pf_pid=$!
pf_port=""
for _ in $(seq 1 50); do
  pf_port="$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) .*/\1/p' "$pf_log" | head -n 1)"
  [[ -n $pf_port ]] && break
  sleep 0.2
done
code="$( [[ -n $pf_port ]] && curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$pf_port/counter/" || true)"
kill "$pf_pid" 2>/dev/null || true
wait "$pf_pid" 2>/dev/null || true
[[ $code == 200 ]] && pass "kubectl port-forward to the counter Pod answers 200" || fail "kubectl port-forward: '$code' ($(head -c 300 "$pf_log"))"
rm -f "$pf_log"

# The Tomcat start alone, image already on the node: a second Pod on the same node.
k apply -n "$NS" -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: counter2}
spec:
  nodeName: $counter_node
  securityContext: {runAsUser: 1000, runAsNonRoot: true}
  containers:
  - name: tomcat
    image: ghcr.io/clusterapp/counter-app:1.0
    readinessProbe: {httpGet: {path: /counter/, port: 8080}, periodSeconds: 1}
    securityContext: {readOnlyRootFilesystem: true}
    volumeMounts: [{name: t, mountPath: /usr/local/tomcat/temp}, {name: w, mountPath: /usr/local/tomcat/work}, {name: l, mountPath: /usr/local/tomcat/logs}]
  volumes: [{name: t, emptyDir: {}}, {name: w, emptyDir: {}}, {name: l, emptyDir: {}}]
EOF
t0=$(date +%s.%N)
if k wait -n "$NS" pod/counter2 --for=condition=Ready --timeout=120s >/dev/null; then
  pass "Tomcat Pod (image cached) Ready $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s after apply"
else
  fail "counter2 not Ready"
fi

# 4b. The clusterapp image: non-root, read-only root, prints the CRD.
k apply -n "$NS" -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: clusterapp-crd}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true}
  containers:
  - name: clusterapp
    image: ghcr.io/clusterapp/clusterapp:0.1.0
    args: [crd]
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
EOF
if k wait -n "$NS" pod/clusterapp-crd --for=jsonpath='{.status.phase}'=Succeeded --timeout=90s >/dev/null \
   && [[ "$(k logs -n "$NS" clusterapp-crd)" == *'kind: CustomResourceDefinition'* ]]; then
  pass "the clusterapp image runs (uid 65532 from the image, runAsNonRoot): 'clusterapp crd' printed the CRD"
else
  fail "the clusterapp image: $(k get pod -n "$NS" clusterapp-crd -o jsonpath='{.status.containerStatuses[0].state}')"
fi

k delete namespace "$NS" --wait=true --timeout=60s >/dev/null || fail "namespace $NS not deleted"

# 5. Idle cost of the nodes' daemons over 20 s
state="$(cd "$CLUSTERAPP_STATE" && pwd)"
sleep 5
declare -A t_before
hz=$(getconf CLK_TCK)
while read -r name pid; do
  [[ $name == kubelet-* || $name == containerd-* || $name == kube-proxy ]] || continue
  t_before[$name]="$(awk '{print $14 + $15}' /proc/$pid/stat)"
done < "$state/nodes.pids"
sleep 20
while read -r name pid; do
  [[ -n ${t_before[$name]:-} ]] || continue
  cpu="$(awk -v a="${t_before[$name]}" -v hz="$hz" '{printf "%.2f", ($14 + $15 - a) / hz / 20 * 100}' /proc/$pid/stat)"
  rss="$(awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' /proc/$pid/status)"
  log "idle: $name ${cpu}% of a core, ${rss} MiB RSS"
done < "$state/nodes.pids"

# 6. Teardown
if (( do_down )); then
  if bash "$here/nodes.sh" down; then pass "teardown left nothing"; else fail "teardown left something (above)"; fi
fi

if (( failures )); then log "$failures check(s) failed"; exit 1; fi
log "all checks passed"
