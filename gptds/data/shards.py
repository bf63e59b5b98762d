"""Prepared data folders: uint16 token shards (plus, for instruction and chat data, an int64 index per
shard, and for chat data a uint8 loss mask per token) hashed while they are written; manifest.json that
describes them; and a staging folder that is renamed to the output name only after everything, manifest
last, is written, so no reader sees a partial folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gptds.errors import UserError, parse_json
from gptds.staging import recover

FORMAT = "gptds-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("text", "instruct", "chat")
SPLITS = ("train", "val")
TOKEN_DTYPE = np.dtype("<u2")   # GPT-2 ids < 65536; raw little-endian, no header
INDEX_DTYPE = np.dtype("<i8")   # instruct index rows: (start token, prompt_len), 16 bytes per record
MASK_DTYPE = np.dtype("u1")     # chat: 1 where the token is a target (an assistant turn's), one byte per token
# The manifest keys that define the data; the hash of these is what checkpoints record.
DATA_KEYS = ("format", "version", "kind", "tokenizer", "dtype", "vocab_size", "eot_token", "shards")
PREPARE_HINT = "`gptds prepare text ...`, `gptds prepare dolly ...` or `gptds prepare chat ...`"


class ShardWriter:
    """Writes one split as {split}_000000.bin, {split}_000001.bin, ... of at most shard_size tokens.
    Text data is a stream (write); instruction and chat data are whole records (write_record), never split
    across shards, with an index file {split}_NNNNNN.idx of (start, prompt_len) int64 rows, and for chat
    data a mask file {split}_NNNNNN.msk with one byte per token (1: a target)."""

    def __init__(self, folder: Path, split: str, shard_size: int, with_index: bool = False,
                 with_mask: bool = False):
        self.folder, self.split, self.shard_size, self.with_index = Path(folder), split, shard_size, with_index
        self.with_mask = with_mask
        self._mask = None
        self.shards: list[dict] = []  # manifest entries of the closed shards
        self.num_tokens = 0
        self.num_records = 0
        self._file = self._index = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}"
        self._entry = {"split": self.split, "file": f"{name}.bin", "num_tokens": 0}
        self._file = open(self.folder / self._entry["file"], "wb")  # noqa: SIM115 (open until the shard is full)
        self._hash = hashlib.sha256()
        if self.with_index:
            self._entry.update(index_file=f"{name}.idx", num_records=0)
            self._index = open(self.folder / self._entry["index_file"], "wb")  # noqa: SIM115
            self._index_hash = hashlib.sha256()
        if self.with_mask:
            self._entry["mask_file"] = f"{name}.msk"
            self._mask = open(self.folder / self._entry["mask_file"], "wb")  # noqa: SIM115
            self._mask_hash = hashlib.sha256()

    def _close_shard(self) -> None:
        for f in (self._file, self._index, self._mask):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._entry["sha256"] = self._hash.hexdigest()
        if self.with_index:
            self._entry["index_sha256"] = self._index_hash.hexdigest()
        if self.with_mask:
            self._entry["mask_sha256"] = self._mask_hash.hexdigest()
        self.shards.append(self._entry)
        self._file = self._index = self._mask = None

    def _append(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._entry["num_tokens"] += len(tokens)
        self.num_tokens += len(tokens)

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens to the stream, starting a new shard each shard_size tokens."""
        while len(tokens):
            if self._file is None:
                self._open()
            room = self.shard_size - self._entry["num_tokens"]
            self._append(tokens[:room])
            tokens = tokens[room:]
            if self._entry["num_tokens"] == self.shard_size:
                self._close_shard()

    def write_record(self, tokens: np.ndarray, prompt_len: int, mask: np.ndarray | None = None) -> None:
        """Append one whole record (with its per-token target mask for chat data); a record that would
        overflow a non-empty shard starts the next one."""
        if self._file is not None and self._entry["num_tokens"] + len(tokens) > self.shard_size:
            self._close_shard()
        if self._file is None:
            self._open()
        row = np.array([self._entry["num_tokens"], prompt_len], dtype=INDEX_DTYPE).tobytes()
        self._index.write(row)
        self._index_hash.update(row)
        self._entry["num_records"] += 1
        self.num_records += 1
        if self.with_mask:
            data = np.ascontiguousarray(mask, dtype=MASK_DTYPE).tobytes()
            self._mask.write(data)
            self._mask_hash.update(data)
        self._append(tokens)

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards


def write_manifest(folder: Path, manifest: dict) -> None:
    path = Path(folder) / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_size(path: Path, expected_bytes: int, what: str, manifest_path: Path, size: int | None = None) -> None:
    if size is None and not path.is_file():
        raise UserError(f"{path}: listed in {manifest_path} but missing; prepare the data again with {PREPARE_HINT}")
    size = path.stat().st_size if size is None else size
    if size != expected_bytes:
        raise UserError(f"{path}: {size} bytes, but {manifest_path} says {what} ({expected_bytes} bytes): "
                        f"the file was truncated or changed; prepare the data again with {PREPARE_HINT}")


