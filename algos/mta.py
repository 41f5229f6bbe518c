"""
Multi-Token Attention vs standard attention (Golovneva et al., arXiv 2504.00927): the paper's
find-the-block toy task and a small character-level language model, the same model otherwise.

    python algos/mta.py                              # both parts
    python algos/mta.py --parts=toy --toy_steps=4000 --n_blocks=12

Toy task (data/find_block.py): blocks of 5 distinct letters, '#', 2 query letters; the model
writes out the one block holding both. A standard Transformer and an MTA one (key-query
convolution 2 x 9 on every layer, as the paper's toy config) are trained from the same seed on
the same sequences, with the loss on the answer only, and scored by greedy generation with the
KV cache (exact block). The paper: 319-token sequences, 4 layers x 256, 2 heads, 100k steps of
64, Transformer 51.6% error vs MTA 0.1%. Here: fewer blocks (shorter sequences), a narrower
model, a few thousand steps and a larger learning rate, so that it runs on a laptop CPU.

Language model: both models on data/tinytext.txt (characters, 90% / 10% train / validation
split), MTA with the paper's LM setting (6 x 11 key-query convolution on every 4th layer, head
mixing in pairs after the softmax, per-head RMSNorm and output gate on every layer).

Ends with `RESULT {json}`: transformer_error, mta_error (toy), transformer_val_loss,
mta_val_loss (LM), params, minutes.
"""
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import find_block
from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig
from plumbing import (Metrics, StepGuard, cli_config, make_run_dir, print_result, seed_everything,
                      setup_one_process)
from sampler import generate

TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tinytext.txt")


