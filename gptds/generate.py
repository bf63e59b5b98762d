"""Sampling text: from a model in memory (the training loop's samples) or from any model path
(`gptds generate`). Sampling is seeded, so every rank draws the same tokens and ZeRO-3 ranks stay in step.
generate_batch continues many prompts at once (left-padded rows, one KV cache) with ranks holding
different prompts kept in step, for evaluation (GSM8K) and reinforcement learning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import torch

from gptds import dist
from gptds.config import SEEDS, check_flags, flag, require
from gptds.model import KVCache, next_token_of
from gptds.tokenizer import EOT_ID, IM_END_ID, StreamDecoder, decode, encode
from gptds.weights import load_model

STOP_TOKENS = (EOT_ID, IM_END_ID)  # the end of a text, the end of a chat model's turn


def sample(model: torch.nn.Module, prompts: list[str | list[int]], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 1337, device: torch.device | str = "cpu",
           repetition_penalty: float = 1.0, min_new_tokens: int = 0,
           stream: Callable[[str], None] | None = None) -> list[str]:
    """The continuation of each prompt, text or token ids (a chat prompt), without the prompt, ending before
    <|endoftext|> or, from a chat model, <|im_end|>. With `stream`, the text is also handed to stream(piece)
    as it is generated (whole characters, a token or a few at a time)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            ids = (encode(prompt) if isinstance(prompt, str) else list(prompt)) or [EOT_ID]
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            on_token = _streaming(stream) if stream else None
            tokens = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                                    stop_token=STOP_TOKENS, repetition_penalty=repetition_penalty,
                                    min_new_tokens=min_new_tokens, on_token=on_token)[0, len(ids):].tolist()
            if on_token:
                on_token(None)
            ends = [tokens.index(t) for t in STOP_TOKENS if t in tokens]
            tokens = tokens[:min(ends)] if ends else tokens
            out.append(decode(tokens))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, generator: torch.Generator | None = None,
                   stop_tokens: tuple[int, ...] = (EOT_ID,), stop_strings: tuple[str, ...] = (),
                   device: torch.device | str = "cpu", keep_stop_token: bool = False) -> list[list[int]]:
    """The continuation tokens of each prompt (token ids), up to max_new_tokens, ending before a stop token
    (or with it, keep_stop_token: what reinforcement learning trains on) or once the decoded continuation
    contains a stop string. The prompts are left-padded into one batch:
    each row's positions start at 0 at its first real token and no token attends to padding.

    Ranks may hold different prompts (or none: a one-token dummy row) and answers of different lengths,
    yet they run the same number of forwards, as ZeRO-3 needs: after each token one all-reduce asks whether
    any rank still has a row running, and a rank whose rows are done keeps stepping them until none has."""
    rows = prompts or [[EOT_ID]]
    B, P = len(rows), max(len(p) for p in rows)
    config = model.config
    if P + max_new_tokens > config.block_size:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new exceeds block_size {config.block_size}")
    pad = torch.tensor([P - len(p) for p in rows], device=device)  # (B,)
    idx = torch.tensor([[EOT_ID] * (P - len(p)) + p for p in rows], dtype=torch.long, device=device)  # (B, P)
    steps = torch.arange(P + max_new_tokens, device=device)
    visible = steps[None, :] >= pad[:, None]  # (B, P + max_new): keys that are not padding
    causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()
    mask = (causal[None] & visible[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)[None]  # padding
    # sees itself, so no attention row is empty
    last = torch.zeros((B, P), dtype=torch.bool, device=device)
    last[:, -1] = True
    cache = KVCache(config, B, device, next(model.parameters()).dtype, length=P + max_new_tokens)
    logits, _ = model(idx, kv_cache=cache, positions=(steps[None, :P] - pad[:, None]).clamp(min=0), attn_mask=mask,
                      logits_at=last)  # (B, V)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [not prompts] * B
    for step in range(max_new_tokens):
        tokens = next_token_of(logits, temperature, top_k, generator)  # (B, 1)
        for b, token in enumerate(tokens[:, 0].tolist()):
            if done[b]:
                continue
            if token in stop_tokens:
                done[b] = True
                if keep_stop_token:
                    out[b].append(token)
                continue
            out[b].append(token)
            done[b] = any(s in decode(out[b]) for s in stop_strings)
        running = torch.tensor(float(not all(done)), device=device)
        if step == max_new_tokens - 1 or dist.all_reduce_sum(running).item() == 0:
            break
        logits, _ = model(tokens, kv_cache=cache, positions=(P + step - pad)[:, None],
                          attn_mask=visible[:, None, :P + step + 1])
        logits = logits[:, -1]
    return out if prompts else []


def _streaming(stream: Callable[[str], None]) -> Callable:
    """on_token for GPT.generate: each new token's text to stream(), up to a stop token; None flushes."""
    decoder, ended = StreamDecoder(), [False]

    def on_token(token: torch.Tensor | None) -> None:
        if ended[0]:
            return
        if token is None or int(token[0, 0]) in STOP_TOKENS:
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
    repetition_penalty: float = flag(1.0, "above 1: tokens already in the prompt or the text so far become less "
                                          "likely (as in transformers; 1: off)")
    min_new_tokens: int = flag(0, "no <|endoftext|> before this many tokens")
    seed: int = flag(1337, "sampling seed", limits=SEEDS)
    echo_prompt: bool = flag(True, "print the prompt before its continuation")

    def __post_init__(self):
        check_flags(self, "generate")
        require(self.max_new_tokens > 0, "generate", "max_new_tokens", self.max_new_tokens, "a positive integer")
        require(self.temperature >= 0, "generate", "temperature", self.temperature, "0 (greedy) or more")
        require(self.top_k is None or self.top_k > 0, "generate", "top_k", self.top_k,
                "a positive integer, or omitted for all tokens")
        require(self.repetition_penalty > 0, "generate", "repetition_penalty", self.repetition_penalty,
                "a positive number (1: off)")
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "generate", "min_new_tokens", self.min_new_tokens,
                f"between 0 and --max_new_tokens ({self.max_new_tokens})")


def generate_from_checkpoint(cfg: GenerateConfig, out: TextIO | None = None) -> str:
    """The continuation of cfg.prompt by the model at cfg.checkpoint; with `out`, the prompt (unless not
    echo_prompt) and then the continuation are written to it as they are generated (flushed piece by piece)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(cfg.checkpoint).to(device)
    stream = None
    if out is not None:
        def stream(text: str) -> None:
            out.write(text)
            out.flush()
        if cfg.echo_prompt:
            stream(cfg.prompt)
    return sample(model, [cfg.prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed, device,
                  cfg.repetition_penalty, cfg.min_new_tokens, stream)[0]
