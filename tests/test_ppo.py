import json
import math
import os
import subprocess
import sys

import pytest
import torch

from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig
from plumbing import save_checkpoint
import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import ppo  # noqa: E402


def naive_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the row's valid tokens, V after the end = 0."""
    B, N = rewards.shape
    adv = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        for t in range(n):
            total = 0.0
            for l in range(n - t):
                s = t + l
                next_v = values[b, s + 1].item() if s + 1 < n else 0.0
                delta = rewards[b, s].item() + gamma * next_v - values[b, s].item()
                total += (gamma * lam) ** l * delta
            adv[b, t] = total
    return adv


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_double_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 5, 8, 3])
    mask = (torch.arange(8)[None] < lengths[:, None]).float()
    rewards = torch.randn(4, 8, generator=g, dtype=torch.float64)
    values = torch.randn(4, 8, generator=g, dtype=torch.float64)
    # padding holds garbage: it must not leak into the valid positions
    adv, ret = ppo.gae(rewards, values, mask.double(), gamma, lam)
    ref = naive_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, ref, atol=1e-12)
    assert torch.allclose(ret, (ref + values) * mask, atol=1e-12)
    assert torch.all(adv[mask == 0] == 0)


def test_gae_hand_computed():
    # one row of 2 tokens, gamma 1, lam 0.5: delta_1 = 1 + 0 - 0.5, delta_0 = 0 + 0.5 - 0.2
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.5]]), torch.ones(1, 2), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.3 + 0.5 * 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.75, 1.0]]))


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, -50.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    w = ppo.masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expect = (valid - valid.mean()) / (valid.std(unbiased=False) + 1e-8)
    assert torch.allclose(w[mask.bool()], expect)
    assert torch.all(w[~mask.bool()] == 0)
    x2 = x.clone()
    x2[mask == 0] = 1e6  # whatever sits in the padding changes nothing
    assert torch.equal(ppo.masked_whiten(x2, mask), w)


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 1.0]])
    ret = torch.tensor([[1.0, 1.0]])
    w = torch.tensor([[0.5, 0.5]])
    # token 0: V = 0.5, clipped to 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64 (the clip wins)
    # token 1: V = 1.1, inside the range: both 0.01
    loss, frac = ppo.value_loss(torch.tensor([[0.5, 1.1]]), old, ret, w, eps_v=0.2)
    assert math.isclose(loss.item(), 0.5 * (0.5 * 0.64 + 0.5 * 0.01), rel_tol=1e-6)
    assert frac == 0.5


def test_ppo_policy_loss_with_per_token_advantages_hand_computed():
    c = ppo.Config(init="x")
    lp = torch.tensor([[-1.0, -0.5]])
    old = torch.tensor([[-1.2, -0.1]])  # ratios 1.2214 and 0.6703
    adv = torch.tensor([[1.0, -2.0]])
    loss, s = rl.clipped_policy_loss(lp, old, None, adv, torch.tensor([[0.5, 0.5]]), c)
    # token 0 (A = 1): -min(1.2214, 1.2) = -1.2; token 1 (A = -2): -min(-1.3406, -1.6) = 1.6
    assert math.isclose(loss.item(), 0.5 * (-1.2) + 0.5 * 1.6, rel_tol=1e-6)
    assert s["clip_low"] == 0.5 and s["clip_high"] == 0.5


def test_explained_variance_and_adaptive_beta():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ret = torch.tensor([[1.0, 3.0, 0.0]])
    assert math.isclose(ppo.explained_variance(ret.clone(), ret, mask), 1.0)
    assert math.isclose(ppo.explained_variance(torch.full((1, 3), 2.0), ret, mask), 0.0, abs_tol=1e-7)
    # returns 1, 3, 5 (variance 8/3), values 1, 3, 3: errors 0, 0, 2 (variance 8/9), so 1 - 1/3
    values, returns = torch.tensor([[1.0, 3.0, 3.0, 9.0]]), torch.tensor([[1.0, 3.0, 5.0, 0.0]])
    assert math.isclose(ppo.explained_variance(values, returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]])), 2 / 3,
                        rel_tol=1e-6)
    assert math.isclose(ppo.adapt_beta(0.1, kl=0.04, target=0.02, n_steps=100, horizon=1000), 0.1 * 1.02)
    assert math.isclose(ppo.adapt_beta(0.1, kl=0.019, target=0.02, n_steps=100, horizon=1000),
                        0.1 * (1 - 0.05 * 0.1))


@pytest.mark.parametrize("kw, msg", [(dict(critic="none"), "critic"), (dict(beta=-1.0), "beta"),
                                     (dict(lam=1.5), "lam"), (dict(eps=0.0), "eps"),
                                     (dict(ppo_epochs=0), "ppo_epochs")])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ppo.Config(**kw)


@pytest.mark.parametrize("args", [[], ["--critic=separate", "--target_kl=0.01", "--critic_warmup_steps=1"]])
def test_ppo_smoke_run(tmp_path, args):
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(str(tmp_path / "base"), "step_0", model, tok)
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "ppo.py"), f"--init={tmp_path / 'base'}",
                        "--digits=1", "--n_train=50", "--n_test=10", "--prompts_per_step=4",
                        "--samples_per_prompt=2", "--ppo_epochs=2", "--minibatches=2", "--max_steps=3",
                        "--eval_every=2", f"--out_dir={tmp_path / 'run'}", "--device=cpu", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    for key in ("base_accuracy", "final_accuracy", "minutes", "peak_rss_mb"):
        assert res[key] is not None
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if "value_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("policy_loss", "value_loss", "explained_variance", "approx_kl", "clip_frac", "clip_low",
                "clip_high", "value_clip_frac", "returns_mean", "returns_std", "adv_mean", "adv_std",
                "entropy", "mixed_groups", "kl", "beta", "grad_norm", "sample_tok_s", "train_tok_s"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    if "--target_kl=0.01" in args:
        assert len({r["beta"] for r in train_rows}) > 1  # the controller moved beta
