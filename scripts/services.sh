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
# A PREFECT_API_URL given by the caller names the server to use; otherwise it is this checkout's.
PREFECT_URL_GIVEN="${PREFECT_API_URL:+1}"
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

# owned_pid PIDFILE WORD...: prints the pid in PIDFILE when that process is alive and its command
# line holds every WORD. A pid file outlives its process and the kernel reuses pids, so a pid
# alone never proves that a process is the one this checkout started.
owned_pid() {
    local file="$1" pid cmd word
    shift
    [ -f "$file" ] || return 1
    pid="$(cat "$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || return 1
    for word in "$@"; do
        [[ "$cmd" == *"$word"* ]] || return 1
    done
    echo "$pid"
}

# whose PORT: one line on the process listening on 127.0.0.1:PORT (pid, folder, command).
whose() {
    local pid
    pid="$(ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)"
    if [ -z "$pid" ]; then
        echo "a process this user cannot see"
        return
    fi
    echo "pid $pid in $(readlink "/proc/$pid/cwd" 2>/dev/null || echo '?'): $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-160)"
}

# reuse_or_refuse NAME PORT_VARIABLE PIDFILE WORD...: a server answers on that port. This checkout's (its pid
# file names a live process of that command) is reused; another one is refused, since its state
# (runs, models) is not this checkout's, unless CAPTIONING_REUSE_SERVERS=1.
reuse_or_refuse() {
    local name="$1" variable="$2" port="${!2}" file="$3" pid
    shift 3
    if pid="$(owned_pid "$file" "$@")"; then
        echo "$name already running on 127.0.0.1:$port (this checkout's, pid $pid)"
        return
    fi
    if [ "${CAPTIONING_REUSE_SERVERS:-}" = 1 ]; then
        echo "$name on 127.0.0.1:$port is not this checkout's ($(whose "$port")); reused as CAPTIONING_REUSE_SERVERS=1 asks"
        return
    fi
    echo "error: a $name answers on 127.0.0.1:$port but this checkout did not start it: $(whose "$port")." >&2
    echo "Stop it, choose another port ($variable=...), or set CAPTIONING_REUSE_SERVERS=1 to use it." >&2
    exit 1
}

start_prefect() {
    if curl -sf -o /dev/null "$PREFECT_API_URL/health"; then
        if [ -n "$PREFECT_URL_GIVEN" ]; then
            echo "using the Prefect server at $PREFECT_API_URL (PREFECT_API_URL)"
            return
        fi
        reuse_or_refuse "Prefect server" PREFECT_PORT "$PREFECT_HOME/server.pid" prefect "server start" "--port $PREFECT_PORT"
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
        reuse_or_refuse "MLflow UI" MLFLOW_PORT "$PREFECT_HOME/mlflow.pid" mlflow server "--port $MLFLOW_PORT"
        return
    fi
    echo "starting the MLflow UI on 127.0.0.1:$MLFLOW_PORT (log: $PREFECT_HOME/mlflow.log)"
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server --host 127.0.0.1 \
        --port "$MLFLOW_PORT" --backend-store-uri sqlite:///mlflow.db --workers 1 \
        > "$PREFECT_HOME/mlflow.log" 2>&1 &
    echo $! > "$PREFECT_HOME/mlflow.pid"
    wait_for "http://127.0.0.1:$MLFLOW_PORT/health" 90 "the MLflow UI" "$PREFECT_HOME/mlflow.log"
}
