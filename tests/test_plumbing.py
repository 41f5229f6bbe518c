import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from model import GPT, GPTConfig
from plumbing import (ConfigError, load_model, load_state, parse_config, resolve_checkpoint,
                      save_checkpoint, setup_distributed, teardown_distributed, plot_run, Metrics, make_run_dir)


@dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    flag: bool = False

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def test_config_overrides_and_types(tmp_path):
    c = parse_config(Cfg, ["--lr=0.5", "--steps=3", "--flag=true", "--name=abc"])
    assert (c.lr, c.steps, c.flag, c.name) == (0.5, 3, True, "abc")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 7, "lr": 2}))
    c = parse_config(Cfg, [f"--config={f}", "--lr=0.25"])  # command line beats the file
    assert (c.steps, c.lr) == (7, 0.25)


@pytest.mark.parametrize("argv,msg", [
    (["--lrr=1"], r"(?s)unknown config key\(s\) \['lrr'\].*--lr=0.001  \(float\)"),
    (["--steps=1.5"], r"--steps='1.5' is not a valid int"),
    (["--flag=maybe"], r"not a valid bool"),
    (["--lr=-1"], r"lr must be > 0"),
    (["steps=3"], r"not of the form --key=value"),
    (["--config=/nonexistent.json"], r"cannot read"),
])
def test_config_errors(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(Cfg, argv)


def test_config_file_with_wrong_type(tmp_path):
    f = tmp_path / "c.json"
    for bad in ({"steps": "ten"}, {"steps": 2.5}, {"steps": True}):
        f.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="not a valid int"):
            parse_config(Cfg, [f"--config={f}"])
    f.write_text(json.dumps({"lr": 2}))  # an int where a float is wanted is fine
    assert parse_config(Cfg, [f"--config={f}"]).lr == 2.0


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=8, **kw))


