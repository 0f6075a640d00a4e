#!/usr/bin/env bash
# The main job: retrain (if anything is new) on params.yaml, then serve the champion.
#
#  1. a local Prefect server on 127.0.0.1:$PREFECT_PORT (started in the background when none
#     answers, state in .prefect/), so every flow run shows up in its UI and no run pays for a
#     temporary server;
#  2. an MLflow UI on 127.0.0.1:$MLFLOW_PORT over mlflow.db (started likewise);
#  3. `python -m flows.retrain`: acquire -> validate -> train -> evaluate -> register (a quick
#     no-op when the data, the settings and the feedback are unchanged since the last training);
#  4. the service (scripts/serve.sh) in the foreground.
#
# Settings:
#   DATASET=synthetic   the fully offline demo: params-synthetic.yaml laid over params.yaml
#   PARAMS=FILE         any other partial params file laid over params.yaml
#   FORCE=1             run every step even if nothing is new (a finished training on the same
#                       inputs is reused)
#   PORT (3000), PREFECT_PORT (4200), MLFLOW_PORT (5000); extra arguments go to flows.retrain
#   (e.g. scripts/run.sh --set train.epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
BIN="$(dirname "$PY")"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=true
PORT="${PORT:-3000}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
mkdir -p "$PREFECT_HOME"

# wait_for URL SECONDS NAME LOG: poll until URL answers, or fail with the end of LOG.
wait_for() {
    local deadline=$((SECONDS + $2))
    until curl -sf -o /dev/null "$1"; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: $3 did not answer at $1 within $2 s; end of $4:" >&2
            tail -n 20 "$4" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
}

if curl -sf -o /dev/null "$PREFECT_API_URL/health"; then
    echo "Prefect server already running on 127.0.0.1:$PREFECT_PORT"
else
    echo "starting a Prefect server on 127.0.0.1:$PREFECT_PORT (log: $PREFECT_HOME/server.log)"
    nohup "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" \
        > "$PREFECT_HOME/server.log" 2>&1 &
    echo $! > "$PREFECT_HOME/server.pid"
    wait_for "$PREFECT_API_URL/health" 90 "the Prefect server" "$PREFECT_HOME/server.log"
fi

if curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health"; then
    echo "MLflow UI already running on 127.0.0.1:$MLFLOW_PORT"
else
    echo "starting the MLflow UI on 127.0.0.1:$MLFLOW_PORT (log: $PREFECT_HOME/mlflow.log)"
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server --host 127.0.0.1 \
        --port "$MLFLOW_PORT" --backend-store-uri sqlite:///mlflow.db --workers 1 \
        > "$PREFECT_HOME/mlflow.log" 2>&1 &
    echo $! > "$PREFECT_HOME/mlflow.pid"
    wait_for "http://127.0.0.1:$MLFLOW_PORT/health" 90 "the MLflow UI" "$PREFECT_HOME/mlflow.log"
fi

args=()
if [ "${DATASET:-}" = synthetic ]; then
    args+=(--params params-synthetic.yaml)
elif [ -n "${DATASET:-}" ]; then
    d="$DATASET"
    args+=(--set "data.dataset=$d" --set "data.train_query=$d[train]" --set "data.val_query=$d[val]"
           --set "data.test_query=$d[test]")
fi
[ -n "${PARAMS:-}" ] && args+=(--params "$PARAMS")
[ -n "${FORCE:-}" ] && args+=(--force)

echo "running the retraining flow: $PY -m flows.retrain ${args[*]} $*"
if ! "$PY" -m flows.retrain "${args[@]}" "$@"; then
    echo "error: the retraining flow failed (see above, or the run in the Prefect UI)" >&2
    exit 1
fi

if ! "$BIN/captioning" registry list --json | "$PY" -c \
        'import json,sys; sys.exit(0 if any("champion" in v["aliases"] for v in json.load(sys.stdin)) else 1)'; then
    echo "error: no model is champion yet (the metric gates refused every version): nothing to serve" >&2
    exit 1
fi

cat <<INFO

Pipeline done. Open:
  service      http://127.0.0.1:$PORT/          (web page; API: /caption, /feedback, /model, /metrics)
  MLflow UI    http://127.0.0.1:$MLFLOW_PORT/
  Prefect UI   http://127.0.0.1:$PREFECT_PORT/
Prefect and MLflow keep running in the background; stop them with
  kill \$(cat $PREFECT_HOME/server.pid) \$(cat $PREFECT_HOME/mlflow.pid)
INFO

if [ ! -f scripts/serve.sh ]; then
    echo "error: scripts/serve.sh is missing: cannot start the service" >&2
    exit 1
fi
PORT="$PORT" exec bash scripts/serve.sh
