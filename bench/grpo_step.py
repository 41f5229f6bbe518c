"""
Where the time of one GRPO step goes, on the default arithmetic configuration.

    python bench/grpo_step.py                            # base from `make grpo` if present
    python bench/grpo_step.py --init=runs/sft-.../ckpt/step_001500 --steps=20 --threads=2

Runs --steps GRPO steps (32 prompts x G=8, mu=1, the script's defaults) after 2 warm-up steps,
twice, side by side: "shared" as algos/grpo.py runs it (each prompt prefilled once for its G
samples, and run once for its G completions in the training forward, sampler.SharedPrefix) and
"per-row" (every row carries its own copy of the prompt: the plain twins). For each it prints
the median milliseconds per step split into sampling (sampler.generate with the KV cache),
scoring (decode + the task's reward), log-prob / loss / backward (kernels.hidden_logprobs,
grpo_loss, autograd) and the optimizer (clip + AdamW), then the per-row / shared ratios.
Without a trained base the model is freshly initialised: it rarely emits EOS, so every
completion runs to max_new_tokens and sampling is slower than in a real run (it says so).
"""
import argparse
import os
import random
import sys
import time

import torch

# bench/sampler.py would shadow the top-level sampler.py: take bench/ off the path
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.join(os.path.dirname(_here), "algos"))
import grpo  # noqa: E402
from data import arithmetic  # noqa: E402
from data.tokenizers import CharTokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plumbing import load_model  # noqa: E402
import rl  # noqa: E402
from sampler import completion_logprobs, sample_texts  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group_size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = grpo.Config(prompts_per_step=args.prompts, group_size=args.group_size, init=args.init or "x")
    init = args.init or rl.base_dir_for(cfg)
    tok = CharTokenizer()
    if init and os.path.exists(init):
        model, what = load_model(init, "cpu"), f"base {init}"
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=4, n_head=8, n_embd=128))
        what = "a freshly initialised model (no base found: completions run to max_new_tokens)"
    train = arithmetic.dataset(cfg.n_train, "train", seed=cfg.seed, digits=cfg.digits)
    max_new = max(len(tok.encode(ex["answer"])) for ex in train) + 8
    rng, G = random.Random(0), cfg.group_size
    print(f"GRPO step, {model.get_num_params() / 1e6:.2f}M params, {args.prompts} prompts x G={G}, "
          f"{torch.get_num_threads()} threads, max_new_tokens {max_new}, {what}")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    medians = {}
    for mode, share in (("shared", G), ("per-row", 1)):
        model.load_state_dict(start)  # both modes take the same steps from the same weights
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr)
        rng = random.Random(0)
        phases = {"sampling": [], "scoring": [], "logprob+loss+backward": [], "optimizer": [], "total": []}
        tokens = []
        for step in range(args.steps + 2):
            unique = rng.choices(train, k=args.prompts)
            problems = [p for p in unique for _ in range(G)]
            sample_from = unique if share > 1 else problems
            t0 = time.perf_counter()
            out, texts, finished = sample_texts(model, tok, [p["prompt"] for p in sample_from], max_new,
                                                temperature=1.0, seed=step, num_samples=share)
            t1 = time.perf_counter()
            rewards = torch.tensor([arithmetic.reward(p["prompt"], t) if f else 0.0
                                    for p, t, f in zip(problems, texts, finished)])
            adv = grpo.group_advantages(rewards.view(-1, G), cfg.advantage).view(-1)
            prompts = [[tok.bos_id] + tok.encode(p["prompt"]) for p in problems]
            t2 = time.perf_counter()
            lp, ent = completion_logprobs(model, prompts, out.tokens, out.lengths, cfg.temperature,
                                          return_entropy=True, pad_id=tok.pad_id, group_size=share)
            w = rl.token_weights(out.mask(), cfg.loss_agg, max_new)
            loss, _ = rl.clipped_policy_loss(lp, lp.detach(), None, adv, w, cfg, entropy=ent)
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if step >= 2:
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    phases[k].append(v)
                tokens.append(out.lengths.float().mean().item())
        medians[mode] = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
        print(f"{mode}: mean completion length {sum(tokens) / len(tokens):.1f} tokens")
        for k, v in medians[mode].items():
            print(f"  {k:24s} {v * 1e3:8.1f} ms  {v / medians[mode]['total']:6.1%}")
    print("per-row / shared: " + ", ".join(f"{k} {medians['per-row'][k] / medians['shared'][k]:.2f}x"
                                           for k in ("sampling", "logprob+loss+backward", "total")))
    total = medians["shared"]["total"]
    print(f"shared total {total * 1e3:.1f} ms per step; target <= 200 ms: {'met' if total <= 0.2 else 'NOT met'}")

if __name__ == "__main__":
    main()
