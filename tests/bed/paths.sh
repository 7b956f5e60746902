# Sourced by the test-bed scripts: where the pinned binaries live.
_bed_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bed/versions.env
source "$_bed_here/versions.env"
CACHE="${CLUSTERAPP_CACHE:-$HOME/.cache/clusterapp}"
KUBE_BIN="$CACHE/kubernetes-$KUBERNETES_VERSION/bin"
ETCD_BIN="$CACHE/etcd-$ETCD_VERSION/bin"
# "-2": the second build recipe (with helm's Kubernetes version ldflags); a
# new recipe gets a new folder so a cache from an older recipe is not used.
HELM_BIN="$CACHE/helm-$HELM_VERSION-2/bin"
# real nodes: cluster DNS, the local image registry, the CRI client
COREDNS_BIN="$CACHE/coredns-$COREDNS_VERSION/bin"
REGISTRY_BIN="$CACHE/distribution-$DISTRIBUTION_VERSION/bin"
CRICTL_BIN="$CACHE/cri-tools-$CRI_TOOLS_VERSION/bin"

# "STATE STARTTIME" (fields 3 and 22 of /proc/PID/stat) of a process;
# nothing once it is gone. Shared by cluster.sh and nodes/lib.sh.
proc_state() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  # shellcheck disable=SC2086 # the fields after the command name, split
  set -- ${stat##*) }
  echo "$1 ${20}"
}

# The process runs and is not a zombie.
proc_alive() {
  local state
  state="$(proc_state "$1")"
  [[ -n $state && ${state%% *} != Z ]]
}
