"""Reading prepare inputs: local .txt/.jsonl/.json/.parquet files and folders, or a Hugging Face dataset,
streamed as documents and records that carry their location (file:line, file:row or dataset row), so a
bad input is reported where it is. Also the work a tokeniser process does on a batch of documents."""

from __future__ import annotations

import codecs
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptds.errors import UserError, parse_json
from gptds.tokenizer import EOT_ID, encode, is_blank

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CHUNK_BYTES = 1 << 20   # a huge .txt file is read and tokenised in pieces of about this many bytes
BATCH_CHARS = 1 << 20   # one work item for a tokeniser process: documents totalling about this many characters
MAX_EXAMPLES = 5        # skipped bad records quoted on the console

Piece = tuple[str, bool]  # (text, ends_document): an EOT token follows the text when ends_document


@dataclass
class ReadReport:
    """What reading skipped: bad records (only with --skip_bad; otherwise the first one is a UserError)
    and documents with empty or blank text (tokenizer.is_blank: whitespace, NULs, control characters only),
    which would be a lone EOT token or thousands of tokens of nothing."""
    skip_bad: bool = False
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    empty_documents: int = 0

    def bad(self, message: str) -> None:
        """Report a bad record; returns (and the caller skips the record) only with --skip_bad."""
        if not self.skip_bad:
            raise UserError(f"{message} (--skip_bad skips and counts such records)")
        self.skipped_bad += 1
        if len(self.bad_examples) < MAX_EXAMPLES:
            self.bad_examples.append(message)


def list_input_files(inputs: Iterable[str], suffixes: tuple[str, ...]) -> list[Path]:
    """The files named by `inputs`; a folder contributes its files with one of `suffixes`, recursively,
    in sorted path order, so the token stream does not depend on directory listing order."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise UserError(f"input folder {path} holds no {'/'.join(suffixes)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in suffixes:
                raise UserError(f"input {path}: unsupported file type {path.suffix!r}; "
                                f"expected one of {', '.join(suffixes)} (or a folder of them)")
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist")
    return files


def _decode(data: bytes, location: str, offset: int) -> str:
    """UTF-8 text of `data`, which starts at byte `offset` of its file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{location}: not UTF-8 text at byte offset {offset + e.start} ({e.reason}); "
                        "convert the file to UTF-8") from None


# ---------------------------------------------------------------- records (JSONL, JSON, parquet, hub)

def iter_jsonl(path: Path, report: ReadReport) -> Iterator[tuple[dict, str]]:
    """One JSON object per line; blank lines are ignored."""
    offset = 0  # byte offset of the current line in the file
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            location = f"{path}:{lineno}"
            line_offset, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.bad(f"{location}: not UTF-8 text at byte offset {line_offset + e.start} ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                record = parse_json(line, location, record=True)
            except json.JSONDecodeError as e:
                report.bad(f"{location}: malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}")
                continue
            except UserError as e:  # nested too deeply, a repeated key
                report.bad(str(e))
                continue
            if not isinstance(record, dict):
                report.bad(f"{location}: expected a JSON object, got {type(record).__name__}")
                continue
            yield record, location


def iter_json_array(path: Path, report: ReadReport) -> Iterator[tuple[dict, str]]:
    """A .json file holding one array of objects. The file is read into memory whole (JSON has no
    record boundaries to stream by); use JSONL or parquet for corpora larger than RAM."""
    text = _decode(path.read_bytes(), str(path), 0)
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise UserError(f"{path}: expected a JSON array of records (or use .jsonl for one record per line)")
    pos = ws.match(text, pos + 1).end()
    lineno, counted_to = 1, 0  # line numbers are counted incrementally: text.count is O(file) per call
    while not text.startswith("]", pos):
        lineno += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            record, pos = parse_json(text, f"{path}:{lineno}", pos, record=True)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}") \
                from None
        if isinstance(record, dict):
            yield record, f"{path}:{lineno}"
        else:
            report.bad(f"{path}:{lineno}: expected a JSON object in the array, got {type(record).__name__}")
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            line = text.count("\n", 0, pos) + 1
            raise UserError(f"{path}:{line}: malformed JSON: expected ',' or ']' after a record")


