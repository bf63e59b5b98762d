"""`gptds prepare text`, `gptds prepare dolly` and `gptds prepare chat`: their settings (PrepareTextConfig,
PrepareDollyConfig, PrepareChatConfig) and the pipelines, which stream inputs through tokeniser processes
into uint16 shards and a manifest (formats in shards.py; instruction records and conversations are stored
as tokens plus an index of (start, prompt_len), conversations also with a per-token loss mask)."""
# ruff: noqa: RUF009  (gptds.config.flag returns a dataclasses.field, as in gptds.config)

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptds.config import check_flags, flag, require
from gptds.data.chat import (
    CHAT_FORMAT,
    CHAT_LAYOUTS,
    CHAT_TEMPLATE,
    conversation_from_fields,
    detect_chat_layout,
    encode_conversations,
)
from gptds.data.instruct import (
    TEMPLATE,
    TEMPLATE_NO_INPUT,
    detect_layout,
    encode_records,
    record_from_fields,
)
from gptds.data.shards import FORMAT, SPLITS, VERSION, ShardWriter, write_manifest
from gptds.data.sources import (
    RECORD_SUFFIXES,
    TEXT_SUFFIXES,
    ReadReport,
    batch_pieces,
    iter_documents,
    iter_file_records,
    iter_hub_records,
    iter_record_texts,
    list_input_files,
    tokenize_pieces,
)
from gptds.errors import UserError
from gptds.staging import staged_dir
from gptds.tokenizer import CHAT_VOCAB_SIZE, EOT_ID, VOCAB_SIZE

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
MAX_WORKERS = 256
INSTRUCT_FORMATS = ("auto", "dolly", "alpaca", "gsm8k")
RECORDS_PER_JOB = 256  # instruction records per work item (~250 KB of text for Dolly)


@dataclass
class PrepareTextConfig:
    input: list[str] | None = flag(None, ".txt/.jsonl/.json/.parquet files or folders of them (searched "
                                         "recursively, in sorted order); a .txt file is one document")
    dataset: str | None = flag(None, "instead of --input: a Hugging Face dataset name (or local dataset folder) "
                                     "for datasets.load_dataset")
    dataset_config: str | None = flag(None, "the dataset's configuration name")
    dataset_split: str = flag("train", "the dataset split to read")
    streaming: bool = flag(True, "stream the dataset rather than download it whole first")
    text_field: str = flag("text", "the record field holding a document (.jsonl/.json/.parquet/dataset)")
    output_dir: str = flag("data/text", "folder for the shards and manifest.json")
    shard_size: int = flag(100_000_000, "tokens per shard file")
    val_fraction: float = flag(0.01, "share of the token stream for validation: every round(1/val_fraction)-th "
                                     "block, starting with block 0")
    val_block_tokens: int = flag(4096, "the train/val split cuts the token stream into blocks of this many tokens")
    num_workers: int = flag(DEFAULT_WORKERS, "tokeniser processes (0: tokenise in this process)",
                             limits=(0, MAX_WORKERS))
    skip_bad: bool = flag(False, "skip (and count) malformed records instead of stopping at the first")
    overwrite: bool = flag(False, "replace a non-empty --output_dir")

    def __post_init__(self):
        check_flags(self, "prepare_text")
        _check_source(self, "prepare_text")
        require(bool(self.text_field), "prepare_text", "text_field", self.text_field, "a field name")
        _check_common(self, "prepare_text")
        require(0 < self.val_fraction <= 0.5, "prepare_text", "val_fraction", self.val_fraction,
                 "a number in (0, 0.5]")
        require(self.val_block_tokens > 0, "prepare_text", "val_block_tokens", self.val_block_tokens,
                 "a positive integer")


