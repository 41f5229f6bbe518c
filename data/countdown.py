"""Countdown, as in TinyZero: reach a target from a few numbers with + - * / and parentheses.

Prompt: the numbers in ascending order joined by ",", then ":", the target, then "=".
  "3,7,25,50:78=" means: use 3, 7, 25, 50 (each at most once) to make 78.
Answer: an expression such as "50+25+3", so prompt + answer reads "...:78=50+25+3".
Rules: non-negative integers written as given (no leading zeros), + - * / and parentheses, no
spaces, no unary minus; "/" is exact division, so intermediate fractions are fine ("7/2*4" is
14); each given number may be used at most as often as it is given, and not all need be used.
Knobs: n_numbers (how many numbers, 3 or 4 in TinyZero), max_number (numbers are 1..max_number).
"""
import random
import re
from collections import Counter
from fractions import Fraction

from data.splits import distinct_problems, split_of  # noqa: F401 (split_of is part of the task API)

KNOBS = ("n_numbers", "max_number")
_PROMPT = re.compile(r"([1-9][0-9]*(?:,[1-9][0-9]*)*):([1-9][0-9]*)=")
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_MAX_DEPTH = 50  # parentheses nesting; bounds the recursion on hostile completions


def _apply(op, x, y):
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y  # Fraction / Fraction; raises ZeroDivisionError on 0


def _random_expr(rng, nums):
    """(text, value, precedence) of a random binary tree over nums in this order."""
    if len(nums) == 1:
        return str(nums[0]), Fraction(nums[0]), 3
    k = rng.randint(1, len(nums) - 1)
    (lt, lv, lp), (rt, rv, rp) = _random_expr(rng, nums[:k]), _random_expr(rng, nums[k:])
    op = rng.choice("+-*/")
    # Parenthesize only where needed: a lower-precedence child, or a right child of equal
    # precedence (a-(b-c) is not a-b-c).
    if lp < _PREC[op]:
        lt = f"({lt})"
    if rp <= _PREC[op]:
        rt = f"({rt})"
    return lt + op + rt, _apply(op, lv, rv), _PREC[op]


def sample(rng: random.Random, n_numbers: int = 3, max_number: int = 50) -> dict:
    if not isinstance(n_numbers, int) or n_numbers < 2:
        raise ValueError(f"n_numbers must be an int >= 2, got {n_numbers!r}")
    if not isinstance(max_number, int) or max_number < 1:
        raise ValueError(f"max_number must be an int >= 1, got {max_number!r}")
    while True:
        nums = [rng.randint(1, max_number) for _ in range(n_numbers)]
        used = rng.sample(nums, rng.randint(2, n_numbers))
        try:
            text, value, _ = _random_expr(rng, used)
        except ZeroDivisionError:
            continue
        # Keep only positive integer targets; the answer is the expression that made it.
        if value > 0 and value.denominator == 1:
            prompt = ",".join(map(str, sorted(nums))) + f":{value.numerator}="
            return dict(prompt=prompt, answer=text)


def dataset(n: int, split: str, seed: int, n_numbers: int = 3, max_number: int = 50) -> list[dict]:
    """n distinct problems of one split, the same list for the same arguments."""
    return distinct_problems(sample, n, split, seed, n_numbers=n_numbers, max_number=max_number)


class _Parser:
    """Recursive descent over tokens; every method returns a Fraction or raises ValueError.
        expr   := term (("+" | "-") term)*
        term   := factor (("*" | "/") factor)*
        factor := NUMBER | "(" expr ")"
    """

    def __init__(self, tokens):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.pos += 1
        return tok

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = _apply(self.take(), value, self.term())
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/"):
            value = _apply(self.take(), value, self.factor())
        return value

    def factor(self):
        tok = self.take()
        if tok == "(":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise ValueError("too deeply nested")
            value = self.expr()
            if self.take() != ")":
                raise ValueError("expected )")
            self.depth -= 1
            return value
        if tok.isdigit():
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")


def reward(prompt: str, completion: str) -> float:
    """1.0 if the completion is a well-formed expression over the given numbers (each used at
    most as often as given) whose exact value is the target, else 0.0. Never evaluates Python."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"malformed countdown prompt {prompt!r}; expected e.g. '3,7,25,50:78='")
    given, target = Counter(m[1].split(",")), int(m[2])
    tokens = _TOKEN.findall(completion)
    if "".join(tokens) != completion:  # some character is not part of any token (e.g. a space)
        return 0.0
    # Numbers are compared as written, so "07" or "3.0" never stand in for a given number.
    used = Counter(t for t in tokens if t[0].isdigit())
    if any(count > given[num] for num, count in used.items()):
        return 0.0
    parser = _Parser(tokens)
    try:
        value = parser.expr()
    except (ValueError, ZeroDivisionError):
        return 0.0
    if parser.pos != len(tokens):  # leftover tokens, e.g. the ")" of "1+2)" or "(3)(5)"
        return 0.0
    return 1.0 if value == target else 0.0
