"""
Coconut: Chain of Continuous Thought (arXiv 2412.06769), against language chain-of-thought and
no chain at all, on ProsQA-style graph questions (data/prosqa.py).

    python algos/coconut.py                       # the three modes, the same init and step budget
    python algos/coconut.py --modes=coconut --c=2 # only Coconut, two latents per replaced step

A continuous thought is the last-layer hidden state of the previous position, fed back as the
next input embedding (no projection, no token in between):

    question <bot> [h_1] [h_2] ... [h_k] <eot> remaining steps ### answer <eos>

where h_1 is the final hidden state at <bot> and h_{i+1} the one at h_i. Training follows the
paper's curriculum: stage 0 is the language chain (with <bot><eot>); stage s replaces the first s
steps of the chain by s * c thoughts (all of them once s reaches the chain's length; the thoughts
are padded to s * c, as the paper does for ProsQA), up to max_stage; the loss is on the language
tokens after <eot> only. k thoughts need k + 1 forward passes, each reusing the keys and values of
the ones before (TrainCache), and gradients flow back through every thought. Generation runs
max_stage * c thoughts, then <eot>, then greedy decoding, batched with sampler.py's KV cache.

no-CoT trains on "### answer", CoT on "steps ### answer", both as plain next-token SFT, for the
same number of optimizer steps as Coconut's whole curriculum. Ends with `RESULT {json}`
(nocot_accuracy, cot_accuracy, coconut_accuracy, cot_tokens, coconut_tokens).
"""
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import prosqa
from data.tokenizers import WordTokenizer
from model import GPT, GPTConfig
from plumbing import (Metrics, StepGuard, autocast, cli_config, make_run_dir, peak_rss_mb, print_result,
                      save_checkpoint, seed_everything, setup_one_process, teardown_distributed)
from sampler import KVCache, evaluate
from sft import make_batch


