# Two entry points on a fresh machine: `make demo` (the main job on the shipped model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pinned for reproducible runs here; setup.py keeps loose ranges so users' own torch works.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: test test-slow demo venv bench clean

venv: $(VENV)/.installed

# The library and its runtime dependencies only: all `make demo` needs.
$(VENV)/.runtime: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e . $(TORCH_PINS)
	touch $@

# Plus the test-only references (diffusers, transformers, ...).
$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -e ".[test]" $(TORCH_PINS)
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# Imagic end to end on the small built-in model (weights/shapes: 16 MB, trained on procedural shapes by
# weights/shapes/train.py) and its example input; about 30 s on 2 CPU cores once the venv exists.
# For a real SD checkpoint:
# imagic edit --ckpt v1-5-pruned-emaonly.safetensors --image photo.png --prompt "..." --out runs/photo
# The built-in model's recipe (imagic/recipes.py): benchmarks/results/shapes_eval.md and shapes_budget.md measure it.
DEMO_SETTINGS := --recipe shapes --seeds 0 1 --device cpu
demo: $(VENV)/.runtime
	rm -rf demo_out
	$(PY) -m imagic.cli edit --ckpt weights/shapes/shapes.safetensors --image weights/shapes/example_red_circle.png \
		--prompt "a red square on a blue background" --out demo_out $(DEMO_SETTINGS) --quiet
	@echo "demo: input demo_out/input.png, alpha sweep demo_out/grid.png (rows: seeds, columns: alpha; 0 = input)"

bench: venv
	$(PY) benchmarks/unet_step.py --threads 1

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
