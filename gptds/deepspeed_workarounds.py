"""Where gptds reaches into DeepSpeed's internals, fenced in one file: each function names the DeepSpeed
behaviour it works around, why gptds cannot live with it, the upstream issue where there is one, and the
DeepSpeed versions it was checked on. A DeepSpeed upgrade is a review of this file (and the tests that
exercise each function: named below). Only engine.py calls these."""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path

import torch

CHECKED_ON = ("0.19.8",)  # deepspeed versions every workaround below was tested with


# ---------------------------------------------------------------- config validation

def unknown_top_level_keys(config: dict) -> tuple[list[str], str | None]:
    """DeepSpeed validates its typed sections, but ignores top-level keys it does not know: a typo such as
    "zero_optimisation" silently trains without ZeRO. A key is known when DeepSpeedConfig looks it up while
    parsing this config, or when DeepSpeed names it among its config constants (keys read outside
    DeepSpeedConfig, e.g. "aio"). Returns (unknown keys with "did you mean" hints, DeepSpeed's own
    validation error in one line, or None). Upstream: no warning for unknown keys (checked on CHECKED_ON).
    Tests: tests/test_ds_configs.py."""
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
    except Exception as e:  # noqa: BLE001 (pydantic ValidationError, AssertionError, ValueError, ...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
        return [], " / ".join(lines[:4]) or type(e).__name__
    known = LookupsRecorded.looked_up | _deepspeed_key_names()
    hints = []
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), 1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return hints, None


def _deepspeed_key_names() -> set[str]:
    """String constants of DeepSpeed's config modules."""
    names = set()
    for module in ("deepspeed.runtime.constants", "deepspeed.runtime.swap_tensor.constants",
                   "deepspeed.autotuning.constants"):
        names |= {v for k, v in vars(importlib.import_module(module)).items() if k.isupper() and isinstance(v, str)}
    return names


# ---------------------------------------------------------------- initialize

def skip_cpu_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op (deepspeed_shm_comm) inside every rank
    of a fresh environment: ~45 s on 2 cores, and a rank killed during the build leaves torch's build lock
    behind, so every later launch waits on it forever (seen in CI). gloo already does the collectives on
    CPU; only DeepSpeed's inference all-reduce would use the op. Marking it incompatible makes DeepSpeed's
    CPU accelerator fall back to torch.distributed. Checked on CHECKED_ON; tests: every 2-rank test."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---------------------------------------------------------------- skipping an optimizer step

def discarding_gradients(engine):
    """A context in which engine.step() at an accumulation boundary discards the accumulated gradients
    instead of applying them: the weights and the optimizer state (moments, step counts) are untouched,
    and the engine's counters advance as after a skipped fp16 overflow step (skipped_steps + 1).
    DeepSpeed has no public "skip this step"; its optimizer wrappers each have an overflow path that does
    exactly this clean-up, so each is made to take it:
    - ZeRO-1/2 (DeepSpeedZeroOptimizer): has_overflow() answers True (check_grad_overflow on for the call);
    - ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): _overflow_check_and_loss_scale_update() reports an overflow;
    - the fp16/bf16 wrappers of stage 0 (FP16_Optimizer, FP16_UnfusedOptimizer): step() is their
      _skip_invalid_grad_norm(); BF16_Optimizer: step() clears its high- and low-precision gradients;
    - a plain torch optimizer (stage 0, fp32): step() only zeroes the gradients.
    fp16 runs also halve their loss scale, as DeepSpeed does for any overflow. Checked on CHECKED_ON for
    every class above that runs on CPU; tests: tests/test_step_path.py (weights and optimizer state
    bit-identical after a skipped step, stages 0-3, fp32 and bf16)."""
    import contextlib

    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer

    def stage3_overflow(update_scale=True):
        opt.overflow = True
        return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True

    def bf16_skip(closure=None):
        opt.overflow, opt._global_grad_norm = True, float("inf")
        opt.clear_hp_grads()
        opt.clear_lp_grads()

    def plain_skip(closure=None):
        opt.zero_grad(set_to_none=True)

    if isinstance(opt, DeepSpeedZeroOptimizer):
        patches = {"has_overflow": lambda *args, **kwargs: True, "check_grad_overflow": True}
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        patches = {"_overflow_check_and_loss_scale_update": stage3_overflow}
    elif isinstance(opt, BF16_Optimizer):
        patches = {"step": bf16_skip}
    elif hasattr(opt, "_skip_invalid_grad_norm"):
        patches = {"step": lambda closure=None: opt._skip_invalid_grad_norm()}
    else:
        patches = {"step": plain_skip}

    @contextlib.contextmanager
    def patched():
        saved = {name: opt.__dict__[name] for name in patches if name in opt.__dict__}
        opt.__dict__.update(patches)
        try:
            yield
        finally:
            for name in patches:
                if name in saved:
                    opt.__dict__[name] = saved[name]
                else:
                    del opt.__dict__[name]
    return patched()


# ---------------------------------------------------------------- saving

def save_naming_the_file(engine):
    """A context for engine.save_checkpoint in which a failed write raises OSError naming the file.
    torch.save (DeepSpeed's TorchCheckpointEngine.save) reports a full disk as a RuntimeError
    ("[enforce fail at inline_container.cc:...]") with neither errno nor path, so the user would not learn
    which file or disk. Wraps engine.checkpoint_engine.save (an attribute of the engine since 0.10).
    Checked on CHECKED_ON; tests: tests/test_reliability.py (ENOSPC mid-save)."""
    import contextlib

    @contextlib.contextmanager
    def patched():
        write = engine.checkpoint_engine.save

        def write_naming_the_file(state_dict, path):
            try:
                write(state_dict, path)
            except RuntimeError as e:
                raise OSError(None, str(e).partition("\n")[0], path) from e

        engine.checkpoint_engine.save = write_naming_the_file
        try:
            yield
        finally:
            engine.checkpoint_engine.save = write
    return patched()


