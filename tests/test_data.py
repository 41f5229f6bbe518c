import json
import os
import random

import pytest

from data import arithmetic, countdown, find_block, prosqa, tinytext
from data.jsonl import JSONLError, read_jsonl, write_jsonl
from data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer, load_tokenizer

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
TINYTEXT = os.path.join(DATA_DIR, "tinytext.txt")


# ---- tokenizers ----

def test_char_tokenizer_round_trip_and_specials(tmp_path):
    tok = CharTokenizer()
    assert len(tok.chars) == 96 and tok.vocab_size == 99
    s = "3,7,25,50:78=50+25+3\n123*45=5535 (~!)"
    ids = tok.encode(s)
    assert len(ids) == len(s) and tok.decode(ids) == s
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert len(specials) == 3 and min(specials) >= len(tok.chars)
    assert max(specials) < tok.vocab_size
    # specials are dropped by decode, and never produced by encode
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == s
    assert not specials & set(ids)
    small = CharTokenizer("0123456789+=")
    assert small.encode("12+3=") == [1, 2, 10, 3, 11] and small.bos_id == 12
    path = tmp_path / "char.json"
    small.save(path)
    again = load_tokenizer(path)
    assert isinstance(again, CharTokenizer) and again.encode("12+3=") == small.encode("12+3=")
    assert (again.bos_id, again.eos_id, again.pad_id) == (small.bos_id, small.eos_id, small.pad_id)


def test_char_tokenizer_errors():
    with pytest.raises(ValueError, match=r"'é' at position 3"):
        CharTokenizer().encode("abcé")
    with pytest.raises(ValueError, match="duplicate character 'a'"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="out of range"):
        CharTokenizer("ab").decode([0, 5])


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    with open(TINYTEXT, encoding="utf-8") as f:
        text = f.read()
    assert len(text) > 50_000
    # A few KB slice keeps training instant while still learning merges.
    path = tmp_path_factory.mktemp("bpe") / "slice.txt"
    path.write_text(text[:6000], encoding="utf-8")
    return BPETokenizer.train(path, vocab_size=300)


def test_bpe_round_trip_save_load(bpe, tmp_path):
    assert bpe.vocab_size == 300
    assert len({bpe.bos_id, bpe.eos_id, bpe.pad_id}) == 3
    ascii_text = "The old fox carried two drums near the harbor.\n  Twice!\tDone ~"
    unicode_text = "Grüße, 世界! naïve café 🙂🙂 \u200b end <|eos|> literal"
    for s in [ascii_text, unicode_text, "", " ", "\n\n"]:
        assert bpe.decode(bpe.encode(s)) == s
    # Merges were learned: common corpus words take fewer tokens than their bytes.
    assert len(bpe.encode("the river")) < len("the river".encode())
    # Special-token text in user data is plain text, never the special id.
    assert bpe.eos_id not in bpe.encode("x<|eos|>y")
    ids = bpe.encode(ascii_text)
    assert bpe.decode([bpe.bos_id] + ids + [bpe.eos_id, bpe.pad_id]) == ascii_text
    rng = random.Random(0)
    for _ in range(20):
        # random code points from several scripts, surrogates excluded (not valid in UTF-8)
        s = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF),
                                    rng.randrange(0x1F300, 0x1FAFF)])) for _ in range(30))
        assert bpe.decode(bpe.encode(s)) == s
    path = tmp_path / "bpe.json"
    bpe.save(path)
    assert json.loads(path.read_text())["type"] == "bpe"
    again = load_tokenizer(path)
    assert isinstance(again, BPETokenizer)
    for s in [ascii_text, unicode_text, "x<|eos|>y"]:
        assert again.encode(s) == bpe.encode(s)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == \
        (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.vocab_size)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left


def test_bpe_train_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 259"):
        BPETokenizer.train(TINYTEXT, vocab_size=100)
    with pytest.raises(ValueError, match="nope.txt"):
        BPETokenizer.train(str(tmp_path / "nope.txt"), vocab_size=300)


