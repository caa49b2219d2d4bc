# galdecomp: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv (standard library venv) and install the package when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.galdecomp-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test clean-demo

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

clean-demo:
	rm -rf $(DEMO_DIR)
