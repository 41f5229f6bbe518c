"""Integer addition or multiplication, the minGPT adder task with a verifiable reward.

Prompt: "<a><op><b>=" with a, b plain decimal (no leading zeros), op "+" or "*".
Answer: the exact result in plain decimal, e.g. "123+456=" -> "579", "12*34=" -> "408".
Knobs: digits (operands uniform in [0, 10**digits)), op ("+" or "*"), balanced (first draw each
operand's number of digits uniformly from 1..digits, then the operand with that many digits).
Uniform operands are mostly full-length (90% of 3-digit ones), so a model trained on them sees few
problems whose digits are misaligned, like 46+994, and that is where its errors concentrate;
balanced draws make those common (Lee et al. 2023, "Teaching Arithmetic to Small Transformers",
balance the digit counts the same way). Held-out sets use the plain uniform draw.
"""
import random
import re

from data.splits import distinct_problems, split_of  # noqa: F401 (split_of is part of the task API)

KNOBS = ("digits", "op")  # balanced is a choice of training data, not of the task
_PROMPT = re.compile(r"(0|[1-9][0-9]*)([+*])(0|[1-9][0-9]*)=")


def _operand(rng, digits, balanced):
    if not balanced:
        return rng.randrange(10 ** digits)
    n = rng.randint(1, digits)
    return rng.randrange(10 ** (n - 1) if n > 1 else 0, 10 ** n)


def sample(rng: random.Random, digits: int = 2, op: str = "+", balanced: bool = False) -> dict:
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")
    if op not in ("+", "*"):
        raise ValueError(f'op must be "+" or "*", got {op!r}')
    a, b = _operand(rng, digits, balanced), _operand(rng, digits, balanced)
    prompt = f"{a}{op}{b}="
    return dict(prompt=prompt, answer=str(a + b if op == "+" else a * b))


def dataset(n: int, split: str, seed: int, digits: int = 2, op: str = "+",
            balanced: bool = False) -> list[dict]:
    """n distinct problems of one split, the same list for the same arguments."""
    return distinct_problems(sample, n, split, seed, digits=digits, op=op, balanced=balanced)


def reward(prompt: str, completion: str) -> float:
    """1.0 if the completion is exactly the right number (no spaces, signs, leading zeros or
    anything after it), else 0.0. The truth is recomputed from the prompt."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"malformed arithmetic prompt {prompt!r}; expected e.g. '123+456='")
    a, op, b = int(m[1]), m[2], int(m[3])
    return 1.0 if completion == str(a + b if op == "+" else a * b) else 0.0