@dataclass
class Config:
    # task (data/prosqa.py)
    n_nodes: int = 12
    min_depth: int = 3
    max_depth: int = 4
    n_extra: int = 3
    n_train: int = 20000
    n_test: int = 500
    # model (the same init for every mode)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    pos: str = "learned"         # learned | rope | none (model.py)
    # Coconut
    c: int = 1                   # continuous thoughts per replaced language step
    max_stage: int = 6           # the paper's ProsQA setting; past the chain's length, all steps are latent
    reset_optimizer: bool = True  # a fresh optimizer at each stage, as the released code does
    # optimisation: stage_steps per stage, (max_stage + 1) * stage_steps in all, for every mode
    modes: str = "nocot,cot,coconut"
    stage_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_bad_steps: int = 5     # non-finite steps in a row before the run stops (plumbing.StepGuard)
    # run
    out_dir: str = ""
    seed: int = 1337
    device: str = ""

    def __post_init__(self):
        bad = [m for m in self.modes.split(",") if m not in ("nocot", "cot", "coconut")]
        if bad or not self.modes:
            raise ValueError(f"modes must be a comma list of nocot, cot, coconut; got {self.modes!r}")
        for name in ("c", "stage_steps", "batch_size", "n_train", "n_test", "n_layer", "n_head", "n_embd",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stage < 0:
            raise ValueError(f"max_stage must be >= 0, got {self.max_stage}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# ---- the latent forward: k thoughts in k + 1 passes ---------------------------------------------

class TrainCache(KVCache):
    """sampler.KVCache's slot layout (slot = position, a query sees its row's slots 0..p), but
    written out of place, so that the keys and values of earlier passes stay in the autograd
    graph: a continuous thought's gradient reaches the passes that produced it."""

    def __init__(self, model, batch_size, max_len):
        cfg, p = model.config, next(model.parameters())
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.rows = torch.arange(batch_size, device=p.device)[:, None]

    def update(self, layer, k, v, positions):
        for buf, new in ((self.k, k), (self.v, v)):
            out = buf[layer].clone()
            out[self.rows, :, positions] = new.transpose(1, 2)
            buf[layer] = out
        return self.k[layer], self.v[layer]


def latent_batch(tok, examples, stage, c):
    """Coconut's training sequences at `stage`: prompts = BOS + question + <bot> (B lists),
    n_latent = stage * c, rest = <eot> + the steps left in language + "### answer" + EOS."""
    bot, eot = tok.encode("<bot>")[0], tok.encode("<eot>")[0]
    prompts = [[tok.bos_id] + tok.encode(ex["prompt"]) + [bot] for ex in examples]
    rest = [[eot] + tok.encode(" ".join(ex["steps"][stage:] + [ex["answer"]])) + [tok.eos_id]
            for ex in examples]
    return prompts, stage * c, rest


def latent_loss(model, prompts, n_latent, rest, pad_id):
    """Mean cross-entropy of the tokens after <eot> (what follows the thoughts), with n_latent
    continuous thoughts between <bot> and <eot>. Rows are right-padded; row b's thought i sits at
    position L_b + i (L_b = its prompt length), its rest after them.
    Pass 1: the prompts, filling the cache; the hidden state at <bot> is thought 1.
    Passes 2..k: thought i in, thought i + 1 out, one position per row.
    Pass k + 1: thought k (if any), then the rest, whose logits give the loss."""
    device = next(model.parameters()).device
    B = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], device=device)
    T0, R = int(plen.max()), max(len(r) for r in rest)
    cache = TrainCache(model, B, T0 + n_latent + R)
    idx = torch.full((B, T0), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    rows = torch.arange(B, device=device)
    h = model.hidden(idx, positions=torch.arange(T0, device=device).expand(B, T0), cache=cache)
    thought = h[rows, plen - 1][:, None]  # (B, 1, C)
    for i in range(n_latent - 1):
        thought = model.hidden(embeds=thought, positions=(plen + i)[:, None], cache=cache)
    r_idx = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    targets = torch.full((B, R), -100, dtype=torch.long, device=device)
    for b, r in enumerate(rest):
        r_idx[b, :len(r)] = torch.tensor(r)
        targets[b, :len(r) - 1] = torch.tensor(r[1:])  # <eot> predicts the first language token
    x = model.transformer.wte(r_idx)
    start = plen + max(n_latent - 1, 0)  # where the last pass begins: thought k, or <eot>
    if n_latent > 0:
        x = torch.cat([thought, x], dim=1)
        targets = torch.cat([torch.full((B, 1), -100, dtype=torch.long, device=device), targets], dim=1)
    h = model.hidden(embeds=x, positions=start[:, None] + torch.arange(x.size(1), device=device), cache=cache)
    logits = model.lm_head(h)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def latent_loss_reference(model, prompts, n_latent, rest):
    """The slow, obvious twin of latent_loss: one row at a time, each thought computed by a full
    forward over everything before it (no cache), the sequence growing one embedding at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for p, r in zip(prompts, rest):
        x = model.transformer.wte(torch.tensor([p], device=device))
        for _ in range(n_latent):
            x = torch.cat([x, model.hidden(embeds=x)[:, -1:]], dim=1)
        x = torch.cat([x, model.transformer.wte(torch.tensor([r], device=device))], dim=1)
        logits = model.lm_head(model.hidden(embeds=x))[0]
        first = len(p) + n_latent  # the position of <eot>
        total = total + F.cross_entropy(logits[first:first + len(r) - 1].float(),
                                        torch.tensor(r[1:], device=device), reduction="sum")
        count += len(r) - 1
    return total / count


# ---- generation through the thoughts ---------------------------------------------------------------

@torch.no_grad()
def generate_latent(model, tok, questions, n_latent, max_new_tokens, use_cache=True):
    """Greedy answers after n_latent continuous thoughts: BOS + question + <bot>, the thoughts,
    <eot>, then tokens until EOS. Batched over questions with a KV cache (use_cache=False: the
    slow twin, a full forward over the growing sequence for each row at every step). Returns the
    generated token lists after <eot> (EOS included when emitted)."""
    bot, eot = tok.encode("<bot>")[0], tok.encode("<eot>")[0]
    prompts = [[tok.bos_id] + tok.encode(q) + [bot] for q in questions]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if not use_cache:
        outs = []
        for p in prompts:
            x = model.transformer.wte(torch.tensor([p], device=device))
            for _ in range(n_latent):
                x = torch.cat([x, model.hidden(embeds=x)[:, -1:]], dim=1)
            x = torch.cat([x, model.transformer.wte(torch.tensor([[eot]], device=device))], dim=1)
            out = []
            for _ in range(max_new_tokens):
                t = int(model.lm_head(model.hidden(embeds=x)[:, -1]).argmax(-1))
                out.append(t)
                if t == tok.eos_id:
                    break
                x = torch.cat([x, model.transformer.wte(torch.tensor([[t]], device=device))], dim=1)
            outs.append(out)
        model.train(was_training)
        return outs
    B = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], device=device)
    T0 = int(plen.max())
    cache = KVCache.for_model(model, B, T0 + n_latent + 1 + max_new_tokens)
    idx = torch.full((B, T0), tok.pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    rows = torch.arange(B, device=device)
    h = model.hidden(idx, positions=torch.arange(T0, device=device).expand(B, T0), cache=cache)[rows, plen - 1]
    pos = plen
    for _ in range(n_latent):  # thought i in at position L + i - 1, thought i + 1 out
        h = model.hidden(embeds=h[:, None], positions=pos[:, None], cache=cache)[:, 0]
        pos = pos + 1
    tok_in = torch.full((B,), eot, dtype=torch.long, device=device)
    outs = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        h = model.hidden(tok_in[:, None], positions=pos[:, None], cache=cache)[:, 0]
        tok_in = model.lm_head(h).argmax(-1)
        for b in (~done).nonzero()[:, 0].tolist():
            outs[b].append(int(tok_in[b]))
        done |= tok_in == tok.eos_id
        pos = pos + 1
        if bool(done.all()):
            break
    model.train(was_training)
    return outs


# ---- the script -----------------------------------------------------------------------------------

def evaluate_mode(model, tok, mode, problems, cfg, max_new_tokens, batch_size=250):
    """Held-out accuracy (greedy) and generated tokens per answer. For Coconut these are
    <bot>, the max_stage * c thoughts, <eot> and the answer tokens (EOS included): every forward
    pass after the question; for the language modes, the generated tokens (EOS included)."""
    if mode != "coconut":
        return evaluate(model, tok, problems, prosqa.reward, max_new_tokens, batch_size=batch_size)
    K = cfg.max_stage * cfg.c
    correct, tokens = 0.0, 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        for ex, out in zip(chunk, generate_latent(model, tok, [p["prompt"] for p in chunk], K, max_new_tokens)):
            if out and out[-1] == tok.eos_id:
                correct += prosqa.reward(ex["prompt"], tok.decode(out[:-1]))
            tokens += 2 + K + len(out)
    return {"accuracy": correct / len(problems), "mean_tokens": tokens / len(problems)}


def train_mode(mode, cfg, tok, train, test, device, metrics, block_size, max_new_tokens):
    """One mode from the shared seeded init, (max_stage + 1) * stage_steps AdamW steps on batches
    drawn in the same seeded order. Coconut moves to the next curriculum stage every stage_steps."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd, pos=cfg.pos)).to(device)
    data_rng = random.Random(cfg.seed)
    total = (cfg.max_stage + 1) * cfg.stage_steps
    optimizer, t0 = None, time.time()
    guard = StepGuard(cfg.max_bad_steps, metrics, f"coconut ({mode})")
    bar = tqdm(range(total), desc=mode)
    for step in bar:
        stage = step // cfg.stage_steps
        if optimizer is None or (mode == "coconut" and cfg.reset_optimizer and step % cfg.stage_steps == 0):
            optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=device.type)
        for group in optimizer.param_groups:  # warm up over the first 100 steps, then constant
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 100)
        examples = data_rng.choices(train, k=cfg.batch_size)
        with autocast(device):
            if mode == "coconut":
                loss = latent_loss(model, *latent_batch(tok, examples, stage, cfg.c), tok.pad_id)
            else:
                batch = [{"prompt": ex["prompt"], "answer": ex["cot" if mode == "cot" else "answer"]}
                         for ex in examples]
                _, loss = model(*make_batch(tok, batch, device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not guard.skip(step + 1, grad_norm, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.log(mode=mode, step=step + 1, stage=stage, loss=loss.item(), grad_norm=grad_norm.item(),
                    elapsed=time.time() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}", stage=stage, refresh=False)
    minutes = (time.time() - t0) / 60
    res = evaluate_mode(model, tok, mode, test, cfg, max_new_tokens)
    metrics.log(mode=mode, step=total, eval_accuracy=res["accuracy"], eval_mean_tokens=res["mean_tokens"],
                train_minutes=minutes)
    return model, {**res, "train_minutes": round(minutes, 2)}


def main():
    cfg = cli_config(Config)
    d = setup_one_process(cfg.device, "coconut.py")
    seed_everything(cfg.seed)
    tok = WordTokenizer(prosqa.WORDS)
    knobs = dict(n_nodes=cfg.n_nodes, min_depth=cfg.min_depth, max_depth=cfg.max_depth, n_extra=cfg.n_extra)
    try:
        train = prosqa.dataset(cfg.n_train, "train", seed=cfg.seed, **knobs)
        test = prosqa.dataset(cfg.n_test, "test", seed=cfg.seed + 1, **knobs)
    except ValueError as e:
        raise SystemExit(f"coconut: {e}")
    longest = 1 + max(len(tok.encode(ex["prompt"])) for ex in train + test)
    max_new_tokens = max(len(tok.encode(ex["cot"])) for ex in train + test) + 8
    # the longest training sequence: question, <bot>, the most thoughts, <eot>, the whole chain
    block_size = 16 * math.ceil((longest + 2 + cfg.max_stage * cfg.c + max_new_tokens) / 16)
    run_dir = make_run_dir(cfg.out_dir, "coconut", cfg)
    metrics = Metrics(run_dir)
    print(f"coconut: ProsQA-style {knobs}, {len(train)} train / {len(test)} held-out graphs, questions of "
          f"{longest} tokens, block {block_size}, {(cfg.max_stage + 1) * cfg.stage_steps} steps per mode, "
          f"device {d.device}, run dir {run_dir}")
    results = {}
    for mode in cfg.modes.split(","):
        model, results[mode] = train_mode(mode, cfg, tok, train, test, d.device, metrics, block_size,
                                          max_new_tokens)
        save_checkpoint(os.path.join(run_dir, "ckpt"), mode, model, tok)
        print(f"{mode}: held-out accuracy {results[mode]['accuracy']:.3f}, {results[mode]['mean_tokens']:.1f} "
              f"tokens per answer, {results[mode]['train_minutes']:.1f} min of training", flush=True)
    names = {"nocot": "no-CoT", "cot": "CoT", "coconut": f"Coconut (c={cfg.c}, {cfg.max_stage} stages)"}
    print("\n| mode | held-out accuracy | tokens per answer | training minutes |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {names[mode]} | {100 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f} | {r['train_minutes']:.1f} |")
    result = {f"{m}_accuracy": r["accuracy"] for m, r in results.items()}
    result.update({f"{m}_tokens": r["mean_tokens"] for m, r in results.items() if m != "nocot"})
    result.update({f"{m}_train_minutes": r["train_minutes"] for m, r in results.items()})
    result.update(peak_rss_mb=peak_rss_mb(), steps_per_mode=(cfg.max_stage + 1) * cfg.stage_steps)
    print_result(run_dir, result)
    teardown_distributed()


if __name__ == "__main__":
    main()
