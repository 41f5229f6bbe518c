import json
import os
import subprocess
import sys

import pytest
import torch

from data import prosqa
from data.tokenizers import WordTokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import coconut  # noqa: E402

TOK = WordTokenizer(prosqa.WORDS)


def tiny_model(seed=0, pos="learned"):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=160, n_layer=2, n_head=2, n_embd=32, pos=pos))
    with torch.no_grad():  # larger weights than the init, so greedy outputs differ between rows
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def ragged_examples():
    """Questions of three different lengths and chains of 2, 3 and 4 steps."""
    return [prosqa.dataset(1, "train", seed=s, n_nodes=n, min_depth=d, max_depth=d, n_extra=x)[0]
            for s, n, d, x in ((0, 12, 4, 3), (1, 8, 2, 0), (2, 10, 3, 1))]


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 6])
@pytest.mark.parametrize("pos, rescale", [("learned", False), ("rope", False), ("learned", True)])
def test_latent_loss_equals_the_step_by_step_reference(stage, pos, rescale):
    """The cached k + 1-pass forward against full recomputes that grow the sequence one thought
    at a time: same loss and same gradients (float64), ragged rows, stages past the chain length."""
    model = tiny_model(pos=pos).double()
    prompts, n_latent, rest = coconut.latent_batch(TOK, ragged_examples(), stage, c=2 if stage == 2 else 1)
    assert len({len(p) for p in prompts}) == 3
    params = list(model.parameters())
    fast = coconut.latent_loss(model, prompts, n_latent, rest, TOK.pad_id, rescale)
    g_fast = torch.autograd.grad(fast, params)
    slow = coconut.latent_loss_reference(model, prompts, n_latent, rest, rescale)
    g_slow = torch.autograd.grad(slow, params)
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-7)  # the cross-entropy runs in float32
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_thoughts_carry_gradient_to_the_question():
    """With thoughts, the loss depends on the question through the fed-back hidden states: the
    gradient reaches the embedding of a question word that only the thoughts can carry."""
    model = tiny_model().double()
    prompts, n_latent, rest = coconut.latent_batch(TOK, ragged_examples()[:1], 6, 1)
    assert rest[0][1:] == TOK.encode(ragged_examples()[0]["answer"]) + [TOK.eos_id]  # chain all latent
    loss = coconut.latent_loss(model, prompts, n_latent, rest, TOK.pad_id)
    loss.backward()
    assert model.transformer.wte.weight.grad[prompts[0][1]].abs().sum() > 0


def test_latent_batch_curriculum():
    ex = ragged_examples()[0]  # 4 steps
    assert len(ex["steps"]) == 4
    for stage in (0, 1, 3, 4, 6):
        prompts, n_latent, rest = coconut.latent_batch(TOK, [ex], stage, c=2)
        assert n_latent == 2 * stage
        assert TOK.decode(rest[0]) == " ".join(["<eot>"] + ex["steps"][stage:] + [ex["answer"]])
        assert prompts[0] == [TOK.bos_id] + TOK.encode(ex["prompt"] + " <bot>") and rest[0][-1] == TOK.eos_id


@pytest.mark.parametrize("n_latent, rescale", [(0, False), (1, False), (4, False), (4, True)])
def test_cached_latent_generation_equals_full_recompute(n_latent, rescale):
    model = tiny_model(seed=3)
    questions = [ex["prompt"] for ex in ragged_examples()]
    fast = coconut.generate_latent(model, TOK, questions, n_latent, max_new_tokens=12, rescale=rescale)
    slow = coconut.generate_latent(model, TOK, questions, n_latent, max_new_tokens=12, use_cache=False,
                                   rescale=rescale)
    assert fast == slow
    assert len({tuple(o) for o in fast}) > 1  # the rows really differ
    if n_latent:  # the thoughts change what is generated, and so does their scale
        assert fast != coconut.generate_latent(model, TOK, questions, 0, max_new_tokens=12, rescale=rescale)
        assert fast != coconut.generate_latent(model, TOK, questions, n_latent, max_new_tokens=12,
                                               rescale=not rescale)


