"""
DPO (arXiv 2305.18290), conservative DPO, IPO (arXiv 2310.12036), and Iterative Reasoning
Preference Optimization (IRPO, arXiv 2404.19733): learning from pairs (prompt, chosen, rejected)
instead of from rewards, with a frozen reference model.

    python algos/dpo.py                            # offline DPO on pairs sampled from the weak base
    python algos/dpo.py --loss=ipo --beta=0.5      # IPO;  --loss=cdpo --cdpo_eps=0.1: cDPO
    python algos/dpo.py --data=pairs.jsonl --init=runs/sft-.../ckpt/step_001000
    python algos/dpo.py --iterations=3 --alpha=1   # IRPO: 3 rounds of sample -> pair -> DPO + NLL
    torchrun --nproc_per_node=2 algos/dpo.py --init=...

Offline (iterations = 0): the pairs come from --data (JSONL {"prompt", "chosen", "rejected"}), or,
without it, from the starting model: N completions per training prompt are sampled, scored with
the task's verifiable reward, and a correct one is paired with an incorrect one (written to the
run dir as pairs_1.jsonl). Iterative (IRPO, iterations = T): T rounds of that, each training
from the previous round's model with that model as the reference.

Reference log-probs are computed once per pair file and cached beside it, keyed by a hash of the
reference checkpoint and of the file, so a stale cache is never used (--ref_cache=False: compute
them on the fly from a frozen copy). A tenth of the prompts (val_fraction) are held out to
measure reward accuracy; task accuracy is measured on the task's held-out split. Ends with
`RESULT {json}` (base_accuracy, final_accuracy, reward_accuracy, and iteration_accuracy in IRPO).
"""
import hashlib
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import TASKS, task_knobs
from data.jsonl import JSONLError, read_jsonl, write_jsonl
from data.tokenizers import CharTokenizer
from plumbing import (Metrics, StepGuard, autocast, cli_config, load_model, load_state, print_result,
                      resolve_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state,
                      setup_distributed, teardown_distributed)
from rl import all_reduce_, evaluate_policy, record_eval, run_result, start_run
from sampler import completion_logprobs, rollout


