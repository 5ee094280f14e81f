#!/usr/bin/env bash
# `make test` runs this first: the stack tests (tests/compose.rs) need a Docker engine. Installs Debian's
# docker.io (the engine) with docker-compose when missing, and starts dockerd when it is installed but
# not running (root only; its log goes to target/dockerd.log). Where no engine can answer, says so loudly:
# those tests are then skipped (ONNX_CHAT_REQUIRE_DOCKER=1 makes them fail instead).
set -u
cd "$(dirname "$0")/.."
if docker info >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v dockerd >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q docker.io docker-compose >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q docker.io docker-compose >/dev/null 2>&1
  }
fi
if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
  mkdir -p target
  nohup dockerd >target/dockerd.log 2>&1 &
  for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
      echo "docker-engine: started dockerd ($(docker info --format '{{.ServerVersion}}'))"
      exit 0
    fi
    sleep 1
  done
  tail -20 target/dockerd.log >&2
fi
cat >&2 <<'MSG'

!!! ==========================================================================================
!!! No Docker engine answers `docker info`: the compose stack tests (tests/compose.rs) will be
!!! SKIPPED. Install docker.io and start dockerd (as root: apt-get install docker.io; dockerd &).
!!! ==========================================================================================

MSG
exit 0
