"""The one exception type for mistakes a user can fix (bad flags, files, configs). The CLI prints it
as a single line and exits non-zero, without a traceback (OSErrors too: disk full, permissions); anything
else is a bug and keeps its traceback.
Also the reader of the JSON files users hand to gptds, whose errors name the file and where in it."""

import json
from pathlib import Path


class UserError(Exception):
    """Raised with a message that names the file, line or field at fault and what to change."""


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
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected {expected}, got a JSON {type(value).__name__}")
    return value
