# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.cw_verl-installed

.PHONY: demo test lint check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch that lies on this kind of machine: any other torch spec pulls a CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m cw_verl demo

test: $(STAMP) lint
	$(PYTHON) -m cw_verl check
	$(PYTHON) -m pytest

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

check: $(STAMP)
	$(PYTHON) -m cw_verl check

clean:
	rm -rf $(VENV)
