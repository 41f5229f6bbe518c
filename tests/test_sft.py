import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from data.tokenizers import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "algos"))
import sft  # noqa: E402

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--digits=2", "--n_train=500", "--n_test=20",
         "--batch_size=16", "--warmup_steps=5", "--eval_every=10", "--max_steps=20", "--device=cpu"]


def run_sft(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "algos", "sft.py"), *args],
                       capture_output=True, text=True, env=env, timeout=300)
    return p


def result_of(p):
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stderr[-2000:]
    return json.loads(lines[0][len("RESULT "):])


def test_make_batch_masks_prompt_and_padding_and_shifts_by_one():
    tok = CharTokenizer()
    exs = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "1+2=", "answer": "3"}]
    idx, targets = sft.make_batch(tok, exs, "cpu")
    for i, ex in enumerate(exs):
        full = [tok.bos_id] + tok.encode(ex["prompt"] + ex["answer"]) + [tok.eos_id]
        assert idx[i, :len(full) - 1].tolist() == full[:-1]
        t = targets[i].tolist()
        # exactly the answer and EOS are targets, each predicted from the position before it
        n_prompt = 1 + len(ex["prompt"])
        assert t[:n_prompt - 1] == [-100] * (n_prompt - 1)
        assert t[n_prompt - 1:len(full) - 1] == full[n_prompt:]
        assert all(v == -100 for v in t[len(full) - 1:])
    assert targets[1].tolist().count(-100) == idx.size(1) - 2  # "3" + EOS


def test_lr_schedule_hand_computed():
    cfg = sft.Config(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert math.isclose(sft.lr_at(0, cfg), 1e-4)
    assert math.isclose(sft.lr_at(9, cfg), 1e-3)
    assert math.isclose(sft.lr_at(10, cfg), 1e-3)
    assert math.isclose(sft.lr_at(60, cfg), 1e-4 + 0.5 * 9e-4)  # half-way: cosine at pi/2
    assert math.isclose(sft.lr_at(110, cfg), 1e-4)


def test_sft_smoke_run_writes_result_checkpoints_and_metrics(tmp_path):
    out = tmp_path / "run"
    res = result_of(run_sft(*SMALL, f"--out_dir={out}"))
    assert res["steps"] == 20 and 0.0 <= res["final_accuracy"] <= 1.0
    assert sorted(os.listdir(out / "ckpt")) == ["best", "latest", "step_000010", "step_000020"]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert sum("loss" in r for r in rows) == 20 and sum("accuracy" in r for r in rows) == 2
    assert rows[0]["loss"] > rows[19]["loss"]  # it learns something in 20 steps
    assert json.load(open(out / "result.json")) == res


def test_resume_continues_to_the_same_weights_and_metrics(tmp_path):
    """A run stopped at step 10 and resumed to 20 ends bitwise equal to an uninterrupted run:
    weights, optimizer, data order and RNG all come back from the checkpoint."""
    a, b = tmp_path / "a", tmp_path / "b"
    result_of(run_sft(*SMALL, f"--out_dir={a}"))
    first = result_of(run_sft(*SMALL, f"--out_dir={b}", "--stop_accuracy=-1"))  # stops at step 10
    assert first["steps"] == 10
    result_of(run_sft(*SMALL, f"--resume={b}"))
    wa = load_file(a / "ckpt" / "step_000020" / "model.safetensors")
    wb = load_file(b / "ckpt" / "step_000020" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(l) for l in open(a / "metrics.jsonl")]
    lb = [json.loads(l) for l in open(b / "metrics.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed", "step_ms", "mfu")} for r in rows]
    assert strip(la) == strip(lb)


@pytest.mark.parametrize("arg,msg", [
    ("--max_stepz=3", "unknown config key"),
    ("--lr=-1", "lr must be > 0"),
    ("--task=sudoku", "task must be one of"),
    ("--batch_size=ten", "not a valid int"),
])
def test_bad_config_is_one_clear_message(arg, msg, tmp_path):
    p = run_sft(arg, f"--out_dir={tmp_path}")
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr


def test_init_from_missing_checkpoint_is_a_clear_error(tmp_path):
    p = run_sft(*SMALL, f"--init={tmp_path}/nope", f"--out_dir={tmp_path}/run")
    assert p.returncode != 0 and "model_config.json not found" in p.stderr
    assert "Traceback" not in p.stderr