class ShardFile:
    """A token shard (or index) as the loaders read it: with pread, at most a window at a time. Its size is
    checked against the manifest when opened, before each pass over the data (check) and whenever a read
    comes back short, so a file truncated in place under a running job is a UserError naming it; a memory
    map of it would kill the process with SIGBUS and print nothing."""

    def __init__(self, path: Path, dtype: np.dtype, count: int, manifest_path: Path, what: str):
        self.path, self.dtype, self.count, self.manifest_path, self.what = Path(path), dtype, count, manifest_path, what
        _check_size(self.path, count * dtype.itemsize, what, manifest_path)
        self.fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.count

    def check(self) -> None:
        size = os.fstat(self.fd).st_size
        _check_size(self.path, self.count * self.dtype.itemsize, self.what, self.manifest_path, size)

    def read(self, start: int, count: int) -> np.ndarray:
        """Items [start, start + count) (clipped to the shard's end), as a (count,) array."""
        count = max(0, min(count, self.count - start))
        data = os.pread(self.fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        if len(data) != count * self.dtype.itemsize:
            self.check()  # shrank since it was opened: a UserError naming it
        return np.frombuffer(data, dtype=self.dtype)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


def load_manifest(data_dir) -> dict:
    """The manifest of a prepared folder, after checking it and that every shard file has the size it
    lists (hashes are not recomputed here: see verify_shards). UserError naming the folder or file."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        recover(data_dir)  # a `prepare --overwrite` killed between its two renames: its previous output
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist; prepare one with {PREPARE_HINT}")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{data_dir} has no {MANIFEST_NAME}: it is not a prepared dataset; "
                        f"prepare one with {PREPARE_HINT}")
    try:
        manifest = parse_json(path.read_text(), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); prepare the data again with {PREPARE_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a gptds manifest (format should be {FORMAT!r}); prepare the data with "
                        f"{PREPARE_HINT}")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: manifest version {manifest.get('version')!r}, this gptds reads version {VERSION}")
    if manifest.get("kind") not in KINDS:
        raise UserError(f"{path}: kind {manifest.get('kind')!r} is not one of {', '.join(KINDS)}")
    if manifest.get("dtype") != "uint16" or manifest.get("tokenizer") != "gpt2":
        raise UserError(f"{path}: expected tokenizer 'gpt2' and dtype 'uint16', got "
                        f"{manifest.get('tokenizer')!r} and {manifest.get('dtype')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise UserError(f"{path}: 'shards' must be a list")
    for entry in shards:
        try:
            if entry["split"] not in SPLITS:
                raise UserError(f"{path}: shard {entry['file']!r} has split {entry['split']!r}, "
                                f"not one of {', '.join(SPLITS)}")
            _check_size(data_dir / entry["file"], entry["num_tokens"] * TOKEN_DTYPE.itemsize,
                        f"{entry['num_tokens']} tokens", path)
            if manifest["kind"] in ("instruct", "chat"):
                _check_size(data_dir / entry["index_file"], entry["num_records"] * 2 * INDEX_DTYPE.itemsize,
                            f"{entry['num_records']} records", path)
            if manifest["kind"] == "chat":
                _check_size(data_dir / entry["mask_file"], entry["num_tokens"] * MASK_DTYPE.itemsize,
                            f"a mask byte for each of {entry['num_tokens']} tokens", path)
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: shard entry {entry!r} lacks field {e}") from None
    return manifest


def manifest_sha256(data_dir) -> str:
    """sha256 of the data-defining part of a folder's manifest (DATA_KEYS: the kind, tokenizer and the
    shard list with each file's sha256), so re-preparing identical data from another command line or
    path gives the same value, and any change of the tokens gives another."""
    return data_sha256(load_manifest(data_dir))


def data_sha256(manifest: dict) -> str:
    """manifest_sha256 of an already loaded manifest."""
    data = {key: manifest.get(key) for key in DATA_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def read_split(data_dir, split: str) -> np.ndarray:
    """All tokens of a split, shards concatenated in manifest order: (num_tokens,) uint16. Loads the
    whole split into memory; for inspection and tests, not for training."""
    manifest = load_manifest(data_dir)
    parts = [np.fromfile(Path(data_dir) / entry["file"], dtype=TOKEN_DTYPE)
             for entry in manifest["shards"] if entry["split"] == split]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)


def verify_shards(data_dir) -> None:
    """Recompute every shard's (and index's) sha256 and compare with the manifest; UserError on a mismatch."""
    data_dir = Path(data_dir)
    for entry in load_manifest(data_dir)["shards"]:
        for name_key, hash_key in (("file", "sha256"), ("index_file", "index_sha256"), ("mask_file", "mask_sha256")):
            if name_key in entry and sha256_file(data_dir / entry[name_key]) != entry[hash_key]:
                raise UserError(f"{data_dir / entry[name_key]}: sha256 differs from {data_dir / MANIFEST_NAME}; "
                                f"the file changed since it was prepared")
