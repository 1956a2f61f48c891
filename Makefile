# Thin aliases. `make test` and `make demo` set everything up on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA, take the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-gpu lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; else $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	# deepspeed ships as source only: build it against the torch above, not a second one.
	$(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check flame tests benchmarks
	$(VENV)/bin/ruff format --check flame tests benchmarks

demo: install
	bash configs/demo.sh

bench: install
	$(PY) benchmarks/data_prepare.py
	$(PY) benchmarks/loader.py

clean:
	rm -rf $(VENV) .demo
