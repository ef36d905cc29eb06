# Two entry points for a new machine; each sets up its own virtual environment in .venv.
#   make demo   install the workstation + CPU runtime + demo extras, run the end-to-end demo
#   make test   install the test extras, run the test suite
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

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/spade-edge demo

# pytest exits 5 when it collected no test: that is a failure here, never a pass
test: $(VENV)/.test
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) spade-edge-demo
