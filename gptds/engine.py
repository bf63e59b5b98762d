"""Everything DeepSpeed, in one place: reading a ds_configs JSON and filling in the values the CLI
owns, building the optimizer (bitsandbytes AdamW8bit, torch AdamW, or DeepSpeedCPUAdam under
offload), deepspeed.initialize, and saving/loading engine checkpoints.

The rule for ds_configs/*.json: the JSON decides where state lives and in what precision (ZeRO stage,
offload, bf16/fp16, communication buckets). The CLI owns the batch, the optimizer and the schedule:
`train_micro_batch_size_per_gpu` (--batch_size), `gradient_accumulation_steps` (--grad_accum_steps),
`train_batch_size` (their product times world size), `gradient_clipping` (--grad_clip) and
`zero_allow_untested_optimizer` (set for AdamW8bit). In the JSON those keys are absent, "auto", or
equal to what the CLI computes; `optimizer` and `scheduler` blocks are refused (gptds builds both)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gptds.errors import UserError, read_json_object

DS_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
INSTALLED_DS_CONFIGS_DIR = Path(sys.prefix) / "share" / "gptds" / "ds_configs"
CLI_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                  "gradient_clipping", "zero_allow_untested_optimizer")
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def resolve_ds_config_path(name_or_path: str) -> Path:
    """A path to a JSON file, or the name of one in ds_configs/ ("zero2" or "zero2.json")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in (DS_CONFIGS_DIR, INSTALLED_DS_CONFIGS_DIR):
        candidate = folder / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json")) if DS_CONFIGS_DIR.is_dir() else []
    raise UserError(f"--deepspeed_config {name_or_path!r}: no such file, nor a name in ds_configs/ "
                    f"({', '.join(names)})")


def default_ds_config_name() -> str:
    # bf16 is the default precision, but CPUs without bf16 units run it ~80x slower than fp32.
    return "zero2" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "zero2_fp32"


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


def load_ds_config(path: Path, *, micro_batch_size: int, grad_accum_steps: int, world_size: int,
                   grad_clip: float, optimizer: str) -> dict:
    """Read the JSON, check it against the CLI's values and the batch arithmetic, and fill them in.
    Everything is checked here, before any model is built or any data is read."""
    config = read_json_object(path, "a DeepSpeed JSON config")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(f"{path}: remove the \"{key}\" block: gptds builds the optimizer and the lr schedule "
                            f"from --optimizer/--lr/--min_lr/--warmup_steps (see the rule in gptds/engine.py)")
    if not isinstance(config.get("zero_optimization", {}), dict):
        raise UserError(f"{path}: \"zero_optimization\" must be an object")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage = {stage!r}; allowed: 0, 1, 2, 3")
    for key in ("bf16", "fp16"):
        if not isinstance(config.get(key, {}), dict):
            raise UserError(f"{path}: \"{key}\" must be an object like {{\"enabled\": true}}")
    if config.get("bf16", {}).get("enabled") and config.get("fp16", {}).get("enabled"):
        raise UserError(f"{path}: bf16 and fp16 are both enabled; enable one of them")
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
    }
    flag_of = {"train_micro_batch_size_per_gpu": "--batch_size", "gradient_accumulation_steps": "--grad_accum_steps",
               "gradient_clipping": "--grad_clip"}
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given == "auto" or given == value:
            continue
        if key == "train_batch_size":
            raise UserError(
                f"{path}: train_batch_size = {given!r}, but batch arithmetic gives micro batch {micro_batch_size} "
                f"x grad accumulation {grad_accum_steps} x world size {world_size} = {value}; set "
                f"\"train_batch_size\": \"auto\" or choose --batch_size/--grad_accum_steps whose product with the "
                f"world size is {given}")
        raise UserError(f"{path}: {key} = {given!r} conflicts with {flag_of[key]} {value}; set \"{key}\": \"auto\" "
                        f"(the CLI owns it) or pass {flag_of[key]} {given}")
    if optimizer == "adamw8bit" and offloads_optimizer(config):
        raise UserError(f"{path} offloads the optimizer to CPU, where DeepSpeed steps it with DeepSpeedCPUAdam; "
                        f"bitsandbytes' 8-bit AdamW keeps its state beside the parameters and cannot be offloaded. "
                        f"Use --optimizer adamw with this config, or a config without offload_optimizer")
    config.update(wanted)
    config["zero_allow_untested_optimizer"] = optimizer == "adamw8bit"  # bitsandbytes is not on ZeRO's list
    config.setdefault("steps_per_print", 10**9)  # gptds does its own logging
    _check_schema(path, {k: v for k, v in config.items() if k != "train_batch_size"})
    return config


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


