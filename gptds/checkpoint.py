"""Checkpoint folders. <checkpoint_dir>/step_00000100/ holds DeepSpeed's files (one model-state file
and one optimizer shard per rank) plus meta.json, written last, atomically, listing every file with
its size: a folder without a valid meta.json, or whose files do not match it, is incomplete and is
never resumed from. Finding the newest complete checkpoint and keep-last-N pruning live here."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from gptds.errors import UserError

META_FILE = "meta.json"
FORMAT = "gptds-checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def _files_with_sizes(step_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(step_dir)): p.stat().st_size
            for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != META_FILE}


def write_meta(step_dir: Path, meta: dict) -> None:
    """Mark step_dir complete: meta.json (with the list of files and sizes) via a temp file, fsync, rename."""
    meta = {"format": FORMAT, **meta, "files": _files_with_sizes(step_dir)}
    tmp = step_dir / (META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / META_FILE)
    fd = os.open(step_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(step_dir: Path) -> dict:
    path = Path(step_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{step_dir}: not a complete gptds checkpoint (no {META_FILE}; an interrupted save "
                        f"leaves none)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} meta file")
    return meta


def verify(step_dir: Path) -> dict:
    """meta.json of a complete checkpoint; UserError naming the first missing or truncated file."""
    meta = read_meta(step_dir)
    for name, size in meta["files"].items():
        f = Path(step_dir) / name
        if not f.is_file():
            raise UserError(f"{step_dir}: file {name} listed in {META_FILE} is missing")
        if f.stat().st_size != size:
            raise UserError(f"{step_dir}: file {name} is truncated or changed "
                            f"({f.stat().st_size} bytes, {META_FILE} says {size})")
    return meta


def is_complete(step_dir: Path) -> bool:
    try:
        verify(step_dir)
        return True
    except UserError:
        return False


def step_dirs(checkpoint_dir: Path) -> list[Path]:
    """All step folders, complete or not, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    return [p for p in step_dirs(checkpoint_dir) if is_complete(p)]


def find_latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (partial saves of a killed run are skipped)."""
    for p in reversed(step_dirs(checkpoint_dir)):
        if is_complete(p):
            return p
    return None


def resolve(path: str | Path) -> Path:
    """A step folder itself, or a checkpoint folder (its newest complete step folder)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    if (path / META_FILE).exists() or step_of(path) is not None:
        verify(path)
        return path
    latest = find_latest(path)
    if latest is None:
        partial = step_dirs(path)
        if not partial:
            raise UserError(f"{path}: no complete checkpoint here (no step_* folders)")
        try:
            verify(partial[-1])
        except UserError as why:  # say what is wrong with the newest one
            raise UserError(f"{path}: no complete checkpoint here (incomplete: "
                            f"{', '.join(p.name for p in partial)}; {why})") from None
    return latest


def prepare_step_dir(checkpoint_dir: Path, step: int) -> Path:
    """The folder a save at `step` writes into; leftovers of an interrupted save there are removed."""
    step_dir = Path(checkpoint_dir) / step_tag(step)
    if step_dir.exists():
        shutil.rmtree(step_dir)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    return step_dir


def prune(checkpoint_dir: Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest keep_last_n complete checkpoints (-1 keeps all), and incomplete folders
    older than the newest complete one. The newest complete checkpoint is never deleted."""
    complete = complete_checkpoints(checkpoint_dir)
    if not complete:
        return []
    newest = step_of(complete[-1])
    doomed = [p for p in step_dirs(checkpoint_dir) if p not in complete and step_of(p) < newest]
    if keep_last_n != -1:
        doomed += complete[:-max(1, keep_last_n)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
