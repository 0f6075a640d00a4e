# Sourced by scripts/run.sh and scripts/up.sh: the local Prefect server and MLflow UI, started in
# the background when none answers (state and logs in $PREFECT_HOME, default .prefect/).
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
BIN="$(dirname "$PY")"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=true
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:$PREFECT_PORT/api}"
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

start_prefect() {
    if curl -sf -o /dev/null "$PREFECT_API_URL/health"; then
        echo "Prefect server already running at $PREFECT_API_URL"
        return
    fi
    echo "starting a Prefect server on 127.0.0.1:$PREFECT_PORT (log: $PREFECT_HOME/server.log)"
    nohup "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" \
        > "$PREFECT_HOME/server.log" 2>&1 &
    echo $! > "$PREFECT_HOME/server.pid"
    wait_for "$PREFECT_API_URL/health" 90 "the Prefect server" "$PREFECT_HOME/server.log"
}

start_mlflow() {
    if curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health"; then
        echo "MLflow UI already running on 127.0.0.1:$MLFLOW_PORT"
        return
    fi
    echo "starting the MLflow UI on 127.0.0.1:$MLFLOW_PORT (log: $PREFECT_HOME/mlflow.log)"
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server --host 127.0.0.1 \
        --port "$MLFLOW_PORT" --backend-store-uri sqlite:///mlflow.db --workers 1 \
        > "$PREFECT_HOME/mlflow.log" 2>&1 &
    echo $! > "$PREFECT_HOME/mlflow.pid"
    wait_for "http://127.0.0.1:$MLFLOW_PORT/health" 90 "the MLflow UI" "$PREFECT_HOME/mlflow.log"
}