def test_thought_keeps_the_direction_at_the_embeddings_norm():
    model = tiny_model()
    h = torch.randn(3, 1, 32) * torch.tensor([0.1, 5.0, 40.0])[:, None, None]
    t = coconut.thought(model, h, rescale=True)
    mean_norm = model.transformer.wte.weight.norm(dim=-1).mean()
    assert torch.allclose(t.norm(dim=-1), mean_norm.expand(3, 1), rtol=1e-5)
    assert torch.allclose(torch.cosine_similarity(t, h, dim=-1), torch.ones(3, 1), atol=1e-6)
    assert coconut.thought(model, h, rescale=False) is h  # the paper's feedback: the hidden state as is


def test_evaluation_generates_with_the_configured_feedback():
    """evaluate_mode counts the tokens of generate_latent run with cfg.rescale_thoughts; on this
    model the two feedbacks stop at different lengths, so a count made with the other one differs."""
    model, problems = tiny_model(seed=1), ragged_examples()
    counts = {}
    for rescale in (True, False):
        cfg = coconut.Config(max_stage=2, c=1, rescale_thoughts=rescale)
        res = coconut.evaluate_mode(model, TOK, "coconut", problems, cfg, max_new_tokens=12)
        outs = coconut.generate_latent(model, TOK, [p["prompt"] for p in problems], 2, 12, rescale=rescale)
        assert res["mean_tokens"] == sum(2 + len(o) for o in outs) / len(problems)
        counts[rescale] = res["mean_tokens"]
    assert counts[True] != counts[False]


@pytest.mark.parametrize("stage, c", [(1, 1), (2, 2), (None, 2)])
def test_evaluation_at_a_stage_runs_that_stages_thoughts(stage, c):
    """evaluate_mode(stage=s) generates with s * c thoughts (the per-stage check), without a
    stage with max_stage * c (answering with max_stage * c at every stage fails the first two)."""
    model, problems = tiny_model(seed=1), ragged_examples()
    cfg = coconut.Config(max_stage=3, c=c)
    res = coconut.evaluate_mode(model, TOK, "coconut", problems, cfg, max_new_tokens=12, stage=stage)
    k = (3 if stage is None else stage) * c
    outs = coconut.generate_latent(model, TOK, [p["prompt"] for p in problems], k, 12)
    assert res["mean_tokens"] == sum(k + len(o) for o in outs) / len(problems)


@pytest.mark.parametrize("mode, reset, steps", [("coconut", True, 3), ("coconut", False, 5), ("cot", True, 5)])
def test_optimizer_is_fresh_at_each_stage_only_for_coconut(tmp_path, mode, reset, steps):
    """reset_optimizer: a new AdamW when Coconut's stage changes (its moments start from zero),
    so after stages [1, 1, 2, 2, 2] the optimizer has taken 3 steps; the language modes, and
    Coconut with the reset off, keep one optimizer for all 5."""
    import random
    from plumbing import Metrics
    cfg = coconut.Config(batch_size=2, reset_optimizer=reset)
    model = tiny_model()
    optimizer = coconut.new_optimizer(model, cfg, torch.device("cpu"))
    optimizer = coconut.train_steps(model, optimizer, mode, [1, 1, 2, 2, 2], cfg, TOK, ragged_examples(),
                                    random.Random(0), torch.device("cpu"), Metrics(str(tmp_path)))
    assert {int(s["step"]) for s in optimizer.state.values()} == {steps}


