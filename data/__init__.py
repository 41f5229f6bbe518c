"""Tokenizers, toy tasks with verifiable rewards, and JSONL loaders.

Every task module has sample(rng, **knobs), dataset(n, split, seed, **knobs), reward(prompt,
completion) and KNOBS, the names of its difficulty knobs; scripts declare config fields with
those names and get a task's knobs with task_knobs(cfg).
"""
from data import arithmetic, countdown

TASKS = {"arithmetic": arithmetic, "countdown": countdown}


def task_knobs(cfg):
    """{knob: value} for cfg.task, read from the config fields named like the task's KNOBS."""
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {cfg.task!r}")
    return {k: getattr(cfg, k) for k in TASKS[cfg.task].KNOBS}
