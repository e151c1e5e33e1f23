# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.storymm-installed
WORK   ?= ./storymm-work
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup system-packages demo test test-fast lint format clean

setup: $(STAMP)

# torch/torchvision first, from pip (pinned; uv/poetry would download gigabytes), then the project.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,dev,tensorboard,mlflow]'
	@touch $(STAMP)

# SLURM, Chromium and iproute2 for the real-component tests, when this machine can install them.
system-packages:
	@bash scripts/system-packages.sh

demo: setup
	$(VENV)/bin/storymm pipeline --config $(CONFIG) --work $(WORK)

test: setup system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff (configured in pyproject.toml): lint and formatting check; `make format` rewrites.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(WORK) .pytest_cache