def test_load_tokenizer_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match="missing.json.*cannot read"):
        load_tokenizer(missing)
    cases = {
        "trunc.json": ('{"type": "char", "chars": "ab', "not valid JSON"),
        "list.json": ("[1, 2]", '"type"'),
        "kind.json": ('{"type": "wordpiece"}', '"type"'),
        "chars.json": ('{"type": "char", "chars": 5}', '"chars" must be a string'),
        "dup.json": ('{"type": "char", "chars": "aa"}', "duplicate character"),
        "words.json": ('{"type": "word", "words": ["a", "a"]}', "duplicate word"),
        "words2.json": ('{"type": "word", "words": "ab"}', '"words" must be a list'),
        "bpe.json": ('{"type": "bpe", "tokenizer": "{not json"}', "embedded tokenizer"),
    }
    for name, (content, why) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=why) as e:
            load_tokenizer(path)
        assert name in str(e.value)


def test_word_tokenizer_round_trip_errors_and_save(tmp_path):
    tok = WordTokenizer(["Every", "wumpus", "is", "a", "yumpus", "."])
    ids = tok.encode("Every wumpus is  a yumpus .")
    assert ids == [0, 1, 2, 3, 4, 5] and tok.decode(ids + [tok.eos_id]) == "Every wumpus is a yumpus ."
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (6, 7, 8, 9)
    with pytest.raises(ValueError, match=r"word 'gorpus' \(word 1\)"):
        tok.encode("Every gorpus")
    for bad in ([], ["a b"], ["a", ""]):
        with pytest.raises(ValueError):
            WordTokenizer(bad)
    tok.save(tmp_path / "w.json")
    again = load_tokenizer(tmp_path / "w.json")
    assert isinstance(again, WordTokenizer) and again.words == tok.words


def test_tinytext_file_is_reproducible():
    with open(TINYTEXT, encoding="utf-8") as f:
        assert f.read() == tinytext.make_text(tinytext.N_SENTENCES, tinytext.SEED)
    assert tinytext.make_text(50, 1) == tinytext.make_text(50, 1) != tinytext.make_text(50, 2)


# ---- arithmetic ----

def test_arithmetic_reward():
    r = arithmetic.reward
    assert r("123+456=", "579") == 1.0
    for bad in ["579 ", " 579", "5790", "579579", "", "0579", "57a9", "+579", "579\n", "580",
                "５７９"]:
        assert r("123+456=", bad) == 0.0, bad
    assert r("12*34=", "408") == 1.0 and r("12*34=", "46") == 0.0
    assert r("0+0=", "0") == 1.0 and r("0+0=", "00") == 0.0 and r("0*7=", "-0") == 0.0
    for prompt in ["123+456", "1-2=", "a+b=", "01+2=", "1+2=3", " 1+2="]:
        with pytest.raises(ValueError, match="malformed"):
            r(prompt, "3")


def test_arithmetic_sample_format():
    rng = random.Random(0)
    for digits, op in [(1, "+"), (3, "*"), (5, "+")]:
        for _ in range(200):
            p = arithmetic.sample(rng, digits=digits, op=op)
            a, b = p["prompt"][:-1].split(op)
            assert 0 <= int(a) < 10 ** digits and 0 <= int(b) < 10 ** digits
            assert str(int(a)) == a and str(int(p["answer"])) == p["answer"]
    with pytest.raises(ValueError, match="op"):
        arithmetic.sample(rng, op="-")
    with pytest.raises(ValueError, match="digits"):
        arithmetic.sample(rng, digits=0)


def test_arithmetic_balanced_digit_counts():
    """balanced: each operand's digit count is uniform over 1..digits (uniform operands are 90%
    three-digit); the uniform draw is unchanged by the knob's existence."""
    rng = random.Random(0)
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(3000):
        p = arithmetic.sample(rng, digits=3, balanced=True)
        for x in p["prompt"][:-1].split("+"):
            counts[len(x)] += 1
        assert arithmetic.reward(p["prompt"], p["answer"]) == 1.0
    assert all(abs(c / 6000 - 1 / 3) < 0.03 for c in counts.values()), counts
    uniform = [arithmetic.sample(random.Random(5), digits=3)["prompt"] for _ in range(3)]
    assert uniform == [arithmetic.sample(random.Random(5), digits=3, balanced=False)["prompt"] for _ in range(3)]
    full = sum(len(arithmetic.sample(rng, digits=3)["prompt"]) == 8 for _ in range(2000))
    assert full / 2000 > 0.7  # 0.9 * 0.9 of plain draws are 3 + 3 digits