@dataclass
class Config:
    # task (pairs are made from the train split; accuracy is measured on the disjoint test split)
    task: str = "arithmetic"     # arithmetic | countdown
    digits: int = 3              # arithmetic
    op: str = "+"                # arithmetic
    n_numbers: int = 4           # countdown
    max_number: int = 50         # countdown
    n_train: int = 50000
    n_test: int = 500
    # starting model (and first reference)
    init: str = ""               # SFT checkpoint (or run dir); "" = the weak base grpo.py uses
    base_accuracy: float = 0.3   # without init: make / reuse the SFT base stopped at this accuracy
    base_dir: str = ""
    # preference pairs
    data: str = ""               # offline: a JSONL file of pairs; "" = sample them from the model
    pair_prompts: int = 8000     # training prompts sampled per round of pair making
    samples_per_prompt: int = 8  # N completions per prompt (IRPO paper: 30)
    pairs_per_prompt: int = 4    # K pairs drawn from winners x losers per prompt (paper: 10)
    temperature: float = 1.0     # sampling temperature for pair making (the loss uses T = 1)
    max_new_tokens: int = 0      # 0 = longest answer in the data + 8
    val_fraction: float = 0.1    # prompts whose pairs are held out for reward accuracy
    # objective
    loss: str = "dpo"            # dpo | cdpo | ipo
    beta: float = 0.1            # DPO's beta; for IPO the regulariser tau (target margin 1 / (2 beta))
    cdpo_eps: float = 0.1        # cdpo: probability that a pair's label is flipped
    alpha: float = 0.0           # weight of the NLL on the chosen response, per token (IRPO: 1)
    ref_cache: bool = True       # reference log-probs computed once and cached; False = each step
    # optimisation
    iterations: int = 0          # 0 = offline DPO on one set of pairs; T >= 1 = IRPO with T rounds
    epochs: int = 2              # passes over each round's training pairs
    batch_size: int = 64         # pairs per optimizer step, global (split across ranks)
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_bad_steps: int = 5     # non-finite steps in a row before the run stops (plumbing.StepGuard)
    # run
    eval_every: int = 50         # steps between held-out evaluations (also at each round's end)
    out_dir: str = ""
    resume: str = ""
    seed: int = 1337
    device: str = ""

    def __post_init__(self):
        choices = dict(task=TASKS, loss=("dpo", "cdpo", "ipo"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        for name in ("pair_prompts", "samples_per_prompt", "pairs_per_prompt", "epochs", "batch_size",
                     "eval_every", "n_train", "n_test", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: a pair needs a winner and a loser")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.cdpo_eps < 0.5:
            raise ValueError(f"cdpo_eps must be in [0, 0.5), got {self.cdpo_eps}")
        if self.alpha < 0 or self.weight_decay < 0:
            raise ValueError("alpha and weight_decay must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0 (0 = offline), got {self.iterations}")
        if self.iterations and self.data:
            raise ValueError("--data is for offline DPO; IRPO (iterations >= 1) samples its own pairs")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")


# ---- the objective: a pure function of sequence log-probs --------------------------------------

def preference_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, cfg):
    """Per-pair losses (B,) and stats, from sequence log-probs (B,) summed over response tokens
    (EOS included, prompt and padding not) of the chosen (w) and rejected (l) responses under the
    policy (pi, with grad) and the reference (ref), and the responses' token counts.

    With the log-ratio difference  u = (pi_w - ref_w) - (pi_l - ref_l)  and  h = beta * u:
        dpo:  -log sigmoid(h)                                   (2305.18290 eq. 7)
        cdpo: -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)   (labels flipped with prob. eps)
        ipo:  (u' - 1 / (2 beta))^2, u' with each log-ratio averaged over its response's tokens
              instead of summed, and not multiplied by beta: beta is IPO's tau (2310.12036 eq. 17)
    plus, when alpha > 0, IRPO's NLL on the winner normalised by its length (2404.19733 eq. 1):
        + alpha * (-pi_w / len_w).
    The implicit reward of a response is beta * (pi - ref); reward accuracy counts the pairs
    whose chosen reward is strictly higher (with pi = ref every reward is 0: accuracy 0)."""
    ratio_w, ratio_l = pi_w - ref_w, pi_l - ref_l
    if cfg.loss == "ipo":
        losses = (ratio_w / len_w - ratio_l / len_l - 1 / (2 * cfg.beta)) ** 2
    else:
        h = cfg.beta * (ratio_w - ratio_l)
        eps = cfg.cdpo_eps if cfg.loss == "cdpo" else 0.0
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    nll = -pi_w / len_w
    if cfg.alpha > 0:
        losses = losses + cfg.alpha * nll
    with torch.no_grad():
        r_w, r_l = cfg.beta * ratio_w, cfg.beta * ratio_l
        stats = {"reward_accuracy": (r_w > r_l).float().mean().item(), "chosen_reward": r_w.mean().item(),
                 "rejected_reward": r_l.mean().item(), "margin": (r_w - r_l).mean().item(),
                 "nll": nll.mean().item(), "chosen_logp": pi_w.mean().item(),
                 "rejected_logp": pi_l.mean().item()}
    return losses, stats


# ---- pairs: made by sampling, stored as JSONL, encoded into token batches -----------------------

@torch.no_grad()
def make_pairs(model, tok, task, problems, cfg, max_new_tokens, seed):
    """Sample N = samples_per_prompt completions of each problem, label them with the task's
    reward, and draw up to K = pairs_per_prompt (winner, loser) pairs from the distinct correct x
    distinct incorrect answers (IRPO 2404.19733 sec. 2). Completions that never emitted EOS are
    neither: they have no answer, and their text plus EOS would be a response never sampled.
    Returns (pairs [{"prompt", "chosen", "rejected"}], stats)."""
    N, K = cfg.samples_per_prompt, cfg.pairs_per_prompt
    rng = random.Random(seed)
    pairs, n_correct, n_with_pairs = [], 0, 0
    per_chunk = max(1, 512 // N)
    for i in range(0, len(problems), per_chunk):
        chunk = problems[i:i + per_chunk]
        ro = rollout(model, tok, chunk, task.reward, N, max_new_tokens, temperature=cfg.temperature,
                     seed=seed + i)
        correct = (ro.rewards >= 1).tolist()
        finished = ro.finished.tolist()
        n_correct += sum(correct)
        for j, p in enumerate(chunk):
            rows = range(j * N, (j + 1) * N)
            winners = sorted({ro.texts[r] for r in rows if correct[r]})
            losers = sorted({ro.texts[r] for r in rows if finished[r] and not correct[r]})
            combos = [(w, l) for w in winners for l in losers]
            n_with_pairs += bool(combos)
            for w, l in rng.sample(combos, min(K, len(combos))):
                pairs.append({"prompt": p["prompt"], "chosen": w, "rejected": l})
    return pairs, {"sample_accuracy": n_correct / (N * len(problems)),
                   "prompts_with_pairs": n_with_pairs / len(problems)}


def split_by_prompt(records, val_fraction, seed):
    """(train, val): the pairs of a random val_fraction of the distinct prompts are held out, so
    no held-out prompt was trained on."""
    prompts = sorted({r["prompt"] for r in records})
    random.Random(seed).shuffle(prompts)
    val = set(prompts[:int(round(val_fraction * len(prompts)))])
    return [r for r in records if r["prompt"] not in val], [r for r in records if r["prompt"] in val]


def encode_pairs(tok, records, block_size, where):
    """Records -> (prompts: BOS + prompt ids per pair, responses: [chosen ids + EOS, rejected ids
    + EOS] per pair). Any record that cannot be encoded or does not fit block_size is an error
    naming `where` (the file) and the record's line."""
    prompts, responses = [], []
    for i, r in enumerate(records):
        try:
            p = [tok.bos_id] + tok.encode(r["prompt"])
            c, l = tok.encode(r["chosen"]) + [tok.eos_id], tok.encode(r["rejected"]) + [tok.eos_id]
        except ValueError as e:
            raise SystemExit(f"{where}:{r.get('_line', i + 1)}: {e}")
        n = len(p) + max(len(c), len(l))
        if n - 1 > block_size:  # the forward reads every token but the last
            raise SystemExit(f"{where}:{r.get('_line', i + 1)}: BOS + prompt + response + EOS is {n} "
                             f"tokens, more than the model's block_size {block_size} + 1")
        prompts.append(p)
        responses.append((c, l))
    return prompts, responses


def pair_batch(prompts, responses, idx, pad_id, device):
    """The pairs idx as rows chosen_0, rejected_0, chosen_1, ... (each prompt's two rows adjacent,
    so the training forward runs the prompt once for both): prompts (2b lists), tokens (2b, N)
    right-padded, lengths (2b,)."""
    rows = [resp for i in idx for resp in responses[i]]
    tokens = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return [prompts[i] for i in idx for _ in range(2)], tokens.to(device), lengths.to(device)


def pair_logprobs(model, prompts, tokens, lengths, pad_id):
    """Sequence log-probs (b, 2) [chosen, rejected]: sums of the response tokens' log-probs at
    temperature 1, from the fused hidden -> log-prob forward (padding is 0 there)."""
    lp = completion_logprobs(model, prompts, tokens, lengths, 1.0, pad_id=pad_id, group_size=2)
    return lp.sum(1).view(-1, 2)


# ---- reference log-probs, computed once and cached on disk ---------------------------------------

def ref_cache_key(ref_ckpt, data_path):
    """sha256 over the reference checkpoint's files (weights, config, tokenizer) and the pair
    file: any change to either gives another key."""
    h = hashlib.sha256()
    for path in [os.path.join(ref_ckpt, f) for f in ("model.safetensors", "model_config.json",
                                                       "tokenizer.json")] + [data_path]:
        h.update(os.path.basename(path).encode())
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def load_ref_cache(path, key):
    """The cached (n_pairs, 2) reference log-probs, or None (with the reason printed) if there is
    no cache or it was made for another reference or another pair file."""
    if not os.path.isfile(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file is a miss, not a crash
        print(f"reference cache {path} is unreadable ({e}); recomputing")
        return None
    if saved.get("key") != key:
        print(f"reference cache {path} is stale (made for another reference checkpoint or pair "
              f"file); recomputing")
        return None
    return saved["logprobs"]


@torch.no_grad()
def all_pair_logprobs(model, prompts, responses, pad_id, device, batch_size=256):
    """(n_pairs, 2) sequence log-probs of every pair under model (the reference, or the policy
    for held-out metrics), in batches, no grad, on the CPU."""
    out = []
    for i in range(0, len(prompts), batch_size):
        idx = range(i, min(i + batch_size, len(prompts)))
        with autocast(device):
            out.append(pair_logprobs(model, *pair_batch(prompts, responses, idx, pad_id, device), pad_id).float())
    return torch.cat(out).cpu()


@torch.no_grad()
def pair_metrics(model, prompts, responses, ref_lp, cfg, pad_id, device, batch_size=256):
    """Held-out pair numbers: reward accuracy, margin, and the policy's own preference (fraction of
    pairs with log pi(chosen) > log pi(rejected), which is not 0 at the start)."""
    lp = all_pair_logprobs(model, prompts, responses, pad_id, device, batch_size)
    lens = torch.tensor([[len(c), len(l)] for c, l in responses], dtype=torch.float32)
    _, s = preference_loss(lp[:, 0], lp[:, 1], ref_lp[:, 0], ref_lp[:, 1], lens[:, 0], lens[:, 1], cfg)
    return {"val_reward_accuracy": s["reward_accuracy"], "val_margin": s["margin"],
            "val_logp_accuracy": (lp[:, 0] > lp[:, 1]).float().mean().item()}


# ---- the script ---------------------------------------------------------------------------------

def main():
    cfg = cli_config(Config)
    d = setup_distributed(cfg.device or None)
    seed_everything(cfg.seed + d.rank)
    tok = CharTokenizer()
    method = "irpo" if cfg.iterations else "dpo"
    task, train, test, max_new_tokens, per_rank, run_dir, model = start_run(cfg, method, d, tok, cfg.batch_size)
    ckpt_dir = os.path.join(run_dir, "ckpt")
    rounds, k = max(1, cfg.iterations), cfg.samples_per_prompt
    # state survives a resume: where we are, the reference of the current round, what we measured
    state = {"round": 1, "round_step": 0, "step": 0, "ref": resolve_checkpoint(cfg.init) if cfg.init else None,
             "base": None, "iteration_accuracy": [], "best": {"accuracy": -1.0, "step": None}}
    saved = None
    if cfg.resume:
        saved = load_state(run_dir)
        state = saved["state"]
        set_rng_state(saved["rng"])
    metrics = Metrics(run_dir, d.master, resume_step=state["step"] if cfg.resume else None)
    guard = StepGuard(cfg.max_bad_steps, metrics, method)
    if d.master:
        print(f"{method}: {cfg.task} {task_knobs(cfg)}, {model.get_num_params() / 1e6:.2f}M params from "
              f"{resolve_checkpoint(cfg.resume and run_dir or cfg.init)}, loss {cfg.loss} beta {cfg.beta} "
              f"alpha {cfg.alpha}, {rounds} round(s), device {d.device}, {d.world_size} process(es), "
              f"run dir {run_dir}")

    def evaluate_held_out(val):
        """Held-out task accuracy (greedy), pass@N and mean tokens, and the held-out pair metrics."""
        if not d.master:
            return None
        res = evaluate_policy(model, tok, test, task, max_new_tokens, k, cfg.temperature, cfg.seed + 7)
        if val is not None:
            res.update(pair_metrics(model, *val, cfg, tok.pad_id, d.device))
        record_eval(state, res, state["step"], metrics, round=state["round"])
        state["last"] = res  # so a resume after the last round still reports it
        return res

    def save():
        name = f"step_{state['step']:06d}"
        if d.master:
            save_checkpoint(ckpt_dir, name, model, tok, optimizer, {"state": state, "rng": rng_state()})
        if d.world_size > 1:
            dist.barrier()

    t_start, last = time.time(), None
    while state["round"] <= rounds:
        rnd = state["round"]
        # 1. the round's pairs: the given file, or sampled from the current model (= the reference)
        pairs_path = cfg.data or os.path.join(run_dir, f"pairs_{rnd}.jsonl")
        if not cfg.data and (state["round_step"] == 0 or not os.path.isfile(pairs_path)):
            mine, stats = make_pairs(model, tok, task, random.Random(cfg.seed * 1000 + rnd).sample(
                train, min(cfg.pair_prompts, len(train)))[d.rank::d.world_size], cfg, max_new_tokens,
                seed=(cfg.seed * 1000 + rnd) * 1000 + d.rank)
            gathered = [mine]
            if d.world_size > 1:
                gathered = [None] * d.world_size
                dist.all_gather_object(gathered, mine)
            if d.master:
                write_jsonl(pairs_path, [p for part in gathered for p in part])
                metrics.log(step=state["step"], round=rnd, **stats)
                print(f"round {rnd}: sampled {k} per prompt, accuracy {stats['sample_accuracy']:.3f}, "
                      f"{stats['prompts_with_pairs']:.2f} of prompts gave pairs: "
                      f"{sum(map(len, gathered))} pairs -> {pairs_path}", flush=True)
            if d.world_size > 1:
                dist.barrier()
        try:
            records = read_jsonl(pairs_path, "preference")
        except JSONLError as e:
            raise SystemExit(f"{method}: {e}")
        for i, r in enumerate(records):
            r["_line"] = i + 1
        train_pairs, val_pairs = split_by_prompt(records, cfg.val_fraction, cfg.seed)
        if len(train_pairs) < cfg.batch_size:
            raise SystemExit(f"{method}: {pairs_path} has {len(train_pairs)} training pairs, fewer than "
                             f"batch_size {cfg.batch_size}")
        tr = encode_pairs(tok, train_pairs, model.config.block_size, pairs_path)
        va = encode_pairs(tok, val_pairs, model.config.block_size, pairs_path) if val_pairs else None

        # 2. reference log-probs of every pair, once (cached beside the pair file) or per step
        ref = ref_lp = val_ref = None
        if cfg.ref_cache:
            cache = pairs_path + ".ref.pt"
            key = ref_cache_key(state["ref"], pairs_path)
            both = load_ref_cache(cache, key)
            if both is None and d.master:
                ref_model = load_model(state["ref"], d.device).eval()
                both = {"train": all_pair_logprobs(ref_model, *tr, tok.pad_id, d.device),
                        "val": all_pair_logprobs(ref_model, *va, tok.pad_id, d.device) if va else None}
                torch.save({"key": key, "logprobs": both}, cache + ".tmp")
                os.replace(cache + ".tmp", cache)
            if d.world_size > 1:
                dist.barrier()
                both = load_ref_cache(cache, key)
            ref_lp, val_ref = both["train"], both["val"]
        else:
            ref = load_model(state["ref"], d.device).eval().requires_grad_(False)
            if d.master and va:
                val_ref = all_pair_logprobs(ref, *va, tok.pad_id, d.device)
        val = (*va, val_ref) if va else None

        # 3. DPO on the round's pairs, from the current model, with a fresh optimizer
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=d.device.type)
        if saved is not None and state["round_step"] > 0:
            optimizer.load_state_dict(saved["optimizer"])
        saved = None
        per_epoch = len(train_pairs) // cfg.batch_size
        n_steps = cfg.epochs * per_epoch
        if state["step"] == 0 and state["round_step"] == 0 and rnd == 1:
            last = evaluate_held_out(val)
            if d.master:
                state["iteration_accuracy"] = [last["accuracy"]]
                print(f"step 0: held-out accuracy {last['accuracy']:.3f}"
                      + (f", pair logp accuracy {last['val_logp_accuracy']:.3f}" if val else ""), flush=True)
            save()
        bar = tqdm(total=n_steps, initial=state["round_step"], desc=f"{method} round {rnd}/{rounds}",
                   disable=not d.master)
        while state["round_step"] < n_steps:
            t0 = time.time()
            epoch, j = divmod(state["round_step"], per_epoch)
            perm = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(
                (cfg.seed * 1000 + rnd) * 1000 + epoch))  # the same order on every rank
            idx = perm[j * cfg.batch_size:(j + 1) * cfg.batch_size][d.rank::d.world_size].tolist()
            prompts, tokens, lengths = pair_batch(*tr, idx, tok.pad_id, d.device)
            with autocast(d.device):
                lp = pair_logprobs(model, prompts, tokens, lengths, tok.pad_id)
                if ref is not None:
                    with torch.no_grad():
                        r_lp = pair_logprobs(ref, prompts, tokens, lengths, tok.pad_id)
            r_lp = ref_lp[idx].to(d.device) if ref is None else r_lp.float()
            lens = lengths.view(-1, 2).float()
            losses, s = preference_loss(lp[:, 0], lp[:, 1], r_lp[:, 0], r_lp[:, 1], lens[:, 0], lens[:, 1], cfg)
            (losses.sum() / cfg.batch_size).backward()  # the global mean: rank gradients are summed
            all_reduce_([p.grad for p in model.parameters() if p.grad is not None], d.world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            if not guard.skip(state["step"] + 1, grad_norm, losses.sum()):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["round_step"] += 1
            state["step"] += 1
            s["loss"] = losses.mean().item()
            if d.world_size > 1:  # every rank holds an equal share of the batch: the mean of means
                v = torch.tensor(list(s.values()), device=d.device)
                all_reduce_([v], d.world_size)
                s = dict(zip(s, (v / d.world_size).tolist()))
            metrics.log(step=state["step"], round=rnd, grad_norm=grad_norm, step_s=time.time() - t0,
                        elapsed=time.time() - t_start, **s)
            bar.update(1)
            bar.set_postfix(loss=f"{s['loss']:.3f}", racc=f"{s['reward_accuracy']:.2f}",
                            acc=None if last is None else f"{last['accuracy']:.3f}", refresh=False)
            if state["round_step"] % cfg.eval_every == 0 and state["round_step"] < n_steps:
                last = evaluate_held_out(val)
                save()
                if d.master:
                    bar.write(f"step {state['step']}: held-out accuracy {last['accuracy']:.3f}"
                              + (f", val reward accuracy {last['val_reward_accuracy']:.3f}" if val else "")
                              + f", loss {s['loss']:.4f}")
        bar.close()
        # 4. the round's model: evaluated, saved, and the reference of the next round
        last = evaluate_held_out(val)
        if d.master:
            state["iteration_accuracy"].append(last["accuracy"])
            print(f"round {rnd} done (step {state['step']}): held-out accuracy {last['accuracy']:.3f}"
                  + (f", val reward accuracy {last['val_reward_accuracy']:.3f}" if val else ""), flush=True)
        state["round"], state["round_step"] = rnd + 1, 0
        state["ref"] = os.path.join(ckpt_dir, f"step_{state['step']:06d}")
        save()
    if d.master:
        base, last = state["base"] or {}, last or state.get("last") or {}
        result = run_result(state, last, k, state["step"], (time.time() - t_start) / 60, run_dir)
        result.update(reward_accuracy=last.get("val_reward_accuracy"),
                      base_logp_accuracy=base.get("val_logp_accuracy"),
                      final_logp_accuracy=last.get("val_logp_accuracy"))
        if cfg.iterations:
            result["iteration_accuracy"] = state["iteration_accuracy"]
        print_result(run_dir, result)
    teardown_distributed()


if __name__ == "__main__":
    main()
