"""`gptds convert`: ZeRO checkpoints (any stage, any world size) to one consolidated safetensors state
dict, to a Hugging Face GPT-2 folder, and to DeepSpeed's universal format (resumable at another world
size or stage); and HF GPT-2 to gptds weights. Rank shards are memory-mapped and tensors streamed to
the output one shard at a time; every export is checked against the model config (no empty tensor,
the exact parameter count), and every output is staged and renamed into place only when complete."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from gptds import checkpoint
from gptds.errors import UserError
from gptds.model import GPT, GPTConfig
from gptds.staging import check_output, staged_dir, staged_file
from gptds.weights import DEFAULT_MAX_SHARD_BYTES, TIED_KEY, load_hf_directory, save_gptds_weights, save_hf_directory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNIVERSAL_REFUSED_OPTIMIZERS = {
    "adamw8bit": "bitsandbytes' 8-bit AdamW keeps block-quantized moments (state1/state2 with absmax per 256 "
                 "elements of each rank's flat partition), which DeepSpeed's universal format (per-parameter "
                 "exp_avg/exp_avg_sq) cannot represent; resume on the same world size and ZeRO stage instead, "
                 "or train with --optimizer adamw where a change of world size is planned",
}


# ---------------------------------------------------------------- reading ZeRO checkpoints

def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape for this config (meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED_KEY}


def step_dir_of(checkpoint_dir: str | Path, tag: str | None) -> Path:
    """The step folder named by --tag, or the newest complete one."""
    if tag is None:
        return checkpoint.resolve(checkpoint_dir)
    step_dir = Path(checkpoint_dir) / tag
    if not step_dir.is_dir():
        tags = [p.name for p in checkpoint.step_dirs(Path(checkpoint_dir))]
        raise UserError(f"{checkpoint_dir}: no checkpoint tag {tag!r} (found: {', '.join(tags) or 'none'})")
    checkpoint.verify(step_dir)
    return step_dir


def lazy_zero_tensors(step_dir: Path) -> tuple[GPTConfig, dict, dict]:
    """Config, meta and a name -> lazy tensor map of a ZeRO checkpoint (DeepSpeed's reader; the rank
    files are memory-mapped and a tensor is assembled only when asked for)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    meta = checkpoint.verify(step_dir)
    if meta.get("kind") == "universal":
        raise UserError(f"{step_dir} is a universal checkpoint: resume from it (--resume --checkpoint_path), or "
                        f"export the ZeRO checkpoint it was converted from ({meta.get('source_checkpoint')})")
    config = GPTConfig.from_dict(meta["model_config"])
    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, AssertionError, pickle.UnpicklingError) as e:
        # damaged shards whose sizes still match meta.json fail inside DeepSpeed's reader or torch.load
        raise UserError(f"{step_dir}: DeepSpeed cannot read this checkpoint's shards "
                        f"({type(e).__name__}: {e})") from None
    return config, meta, lazy


