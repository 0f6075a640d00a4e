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

PORT="${PORT:-3000}"
source scripts/services.sh
start_prefect
start_mlflow

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
