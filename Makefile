# Every target does its own setup on a fresh machine: venv, pip install, the Fashion-MNIST package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
QUICKSTART ?= runs/quickstart
QUICKSTART_SCRATCH ?= runs/quickstart-from-scratch
# When make started (before setup): the end-of-job summary reports the whole wall time from here.
JOB_START := $(shell date +%s)
SUMMARY = $(BIN)/python -m arvision.summary
# Extra `arvision train` flags for the quickstart, e.g. QUICKSTART_ARGS=--config.total_steps=950
QUICKSTART_ARGS ?=
FLOOR = experiments/results/domain_classifier.json

.PHONY: setup setup-core data quickstart quickstart-from-scratch test test-slow lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,convert,demo,aot]"
	# The CUDA plugin lowers the Triton kernels for GPUs from this host (tests/test_kernels_aot.py).
	# Its own directory, not the venv: installed there it prints CUDA warnings on every import jax.
	$(BIN)/python -m pip install -q --upgrade --no-deps -c constraints.txt --target $(VENV)/cuda-aot jax-cuda12-plugin
	# torch-fidelity: only its Inception module, an independent reference for our FID port
	# (--no-deps: it asks for torchvision, which has no CPU build that matches torch here).
	$(BIN)/python -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

# The main job needs only the package's own dependencies (no torch, gradio or test tools): a
# shorter install on a fresh clone. `make setup` (test, lint) installs the rest later.
$(BIN)/.installed-core: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

setup: $(BIN)/.installed

# Whichever install is there already; else the core one.
setup-core: $(if $(wildcard $(BIN)/.installed),$(BIN)/.installed,$(BIN)/.installed-core)

data:
	@test -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

# The main job: VAR on Fashion-MNIST on the tokenizer shipped in the package (arvision/tokenizers/
# data; trained first if configs/tokenizer.py:fmnist_msvq changed; in-training evals of 100 samples
# for the curves), then 1000 samples + metrics, curves.png and a summary.
# quickstart-from-scratch trains the tokenizer too.
define quickstart_job
	rm -f $(1)/stage_times.json
	$(SUMMARY) stage --workdir $(1) --name $(2) -- $(BIN)/arvision train --config configs/var.py:fmnist \
	  --workdir $(1) --config.eval.num_samples=100 $(3) $(QUICKSTART_ARGS)
	$(SUMMARY) stage --workdir $(1) --name eval -- $(BIN)/arvision eval --workdir $(1) \
	  --num_samples 1000 --out $(1)/eval
	$(SUMMARY) report --workdir $(1) --eval $(1)/eval --job_start $(JOB_START) --floor $(FLOOR)
endef

quickstart: setup-core data
	$(call quickstart_job,$(QUICKSTART),train,)

quickstart-from-scratch: setup-core data
	$(call quickstart_job,$(QUICKSTART_SCRATCH),tokenizer+train,--config.tokenizer.checkpoint=)

test: setup data
	$(BIN)/ruff check arvision configs experiments tests
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=25 tests

# Minutes-long checks (e.g. the domain classifier reaching >= 90% on Fashion-MNIST).
test-slow: setup data
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m slow tests

lint: setup
	$(BIN)/ruff check arvision configs experiments tests
	$(BIN)/ruff format --check arvision configs experiments tests

clean:
	rm -rf $(VENV) runs
