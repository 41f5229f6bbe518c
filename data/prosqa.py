"""ProsQA-style graph reasoning (Coconut, arXiv 2412.06769, sec. 4): made-up concepts, facts
"Every wumpus is a yumpus .", and a question whose answer needs a multi-hop search.

    Every bompus is a rempus . Every wumpus is a bompus . ... Tom is a wumpus .
    Is Tom a rempus or a gimpus ?
    CoT answer:  Every wumpus is a bompus . Every bompus is a rempus . ### rempus

The facts form a random DAG. The entity's concept (the root) reaches the target by a shortest
path of depth in [min_depth, max_depth] edges; the distractor sits at the end of a chain of the
same length in a part of the graph the root cannot reach (edges may lead from that part into
the reachable one, never back), so neither chain length nor in-degree gives the answer away.
The remaining nodes hang off either part, then n_extra random edges are added under the same
rules, never shortening the root -> target path. Facts are listed sorted, so a prompt is a
function of its graph and question: the hash split (data/splits.py) then keeps held-out
graphs out of training. The paper's ProsQA averages 23 nodes, 36 edges and a shortest path of
3.8 with GPT-2's tokens; the defaults here are smaller (12 nodes, 13 edges, depth 3-4) so a
CPU can train on it in minutes.

Knobs: n_nodes, min_depth, max_depth, n_extra. Every word is one token of WORDS
(data.tokenizers.WordTokenizer(WORDS)); <bot>, <eot>, <latent> are Coconut's markers.
"""
import random
from collections import deque

from data.splits import distinct_problems, split_of  # noqa: F401 (split_of is part of the task API)

KNOBS = ("n_nodes", "min_depth", "max_depth", "n_extra")
NAMES = [c + v + "mpus" for c in "bdfghjklnrstvwyz" for v in "aeiou"]  # 80 made-up concepts
ENTITIES = ["Tom", "Sam", "Max", "Rex", "Ann", "Eva", "Jo", "Kim"]
WORDS = NAMES + ENTITIES + ["Every", "is", "a", ".", "Is", "or", "?", "###", "<bot>", "<eot>", "<latent>"]


def _reach(edges, src):
    """{node: shortest distance from src} over the directed edges (BFS)."""
    out, dist, todo = {}, {src: 0}, deque([src])
    for a, b in edges:
        out.setdefault(a, []).append(b)
    while todo:
        a = todo.popleft()
        for b in out.get(a, []):
            if b not in dist:
                dist[b] = dist[a] + 1
                todo.append(b)
    return dist


def _path(edges, src, dst):
    """One shortest path src -> dst as a list of edges (BFS parents, ties to the first found)."""
    out, parent, todo = {}, {src: None}, deque([src])
    for a, b in sorted(edges):
        out.setdefault(a, []).append(b)
    while todo:
        a = todo.popleft()
        for b in out.get(a, []):
            if b not in parent:
                parent[b] = a
                todo.append(b)
    path, node = [], dst
    while parent[node] is not None:
        path.append((parent[node], node))
        node = parent[node]
    return path[::-1]


def sample(rng: random.Random, n_nodes: int = 12, min_depth: int = 3, max_depth: int = 4,
           n_extra: int = 3) -> dict:
    if not 1 <= min_depth <= max_depth:
        raise ValueError(f"need 1 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
    if not 2 * (max_depth + 1) <= n_nodes <= len(NAMES):
        raise ValueError(f"n_nodes must be in [{2 * (max_depth + 1)}, {len(NAMES)}] for max_depth "
                         f"{max_depth}, got {n_nodes}")
    if n_extra < 0:
        raise ValueError(f"n_extra must be >= 0, got {n_extra}")
    depth = rng.randint(min_depth, max_depth)
    names = rng.sample(NAMES, n_nodes)
    reach, other = names[:depth + 1], names[depth + 1:2 * depth + 2]  # the two chains
    root, target, distractor = reach[0], reach[-1], other[-1]
    edges = set(zip(reach, reach[1:])) | set(zip(other, other[1:]))
    part = {n: "R" for n in reach} | {n: "U" for n in other}
    for n in names[2 * depth + 2:]:  # a leaf hanging off either part
        side = rng.choice("RU")
        edges.add((rng.choice([m for m in part if part[m] == side]), n))
        part[n] = side
    for _ in range(20 * n_extra):
        if len(edges) >= 2 * depth + n_nodes - 2 * depth - 2 + n_extra:
            break
        a, b = rng.sample(names, 2)
        if (a, b) in edges or (part[a], part[b]) == ("R", "U") or a in _reach(edges, b):
            continue  # the root would reach the distractor's part, or a cycle
        if _reach(edges | {(a, b)}, root)[target] < depth:
            continue  # a shortcut: the gold path must stay `depth` long
        edges.add((a, b))
    entity = rng.choice(ENTITIES)
    options = [target, distractor]
    rng.shuffle(options)
    facts = " ".join(f"Every {a} is a {b} ." for a, b in sorted(edges))
    prompt = f"{facts} {entity} is a {root} . Is {entity} a {options[0]} or a {options[1]} ?"
    steps = [f"Every {a} is a {b} ." for a, b in _path(edges, root, target)]
    # answer: the completion without a chain (what reward() checks); cot: the chain, then it
    return dict(prompt=prompt, answer=f"### {target}", target=target, steps=steps,
                cot=" ".join(steps + [f"### {target}"]))


def dataset(n: int, split: str, seed: int, n_nodes: int = 12, min_depth: int = 3, max_depth: int = 4,
            n_extra: int = 3) -> list[dict]:
    """n distinct problems of one split, the same list for the same arguments."""
    return distinct_problems(sample, n, split, seed, n_nodes=n_nodes, min_depth=min_depth,
                             max_depth=max_depth, n_extra=n_extra)


def truth(prompt: str) -> str:
    """The option the entity's concept reaches, recomputed from the prompt's facts."""
    words = prompt.split()
    try:
        q = len(words) - 1 - words[::-1].index("Is")
        entity, opt1, opt2 = words[q + 1], words[q + 3], words[q + 6]
        root = words[q - 2]
        body = words[:q - 5]
        if len(body) % 6 or words[q - 5:q - 1] != [entity, "is", "a", root] or words[q + 4:q + 6] != ["or", "a"]:
            raise ValueError
        edges = {(body[i + 1], body[i + 4]) for i in range(0, len(body), 6)}
    except (ValueError, IndexError):
        raise ValueError(f"malformed ProsQA prompt {prompt[:80]!r}...") from None
    dist = _reach(edges, root)
    if (opt1 in dist) == (opt2 in dist):
        raise ValueError(f"ProsQA prompt has {'both' if opt1 in dist else 'neither'} option reachable")
    return opt1 if opt1 in dist else opt2


def reward(prompt: str, completion: str) -> float:
    """1.0 if the completion ends with "### <the reachable option>" (whatever comes before it:
    a chain of thought, latent markers, or nothing), else 0.0."""
    words = completion.split()
    return 1.0 if len(words) >= 2 and words[-2] == "###" and words[-1] == truth(prompt) else 0.0