def iter_parquet(path: Path, columns: list[str] | None = None) -> Iterator[tuple[dict, str]]:
    """Rows of a parquet file, read a batch of row groups at a time (only `columns`, when given)."""
    import pyarrow.parquet as pq  # only for parquet inputs (and absent from the GPU check machine)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid/OSError for files that are not parquet)
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise UserError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); set --text_field")
    rows = (record for batch in parquet.iter_batches(batch_size=1024, columns=columns) for record in batch.to_pylist())
    for row, record in _read_or_refuse(rows, lambda done, why: f"{path}: cannot read the rows after row {done} "
                                       f"({why})"):  # a damaged page fails in the iteration
        yield record, f"{path}:row {row}"


def iter_file_records(path: Path, report: ReadReport, columns: list[str] | None = None) -> Iterator[tuple[dict, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(path, report)
    if suffix == ".json":
        return iter_json_array(path, report)
    if suffix == ".parquet":
        return iter_parquet(path, columns)
    raise UserError(f"{path}: records are read from .jsonl, .json or .parquet files, not {suffix!r}")


def load_hub_dataset(name: str, config: str | None, split: str, streaming: bool):
    """datasets.load_dataset(name, config, split=split, streaming=streaming). `name` is a hub id
    (databricks/databricks-dolly-15k), a builder (json, parquet) or a local dataset folder."""
    import datasets  # only for hub datasets: a heavy import (and absent from the GPU check machine)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 (datasets raises ConnectionError, FileNotFoundError, ValueError, ...)
        raise UserError(f"cannot load dataset {name!r} (--dataset_config {config!r}, --dataset_split {split!r}): "
                        f"{_error_line(e)}") from None


def iter_hub_records(name: str, config: str | None, split: str, streaming: bool) -> Iterator[tuple[dict, str]]:
    dataset = load_hub_dataset(name, config, split, streaming)  # a streamed one parses as it is iterated
    for row, record in _read_or_refuse(dataset, lambda done, why: f"dataset {name!r} [{split}]: cannot read the "
                                       f"record after row {done} ({why}); --skip_bad cannot skip inside the "
                                       f"dataset's own reader: fix the source"):
        yield record, f"dataset {name}[{split}] row {row}"


def _read_or_refuse(items: Iterable, message: Callable[[int, str], str]) -> Iterator[tuple[int, object]]:
    """(1-based count, item) for items, where an error raised by the reader underneath (pyarrow, datasets)
    becomes a UserError: message(items read so far, "<error type>: <its first line>")."""
    items, done = iter(items), 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 (ArrowInvalid, OSError from a codec, JSON parse errors, ...)
            raise UserError(message(done, _error_line(e))) from None
        done += 1
        yield done, item


def _error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# ---------------------------------------------------------------- text documents

def find_cut(buf: bytes | bytearray, fallback: bool = False) -> int:
    """The last position p (2 <= p < len(buf)) where a text may be cut so that tokenising the two parts
    separately gives exactly the tokens of the whole, or -1 if there is none.

    Rule: buf[p-1] is "\\n" and buf[p-2], buf[p] are printable non-space ASCII. GPT-2's pre-tokeniser
    splits "x\\ny" into "x", "\\n", "y", so no piece (and hence no BPE merge) crosses p. With
    `fallback`, used only when a long stretch has no such point (e.g. CRLF line ends), also accept
    buf[p-1] printable non-space ASCII and buf[p] an ASCII whitespace byte: a piece is either all
    whitespace or starts with at most one space before non-space characters, so none holds both; and a
    "\n" between two letters, digits or punctuation marks of any script (the first rule, beyond ASCII)."""
    p = _last_newline_cut(buf, lambda p: 0x21 <= buf[p - 2] <= 0x7E and 0x21 <= buf[p] <= 0x7E)
    if p > 0 or not fallback:
        return p
    # "\n" between two letters, digits or punctuation of any script (CJK text ending lines with "。")
    p = _last_newline_cut(buf, lambda p: _word_char(_char_ending_at(buf, p - 1)) and
                          _word_char(_char_starting_at(buf, p)))
    if p > 0:
        return p
    window = 1 << 16
    while True:  # search the tail first: the last cut is almost always near the end
        start = max(0, len(buf) - window)
        last = -1
        for match in _FALLBACK_CUT.finditer(buf, start):
            last = match.start()
        if last >= 0:
            return last + 1
        if start == 0:
            return -1
        window *= 4


_FALLBACK_CUT = re.compile(rb"[\x21-\x7e][ \t\n\r\x0b\x0c]")


def _last_newline_cut(buf: bytes | bytearray, allowed: Callable[[int], bool]) -> int:
    """The last p >= 2 with buf[p - 1] a newline, buf[p] present and allowed(p); -1 if none."""
    p = buf.rfind(b"\n", 0, len(buf) - 1) + 1
    while p >= 2:
        if allowed(p):
            return p
        p = buf.rfind(b"\n", 0, p - 1) + 1
    return -1


def _char_ending_at(buf: bytes | bytearray, end: int) -> str | None:
    """The UTF-8 character whose last byte is buf[end - 1], or None if those bytes are not one character."""
    start = end - 1
    while start > max(0, end - 4) and 0x80 <= buf[start] <= 0xBF:  # continuation bytes
        start -= 1
    try:
        ch = bytes(buf[start:end]).decode()
    except UnicodeDecodeError:
        return None
    return ch if len(ch) == 1 else None


def _char_starting_at(buf: bytes | bytearray, start: int) -> str | None:
    lead = buf[start]
    size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    try:
        ch = bytes(buf[start:start + size]).decode()
    except UnicodeDecodeError:
        return None
    return ch if len(ch) == 1 else None


def _word_char(ch: str | None) -> bool:
    """A letter, digit or punctuation mark: never whitespace, so GPT-2's pre-tokeniser makes a lone "\n"
    between two of them a piece of its own."""
    return ch is not None and (0x21 <= ord(ch) <= 0x7E or (ord(ch) > 0x7F and unicodedata.category(ch)[0] in "LNP"))


def iter_text_file(path: Path, report: ReadReport, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Piece]:
    """A whole .txt file is one document, streamed in pieces of about chunk_bytes cut where find_cut
    allows, so memory stays flat for any file size and the tokens equal those of the whole file."""
    if not _has_visible_text(path, chunk_bytes):
        report.empty_documents += 1
        return
    buf = bytearray()
    offset = 0  # file byte offset of buf[0]
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            buf += data
            if not data:
                yield _decode(bytes(buf), str(path), offset), True
                return
            if len(buf) < chunk_bytes:
                continue
            # A file with no safe cut at all (no ASCII whitespace after a printable ASCII byte) is held whole.
            p = find_cut(buf, fallback=len(buf) >= 4 * chunk_bytes)
            if p > 0:
                yield _decode(bytes(buf[:p]), str(path), offset), False
                del buf[:p]
                offset += p


def _has_visible_text(path: Path, chunk_bytes: int) -> bool:
    """Whether a file holds any visible character; reads only up to the first one (the first chunk, for
    ordinary text). Bytes that are not UTF-8 count as visible: reading the document reports them."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            if not is_blank(utf8.decode(data)):
                return True
    return not is_blank(utf8.decode(b"", final=True))


def iter_record_texts(records: Iterable[tuple[dict, str]], text_field: str, report: ReadReport) -> Iterator[Piece]:
    """Each record's `text_field` is one document."""
    for record, location in records:
        if text_field not in record:
            report.bad(f"{location}: record has no field {text_field!r} (fields: {', '.join(sorted(record))}); "
                       "set --text_field")
            continue
        text = record[text_field]
        if not isinstance(text, str):
            report.bad(f"{location}: field {text_field!r} must be a string, got {type(text).__name__}")
            continue
        if is_blank(text):
            report.empty_documents += 1
            continue
        yield text, True


def iter_documents(files: list[Path], text_field: str, report: ReadReport) -> Iterator[Piece]:
    """Documents of local files in order: a .txt file is one document, a record of the others is one."""
    for path in files:
        if path.suffix.lower() == ".txt":
            yield from iter_text_file(path, report)
        else:
            columns = [text_field] if path.suffix.lower() == ".parquet" else None
            yield from iter_record_texts(iter_file_records(path, report, columns), text_field, report)


def batch_pieces(pieces: Iterable[Piece], batch_chars: int = BATCH_CHARS) -> Iterator[list[Piece]]:
    """Group pieces into work items of about batch_chars characters (at least one piece each)."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_pieces(pieces: list[Piece]) -> tuple[np.ndarray, int, int]:
    """Pool worker: the tokens of a work item, with EOT_ID after each finished document; returns
    (tokens (n,) uint16, documents finished, characters read)."""
    ids: list[int] = []
    documents = chars = 0
    for text, ends_document in pieces:
        ids.extend(encode(text))
        chars += len(text)
        if ends_document:
            ids.append(EOT_ID)
            documents += 1
    return np.array(ids, dtype=np.uint16), documents, chars
