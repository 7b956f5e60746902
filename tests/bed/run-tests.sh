#!/usr/bin/env bash
# `make test`: the fast checks first (format, lints, unit tests: no cluster,
# a failure there costs a minute, not the whole suite), then one control
# plane for the cluster and integration suites. Each step is named and
# timed; the first failing one stops the run and is named in the last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

export CLUSTERAPP_STATE="$repo/target/cluster-test"
# The real nodes (with a control plane of their own) for the tests that run
# Pods: tests/support/nodes.rs. Tests that play the kubelet themselves use
# the control plane above, which has no nodes.
export CLUSTERAPP_TEST_NODES="$repo/target/cluster-test-nodes"
cleanup() {
  CLUSTERAPP_STATE="$CLUSTERAPP_TEST_NODES" bash "$here/nodes/nodes.sh" down >/dev/null 2>&1 || true
  bash "$here/cluster.sh" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

# "name seconds" of every finished step, for the closing table.
step_times=()

print_step_times() {
  local entry
  for entry in "${step_times[@]}"; do
    printf '[test]   %-12s %5s s\n' "${entry% *}" "${entry##* }" >&2
  done
}

# run_step NAME COMMAND...: runs COMMAND as the step NAME; on failure names
# the step and exits with the command's status.
run_step() {
  local name="$1"
  shift
  local started=$SECONDS status=0
  echo "[test] step: $name: $*" >&2
  "$@" || status=$?
  local took=$((SECONDS - started))
  step_times+=("$name $took")
  if ((status != 0)); then
    echo "[test] step $name failed after $took s (exit $status)" >&2
    print_step_times
    echo "[test] FAILED at step: $name" >&2
    exit "$status"
  fi
  echo "[test] step $name passed in $took s" >&2
}

start_control_plane() {
  local line
  line="$(bash "$here/cluster.sh" up | tail -n 1)" || return
  export CLUSTERAPP_TEST_KUBECONFIG="${line#KUBECONFIG=}"
  echo "[test] control plane: $CLUSTERAPP_TEST_KUBECONFIG" >&2
}

# --- fast lane: no cluster needed -------------------------------------------
# fuzz/ is a workspace of its own (nightly, cargo-fuzz): not part of these.
run_step fmt cargo fmt --all --check
run_step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
run_step unit cargo test --locked --workspace --lib --bins

# --- cluster and integration suites -------------------------------------------
run_step control-plane start_control_plane
# our images from the repository's Dockerfiles (cached: only what changed)
run_step images bash "$here/nodes/images.sh"
start_nodes() {
  local line
  line="$(CLUSTERAPP_STATE="$CLUSTERAPP_TEST_NODES" bash "$here/nodes/nodes.sh" up | tail -n 1)" || return
  [[ $line == "KUBECONFIG=$CLUSTERAPP_TEST_NODES/admin.kubeconfig" ]] || { echo "[test] nodes.sh up said: $line" >&2; return 1; }
  echo "[test] nodes: $CLUSTERAPP_TEST_NODES (3 nodes Ready)" >&2
}
run_step nodes start_nodes
run_step build cargo build --locked --workspace --all-targets
# The end-to-end tests (tests/e2e/) append their figures here.
summary="$repo/target/e2e-summary.txt"
rm -f "$summary"
# Every test target but the unit tests the fast lane ran (`--test '*'`:
# tests/*.rs), then the doc tests; both to the end even when one fails.
integration() {
  local status=0
  cargo test --locked --workspace --no-fail-fast --test '*' -- --test-threads="${CLUSTERAPP_TEST_THREADS:-4}" ||
    status=$?
  cargo test --locked --workspace --no-fail-fast --doc || status=$?
  if [[ -s "$summary" ]]; then
    echo
    echo "[test] end-to-end summary (target/e2e-summary.txt):"
    echo "test                               requests failures   lost   converge  notes"
    cat "$summary"
  fi
  return "$status"
}
run_step integration integration
echo "[test] step times:" >&2
print_step_times
echo "[test] all steps passed" >&2
