"""The one exception type for mistakes a user can fix (bad flags, files, configs). The CLI prints it
as a single line and exits non-zero, without a traceback (OSErrors too: disk full, permissions); anything
else is a bug and keeps its traceback.
Also the reader of the JSON files users hand to gptds, whose errors name the file and where in it, and
`report`, which prints such a message once per launch however many ranks meet it."""

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
