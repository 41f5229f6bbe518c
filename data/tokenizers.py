"""Three tokenizers behind one interface: a character-level one for the toy tasks, a word-level
one for tasks made of whole-word symbols, and byte-level BPE (built with the HuggingFace
`tokenizers` library) for text.

All have encode(text) -> ids (no special tokens added), decode(ids) -> text (special tokens
dropped), bos_id / eos_id / pad_id (three distinct ids), vocab_size, and save(path), which
writes one JSON file {"type": "char" | "word" | "bpe", ...}; load_tokenizer(path) reads any back.
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.jsonl import atomic_write_text

# The 95 printable ASCII characters (space through '~') plus newline.
DEFAULT_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


def _check_ids(ids, vocab_size):
    ids = [int(i) for i in ids]  # accepts lists and 1-D tensors alike
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {vocab_size}")
    return ids


class CharTokenizer:
    """One id per character of `chars`, then BOS, EOS, PAD."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        if not isinstance(chars, str) or not chars:
            raise ValueError("chars must be a non-empty string")
        seen = set()
        for i, ch in enumerate(chars):
            if ch in seen:
                raise ValueError(f"duplicate character {ch!r} at position {i} in chars")
            seen.add(ch)
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        # Specials come after the characters, so character ids do not depend on them.
        self.bos_id, self.eos_id, self.pad_id = len(chars), len(chars) + 1, len(chars) + 2
        self.vocab_size = len(chars) + 3

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, ch in enumerate(text):
            if ch not in self.stoi:
                raise ValueError(f"character {ch!r} at position {i} is not in the tokenizer's "
                                 f"alphabet")
            ids.append(self.stoi[ch])
        return ids

    def decode(self, ids) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size) if i < n)

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps({"type": "char", "chars": self.chars}))


class WordTokenizer:
    """One id per word of a fixed vocabulary (text is split on whitespace), then BOS, EOS, PAD:
    for synthetic tasks whose symbols are whole words (data/prosqa.py), where a character-level
    model would spend most of its length on spelling."""

    def __init__(self, words):
        words = list(words)
        if not words or not all(isinstance(w, str) and w and not any(c.isspace() for c in w) for w in words):
            raise ValueError("words must be a non-empty list of non-empty strings without whitespace")
        if len(set(words)) != len(words):
            raise ValueError("duplicate word in the vocabulary")
        self.words = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.bos_id, self.eos_id, self.pad_id = len(words), len(words) + 1, len(words) + 2
        self.vocab_size = len(words) + 3

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, w in enumerate(text.split()):
            if w not in self.stoi:
                raise ValueError(f"word {w!r} (word {i}) is not in the tokenizer's vocabulary")
            ids.append(self.stoi[w])
        return ids

    def decode(self, ids) -> str:
        n = len(self.words)
        return " ".join(self.words[i] for i in _check_ids(ids, self.vocab_size) if i < n)

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps({"type": "word", "words": self.words}))


class BPETokenizer:
    """Byte-level BPE: text is split GPT-2 style, mapped to bytes, and merged. Every string
    round-trips because all 256 bytes are in the base vocabulary."""

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # Treat the text "<|eos|>" in user data as ordinary characters, not as the EOS token:
        # otherwise a prompt could end a sequence early, and decode(encode(s)) would drop it.
        self.tokenizer.encode_special_tokens = True
        ids = [tokenizer.token_to_id(t) for t in self.SPECIALS]
        if None in ids:
            raise ValueError(f"BPE tokenizer lacks special tokens {self.SPECIALS}")
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, text_path_or_paths, vocab_size: int = 1024) -> "BPETokenizer":
        paths = [text_path_or_paths] if isinstance(text_path_or_paths, (str, os.PathLike)) \
            else list(text_path_or_paths)
        paths = [os.fspath(p) for p in paths]
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"{p}: no such text file to train the BPE tokenizer on")
        base = 256 + len(cls.SPECIALS)
        if vocab_size < base:
            raise ValueError(f"vocab_size must be at least {base} (256 bytes + "
                             f"{len(cls.SPECIALS)} specials), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False keeps decode(encode(s)) == s; the decoder undoes the byte map.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train(paths, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=True)

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps({"type": "bpe", "tokenizer": self.tokenizer.to_str()}))


def load_tokenizer(path):
    """Read a file written by save(); a missing or corrupt file raises ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: tokenizer file is not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: tokenizer file is not valid JSON ({e.msg} at line "
                         f"{e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict) or obj.get("type") not in ("char", "word", "bpe"):
        raise ValueError(f'{path}: expected a JSON object with "type" "char", "word" or "bpe"')
    try:
        if obj["type"] == "word":
            if not isinstance(obj.get("words"), list):
                raise ValueError('"words" must be a list of strings')
            return WordTokenizer(obj["words"])
        if obj["type"] == "char":
            if not isinstance(obj.get("chars"), str):
                raise ValueError('"chars" must be a string')
            return CharTokenizer(obj["chars"])
        if not isinstance(obj.get("tokenizer"), str):
            raise ValueError('"tokenizer" must be a string holding the tokenizers-library JSON')
        try:
            tok = Tokenizer.from_str(obj["tokenizer"])
        except Exception as e:  # the library raises its own exception type
            raise ValueError(f"embedded tokenizer does not load ({e})") from None
        return BPETokenizer(tok)
    except ValueError as e:
        raise ValueError(f"{path}: bad {obj['type']} tokenizer file: {e}") from None
