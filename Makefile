# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.torchjac-installed

.PHONY: demo test fuzz bench lint venv clean

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
ORACLE_TESTS := tests/test_modules_oracles.py tests/test_second_order_oracles.py \
	tests/test_functional.py tests/test_graph.py tests/test_gramian.py tests/test_ntk_kernel.py \
	tests/test_modules_convolutions.py

test: lint
	$(VENV)/bin/pytest -n 2 -q
	TORCHJAC_FAST_PATHS=0 $(VENV)/bin/pytest -n 2 -q $(ORACLE_TESTS)

# The invariants fuzz of issue 15 at length: random examples, a new seed each run (make test runs
# it derandomized, under a minute); FUZZ_EXAMPLES sets the examples per test (default 400).
FUZZ_TESTS := tests/test_invariants_fuzz.py tests/test_invariants_fuzz_graph.py
fuzz: $(STAMP)
	TORCHJAC_FUZZ_PROFILE=long TORCHJAC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		$(VENV)/bin/pytest -n 2 -q $(FUZZ_TESTS) --hypothesis-show-statistics

demo: $(STAMP)
	$(VENV)/bin/torchjac demo

bench: $(STAMP)
	$(VENV)/bin/torchjac bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
