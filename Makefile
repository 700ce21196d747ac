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

# `serve run` on a Ray head of its own (audioclip_serve/local_head.py), without the dashboard, the log
# monitor and the autoscaler's monitor, in the serving environment the benchmarks measure
# (local_head.SERVING_ENV: HAProxy ingress, Serve's throughput mode, quieter timers). Ctrl-C stops
# the app, then the head.
demo: $(STAMP)
	$(BIN)/python -m audioclip_serve.local_head configs/demo.yaml

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
