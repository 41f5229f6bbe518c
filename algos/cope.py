"""
CoPE vs learned / RoPE / no position encoding on the CoPE paper's synthetic tasks (Contextual
Position Encoding, arXiv 2405.18719): counting, Flip-Flop and selective copy (data/cope_tasks.py).

    python algos/cope.py                                 # 3 tasks x 4 position encodings
    python algos/cope.py --tasks=counting --pos=cope,rope --counting_steps=2000

For every (task, pos) the same small GPT (same seed, width, depth, steps, batch, lr) is trained
on in-distribution sequences (counting for counting_steps, the others for steps), with the loss on the target tokens only, then scored greedily
(teacher-forced: the argmax at each target position) on held-out in-distribution and
out-of-distribution sequences (longer programs for counting, sparser instructions for Flip-Flop,
more blanks for selective copy). Prints a table of error rates (wrong target tokens / target
tokens) and ends with `RESULT {json}`: id_error and ood_error as {task: {pos: error}}.
"""
import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import cope_tasks
from data.tokenizers import WordTokenizer
from model import GPT, GPTConfig
from plumbing import (Metrics, StepGuard, cli_config, make_run_dir, print_result, seed_everything,
                      setup_one_process)


@dataclass
class Config:
    tasks: str = "counting,flipflop,selective_copy"
    pos: str = "learned,rope,none,cope"
    # model: the same for every position encoding
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    npos_max: int = 64           # cope: positions counted up to npos_max - 1
    flipflop_pairs: int = 0      # > 0: Flip-Flop sequences of this many instruction pairs (ID and OOD)
    # training
    steps: int = 2000
    counting_steps: int = 6000   # counting's single target per sequence takes longer to learn, even ID
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_bad_steps: int = 5       # non-finite steps in a row before the run stops (plumbing.StepGuard)
    n_eval: int = 500            # held-out sequences per setting
    out_dir: str = ""
    seed: int = 1337
    device: str = ""

    def __post_init__(self):
        for name, allowed in (("tasks", cope_tasks.TASKS), ("pos", ("learned", "rope", "none", "cope"))):
            bad = [x for x in getattr(self, name).split(",") if x not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose from {sorted(allowed)}")
        if self.flipflop_pairs < 0 or self.flipflop_pairs == 1:
            raise ValueError(f"flipflop_pairs must be 0 (the default length) or >= 2, got {self.flipflop_pairs}")
        for name in ("steps", "counting_steps", "batch_size", "n_eval", "n_layer", "n_head", "n_embd", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def make_batch(tok, examples, device):
    """[(words, target_positions)] -> idx (B, T), targets (B, T): targets[t] = token t + 1 where
    t + 1 is a target position, else -100; right-padded."""
    T = max(len(w) for w, _ in examples) - 1
    idx = torch.full((len(examples), T), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (words, tpos) in enumerate(examples):
        ids = torch.tensor(tok.encode(" ".join(words)))
        idx[b, :len(ids) - 1] = ids[:-1]
        tp = torch.tensor(tpos)
        targets[b, tp - 1] = ids[tp]
    return idx.to(device), targets.to(device)


@torch.no_grad()
def error_rate(model, tok, examples, device, batch_size=250):
    """Fraction of target tokens whose argmax prediction (given the true prefix) is wrong."""
    model.eval()
    wrong = total = 0
    for i in range(0, len(examples), batch_size):
        idx, targets = make_batch(tok, examples[i:i + batch_size], device)
        pred = model(idx)[0].argmax(-1)
        live = targets != -100
        wrong += int((pred[live] != targets[live]).sum())
        total += int(live.sum())
    model.train()
    return wrong / total


def main():
    cfg = cli_config(Config)
    d = setup_one_process(cfg.device, "cope.py")
    seed_everything(cfg.seed)
    tok = WordTokenizer(cope_tasks.WORDS)
    run_dir = make_run_dir(cfg.out_dir, "cope", cfg)
    metrics = Metrics(run_dir)
    tasks, encodings = cfg.tasks.split(","), cfg.pos.split(",")
    id_err, ood_err, params = {}, {}, {}
    for task in tasks:
        gen, setting = cope_tasks.TASKS[task], cope_tasks.SETTINGS[task]
        if task == "flipflop" and cfg.flipflop_pairs:
            setting = {k: dict(v, n_pairs=cfg.flipflop_pairs) for k, v in setting.items()}
        rng = random.Random(cfg.seed + 1)  # held-out sets: the same for every encoding
        test = {k: [gen(rng, **setting[k]) for _ in range(cfg.n_eval)] for k in ("id", "ood")}
        block = max(len(w) for w, _ in test["ood"]) + 8
        steps = cfg.counting_steps if task == "counting" else cfg.steps
        id_err[task], ood_err[task], params[task] = {}, {}, {}
        for pos in encodings:
            torch.manual_seed(cfg.seed)
            model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=cfg.n_layer,
                                  n_head=cfg.n_head, n_embd=cfg.n_embd, pos=pos,
                                  npos_max=cfg.npos_max)).to(d.device)
            params[task][pos] = sum(p.numel() for p in model.parameters())
            optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=d.device.type)
            data_rng = random.Random(cfg.seed)  # the same training sequences for every encoding
            t0 = time.time()
            guard = StepGuard(cfg.max_bad_steps, metrics, f"cope ({task}, {pos})")
            for step in tqdm(range(steps), desc=f"{task} {pos}"):
                for group in optimizer.param_groups:  # warm-up, then cosine down to 10% of lr
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
                batch = [gen(data_rng, **setting["id"]) for _ in range(cfg.batch_size)]
                _, loss = model(*make_batch(tok, batch, d.device))
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if not guard.skip(step + 1, norm, loss):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step % 50 == 0 or step == steps - 1:
                    metrics.log(task=task, pos=pos, step=step + 1, loss=loss.item(), elapsed=time.time() - t0)
            id_err[task][pos] = error_rate(model, tok, test["id"], d.device)
            ood_err[task][pos] = error_rate(model, tok, test["ood"], d.device)
            metrics.log(task=task, pos=pos, id_error=id_err[task][pos], ood_error=ood_err[task][pos],
                        minutes=(time.time() - t0) / 60)
            print(f"{task} {pos}: ID error {id_err[task][pos]:.3f}, OOD error {ood_err[task][pos]:.3f}, "
                  f"{params[task][pos]} params, {(time.time() - t0) / 60:.1f} min", flush=True)
    print("\n| task | " + " | ".join(f"{p} ID / OOD" for p in encodings) + " |")
    print("|---|" + "---|" * len(encodings))
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{100 * id_err[task][p]:.1f}% / {100 * ood_err[task][p]:.1f}%"
                                         for p in encodings) + " |")
    print_result(run_dir, {"id_error": id_err, "ood_error": ood_err, "params": params,
                              "steps": {t: cfg.counting_steps if t == "counting" else cfg.steps for t in tasks}})


if __name__ == "__main__":
    main()
