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
       DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=true GX_ANALYTICS_ENABLED=false
# Spinning OpenMP threads slow torch down many times when the CPU is shared (see captioning/__init__.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup system-deps lint test test-fast run serve repro full schedule bento container up down prefect-ui mlflow-ui benchmark clean

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

# Lint, format and the import layers first (seconds), then the whole suite.
test: setup lint
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test-fast: setup
	$(PY) -m pytest tests -m "not integration and not browser and not slow and not container and not robustness and not scaleout"

# The main job: the retrain flow on params.yaml (DATASET=synthetic: the offline demo), then the
# service. A local Prefect server and the MLflow UI are started in the background when needed.
run: setup
	PORT=$(PORT) bash scripts/run.sh

serve: setup
	PORT=$(PORT) bash scripts/serve.sh

# `dvc repro` runs the same steps as stages; the stages call the `captioning` command.
repro: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

# The quality configuration (params.yaml profiles.full) through DVC: `dvc exp run -S ...`, an
# experiment that `dvc exp show` lists beside the others. It leaves params.yaml as the experiment
# set it (DVC's way): `git checkout params.yaml` returns to the defaults.
full: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH eval "$(VENV)/bin/dvc exp run $$($(PY) -m captioning.cli profile full --dvc | tr '\n' ' ')"

# The scheduled retraining deployment (cron from params.yaml retrain.cron) on the local Prefect server.
schedule: setup
	PREFECT_API_URL=http://127.0.0.1:4200/api $(PY) -m flows.retrain --serve

bento: setup
	BENTOML_HOME=$(CURDIR)/bentoml_home $(VENV)/bin/bentoml build

# The image of the current champion (a bento with the model inside, built with podman from a
# Debian base); the last line printed is the image's tag.
container: setup
	@$(VENV)/bin/captioning release

# The champion's image as separate containers (API, 2 model servers, haproxy) on 127.0.0.1:$(PORT),
# and the watcher that rolls out each new champion by itself; `make down` stops them.
up: setup
	PORT=$(PORT) bash scripts/up.sh

down:
	bash scripts/down.sh

prefect-ui: setup
	@curl -sf -o /dev/null http://127.0.0.1:4200/api/health && echo "Prefect UI: http://127.0.0.1:4200" || \
	PREFECT_HOME=$(CURDIR)/.prefect $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

mlflow-ui: setup
	@curl -sf -o /dev/null http://127.0.0.1:5000/health && echo "MLflow UI: http://127.0.0.1:5000" || \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///mlflow.db --workers 1

# Speed and quality measurements: JSON into reports/ (never pass/fail).
benchmark: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf reports/*.json reports/*.html .pytest_cache
