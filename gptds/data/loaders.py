"""Batches for the trainer from prepared folders: TextLoader reads consecutive token windows of the
pretraining shards, InstructLoader packs whole instruction records into loss-masked rows. Both are
distributed (rank r takes its slice of each global step), deterministic for a seed and exactly resumable.

The position is global and identical on every rank: (epoch, cursor) where the next global step starts,
a global step being world_size * micro_batch_size sequences. The cursor counts windows (text) or records of
the epoch's order (instruct). Resuming at the same global batch size continues with exactly the
batches an uninterrupted run would have seen, on any world size."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptds.data.instruct import pack_row, row_to_xy
from gptds.data.shards import (
    INDEX_DTYPE,
    MANIFEST_NAME,
    MASK_DTYPE,
    SPLITS,
    TOKEN_DTYPE,
    ShardFile,
    data_sha256,
    load_manifest,
    manifest_sha256,
)
from gptds.errors import UserError

__all__ = ["DeviceBatches", "InstructLoader", "MixtureLoader", "TextLoader", "TrainingData", "build_loader",
           "build_training_data", "load_manifest", "manifest_sha256", "parse_data_dirs"]

STATE_VERSION = 1


class _Loader:
    """What both loaders share: settings, the global position, state_dict/load_state_dict and reset.
    A subclass implements _rows(): this rank's rows of the next global step, advancing the position."""
    kind = ""

    def __init__(self, data_dir: Path, manifest: dict, split: str, micro_batch_size: int, context_length: int,
                 rank: int, world_size: int, seed: int, shuffle: bool):
        self.data_dir, self.manifest, self.split = Path(data_dir), manifest, split
        self.micro_batch_size, self.context_length = micro_batch_size, context_length
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.tokens_per_batch = micro_batch_size * context_length  # per rank and call of next_batch
        self.data_sha256 = data_sha256(manifest)
        self.shards = [entry for entry in manifest["shards"] if entry["split"] == split]
        if not self.shards:
            raise UserError(f"{self.data_dir / MANIFEST_NAME}: the dataset has no {split!r} shards")
        self._orders: dict[int, np.ndarray] = {}  # epoch -> order, for the one or two epochs in use
        self.epoch = self.cursor = 0

    @property
    def sequences_per_micro_step(self) -> int:
        """Sequences all ranks take per call of next_batch (config.Batch.sequences_per_micro_step)."""
        return self.world_size * self.micro_batch_size

    def reset(self) -> None:
        """Back to the very start of epoch 0 (the trainer does this to the val loader before evaluating)."""
        self.epoch = 0
        self.cursor = 0
        self.check_files()

    def _files(self) -> list[ShardFile]:
        return []

    def check_files(self) -> None:
        """Before a pass over the split: every shard file still has the size the manifest gives it."""
        for f in self._files():
            f.check()

    def _advance_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.check_files()
        self.epoch = epoch

    def _order(self, epoch: int, items: np.ndarray) -> np.ndarray:
        """The epoch's order of `items` (shard or record ids): permuted from (seed, epoch) when shuffling,
        else unchanged. PCG64 seeded by a sequence gives the same permutation on every platform."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a step spans at most two epochs (or more for tiny data: recomputed)
                self._orders.pop(min(self._orders))
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(items)) if self.shuffle else None
            self._orders[epoch] = items[perm] if self.shuffle else items
        return self._orders[epoch]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (micro_batch_size, context_length) int64 on CPU; y holds the next tokens, -100 where no loss
        is taken."""
        xs, ys = zip(*self._rows(), strict=True)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def _rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": self.kind, "split": self.split, "epoch": self.epoch,
                "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "context_length": self.context_length,
                "manifest_sha256": self.data_sha256}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict. A change that would silently alter the data order is a UserError;
        another world size is fine while world_size * micro_batch_size stays the same."""
        where = f"cannot resume the {self.split} loader of {self.data_dir}"
        if "batch_size" in state:  # checkpoints written before the rename
            state = {**{k: v for k, v in state.items() if k != "batch_size"}, "micro_batch_size": state["batch_size"]}
        now = self.state_dict()
        missing = [key for key in now if key not in state]
        if missing:
            raise UserError(f"{where}: the saved loader state lacks {', '.join(missing)}")
        reasons = {
            "kind": "the saved state is for another kind of data",
            "split": "the saved state is for another split",
            "manifest_sha256": "the prepared data changed since the state was saved",
            "seed": "the seed decides the shuffling order",
            "shuffle": "shuffling decides the order",
            "context_length": "sequence boundaries depend on it",
        }
        for key, why in reasons.items():
            if state[key] != now[key]:
                raise UserError(f"{where}: {key} was {state[key]!r}, now {now[key]!r} ({why}); use the saved value "
                                "or start the data from the beginning")
        saved_global = state["world_size"] * state["micro_batch_size"]
        if saved_global != self.sequences_per_micro_step:
            raise UserError(f"{where}: the global batch was world_size {state['world_size']} x micro_batch_size "
                            f"{state['micro_batch_size']} = {saved_global} sequences, now {self.world_size} x "
                            f"{self.micro_batch_size} = {self.sequences_per_micro_step}; keep world_size * "
                            "micro_batch_size equal "
                            "so each step reads the same sequences")
        if not (0 <= state["cursor"] < self._epoch_size() and state["epoch"] >= 0):
            raise UserError(f"{where}: position epoch {state['epoch']}, cursor {state['cursor']} is out of range")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def _epoch_size(self) -> int:
        raise NotImplementedError

    def rows_per_epoch(self) -> int:
        """Rows (sequences) in one pass over the split."""
        return self._epoch_size()

    def batches_per_epoch(self) -> int:
        """Global steps of next_batch() in one pass over the split (at least 1)."""
        return max(1, self.rows_per_epoch() // self.sequences_per_micro_step)


class TextLoader(_Loader):
    """Windows of context_length + 1 tokens, one after another (each starts where the previous one's
    last target is, so every token is a target once) through the epoch's shard order; the stream runs
    on across shard ends. A global step takes the next world_size * micro_batch_size windows, rank r the
    r-th group of micro_batch_size; after the last whole window the next epoch starts with the shard order
    reshuffled from (seed, epoch) (shuffle=False: manifest order)."""
    kind = "text"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        manifest_path = self.data_dir / MANIFEST_NAME
        self._tokens = [ShardFile(self.data_dir / e["file"], TOKEN_DTYPE, e["num_tokens"], manifest_path,
                                  f"{e['num_tokens']} tokens") for e in self.shards]
        self._sizes = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self.num_tokens = int(self._sizes.sum())
        self.windows_per_epoch = (self.num_tokens - 1) // self.context_length
        if self.windows_per_epoch == 0:
            raise UserError(f"{self.data_dir}: the {self.split} split has {self.num_tokens} tokens, fewer than "
                            f"context_length + 1 = {self.context_length + 1}; use a smaller context_length or "
                            "prepare more data (--val_fraction / --val_block_tokens for the val split)")

    def _epoch_size(self) -> int:
        return self.windows_per_epoch

    def _files(self) -> list[ShardFile]:
        return self._tokens

    def _window(self, epoch: int, index: int) -> np.ndarray:
        """Window `index` of the epoch: tokens [index * T, index * T + T + 1) of its shard stream, (T + 1,)."""
        order = self._order(epoch, np.arange(len(self._tokens)))
        starts = np.concatenate([[0], np.cumsum(self._sizes[order])[:-1]])  # stream offset of each shard
        begin, length = index * self.context_length, self.context_length + 1
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(starts, begin, side="right")) - 1
        filled = 0
        while filled < length:  # at most a few shards: a window can cross shard ends
            shard = self._tokens[order[k]]
            offset = begin + filled - int(starts[k])
            piece = shard.read(offset, length - filled)
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out

    def _rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = []
        for b in range(self.micro_batch_size):
            i = self.cursor + self.rank * self.micro_batch_size + b  # window index counted from this epoch's start
            window = self._window(self.epoch + i // self.windows_per_epoch, i % self.windows_per_epoch)
            rows.append((window[:-1], window[1:]))
        end = self.cursor + self.sequences_per_micro_step
        self._advance_epoch(self.epoch + end // self.windows_per_epoch)
        self.cursor = end % self.windows_per_epoch
        return rows


class InstructLoader(_Loader):
    """Records in a per-epoch order (a permutation from (seed, epoch), or manifest order without
    shuffle) packed greedily, whole, into rows of context_length + 1 tokens padded with EOT; a row ends
    at the epoch's end. A global step takes the next world_size * micro_batch_size rows, rank r the r-th group.
    Records longer than a row (prepared for a larger context_length) lose their end (truncated_records);
    those whose prompt alone fills a row have nothing to learn and are left out (dropped_records).
    Conversations (kind "chat") are packed the same way; their targets come from the per-token mask."""
    kind = "instruct"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = self.manifest["kind"]
        self._tokens, self._masks, shard_of, starts, lengths, prompt_lens = [], [], [], [], [], []
        manifest_path = self.data_dir / MANIFEST_NAME
        for k, entry in enumerate(self.shards):
            tokens = ShardFile(self.data_dir / entry["file"], TOKEN_DTYPE, entry["num_tokens"], manifest_path,
                               f"{entry['num_tokens']} tokens")
            index = ShardFile(self.data_dir / entry["index_file"], INDEX_DTYPE, 2 * entry["num_records"],
                              manifest_path, f"{entry['num_records']} records").read(0, 2 * entry["num_records"])
            index = index.reshape(-1, 2)
            self._tokens.append(tokens)
            if "mask_file" in entry:
                self._masks.append(ShardFile(self.data_dir / entry["mask_file"], MASK_DTYPE, entry["num_tokens"],
                                             manifest_path, f"a mask byte for each of {entry['num_tokens']} tokens"))
            shard_of.append(np.full(len(index), k, dtype=np.int64))
            starts.append(index[:, 0])
            lengths.append(np.diff(np.append(index[:, 0], len(tokens))))  # a record ends where the next starts
            prompt_lens.append(index[:, 1])
        row_len = self.context_length + 1
        lengths, prompt_lens = np.concatenate(lengths), np.concatenate(prompt_lens)
        keep = prompt_lens <= self.context_length  # at least one response token fits the row
        self.dropped_records = int((~keep).sum())
        self.truncated_records = int((keep & (lengths > row_len)).sum())
        self._records = np.flatnonzero(keep)  # record ids (positions in the arrays below) in use
        self._shard_of, self._starts = np.concatenate(shard_of), np.concatenate(starts)
        self._lengths, self._prompt_lens = np.minimum(lengths, row_len), prompt_lens
        self.num_records = len(self._records)
        if self.num_records == 0:
            raise UserError(f"{self.data_dir}: no {self.split} record fits context_length {self.context_length} "
                            f"({self.dropped_records} records have longer prompts); use a larger context_length")

    def _epoch_size(self) -> int:
        return self.num_records

    def _files(self) -> list[ShardFile]:
        return self._tokens + self._masks

    def rows_per_epoch(self) -> int:
        """Packed rows in one pass (epoch 0's order; other epochs differ by a few rows at most)."""
        row_len, rows, used = self.context_length + 1, 1, 0
        for length in self._lengths[self._order(0, self._records)]:
            if used + length > row_len:
                rows, used = rows + 1, 0
            used += int(length)
        return rows

    def _pack(self, num_rows: int) -> list[list[int]]:
        """The next num_rows rows from the current position, as lists of record ids; advances the position."""
        row_len = self.context_length + 1
        rows = []
        while len(rows) < num_rows:
            order = self._order(self.epoch, self._records)
            row, used = [], 0
            while self.cursor < self.num_records and used + self._lengths[order[self.cursor]] <= row_len:
                row.append(int(order[self.cursor]))
                used += int(self._lengths[order[self.cursor]])
                self.cursor += 1
            rows.append(row)
            if self.cursor == self.num_records:
                self._advance_epoch(self.epoch + 1)
                self.cursor = 0
        return rows

    def _rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = self._pack(self.sequences_per_micro_step)  # every rank packs the whole step: only lengths are read
        out = []
        for row in rows[self.rank * self.micro_batch_size:(self.rank + 1) * self.micro_batch_size]:
            records = []
            for j in row:
                start, shard, length = int(self._starts[j]), self._shard_of[j], int(self._lengths[j])
                targets = self._masks[shard].read(start, length) if self._masks else int(self._prompt_lens[j])
                records.append((self._tokens[shard].read(start, length), targets))
            out.append(row_to_xy(*pack_row(records, self.context_length + 1)))
        return out


def build_loader(data_dir, split: str, micro_batch_size: int, context_length: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, check_size: bool = True) -> TextLoader | InstructLoader:
    """The loader for a prepared folder's split, by its manifest's kind (text or instruct); unless not
    check_size (a validation split of a run that never evaluates), one that cannot fill a micro step is refused."""
    manifest = load_manifest(data_dir)
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    for name, value in (("micro_batch_size", micro_batch_size), ("context_length", context_length),
                        ("world_size", world_size)):
        if value <= 0:
            raise UserError(f"{name} = {value} is not allowed: a positive integer")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not allowed: 0 <= rank < world_size ({world_size})")
    cls = TextLoader if manifest["kind"] == "text" else InstructLoader  # instruct and chat
    loader = cls(Path(data_dir), manifest, split, micro_batch_size, context_length, rank, world_size, seed, shuffle)
    rows = loader.rows_per_epoch()
    if check_size and rows < loader.sequences_per_micro_step:  # each step would read the same sequences again
        raise UserError(f"{data_dir}: the {split} split holds {rows} sequences of {context_length + 1} tokens, fewer "
                        f"than one micro step takes ({micro_batch_size} per rank x {world_size} rank(s) = "
                        f"{loader.sequences_per_micro_step}); lower --micro_batch_size (-B) or prepare more data")
    return loader


def trained_positions(y: torch.Tensor, *alongside: torch.Tensor) -> list[torch.Tensor]:
    """For targets y (B, T) with -100 where no loss is taken, on the host: y at the trained positions (N,), then
    each tensor of `alongside` (B, T) at them, then the positions as flat indices into B * T (the model's
    logits_at), so that the output layer runs on those rows only and no device sync is needed to size them."""
    trained = (y != -100).flatten().nonzero().squeeze(1)
    return [t.flatten()[trained] for t in (y, *alongside)] + [trained]


class DeviceBatches:
    """Training batches on the rank's device, the next one read and copied while the device computes:
    the loop calls next() for a batch, launches its forward, then prefetch(), so reading the shards and
    the host-to-device copy (pinned memory, non-blocking, on CUDA) overlap the queued device work.
    state_dict() is the loader's position after the last batch next() returned, never that of the batch
    waiting in prefetch, so a checkpoint resumes exactly where the consumed batches end."""

    def __init__(self, loader: _Loader, device: torch.device):
        self.loader, self.device = loader, torch.device(device)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending_components = None
        self._state_before_pending: dict | None = None
        self.components: torch.Tensor | None = None  # of a mixture: each row's component, of the last batch

    def metrics(self, step_time: float, grad_accum_steps: int) -> dict:
        """What the batches add to the step's log line (RL's rollouts: rewards); nothing here."""
        return {}

    def samples(self) -> str:
        """What the batches add to samples.txt (RL's rollouts); nothing here."""
        return ""

    def prefetch(self) -> None:
        if self._pending is not None:
            return
        self._state_before_pending = self.loader.state_dict()
        x, y = self.loader.next_batch()
        components = getattr(self.loader, "last_components", None)
        self._pending_components = None if components is None else torch.from_numpy(components).to(self.device)
        batch = [x, y]
        if getattr(self.loader, "kind", "text") != "text":  # loss on responses only: the output layer runs on
            batch = [x, *trained_positions(y)]             # those positions alone
        if self.device.type == "cuda":
            batch = [t.pin_memory().to(self.device, non_blocking=True) for t in batch]
        else:
            batch = [t.to(self.device) for t in batch]
        self._pending = tuple(batch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
        """(x, y), or for instruction and chat data (x, y at the trained positions, {"logits_at": them})."""
        self.prefetch()
        batch, self._pending = self._pending, None
        self.components = self._pending_components
        return batch if len(batch) == 2 else (batch[0], batch[1], {"logits_at": batch[2]})

    def state_dict(self) -> dict:
        return self._state_before_pending if self._pending is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending = None
        self.loader.load_state_dict(state)


class MixtureLoader:
    """Several prepared folders mixed by weight (nanochat's mid-training mixture). Each of the W*B sequences
    of a global micro step comes from component c with probability weight_c, drawn from (seed, step), so
    every rank sees the same assignment; each component streams its rows as a one-rank, one-row loader
    would (text windows, packed records or conversations), and rank r keeps its B rows of the step. Every
    rank reads the whole step's rows (a few hundred thousand tokens for a large global batch: negligible
    beside the forward). Deterministic for a seed, and exactly resumable: the state is the step count and
    every component's position."""

    def __init__(self, components: list[tuple[Path, float]], split: str, micro_batch_size: int,
                 context_length: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.names = component_names([path for path, _ in components])
        self.loaders = [build_loader(path, split, 1, context_length, 0, 1, seed + i, shuffle)
                        for i, (path, _) in enumerate(components)]
        weights = np.array([w for _, w in components], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.split, self.seed = split, seed
        self.micro_batch_size, self.context_length, self.rank, self.world_size = (micro_batch_size, context_length,
                                                                                  rank, world_size)
        self.manifest = {"kind": "mixture", "components": [loader.manifest.get("kind") for loader in self.loaders]}
        self.truncated_records = sum(getattr(loader, "truncated_records", 0) for loader in self.loaders)
        self.steps = 0
        self.last_components = np.zeros(micro_batch_size, dtype=np.int64)

    @property
    def sequences_per_micro_step(self) -> int:
        return self.world_size * self.micro_batch_size

    def components_of_step(self, step: int) -> np.ndarray:
        """The component of each of the step's W*B sequences (the same on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(len(self.weights), size=self.sequences_per_micro_step, p=self.weights)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (micro_batch_size, context_length) int64 on CPU; last_components: each row's component."""
        xs, ys, mine = [], [], []
        lo, hi = self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size
        for i, c in enumerate(self.components_of_step(self.steps)):
            x, y = self.loaders[c].next_batch()
            if lo <= i < hi:
                xs.append(x[0])
                ys.append(y[0])
                mine.append(c)
        self.steps += 1
        self.last_components = np.array(mine, dtype=np.int64)
        return torch.stack(xs), torch.stack(ys)

    def reset(self) -> None:
        self.steps = 0
        for loader in self.loaders:
            loader.reset()

    def batches_per_epoch(self) -> int:
        """Global micro steps until the first component's epoch ends, at the expected rates."""
        rows = min(loader.rows_per_epoch() / w for loader, w in zip(self.loaders, self.weights) if w > 0)
        return max(1, int(rows) // self.sequences_per_micro_step)

    def state_dict(self) -> dict:
        return {"kind": "mixture", "steps": self.steps, "seed": self.seed, "weights": self.weights.tolist(),
                "sequences_per_micro_step": self.sequences_per_micro_step,
                "components": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        where = f"cannot resume the {self.split} data mixture"
        if state.get("kind") != "mixture" or len(state.get("components", [])) != len(self.loaders):
            raise UserError(f"{where}: the saved data position is not of a mixture of {len(self.loaders)} folders")
        for key, why in (("seed", "the seed decides the draws"), ("sequences_per_micro_step",
                                                                  "the draws are per global micro step")):
            if state[key] != self.state_dict()[key]:
                raise UserError(f"{where}: {key} was {state[key]!r}, now {self.state_dict()[key]!r} ({why})")
        if not np.allclose(state["weights"], self.weights):
            raise UserError(f"{where}: the weights were {state['weights']}, now {self.weights.tolist()}")
        for loader, component in zip(self.loaders, state["components"]):
            loader.load_state_dict(component)
        self.steps = int(state["steps"])


def component_names(paths: list[Path]) -> list[str]:
    """Short, unique names of mixture components for logs (loss/<name>): the folder names."""
    names = []
    for path in paths:
        name = Path(path).name or str(path)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def parse_data_dirs(specs: list[str]) -> list[tuple[Path, float]]:
    """--data_dir DIR[:WEIGHT] ...: the folders and their mixture weights (1 each when not given)."""
    out = []
    for spec in specs:
        path, _, weight = spec.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            path, value = spec, 1.0
        if not path or not np.isfinite(value) or value <= 0:
            raise UserError(f"--data_dir {spec!r}: the form is DIR or DIR:WEIGHT with a positive WEIGHT")
        out.append((Path(path), value))
    if len({p.resolve() for p, _ in out}) != len(out):
        raise UserError(f"--data_dir names a folder twice: {' '.join(specs)}")
    return out


@dataclass
class TrainingData:
    """What a run trains and validates on: one prepared folder, or a weighted mixture of several."""
    train: TextLoader | InstructLoader | MixtureLoader
    val: TextLoader | InstructLoader | MixtureLoader
    components: list[tuple[str, TextLoader | InstructLoader]]  # a mixture's own val loaders, by name
    kinds: set[str]            # the manifest kinds in use
    vocab_size: int            # the largest vocabulary the data uses (chat data: with the ChatML tokens)
    sha256: str                # of the data-defining manifests (and weights): what a resume must match
    description: str          # for the banner and meta.json
    source: object             # the manifest's "source" (one folder), or each folder's


def build_training_data(specs: list[tuple[Path, float]], micro_batch_size: int, context_length: int, rank: int,
                        world_size: int, seed: int, validates: bool = True) -> TrainingData:
    """The loaders of one folder or a mixture; `validates`: the run evaluates on the validation split, which
    must then fill a micro step (a run with --eval_interval 0 may have a tiny one)."""
    args = (micro_batch_size, context_length, rank, world_size, seed)
    if len(specs) == 1:
        (path, _), = specs
        train = build_loader(path, "train", *args)
        val = build_loader(path, "val", *args, shuffle=False, check_size=validates)
        manifest = train.manifest
        return TrainingData(train, val, [], {manifest["kind"]}, manifest["vocab_size"], manifest_sha256(path),
                            str(path), manifest.get("source"))
    train = MixtureLoader(specs, "train", *args)
    val = MixtureLoader(specs, "val", *args, shuffle=False)
    components = [(name, build_loader(path, "val", *args, shuffle=False, check_size=validates))
                  for name, (path, _) in zip(train.names, specs)]
    manifests = [loader.manifest for loader in train.loaders]
    weights = [w for _, w in specs]
    sha = hashlib.sha256(json.dumps([[manifest_sha256(p), w / sum(weights)] for p, w in specs]).encode()).hexdigest()
    return TrainingData(train, val, components, {m["kind"] for m in manifests}, max(m["vocab_size"] for m in manifests),
                        sha, " + ".join(f"{p}:{w / sum(weights):.2f}" for p, w in specs),
                        [m.get("source") for m in manifests])
