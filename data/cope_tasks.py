"""The synthetic tasks of the CoPE paper (Golovneva et al., arXiv 2405.18719, sec. 4), as word
sequences whose last tokens (or, for Flip-Flop, every bit after an `r`) are the targets. Each
generator takes a random.Random and knobs, and returns (words, target_positions): a model sees
words[:-1] and is scored on predicting words[t] for t in target_positions. The in-distribution
(ID) and out-of-distribution (OOD) settings differ only in knobs (`SETTINGS`).

- counting (after the released setup): `a=0 b=0 c=0`, then a shuffled mix of `pass`, `v++` and
  (up to `resets` times per variable) `v=0` statements, then `print v =` and v's value: the
  increments of v since its last reset. Each variable's statements are drawn first (increments
  before each reset, 0..max_value, and its final value, 0..max_value), the rest of the program
  is `pass`: OOD programs are 3x longer with the same statements, so they are sparser. Counting
  the `v++` after the last `v=0`, whatever lies between, is what CoPE's gates can do: gate on
  the resets, and every token since the last one has contextual position 0.
- flipflop (Flip-Flop language modelling, Liu et al. 2023): pairs `w b` (write bit b), `i b`
  (ignore), `r b` (read: b must be the last written bit); targets are the bits after `r`.
  ID: p(ignore) = 0.8; OOD: sparse, p(ignore) = 0.98 (reads far from the last write).
- selective_copy: n data tokens scattered among `_` blanks, then `=` and the data tokens in
  order. OOD: 3x as many blanks.
"""

VARS = ["a", "b", "c", "d", "e"]
LETTERS = list("ABCDEFGH")
WORDS = ([f"{v}=0" for v in VARS] + [f"{v}++" for v in VARS] + VARS + ["pass", "print", "="]
         + [str(i) for i in range(11)] + ["w", "i", "r"] + LETTERS + ["_"])


def counting(rng, n_vars=3, max_value=5, min_len=36, max_len=44, resets=1):
    longest = n_vars * ((resets + 1) * max_value + resets)  # statements that are not `pass`, at most
    if not 1 <= n_vars <= len(VARS) or not 0 <= max_value <= 10 or resets < 0 or min_len < longest:
        raise ValueError(f"counting: need 1 <= n_vars <= {len(VARS)}, 0 <= max_value <= 10, resets >= 0 and "
                         f"min_len >= n_vars * ((resets + 1) * max_value + resets) = {longest}, got "
                         f"{n_vars}, {max_value}, {resets}, {min_len}")
    names = VARS[:n_vars]
    values, queues = {}, {}
    for v in names:  # each variable's statements in order: [increments, reset] x 0..resets, increments
        statements = []
        for _ in range(rng.randint(0, resets)):
            statements += [f"{v}++"] * rng.randint(0, max_value) + [f"{v}=0"]
        values[v] = rng.randint(0, max_value)
        queues[v] = statements + [f"{v}++"] * values[v]
    order = [v for v in names for _ in queues[v]]
    rng.shuffle(order)  # interleave the variables, each keeping its own order
    events = iter([queues[v].pop(0) for v in order])
    n = rng.randint(min_len, max_len)
    slots = set(rng.sample(range(n), len(order)))
    body = [next(events) if t in slots else "pass" for t in range(n)]
    q = rng.choice(names)
    words = [f"{v}=0" for v in names] + body + ["print", q, "=", str(values[q])]
    return words, [len(words) - 1]


def flipflop(rng, n_pairs=32, p_ignore=0.8):
    if n_pairs < 2 or not 0 <= p_ignore < 1:
        raise ValueError(f"flipflop: need n_pairs >= 2 and 0 <= p_ignore < 1, got {n_pairs}, {p_ignore}")
    bit = str(rng.randint(0, 1))
    words, targets = ["w", bit], []
    for k in range(1, n_pairs):
        u = rng.random()
        if k == n_pairs - 1 or u >= p_ignore + (1 - p_ignore) / 2:  # the last instruction always reads
            words += ["r", bit]
            targets.append(len(words) - 1)
        elif u < p_ignore:
            words += ["i", str(rng.randint(0, 1))]
        else:
            bit = str(rng.randint(0, 1))
            words += ["w", bit]
    return words, targets


def selective_copy(rng, n_data=4, n_blank=12):
    if n_data < 1 or n_blank < 0:
        raise ValueError(f"selective_copy: need n_data >= 1 and n_blank >= 0, got {n_data}, {n_blank}")
    data = [rng.choice(LETTERS) for _ in range(n_data)]
    slots = sorted(rng.sample(range(n_data + n_blank), n_data))
    seq = ["_"] * (n_data + n_blank)
    for s, d in zip(slots, data):
        seq[s] = d
    words = seq + ["="] + data
    return words, list(range(len(seq) + 1, len(words)))


TASKS = {"counting": counting, "flipflop": flipflop, "selective_copy": selective_copy}
SETTINGS = {
    "counting": {"id": dict(min_len=36, max_len=44), "ood": dict(min_len=108, max_len=132)},
    "flipflop": {"id": dict(p_ignore=0.8), "ood": dict(p_ignore=0.98)},
    "selective_copy": {"id": dict(n_blank=12), "ood": dict(n_blank=36)},
}


def check(task, words, targets):
    """Recompute the targets from the rest of the sequence: True if they are right (tests use it)."""
    if task == "counting":
        q, value = words[-3], 0
        for w in words[:-4]:
            value = 0 if w == f"{q}=0" else value + (w == f"{q}++")
        return words[-1] == str(value) and targets == [len(words) - 1]
    if task == "flipflop":
        last = None
        for t in range(0, len(words), 2):
            if words[t] == "w":
                last = words[t + 1]
            if words[t] == "r" and (words[t + 1] != last or t + 1 not in targets):
                return False
        return sorted(targets) == [t + 1 for t in range(0, len(words), 2) if words[t] == "r"]
    if task == "selective_copy":
        sep = words.index("=")
        return [w for w in words[:sep] if w != "_"] == words[sep + 1:] and targets == list(range(sep + 1, len(words)))
    raise ValueError(f"unknown task {task!r}")
