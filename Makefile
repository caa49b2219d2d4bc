# galdecomp: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv (standard library venv) and install the package when needed.
# `make test-fast` runs the tests not marked slow (development).
# `make docs` builds the reference manual (docs/ -> docs/_build/html, warnings are errors);
# `make plots` remakes the README's figures in plots/ from the demo run (running it if missing).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.galdecomp-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast docs plots clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install -e ".[mpi,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/galdecomp run --config runs/demo.yaml --out $(DEMO_DIR) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the tests without those marked slow (10 s or more each; markers in pyproject.toml)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

docs: $(STAMP)
	$(BIN)/python -c "import sphinx, myst_parser" 2>/dev/null || $(BIN)/python -m pip install -e ".[docs]"
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html
	@echo "manual: docs/_build/html/index.html"

plots: $(STAMP)
	$(BIN)/python plots/make_plots.py $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
