"""
Coconut: Chain of Continuous Thought (arXiv 2412.06769), against language chain-of-thought and
no chain at all, on ProsQA-style graph questions (data/prosqa.py).

    python algos/coconut.py                       # the three modes, the same init and step budget
    python algos/coconut.py --modes=coconut --c=2 # only Coconut, two latents per replaced step

A continuous thought is the last-layer hidden state of the previous position, fed back as the
next input embedding (no projection, no token in between):

    question <bot> [h_1] [h_2] ... [h_k] <eot> remaining steps ### answer <eos>

where h_1 is the final hidden state at <bot> and h_{i+1} the one at h_i. An option the paper does
not have, off by default (rescale_thoughts): each thought scaled to the token embeddings' mean
norm, direction kept, nothing learned (thought() says what it did not change). Training follows
the paper's curriculum: stage 0 is the language chain; stage s replaces the first s steps of the
chain by s * c thoughts (all of them once s reaches the chain's length; the thoughts are padded
to s * c, as the paper does for ProsQA), up to max_stage; the loss is on the language tokens
after <eot> only. k thoughts need k + 1 forward passes, each reusing the keys and values of the
ones before (TrainCache), and gradients flow back through every thought. Generation runs
max_stage * c thoughts, then <eot>, then greedy decoding, batched with sampler.py's KV cache.
After each latent stage but the last, the first stage_eval held-out questions are answered with
that stage's thoughts (printed, and in metrics.jsonl) to show where the curriculum breaks; nothing
is chosen on them.

Stage 0 lasts cot_steps and is the CoT model's own training: Coconut's stages start from the CoT
run's weights, optimizer and data order at that step (the released code starts Coconut from a
CoT checkpoint for GSM8K); the stage-0 sequences carry no <bot><eot>. The CoT model goes on with
the chain for the max_stage * stage_steps steps Coconut spends on its latent stages, so every
mode gets cot_steps + max_stage * stage_steps optimizer steps from the same init; no-CoT trains
on "### answer" for as many. Ends with `RESULT {json}` (nocot_accuracy, cot_accuracy,
coconut_accuracy, cot_tokens, coconut_tokens).
"""
import copy
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
    # task (data/prosqa.py): much smaller graphs than the paper's (23 nodes, 3.8 hops), so that a
    # model from scratch learns to look facts up within a CPU budget (README, docs/coconut.md)
    n_nodes: int = 8
    min_depth: int = 3
    max_depth: int = 3
    n_extra: int = 2
    n_train: int = 20000
    n_test: int = 500
    # model (the same init for every mode)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    pos: str = "rope"            # learned | rope | none (model.py); learned positions learn the look-up slower
    # Coconut
    c: int = 1                   # continuous thoughts per replaced language step
    rescale_thoughts: bool = False  # true: a thought set to the token embeddings' mean norm, direction kept (thought())
    max_stage: int = 6           # the paper's ProsQA setting; past the chain's length, all steps are latent
    # a fresh optimizer at each stage; the released code re-creates it every epoch (5 per stage on
    # ProsQA), and a stage here is shorter than an epoch (450 x 32 of 20000 graphs), so once per stage
    reset_optimizer: bool = True
    stage_eval: int = 200        # held-out questions answered after each latent stage (0: none); monitoring only
    # optimisation, the same number of steps for every mode: cot_steps + max_stage * stage_steps.
    # Stage 0 (the language chain) lasts cot_steps, each latent stage stage_steps.
    modes: str = "nocot,cot,coconut"
    cot_steps: int = 1500
    stage_steps: int = 450
    batch_size: int = 32
    lr: float = 1e-3
    latent_lr: float = 1e-3      # Coconut's stages 1..max_stage (stage 0 is the CoT run's, at lr); docs/coconut.md
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
        if self.stage_eval < 0:
            raise ValueError(f"stage_eval must be >= 0, got {self.stage_eval}")
        for name in ("c", "cot_steps", "stage_steps", "batch_size", "n_train", "n_test", "n_layer", "n_head", "n_embd",
                     "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stage < 1:
            raise ValueError(f"max_stage must be >= 1 (Coconut's latent stages), got {self.max_stage}")
        for name in ("lr", "latent_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


# ---- the latent forward: k thoughts in k + 1 passes ---------------------------------------------

def thought(model, h, rescale):
    """The next input embedding made of last-layer hidden states h (..., C): h as is, as in the
    paper, or with rescale h scaled to the mean norm of the token embeddings, direction kept and
    nothing learned. After ln_f, h is ~16x longer than an embedding (its logits against the tied
    embeddings must be large). The scaling was meant to make thoughts readable as inputs; measured
    (docs/coconut.md), it does not decide whether this 4-layer model chains them: from one finished CoT
    model, the all-latent stage 3 after 300 steps reached 98.0% scaled and 92.5% unscaled with one
    arrangement of the (equal) loss, 57.5% and 60.0% with the cached one below."""
    if not rescale:
        return h
    scale = model.transformer.wte.weight.detach().norm(dim=-1).mean()
    return h * (scale / h.norm(dim=-1, keepdim=True))


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


def latent_loss(model, prompts, n_latent, rest, pad_id, rescale=False):
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
    th = thought(model, h[rows, plen - 1][:, None], rescale)  # (B, 1, C)
    for i in range(n_latent - 1):
        th = thought(model, model.hidden(embeds=th, positions=(plen + i)[:, None], cache=cache), rescale)
    r_idx = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    targets = torch.full((B, R), -100, dtype=torch.long, device=device)
    for b, r in enumerate(rest):
        r_idx[b, :len(r)] = torch.tensor(r)
        targets[b, :len(r) - 1] = torch.tensor(r[1:])  # <eot> predicts the first language token
    x = model.transformer.wte(r_idx)
    start = plen + max(n_latent - 1, 0)  # where the last pass begins: thought k, or <eot>
    if n_latent > 0:
        x = torch.cat([th, x], dim=1)
        targets = torch.cat([torch.full((B, 1), -100, dtype=torch.long, device=device), targets], dim=1)
    h = model.hidden(embeds=x, positions=start[:, None] + torch.arange(x.size(1), device=device), cache=cache)
    logits = model.lm_head(h)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def latent_loss_reference(model, prompts, n_latent, rest, rescale=False):
    """The slow, obvious twin of latent_loss: one row at a time, each thought computed by a full
    forward over everything before it (no cache), the sequence growing one embedding at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for p, r in zip(prompts, rest):
        x = model.transformer.wte(torch.tensor([p], device=device))
        for _ in range(n_latent):
            x = torch.cat([x, thought(model, model.hidden(embeds=x)[:, -1:], rescale)], dim=1)
        x = torch.cat([x, model.transformer.wte(torch.tensor([r], device=device))], dim=1)
        logits = model.lm_head(model.hidden(embeds=x))[0]
        first = len(p) + n_latent  # the position of <eot>
        total = total + F.cross_entropy(logits[first:first + len(r) - 1].float(),
                                        torch.tensor(r[1:], device=device), reduction="sum")
        count += len(r) - 1
    return total / count


# ---- generation through the thoughts ---------------------------------------------------------------

@torch.no_grad()
def generate_latent(model, tok, questions, n_latent, max_new_tokens, use_cache=True, rescale=False):
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
                x = torch.cat([x, thought(model, model.hidden(embeds=x)[:, -1:], rescale)], dim=1)
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
        h = model.hidden(embeds=thought(model, h[:, None], rescale), positions=pos[:, None], cache=cache)[:, 0]
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

def evaluate_mode(model, tok, mode, problems, cfg, max_new_tokens, batch_size=250, stage=None):
    """Held-out accuracy (greedy) and generated tokens per answer (EOS included). For Coconut
    these are the stage * c thoughts (stage: max_stage unless given) and the tokens after <eot>,
    the paper's count (its ProsQA Coconut figure, 14.2, is its 6 thoughts plus the 8.2 answer
    tokens of its no-CoT row): <bot> and <eot> are placed, not generated, and <bot> costs no
    pass of its own (it ends the prompt). Before the last stage the tokens after <eot> include
    the chain's steps still in language."""
    if mode != "coconut":
        return evaluate(model, tok, problems, prosqa.reward, max_new_tokens, batch_size=batch_size)
    K = (cfg.max_stage if stage is None else stage) * cfg.c
    correct, tokens = 0.0, 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        questions = [p["prompt"] for p in chunk]
        for ex, out in zip(chunk, generate_latent(model, tok, questions, K, max_new_tokens, rescale=cfg.rescale_thoughts)):
            if out and out[-1] == tok.eos_id:
                correct += prosqa.reward(ex["prompt"], tok.decode(out[:-1]))
            tokens += K + len(out)
    return {"accuracy": correct / len(problems), "mean_tokens": tokens / len(problems)}


def new_model(cfg, tok, block_size, device):
    torch.manual_seed(cfg.seed)  # the same init for every mode
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, pos=cfg.pos)).to(device)


