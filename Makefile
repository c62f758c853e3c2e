# Two entry points a newcomer needs: `make demo` (main job) and `make test`.
# Each creates its own virtualenv in .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m apiq_jax.cli demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check apiq_jax pallas_kernels tests benchmarks scripts
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/quant_storage.py

clean:
	rm -rf $(VENV) build *.egg-info
