"""What a long, unattended run needs (issue 12): a bad input stops a script with one message
naming the problem; a NaN / inf step is skipped, and a run of them stops it; a checkpoint that
cannot be written stops it with the previous one intact; a run killed with SIGKILL (also in the
middle of writing a checkpoint) resumes to the same weights and metrics as a run never killed;
the same seed gives the same RESULT."""
import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import plumbing
from data.jsonl import write_jsonl
from data.tokenizers import CharTokenizer
from model import GPT, GPTConfig
from plumbing import Metrics, StepGuard, load_model, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = CharTokenizer()
SCRIPTS = ["sft", "grpo", "ppo", "dpo", "coconut", "cope", "mta"]
# small data for the scripts that take a checkpoint, so they reach their checks in a second
SMALL = {"sft": ["--n_train=50", "--n_test=5"],
         "grpo": ["--digits=1", "--n_train=50", "--n_test=5"],
         "ppo": ["--digits=1", "--n_train=50", "--n_test=5"],
         "dpo": ["--digits=1", "--n_train=40", "--n_test=5", "--pair_prompts=40"]}


def run_script(name, *args):
    """Run algos/<name>.py in this process: (exit code, what it wrote to stderr + its exit
    message). Any exception other than SystemExit propagates: a traceback fails the test."""
    path = os.path.join(ROOT, "algos", f"{name}.py")
    argv, err = sys.argv, io.StringIO()
    sys.argv = [path, *args, "--device=cpu"]
    sys.path.insert(0, os.path.dirname(path))  # as `python algos/x.py` does: coconut.py imports sft
    code, msg = 0, ""
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code, msg = (e.code, "") if isinstance(e.code, int) or e.code is None else (1, str(e.code))
    finally:
        sys.argv = argv
        sys.path.remove(os.path.dirname(path))
    return code, err.getvalue() + msg


