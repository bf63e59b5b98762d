"""LoRA fine-tuning through peft: low-rank adapters on chosen Linear layers of a frozen base (stored in 4 bits
for QLoRA), and, when fine-tuning on conversations adds tokens the base has never seen (ChatML's), trainable
rows for those tokens through peft's trainable tokens, tied between the input embedding and the output layer
as the base's rows are. Also what a LoRA checkpoint records about its base, merging the adapters into plain
weights, and the PEFT adapter folder that loads onto the Hugging Face export of the base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from gptds.errors import UserError
from gptds.model import GPT

ADAPTER = "default"  # peft's adapter name
TARGETS = ("c_attn", "c_proj", "c_fc")  # the Linear layers of a block (attention in and out, MLP in and out)
DELTA_KEY = "transformer.wte.token_adapter.trainable_tokens_delta." + ADAPTER


def check_targets(targets: list[str], model: GPT | None = None) -> None:
    """Refuse an unknown target module, naming the valid ones."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise UserError(f"--lora_targets {','.join(unknown)}: no such layer; valid: {', '.join(TARGETS)} "
                        f"(the block's attention input c_attn and output c_proj, and the MLP's c_fc and c_proj)")


def quantize_base(model: GPT, targets: list[str]) -> None:
    """QLoRA: the target Linear layers become bitsandbytes NF4 Linear4bit (frozen, 4-bit storage, computed in
    the input's dtype); LoRA then trains in full precision beside them."""
    import bitsandbytes as bnb
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name in targets:
                linear = getattr(parent, name, None)
                if not isinstance(linear, nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              compute_dtype=linear.weight.dtype, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                                     quant_type="nf4")
                if linear.bias is not None:
                    quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
                quantized = quantized.to(linear.weight.device)  # packs the weight into 4 bits
                setattr(parent, name, quantized)


def apply(model: GPT, rank: int, alpha: float, dropout: float, targets: list[str],
          new_token_ids: list[int], base_bits: int | None = None) -> GPT:
    """Freeze `model` and add LoRA adapters (and trainable rows for new_token_ids); returns the same model."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils.other import TrainableTokensWrapper
    check_targets(targets)
    if base_bits == 4:
        quantize_base(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets),
                            model, adapter_name=ADAPTER)
    if new_token_ids:  # one delta for the input rows and the output rows, tied as the base weights are
        wte = TrainableTokensWrapper(model.transformer.wte, ADAPTER, token_indices=list(new_token_ids))
        model.transformer.wte = wte
        model.lm_head = TrainableTokensWrapper(model.lm_head, ADAPTER, token_indices=list(new_token_ids),
                                               tied_adapter=wte.token_adapter)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A content hash of a model's weights (name, shape, dtype and bytes of every tensor, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- merging and exporting

def merged_state_dict(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], record: dict) -> dict:
    """Plain gptds weights: each target weight W + (alpha / r) * B @ A, and the new tokens' rows set from
    the trained delta. `base` is the base model's state dict (its embedding already grown to the chat
    vocabulary), `adapters` the checkpoint's trainable tensors, `record` meta.json's "lora"."""
    scaling = record["alpha"] / record["rank"]
    out = {k: v.clone() for k, v in base.items()}
    for name in list(out):
        if not name.endswith(".weight"):
            continue
        stem = name[:-len(".weight")]
        a, b = adapters.get(f"{stem}.lora_A.{ADAPTER}.weight"), adapters.get(f"{stem}.lora_B.{ADAPTER}.weight")
        if a is not None and b is not None:
            out[name] = out[name] + scaling * (b.float() @ a.float()).to(out[name].dtype)
    if record.get("new_token_ids"):
        rows = torch.tensor(record["new_token_ids"])
        out["transformer.wte.weight"][rows] = adapters[DELTA_KEY].to(out["transformer.wte.weight"].dtype)
    return out


def adapter_key(name: str) -> str | None:
    """The PEFT adapter-folder key of a gptds adapter tensor (None for other tensors)."""
    if ".lora_A." in name or ".lora_B." in name:
        return "base_model.model." + name.replace(f".{ADAPTER}.weight", ".weight")
    if name == DELTA_KEY:
        return "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
    return None


def write_adapter_folder(adapters: dict[str, torch.Tensor], record: dict, out_dir: Path, base_hf: str) -> None:
    """A PEFT adapter folder for the Hugging Face GPT-2 export of the base: adapter_config.json and
    adapter_model.safetensors. Hugging Face's GPT-2 stores these layers as Conv1D (fan_in_fan_out), whose
    LoRA matrices are the same A (r x in) and B (out x r)."""
    from safetensors.torch import save_file
    tensors = {adapter_key(k): v.detach().float().contiguous() for k, v in adapters.items() if adapter_key(k)}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_hf,
              "r": record["rank"], "lora_alpha": record["alpha"], "lora_dropout": record["dropout"],
              "target_modules": record["targets"], "fan_in_fan_out": True, "bias": "none",
              "inference_mode": True, "init_lora_weights": True}
    if record.get("new_token_ids"):
        config["trainable_token_indices"] = {"wte": record["new_token_ids"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
