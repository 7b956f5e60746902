#!/usr/bin/env bash
# The local Kubernetes control plane: etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler as plain processes on loopback.
#
#   tests/bed/cluster.sh up [--owner-pid PID]
#       Start (or reuse) the control plane whose state lives in $CLUSTERAPP_STATE
#       (default: <repo>/target/cluster). The last line printed is
#       KUBECONFIG=<admin kubeconfig>. With --owner-pid the control plane is
#       stopped when that process exits (test binaries use this).
#   tests/bed/cluster.sh down
#       Stop exactly the processes `up` started (by PID) and wipe the state.
#   tests/bed/cluster.sh status
#       Say whether it runs, and print KUBECONFIG=... when it does.
#
# Environment: CLUSTERAPP_STATE (state folder), CLUSTERAPP_CACHE (binaries),
# CLUSTERAPP_APISERVER_EXTRA_SANS (more subjectAltNames for the serving
# certificate, e.g. IP:10.200.0.1), CLUSTERAPP_APISERVER_EXTRA_ARGS (more
# kube-apiserver flags, split on spaces), CLUSTERAPP_APISERVER_ADDRESS (real
# nodes, tests/bed/nodes/nodes.sh: the API server listens on and advertises
# this local address instead of 127.0.0.1, so Pods reach it through the
# `kubernetes` Service, whose endpoint it maintains; it also gets a client
# certificate for the kubelets and checks theirs against the cluster CA).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=tests/bed/paths.sh
source "$here/paths.sh"
# shellcheck source=tests/bed/pki.sh
source "$here/pki.sh"

STATE="${CLUSTERAPP_STATE:-$repo/target/cluster}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PKI="$STATE/pki"
LOGS="$STATE/logs"
PIDS="$STATE/pids"          # lines: NAME PID
PORTS="$STATE/ports.env"    # ETCD_PORT=… APISERVER_PORT=… …
ADMIN_KUBECONFIG="$STATE/admin.kubeconfig"
# numbers for Service objects only: nothing routes there (real nodes use a
# range of their own, so their kube-proxy never takes another cluster's IPs)
SERVICE_CIDR="${CLUSTERAPP_SERVICE_CIDR:-10.96.0.0/16}"
SERVICE_IP="${CLUSTERAPP_SERVICE_IP:-10.96.0.1}"  # the "kubernetes" Service (kube-proxy forwards it to the API server)
APISERVER_ADDRESS="${CLUSTERAPP_APISERVER_ADDRESS:-127.0.0.1}"

log() { printf '[cluster] %s\n' "$*" >&2; }
# One `up` or `down` at a time per state folder: a watchdog's `down` for an
# owner that just exited must not interleave with the next run's `up`.
# Started processes do not inherit the lock (9>&-).
lock_state() {
  exec 9>"$STATE/.lock"
  flock 9
}
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

for tool in openssl curl; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is missing: install the Debian package '$tool' (apt-get install $tool, or run tests/bed/apt-deps.sh)"
done

# --- processes --------------------------------------------------------------

# A PID in $PIDS is ours only while it still runs a binary with our state
# folder on its command line; a reused PID of some other process is not.
# While a process is being replaced (exec) or is a zombie, its command line
# reads empty (or fails): look again shortly rather than take it for gone.
is_ours() {
  local pid="$1" cmd tries
  for tries in 1 2 3 4 5 6 7 8 9 10; do
    [[ -r /proc/$pid/cmdline ]] || return 1
    cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || cmd=""
    if [[ -n $cmd ]]; then
      [[ $cmd == *"$STATE/"* ]]
      return
    fi
    proc_alive "$pid" || return 1
    sleep 0.05
  done
  return 1
}

