# Two commands on a fresh machine: `make run` and `make test` (each installs what it needs first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= tiny
FRONTS ?= 1
OUT ?= out
PYTEST_ARGS ?=

.PHONY: install run test bench clean system-packages

install: $(STAMP)

# h5dump/h5ls let the tests check our files in standard tools; installed when we can (root + apt-get).
system-packages:
	@if ! command -v h5dump >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing hdf5-tools (h5dump)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hdf5-tools >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hdf5-tools >/dev/null; } || \
	  echo "warning: could not install hdf5-tools; tests that use h5dump will be skipped"; \
	fi

$(STAMP): setup.cfg pyproject.toml constraints.txt | system-packages
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]' mpich
	touch $@

# The main job: the bundled tiny model on the bundled input, distributed over F + experts x layers ranks.
run: install
	@mkdir -p $(OUT)
	@world=$$($(VENV)/bin/moe-mpi layout --config inputs/tiny-model --front-ranks $(FRONTS) --world-size); \
	echo "mpiexec -n $$world moe-mpi score inputs/tiny.h5 $(OUT)/tiny-scores.h5 --model inputs/tiny-model --front-ranks $(FRONTS)"; \
	timeout 600 $(VENV)/bin/mpiexec -n $$world $(PY) -m mpi4py -m moe_mpi score inputs/tiny.h5 $(OUT)/tiny-scores.h5 \
	  --model inputs/tiny-model --front-ranks $(FRONTS) --micro-batch-tokens 256 --overwrite --no-progress \
	  --trace $(OUT)/tiny-trace.json
	@echo "trace: $(OUT)/tiny-trace.json (open in https://ui.perfetto.dev or chrome://tracing)"

test: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/cpu_runtime.py

clean:
	rm -rf $(OUT) .pytest_cache
