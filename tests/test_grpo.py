import itertools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from data import arithmetic
from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig
from plumbing import save_checkpoint
from sampler import Rollout, completion_logprobs, generate, pass_at_k, rollout
import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import grpo  # noqa: E402


def cfg(**kw):
    base = dict(eps_low=0.2, eps_high=0.2, dual_clip=0.0, beta=0.0, kl_estimator="k3", kl_mode="loss",
                entropy_coef=0.0)
    return SimpleNamespace(**{**base, **kw})


def tiny_model(seed=0, n_layer=1, block_size=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=block_size,
                         n_layer=n_layer, n_head=2, n_embd=32))


def eos_prone_model(p_target_logit=4.6):
    """A random model that ends about half of its steps with EOS: ln_f's bias adds a direction v
    to every hidden state and EOS's (tied) embedding points along it."""
    model = tiny_model()
    eos = CharTokenizer().eos_id
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[eos] = p_target_logit / model.config.n_embd
    return model


# ---- advantages, KL, weights: hand-computed ---------------------------------------------------

def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    std = math.sqrt((4 * 0.25) / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    a = grpo.group_advantages(r, "grpo")
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # a flat group teaches nothing
    assert torch.allclose(grpo.group_advantages(r, "drgrpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # RLOO: 1 - mean(0, 0, 1) = 2/3 and 0 - mean(1, 0, 1) = -2/3
    assert torch.allclose(grpo.group_advantages(r, "rloo")[0], torch.tensor([2, -2, -2, 2]) / 3)


def test_rloo_is_leave_one_out():
    r = torch.rand(5, 6)
    a = grpo.group_advantages(r, "rloo")
    for i, j in itertools.product(range(5), range(6)):
        others = [r[i, k].item() for k in range(6) if k != j]
        assert math.isclose(a[i, j].item(), r[i, j].item() - sum(others) / 5, rel_tol=1e-5, abs_tol=1e-6)


def test_kl_estimators_hand_computed():
    lp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    # d = ref - lp = -1, 0
    assert torch.allclose(rl.kl_estimate(lp, ref, "k1"), torch.tensor([1.0, 0.0]))
    assert torch.allclose(rl.kl_estimate(lp, ref, "k2"), torch.tensor([0.5, 0.0]))
    assert torch.allclose(rl.kl_estimate(lp, ref, "k3"), torch.tensor([math.exp(-1) + 1 - 1, 0.0]))


def test_kl_estimators_are_unbiased_or_not_as_documented():
    # pi and pi_ref over 3 tokens; exact KL(pi || ref) vs the mean of each estimator over pi
    pi, ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    exact = (pi * (pi / ref).log()).sum()
    lp, lr = pi.log(), ref.log()
    assert torch.isclose((pi * rl.kl_estimate(lp, lr, "k1")).sum(), exact)
    assert torch.isclose((pi * rl.kl_estimate(lp, lr, "k3")).sum(), exact)
    assert not torch.isclose((pi * rl.kl_estimate(lp, lr, "k2")).sum(), exact)


def test_token_weights_hand_computed():
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(rl.token_weights(m, "token-mean", 3), m / 3)
    assert torch.allclose(rl.token_weights(m, "seq-mean-token-mean", 3),
                          torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]))
    assert torch.allclose(rl.token_weights(m, "seq-mean-token-sum-norm", 3), m / 6)


def test_overlong_penalty_hand_computed():
    pen = grpo.overlong_penalty(torch.tensor([3, 8, 9, 10, 12]), max_new_tokens=12, cache=4)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))


# ---- the loss -------------------------------------------------------------------------------

LP = torch.tensor([[-1.0, -0.5]])
OLD = torch.tensor([[-1.2, -0.1]])  # ratios e^0.2 = 1.2214 (above 1.2), e^-0.4 = 0.6703 (below 0.8)
W = torch.tensor([[0.5, 0.5]])


