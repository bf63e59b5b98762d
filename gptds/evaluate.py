"""Evaluation: validation loss over a prepared split, and HellaSwag accuracy by completion scoring
(context = the item's `ctx`, candidates = " " + ending; `acc` takes the ending with the highest total
log-probability of its tokens, `acc_norm` the highest mean log-probability per token). Items are split
across ranks; every rank runs the same number of forwards, as ZeRO-3 needs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gptds import dist
from gptds.config import check_flags, flag, require
from gptds.data.loaders import build_loader
from gptds.errors import UserError, parse_json
from gptds.tokenizer import ASSETS_DIR, EOT_ID, encode, is_blank
from gptds.weights import load_model

BUNDLED_HELLASWAG = ASSETS_DIR / "hellaswag_sample.jsonl"
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # idx (B, T) -> logits (B, T, V)


@torch.no_grad()
def validation_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loader, num_batches: int,
                    device: torch.device) -> float:
    """Mean loss over num_batches batches per rank, from the split's start, averaged over ranks."""
    loader.reset()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for _ in range(num_batches):
        x, y = loader.next_batch()
        total += loss_fn(x.to(device), y.to(device)).double()
    total = dist.all_reduce_sum(total)
    return total.item() / (num_batches * dist.info().world_size)


def load_hellaswag(path: str | Path | None, limit: int = 0) -> list[dict]:
    """Items {ctx, endings[4], label}; errors name the file, line and field."""
    path = Path(path) if path else BUNDLED_HELLASWAG
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read HellaSwag file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {e.start}: not valid UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = parse_json(line, f"{path}:{lineno}")
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        items.append(check_hellaswag_item(item, f"{path}:{lineno}"))
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError(f"{path}: no HellaSwag items")
    return items


def check_hellaswag_item(item, where: str) -> dict:
    """An item with a non-blank ctx, 4 non-blank string endings and an integer label 0..3; anything else is
    refused: a blank ending is scored on the lone space token and can win, so it would count as correct."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings, label; got a JSON {type(item).__name__}")
    for field, kind in (("ctx", str), ("endings", list), ("label", int)):
        value = item.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: field {field!r} missing or not a {kind.__name__}")
    endings, label = item["endings"], item["label"]
    if len(endings) != 4 or not all(isinstance(e, str) for e in endings) or not 0 <= label < 4:
        raise UserError(f"{where}: expected 4 string endings and a label in 0..3")
    blank = [i for i, e in enumerate(endings) if is_blank(e)]
    if blank or is_blank(item["ctx"]):
        what = f"ending {blank[0]}" if blank else "ctx"
        raise UserError(f"{where}: {what} is empty or blank; every item needs a context and 4 non-empty endings")
    return item


def hellaswag_rows(item: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (4, L) padded with EOT, and ending_mask (4, L): 1 where the token belongs to the ending."""
    ctx = encode(item["ctx"])
    rows, masks = [], []
    for ending in item["endings"]:
        end = encode(" " + ending)
        row = (ctx + end)[-block_size:]  # long items lose the start of their context
        rows.append(row)
        masks.append([0] * (len(row) - len(end)) + [1] * len(end))
    width = max(map(len, rows))
    tokens = torch.full((4, width), EOT_ID, dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask


@torch.no_grad()
def hellaswag_scores(logits_fn: LogitsFn, items: list[dict], block_size: int, device: torch.device) -> dict:
    """acc and acc_norm over items, split across ranks (each rank scores items[rank::world_size])."""
    info = dist.info()
    per_rank = math.ceil(len(items) / info.world_size)
    mine = items[info.rank::info.world_size]
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # n, correct, correct_norm
    for i in range(per_rank):
        real = i < len(mine)
        item = mine[i] if real else items[0]  # a filler forward keeps ZeRO-3 ranks in step
        tokens, mask = hellaswag_rows(item, block_size)
        tokens, mask = tokens.to(device), mask.to(device)
        logprobs = F.log_softmax(logits_fn(tokens[:, :-1]).float(), dim=-1)  # (4, L-1, V)
        token_logprobs = logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (4, L-1)
        target_mask = mask[:, 1:].to(token_logprobs.dtype)
        total = (token_logprobs * target_mask).sum(dim=1)
        mean = total / target_mask.sum(dim=1)
        if real:
            counts += torch.tensor([1.0, float(total.argmax() == item["label"]), float(mean.argmax() == item["label"])],
                                   device=device, dtype=torch.float64)
    n, correct, correct_norm = dist.all_reduce_sum(counts).tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n, "n": int(n)}


@dataclass
class EvaluateConfig:
    """`gptds evaluate`'s settings (the names of the training flags that do the same)."""
    checkpoint: str = flag(None, "anything `gptds generate` accepts", required=True)
    hellaswag_file: str | None = flag(None, "HellaSwag JSONL (ctx, endings, label); omitted: the bundled sample")
    hellaswag_limit: int = flag(0, "score at most this many HellaSwag items (0: all)")
    data_dir: str | None = flag(None, "prepared dataset: also report the validation loss of its val split")
    batch_size: int = flag(8, "sequences per validation batch", short="-B")
    context_length: int | None = flag(None, "tokens per validation sequence (omitted: the model's block_size)",
                                      short="-T")
    eval_batches: int = flag(20, "validation batches")

    def __post_init__(self):
        check_flags(self, "evaluate")
        require(self.hellaswag_limit >= 0, "evaluate", "hellaswag_limit", self.hellaswag_limit, "0 (all) or more")
        for name in ("batch_size", "eval_batches"):
            require(getattr(self, name) > 0, "evaluate", name, getattr(self, name), "a positive integer")
        require(self.context_length is None or self.context_length > 0, "evaluate", "context_length",
                self.context_length, "a positive integer, or omitted for the model's block_size")


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """`gptds evaluate`: HellaSwag (and validation loss with data_dir) of any model path, one process."""
    info = dist.init_distributed()
    items = load_hellaswag(cfg.hellaswag_file, cfg.hellaswag_limit)  # a bad file is refused before the model loads
    model = load_model(cfg.checkpoint).to(info.device).eval()
    block = model.config.block_size
    result = hellaswag_scores(lambda x: model(x)[0], items, block, info.device)
    result["val_loss"] = None
    if cfg.data_dir:
        T = cfg.context_length or block
        if T > block:
            raise UserError(f"--context_length {T} exceeds the model's block_size {block}")
        loader = build_loader(cfg.data_dir, "val", cfg.batch_size, T, info.rank, info.world_size, seed=0,
                              shuffle=False)
        result["val_loss"] = validation_loss(lambda x, y: model(x, y)[1], loader, cfg.eval_batches, info.device)
    return result
