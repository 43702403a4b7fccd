# `make demo` and `make test` work from a fresh checkout: both install first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench compose-e2e clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test,bench]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/clipfleet demo --serve

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) -m bench

# Needs a Docker engine and compose/.env (none here; see README "Running in containers").
compose-e2e:
	compose/e2e.sh

clean:
	rm -rf $(VENV) demo-store .bench
