"""
Supervised fine-tuning: the base models that the RL scripts start from.

    python algos/sft.py                                   # 3-digit addition, ~0.8M-param char GPT
    python algos/sft.py --task=countdown --max_steps=6000
    python algos/sft.py --stop_accuracy=0.3               # stop early: a weak base for RL
    torchrun --nproc_per_node=2 algos/sft.py              # same run, data-parallel

Each example is BOS + prompt + answer + EOS; the loss is next-token cross-entropy on the answer
and EOS only (prompt tokens are masked to -100), since the prompt is given at test time. Every
`eval_every` steps the model answers the held-out prompts greedily with sampler.py, the task's
reward scores them, and a checkpoint is written: accuracy moves in sharp jumps, so the RL base
can be picked from metrics.jsonl by accuracy. Ends with `RESULT {json}`.
"""
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import TASKS, task_knobs
from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig
from plumbing import (Metrics, StepGuard, autocast, cli_config, load_model, load_state, make_run_dir, print_result,
                      resolve_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state,
                      setup_distributed, teardown_distributed, atomic_write_text)
from sampler import evaluate


@dataclass
class Config:
    # task
    task: str = "arithmetic"    # arithmetic | countdown
    digits: int = 3             # arithmetic: operands in [0, 10**digits)
    op: str = "+"               # arithmetic: + or *
    balanced: bool = True       # arithmetic training data: operand lengths uniform (data/arithmetic.py)
    n_numbers: int = 4          # countdown: 3 or 4 numbers
    max_number: int = 50        # countdown
    n_train: int = 200000
    n_test: int = 500
    # model (ignored when init is given)
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 128
    pos: str = "learned"
    dropout: float = 0.0
    init: str = ""              # start from this checkpoint (dir, or run dir: its latest)
    # optimisation
    batch_size: int = 64        # global; split across ranks
    lr: float = 2e-3
    min_lr: float = 1e-4        # cosine decay to this by max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 5      # non-finite steps in a row before the run stops (plumbing.StepGuard)
    max_steps: int = 5000
    # evaluation, stopping, output
    eval_every: int = 1000
    stop_accuracy: float = 2.0  # stop at the first evaluation with held-out accuracy >= this (2 = never)
    out_dir: str = ""           # default runs/sft-<timestamp>
    resume: str = ""            # a run dir to continue from its latest checkpoint
    seed: int = 1337
    device: str = ""            # "" = cuda if available else cpu
    peak_flops: float = 989e12  # for the MFU log line on CUDA: H100 / H200 dense bf16

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        for name in ("batch_size", "max_steps", "eval_every", "n_train", "n_test", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr}, min_lr={self.min_lr}")



def lr_at(step, cfg):
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def make_batch(tokenizer, examples, device):
    """[{"prompt", "answer"}] -> idx (B, T), targets (B, T) right-padded. targets[t] is the token
    at t+1 where that token is part of answer + EOS, else -100 (prompt and padding)."""
    seqs, starts = [], []
    for ex in examples:
        p = [tokenizer.bos_id] + tokenizer.encode(ex["prompt"])
        seqs.append(p + tokenizer.encode(ex["answer"]) + [tokenizer.eos_id])
        starts.append(len(p))
    T = max(len(s) for s in seqs) - 1
    idx = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, start - 1:len(s) - 1] = torch.tensor(s[start:])
    return idx.to(device), targets.to(device)