@pytest.mark.parametrize("task,knobs", [(arithmetic, dict(digits=3, op="*")),
                                        (arithmetic, dict(digits=3, op="+", balanced=True)),
                                        (arithmetic, dict(digits=2, op="+")),
                                        (countdown, dict(n_numbers=3, max_number=50)),
                                        (countdown, dict(n_numbers=4, max_number=20)),
                                        (prosqa, dict(n_nodes=12, min_depth=3, max_depth=4, n_extra=3)),
                                        (find_block, dict(n_blocks=10, block_len=5, n_query=2))])
def test_dataset_distinct_deterministic_and_verified(task, knobs):
    for split in ["train", "test"]:
        d = task.dataset(300, split, seed=1, **knobs)
        assert len(d) == 300 and len({p["prompt"] for p in d}) == 300
        assert d == task.dataset(300, split, seed=1, **knobs)
        assert d != task.dataset(300, split, seed=2, **knobs)
        assert all(task.split_of(p["prompt"]) == split for p in d)
        assert all(task.reward(p["prompt"], p["answer"]) == 1.0 for p in d)


def test_splits_disjoint():
    # 2-digit addition has 10**4 prompts, about a tenth of them test: take (nearly) all of it.
    train = arithmetic.dataset(2000, "train", seed=0, digits=2)
    test = arithmetic.dataset(1000, "test", seed=0, digits=2)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    train = countdown.dataset(500, "train", seed=0)
    test = countdown.dataset(500, "test", seed=0)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    with pytest.raises(ValueError, match="split"):
        arithmetic.dataset(10, "val", seed=0)


def _edges(prompt):
    w = prompt.split()
    return {(w[i + 1], w[i + 4]) for i in range(0, len(w), 6) if w[i] == "Every"}


def test_prosqa_graph_answer_and_chain():
    rng = random.Random(0)
    tok = WordTokenizer(prosqa.WORDS)
    for _ in range(300):
        ex = prosqa.sample(rng, n_nodes=14, min_depth=2, max_depth=5, n_extra=5)
        edges, words = _edges(ex["prompt"]), ex["prompt"].split()
        root, (a, b) = words[-10], (words[-5], words[-2])
        dist = prosqa._reach(edges, root)
        target = ex["target"]
        assert ex["answer"] == f"### {target}" and target in (a, b) and a != b
        distractor = a if b == target else b
        assert distractor not in dist and dist[target] == len(ex["steps"])
        assert 2 <= len(ex["steps"]) <= 5
        # the chain is made of the prompt's facts and walks root -> answer
        chain = [(s.split()[1], s.split()[4]) for s in ex["steps"]]
        assert set(chain) <= edges and chain[0][0] == root and chain[-1][1] == target
        assert all(x[1] == y[0] for x, y in zip(chain, chain[1:]))
        assert root not in prosqa._reach(edges, target)  # acyclic along the chain
        tok.encode(ex["prompt"] + " " + ex["cot"])  # every word is in the vocabulary
        assert prosqa.reward(ex["prompt"], ex["cot"]) == prosqa.reward(ex["prompt"], ex["answer"]) == 1.0
        assert prosqa.reward(ex["prompt"], f"### {distractor}") == 0.0


def test_prosqa_reward_recomputes_the_truth_and_rejects_bad_input():
    ex = prosqa.sample(random.Random(1))
    words = ex["prompt"].split()
    a, b = words[-5], words[-2]
    swapped = " ".join(words[:-5] + [b] + words[-4:-2] + [a, "?"])  # options in the other order
    assert prosqa.truth(swapped) == ex["target"]
    for wrong in ("", ex["target"], f"{ex['target']} ###", f"{ex['answer']} ."):
        assert prosqa.reward(ex["prompt"], wrong) == 0.0
    with pytest.raises(ValueError, match="malformed ProsQA prompt"):
        prosqa.reward("Is Tom a x or a y ?", "### x")
    with pytest.raises(ValueError, match="n_nodes"):
        prosqa.sample(random.Random(0), n_nodes=6, max_depth=3)


