import json
import os
import random
import subprocess
import sys

import pytest
import torch

from data import cope_tasks
from data.tokenizers import WordTokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import cope  # noqa: E402

TOK = WordTokenizer(cope_tasks.WORDS)


@pytest.mark.parametrize("task", sorted(cope_tasks.TASKS))
def test_generators_are_right_seeded_and_ood_differs_as_documented(task):
    gen, setting = cope_tasks.TASKS[task], cope_tasks.SETTINGS[task]
    seqs = {}
    for k in ("id", "ood"):
        rng = random.Random(0)
        seqs[k] = [gen(rng, **setting[k]) for _ in range(300)]
        for words, targets in seqs[k]:
            assert cope_tasks.check(task, words, targets), words
            TOK.encode(" ".join(words))  # every word is in the vocabulary
        rng = random.Random(0)
        assert seqs[k][0] == gen(rng, **setting[k])
    mean_len = {k: sum(len(w) for w, _ in v) / len(v) for k, v in seqs.items()}
    if task == "flipflop":  # same length, sparser: fewer reads and writes
        reads = {k: sum(len(t) for _, t in v) / len(v) for k, v in seqs.items()}
        assert mean_len["id"] == mean_len["ood"] and reads["ood"] < reads["id"] / 3
    else:  # longer, with the same kind of targets: the same counts, the same number of data tokens
        filler = {k: sum(w.count("pass") + w.count("_") for w, _ in v) / len(v) for k, v in seqs.items()}
        assert mean_len["ood"] > 2 * mean_len["id"] and filler["ood"] >= 3 * filler["id"]
        if task == "counting":
            assert {w[-1] for w, _ in seqs["ood"]} <= {w[-1] for w, _ in seqs["id"]}
        else:
            assert {len(t) for _, t in seqs["ood"]} == {len(t) for _, t in seqs["id"]} == {4}


def test_counting_counts_since_the_last_reset():
    words = ["a=0", "b=0", "a++", "a++", "b++", "a=0", "pass", "a++", "b++", "print", "a", "=", "1"]
    assert cope_tasks.check("counting", words, [12])
    assert not cope_tasks.check("counting", words[:-1] + ["3"], [12])  # all of a's increments
    assert cope_tasks.check("counting", words[:-3] + ["b", "=", "2"], [12])
    # the generator's programs do reset mid-program, so counting every v++ is often wrong
    rng = random.Random(0)
    seqs = [cope_tasks.counting(rng) for _ in range(500)]
    count_all = sum(w[-1] == str(w.count(f"{w[-3]}++")) for w, _ in seqs) / len(seqs)
    assert 0.4 < count_all < 0.75
    assert sum(w.count("a=0") > 1 for w, _ in seqs) > 100


def test_check_rejects_wrong_targets():
    words, targets = cope_tasks.counting(random.Random(3))
    bad = words[:-1] + [str((int(words[-1]) + 1) % 11)]
    assert not cope_tasks.check("counting", bad, targets)
    words, targets = cope_tasks.flipflop(random.Random(3))
    flipped = list(words)
    flipped[targets[0]] = "1" if words[targets[0]] == "0" else "0"
    assert not cope_tasks.check("flipflop", flipped, targets)
    with pytest.raises(ValueError, match="min_len"):
        cope_tasks.counting(random.Random(0), n_vars=3, max_value=6, min_len=10)


def test_make_batch_targets_only_the_target_tokens():
    words = ["_", "A", "_", "B", "=", "A", "B"]
    idx, targets = cope.make_batch(TOK, [(words, [5, 6]), (["A", "=", "A"], [2])], "cpu")
    ids = TOK.encode(" ".join(words))
    assert idx[0].tolist() == ids[:-1]
    assert targets[0].tolist() == [-100, -100, -100, -100, ids[5], ids[6]]
    assert targets[1].tolist() == [-100, TOK.encode("A")[0]] + [-100] * 4
    assert idx[1, 2:].tolist() == [TOK.pad_id] * 4


def test_error_rate_counts_wrong_target_tokens():
    """A model that always predicts "A" is wrong on exactly the targets that are not "A"."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[TOK.encode("A")[0]] = 1.0
    examples = [(["A", "=", "A"], [2]), (["B", "_", "=", "B"], [3]), (["A", "B", "=", "A", "B"], [3, 4])]
    assert cope.error_rate(model, TOK, examples, "cpu") == pytest.approx(2 / 4)


@pytest.mark.parametrize("kw, msg", [(dict(tasks="counting,sorting"), "unknown"), (dict(pos="alibi"), "unknown"),
                                     (dict(steps=0), "steps must be >= 1"), (dict(lr=0.0), "lr must be > 0"),
                                     (dict(flipflop_pairs=1), "flipflop_pairs must be")])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        cope.Config(**kw)


def test_smoke_run_prints_the_table_and_result(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "cope.py"), "--steps=3", "--counting_steps=3", "--n_eval=5",
                        "--n_embd=16", "--n_head=2", "--n_layer=1", f"--out_dir={tmp_path / 'run'}", "--device=cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    for task in cope_tasks.TASKS:
        assert set(res["ood_error"][task]) == {"learned", "rope", "none", "cope"}
        assert all(0 <= e <= 1 for e in res["ood_error"][task].values())
    assert res["steps"] == {task: 3 for task in cope_tasks.TASKS}
    assert "| counting |" in p.stdout
