"""Instruction records: the one prompt template, rendering a record into prompt tokens and response
tokens (so the loss-mask boundary is a token boundary), and packing records into training rows whose
targets are -100 everywhere except on each record's response tokens and its end token."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from gptds.errors import UserError
from gptds.tokenizer import EOT_ID, EOT_TOKEN, encode, is_blank

# The `### Input:` section (and the blank line after it) appears only when the context is non-empty.
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
TEMPLATE = PROMPT_WITH_INPUT + "{response}" + EOT_TOKEN
TEMPLATE_NO_INPUT = PROMPT_NO_INPUT + "{response}" + EOT_TOKEN
IGNORE_INDEX = -100  # target value that torch's cross_entropy skips

# Field names of each input layout, by role. Alpaca records have no category.
LAYOUTS = {
    "dolly": {"instruction": "instruction", "context": "context", "response": "response", "category": "category"},
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output", "category": None},
    # GSM8K and gptds's arithmetic task: the question, and the worked answer ending in "#### N"
    "gsm8k": {"instruction": "question", "context": None, "response": "answer", "category": None},
}
REQUIRED_ROLES = ("instruction", "response")  # context and category may be missing (= empty)
NO_CATEGORY = "none"


@dataclass(frozen=True)
class InstructRecord:
    instruction: str
    context: str
    response: str
    category: str = NO_CATEGORY


def detect_layout(fields: dict, location: str) -> str:
    """"dolly" or "alpaca", from which response field a record has (used on the first record)."""
    for layout, names in LAYOUTS.items():
        if names["response"] in fields and names["instruction"] in fields:
            return layout
    raise UserError(f"{location}: cannot tell the record layout from its fields {sorted(fields)}: expected "
                    "dolly (instruction, context, response, category), alpaca (instruction, input, output) or "
                    "gsm8k (question, answer); "
                    "check the file or pass --format")


def record_from_fields(fields: dict, layout: str, location: str) -> InstructRecord:
    """An InstructRecord from one input record, fields stripped; UserError naming the field and location."""
    values = {}
    for role, name in LAYOUTS[layout].items():
        if name is None:
            continue
        value = fields.get(name)
        if value is None and role in REQUIRED_ROLES:
            what = "is null" if name in fields else "is missing"
            raise UserError(f"{location}: field {name!r} {what} (a {layout} record needs "
                            f"{', '.join(LAYOUTS[layout][r] for r in REQUIRED_ROLES)})")
        if value is not None and not isinstance(value, str):
            raise UserError(f"{location}: field {name!r} must be a string, got {type(value).__name__}")
        values[role] = "" if value is None or is_blank(value) else value.strip()
        if not values[role] and role in REQUIRED_ROLES:  # nothing to learn from (a lone end token), or to ask
            raise UserError(f"{location}: field {name!r} is empty or blank (a {layout} record needs text in "
                            f"{' and '.join(LAYOUTS[layout][r] for r in REQUIRED_ROLES)})")
    values["category"] = values.get("category") or NO_CATEGORY
    return InstructRecord(**{"context": "", **values})  # a layout without a context field (gsm8k): none


def render_prompt(record: InstructRecord) -> str:
    """Everything the model reads before the response: the template through "### Response:\\n"."""
    template = PROMPT_WITH_INPUT if record.context else PROMPT_NO_INPUT
    return template.format(instruction=record.instruction, context=record.context)


def render_text(record: InstructRecord) -> str:
    """The whole rendered record as text, end token included."""
    return render_prompt(record) + record.response + EOT_TOKEN


def split_key(record: InstructRecord) -> float:
    """A number in [0, 1) from a hash of the rendered text: the record goes to val when it is below
    val_fraction, so the split does not depend on record order (and duplicates share a split)."""
    digest = hashlib.sha256(render_text(record).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class EncodedRecord:
    tokens: np.ndarray  # (n,) uint16: prompt tokens, then response tokens and EOT_ID (unless truncated)
    prompt_len: int     # tokens[:prompt_len] is the prompt; no loss is taken on predicting them
    status: str         # "ok", "truncated" (response cut at its end, no EOT) or "dropped" (tokens empty)


def encode_record(record: InstructRecord, context_length: int) -> EncodedRecord:
    """Prompt and response tokenised separately and concatenated, so the loss-mask boundary is a token
    boundary. A training row holds context_length + 1 tokens; a longer record loses its response's
    end, and one whose prompt leaves no room for a single response token is dropped."""
    prompt = encode(render_prompt(record))
    response = encode(record.response) + [EOT_ID]
    max_tokens = context_length + 1
    if len(prompt) + len(response) <= max_tokens:
        return EncodedRecord(np.array(prompt + response, dtype=np.uint16), len(prompt), "ok")
    if len(prompt) > context_length:  # no response token could be predicted inside the row
        return EncodedRecord(np.zeros(0, dtype=np.uint16), len(prompt), "dropped")
    kept = prompt + response[:max_tokens - len(prompt)]
    return EncodedRecord(np.array(kept, dtype=np.uint16), len(prompt), "truncated")


def encode_records(job: tuple[list[InstructRecord], int]) -> list[tuple[EncodedRecord, float, str]]:
    """Pool worker: encode a batch of records for one context_length; returns (encoded, split_key,
    category) per record."""
    records, context_length = job
    return [(encode_record(r, context_length), split_key(r), r.category) for r in records]


# ---------------------------------------------------------------- rows and the loss mask

def pack_row(records: list[tuple[np.ndarray, int | np.ndarray]], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay whole records end to end in one row of row_len tokens, padded with EOT_ID. A record is
    (tokens, prompt_len) for instruction data, or (tokens, per-token target mask) for conversations.
    Returns the row's tokens (row_len,) int64 and is_target (row_len,) bool: True on the response (or
    assistant) tokens and end tokens of the records, False on prompts and padding."""
    tokens = np.full(row_len, EOT_ID, dtype=np.int64)
    is_target = np.zeros(row_len, dtype=bool)
    pos = 0
    for record_tokens, targets in records:
        n = len(record_tokens)
        assert pos + n <= row_len, f"records of {pos + n} tokens do not fit a row of {row_len}"
        tokens[pos:pos + n] = record_tokens
        if isinstance(targets, np.ndarray):
            is_target[pos:pos + n] = targets[:n].astype(bool)
        else:
            is_target[pos + targets:pos + n] = True
        pos += n
    return tokens, is_target


def row_to_xy(tokens: np.ndarray, is_target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x = tokens[:-1] and targets y[t] = tokens[t + 1] where that token is a response or end
    token of its record, else IGNORE_INDEX; both (row_len - 1,) int64. Because the mask belongs to
    the token being predicted, a record's first prompt token is never a target of the previous one."""
    x = tokens[:-1].astype(np.int64)
    y = np.where(is_target[1:], tokens[1:], IGNORE_INDEX).astype(np.int64)
    return x, y
