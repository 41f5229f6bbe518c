"""
The small shared layer every algorithm script uses, and nothing more:

- config:      a @dataclass per script, overridden by --key=value (and --config=file.json);
               unknown keys and wrong types are errors that list what is valid
- distributed: the same script as `python algos/x.py` or under `torchrun --nproc_per_node=N`
- device:      cuda if available else cpu; bf16 autocast on CUDA, float32 on CPU
- checkpoints: a directory per checkpoint (safetensors weights + model config + tokenizer +
               optimizer / step / RNG state), written atomically; a `latest` pointer for resume
- metrics:     one JSONL line per step, the final `RESULT {json}` line, and a plot command:
               python plumbing.py plot runs/<run>   ->  runs/<run>/curves.png
- guards:      a NaN / inf loss or gradient skips the optimizer step (StepGuard); a checkpoint
               that cannot be written stops the run with one message, the previous one intact
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import typing

import torch
import torch.distributed as dist


# ---- config ------------------------------------------------------------------------------

class ConfigError(ValueError):
    pass


def _describe(cls):
    hints = typing.get_type_hints(cls)
    return "\n".join(f"  --{f.name}={f.default!r}  ({hints[f.name].__name__})"
                     for f in dataclasses.fields(cls))


def _convert(key, value, typ):
    """Turn a command-line string (or a JSON value) into the field's type, or raise."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes"):
            return True
        if str(value).lower() in ("0", "false", "no"):
            return False
    elif typ in (int, float):
        if isinstance(value, str):
            try:
                return typ(value)  # int("1.5") fails, as it should for an int field
            except ValueError:
                pass
        # a JSON number: an int field takes only ints; a float field takes either
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if typ is float or isinstance(value, int):
                return typ(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config field {key} has unsupported type {typ}")
    raise ConfigError(f"--{key}={value!r} is not a valid {typ.__name__}")


def parse_config(cls, argv):
    """Build a `cls` instance from its defaults, then --config=file.json, then --key=value
    (later wins). `--help` raises ConfigError with the list of fields."""
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in dataclasses.fields(cls)}
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            raise ConfigError(f"options (with defaults):\n{_describe(cls)}")
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, value = arg[2:].split("=", 1)
        if key == "config":
            try:
                with open(value) as f:
                    from_file = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--config={value}: cannot read a JSON object ({e})")
            if not isinstance(from_file, dict):
                raise ConfigError(f"--config={value}: expected a JSON object of key: value")
            overrides = {**from_file, **overrides}
            continue
        overrides[key] = value
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys:\n{_describe(cls)}")
    values = {k: _convert(k, v, hints[k]) for k, v in overrides.items()}
    try:
        return cls(**values)
    except ValueError as e:  # a script's __post_init__ range checks
        raise ConfigError(str(e)) from None


def cli_config(cls):
    """parse_config on sys.argv; a bad argument prints one message and exits with status 2."""
    try:
        return parse_config(cls, sys.argv[1:])
    except ConfigError as e:
        print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
        sys.exit(2)


# ---- distributed, device, precision, seeds -----------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(device=None):
    """One process, or one of torchrun's (RANK / WORLD_SIZE / LOCAL_RANK set): nccl on CUDA,
    gloo on CPU. device=None picks cuda when available."""
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, torch.device(device or ("cuda" if want_cuda else "cpu")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if want_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, local, world, torch.device(f"cuda:{local}" if want_cuda else "cpu"))


def setup_one_process(device, script):
    """setup_distributed for the comparison scripts (coconut, cope, mta): their models are small,
    so under torchrun there would be nothing to split; say so instead of running N copies."""
    d = setup_distributed(device or None)
    if d.world_size > 1:
        raise SystemExit(f"{script} runs in one process (its models are small); run it without torchrun")
    return d


