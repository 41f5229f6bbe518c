import json
import math
import os
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from data import arithmetic
from data.jsonl import write_jsonl
from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig
from plumbing import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import dpo  # noqa: E402
from sft import make_batch  # noqa: E402

TOK = CharTokenizer()


def cfg(**kw):
    return SimpleNamespace(**{**dict(loss="dpo", beta=0.1, cdpo_eps=0.1, alpha=0.0), **kw})


def tiny_model(seed=0, block_size=16):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32))


def train_weak_adder():
    """A 1-layer model trained 100 steps on 1-digit addition: right on roughly half the train
    prompts, so sampling it gives both winners and losers."""
    model = tiny_model()
    train = arithmetic.dataset(50, "train", seed=0, digits=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(100):
        _, loss = model(*make_batch(TOK, rng.choices(train, k=64), "cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def weak_adder():
    return train_weak_adder()


# ---- the losses, by hand -------------------------------------------------------------------------

# chosen: log pi = -2 over 2 tokens, ref -2.5; rejected: log pi = -3 over 4 tokens, ref -2.5
PI_W, PI_L, REF_W, REF_L = (torch.tensor([v]) for v in (-2.0, -3.0, -2.5, -2.5))
LEN_W, LEN_L = torch.tensor([2.0]), torch.tensor([4.0])


def loss_of(**kw):
    losses, stats = dpo.preference_loss(PI_W, PI_L, REF_W, REF_L, LEN_W, LEN_L, cfg(**kw))
    return losses.item(), stats


def test_dpo_loss_hand_computed():
    # u = (-2 + 2.5) - (-3 + 2.5) = 1, h = beta * u = 0.1; -log sigmoid(0.1) = log(1 + e^-0.1)
    loss, s = loss_of()
    assert math.isclose(loss, math.log1p(math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(s["chosen_reward"], 0.05, rel_tol=1e-5)
    assert math.isclose(s["rejected_reward"], -0.05, rel_tol=1e-5)
    assert math.isclose(s["margin"], 0.1, rel_tol=1e-5) and s["reward_accuracy"] == 1.0
    assert math.isclose(s["nll"], 1.0, rel_tol=1e-6)  # -(-2) / 2 tokens


def test_cdpo_loss_hand_computed():
    loss, _ = loss_of(loss="cdpo", cdpo_eps=0.2)
    assert math.isclose(loss, 0.8 * math.log1p(math.exp(-0.1)) + 0.2 * math.log1p(math.exp(0.1)), rel_tol=1e-6)
    assert math.isclose(loss_of(loss="cdpo", cdpo_eps=0.0)[0], loss_of()[0], rel_tol=1e-7)


def test_ipo_uses_length_averaged_log_ratios_without_beta():
    # u' = 0.5 / 2 - (-0.5) / 4 = 0.375; target margin 1 / (2 * 0.1) = 5
    loss, _ = loss_of(loss="ipo")
    assert math.isclose(loss, (0.375 - 5) ** 2, rel_tol=1e-6)
    assert not math.isclose(loss, (1.0 - 5) ** 2)  # the summed log-ratios (the old library bug)


def test_irpo_nll_term_is_per_token_on_the_winner():
    base, _ = loss_of()
    assert math.isclose(loss_of(alpha=0.5)[0], base + 0.5 * 2.0 / 2.0, rel_tol=1e-6)


def test_dpo_gradient_on_one_pair_equals_its_closed_form(weak_adder):
    """dL/dtheta = -beta sigmoid(-h) (grad log pi(y_w) - grad log pi(y_l)) (2305.18290 sec. 4)."""
    model = weak_adder
    prompts, responses = dpo.encode_pairs(TOK, [{"prompt": "3+4=", "chosen": "7", "rejected": "12"}], 16, "t")
    batch = dpo.pair_batch(prompts, responses, [0], TOK.pad_id, "cpu")
    params = [p for p in model.parameters()]
    ref = torch.tensor([[-1.3, -0.4]])
    lp = dpo.pair_logprobs(model, *batch, TOK.pad_id)
    losses, _ = dpo.preference_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], torch.ones(1), torch.ones(1), cfg())
    grads = torch.autograd.grad(losses.sum(), params, retain_graph=True)
    g_w = torch.autograd.grad(lp[0, 0], params, retain_graph=True)
    g_l = torch.autograd.grad(lp[0, 1], params)
    h = 0.1 * ((lp[0, 0] - ref[0, 0]) - (lp[0, 1] - ref[0, 1])).item()
    coef = -0.1 * torch.sigmoid(torch.tensor(-h)).item()
    for g, gw, gl in zip(grads, g_w, g_l):
        assert torch.allclose(g, coef * (gw - gl), atol=1e-7, rtol=1e-5)


# ---- sequence log-probs, pairs ---------------------------------------------------------------------

def test_pair_logprobs_sum_only_response_tokens(weak_adder):
    """Against a plain full forward + log_softmax in float64: prompt and padding never count, EOS
    does, and the two responses of a pair have different lengths."""
    model = weak_adder.double()
    try:
        records = [{"prompt": "3+4=", "chosen": "7", "rejected": "12"},
                   {"prompt": "9+9=", "chosen": "18", "rejected": "8"}]
        prompts, responses = dpo.encode_pairs(TOK, records, 16, "t")
        got = dpo.pair_logprobs(model, *dpo.pair_batch(prompts, responses, [0, 1], TOK.pad_id, "cpu"), TOK.pad_id)
        for i, r in enumerate(records):
            for j, key in enumerate(("chosen", "rejected")):
                p = [TOK.bos_id] + TOK.encode(r["prompt"])
                resp = TOK.encode(r[key]) + [TOK.eos_id]
                seq = torch.tensor([p + resp])
                logits, _ = model(seq[:, :-1], seq[:, 1:])  # targets given: logits at every position
                lsm = F.log_softmax(logits[0], dim=-1)
                want = sum(lsm[len(p) - 1 + t, tok].item() for t, tok in enumerate(resp))
                assert math.isclose(got[i, j].item(), want, rel_tol=1e-9, abs_tol=1e-9)
    finally:
        weak_adder.float()


def test_make_pairs_pairs_a_correct_with_an_incorrect_answer(weak_adder):
    problems = arithmetic.dataset(40, "train", seed=0, digits=1)
    c = SimpleNamespace(samples_per_prompt=8, pairs_per_prompt=3, temperature=1.0)
    pairs, stats = dpo.make_pairs(weak_adder, TOK, arithmetic, problems, c, 6, seed=1)
    assert pairs and 0 < stats["sample_accuracy"] < 1 and 0 < stats["prompts_with_pairs"] <= 1
    per_prompt = {}
    for p in pairs:
        assert arithmetic.reward(p["prompt"], p["chosen"]) == 1.0
        assert arithmetic.reward(p["prompt"], p["rejected"]) == 0.0
        per_prompt.setdefault(p["prompt"], []).append((p["chosen"], p["rejected"]))
    for combos in per_prompt.values():
        assert len(combos) <= 3 and len(set(combos)) == len(combos)
    again, _ = dpo.make_pairs(weak_adder, TOK, arithmetic, problems, c, 6, seed=1)
    assert again == pairs  # seeded


def test_split_by_prompt_keeps_a_prompt_on_one_side():
    records = [{"prompt": f"{i % 20}+1=", "chosen": "a", "rejected": "b"} for i in range(100)]
    train, val = dpo.split_by_prompt(records, 0.25, seed=3)
    assert len(train) + len(val) == 100
    assert len({r["prompt"] for r in val}) == 5
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


def test_encode_pairs_errors_name_the_file_and_line():
    with pytest.raises(SystemExit, match=r"pairs.jsonl:2: character 'é'"):
        dpo.encode_pairs(TOK, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                               {"prompt": "1+1=", "chosen": "é", "rejected": "3"}], 16, "pairs.jsonl")
    with pytest.raises(SystemExit, match=r"pairs.jsonl:1: BOS \+ prompt \+ response \+ EOS is 22 tokens.*block_size 16 \+ 1"):
        dpo.encode_pairs(TOK, [{"prompt": "1+1=", "chosen": "2" * 16, "rejected": "3"}], 16, "pairs.jsonl")


# ---- the reference cache ---------------------------------------------------------------------------

def test_reference_cache_is_keyed_by_checkpoint_and_data(tmp_path, capsys):
    save_checkpoint(str(tmp_path / "ref"), "a", tiny_model(0), TOK)
    save_checkpoint(str(tmp_path / "ref"), "b", tiny_model(1), TOK)
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    key = dpo.ref_cache_key(str(tmp_path / "ref" / "a"), str(data))
    cache = str(tmp_path / "cache.pt")
    lp = {"train": torch.tensor([[-1.0, -2.0]]), "val": None}
    torch.save({"key": key, "logprobs": lp}, cache)
    assert torch.equal(dpo.load_ref_cache(cache, key)["train"], lp["train"])
    assert dpo.ref_cache_key(str(tmp_path / "ref" / "b"), str(data)) != key  # another reference
    write_jsonl(data, [{"prompt": "1+1=", "chosen": "2", "rejected": "4"}])
    stale = dpo.ref_cache_key(str(tmp_path / "ref" / "a"), str(data))
    assert stale != key  # the same reference, an edited pair file
    capsys.readouterr()
    assert dpo.load_ref_cache(cache, stale) is None
    assert "stale" in capsys.readouterr().out
    with open(cache, "wb") as f:
        f.write(b"not a torch file")
    assert dpo.load_ref_cache(cache, key) is None
    assert dpo.load_ref_cache(str(tmp_path / "missing.pt"), key) is None


# ---- config and the script ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-0.1), "beta must be > 0"),
    (dict(loss="kto"), "loss must be one of"),
    (dict(cdpo_eps=0.5), "cdpo_eps"),
    (dict(iterations=2, data="x.jsonl"), "--data is for offline"),
    (dict(samples_per_prompt=1), "samples_per_prompt must be >= 2"),
    (dict(lr=-1e-4), "lr must be > 0"),
    (dict(alpha=-1.0), "alpha and weight_decay"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dpo.Config(**kw)


def run_dpo(tmp_path, model, *args):
    os.makedirs(tmp_path, exist_ok=True)
    save_checkpoint(str(tmp_path / "base"), "step_0", model, TOK)
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "algos", "dpo.py"), f"--init={tmp_path / 'base'}",
                           "--digits=1", "--n_train=40", "--n_test=10", "--pair_prompts=40", "--batch_size=8",
                           "--epochs=1", "--eval_every=3", "--lr=1e-3", "--device=cpu", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def result_of(p):
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def test_offline_run_on_a_pair_file_caches_reference_logprobs(tmp_path, weak_adder):
    data = tmp_path / "pairs.jsonl"
    problems = arithmetic.dataset(40, "train", seed=0, digits=1)
    write_jsonl(data, [{"prompt": p["prompt"], "chosen": p["answer"], "rejected": str(int(p["answer"]) + d)}
                       for p in problems for d in (1, 2)])
    p = run_dpo(tmp_path, weak_adder, f"--data={data}", f"--out_dir={tmp_path / 'run1'}", "--loss=ipo")
    res = result_of(p)
    for key in ("base_accuracy", "final_accuracy", "reward_accuracy", "base_logp_accuracy", "minutes"):
        assert res[key] is not None, key
    assert "iteration_accuracy" not in res
    assert os.path.isfile(str(data) + ".ref.pt")
    rows = [json.loads(l) for l in open(tmp_path / "run1" / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 72 // 8  # 72 training pairs (val_fraction 0.1 of 40 prompts held out)
    for key in ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin", "nll", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    # a second run reuses the cache; after the file changes it is stale and recomputed
    p = run_dpo(tmp_path, weak_adder, f"--data={data}", f"--out_dir={tmp_path / 'run2'}", "--loss=ipo")
    assert result_of(p) and "recomputing" not in p.stdout
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "1+2=", "chosen": "3", "rejected": "4"}) + "\n")
    p = run_dpo(tmp_path, weak_adder, f"--data={data}", f"--out_dir={tmp_path / 'run3'}", "--loss=ipo")
    assert result_of(p) and "is stale" in p.stdout


def test_bad_pair_file_is_one_clear_message(tmp_path, weak_adder):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+1=", "chosen": "2"}\n')
    p = run_dpo(tmp_path, weak_adder, f"--data={data}", f"--out_dir={tmp_path / 'run'}")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"{data}:2: missing key(s) 'rejected'" in p.stderr


def test_irpo_run_samples_pairs_each_round(tmp_path, weak_adder):
    p = run_dpo(tmp_path, weak_adder, "--iterations=2", "--alpha=1", f"--out_dir={tmp_path / 'run'}",
                "--ref_cache=False")
    res = result_of(p)
    assert len(res["iteration_accuracy"]) == 3 and res["iteration_accuracy"][0] == res["base_accuracy"]
    assert res["iteration_accuracy"][-1] == res["final_accuracy"]
    for rnd in (1, 2):
        assert os.path.getsize(tmp_path / "run" / f"pairs_{rnd}.jsonl") > 0
    cfgs = json.load(open(tmp_path / "run" / "config.json"))
    assert cfgs["iterations"] == 2


def test_resume_mid_round_ends_with_the_same_weights(tmp_path, weak_adder):
    """An IRPO run resumed from a mid-round checkpoint (optimizer state, reference, pair file, data
    order all restored) ends bitwise equal to the uninterrupted run, round 2's pairs included."""
    from safetensors.torch import load_file
    full = tmp_path / "full"
    result_of(run_dpo(tmp_path, weak_adder, "--iterations=2", "--alpha=1", f"--out_dir={full}"))
    mid = sorted(n for n in os.listdir(full / "ckpt") if n.startswith("step_"))[1]  # step_000003: 3 steps into round 1
    assert mid == "step_000003"
    part = tmp_path / "part"
    os.makedirs(part / "ckpt")
    shutil.copytree(full / "ckpt" / mid, part / "ckpt" / mid)
    shutil.copy(full / "pairs_1.jsonl", part / "pairs_1.jsonl")
    (part / "ckpt" / "latest").write_text(mid)
    res = result_of(run_dpo(tmp_path / "again", weak_adder, "--iterations=2", "--alpha=1", f"--resume={part}"))
    assert res["iteration_accuracy"] == json.load(open(full / "result.json"))["iteration_accuracy"]
    a = load_file(os.path.join(json.load(open(full / "result.json"))["checkpoint"], "model.safetensors"))
    b = load_file(os.path.join(res["checkpoint"], "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "pairs_2.jsonl").read_text() == (part / "pairs_2.jsonl").read_text()
    # resuming a finished run trains nothing and reports the same numbers
    done = result_of(run_dpo(tmp_path / "done", weak_adder, "--iterations=2", "--alpha=1", f"--resume={part}"))
    assert done["final_accuracy"] == res["final_accuracy"] and done["steps"] == res["steps"]
