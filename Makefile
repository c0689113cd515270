# The CPU-only setup path, with the dask extra (tests/test_dask.py needs it). GPU users:
# `pip install -e '.[dev]'` in an environment that already has a CUDA build of torch (the
# package accepts a range of torch versions).
# The venv's interpreter: the system's own Python 3.11 where it has one that can make venvs
# (Debian's), else python3.11 on PATH. On this machine the suite takes about 15% less CPU on
# Debian's /usr/bin/python3.11 than on the pyenv build PATH finds first (README, under the first
# commands; benchmarks/bench_interpreter.py). PYTHON=... picks another.
SYSTEM_PYTHON := /usr/bin/python3.11
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import ensurepip, venv' 2>/dev/null && echo $(SYSTEM_PYTHON) || echo python3.11)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; installed before the package so its torch range resolves to it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1

.PHONY: setup test test-fast lint run clean gpu-wheels gpu-prepare gpu-check

ARGS ?=

setup: $(STAMP)

# --no-compile: no bytecode for all of torch, MLflow and Prefect at install time (about 40 s on
# 2 cores); Python writes it for the modules imported, when first imported. Not under
# PYTHONDONTWRITEBYTECODE: the tests then write it under .venv/pycache (tests/conftest.py).
# pip 26 first: it installs the dependencies in 20 s here where Python 3.11's own pip 23 took 42.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "pip>=26,<27"
	$(PY) -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-compile -e '.[dev,dask]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks tests benchmarks
	$(VENV)/bin/ruff format --check src flows tasks tests benchmarks

# The suite on TEST_WORKERS pytest-xdist workers (auto: one per core), each file on one worker
# and the files sharing servers together (tests/conftest.py); the 15 slowest tests listed. Three
# on 2 cores: the slow tests spend much of their time waiting on servers and subprocesses.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: lint
	$(PY) -m pytest -q $(XDIST) --durations=15

# The unit tests alone: no server (the Prefect test harness included), no e2e or slow test.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow and not e2e and not server" --durations=10

# The main job: the whole pipeline on conf/default.yaml (built-in corpus, CPU), stores in runs/.
run: $(STAMP)
	$(VENV)/bin/maskdiff run --config default $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info

# ---- GPU acceptance (docs/gpu-check.md). Runs in the environment it is given: no setup here.
DEVICE ?= cuda
OUT ?= runs/gpu-check
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0

# Python 3.12 manylinux wheels of what the GPU machine lacks (pydantic and its few deps).
gpu-wheels:
	$(GPU_PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux_2_28_x86_64 -d .gpu/wheels $(GPU_WHEELS)

# The carry folder .gpu/: the wheels and the stages of conf/gpu.yaml (built from stdlib here).
gpu-prepare: gpu-wheels
	PYTHONPATH=src:. $(GPU_PYTHON) benchmarks/gpu_check.py --prepare-only --stages .gpu/stages
	du -sh .gpu

# Every GPU check, one report in $(OUT). DEVICE=cpu: the dry run (tiny sizes, stages built in OUT).
gpu-check:
	PYTHONPATH=src:. $(GPU_PYTHON) benchmarks/gpu_check.py --device $(DEVICE) --out $(OUT) \
		$(if $(filter cuda,$(DEVICE)),--stages .gpu/stages,)
