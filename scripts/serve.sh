#!/usr/bin/env bash
# Start the captioning service on 127.0.0.1: the API service (web page, /caption, /feedback,
# /metrics) and the model service behind it, in one `bentoml serve`.
#   PORT   port to listen on (default 3000)
#   MODEL  model to serve: a package folder or models:/NAME@ALIAS (default models:/captioner@champion;
#          $CAPTIONING_MODEL, when set, wins)
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-3000}"
HOST="${HOST:-127.0.0.1}"
export CAPTIONING_MODEL="${CAPTIONING_MODEL:-${MODEL:-models:/captioner@champion}}"
export BENTOML_HOME="${BENTOML_HOME:-$PWD/bentoml_home}"
export BENTOML_DO_NOT_TRACK=true DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true

BENTOML=.venv/bin/bentoml
[ -x "$BENTOML" ] || BENTOML=bentoml

PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
# Fail fast with a clear message when there is nothing to serve (the server would keep
# restarting its model worker otherwise). Resolving also downloads a registered model once.
"$PYTHON" - "$CAPTIONING_MODEL" <<'PY' || exit 2
import sys
from captioning.config import disable_telemetry
disable_telemetry()
from captioning.config import PARAMS_FILE
from captioning.registry.locate import locate
from captioning.registry.store import tracking_uri
from captioning.settings import load_settings
try:
    locate(sys.argv[1], tracking_uri(load_settings(PARAMS_FILE)))
except Exception as error:
    sys.exit(f"error: cannot load the model {sys.argv[1]!r}: {error}\n"
             "Train and register a champion first (make run), or set MODEL=path/to/package.")
PY

base="http://$HOST:$PORT"
cat <<INFO
Serving model $CAPTIONING_MODEL
  web page    $base/
  caption     curl -F image=@photo.jpg $base/caption
  model info  $base/model
  health      $base/livez  $base/readyz
  metrics     $base/metrics
Stop with Ctrl+C.
INFO
exec "$BENTOML" serve service:CaptionAPI --host "$HOST" --port "$PORT"
