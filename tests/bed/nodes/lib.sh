# Sourced by tests/bed/nodes/*.sh: paths, logging, the local image registry.
_nodes_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bed/paths.sh
source "$_nodes_here/../paths.sh"
NODES_REPO="$(cd "$_nodes_here/../../.." && pwd)"
IMAGES_CACHE="$CACHE/images"          # build contexts, stamps, logs of `make images`
REGISTRY_STORAGE="$CACHE/registry"    # the local registry's blobs: survive cluster restarts
# Images whose registry is one of these are pulled from the local registry
# (containerd hosts.toml `server`, so the real registry is never asked).
# bed.clusterapp.local is the test bed's own name for images only it uses.
MAPPED_REGISTRIES=(docker.io ghcr.io registry.k8s.io quay.io bed.clusterapp.local)

log() { printf '[%s] %s\n' "${LOG_TAG:-nodes}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${LOG_TAG:-nodes}" "$*" >&2; exit 1; }

# The repository path of an image in the local registry: its name without
# the registry host (ghcr.io/clusterapp/x:1 -> clusterapp/x:1).
registry_path() {
  local name="$1" first="${1%%/*}"
  if [[ $name == */* && ( $first == *.* || $first == *:* || $first == localhost ) ]]; then
    echo "${name#*/}"
  else
    echo "library/$name"
  fi
}

# pid_runs_ours PID MARK: PID is alive and its command line contains MARK
# (a state folder), so a reused PID of some other program is never signalled.
pid_runs_ours() {
  local pid="$1" mark="$2" cmd
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  { cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline")"; } 2>/dev/null || return 1
  [[ $cmd == *"$mark"* ]]
}

# await_exec PID MARK: wait (up to 5 s) until a child just started in the
# background has exec'd its program. Between fork and exec its command line
# is this shell's, which lacks MARK: a check in that window would take a
# healthy start for an exit (the clean-clone CI saw "the registry exited"
# with an empty log). The child is ours and not yet reaped, so its PID cannot
# belong to another program meanwhile.
await_exec() {
  local pid="$1" mark="$2" deadline=$((SECONDS + 5))
  until pid_runs_ours "$pid" "$mark" || (( SECONDS >= deadline )); do
    proc_alive "$pid" || return 0
    sleep 0.02
  done
}

# stop_pid PID MARK [GRACE_SECONDS]: SIGTERM, wait, SIGKILL.
stop_pid() {
  local pid="$1" mark="$2" grace="${3:-10}"
  pid_runs_ours "$pid" "$mark" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while pid_runs_ours "$pid" "$mark" && (( SECONDS < deadline )); do sleep 0.1; done
  if pid_runs_ours "$pid" "$mark"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.1; fi
}

# Below the kernel's ephemeral range (32768+), where a connection's local
# port could take it between the check and the bind.
free_local_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    if ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then echo "$p"; return 0; fi
  done
  die "no free TCP port found on 127.0.0.1"
}

# registry_start DIR: the distribution registry on a free 127.0.0.1 port,
# storage in $REGISTRY_STORAGE, config/log/pid in DIR. Sets REGISTRY_ADDR.
# A registry that exits at once is started again on another port (up to
# REGISTRY_START_ATTEMPTS times), and its exit status is logged: twice in a
# row, a clean-clone CI run saw it exit within a second with an empty log,
# which no run by hand reproduced.
REGISTRY_START_ATTEMPTS=3
registry_start() {
  local dir="$1" attempt
  [[ -x $REGISTRY_BIN/registry ]] || die "the registry is not built: run tests/bed/install.sh --nodes"
  mkdir -p "$dir" "$REGISTRY_STORAGE"
  for attempt in $(seq 1 "$REGISTRY_START_ATTEMPTS"); do
    registry_try_start "$dir" && return 0
    log "the registry exited at start (attempt $attempt of $REGISTRY_START_ATTEMPTS, $REGISTRY_EXIT); its log:"
    sed 's/^/    /' "$dir/registry.log" >&2 || true
    cp "$dir/registry.log" "$IMAGES_CACHE/registry-failed.$attempt.log" 2>/dev/null || true
  done
  die "the registry did not start in $REGISTRY_START_ATTEMPTS attempts (logs: $IMAGES_CACHE/registry-failed.*.log)"
}

# One start of the registry; fails (with REGISTRY_EXIT set) when it exits
# before it answers.
registry_try_start() {
  local dir="$1" port pid
  port="$(free_local_port)"
  REGISTRY_ADDR="127.0.0.1:$port"
  cat > "$dir/registry.yml" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $REGISTRY_STORAGE
  delete:
    enabled: true
http:
  addr: $REGISTRY_ADDR
YML
  # no tracing exporter: the registry must not try to reach a collector
  OTEL_TRACES_EXPORTER=none OTEL_SDK_DISABLED=true \
    setsid "$REGISTRY_BIN/registry" serve "$dir/registry.yml" </dev/null >"$dir/registry.log" 2>&1 8>&- 9>&- &
  pid=$!
  echo "$pid" > "$dir/registry.pid"
  echo "REGISTRY_ADDR=$REGISTRY_ADDR" > "$dir/registry.env"
  await_exec "$pid" "$dir/"
  local deadline=$((SECONDS + 15))
  until curl -sf --max-time 1 "http://$REGISTRY_ADDR/v2/" -o /dev/null; do
    if ! pid_runs_ours "$pid" "$dir/"; then
      # setsid forks when it leads its process group: the registry then
      # runs under another PID, found by the port it listens on.
      local listener
      listener="$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)"
      if [[ -n $listener ]] && pid_runs_ours "$listener" "$dir/"; then
        log "the registry runs as PID $listener (setsid forked)"
        pid="$listener"
        echo "$pid" > "$dir/registry.pid"
        continue
      fi
      if proc_alive "$pid" && (( SECONDS < deadline )); then
        sleep 0.1   # alive, not yet our program: still on its way to exec
        continue
      fi
      # Our own child: its status says whether it exited or was killed.
      local status=0
      wait "$pid" 2>/dev/null || status=$?
      if (( status > 128 )); then REGISTRY_EXIT="killed by signal $((status - 128))"; else REGISTRY_EXIT="exit status $status"; fi
      rm -f "$dir/registry.pid" "$dir/registry.env"
      return 1
    fi
    (( SECONDS < deadline )) || die "the registry did not answer on $REGISTRY_ADDR within 15 s (log: $dir/registry.log)"
    sleep 0.1
  done
}

registry_stop() {
  local dir="$1"
  [[ -f $dir/registry.pid ]] || return 0
  stop_pid "$(cat "$dir/registry.pid")" "$dir/" 5
  rm -f "$dir/registry.pid" "$dir/registry.env"
}

# registry_has ADDR NAME: the registry holds a manifest for image NAME.
registry_has() {
  local addr="$1" path; path="$(registry_path "$2")"
  curl -sf --max-time 5 -o /dev/null -I \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
    "http://$addr/v2/${path%:*}/manifests/${path##*:}"
}
