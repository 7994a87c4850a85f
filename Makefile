# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment in .venv and install medvlm into it when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medvlm-installed
# Tests never reach a model hub: offline flags here, and a temporary HF_HOME in tests/conftest.py.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: venv demo demo-quick test test-fast clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/medvlm demo

demo-quick: $(STAMP)
	$(OFFLINE) $(VENV)/bin/medvlm demo --quick --output outputs/quick

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

test-fast: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
