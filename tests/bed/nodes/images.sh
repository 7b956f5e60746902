#!/usr/bin/env bash
# `make images`: builds the images the local nodes run, with buildah (no
# daemon), from the repository's own Dockerfiles, and pushes them to the
# local registry (storage in $CLUSTERAPP_CACHE/registry; a registry on a free
# 127.0.0.1 port runs only while this script does).
#
#   bed.clusterapp.local/debian:bookworm-jdk17  mmdebstrap'd bookworm + OpenJDK 17 (images/debian)
#   docker.io/library/tomcat:10.1-jdk17         Tomcat 10.1 like the official image (images/tomcat)
#   ghcr.io/clusterapp/counter-app:1.0          deploy/examples/counter-app/Dockerfile, unchanged
#   ghcr.io/clusterapp/clusterapp:0.1.0         deploy/image/Dockerfile (BINARY_STAGE=prebuilt,
#                                               static musl binary built here by cargo)
#   bed.clusterapp.local/pause:1                the Pod sandbox (images/pause)
#   bed.clusterapp.local/coredns:$COREDNS_VERSION  cluster DNS (images/coredns)
#
# Cached: an image is rebuilt only when its Dockerfile, its build context,
# its build arguments or its base image changed (a stamp per image under
# $CLUSTERAPP_CACHE/images/stamps); a run with nothing changed builds nothing.
#
#   tests/bed/nodes/images.sh [NAME...]    (NAME: debian tomcat counter-app clusterapp pause coredns)
set -euo pipefail
LOG_TAG=images
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bed/nodes/lib.sh
source "$here/lib.sh"
repo="$NODES_REPO"

for tool in buildah mmdebstrap curl sha512sum go cargo; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is missing: run tests/bed/nodes/apt-deps.sh (Debian packages buildah, mmdebstrap) or install it"
done
[[ $(id -u) -eq 0 ]] || die "buildah and mmdebstrap run as root here (rootful image store in /var/lib/containers): run as root"
bash "$repo/tests/bed/install.sh" --nodes --check >/dev/null 2>&1 || bash "$repo/tests/bed/install.sh" --nodes >/dev/null

CTX="$IMAGES_CACHE/ctx"
STAMPS="$IMAGES_CACHE/stamps"
LOGS="$IMAGES_CACHE/logs"
mkdir -p "$CTX" "$STAMPS" "$LOGS"
run_dir="$IMAGES_CACHE/run.$$"
cleanup() { registry_stop "$run_dir"; rm -rf "$run_dir"; }
trap cleanup EXIT
registry_start "$run_dir"

DEBIAN_IMAGE=bed.clusterapp.local/debian:bookworm-jdk17
TOMCAT_IMAGE=docker.io/library/tomcat:10.1-jdk17
COUNTER_IMAGE=ghcr.io/clusterapp/counter-app:1.0
CLUSTERAPP_IMAGE=ghcr.io/clusterapp/clusterapp:0.1.0
PAUSE_IMAGE=bed.clusterapp.local/pause:1
COREDNS_IMAGE=bed.clusterapp.local/coredns:$COREDNS_VERSION

# Content hash of a folder: names, modes and bytes of every file, not mtimes.
hash_tree() {
  (cd "$1" && find . -type f -printf '%P %m\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -c1-64
}

image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }

