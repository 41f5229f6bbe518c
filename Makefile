# One target per task. PY=python3 uses an existing interpreter that already has torch
# (GPU boxes); the default is the project's .venv made by `make setup`.
VENV := .venv
PY ?= $(VENV)/bin/python
NPROC ?= 2

.PHONY: setup test bench clean

setup:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q setuptools wheel
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-build-isolation -e .
	@$(VENV)/bin/python -c "import torch, model, sampler; print('setup ok: torch', torch.__version__)"

test:
	$(PY) -m pytest -q

bench:
	$(PY) bench/sampler.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