def test_too_small_problem_space_raises():
    # 1-digit addition has 100 prompts in all, so ~10 test prompts.
    with pytest.raises(ValueError, match="fewer than 50 distinct test problems"):
        arithmetic.dataset(50, "test", seed=0, digits=1)
    with pytest.raises(ValueError, match="fewer than 200 distinct train problems"):
        arithmetic.dataset(200, "train", seed=0, digits=1)
    # numbers from {1, 2}, two of them: only a handful of targets exist.
    with pytest.raises(ValueError, match="fewer than 30 distinct"):
        countdown.dataset(30, "train", seed=0, n_numbers=2, max_number=2)


# ---- countdown ----

def test_countdown_reward():
    p = "3,7,25,50:78="
    for good in ["50+25+3", "3+25+50", "(50+25)+3", "50+(25+3)", "(((((50+25)))))+3",
                 "3+(50+25)"]:
        assert countdown.reward(p, good) == 1.0, good
    assert countdown.reward("3,7,25,50:250=", "(50-25)*(3+7)") == 1.0
    cases = {  # each is wrong for the one reason its name gives
        "wrong value": "50+25+7",
        "number used twice": "50+25+25/25*3",
        "3 used twice": "25*3+3",
        "number not given": "70+8",
        "leading zero": "50+25+03",
        "unbalanced open": "(50+25+3",
        "unbalanced close": "50+25+3)",
        "trailing garbage": "50+25+3abc",
        "second answer": "50+25+3=78",
        "two expressions": "(50+25+3)(7)",
        "space": "50 + 25 + 3",
        "trailing space": "50+25+3 ",
        "unary minus": "50+25-(-3)",
        "empty": "",
        "operator only": "+",
        "double operator": "50++25+3",
        "decimal": "50+25+3.0",
        "power": "50+25+3**7",
        "eval injection": "__import__('os').system('true')",
        "unicode digits": "５0+25+3",
        "deep nesting": "(" * 5000 + "50+25+3" + ")" * 5000,
    }
    for name, c in cases.items():
        assert countdown.reward(p, c) == 0.0, name
    # 3 given twice may be used twice; dividing by zero still earns nothing.
    assert countdown.reward("3,3,25:78=", "25*3+3") == 1.0
    assert countdown.reward("3,3,25,50:78=", "50+25+3") == 1.0
    assert countdown.reward("3,3,25,50:78=", "50+25/(3-3)") == 0.0
    # exact fractions in between are fine: 7/2*4 = 14
    assert countdown.reward("2,4,7:14=", "7/2*4") == 1.0
    assert countdown.reward("2,4,7:3=", "7/2") == 0.0  # 3.5, not 3
    for bad in ["3,7,25,50:78", "3 7 25:78=", ":78=", "3,7:0=", "3,7:-4=", "3,07:10="]:
        with pytest.raises(ValueError, match="malformed"):
            countdown.reward(bad, "3+7")


def test_countdown_sample_format():
    rng = random.Random(3)
    for n_numbers in [3, 4]:
        for _ in range(300):
            p = countdown.sample(rng, n_numbers=n_numbers, max_number=30)
            nums, target = p["prompt"][:-1].split(":")
            nums = [int(x) for x in nums.split(",")]
            assert len(nums) == n_numbers and nums == sorted(nums)
            assert all(1 <= x <= 30 for x in nums) and int(target) > 0
            assert countdown.reward(p["prompt"], p["answer"]) == 1.0
    with pytest.raises(ValueError, match="n_numbers"):
        countdown.sample(rng, n_numbers=1)


# ---- jsonl ----

