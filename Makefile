# One target per task. PY=python3 uses an existing interpreter that already has torch
# (GPU boxes); the default is the project's .venv made by `make setup`.
VENV := .venv
PY ?= $(VENV)/bin/python
NPROC ?= 1
# NPROC>1 runs the same script under torchrun (python -m torch.distributed.run)
RUN = $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --nproc_per_node=$(NPROC))

.PHONY: setup test bench compile-check clean sft grpo grpo-countdown grpo-compare ppo dpo dpo-compare irpo coconut cope cope-flipflop mta

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
	$(PY) bench/grpo_step.py
	$(PY) bench/attention.py

# nvcc compile of kernels.cu against torch's headers (what CI runs; skips without nvcc)
compile-check:
	bash bench/compile_check.sh $(PY)

# ARGS="--key=value ..." passes overrides to any method target
sft:
	$(RUN) algos/sft.py --out_dir=runs/sft-addition $(ARGS)

# GRPO from a weak SFT base: without --init in ARGS, grpo.py first trains that base with
# algos/sft.py (stopped at 30% held-out accuracy) into runs/base-<task>-..., and reuses it after
grpo:
	$(RUN) algos/grpo.py --out_dir=runs/grpo-arithmetic $(ARGS)

grpo-countdown:
	$(RUN) algos/grpo.py --task=countdown --out_dir=runs/grpo-countdown $(ARGS)

# PPO with a value head and GAE, from the same base as make grpo
ppo:
	$(RUN) algos/ppo.py --out_dir=runs/ppo-arithmetic $(ARGS)

# the README's table: the same base, seed and step budget, four objectives
DRGRPO = --advantage=drgrpo --loss_agg=seq-mean-token-sum-norm
DAPO = --loss_agg=token-mean --eps_high=0.28 --dynamic_sampling=True
RLOO = --advantage=rloo
grpo-compare:
	$(RUN) algos/grpo.py --out_dir=runs/cmp-grpo $(ARGS)
	$(RUN) algos/grpo.py $(DRGRPO) --out_dir=runs/cmp-drgrpo $(ARGS)
	$(RUN) algos/grpo.py $(DAPO) --out_dir=runs/cmp-dapo $(ARGS)
	$(RUN) algos/grpo.py $(RLOO) --out_dir=runs/cmp-rloo $(ARGS)
	$(PY) plumbing.py compare runs/grpo-compare.png runs/cmp-grpo runs/cmp-drgrpo runs/cmp-dapo runs/cmp-rloo

# DPO on pairs sampled from the same base (a correct vs an incorrect answer to a training
# prompt), written to the run dir as pairs_1.jsonl
dpo:
	$(RUN) algos/dpo.py --out_dir=runs/dpo-arithmetic $(ARGS)

# the README's DPO table: one pair file (and one cached set of reference log-probs), five losses
CMP_PAIRS = --data=runs/cmp-dpo/pairs_1.jsonl
dpo-compare:
	$(RUN) algos/dpo.py --out_dir=runs/cmp-dpo $(ARGS)
	$(RUN) algos/dpo.py $(CMP_PAIRS) --beta=0.5 --out_dir=runs/cmp-dpo-beta0.5 $(ARGS)
	$(RUN) algos/dpo.py $(CMP_PAIRS) --loss=cdpo --cdpo_eps=0.1 --out_dir=runs/cmp-cdpo $(ARGS)
	$(RUN) algos/dpo.py $(CMP_PAIRS) --loss=ipo --beta=0.1 --out_dir=runs/cmp-ipo $(ARGS)
	$(RUN) algos/dpo.py $(CMP_PAIRS) --alpha=1 --out_dir=runs/cmp-dpo-nll $(ARGS)
	$(PY) plumbing.py compare runs/dpo-compare.png --curves=eval_accuracy,margin runs/cmp-dpo runs/cmp-dpo-beta0.5 runs/cmp-cdpo runs/cmp-ipo runs/cmp-dpo-nll

# IRPO: 3 rounds of sample -> pair -> DPO + NLL, each from (and against) the last round's model
irpo:
	$(RUN) algos/dpo.py --iterations=3 --alpha=1 --out_dir=runs/irpo-arithmetic $(ARGS)

# Coconut vs language CoT vs no CoT on ProsQA-style graphs: the same init and step budget for
# each, one table (one process: the models are small)
coconut:
	$(PY) algos/coconut.py --out_dir=runs/coconut-prosqa $(ARGS)

# CoPE vs learned / RoPE / no positions on counting, Flip-Flop and selective copy (ID and OOD)
cope:
	$(PY) algos/cope.py --out_dir=runs/cope $(ARGS)

# Flip-Flop at 128 instruction pairs (256 tokens) instead of 32: reads far from their write,
# where learned / rotary / no positions fail and CoPE does not (about 27 min on 2 CPU cores)
cope-flipflop:
	$(PY) algos/cope.py --tasks=flipflop --flipflop_pairs=128 --n_eval=300 --out_dir=runs/cope-flipflop $(ARGS)

# Multi-Token Attention vs standard attention: the find-the-block toy task and a char-level LM
mta:
	$(PY) algos/mta.py --out_dir=runs/mta $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs kernels_cuda*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
