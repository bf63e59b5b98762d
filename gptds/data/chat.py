"""Conversations: the layouts people have (OpenAI-style `messages`, ShareGPT-style `conversations`, and
Dolly/Alpaca records as one-turn conversations), the checks every conversation passes, and rendering in
ChatML with a per-token loss mask:

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n

The loss is taken on each assistant turn's content and its <|im_end|> (the model learns to end its turn);
everything else (system and user turns, the template's own tokens before each reply, the newline after
<|im_end|>) is masked. Each piece of text between special tokens is tokenised as one piece, as Hugging
Face's tokenizer does with the exported chat template, so the ids are the same there. A conversation longer
than the context is cut after the last assistant turn that fits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from gptds.data.instruct import LAYOUTS, record_from_fields
from gptds.errors import UserError
from gptds.tokenizer import CHAT_VOCAB_SIZE, IM_END, IM_END_ID, IM_START, IM_START_ID, _chat_encoding, encode

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
CHAT_LAYOUTS = ("auto", "openai", "sharegpt", "dolly", "alpaca", "gsm8k")
CHAT_FORMAT = "chatml"
# transformers' apply_chat_template renders exactly what render() tokenises.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
                 + IM_END + "' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START
                 + "assistant\\n' }}{% endif %}")


def chat_format_of(config) -> str | None:
    """"chatml" for a model whose vocabulary holds the ChatML tokens (a GPTConfig), else None."""
    return CHAT_FORMAT if config.vocab_size >= CHAT_VOCAB_SIZE else None


@dataclass(frozen=True)
class Message:
    role: str      # system, user or assistant
    content: str


# ---------------------------------------------------------------- reading records

def detect_chat_layout(fields: dict, location: str) -> str:
    """The layout of a record, from its fields: openai, sharegpt, dolly or alpaca."""
    if "messages" in fields:
        return "openai"
    if "conversations" in fields:
        return "sharegpt"
    for layout, names in LAYOUTS.items():
        if names["response"] in fields and names["instruction"] in fields:
            return layout
    raise UserError(f"{location}: cannot tell the conversation layout from its fields {sorted(fields)}: expected "
                    "\"messages\" (OpenAI: role/content), \"conversations\" (ShareGPT: from/value), or a Dolly/"
                    "Alpaca instruction record or GSM8K question/answer; check the file or pass --format")


def conversation_from_fields(fields: dict, layout: str, location: str) -> list[Message]:
    """The checked conversation of one input record; UserError naming the location and what is wrong."""
    if layout in LAYOUTS:  # an instruction record as a one-turn conversation
        record = record_from_fields(fields, layout, location)
        user = record.instruction + (f"\n\n{record.context}" if record.context else "")
        messages = [Message("user", user), Message("assistant", record.response)]
    else:
        key, role_key, content_key = (("messages", "role", "content") if layout == "openai"
                                      else ("conversations", "from", "value"))
        turns = fields.get(key)
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{location}: field {key!r} must be a non-empty list of turns")
        messages = []
        for i, turn in enumerate(turns):
            where = f"{location}: {key}[{i}]"
            if not isinstance(turn, dict):
                raise UserError(f"{where} must be an object with {role_key!r} and {content_key!r}")
            role, content = turn.get(role_key), turn.get(content_key)
            if layout == "sharegpt":
                role = SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
                allowed = ", ".join(sorted(SHAREGPT_ROLES))
            else:
                allowed = ", ".join(ROLES)
            if role not in ROLES:
                raise UserError(f"{where}: unknown role {turn.get(role_key)!r}; allowed: {allowed}")
            if not isinstance(content, str):
                raise UserError(f"{where}: {content_key!r} must be a string, got {type(content).__name__}")
            messages.append(Message(role, content))
    check_conversation(messages, location)
    return messages


def check_conversation(messages: list[Message], location: str) -> None:
    """Refuse what cannot be trained on as a conversation: an empty turn, a system turn anywhere but
    first, two assistant turns in a row, no assistant turn."""
    for i, m in enumerate(messages):
        if not m.content.strip():
            raise UserError(f"{location}: turn {i} ({m.role}) is empty")
        if m.role == "system" and i > 0:
            raise UserError(f"{location}: turn {i} is a system turn; only the first turn may be one")
        if m.role == "assistant" and i > 0 and messages[i - 1].role == "assistant":
            raise UserError(f"{location}: turns {i - 1} and {i} are both assistant turns; merge them or put the "
                            f"user turn between them back")
    if not any(m.role == "assistant" for m in messages):
        raise UserError(f"{location}: no assistant turn: nothing to learn from this conversation")


# ---------------------------------------------------------------- tokens and mask

def _segment(role: str, content: str) -> tuple[list[int], int]:
    """Tokens of "{role}\\n{content}" as one piece of text (as the exported tokenizer splits it), and how
    many of them lie within "{role}\\n" (a token that also holds content counts as content)."""
    ids = encode(f"{role}\n{content}")
    prefix_bytes = len(f"{role}\n".encode())
    enc, end, k = _chat_encoding(), 0, 0
    for token in ids:
        end += len(enc.decode_single_token_bytes(token))
        if end > prefix_bytes:
            break
        k += 1
    return ids, k


NEWLINE = encode("\n")


def render(messages: list[Message], add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """ChatML tokens (n,) int64 of a conversation, is_target (n,) bool (an assistant turn's content and
    its <|im_end|>), and the token positions where each assistant turn ends (after its newline). With
    add_generation_prompt, "<|im_start|>assistant\\n" follows: what a chat model continues."""
    tokens, targets, turn_ends = [], [], []
    for m in messages:
        ids, prefix = _segment(m.role, m.content)
        learn = m.role == "assistant"
        tokens += [IM_START_ID, *ids, IM_END_ID, *NEWLINE]
        targets += [False] + [False] * prefix + [learn] * (len(ids) - prefix) + [learn] + [False] * len(NEWLINE)
        if learn:
            turn_ends.append(len(tokens))
    if add_generation_prompt:
        tokens += [IM_START_ID, *encode("assistant\n")]
        targets += [False] * (len(tokens) - len(targets))
    return np.array(tokens, dtype=np.int64), np.array(targets, dtype=bool), turn_ends


def fit(tokens: np.ndarray, is_target: np.ndarray, turn_ends: list[int], max_tokens: int) -> tuple[int, str]:
    """How many leading tokens of a rendered conversation to keep in rows of max_tokens, and how: "ok"
    (all), "cut" (after the last assistant turn that fits), "truncated" (the first assistant turn loses its
    end: no whole turn fits) or "dropped" (not even one assistant token fits)."""
    if len(tokens) <= max_tokens:
        return len(tokens), "ok"
    fitting = [end for end in turn_ends if end <= max_tokens]
    if fitting:
        return fitting[-1], "cut"
    first_target = int(np.argmax(is_target))
    if first_target < max_tokens:
        return max_tokens, "truncated"
    return 0, "dropped"


def prompt_tokens(messages: list[Message]) -> list[int]:
    """What a chat model is given to write the next assistant turn."""
    return render(messages, add_generation_prompt=True)[0].tolist()


# ---------------------------------------------------------------- for `gptds prepare chat`

@dataclass
class EncodedConversation:
    tokens: np.ndarray  # (n,) uint16 ChatML tokens, cut to the context when needed
    mask: np.ndarray    # (n,) uint8: 1 on targets
    prompt_len: int     # tokens before the first target (the loader drops rows where it fills the row)
    status: str         # "ok", "cut", "truncated" or "dropped" (see fit)


def encode_conversation(messages: list[Message], context_length: int) -> EncodedConversation:
    tokens, is_target, turn_ends = render(messages)
    keep, status = fit(tokens, is_target, turn_ends, context_length + 1)  # a row holds context_length + 1
    return EncodedConversation(tokens[:keep].astype(np.uint16), is_target[:keep].astype(np.uint8),
                               int(np.argmax(is_target)), status)


def split_key(messages: list[Message]) -> float:
    """A number in [0, 1) from a hash of the conversation: val when below val_fraction (order-independent)."""
    text = "\x00".join(f"{m.role}\x01{m.content}" for m in messages)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def encode_conversations(job: tuple[list[list[Message]], int]) -> list[tuple[EncodedConversation, float, str]]:
    """Pool worker: (encoded, split_key, category) for a batch of conversations."""
    conversations, context_length = job
    return [(encode_conversation(c, context_length), split_key(c), "chat") for c in conversations]