def excluding_every_name_of_frozen_parameters(engine):
    """A context for engine.save_checkpoint(exclude_frozen_parameters=True) that drops a frozen parameter from
    the saved module state under every name it has. DeepSpeed deletes the names named_parameters() gives,
    which reports a shared tensor once: a tied frozen embedding (LoRA on GPT-2, whose output layer shares the
    token embedding) stays in the file under its second name, a full copy of the base's largest matrix.
    Checked on CHECKED_ON; tests: tests/test_lora.py (the checkpoint holds no base weight)."""
    import contextlib

    @contextlib.contextmanager
    def patched():
        original = engine.module_state_dict

        def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
            sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
            if exclude_frozen_parameters and sd is not None:
                for name, p in engine.module.named_parameters(remove_duplicate=False):
                    if not p.requires_grad:
                        sd.pop(name, None)
            return sd
        engine.module_state_dict = module_state_dict
        try:
            yield
        finally:
            del engine.module_state_dict
    return patched()


# ---------------------------------------------------------------- loading

def restore_after_load(engine, hyperparameters: list[dict]) -> None:
    """Two repairs after DeepSpeed's ZeRO-3 universal loader (checked on CHECKED_ON): it copies param group
    0's hyperparameters (weight decay included) onto every group, so they are put back as this run built
    them (`hyperparameters`, read before the load); and it gives every sub-group's state the same `step`
    tensor, which torch's Adam increments in place, once per sub-group, so each state gets its own copy.
    Harmless for the other loaders. Tests: tests/test_convert.py (universal resume, ZeRO-1 -> ZeRO-3)."""
    for group, saved in zip(engine.optimizer.param_groups, hyperparameters):
        group.update(saved)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
    _replay_cpu_adam_bias_correction(engine)


def _replay_cpu_adam_bias_correction(engine) -> None:
    """DeepSpeedCPUAdam's C++ side keeps beta1^t and beta2^t as running float products; a new process
    would compute them with pow(), which differs in the last bits, so a resumed offload run would drift
    from the uninterrupted one by ~1e-7. Replaying the products on a 1-element dummy makes it exact.
    Checked on CHECKED_ON; tests: tests/test_training.py (offload resume, bit for bit)."""
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


# ---------------------------------------------------------------- universal checkpoints

STAGE12_MODEL_STATES = "mp_rank_00_model_states.pt"
STAGE3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def make_universal_loadable_by_every_stage(target: Path, shapes: dict[str, tuple[int, ...]],
                                           tied: dict[str, str]) -> None:
    """ds_to_universal writes the global files in the layout of the stage it converted from; DeepSpeed's
    universal loaders read them in the layout of the stage they run under, so a ZeRO-1/2 universal
    checkpoint does not load under ZeRO-3 and vice versa (checked on CHECKED_ON). Give the folder both: the
    optimizer_state.pt keys of ZeRO-1/2 and of ZeRO-3, and both model-state file names (ZeRO-1/2 also reads
    full module weights from theirs). `shapes`: parameter name -> shape; `tied`: alias -> parameter name.
    Tests: tests/test_convert.py (universal resume across stages)."""
    import deepspeed
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS
    optim_path = target / "zero" / "optimizer_state.pt"
    optim = torch.load(optim_path, map_location="cpu", weights_only=False)
    if OPTIMIZER_STATE_DICT in optim:  # from ZeRO-3: flat tensors and one global step; ZeRO-1/2 read shaped
        step = optim[OPTIMIZER_STATE_DICT]["state"][0]["step"]  # {"param", "cat_dim"} and a step per parameter
        for name, shape in shapes.items():
            folder = target / "zero" / name
            for state in ("fp32", "exp_avg", "exp_avg_sq"):
                value = torch.load(folder / f"{state}.pt", map_location="cpu", weights_only=False)
                if isinstance(value, torch.Tensor):
                    torch.save({"param": value.view(shape), "cat_dim": 0}, folder / f"{state}.pt")
            torch.save(step, folder / "step.pt")
    else:  # from ZeRO-1/2: ZeRO-3 reads one global step
        first = next(iter(shapes))
        step = torch.load(target / "zero" / first / "step.pt", weights_only=False)
        optim[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: optim[PARAM_GROUPS]}
    optim.setdefault("ds_version", deepspeed.__version__)
    torch.save(optim, optim_path)
    if not (target / STAGE3_MODEL_STATES).exists():
        os.link(target / STAGE12_MODEL_STATES, target / STAGE3_MODEL_STATES)
    if not (target / STAGE12_MODEL_STATES).exists():
        states = torch.load(target / STAGE3_MODEL_STATES, map_location="cpu", weights_only=False)
        module = {}
        for name, shape in shapes.items():
            fp32 = torch.load(target / "zero" / name / "fp32.pt", map_location="cpu", weights_only=False)
            module[name] = (fp32["param"] if isinstance(fp32, dict) else fp32).view(shape)
        for alias, name in tied.items():
            module[alias] = module[name]
        torch.save({**states, "module": module}, target / STAGE12_MODEL_STATES)
    for extra in target.glob("zero_pp_rank_[1-9]*_model_states.pt"):  # only rank 0's is read (pp_placeholder 0)
        extra.unlink()
