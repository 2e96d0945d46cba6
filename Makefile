# turboflow — two set-up commands: `make demo` and `make test`. Both create/refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is installed first with an exact pin: on CI/dev machines that resolves to a local CPU wheel,
# while a loose requirement would pull several GB of CUDA packages. The GPU image brings its own torch.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: venv lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# style and lint (pyproject.toml [tool.ruff]); the package stack is checked by tests/test_architecture.py
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: venv
	$(VENV)/bin/turboflow demo

bench: venv
	@echo "bench runs on a GPU machine: see BENCHMARKS.md for the exact command"
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
