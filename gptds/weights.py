"""Model weights from any source, through one module: gptds weights (safetensors whose metadata carries
the GPTConfig, one file or shards with an index), Hugging Face GPT-2 directories, and training
checkpoints (ZeRO shards of any stage and world size, read through engine.py); `load_model` opens any of
them. Tensors are checked against the config as they are read (checked_tensors). Writing weights files
and Hugging Face folders is here too; `gptds convert` (convert.py) only chooses what to write where.
HF's Conv1D weights are our nn.Linear weights transposed; nothing is renamed."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from gptds import checkpoint, engine, lora
from gptds.data.chat import CHAT_TEMPLATE, chat_format_of
from gptds.errors import UserError, parse_json, read_json_object
from gptds.model import GPT, GPTConfig
from gptds.staging import recover
from gptds.tokenizer import EOT_ID, IM_END_ID, write_hf_tokenizer_files

# Linear layers that Hugging Face's GPT-2 stores as Conv1D (weight of shape (in, out)).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TIED_KEY = "lm_head.weight"  # same tensor as transformer.wte.weight; stored once
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class WeightsError(UserError):
    """A weights path that cannot be read as any format gptds knows."""


def state_dict_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}


def resize_embedding(wte: torch.Tensor, source_vocab_size: int, config: GPTConfig) -> torch.Tensor:
    """The token embedding with config.padded_vocab_size rows: the source's real rows (the first
    source_vocab_size of `wte`, which may carry another padding), then, when config's vocabulary is larger
    (the ChatML tokens of a chat model), new rows initialised to the mean of the real ones, then zero rows.
    Padding rows are storage only: no logit of theirs is read."""
    if wte.size(0) == config.padded_vocab_size and source_vocab_size == config.vocab_size:
        return wte
    real = min(source_vocab_size, config.vocab_size, wte.size(0))
    out = wte.new_zeros(config.padded_vocab_size, wte.size(1))
    out[:real] = wte[:real]
    out[real:config.vocab_size] = wte[:real].mean(dim=0)
    return out


def model_from_state_dict(config: GPTConfig, state_dict: dict[str, torch.Tensor],
                          source_vocab_size: int | None = None) -> GPT:
    """A model of `config` holding state_dict; source_vocab_size: the vocabulary the weights were trained
    with, when config's differs (rows are added) or its padding does."""
    model = GPT(config)
    state_dict = {k: v for k, v in state_dict.items() if k != TIED_KEY}
    if "transformer.wte.weight" in state_dict:
        state_dict["transformer.wte.weight"] = resize_embedding(
            state_dict["transformer.wte.weight"], source_vocab_size or config.vocab_size, config)
    expected = set(state_dict_for_saving(model))
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise WeightsError(f"weights do not match {config}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    own = model.state_dict()
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise WeightsError(f"weight {k} has shape {tuple(v.shape)}, the model config needs {tuple(own[k].shape)}")
    model.load_state_dict({**state_dict, TIED_KEY: state_dict["transformer.wte.weight"]})
    return model


# ---------------------------------------------------------------- gptds safetensors

def iter_shards(tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> Iterator[dict]:
    """Group (name, tensor) pairs into dicts of at most max_shard_bytes (a bigger tensor gets its own)."""
    shard, size = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
    if shard:
        yield shard


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, metadata: dict,
                      stem: str = "model", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write tensors into `folder` as <stem>.safetensors or, above max_shard_bytes, as the Hugging Face
    sharded layout (<stem>-00001-of-0000N.safetensors + <stem>.safetensors.index.json). Tensors are
    consumed lazily and only one shard is in memory at a time. Returns the files written."""
    folder = Path(folder)
    parts, weight_map = [], {}
    for i, shard in enumerate(iter_shards(((k, v.contiguous()) for k, v in tensors), max_shard_bytes)):
        part = folder / f"{stem}-{i + 1:05d}.partial"  # the shard count is known only at the end
        _save_file(shard, part, metadata)
        parts.append(part)
        weight_map.update(dict.fromkeys(shard, i))
        del shard
    if len(parts) <= 1:
        single = folder / f"{stem}.safetensors"
        if parts:
            os.replace(parts[0], single)
        else:
            _save_file({}, single, metadata)
        return [single]
    final = [folder / f"{stem}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, dest in zip(parts, final):
        os.replace(part, dest)
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": metadata, "weight_map": {k: final[i].name for k, i in weight_map.items()}},
                                indent=1))
    return final + [index]


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors' save_file, whose I/O errors (a full disk) become the OSError they are, naming the file:
    safetensors reports them as SafetensorError("... (os error 28) ...")."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if not code:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def gptds_metadata(config: GPTConfig, extra: dict | None = None) -> dict:
    """safetensors metadata of a gptds weights file: the GPTConfig travels with the weights."""
    return {"format": "pt", "gptds_config": json.dumps(config.to_dict()), **(extra or {})}


def save_gptds_weights(config: GPTConfig, tensors: Iterable[tuple[str, torch.Tensor]], out: Path,
                       metadata: dict | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """gptds weights at `out`: a .safetensors file (written whole), or a folder holding model.safetensors
    or its shards and index. The tied lm_head.weight is stored once, as transformer.wte.weight."""
    out = Path(out)
    tensors = ((k, v) for k, v in tensors if k != TIED_KEY)
    if out.suffix == ".safetensors":
        _save_file(dict(tensors), out, gptds_metadata(config, metadata))
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    return write_safetensors(tensors, out, gptds_metadata(config, metadata), max_shard_bytes=max_shard_bytes)


def read_safetensors(files: list[Path], tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header metadata and (unless tensors=False) the tensors of safetensors files."""
    metadata, out = {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                metadata = sf.metadata() or metadata
                for k in (sf.keys() if tensors else ()):
                    out[k] = sf.get_tensor(k)
        except SafetensorError as e:
            raise WeightsError(f"{f}: not a readable safetensors file, or truncated ({e})") from None
    return metadata, out


def safetensors_files(path: Path) -> list[Path]:
    """The files of a .safetensors file, of a .safetensors.index.json, or of a folder holding one of them."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise WeightsError(f"{path}: expected one safetensors weights file or index, found "
                               f"{[c.name for c in candidates] or 'none'}")
        path = candidates[0]
    if path.name.endswith(".index.json"):
        weight_map = read_json_object(path, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightsError(f"{path}: not a safetensors index (no \"weight_map\" of tensor name -> file name)")
        files = sorted({path.parent / f for f in weight_map.values()})
    else:
        files = [path]
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f}: weights file missing")
    return files


def load_gptds_weights(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A .safetensors file, its .index.json, or a folder holding either."""
    metadata, tensors = read_safetensors(safetensors_files(path))
    return _gptds_config(path, metadata), tensors


def read_gptds_config(path: Path) -> GPTConfig:
    """The config of a gptds weights file from its safetensors header, without reading the tensors."""
    metadata, _ = read_safetensors(safetensors_files(path)[:1], tensors=False)
    return _gptds_config(path, metadata)


def _gptds_config(path: Path, metadata: dict) -> GPTConfig:
    if "gptds_config" not in metadata:
        raise WeightsError(f"{path}: safetensors weights without gptds_config metadata (not written by gptds)")
    try:
        return GPTConfig.from_dict(parse_json(metadata["gptds_config"], f"{path}: gptds_config metadata"))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path}: gptds_config metadata is not a GPT config ({e})") from None


# ---------------------------------------------------------------- Hugging Face GPT-2

HF_REQUIRED_FIELDS = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")


def read_hf_config(folder: Path) -> GPTConfig:
    return hf_config_to_gptds(read_json_object(Path(folder) / "config.json", "a Hugging Face config.json"), folder)


def hf_config_to_gptds(hf: dict, source: Path) -> GPTConfig:
    for name in HF_REQUIRED_FIELDS:
        if not isinstance(hf.get(name), int) or isinstance(hf.get(name), bool) or hf[name] <= 0:
            raise WeightsError(f"{source}/config.json: field {name!r} is "
                               f"{'missing' if name not in hf else repr(hf[name])}; a GPT-2 config.json needs a "
                               f"positive integer there")
    if hf.get("model_type") != "gpt2":
        raise WeightsError(f"{source}/config.json: model_type is {hf.get('model_type')!r}, only 'gpt2' is supported")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise WeightsError(f"{source}/config.json: n_inner={hf['n_inner']} (gptds uses 4 * n_embd)")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise WeightsError(f"{source}/config.json: activation_function={hf['activation_function']!r} "
                           f"(gptds uses the tanh GELU, 'gelu_new')")
    try:
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"],
                         layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{source}/config.json: not a GPT-2 config gptds can build ({e})") from None


def gptds_config_to_hf(config: GPTConfig) -> dict:
    if not config.bias:
        raise WeightsError("Hugging Face GPT-2 has biases; a model with bias=False cannot be exported")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": 0.02,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def hf_to_gptds_state_dict(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transpose Conv1D weights; accept GPT2Model keys (no 'transformer.' prefix); drop attention-mask buffers."""
    out = {}
    for k, v in hf_sd.items():
        if k.endswith(("attn.bias", "attn.masked_bias")) and not k.endswith("c_attn.bias"):
            continue
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v
    return out


def gptds_to_hf_state_dict(config: GPTConfig, tensors: Iterable[tuple[str, torch.Tensor]]):
    """Yield HF-layout (name, tensor) pairs: Conv1D weights transposed, vocab padding removed."""
    for k, v in tensors:
        if k == TIED_KEY:
            continue
        if k == "transformer.wte.weight":
            v = v[:config.vocab_size]
        yield k, (v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v.contiguous())


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_hf_directory(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    config = read_hf_config(path)
    if (path / "model.safetensors").is_file() or (path / INDEX_FILE).is_file():
        _, sd = read_safetensors(safetensors_files(path / INDEX_FILE if (path / INDEX_FILE).is_file() else
                                                   path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        try:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:  # damaged file
            raise WeightsError(f"{path / 'pytorch_model.bin'}: not a readable PyTorch weights file, or truncated "
                               f"({type(e).__name__})") from None
    else:
        raise WeightsError(f"{path}: Hugging Face directory without model.safetensors, {INDEX_FILE} "
                           f"or pytorch_model.bin")
    return config, hf_to_gptds_state_dict(sd)


def save_hf_directory(config: GPTConfig, tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                      model_card: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """config.json, model.safetensors (or HF-style shards) and GPT-2 tokenizer files, loadable by
    GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = gptds_config_to_hf(config)
    files = write_safetensors(gptds_to_hf_state_dict(config, tensors), out_dir, {"format": "pt"},
                              max_shard_bytes=max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    chat = chat_format_of(config) is not None
    # generate() stops at the end of text, and a chat model's also at the end of its turn
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": EOT_ID, "eos_token_id": [EOT_ID, IM_END_ID] if chat else EOT_ID, "pad_token_id": EOT_ID}))
    write_hf_tokenizer_files(out_dir, config.block_size, CHAT_TEMPLATE if chat else None)
    if model_card:
        (out_dir / "README.md").write_text(model_card)
    return files


# ---------------------------------------------------------------- training checkpoints

def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape for this config (meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED_KEY}


def checked_tensors(config: GPTConfig, lazy: dict, dtype: torch.dtype = torch.float32,
                    source: str = "", progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Materialise tensors one at a time, refusing empty, missing, misshapen or surplus ones (ZeRO-3
    exports have been silently empty or truncated elsewhere) and checking the total parameter count."""
    want = expected_shapes(config)
    names = [k for k in lazy if k != TIED_KEY]
    missing, extra = set(want) - set(names), set(names) - set(want)
    if missing or extra:
        raise WeightsError(f"{source}: tensors do not match the model config: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
    total = 0
    for name in tqdm(want, desc="tensors", unit="tensor", disable=not progress):
        t = lazy[name]
        t = t if isinstance(t, torch.Tensor) else t.contiguous()  # DeepSpeed's lazy tensor -> real
        if t.numel() == 0 or tuple(t.shape) != want[name]:
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config needs "
                               f"{want[name]} (an empty or truncated export)")
        total += t.numel()
        yield name, t.to(dtype) if t.is_floating_point() else t
    expected_total = sum(torch.Size(s).numel() for s in want.values())
    if total != expected_total:
        raise WeightsError(f"{source}: exported {total:,} parameters, the config has {expected_total:,}")


def zero_checkpoint_tensors(step_dir: Path) -> tuple[GPTConfig, dict, dict]:
    """Config, meta and a name -> lazy tensor map of a verified ZeRO training checkpoint; the rank files
    are memory-mapped and a tensor is assembled only when checked_tensors asks for it. A LoRA checkpoint's
    adapters come merged into its base (read from the base's own file, checked against its checksum)."""
    meta = checkpoint.verify(step_dir)
    if meta.get("kind") == "universal":
        raise WeightsError(f"{step_dir} is a universal checkpoint: resume from it (--resume --checkpoint_path), "
                           f"or export the ZeRO checkpoint it was converted from ({meta.get('source_checkpoint')})")
    config, lazy = GPTConfig.from_dict(meta["model_config"]), engine.lazy_zero_state_dict(step_dir)
    if meta.get("lora"):
        return config, meta, merged_lora_weights(step_dir, meta, config, lazy)
    return config, meta, lazy


def lora_base_weights(step_dir: Path, meta: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The base a LoRA checkpoint was trained on, checked against its recorded checksum, its embedding grown
    and padded as the checkpoint's model (without adapters)."""
    base = meta["lora"]["base"]
    try:
        base_config, weights = load_weights(base["path"])
    except UserError as e:
        raise WeightsError(f"{step_dir} holds LoRA adapters; its base {base['path']} cannot be read ({e})") from None
    if lora.weights_sha256(weights) != base["sha256"]:
        raise WeightsError(f"{step_dir} holds LoRA adapters for a base whose weights changed since: {base['path']} "
                           f"has another checksum than the one recorded in meta.json")
    return state_dict_for_saving(model_from_state_dict(config, weights, base_config.vocab_size))


def merged_lora_weights(step_dir: Path, meta: dict, config: GPTConfig, lazy: dict) -> dict[str, torch.Tensor]:
    adapters = {k: (v if isinstance(v, torch.Tensor) else v.contiguous()) for k, v in lazy.items()}
    return lora.merged_state_dict(lora_base_weights(step_dir, meta, config), adapters, meta["lora"])


def load_checkpoint_weights(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and full fp32 state dict of a training checkpoint (step folder, or checkpoint folder)."""
    step_dir = checkpoint.resolve(path)
    config, _, lazy = zero_checkpoint_tensors(step_dir)
    return config, dict(checked_tensors(config, lazy, source=str(step_dir)))


# ---------------------------------------------------------------- any path

def _kind(path: Path) -> str:
    if not path.exists():
        recover(path)  # a `convert --overwrite` killed between its two renames: its previous output
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if is_hf_directory(path):
        return "hf"
    if path.is_dir() and not list(path.glob("*.safetensors*")):
        return "checkpoint"
    return "gptds"


def read_config(path: str | Path) -> GPTConfig:
    """The GPTConfig of anything load_weights reads, without reading the weights."""
    path = Path(path)
    kind = _kind(path)
    if kind == "hf":
        return read_hf_config(path)
    if kind == "checkpoint":
        return GPTConfig.from_dict(checkpoint.read_meta(checkpoint.resolve(path))["model_config"])
    return read_gptds_config(path)


def load_weights(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and fp32 state dict from a gptds weights file (or sharded index, or a folder of one), a
    Hugging Face GPT-2 directory, or a gptds training checkpoint (a step folder, or a checkpoint folder:
    its newest complete step)."""
    path = Path(path)
    kind = _kind(path)
    if kind == "hf":
        return load_hf_directory(path)
    if kind == "checkpoint":
        return load_checkpoint_weights(path)
    return load_gptds_weights(path)


def load_model(path: str | Path, pad_vocab_to_multiple_of: int | None = None, vocab_size: int | None = None) -> GPT:
    """The model at `path`; with pad_vocab_to_multiple_of, its embedding re-padded to that multiple; with a
    larger vocab_size (a GPT-2 model fine-tuned on conversations), the new tokens' rows added."""
    config, state_dict = load_weights(path)
    source_vocab_size = config.vocab_size
    config = dataclasses.replace(config, pad_vocab_to_multiple_of=pad_vocab_to_multiple_of or
                                 config.pad_vocab_to_multiple_of, vocab_size=max(vocab_size or 0, config.vocab_size))
    return model_from_state_dict(config, state_dict, source_vocab_size)
