"""Everything DeepSpeed, in one place: reading a ds_configs JSON and filling in the values the run owns,
building the optimizer (bitsandbytes AdamW8bit, torch AdamW, or DeepSpeedCPUAdam under offload),
deepspeed.initialize, one optimizer step through the engine, saving and loading engine state, and reading
ZeRO checkpoint files (for weights.py) or converting them to DeepSpeed's universal format. It takes plain
values, never command-line flags. Where DeepSpeed's internals must be patched, deepspeed_workarounds.py
does it; this module and that one are the only ones that import deepspeed."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from gptds import deepspeed_workarounds as workarounds
from gptds import notices
from gptds.errors import UserError, read_json_object

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
# The keys of a DeepSpeed JSON whose values the run decides (config.py says which flag owns each): in the
# JSON they are absent, "auto", or equal to the run's value.
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping")


# ---------------------------------------------------------------- the JSON

def read_ds_config(path: Path) -> dict:
    """A DeepSpeed JSON config, with the structure gptds relies on checked (UserError naming the file)."""
    config = read_json_object(path, "a DeepSpeed JSON config")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(f"{path}: remove the \"{key}\" block: gptds builds the optimizer and the lr schedule "
                            f"from --optimizer/--lr/--min_lr/--warmup_steps (see the rule in gptds/config.py)")
    if not isinstance(config.get("zero_optimization", {}), dict):
        raise UserError(f"{path}: \"zero_optimization\" must be an object")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise UserError(f"{path}: zero_optimization.stage = {stage!r}; allowed: 0, 1, 2, 3")
    for key in ("bf16", "fp16"):
        if not isinstance(config.get(key, {}), dict):
            raise UserError(f"{path}: \"{key}\" must be an object like {{\"enabled\": true}}")
        enabled = config.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool):  # DeepSpeed would coerce "false" or 0; the precision must be unambiguous
            raise UserError(f"{path}: {key}.enabled = {json.dumps(enabled)} is not a valid boolean: write true or "
                            f"false, without quotes (DeepSpeed would coerce it silently, and the precision reported "
                            f"could differ from the one used)")
    check_offload_paths(path, config)
    if config.get("bf16", {}).get("enabled") and config.get("fp16", {}).get("enabled"):
        raise UserError(f"{path}: bf16 and fp16 are both enabled; enable one of them")
    return config


def check_offload_paths(path: Path, config: dict) -> None:
    """An offload to NVMe needs nvme_path: a folder that exists and can be written, and DeepSpeed's async_io op
    (libaio); DeepSpeed itself fails later, deep in its swapper, with a traceback."""
    zero = config.get("zero_optimization", {})
    for section in ("offload_optimizer", "offload_param"):
        offload = zero.get(section)
        if not isinstance(offload, dict) or offload.get("device") != "nvme":
            continue
        where = f"{path}: zero_optimization.{section}"
        nvme_path = offload.get("nvme_path")
        if not isinstance(nvme_path, str) or not nvme_path.strip():
            raise UserError(f"{where} offloads to NVMe but nvme_path is {json.dumps(nvme_path)}: set \"nvme_path\" "
                            f"to a folder on the NVMe drive")
        if not Path(nvme_path).is_dir():
            raise UserError(f"{where}.nvme_path {nvme_path}: no such folder; create it on the NVMe drive, or fix the "
                            f"path")
        if not os.access(nvme_path, os.W_OK | os.X_OK):
            raise UserError(f"{where}.nvme_path {nvme_path}: cannot write there (permission denied)")
        from deepspeed.ops.op_builder import AsyncIOBuilder
        if not AsyncIOBuilder().is_compatible(verbose=False):
            raise UserError(f"{where} offloads to NVMe, which needs DeepSpeed's async_io op, and it cannot be built "
                            f"on this machine (libaio missing: install libaio-dev, then see `ds_report`)")


def owned_conflicts(config: dict, owned: dict) -> list[tuple[str, object, object]]:
    """(key, value in the JSON, the run's value) for each owned key the JSON sets to something else."""
    return [(key, config[key], value) for key, value in owned.items()
            if config.get(key, "auto") not in ("auto", value)]


def complete_ds_config(path: Path, config: dict, owned: dict, untested_optimizer: bool) -> dict:
    """The config DeepSpeed is initialised with: the owned values filled in, DeepSpeed's own validation of
    every key and a refusal of unknown top-level keys (UserError naming the file)."""
    config = {**config, **owned}
    config["zero_allow_untested_optimizer"] = untested_optimizer  # bitsandbytes is not on ZeRO's list
    config.setdefault("steps_per_print", 10**9)  # gptds does its own logging
    # ...and measures its own throughput: DeepSpeed's throughput timer synchronises the device at every
    # forward and step (timers.throughput.synchronized), a host sync per micro-batch.
    config.setdefault("timers", {"throughput": {"enabled": False}})
    unknown, rejected, retyped = workarounds.check_config({k: v for k, v in config.items()
                                                           if k != "train_batch_size"})
    if rejected:
        raise UserError(f"{path}: DeepSpeed rejects this config: {rejected}")
    if unknown:
        raise UserError(f"{path}: unknown top-level key{'s' * (len(unknown) > 1)} {', '.join(unknown)}: DeepSpeed "
                        f"would ignore {'them' if len(unknown) > 1 else 'it'}; fix or remove")
    if retyped:
        raise UserError(f"{path}: {'; '.join(retyped)}: DeepSpeed would silently read another value; write the JSON "
                        f"type it expects (true/false and numbers without quotes)")
    return config


def precision(ds_config: dict) -> str:
    """'bf16', 'fp16' or 'fp32', as the JSON decides."""
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    fp16 = ds_config.get("fp16", {}).get("enabled", False)
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def check_precision_supported(path: Path, ds_config: dict) -> None:
    """Refuse, before any work, a precision this machine's accelerator cannot train in (fp16 on CPU)."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}
    dtype = precision(ds_config)
    if dtype in supported and not supported[dtype]():
        raise UserError(f"{path} enables {dtype}, which DeepSpeed does not support on this "
                        f"{accelerator.device_name()} device; use a bf16 or fp32 config "
                        f"(e.g. ds_configs/zero2_fp32.json)")


def universal_load_config(ds_config: dict) -> dict:
    """The JSON change that makes load() read a universal checkpoint."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


# ---------------------------------------------------------------- optimizer and engine

def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, Linear weights) only; not on biases or LayerNorm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, optimizer: str, lr: float, weight_decay: float,
                    ds_config: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    workarounds.bound_jit_build_locks()  # before any op is built: a killed build's lock must not hang us
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # compiled on first use, then cached
        return DeepSpeedCPUAdam(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, adamw_mode=True)
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    # The fused kernel (CUDA and CPU): on CPU it steps a ZeRO partition ~4x faster than the foreach default.
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """deepspeed.initialize; the returned engine is called like the model and owns backward/step."""
    import deepspeed
    workarounds.bound_jit_build_locks()
    workarounds.skip_cpu_shm_comm_build()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def optimizer_step(engine, skip: bool = False) -> None:
    """engine.step() at the gradient accumulation boundary; with skip, the accumulated gradients are
    discarded on this rank instead (every rank must agree: the caller decides from an all-reduced flag)."""
    if not skip:
        engine.step()
        return
    with workarounds.discarding_gradients(engine):
        engine.step()


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last optimizer step (a host sync: read it at logging intervals)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def fp16_state(engine) -> dict:
    """Loss scale and skipped steps of an fp16 run (DeepSpeed skips overflowing steps itself)."""
    if not engine.fp16_enabled():
        return {}
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return {"loss_scale": float(scale) if scale is not None else None, "skipped_steps": int(engine.skipped_steps)}


