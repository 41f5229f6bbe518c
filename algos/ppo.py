"""
PPO for LLMs as InstructGPT runs it (and TRL's PPO trainer, OpenRLHF): a critic estimates the
value of every prefix, advantages come from GAE, and the KL to the initial policy is a per-token
reward. Same tasks, sampler, fused log-prob forward and base model as algos/grpo.py.

    python algos/ppo.py                                   # 3-digit addition from the GRPO base
    python algos/ppo.py --critic=separate                 # a critic model of its own
    python algos/ppo.py --target_kl=0.02                  # adaptive KL coefficient

One step: sample completions (sampler.rollout), then with the sampling policy frozen:
    r_t = -beta * (log pi_old - log pi_ref)_t  (+ the task reward on the last token)
    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),  A_t = sum_l (gamma lambda)^l delta_{t+l}   (GAE)
    R_t = A_t + V(s_t)  (the value target),  A whitened over valid tokens
and ppo_epochs passes of minibatch updates on
    policy: -min(rho A, clip(rho, 1 - eps, 1 + eps) A)            (rl.clipped_policy_loss)
    value:  0.5 max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2) * vf_coef
V(s_t) is a linear head on the final hidden state that token t is predicted from. Ends with
`RESULT {json}` (base_accuracy, final_accuracy, minutes, ...).
"""
import copy
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
from rl import (all_reduce_, clipped_policy_loss, evaluate_policy, record_eval, reduce_numbers, reference_policy,
                run_result, start_run, token_weights)
from sampler import completion_logprobs, rollout


