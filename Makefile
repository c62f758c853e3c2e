# Two entry points a newcomer needs: `make demo` (main job) and `make test`.
# Both use the virtualenv in .venv (created on first use). `make demo` installs the
# package alone (no test tools, no torch); `make test` adds the `test` extra. Each has
# its own stamp file, so `make demo` then `make test` installs the extra on top.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# package only: what `make demo` (and the benchmarks) need
$(VENV)/.installed-demo: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# package + the `test` extra (pytest, hypothesis, torch, notebook runners, ruff)
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m apiq_jax.cli demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check apiq_jax pallas_kernels tests benchmarks scripts
	$(PY) -m pytest -q --ignore=tests/multidevice
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q tests/multidevice

bench: $(VENV)/.installed-demo
	$(PY) benchmarks/quant_storage.py

clean:
	rm -rf $(VENV) build *.egg-info
