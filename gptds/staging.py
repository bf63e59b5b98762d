"""Outputs written atomically: everything goes to a staging sibling (<name>.partial-<pid>) that is renamed
to its final name only when complete, so an error or a kill never leaves a half-written dataset,
conversion or weights file under the name a user will read. Existing outputs need overwrite=True."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptds.errors import UserError


def check_output(path: Path, overwrite: bool, flag: str, folder: bool = True) -> None:
    """Refuse to replace an existing output unless overwrite; `flag` names it in the message."""
    path = Path(path)
    if folder and path.is_file():
        raise UserError(f"{flag} {path} is a file, not a folder")
    if folder and path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it "
                        f"or choose another folder")
    if not folder and path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it or choose another name")


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written (a file where a folder of its
    path should be, a read-only file system), instead of failing at the first log line or checkpoint."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: cannot create it: {existing} is a file ({os.strerror(errno.ENOTDIR)})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write below {existing} ({os.strerror(errno.EACCES)})")


def _staging_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextmanager
def staged_dir(output_dir: Path, overwrite: bool, flag: str) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces output_dir, on any error it is deleted."""
    output_dir = Path(output_dir)
    check_output(output_dir, overwrite, flag)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(output_dir)
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        check_output(output_dir, overwrite, flag)  # again: something may have appeared meanwhile
        if output_dir.exists():
            old = output_dir.with_name(f"{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            _remove(old)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        _remove(staging)
        raise


@contextmanager
def staged_file(output: Path, overwrite: bool, flag: str) -> Iterator[Path]:
    """Yield a staging path for one file; on success it replaces `output`, on any error it is deleted."""
    output = Path(output)
    check_output(output, overwrite, flag, folder=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f"{output.stem}.partial-{os.getpid()}{output.suffix}")  # keeps the suffix
    _remove(staging)
    try:
        yield staging
        os.replace(staging, output)
    except BaseException:
        _remove(staging)
        raise
