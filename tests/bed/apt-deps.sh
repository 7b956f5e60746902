#!/usr/bin/env bash
# Installs the Debian packages the tests, benchmarks and demo use, when missing.
#   tomcat10   real Apache Tomcat 10.1 session nodes
#   openjdk-17-jdk-headless  javac for the counter sample app (tests build it)
#   apache2    Apache httpd 2.4, the peer the balancer is benchmarked against
#   wrk        load generator for benchmarks and soak tests
#   gnuplot-nox  draws `make bench`'s plot (target/bench/balancer.png)
#   chromium   headless browser that looks at the balancer's status page
#   openssl    certificates for the local control plane
#   iproute2, procps, curl   plumbing the test bed uses
#
#   tests/bed/apt-deps.sh [PACKAGE...]   these packages instead (tests/bed/nodes/apt-deps.sh)
set -euo pipefail
packages=(tomcat10 openjdk-17-jdk-headless apache2 wrk gnuplot-nox chromium openssl iproute2 procps curl ca-certificates)
(( $# == 0 )) || packages=("$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
(( ${#missing[@]} )) || exit 0
echo "[apt] installing: ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[apt] error: apt-get not found; install these Debian packages by hand: ${missing[*]}" >&2
  exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "[apt] error: not root and no sudo; run as root: apt-get install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
# Package scripts must not start system services (apache2 would take port 80,
# tomcat10 port 8080, containerd would run host-wide on /run/containerd): the
# tests start their own instances.
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
