#!/usr/bin/env bash
# Installs Debian's docker-compose (v1, used only to validate docker-compose.yml; it needs no Docker
# engine). Uses sudo when not root. Prints what to do by hand if that is not possible.
set -u
if command -v docker-compose >/dev/null; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "warning: docker-compose is missing and this user cannot install it; run: apt-get install docker-compose" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "warning: docker-compose is missing and apt-get is not available; install docker-compose by hand" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q docker-compose >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null 2>&1
  $SUDO apt-get install -y -q docker-compose >/dev/null
} || echo "warning: installing docker-compose failed; the compose test will say so" >&2
