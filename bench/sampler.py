"""
Sampler speed: generate() with the KV cache vs its no-cache twin, side by side in one run.

    python bench/sampler.py                      # CPU, float32, the full table (~10 min on 2 cores)
    python bench/sampler.py --device=cuda --dtype=bfloat16
    python bench/sampler.py --new_tokens=64 --models=small   # a quick look

For each model shape and batch size it prints tokens/s of generate(use_cache=True) and
generate(use_cache=False) for --new_tokens tokens after a --prompt_len prompt (no stop tokens,
so every row generates all of them), their ratio, and the time per decode step of the first
and the last 32 new tokens (cached: prefill then decode_one_token; uncached: full_forward),
which shows whether a step's cost grows with position.
"""
import argparse
import os
import sys
import time

import torch

# This file is named like the module it measures: drop bench/ from the path so that
# `import sampler` finds the top-level sampler.py, not this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

from model import GPT, GPTConfig
from sampler import KVCache, decode_one_token, full_forward, generate, prefill, sample_next

SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
    "small": dict(n_layer=4, n_head=4, n_embd=256, vocab_size=512, block_size=1024),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, prompts, n, use_cache, device):
    generate(model, prompts, 8, seed=0, use_cache=use_cache)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    generate(model, prompts, n, seed=0, use_cache=use_cache)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def step_times(model, prompts, n, use_cache, device, window=32):
    """Seconds per decode step, averaged over the first and the last `window` new tokens."""
    B, T = len(prompts), len(prompts[0])
    seq = torch.tensor(prompts, device=device)
    seq = torch.cat([seq, torch.zeros(B, n, dtype=torch.long, device=device)], 1)
    lens = torch.full((B,), T, device=device)
    cache = KVCache.for_model(model, B, T + n) if use_cache else None
    logits = prefill(model, cache, seq[:, :T], lens) if use_cache else None
    rows = torch.arange(B, device=device)
    first, last = [], []
    for t in range(n - 1):
        if not use_cache and window <= t < n - 1 - window:
            continue  # the uncached middle is skipped: each step is independent of the others
        tok = torch.randint(0, model.config.vocab_size, (B,), device=device)
        pos = lens + t
        seq[rows, pos] = tok
        sync(device)
        t0 = time.perf_counter()
        if use_cache:
            logits = decode_one_token(model, cache, tok, pos)
        else:
            logits = full_forward(model, seq[:, :T + t + 1], pos)
        sample_next(logits)
        sync(device)
        dt = time.perf_counter() - t0
        if t < window:
            first.append(dt)
        elif t >= n - 1 - window:
            last.append(dt)
    return sum(first) / len(first), sum(last) / len(last)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--models", default="small,gpt2")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=256)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, dtype {args.dtype}, torch {torch.__version__}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, temperature 1.0")
    header = (f"{'model':<6} {'batch':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'ratio':>6} "
              f"{'cached ms/step first32 last32':>30} {'uncached ms/step first32 last32':>32}")
    print(header)
    rows = []
    for mname in args.models.split(","):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SHAPES[mname])).to(device=device, dtype=dtype).eval()
        for B in [int(b) for b in args.batches.split(",")]:
            g = torch.Generator().manual_seed(1)
            prompts = torch.randint(0, model.config.vocab_size, (B, args.prompt_len), generator=g).tolist()
            n = args.new_tokens
            tc = timed_generate(model, prompts, n, True, device)
            tu = timed_generate(model, prompts, n, False, device)
            c1, c2 = step_times(model, prompts, n, True, device)
            u1, u2 = step_times(model, prompts, n, False, device)
            line = (f"{mname:<6} {B:>5} {B * n / tc:>13.1f} {B * n / tu:>15.1f} {tu / tc:>5.1f}x "
                    f"{1e3 * c1:>19.2f} {1e3 * c2:>10.2f} {1e3 * u1:>21.2f} {1e3 * u2:>10.2f}")
            print(line, flush=True)
            rows.append(line)
    print("\nsummary")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