def _check_schema(path: Path, config: dict) -> None:
    """DeepSpeed's own validation of every key (wrong types, unknown keys inside its typed sections),
    reported as one line; plus unknown top-level keys, which DeepSpeed ignores (a typo such as
    "zero_optimisation" would silently train without ZeRO): a key is known when DeepSpeed's config
    reader looks it up, or when DeepSpeed names it among its config constants."""
    from deepspeed.runtime.config import DeepSpeedConfig

    class LookupsRecorded(dict):
        looked_up: set = set()

        def get(self, key, *default):
            self.looked_up.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            self.looked_up.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.looked_up.add(key)
            return super().__contains__(key)

    try:
        DeepSpeedConfig(LookupsRecorded(config))
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
        raise UserError(f"{path}: DeepSpeed rejects this config: {' / '.join(lines[:4])}") from None
    unknown = [key for key in config if key not in LookupsRecorded.looked_up and key not in _deepspeed_key_names()]
    if unknown:
        import difflib
        known = sorted(LookupsRecorded.looked_up | _deepspeed_key_names())
        hints = [f"{key!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                               else "") for key in unknown]
        raise UserError(f"{path}: unknown top-level key{'s' * (len(unknown) > 1)} {', '.join(hints)}: DeepSpeed "
                        f"would ignore {'them' if len(unknown) > 1 else 'it'}; fix or remove")


def _deepspeed_key_names() -> set[str]:
    """String constants of DeepSpeed's config modules (keys read outside DeepSpeedConfig, e.g. "aio")."""
    import importlib
    names = set()
    for module in ("deepspeed.runtime.constants", "deepspeed.runtime.swap_tensor.constants",
                   "deepspeed.autotuning.constants"):
        names |= {v for k, v in vars(importlib.import_module(module)).items() if k.isupper() and isinstance(v, str)}
    return names


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, Linear weights) only; not on biases or LayerNorm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, optimizer: str, lr: float, weight_decay: float,
                    ds_config: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
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
    _skip_cpu_shm_comm_build()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _skip_cpu_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm) inside every rank
    of a fresh environment: ~45 s on 2 cores, and a rank killed during the build leaves torch's build lock
    behind, so every later launch waits on it forever (seen in CI). gloo already does the collectives on
    CPU (the plain-PyTorch DDP baseline uses it too); do without the op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def fp16_state(engine) -> dict:
    """Loss scale and skipped steps of an fp16 run (DeepSpeed skips overflowing steps itself)."""
    if not engine.fp16_enabled():
        return {}
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return {"loss_scale": float(scale) if scale is not None else None, "skipped_steps": int(engine.skipped_steps)}


def optimizer_state_tensors(engine) -> list[torch.Tensor]:
    """The base optimizer's state tensors on this rank (to check that 8-bit state really is 8-bit)."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [v for state in base.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def save_checkpoint(engine, checkpoint_dir: Path, tag: str, client_state: dict) -> None:
    """Every rank writes its shard into checkpoint_dir/tag; DeepSpeed's own `latest` file is not used
    (checkpoint.py's meta.json marks a complete checkpoint). A file that cannot be written raises OSError
    naming it: torch.save reports a full disk as a RuntimeError with neither errno nor path."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )
    # Marks the checkpoint as convertible by ds_to_universal (Megatron-DeepSpeed writes the same).
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY:
                                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    write = engine.checkpoint_engine.save

    def write_naming_the_file(state_dict, path):
        try:
            write(state_dict, path)
        except RuntimeError as e:
            raise OSError(None, str(e).partition("\n")[0], path) from e

    engine.checkpoint_engine.save = write_naming_the_file
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine.save = write


def load_checkpoint(engine, step_dir: Path) -> dict:
    """Load weights, optimizer state and client state from a step folder written by save_checkpoint (or
    converted to universal). Two repairs after ZeRO-3's universal loader: it copies param group 0's
    hyperparameters (weight decay included) onto every group, so they are put back as this run built
    them; and it gives every sub-group's state the same `step` tensor, which torch's Adam increments in
    place, once per sub-group, so each state gets its own copy."""
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    load_path, client_state = engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name,
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise UserError(f"{step_dir}: DeepSpeed could not load this checkpoint")
    for group, saved in zip(engine.optimizer.param_groups, hyperparameters):
        group.update(saved)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    replay_cpu_adam_bias_correction(engine)
    return client_state


def replay_cpu_adam_bias_correction(engine) -> None:
    """DeepSpeedCPUAdam's C++ side keeps beta1^t and beta2^t as running float products; a new process
    would compute them with pow(), which differs in the last bits, so a resumed offload run would drift
    from the uninterrupted one by ~1e-7. Replaying the products on a 1-element dummy makes it exact."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    base = getattr(engine.optimizer, "optimizer", None)
    if not isinstance(base, DeepSpeedCPUAdam):
        return
    steps = {int(state["step"]) for state in base.state.values() if "step" in state}
    if not steps:
        return
    assert len(steps) == 1, f"optimizer states disagree on the step count: {sorted(steps)}"
    group = base.param_groups[0]
    p, g, m, v = (torch.zeros(1) for _ in range(4))
    for step in range(1, steps.pop() + 1):
        base.ds_opt_adam.adam_update(base.opt_id, step, group["lr"], *group["betas"], group["eps"],
                                     group["weight_decay"], group["bias_correction"], p, g, m, v)


def universal_load_config(ds_config: dict) -> dict:
    """The JSON change that makes engine.load_checkpoint read a universal checkpoint."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
