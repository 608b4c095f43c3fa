# Heptapod-JAX. `make demo` trains, samples and evaluates the embedded default on CPU;
# `make test` runs the test suite. Both create .venv from requirements.txt when it is
# missing or older than requirements.txt / pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv test test-fast demo params bench clean-venv help

help:
	@echo "make demo       train + sample + evaluate the built-in digits demo on CPU (workdir: $(WORKDIR))"
	@echo "make test       run the test suite (8 fake CPU devices)"
	@echo "make params     print parameter counts of every size preset"
	@echo "make bench      run the CPU step-time benchmark of the tiny preset"

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m heptapod_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

params: $(STAMP)
	$(PY) -m heptapod_jax.tools.param_count $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step_time.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
