#!/usr/bin/env bash
# `make up`: the champion's image as separate containers on 127.0.0.1:$PORT (the API and 2 model
# servers, pods played from deploy/base, haproxy in front), and a watcher that releases and rolls
# out every new champion (python -m flows.release --watch), each release a run in the Prefect UI.
# Returns once the containers are ready; `make down` stops them and the watcher.
#   PORT (3000): the API; PORT+1..PORT+8 are used inside the stack, PORT+9 by its Prometheus, PORT+10 by
#   the watcher's metrics (which that Prometheus scrapes). PREFECT_PORT (4200).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
PORT="${PORT:-3000}"
STACK="${CAPTIONING_STACK_DIR:-${CAPTIONING_ARTIFACTS_DIR:-$PWD/artifacts}/stack}"
mkdir -p "$STACK"

start_prefect
echo "starting the stack of the champion on 127.0.0.1:$PORT (builds its image when missing)"
"$BIN/captioning" stack up --port "$PORT"

if pid="$(owned_pid "$STACK/watch.pid" flows.release --watch)"; then
    echo "release watcher already running (pid $pid)"
else
    nohup "$PY" -m flows.release --watch --port "$PORT" > "$STACK/watch.log" 2>&1 &
    echo $! > "$STACK/watch.pid"
    echo "release watcher started (log: $STACK/watch.log)"
fi

cat <<INFO

Containers ready:
  service      http://127.0.0.1:$PORT/          (API: /caption, /model, /metrics)
  Prometheus   http://127.0.0.1:$((PORT + 9))/     (every replica's metrics, labelled role, slot, version)
  watcher      http://127.0.0.1:$((PORT + 10))/metrics  (refused versions, releases; alert CaptioningRolloutRefused)
  status       .venv/bin/captioning stack status
  Prefect UI   ${PREFECT_API_URL%/api}/      (each release is a run of the flow "release")
A new champion (make run, python -m flows.retrain, captioning register, captioning registry
rollback) is released and rolled out by itself. Stop with: make down
INFO
