# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv lock bench

venv: $(VENV)/.installed

# torch first from the CPU wheel on disk; then the project under the tested constraints.
# sae-bench and nnsight require torchvision, but nothing on our path imports it and the
# only release matching CPU torch 2.13 fails at import (breaking transformers), so it is removed.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e .
	$(BIN)/pip uninstall --yes --quiet torchvision
	$(BIN)/python -c "import torch, transformers, transformer_lens, nnsight, dictionary_learning, sae_bench; print('venv ok: torch', torch.__version__)"
	touch $@

demo: venv
	mkdir -p runs
	$(BIN)/python -m experiments.sweep --study demo --run-dir runs/demo

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m experiments.bench_train

lock: venv
	{ sed -n 1,3p constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.tmp && mv constraints.tmp constraints.txt
