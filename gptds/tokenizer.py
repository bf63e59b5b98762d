"""The GPT-2 tokenizer: tiktoken's "gpt2" encoding, loaded offline from the BPE file shipped in
gptds/assets (tiktoken.get_encoding("gpt2") would download it), with the two ChatML tokens of chat models
registered after GPT-2's 50,257; plus conversion into the vocab.json/merges.txt pair (and, for chat
models, the added tokens and chat template) that Hugging Face's tokenizers read.

The contract for special tokens: gptds encodes text typed by a user as ordinary text, "<|endoftext|>" and
"<|im_start|>" included (a user cannot forge an end of text, or a chat turn); gptds itself inserts the
special tokens by id (the chat renderer, gptds/data/chat.py). The Hugging Face export keeps transformers'
default instead: a registered special-token string in the text becomes that special token (what
apply_chat_template relies on). Text without special-token strings encodes to the same ids both ways."""

from __future__ import annotations

import codecs
import functools
import json
import re
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ASSETS_DIR = Path(__file__).parent / "assets"
BPE_FILE = ASSETS_DIR / "gpt2.tiktoken"
# GPT-2's pre-tokenisation regex, as tiktoken's own openai_public.gpt2() defines it.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# ChatML (chosen over nanochat's per-role tokens: two tokens serve every role, and it is the format
# transformers' chat templates, Axolotl and MiniMind already speak).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IM_START_ID, IM_END_ID = 50257, 50258
CHAT_VOCAB_SIZE = 50259
SPECIAL_TOKENS = {EOT_TOKEN: EOT_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding; identical token ids to tiktoken.get_encoding("gpt2")."""
    ranks = load_tiktoken_bpe(str(BPE_FILE))
    enc = tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens={EOT_TOKEN: EOT_ID})
    assert enc.n_vocab == VOCAB_SIZE, enc.n_vocab
    return enc


@functools.cache
def _chat_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding with the ChatML tokens registered (to decode chat models' output)."""
    base = get_tokenizer()
    return tiktoken.Encoding(name="gpt2-chatml", pat_str=PAT_STR, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=SPECIAL_TOKENS)


def encode(text: str) -> list[int]:
    """Token ids of plain text; "<|endoftext|>" inside the text is treated as ordinary characters."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    """Text of token ids; the special tokens as their strings."""
    return _chat_encoding().decode(list(ids))


class StreamDecoder:
    """Text of a token stream as it grows: a GPT-2 token may hold part of a UTF-8 character, so the bytes
    of a character split across tokens are held back until the character is complete."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._utf8.decode(get_tokenizer().decode_single_token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# Characters that show nothing: whitespace, C0/C1 controls (NUL included), zero-width and BOM characters.
_BLANK = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]*")


def is_blank(text: str) -> bool:
    """True for text with no visible character (empty, whitespace, NULs, control characters only): as a
    document or a record field it would train on padding-like tokens, or score an empty answer."""
    return _BLANK.fullmatch(text) is not None


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of vocab.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that produced `token`: run BPE on its bytes using only lower-ranked merges."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        assert best is not None, token
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_hf_tokenizer_files(out_dir: Path, model_max_length: int, chat_template: str | None = None) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json so that
    transformers.AutoTokenizer.from_pretrained(out_dir) loads a GPT2Tokenizer that encodes like gptds
    (apart from special-token strings in the text: see the module docstring). model_max_length is the
    model's context (block_size): what transformers truncates to. With a chat_template (a chat model), the
    ChatML tokens are registered as special tokens and apply_chat_template gives the ids gptds renders."""
    ranks = load_tiktoken_bpe(str(BPE_FILE))
    b2u = _bytes_to_unicode()
    as_unicode = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = {as_unicode(tok): rank for tok, rank in ranks.items()}
    vocab[EOT_TOKEN] = EOT_ID
    merges = []
    for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _split_by_lower_ranks(tok, ranks)
            merges.append(f"{as_unicode(left)} {as_unicode(right)}")
    out_dir = Path(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = SPECIAL_TOKENS if chat_template else {EOT_TOKEN: EOT_ID}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                                       for t, i in specials.items()}}
    special_map = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    if chat_template:
        config.update(chat_template=chat_template, additional_special_tokens=[IM_START, IM_END])
        special_map["additional_special_tokens"] = [IM_START, IM_END]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