def test_loss_positive_advantage_hand_computed():
    loss, s = rl.clipped_policy_loss(LP, OLD, None, torch.tensor([1.0]), W, cfg())
    # token 0: min(1.2214, clip 1.2) = 1.2; token 1: min(0.6703, 0.8) = 0.6703
    assert math.isclose(loss.item(), -(1.2 + math.exp(-0.4)) / 2, rel_tol=1e-6)
    assert s["clip_high"] == 0.5 and s["clip_low"] == 0.0
    assert math.isclose(s["ratio_max"], math.exp(0.2), rel_tol=1e-6)


def test_loss_negative_advantage_hand_computed_and_dual_clip():
    loss, s = rl.clipped_policy_loss(LP, OLD, None, torch.tensor([-1.0]), W, cfg())
    # token 0: -min(-1.2214, -1.2) = 1.2214; token 1: -min(-0.6703, -0.8) = 0.8 (clipped low)
    assert math.isclose(loss.item(), (math.exp(0.2) + 0.8) / 2, rel_tol=1e-6)
    assert s["clip_low"] == 0.5 and s["clip_high"] == 0.0
    loss, _ = rl.clipped_policy_loss(LP, OLD, None, torch.tensor([-1.0]), W, cfg(dual_clip=1.1))
    assert math.isclose(loss.item(), (1.1 + 0.8) / 2, rel_tol=1e-6)  # 1.2214 capped at c * |A|


def test_loss_clip_higher_and_kl_and_entropy_terms():
    loss, s = rl.clipped_policy_loss(LP, OLD, None, torch.tensor([1.0]), W, cfg(eps_high=0.28))
    assert math.isclose(loss.item(), -(math.exp(0.2) + math.exp(-0.4)) / 2, rel_tol=1e-6)
    assert s["clip_high"] == 0.0
    ref = torch.tensor([[-2.0, -0.5]])
    loss, s = rl.clipped_policy_loss(LP, OLD, ref, torch.tensor([1.0]), W, cfg(beta=0.1))
    k3 = math.exp(-1) + 1 - 1  # token 0: d = -1; token 1: d = 0
    assert math.isclose(loss.item(), -(1.2 + math.exp(-0.4)) / 2 + 0.1 * k3 / 2, rel_tol=1e-6)
    assert math.isclose(s["kl"], k3 / 2, rel_tol=1e-6)
    ent = torch.tensor([[2.0, 4.0]])
    loss, _ = rl.clipped_policy_loss(LP, OLD, None, torch.tensor([1.0]), W, cfg(entropy_coef=0.01), entropy=ent)
    assert math.isclose(loss.item(), -(1.2 + math.exp(-0.4)) / 2 - 0.01 * 3.0, rel_tol=1e-6)


def test_clipped_token_gets_no_gradient():
    lp = LP.clone().requires_grad_(True)
    loss, _ = rl.clipped_policy_loss(lp, OLD, None, torch.tensor([1.0]), W, cfg())
    loss.backward()
    assert lp.grad[0, 0] == 0  # rho above 1 + eps with A > 0: clipped
    assert math.isclose(lp.grad[0, 1].item(), -0.5 * math.exp(-0.4), rel_tol=1e-6)


