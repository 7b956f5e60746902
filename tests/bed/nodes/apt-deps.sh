#!/usr/bin/env bash
# Installs the Debian packages that real nodes and `make images` use, when
# missing (the test suite's own packages are in tests/bed/apt-deps.sh).
#   containerd, runc                 the container runtime of each node
#   containernetworking-plugins     bridge, host-local, loopback, portmap CNI plugins
#   nftables                         the `nft` command: forwarding guard, kube-proxy (nftables mode)
#   iptables                         the kubelet still creates a few KUBE-* chains with it
#   buildah                          builds images from our Dockerfiles without a daemon
#   mmdebstrap                       the Debian bookworm base image
#   musl-tools                       musl-gcc, for C parts of crates in the static clusterapp binary
#   conntrack                        kube-proxy flushes stale UDP (DNS) entries with it
set -euo pipefail
packages=(containerd runc containernetworking-plugins nftables iptables buildah mmdebstrap musl-tools
          conntrack iproute2 procps curl openssl ca-certificates util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
(( ${#missing[@]} )) || exit 0
echo "[apt] installing: ${missing[*]}" >&2
command -v apt-get >/dev/null 2>&1 || { echo "[apt] error: apt-get not found; install these Debian packages by hand: ${missing[*]}" >&2; exit 1; }
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "[apt] error: not root and no sudo; run as root: apt-get install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
# Package scripts must not start system services: the Debian containerd
# package would start a host-wide containerd on /run/containerd; our nodes run
# their own, each under its state folder.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  made_policy=1
fi
trap '[[ $made_policy == 1 ]] && $sudo rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
echo "[apt] done" >&2