def optimizer_state_tensors(engine) -> list[torch.Tensor]:
    """The base optimizer's state tensors on this rank (what the optimizer really holds)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [v for state in base.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------- engine state on disk

def save(engine, checkpoint_dir: Path, tag: str, client_state: dict, open_file) -> list:
    """Every rank writes its shard into checkpoint_dir/tag, each file through open_file(path) (a file object
    that checksums what is written and keeps a failed write's OSError as .error); returns this rank's file
    objects. A failed write does not raise: every rank completes DeepSpeed's save, and the caller decides
    with the other ranks (checkpoint.save). DeepSpeed's own `latest` file is not used (checkpoint.py's
    meta.json marks a complete checkpoint)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )
    # Marks the checkpoint as convertible by ds_to_universal (Megatron-DeepSpeed writes the same).
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    with workarounds.writing_files_through(engine, open_file) as written, \
            workarounds.excluding_every_name_of_frozen_parameters(engine):
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=has_frozen_parameters(engine))
    return written


def has_frozen_parameters(engine) -> bool:
    """A frozen base (LoRA): checkpoints then hold only what trains; the base is loaded from its own file."""
    return any(not p.requires_grad for p in engine.module.parameters())


def load(engine, step_dir: Path) -> dict:
    """Load weights, optimizer state and client state from a step folder written by save (or converted
    to universal); returns the client state."""
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    load_path, client_state = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False,
                                                     load_module_strict=not has_frozen_parameters(engine))
    if load_path is None:
        raise UserError(f"{step_dir}: DeepSpeed could not load this checkpoint")
    workarounds.restore_after_load(engine, hyperparameters)
    return client_state


# ---------------------------------------------------------------- ZeRO checkpoint files, without an engine

def lazy_zero_state_dict(step_dir: Path) -> dict:
    """name -> lazy fp32 tensor of a ZeRO checkpoint of any stage and world size (DeepSpeed's reader: the
    rank files are memory-mapped and a tensor is assembled only when asked for, `.contiguous()`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        with notices.held_output():  # it prints what it parses and detects, on every rank, to no one's use
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                            lazy_mode=True)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, AssertionError, pickle.UnpicklingError) as e:
        # damaged shards whose sizes still match meta.json fail inside DeepSpeed's reader or torch.load
        raise UserError(f"{step_dir}: DeepSpeed cannot read this checkpoint's shards "
                        f"({type(e).__name__}: {e})") from None


def convert_to_universal(step_dir: Path, target: Path, shapes: dict[str, tuple[int, ...]],
                         tied: dict[str, str]) -> None:
    """DeepSpeed's ds_to_universal from step_dir into target, made loadable under every ZeRO stage.
    It runs in a fresh interpreter: ds_to_universal forks worker pools, and forking a process whose torch
    thread pools are already running deadlocks them. One worker: each holds a whole rank shard (weights and
    both Adam moments) and its per-parameter copies, so more workers multiply the peak memory."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(step_dir), "--output_folder", str(target), "--inject_missing_state",
                           "--num_extract_workers", "1", "--num_merge_workers", "1"], text=True,
                          stdout=sys.stderr, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no message"]
        raise UserError(f"DeepSpeed's ds_to_universal failed on {step_dir}: {last[0]}")
    workarounds.make_universal_loadable_by_every_stage(target, shapes, tied)


def load_universal_tensor(target: Path, name: str, state: str = "fp32") -> torch.Tensor | None:
    """One parameter's `state` (fp32, exp_avg, exp_avg_sq) from a universal checkpoint folder, or None."""
    path = target / "zero" / name / f"{state}.pt"
    if not path.is_file():
        return None
    value = torch.load(path, map_location="cpu", weights_only=False)
    return value["param"] if isinstance(value, dict) else value
