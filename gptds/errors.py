"""The one exception type for mistakes a user can fix (bad flags, files, configs). The CLI prints it
as a single line and exits non-zero, without a traceback (OSErrors too: disk full, permissions); anything
else is a bug and keeps its traceback.
Also the one JSON parser every file gptds reads goes through (manifests, meta.json, DeepSpeed and Hugging
Face configs, evaluation files, JSONL records, safetensors metadata), whose errors name the file and where."""

import json
from pathlib import Path


class UserError(Exception):
    """Raised with a message that names the file, line or field at fault and what to change."""


class EveryRankError(UserError):
    """A UserError that every rank raises with the same message (the ranks agreed on it, e.g. a failed
    checkpoint write on one of them): the command line prints it once, from rank 0."""


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook: a JSON object whose key repeats is refused; json's default keeps the last value
    silently, so {"response": "a", "response": "b"} would train on "b" without a word."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


class _NotFinite(Exception):
    def __init__(self, text: str):
        self.text = text


def _finite(text: str) -> float:
    """parse_float and parse_constant: NaN, Infinity and numbers beyond a float (1e999) are refused; Python's
    json accepts them (they are not JSON) and a NaN learning rate or epsilon would pass silently."""
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _NotFinite(text)
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_float=_finite, parse_constant=_finite)
_RECORD_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)  # data records: NaN in an unused column is data


def parse_json(text: str, where: str, pos: int | None = None, record: bool = False):
    """json.loads(text) for everything gptds reads, or with `pos` the (value, end) of the JSON value that
    starts there (JSONDecoder.raw_decode). Malformed text raises json.JSONDecodeError, which each reader
    turns into its own message with the line and column; nesting deeper than the parser's recursion limit
    (a RecursionError), a key repeated in one object and, except in data records (record=True: a NaN in a
    column nobody reads is data), a number that is not finite (NaN, Infinity, 1e999) are UserErrors naming
    `where`."""
    decoder = _RECORD_DECODER if record else _DECODER
    try:
        return decoder.raw_decode(text, pos) if pos is not None else decoder.decode(text)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply (arrays or objects inside each other beyond what the "
                        f"parser allows); no gptds file needs more than a few levels") from None
    except _DuplicateKey as e:
        raise UserError(f"{where}: key {e.key!r} appears twice in one JSON object (a JSON reader would keep only "
                        f"the last value, silently); remove one of them") from None
    except _NotFinite as e:
        raise UserError(f"{where}: the number {e.text} is not finite (NaN and Infinity are not JSON); write a finite "
                        f"number") from None


def read_json_object(path: Path, expected: str = "a JSON object") -> dict:
    """A JSON file that must hold an object; unreadable, non-UTF-8 or malformed files are UserErrors
    naming the file and the line:column or byte offset at fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text at byte offset {e.start} ({e.reason}); expected {expected}") from None
    try:
        value = parse_json(text, str(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected {expected}, got a JSON {type(value).__name__}")
    return value
