"""
Where the time of one GRPO step goes, on the default arithmetic configuration.

    python bench/grpo_step.py                            # base from `make grpo` if present
    python bench/grpo_step.py --init=runs/sft-.../ckpt/step_001500 --steps=20 --threads=2

Runs --steps GRPO steps (32 prompts x G=8, mu=1, the script's defaults) after 2 warm-up steps
and prints the median seconds per step split into: sampling (sampler.generate with the KV
cache), scoring (decode + the task's reward), log-prob / loss / backward (the training forward
through kernels.hidden_logprobs, grpo_loss and autograd), and the optimizer (clip + AdamW).
The phases are the ones algos/grpo.py runs, called here one by one so that each can be timed.
Without a trained base the model is freshly initialised: it rarely emits EOS, so every
completion runs to max_new_tokens and sampling is slower than in a real run (it says so).
"""
import argparse
import os
import random
import sys
import time

import torch

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_root, "algos"))
import grpo  # noqa: E402
from data import arithmetic  # noqa: E402
from data.tokenizers import CharTokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from plumbing import load_model  # noqa: E402
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
    init = args.init or grpo.base_dir_for(cfg)
    tok = CharTokenizer()
    if init and os.path.exists(init):
        model, what = load_model(init, "cpu"), f"base {init}"
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=4, n_head=8, n_embd=128))
        what = "a freshly initialised model (no base found: completions run to max_new_tokens)"
    train = arithmetic.dataset(cfg.n_train, "train", seed=cfg.seed, digits=cfg.digits)
    max_new = max(len(tok.encode(ex["answer"])) for ex in train) + 8
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr)
    rng, G = random.Random(0), cfg.group_size
    phases = {"sampling": [], "scoring": [], "logprob+loss+backward": [], "optimizer": [], "total": []}
    print(f"GRPO step, {model.get_num_params() / 1e6:.2f}M params, {args.prompts} prompts x G={G}, "
          f"{torch.get_num_threads()} threads, max_new_tokens {max_new}, {what}")
    tokens = []
    for step in range(args.steps + 2):
        problems = [p for p in rng.choices(train, k=args.prompts) for _ in range(G)]
        t0 = time.perf_counter()
        out, texts, finished = sample_texts(model, tok, [p["prompt"] for p in problems], max_new,
                                            temperature=1.0, seed=step)
        t1 = time.perf_counter()
        rewards = torch.tensor([arithmetic.reward(p["prompt"], t) if f else 0.0
                                for p, t, f in zip(problems, texts, finished)])
        adv = grpo.group_advantages(rewards.view(-1, G), cfg.advantage).view(-1)
        prompts = [[tok.bos_id] + tok.encode(p["prompt"]) for p in problems]
        t2 = time.perf_counter()
        lp, ent = completion_logprobs(model, prompts, out.tokens, out.lengths, cfg.temperature,
                                      return_entropy=True, pad_id=tok.pad_id)
        w = grpo.token_weights(out.mask(), cfg.loss_agg, max_new)
        loss, _ = grpo.grpo_loss(lp, lp.detach(), None, adv, w, cfg, entropy=ent)
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
    med = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
    for k, v in med.items():
        print(f"  {k:24s} {v * 1e3:8.1f} ms  {v / med['total']:6.1%}")
    print(f"  mean completion length {sum(tokens) / len(tokens):.1f} tokens; "
          f"target <= 200 ms per step: {'met' if med['total'] <= 0.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