# build NAME IMAGE DOCKERFILE CONTEXT [--build-arg K=V]...
# The stamp is the hash of everything the build reads plus its base image's
# stamp (BASE_STAMP), so a changed base rebuilds its children.
declare -A STAMP
build() {
  local name="$1" image="$2" dockerfile="$3" context="$4"; shift 4
  local hash
  hash="$({ echo "recipe 1"; cat "$dockerfile"; printf '%s\n' "$@"; hash_tree "$context"; echo "${BASE_STAMP:-}"; } | sha256sum | cut -c1-64)"
  STAMP[$name]="$hash"
  if [[ "$(cat "$STAMPS/$name" 2>/dev/null)" == "$hash" ]] && image_id "$image" >/dev/null; then
    if registry_has "$REGISTRY_ADDR" "$image"; then
      log "$name: cached ($image)"
      return 0
    fi
  else
    log "$name: building $image from ${dockerfile#"$repo"/}"
    local started=$SECONDS logf="$LOGS/$name.log"
    # --network none: no RUN step needs the network, and buildah must not
    # set up a bridge of its own (its default CNI config turns on global IP
    # forwarding). --layers: unchanged steps are reused.
    if ! buildah bud --pull-never --layers --network none --format oci \
           -f "$dockerfile" -t "$image" "$@" "$context" >"$logf" 2>&1 < /dev/null; then
      grep -E '^STEP ' "$logf" | sed 's/^/    /' >&2 || true
      log "$name: buildah failed building ${dockerfile#"$repo"/} — its output:"
      grep -vE '^(STEP |Getting image|Copying |Writing manifest|Storing signatures|--> )' "$logf" | tail -n 25 | sed 's/^/    /' >&2
      # buildah names the step, not the line: find the line in the Dockerfile
      local step line=""
      step="$(sed -n 's/.*building at STEP "\([^"]*\)".*/\1/p' "$logf" | head -n 1)"
      step="${step%% }"
      [[ -z $step ]] || line="$(grep -nF -- "$step" "$dockerfile" | head -n 1 | cut -d: -f1)"
      die "$name: image build failed at ${dockerfile#"$repo"/}${line:+:$line}${step:+ ($step)} (full log $logf)"
    fi
    grep -E '^STEP ' "$logf" | sed 's/^/    /' >&2 || true
    echo "$hash" > "$STAMPS/$name"
    log "$name: built in $((SECONDS - started)) s"
  fi
  local started=$SECONDS
  buildah push --quiet --tls-verify=false "$image" "docker://$REGISTRY_ADDR/$(registry_path "$image")" >>"$LOGS/$name.log" 2>&1 \
    || die "$name: push to the local registry failed (log $LOGS/$name.log)"
  log "$name: pushed to the local registry in $((SECONDS - started)) s"
}

# --- contexts -----------------------------------------------------------------

# Debian bookworm + OpenJDK 17 as a tarball from mmdebstrap, remade only when
# its recipe changes (the archive moves on, but a cached base is what we want).
debian_rootfs() {
  local dir="$CTX/debian" recipe
  mkdir -p "$dir"
  local args=(--variant=minbase --include=openjdk-17-jdk-headless,ca-certificates,netbase
    --aptopt='Acquire::Languages "none"'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*'
    # openjdk's post-install fails without this folder once man pages are excluded
    --essential-hook='mkdir -p "$1/usr/share/man/man1"'
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
    --format=tar bookworm)
  local mirrors=("deb http://deb.debian.org/debian bookworm main"
    "deb http://deb.debian.org/debian bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main")
  recipe="$(printf '%s\n' "${args[@]}" "${mirrors[@]}" | sha256sum | cut -c1-64)"
  if [[ -f $dir/rootfs.tar && "$(cat "$STAMPS/debian-rootfs" 2>/dev/null)" == "$recipe" ]]; then
    return 0
  fi
  log "debian: mmdebstrap bookworm + openjdk-17-jdk-headless (downloads from deb.debian.org)"
  local started=$SECONDS
  rm -f "$dir/rootfs.tar"
  if ! mmdebstrap --quiet "${args[@]}" "$dir/rootfs.tar.tmp" "${mirrors[@]}" >"$LOGS/debian-rootfs.log" 2>&1; then
    tail -n 25 "$LOGS/debian-rootfs.log" >&2
    die "debian: mmdebstrap failed (log $LOGS/debian-rootfs.log)"
  fi
  mv "$dir/rootfs.tar.tmp" "$dir/rootfs.tar"
  echo "$recipe" > "$STAMPS/debian-rootfs"
  log "debian: root file system in $((SECONDS - started)) s ($(du -m "$dir/rootfs.tar" | cut -f1) MB)"
}

tomcat_tarball() {
  local dir="$CTX/tomcat" file="$CTX/tomcat/tomcat.tar.gz"
  mkdir -p "$dir"
  if [[ -f $file ]] && echo "$TOMCAT_SHA512  $file" | sha512sum -c --status; then return 0; fi
  local url="https://repo1.maven.org/maven2/org/apache/tomcat/tomcat/$TOMCAT_VERSION/tomcat-$TOMCAT_VERSION.tar.gz"
  log "tomcat: downloading $url"
  curl -sSfL --retry 3 -o "$file.tmp" "$url" || die "tomcat: download of $url failed"
  echo "$TOMCAT_SHA512  $file.tmp" | sha512sum -c --status \
    || { rm -f "$file.tmp"; die "tomcat: $url does not match TOMCAT_SHA512 in tests/bed/versions.env"; }
  mv "$file.tmp" "$file"
}

# copy_if_changed SRC DST: keep DST's bytes (and the stamp) when equal.
copy_if_changed() { cmp -s "$1" "$2" 2>/dev/null || install -m 0755 "$1" "$2"; }

pause_binary() {
  local dir="$CTX/pause"; mkdir -p "$dir"
  (cd "$here/images/pause" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags '-s -w' -o "$dir/pause.tmp" .) \
    || die "pause: go build failed"
  copy_if_changed "$dir/pause.tmp" "$dir/pause"; rm -f "$dir/pause.tmp"
}

coredns_binary() {
  local dir="$CTX/coredns"; mkdir -p "$dir"
  copy_if_changed "$COREDNS_BIN/coredns" "$dir/coredns"
}

# The clusterapp binary, static (musl), built on the host with its own
# target folder so it never waits for (or invalidates) other cargo builds.
clusterapp_binary() {
  local dir="$CTX/clusterapp" target="$CACHE/cargo-musl"
  mkdir -p "$dir"
  rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
    || { log "clusterapp: rustup target add x86_64-unknown-linux-musl"; rustup target add x86_64-unknown-linux-musl >&2; }
  # CLUSTERAPP_IMAGE_PROFILE: `bed` (default; release without LTO, see
  # Cargo.toml) or `release` for the image users get from the Dockerfile.
  local profile="${CLUSTERAPP_IMAGE_PROFILE:-bed}"
  log "clusterapp: cargo build --profile $profile (static musl, target folder $target)"
  local started=$SECONDS
  (cd "$repo" && CARGO_TARGET_DIR="$target" cargo build --profile "$profile" --locked --quiet -p clusterapp \
      --target x86_64-unknown-linux-musl) || die "clusterapp: cargo build for x86_64-unknown-linux-musl failed"
  local bin="$target/x86_64-unknown-linux-musl/$profile/clusterapp"
  file "$bin" 2>/dev/null | grep -qE "statically linked|static-pie linked" || [[ ! -x /usr/bin/file ]] \
    || die "clusterapp: $bin is not statically linked"
  copy_if_changed "$bin" "$dir/clusterapp"
  log "clusterapp: binary ready in $((SECONDS - started)) s"
}

# --- the images -----------------------------------------------------------------

want() { (( ${#only[@]} == 0 )) || [[ " ${only[*]} " == *" $1 "* ]]; }
only=("$@")
started_all=$SECONDS

if want debian || want tomcat || want counter-app; then
  debian_rootfs
  BASE_STAMP="" build debian "$DEBIAN_IMAGE" "$here/images/debian/Dockerfile" "$CTX/debian"
  tomcat_tarball
  BASE_STAMP="${STAMP[debian]}" build tomcat "$TOMCAT_IMAGE" "$here/images/tomcat/Dockerfile" "$CTX/tomcat" \
    --build-arg "TOMCAT_VERSION=$TOMCAT_VERSION" --build-arg "BASE=$DEBIAN_IMAGE"
  BASE_STAMP="${STAMP[tomcat]}" build counter-app "$COUNTER_IMAGE" "$repo/deploy/examples/counter-app/Dockerfile" \
    "$repo/deploy/examples/counter-app"
fi
if want clusterapp; then
  clusterapp_binary
  build clusterapp "$CLUSTERAPP_IMAGE" "$repo/deploy/image/Dockerfile" "$CTX/clusterapp" --build-arg BINARY_STAGE=prebuilt
fi
if want pause; then
  pause_binary
  build pause "$PAUSE_IMAGE" "$here/images/pause/Dockerfile" "$CTX/pause"
fi
if want coredns; then
  coredns_binary
  build coredns "$COREDNS_IMAGE" "$here/images/coredns/Dockerfile" "$CTX/coredns"
fi
log "all images ready in $((SECONDS - started_all)) s"
