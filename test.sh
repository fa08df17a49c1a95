#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite, browser tests included.
# Extra arguments go to pytest, e.g. ./test.sh -k decoding
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! cmp -s requirements-dev.txt "$VENV/.installed-dev" 2>/dev/null || ! cmp -s requirements.txt "$VENV/.installed-requirements" 2>/dev/null; then
  "$VENV/bin/pip" install -q -r requirements-dev.txt
  cp requirements-dev.txt "$VENV/.installed-dev"
  cp requirements.txt "$VENV/.installed-requirements"
fi
# The browser tests drive Debian's Chromium through Playwright (no browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest "$@"
