"""Sampling text: from a model in memory (the training loop's samples) or from any model path
(`gptds generate`). Sampling is seeded, so every rank draws the same tokens and ZeRO-3 ranks stay in step."""

from __future__ import annotations

import torch

from gptds.tokenizer import EOT_ID, decode, encode

# The fixed prompts sampled during training: text prompts for pretraining, templated instructions for
# fine-tuning (the same template as gptds.data.instruct renders).
PRETRAIN_PROMPTS = ("ROMEO:", "The meaning of life is", "Once upon a time,")
FINETUNE_INSTRUCTIONS = ("What is the capital of France?", "Give me three tips for staying healthy.",
                         "Write a haiku about the sea.")


def sample(model: torch.nn.Module, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 1337, device: torch.device | str = "cpu") -> list[str]:
    """The continuation of each prompt (without the prompt), ending before <|endoftext|>."""
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            ids = encode(prompt) or [EOT_ID]
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            tokens = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                                    stop_token=EOT_ID)[0, len(ids):].tolist()
            if EOT_ID in tokens:
                tokens = tokens[:tokens.index(EOT_ID)]
            out.append(decode(tokens))
    finally:
        model.train(was_training)
    return out


def generate_from_checkpoint(path: str, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                             top_k: int | None = None, seed: int = 1337) -> list[str]:
    from gptds.weights import load_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path).to(device)
    return sample(model, prompts, max_new_tokens, temperature, top_k, seed, device)
