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

.PHONY: setup run test test-fast bench clean

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

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration"

bench: $(STAMP)
	$(BIN)/python benchmarks/loading.py

clean:
	rm -rf $(VENV) .pytest_cache
