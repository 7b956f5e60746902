#!/usr/bin/env bash
# Builds the local test bed's binaries from their Go modules, once per machine:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   kubelet, kube-proxy, helm; with --nodes also CoreDNS, the distribution
#   registry and crictl (what real nodes need, tests/bed/nodes/).
# They land in $CLUSTERAPP_CACHE (default ~/.cache/clusterapp), one folder per
# pinned version, so a second run finds them and builds nothing.
#
#   tests/bed/install.sh [--nodes]            build what is missing, print the bin folders
#   tests/bed/install.sh [--nodes] --check    exit 1 (and say what) if anything is missing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bed/paths.sh
source "$here/paths.sh"

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

need_go() {
  command -v go >/dev/null 2>&1 || die "'go' is not on PATH. The test bed builds Kubernetes, etcd and helm from Go modules and needs Go >= 1.26: install it (Debian: a golang package of that version, or the official tarball unpacked to /usr/local/go with /usr/local/go/bin on PATH) and run this again."
  local v
  v="$(go env GOVERSION | sed 's/^go//')"
  local major minor
  major="${v%%.*}"; minor="${v#*.}"; minor="${minor%%.*}"
  if (( major < 1 || (major == 1 && minor < 26) )); then
    die "Go $v is too old: Kubernetes $KUBERNETES_VERSION needs Go >= 1.26."
  fi
}

# go build -v prints one line per compiled package; turn that into a steady
# progress line instead of a wall of package names.
progress() {
  local what="$1" n=0 line
  while IFS= read -r line; do
    # package paths have no spaces; anything else (downloads, compiler
    # errors) is worth showing as it is
    case "$line" in *" "*) printf '%s\n' "$line" >&2 ;; esac
    n=$((n + 1))
    if (( n % 100 == 0 )); then log "$what: $n packages compiled"; fi
  done
  log "$what: $n packages compiled, linking done"
}

# build_module NAME WORKDIR OUTDIR LDFLAGS PACKAGE...
# WORKDIR already holds a go.mod. Builds into OUTDIR.tmp and renames it, so an
# interrupted build never leaves a half-filled OUTDIR behind.
build_into() {
  local name="$1" work="$2" out="$3" ldflags="$4"; shift 4
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  log "$name: resolving modules (first time: downloads from the Go module proxy)"
  (cd "$work" && GOFLAGS=-mod=mod go mod download) >&2
  log "$name: compiling $* (this takes a while on 2 cores)"
  local started=$SECONDS
  if ! (cd "$work" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -p "$(nproc)" -v \
        -ldflags "-s -w $ldflags" -o "$out.tmp/" "$@" 2>&1) | progress "$name"; then
    die "$name: go build failed (see above)"
  fi
  [[ ${PIPESTATUS[0]} -eq 0 ]] || die "$name: go build failed"
  rm -rf "$out"; mv "$out.tmp" "$out"
  log "$name: built in $((SECONDS - started)) s into $out"
}

KUBE_CONTROL_PLANE=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
KUBE_NODE=(kubelet kube-proxy)
kube_missing() { for b in "${KUBE_CONTROL_PLANE[@]}" "${KUBE_NODE[@]}"; do [[ -x "$KUBE_BIN/$b" ]] || return 0; done; return 1; }
kube_control_plane_missing() { for b in "${KUBE_CONTROL_PLANE[@]}"; do [[ -x "$KUBE_BIN/$b" ]] || return 0; done; return 1; }
coredns_missing() { [[ -x "$COREDNS_BIN/coredns" ]] || return 0; return 1; }
registry_missing() { [[ -x "$REGISTRY_BIN/registry" ]] || return 0; return 1; }
crictl_missing() { [[ -x "$CRICTL_BIN/crictl" ]] || return 0; return 1; }
etcd_missing() { [[ -x "$ETCD_BIN/etcd" ]] || return 0; return 1; }
helm_missing() { [[ -x "$HELM_BIN/helm" ]] || return 0; return 1; }

build_kubernetes() {
  local work="$CACHE/src/kubernetes-$KUBERNETES_VERSION"
  mkdir -p "$work"
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  log "kubernetes $KUBERNETES_VERSION: staging modules pinned to $staging"
  # k8s.io/kubernetes refers to its staging modules as ./staging/src/...,
  # which does not exist inside the published module: pin every one of those
  # to the matching published v0.x release. The list comes from the module's
  # own go.mod, so it follows whatever that release contains.
  local upstream_mod
  upstream_mod="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
  [[ -f "$upstream_mod" ]] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"
  {
    echo "module clusterapp.local/testbed/kubernetes"
    echo
    echo "go $(sed -n 's/^go //p' "$upstream_mod")"
    echo
    grep '^godebug' "$upstream_mod" || true
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    sed -n "s#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/src/.*#\t\1 => \1 $staging#p" "$upstream_mod"
    echo ")"
  } > "$work/go.mod"
  local n
  n="$(grep -c "=> k8s.io/" "$work/go.mod")"
  (( n > 20 )) || die "expected the staging replace lines in $upstream_mod, found $n"
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  if kube_control_plane_missing; then
    build_into "kubernetes $KUBERNETES_VERSION" "$work" "$KUBE_BIN" "$ld" \
      "${KUBE_CONTROL_PLANE[@]/#/k8s.io/kubernetes/cmd/}" "${KUBE_NODE[@]/#/k8s.io/kubernetes/cmd/}"
  else
    # A cache from before kubelet and kube-proxy were part of this build:
    # add them next to the control plane binaries (which may be running)
    # instead of replacing the folder under their feet.
    build_into "kubernetes $KUBERNETES_VERSION (node binaries)" "$work" "$KUBE_BIN.nodes" "$ld" \
      "${KUBE_NODE[@]/#/k8s.io/kubernetes/cmd/}"
    local b
    for b in "${KUBE_NODE[@]}"; do mv -f "$KUBE_BIN.nodes/$b" "$KUBE_BIN/$b"; done
    rm -rf "$KUBE_BIN.nodes"
  fi
}

