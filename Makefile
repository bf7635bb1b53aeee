# `make demo` and `make test` each set up their own virtual environment (.venv), installing the
# CPU build of torch first so that pip never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/evomerge: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/evomerge

setup: $(BIN)/evomerge

# the tests also cover the optional Bayesian IRT fitter (pymc extra) and check our mergekit
# exports against mergekit itself (the version is pinned: the test reads its method registry)
$(VENV)/.test-deps: $(BIN)/evomerge
	$(BIN)/python -m pip install -q -e ".[dev,pymc]" "mergekit==0.1.5"
	touch $@

demo: setup
	$(BIN)/evomerge search

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/merge_speed.py
	$(BIN)/python benchmarks/irt_error.py
	$(BIN)/python benchmarks/irt_error.py --zoo
	$(BIN)/python benchmarks/search_fidelity.py

clean:
	rm -rf $(VENV) build *.egg-info
