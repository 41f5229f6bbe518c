"""The toy task of Multi-Token Attention (Golovneva et al., arXiv 2504.00927): find
the block that holds all the query letters.

    prompt  "kbqez.mwtar.hgydu.xlopf#wa"     (blocks of block_len distinct letters, '.'-separated,
    answer  "mwtar"                           then '#' and n_query letters of one block)

Each query letter sits in several blocks; only the target holds them all (a second such block
is redrawn). A standard attention weight compares one query vector with one key vector, so a
head that finds "w" cannot also require "a" in the same block: the query must pack both
letters into one vector and the keys the whole block. MTA's convolution over neighbouring
queries and keys lets one weight combine both matches.

The paper: 26 letters, block_len 5, n_query 2, 319-token sequences (about 53 blocks).
"""
import random

from data.splits import distinct_problems, split_of  # noqa: F401  (split_of: the task interface)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARS = LETTERS + ".#"
KNOBS = ("n_blocks", "block_len", "n_query")


def _check(n_blocks, block_len, n_query):
    if not (isinstance(n_blocks, int) and n_blocks >= 1 and isinstance(block_len, int)
            and 1 <= n_query <= block_len < len(LETTERS)):
        raise ValueError(f"find_block: need n_blocks >= 1 and 1 <= n_query <= block_len < "
                         f"{len(LETTERS)}, got n_blocks={n_blocks}, block_len={block_len}, n_query={n_query}")


def sample(rng: random.Random, n_blocks: int = 10, block_len: int = 5, n_query: int = 2) -> dict:
    _check(n_blocks, block_len, n_query)
    target = rng.sample(LETTERS, block_len)
    query = rng.sample(target, n_query)
    blocks = [target]
    while len(blocks) < n_blocks:
        b = rng.sample(LETTERS, block_len)
        if not set(query) <= set(b):
            blocks.append(b)
    rng.shuffle(blocks)
    prompt = ".".join("".join(b) for b in blocks) + "#" + "".join(query)
    return dict(prompt=prompt, answer="".join(target))


def dataset(n: int, split: str, seed: int, n_blocks: int = 10, block_len: int = 5, n_query: int = 2) -> list[dict]:
    """n distinct problems of one split, the same list for the same arguments."""
    return distinct_problems(sample, n, split, seed, n_blocks=n_blocks, block_len=block_len, n_query=n_query)


def truth(prompt: str) -> str:
    """The one block holding every query letter, recomputed from the prompt."""
    body, sep, query = prompt.rpartition("#")
    blocks = body.split(".")
    if not sep or not query or not body or any(not b for b in blocks) or set(prompt) - set(CHARS):
        raise ValueError(f"malformed find-block prompt {prompt[:80]!r}")
    hits = [b for b in blocks if set(query) <= set(b)]
    if len(hits) != 1:
        raise ValueError(f"find-block prompt has {len(hits)} blocks holding {query!r}, not one")
    return hits[0]


def reward(prompt: str, completion: str) -> float:
    """1.0 if the completion is exactly the target block."""
    return 1.0 if completion == truth(prompt) else 0.0