stop_all() {
  [[ -f $PIDS ]] || return 0
  local name pid alive=() started=()
  # stop in reverse start order: scheduler, controller-manager, apiserver, etcd
  while read -r name pid; do
    if is_ours "$pid"; then
      started+=("$pid $(proc_state "$pid" | cut -d' ' -f2)")
      kill -TERM "$pid" 2>/dev/null || true
      alive+=("$pid")
    fi
  done < <(tac "$PIDS")
  local deadline=$((SECONDS + 15))
  for pid in "${alive[@]}"; do
    while is_ours "$pid" && (( SECONDS < deadline )); do sleep 0.2; done
    if is_ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  # is_ours lets go of a process whose command line reads empty: it is
  # exiting, but on a busy machine it can take a while longer to be gone.
  # Return only when each is gone or a zombie (its start time tells a
  # reused PID apart), so that nothing of ours runs after `down`.
  local entry state
  deadline=$((SECONDS + 10))
  for entry in "${started[@]}"; do
    pid="${entry% *}"
    while state="$(proc_state "$pid")" && [[ -n $state && ${state% *} != Z && ${state#* } == "${entry#* }" ]] &&
      ((SECONDS < deadline)); do
      sleep 0.05
    done
  done
  rm -f "$PIDS"
}

watchdogs_stop() {
  local f
  for f in "$STATE"/watchdog.*.pid; do
    [[ -e $f ]] || continue
    local pid; pid="$(cat "$f")"
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "cluster.sh"; then
      [[ $pid != "${WATCHDOG_SELF:-}" ]] && kill -TERM "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

all_running() {
  [[ -f $PIDS ]] || return 1
  local name pid n=0
  while read -r name pid; do is_ours "$pid" || return 1; n=$((n + 1)); done < "$PIDS"
  (( n == 4 ))
}

apiserver_ready() {
  # shellcheck disable=SC1090
  source "$PORTS"
  [[ "$(curl -s --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
        "https://$APISERVER_ADDRESS:$APISERVER_PORT/readyz" 2>/dev/null)" == "ok" ]]
}

default_service_account_exists() {
  "$KUBE_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" get serviceaccount default -n default \
    -o name --request-timeout=2s >/dev/null 2>&1
}

# A free TCP port on 127.0.0.1 that no socket uses and we have not handed
# out yet in this run. Below the kernel's ephemeral range (32768+): there, a
# busy machine's outgoing connections took the port between this check and
# etcd's bind three times in a row (seen while another suite ran).
taken=" "
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    [[ $taken == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then
      taken+="$p "
      echo "$p"; return 0
    fi
  done
  die "no free TCP port found on 127.0.0.1"
}

# Each in a session of its own: a Ctrl-C in the terminal (e.g. `make demo`)
# reaches the script that started the control plane, which then stops things
# in order — not etcd and the API server first, under their users' feet.
# (No job control here, so the child is no group leader and setsid keeps
# its PID.)
start() {
  local name="$1"; shift
  setsid "$@" 9>&- >"$LOGS/$name.log" 2>&1 &
  local pid=$!
  echo "$name $pid" >> "$PIDS"
  # Until the forked shell has become the program, its command line is the
  # shell's: wait for the exec, so no check mistakes it for another process.
  local deadline=$((SECONDS + 5))
  until is_ours "$pid" || ! kill -0 "$pid" 2>/dev/null || (( SECONDS >= deadline )); do sleep 0.02; done
}

# Fail with the name and log of a process that is no longer running.
check_alive() {
  local name pid
  while read -r name pid; do
    if ! is_ours "$pid"; then
      # Ports are picked free, but another program can take one between
      # the check and the bind: then start again with other ports.
      if grep -qi "address already in use" "$LOGS/$name.log" 2>/dev/null; then
        log "$name could not bind its port (taken meanwhile); its log is $LOGS/$name.log"
        stop_all
        exit 75
      fi
      log "$name (pid $pid) exited; its log is $LOGS/$name.log — last lines:"
      tail -n 15 "$LOGS/$name.log" >&2 || true
      stop_all
      exit 1
    fi
  done < "$PIDS"
}

wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    check_alive
    (( SECONDS < deadline )) || { stop_all; die "$what not ready after ${timeout}s (logs in $LOGS)"; }
    sleep 0.3
  done
}

# --- certificates -------------------------------------------------------------


make_pki() {
  mkdir -p "$PKI"
  openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=clusterapp-local-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/ca.crt" 2>/dev/null
  sign apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:$APISERVER_ADDRESS,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local${CLUSTERAPP_APISERVER_EXTRA_SANS:+,$CLUSTERAPP_APISERVER_EXTRA_SANS}"
  sign admin "/O=system:masters/CN=clusterapp-admin"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  # the API server's identity towards real kubelets (logs, exec, port-forward)
  if [[ $APISERVER_ADDRESS != 127.0.0.1 ]]; then
    sign apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client"
  fi
  # ServiceAccount token signing key pair
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

kubeconfig() {
  local file="$1" user="$2"
  # shellcheck disable=SC1090
  source "$PORTS"
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$APISERVER_ADDRESS:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$user.crt")
    client-key-data: $(base64 -w0 < "$PKI/$user.key")
contexts:
- name: local
  context: {cluster: local, user: $user, namespace: default}
current-context: local
EOF
  chmod 600 "$file"
}

# --- commands -----------------------------------------------------------------

# Starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler on
# fresh ports and waits until they are ready. Runs in a subshell: exit 75
# means a port was taken under us and the caller may try again.
start_control_plane() {
  stop_all
  rm -rf "$STATE/etcd" "$PKI" "$LOGS" "$PORTS" "$STATE"/*.kubeconfig
  mkdir -p "$LOGS"
  local started=$SECONDS
  cat > "$PORTS" <<EOF
ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
APISERVER_PORT=$(free_port)
CONTROLLER_MANAGER_PORT=$(free_port)
SCHEDULER_PORT=$(free_port)
EOF
  # shellcheck disable=SC1090
  source "$PORTS"
  make_pki
  kubeconfig "$ADMIN_KUBECONFIG" admin
  kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" scheduler

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  start etcd "$ETCD_BIN/etcd" --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" -o /dev/null

  # Real nodes: Pods reach the API server through the `kubernetes` Service,
  # so it listens on a node-network address and keeps that Service's
  # endpoint (lease reconciler); it talks to the kubelets with a client
  # certificate of its own and checks theirs against the cluster CA.
  local apiserver_node_args=(--endpoint-reconciler-type none)
  if [[ $APISERVER_ADDRESS != 127.0.0.1 ]]; then
    apiserver_node_args=(--endpoint-reconciler-type lease
      --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt"
      --kubelet-client-key "$PKI/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$PKI/ca.crt"
      # by node IP: a node's name is no host name anyone can resolve
      --kubelet-preferred-address-types InternalIP)
  fi
  log "starting kube-apiserver on https://$APISERVER_ADDRESS:$APISERVER_PORT"
  start kube-apiserver "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$APISERVER_ADDRESS" --advertise-address "$APISERVER_ADDRESS" --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    "${apiserver_node_args[@]}" \
    --allow-privileged \
    --profiling=false \
    --cert-dir "$STATE/apiserver-certs" \
    ${CLUSTERAPP_APISERVER_EXTRA_ARGS:-}
  wait_for kube-apiserver 60 apiserver_ready

  log "starting kube-controller-manager and kube-scheduler"
  start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$CONTROLLER_MANAGER_PORT" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --leader-elect=false --profiling=false \
    --cert-dir "$STATE/controller-manager-certs"
  start kube-scheduler "$KUBE_BIN/kube-scheduler" \
    --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHEDULER_PORT" \
    --leader-elect=false --profiling=false \
    --cert-dir "$STATE/scheduler-certs"
  wait_for kube-controller-manager 30 curl -skf --max-time 1 "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz" -o /dev/null
  wait_for kube-scheduler 30 curl -skf --max-time 1 "https://127.0.0.1:$SCHEDULER_PORT/healthz" -o /dev/null
  # The namespace "default" gets its ServiceAccount from the controller
  # manager; tests rely on it, so wait for it too.
  wait_for "default ServiceAccount" 30 default_service_account_exists
  log "control plane ready in $((SECONDS - started)) s (logs: $LOGS)"
}

up() {
  local owner=""
  while (( $# )); do
    case "$1" in
      --owner-pid) owner="$2"; shift 2 ;;
      *) die "unknown argument to up: $1" ;;
    esac
  done

  lock_state
  # A watchdog whose owner is gone would stop whatever runs here next: it
  # is retired (its pending `down` sees its file gone and does nothing).
  local f
  for f in "$STATE"/watchdog.*.pid; do
    [[ -e $f ]] || continue
    local old_owner=${f##*/watchdog.}; old_owner=${old_owner%.pid}
    kill -0 "$old_owner" 2>/dev/null && continue
    local wpid; wpid="$(cat "$f")"
    if [[ -r /proc/$wpid/cmdline ]] && tr '\0' ' ' < "/proc/$wpid/cmdline" | grep -qF "cluster.sh"; then
      kill -TERM "$wpid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  if all_running && apiserver_ready; then
    log "reusing the running control plane in $STATE"
  else
    bash "$here/install.sh" --check >/dev/null 2>&1 || bash "$here/install.sh" >/dev/null
    if [[ -f $PIDS ]]; then log "cleaning a stale control plane in $STATE"; fi
    local attempt rc
    for attempt in 1 2 3; do
      rc=0
      ( start_control_plane ) || rc=$?
      (( rc == 75 && attempt < 3 )) && { log "retrying with other ports"; continue; }
      (( rc == 0 )) || exit "$rc"
      break
    done
  fi

  if [[ -n $owner ]]; then
    # Stop the control plane when the owner (a test binary) exits.
    setsid bash -c '
      owner=$1; script=$2; state=$3
      while kill -0 "$owner" 2>/dev/null; do sleep 1; done
      WATCHDOG_SELF=$$ CLUSTERAPP_STATE="$state" bash "$script" down --owner "$owner" >/dev/null 2>&1
    ' cluster.sh-watchdog "$owner" "$here/cluster.sh" "$STATE" </dev/null >/dev/null 2>&1 9>&- &
    echo $! > "$STATE/watchdog.$owner.pid"
  fi
  echo "KUBECONFIG=$ADMIN_KUBECONFIG"
}

down() {
  local owner=""
  [[ ${1:-} != --owner ]] || owner="${2:-}"
  lock_state
  if [[ -n $owner && ! -e "$STATE/watchdog.$owner.pid" ]]; then
    log "the control plane in $STATE was taken over by a later run; leaving it"
    return 0
  fi
  watchdogs_stop
  if [[ -f $PIDS ]]; then
    stop_all
    log "stopped the control plane in $STATE"
  else
    log "no control plane running in $STATE"
  fi
  rm -rf "$STATE/etcd" "$PKI" "$PORTS" "$STATE"/*.kubeconfig
}

status() {
  if all_running && apiserver_ready; then
    log "running in $STATE"
    echo "KUBECONFIG=$ADMIN_KUBECONFIG"
  else
    log "not running"
    return 1
  fi
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  status) status ;;
  *) echo "usage: $0 up [--owner-pid PID] | down | status" >&2; exit 2 ;;
esac
