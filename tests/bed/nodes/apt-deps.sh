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
exec bash "$(dirname "${BASH_SOURCE[0]}")/../apt-deps.sh" "${packages[@]}"
