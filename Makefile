# indai: the two commands of the README are `make demo` and `make test`; each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the embedded default keeps its state (object store folder, MLflow database, logs) here
export INDAI_HOME ?= $(CURDIR)/.indai

.PHONY: install demo test test-unit test-integration up down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $@

## demo: ingest CWRU -> train (Ray Train + DeepSpeed) -> MLflow registry -> Ray Serve -> predict over HTTP
demo: install
	$(BIN)/indai demo

## test: the whole suite (unit + integration; k8s and gpu tiers skip where their tools are absent)
test: install
	$(BIN)/python -m pytest tests

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

up: install
	$(BIN)/indai up

down:
	$(BIN)/indai down

clean: down
	rm -rf .indai
