#!/usr/bin/env bash
# deploy/clusterapp.yaml is `helm template` of charts/clusterapp with default
# values into namespace clusterapp-system, plus that Namespace: the plain
# manifests for `kubectl apply -f deploy/clusterapp.yaml`. Never edit it by
# hand; run this script (make deploy) after changing the chart.
#   tests/bed/gen-deploy.sh           regenerate
#   tests/bed/gen-deploy.sh --check   exit 1 with a diff when it is stale
# It also copies crds/clusterapp.yaml into the chart (charts/clusterapp/files),
# since Helm cannot read files outside the chart.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=tests/bed/paths.sh
source "$here/paths.sh"
helm="$HELM_BIN/helm"
[[ -x $helm ]] || { echo "[deploy] helm is not built yet: run make tools" >&2; exit 1; }

render() {
  cat <<'HEAD'
# Generated from charts/clusterapp by tests/bed/gen-deploy.sh — do not edit.
# kubectl apply --server-side -f deploy/clusterapp.yaml
apiVersion: v1
kind: Namespace
metadata:
  name: clusterapp-system
  labels:
    app.kubernetes.io/name: clusterapp
    # the operator runs non-root with a read-only root filesystem
    pod-security.kubernetes.io/enforce: restricted
HEAD
  "$helm" template clusterapp "$repo/charts/clusterapp" --namespace clusterapp-system \
    --set-string image.tag="$(sed -n 's/^appVersion: "\(.*\)"/\1/p' "$repo/charts/clusterapp/Chart.yaml")" \
    | sed -e '/^  *helm.sh\/chart: /d' -e 's/app.kubernetes.io\/managed-by: Helm/app.kubernetes.io\/managed-by: kubectl/'
}

if [[ "${1:-}" == "--check" ]]; then
  status=0
  if ! diff -u "$repo/deploy/clusterapp.yaml" <(render); then
    echo "[deploy] deploy/clusterapp.yaml is stale: run tests/bed/gen-deploy.sh" >&2; status=1
  fi
  if ! diff -u "$repo/crds/clusterapp.yaml" "$repo/charts/clusterapp/files/clusterapp.yaml" >/dev/null; then
    echo "[deploy] charts/clusterapp/files/clusterapp.yaml differs from crds/clusterapp.yaml: run tests/bed/gen-deploy.sh" >&2; status=1
  fi
  exit $status
fi
cp "$repo/crds/clusterapp.yaml" "$repo/charts/clusterapp/files/clusterapp.yaml"
render > "$repo/deploy/clusterapp.yaml"
echo "[deploy] wrote deploy/clusterapp.yaml" >&2
