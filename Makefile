# Developer, CI and container entry points. `make serve` and `make test` are the two
# commands a fresh machine needs; both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STORE ?= var/models
ARCHIVES ?= var/model-archives
PROTO := proto/xaiserve/v1/explain.proto proto/xaiserve/torchserve/inference.proto

.PHONY: install proto serve lint test demo-model archives stack-up stack-down test-torchserve bench gpu-check clean

# torch goes in first, from the CPU build, so nothing that depends on it pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# Regenerates the committed Python stubs (the public API and the subset of TorchServe's
# inference API the gateway calls); tests/proto/test_proto_stubs.py fails when they are stale.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Ixaiserve/api=proto/xaiserve --python_out=src \
		--pyi_out=src --grpc_python_out=src $(PROTO)

# The gRPC explanation service on the embedded (local) backend with the demo model,
# trained on first run.
serve: $(STAMP)
	$(BIN)/xaiserve-server --model-store $(MODEL_STORE) --build-demo

demo-model: $(STAMP)
	$(BIN)/python -m xaiserve.model_store.build_demo --out $(MODEL_STORE)/demo

# TorchServe model archives (.mar) of every model directory in MODEL_STORE.
archives: demo-model
	$(BIN)/python -m xaiserve.model_store.archive --out $(ARCHIVES) \
		$$(for c in $(MODEL_STORE)/*/config.yaml; do printf -- '--model-dir %s ' "$${c%/config.yaml}"; done)

# The full stack in the background: TorchServe (token auth, Prometheus metrics, management
# API on 127.0.0.1) with the archives, then the gateway on 127.0.0.1:50051 in front of it.
# PIDs and logs in var/stack/.
stack-up: $(STAMP)
	$(BIN)/python -m xaiserve.gateway.stack up --model-store $(MODEL_STORE) --archives $(ARCHIVES)

stack-down: $(STAMP)
	$(BIN)/python -m xaiserve.gateway.stack down

# The checks the code assumes (configured in pyproject.toml): lint, format, types, and the
# import contracts (one direction of imports between the packages).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP)
	$(BIN)/python -m pytest

# Only the tests against a real TorchServe (`make test` runs them too).
test-torchserve: $(STAMP)
	$(BIN)/python -m pytest -m torchserve

# Forward-only work side by side in one process (bench/forward_only.py): Captum's Occlusion,
# our occlusion on torch and on ONNX Runtime, adaptive occlusion, APEM per map, on the demo
# model and ResNet-18/50-shaped networks at 224 x 224. 4 to 8 minutes on 2 cores.
bench: demo-model
	$(BIN)/python bench/forward_only.py --demo-dir $(MODEL_STORE)/demo

# On a CUDA GPU: every method's maps, forward passes and predictions on the GPU against the
# CPU, then bench/concurrency.py's embedded cells on the GPU (bench/gpu_check.py, a few
# minutes). Without a GPU it prints why and exits 0. It installs nothing (a GPU machine may
# have no registry to install from): the venv's python when there is one, else python3 with
# src on PYTHONPATH (GPU_PYTHON=... picks another).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) var
