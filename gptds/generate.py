"""Sampling text: from a model in memory (the training loop's samples) or from any model path
(`gptds generate`). Sampling is seeded, so every rank draws the same tokens and ZeRO-3 ranks stay in step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import torch

from gptds.config import SEEDS, check_flags, flag, require
from gptds.tokenizer import EOT_ID, StreamDecoder, decode, encode
from gptds.weights import load_model


def sample(model: torch.nn.Module, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 1337, device: torch.device | str = "cpu",
           stream: Callable[[str], None] | None = None) -> list[str]:
    """The continuation of each prompt (without the prompt), ending before <|endoftext|>. With `stream`,
    the text is also handed to stream(piece) as it is generated (whole characters, a token or a few at a time)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            ids = encode(prompt) or [EOT_ID]
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            on_token = _streaming(stream) if stream else None
            tokens = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                                    stop_token=EOT_ID, on_token=on_token)[0, len(ids):].tolist()
            if on_token:
                on_token(None)
            if EOT_ID in tokens:
                tokens = tokens[:tokens.index(EOT_ID)]
            out.append(decode(tokens))
    finally:
        model.train(was_training)
    return out


def _streaming(stream: Callable[[str], None]) -> Callable:
    """on_token for GPT.generate: each new token's text to stream(), up to <|endoftext|>; None flushes."""
    decoder, ended = StreamDecoder(), [False]

    def on_token(token: torch.Tensor | None) -> None:
        if ended[0]:
            return
        if token is None or int(token[0, 0]) == EOT_ID:
            ended[0] = True
            text = decoder.flush()
        else:
            text = decoder.add(int(token[0, 0]))
        if text:
            stream(text)
    return on_token


@dataclass
class GenerateConfig:
    """`gptds generate`'s settings."""
    checkpoint: str = flag(None, "gptds weights, training checkpoint or Hugging Face GPT-2 folder", required=True)
    prompt: str = flag(None, "the text to continue (may be empty: sampling starts from <|endoftext|>)",
                       required=True, blank_ok=True)
    max_new_tokens: int = flag(64, "tokens to generate at most (fewer if <|endoftext|> comes first)")
    temperature: float = flag(1.0, "sampling temperature (0: greedy)")
    top_k: int | None = flag(None, "sample from the k most likely tokens only (omitted: all)")
    seed: int = flag(1337, "sampling seed", limits=SEEDS)

    def __post_init__(self):
        check_flags(self, "generate")
        require(self.max_new_tokens > 0, "generate", "max_new_tokens", self.max_new_tokens, "a positive integer")
        require(self.temperature >= 0, "generate", "temperature", self.temperature, "0 (greedy) or more")
        require(self.top_k is None or self.top_k > 0, "generate", "top_k", self.top_k,
                "a positive integer, or omitted for all tokens")


def generate_from_checkpoint(cfg: GenerateConfig, out: TextIO | None = None) -> str:
    """The continuation of cfg.prompt by the model at cfg.checkpoint; with `out`, the prompt and then the
    continuation are written to it as they are generated (flushed piece by piece)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(cfg.checkpoint).to(device)
    stream = None
    if out is not None:
        def stream(text: str) -> None:
            out.write(text)
            out.flush()
        stream(cfg.prompt)
    return sample(model, [cfg.prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed, device, stream)[0]
