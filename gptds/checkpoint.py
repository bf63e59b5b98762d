"""Checkpointing, the whole story: saving (every rank writes its shard and checksums it as it writes, then
meta.json marks the folder complete), finding the newest intact checkpoint, verifying one, loading it into
an engine and the run's stateful parts, keep-last-N pruning, and what a resume must match.

<checkpoint_dir>/step_00000100/ holds DeepSpeed's files (one model-state file and one optimizer shard per
rank) plus meta.json, written last, atomically, listing every file with its size and its xxh3-128 content
checksum (computed by the rank that wrote the file, from the bytes it wrote). A folder without a valid
meta.json is incomplete; one whose files differ from it (size or content) is damaged; neither is ever
resumed from or converted: the newest intact checkpoint is used instead, and the ones skipped are named
with the reason. Each successful content check is recorded in verified.json (the sizes and modification
times it saw), so keep-last-N pruning re-reads only files that changed since; a resume or a conversion
re-reads the checkpoint it uses, always. The parts of a run that are not in the engine (the loop state,
every rank's data loader position and RNG streams) are "stateful": objects with
state_dict()/load_state_dict(), saved and restored in the same call as the engine."""

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
import xxhash

from gptds import dist, engine
from gptds.config import CheckpointConfig
from gptds.errors import UserError, parse_json
from gptds.model import GPTConfig
from gptds.staging import free_space

META_FILE = "meta.json"
VERIFIED_FILE = "verified.json"
FORMAT = "gptds-checkpoint/2"
SIZES_ONLY_FORMAT = "gptds-checkpoint/1"  # written before checksums: verified by file size only
CHECKSUM = "xxh3_128"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_READ_CHUNK = 8 << 20
# What gptds reads from a meta.json, and the JSON type each must have: a missing or renamed field makes
# the checkpoint unreadable (skipped by --auto_resume, refused by --resume and convert), never a KeyError.
META_FIELDS = {"step": int, "files": dict, "job": str, "model_config": dict, "run_config": dict,
               "data_manifest_sha256": str, "world_size": int, "zero_stage": int, "optimizer": str,
               "precision": str, "kind": str}
RUN_CONFIG_FIELDS = {"data": ("micro_batch_size", "context_length"), "train": ("grad_accum_steps", "seed")}


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- checksums

class ChecksummedFile:
    """A checkpoint file being written (what torch.save writes into, for DeepSpeed): the xxh3-128 of its
    content is computed from the bytes as they go to disk, with no second read; it is fsynced on close, so a
    checkpoint marked complete is on disk; and a failed write keeps its OSError (.error) for the message
    (torch.save turns it into an "[enforce fail at inline_container.cc]" RuntimeError)."""

    def __init__(self, path: str | Path):
        self.path, self.name = Path(path), str(path)
        self.error: OSError | None = None
        self._hash = xxhash.xxh3_128()
        try:
            self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close(), after torch.save)
        except OSError as e:
            self.file, self.error = None, e

    def write(self, data) -> int:
        if self.file is None:
            raise self.error
        try:
            n = self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        self._hash.update(data)
        return n

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is None:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            self.error = self.error or e
        finally:
            self.file.close()
            self.file = None

    @property
    def checksum(self) -> str:
        return self._hash.hexdigest()


def file_checksum(path: Path) -> str:
    """xxh3-128 of a file's content, read in 8 MiB pieces."""
    h, buf = xxhash.xxh3_128(), bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# ---------------------------------------------------------------- meta.json: complete, intact

def _listed_files(step_dir: Path) -> list[Path]:
    return [p for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name not in (META_FILE, VERIFIED_FILE) and not p.name.endswith(".tmp")]


def _write_json_atomically(path: Path, value: dict) -> None:
    """value as JSON at path via a temp file, fsync and rename (then the folder fsynced): readers see the old
    file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_meta(step_dir: Path, meta: dict, checksums: dict[str, str] | None = None) -> None:
    """Mark step_dir complete: meta.json, listing every file with its size and checksum, via a temp file,
    fsync, rename. `checksums` (name -> xxh3-128) are those the writing ranks computed; any file without one
    is read and checksummed here. The check is recorded (verified.json) as the files are now."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): p for p in _listed_files(step_dir)}
    checksums = {name: (checksums or {}).get(name) or file_checksum(p) for name, p in files.items()}
    meta = {"format": FORMAT, **meta, "files": {name: p.stat().st_size for name, p in files.items()},
            "checksum": CHECKSUM, "checksums": checksums}
    _write_json_atomically(step_dir / META_FILE, meta)
    _record_verified(step_dir, meta)