@dataclass
class Config:
    parts: str = "toy,lm"
    archs: str = "transformer,mta"
    # toy task (data/find_block.py)
    n_blocks: int = 10
    block_len: int = 5
    n_query: int = 2
    toy_layers: int = 4
    toy_heads: int = 2
    toy_embd: int = 128
    toy_cq: int = 2              # the paper's toy kernel: 2 queries x 9 keys, on every layer
    toy_ck: int = 9
    toy_steps: int = 1500
    toy_batch: int = 64
    toy_lr: float = 1e-3
    n_eval: int = 1000           # held-out problems
    # language model on data/tinytext.txt
    lm_layers: int = 4
    lm_heads: int = 4
    lm_embd: int = 128
    lm_block: int = 128
    lm_steps: int = 1000
    lm_batch: int = 16
    lm_lr: float = 3e-3
    # both
    dropout: float = 0.0
    weight_decay: float = 0.0
    max_bad_steps: int = 5       # non-finite steps in a row before the run stops (plumbing.StepGuard)
    out_dir: str = ""
    seed: int = 1337
    device: str = ""

    def __post_init__(self):
        bad = [p for p in self.parts.split(",") if p not in ("toy", "lm")]
        if bad or not self.parts:
            raise ValueError(f"parts: unknown {bad}; give toy, lm or toy,lm")
        bad = [a for a in self.archs.split(",") if a not in ("transformer", "mta")]
        if bad or not self.archs:
            raise ValueError(f"archs: unknown {bad}; give transformer, mta or transformer,mta")
        for name in ("toy_steps", "toy_batch", "n_eval", "lm_steps", "lm_batch", "lm_block", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("toy_lr", "lm_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        find_block.sample(random.Random(0), self.n_blocks, self.block_len, self.n_query)  # knob check


def train(model, next_batch, steps, lr, cfg, device, metrics, desc, **tags):
    """AdamW, 50 warm-up steps then cosine to 10% of lr, gradients clipped at 1."""
    optimizer = model.configure_optimizers(cfg.weight_decay, lr, device_type=device.type)
    guard = StepGuard(cfg.max_bad_steps, metrics, f"mta ({desc})")
    model.train()
    t0 = time.time()
    for step in tqdm(range(steps), desc=desc):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        _, loss = model(*next_batch())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not guard.skip(step + 1, norm, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            metrics.log(**tags, step=step + 1, loss=loss.item(), grad_norm=norm.item(), elapsed=time.time() - t0)


def toy_batch(tok, problems, device):
    """All problems of one knob setting have the same length: idx (B, T), targets (B, T) with
    the loss on the answer letters only."""
    seqs = torch.tensor([tok.encode(p["prompt"] + p["answer"]) for p in problems])
    targets = seqs[:, 1:].clone()
    targets[:, :len(problems[0]["prompt"]) - 1] = -100
    return seqs[:, :-1].to(device), targets.to(device)


@torch.no_grad()
def toy_error(model, tok, problems, batch_size=250):
    """(Fraction of problems whose greedily generated block (KV cache) is not the target,
    fraction whose first letter already is not)."""
    wrong = first = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        out = generate(model, [tok.encode(p["prompt"]) for p in chunk], len(chunk[0]["answer"]), temperature=0)
        texts = [tok.decode(c) for c in out.completions()]
        wrong += sum(t != p["answer"] for t, p in zip(texts, chunk))
        first += sum(t[:1] != p["answer"][:1] for t, p in zip(texts, chunk))
    return wrong / len(problems), first / len(problems)


@torch.no_grad()
def val_loss(model, ids, block, device, batch_size=64):
    """Mean next-character loss over consecutive, non-overlapping windows of the validation text."""
    model.eval()
    n = (len(ids) - 1) // block
    x = ids[:n * block].view(n, block)
    y = ids[1:n * block + 1].view(n, block)
    total = 0.0
    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        total += model(xb, yb)[1].item() * len(xb)
    return total / n


def main():
    cfg = cli_config(Config)
    d = setup_one_process(cfg.device, "mta.py")
    seed_everything(cfg.seed)
    run_dir = make_run_dir(cfg.out_dir, "mta", cfg)
    metrics = Metrics(run_dir)
    t_start = time.time()
    result, params = {}, {}
    parts = cfg.parts.split(",")

    if "toy" in parts:
        tok = CharTokenizer(find_block.CHARS)
        knobs = dict(n_blocks=cfg.n_blocks, block_len=cfg.block_len, n_query=cfg.n_query)
        test = find_block.dataset(cfg.n_eval, "test", cfg.seed, **knobs)
        T = len(test[0]["prompt"]) + cfg.block_len
        base = dict(vocab_size=tok.vocab_size, block_size=T, n_layer=cfg.toy_layers, n_head=cfg.toy_heads,
                    n_embd=cfg.toy_embd, pos="rope", dropout=cfg.dropout)
        variants = {"transformer": {}, "mta": dict(attn="mta", mta_cq=cfg.toy_cq, mta_ck=cfg.toy_ck,
                                                   mta_every=1, mta_ch=1, mta_norm="none")}
        params["toy"] = {}
        for name, extra in variants.items():
            if name not in cfg.archs.split(","):
                continue
            torch.manual_seed(cfg.seed)
            model = GPT(GPTConfig(**base, **extra)).to(d.device)
            params["toy"][name] = sum(p.numel() for p in model.parameters())
            rng = random.Random(cfg.seed)  # the same training problems for both models

            def next_batch():
                batch = []
                while len(batch) < cfg.toy_batch:
                    p = find_block.sample(rng, **knobs)
                    if find_block.split_of(p["prompt"]) == "train":
                        batch.append(p)
                return toy_batch(tok, batch, d.device)

            t0 = time.time()
            train(model, next_batch, cfg.toy_steps, cfg.toy_lr, cfg, d.device, metrics,
                  f"toy {name}", part="toy", arch=name)
            result[f"{name}_error"], result[f"{name}_first_letter_error"] = toy_error(model, tok, test)
            metrics.log(part="toy", arch=name, error=result[f"{name}_error"],
                        first_letter_error=result[f"{name}_first_letter_error"], minutes=(time.time() - t0) / 60)
            print(f"toy {name}: held-out error {100 * result[f'{name}_error']:.1f}% "
                  f"(first letter {100 * result[f'{name}_first_letter_error']:.1f}%) "
                  f"({params['toy'][name]} params, {(time.time() - t0) / 60:.1f} min)", flush=True)

    if "lm" in parts:
        tok = CharTokenizer()
        with open(TEXT) as f:
            ids = torch.tensor(tok.encode(f.read()))
        split = int(0.9 * len(ids))
        train_ids, val_ids = ids[:split], ids[split:]
        base = dict(vocab_size=tok.vocab_size, block_size=cfg.lm_block, n_layer=cfg.lm_layers,
                    n_head=cfg.lm_heads, n_embd=cfg.lm_embd, pos="rope", dropout=cfg.dropout)
        params["lm"] = {}
        for name, extra in {"transformer": {}, "mta": dict(attn="mta")}.items():
            if name not in cfg.archs.split(","):
                continue
            torch.manual_seed(cfg.seed)
            model = GPT(GPTConfig(**base, **extra)).to(d.device)
            params["lm"][name] = sum(p.numel() for p in model.parameters())
            g = torch.Generator().manual_seed(cfg.seed)  # the same windows for both models

            def next_batch():
                start = torch.randint(len(train_ids) - cfg.lm_block - 1, (cfg.lm_batch,), generator=g)
                x = torch.stack([train_ids[s:s + cfg.lm_block] for s in start.tolist()])
                y = torch.stack([train_ids[s + 1:s + cfg.lm_block + 1] for s in start.tolist()])
                return x.to(d.device), y.to(d.device)

            t0 = time.time()
            train(model, next_batch, cfg.lm_steps, cfg.lm_lr, cfg, d.device, metrics,
                  f"lm {name}", part="lm", arch=name)
            result[f"{name}_val_loss"] = val_loss(model, val_ids, cfg.lm_block, d.device)
            metrics.log(part="lm", arch=name, val_loss=result[f"{name}_val_loss"], minutes=(time.time() - t0) / 60)
            print(f"lm {name}: validation loss {result[f'{name}_val_loss']:.4f} "
                  f"({params['lm'][name]} params, {(time.time() - t0) / 60:.1f} min)", flush=True)

    def cell(key, fmt):
        return fmt(result[key]) if key in result else "-"
    print("\n| | Transformer | MTA |\n|---|---|---|")
    if "toy" in parts:
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        for label, key in ((f"toy task error ({cfg.n_blocks} blocks)", "error"), ("first letter wrong", "first_letter_error")):
            print(f"| {label} | {cell(f'transformer_{key}', pct)} | {cell(f'mta_{key}', pct)} |")
    if "lm" in parts:
        loss = lambda x: f"{x:.4f}"  # noqa: E731
        print(f"| tinytext validation loss | {cell('transformer_val_loss', loss)} | "
              f"{cell('mta_val_loss', loss)} |")
    print_result(run_dir, {**result, "params": params, "minutes": round((time.time() - t_start) / 60, 2)})


if __name__ == "__main__":
    main()
