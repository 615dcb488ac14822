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

.PHONY: install demo test test-slow lint format bench feature-nets gpu-check clean postgres postgres-start postgres-stop

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

# CPU, float32, DiT-S/2 on 16x16x4, batch 32: ours eager and compiled against diffusers' DiT.
BENCH_ARGS ?= --backbones dit-s/2 --image-size 16 --channels 4 --batch 32 --against diffusers --compile --no-sample
bench: install
	$(VENV)/bin/dit-bench bench $(BENCH_ARGS)

# Retrain the small feature nets (mnist-net, digits-net, shapes-net) into dit_bench/metrics/nets/,
# the weights every machine scores FD-<net> with: only when a recipe changes (bump its version)
feature-nets: install
	$(PY) -m dit_bench.metrics.features $(NETS)

# On a GPU machine (no venv, no internet: its own python3 with torch): one script, a few
# minutes, writes reports/gpu/<date>-<device>.md (+ .json; also under $$OUT when set).
# Packages it lacks (pydantic, for the check's `dit-bench train` section) may travel as wheels in
# $(GPU_WHEELS) (README, Performance): installed into a throwaway folder, not its python.
GPU_PYTHON ?= python3
GPU_BUDGET ?= 420
GPU_WHEELS ?= .whl
GPU_SITE ?= /tmp/dit-bench-site
gpu-check:
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q --no-index \
	  --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m dit_bench.gpu_check \
	  --budget $(GPU_BUDGET)

# PostgreSQL for the distributed-sweep test (tests/test_postgres.py starts its own throwaway
# server on 127.0.0.1 from these binaries). `postgres` installs the server (Debian: apt) when no
# initdb/pg_ctl is found (the psycopg driver comes with the package); `postgres-start` runs a cluster
# in $(PGDIR) for manual use (URL in $(PGDIR)/url; initdb refuses root, so root runs it as the
# `postgres` user), `postgres-stop` stops it.
PGDIR ?= /tmp/dit-bench-pg
PGPORT ?= 54329
PGBIN = $(shell dirname "$$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)")
PGAS = $(if $(filter 0,$(shell id -u)),runuser -u postgres --,)

postgres: install
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing PostgreSQL (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	fi

postgres-start: postgres
	rm -rf $(PGDIR) && mkdir -p $(PGDIR)
	$(if $(PGAS),chown postgres $(PGDIR),)
	$(PGAS) $(PGBIN)/initdb -D $(PGDIR)/data -U postgres --auth=trust >/dev/null
	$(PGAS) $(PGBIN)/pg_ctl -D $(PGDIR)/data -l $(PGDIR)/log -w start \
		-o "-c listen_addresses=127.0.0.1 -p $(PGPORT) -k $(PGDIR)"
	echo "postgresql://postgres@127.0.0.1:$(PGPORT)/postgres" > $(PGDIR)/url
	@echo "PostgreSQL up: $$(cat $(PGDIR)/url)"

postgres-stop:
	$(PGAS) $(PGBIN)/pg_ctl -D $(PGDIR)/data -m fast stop

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
