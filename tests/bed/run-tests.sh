#!/usr/bin/env bash
# `make test`: one control plane for the whole suite, then every test.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

export CLUSTERAPP_STATE="$repo/target/cluster-test"
cleanup() { bash "$here/cluster.sh" down >/dev/null 2>&1 || true; }
trap cleanup EXIT

started=$SECONDS
line="$(bash "$here/cluster.sh" up | tail -n 1)"
export CLUSTERAPP_TEST_KUBECONFIG="${line#KUBECONFIG=}"
echo "[test] control plane up in $((SECONDS - started)) s: $CLUSTERAPP_TEST_KUBECONFIG" >&2

cargo build --locked --workspace --all-targets
# the process kubelet the tests start (built above with the workspace's
# feature set; otherwise each test binary would build it once more)
export CLUSTERAPP_KUBELET_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/clusterapp-kubelet"
# The end-to-end tests (tests/e2e_*.rs) append their figures here.
summary="$repo/target/e2e-summary.txt"
rm -f "$summary"
status=0
cargo test --locked --workspace --no-fail-fast -- --test-threads="${CLUSTERAPP_TEST_THREADS:-4}" || status=$?
if [[ -s "$summary" ]]; then
  echo
  echo "[test] end-to-end summary (target/e2e-summary.txt):"
  echo "test                               requests failures   lost   converge  notes"
  cat "$summary"
fi
exit "$status"