@dataclass
class Config:
    # task and base model: the same fields and defaults as grpo.py, so both start from one base
    task: str = "arithmetic"
    digits: int = 3
    op: str = "+"
    n_numbers: int = 4
    max_number: int = 50
    n_train: int = 50000
    n_test: int = 500
    init: str = ""               # SFT checkpoint; "" = the base grpo.py makes (made here if missing)
    base_accuracy: float = 0.3
    base_dir: str = ""
    # sampling: 32 prompts x 8 samples, the rollout of grpo.py (the prompt is shared by its samples)
    prompts_per_step: int = 32
    samples_per_prompt: int = 8
    max_new_tokens: int = 0      # 0 = longest answer in the data + 8
    temperature: float = 1.0
    # PPO (defaults: TRL / OpenRLHF for LLMs)
    lr: float = 1e-4
    critic_lr: float = 1e-3      # the value head (and the separate critic)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 5     # non-finite steps in a row before the run stops (plumbing.StepGuard)
    ppo_epochs: int = 4
    minibatches: int = 2         # optimizer steps per epoch, each over whole prompt groups
    eps: float = 0.2             # policy ratio clip
    eps_v: float = 0.2           # value clip around the old values
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True          # advantages -> zero mean, unit std over valid tokens
    beta: float = 0.05           # KL penalty coefficient (TRL's kl_coef)
    target_kl: float = 0.0       # > 0: adapt beta towards this KL per sequence (Ziegler et al. 2019)
    kl_horizon: int = 10000
    critic: str = "shared"       # shared: a head on the policy's trunk | separate: its own copy
    critic_warmup_steps: int = 0  # steps that train only the critic
    # run
    max_steps: int = 1000
    eval_every: int = 25
    out_dir: str = ""
    resume: str = ""
    seed: int = 1337
    device: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic must be 'shared' or 'separate', got {self.critic!r}")
        for name in ("prompts_per_step", "samples_per_prompt", "ppo_epochs", "minibatches", "max_steps",
                     "eval_every", "n_train", "n_test", "kl_horizon", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.critic_lr <= 0:
            raise ValueError(f"lr and critic_lr must be > 0, got {self.lr}, {self.critic_lr}")
        if self.beta < 0 or self.target_kl < 0 or self.vf_coef < 0 or self.critic_warmup_steps < 0:
            raise ValueError("beta, target_kl, vf_coef and critic_warmup_steps must be >= 0")
        if not 0 < self.eps < 1 or self.eps_v <= 0:
            raise ValueError(f"eps must be in (0, 1) and eps_v > 0, got {self.eps}, {self.eps_v}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    # what rl.clipped_policy_loss reads: symmetric clip, no KL in the loss (it is in the reward)
    eps_low = property(lambda self: self.eps)
    eps_high = property(lambda self: self.eps)
    dual_clip = 0.0
    entropy_coef = 0.0
    kl_mode = "reward"


# ---- advantages and the value loss: pure functions of tensors ---------------------------------

def gae(rewards, values, mask, gamma, lam):
    """Generalized Advantage Estimation (Schulman et al. 2016) by a reverse scan, per row over its
    valid tokens (mask is 1 on a prefix of each row). The value after the last valid token is 0
    (the episode ends there). Returns (advantages, returns = advantages + values), 0 on padding."""
    B, N = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, device=rewards.device, dtype=rewards.dtype)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < N else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def masked_whiten(x, mask, eps=1e-8, world_size=1):
    """(x - mean) / (std + eps) with mean and std over the positions where mask is 1 (the
    population std); 0 elsewhere, so padding neither counts nor changes. Under torchrun the sums
    run over every rank's batch, so the whitening is that of the global batch."""
    sums = torch.stack([mask.sum(), (x * mask).sum()])
    all_reduce_(sums, world_size)
    n, mean = sums[0], sums[1] / sums[0]
    var = (((x - mean) * mask) ** 2).sum()
    all_reduce_([var], world_size)
    return (x - mean) / ((var / n).sqrt() + eps) * mask


def value_loss(values, old_values, returns, weights, eps_v):
    """0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2), summed with weights
    (B, N) (0 on padding). The clip keeps the critic from moving far from the values the
    advantages were computed with. Returns (loss, fraction of valid tokens where the clip won)."""
    clipped = old_values + (values - old_values).clamp(-eps_v, eps_v)
    plain, clip = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (weights * torch.maximum(plain, clip)).sum()
    live = weights > 0
    clipped_won = (clip > plain) & ((values - old_values).abs() > eps_v)  # not a rounding tie inside the range
    frac = (clipped_won & live).sum() / live.sum().clamp(min=1)
    return loss, frac.item()


def explained_variance(values, returns, mask, world_size=1):
    """1 - Var(R - V) / Var(R) over valid tokens: 1 is a perfect critic, 0 no better than a constant.
    Under torchrun over every rank's tokens, as masked_whiten."""
    err = returns - values
    sums = torch.stack([mask.sum(), (returns * mask).sum(), (err * mask).sum()])
    all_reduce_(sums, world_size)
    n = sums[0]
    sq = torch.stack([(((returns - sums[1] / n) * mask) ** 2).sum(), (((err - sums[2] / n) * mask) ** 2).sum()])
    all_reduce_(sq, world_size)
    return (1 - sq[1] / sq[0].clamp(min=1e-8 * n)).item()


def adapt_beta(beta, kl, target, n_steps, horizon):
    """The adaptive KL controller of Ziegler et al. 2019: move beta by at most 20% of n_steps /
    horizon towards the value that would give the target KL."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n_steps / horizon)


# ---- the script ------------------------------------------------------------------------------

class ValueHead(torch.nn.Module):
    """V(s) = w . h + b on a final hidden state; zero-initialised so the critic starts at 0."""

    def __init__(self, n_embd):
        super().__init__()
        self.proj = torch.nn.Linear(n_embd, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(h).squeeze(-1)


def main():
    cfg = cli_config(Config)
    d = setup_distributed(cfg.device or None)
    seed_everything(cfg.seed + d.rank)
    tok = CharTokenizer()
    task, train, test, max_new_tokens, _, run_dir, model = start_run(cfg, "ppo", d, tok, cfg.prompts_per_step)
    knobs = task_knobs(cfg)
    ckpt_dir = os.path.join(run_dir, "ckpt")
    n = cfg.samples_per_prompt
    # the critic: a value head on the policy's own trunk, or on a copy of it with its own optimizer
    critic = model if cfg.critic == "shared" else copy.deepcopy(model)
    head = ValueHead(model.config.n_embd).to(d.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=d.device.type)
    critic_params = list(head.parameters()) + ([] if critic is model else list(critic.parameters()))
    critic_opt = torch.optim.AdamW(critic_params, lr=cfg.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)
    problems_rng = random.Random(cfg.seed * 1000)  # the same on every rank: they draw one global batch
    step, beta = 0, cfg.beta
    state = {"best": {"accuracy": -1.0, "step": None}, "base": None,
             "ref": None if cfg.resume else resolve_checkpoint(cfg.init)}
    if cfg.resume:
        saved = load_state(run_dir)
        optimizer.load_state_dict(saved["optimizer"])
        critic_opt.load_state_dict(saved["critic_opt"])
        head.load_state_dict(saved["head"])
        if critic is not model:
            critic.load_state_dict(saved["critic"])
        step, state, beta = saved["step"], saved["state"], saved["beta"]
        rngs = saved["problems_rng"]  # a list (one per rank) in runs saved before ranks shared one
        problems_rng.setstate(rngs[0] if isinstance(rngs, list) else rngs)
        set_rng_state(saved["rng"])
    ref = reference_policy(cfg, state, model, d.device)  # the KL reward needs pi_ref
    metrics = Metrics(run_dir, d.master, resume_step=step if cfg.resume else None)
    guard = StepGuard(cfg.max_bad_steps, metrics, "ppo")
    trained = list(model.parameters()) + critic_params
    if d.master:
        print(f"ppo: {cfg.task} {knobs}, {model.get_num_params() / 1e6:.2f}M params from "
              f"{resolve_checkpoint(cfg.resume and run_dir or cfg.init)}, critic {cfg.critic}, device "
              f"{d.device}, {d.world_size} process(es), {cfg.prompts_per_step} prompts x {n}, run dir {run_dir}")

    def evaluate_and_save(step):
        """Greedy accuracy and pass@n on the held-out prompts, a checkpoint (rank 0 writes)."""
        res = None
        if d.master:
            res = evaluate_policy(model, tok, test, task, max_new_tokens, n, cfg.temperature, cfg.seed + 7)
            record_eval(state, res, step, metrics)
            extra = {"critic_opt": critic_opt.state_dict(), "head": head.state_dict(), "beta": beta,
                     "critic": None if critic is model else critic.state_dict()}
            save_checkpoint(ckpt_dir, f"step_{step:06d}", model, tok, optimizer,
                            {"step": step, "state": state, "rng": rng_state(),
                             "problems_rng": problems_rng.getstate(), **extra})
        return res

    def forward(net, batch, rows, with_values):
        """Log-probs, entropies and (with_values) values of batch rows, whole groups of n."""
        r = rows.tolist()
        with autocast(d.device):
            lp, ent, h = completion_logprobs(net, [batch.prompts[i] for i in r], batch.tokens[rows],
                                             batch.lengths[rows], cfg.temperature, return_entropy=True,
                                             pad_id=tok.pad_id, group_size=n, return_hidden=True)
        values = head(h.float()) if with_values else None
        return lp, ent, values

    t_start = time.time()
    last = evaluate_and_save(step) if step == 0 else None
    if d.master and last:
        print(f"step 0: held-out accuracy {last['accuracy']:.3f}, pass@{n} {last[f'pass@{n}']:.3f}", flush=True)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="ppo", disable=not d.master)
    while step < cfg.max_steps:
        t0 = time.time()
        # 1. sample and score
        # every rank draws the global batch of prompts and samples its contiguous share, each row
        # with the noise it has in the whole batch: N processes sample what one process would
        step_seed = cfg.seed * 1_000_003 + step
        P = cfg.prompts_per_step
        lo, hi = P * d.rank // d.world_size, P * (d.rank + 1) // d.world_size
        batch = rollout(model, tok, problems_rng.choices(train, k=P)[lo:hi], task.reward, n, max_new_tokens,
                        temperature=cfg.temperature, seed=step_seed * 100, split=(lo * n, P * n))
        t_sampled = time.time()
        mask = batch.mask()
        B = mask.size(0)
        every = torch.arange(B, device=d.device)

        # 2. frozen numbers of this batch: old log-probs and values, reference log-probs
        with torch.no_grad():
            old_lp, _, old_values = forward(model, batch, every, critic is model)
            if critic is not model:
                old_values = forward(critic, batch, every, True)[2]
            ref_lp = forward(ref, batch, every, False)[0]
            kl = (old_lp - ref_lp) * mask  # k1 per token, the InstructGPT penalty
            rewards = -beta * kl
            last_tok = (batch.lengths - 1).clamp(min=0)
            rewards[every, last_tok] += batch.rewards
            adv, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
            adv_used = masked_whiten(adv, mask, world_size=d.world_size) if cfg.whiten else adv
            ev = explained_variance(old_values, returns, mask, d.world_size)

        # 3. ppo_epochs x minibatches of whole groups, drawn over the global batch (this rank holds
        # groups lo..hi-1 of it), so they do not depend on how it is split
        order_gen = torch.Generator().manual_seed(step_seed)
        stats, grad_norms, n_tokens = {}, [], 0
        warmup = step < cfg.critic_warmup_steps
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(P, generator=order_gen)
            for groups in order.chunk(cfg.minibatches):
                groups = groups[(groups >= lo) & (groups < hi)] - lo  # possibly none on this rank
                rows = (groups[:, None] * n + torch.arange(n)).flatten().to(d.device)
                counts = torch.stack([torch.tensor(float(len(rows)), device=d.device), mask[rows].sum()])
                all_reduce_(counts, d.world_size)
                loss = counts.new_tensor(0.0)
                if len(rows):
                    w = token_weights(mask[rows], "token-mean", max_new_tokens, counts[0], counts[1])
                    lp, ent, values = forward(model, batch, rows, critic is model)
                    if critic is not model:
                        values = forward(critic, batch, rows, True)[2]
                    pg_loss, s = clipped_policy_loss(lp, old_lp[rows], None, adv_used[rows], w, cfg)
                    v_loss, s["value_clip"] = value_loss(values, old_values[rows], returns[rows], w, cfg.eps_v)
                    loss = cfg.vf_coef * v_loss + (0 if warmup else pg_loss)
                    loss.backward()
                    with torch.no_grad():  # approx KL(old || new) = E[(ratio - 1) - log ratio]
                        log_ratio = (lp - old_lp[rows]) * mask[rows]
                        s["approx_kl"] = ((log_ratio.exp() - 1 - log_ratio) * w).sum().item()
                    # w holds the global normaliser: these four sum over ranks to the global numbers;
                    # the fractions are weighted by this rank's tokens, then summed and divided
                    live = mask[rows].sum().item()
                    s = {k: v * live for k, v in s.items() if k not in ("approx_kl", "ratio_max")} | {
                        "approx_kl": s["approx_kl"], "ratio_max": s["ratio_max"], "policy_loss": pg_loss.item(),
                        "value_loss": v_loss.item(), "entropy": (ent.detach() * w).sum().item()}
                    for k, v in s.items():
                        stats[k] = max(stats.get(k, v), v) if k == "ratio_max" else stats.get(k, 0.0) + v
                if d.world_size > 1:  # the same gradient tensors on every rank, zeros where none came
                    for p in trained:
                        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                all_reduce_([p.grad for p in trained if p.grad is not None], d.world_size)
                grad_norms.append(torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip).item())
                if not guard.skip(step + 1, grad_norms[-1], loss):
                    if not warmup:
                        optimizer.step()
                    critic_opt.step()
                optimizer.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                n_tokens += sum(len(batch.prompts[i]) for i in rows.tolist()[::n]) + int(batch.lengths[rows].sum())
        step += 1
        t_done = time.time()
        # 4. log: sums over the global batch (every rank's rows), so a row does not depend on the split
        live = mask.bool()
        sums, maxes = reduce_numbers(
            {"reward": batch.rewards.sum().item(), "correct": (batch.rewards >= 1).sum().item(), "rows": B,
             "mixed": (batch.rewards.view(-1, n).std(dim=1) > 0).sum().item(), "groups": B // n,
             "tokens": mask.sum().item(), "finished": batch.finished.sum().item(), "train_tokens": n_tokens,
             "kl": kl.sum().item(), **{k: stats.get(k, 0.0) for k in (
                 "policy_loss", "value_loss", "approx_kl", "entropy", "clip_low", "clip_high", "ratio_mean",
                 "value_clip")}},
            {"len_max": batch.lengths.max().item() if B else 0, "ratio_max": stats.get("ratio_max", 0.0)},
            d.world_size)
        seq_kl = sums["kl"] / sums["rows"]
        if cfg.target_kl > 0:
            beta = adapt_beta(beta, seq_kl, cfg.target_kl, sums["rows"], cfg.kl_horizon)
        updates, lt = cfg.ppo_epochs * cfg.minibatches, cfg.ppo_epochs * max(sums["tokens"], 1)
        row = {"step": step, "reward": sums["reward"] / sums["rows"], "accuracy": sums["correct"] / sums["rows"],
               "policy_loss": sums["policy_loss"] / updates, "value_loss": sums["value_loss"] / updates,
               "explained_variance": ev, "approx_kl": sums["approx_kl"] / updates, "kl": seq_kl, "beta": beta,
               "mixed_groups": sums["mixed"] / sums["groups"],
               "clip_frac": (sums["clip_low"] + sums["clip_high"]) / lt, "clip_low": sums["clip_low"] / lt,
               "clip_high": sums["clip_high"] / lt, "value_clip_frac": sums["value_clip"] / lt,
               "ratio_mean": sums["ratio_mean"] / lt, "ratio_max": maxes["ratio_max"],
               "entropy": sums["entropy"] / updates, "returns_mean": returns[live].mean().item(),
               "returns_std": returns[live].std().item(), "adv_mean": adv[live].mean().item(),
               "adv_std": adv[live].std().item(), "values_mean": old_values[live].mean().item(),
               "len_mean": sums["tokens"] / sums["rows"], "len_max": int(maxes["len_max"]),
               "unfinished": 1 - sums["finished"] / sums["rows"],
               "grad_norm": sum(grad_norms) / len(grad_norms), "gen_tokens": int(sums["tokens"]),
               "sample_tok_s": int(sums["tokens"] / (t_sampled - t0)),
               "train_tok_s": int(sums["train_tokens"] / (t_done - t_sampled)),
               "step_s": t_done - t0, "elapsed": time.time() - t_start}
        metrics.log(**row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", ev=f"{ev:.2f}",
                        acc=None if last is None else f"{last['accuracy']:.3f}", refresh=False)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            last = evaluate_and_save(step)
            if d.master:
                bar.write(f"step {step}: held-out accuracy {last['accuracy']:.3f}, pass@{n} "
                          f"{last[f'pass@{n}']:.3f}, train reward {row['reward']:.3f}, explained variance "
                          f"{ev:.2f}, kl {seq_kl:.4f}, entropy {row['entropy']:.3f}")
    bar.close()
    if d.master:
        print_result(run_dir, run_result(state, last, n, step, (time.time() - t_start) / 60, run_dir))
    teardown_distributed()


if __name__ == "__main__":
    main()