@dataclass
class PrepareDollyConfig:
    input: list[str] | None = flag(None, ".jsonl/.json/.parquet files (or folders of them) of instruction records")
    dataset: str | None = flag(None, "instead of --input: a Hugging Face dataset, e.g. databricks/databricks-dolly-15k")
    dataset_config: str | None = flag(None, "the dataset's configuration name")
    dataset_split: str = flag("train", "the dataset split to read")
    streaming: bool = flag(True, "stream the dataset rather than download it whole first")
    format: str = flag("auto", "record layout: dolly (instruction, context, response, category), alpaca "
                               "(instruction, input, output), gsm8k (question, answer), or auto: from the first "
                               "record's fields",
                       choices=INSTRUCT_FORMATS)
    output_dir: str = flag("data/dolly", "folder for the shards and manifest.json")
    context_length: int = flag(1024, "tokens per training sequence: longer records lose the end of their "
                                     "response, records whose prompt alone is longer are dropped")
    shard_size: int = flag(10_000_000, "tokens per shard file (records are not split across shards)")
    val_fraction: float = flag(0.05, "share of records for validation, chosen by a hash of each record's text")
    num_workers: int = flag(DEFAULT_WORKERS, "tokeniser processes (0: tokenise in this process)",
                             limits=(0, MAX_WORKERS))
    skip_bad: bool = flag(False, "skip (and count) malformed records instead of stopping at the first")
    overwrite: bool = flag(False, "replace a non-empty --output_dir")

    def __post_init__(self):
        check_flags(self, "prepare_dolly")
        _check_source(self, "prepare_dolly")
        require(self.format in INSTRUCT_FORMATS, "prepare_dolly", "format", self.format, ", ".join(INSTRUCT_FORMATS))
        require(self.context_length > 0, "prepare_dolly", "context_length", self.context_length, "a positive integer")
        _check_common(self, "prepare_dolly")
        require(0 < self.val_fraction < 1, "prepare_dolly", "val_fraction", self.val_fraction, "a number in (0, 1)")


@dataclass
class PrepareChatConfig:
    input: list[str] | None = flag(None, ".jsonl/.json/.parquet files (or folders of them) of conversations: "
                                         "OpenAI {\"messages\": [{\"role\", \"content\"}]}, ShareGPT "
                                         "{\"conversations\": [{\"from\", \"value\"}]}, or Dolly/Alpaca records "
                                         "(one-turn conversations)")
    dataset: str | None = flag(None, "instead of --input: a Hugging Face dataset of conversations")
    dataset_config: str | None = flag(None, "the dataset's configuration name")
    dataset_split: str = flag("train", "the dataset split to read")
    streaming: bool = flag(True, "stream the dataset rather than download it whole first")
    format: str = flag("auto", "record layout: openai, sharegpt, dolly, alpaca, gsm8k, or auto: from the first "
                               "record",
                       choices=CHAT_LAYOUTS)
    output_dir: str = flag("data/chat", "folder for the shards, masks and manifest.json")
    context_length: int = flag(1024, "tokens per training sequence: a longer conversation is cut after its last "
                                     "assistant turn that fits (counted)")
    shard_size: int = flag(10_000_000, "tokens per shard file (conversations are not split across shards)")
    val_fraction: float = flag(0.05, "share of conversations for validation, chosen by a hash of each")
    num_workers: int = flag(DEFAULT_WORKERS, "tokeniser processes (0: tokenise in this process)")
    skip_bad: bool = flag(False, "skip (and count) malformed conversations instead of stopping at the first")
    overwrite: bool = flag(False, "replace a non-empty --output_dir")

    def __post_init__(self):
        check_flags(self, "prepare_chat")
        _check_source(self, "prepare_chat")
        require(self.format in CHAT_LAYOUTS, "prepare_chat", "format", self.format, ", ".join(CHAT_LAYOUTS))
        require(self.context_length > 0, "prepare_chat", "context_length", self.context_length, "a positive integer")
        _check_common(self, "prepare_chat")
        require(0 < self.val_fraction < 1, "prepare_chat", "val_fraction", self.val_fraction, "a number in (0, 1)")


def _check_source(cfg, section: str) -> None:
    if bool(cfg.input) == bool(cfg.dataset):
        raise UserError(f"{section}: give exactly one of --input FILE_OR_FOLDER ... and --dataset NAME "
                        f"(got input={cfg.input!r}, dataset={cfg.dataset!r})")


