#!/usr/bin/env bash
# `make down`: stop the release watcher and the containers that `make up` started.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
STACK="${CAPTIONING_STACK_DIR:-${CAPTIONING_ARTIFACTS_DIR:-$PWD/artifacts}/stack}"
# Only the watcher this checkout started: a stale pid file may name another process by now.
if pid="$(owned_pid "$STACK/watch.pid" flows.release --watch)"; then
    kill "$pid" 2>/dev/null || true
fi
rm -f "$STACK/watch.pid"
"$(dirname "$PY")/captioning" stack down
