"""`gptds chat`: talk to a chat model (one fine-tuned on conversations: its vocabulary holds the ChatML
tokens). Interactive in a terminal (the conversation is kept, replies stream as they are generated,
/reset, /system TEXT and /quit), or scripted with --message (the reply alone on stdout).

The KV cache is kept across turns: each turn feeds only the tokens the cache does not already hold
(where the rendered conversation and the cache agree). When a conversation outgrows the model's context,
its oldest turns after the system turn are dropped and the rest is encoded afresh."""
# ruff: noqa: RUF009  (gptds.config.flag returns a dataclasses.field)

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptds.config import flag, require
from gptds.data.chat import Message, chat_format_of, prompt_tokens
from gptds.errors import UserError
from gptds.model import GPT, KVCache, next_token_of
from gptds.tokenizer import EOT_ID, IM_END_ID, decode
from gptds.weights import load_model

COMMANDS = "/reset (new conversation), /system TEXT (set the system turn and start over), /quit"


@dataclass
class ChatConfig:
    """`gptds chat`'s settings."""
    checkpoint: str = flag(None, "a chat model: training checkpoint, gptds weights or Hugging Face folder",
                           required=True)
    message: str | None = flag(None, "say this, print the reply alone on stdout and exit (omitted: interactive)")
    system: str | None = flag(None, "the system turn that opens the conversation")
    max_new_tokens: int = flag(256, "tokens per reply at most (fewer if the turn ends first)")
    temperature: float = flag(0.7, "sampling temperature (0: greedy)")
    top_k: int | None = flag(50, "sample from the k most likely tokens only")
    repetition_penalty: float = flag(1.0, "> 1: tokens already in the conversation are less likely (as transformers: "
                                          "positive logits divided by it, negative ones multiplied)")
    min_new_tokens: int = flag(0, "no end of turn before this many tokens")
    seed: int = flag(1337, "sampling seed")

    def __post_init__(self):
        require(self.max_new_tokens > 0, "chat", "max_new_tokens", self.max_new_tokens, "a positive integer")
        require(self.temperature >= 0, "chat", "temperature", self.temperature, "0 (greedy) or more")
        require(self.top_k is None or self.top_k > 0, "chat", "top_k", self.top_k, "a positive integer")
        require(self.repetition_penalty > 0, "chat", "repetition_penalty", self.repetition_penalty,
                "a positive number (1: none)")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "chat", "min_new_tokens", self.min_new_tokens,
                f"0 to --max_new_tokens ({self.max_new_tokens})")
        require(self.message is None or bool(self.message.strip()), "chat", "message", self.message,
                "some text to say")


class Conversation:
    """A conversation with a chat model, its KV cache kept across turns."""

    def __init__(self, model: GPT, cfg: ChatConfig, device: torch.device):
        self.model, self.cfg, self.device = model, cfg, device
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.cache = KVCache(model.config, 1, device, next(model.parameters()).dtype)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.reset(cfg.system)

    def reset(self, system: str | None = None) -> None:
        self.messages = [Message("system", system)] if system and system.strip() else []
        self.cached, self.cache.pos = [], 0

    def _prompt(self) -> list[int]:
        """The conversation's prompt, its oldest turns dropped while it does not leave room for a reply."""
        room = self.model.config.block_size - min(self.cfg.max_new_tokens, self.model.config.block_size // 2)
        ids = prompt_tokens(self.messages)
        while len(ids) > room and len(self.messages) > 1 + (self.messages[0].role == "system"):
            del self.messages[1 if self.messages[0].role == "system" else 0]
            ids = prompt_tokens(self.messages)
        if len(ids) > room:
            raise UserError(f"the message is too long for the model's context ({len(ids)} tokens of "
                            f"{self.model.config.block_size}, leaving room for {self.cfg.max_new_tokens} new ones)")
        return ids

    @torch.no_grad()
    def _logits_after(self, ids: list[int]) -> torch.Tensor:
        """Feed what the cache lacks of ids (the rest agrees with it) and return the last logits (V,)."""
        if len(ids) > len(self.cached) and ids[:len(self.cached)] == self.cached:
            common = len(self.cached)  # the usual case: the cache holds all but the newest tokens
        else:
            common = 0
            while common < min(len(ids), len(self.cached)) - 1 and ids[common] == self.cached[common]:
                common += 1
        self.cache.pos = common
        new = torch.tensor([ids[common:]], dtype=torch.long, device=self.device)
        logits, _ = self.model(new, kv_cache=self.cache)
        self.cached = list(ids)
        return logits[0, -1].float()

    def _pick(self, logits: torch.Tensor, seen: list[int], produced: int) -> int:
        if self.cfg.repetition_penalty != 1.0 and seen:
            ids = torch.tensor(sorted(set(seen)), device=logits.device)
            old = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(old > 0, old / self.cfg.repetition_penalty, old * self.cfg.repetition_penalty)
        if produced < self.cfg.min_new_tokens:
            logits = logits.clone()
            logits[[IM_END_ID, EOT_ID]] = float("-inf")
        return int(next_token_of(logits[None], self.cfg.temperature, self.cfg.top_k, self.generator))

    def reply(self, text: str, on_text: Callable[[str], None] = lambda piece: None) -> str:
        """The assistant's answer to `text`, streamed to on_text piece by piece as it is generated."""
        self.messages.append(Message("user", text))
        ids = self._prompt()
        logits = self._logits_after(ids)
        answer: list[int] = []
        shown = ""
        limit = min(self.cfg.max_new_tokens, self.model.config.block_size - len(ids))
        for _ in range(limit):
            token = self._pick(logits, ids + answer, len(answer))
            if token in (IM_END_ID, EOT_ID):
                break
            answer.append(token)
            text_so_far = decode(answer)
            if not text_so_far.endswith("\ufffd"):  # hold back a character whose bytes are not all out yet
                on_text(text_so_far[len(shown):])
                shown = text_so_far
            logits = self._logits_after(self.cached + [token])
        content = decode(answer)
        on_text(content[len(shown):])
        self.messages.append(Message("assistant", content))
        return content


def load_chat_model(path: str) -> tuple[GPT, torch.device]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(path).to(device).eval()
    if chat_format_of(model.config) is None:
        raise UserError(f"{path}: not a chat model (its vocabulary has no ChatML tokens); fine-tune it on "
                        f"conversations first: `gptds prepare chat ...`, then `gptds finetune --data_dir ...`")
    return model, device


def chat(cfg: ChatConfig) -> None:
    model, device = load_chat_model(cfg.checkpoint)
    conversation = Conversation(model, cfg, device)
    if cfg.message is not None:
        print(conversation.reply(cfg.message), flush=True)
        return
    print(f"gptds chat with {cfg.checkpoint} ({COMMANDS})", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        command, _, argument = line.strip().partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            conversation.reset(conversation.messages[0].content if conversation.messages and
                               conversation.messages[0].role == "system" else None)
            print("(new conversation)", flush=True)
        elif command == "/system":
            conversation.reset(argument)
            print("(system turn set; new conversation)", flush=True)
        elif command.startswith("/"):
            print(f"unknown command {command}: {COMMANDS}", flush=True)
        elif line.strip():
            print("assistant> ", end="", flush=True)
            conversation.reply(line, on_text=lambda piece: print(piece, end="", flush=True))
            print(flush=True)
        if sys.stdin.closed:
            return
