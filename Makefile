# codeq — the README's commands. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install.stamp
FMNIST := /usr/share/datasets/fashion-mnist
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow sweep report bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create ./.venv and install codeq editable with [dev,sweep] (quick when done)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q "torch<=2.14.1" "torchvision<=0.29.1"
	$(PY) -m pip install -q -e '.[dev,sweep]'
	@if [ ! -d $(FMNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: dataset-fashion-mnist not installed; the quick start will need dataset.download=true"; \
	fi
	@touch $(STAMP)

run: install  ## the quick start: ResNet-20 with CoDeQ on Fashion-MNIST (CPU, minutes)
	$(PY) -m codeq.main experiment=quickstart $(ARGS)

test: install  ## lint + format check, then the fast test suite (seconds to minutes)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(ARGS)

test-slow: install  ## only the slow, real-data tests
	$(PY) -m pytest -q -m slow $(ARGS)

sweep: install  ## the predecessor's 8-run grid as a Hydra multirun (ARGS=... adds overrides)
	$(PY) -m codeq.main -m experiment=sweep_sparsity $(ARGS)

report: install  ## table + Pareto plot over run/sweep dirs: make report ARGS="multirun/..."
	$(PY) -m codeq.report $(ARGS)

bench: install  ## overhead ratios, side by side in one process
	$(PY) -m codeq.bench $(ARGS)

clean:  ## remove caches and the venv (keeps outputs/)
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
