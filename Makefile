# Two commands do all the set-up: `make run` and `make test` each create and
# fill the virtual environment .venv on first use (and again when pyproject.toml changes):
# `make run` with the package alone (training needs no torch), `make test`, `make lint` and
# `make bench` with the dev extra too (torch, pytest, ruff).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" for CPU-only torch.
PIP_ARGS ?=
# Two pytest workers, one test file each at a time: XLA compiles on one thread, so two workers keep two cores busy.
TEST_WORKERS ?= 2
# glibc (2.35+) backs large allocations with transparent huge pages where the kernel hands them out on request
# (THP mode "madvise"): XLA's CPU runtime allocates a step's temporaries afresh on every call, and with 4 KiB
# pages the page faults dominate multi-threaded CPU steps. Ignored elsewhere. (train.py sets it for itself.)
HUGE_PAGES := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: run test test-slow lint bench

$(VENV)/.installed-package: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e . $(PIP_ARGS)
	touch $@

$(VENV)/.installed: $(VENV)/.installed-package
	$(PYTHON) -m pip install --quiet -e ".[dev]" $(PIP_ARGS)
	touch $@

run: $(VENV)/.installed-package
	$(PYTHON) train.py --task=discovery $(ARGS)

# `test`: every test but the end-to-end ones marked slow (training to a score, subprocess runs of train.py and
# the benchmarks, signals, several processes); `test-slow`: those. CI runs both.
test: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(HUGE_PAGES) $(PYTHON) benchmarks/step_time.py $(ARGS)