def _meta_error(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; this checkpoint cannot be resumed or converted (a meta.json changed "
                     f"by hand or by another tool)")


def read_meta(step_dir: Path) -> dict:
    """meta.json of a checkpoint folder, with every field gptds reads checked for presence and type."""
    path = Path(step_dir) / META_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{step_dir}: not a complete gptds checkpoint (no {META_FILE}; an interrupted save "
                        f"leaves none)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    try:
        meta = parse_json(text, str(path))
    except ValueError as e:  # json.JSONDecodeError
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, SIZES_ONLY_FORMAT):
        raise UserError(f"{path}: not a {FORMAT} meta file")
    for name, kind in META_FIELDS.items():
        if name not in meta:
            raise _meta_error(path, f"field {name!r} is missing")
        if not isinstance(meta[name], kind) or isinstance(meta[name], bool):
            raise _meta_error(path, f"field {name!r} is {meta[name]!r}, not a JSON {kind.__name__}")
    for name, size in meta["files"].items():
        if not isinstance(size, int) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise _meta_error(path, f"file entry {name!r}: {size!r}")
    if meta["format"] == FORMAT:
        checksums = meta.get("checksums")
        if not isinstance(checksums, dict) or set(checksums) != set(meta["files"]) \
                or meta.get("checksum") != CHECKSUM:
            raise _meta_error(path, f"the {CHECKSUM} checksums of its files are missing or incomplete")
    for section, names in RUN_CONFIG_FIELDS.items():
        values = meta["run_config"].get(section)
        if not isinstance(values, dict) or not all(isinstance(values.get(n), int) for n in names):
            raise _meta_error(path, f"run_config.{section} lacks {', '.join(names)}")
    try:
        GPTConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise _meta_error(path, f"model_config is not a GPT config ({e})") from None
    return meta


def _stat_signature(step_dir: Path, names) -> dict[str, list[int]]:
    """name -> [size, mtime in ns, inode] of meta.json and the listed files, as they are now."""
    sig = {}
    for name in [META_FILE, *names]:
        st = (Path(step_dir) / name).stat()
        sig[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return sig


def _record_verified(step_dir: Path, meta: dict) -> None:
    """Remember that the files' contents matched their checksums, as the files are now (best effort: a
    read-only folder is checked again next time)."""
    try:
        _write_json_atomically(Path(step_dir) / VERIFIED_FILE, {"files": _stat_signature(step_dir, meta["files"])})
    except OSError:
        pass


def _recorded_as_verified(step_dir: Path, meta: dict) -> bool:
    try:
        recorded = parse_json((Path(step_dir) / VERIFIED_FILE).read_text(), str(step_dir / VERIFIED_FILE))
        return recorded.get("files") == _stat_signature(step_dir, meta["files"])
    except (OSError, ValueError, UserError, AttributeError):
        return False


_verified_in_this_process: dict[str, dict] = {}  # step folder -> stat signature at its last full check


def verify(step_dir: Path, contents: str = "full") -> dict:
    """meta.json of an intact checkpoint; UserError naming the first file that is missing, of another size,
    or (contents) whose bytes differ from its checksum. contents="full" reads every file (a resume, a
    conversion; once per process), "recorded" trusts verified.json when no file changed since it was
    written (pruning), "sizes" reads nothing."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    for name, size in meta["files"].items():
        f = step_dir / name
        if not f.is_file():
            raise UserError(f"{step_dir}: file {name} listed in {META_FILE} is missing")
        if f.stat().st_size != size:
            raise UserError(f"{step_dir}: file {name} is truncated or changed "
                            f"({f.stat().st_size} bytes, {META_FILE} says {size})")
    if contents == "sizes" or meta["format"] == SIZES_ONLY_FORMAT:
        return meta
    signature = _stat_signature(step_dir, meta["files"])
    if _verified_in_this_process.get(str(step_dir)) == signature or \
            (contents == "recorded" and _recorded_as_verified(step_dir, meta)):
        return meta
    for name, expected in meta["checksums"].items():
        try:
            actual = file_checksum(step_dir / name)
        except OSError as e:
            raise UserError(f"{step_dir}: file {name} cannot be read ({e.strerror})") from None
        if actual != expected:
            raise UserError(f"{step_dir}: file {name} does not match its {CHECKSUM} checksum in {META_FILE} "
                            f"(its bytes changed after the save: damaged on disk or overwritten in place)")
    _verified_in_this_process[str(step_dir)] = signature
    _record_verified(step_dir, meta)
    return meta


def is_complete(step_dir: Path, contents: str = "recorded") -> bool:
    """Whether step_dir is a complete, intact checkpoint (see verify)."""
    try:
        verify(step_dir, contents)
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


def complete_checkpoints(checkpoint_dir: Path, contents: str = "recorded") -> list[Path]:
    return [p for p in step_dirs(checkpoint_dir) if is_complete(p, contents)]


def find_latest(checkpoint_dir: Path, contents: str = "full", say=dist.print0) -> Path | None:
    """The newest intact checkpoint. Each newer folder passed over (a partial save of a killed run, a
    damaged or unreadable one) is reported through say(...) with the reason."""
    for p in reversed(step_dirs(checkpoint_dir)):
        try:
            verify(p, contents)
            return p
        except UserError as why:
            if say:
                say(f"skipping checkpoint {p.name}: {why}")
    return None


def resolve(path: str | Path) -> Path:
    """A step folder itself (verified: UserError if incomplete or damaged), or a checkpoint folder (its
    newest intact step folder, naming the newer ones skipped)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint folder")
    if (path / META_FILE).exists() or step_of(path) is not None:
        verify(path)
        return path
    reasons = []
    latest = find_latest(path, say=reasons.append)
    if latest is None:
        if not reasons:
            raise UserError(f"{path}: no complete checkpoint here (no step_* folders)")
        raise UserError(f"{path}: no complete and intact checkpoint here (skipped: "
                        f"{', '.join(p.name for p in step_dirs(path))}; the newest: {reasons[0].split(': ', 1)[1]})")
    for reason in reasons:
        dist.print0(reason)
    return latest


def prune(checkpoint_dir: Path, keep_last_n: int, say=dist.print0) -> list[Path]:
    """Delete all but the newest keep_last_n intact checkpoints (-1 keeps all), and the incomplete or damaged
    folders older than the newest intact one: a damaged checkpoint never counts as one of the N kept, so an
    intact one is never deleted while a damaged one stays. The newest intact checkpoint is never deleted.
    Contents are checked as recorded (verified.json): only files changed since their last check are read."""
    intact, broken = [], {}
    for p in step_dirs(checkpoint_dir):
        try:
            verify(p, "recorded")
            intact.append(p)
        except UserError as why:
            broken[p] = why
    if not intact:
        return []
    newest = step_of(intact[-1])
    doomed = [p for p in broken if step_of(p) < newest]
    if keep_last_n != -1:
        doomed += intact[:-max(1, keep_last_n)]
    for p in sorted(doomed, key=step_of):
        why = f" ({broken[p]})" if p in broken and (p / META_FILE).exists() else ""  # a partial save needs none
        shutil.rmtree(p, ignore_errors=True)
        if say:
            say(f"removed {'unusable' if p in broken else 'old'} checkpoint {p.name}{why}")
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
    rank. Each rank checksums the files it writes, as it writes them; rank 0 lists them all in meta.json.
    A rank that cannot write a file (disk full) does not leave the others waiting: after each part of the
    save the ranks agree on whether any failed, and if one did, every rank raises the same one-line error
    (the failing rank's file, errno text and free space; printed once) and the folder stays incomplete."""
    info = dist.info()
    ranks = dist.all_gather_object({name: part.state_dict() for name, part in per_rank.items()})
    client = {"step": step, "ranks": ranks, **{name: part.state_dict() for name, part in shared.items()}}
    checkpoint_dir = Path(checkpoint_dir)
    step_dir = checkpoint_dir / step_tag(step)

    def failed(e: OSError) -> str:
        latest = find_latest(checkpoint_dir, "recorded", say=None)
        return (f"cannot write checkpoint {e.filename or step_dir}: {e.strerror or e}"
                f"{free_space(e.filename or checkpoint_dir)}; {step_dir.name} stays incomplete and --auto_resume "
                f"continues from {latest.name if latest else 'the start'}. Free some space or choose another "
                f"--checkpoint_dir")

    error = None
    if info.is_main:
        try:
            if step_dir.exists():  # leftovers of an interrupted save at this step
                shutil.rmtree(step_dir)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = failed(e)
    dist.agree_on_errors(error)
    written = engine.save(eng, checkpoint_dir, step_dir.name, {"gptds": client}, open_file=ChecksummedFile)
    errors = [f.error for f in written if f.error is not None]
    dist.agree_on_errors(failed(_with_filename(errors[0], written)) if errors else None)
    checksums = {}  # every rank's files: its shard is on disk before the folder is marked complete
    for mine in dist.all_gather_object({str(f.path.relative_to(step_dir)): f.checksum for f in written}):
        checksums.update(mine)
    error = None
    if info.is_main:
        try:
            write_meta(step_dir, {**meta, "step": step}, checksums)
            prune(checkpoint_dir, keep_last_n)
        except OSError as e:
            error = failed(e)
    dist.agree_on_errors(error)
    return step_dir


def _with_filename(error: OSError, written: list[ChecksummedFile]) -> OSError:
    """The OSError of a failed write, with the file it was writing (a write's OSError names none)."""
    if error.filename is None:
        path = next(f.path for f in written if f.error is error)
        error = OSError(error.errno, error.strerror or str(error), str(path))
    return error


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
    if settings.auto_resume:
        return find_latest(checkpoint_dir)  # naming the newer folders it skipped, and why
    latest = find_latest(checkpoint_dir, "sizes", say=None)
    if latest is not None:
        raise UserError(f"{checkpoint_dir} already holds checkpoints (newest {latest.name}); pass --auto_resume "
                        f"to continue that run, or a new --log_dir/--checkpoint_dir for a new one")
    return None


NEW_RUN = "start a new run (another --log_dir), or initialise from these weights with --pretrained_checkpoint"


def check_resumable(saved: dict, step_dir: Path, now: dict) -> None:
    """Refuse a resume that would silently continue a different run: one whose MUST_MATCH settings (config.py,
    README "What a resume may change") differ. `saved` is the checkpoint's meta.json, `now` this run's (the
    same keys: model_config, data_manifest_sha256, optimizer, world_size, zero_stage, precision, run_config)."""
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
    if saved.get("kind") != "universal":
        if saved["world_size"] != now["world_size"] or saved["zero_stage"] != now["zero_stage"]:
            where = (f"{step_dir} was saved by {saved['world_size']} ranks under ZeRO-{saved['zero_stage']}; this "
                     f"run has {now['world_size']} ranks under ZeRO-{now['zero_stage']}")
            if saved["optimizer"] == "adamw8bit":  # convert.py refuses it: no per-parameter form of 8-bit moments
                raise UserError(f"{where}. Its 8-bit AdamW state only resumes on the same ranks and stage: run with "
                                f"{saved['world_size']} ranks under ZeRO-{saved['zero_stage']}, or {NEW_RUN}")
            raise UserError(f"{where}. Convert it first: `gptds convert zero-to-universal {step_dir} OUT_DIR`, then "
                            f"--resume --checkpoint_path OUT_DIR")
        if saved.get("precision", now.get("precision")) != now.get("precision"):
            raise UserError(f"{step_dir} was trained in {saved['precision']}; this run's --deepspeed_config trains in "
                            f"{now['precision']}: resume with a config of the same precision, or {NEW_RUN}")
    _check_resumable_batch(saved, step_dir, now)


def _check_resumable_batch(saved: dict, step_dir: Path, now: dict) -> None:
    """The sequences each step learns from: the global batch (micro batch x grad accumulation x ranks), the
    micro step (micro batch x ranks: where the data position lands), the context length and the data order."""
    old, new = saved["run_config"], now["run_config"]

    def batch(run: dict, world_size: int) -> str:
        d, a = run["data"]["micro_batch_size"], run["train"]["grad_accum_steps"]
        return f"--micro_batch_size {d} x --grad_accum_steps {a} x {world_size} ranks = {d * a * world_size}"
    for section, name in (("train", "grad_accum_steps"), ("data", "micro_batch_size")):
        o = old[section][name] * (1 if name == "grad_accum_steps" else saved["world_size"])
        n = new[section][name] * (1 if name == "grad_accum_steps" else now["world_size"])
        if o != n:
            raise UserError(f"{step_dir} was trained with a global batch of {batch(old, saved['world_size'])} "
                            f"sequences per step; this run has {batch(new, now['world_size'])}. A resume may not "
                            f"change what each step learns from: keep --{name} {old[section][name]}"
                            f"{' (per rank, at the same world size)' if name == 'micro_batch_size' else ''}, or "
                            f"{NEW_RUN}")
    for section, name, why in (("data", "context_length", "the sequences"), ("train", "seed", "the data order")):
        if old[section][name] != new[section][name]:
            raise UserError(f"{step_dir} was trained with --{name} {old[section][name]}; this run has "
                            f"{new[section][name]}, which changes {why}: resume with --{name} "
                            f"{old[section][name]}, or {NEW_RUN}")
