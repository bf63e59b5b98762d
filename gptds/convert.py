"""`gptds convert`: ZeRO checkpoints (any stage, any world size) to one consolidated safetensors state
dict, to a Hugging Face GPT-2 folder, and to DeepSpeed's universal format; and HF GPT-2 to gptds weights.
Tensors are read lazily from the rank shards (memory-mapped) and written shard by shard, and every
export is checked against the model config: no empty tensor, the exact parameter count."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from gptds import checkpoint
from gptds.errors import UserError
from gptds.model import GPT, GPTConfig
from gptds.weights import TIED_KEY

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape for this config (meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED_KEY}


def lazy_zero_tensors(step_dir: Path) -> tuple[GPTConfig, dict]:
    """The config and a name -> lazy tensor map of a ZeRO checkpoint (DeepSpeed's reader, mmap'd)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    meta = checkpoint.verify(step_dir)
    config = GPTConfig.from_dict(meta["model_config"])
    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{step_dir}: DeepSpeed cannot read this checkpoint's shards ({e})") from None
    return config, lazy


def checked_tensors(config: GPTConfig, lazy: dict, dtype: torch.dtype = torch.float32,
                    source: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Materialise lazy tensors one at a time, refusing empty, missing, misshapen or surplus tensors
    (ZeRO-3 exports have been silently empty or truncated elsewhere) and checking the total count."""
    want = expected_shapes(config)
    names = [k for k in lazy if k != TIED_KEY]
    missing, extra = set(want) - set(names), set(names) - set(want)
    if missing or extra:
        raise UserError(f"{source}: tensors do not match the model config: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(extra)[:5]}")
    total = 0
    for name in want:
        t = lazy[name]
        t = t.contiguous() if not isinstance(t, torch.Tensor) else t
        if t.numel() == 0 or tuple(t.shape) != want[name]:
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config needs {want[name]} "
                            f"(an empty or truncated export)")
        total += t.numel()
        yield name, t.to(dtype) if t.is_floating_point() else t
    expected_total = sum(torch.Size(s).numel() for s in want.values())
    if total != expected_total:
        raise UserError(f"{source}: exported {total:,} parameters, the config has {expected_total:,}")


def consolidate_checkpoint(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and full fp32 state dict of a training checkpoint (step folder, or checkpoint folder)."""
    step_dir = checkpoint.resolve(path)
    config, lazy = lazy_zero_tensors(step_dir)
    return config, dict(checked_tensors(config, lazy, source=str(step_dir)))


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="ZeRO checkpoints to consolidated / Hugging Face / universal form")
    kinds = convert.add_subparsers(dest="conversion", required=True)
    p = kinds.add_parser("zero-to-fp32", help="one consolidated safetensors state dict (sharded when large)")
    p.add_argument("checkpoint_dir")
    p.add_argument("out")
    p.add_argument("--tag", default=None, help="step folder name (default: the newest complete checkpoint)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda a: zero_to_fp32(a.checkpoint_dir, a.out, a.tag, a.dtype, a.overwrite))


def _step_dir(checkpoint_dir: str, tag: str | None) -> Path:
    if tag is None:
        return checkpoint.resolve(checkpoint_dir)
    step_dir = Path(checkpoint_dir) / tag
    if not step_dir.is_dir():
        tags = [p.name for p in checkpoint.step_dirs(Path(checkpoint_dir))]
        raise UserError(f"{checkpoint_dir}: no checkpoint tag {tag!r} (found: {', '.join(tags) or 'none'})")
    return step_dir


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")


def zero_to_fp32(checkpoint_dir: str, out: str, tag: str | None = None, dtype: str = "fp32",
                 overwrite: bool = False) -> list[Path]:
    from gptds.weights import save_gptds_weights
    step_dir = _step_dir(checkpoint_dir, tag)
    out = Path(out)
    _refuse_existing(out, overwrite)
    config, lazy = lazy_zero_tensors(step_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = save_gptds_weights(config, checked_tensors(config, lazy, DTYPES[dtype], str(step_dir)), out,
                               metadata={"source_checkpoint": str(step_dir)})
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files

