#!/usr/bin/env bash
# `make down`: stop the release watcher and the containers that `make up` started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
STACK="${CAPTIONING_STACK_DIR:-${CAPTIONING_ARTIFACTS_DIR:-$PWD/artifacts}/stack}"
if [ -f "$STACK/watch.pid" ]; then
    kill "$(cat "$STACK/watch.pid")" 2>/dev/null || true
    rm -f "$STACK/watch.pid"
fi
"$(dirname "$PY")/captioning" stack down
