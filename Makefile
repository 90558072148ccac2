# The two commands of the README: `make run` (the whole pipeline on the demo data) and `make test`.
# Both set up .venv from pyproject.toml + constraints.txt (exact versions that were tested) on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# dvc.yaml's stages call `action3d`, and the tests call dvc and moto_server: all from the venv.
export PATH := $(abspath $(BIN)):$(PATH)
# MLflow's usage telemetry cannot reach its collector offline; it only adds noise and a race.
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test test-fast bench browser clean prefect-server worker deploy study remote tune optuna-dashboard

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip 23's resolver takes many minutes on this stack; a current pip resolves it in about three.
	$(BIN)/python -m pip install -q --upgrade "pip>=25"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

run: $(STAMP)
	dvc repro
	@echo
	action3d report

# On every core: most of the suite's time is processes starting (torch, MLflow, servers), which run side by side.
test: $(STAMP) browser
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder

# The report test opens reports/index.html in a real headless browser: Debian's chromium, installed when absent.
# Where that cannot be done (no apt, no sudo) the tests still run, and that one test says what to install.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (the report test's headless browser)"; \
	  $(SUDO) apt-get update -q || echo "apt-get update failed; installing from the package lists there are"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium || \
	  echo "WARNING: could not install chromium: the report's browser test will fail until it is on PATH"; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadgroup -m "not slow and not integration"

# speed, measured side by side in one run each (README, Performance): JSON in benchmarks/results/
# The speed benchmarks, JSON in benchmarks/results/ (scale.py: about an hour on 2 cores). The fidelity ablation is
# its own: `python benchmarks/fidelity.py` after `dvc repro cache@finetune-0` (about 40 minutes).
bench: $(STAMP)
	$(BIN)/python benchmarks/loading.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/end_to_end.py
	$(BIN)/python benchmarks/multinode.py
	$(BIN)/python benchmarks/commands.py
	$(BIN)/python benchmarks/scale.py --routes packed folder

# Scheduled runs on one machine (README, "Scheduled runs"): `make prefect-server` in one terminal, `make worker` in
# another, then `make deploy` (ACTIVE=1: schedules on at once). Elsewhere, point PREFECT_API_URL at your server.
PREFECT_PORT ?= 4200
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
POOL ?= gpu

prefect-server: $(STAMP)
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# A worker on this machine tracks into the project's own store unless MLFLOW_TRACKING_URI names another: a deployed
# run works in a temporary clone, and a store inside it would be deleted with it.
MLFLOW_TRACKING_URI ?= sqlite:///$(abspath mlflow.db)
worker: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API_URL) prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
	  PREFECT_API_URL=$(PREFECT_API_URL) prefect work-pool create $(POOL) --type process
	PREFECT_API_URL=$(PREFECT_API_URL) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) prefect worker start --pool $(POOL)

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python flows/deploy.py --require-remote $(if $(ACTIVE),--active)

# the architecture study of params.yaml (study.entries), on Prefect's ephemeral API
study: $(STAMP)
	$(BIN)/python flows/study.py

# Optuna: the study of params.yaml's tune section (WORKERS processes), and its dashboard; both take the same overrides,
# e.g. make tune SET="-S tune.study=lr-sweep" then make optuna-dashboard SET="-S tune.study=lr-sweep"
WORKERS ?= 2
tune: $(STAMP)
	action3d tune --n-workers $(WORKERS) $(SET)

optuna-dashboard: $(STAMP)
	action3d tune --dashboard $(SET)

# the DVC remote workers pull from and push to: make remote URL=s3://bucket/prefix (AWS_* variables for the endpoint)
remote: $(STAMP)
	action3d remote setup $(URL)

clean:
	rm -rf $(VENV) .pytest_cache
