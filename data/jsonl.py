"""JSONL datasets: one JSON object per line, checked strictly, written atomically.

Kinds and the string keys each record must have (extra keys are kept):
  prompt      {"prompt"}                         prompts for RL / evaluation
  sft         {"prompt", "completion"}           supervised fine-tuning pairs
  preference  {"prompt", "chosen", "rejected"}   DPO-style comparisons
"""
import json
import os
import tempfile

KINDS = {
    "prompt": ("prompt",),
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}


class JSONLError(ValueError):
    """A JSONL file is missing or has a bad line; the message starts with "<path>:<line>:"."""


def atomic_write_text(path, text: str) -> None:
    """Write text to path via a temp file in the same directory, so a crash leaves the old file
    or the new one, never half of one (os.replace is atomic within a filesystem)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _no_duplicate_keys(pairs):
    # json.loads keeps the last of two equal keys without a word; we refuse instead.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def read_jsonl(path, kind: str) -> list[dict]:
    """All records of a JSONL file of the given kind; any bad line raises JSONLError."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    required = KINDS[kind]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise JSONLError(f"{path}: cannot read file ({e.strerror})") from None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last record is not a blank line
    records = []
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}:"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONLError(f"{where} not valid UTF-8 (byte {e.start})") from None
        if not line.strip():
            raise JSONLError(f"{where} blank line (every line must be one JSON object)")
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise JSONLError(f"{where} invalid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # from _no_duplicate_keys
            raise JSONLError(f"{where} {e}") from None
        if not isinstance(obj, dict):
            raise JSONLError(f"{where} expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise JSONLError(f"{where} missing key(s) {', '.join(map(repr, missing))}; "
                             f"a {kind!r} record needs {', '.join(map(repr, required))}")
        for k in required:
            if not isinstance(obj[k], str):
                raise JSONLError(f"{where} key {k!r} must be a string, "
                                 f"got {type(obj[k]).__name__}")
        records.append(obj)
    if not records:
        raise JSONLError(f"{path}: no records")
    return records


def write_jsonl(path, rows) -> None:
    """Write rows (dicts) one JSON object per line, atomically; non-ASCII stays readable."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
