"""A tiny English-like corpus from a hand-written grammar, so BPE training needs no download.

data/tinytext.txt is exactly `make_text(N_SENTENCES, SEED)`, written by
`python -m data.tinytext`; tests/test_data.py checks that it still matches.
"""
import random

N_SENTENCES = 1500
SEED = 0

NAMES = ["Ada", "Bo", "Cleo", "Dev", "Edna", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kit", "Lale"]
ANIMALS = ["cat", "dog", "fox", "owl", "goat", "crow", "mouse", "horse", "frog", "bee"]
THINGS = ["lamp", "boat", "kettle", "map", "letter", "basket", "drum", "clock", "rope", "key",
          "cup", "coat", "ladder", "bell", "stone", "window"]
PLACES = ["the mill", "the river", "the market", "the old barn", "the hill", "the harbor",
          "the garden", "the station", "the forest", "the kitchen", "the bridge", "the school"]
ADJECTIVES = ["red", "small", "quiet", "heavy", "bright", "old", "round", "cold", "strange",
              "green", "tired", "happy", "wooden", "broken", "tall"]
ADVERBS = ["slowly", "quickly", "carefully", "twice", "again", "at once", "happily", "softly"]
TRANSITIVE = ["found", "carried", "painted", "fixed", "dropped", "sold", "hid", "washed",
              "counted", "opened", "lost", "mended"]
INTRANSITIVE = ["slept", "sang", "waited", "ran", "laughed", "walked", "stayed", "danced"]
TIMES = ["In the morning", "At noon", "Later", "On Sunday", "Before dinner", "Every winter",
         "After the rain", "Last night"]
CONNECTIVES = ["because", "while", "although", "so", "and then"]
NUMBERS = ["two", "three", "four", "five", "seven", "ten", "twelve"]


def _noun_phrase(rng):
    # Mix names, animals and things so the corpus has both capitalized and plain words.
    r = rng.random()
    if r < 0.3:
        return rng.choice(NAMES)
    if r < 0.6:
        return "the " + rng.choice(ADJECTIVES) + " " + rng.choice(ANIMALS)
    if r < 0.8:
        return "the " + rng.choice(ANIMALS)
    return rng.choice(NAMES) + "'s " + rng.choice(ANIMALS)


def _object(rng):
    if rng.random() < 0.25:
        return rng.choice(NUMBERS) + " " + rng.choice(THINGS) + "s"
    return rng.choice(["a", "the"]) + " " + rng.choice(ADJECTIVES) + " " + rng.choice(THINGS)


def _clause(rng):
    subject = _noun_phrase(rng)
    if rng.random() < 0.6:
        clause = f"{subject} {rng.choice(TRANSITIVE)} {_object(rng)}"
    else:
        clause = f"{subject} {rng.choice(INTRANSITIVE)}"
    if rng.random() < 0.4:
        clause += " near " + rng.choice(PLACES)
    if rng.random() < 0.3:
        clause += " " + rng.choice(ADVERBS)
    return clause


def _sentence(rng):
    r = rng.random()
    if r < 0.15:
        s = f"Did {_noun_phrase(rng)} see {_object(rng)} at {rng.choice(PLACES)}?"
    elif r < 0.3:
        c = _clause(rng)
        s = f'"{c[0].upper() + c[1:]}," said {rng.choice(NAMES)}.'
    else:
        s = _clause(rng)
        if rng.random() < 0.35:
            s += ", " + rng.choice(CONNECTIVES) + " " + _clause(rng)
        if rng.random() < 0.25:
            s = rng.choice(TIMES) + ", " + s
        s += rng.choice([".", ".", ".", "!"])
    return s[0].upper() + s[1:]


def make_text(n_sentences: int, seed: int) -> str:
    """n_sentences sentences, a few per line, ending in a newline; same seed, same text."""
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_sentences):
        line.append(_sentence(rng))
        if rng.random() < 0.25:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinytext.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(make_text(N_SENTENCES, SEED))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
