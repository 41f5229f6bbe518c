"""
The cost of the attention variants against standard attention, side by side in one run: the
milliseconds of one forward (and one forward + backward) of a single attention layer at
sequence lengths T, and the ratio to standard attention at the same T.

    python bench/attention.py                                  # CPU, float32
    python bench/attention.py --device=cuda --dtype=bfloat16    # a GPU: T = 1024 and 2048

Variants: standard (F.scaled_dot_product_attention, causal), CoPE (model.CoPEAttention,
npos_max 64), MTA with the paper's LM kernel (6 x 11 key-query convolution before the softmax,
head mixing in pairs after it, per-head RMSNorm and gate) and MTA without its convolution
(head mixing + norm only: the cost of leaving the fused SDPA kernel). One layer, batch --batch,
--n_head heads of 64 dimensions, the median of --reps timed calls after 3 warm-up calls.
"""
import argparse
import os
import statistics
import sys
import time

import torch

# bench/sampler.py would shadow the top-level sampler.py: take bench/ off the path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))
from model import CausalSelfAttention, CoPEAttention, GPTConfig, MTAAttention  # noqa: E402


def timed(fn, reps, device):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n_head", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lengths = [int(t) for t in args.lengths.split(",")]
    C = 64 * args.n_head
    base = dict(vocab_size=8, block_size=max(lengths), n_layer=1, n_head=args.n_head, n_embd=C, pos="rope")
    variants = {
        "standard": lambda: CausalSelfAttention(GPTConfig(**base)),
        "cope": lambda: CoPEAttention(GPTConfig(**{**base, "pos": "cope"})),
        "mta 6x11": lambda: MTAAttention(GPTConfig(**base, attn="mta", mta_every=1)),
        "mta no conv": lambda: MTAAttention(GPTConfig(**base, attn="mta", mta_every=10**6)),
    }
    print(f"one attention layer, {args.n_head} heads x 64, batch {args.batch}, {args.dtype} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), median of {args.reps}")
    print(f"{'T':>6} {'variant':>12} {'fwd ms':>9} {'x std':>6} {'fwd+bwd ms':>11} {'x std':>6}")
    for T in lengths:
        x = torch.randn(args.batch, T, C, device=device, dtype=dtype)
        pos = torch.arange(T, device=device).expand(args.batch, T)
        ref = {}
        for name, make in variants.items():
            layer = make().to(device=device, dtype=dtype)
            with torch.no_grad():
                fwd = timed(lambda: layer(x, pos, None), args.reps, device)
            xg = x.clone().requires_grad_(True)
            both = timed(lambda: layer(xg, pos, None).sum().backward(), args.reps, device)
            ref.setdefault("fwd", fwd)
            ref.setdefault("both", both)
            print(f"{T:>6} {name:>12} {fwd:>9.2f} {fwd / ref['fwd']:>6.2f} {both:>11.2f} {both / ref['both']:>6.2f}",
                  flush=True)
            del layer


if __name__ == "__main__":
    main()
