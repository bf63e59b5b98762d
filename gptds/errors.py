"""The one exception type for mistakes a user can fix (bad flags, files, configs). The CLI prints it
as a single line and exits non-zero, without a traceback (OSErrors too: disk full, permissions); anything
else is a bug and keeps its traceback.
Also the one JSON parser every file gptds reads goes through (manifests, meta.json, DeepSpeed and Hugging
Face configs, evaluation files, JSONL records, safetensors metadata), whose errors name the file and where,
and `report`, which prints such a message once per launch however many ranks meet it."""

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
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


REPORTS_DIR = Path(tempfile.gettempdir()) / f"gptds-reports-{os.getuid() if hasattr(os, 'getuid') else 0}"
REPORT_MARKER_MAX_AGE_S = 24 * 3600


def _launch_id() -> str | None:
    """What the ranks of one launch on this host share: their launcher (the parent process, by pid and start
    time) and the rendezvous port; None when this process is not one of several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    try:
        started = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    return f"{os.getppid()}-{started}-{os.environ.get('MASTER_PORT', '')}"


def _first_to_report(text: str) -> bool:
    """True in the first rank of this launch (on this host) to report `text`; False in the others. Every rank
    of a launch usually meets the same mistake (they check the same flags and files): each tries to create a
    marker named after the launch and the message, and only the one that creates it prints."""
    launch = _launch_id()
    if launch is None:
        return True
    try:
        REPORTS_DIR.mkdir(exist_ok=True)
        now = time.time()
        for old in REPORTS_DIR.iterdir():  # markers of launches long gone (another rank may sweep too)
            with contextlib.suppress(FileNotFoundError):
                if now - old.stat().st_mtime > REPORT_MARKER_MAX_AGE_S:
                    old.unlink()
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        fd = os.open(REPORTS_DIR / f"{launch}-{digest}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    except OSError:  # no usable temp folder: better every rank than none
        return True
    os.close(fd)
    return True


def report(text: str) -> None:
    """Print a message for the user on stderr: in one write, so that ranks sharing a terminal never glue
    their lines together, and once per launch (the first rank that meets it; see _first_to_report)."""
    text = text if text.endswith("\n") else text + "\n"
    if _first_to_report(text):
        sys.stderr.write(text)  # one call: print() writes the text and its newline separately
        sys.stderr.flush()
