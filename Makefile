# The README's commands. Each target creates .venv/ on first use and installs what it needs.
# On a machine without CUDA, TORCH (default torch==2.13.0) is installed first: on the project's
# CI machines that pin takes a local CPU wheel, where an unpinned torch would pull a CUDA build
# of several GB. PyPI's own Linux wheel of torch carries CUDA's libraries too; elsewhere, for
# the CPU build: make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megagpt-installed
PYTEST_ARGS ?=
TORCH ?= torch==2.13.0

.PHONY: demo test test-quick venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet $(TORCH); fi
	$(PY) -m pip install --quiet -e '.[test,hf]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
