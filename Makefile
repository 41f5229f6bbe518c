# One target per task. PY=python3 uses an existing interpreter that already has torch
# (GPU boxes); the default is the project's .venv made by `make setup`.
VENV := .venv
PY ?= $(VENV)/bin/python
NPROC ?= 1
# NPROC>1 runs the same script under torchrun (python -m torch.distributed.run)
RUN = $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --nproc_per_node=$(NPROC))

.PHONY: setup test bench compile-check clean sft sft-base-arithmetic sft-base-countdown

setup:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q setuptools wheel
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-build-isolation -e .
	@$(VENV)/bin/python -c "import torch, model, sampler, kernels; print('setup ok: torch', torch.__version__); print('kernels.cu: built as kernels_cuda' if kernels.HAVE_CUDA_KERNELS else 'kernels.cu: skipped (needs nvcc and a CUDA build of torch); kernels.py uses its torch path')"

test:
	$(PY) -m pytest -q

bench:
	$(PY) bench/sampler.py
	$(PY) bench/logprob.py

# nvcc compile of kernels.cu against torch's headers (what CI runs; skips without nvcc)
compile-check:
	bash bench/compile_check.sh $(PY)

# ARGS="--key=value ..." passes overrides to any method target
sft:
	$(RUN) algos/sft.py --out_dir=runs/sft-addition $(ARGS)

# weak bases for RL to improve on: stop at the first evaluation with >= 30% held-out accuracy
# (the batch / steps / eval interval of the runs measured in the README)
BASE = --n_head=4 --batch_size=64 --max_steps=6000 --eval_every=500 --stop_accuracy=0.3
sft-base-arithmetic:
	$(RUN) algos/sft.py $(BASE) --out_dir=runs/base-addition $(ARGS)

sft-base-countdown:
	$(RUN) algos/sft.py $(BASE) --task=countdown --out_dir=runs/base-countdown $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs kernels_cuda*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
