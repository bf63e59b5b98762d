"""What distinguishes one training job from another: the kind of prepared data it reads, the prompts it
samples at intervals, and the bundled demo data it prepares when no --data_dir is given. Everything else
(the loop, the engine, checkpointing, logging) is shared; flag defaults per job are in config.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptds.data.instruct import InstructRecord, render_prompt
from gptds.data.prepare import PrepareDollyConfig, PrepareTextConfig, prepare_dolly, prepare_text
from gptds.tokenizer import ASSETS_DIR


def _prepare_demo_text(out: Path, context_length: int) -> None:
    prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")], output_dir=str(out),
                                   val_fraction=0.1, overwrite=True, num_workers=1))


def _prepare_demo_dolly(out: Path, context_length: int) -> None:
    prepare_dolly(PrepareDollyConfig(input=[str(ASSETS_DIR / "dolly_sample.jsonl")], output_dir=str(out),
                                     context_length=context_length, overwrite=True, num_workers=1))


def _instruction_prompt(question: str) -> str:
    return render_prompt(InstructRecord(instruction=question, context="", response=""))


@dataclass(frozen=True)
class Job:
    name: str
    data_kind: str                              # the manifest "kind" it trains on
    prepare_command: str                        # what makes such data
    prepare_demo: Callable[[Path, int], None]   # (output folder, context_length): the bundled sample
    sample_prompts: Callable[[], list[str]]     # sampled every --generate_interval steps


PRETRAIN_PROMPTS = ("ROMEO:", "The meaning of life is", "Once upon a time,")
FINETUNE_INSTRUCTIONS = ("What is the capital of France?", "Give me three tips for staying healthy.",
                         "Write a haiku about the sea.")

JOBS = {
    "pretrain": Job("pretrain", "text", "gptds prepare text", _prepare_demo_text, lambda: list(PRETRAIN_PROMPTS)),
    "finetune": Job("finetune", "instruct", "gptds prepare dolly", _prepare_demo_dolly,
                    lambda: [_instruction_prompt(q) for q in FINETUNE_INSTRUCTIONS]),
}
