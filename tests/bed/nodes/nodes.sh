#!/usr/bin/env bash
# Real Kubernetes nodes on this machine, next to the local control plane:
# per node a containerd (runc) and a kubelet built from the same
# k8s.io/kubernetes as the control plane; one kube-proxy (nftables mode);
# CoreDNS as the cluster DNS; images pulled from the local registry that
# `make images` (tests/bed/nodes/images.sh) fills.
#
#   tests/bed/nodes/nodes.sh up         control plane + registry + nodes + kube-proxy + CoreDNS;
#                                       last line KUBECONFIG=<admin kubeconfig>
#   tests/bed/nodes/nodes.sh down       stop everything `up` started (by PID), remove every
#                                       container, mount, netns, veth, bridge, nft table and
#                                       host path it made, restore the sysctls, then check
#   tests/bed/nodes/nodes.sh status     say what runs
#   tests/bed/nodes/nodes.sh leftovers  list anything of ours still on the host (exit 1 if any)
#   tests/bed/nodes/nodes.sh kill-node N    node N dies: its Pods cut off the network, its
#                                       kubelet, containerd and containers killed
#   tests/bed/nodes/nodes.sh revive-node N  node N comes back (Ready)
#
# Environment: CLUSTERAPP_STATE (default <repo>/target/cluster-nodes),
# CLUSTERAPP_NODE_COUNT (3), CLUSTERAPP_NODES_READY_TIMEOUT (30 s).
#
# Network (only loopback and what is made here carries traffic):
#   canode0  10.201.0.1/24: the API server (10.201.0.1) and the node IPs
#            10.201.0.11.. (kubelet API on :10250, NodePorts); no ports.
#   capod0   10.245.0.1/16: every Pod of every node (CNI bridge plugin,
#            host-local range 10.245.N.0/24 on node N), so Pods on different
#            nodes reach each other. Forwarding is on for capod0 only (never
#            the global net.ipv4.ip_forward), and the nft table
#            inet clusterapp_nodes_guard drops any forwarding between capod0
#            and another interface: nothing from a Pod leaves this machine.
#   Services 10.97.0.0/16 (kubernetes 10.97.0.1, kube-dns 10.97.0.10), a
#            range of their own so this kube-proxy never takes the ClusterIPs
#            of another local cluster (a node-less one uses 10.96/16).
set -euo pipefail
LOG_TAG=nodes
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bed/nodes/lib.sh
source "$here/lib.sh"
# shellcheck source=tests/bed/pki.sh
source "$here/../pki.sh"
repo="$NODES_REPO"

export CLUSTERAPP_STATE="${CLUSTERAPP_STATE:-$repo/target/cluster-nodes}"
mkdir -p "$CLUSTERAPP_STATE"
STATE="$(cd "$CLUSTERAPP_STATE" && pwd)"
export CLUSTERAPP_STATE="$STATE"
NODES="$STATE/nodes"
LOGS="$STATE/node-logs"
PIDS="$STATE/nodes.pids"            # lines: NAME PID
BEFORE="$STATE/host-before"          # what the host looked like before the first `up`
PKI="$STATE/pki"
ADMIN_KUBECONFIG="$STATE/admin.kubeconfig"
NODE_COUNT="${CLUSTERAPP_NODE_COUNT:-3}"
READY_TIMEOUT="${CLUSTERAPP_NODES_READY_TIMEOUT:-30}"

NODE_BRIDGE=canode0
HOST_IP=10.201.0.1
POD_BRIDGE=capod0
POD_NET=10.245.0.0/16
POD_GW=10.245.0.1
SERVICE_CIDR=10.97.0.0/16
SERVICE_IP=10.97.0.1
DNS_IP=10.97.0.10
GUARD_TABLE=clusterapp_nodes_guard
CNI_BIN=/usr/lib/cni
node_name() { echo "clusterapp-node$1"; }
node_ip() { echo "10.201.0.$((10 + $1))"; }
cgroup_root() { echo "clusterapp-node$1"; }

# Host settings the kubelet (and kube-proxy) may change: recorded before the
# first start, put back by `down`.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  net.ipv4.conf.all.route_localnet net.ipv4.ip_forward net.ipv4.conf.all.forwarding
  net.ipv4.conf.default.forwarding net.ipv6.conf.all.forwarding
  net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait
  fs.inotify.max_user_instances fs.inotify.max_user_watches)
# Host paths outside the state folder that containerd 1.6, libcni and the
# kubelet use whatever they are told.
# (/var/lib/kubelet: the device-plugin socket's folder is fixed, whatever
# the root dir.)
HOST_PATHS=(/run/containerd /var/lib/cni /var/log/containers /var/lib/kubelet /run/netns)

kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" --request-timeout=10s "$@"; }
crictl_node() { local i="$1"; shift; "$CRICTL_BIN/crictl" --timeout 20s --runtime-endpoint "unix://$NODES/$i/containerd/containerd.sock" "$@"; }

lock_state() { exec 8>"$STATE/.nodes.lock"; flock 8; }

# --- checks before anything starts ---------------------------------------------

preflight() {
  [[ $(id -u) -eq 0 ]] || die "real nodes need root (containerd, runc, network namespaces, cgroups): run as root"
  local missing=() c
  for c in containerd runc nft ip iptables conntrack openssl curl setsid flock findmnt; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
  done
  for c in bridge host-local loopback; do [[ -x $CNI_BIN/$c ]] || missing+=("$CNI_BIN/$c"); done
  (( ${#missing[@]} == 0 )) || die "missing: ${missing[*]} — install the Debian packages with tests/bed/nodes/apt-deps.sh (containerd, runc, nftables, iptables, conntrack, containernetworking-plugins)"
  grep -qw overlay /proc/filesystems \
    || die "kernel feature missing: overlay file system (containerd's overlayfs snapshotter). Load it: modprobe overlay"
  [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] \
    || die "kernel feature missing: br_netfilter (bridge netfilter; Service traffic between Pods on one bridge needs it). Load it: modprobe br_netfilter"
  nft list tables >/dev/null 2>&1 \
    || die "kernel feature missing: nf_tables (nft list tables fails; the forwarding guard and kube-proxy's nftables mode need it). Load it: modprobe nf_tables"
  if ip link add cacheck0 type veth peer name cacheck1 2>/dev/null; then
    ip link del cacheck0
  else
    die "kernel feature missing: veth links (CONFIG_VETH; the CNI bridge plugin needs them). Load it: modprobe veth"
  fi
  if ip link add cacheck0 type bridge 2>/dev/null; then
    ip link del cacheck0
  else
    die "kernel feature missing: bridges (CONFIG_BRIDGE). Load it: modprobe bridge"
  fi
  if [[ -e /sys/fs/cgroup/cgroup.controllers ]]; then
    local ctrl
    for ctrl in cpu memory pids cpuset; do
      grep -qw "$ctrl" /sys/fs/cgroup/cgroup.controllers || die "cgroup controller missing: $ctrl (cgroup v2). Enable it on the kernel command line."
    done
  else
    local ctrl
    for ctrl in cpu cpuacct cpuset memory pids devices freezer; do
      awk -v c="$ctrl" '$1 == c && $4 == 1 { found = 1 } END { exit !found }' /proc/cgroups \
        || die "cgroup controller missing or disabled: $ctrl (see /proc/cgroups; the kubelet needs it)"
      findmnt -rn -t cgroup -o OPTIONS | tr ',' '\n' | grep -qx "$ctrl" \
        || die "cgroup controller $ctrl is not mounted under /sys/fs/cgroup (cgroup v1)"
    done
  fi
  for c in $NODE_BRIDGE $POD_BRIDGE; do
    if ip link show "$c" >/dev/null 2>&1 && [[ ! -f $PIDS ]]; then
      die "a bridge $c exists but no nodes of $STATE run: another test bed uses it (or a crashed run left it: tests/bed/nodes/nodes.sh down with its CLUSTERAPP_STATE)"
    fi
  done
  if ip route show to match "$POD_GW" | grep -v "dev $POD_BRIDGE" | grep -qv default \
     || ip route show to match "$HOST_IP" | grep -v "dev $NODE_BRIDGE" | grep -qv default; then
    die "the address ranges $POD_NET or 10.201.0.0/24 are already routed on this host: $(ip route | grep -E '10\.(245|201)\.' | head -3)"
  fi
}

# --- host state -------------------------------------------------------------------

record_host() {
  [[ -f $BEFORE/sysctls ]] && return 0    # a second `up` keeps the first record
  mkdir -p "$BEFORE"
  local k
  for k in "${SYSCTLS[@]}"; do
    [[ -e /proc/sys/${k//.//} ]] && echo "$k=$(sysctl -n "$k")"
  done > "$BEFORE/sysctls.tmp"
  local p
  for p in "${HOST_PATHS[@]}"; do [[ -e $p ]] && echo "$p"; done > "$BEFORE/paths"
  nft list tables 2>/dev/null | sort > "$BEFORE/nft-tables"
  ls /run/netns 2>/dev/null | sort > "$BEFORE/netns" || true
  mv "$BEFORE/sysctls.tmp" "$BEFORE/sysctls"
}

# --- processes ----------------------------------------------------------------------

start_proc() {
  local name="$1"; shift
  setsid "$@" 8>&- </dev/null >"$LOGS/$name.log" 2>&1 &
  echo "$name $!" >> "$PIDS"
  await_exec "$!" "$STATE/"
}

pid_of() { awk -v n="$1" '$1 == n { p = $2 } END { print p }' "$PIDS" 2>/dev/null; }
alive() { pid_runs_ours "$(pid_of "$1")" "$STATE/"; }

# Fail (and tear down) naming the node, the component and its log.
component_failed() {
  local node="$1" comp="$2" why="$3" logf="$LOGS/$2.log"
  log "node $node: $comp $why; its log is $logf — last lines:"
  tail -n 20 "$logf" 2>/dev/null | sed 's/^/    /' >&2 || true
  log "tearing down what was started"
  down_all >/dev/null 2>&1 || true
  exit 1
}

# --- certificates (sign: tests/bed/pki.sh) -------------------------------------------

kubeconfig_for() {
  local file="$1" cert="$2" server
  server="$(sed -n 's/^ *server: //p' "$ADMIN_KUBECONFIG" | head -1)"
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $server
    certificate-authority: $PKI/ca.crt
users:
- name: $cert
  user:
    client-certificate: $PKI/$cert.crt
    client-key: $PKI/$cert.key
contexts:
- name: local
  context: {cluster: local, user: $cert}
current-context: local
EOF
  chmod 600 "$file"
}

# --- network --------------------------------------------------------------------------

network_up() {
  if ! ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    ip link add "$NODE_BRIDGE" type bridge
  fi
  ip addr replace "$HOST_IP/24" dev "$NODE_BRIDGE"
  local i
  for i in $(seq 1 "$NODE_COUNT"); do ip addr replace "$(node_ip "$i")/24" dev "$NODE_BRIDGE"; done
  ip link set "$NODE_BRIDGE" up
  if ! ip link show "$POD_BRIDGE" >/dev/null 2>&1; then
    ip link add "$POD_BRIDGE" type bridge
  fi
  ip addr replace "$POD_GW/16" dev "$POD_BRIDGE"
  ip link set "$POD_BRIDGE" up
  # The guard first, then forwarding for the Pod bridge only.
  nft -f - <<EOF
table inet $GUARD_TABLE {
  chain forward {
    type filter hook forward priority filter - 10; policy accept;
    iifname "$POD_BRIDGE" oifname != "$POD_BRIDGE" counter drop
    oifname "$POD_BRIDGE" iifname != "$POD_BRIDGE" counter drop
  }
}
EOF
  sysctl -qw "net.ipv4.conf.$POD_BRIDGE.forwarding=1"
  # Service traffic between two Pods of the bridge: the reply is bridged,
  # not routed, and is un-DNATed only when bridged packets pass netfilter.
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
}

# --- cgroups ----------------------------------------------------------------------------

cgroup_mounts() { findmnt -rn -t cgroup,cgroup2 -o TARGET; }

cgroups_up() {
  local i="$1" root; root="$(cgroup_root "$i")"
  local m
  while read -r m; do
    mkdir -p "$m/$root"
    if [[ -e $m/cpuset.cpus && ! -s $m/$root/cpuset.cpus ]] || [[ -e $m/cpuset.cpus && -z "$(tr -d '\n' < "$m/$root/cpuset.cpus")" ]]; then
      cat "$m/cpuset.cpus" > "$m/$root/cpuset.cpus"
      cat "$m/cpuset.mems" > "$m/$root/cpuset.mems"
    fi
  done < <(cgroup_mounts)
}

# Every process still in a node's cgroups (container processes, shims):
# they were started by that node's containerd.
cgroup_procs() {
  local root m
  for root in "$@"; do
    while read -r m; do
      [[ -d $m/$root ]] || continue
      find "$m/$root" -name cgroup.procs -exec cat {} + 2>/dev/null
    done < <(cgroup_mounts)
  done | sort -u
}

cgroups_down() {
  local root m
  for root in "$@"; do
    while read -r m; do
      [[ -d $m/$root ]] || continue
      find "$m/$root" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done < <(cgroup_mounts)
  done
}

# --- per node -----------------------------------------------------------------------------

node_configs() {
  local i="$1" dir="$NODES/$1" name ip
  name="$(node_name "$i")"; ip="$(node_ip "$i")"
  mkdir -p "$dir/containerd/certs.d" "$dir/cni/net.d" "$dir/kubelet" "$dir/runc" "$dir/pod-logs"
  # containerd: everything under the node folder (except /run/containerd/s,
  # where containerd 1.6 puts shim sockets whatever it is told)
  cat > "$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$dir/containerd/containerd.sock"

[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "bed.clusterapp.local/pause:1"
  # this VM grants no CAP_SYS_RESOURCE: runc cannot set negative OOM scores
  restrict_oom_score_adj = true
  # Pod network namespaces under the node folder, not /run/netns
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$dir/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/containerd/certs.d"
EOF
  # every image registry we use is the local one (server: the real registry
  # is never asked)
  local reg
  for reg in "${MAPPED_REGISTRIES[@]}"; do
    mkdir -p "$dir/containerd/certs.d/$reg"
    cat > "$dir/containerd/certs.d/$reg/hosts.toml" <<EOF
server = "http://$REGISTRY_ADDR"

[host."http://$REGISTRY_ADDR"]
  capabilities = ["pull", "resolve"]
EOF
  done
  cat > "$dir/cni/net.d/10-capod.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "capod",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BRIDGE",
      "isGateway": false,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$POD_NET", "rangeStart": "10.245.$i.2", "rangeEnd": "10.245.$i.254", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
  local healthz; healthz="$(free_local_port)"
  cat > "$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
tlsCertFile: $PKI/kubelet-$i.crt
tlsPrivateKeyFile: $PKI/kubelet-$i.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$(cgroup_root "$i")
failCgroupV1: false
failSwapOn: false
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
# Pods with dnsPolicy Default get no name server: nothing leaves the machine
resolvConf: ""
podLogsDir: $dir/pod-logs
# How soon a changed Secret or ConfigMap reaches a Pod's volume (a Pod's
# periodic sync, jittered by up to half): 1 min by default, which is what
# users get; 10 s here so the certificate renewal test waits 25 s, not 2 min.
syncFrequency: 10s
volumePluginDir: $dir/kubelet/volume-plugins
serializeImagePulls: false
rotateCertificates: false
serverTLSBootstrap: false
makeIPTablesUtilChains: false
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  imagefs.available: 2%
  nodefs.inodesFree: 2%
EOF
  echo "$healthz" > "$dir/kubelet/healthz-port"
  kubeconfig_for "$dir/kubelet/kubeconfig" "node-$i"
}

node_start() {
  local i="$1" dir="$NODES/$1" name
  name="$(node_name "$i")"
  start_proc "containerd-$i" containerd --config "$dir/containerd/config.toml"
  local deadline=$((SECONDS + 20))
  until crictl_node "$i" info >/dev/null 2>&1; do
    alive "containerd-$i" || component_failed "$name" "containerd-$i" "exited"
    (( SECONDS < deadline )) || component_failed "$name" "containerd-$i" "did not answer on its socket within 20 s"
    sleep 0.1
  done
  start_proc "kubelet-$i" "$KUBE_BIN/kubelet" --config "$dir/kubelet/config.yaml" \
    --kubeconfig "$dir/kubelet/kubeconfig" --root-dir "$dir/kubelet/root" --cert-dir "$dir/kubelet/pki" \
    --hostname-override "$name" --node-ip "$(node_ip "$i")"
}

node_ready() {
  [[ "$(kubectl get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

kube_proxy_start() {
  local healthz metrics
  healthz="$(free_local_port)"; metrics="$(free_local_port)"
  cat > "$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $STATE/kube-proxy.kubeconfig
mode: nftables
clusterCIDR: $POD_NET
hostnameOverride: $(node_name 1)
healthzBindAddress: 127.0.0.1:$healthz
metricsBindAddress: 127.0.0.1:$metrics
nodePortAddresses: [10.201.0.0/24]
# 0: leave the host's conntrack settings as they are
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
EOF
  start_proc kube-proxy "$KUBE_BIN/kube-proxy" --config "$STATE/kube-proxy.yaml"
  echo "$healthz" > "$STATE/kube-proxy.healthz-port"
}

coredns_apply() {
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  # Cluster names only: no forward plugin, so no query ever leaves the cluster.
  Corefile: |
    .:1053 {
        errors
        health :8080 {
            lameduck 3s
        }
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            ttl 30
        }
        cache 30
        loop
        reload
        loadbalance
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 2
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {matchLabels: {k8s-app: kube-dns}}}
      securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: coredns
        image: bed.clusterapp.local/coredns:$COREDNS_VERSION
        imagePullPolicy: IfNotPresent
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        - {name: metrics-health, containerPort: 8080, protocol: TCP}
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 2
        livenessProbe:
          httpGet: {path: /health, port: 8080}
          periodSeconds: 10
          failureThreshold: 5
        resources:
          requests: {cpu: 20m, memory: 32Mi}
          limits: {memory: 128Mi}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes:
      - name: config
        configMap: {name: coredns}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_IP
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
EOF
}

# --- up ---------------------------------------------------------------------------------------

up() {
  lock_state
  if [[ -f $PIDS ]]; then
    local name pid all=1
    while read -r name pid; do pid_runs_ours "$pid" "$STATE/" || all=0; done < "$PIDS"
    if (( all )) && bash "$repo/tests/bed/cluster.sh" status >/dev/null 2>&1; then
      log "reusing the running nodes in $STATE"
      echo "KUBECONFIG=$ADMIN_KUBECONFIG"
      return 0
    fi
    log "cleaning up a previous run in $STATE"
    down_all
  fi
  local t0=$SECONDS
  preflight
  bash "$repo/tests/bed/nodes/apt-deps.sh"
  bash "$repo/tests/bed/install.sh" --nodes --check >/dev/null 2>&1 || bash "$repo/tests/bed/install.sh" --nodes >/dev/null
  # the images the nodes themselves run; `make images` builds the rest
  bash "$here/images.sh" pause coredns
  record_host
  rm -rf "$NODES" "$LOGS"
  mkdir -p "$NODES" "$LOGS"
  : > "$PIDS"
  trap 'log "interrupted: tearing down"; down_all >/dev/null 2>&1 || true; exit 130' INT TERM

  local t_net=$SECONDS
  network_up
  log "network: $NODE_BRIDGE ($HOST_IP + node IPs), $POD_BRIDGE ($POD_GW/16), forwarding guard table inet $GUARD_TABLE"

  local line rc=0
  line="$(CLUSTERAPP_APISERVER_ADDRESS=$HOST_IP CLUSTERAPP_SERVICE_CIDR=$SERVICE_CIDR CLUSTERAPP_SERVICE_IP=$SERVICE_IP \
            bash "$repo/tests/bed/cluster.sh" up 8>&- | tail -n 1)" || rc=$?
  if (( rc != 0 )); then log "the control plane did not start (logs in $STATE/logs)"; down_all >/dev/null 2>&1 || true; exit 1; fi
  [[ $line == "KUBECONFIG=$ADMIN_KUBECONFIG" ]] || { down_all >/dev/null 2>&1 || true; die "unexpected output from cluster.sh up: $line"; }

  registry_start "$STATE/registry"
  log "registry on $REGISTRY_ADDR (storage $REGISTRY_STORAGE)"

  local i
  for i in $(seq 1 "$NODE_COUNT"); do
    sign "node-$i" "/O=system:nodes/CN=system:node:$(node_name "$i")"
    sign "kubelet-$i" "/CN=$(node_name "$i")" "IP:$(node_ip "$i"),DNS:$(node_name "$i")"
  done
  sign kube-proxy "/CN=system:kube-proxy"
  kubeconfig_for "$STATE/kube-proxy.kubeconfig" kube-proxy
  # the API server's client certificate may use every kubelet API
  kubectl create clusterrolebinding kube-apiserver-kubelet-client --clusterrole system:kubelet-api-admin \
    --user kube-apiserver-kubelet-client >/dev/null

  local t_nodes=$SECONDS
  for i in $(seq 1 "$NODE_COUNT"); do
    cgroups_up "$i"
    node_configs "$i"
    node_start "$i"
  done
  kube_proxy_start
  log "started $NODE_COUNT containerds and kubelets, kube-proxy; waiting for the Nodes to be Ready (at most $READY_TIMEOUT s)"
  local deadline=$((SECONDS + READY_TIMEOUT)) pending
  while :; do
    pending=()
    for i in $(seq 1 "$NODE_COUNT"); do
      alive "containerd-$i" || component_failed "$(node_name "$i")" "containerd-$i" "exited"
      alive "kubelet-$i" || component_failed "$(node_name "$i")" "kubelet-$i" "exited"
      node_ready "$(node_name "$i")" || pending+=("$i")
    done
    alive kube-proxy || component_failed "(all)" kube-proxy "exited"
    (( ${#pending[@]} )) || break
    if (( SECONDS >= deadline )); then
      i="${pending[0]}"
      component_failed "$(node_name "$i")" "kubelet-$i" "is running but its Node is not Ready after $READY_TIMEOUT s (containerd log: $LOGS/containerd-$i.log)"
    fi
    sleep 0.3
  done
  log "$NODE_COUNT nodes Ready $((SECONDS - t_nodes)) s after the first containerd started"

  coredns_apply
  if ! kubectl -n kube-system rollout status deployment/coredns --timeout=90s >/dev/null; then
    kubectl -n kube-system get pods -o wide >&2 || true
    log "CoreDNS did not become available (kubectl -n kube-system describe pods -l k8s-app=kube-dns)"
    down_all >/dev/null 2>&1 || true
    exit 1
  fi
  log "CoreDNS ready; everything up in $((SECONDS - t_net)) s ($((SECONDS - t0)) s with checks and images)"
  trap - INT TERM
  echo "KUBECONFIG=$ADMIN_KUBECONFIG"
}

# --- down ---------------------------------------------------------------------------------------

# Every PID whose command line names the state folder: the daemons, the
# containerd shims (-address <node>/containerd/containerd.sock).
our_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    { cmd="$(tr '\0' ' ' < "$p/cmdline")"; } 2>/dev/null || continue
    [[ $cmd == *"$STATE/"* ]] && echo "${p#/proc/}"
  done
  true
}

down_all() {
  local i name pid roots=() t_down=$SECONDS
  for ((i = 1; i <= 9; i++)); do roots+=("$(cgroup_root "$i")"); done
  # 1. kubelets first, so nothing restarts Pods; then every Pod sandbox
  #    through its containerd (CNI DEL: veth and IP released), then the daemons.
  for name in $(awk '$1 ~ /^kubelet-/ {print $1}' "$PIDS" 2>/dev/null); do stop_pid "$(pid_of "$name")" "$STATE/" 10; done
  if [[ -d $NODES ]]; then
    for i in $(ls "$NODES"); do
      if alive "containerd-$i" && [[ -x $CRICTL_BIN/crictl ]]; then
        timeout 90 "$CRICTL_BIN/crictl" --timeout 60s --runtime-endpoint "unix://$NODES/$i/containerd/containerd.sock" rmp -af >/dev/null 2>&1 \
          || log "node $i: removing its Pods through containerd failed; killing them"
      fi
    done
  fi
  for name in kube-proxy $(awk '$1 ~ /^containerd-/ {print $1}' "$PIDS" 2>/dev/null); do stop_pid "$(pid_of "$name")" "$STATE/" 10; done
  registry_stop "$STATE/registry"
  log "down: Pods removed, daemons stopped ($((SECONDS - t_down)) s)"
  # the control plane stops in order (cluster.sh, by PID) before the sweep
  # below. The API server goes first, while etcd still runs: with the lease
  # endpoint reconciler it removes its endpoint as it shuts down, and would
  # otherwise wait for the etcd that cluster.sh stops at the same time.
  local apiserver_pid
  apiserver_pid="$(awk '$1 == "kube-apiserver" {print $2}' "$STATE/pids" 2>/dev/null)"
  [[ -z $apiserver_pid ]] || stop_pid "$apiserver_pid" "$STATE/" 10
  bash "$repo/tests/bed/cluster.sh" down >/dev/null 2>&1 || true
  log "down: control plane stopped ($((SECONDS - t_down)) s)"
  # 2. anything left: shims by command line, container processes by cgroup
  local left
  left="$( (our_pids; cgroup_procs "${roots[@]}") | sort -u | grep -vx "$$" || true)"
  if [[ -n $left ]]; then
    log "killing leftover processes: $(echo $left)"
    kill -KILL $left 2>/dev/null || true
    sleep 0.3
  fi
  rm -f "$PIDS"
  # 3. mounts under the state folder (deepest first), network namespaces
  #    containerd pinned under /run/netns that were not there before
  local m
  for _ in 1 2 3; do
    mapfile -t mounts < <(awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/self/mounts | sort -r)
    (( ${#mounts[@]} )) || break
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
  local ns
  for ns in $(ls /run/netns 2>/dev/null); do
    [[ $ns == cni-* ]] || continue
    grep -qx "$ns" "$BEFORE/netns" 2>/dev/null && continue
    umount "/run/netns/$ns" 2>/dev/null || true
    rm -f "/run/netns/$ns"
  done
  # 4. links: veths left on the Pod bridge, the bridges
  local l
  for l in $(ip -o link show master "$POD_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do ip link del "$l" 2>/dev/null || true; done
  ip link del "$POD_BRIDGE" 2>/dev/null || true
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  # 5. nftables: our guard, kube-proxy's tables, and tables the kubelet's
  #    iptables(-nft) calls made that were not there before
  nft delete table inet "$GUARD_TABLE" 2>/dev/null || true
  nft delete table ip kube-proxy 2>/dev/null || true
  nft delete table ip6 kube-proxy 2>/dev/null || true
  local t
  while read -r t; do
    [[ -n $t ]] || continue
    if [[ -f $BEFORE/nft-tables ]] && ! grep -qxF "$t" "$BEFORE/nft-tables"; then
      nft delete ${t#table } 2>/dev/null || true
    fi
  done < <(nft list tables 2>/dev/null)
  local fam tbl chain
  for fam in iptables ip6tables; do
    for tbl in filter nat mangle; do
      for chain in $($fam -t "$tbl" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        $fam -t "$tbl" -F "$chain" 2>/dev/null || true
        $fam -t "$tbl" -X "$chain" 2>/dev/null || true
      done
    done
  done
  log "down: mounts, links, nft tables removed ($((SECONDS - t_down)) s)"
  # 6. cgroups of the nodes
  cgroups_down "${roots[@]}"
  # 7. host paths: removed when they were not there before; else only ours
  if [[ -f $BEFORE/paths ]]; then
    local p
    for p in "${HOST_PATHS[@]}"; do
      grep -qxF "$p" "$BEFORE/paths" && continue
      case "$p" in
        /run/netns) rmdir "$p" 2>/dev/null || true ;;   # only when empty
        *) rm -rf "$p" ;;
      esac
    done
    if grep -qxF /var/log/containers "$BEFORE/paths"; then
      find /var/log/containers -maxdepth 1 -type l -lname "$STATE/*" -delete 2>/dev/null || true
    fi
    if grep -qxF /var/lib/kubelet "$BEFORE/paths"; then
      rm -f /var/lib/kubelet/device-plugins/kubelet.sock
    fi
    if grep -qxF /var/lib/cni "$BEFORE/paths"; then
      grep -rlF '"capod"' /var/lib/cni 2>/dev/null | xargs -r rm -f
    fi
  fi
  # 8. sysctls as they were
  if [[ -f $BEFORE/sysctls ]]; then
    local kv
    while IFS= read -r kv; do
      local k="${kv%%=*}" v="${kv#*=}"
      [[ "$(sysctl -n "$k" 2>/dev/null)" == "$v" ]] || sysctl -qw "$k=$v" 2>/dev/null || log "could not restore $k=$v"
    done < "$BEFORE/sysctls"
  fi
  rm -rf "$NODES" "$BEFORE"
}

# Anything of ours still on the host; prints one line each, exit 1 if any.
leftovers() {
  local found=0 roots=() i
  for ((i = 1; i <= 9; i++)); do roots+=("$(cgroup_root "$i")"); done
  report() { echo "left: $*"; found=1; }
  local p
  for p in $(our_pids | grep -vx "$$"); do report "process $p: $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | cut -c1-120)"; done
  for p in $(cgroup_procs "${roots[@]}"); do report "process $p in a node cgroup"; done
  awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/self/mounts | while read -r m; do echo "left: mount $m"; done | grep . && found=1
  for p in $(ls /run/netns 2>/dev/null | grep '^cni-' || true); do report "network namespace /run/netns/$p"; done
  for p in $POD_BRIDGE $NODE_BRIDGE; do ip link show "$p" >/dev/null 2>&1 && report "link $p"; done
  nft list tables 2>/dev/null | grep -E "$GUARD_TABLE|kube-proxy" | while read -r t; do echo "left: nft $t"; done | grep . && found=1
  local fam tbl
  for fam in iptables ip6tables; do
    for tbl in filter nat mangle; do
      $fam -t "$tbl" -S 2>/dev/null | awk -v f="$fam" -v t="$tbl" '$1 == "-N" && $2 ~ /^KUBE-/ {print "left: " f " -t " t " chain " $2}' | grep . && found=1
    done
  done
  local m
  while read -r m; do
    for p in "${roots[@]}"; do [[ -d $m/$p ]] && report "cgroup $m/$p"; done
  done < <(cgroup_mounts)
  for p in /run/containerd /var/lib/cni /var/log/containers /var/lib/kubelet; do
    if [[ -e $p ]] && ! grep -qxF "$p" "${1:-/dev/null}" 2>/dev/null; then report "path $p"; fi
  done
  [[ "$(sysctl -n net.ipv4.ip_forward)" == 0 ]] || echo "note: net.ipv4.ip_forward is 1 (it was not changed by the nodes)"
  (( found == 0 ))
}

down() {
  lock_state
  local before_paths="" sysctls_before=""
  [[ -f $BEFORE/paths ]] && before_paths="$(mktemp)" && cp "$BEFORE/paths" "$before_paths"
  [[ -f $BEFORE/sysctls ]] && sysctls_before="$(cat "$BEFORE/sysctls")"
  if [[ -f $PIDS || -d $NODES || -f $BEFORE/sysctls ]]; then
    down_all
    log "stopped the nodes and the control plane in $STATE"
  else
    bash "$repo/tests/bed/cluster.sh" down >/dev/null 2>&1 || true
    log "no nodes running in $STATE"
  fi
  local rc=0
  leftovers "${before_paths:-/dev/null}" || rc=1
  if [[ -n $sysctls_before ]]; then
    local kv
    while IFS= read -r kv; do
      [[ "$(sysctl -n "${kv%%=*}" 2>/dev/null)" == "${kv#*=}" ]] || { echo "left: sysctl ${kv%%=*} is $(sysctl -n "${kv%%=*}"), was ${kv#*=}"; rc=1; }
    done <<< "$sysctls_before"
  fi
  [[ -z $before_paths ]] || rm -f "$before_paths"
  if (( rc )); then log "something is left (see above)"; return 1; fi
  log "nothing left: no process, mount, netns, bridge, nft table, KUBE-* chain, cgroup or host path of ours; sysctls as before"
}

status() {
  local name pid
  [[ -f $PIDS ]] || { log "not running"; return 1; }
  while read -r name pid; do
    if pid_runs_ours "$pid" "$STATE/"; then echo "$name $pid running"; else echo "$name $pid gone"; fi
  done < "$PIDS"
  kubectl get nodes -o wide 2>/dev/null || true
  echo "KUBECONFIG=$ADMIN_KUBECONFIG"
}

# --- a node that dies, and comes back ----------------------------------------------

dead_node_table() { echo "clusterapp_dead_node$1"; }

# Node N dies the way a machine does: first its Pods are cut off the network
# (a bridge-family nft table drops every frame from or to its Pod range on
# capod0, so not even a reset leaves them and peers see only silence), then
# its kubelet, its containerd and every process in its cgroups (the
# containers and their shims) are killed. The Node object stays: the control
# plane learns of the death only from the missing heartbeats.
kill_node() {
  local i="$1" table range pid
  [[ $i =~ ^[0-9]+$ && -d $NODES/$i ]] || die "kill-node: no node $i in $NODES"
  table="$(dead_node_table "$i")"; range="10.245.$i.0/24"
  lock_state
  nft -f - <<NFT
table bridge $table {
  chain forward { type filter hook forward priority -200; ip saddr $range drop; ip daddr $range drop; }
  chain input { type filter hook input priority -200; ip saddr $range drop; }
  chain output { type filter hook output priority -200; ip daddr $range drop; }
}
NFT
  for name in "kubelet-$i" "containerd-$i"; do
    pid="$(pid_of "$name")"
    pid_runs_ours "$pid" "$STATE/" && kill -KILL "$pid" 2>/dev/null || true
  done
  local procs
  procs="$(cgroup_procs "$(cgroup_root "$i")")"
  [[ -z $procs ]] || kill -KILL $procs 2>/dev/null || true
  log "node $i ($(node_name "$i")) is dead: Pods $range cut off, kubelet, containerd and containers killed"
}

# Node N comes back: its Pods reach the network again and its containerd and
# kubelet start (the kubelet then restarts the Pods the API still binds to
# it); returns when the Node is Ready.
revive_node() {
  local i="$1"
  [[ $i =~ ^[0-9]+$ && -d $NODES/$i ]] || die "revive-node: no node $i in $NODES"
  lock_state
  nft delete table bridge "$(dead_node_table "$i")" 2>/dev/null || true
  alive "kubelet-$i" && { log "node $i runs"; return 0; }
  node_start "$i"
  local deadline=$((SECONDS + READY_TIMEOUT))
  until node_ready "$(node_name "$i")"; do
    if (( SECONDS >= deadline )); then
      # The other nodes stay up: tests share them.
      log "node $i: not Ready within $READY_TIMEOUT s of its restart; the kubelet's log is $LOGS/kubelet-$i.log — last lines:"
      tail -n 20 "$LOGS/kubelet-$i.log" 2>/dev/null | sed 's/^/    /' >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  log "node $i ($(node_name "$i")) is back and Ready"
}

# sourced (tests, experiments): functions only
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  leftovers) leftovers "${BEFORE}/paths" ;;
  kill-node) kill_node "${2:-}" ;;
  revive-node) revive_node "${2:-}" ;;
  *) echo "usage: $0 up | down | status | leftovers | kill-node N | revive-node N" >&2; exit 2 ;;
esac
