# Two entry points for a new machine; each sets up its own virtual environment in .venv.
#   make demo   install the workstation + CPU runtime + demo extras, run the end-to-end demo
#   make test   install the test extras, run the test suite (.ci/run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[export,cpu,demo]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/spade-edge demo

# the test command lives in .ci/run (CI runs exactly it): venv, test extras, pytest
test:
	bash .ci/run

clean:
	rm -rf $(VENV) spade-edge-demo
