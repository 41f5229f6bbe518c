"""Integer addition or multiplication, the minGPT adder task with a verifiable reward.

Prompt: "<a><op><b>=" with a, b plain decimal (no leading zeros), op "+" or "*".
Answer: the exact result in plain decimal, e.g. "123+456=" -> "579", "12*34=" -> "408".
Knobs: digits (operands uniform in [0, 10**digits)), op ("+" or "*").
"""
import hashlib
import random
import re

_PROMPT = re.compile(r"(0|[1-9][0-9]*)([+*])(0|[1-9][0-9]*)=")


def split_of(prompt: str) -> str:
    """"test" for about 1 prompt in 10, else "train"; depends on the prompt text alone, so the
    two splits can never share a prompt whatever seeds or knobs produced them."""
    return "test" if hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0 else "train"


def sample(rng: random.Random, digits: int = 2, op: str = "+") -> dict:
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")
    if op not in ("+", "*"):
        raise ValueError(f'op must be "+" or "*", got {op!r}')
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    prompt = f"{a}{op}{b}="
    return dict(prompt=prompt, answer=str(a + b if op == "+" else a * b))


def dataset(n: int, split: str, seed: int, digits: int = 2, op: str = "+") -> list[dict]:
    """n distinct problems of one split, the same list for the same arguments."""
    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    rng = random.Random(seed)
    seen, out, misses = set(), [], 0
    # Give up after many draws in a row bring nothing new: the knobs then allow fewer than n
    # problems in this split (or so few more that sampling cannot find them).
    while len(out) < n:
        p = sample(rng, digits=digits, op=op)
        if p["prompt"] in seen or split_of(p["prompt"]) != split:
            misses += 1
            if misses > 20_000:
                raise ValueError(f"fewer than {n} distinct {split} problems exist for "
                                 f"digits={digits} op={op!r} (found {len(out)})")
            continue
        misses = 0
        seen.add(p["prompt"])
        out.append(p)
    return out


def reward(prompt: str, completion: str) -> float:
    """1.0 if the completion is exactly the right number (no spaces, signs, leading zeros or
    anything after it), else 0.0. The truth is recomputed from the prompt."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"malformed arithmetic prompt {prompt!r}; expected e.g. '123+456='")
    a, op, b = int(m[1]), m[2], int(m[3])
    return 1.0 if completion == str(a + b if op == "+" else a * b) else 0.0
