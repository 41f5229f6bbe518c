import json
import os
import random
import subprocess
import sys

import pytest
import torch

from data import find_block
from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import mta  # noqa: E402

TOK = CharTokenizer(find_block.CHARS)


def test_toy_batch_puts_the_loss_on_the_answer_only():
    probs = [find_block.sample(random.Random(i), n_blocks=3) for i in range(2)]
    idx, targets = mta.toy_batch(TOK, probs, "cpu")
    seq = TOK.encode(probs[1]["prompt"] + probs[1]["answer"])
    assert idx[1].tolist() == seq[:-1]
    P = len(probs[1]["prompt"])
    assert targets[1].tolist() == [-100] * (P - 1) + seq[P:]


def test_toy_error_scores_generated_blocks():
    """A model that always writes "a" is right exactly on the problems whose block is "aa"."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[TOK.encode("a")[0]] = 1.0
    probs = [dict(prompt="aa.bc#a", answer="aa"), dict(prompt="ab.bc#c", answer="bc"),  # "ab": first letter right
             dict(prompt="ab.bc#a", answer="ab"), dict(prompt="aa.bc#a", answer="aa")]
    assert mta.toy_error(model, TOK, probs, batch_size=3) == (pytest.approx(2 / 4), pytest.approx(1 / 4))


def test_val_loss_is_the_mean_over_windows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8))
    ids = torch.randint(0, 10, (23,))
    want = sum(model(ids[i:i + 4][None], ids[i + 1:i + 5][None])[1].item() for i in range(0, 20, 4)) / 5
    assert mta.val_loss(model, ids, 4, "cpu", batch_size=2) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kw, msg", [(dict(parts="toy,vision"), "unknown"), (dict(toy_steps=0), "toy_steps must be"),
                                     (dict(lm_lr=-1.0), "lm_lr must be > 0"), (dict(n_query=6), "n_query <= block_len")])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        mta.Config(**kw)


def test_smoke_run_prints_the_table_and_result(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "mta.py"), "--toy_steps=3", "--lm_steps=3",
                        "--n_eval=8", "--n_blocks=3", "--toy_embd=16", "--lm_embd=16", "--lm_block=32",
                        "--toy_batch=4", "--lm_batch=4", f"--out_dir={tmp_path / 'run'}", "--device=cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert {"transformer_error", "mta_error", "transformer_val_loss", "mta_val_loss"} <= set(res)
    assert 0 <= res["mta_error"] <= 1 and res["mta_val_loss"] > 0
    assert res["params"]["lm"]["mta"] > res["params"]["lm"]["transformer"]
    assert "| toy task error" in p.stdout and "| tinytext validation loss" in p.stdout
