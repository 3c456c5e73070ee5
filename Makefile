# Two commands do all the set-up: `make run` and `make test` each create and
# fill the virtual environment .venv on first use (and again when pyproject.toml changes).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# Two pytest workers, one test file each at a time: XLA compiles on one thread, so two workers keep two cores busy.
TEST_WORKERS ?= 2

.PHONY: run test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(PYTHON) train.py --task=discovery $(ARGS)

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