def _check_common(cfg, section: str) -> None:
    require(cfg.shard_size > 0, section, "shard_size", cfg.shard_size, "a positive integer")
    require(cfg.num_workers >= 0, section, "num_workers", cfg.num_workers, "0 (this process) or more")
    require(bool(cfg.output_dir), section, "output_dir", cfg.output_dir, "a folder path")


# ---------------------------------------------------------------- shared machinery

def map_in_order(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
    """fn(item) for each item, in input order, computed by num_workers processes (0: here). At most
    2 * num_workers + 2 items are in flight: Pool.imap would read the whole input ahead into memory."""
    if num_workers == 0:
        yield from map(fn, items)
        return
    # spawn: a worker starts fresh and imports what fn's module needs (numpy, tiktoken), not the torch
    # the parent loaded, and no parent thread (tqdm's monitor) is forked mid-lock.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * num_workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _source(cfg, files: list[Path] | None) -> dict:
    if cfg.dataset:
        return {"dataset": cfg.dataset, "dataset_config": cfg.dataset_config, "dataset_split": cfg.dataset_split,
                "streaming": cfg.streaming}
    return {"inputs": list(cfg.input), "files": [str(p) for p in files]}


def _inputs(cfg) -> list[tuple[str, str]]:
    """What prepare reads, which --output_dir may not overlap: the --input paths, or a local --dataset folder."""
    if cfg.input:
        return [("--input", p) for p in cfg.input]
    return [("--dataset", cfg.dataset)] if Path(cfg.dataset).exists() else []


def _manifest_head(kind: str) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": kind, "tokenizer": "gpt2", "dtype": "uint16",
            "vocab_size": CHAT_VOCAB_SIZE if kind == "chat" else VOCAB_SIZE, "eot_token": EOT_ID}


def _manifest_tail(cfg, files: list[Path] | None) -> dict:
    return {"source": _source(cfg, files), "command": list(sys.argv),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}


def _progress(unit: str) -> tqdm:
    return tqdm(unit=unit, mininterval=1.0, dynamic_ncols=True, file=sys.stderr)


def _describe_input(cfg) -> str:
    return f"dataset {cfg.dataset}" if cfg.dataset else ", ".join(cfg.input)


# ---------------------------------------------------------------- text

def _route_blocks(tokens: np.ndarray, position: int, block_tokens: int, val_every: int,
                  writers: dict[str, ShardWriter]) -> int:
    """Write tokens (which start at stream position `position`) block by block: block i of
    block_tokens tokens goes to val when i % val_every == 0, else to train. Returns the new position."""
    while len(tokens):
        block = position // block_tokens
        n = min(len(tokens), (block + 1) * block_tokens - position)
        writers["val" if block % val_every == 0 else "train"].write(tokens[:n])
        tokens = tokens[n:]
        position += n
    return position


