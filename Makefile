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
	# clip-retrieval only for its ClipClient module, which the search tests call as it ships; its
	# own pins (pyarrow<16, clip back's Flask stack) would clash with ours, so no dependencies.
	$(PY) -m pip install -q --no-deps clip-retrieval==2.45.0
	# The browser tests drive Debian's chromium (Playwright never downloads one).
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
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
