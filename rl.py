"""
What the RL scripts (algos/grpo.py, algos/ppo.py) share, below them: the weak SFT base they start
from, the start of a run (data, base, run directory, policy), the held-out evaluation and the
RESULT, the KL reference, KL estimators, the token weights that keep a loss aggregation exact under gradient
accumulation and data parallelism, the clipped surrogate, and summing across ranks. The rollout
itself (sample + score) and the training forward are in sampler.py.
"""
import copy
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from data import TASKS, task_knobs
from plumbing import load_model, make_run_dir, peak_rss_mb, resolve_checkpoint
from sampler import evaluate, evaluate_pass_at_k


def base_dir_for(cfg):
    knobs = "-".join(f"{k}={v}" for k, v in task_knobs(cfg).items())
    return cfg.base_dir or os.path.join("runs", f"base-{cfg.task}-{knobs}-acc{cfg.base_accuracy}")


def make_base(cfg):
    """Train a weak SFT base (held-out accuracy around cfg.base_accuracy) once, then reuse it:
    sft.py with its defaults, stopped at the first evaluation (every 100 steps) that reaches
    base_accuracy. Accuracy jumps fast, so the base lands somewhat above the target."""
    base_dir = base_dir_for(cfg)
    if os.path.exists(os.path.join(base_dir, "result.json")):
        return base_dir
    args = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "algos", "sft.py"),
            f"--task={cfg.task}", f"--stop_accuracy={cfg.base_accuracy}", "--eval_every=100",
            f"--out_dir={base_dir}", f"--seed={cfg.seed}", f"--n_test={cfg.n_test}"]
    args += [f"--{k}={v}" for k, v in task_knobs(cfg).items()]
    print("no --init given; making a base model first:\n  " + " ".join(args[1:]), flush=True)
    if subprocess.run(args).returncode != 0:
        raise SystemExit("the base SFT run failed (see above)")
    return base_dir


def start_run(cfg, method, d, tok, per_step):
    """The start every RL script shares. Draws the task's train and held-out problems, sizes
    max_new_tokens (the longest answer + 8 unless cfg says), makes the weak base when no --init
    is given, opens the run directory and loads the policy (from cfg.init, or the run's latest
    checkpoint with --resume), checked against the tokenizer and the lengths it must hold.
    per_step is the script's global batch (prompts, or pairs for DPO), split across ranks.
    Returns (task, train, test, max_new_tokens, per_step per rank, run_dir, model)."""
    task, knobs = TASKS[cfg.task], task_knobs(cfg)
    try:
        train = task.dataset(cfg.n_train, "train", seed=cfg.seed, **knobs)
        test = task.dataset(cfg.n_test, "test", seed=cfg.seed + 1, **knobs)
    except ValueError as e:  # e.g. more distinct problems asked for than the knobs allow
        raise SystemExit(f"{method}: {e}")
    max_new_tokens = cfg.max_new_tokens or max(len(tok.encode(ex["answer"])) for ex in train + test) + 8
    longest_prompt = 1 + max(len(tok.encode(ex["prompt"])) for ex in train + test)
    if per_step % d.world_size:
        raise SystemExit(f"{method}: a global batch of {per_step} is not divisible by {d.world_size} processes")
    if not cfg.init and not cfg.resume:
        if d.world_size > 1:
            raise SystemExit(f"{method}: under torchrun give --init (make the base with one process first)")
        cfg.init = make_base(cfg)
    run_dir = make_run_dir(cfg.resume or cfg.out_dir, method, cfg, d.master)
    try:
        model = load_model(run_dir if cfg.resume else cfg.init, d.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{method}: {e}")
    if model.config.vocab_size != tok.vocab_size:
        raise SystemExit(f"{method}: checkpoint vocab_size {model.config.vocab_size} != tokenizer's {tok.vocab_size}")
    if longest_prompt + max_new_tokens > model.config.block_size:
        raise SystemExit(f"{method}: prompts of {longest_prompt} tokens + max_new_tokens {max_new_tokens} "
                         f"do not fit the model's block_size {model.config.block_size}")
    return task, train, test, max_new_tokens, per_step // d.world_size, run_dir, model


def reference_policy(cfg, state, model, device):
    """The frozen initial policy pi_ref of the KL term. A fresh run copies the model it starts
    from; a resumed run reloads that checkpoint (its path is in the run's state, state["ref"]):
    the model it resumes is the trained policy, no longer the initial one."""
    if not cfg.resume:
        return copy.deepcopy(model).eval().requires_grad_(False)
    if not state.get("ref"):
        raise SystemExit("this run's checkpoint does not say which checkpoint it started from (an older "
                         "run?): its KL reference cannot be rebuilt; start a new run from --init")
    try:
        return load_model(state["ref"], device).eval().requires_grad_(False)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"the KL reference (the checkpoint this run started from) cannot be loaded: {e}")


def evaluate_policy(model, tok, problems, task, max_new_tokens, k, temperature, seed):
    """Held-out numbers of an RL run: greedy accuracy, pass@k from k samples at the sampling
    temperature (the same seed every time, so evaluations differ only by the model), and the
    mean answer length in tokens."""
    greedy = evaluate(model, tok, problems, task.reward, max_new_tokens)
    pk = evaluate_pass_at_k(model, tok, problems, task.reward, k, max_new_tokens,
                            temperature=temperature, seed=seed)
    return {"accuracy": greedy["accuracy"], f"pass@{k}": pk, "mean_tokens": greedy["mean_tokens"]}


