# Heptapod-JAX. `make demo` trains, samples and evaluates the embedded default on CPU;
# `make test` runs the test suite. Both create .venv when it is missing or older than
# the requirement files: `make demo` needs requirements.txt, `make test` also
# requirements-dev.txt (PyTorch, to check the ports against their originals).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# `make demo TOKENS=kl`: the continuous-token variant (KL tokenizer, diffusion loss).
TOKENS ?= vq
ifeq ($(TOKENS),kl)
WORKDIR ?= workdirs/demo_kl
DEMO_TOKENIZER := configs/vq_demo.py:kind=kl
DEMO_MODEL := configs/demo.py:tokenizer=kl
else ifeq ($(TOKENS),vq)
WORKDIR ?= workdirs/demo
DEMO_TOKENIZER := configs/vq_demo.py
DEMO_MODEL := configs/demo.py
else
$(error TOKENS=$(TOKENS) is not one of vq, kl)
endif
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv venv-dev test test-fast test-durations docs demo sample params bench clean-venv help

help:
	@echo "make demo       train + sample + evaluate the built-in digits demo on CPU (workdir: $(WORKDIR))"
	@echo "                TOKENS=kl: continuous tokens (KL tokenizer, diffusion loss)"
	@echo "make test       run the test suite (8 fake CPU devices)"
	@echo "make test-fast  the suite without the tests marked slow"
	@echo "make test-durations  the suite, rewriting tests/file_durations.json (the queue order)"
	@echo "make docs       build the documentation site into site/ (mkdocs, strict: broken links fail)"
	@echo "make sample     sample a grid from the trained demo: ARGS='--classes=3,7 --n=16 --out=grid.png'"
	@echo "make params     print parameter counts of every size preset"
	@echo "make bench      run the CPU step-time benchmark of the tiny preset"

venv: $(STAMP)
venv-dev: $(DEV_STAMP)

# PYTHONWARNINGS=ignore on the editable install: setuptools prints a banner on each one.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

# Two workers (pytest-xdist), each test file on one worker so that its fixtures are built once,
# the files queued slowest first (tests/conftest.py, from tests/file_durations.json).
XDIST = -n 2 --dist loadfile --no-loadscope-reorder
test: $(DEV_STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=15 $(PYTEST_ARGS) tests

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS) tests

# The whole suite, writing each file's seconds to tests/file_durations.json (commit it when the
# suite's shape changed: it only orders the queue).
test-durations: $(DEV_STAMP)
	HEPTAPOD_TEST_DURATIONS_OUT=tests/file_durations.json $(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS) tests

# The documentation site (docs/, mkdocs.yml) into site/; strict: any warning, broken link or
# missing anchor fails. NO_MKDOCS_2_WARNING: the theme's end-of-life notice is not a warning.
docs: $(DEV_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The tokenizer (reused if already trained in the workdir); for VQ tokens the training split
# encoded once (tools/tokenize_dataset.py, the same codes the trainer would compute each step,
# checked against the tokenizer's weights); then Heptapod on those codes.
demo: $(STAMP)
	$(PY) -m heptapod_jax.main --config=$(DEMO_TOKENIZER) --workdir=$(WORKDIR)/tokenizer
ifeq ($(TOKENS),vq)
	$(PY) -m heptapod_jax.tools.tokenize_dataset --config=$(DEMO_MODEL) --variants=center \
	  --config.tokenizer.checkpoint=$(WORKDIR)/tokenizer/tokenizer --out=$(WORKDIR)/codes
	$(PY) -m heptapod_jax.main --config=$(DEMO_MODEL) --workdir=$(WORKDIR) \
	  --config.tokenizer.checkpoint=$(WORKDIR)/tokenizer/tokenizer --config.data.tokenized_dir=$(WORKDIR)/codes
else
	$(PY) -m heptapod_jax.main --config=$(DEMO_MODEL) --workdir=$(WORKDIR) \
	  --config.tokenizer.checkpoint=$(WORKDIR)/tokenizer/tokenizer
endif

# Images from a trained run (python -m heptapod_jax.sample --help lists the flags).
sample: $(STAMP)
	$(PY) -m heptapod_jax.sample --checkpoint=$(WORKDIR) $(ARGS)

params: $(STAMP)
	$(PY) -m heptapod_jax.tools.param_count $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step_time.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
