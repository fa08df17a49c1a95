#!/usr/bin/env bash
# Set up (first time only) and start the app with the embedded default model on http://127.0.0.1:7860.
# Extra arguments go to app.py, e.g. ./run.sh --port 8000 --share
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! cmp -s requirements.txt "$VENV/.installed-requirements" 2>/dev/null; then
  start=$SECONDS
  "$VENV/bin/pip" install -q -r requirements.txt
  cp requirements.txt "$VENV/.installed-requirements"
  echo "[run.sh] installed requirements.txt into $VENV in $((SECONDS - start)) s"
fi
exec "$VENV/bin/python" app.py "$@"
