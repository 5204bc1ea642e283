# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.torchjac-installed

.PHONY: demo test test-compat fuzz bench lint venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: every later step then sees it satisfied and never resolves a newer one.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m pip install -q --no-deps backpack-for-pytorch curvlinops-for-pytorch
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

# The documentation site (MkDocs, Material, mkdocstrings): warnings are errors.
DOCS_STAMP := $(VENV)/.torchjac-docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

.PHONY: docs bench-results
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# Measure every workload into benchmarks/results.json, then render RESULTS.md and the README table.
bench-results: $(STAMP)
	$(VENV)/bin/torchjac bench --threads 1 --memory --json benchmarks/results.json
	$(PY) -m benchmarks.render

# `make test` builds the docs as well (CI runs `make test`).
test: docs

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check examples docs/*.py docs/_hooks
	$(VENV)/bin/ruff format --check examples docs/*.py docs/_hooks
	$(VENV)/bin/mypy

# The oracle suites once more with every fast path off (NOTE [fast paths]): the general paths
# must agree with the same float64 oracles.
ORACLE_TESTS := tests/modules/test_modules_oracles.py tests/taylor/test_second_order_oracles.py \
	tests/func/test_functional.py tests/graph/test_graph.py tests/graph/test_gramian.py tests/modules/test_ntk_kernel.py \
	tests/modules/test_modules_convolutions.py

test: lint
	$(VENV)/bin/pytest -n 2 -q
	TORCHJAC_FAST_PATHS=0 $(VENV)/bin/pytest -n 2 -q $(ORACLE_TESTS)

# The invariants fuzz: random models through every public function, every invariant checked
# after every call. At length by default (random examples, a new seed each run; FUZZ_EXAMPLES per
# test, default 400); TORCHJAC_FUZZ_PROFILE=ci for the short derandomized profile.
FUZZ_TESTS := tests/test_invariants_fuzz.py tests/test_invariants_fuzz_graph.py
TORCHJAC_FUZZ_PROFILE ?= long
fuzz: $(STAMP)
	TORCHJAC_FUZZ_PROFILE=$(TORCHJAC_FUZZ_PROFILE) TORCHJAC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(VENV)/bin/pytest -n 2 -q -m fuzz $(FUZZ_TESTS) --hypothesis-show-statistics

# The declared torch range's two ends (pyproject.toml `dependencies`): the whole suite on each, in
# its own venv outside the clone, kept between runs (stamps: a second run installs nothing). The
# venv holds torch, the test deps and an installed torchjac (its metadata and console script);
# PYTHONPATH puts the clone the target runs from ahead of that copy, so its code is what runs.
COMPAT_TORCH ?= 2.4.1 2.14.1
COMPAT_DIR   ?= $(HOME)/.cache/torchjac
COMPAT_DEPS  := pytest==9.2.0 pytest-xdist==3.8.0 hypothesis==6.170.27 numpy==2.4.6 \
                tqdm==4.70.1 matplotlib==3.11.2 expecttest==0.3.0 scipy==1.17.1
COMPAT_KEY   := $(shell echo '$(COMPAT_DEPS)' | cksum | cut -d' ' -f1)
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

$(COMPAT_DIR)/venv-torch-%/.deps-$(COMPAT_KEY):
	rm -rf $(COMPAT_DIR)/venv-torch-$*
	mkdir -p $(COMPAT_DIR)
	$(PYTHON) -m venv $(COMPAT_DIR)/venv-torch-$*
	$(COMPAT_DIR)/venv-torch-$*/bin/python -m pip install -q torch==$* $(COMPAT_DEPS)
	$(COMPAT_DIR)/venv-torch-$*/bin/python -c "import torch; assert torch.__version__.split('+')[0] == '$*', torch.__version__"
	touch $@

$(COMPAT_DIR)/venv-torch-%/.torchjac-$(VERSION): $(COMPAT_DIR)/venv-torch-%/.deps-$(COMPAT_KEY)
	$(COMPAT_DIR)/venv-torch-$*/bin/python -m pip install -q --no-deps $(CURDIR)
	touch $@

# both stamps named here: a missing one is then never skipped as an intermediate file
test-compat: $(foreach v,$(COMPAT_TORCH),$(COMPAT_DIR)/venv-torch-$(v)/.deps-$(COMPAT_KEY) \
                                         $(COMPAT_DIR)/venv-torch-$(v)/.torchjac-$(VERSION))
	set -e; for v in $(COMPAT_TORCH); do \
	  echo "== the whole suite on torch $$v"; \
	  PYTHONPATH=$(CURDIR)/src $(COMPAT_DIR)/venv-torch-$$v/bin/python -m pytest -n 2 -q -p no:cacheprovider; \
	done

demo: $(STAMP)
	$(VENV)/bin/torchjac demo

bench: $(STAMP)
	$(VENV)/bin/torchjac bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
