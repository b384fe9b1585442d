# Two entry points on a fresh machine: `make demo` (the main job on the shipped model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned for reproducible runs here; setup.py keeps loose ranges so users' own torch works.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: test test-slow demo venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test]" $(TORCH_PINS)
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) benchmarks/unet_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
