"""
Token log-prob speed and memory, side by side in one run: the naive log_softmax + gather vs the
chunked token_logprobs (and on CUDA the kernel), and the fused hidden_logprobs vs its own naive
twin (hidden @ W.T, then log_softmax + gather).

    python bench/logprob.py                                    # CPU, fp32, ~2 min on 2 cores
    python bench/logprob.py --device=cuda --dtype=bfloat16     # GPU sizes, + kernel bandwidth
    python bench/logprob.py --sizes=512x8192 --D=256           # a quick look

For each N x V it prints the median forward+backward time (after a warm-up) and the peak extra
memory of each variant, and both as ratios to the naive twin of its group. Extra memory is what
a variant needs beyond its inputs, gradients included. Each variant runs in a fresh process
(this script again with --one=VARIANT) so the peaks do not mix: on CUDA it is
max_memory_allocated minus the inputs, on CPU the growth of the peak RSS (ru_maxrss) over
the process's RSS once its inputs exist. On CUDA the kernel row also prints its achieved
bandwidth, counting the bytes it must move: read the logits in the forward, read them and write
the gradient in the backward (3 N V elements), as a fraction of --peak_gbps.

The chunked and fused variants use kernels.py's default chunks (CHUNK_ELEMENTS // V and HIDDEN_CHUNK_ELEMENTS // V rows) unless
--chunk_size is given. chunked_inplace writes the gradient into the logits buffer
(inplace_backward=True), so its extra memory is one chunk's temporaries.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import kernels
from kernels import hidden_logprobs, naive_token_logprobs, token_logprobs

TOKEN_VARIANTS = ("naive", "chunked", "chunked_inplace", "kernel")
HIDDEN_VARIANTS = ("hidden_naive", "hidden_fused")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {  # device -> (dtype, sizes, repeats)
    "cpu": ("float32", "2048x50304,8192x50304", 3),
    "cuda": ("bfloat16", "4096x32768,16384x50304", 10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--sizes", default=None, help="comma-separated NxV; default depends on --device")
    p.add_argument("--D", type=int, default=768, help="hidden width for the hidden_* variants")
    p.add_argument("--chunk_size", type=int, default=None,
                   help="rows per chunk for chunked / fused (default: kernels.CHUNK_ELEMENTS // V)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after one warm-up (median)")
    p.add_argument("--entropy", action="store_true",
                   help="also return the entropy and backprop through it")
    p.add_argument("--peak_gbps", type=float, default=4800.0,
                   help="memory bandwidth of the GPU in GB/s (H200: 4800, H100 SXM: 3350)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one variant, print JSON
    args = p.parse_args(argv)
    dtype, sizes, repeats = DEFAULTS[args.device]
    args.dtype = args.dtype or dtype
    args.sizes = args.sizes or sizes
    args.repeats = args.repeats or repeats
    try:
        args.size_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in args.size_list)
    except (ValueError, AssertionError):
        p.error(f"--sizes must look like 1024x32768,2048x50304, got {args.sizes!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device=cuda but torch sees no GPU")
    return args


# ----------------------------------------------------------------------------------------------
# one variant, in its own process

def build(variant, N, V, args):
    """Inputs for one variant and a step() that runs its forward + backward once."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    targets = torch.randint(0, V, (N,), device=device)
    ent, chunk = args.entropy, args.chunk_size
    if variant in TOKEN_VARIANTS:
        logits = torch.randn(N, V, device=device, dtype=dtype).requires_grad_(True)
        params = [logits]

        def fn():
            if variant == "naive":
                return naive_token_logprobs(logits, targets, return_entropy=ent)
            return token_logprobs(logits, targets, return_entropy=ent, chunk_size=chunk,
                                  inplace_backward=variant == "chunked_inplace")
    else:
        hidden = torch.randn(N, args.D, device=device, dtype=dtype).requires_grad_(True)
        # scaled in place: a temporary here would raise the baseline peak and hide extra memory
        weight = torch.randn(V, args.D, device=device, dtype=dtype).mul_(args.D ** -0.5)
        weight.requires_grad_(True)
        params = [hidden, weight]

        def fn():
            if variant == "hidden_naive":
                return naive_token_logprobs(hidden @ weight.t(), targets, return_entropy=ent)
            return hidden_logprobs(hidden, weight, targets, return_entropy=ent, chunk_size=chunk)

    def step():
        for p in params:
            p.grad = None
        out = fn()
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

    return step


def run_one(args):
    N, V = args.size_list[0]
    device = torch.device(args.device)
    if args.one.startswith("chunked"):
        kernels._C = None  # the torch path, even on a GPU with the extension built
    if args.one == "kernel" and not (kernels.HAVE_CUDA_KERNELS and device.type == "cuda"):
        raise SystemExit("kernel variant needs --device=cuda and the kernels_cuda extension")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = build(args.one, N, V, args)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step()  # warm-up
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**10
    print(json.dumps({"ms": 1e3 * statistics.median(times), "extra_mib": extra}))


# ----------------------------------------------------------------------------------------------
# the table

def spawn(variant, N, V, args):
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={variant}", f"--sizes={N}x{V}",
           f"--device={args.device}", f"--dtype={args.dtype}", f"--D={args.D}",
           f"--repeats={args.repeats}"] + ([f"--chunk_size={args.chunk_size}"] if args.chunk_size else [])
    if args.entropy:
        cmd.append("--entropy")
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": why[:80]}
    return json.loads(lines[-1])


def main():
    args = parse_args()
    if args.one:
        return run_one(args)
    use_kernel = args.device == "cuda" and kernels.HAVE_CUDA_KERNELS
    token_variants = ("naive", "chunked", "chunked_inplace") + (("kernel",) if use_kernel else ())
    elt = torch.finfo(DTYPES[args.dtype]).bits // 8
    print(f"bench/logprob.py: device={args.device} dtype={args.dtype} D={args.D} "
          f"chunk_size={args.chunk_size or 'kernels.py defaults'} entropy={args.entropy} repeats={args.repeats} "
          f"(median after 1 warm-up) torch={torch.__version__} threads={torch.get_num_threads()} "
          f"kernels_cuda={'yes' if kernels.HAVE_CUDA_KERNELS else 'no'}")
    if args.device == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(0)}"
              + ("; hidden_fused runs the kernel on each chunk" if use_kernel else ""))
    head = (f"{'N x V':>12}  {'variant':<13}{'fwd+bwd ms':>11}{'extra MiB':>11}"
            f"{'time/naive':>12}{'mem/naive':>11}")
    if args.device == "cuda":
        head += f"{'GB/s':>9}{'of peak':>9}"
    print(head)
    for N, V in args.size_list:
        for group in (token_variants, HIDDEN_VARIANTS):
            ref = None
            for v in group:
                r = spawn(v, N, V, args)
                line = f"{f'{N}x{V}':>12}  {v:<13}"
                if "error" in r:
                    print(line + f"failed: {r['error']}", flush=True)
                    continue
                ref = ref or r  # the first of each group is its naive twin
                line += f"{r['ms']:>11.1f}{r['extra_mib']:>11.0f}{r['ms'] / ref['ms']:>12.2f}"
                line += f"{r['extra_mib'] / max(ref['extra_mib'], 1e-9):>11.2f}"
                if args.device == "cuda" and group is token_variants:
                    gbps = 3 * N * V * elt / (r["ms"] * 1e-3) / 1e9
                    line += f"{gbps:>9.0f}{gbps / args.peak_gbps:>9.0%}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
