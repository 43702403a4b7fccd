# `make demo` and `make test` work from a fresh checkout: both install first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench compose-e2e clean

install: $(STAMP)

# Quiet: one line says what is happening, then only what must be said (errors), so a newcomer's
# `make demo` shows the demo rather than a screen of install output.
$(STAMP): pyproject.toml requirements.lock
	@echo "installing clipfleet and its pinned dependencies into $(VENV)/ (the first time takes a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
# (PYTHONWARNINGS: setuptools' editable-install warning box about folders named like the package says nothing
# a user can act on here: the folders are mapped into clipfleet.* on purpose.)
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test,bench]'
# clip-retrieval only for its ClipClient module, which the search tests call as it ships; its
# own pins (pyarrow<16, clip back's Flask stack) would clash with ours, so no dependencies.
# (Comments here start at the margin: a tab-indented one is a recipe line that make prints.)
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps clip-retrieval==2.45.0
# datasets (the dataset card test) likewise: 4.0.0, the last release whose pyarrow floor (15) takes our
# pyarrow 20, declares fsspec<=2025.3.0, below ours; it reads local parquet and webdataset with ours.
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps -c requirements.lock datasets
# The browser tests drive Debian's chromium (Playwright never downloads one).
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@touch $(STAMP)

demo: install
	$(VENV)/bin/clipfleet demo --serve

test: install
	$(PY) -m pytest -n 2 tests

bench: install
	$(PY) -m bench

# Needs a Docker engine and compose/.env (none here; see README "Running in containers").
compose-e2e:
	compose/e2e.sh

clean:
	rm -rf $(VENV) demo-store .bench
