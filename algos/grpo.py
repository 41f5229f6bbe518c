"""
GRPO: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300), with the Dr. GRPO
(arXiv 2503.20783), DAPO (arXiv 2503.14476) and RLOO options as config fields.

    python algos/grpo.py                                  # 3-digit addition from a weak SFT base
    python algos/grpo.py --init=runs/sft-.../ckpt/step_001500
    python algos/grpo.py --advantage=drgrpo --loss_agg=seq-mean-token-sum-norm          # Dr. GRPO
    python algos/grpo.py --loss_agg=token-mean --eps_high=0.28 --dynamic_sampling=True  # DAPO
    torchrun --nproc_per_node=2 algos/grpo.py --init=...

One step: draw prompts, sample G completions of each with sampler.py (KV cache), score them
with the task's verifiable reward, turn the G rewards of a group into advantages, and take
clipped-surrogate gradient steps on the log-probs of the sampled tokens. No value network: the
group is the baseline. Without --init the script first trains a weak base with algos/sft.py
(stopped at `base_accuracy` held-out accuracy) and reuses it on later runs.

The loss (rl.clipped_policy_loss and the weights of rl.token_weights) is a pure function of
tensors, tested against hand-computed values.
Ends with `RESULT {json}` (base_accuracy, final_accuracy, minutes, ...).
"""
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import TASKS, task_knobs
from data.tokenizers import CharTokenizer
from plumbing import (Metrics, StepGuard, autocast, cli_config, load_state, print_result, resolve_checkpoint,
                      rng_state, save_checkpoint, seed_everything, set_rng_state, setup_distributed,
                      teardown_distributed)
from rl import (all_reduce_, clipped_policy_loss, evaluate_policy, kl_estimate, record_eval, reduce_numbers,
                reference_policy, run_result, start_run, token_weights)
from sampler import Rollout, completion_logprobs, rollout


