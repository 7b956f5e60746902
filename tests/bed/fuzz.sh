#!/usr/bin/env bash
# Runs the balancer's cargo-fuzz targets (fuzz/): the AJP decoder, the
# route parser and the request-framing scanner, each for SECONDS (default
# 60). Installs what it needs on first use: the nightly toolchain (rustup,
# minimal profile) and cargo-fuzz into ~/.cache/clusterapp. The corpus is
# kept in ~/.cache/clusterapp/fuzz-corpus/<target> between runs; a crash
# stops the run with the input saved under fuzz/artifacts/ and a non-zero
# exit.
#
#   tests/bed/fuzz.sh [SECONDS] [TARGET ...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/bed/paths.sh
source "$root/tests/bed/paths.sh"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ajp_decoder route_parser framing_scanner)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "[fuzz] installing the nightly toolchain (rustup, minimal profile)"
  rustup toolchain install nightly --profile minimal
fi
fuzz_root="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$fuzz_root/bin/cargo-fuzz" ]; then
  echo "[fuzz] building cargo-fuzz $CARGO_FUZZ_VERSION into $fuzz_root (a few minutes, once)"
  cargo +stable install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$fuzz_root"
fi
export PATH="$fuzz_root/bin:$PATH"
# The fuzz build is kept outside the repo's target/ (it is a sanitizer build).
export CARGO_TARGET_DIR="${CLUSTERAPP_FUZZ_TARGET_DIR:-$CACHE/fuzz-target}"

cd "$root/fuzz"
for target in "${targets[@]}"; do
  corpus="$CACHE/fuzz-corpus/$target"
  mkdir -p "$corpus"
  echo "[fuzz] $target for ${seconds}s (corpus $corpus)"
  log=$(mktemp)
  if ! cargo +nightly fuzz run "$target" "$corpus" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "[fuzz] $target FAILED (input saved under fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  runs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
  echo "[fuzz] $target: ${runs:-?} inputs in ${seconds}s, no crash (${cov:-cov: ?}, corpus $(find "$corpus" -type f | wc -l) files)"
  rm -f "$log"
done
