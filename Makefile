# `make demo` and `make test` work from a fresh clone: they build .venv first when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint bench clean

venv: $(STAMP)

# torch is pinned here (not in setup.cfg) so pip takes the CPU build on local disk
# instead of resolving a multi-GB CUDA build; setup.cfg keeps a range for users.
$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,ray,export]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

data/demo/manifest.json: | $(STAMP)
	$(BIN)/python pipeline/make_shards.py --synthetic 360 --segment-seconds 12 --out data/demo --overwrite

# a rerun replaces the previous demo's runs/demo (run.overwrite), never appends to it
demo: $(STAMP) data/demo/manifest.json
	$(BIN)/python -m train --loader dali --config configs/demo.yaml --set run.overwrite=true

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# For a GPU machine (benchmarks/gpu_check.py says how one gets DALI): runs with the python given
# (PYTHON=python3 there) and never builds .venv; GPU_CHECK_ARGS passes options, e.g. --dry-run,
# or --copy-to=$OUT for the device tool's folder (the summary there after every step).
.PHONY: gpu-check
gpu-check: PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=$${PYTHONPATH:+$$PYTHONPATH:}$(CURDIR) $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
