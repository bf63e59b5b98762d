"""`gptds convert`: ZeRO checkpoints (any stage, any world size) to one consolidated safetensors state
dict, to a Hugging Face GPT-2 folder, and to DeepSpeed's universal format (resumable at another world
size or stage); and HF GPT-2 to gptds weights. This module chooses what to write where; reading weights
from any source is weights.py's (ZeRO shards memory-mapped, tensors streamed and checked one at a time),
and every output is staged and renamed into place only when complete. Each conversion's settings are a
typed dataclass, its flags generated like every other command's."""
# ruff: noqa: RUF009  (gptds.config.flag returns a dataclasses.field)

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from gptds import checkpoint, engine, lora
from gptds.config import check_flags, flag, require
from gptds.errors import UserError
from gptds.model import GPTConfig
from gptds.staging import check_no_overlap, check_output, staged_dir, staged_file
from gptds.weights import (
    DEFAULT_MAX_SHARD_BYTES,
    TIED_KEY,
    checked_tensors,
    expected_shapes,
    load_hf_directory,
    save_gptds_weights,
    save_hf_directory,
    zero_checkpoint_tensors,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNIVERSAL_REFUSED_OPTIMIZERS = {
    "adamw8bit": "bitsandbytes' 8-bit AdamW keeps block-quantized moments (state1/state2 with absmax per 256 "
                 "elements of each rank's flat partition), which DeepSpeed's universal format (per-parameter "
                 "exp_avg/exp_avg_sq) cannot represent; resume on the same world size and ZeRO stage instead, "
                 "or train with --optimizer adamw where a change of world size is planned",
}
TAG_HELP = "step folder name, e.g. step_00001000 (default: the newest complete checkpoint)"
SHARD_HELP = ("largest output file in MB; above it the output is sharded (HF index layout). Peak memory is about "
              "one shard plus the largest tensor")


# ---------------------------------------------------------------- settings

@dataclass
class ZeroToFp32Config:
    checkpoint_dir: str = flag(None, "a training checkpoint folder (or one step folder)", positional=True)
    out: str = flag(None, "output folder", positional=True)
    tag: str | None = flag(None, TAG_HELP)
    dtype: str = flag("fp32", "precision of the written weights", choices=tuple(DTYPES))
    max_shard_mb: float = flag(DEFAULT_MAX_SHARD_BYTES // 2**20, SHARD_HELP)
    overwrite: bool = flag(False, "replace a non-empty OUT")

    def __post_init__(self):
        check_flags(self, "convert")
        require(self.max_shard_mb > 0, "convert", "max_shard_mb", self.max_shard_mb, "a positive number of MB")


@dataclass
class ZeroToHfConfig:
    checkpoint_dir: str = flag(None, "a training checkpoint folder (or one step folder)", positional=True)
    out_dir: str = flag(None, "output folder", positional=True)
    tag: str | None = flag(None, TAG_HELP)
    max_shard_mb: float = flag(DEFAULT_MAX_SHARD_BYTES // 2**20, SHARD_HELP)
    overwrite: bool = flag(False, "replace a non-empty OUT_DIR")
    lora_export: str = flag("merged", "a LoRA checkpoint as a plain GPT-2 folder with the adapters merged in, or as "
                                      "a PEFT adapter folder (`adapters`) for the Hugging Face export of its base",
                            choices=("merged", "adapters"))

    def __post_init__(self):
        check_flags(self, "convert")
        require(self.max_shard_mb > 0, "convert", "max_shard_mb", self.max_shard_mb, "a positive number of MB")


@dataclass
class HfToGptdsConfig:
    hf_dir: str = flag(None, "a Hugging Face GPT-2 folder", positional=True)
    out: str = flag(None, "a .safetensors file, or a folder", positional=True)
    overwrite: bool = flag(False, "replace an existing OUT")

    def __post_init__(self):
        check_flags(self, "convert")


@dataclass
class ZeroToUniversalConfig:
    checkpoint_dir: str = flag(None, "a training checkpoint folder (or one step folder)", positional=True)
    out_dir: str = flag(None, "output folder", positional=True)
    tag: str | None = flag(None, TAG_HELP)
    overwrite: bool = flag(False, "replace a non-empty OUT_DIR")

    def __post_init__(self):
        check_flags(self, "convert")


# ---------------------------------------------------------------- shared steps

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

def zero_to_fp32(cfg: ZeroToFp32Config) -> list[Path]:
    """A folder with model.safetensors (or shards plus model.safetensors.index.json) in gptds format."""
    out, max_shard_bytes = Path(cfg.out), int(cfg.max_shard_mb * 2**20)
    inputs = [("CHECKPOINT_DIR", cfg.checkpoint_dir)]
    step_dir = step_dir_of(cfg.checkpoint_dir, cfg.tag)
    check_no_overlap([("OUT", out)], inputs)
    check_output(out, cfg.overwrite, "OUT")
    config, meta, lazy = zero_checkpoint_tensors(step_dir)
    _announce(step_dir, config, DTYPES[cfg.dtype], max_shard_bytes)
    with staged_dir(out, cfg.overwrite, "OUT", inputs) as staging:
        tensors = checked_tensors(config, lazy, DTYPES[cfg.dtype], str(step_dir), progress=True)
        files = save_gptds_weights(config, tensors, staging, max_shard_bytes=max_shard_bytes,
                                   metadata={"source_checkpoint": str(step_dir), "step": str(meta["step"])})
    files = [out / f.name for f in files]
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files


def data_description(meta: dict) -> str:
    """The training data named without local paths: a hub dataset by its name, local files by file name; a
    mixture, each of its components so."""
    source = meta.get("data_source") or {}
    if isinstance(source, list):
        return " + ".join(data_description({"data_source": s}) for s in source)
    if source.get("dataset"):
        return " ".join(str(source[k]) for k in ("dataset", "dataset_config", "dataset_split") if source.get(k))
    names = [Path(f).name for f in source.get("files") or source.get("inputs") or []]
    if not names:
        return Path(meta.get("data_dir") or "unknown").name
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{shown} ({len(names)} file{'s' if len(names) != 1 else ''})"


TOKENIZER_CONTRACT = (
    "Tokenizer: GPT-2 BPE (`<|endoftext|>` = 50256), the same ids as gptds for ordinary text. One difference, "
    "on purpose: gptds encodes special-token strings typed in text (`<|endoftext|>`) as ordinary characters, "
    "while this tokenizer keeps transformers' default and turns a registered special-token string in the text "
    "into the special token. `model_max_length` is the model's context, {block_size} tokens.\n")


CHAT_CARD = ("\nChat format: ChatML, `<|im_start|>` = 50257 and `<|im_end|>` = 50258. "
             "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders a conversation as the "
             "model was trained on it, and `generate` stops at `<|im_end|>` (generation_config.json).\n")


def model_card(meta: dict, step_dir: Path) -> str:
    """The model card of a Hugging Face export; it names no local path (the folder may be published)."""
    val = f"{meta['val_loss']:.4f}" if meta.get("val_loss") is not None else "not measured"
    cfg = meta["model_config"]
    return (f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n"
            f"# GPT-2 model trained with gptds\n\n"
            f"- architecture: GPT-2, {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
            f"context {cfg['block_size']} tokens\n"
            f"- job: {meta['job']}, {meta['step']} optimizer steps ({meta['precision']}, ZeRO-{meta['zero_stage']}, "
            f"{meta['world_size']} ranks, optimizer {meta['optimizer']})\n"
            f"- training data: {data_description(meta)}\n"
            f"- validation loss at the last evaluation: {val}\n"
            f"- converted from checkpoint {step_dir.name}\n\n"
            + TOKENIZER_CONTRACT.format(block_size=cfg["block_size"])
            + ("" if cfg.get("vocab_size", 50257) < 50259 else CHAT_CARD))


def zero_to_hf(cfg: ZeroToHfConfig) -> Path:
    """A folder GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained load, with a model card."""
    out_dir, max_shard_bytes = Path(cfg.out_dir), int(cfg.max_shard_mb * 2**20)
    inputs = [("CHECKPOINT_DIR", cfg.checkpoint_dir)]
    step_dir = step_dir_of(cfg.checkpoint_dir, cfg.tag)
    check_no_overlap([("OUT_DIR", out_dir)], inputs)
    check_output(out_dir, cfg.overwrite, "OUT_DIR")
    if cfg.lora_export == "adapters":
        return lora_adapters_to_peft(step_dir, out_dir, cfg.overwrite, inputs)
    config, meta, lazy = zero_checkpoint_tensors(step_dir)
    _announce(step_dir, config, torch.float32, max_shard_bytes)
    with staged_dir(out_dir, cfg.overwrite, "OUT_DIR", inputs) as staging:
        save_hf_directory(config, checked_tensors(config, lazy, source=str(step_dir), progress=True), staging,
                          model_card=model_card(meta, step_dir), max_shard_bytes=max_shard_bytes)
    print(f"wrote Hugging Face GPT-2 folder {out_dir}")
    return out_dir


def lora_adapters_to_peft(step_dir: Path, out_dir: Path, overwrite: bool, inputs: list) -> Path:
    """A LoRA checkpoint's adapters as a PEFT adapter folder (PeftModel.from_pretrained on the base's Hugging
    Face export; when chat tokens were added, after `model.resize_token_embeddings(50259)`)."""
    meta = checkpoint.verify(step_dir)
    if not meta.get("lora"):
        raise UserError(f"{step_dir} is not a LoRA checkpoint: --lora_export adapters needs one (trained with "
                        f"--lora_rank); export it whole with zero-to-hf")
    lazy = engine.lazy_zero_state_dict(step_dir)
    adapters = {k: (v if isinstance(v, torch.Tensor) else v.contiguous()) for k, v in lazy.items()}
    inputs = [*inputs, ("the LoRA base", meta["lora"]["base"]["path"])]
    with staged_dir(out_dir, overwrite, "OUT_DIR", inputs) as staging:
        lora.write_adapter_folder(adapters, meta["lora"], staging, meta["lora"]["base"]["path"])
    print(f"wrote PEFT adapter folder {out_dir} (base: {meta['lora']['base']['path']})")
    return out_dir


def hf_to_gptds(cfg: HfToGptdsConfig) -> Path:
    """gptds weights (usable as --pretrained_checkpoint): a .safetensors file, or a folder for other names."""
    hf_dir, out = Path(cfg.hf_dir), Path(cfg.out)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: not a Hugging Face model folder (no config.json)")
    inputs = [("HF_DIR", hf_dir)]
    check_no_overlap([("OUT", out)], inputs)
    config, sd = load_hf_directory(hf_dir)
    tensors = checked_tensors(config, sd, source=str(hf_dir))
    staged = (staged_file(out, cfg.overwrite, "OUT", inputs) if out.suffix == ".safetensors"
              else staged_dir(out, cfg.overwrite, "OUT", inputs))
    with staged as staging:
        save_gptds_weights(config, tensors, staging, metadata={"source_hf_dir": str(hf_dir)})
    print(f"wrote gptds weights {out}")
    return out


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def zero_to_universal(cfg: ZeroToUniversalConfig) -> Path:
    """DeepSpeed's universal checkpoint as OUT_DIR/<step folder>, resumable with --resume --checkpoint_path
    OUT_DIR at another world size or ZeRO stage, optimizer state included. The converted fp32 weights are
    compared tensor by tensor (sha256) with the source before the folder is marked complete."""
    out_dir = Path(cfg.out_dir)
    inputs = [("CHECKPOINT_DIR", cfg.checkpoint_dir)]
    step_dir = step_dir_of(cfg.checkpoint_dir, cfg.tag)
    check_no_overlap([("OUT_DIR", out_dir)], inputs)
    meta = checkpoint.verify(step_dir)
    if meta["optimizer"] in UNIVERSAL_REFUSED_OPTIMIZERS:
        raise UserError(f"{step_dir} was trained with --optimizer {meta['optimizer']}: "
                        f"{UNIVERSAL_REFUSED_OPTIMIZERS[meta['optimizer']]}")
    check_output(out_dir, cfg.overwrite, "OUT_DIR")
    config, meta, lazy = zero_checkpoint_tensors(step_dir)
    with staged_dir(out_dir, cfg.overwrite, "OUT_DIR", inputs) as staging:
        target = staging / step_dir.name
        engine.convert_to_universal(step_dir, target, expected_shapes(config),
                                    tied={TIED_KEY: "transformer.wte.weight"})
        checksums = {}
        for name, source in checked_tensors(config, lazy, source=str(step_dir), progress=True):
            converted = engine.load_universal_tensor(target, name, "fp32")
            checksums[name] = tensor_sha256(source)
            if converted is None or tensor_sha256(converted.view(source.shape)) != checksums[name]:
                raise UserError(f"universal conversion of {step_dir} changed parameter {name}; nothing was written")
            for state in ("exp_avg", "exp_avg_sq"):
                if not (target / "zero" / name / f"{state}.pt").is_file():
                    raise UserError(f"universal conversion of {step_dir} lost the optimizer state {state} of {name}")
        checkpoint.write_meta(target, {**{k: v for k, v in meta.items() if k not in ("format", "files")},
                                       "kind": "universal", "source_checkpoint": str(step_dir),
                                       "param_sha256": checksums})
    print(f"wrote universal checkpoint {out_dir / step_dir.name}; resume it with "
          f"--resume --checkpoint_path {out_dir} (any world size, any ZeRO stage)")
    return out_dir / step_dir.name


CONVERSIONS = {  # subcommand: (help, settings, function)
    "zero-to-fp32": ("one consolidated safetensors state dict (sharded when large)", ZeroToFp32Config, zero_to_fp32),
    "zero-to-hf": ("a Hugging Face GPT-2 folder with tokenizer and model card", ZeroToHfConfig, zero_to_hf),
    "hf-to-gptds": ("a Hugging Face GPT-2 folder to gptds weights", HfToGptdsConfig, hf_to_gptds),
    "zero-to-universal": ("DeepSpeed universal checkpoint: resume at another world size or ZeRO stage",
                          ZeroToUniversalConfig, zero_to_universal),
}
