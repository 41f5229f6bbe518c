"""What every task shares: the train / test split and drawing n distinct problems of a split."""
import hashlib
import random


def split_of(prompt: str) -> str:
    """"test" for about 1 prompt in 10, else "train"; depends on the prompt text alone, so the
    two splits can never share a prompt whatever seeds or knobs produced them."""
    return "test" if hashlib.sha256(prompt.encode()).digest()[0] % 10 == 0 else "train"


def distinct_problems(sample, n: int, split: str, seed: int, **knobs) -> list[dict]:
    """n distinct problems of one split drawn with sample(rng, **knobs); the same list for the
    same arguments."""
    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    rng = random.Random(seed)
    seen, out, misses = set(), [], 0
    # Give up after many draws in a row bring nothing new: the knobs then allow fewer than n
    # problems in this split (or so few more that sampling cannot find them).
    while len(out) < n:
        p = sample(rng, **knobs)
        if p["prompt"] in seen or split_of(p["prompt"]) != split:
            misses += 1
            if misses > 20_000:
                desc = " ".join(f"{k}={v!r}" for k, v in knobs.items())
                raise ValueError(f"fewer than {n} distinct {split} problems exist for {desc} "
                                 f"(found {len(out)})")
            continue
        misses = 0
        seen.add(p["prompt"])
        out.append(p)
    return out