def teardown_distributed():
    """The end of a script's main(). Under torchrun: every rank arrives, the group goes, and the
    process exits at once. Left to finalize with gloo's threads still about, a rank of a finished
    run occasionally died with SIGABRT at exit (seen twice in CI, not reproduced in isolation),
    failing the whole torchrun job; exiting here skips that finalization."""
    if dist.is_initialized():
        dist.barrier()  # a rank that tears down while another still talks to it can abort
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def autocast(device):
    """bf16 autocast on CUDA; on the CPU plain float32 (CPU bf16 matmuls are slow and lossy)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- checkpoints -------------------------------------------------------------------------

def atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(SystemExit):
    """A checkpoint could not be written (disk full, directory gone or read-only). A SystemExit,
    so a script stops with this one message instead of a traceback from inside torch.save."""


def save_checkpoint(ckpt_dir, name, model, tokenizer=None, optimizer=None, state=None):
    """Write ckpt_dir/name/ = model.safetensors + model_config.json (+ tokenizer.json)
    (+ state.pt: optimizer, step, RNG, anything in `state`), then point ckpt_dir/latest at it.
    Everything goes to a temp directory first and is renamed into place, so a crash at any
    moment leaves the previous checkpoint and the `latest` pointer intact; a failed write (disk
    full) removes the temp directory and raises CheckpointError."""
    from safetensors.torch import save_file
    final = os.path.join(ckpt_dir, name)
    tmp = f"{final}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(dataclasses.asdict(model.config), f, indent=2)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        if optimizer is not None or state is not None:
            torch.save({"optimizer": optimizer.state_dict() if optimizer else None, **(state or {})},
                       os.path.join(tmp, "state.pt"))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        latest = os.path.join(ckpt_dir, "latest")
        prev = open(latest).read().strip() if os.path.isfile(latest) else None
        raise CheckpointError(f"cannot write checkpoint {final}: {e}; "
                              + (f"the previous checkpoint {os.path.join(ckpt_dir, prev)} is intact"
                                 if prev else "no earlier checkpoint exists")) from None
    _fault_point(f"save:{name}")
    if os.path.exists(final):  # re-saving a name: move the old one aside, never delete first
        os.replace(final, f"{final}.old{os.getpid()}")
    os.replace(tmp, final)
    shutil.rmtree(f"{final}.old{os.getpid()}", ignore_errors=True)
    atomic_write_text(os.path.join(ckpt_dir, "latest"), name)
    _remove_leftovers(ckpt_dir)
    return final


def _remove_leftovers(ckpt_dir):
    """Delete what a process killed mid-save left in ckpt_dir: <name>.tmp<pid>, a checkpoint never
    renamed into place (`latest` never named it), and <name>.old<pid>, the one a re-save replaced,
    once <name> exists again. Only for a <pid> not running here. A kill between the two renames
    above leaves <name>.old<pid> without <name>: the pair is then the only copy, and stays."""
    def dead(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            pass  # alive under another user, or too large to be a pid: leave it
        return False

    entries = set(os.listdir(ckpt_dir))
    for entry in entries:
        m = re.fullmatch(r"(.+)\.(tmp|old)(\d+)", entry)
        if not m or int(m.group(3)) == os.getpid() or not dead(int(m.group(3))):
            continue
        name, pid = m.group(1), m.group(3)
        if name not in entries and f"{name}.old{pid}" in entries:
            continue
        path = os.path.join(ckpt_dir, entry)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _fault_point(where):
    """Fault injection for tests/test_reliability.py: POSTTRAIN_FAULT=save:<name> kills this
    process with SIGKILL after a checkpoint's files are written and before it is renamed into
    place (the moment a crash would hurt most); POSTTRAIN_FAULT=step:<n> when the first metrics
    row of step n is logged (mid-run, between checkpoints). Does nothing otherwise."""
    if os.environ.get("POSTTRAIN_FAULT") == where:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_checkpoint(path):
    """A checkpoint directory, or a directory holding a `latest` pointer (a run's ckpt/ dir or
    the run dir itself) -> the checkpoint directory."""
    for d in (path, os.path.join(path, "ckpt")):
        if os.path.isfile(os.path.join(d, "latest")):
            with open(os.path.join(d, "latest")) as f:
                return os.path.join(d, f.read().strip())
    return path


def load_model(path, device="cpu", **overrides):
    """A GPT from a checkpoint directory written by save_checkpoint (or a run dir: its latest).
    Every problem (missing files, a config that does not match the weights) is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from model import GPT, GPTConfig
    ckpt = resolve_checkpoint(path)
    cfg_path, w_path = os.path.join(ckpt, "model_config.json"), os.path.join(ckpt, "model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"checkpoint {ckpt}: {os.path.basename(p)} not found")
    try:
        with open(cfg_path) as f:
            config = GPTConfig.from_dict({**json.load(f), **overrides})
        weights = load_file(w_path)
    except (json.JSONDecodeError, ValueError, OSError, SafetensorError) as e:
        raise ValueError(f"checkpoint {ckpt} is unreadable: {e}") from None
    model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise ValueError(f"checkpoint {ckpt}: weights do not match its model_config.json (e.g. {diff})")
    model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to wte
    return model.to(device)


def load_state(path):
    """The optimizer / step / RNG dict saved beside the weights."""
    p = os.path.join(resolve_checkpoint(path), "state.pt")
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} not found: nothing to resume from")
    return torch.load(p, map_location="cpu", weights_only=False)  # our own file