def prepare_text(cfg: PrepareTextConfig) -> Path:
    """Tokenise a corpus into train/val uint16 shards under cfg.output_dir; returns that folder."""
    output_dir = Path(cfg.output_dir)
    report = ReadReport(skip_bad=cfg.skip_bad)
    files = None
    if cfg.input:
        files = list_input_files(cfg.input, TEXT_SUFFIXES)
        pieces = iter_documents(files, cfg.text_field, report)
    else:
        records = iter_hub_records(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.streaming)
        pieces = iter_record_texts(records, cfg.text_field, report)
    val_every = round(1 / cfg.val_fraction)  # blocks; the realised val share is 1 / val_every
    start = time.perf_counter()
    documents = chars = position = 0
    with staged_dir(output_dir, cfg.overwrite, "--output_dir", _inputs(cfg)) as staging:
        writers = {split: ShardWriter(staging, split, cfg.shard_size) for split in SPLITS}
        with _progress(" docs") as bar:
            for tokens, n_documents, n_chars in map_in_order(tokenize_pieces, batch_pieces(pieces), cfg.num_workers):
                position = _route_blocks(tokens, position, cfg.val_block_tokens, val_every, writers)
                documents += n_documents
                chars += n_chars
                bar.update(n_documents)
                bar.set_postfix_str(f"{position / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
        shards = [entry for writer in writers.values() for entry in writer.close()]
        if documents == 0:
            raise UserError(f"no documents in {_describe_input(cfg)}: the input is empty "
                            f"(empty documents: {report.empty_documents}, bad records skipped: {report.skipped_bad}); "
                            "nothing was written")
        if writers["train"].num_tokens == 0:
            raise UserError(f"the train split would be empty: all {position} tokens fall in validation block 0 "
                            f"(--val_block_tokens {cfg.val_block_tokens}); lower --val_block_tokens below "
                            f"{position} or give more text")
        splits = {split: {"num_tokens": w.num_tokens, "num_shards": len(w.shards)} for split, w in writers.items()}
        manifest = _manifest_head("text") | {
            "shards": shards, "splits": splits, "documents": documents, "empty_documents": report.empty_documents,
            "skipped_bad": report.skipped_bad, "val_fraction": cfg.val_fraction,
            "val_block_tokens": cfg.val_block_tokens, "val_every_blocks": val_every, "shard_size": cfg.shard_size,
        } | _manifest_tail(cfg, files)
        write_manifest(staging, manifest)
    seconds = time.perf_counter() - start
    print(f"prepared {output_dir}: {documents:,} documents, {position:,} tokens "
          f"(train {splits['train']['num_tokens']:,}, val {splits['val']['num_tokens']:,}; shards: {len(shards)}) "
          f"in {seconds:.2f} s, "
          f"{position / seconds:,.0f} tokens/s, {chars / seconds / 1e6:.1f} M characters/s")
    _print_skipped(report)
    return output_dir


def _print_skipped(report: ReadReport) -> None:
    if report.empty_documents:
        print(f"skipped {report.empty_documents} documents with empty or blank text")
    if report.skipped_bad:
        print(f"skipped {report.skipped_bad} bad records (--skip_bad), e.g.:")
        for message in report.bad_examples:
            print(f"  {message}")


# ---------------------------------------------------------------- instruction records and conversations

@dataclass(frozen=True)
class RecordKind:
    """What differs between `prepare dolly` and `prepare chat`: how a record is recognised, parsed and
    encoded, and what its manifest says about the format."""
    kind: str                      # the manifest kind
    noun: str                      # "records" or "conversations", for messages
    detect: Callable               # (fields, location) -> layout
    parse: Callable                # (fields, layout, location) -> record
    encode: Callable               # pool worker: (records, context_length) -> [(encoded, split_key, category)]
    format_fields: dict            # written into the manifest
    with_mask: bool                # chat: a per-token target mask beside the tokens
    detect_each: bool = False      # --format auto: each record's layout from its fields (else the first's)


INSTRUCT = RecordKind("instruct", "records", detect_layout, record_from_fields, encode_records,
                      {"template": TEMPLATE, "template_no_input": TEMPLATE_NO_INPUT}, with_mask=False)
CHAT = RecordKind("chat", "conversations", detect_chat_layout, conversation_from_fields, encode_conversations,
                  {"chat_format": CHAT_FORMAT, "chat_template": CHAT_TEMPLATE}, with_mask=True, detect_each=True)


def _records(cfg, what: RecordKind, files: list[Path] | None, report: ReadReport, found: dict) -> Iterator:
    """Records of the input, validated; found["layout"] is set from the first good record (--format auto)."""
    if files is None:
        raw = iter_hub_records(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.streaming)
    else:
        raw = (item for path in files for item in iter_file_records(path, report))
    for fields, location in raw:
        try:
            layout = found["layout"]
            if layout is None or (what.detect_each and cfg.format == "auto"):
                layout = what.detect(fields, location) if cfg.format == "auto" else cfg.format
            if found["layout"] is None:  # from the first record that has one (a bad first one is skipped too)
                found["layout"] = layout
            elif layout != found["layout"]:
                found["layout"] = "mixed"
            yield what.parse(fields, layout, location)
        except UserError as e:
            report.bad(str(e))


def _jobs(records: Iterator, context_length: int) -> Iterator[tuple[list, int]]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == RECORDS_PER_JOB:
            yield batch, context_length
            batch = []
    if batch:
        yield batch, context_length


def prepare_dolly(cfg: PrepareDollyConfig) -> Path:
    """Render and tokenise instruction records into train/val shards with (start, prompt_len) indexes."""
    return _prepare_records(cfg, INSTRUCT)


def prepare_chat(cfg: PrepareChatConfig) -> Path:
    """Render conversations in ChatML and tokenise them into train/val shards with indexes and loss masks."""
    return _prepare_records(cfg, CHAT)


def _prepare_records(cfg, what: RecordKind) -> Path:
    output_dir = Path(cfg.output_dir)
    report = ReadReport(skip_bad=cfg.skip_bad)
    files = list_input_files(cfg.input, RECORD_SUFFIXES) if cfg.input else None
    found = {"layout": None}
    records = _records(cfg, what, files, report, found)
    status = Counter()  # ok / cut / truncated / dropped
    categories = {split: Counter() for split in SPLITS}
    start = time.perf_counter()
    with staged_dir(output_dir, cfg.overwrite, "--output_dir", _inputs(cfg)) as staging:
        writers = {split: ShardWriter(staging, split, cfg.shard_size, with_index=True, with_mask=what.with_mask)
                   for split in SPLITS}
        with _progress(f" {what.noun}") as bar:
            for results in map_in_order(what.encode, _jobs(records, cfg.context_length), cfg.num_workers):
                for encoded, key, category in results:
                    status[encoded.status] += 1
                    if encoded.status == "dropped":
                        continue
                    split = "val" if key < cfg.val_fraction else "train"
                    writers[split].write_record(encoded.tokens, encoded.prompt_len, getattr(encoded, "mask", None))
                    categories[split][category] += 1
                bar.update(len(results))
        shards = [entry for writer in writers.values() for entry in writer.close()]
        kept = sum(status.values()) - status["dropped"]
        if not status:
            raise UserError(f"no {what.noun} in {_describe_input(cfg)}: the input is empty "
                            f"({report.skipped_bad} bad {what.noun} skipped); nothing was written")
        if kept == 0:
            raise UserError(f"all {status['dropped']} {what.noun} were dropped: in each, the text before the first "
                            f"response is longer than --context_length {cfg.context_length} tokens; raise "
                            f"--context_length")
        for split, fix in (("train", "lower"), ("val", "raise")):
            if writers[split].num_records == 0:
                raise UserError(f"the {split} split would be empty: none of the {kept} {what.noun} fell in it with "
                                f"--val_fraction {cfg.val_fraction}; {fix} --val_fraction or give more {what.noun}")
        splits = {split: {"num_tokens": w.num_tokens, "num_records": w.num_records, "num_shards": len(w.shards)}
                  for split, w in writers.items()}
        manifest = _manifest_head(what.kind) | {
            "shards": shards, "splits": splits, **what.format_fields,
            "layout": found["layout"], "context_length": cfg.context_length,
            "records": {split: w.num_records for split, w in writers.items()},
            "truncated": status["truncated"], "dropped": status["dropped"], "skipped_bad": report.skipped_bad,
            **({"cut_at_turn": status["cut"]} if what.with_mask else {}),
            "categories": {split: dict(sorted(c.items())) for split, c in categories.items()},
            "val_fraction": cfg.val_fraction, "shard_size": cfg.shard_size,
        } | _manifest_tail(cfg, files)
        write_manifest(staging, manifest)
    seconds = time.perf_counter() - start
    print(f"prepared {output_dir}: {kept:,} {found['layout']} {what.noun} (train {splits['train']['num_records']:,}, "
          f"val {splits['val']['num_records']:,}), {splits['train']['num_tokens'] + splits['val']['num_tokens']:,} "
          f"tokens in {seconds:.1f} s")
    if status["cut"]:
        print(f"context_length {cfg.context_length}: {status['cut']} conversations cut after their last assistant "
              f"turn that fits")
    if status["truncated"] or status["dropped"]:
        print(f"context_length {cfg.context_length}: {status['truncated']} {what.noun} truncated (response end cut, "
              f"no end token), {status['dropped']} dropped (prompt alone too long)")
    _print_skipped(report)
    return output_dir