build_etcd() {
  local work="$CACHE/src/etcd-$ETCD_VERSION"
  mkdir -p "$work"
  printf 'module clusterapp.local/testbed/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$work/go.mod"
  build_into "etcd $ETCD_VERSION" "$work" "$ETCD_BIN" "" go.etcd.io/etcd/server/v3
  mv "$ETCD_BIN/v3" "$ETCD_BIN/etcd" 2>/dev/null || mv "$ETCD_BIN/server" "$ETCD_BIN/etcd"
}

build_helm() {
  local work="$CACHE/src/helm-$HELM_VERSION"
  mkdir -p "$work"
  printf 'module clusterapp.local/testbed/helm\n\ngo 1.26.0\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" > "$work/go.mod"
  (cd "$work" && GOFLAGS=-mod=mod go mod download) >&2
  # Like helm's own Makefile: the Kubernetes version helm assumes for
  # `helm template` and `helm lint` (without a cluster) is the one of the
  # client-go it is built with, major + 1 (client-go v0.35 = Kubernetes 1.35).
  local client_go major minor
  client_go="$(cd "$work" && GOFLAGS=-mod=mod go list -m -f '{{.Version}}' k8s.io/client-go)"
  major="${client_go#v}"; major="${major%%.*}"; major=$((major + 1))
  minor="${client_go#v*.}"; minor="${minor%%.*}"
  local ld="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done
  build_into "helm $HELM_VERSION" "$work" "$HELM_BIN" "$ld" helm.sh/helm/v3/cmd/helm
}

# wrapper_module NAME MODULE VERSION: a go.mod that requires MODULE@VERSION,
# in its own source folder; prints the folder.
wrapper_module() {
  local name="$1" module="$2" version="$3"
  local work="$CACHE/src/$name-$version"
  mkdir -p "$work"
  printf 'module clusterapp.local/testbed/%s\n\ngo 1.26.0\n\nrequire %s %s\n' "$name" "$module" "$version" > "$work/go.mod"
  echo "$work"
}

build_coredns() {
  local work; work="$(wrapper_module coredns github.com/coredns/coredns "$COREDNS_VERSION")"
  # CoreDNS's plugin list (core/plugin/zplugin.go) is generated and
  # committed, so the module builds as published.
  build_into "coredns $COREDNS_VERSION" "$work" "$COREDNS_BIN" \
    "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" github.com/coredns/coredns
}

build_registry() {
  local work; work="$(wrapper_module distribution github.com/distribution/distribution/v3 "$DISTRIBUTION_VERSION")"
  build_into "distribution registry $DISTRIBUTION_VERSION" "$work" "$REGISTRY_BIN" \
    "-X github.com/distribution/distribution/v3/version.version=$DISTRIBUTION_VERSION" \
    github.com/distribution/distribution/v3/cmd/registry
}

build_crictl() {
  local work; work="$(wrapper_module cri-tools sigs.k8s.io/cri-tools "$CRI_TOOLS_VERSION")"
  build_into "crictl $CRI_TOOLS_VERSION" "$work" "$CRICTL_BIN" \
    "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION" sigs.k8s.io/cri-tools/cmd/crictl
}

nodes=0
check=0
for arg in "$@"; do
  case "$arg" in
    --nodes) nodes=1 ;;
    --check) check=1 ;;
    *) die "unknown argument: $arg (usage: install.sh [--nodes] [--check])" ;;
  esac
done

if (( check )); then
  missing=()
  kube_missing && missing+=("kubernetes $KUBERNETES_VERSION ($KUBE_BIN)")
  etcd_missing && missing+=("etcd $ETCD_VERSION ($ETCD_BIN)")
  helm_missing && missing+=("helm $HELM_VERSION ($HELM_BIN)")
  if (( nodes )); then
    coredns_missing && missing+=("coredns $COREDNS_VERSION ($COREDNS_BIN)")
    registry_missing && missing+=("distribution registry $DISTRIBUTION_VERSION ($REGISTRY_BIN)")
    crictl_missing && missing+=("crictl $CRI_TOOLS_VERSION ($CRICTL_BIN)")
  fi
  if (( ${#missing[@]} )); then
    printf '[install] not built yet: %s\n' "${missing[@]}" >&2
    if (( nodes )); then
      printf '[install] run: make nodes-tools   (or tests/bed/install.sh --nodes)\n' >&2
    else
      printf '[install] run: make tools   (or tests/bed/install.sh)\n' >&2
    fi
    exit 1
  fi
  exit 0
fi

built=0
if etcd_missing; then need_go; build_etcd; built=1; fi
if kube_missing; then need_go; build_kubernetes; built=1; fi
if helm_missing; then need_go; build_helm; built=1; fi
if (( nodes )); then
  if coredns_missing; then need_go; build_coredns; built=1; fi
  if registry_missing; then need_go; build_registry; built=1; fi
  if crictl_missing; then need_go; build_crictl; built=1; fi
fi
(( built )) || log "all binaries cached, nothing to build"
printf '%s\n' "$ETCD_BIN" "$KUBE_BIN" "$HELM_BIN"
(( nodes == 0 )) || printf '%s\n' "$COREDNS_BIN" "$REGISTRY_BIN" "$CRICTL_BIN"