def checked_tensors(config: GPTConfig, lazy: dict, dtype: torch.dtype = torch.float32,
                    source: str = "", progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Materialise tensors one at a time, refusing empty, missing, misshapen or surplus ones (ZeRO-3
    exports have been silently empty or truncated elsewhere) and checking the total parameter count."""
    want = expected_shapes(config)
    names = [k for k in lazy if k != TIED_KEY]
    missing, extra = set(want) - set(names), set(names) - set(want)
    if missing or extra:
        raise UserError(f"{source}: tensors do not match the model config: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(extra)[:5]}")
    total = 0
    for name in tqdm(want, desc="tensors", unit="tensor", disable=not progress):
        t = lazy[name]
        t = t if isinstance(t, torch.Tensor) else t.contiguous()  # DeepSpeed's lazy tensor -> real
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
    config, _, lazy = lazy_zero_tensors(step_dir)
    return config, dict(checked_tensors(config, lazy, source=str(step_dir)))


def _announce(step_dir: Path, config: GPTConfig, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """What is converted, and the memory it needs: one output shard plus the largest tensor being
    assembled; the rank shards are memory-mapped, not loaded."""
    shapes = expected_shapes(config)
    element = torch.tensor([], dtype=dtype).element_size()
    total = sum(torch.Size(s).numel() for s in shapes.values()) * element
    largest_name = max(shapes, key=lambda k: torch.Size(shapes[k]).numel())
    largest = torch.Size(shapes[largest_name]).numel() * 4  # assembled in fp32
    peak = min(total, max_shard_bytes) + largest
    print(f"converting {step_dir}: {total / 2**30:.2f} GiB of weights; estimated peak memory "
          f"{peak / 2**30:.2f} GiB (one output shard of at most {max_shard_bytes / 2**30:.2f} GiB plus the largest "
          f"tensor, {largest_name}, {largest / 2**30:.2f} GiB); rank shards are memory-mapped", flush=True)


# ---------------------------------------------------------------- the conversions

def zero_to_fp32(checkpoint_dir: str, out: str, tag: str | None = None, dtype: str = "fp32",
                 overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """A folder with model.safetensors (or shards plus model.safetensors.index.json) in gptds format."""
    step_dir = step_dir_of(checkpoint_dir, tag)
    check_output(Path(out), overwrite, "OUT")
    config, meta, lazy = lazy_zero_tensors(step_dir)
    _announce(step_dir, config, DTYPES[dtype], max_shard_bytes)
    with staged_dir(Path(out), overwrite, "OUT") as staging:
        files = save_gptds_weights(config, checked_tensors(config, lazy, DTYPES[dtype], str(step_dir), progress=True),
                                   staging, metadata={"source_checkpoint": str(step_dir), "step": str(meta["step"])},
                                   max_shard_bytes=max_shard_bytes)
    files = [Path(out) / f.name for f in files]
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files


def model_card(meta: dict, step_dir: Path) -> str:
    source = meta.get("data_source") or {}
    val = f"{meta['val_loss']:.4f}" if meta.get("val_loss") is not None else "not measured"
    cfg = meta["model_config"]
    return (f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n"
            f"# GPT-2 model trained with gptds\n\n"
            f"- architecture: GPT-2, {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
            f"context {cfg['block_size']} tokens\n"
            f"- job: {meta['job']}, {meta['step']} optimizer steps ({meta['precision']}, ZeRO-{meta['zero_stage']}, "
            f"{meta['world_size']} ranks, optimizer {meta['optimizer']})\n"
            f"- training data: {json.dumps(source) if source else meta.get('data_dir')}\n"
            f"- validation loss at the last evaluation: {val}\n"
            f"- converted from: {step_dir}\n\n"
            f"Tokenizer: GPT-2 BPE (`<|endoftext|>` = 50256).\n")


def zero_to_hf(checkpoint_dir: str, out_dir: str, tag: str | None = None, overwrite: bool = False,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A folder GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load, with a model card."""
    step_dir = step_dir_of(checkpoint_dir, tag)
    check_output(Path(out_dir), overwrite, "OUT_DIR")
    config, meta, lazy = lazy_zero_tensors(step_dir)
    _announce(step_dir, config, torch.float32, max_shard_bytes)
    with staged_dir(Path(out_dir), overwrite, "OUT_DIR") as staging:
        save_hf_directory(config, checked_tensors(config, lazy, source=str(step_dir), progress=True), staging,
                          model_card=model_card(meta, step_dir), max_shard_bytes=max_shard_bytes)
    print(f"wrote Hugging Face GPT-2 folder {out_dir}")
    return Path(out_dir)


def hf_to_gptds(hf_dir: str, out: str, overwrite: bool = False) -> Path:
    """gptds weights (usable as --pretrained_checkpoint): a .safetensors file, or a folder for other names."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    config, sd = load_hf_directory(hf_dir)
    tensors = checked_tensors(config, sd, source=str(hf_dir))
    out = Path(out)
    staged = staged_file(out, overwrite, "OUT") if out.suffix == ".safetensors" else staged_dir(out, overwrite, "OUT")
    with staged as staging:
        save_gptds_weights(config, tensors, staging, metadata={"source_hf_dir": str(hf_dir)})
    print(f"wrote gptds weights {out}")
    return out


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def zero_to_universal(checkpoint_dir: str, out_dir: str, tag: str | None = None, overwrite: bool = False) -> Path:
    """DeepSpeed's universal checkpoint as OUT_DIR/<step folder>, resumable with --resume --checkpoint_path
    OUT_DIR at another world size or ZeRO stage, optimizer state included. The converted fp32 weights are
    compared tensor by tensor (sha256) with the source before the folder is marked complete."""
    step_dir = step_dir_of(checkpoint_dir, tag)
    meta = checkpoint.verify(step_dir)
    if meta["optimizer"] in UNIVERSAL_REFUSED_OPTIMIZERS:
        raise UserError(f"{step_dir} was trained with --optimizer {meta['optimizer']}: "
                        f"{UNIVERSAL_REFUSED_OPTIMIZERS[meta['optimizer']]}")
    check_output(Path(out_dir), overwrite, "OUT_DIR")
    config, meta, lazy = lazy_zero_tensors(step_dir)
    with staged_dir(Path(out_dir), overwrite, "OUT_DIR") as staging:
        target = staging / step_dir.name
        # In a fresh interpreter: ds_to_universal forks worker pools, and forking a process whose torch
        # thread pools are already running deadlocks them. One worker: each holds a whole rank shard (weights
        # and both Adam moments) and its per-parameter copies, so more workers multiply the peak memory.
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(step_dir), "--output_folder", str(target), "--inject_missing_state",
                               "--num_extract_workers", "1", "--num_merge_workers", "1"], text=True,
                              stdout=sys.stderr, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no message"]
            raise UserError(f"DeepSpeed's ds_to_universal failed on {step_dir}: {last[0]}")
        checksums = {}
        for name, source in checked_tensors(config, lazy, source=str(step_dir), progress=True):
            state_dir = target / "zero" / name
            converted = torch.load(state_dir / "fp32.pt", map_location="cpu", weights_only=False)
            converted = converted["param"] if isinstance(converted, dict) else converted
            checksums[name] = tensor_sha256(source)
            if tensor_sha256(converted.view(source.shape)) != checksums[name]:
                raise UserError(f"universal conversion of {step_dir} changed parameter {name}; nothing was written")
            for state in ("exp_avg", "exp_avg_sq"):
                if not (state_dir / f"{state}.pt").is_file():
                    raise UserError(f"universal conversion of {step_dir} lost the optimizer state {state} of {name}")
        _loadable_by_every_stage(target, config, checksums.keys())
        checkpoint.write_meta(target, {**{k: v for k, v in meta.items() if k not in ("format", "files")},
                                       "kind": "universal", "source_checkpoint": str(step_dir),
                                       "param_sha256": checksums})
    print(f"wrote universal checkpoint {Path(out_dir) / step_dir.name}; resume it with "
          f"--resume --checkpoint_path {out_dir} (any world size, any ZeRO stage)")
    return Path(out_dir) / step_dir.name


STAGE12_MODEL_STATES = "mp_rank_00_model_states.pt"
STAGE3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def _loadable_by_every_stage(target: Path, config: GPTConfig, names) -> None:
    """ds_to_universal writes the global files in the layout of the stage it converted from; DeepSpeed's
    universal loaders read them in the layout of the stage they run under. Give the folder both: the
    optimizer_state.pt keys of ZeRO-1/2 and of ZeRO-3, and both model-state file names (ZeRO-1/2 also
    reads full module weights from theirs)."""
    import deepspeed
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS
    optim_path = target / "zero" / "optimizer_state.pt"
    optim = torch.load(optim_path, map_location="cpu", weights_only=False)
    shapes = expected_shapes(config)
    if OPTIMIZER_STATE_DICT in optim:  # from ZeRO-3: flat tensors and one global step; ZeRO-1/2 read shaped
        step = optim[OPTIMIZER_STATE_DICT]["state"][0]["step"]  # {"param", "cat_dim"} and a step per parameter
        for name in names:
            folder = target / "zero" / name
            for state in ("fp32", "exp_avg", "exp_avg_sq"):
                value = torch.load(folder / f"{state}.pt", map_location="cpu", weights_only=False)
                if isinstance(value, torch.Tensor):
                    torch.save({"param": value.view(shapes[name]), "cat_dim": 0}, folder / f"{state}.pt")
            torch.save(step, folder / "step.pt")
    else:  # from ZeRO-1/2: ZeRO-3 reads one global step
        step = torch.load(target / "zero" / "transformer.wte.weight" / "step.pt", weights_only=False)
        optim[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: optim[PARAM_GROUPS]}
    optim.setdefault("ds_version", deepspeed.__version__)
    torch.save(optim, optim_path)
    if not (target / STAGE3_MODEL_STATES).exists():
        os.link(target / STAGE12_MODEL_STATES, target / STAGE3_MODEL_STATES)
    if not (target / STAGE12_MODEL_STATES).exists():
        states = torch.load(target / STAGE3_MODEL_STATES, map_location="cpu", weights_only=False)
        module = {}
        for name in names:
            fp32 = torch.load(target / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False)
            module[name] = (fp32["param"] if isinstance(fp32, dict) else fp32).view(shapes[name])
        module[TIED_KEY] = module["transformer.wte.weight"]
        torch.save({**states, "module": module}, target / STAGE12_MODEL_STATES)
    for extra in target.glob("zero_pp_rank_[1-9]*_model_states.pt"):  # only rank 0's is read (pp_placeholder 0)
        extra.unlink()


# ---------------------------------------------------------------- the command line

def _shard_bytes(mb: int) -> int:
    if mb <= 0:
        raise UserError(f"--max_shard_mb must be positive, got {mb}")
    return mb * 2**20


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="ZeRO checkpoints to consolidated / Hugging Face / universal form")
    kinds = convert.add_subparsers(dest="conversion", required=True)
    tag_help = "step folder name, e.g. step_00001000 (default: the newest complete checkpoint)"
    shard_help = ("largest output file in MB; above it the output is sharded (HF index layout). Peak memory is about "
                  "one shard plus the largest tensor")

    p = kinds.add_parser("zero-to-fp32", help="one consolidated safetensors state dict (sharded when large)")
    p.add_argument("checkpoint_dir")
    p.add_argument("out", help="output folder")
    p.add_argument("--tag", default=None, help=tag_help)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--max_shard_mb", type=int, default=DEFAULT_MAX_SHARD_BYTES // 2**20, help=shard_help)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda a: zero_to_fp32(a.checkpoint_dir, a.out, a.tag, a.dtype, a.overwrite,
                                               _shard_bytes(a.max_shard_mb)))

    p = kinds.add_parser("zero-to-hf", help="a Hugging Face GPT-2 folder with tokenizer and model card")
    p.add_argument("checkpoint_dir")
    p.add_argument("out_dir")
    p.add_argument("--tag", default=None, help=tag_help)
    p.add_argument("--max_shard_mb", type=int, default=DEFAULT_MAX_SHARD_BYTES // 2**20, help=shard_help)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda a: zero_to_hf(a.checkpoint_dir, a.out_dir, a.tag, a.overwrite,
                                             _shard_bytes(a.max_shard_mb)))

    p = kinds.add_parser("hf-to-gptds", help="a Hugging Face GPT-2 folder to gptds weights")
    p.add_argument("hf_dir")
    p.add_argument("out", help="a .safetensors file, or a folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda a: hf_to_gptds(a.hf_dir, a.out, a.overwrite))

    p = kinds.add_parser("zero-to-universal", help="DeepSpeed universal checkpoint: resume at another world size "
                                                   "or ZeRO stage")
    p.add_argument("checkpoint_dir")
    p.add_argument("out_dir")
    p.add_argument("--tag", default=None, help=tag_help)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=lambda a: zero_to_universal(a.checkpoint_dir, a.out_dir, a.tag, a.overwrite))

