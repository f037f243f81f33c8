#!/usr/bin/env bash
# Build the CPU smoke image of qlora-ray with podman on a machine that reaches no image
# registry (our CI): a Debian bookworm base made with debootstrap, and every Python
# dependency, CPU torch included, from a local wheelhouse. The Dockerfile is the same one
# the GPU image is built from; only the build arguments differ.
#
#   docker/build-cpu-image.sh [TAG]          default TAG: localhost/qlora-ray:cpu
#
# The slow parts are cached, so a rebuild with unchanged dependencies takes seconds:
#   - the base image stays in podman's storage (and its rootfs tarball in the cache dir,
#     to re-import it if the storage was wiped);
#   - the wheelhouse is kept per (constraints.txt, dependency list) hash in the cache dir;
#   - podman's layer cache keeps the dependency layer while only the source changes.
# Cache dir: $QLORA_RAY_CI_CACHE (default ~/.cache/qlora-ray-ci). Needs root, podman,
# runc and debootstrap (scripts/setup.sh --test installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-localhost/qlora-ray:cpu}
CACHE=${QLORA_RAY_CI_CACHE:-$HOME/.cache/qlora-ray-ci}
# Debian packages baked into the base (the Dockerfile's apt step then only refreshes its
# lists); the base image and its cached rootfs are keyed on this list.
BASE_PACKAGES=ca-certificates,python3,python3-venv,rsync,openssh-client,tini,wget
BASE_KEY=$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-8)
BASE=${QLORA_RAY_BASE_IMAGE:-localhost/qlora-ray-base:bookworm-$BASE_KEY}
PY=${PYTHON:-.venv/bin/python}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
mkdir -p "$CACHE"
log() { printf '[build-cpu-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# --------------------------------------------------------------------------- base image
debian_mirror() {
  # The machine's own Debian mirror (it may be the only one reachable).
  local uri
  uri=$(grep -hs -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}') || true
  [ -n "$uri" ] || uri=$(grep -hs -m1 -E '^deb[[:space:]]+http' /etc/apt/sources.list | awk '{print $2}') || true
  echo "${uri:-http://deb.debian.org/debian}"
}

if ! podman image exists "$BASE"; then
  tarball=$CACHE/debian-bookworm-minbase-$BASE_KEY.tar
  if [ ! -s "$tarball" ]; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm from $(debian_mirror) (once; cached as $tarball)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" \
      bookworm "$rootfs" "$(debian_mirror)" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # HTTPS from inside the build may pass a proxy that re-signs certificates: trust the
    # same extra CAs as this machine (ca-certificates picks them up in the build).
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 || true
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
    # Rootfs tarballs of other package lists only take space.
    find "$CACHE" -maxdepth 1 -name 'debian-bookworm-minbase-*.tar' ! -name "${tarball##*/}" -delete
  fi
  log "importing $tarball as $BASE"
  podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$BASE" >/dev/null
fi

# --------------------------------------------------------------------------- wheelhouse
# The same requirement list the Dockerfile derives from pyproject.toml.
requirements=$("$PY" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"] + p["optional-dependencies"]["aws"]))')
key=$( (cat constraints.txt; echo "$requirements"; "$PY" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)
wheelhouse=$CACHE/wheels-$key
if [ ! -e "$wheelhouse/.complete" ]; then
  log "filling wheelhouse $wheelhouse"
  rm -rf "$wheelhouse.tmp" && mkdir -p "$wheelhouse.tmp"
  # On this machine pip resolves torch==2.13.0 to the CPU build; binary wheels only, so the
  # image build needs no compiler. The host runs Debian bookworm's Python minor too.
  "$PY" -m pip download --disable-pip-version-check -q --only-binary=:all: \
    -c constraints.txt -r <(echo "$requirements") -d "$wheelhouse.tmp"
  touch "$wheelhouse.tmp/.complete"
  rm -rf "$wheelhouse" && mv "$wheelhouse.tmp" "$wheelhouse"
  # Old wheelhouses (other lock versions) only take space.
  find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +
fi

# The build context must hold the wheelhouse; hard links make that free.
ctx_wheels=docker/wheelhouse
rm -rf "$ctx_wheels"
cp -al "$wheelhouse" "$ctx_wheels" 2>/dev/null || cp -a "$wheelhouse" "$ctx_wheels"
trap 'rm -rf "$ctx_wheels"' EXIT

# --------------------------------------------------------------------------- image
commit=$(git rev-parse HEAD 2>/dev/null || true)
if [ -n "$commit" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit-dirty"
fi
log "podman build -> $TAG"
podman build --layers --format docker \
  --build-arg BASE_IMAGE="$BASE" \
  --build-arg WHEELHOUSE="$ctx_wheels" \
  --build-arg NO_INDEX=1 \
  --build-arg QLORA_RAY_IMAGE="$TAG" \
  --build-arg QLORA_RAY_GIT_COMMIT="$commit" \
  --build-arg QLORA_RAY_SOURCE="${QLORA_RAY_SOURCE:-}" \
  -t "$TAG" -f Dockerfile .
log "built $TAG"
