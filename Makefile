# Everything a fresh clone needs: `make demo` and `make test` create the virtual environment and
# install the package first (with the dev tools, W&B, whose tests run offline, the benchmark, plots (matplotlib),
# nfn, demo (scikit-learn) and ray (the Ray executor, whose tests start a cluster on 127.0.0.1) extras). torch 2.13.0
# (CPU) is installed unless the system Python already has a torch, which the environment then reuses (the newest
# torch on the registry pulls gigabytes of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
STUDY_DIR ?= runs/demo

.PHONY: install demo test test-slow test-all lint bench-surrogate bench bench-quick clean

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "reusing the system torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e ".[dev,wandb,bench,plots,nfn,demo,ray]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/build_demo_hub.py
	$(VENV)/bin/lightning-fms tune --config recipes/demo.yaml --study_dir $(STUDY_DIR) --seed 0 --budget 100

# the suite less the tests marked slow (under 10 minutes on 2 cores, the Ray tests included); CI runs both
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_fms tests recipes
	$(VENV)/bin/ruff format --check lightning_fms tests recipes

bench-surrogate: $(STAMP)
	$(PY) recipes/bench_surrogate.py

bench: $(STAMP)
	$(VENV)/bin/lightning-fms bench --out runs/bench --jobs 2 --methods fms gp hyperband asha optuna random fms-hidden gp-hidden

bench-quick: $(STAMP)
	$(VENV)/bin/lightning-fms bench --quick --out runs/bench-quick --jobs 2

clean:
	rm -rf $(VENV) runs .pytest_cache