def test_jsonl_round_trip(tmp_path):
    rows = [dict(prompt="1+1=", completion="2", extra=[1, 2]),
            dict(prompt="naïve 世界", completion="ok\nnew line")]
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path, "sft") == rows
    assert read_jsonl(path, "prompt") == rows
    assert "世界" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    write_jsonl(path, rows[:1])  # overwrite in place
    assert read_jsonl(path, "sft") == rows[:1]
    assert os.listdir(tmp_path) == ["sft.jsonl"]  # no temp file left behind
    pref = tmp_path / "pref.jsonl"
    write_jsonl(pref, [dict(prompt="p", chosen="a", rejected="b")])
    assert read_jsonl(pref, "preference")[0]["chosen"] == "a"


GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'


@pytest.mark.parametrize("lines,lineno,why", [
    ([GOOD, '{"prompt": "p", "chosen": "a", "rejected": }'], 2, "invalid JSON"),
    ([GOOD, GOOD, '{"prompt": "p", "chosen": "a"}'], 3, "missing key.*'rejected'"),
    (['{"chosen": "a"}'], 1, "missing key.*'prompt'.*'rejected'"),
    ([GOOD, '{"prompt": "p", "chosen": 3, "rejected": "b"}'], 2, "'chosen' must be a string"),
    ([GOOD, '{"prompt": null, "chosen": "a", "rejected": "b"}'], 2, "'prompt' must be a string"),
    (['["p", "a", "b"]', GOOD], 1, "expected a JSON object"),
    (['"just a string"'], 1, "expected a JSON object"),
    ([GOOD, "", GOOD], 2, "blank line"),
    ([GOOD, "   ", GOOD], 2, "blank line"),
    ([GOOD, GOOD, ""], 3, "blank line"),  # file ends "...}\n\n"
    (['{"prompt": "p", "prompt": "q", "chosen": "a", "rejected": "b"}'], 1, "duplicate key"),
])
def test_jsonl_errors(tmp_path, lines, lineno, why):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(JSONLError, match=why) as e:
        read_jsonl(path, "preference")
    assert str(e.value).startswith(f"{path}:{lineno}: ")


def test_jsonl_empty_missing_and_kind(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(JSONLError) as e:
        read_jsonl(empty, "prompt")
    assert str(e.value) == f"{empty}: no records"
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(JSONLError, match="missing.jsonl"):
        read_jsonl(missing, "prompt")
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(JSONLError, match=f"{bad_utf8}:2: not valid UTF-8"):
        read_jsonl(bad_utf8, "prompt")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_jsonl(empty, "dpo")
    assert issubclass(JSONLError, ValueError)


def test_find_block_one_block_holds_every_query_letter():
    rng = random.Random(0)
    for n_blocks, block_len, n_query in [(10, 5, 2), (4, 3, 3), (20, 6, 1)]:
        for _ in range(200):
            ex = find_block.sample(rng, n_blocks=n_blocks, block_len=block_len, n_query=n_query)
            body, query = ex["prompt"].split("#")
            blocks = body.split(".")
            assert len(blocks) == n_blocks and len(query) == n_query
            assert all(len(set(b)) == len(b) == block_len for b in blocks)
            assert [b for b in blocks if set(query) <= set(b)] == [ex["answer"]]
            assert find_block.truth(ex["prompt"]) == ex["answer"]
    # the distractors share letters with the query: one letter alone does not find the block
    exs = [find_block.sample(rng) for _ in range(200)]
    shared = sum(sum(q in b for b in e["prompt"].split("#")[0].split(".") if b != e["answer"])
                 for e in exs for q in e["prompt"].split("#")[1]) / 200
    assert shared > 2


def test_find_block_reward_and_bad_input():
    assert find_block.reward("abc.def#fd", "def") == 1.0
    assert find_block.reward("abc.def#fd", "abc") == 0.0
    assert find_block.reward("abc.def#fd", "def ") == 0.0
    with pytest.raises(ValueError, match="0 blocks"):
        find_block.truth("abc.def#ea")
    with pytest.raises(ValueError, match="2 blocks"):
        find_block.truth("abc.bca#ab")
    with pytest.raises(ValueError, match="malformed"):
        find_block.truth("abc.def")
    with pytest.raises(ValueError, match="n_query <= block_len"):
        find_block.sample(random.Random(0), block_len=2, n_query=3)
