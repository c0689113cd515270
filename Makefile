# The CPU-only setup path. GPU users: `pip install -e '.[dev]'` in an environment that already
# has a CUDA build of torch (the package accepts a range of torch versions).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; installed before the package so its torch range resolves to it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1

.PHONY: setup test lint run clean

ARGS ?=

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks tests benchmarks
	$(VENV)/bin/ruff format --check src flows tasks tests benchmarks

test: lint
	$(PY) -m pytest -q

# The main job: the whole pipeline on conf/default.yaml (built-in corpus, CPU), stores in runs/.
run: $(STAMP)
	$(VENV)/bin/maskdiff run --config default $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