@dataclass
class Config:
    # task (training prompts come from the train split, evaluation from the disjoint test split)
    task: str = "arithmetic"     # arithmetic | countdown
    digits: int = 3              # arithmetic
    op: str = "+"                # arithmetic
    n_numbers: int = 4           # countdown
    max_number: int = 50         # countdown
    n_train: int = 50000
    n_test: int = 500            # >= 500: with 200 the accuracy swings +-5 points between evals
    # base model
    init: str = ""               # SFT checkpoint (or run dir); "" = make one with algos/sft.py
    base_accuracy: float = 0.3   # without init: stop that SFT at the first eval at or above this
    base_dir: str = ""           # where that base lives, reused if present (default runs/base-<task>)
    # sampling
    group_size: int = 8          # G completions per prompt
    prompts_per_step: int = 32   # global, split across ranks; each group stays on one rank
    max_new_tokens: int = 0      # 0 = longest answer in the data + 8
    temperature: float = 1.0     # the policy log-probs in the loss use the same temperature
    # update
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 5     # non-finite steps in a row before the run stops (plumbing.StepGuard)
    mu: int = 1                  # passes over each batch (policy updates per batch, GRPO's mu)
    minibatches: int = 1         # optimizer steps per pass
    grad_accum: int = 1          # micro-batches per optimizer step (same gradient, less memory)
    # objective
    advantage: str = "grpo"      # grpo: (r - mean) / (std + eps) | drgrpo: r - mean | rloo: leave-one-out
    loss_agg: str = "seq-mean-token-mean"  # | token-mean (DAPO) | seq-mean-token-sum-norm (Dr. GRPO)
    eps_low: float = 0.2         # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = -1.0       # < 0: same as eps_low; DAPO's clip-higher uses 0.28
    dual_clip: float = 0.0       # > 1 enables dual-clip for negative advantages (verl uses 3.0)
    beta: float = 0.0            # KL weight to the frozen initial policy (paper 0.04; TRL now 0)
    kl_estimator: str = "k3"     # k1 | k2 | k3 (Schulman); GRPO's paper uses k3
    kl_mode: str = "loss"        # loss: + beta * KL per token | reward: r - beta * sum_t KL_t
    entropy_coef: float = 0.0    # - entropy_coef * entropy per token
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards, sample more prompts
    max_sampling_rounds: int = 4    # dynamic sampling gives up topping up after this many rollouts
    overlong: str = "zero"       # zero: no EOS = reward 0 | soft: DAPO's length penalty as well
    overlong_cache: int = 4      # soft: the last this-many tokens before max_new_tokens are penalised
    # run
    max_steps: int = 1000
    eval_every: int = 25
    out_dir: str = ""
    resume: str = ""
    seed: int = 1337
    device: str = ""
    peak_flops: float = 989e12   # MFU on CUDA: H100 / H200 dense bf16

    def __post_init__(self):
        if self.eps_high < 0:
            self.eps_high = self.eps_low
        choices = dict(task=TASKS, advantage=("grpo", "drgrpo", "rloo"),
                       loss_agg=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
                       kl_estimator=("k1", "k2", "k3"), kl_mode=("loss", "reward"),
                       overlong=("zero", "soft"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {self.group_size}")
        for name in ("prompts_per_step", "mu", "minibatches", "grad_accum", "max_steps", "eval_every",
                     "n_train", "n_test", "max_sampling_rounds", "overlong_cache", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.beta < 0 or self.entropy_coef < 0 or self.weight_decay < 0:
            raise ValueError("beta, entropy_coef and weight_decay must be >= 0")
        if not 0 < self.eps_low < 1:
            raise ValueError(f"eps_low must be in (0, 1), got {self.eps_low}")
        if self.dual_clip != 0 and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be 0 (off) or > 1, got {self.dual_clip}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.base_accuracy <= 1:
            raise ValueError(f"base_accuracy must be in (0, 1], got {self.base_accuracy}")



# ---- the objective: pure functions of tensors ------------------------------------------------

def group_advantages(rewards, kind, eps=1e-6):
    """rewards (n_groups, G) -> advantages (n_groups, G), one number per completion that every
    one of its tokens shares (outcome supervision).
    grpo:   (r - mean) / (std + eps), std with Bessel's correction as TRL computes it (2402.03300 4.1.2)
    drgrpo: r - mean; dividing by std up-weights too-easy and too-hard groups (2503.20783 3.1)
    rloo:   r - mean of the other G - 1 rewards = G / (G - 1) * (r - mean)"""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if kind == "drgrpo":
        return centred
    if kind == "rloo":
        G = rewards.size(1)
        return centred * G / (G - 1)
    raise ValueError(f"unknown advantage {kind!r}")


def overlong_penalty(lengths, max_new_tokens, cache):
    """DAPO's soft overlong punishment (2503.14476 eq. 13): 0 up to max_new_tokens - cache
    tokens, then falling linearly to -1 at max_new_tokens."""
    start = max_new_tokens - cache
    return ((start - lengths.float()) / cache).clamp(min=-1.0, max=0.0)


# ---- sampling a batch ------------------------------------------------------------------------

def sample_batch(model, tok, task, problems_rng, train, n_prompts, cfg, max_new_tokens, seed,
                 rank=0, world_size=1):
    """Rollouts of the global batch, n_prompts prompts x G. Every rank draws the same prompts
    (problems_rng is in the same state on all of them) and samples a contiguous share, each row
    with the noise it has in the whole batch (generate's split): N processes sample exactly what
    one process sampling the whole batch would. With dynamic sampling (DAPO), groups whose
    rewards are all equal (zero advantage, zero gradient) are dropped and more prompts drawn
    until n_prompts informative groups are in hand or max_sampling_rounds rollouts were made; the
    batch may then be smaller. Which groups are kept is decided on the global batch, so ranks
    may end up holding different numbers of groups, or none. Returns (this rank's rollout, the
    position of each of its groups in the global batch (as one process would order it), stats
    of the global batch)."""
    G, kept, positions, n_kept, n_groups, n_flat = cfg.group_size, [], [], 0, 0, 0
    for rnd in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        need = n_prompts - n_kept
        draw = need if rnd == 0 else min(4 * n_prompts, 2 * need)  # over-draw to top up faster
        problems = problems_rng.choices(train, k=draw)
        lo, hi = draw * rank // world_size, draw * (rank + 1) // world_size
        ro = rollout(model, tok, problems[lo:hi], task.reward, G, max_new_tokens, temperature=cfg.temperature,
                     seed=seed * 100 + rnd, split=(lo * G, draw * G))
        flat = torch.zeros(draw, device=ro.rewards.device)
        flat[lo:hi] = (ro.rewards.view(-1, G).std(dim=1) == 0).float()
        all_reduce_([flat], world_size)
        n_groups, n_flat = n_groups + draw, n_flat + int(flat.sum())
        if not cfg.dynamic_sampling:
            stats = {"flat_groups": n_flat / n_groups, "sampled_groups": n_groups, "batch_groups": draw}
            return ro, list(range(lo, hi)), stats
        keep = (flat == 0).nonzero()[:need, 0].tolist()  # this round's first informative groups
        mine = [j for j, i in enumerate(keep) if lo <= i < hi]
        kept.append(ro.take([(keep[j] - lo) * G + g for j in mine for g in range(G)]))
        positions += [n_kept + j for j in mine]
        n_kept += len(keep)
        if n_kept == n_prompts:
            break
    if n_kept == 0:  # nothing informative at all: train on flat groups (zero gradient) rather than none
        n_kept = min(draw, n_prompts)
        positions = list(range(lo, max(lo, min(hi, n_kept))))
        kept = [ro.take(list(range(len(positions) * G)))]
    return Rollout.cat(kept), positions, {"flat_groups": n_flat / n_groups, "sampled_groups": n_groups,
                                          "batch_groups": n_kept}


# ---- the script ------------------------------------------------------------------------------

def minibatch_gradient(model, batch, groups, adv, old_lp, ref_lp, cfg, max_new_tokens, world_size,
                       pad_id, stats=None):
    """Accumulate into .grad the gradient of one optimizer step's loss over the groups `groups`
    (indices of G-row groups of batch; this rank's part of the step's groups, possibly none), in
    cfg.grad_accum micro-batches of whole groups (each prompt then runs once for its G
    completions, see sampler.SharedPrefix). The normaliser (token_weights) counts the rows and
    tokens of every rank, so each rank's loss is its share of the global loss and the ranks'
    gradients are summed, not averaged. old_lp None = on-policy (old = the same forward,
    detached). Adds token-weighted sums of the loss statistics to stats; returns the number of
    tokens run through the model."""
    G, device = cfg.group_size, batch.tokens.device
    mask = batch.mask()
    rows = (groups[:, None] * G + torch.arange(G, device=device)).flatten()
    counts = torch.stack([torch.tensor(float(len(rows)), device=device), mask[rows].sum()])
    all_reduce_(counts, world_size)
    w = torch.zeros_like(mask)
    w[rows] = token_weights(mask[rows], cfg.loss_agg, max_new_tokens, counts[0], counts[1])
    stats = {} if stats is None else stats
    n_tokens = 0
    for part in rows.view(-1, G).chunk(cfg.grad_accum) if len(rows) else ():
        r = part.flatten()
        prompts = [batch.prompts[i] for i in r.tolist()]
        with autocast(device):
            lp, ent = completion_logprobs(model, prompts, batch.tokens[r], batch.lengths[r],
                                          cfg.temperature, return_entropy=True, pad_id=pad_id,
                                          group_size=G)
        old = lp.detach() if old_lp is None else old_lp[r]
        loss, s = clipped_policy_loss(lp, old, None if ref_lp is None else ref_lp[r], adv[r], w[r], cfg,
                                      entropy=ent)
        loss.backward()
        n = mask[r].sum().item()
        s = {k: v * n for k, v in s.items() if k != "ratio_max"} | {"ratio_max": s["ratio_max"]}
        s["entropy"], s["loss_tokens"] = (ent.detach() * mask[r]).sum().item(), n
        for k, v in s.items():
            stats[k] = max(stats.get(k, v), v) if k == "ratio_max" else stats.get(k, 0.0) + v
        n_tokens += sum(len(p) for p in prompts[::G]) + int(batch.lengths[r].sum())
    if world_size > 1 and not len(rows):  # no groups here this step: add zeros to the ranks' sum
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad and p.grad is None else p.grad
    all_reduce_([p.grad for p in model.parameters() if p.grad is not None], world_size)
    return n_tokens


def main():
    cfg = cli_config(Config)
    d = setup_distributed(cfg.device or None)
    seed_everything(cfg.seed + d.rank)
    tok = CharTokenizer()
    task, train, test, max_new_tokens, _, run_dir, model = start_run(cfg, "grpo", d, tok, cfg.prompts_per_step)
    knobs = task_knobs(cfg)
    ckpt_dir = os.path.join(run_dir, "ckpt")
    G = cfg.group_size
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=d.device.type)
    problems_rng = random.Random(cfg.seed * 1000)  # the same on every rank: they draw one global batch
    step, state = 0, {"best": {"accuracy": -1.0, "step": None}, "base": None,
                      "ref": None if cfg.resume else resolve_checkpoint(cfg.init)}
    if cfg.resume:
        saved = load_state(run_dir)
        optimizer.load_state_dict(saved["optimizer"])
        step, state = saved["step"], saved["state"]
        rngs = saved["problems_rng"]  # a list (one per rank) in runs saved before ranks shared one
        problems_rng.setstate(rngs[0] if isinstance(rngs, list) else rngs)
        set_rng_state(saved["rng"])
    # the frozen initial policy; with beta = 0 there is no reference at all
    ref = reference_policy(cfg, state, model, d.device) if cfg.beta > 0 else None
    metrics = Metrics(run_dir, d.master, resume_step=step if cfg.resume else None)
    guard = StepGuard(cfg.max_bad_steps, metrics, "grpo")
    if d.master:
        print(f"grpo: {cfg.task} {knobs}, {model.get_num_params() / 1e6:.2f}M params from "
              f"{resolve_checkpoint(cfg.resume and run_dir or cfg.init)}, device {d.device}, "
              f"{d.world_size} process(es), {cfg.prompts_per_step} prompts x G={G}, run dir {run_dir}")

    def evaluate_and_save(step):
        """Greedy accuracy and pass@G on the held-out prompts, a checkpoint (rank 0 writes)."""
        res = None
        if d.master:
            res = evaluate_policy(model, tok, test, task, max_new_tokens, G, cfg.temperature, cfg.seed + 7)
            record_eval(state, res, step, metrics)
            save_checkpoint(ckpt_dir, f"step_{step:06d}", model, tok, optimizer,
                            {"step": step, "state": state, "rng": rng_state(),
                             "problems_rng": problems_rng.getstate()})
        return res

    t_start = time.time()
    last = evaluate_and_save(step) if step == 0 else None
    if d.master and last:
        print(f"step 0: held-out accuracy {last['accuracy']:.3f}, pass@{G} {last[f'pass@{G}']:.3f}", flush=True)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="grpo", disable=not d.master)
    while step < cfg.max_steps:
        t0 = time.time()
        # 1. sample G completions per prompt with the current policy, and score them
        step_seed = cfg.seed * 1_000_003 + step  # the same on every rank (see sample_batch)
        batch, positions, ds = sample_batch(model, tok, task, problems_rng, train, cfg.prompts_per_step, cfg,
                                 max_new_tokens, step_seed, d.rank, d.world_size)
        t_sampled = time.time()
        mask = batch.mask()
        task_rewards = batch.rewards
        rewards = task_rewards.clone()
        if cfg.overlong == "soft":
            rewards = rewards + overlong_penalty(batch.lengths, max_new_tokens, cfg.overlong_cache)

        # 2. log-probs that stay fixed during the update: old (the sampling policy) and reference.
        # Old log-probs are recomputed by the training forward rather than taken from the sampler:
        # the sampler's numbers come from a different code path (KV cache, bf16, fused kernel),
        # so rho would not be exactly 1 on-policy. With one optimizer step per batch (mu = 1,
        # minibatches = 1) the old policy *is* the current one: old = logprobs.detach() in the
        # same forward, rho = 1, and the objective's gradient is REINFORCE with the advantages.
        # For more steps per batch the old log-probs must be taken before the first of them.
        off_policy = cfg.mu * cfg.minibatches > 1
        old_lp = ref_lp = None
        with torch.no_grad(), autocast(d.device):
            if off_policy and batch.problems:
                old_lp = completion_logprobs(model, batch.prompts, batch.tokens, batch.lengths,
                                             cfg.temperature, pad_id=tok.pad_id, group_size=G)
            if ref is not None and batch.problems:
                ref_lp = completion_logprobs(ref, batch.prompts, batch.tokens, batch.lengths,
                                             cfg.temperature, pad_id=tok.pad_id, group_size=G)
        if ref_lp is not None and cfg.kl_mode == "reward":  # KL as a cost paid by the whole completion
            old_or_cur = old_lp if old_lp is not None else batch.logprobs  # only for the penalty
            rewards = rewards - cfg.beta * (kl_estimate(old_or_cur, ref_lp, cfg.kl_estimator) * mask).sum(1)
        adv = group_advantages(rewards.view(-1, G), cfg.advantage).view(-1)

        # 3. mu passes x minibatches optimizer steps, each over grad_accum micro-batches; the
        # batch is cut between groups, never inside one. Minibatches are drawn over the positions
        # of the groups in the global batch, so they do not depend on how it is split.
        local = torch.full((ds["batch_groups"],), -1, dtype=torch.long)  # global position -> this rank's group
        local[positions] = torch.arange(len(positions))
        order_gen = torch.Generator().manual_seed(step_seed)
        stats, grad_norms, n_train_tokens = {}, [], 0
        for _ in range(cfg.mu):
            order = torch.randperm(len(local), generator=order_gen) if off_policy else torch.arange(len(local))
            for mb in order.chunk(cfg.minibatches):
                mine = local[mb][local[mb] >= 0]
                n_train_tokens += minibatch_gradient(model, batch, mine.to(d.device), adv, old_lp, ref_lp,
                                                     cfg, max_new_tokens, d.world_size, tok.pad_id, stats)
                grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
                if not guard.skip(step + 1, grad_norms[-1]):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        t_done = time.time()

        # 4. log: sums over the global batch (every rank's rows), so a row does not depend on the split
        G_rewards = task_rewards.view(-1, G)
        sums, maxes = reduce_numbers(
            {"reward": rewards.sum().item(), "correct": (task_rewards >= 1).sum().item(), "rows": len(rewards),
             "mixed": (G_rewards.std(dim=1) > 0).sum().item(), "groups": len(G_rewards),
             "tokens": mask.sum().item(), "finished": batch.finished.sum().item(), "train_tokens": n_train_tokens,
             **{k: stats.get(k, 0.0) for k in ("entropy", "loss_tokens", "clip_low", "clip_high", "ratio_mean", "kl")}},
            {"len_max": batch.lengths.max().item() if len(rewards) else 0, "ratio_max": stats.get("ratio_max", 0.0)},
            d.world_size)
        lt = max(sums["loss_tokens"], 1)  # tokens through the loss, over all mu passes
        row = {"step": step, "reward": sums["reward"] / sums["rows"], "accuracy": sums["correct"] / sums["rows"],
               "flat_groups": ds["flat_groups"], "batch_groups": ds["batch_groups"],
               "sampled_groups": ds["sampled_groups"], "mixed_groups": sums["mixed"] / sums["groups"],
               "entropy": sums["entropy"] / lt, "clip_low": sums["clip_low"] / lt,
               "clip_high": sums["clip_high"] / lt, "ratio_mean": sums["ratio_mean"] / lt,
               "ratio_max": maxes["ratio_max"], "len_mean": sums["tokens"] / sums["rows"],
               "len_max": int(maxes["len_max"]), "unfinished": 1 - sums["finished"] / sums["rows"],
               "grad_norm": sum(grad_norms) / len(grad_norms), "gen_tokens": int(sums["tokens"]),
               "sample_tok_s": int(sums["tokens"] / (t_sampled - t0)),
               "train_tok_s": int(sums["train_tokens"] / (t_done - t_sampled)),
               "step_s": t_done - t0, "elapsed": time.time() - t_start}
        if cfg.beta > 0 and cfg.kl_mode == "loss":
            row["kl"] = sums["kl"] / lt
        if d.device.type == "cuda":  # training FLOPs only: 6 N per token (the PaLM formula, no attention)
            row["mfu"] = 6 * model.get_num_params() * n_train_tokens / (t_done - t_sampled) / cfg.peak_flops
        metrics.log(**row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", ent=f"{row['entropy']:.2f}",
                        acc=None if last is None else f"{last['accuracy']:.3f}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last = evaluate_and_save(step)
            if d.master:
                bar.write(f"step {step}: held-out accuracy {last['accuracy']:.3f}, pass@{G} "
                          f"{last[f'pass@{G}']:.3f}, train reward {row['reward']:.3f}, entropy "
                          f"{row['entropy']:.3f}, mixed groups {row['mixed_groups']:.2f}")
    bar.close()
    if d.master:
        print_result(run_dir, run_result(state, last, G, step, (time.time() - t_start) / 60, run_dir))
    teardown_distributed()


if __name__ == "__main__":
    main()
