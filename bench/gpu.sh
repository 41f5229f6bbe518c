#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU box whose python3 already has torch:
#   bash bench/gpu.sh [OUT_DIR] [build] [tests] [sampler] [logprob] [sft] [attention] [coconut]   (none named: all but coconut)
# TESTS="tests/x.py ..." narrows the tests part. build: kernels.cu as kernels_cuda in place; tests: the suite, CUDA tests included; sampler:
# bench/sampler.py in bf16; logprob: bench/logprob.py in bf16 (kernel vs torch paths); sft: a
# larger SFT run (85M params, 4-digit addition) reporting step time and MFU; attention:
# bench/attention.py in bf16 (CoPE and MTA vs standard attention at T = 1024, 2048); coconut (only
# when named; not yet run on a GPU): the Coconut / CoT / no-CoT comparison with the released ProsQA
# config's schedule instead of the CPU's: batches of 128 (its 4 GPUs x 32), 5 epochs of the 20000
# training graphs per latent stage (780 steps), 10 for stage 0 (released: 5 from GPT-2; here from
# scratch, so lr 1e-3, and 3e-4 for the latent stages, not its 1e-4); the released config then
# trains 15 more epochs with all 6 thoughts, 50 in all, which coconut.py has no knob for.
# COCONUT_ARGS is appended ("--key=value ..."; a quick check of the command:
# COCONUT_ARGS="--device=cpu --cot_steps=2 --stage_steps=1").
set -uo pipefail
out=${1:-${OUT:-/tmp}}
shift || true
parts=${*:-build tests sampler logprob sft attention}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
for part in $parts; do
  case $part in
    build) python3 setup.py -q build_ext --inplace 2>&1 | tail -n 5
           python3 -c "import kernels; print('CUDA kernels built:', kernels.HAVE_CUDA_KERNELS)" ;;
    logprob) python3 bench/logprob.py --device=cuda --dtype=bfloat16 2>&1 | tee "$out/gpu_bench_logprob.txt" | tail -n 12 ;;
    tests) python3 -m pytest -q -p no:cacheprovider ${TESTS:-} 2>&1 | tee "$out/gpu_tests.txt" | tail -n 15 ;;
    coconut) python3 algos/coconut.py --device=cuda --batch_size=128 --cot_steps=1560 --stage_steps=780 --latent_lr=3e-4 \
               --out_dir="$out/coconut_gpu" ${COCONUT_ARGS:-} 2>&1 | tr '\r' '\n' | grep -E "^coconut|^\||RESULT|Error|error" | grep -vE "it/s|s/it"
             rm -rf "$out/coconut_gpu/ckpt" ;;
    attention) python3 bench/attention.py --device=cuda --dtype=bfloat16 --batch=4 --n_head=16 2>&1 | tee "$out/gpu_bench_attention.txt" ;;
    sampler) python3 bench/sampler.py --device=cuda --dtype=bfloat16 2>&1 | tee "$out/gpu_bench_sampler.txt" | tail -n 6 ;;
    sft) python3 algos/sft.py --device=cuda --digits=4 --n_layer=12 --n_head=12 --n_embd=768 \
           --batch_size=1024 --lr=3e-4 --min_lr=3e-5 --max_steps=1500 --eval_every=500 \
           --out_dir="$out/sft_gpu" 2>&1 | tr '\r' '\n' | grep -E "^sft:|step .*accuracy|RESULT|Error|error" ;
         python3 -c "
import json, statistics as st
rows = [json.loads(l) for l in open('$out/sft_gpu/metrics.jsonl') if 'mfu' in l]
rows = rows[len(rows) // 10:]  # skip warm-up steps
print('sft gpu: median step %.1f ms, median MFU %.3f over %d steps' % (
    st.median(r['step_ms'] for r in rows), st.median(r['mfu'] for r in rows), len(rows)))" ;
         rm -rf "$out/sft_gpu/ckpt" ;;
  esac
done