def new_optimizer(model, cfg, device):
    return model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=device.type)


def train_steps(model, optimizer, mode, stages, cfg, tok, train, data_rng, device, metrics, first_step=0):
    """AdamW steps on batches of cfg.batch_size drawn from train with data_rng; stages[i] is the
    curriculum stage of step first_step + i (Coconut; the language modes ignore it). A fresh
    optimizer at each new stage when cfg.reset_optimizer, and cfg.latent_lr (Coconut only).
    Returns the optimizer."""
    guard = StepGuard(cfg.max_bad_steps, metrics, f"coconut ({mode})")
    bar, previous = tqdm(enumerate(stages, first_step), total=len(stages), desc=mode), None
    for step, stage in bar:
        if mode == "coconut" and cfg.reset_optimizer and stage != previous:
            optimizer = new_optimizer(model, cfg, device)
        previous = stage
        lr = cfg.latent_lr if mode == "coconut" else cfg.lr
        for group in optimizer.param_groups:  # warm up over the first 100 steps, then constant
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        examples = data_rng.choices(train, k=cfg.batch_size)
        with autocast(device):
            if mode == "coconut":
                loss = latent_loss(model, *latent_batch(tok, examples, stage, cfg.c), tok.pad_id, cfg.rescale_thoughts)
            else:
                batch = [{"prompt": ex["prompt"], "answer": ex["cot" if mode == "cot" else "answer"]}
                         for ex in examples]
                _, loss = model(*make_batch(tok, batch, device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not guard.skip(step + 1, grad_norm, loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.log(mode=mode, step=step + 1, stage=stage, loss=loss.item(), grad_norm=grad_norm.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", stage=stage, refresh=False)
    return optimizer


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
    total = cfg.cot_steps + cfg.max_stage * cfg.stage_steps
    run_dir = make_run_dir(cfg.out_dir, "coconut", cfg)
    metrics = Metrics(run_dir)
    print(f"coconut: ProsQA-style {knobs}, {len(train)} train / {len(test)} held-out graphs, questions of "
          f"{longest} tokens, block {block_size}, {total} steps per mode, "
          f"device {d.device}, run dir {run_dir}")
    modes, results = cfg.modes.split(","), {}

    def finish(mode, model, minutes):
        res = evaluate_mode(model, tok, mode, test, cfg, max_new_tokens)
        metrics.log(mode=mode, step=total, eval_accuracy=res["accuracy"], eval_mean_tokens=res["mean_tokens"],
                    train_minutes=minutes)
        save_checkpoint(os.path.join(run_dir, "ckpt"), mode, model, tok)
        results[mode] = {**res, "train_minutes": round(minutes, 2)}
        print(f"{mode}: held-out accuracy {res['accuracy']:.3f}, {res['mean_tokens']:.1f} tokens per answer, "
              f"{minutes:.1f} min of training", flush=True)

    latent_steps = cfg.max_stage * cfg.stage_steps
    if "nocot" in modes:
        model, t0 = new_model(cfg, tok, block_size, d.device), time.time()
        train_steps(model, new_optimizer(model, cfg, d.device),
                    "nocot", [0] * total, cfg, tok, train, random.Random(cfg.seed), d.device, metrics)
        finish("nocot", model, (time.time() - t0) / 60)
    if "cot" in modes or "coconut" in modes:
        # Stage 0 is the language chain for cot_steps steps, shared: the CoT model goes on with it,
        # Coconut's curriculum starts from this point (as the released GSM8K config starts
        # Coconut from a CoT checkpoint). Both then get latent_steps more: the same budget.
        model, t0, data_rng = new_model(cfg, tok, block_size, d.device), time.time(), random.Random(cfg.seed)
        optimizer = train_steps(model, new_optimizer(model, cfg, d.device),
                                "cot", [0] * cfg.cot_steps, cfg, tok, train, data_rng, d.device, metrics)
        stage0_minutes = (time.time() - t0) / 60
        snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict(), data_rng.getstate()))
        if "cot" in modes:
            t0 = time.time()
            train_steps(model, optimizer, "cot", [0] * latent_steps, cfg, tok, train, data_rng, d.device, metrics,
                        first_step=cfg.cot_steps)
            finish("cot", model, stage0_minutes + (time.time() - t0) / 60)
        if "coconut" in modes:
            model.load_state_dict(snapshot[0])
            optimizer = new_optimizer(model, cfg, d.device)
            optimizer.load_state_dict(snapshot[1])  # kept only when reset_optimizer is off
            data_rng.setstate(snapshot[2])
            t0, eval_seconds = time.time(), 0.0
            for stage in range(1, cfg.max_stage + 1):
                optimizer = train_steps(model, optimizer, "coconut", [stage] * cfg.stage_steps, cfg, tok, train,
                                        data_rng, d.device, metrics,
                                        first_step=cfg.cot_steps + (stage - 1) * cfg.stage_steps)
                if cfg.stage_eval and stage < cfg.max_stage:
                    # where the curriculum breaks, if it does (README); no choice is made on it
                    t1 = time.time()
                    res = evaluate_mode(model, tok, "coconut", test[:cfg.stage_eval], cfg, max_new_tokens, stage=stage)
                    eval_seconds += time.time() - t1
                    metrics.log(mode="coconut", step=cfg.cot_steps + stage * cfg.stage_steps, stage=stage,
                                stage_accuracy=res["accuracy"], stage_mean_tokens=res["mean_tokens"])
                    print(f"coconut stage {stage} (thoughts: {stage * cfg.c}): held-out accuracy "
                          f"{res['accuracy']:.3f} on {min(cfg.stage_eval, len(test))}", flush=True)
            finish("coconut", model, stage0_minutes + (time.time() - t0 - eval_seconds) / 60)
    names = {"nocot": "no-CoT", "cot": "CoT", "coconut": f"Coconut (c={cfg.c}, {cfg.max_stage} stages)"}
    print("\n| mode | held-out accuracy | tokens per answer | training minutes |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {names[mode]} | {100 * r['accuracy']:.1f}% | {r['mean_tokens']:.1f} | {r['train_minutes']:.1f} |")
    result = {f"{m}_accuracy": r["accuracy"] for m, r in results.items()}
    result.update({f"{m}_tokens": r["mean_tokens"] for m, r in results.items() if m != "nocot"})
    result.update({f"{m}_train_minutes": r["train_minutes"] for m, r in results.items()})
    result.update(peak_rss_mb=peak_rss_mb(), steps_per_mode=total)
    print_result(run_dir, result)
    teardown_distributed()


if __name__ == "__main__":
    main()
