"""Checkpointing, the whole story: saving (every rank writes its shard, then meta.json marks the folder
complete), finding the newest good checkpoint, verifying one, loading it into an engine and the run's
stateful parts, keep-last-N pruning, and what a resume must match.

<checkpoint_dir>/step_00000100/ holds DeepSpeed's files (one model-state file and one optimizer shard per
rank) plus meta.json, written last, atomically, listing every file with its size: a folder without a
valid meta.json, or whose files do not match it, is incomplete and is never resumed from. The parts of a
run that are not in the engine (the loop state, every rank's data loader position and RNG streams) are
"stateful": objects with state_dict()/load_state_dict(), saved and restored in the same call as the engine."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gptds import dist, engine
from gptds.config import CheckpointConfig
from gptds.errors import UserError

META_FILE = "meta.json"
FORMAT = "gptds-checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- meta.json: complete or not

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


# ---------------------------------------------------------------- finding checkpoints

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


# ---------------------------------------------------------------- stateful parts of a run

class RNGState:
    """The process's random streams (Python, NumPy, torch CPU and CUDA) as one stateful part."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def save(eng, checkpoint_dir: Path, step: int, meta: dict, shared: dict[str, Stateful],
         per_rank: dict[str, Stateful], keep_last_n: int) -> Path:
    """A checkpoint at `step` that every rank contributes to; complete once meta.json exists.
    `shared` parts are identical on every rank (rank 0's is kept); `per_rank` parts are saved for each
    rank. A rank that cannot write its files (disk full) raises UserError without reaching the barrier
    before meta.json, so the folder stays incomplete; the launcher ends the ranks still waiting there."""
    info = dist.info()
    ranks = dist.all_gather_object({name: part.state_dict() for name, part in per_rank.items()})
    client = {"step": step, "ranks": ranks, **{name: part.state_dict() for name, part in shared.items()}}
    checkpoint_dir = Path(checkpoint_dir)
    step_dir = checkpoint_dir / step_tag(step)
    try:
        if info.is_main:
            if step_dir.exists():  # leftovers of an interrupted save at this step
                shutil.rmtree(step_dir)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        engine.save(eng, checkpoint_dir, step_dir.name, client_state={"gptds": client})
        dist.barrier()  # every rank's shard is on disk before the folder is marked complete
        if info.is_main:
            write_meta(step_dir, {**meta, "step": step})
            for old in prune(checkpoint_dir, keep_last_n):
                dist.print0(f"removed old checkpoint {old.name}")
    except OSError as e:
        latest = find_latest(checkpoint_dir)
        free = (f", {shutil.disk_usage(checkpoint_dir).free / 2**30:.1f} GiB free there"
                if checkpoint_dir.is_dir() else "")
        raise UserError(f"cannot write checkpoint {e.filename or step_dir}: {e.strerror or e}{free}; "
                        f"{step_dir.name} stays incomplete and --auto_resume continues from "
                        f"{latest.name if latest else 'the start'}. Free some space or choose another "
                        f"--checkpoint_dir") from None
    dist.barrier()
    return step_dir


def load(eng, step_dir: Path, shared: dict[str, Stateful], per_rank: dict[str, Stateful]) -> int:
    """Restore the engine and the run's stateful parts from step_dir; returns the step it was saved at.
    Per-rank parts come back from this rank's entry when the world size is unchanged; at another world
    size (a universal checkpoint) rank 0's data position is taken and the RNG streams start afresh."""
    client = engine.load(eng, step_dir)["gptds"]
    for name, part in shared.items():
        if name in client:
            part.load_state_dict(client[name])
    info = dist.info()
    same_world = len(client["ranks"]) == info.world_size
    mine = client["ranks"][info.rank] if same_world else client["ranks"][0]
    for name, part in per_rank.items():
        if name in mine and (same_world or name == "loader"):
            part.load_state_dict(mine[name])
    return int(client["step"])


# ---------------------------------------------------------------- resuming: which checkpoint, and may we

def resume_target(checkpoint_dir: Path, settings: CheckpointConfig) -> Path | None:
    """The step folder a run writing into checkpoint_dir continues from, or None for a fresh start."""
    if settings.resume:
        target = resolve(settings.checkpoint_path)
        step = read_meta(target).get("step", 0)
        newer = [p.name for p in complete_checkpoints(checkpoint_dir) if step_of(p) > step]
        if newer:  # keep-last-N and --auto_resume rank by step: they would prefer these to the new saves
            raise UserError(f"--resume from step {step} ({target}) into {checkpoint_dir}, which holds newer "
                            f"checkpoints ({', '.join(newer)}) that keep-last-N and --auto_resume would take for "
                            f"this run's; resume into a new --log_dir/--checkpoint_dir, or delete those folders")
        return target
    latest = find_latest(checkpoint_dir)
    if settings.auto_resume:
        return latest
    if latest is not None:
        raise UserError(f"{checkpoint_dir} already holds checkpoints (newest {latest.name}); pass --auto_resume "
                        f"to continue that run, or a new --log_dir/--checkpoint_dir for a new one")
    return None


NEW_RUN = "start a new run (another --log_dir), or initialise from these weights with --pretrained_checkpoint"


def check_resumable(saved: dict, step_dir: Path, now: dict) -> None:
    """Refuse a resume that would silently continue a different run. `saved` is the checkpoint's meta.json,
    `now` this run's (the same keys: model_config, data_manifest_sha256, optimizer, world_size, zero_stage)."""
    if saved["model_config"] != now["model_config"]:
        diff = {k: (v, now["model_config"].get(k)) for k, v in saved["model_config"].items()
                if now["model_config"].get(k) != v}
        raise UserError(f"{step_dir} was trained with another model config (checkpoint vs this run: {diff}); "
                        f"resume with the same --model, or {NEW_RUN}")
    if saved["data_manifest_sha256"] != now["data_manifest_sha256"]:
        raise UserError(f"{step_dir} was trained on other data (manifest sha256 {saved['data_manifest_sha256'][:12]} "
                        f"vs {now['data_manifest_sha256'][:12]} now); resume with the same --data_dir, or {NEW_RUN}")
    if saved["optimizer"] != now["optimizer"]:
        raise UserError(f"{step_dir} was trained with --optimizer {saved['optimizer']}; resume with the same optimizer")
    if saved.get("kind") == "universal":
        return
    if saved["world_size"] != now["world_size"] or saved["zero_stage"] != now["zero_stage"]:
        where = (f"{step_dir} was saved by {saved['world_size']} ranks under ZeRO-{saved['zero_stage']}; this run "
                 f"has {now['world_size']} ranks under ZeRO-{now['zero_stage']}")
        if saved["optimizer"] == "adamw8bit":  # convert.py refuses it: no per-parameter form of 8-bit moments
            raise UserError(f"{where}. Its 8-bit AdamW state only resumes on the same ranks and stage: run with "
                            f"{saved['world_size']} ranks under ZeRO-{saved['zero_stage']}, or {NEW_RUN}")
        raise UserError(f"{where}. Convert it first: `gptds convert zero-to-universal {step_dir} OUT_DIR`, then "
                        f"--resume --checkpoint_path OUT_DIR")