@pytest.mark.parametrize("mode, lr", [("coconut", 2e-4), ("cot", 1e-3)])
def test_latent_stages_train_at_latent_lr(tmp_path, mode, lr):
    """Coconut's latent stages step at latent_lr; the language modes (and so Coconut's stage 0,
    which is the CoT run's) at lr. Past the 100 warm-up steps, the AdamW's lr is the value itself."""
    import random
    from plumbing import Metrics
    cfg = coconut.Config(batch_size=2, lr=1e-3, latent_lr=2e-4)
    model = tiny_model()
    optimizer = coconut.train_steps(model, coconut.new_optimizer(model, cfg, torch.device("cpu")), mode, [1, 2], cfg,
                                    TOK, ragged_examples(), random.Random(0), torch.device("cpu"),
                                    Metrics(str(tmp_path)), first_step=200)
    assert [g["lr"] for g in optimizer.param_groups] == [lr] * len(optimizer.param_groups)


@pytest.mark.parametrize("kw, msg", [
    (dict(modes="cot,foo"), "modes must be"),
    (dict(c=0), "c must be >= 1"),
    (dict(max_stage=0), "max_stage must be >= 1"),
    (dict(cot_steps=0), "cot_steps must be >= 1"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(stage_eval=-1), "stage_eval must be >= 0"),
    (dict(latent_lr=-1e-4), "latent_lr must be > 0"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        coconut.Config(**kw)


def run_tiny(out_dir, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "algos", "coconut.py"), "--n_train=60", "--n_test=10",
                           "--n_layer=1", "--n_embd=32", "--n_head=2", "--cot_steps=3", "--stage_steps=2",
                           "--max_stage=2", "--batch_size=4", f"--out_dir={out_dir}", "--device=cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_smoke_run_prints_the_table_and_result(tmp_path):
    p = run_tiny(tmp_path / "run")
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    for key in ("nocot_accuracy", "cot_accuracy", "coconut_accuracy", "cot_tokens", "coconut_tokens"):
        assert res[key] is not None, key
    assert res["coconut_tokens"] >= 2 + 1  # 2 thoughts, at least one token after <eot>
    assert "| CoT |" in p.stdout and "| no-CoT |" in p.stdout
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    # stage 0 (3 steps of the chain) is shared: CoT goes on with it, Coconut's stages start from it
    assert [(r["step"], r["stage"]) for r in rows if r.get("mode") == "cot" and "loss" in r] == [
        (s, 0) for s in range(1, 8)]
    assert [(r["step"], r["stage"]) for r in rows if r.get("mode") == "coconut" and "loss" in r] == [
        (4, 1), (5, 1), (6, 2), (7, 2)]
    # after each latent stage but the last (which the final evaluation covers), the held-out check
    assert [(r["step"], r["stage"]) for r in rows if "stage_accuracy" in r] == [(5, 1)]
    assert "coconut stage 1 (thoughts: 1): held-out accuracy" in p.stdout
    for mode in ("nocot", "cot", "coconut"):
        assert os.path.isdir(tmp_path / "run" / "ckpt" / mode)


def test_coconut_alone_equals_coconut_after_cot(tmp_path):
    """Coconut's curriculum starts from the CoT run's state after cot_steps (weights, optimizer,
    data order): a run of Coconut alone gives the same final weights as one that trains CoT
    first, and CoT's own steps after the snapshot do not leak into Coconut's start. The
    held-out check after each stage (on in the first two runs) changes nothing either."""
    from plumbing import load_model
    weights = {}
    for modes, extra in (("cot,coconut", ""), ("coconut", ""), ("coconut", "--stage_eval=0")):
        p = run_tiny(tmp_path / (modes + extra), f"--modes={modes}", "--reset_optimizer=false", *extra.split())
        assert p.returncode == 0, p.stderr[-3000:]
        weights[modes + extra] = load_model(str(tmp_path / (modes + extra) / "ckpt" / "coconut")).state_dict()
    cot = load_model(str(tmp_path / "cot,coconut" / "ckpt" / "cot")).state_dict()
    for name, w in weights["coconut"].items():
        assert torch.equal(w, weights["cot,coconut"][name]), name
        assert torch.equal(w, weights["coconut--stage_eval=0"][name]), name
    assert any(not torch.equal(w, cot[n]) for n, w in weights["coconut"].items())
