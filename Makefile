# dit-bench: `make demo` trains the default experiment, `make test` runs lint + the fast tests.
# torch/torchvision are pinned here, in the install step, so pip never picks a torch on its own
# (an unpinned torch downloads gigabytes of CUDA wheels). Override: make install TORCH=2.5.1 ...
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.14.1
TORCHVISION ?= 0.29.1
EXTRAS ?= dev
RUNS ?= runs
PY := $(VENV)/bin/python
PIN := "torch==$(TORCH)" "torchvision==$(TORCHVISION)"

.PHONY: install demo test test-slow lint format bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIN)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" $(PIN)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dit-bench train --out $(RUNS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(VENV)/bin/pytest -m "not slow" -q

test-slow: install
	$(VENV)/bin/pytest -m slow -q

bench: install
	$(VENV)/bin/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