def main():
    cfg = cli_config(Config)
    d = setup_distributed(cfg.device or None)
    seed_everything(cfg.seed + d.rank)
    task, knobs = TASKS[cfg.task], task_knobs(cfg)
    tok = CharTokenizer()
    train_knobs = dict(knobs, balanced=cfg.balanced) if cfg.task == "arithmetic" else knobs
    try:
        train = task.dataset(cfg.n_train, "train", seed=cfg.seed, **train_knobs)
        test = task.dataset(cfg.n_test, "test", seed=cfg.seed + 1, **knobs)  # the task's own distribution
    except ValueError as e:  # e.g. more distinct problems asked for than the knobs allow
        raise SystemExit(f"sft: {e}")
    longest_prompt = 1 + max(len(tok.encode(ex["prompt"])) for ex in train + test)
    max_new_tokens = max(len(tok.encode(ex["answer"])) for ex in train + test) + 8  # room to be wrong

    run_dir = make_run_dir(cfg.resume or cfg.out_dir, "sft", cfg, d.master)
    ckpt_dir = os.path.join(run_dir, "ckpt")
    if cfg.resume or cfg.init:
        try:
            model = load_model(run_dir if cfg.resume else cfg.init, d.device)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"sft: {e}")
    else:
        block = 16 * math.ceil((longest_prompt + max_new_tokens) / 16)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, pos=cfg.pos,
                              dropout=cfg.dropout)).to(d.device)
    if model.config.vocab_size != tok.vocab_size:
        raise SystemExit(f"checkpoint vocab_size {model.config.vocab_size} != tokenizer's {tok.vocab_size}")
    if longest_prompt + max_new_tokens > model.config.block_size:
        raise SystemExit(f"prompts of {longest_prompt} tokens + {max_new_tokens} new tokens do not fit "
                         f"the model's block_size {model.config.block_size}")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=d.device.type)
    data_rng = random.Random(cfg.seed * 1000)  # one global batch per step; rank r takes rows r::world
    step, best = 0, {"accuracy": -1.0, "step": None}
    if cfg.resume:
        state = load_state(run_dir)
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        data_rng.setstate(state["data_rng"][0])
        set_rng_state(state["rng"])
    net = DDP(model) if d.world_size > 1 else model
    metrics = Metrics(run_dir, d.master, resume_step=step if cfg.resume else None)
    guard = StepGuard(cfg.max_bad_steps, metrics, "sft")
    per_rank = cfg.batch_size // d.world_size
    if per_rank * d.world_size != cfg.batch_size:
        raise SystemExit(f"batch_size {cfg.batch_size} is not divisible by {d.world_size} processes")
    if d.master:
        print(f"sft: {cfg.task} {knobs}, {model.get_num_params() / 1e6:.2f}M params, device {d.device}, "
              f"{d.world_size} process(es), run dir {run_dir}")

    t_start, acc = time.time(), None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", disable=not d.master)
    step_times = []
    while step < cfg.max_steps:
        t0 = time.time()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data_rng.choices(train, k=cfg.batch_size)[d.rank::d.world_size]
        idx, targets = make_batch(tok, batch, d.device)
        with autocast(d.device):
            _, loss = net(idx, targets)
        if d.world_size > 1:
            # DDP averages the ranks' gradients; weighting each rank's token mean by its share of
            # the global batch's target tokens makes that the one-process step on the whole batch
            n_tokens = (targets != -100).sum().float()
            n_global = n_tokens.clone()
            torch.distributed.all_reduce(n_global)
            global_loss = (loss * n_tokens / n_global).detach()
            torch.distributed.all_reduce(global_loss)
            loss = loss * n_tokens * d.world_size / n_global
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not guard.skip(step + 1, grad_norm, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = (global_loss if d.world_size > 1 else loss).item()  # waits for the GPU: dt is real
        dt = time.time() - t0
        step_times.append(dt)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=acc, refresh=False)
        extra = {}
        if d.device.type == "cuda":  # FLOPs per token from the PaLM formula, over the card's peak
            extra["mfu"] = model.estimate_mfu(idx.size(0), dt, seq_len=idx.size(1), peak_flops=cfg.peak_flops)
        metrics.log(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm.item(), step_ms=1e3 * dt,
                    elapsed=time.time() - t_start, **extra)

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            stop = torch.zeros(1, device=d.device)
            if d.master:
                res = evaluate(model, tok, test, task.reward, max_new_tokens)
                acc = res["accuracy"]
                metrics.log(step=step, accuracy=acc, mean_tokens=res["mean_tokens"])
                name = f"step_{step:06d}"
                if acc > best["accuracy"]:
                    best = {"accuracy": acc, "step": step, "checkpoint": name}
                save_checkpoint(ckpt_dir, name, model, tok, optimizer,
                                {"step": step, "best": best, "rng": rng_state(), "data_rng": [data_rng.getstate()]})
                atomic_write_text(os.path.join(ckpt_dir, "best"), best["checkpoint"])
                bar.write(f"step {step}: held-out accuracy {acc:.3f} (best {best['accuracy']:.3f} "
                          f"at step {best['step']}), loss {loss_value:.4f}")
                stop[0] = float(acc >= cfg.stop_accuracy)
            if d.world_size > 1:
                torch.distributed.broadcast(stop, 0)
            if stop.item():
                break
    bar.close()
    if d.master:
        print_result(run_dir, {"final_accuracy": acc, "best_accuracy": best["accuracy"],
                               "best_step": best["step"], "steps": step,
                               "minutes": round((time.time() - t_start) / 60, 2),
                               "checkpoint": resolve_checkpoint(run_dir),
                               "params": model.get_num_params(),
                               "median_step_ms": round(1e3 * sorted(step_times)[len(step_times) // 2], 2)
                               if step_times else None})
    teardown_distributed()


if __name__ == "__main__":
    main()
