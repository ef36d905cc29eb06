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

# TensorRT's Python bindings install without a GPU: the API contract tests check every TensorRT
# name the code uses against 10.3 (JetPack 6), 10.16 and 11.4, each in its own folder
TRT_API := $(VENV)/tensorrt-api
$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --target $(TRT_API)/10.3 tensorrt-cu12-bindings==10.3.0
	$(BIN)/pip install -q --target $(TRT_API)/10.16 tensorrt-cu12-bindings==10.16.1.11
	$(BIN)/pip install -q --no-deps --target $(TRT_API)/10.16 tensorrt-cu12==10.16.1.11
	$(BIN)/pip install -q --target $(TRT_API)/11.4 tensorrt-cu13-bindings==11.4.0.106
	$(BIN)/pip install -q --no-deps --target $(TRT_API)/11.4 tensorrt-cu13==11.4.0.106
	touch $@

demo: $(VENV)/.demo
	$(BIN)/spade-edge demo

# pytest exits 5 when it collected no test: that is a failure here, never a pass
test: $(VENV)/.test
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) spade-edge-demo