def tiny(vocab_size=TOK.vocab_size, block_size=32):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints that are wrong in one way each."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    out["good"] = save_checkpoint(str(root / "good"), "step_0", tiny(), TOK)
    out["corrupt"] = save_checkpoint(str(root / "corrupt"), "step_0", tiny(), TOK)
    with open(os.path.join(out["corrupt"], "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage, not safetensors")
    out["other_config"] = save_checkpoint(str(root / "other"), "step_0", tiny(), TOK)
    cfg_path = os.path.join(out["other_config"], "model_config.json")
    cfg = json.load(open(cfg_path))
    cfg["n_embd"] = 32  # the weights are 16 wide
    json.dump(cfg, open(cfg_path, "w"))
    out["vocab"] = save_checkpoint(str(root / "vocab"), "step_0", tiny(vocab_size=50), TOK)
    out["short"] = save_checkpoint(str(root / "short"), "step_0", tiny(block_size=6), TOK)
    out["missing"] = str(root / "nothing-here")
    return out


# ---- bad inputs: one clear message each, for every script -------------------------------------

@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("arg,msg", [("--learning_rat=0.1", "unknown config key"),
                                     ("--seed=twelve", "not a valid int"),
                                     ("--seed", "--key=value")])
def test_config_mistakes(name, arg, msg, tmp_path):
    code, err = run_script(name, arg, f"--out_dir={tmp_path}")
    assert code == 2 and msg in err, err[-2000:]


@pytest.mark.parametrize("name,arg,msg", [
    ("sft", "--lr=-1", "lr must be > 0"),
    ("grpo", "--group_size=1", "group_size must be >= 2"),
    ("grpo", "--lr=-0.1", "lr must be > 0"),
    ("ppo", "--gae_lambda=1.5", "gae_lambda"),
    ("dpo", "--beta=-0.1", "beta must be > 0"),
    ("dpo", "--samples_per_prompt=1", "samples_per_prompt must be >= 2"),
    ("coconut", "--lr=0", "lr must be > 0"),
    ("cope", "--pos=alibi", "unknown"),
    ("mta", "--toy_lr=-1", "toy_lr must be > 0"),
    ("sft", "--max_bad_steps=0", "max_bad_steps must be >= 1"),
])
def test_out_of_range_values(name, arg, msg, tmp_path):
    code, err = run_script(name, arg, f"--out_dir={tmp_path}")
    assert code == 2 and msg in err, err[-2000:]


@pytest.mark.parametrize("name", ["sft", "grpo", "ppo", "dpo"])
@pytest.mark.parametrize("which,msg", [("missing", "not found"),
                                       ("corrupt", "unreadable"),
                                       ("other_config", "do not match its model_config.json"),
                                       ("vocab", "vocab_size 50"),
                                       ("short", "block_size 6")])
def test_bad_checkpoints(name, which, msg, ckpts, tmp_path):
    code, err = run_script(name, f"--init={ckpts[which]}", *SMALL[name], f"--out_dir={tmp_path / 'run'}")
    assert code != 0 and msg in err, err[-2000:]


@pytest.mark.parametrize("name", ["sft", "grpo", "ppo", "dpo"])
def test_more_problems_than_the_task_has(name, ckpts, tmp_path):
    init = [] if name == "sft" else [f"--init={ckpts['good']}"]
    code, err = run_script(name, *init, "--digits=1", "--n_train=50", "--n_test=100", f"--out_dir={tmp_path / 'run'}")
    assert code != 0 and "fewer than 100 distinct test problems" in err, err[-2000:]


@pytest.mark.parametrize("name", ["sft", "grpo", "ppo", "dpo"])
def test_resume_without_a_checkpoint(name, tmp_path):
    code, err = run_script(name, f"--resume={tmp_path / 'empty'}", *SMALL[name])
    assert code != 0 and "not found" in err, err[-2000:]


@pytest.mark.parametrize("content,msg", [("", "pairs.jsonl: no records"),
                                         ('{"prompt": "1+1=", "chosen": "2"}\n', "pairs.jsonl:1"),
                                         ('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{oops\n',
                                          "pairs.jsonl:2")])
def test_dpo_bad_pair_files(content, msg, ckpts, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    code, err = run_script("dpo", f"--init={ckpts['good']}", f"--data={path}", *SMALL["dpo"],
                           f"--out_dir={tmp_path / 'run'}")
    assert code != 0 and msg in err, err[-2000:]


def test_unwritable_run_directory_fails_at_start(tmp_path):
    (tmp_path / "a_file").write_text("")
    code, err = run_script("sft", f"--out_dir={tmp_path / 'a_file' / 'run'}")
    assert code != 0 and "cannot write the run directory" in err


# ---- non-finite steps ------------------------------------------------------------------------------

def test_step_guard_skips_logs_and_stops(tmp_path):
    m = Metrics(str(tmp_path))
    g = StepGuard(3, m, "test")
    assert not g.skip(1, torch.tensor(1.0), 2.0)
    assert g.skip(2, float("nan"), 1.0) and g.skip(3, 1.0, float("inf"))
    assert not g.skip(4, 1.0, 1.0)  # a good step resets the count
    assert g.skip(5, float("inf"), 1.0) and g.skip(6, float("nan"), float("nan"))
    with pytest.raises(SystemExit, match="3 steps in a row with a non-finite loss or gradient"):
        g.skip(7, float("nan"), 1.0)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 5, 6, 7] and all(r["skipped_step"] for r in rows)


def test_diverging_sft_run_stops_with_its_last_checkpoint_finite(tmp_path):
    """lr 1e12 blows the weights up after a step or two: the loss turns inf / NaN, those steps are
    skipped (not applied), and after max_bad_steps of them the run stops with one message. The
    checkpoints it wrote hold finite weights."""
    code, err = run_script("sft", "--n_layer=1", "--n_head=2", "--n_embd=16", "--n_train=50", "--n_test=5",
                           "--lr=1e12", "--min_lr=1e12", "--warmup_steps=0", "--eval_every=1", "--max_steps=50",
                           "--max_bad_steps=3", f"--out_dir={tmp_path}")
    assert code != 0 and "3 steps in a row with a non-finite" in err, err[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    skipped = [r["step"] for r in rows if r.get("skipped_step")]
    assert len(skipped) >= 3 and skipped[-3:] == list(range(skipped[-1] - 2, skipped[-1] + 1))
    weights = load_file(os.path.join(plumbing.resolve_checkpoint(str(tmp_path)), "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---- checkpoints that cannot be written ------------------------------------------------------------

def test_disk_full_at_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny()
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, "step_000001", model, TOK, state={"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(plumbing.CheckpointError, match=r"No space left on device.*step_000001 is intact"):
        save_checkpoint(ckpt, "step_000002", model, TOK, state={"step": 2})
    assert sorted(os.listdir(ckpt)) == ["latest", "step_000001"]  # no temp directory left behind
    back = load_model(ckpt)
    assert all(torch.equal(back.state_dict()[k], before[k]) for k in before)


def test_metrics_of_a_resumed_run_drop_rows_after_its_checkpoint(tmp_path):
    m = Metrics(str(tmp_path))
    for s in range(1, 8):
        m.log(step=s, loss=1.0 / s)
    m.log(note="no step")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 0.1')  # the line a SIGKILL cut in half
    Metrics(str(tmp_path), resume_step=5)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r.get("step") for r in rows] == [1, 2, 3, 4, 5, None]


# ---- SIGKILL and resume; determinism ---------------------------------------------------------------

def timing(key):
    return key in ("elapsed", "minutes", "mfu", "checkpoint", "peak_rss_mb") or key.endswith(("_s", "_ms"))


def launch(name, args, fault=None):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("POSTTRAIN_FAULT", None)
    if fault:
        env["POSTTRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, os.path.join(ROOT, "algos", f"{name}.py"), *args, "--device=cpu"],
                          capture_output=True, text=True, env=env, timeout=300)


def result(p):
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and len(lines) == 1, p.stdout[-1000:] + p.stderr[-2000:]
    return {k: v for k, v in json.loads(lines[0][len("RESULT "):]).items() if not timing(k)}


def metric_rows(run_dir):
    return [{k: v for k, v in json.loads(l).items() if not timing(k)} for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def final_weights(run_dir):
    return load_file(os.path.join(plumbing.resolve_checkpoint(str(run_dir)), "model.safetensors"))


def kill_twice_and_resume(name, args, run_dir, kill_at_step, kill_in_save):
    """SIGKILL the run when it logs step kill_at_step (between checkpoints), resume it and kill it
    again while it writes checkpoint kill_in_save, then resume it to the end."""
    p = launch(name, [*args, f"--out_dir={run_dir}"], fault=f"step:{kill_at_step}")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = launch(name, [*args, f"--resume={run_dir}"], fault=f"save:{kill_in_save}")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not os.path.isdir(os.path.join(run_dir, "ckpt", kill_in_save))  # died before the rename
    return launch(name, [*args, f"--resume={run_dir}"])


def check_kill_resume_and_determinism(name, args, tmp_path, kill_at_step, kill_in_save, base=None):
    """Two straight runs give the same RESULT; a run killed twice and resumed ends with the same
    RESULT, bitwise the same weights and the same metrics rows; and (given the base checkpoint)
    the weights did move, so the comparison is not of untouched models."""
    straight = result(launch(name, [*args, f"--out_dir={tmp_path / 'a'}"]))
    assert result(launch(name, [*args, f"--out_dir={tmp_path / 'a2'}"])) == straight
    assert result(kill_twice_and_resume(name, args, tmp_path / "b", kill_at_step, kill_in_save)) == straight
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    if base is not None:
        start = load_file(os.path.join(base, "model.safetensors"))
        assert any(not torch.equal(a[k], v) for k, v in start.items())


SFT_ARGS = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--digits=2", "--n_train=500", "--n_test=10",
            "--batch_size=16", "--warmup_steps=5", "--eval_every=5", "--max_steps=20"]


def test_sft_killed_twice_resumes_to_the_same_run_and_is_deterministic(tmp_path):
    check_kill_resume_and_determinism("sft", SFT_ARGS, tmp_path, 8, "step_000015")


def test_grpo_killed_twice_resumes_to_the_same_run_and_is_deterministic(tmp_path):
    from test_grpo import eos_prone_model  # rewards that differ within groups: the weights move
    base = save_checkpoint(str(tmp_path / "base"), "step_0", eos_prone_model(), TOK)
    args = [f"--init={base}", "--digits=1", "--n_train=50", "--n_test=10", "--prompts_per_step=4",
            "--group_size=4", "--max_steps=6", "--eval_every=2", "--overlong=soft", "--overlong_cache=8",
            "--beta=0.04"]  # a KL term: the frozen reference must be the initial policy after a resume too
    check_kill_resume_and_determinism("grpo", args, tmp_path, 3, "step_000004", base)


def test_dpo_killed_twice_resumes_to_the_same_run_and_is_deterministic(tmp_path):
    """Offline DPO on a pair file: data order, optimizer and the cached reference log-probs all
    come back (8 steps: 2 epochs of the 36 training pairs in batches of 8, checkpoints every 3)."""
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for a in range(10):
            for b in range(4):
                f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    base = save_checkpoint(str(tmp_path / "base"), "step_0", tiny(), TOK)
    args = [f"--init={base}", f"--data={pairs}", "--digits=1", "--n_train=40", "--n_test=10", "--batch_size=8",
            "--epochs=2", "--eval_every=3", "--lr=1e-3"]
    check_kill_resume_and_determinism("dpo", args, tmp_path, 5, "step_000006", base)


def torchrun(name, args, nproc=2):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("POSTTRAIN_FAULT", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           os.path.join(ROOT, "algos", f"{name}.py"), *args, "--device=cpu"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sft_under_torchrun_with_two_processes_equals_one(tmp_path):
    """2 gloo ranks, each on half of the same global batch, with each rank's loss weighted by
    its share of the batch's target tokens: the same training as one process up to float
    summation order (gradients summed across ranks instead of within one backward)."""
    one = result(launch("sft", [*SFT_ARGS, f"--out_dir={tmp_path / 'one'}"]))
    two = result(torchrun("sft", [*SFT_ARGS, f"--out_dir={tmp_path / 'two'}"]))
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert two["final_accuracy"] == one["final_accuracy"]
    la = [r["loss"] for r in metric_rows(tmp_path / "one") if "loss" in r]
    lb = [r["loss"] for r in metric_rows(tmp_path / "two") if "loss" in r]
    assert len(la) == len(lb) == 20 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


def check_torchrun_equals_one(name, args, tmp_path, optimizer_steps, same, close, rows=9):
    """The run on 2 gloo processes vs 1 (from a weak adder, lr 1e-4): the same RESULT, the metrics
    keys `same` equal in every row and `close` within 1e-5, and every weight within 1e-6 but
    one: the key bias of attention (c_attn.bias[C:2C]) has a true gradient of exactly 0 (softmax
    ignores a shift shared by all keys), so its gradient is float rounding that differs with the
    summation order, and Adam, dividing by sqrt(v), turns it into moves of about lr per
    optimizer step; it is held to 2 x lr x optimizer_steps."""
    from test_dpo import train_weak_adder  # right on about half the prompts: groups with mixed rewards
    base = save_checkpoint(str(tmp_path / "base"), "step_0", train_weak_adder(), TOK)
    args = [f"--init={base}", *args]
    one = result(launch(name, [*args, f"--out_dir={tmp_path / 'one'}"]))
    two = result(torchrun(name, [*args, f"--out_dir={tmp_path / 'two'}"]))
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    start = load_file(os.path.join(base, "model.safetensors"))
    C = a["transformer.wte.weight"].size(1)
    for k in a:
        diff = (a[k] - b[k]).abs()
        if k.endswith("attn.c_attn.bias"):
            assert diff[C:2 * C].max() <= 2 * optimizer_steps * 1e-4
            diff[C:2 * C] = 0
        assert diff.max() < 1e-6, k
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a)  # the run did move the weights
    assert two == one
    ra, rb = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) == rows
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in same:
            assert x.get(k) == y.get(k), (x["step"], k)
        for k in close:
            assert abs(x.get(k, 0) - y.get(k, 0)) < 1e-5, (x["step"], k)


SAME = ("reward", "accuracy", "len_mean", "len_max", "gen_tokens", "mixed_groups", "eval_accuracy", "eval_pass@4",
        "eval_mean_tokens")
SMALL_RUN = ["--digits=1", "--n_train=50", "--n_test=10", "--prompts_per_step=4", "--max_steps=6", "--eval_every=3"]


@pytest.mark.parametrize("extra", [[], ["--dynamic_sampling=True", "--mu=2", "--minibatches=2", "--grad_accum=2",
                                        "--beta=0.04"]])
def test_grpo_under_torchrun_with_two_processes_equals_one(tmp_path, extra):
    """A whole GRPO run on 2 gloo ranks = the same run on one process. Both ranks draw the same
    prompts and each samples its half of the batch with the noise those rows have in the whole
    batch; dynamic sampling keeps the same groups and the minibatches are drawn over the global
    batch."""
    check_torchrun_equals_one("grpo", [*SMALL_RUN, "--group_size=4", *extra], tmp_path, 6 * (4 if extra else 1),
                              SAME + ("flat_groups", "batch_groups", "sampled_groups"),
                              ("entropy", "grad_norm", "clip_low", "clip_high", "ratio_mean", "ratio_max", "kl"))


def test_ppo_under_torchrun_with_two_processes_equals_one(tmp_path):
    """PPO the same way, with a separate critic, the adaptive KL coefficient (fed the global KL)
    and advantages whitened over the global batch; 2 epochs x 2 minibatches drawn over it (a
    rank may hold none of a minibatch's groups)."""
    check_torchrun_equals_one("ppo", [*SMALL_RUN, "--samples_per_prompt=4", "--ppo_epochs=2", "--minibatches=2",
                                      "--critic=separate", "--target_kl=0.01"], tmp_path, 6 * 4, SAME,
                              ("grad_norm", "policy_loss", "value_loss", "approx_kl", "kl", "beta", "entropy",
                               "clip_frac", "value_clip_frac", "ratio_mean", "ratio_max", "explained_variance"))


def test_dpo_under_torchrun_with_two_processes_equals_one(tmp_path):
    """Offline DPO with the IRPO NLL term, 2 gloo ranks vs 1: each rank takes every other pair of
    the global batch and the summed gradients are the global mean's; the reference is run per
    step (ref_cache off), on each rank for its own pairs. 2 epochs of 36 pairs in batches of 8."""
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 2)}
                        for a in range(10) for b in range(4)])
    check_torchrun_equals_one("dpo", [f"--data={pairs}", "--digits=1", "--n_train=40", "--n_test=10",
                                      "--batch_size=8", "--epochs=2", "--eval_every=3", "--lr=1e-4", "--alpha=1",
                                      "--ref_cache=False"], tmp_path, 8,
                              ("eval_accuracy", "eval_mean_tokens", "val_logp_accuracy"),
                              ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin", "nll",
                               "grad_norm", "val_reward_accuracy", "val_margin"),
                              rows=8 + 4)  # 8 steps; evaluations at steps 0, 3, 6 and 8