def record_eval(state, res, step, metrics, **extra):
    """Book-keeping of a held-out evaluation `res` at `step`: the first one is the base, the best
    (by accuracy) is kept with its step, and res is logged as eval_* columns (plus extra)."""
    if state["base"] is None:
        state["base"] = res
    if res["accuracy"] > state["best"]["accuracy"]:
        state["best"] = {"accuracy": res["accuracy"], "step": step}
    metrics.log(step=step, **extra, **{f"eval_{k}": v for k, v in res.items()})


def run_result(state, last, k, steps, minutes, run_dir):
    """The RESULT of an RL run: held-out accuracy and pass@k of the base (the step-0 evaluation)
    and of the last evaluation, the best evaluation, steps, minutes, peak memory, checkpoint."""
    base, last = state["base"] or {}, last or {}
    return {"base_accuracy": base.get("accuracy"), "final_accuracy": last.get("accuracy"),
            f"base_pass@{k}": base.get(f"pass@{k}"), f"final_pass@{k}": last.get(f"pass@{k}"),
            "best_accuracy": state["best"]["accuracy"], "best_step": state["best"]["step"],
            "steps": steps, "minutes": round(minutes, 2), "peak_rss_mb": peak_rss_mb(),
            "checkpoint": resolve_checkpoint(run_dir)}


def all_reduce_(tensors, world_size):
    """Sum tensors across ranks in place (no-op for one process)."""
    if world_size > 1:
        for t in tensors:
            dist.all_reduce(t)


def reduce_numbers(sums, maxes, world_size):
    """Two dicts of floats, summed and maxed over ranks (unchanged for one process): a log row
    under torchrun then describes the global batch, not rank 0's share of it."""
    if world_size > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        s = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        m = torch.tensor(list(maxes.values()), dtype=torch.float64, device=device)
        dist.all_reduce(s)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        sums, maxes = dict(zip(sums, s.tolist())), dict(zip(maxes, m.tolist()))
    return sums, maxes


def kl_estimate(logprobs, ref_logprobs, kind):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, d = log pi_ref - log pi
    (Schulman, "Approximating KL divergence"): k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 >= 0."""
    d = ref_logprobs - logprobs
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown kl estimator {kind!r}")


def token_weights(mask, loss_agg, max_new_tokens, n_seqs=None, n_tokens=None):
    """(B, N) weights w such that loss = sum(w * per_token_loss) is the chosen aggregation. The
    weights are computed once over everything one optimizer step sees (pass n_seqs / n_tokens for
    all ranks), then sliced into micro-batches: summing the micro-batch losses then gives exactly
    the full-batch loss. Normalising inside each micro-batch instead weighs tokens of small
    micro-batches more (the gradient-accumulation bug DAPO's token-mean is prone to).
    token-mean:              sum over all tokens / number of tokens (DAPO)
    seq-mean-token-mean:     mean over sequences of each sequence's token mean (GRPO's paper)
    seq-mean-token-sum-norm: sum over all tokens / (sequences * max_new_tokens) (Dr. GRPO)"""
    n_seqs = mask.size(0) if n_seqs is None else n_seqs
    n_tokens = mask.sum() if n_tokens is None else n_tokens
    if loss_agg == "token-mean":
        return mask / n_tokens
    if loss_agg == "seq-mean-token-mean":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / n_seqs
    if loss_agg == "seq-mean-token-sum-norm":
        return mask / (n_seqs * max_new_tokens)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def clipped_policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, weights, cfg, entropy=None):
    """The clipped surrogate of PPO (Schulman et al. 2017) as GRPO writes it (2402.03300 eq. 3),
    with the options of cfg (fields eps_low, eps_high, dual_clip, beta, kl_mode, kl_estimator,
    entropy_coef).

    logprobs (B, N) of the sampled tokens under the current policy (with grad); old_logprobs the
    same under the policy that sampled them (no grad); ref_logprobs under the frozen reference
    (None when beta = 0 or kl_mode = reward); advantages (B,) per sequence (GRPO) or (B, N) per
    token (PPO's GAE); weights (B, N) from token_weights,
    0 on padding. Per token, with rho = pi / pi_old:
        l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
            dual-clip (A < 0): l = min(l, -c A)
            + beta * KL_t (kl_mode = loss)  - entropy_coef * H_t
    Returns (sum(weights * l), stats dict of floats)."""
    A = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)
    if cfg.dual_clip:
        per_token = torch.where(A < 0, torch.minimum(per_token, -cfg.dual_clip * A), per_token)
    kl = None
    if cfg.beta > 0 and cfg.kl_mode == "loss":
        kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)
        per_token = per_token + cfg.beta * kl
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * entropy
    loss = (weights * per_token).sum()

    with torch.no_grad():
        live = weights > 0
        n = live.sum().clamp(min=1)
        r = ratio[live]
        # a clipped token gets no gradient: below the range with A < 0, above it with A > 0
        low = ((ratio < 1 - cfg.eps_low) & (A < 0) & live).sum() / n
        high = ((ratio > 1 + cfg.eps_high) & (A > 0) & live).sum() / n
        stats = {"clip_low": low.item(), "clip_high": high.item(),
                 "ratio_mean": r.mean().item() if r.numel() else 1.0,
                 "ratio_max": r.max().item() if r.numel() else 1.0}
        if kl is not None:
            stats["kl"] = kl[live].mean().item() if r.numel() else 0.0
    return loss, stats