# ---- run directory, metrics, RESULT ------------------------------------------------------

def make_run_dir(out_dir, method, config, master=True):
    """runs/<method>-<timestamp>/ unless out_dir is given; writes config.json there. Checks that
    the directory is writable now, not after an hour of training. A fresh run (config.resume
    empty) in a directory that already holds metrics.jsonl moves it to metrics.prev.jsonl, so
    the new run's curves are not appended to the old ones."""
    out_dir = out_dir or os.path.join("runs", f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if master:
        try:
            os.makedirs(os.path.join(out_dir, "ckpt"), exist_ok=True)
            old = os.path.join(out_dir, "metrics.jsonl")
            if not getattr(config, "resume", "") and os.path.exists(old):
                os.replace(old, os.path.join(out_dir, "metrics.prev.jsonl"))
                print(f"{out_dir} held an earlier run: its metrics.jsonl is now metrics.prev.jsonl")
            atomic_write_text(os.path.join(out_dir, "config.json"),
                              json.dumps(dataclasses.asdict(config), indent=2))
        except OSError as e:
            raise SystemExit(f"cannot write the run directory {out_dir}: {e}")
    return out_dir


class Metrics:
    """Appends one JSON object per line to run_dir/metrics.jsonl (rank 0 only). resume_step: a
    run resumed from the checkpoint of that step first drops the rows logged after it (a killed
    run may have logged steps it never checkpointed; they are logged again on the way back), and
    a line torn by the kill."""

    def __init__(self, run_dir, master=True, resume_step=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.master = master
        if master and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [l for l in f if l.strip()]
            keep = [l for l in rows if self._row_step(l) <= resume_step]
            if len(keep) < len(rows):
                atomic_write_text(self.path, "".join(keep))

    @staticmethod
    def _row_step(line):
        """A row's step (-1 when it has none); inf for a line that is not whole JSON."""
        try:
            return json.loads(line).get("step", -1)
        except json.JSONDecodeError:
            return float("inf")

    def log(self, **row):
        _fault_point(f"step:{row.get('step')}")
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class StepGuard:
    """Checks a step's loss and gradient norm before the optimizer step. A NaN or inf one means
    the step is skipped (the caller zeroes the gradients) and logged; max_bad such steps in a row
    stop the run with one message, its last checkpoint (written from good steps only) intact."""

    def __init__(self, max_bad, metrics, method):
        self.max_bad, self.metrics, self.method = max_bad, metrics, method
        self.in_a_row = self.skipped = 0

    def skip(self, step, grad_norm, loss=0.0):
        """True when this step must not update the weights. grad_norm (the total norm before
        clipping: NaN / inf when any gradient is) and loss: floats or tensors."""
        loss, grad_norm = float(torch.as_tensor(loss).detach()), float(torch.as_tensor(grad_norm).detach())
        bad = torch.tensor([not (math.isfinite(loss) and math.isfinite(grad_norm))], dtype=torch.float32)
        if dist.is_initialized():  # one rank's NaN loss skips the step on every rank (replicas stay equal)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.skipped += 1
        self.metrics.log(step=step, skipped_step=True, loss=str(loss), grad_norm=str(grad_norm))
        print(f"{self.method}: step {step} skipped: loss {loss}, gradient norm {grad_norm} "
              f"({self.in_a_row} in a row)", file=sys.stderr, flush=True)
        if self.in_a_row >= self.max_bad:
            raise SystemExit(f"{self.method}: {self.in_a_row} steps in a row with a non-finite loss or "
                             f"gradient (last: step {step}); stopping. The weights were not updated by "
                             f"them; the last checkpoint in the run directory is from good steps. Lower "
                             f"the learning rate or check the data, then --resume or start again")
        return True


def peak_rss_mb():
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux); on CUDA also see
    torch.cuda.max_memory_allocated."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def print_result(run_dir, result, master=True):
    """The last line of every algorithm script: `RESULT {json}`, also saved as result.json."""
    if master:
        atomic_write_text(os.path.join(run_dir, "result.json"), json.dumps(result, indent=2))
        print("RESULT " + json.dumps(result), flush=True)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib")
    return plt


def plot_run(run_dir, out=None):
    """Plot every numeric metric of metrics.jsonl against step into one PNG."""
    plt = _pyplot()
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    keys = sorted({k for r in rows for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no numeric metrics to plot")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_ylabel(k, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=80)
    return out


def compare_runs(run_dirs, out=None, curves=("eval_accuracy", "reward")):
    """A markdown table of several runs (the config fields that differ, then every RESULT number)
    and, with out, one PNG overlaying their `curves` against step. Returns the table."""
    configs, results, rows = [], [], []
    for d in run_dirs:
        try:
            configs.append(json.load(open(os.path.join(d, "config.json"))))
            results.append(json.load(open(os.path.join(d, "result.json"))))
            rows.append([json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if l.strip()])
        except (OSError, ValueError) as e:
            raise SystemExit(f"compare: {d} is not a finished run ({e})")
    differ = [k for k in configs[0] if k not in ("out_dir", "resume") and
              len({json.dumps(c.get(k)) for c in configs}) > 1]
    numbers = [k for k in results[0] if isinstance(results[0][k], (int, float)) and
               not isinstance(results[0][k], bool)]
    lines = ["| run | " + " | ".join(differ + numbers) + " |", "|" + "---|" * (1 + len(differ) + len(numbers))]
    for d, c, r in zip(run_dirs, configs, results):
        cells = [str(c.get(k)) for k in differ] + [f"{r.get(k):.3f}" if isinstance(r.get(k), float)
                                                   else str(r.get(k)) for k in numbers]
        lines.append(f"| {os.path.basename(os.path.normpath(d))} | " + " | ".join(cells) + " |")
    if out:
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
        for ax, key in zip(axes[0], curves):
            for d, rs in zip(run_dirs, rows):
                pts = [(r["step"], r[key]) for r in rs if key in r]
                k = max(1, len(pts) // 50)  # per-step curves are noisy: a running mean of k steps
                ys = [sum(p[1] for p in pts[max(0, i - k + 1):i + 1]) / len(pts[max(0, i - k + 1):i + 1])
                      for i in range(len(pts))]
                ax.plot([p[0] for p in pts], ys, label=os.path.basename(os.path.normpath(d)))
            ax.set_xlabel("step")
            ax.set_ylabel(key if len(pts) < 100 else f"{key} (running mean)")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=90)
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plot":
        print(plot_run(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        runs, curves = sys.argv[3:], ("eval_accuracy", "reward")
        if runs[0].startswith("--curves="):
            runs, curves = runs[1:], tuple(runs[0][len("--curves="):].split(","))
        print(compare_runs(runs, out=sys.argv[2], curves=curves))
    else:
        sys.exit("usage: python plumbing.py plot RUN_DIR\n"
                 "       python plumbing.py compare OUT.png [--curves=KEY,KEY] RUN_DIR RUN_DIR ...")
