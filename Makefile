# make demo: set up .venv, then run the embedded default (generated data, tiny models, CPU).
# make test: set up .venv (with the test extras), then run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-dev demo test bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

demo: setup
	PYTHON=$(PY) bash demo.sh

test: setup-dev
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadscope tests

clean:
	rm -rf demo_runs .pytest_cache