def test_ppo_killed_twice_resumes_to_the_same_run_and_is_deterministic(tmp_path):
    """From a model right on about half of the prompts (rewards differ), with a separate critic
    and the adaptive KL controller: policy, critic, value head, both optimizers and beta all
    come back."""
    from test_dpo import train_weak_adder
    base = save_checkpoint(str(tmp_path / "base"), "step_0", train_weak_adder(), TOK)
    args = [f"--init={base}", "--digits=1", "--n_train=50", "--n_test=10", "--prompts_per_step=4",
            "--samples_per_prompt=2", "--ppo_epochs=2", "--minibatches=2", "--max_steps=6", "--eval_every=2",
            "--critic=separate", "--target_kl=0.01"]
    check_kill_resume_and_determinism("ppo", args, tmp_path, 3, "step_000004", base)


def test_disk_full_mid_run_stops_the_script_with_its_last_checkpoint(tmp_path, monkeypatch):
    """SFT's second checkpoint cannot be written: the run stops with one message naming the
    error and the intact previous checkpoint, which still loads."""
    real_save, calls = torch.save, []

    def fills_up(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_save(*a, **k)
    monkeypatch.setattr(torch, "save", fills_up)
    code, err = run_script("sft", *SFT_ARGS, f"--out_dir={tmp_path}")
    assert code != 0 and "No space left on device" in err and "step_000005 is intact" in err, err[-2000:]
    assert sorted(d for d in os.listdir(tmp_path / "ckpt") if d.startswith("step")) == ["step_000005"]
    assert load_model(str(tmp_path)).config.n_embd == 32
