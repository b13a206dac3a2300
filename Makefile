# cptlab: `make reproduce` (the paper at the tiny scale) and `make test` (the suite) set up
# everything they need in .venv on a fresh machine with Python 3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH="torch" (or a CUDA wheel) on a GPU machine.
TORCH ?= torch==2.13.0
SCALE ?= tiny
OUT ?= runs/reproduce
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export HF_UPDATE_DOWNLOAD_COUNTS := 0
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test lint reproduce lab docs bench clean gpu-bundle gpu-rehearsal

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# ruff, then the architecture: import-linter's contracts in pyproject.toml (layers, no import cycle)
lint: install
	$(VENV)/bin/ruff check cptlab tests benchmarks scripts
	$(VENV)/bin/lint-imports

# the suite in TEST_WORKERS pytest-xdist processes (auto: one per core), a test file per process at a time
TEST_WORKERS ?= auto
test: lint
	$(PY) -m pytest tests --nbmake notebooks -q -n $(TEST_WORKERS) --dist loadfile

reproduce: install
	$(VENV)/bin/cptlab batch --scale $(SCALE) --out $(OUT)

lab: install
	CPTLAB_RUNS=$(CURDIR)/runs $(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser --notebook-dir notebooks \
		$$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# the documentation site into site/ (tests/test_docs.py builds it with --strict in `make test`)
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: install
	$(PY) benchmarks/throughput.py

# The GPU path (docs/gpu.md): gpu-bundle/ holds the wheels the GPU image lacks (Python 3.12, manylinux) and
# the small scale's token cache, <= 64 MiB; gpu-rehearsal runs scripts/gpu_reproduce.sh on this CPU with the
# image's packages (build/rehearsal/venv) and a bundle of the same recipe for this Python.
gpu-bundle: install
	$(PY) scripts/gpu_bundle.py --out gpu-bundle --python-version 3.12 --scale small

gpu-rehearsal: install
	PYTHON=$(PYTHON) scripts/gpu_rehearsal.sh all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site .cache/mkdocs-jupyter