def test_on_policy_gradient_is_reinforce():
    torch.manual_seed(0)
    lp = torch.randn(4, 5).requires_grad_(True)
    mask = (torch.rand(4, 5) > 0.3).float()
    adv = torch.randn(4)
    w = rl.token_weights(mask, "seq-mean-token-mean", 5)
    loss, s = rl.clipped_policy_loss(lp, lp.detach(), None, adv, w, cfg())
    g, = torch.autograd.grad(loss, lp)
    reinforce, = torch.autograd.grad(-(w * adv[:, None] * lp).sum(), lp)
    assert torch.allclose(g, reinforce, atol=1e-7)
    assert s["ratio_mean"] == 1.0 and s["clip_low"] == s["clip_high"] == 0.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_equals_full_batch(agg):
    """Through the real model: micro-batches with the whole batch's normaliser give the full-batch
    gradient; normalising each micro-batch on its own (the known bug) does not, for token-mean."""
    model = tiny_model()
    tok = CharTokenizer()
    torch.manual_seed(1)
    prompts = [[tok.bos_id] + tok.encode(p) for p in ["12+3=", "7+80=", "1+1=", "45+67="]]
    tokens = torch.randint(0, 10, (4, 6))
    lengths = torch.tensor([6, 1, 3, 1])  # micro-batches of 6 and 5 tokens, 1 and 3 sequences
    adv = torch.tensor([1.0, -0.5, 0.3, -1.0])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()

    def grads(micro_batches, global_norm):
        model.zero_grad()
        w_all = rl.token_weights(mask, agg, 6)
        for rows in micro_batches:
            lp = completion_logprobs(model, [prompts[r] for r in rows], tokens[rows], lengths[rows])
            w = w_all[rows] if global_norm else rl.token_weights(mask[rows], agg, 6) / len(micro_batches)
            loss, _ = rl.clipped_policy_loss(lp, lp.detach(), None, adv[rows], w, cfg())
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grads([[0, 1, 2, 3]], True)
    accum = grads([[0], [1, 2, 3]], True)
    assert torch.allclose(full, accum, atol=1e-7, rtol=1e-5)
    if agg != "seq-mean-token-sum-norm":  # the constant normaliser cannot go wrong this way
        naive = grads([[0], [1, 2, 3]], False)
        assert (full - naive).norm() > 0.05 * full.norm()


# ---- rollouts and log-probs --------------------------------------------------------------------

@pytest.mark.parametrize("temperature, pad_is_stop", [(1.0, False), (0.7, False), (1.0, True)])
def test_completion_logprobs_match_the_sampler(temperature, pad_is_stop):
    """The training forward re-scores the sampled tokens with the probabilities they were drawn
    with: ragged prompts, rows stopping at different steps, the stop token itself scored, and
    nothing after it, also when the pad id is a stop id (masks come from lengths alone)."""
    model = tiny_model(n_layer=2)
    tok = CharTokenizer()
    prompts = [[tok.bos_id] + tok.encode(p) for p in ["1+2=", "123+456=", "9="]]
    pad = 7 if pad_is_stop else tok.pad_id
    out = generate(model, prompts, 10, temperature=temperature, stop_tokens=range(30), seed=3,
                   pad_id=pad)
    assert len(set(out.lengths.tolist())) > 1
    lp, ent = completion_logprobs(model, prompts, out.tokens, out.lengths, temperature,
                                  return_entropy=True, pad_id=pad)
    mask = out.mask().bool()
    assert torch.allclose(lp, out.logprobs, atol=1e-5)
    assert torch.all(lp[~mask] == 0) and torch.all(ent[~mask] == 0)
    for b, n in enumerate(out.lengths.tolist()):
        if n < 10:  # stopped: the stop token is the last masked-in token and has a real log-prob
            assert out.tokens[b, n - 1] < 30 and mask[b, n - 1] and lp[b, n - 1] < 0
    # entropy: recompute the full forward of row 1 and read the distribution before each token
    L = len(prompts[1])
    seq = torch.tensor(prompts[1] + out.tokens[1, :out.lengths[1]].tolist())[None]
    logits, _ = model(seq)
    p = torch.softmax(logits[0, L - 1:L - 1 + out.lengths[1]] / temperature, -1)
    assert torch.allclose(ent[1, :out.lengths[1]], -(p * p.log()).sum(-1), atol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "rope", "none"])
