# The two commands, on a machine with Python 3.10+ and nothing else:
#   make run    installs what the default job needs into .venv, then runs it: stage 1, stage 2 and
#               the evaluation of the tiny model on the built-in data (runs/stage1, runs/stage2,
#               runs/stage2/model/eval)
#   make test   installs what the tests need into .venv, then runs them
# Both create .venv on first use and reuse it after; an install runs again only when pyproject.toml
# changes.
# `make run` replaces the runs it made before (--overwrite); train.py run by hand refuses to.
#
# torch: with an NVIDIA GPU (nvidia-smi found) or off Linux, PyPI's build (CUDA on Linux, CPU/MPS on
# a Mac); on Linux without one, PyTorch's CPU-only build from its CPU index (PyPI's Linux build
# brings GBs of CUDA libraries), or PyPI's if that index cannot be reached. TORCH pins the version
# the project was tested with; `make run TORCH=torch` takes the newest.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
NPROC ?= 2

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# torchrun sets one thread per rank anyway when OMP_NUM_THREADS is unset, with a warning.
TORCHRUN := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/torchrun --nproc_per_node=$(NPROC)

.PHONY: run test

run: $(VENV)/.installed
	$(TORCHRUN) train.py --stage 1 --overwrite
	$(TORCHRUN) train.py --stage 2 --overwrite
	$(BIN)/python evaluate.py --overwrite
	@# Evaluation sharded over two ranks writes the run one process wrote (tests/test_sharded_eval.py,
	@# here on the trained model).
	$(TORCHRUN) evaluate.py --out runs/eval-two-ranks --overwrite --quiet > runs/eval-two-ranks.log
	cmp runs/stage2/model/eval/builtin-test.trec runs/eval-two-ranks/builtin-test.trec

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi > /dev/null 2>&1; then \
		$(PIP) install "$(TORCH)" --index-url $(TORCH_CPU_INDEX) --retries 0 --timeout 15 \
			2> /dev/null || { \
			echo "$(TORCH_CPU_INDEX) could not be used: $(TORCH) from PyPI"; $(PIP) install "$(TORCH)"; }; \
	else \
		$(PIP) install "$(TORCH)"; \
	fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	touch $@
