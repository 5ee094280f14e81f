#!/usr/bin/env bash
# Installs what the browser test (tests/ui_browser.rs) needs: Debian's chromium (/usr/bin/chromium) with
# apt-get, and playwright-core, pinned by tests/ui/package-lock.json, into tests/ui/node_modules with npm.
# Uses sudo when not root. Prints what to do by hand if that is not possible; the test then says so.
set -u
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo -n"; else
      echo "warning: chromium is missing and this user cannot install it; run: apt-get install chromium" >&2
      SUDO="unavailable"
    fi
  fi
  if [ "$SUDO" = unavailable ]; then :
  elif ! command -v apt-get >/dev/null; then
    echo "warning: chromium is missing and apt-get is not available; install chromium by hand" >&2
  else
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || {
      $SUDO apt-get update -q >/dev/null 2>&1
      $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
    } || echo "warning: installing chromium failed; the browser test will say so" >&2
  fi
fi
if ! command -v npm >/dev/null; then
  echo "warning: npm is missing; install Node.js and npm (apt-get install nodejs npm) for the browser test" >&2
  exit 0
fi
# `npm ci` installs exactly the lock file; it runs again only when the lock changes.
stamp=tests/ui/node_modules/.installed
if [ ! -f "$stamp" ] || [ tests/ui/package-lock.json -nt "$stamp" ]; then
  (cd tests/ui && npm ci --no-audit --no-fund --loglevel=error >/dev/null) && touch "$stamp" ||
    echo "warning: npm ci in tests/ui failed; the browser test will say so" >&2
fi