def test_shared_prefix_equals_one_forward_per_row(pos):
    """group_size = G runs each prompt once for its G completions: log-probs, entropies and
    the gradient of every parameter equal the plain per-row forward (its slow twin)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=CharTokenizer().vocab_size, block_size=32, n_layer=2, n_head=2,
                          n_embd=32, pos=pos))
    tok = CharTokenizer()
    G = 3
    prompts = [[tok.bos_id] + tok.encode(p) for p in ["1+2=", "123+456=", "9="] for _ in range(G)]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (9, 7), generator=g)
    lengths = torch.tensor([1, 7, 3, 2, 2, 5, 7, 4, 1])
    w = torch.randn(9, 7, generator=g)
    v = torch.randn(32, generator=g)  # a value head's direction: hidden states carry gradients too
    results = []
    for group in (1, G):
        model.zero_grad()
        lp, ent, h = completion_logprobs(model, prompts, tokens, lengths, 0.8, return_entropy=True,
                                         pad_id=tok.pad_id, group_size=group, return_hidden=True)
        ((lp * w).sum() + ent.sum() + (h @ v).sum()).backward()
        results.append((lp, ent, h, [p.grad.clone() for p in model.parameters()]))
    (lp1, ent1, h1, g1), (lp3, ent3, h3, g3) = results
    assert torch.allclose(lp1, lp3, atol=1e-5) and torch.allclose(ent1, ent3, atol=1e-5)
    assert torch.allclose(h1, h3, atol=1e-5) and h3.shape == (9, 7, 32)
    assert torch.all(h3[torch.arange(7)[None] >= lengths[:, None]] == 0)
    # the hidden state of token t is the one its log-prob comes from
    lp_h = torch.log_softmax(model.lm_head(h1) / 0.8, -1).gather(-1, tokens[:, :, None])[:, :, 0]
    live = torch.arange(7)[None] < lengths[:, None]
    assert torch.allclose(lp_h[live], lp1[live], atol=1e-5)
    assert torch.all(lp3[torch.arange(7)[None] >= lengths[:, None]] == 0)
    for a, b in zip(g1, g3):  # sums of ~40 tokens' terms, added in another order: relative 1e-5
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    with pytest.raises(ValueError, match="group_size"):
        completion_logprobs(model, prompts[1:] + prompts[:1], tokens, lengths, group_size=G)


def test_rollout_groups_rewards_and_unfinished():
    model = tiny_model()
    tok = CharTokenizer()
    problems = [{"prompt": "1+2="}, {"prompt": "30+4="}]
    # reward: the completion's length is odd -- depends on the sample, not only the prompt
    ro = rollout(model, tok, problems, lambda p, t: float(len(t) % 2), group_size=4, max_new_tokens=3,
                 temperature=1.0, seed=0)
    assert [p["prompt"] for p in ro.problems] == ["1+2="] * 4 + ["30+4="] * 4
    assert ro.tokens.shape == (8, 3) and ro.prompts[5] == [tok.bos_id] + tok.encode("30+4=")
    for i in range(8):
        expect = float(len(ro.texts[i]) % 2) if ro.finished[i] else 0.0
        assert ro.rewards[i].item() == expect
    assert (~ro.finished).any()  # a random model rarely says EOS within 3 tokens
    sub = ro.take([4, 5, 6, 7])
    both = Rollout.cat([ro.take([0, 1, 2, 3]), sub])
    assert torch.equal(both.tokens, ro.tokens) and both.texts == ro.texts


def test_dynamic_sampling_keeps_only_mixed_groups():
    model = eos_prone_model()
    tok = CharTokenizer()
    train = arithmetic.dataset(200, "train", seed=0, digits=2)
    # prompts starting with 1 always score 0 (a flat group); the rest depend on the sample
    task = SimpleNamespace(reward=lambda p, t: 0.0 if p.startswith("1") else float(len(t) % 2))
    import random
    c = grpo.Config(group_size=4, dynamic_sampling=True, max_sampling_rounds=6, temperature=1.0,
                    init="x")
    batch, _, st = grpo.sample_batch(model, tok, task, random.Random(0), train, 6, c, 3, seed=1)
    groups = batch.rewards.view(-1, 4)
    assert st["batch_groups"] == 6 and groups.size(0) == 6
    assert torch.all(groups.std(dim=1) > 0)
    assert st["flat_groups"] > 0 and st["sampled_groups"] > 6
    assert not any(p["prompt"].startswith("1") for p in batch.problems)
    c.dynamic_sampling = False
    batch, _, st = grpo.sample_batch(model, tok, task, random.Random(0), train, 6, c, 3, seed=1)
    assert len(batch.problems) == 24 and st["sampled_groups"] == 6


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(8, 0, 8), (8, 3, 1), (8, 3, 2), (10, 2, 5), (5, 5, 3), (6, 1, 6)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, abs_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


# ---- config and the script ---------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(group_size=1), "group_size"), (dict(advantage="ppo"), "advantage"),
    (dict(loss_agg="sum"), "loss_agg"), (dict(beta=-0.1), "beta"), (dict(lr=-1.0), "lr"),
    (dict(dual_clip=0.5), "dual_clip"), (dict(kl_estimator="k4"), "kl_estimator"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        grpo.Config(**kw)


def test_eps_high_defaults_to_eps_low():
    assert grpo.Config(eps_low=0.1).eps_high == 0.1
    assert grpo.Config(eps_high=0.28).eps_high == 0.28


def run_grpo(tmp_path, *args, model=None):
    tok = CharTokenizer()
    model = model or tiny_model(block_size=32)
    os.makedirs(tmp_path, exist_ok=True)
    save_checkpoint(str(tmp_path / "base"), "step_0", model, tok)
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "algos", "grpo.py"),
                           f"--init={tmp_path / 'base'}", "--digits=1", "--n_train=50", "--n_test=10",
                           "--prompts_per_step=4", "--group_size=4", "--max_steps=3", "--eval_every=2",
                           f"--out_dir={tmp_path / 'run'}", "--device=cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args", [
    [],
    ["--mu=2", "--minibatches=2", "--grad_accum=2", "--beta=0.04", "--dynamic_sampling=True",
     "--loss_agg=token-mean", "--eps_high=0.28", "--dual_clip=3", "--overlong=soft",
     "--entropy_coef=0.01"],
    ["--beta=0.1", "--kl_mode=reward", "--kl_estimator=k1", "--advantage=rloo"],
])
def test_grpo_smoke_run(tmp_path, args):
    p = run_grpo(tmp_path, *args)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    for key in ("base_accuracy", "final_accuracy", "minutes", "base_pass@4", "final_pass@4"):
        assert key in res and res[key] is not None
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("reward", "accuracy", "flat_groups", "entropy", "clip_low", "clip_high", "ratio_mean",
                "ratio_max", "len_mean", "len_max", "grad_norm", "sample_tok_s", "train_tok_s"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2, 3]
    assert os.path.isdir(res["checkpoint"])
    if "--beta=0.04" in args:
        assert all("kl" in r for r in train_rows)
        assert any(r["ratio_mean"] != 1.0 for r in train_rows)  # mu = 2: the second pass is off-policy


def test_grpo_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    tok = CharTokenizer()
    save_checkpoint(str(tmp_path / "base"), "step_0", tiny_model(block_size=8), tok)
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "grpo.py"), f"--init={tmp_path / 'base'}",
                        f"--out_dir={tmp_path / 'run'}", "--n_train=50", "--n_test=10"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "block_size" in p.stderr and "Traceback" not in p.stderr


# ---- data-parallel: every rank's share of the normaliser ----------------------------------------

def fixed_batch():
    """A hand-made batch of 4 groups x 2 with very different lengths, and its advantages."""
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(3)
    prompts = [[tok.bos_id] + tok.encode(p) for p in ["1+2=", "1+2=", "45+6=", "45+6=", "7+7=", "7+7=",
                                                        "300+1=", "300+1="]]
    lengths = torch.tensor([1, 6, 2, 2, 5, 3, 6, 1])
    tokens = torch.randint(0, 12, (8, 6), generator=g)
    ro = Rollout([{"prompt": ""}] * 8, prompts, tokens, torch.zeros(8, 6), lengths,
                 torch.ones(8, dtype=torch.bool), torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1]), [""] * 8)
    adv = grpo.group_advantages(ro.rewards.view(-1, 2), "grpo").view(-1)
    return ro, adv


def _grpo_ddp_worker(rank, world, port, out, agg):
    from plumbing import setup_distributed, teardown_distributed
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    setup_distributed("cpu")
    model = tiny_model()
    ro, adv = fixed_batch()
    mine = ro.take(list(range(rank * 4, rank * 4 + 4)))  # two whole groups per rank
    c = grpo.Config(loss_agg=agg, grad_accum=2, group_size=2, init="x")
    grpo.minibatch_gradient(model, mine, torch.arange(2), adv[rank * 4:rank * 4 + 4], None, None, c,
                            6, world, CharTokenizer().pad_id)
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    teardown_distributed()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_two_ranks_give_the_one_process_gradient(tmp_path, agg):
    """Two gloo processes with two groups each produce, after the all-reduce, the gradient one
    process computes on all four groups: the token / sequence counts of the normaliser are
    summed over ranks before the loss is formed. Tolerance 1e-6 (a different summation order)."""
    import torch.multiprocessing as mp
    from test_plumbing import _free_port
    out = str(tmp_path / "g.pt")
    mp.spawn(_grpo_ddp_worker, args=(2, _free_port(), out, agg), nprocs=2, join=True)
    ddp = torch.load(out)
    model = tiny_model()
    ro, adv = fixed_batch()
    grpo.minibatch_gradient(model, ro, torch.arange(4), adv, None, None,
                            grpo.Config(loss_agg=agg, group_size=2, init="x"), 6, 1, CharTokenizer().pad_id)
    for p, q in zip(model.parameters(), ddp):
        assert torch.allclose(p.grad, q, atol=1e-6)
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


@pytest.mark.parametrize("old_format", [False, True])
def test_grpo_resume_continues_where_it_stopped(tmp_path, old_format):
    """Stop after step 2 (a checkpoint), resume to step 4: the same weights and held-out numbers
    as 4 steps in one go. Sampling seeds derive from the step, and the prompt RNG is saved (in
    runs saved before the ranks shared one prompt RNG, as a list with one state per rank)."""
    from safetensors.torch import load_file
    # a model that often says EOS early, rewarded by length (the soft overlong penalty): the
    # rewards differ within groups, so the weights move (a plain random model earns 0 everywhere)
    shaped = ["--overlong=soft", "--overlong_cache=8"]
    straight = run_grpo(tmp_path / "a", "--max_steps=4", *shaped, model=eos_prone_model())
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run_grpo(tmp_path / "b", "--max_steps=2", *shaped, model=eos_prone_model())
    assert first.returncode == 0, first.stderr[-2000:]
    if old_format:
        path = tmp_path / "b" / "run" / "ckpt" / "step_000002" / "state.pt"
        state = torch.load(path, weights_only=False)
        state["problems_rng"] = [state["problems_rng"]]
        torch.save(state, path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "grpo.py"),
                              f"--resume={tmp_path / 'b' / 'run'}", "--digits=1", "--n_train=50",
                              "--n_test=10", "--prompts_per_step=4", "--group_size=4", "--max_steps=4",
                              "--eval_every=2", "--device=cpu", *shaped],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "a" / "run" / "ckpt" / "step_000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "ckpt" / "step_000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(tmp_path / "a" / "base" / "step_0" / "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a)
    res = [json.loads(open(tmp_path / d / "run" / "result.json").read()) for d in ("a", "b")]
    assert res[0]["final_accuracy"] == res[1]["final_accuracy"]
    assert res[0]["base_accuracy"] == res[1]["base_accuracy"]
