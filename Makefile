# Every target does its own setup on a fresh machine: venv, pip install, the Fashion-MNIST package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
QUICKSTART ?= runs/quickstart

.PHONY: setup data quickstart test test-slow lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,convert,demo]"
	# torch-fidelity: only its Inception module, an independent reference for our FID port
	# (--no-deps: it asks for torchvision, which has no CPU build that matches torch here).
	$(BIN)/python -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

setup: $(BIN)/.installed

data:
	@test -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

# The main job: tokenizer (trained first when absent) + VAR on Fashion-MNIST, then samples + metrics.
quickstart: setup data
	$(BIN)/arvision train --config configs/var.py:fmnist --workdir $(QUICKSTART) --config.eval.num_samples=100
	$(BIN)/arvision eval --workdir $(QUICKSTART) --num_samples 1000 --out $(QUICKSTART)/eval

test: setup data
	$(BIN)/ruff check arvision configs experiments tests
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# Minutes-long checks (e.g. the domain classifier reaching >= 90% on Fashion-MNIST).
test-slow: setup data
	$(BIN)/python -m pytest -q -m slow tests

lint: setup
	$(BIN)/ruff check arvision configs experiments tests
	$(BIN)/ruff format --check arvision configs experiments tests

clean:
	rm -rf $(VENV) runs