def test_checkpoint_round_trip_and_resolve(tmp_path):
    m = tiny()
    opt = m.configure_optimizers(0.1, 1e-3)
    m(torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 5)))[1].backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", "step_1", m, optimizer=opt, state={"step": 1})
    m2 = load_model(tmp_path)  # a run dir resolves to its latest checkpoint
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    st = load_state(tmp_path)
    assert st["step"] == 1 and st["optimizer"]["state"]
    assert resolve_checkpoint(str(tmp_path)).endswith("step_1")


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json not found"):
        load_model(tmp_path)
    path = save_checkpoint(tmp_path, "a", tiny())
    cfg = json.loads(open(os.path.join(path, "model_config.json")).read())
    cfg["n_embd"] = 16
    open(os.path.join(path, "model_config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_model(path)
    cfg["n_embd"], cfg["n_layerz"] = 8, 1
    open(os.path.join(path, "model_config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown field"):
        load_model(path)


WRITER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from model import GPT, GPTConfig
from plumbing import save_checkpoint
m = GPT(GPTConfig(vocab_size=2000, block_size=64, n_layer=4, n_head=4, n_embd=128))
i = 0
while True:
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(i)
    save_checkpoint(sys.argv[1], f"step_{i}", m, state={"step": i})
    print(i, flush=True)
    i += 1
"""


def test_killed_mid_write_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that writes checkpoints back to back, at several moments: the latest
    pointer always names a complete checkpoint whose weights are the ones saved under it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (0.9, 1.3, 1.7):
        d = tmp_path / f"k{delay}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), root], stdout=subprocess.PIPE)
        proc.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = resolve_checkpoint(str(d))
        i = int(os.path.basename(ckpt).split("_")[1])
        m = load_model(d)
        assert all(torch.all(p == i) for p in m.parameters()), ckpt
        assert load_state(d)["step"] == i


KILLED_SAVER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from model import GPT, GPTConfig
from plumbing import save_checkpoint
m = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8))
save_checkpoint(sys.argv[1], "step_0", m)
save_checkpoint(sys.argv[1], "step_1", m)  # POSTTRAIN_FAULT=save:step_1 kills it before the rename
"""


def test_next_save_removes_what_a_killed_save_left(tmp_path):
    """A process killed mid-save leaves step_1.tmp<pid>; the next save in that directory removes
    it, and leftovers that are the only copy of a checkpoint (or belong to a live process) stay."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVER, str(d), root],
                          env={**os.environ, "POSTTRAIN_FAULT": "save:step_1"})
    assert proc.returncode == -signal.SIGKILL
    dead = [e for e in os.listdir(d) if e.startswith("step_1.tmp")]
    assert len(dead) == 1 and (d / "latest").read_text() == "step_0"
    pid = dead[0][len("step_1.tmp"):]
    # the kill between the two renames of a re-save: x.old<pid> holds the only copy of x
    for e in (f"x.old{pid}", f"x.tmp{pid}", f"y.tmp{os.getppid()}"):
        (d / e).mkdir()
    (d / f"latest.tmp{pid}").write_text("step_0")
    save_checkpoint(d, "step_2", GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)))
    assert sorted(os.listdir(d)) == sorted(["step_0", "step_2", "latest", f"x.old{pid}", f"x.tmp{pid}",
                                            f"y.tmp{os.getppid()}"])
    assert resolve_checkpoint(str(d)).endswith("step_2")


def test_metrics_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    m = Metrics(tmp_path)
    for s in range(5):
        m.log(step=s, loss=1.0 / (s + 1))
    m.log(step=4, accuracy=0.5)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0] == {"step": 0, "loss": 1.0} and len(rows) == 6
    out = plot_run(tmp_path)
    assert os.path.getsize(out) > 1000


@dataclass
class RunCfg:
    resume: str = ""


def test_fresh_run_in_a_used_directory_does_not_append_to_its_metrics(tmp_path):
    d = make_run_dir(str(tmp_path / "run"), "x", RunCfg())
    Metrics(d).log(step=1, loss=2.0)
    make_run_dir(d, "x", RunCfg(resume=d))  # resuming keeps the curve
    Metrics(d).log(step=2, loss=1.0)
    assert len(open(os.path.join(d, "metrics.jsonl")).readlines()) == 2
    make_run_dir(d, "x", RunCfg())  # a fresh run starts a new one, the old is kept aside
    Metrics(d).log(step=1, loss=3.0)
    assert [json.loads(l)["loss"] for l in open(os.path.join(d, "metrics.jsonl"))] == [3.0]
    assert len(open(os.path.join(d, "metrics.prev.jsonl")).readlines()) == 2


def test_compare_runs_table_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    from plumbing import compare_runs
    dirs = []
    for name, lr, acc in [("a", 1e-4, 0.5), ("b", 3e-4, 0.75)]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"lr": lr, "seed": 1, "out_dir": str(d)}))
        (d / "result.json").write_text(json.dumps({"final_accuracy": acc, "steps": 10, "checkpoint": "x"}))
        m = Metrics(d)
        for s in range(10):
            m.log(step=s, reward=s / 10)
        m.log(step=10, eval_accuracy=acc)
        dirs.append(str(d))
    table = compare_runs(dirs, out=str(tmp_path / "c.png")).splitlines()
    assert table[0] == "| run | lr | final_accuracy | steps |"  # only what differs, only numbers
    assert table[2] == "| a | 0.0001 | 0.500 | 10 |" and table[3] == "| b | 0.0003 | 0.750 | 10 |"
    assert os.path.getsize(tmp_path / "c.png") > 1000
    with pytest.raises(SystemExit, match="not a finished run"):
        compare_runs([str(tmp_path)])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = setup_distributed("cpu")
    assert d.world_size == world and d.rank == rank
    model = tiny()
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    idx, tgt = torch.randint(0, 20, (8, 12), generator=g), torch.randint(0, 20, (8, 12), generator=g)
    for _ in range(2):
        half = slice(rank * 4, rank * 4 + 4)
        _, loss = net(idx[half], tgt[half])
        loss.backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save(model.state_dict(), out)
    teardown_distributed()


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Two gloo processes, each with half of an 8-sequence batch, take two SGD steps; the
    weights equal one process taking the same steps on all 8 (DDP averages the gradients, and
    each half's loss is a mean over the same number of tokens). Tolerance 1e-6: the all-reduce
    adds in a different order than one big mean. Not AdamW: the key bias has a gradient that is
    zero in exact arithmetic (softmax ignores a constant added to every score of a query), and
    Adam's g / sqrt(v) turns its rounding noise into a full-size step of either sign."""
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    idx, tgt = torch.randint(0, 20, (8, 12), generator=g), torch.randint(0, 20, (8, 12), generator=g)
    for _ in range(2):
        model(idx, tgt)[1].backward()
        opt.step()
        opt.zero_grad()
    init = tiny().state_dict()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-6), k
    moved = sum(not torch.equal(v, init[k]) for k, v in model.state_dict().items())
    assert moved > 0
