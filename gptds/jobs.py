"""What distinguishes one training job from another: the kinds of prepared data it reads, and the bundled
demo data it prepares when no --data_dir is given; and, by the kind of data a run trains on, the prompts it
samples at intervals. Everything else (the loop, the engine, checkpointing, logging) is shared; flag
defaults per job are in config.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptds.data.chat import Message, prompt_tokens
from gptds.data.instruct import InstructRecord, render_prompt
from gptds.data.prepare import PrepareChatConfig, PrepareTextConfig, prepare_chat, prepare_text
from gptds.tokenizer import ASSETS_DIR

BUNDLED_CONVERSATIONS = (ASSETS_DIR / "chat_sample.jsonl", ASSETS_DIR / "dolly_sample.jsonl")


def _prepare_demo_text(out: Path, context_length: int) -> None:
    prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")], output_dir=str(out),
                                   val_fraction=0.1, overwrite=True, num_workers=1))


def _prepare_demo_chat(out: Path, context_length: int) -> None:
    """The bundled multi-turn conversations and the Dolly records as one-turn conversations."""
    prepare_chat(PrepareChatConfig(input=[str(p) for p in BUNDLED_CONVERSATIONS], output_dir=str(out),
                                   context_length=context_length, overwrite=True, num_workers=1))


@dataclass(frozen=True)
class Job:
    name: str
    data_kinds: tuple[str, ...]                 # the manifest kinds it trains on (a mixture may hold any)
    prepare_command: str                        # what makes such data
    prepare_demo: Callable[[Path, int], None]   # (output folder, context_length): the bundled sample


JOBS = {
    "pretrain": Job("pretrain", ("text",), "gptds prepare text", _prepare_demo_text),
    "finetune": Job("finetune", ("instruct", "chat"), "gptds prepare chat` or `gptds prepare dolly",
                    _prepare_demo_chat),
}

PRETRAIN_PROMPTS = ("ROMEO:", "The meaning of life is", "Once upon a time,")
FINETUNE_INSTRUCTIONS = ("What is the capital of France?", "Give me three tips for staying healthy.",
                         "Write a haiku about the sea.")


def sample_prompts(kinds: set[str]) -> list[str | list[int]]:
    """What a run samples every --generate_interval steps: ChatML prompts (token ids) when it trains on
    conversations, the instruction template when on instruction records, text prompts otherwise."""
    if "chat" in kinds:
        return [prompt_tokens([Message("user", q)]) for q in FINETUNE_INSTRUCTIONS]
    if "instruct" in kinds:
        return [render_prompt(InstructRecord(instruction=q, context="", response="")) for q in FINETUNE_INSTRUCTIONS]
    return list(PRETRAIN_PROMPTS)
