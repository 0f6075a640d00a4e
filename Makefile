# The two commands a newcomer needs: `make run` (the whole pipeline, then the service)
# and `make test` (the test suite). Both set everything up on a fresh machine.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 3000

# The shared folder beside a checkout mirrors the official dataset downloads.
CAPTIONING_MIRROR ?= $(wildcard $(abspath ../shared/datasets))
export CAPTIONING_MIRROR
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=true

.PHONY: setup system-deps test test-fast run serve bento prefect-ui mlflow-ui benchmark clean

setup: $(STAMP) system-deps

# torch and torchvision first, by exact version (pip takes them from this machine's disk);
# then the project and every other package at the versions in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Java (METEOR and the PTB tokenizer), Chromium (browser tests), Prometheus (scrape test), kubectl.
system-deps:
	@bash scripts/system-deps.sh

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not integration and not browser and not slow"

run: setup
	$(PY) -m flows.retrain
	$(MAKE) serve

serve: setup
	PORT=$(PORT) bash scripts/serve.sh

bento: setup
	$(VENV)/bin/bentoml build

prefect-ui: setup
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db --workers 1

benchmark: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf reports/*.json reports/*.html .pytest_cache
