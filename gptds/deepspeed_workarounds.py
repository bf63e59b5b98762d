"""Where gptds reaches into DeepSpeed's internals, fenced in one file: each function names the DeepSpeed
behaviour it works around, why gptds cannot live with it, the upstream issue where there is one, and the
DeepSpeed versions it was checked on. A DeepSpeed upgrade is a review of this file (and the tests that
exercise each function: named below). Only engine.py calls these."""

from __future__ import annotations

import difflib
import importlib
import json
import os
import time
from pathlib import Path

import torch

from gptds.errors import UserError
from gptds.locks import describe, holder_is_dead, holder_record, who_holds

CHECKED_ON = ("0.19.8",)  # deepspeed versions every workaround below was tested with


# ---------------------------------------------------------------- config validation

def check_config(config: dict) -> tuple[list[str], str | None, list[str]]:
    """What DeepSpeed would silently get wrong in a config, found by parsing it as DeepSpeed does
    (DeepSpeedConfig). Returns (unknown top-level keys with "did you mean" hints, DeepSpeed's own validation
    error in one line or None, values DeepSpeed would reinterpret):
    - DeepSpeed validates its typed sections but ignores top-level keys it does not know: a typo such as
      "zero_optimisation" silently trains without ZeRO. A key is known when DeepSpeedConfig looks it up while
      parsing, or when DeepSpeed names it among its config constants (keys read elsewhere, e.g. "aio").
    - Its typed sections (pydantic models) coerce in lax mode: "enabled": "false" becomes False, 1 becomes
      True, true becomes 1, so a config can say one thing and train another (and gptds's banner and meta.json
      would report the string's truthiness). Every value of a section DeepSpeed parsed is compared with what
      DeepSpeed made of it; a string, boolean or number turned into another kind is reported.
    - Top-level scalars are read raw (a string "10" for steps_per_print fails at the first step): a value
      whose JSON type differs from DeepSpeed's default's (bool vs number), or a string spelling a boolean or a
      number, is reported too.
    Upstream: no warning for unknown keys, lax coercion (checked on CHECKED_ON). Tests: tests/test_ds_configs.py,
    tests/test_hostile_inputs.py."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    class LookupsRecorded(dict):
        def __init__(self, *args):
            super().__init__(*args)
            self.looked_up = set()

        def get(self, key, *default):
            self.looked_up.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            self.looked_up.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.looked_up.add(key)
            return super().__contains__(key)

    parsed, init = [], DeepSpeedConfigModel.__init__

    def recording_init(self, strict=False, **data):
        init(self, strict=strict, **data)
        parsed.append((self, data))

    retyped = []  # top-level scalars first: DeepSpeed may fail on them with a TypeError of its own
    for key, value in config.items():
        why = None if isinstance(value, (dict, list)) else _retyped_scalar(value, _deepspeed_defaults().get(key))
        if why:
            retyped.append(f"{key} = {json.dumps(value)} ({why})")
    if retyped:
        return [], None, retyped
    recorded = LookupsRecorded(config)
    DeepSpeedConfigModel.__init__ = recording_init
    try:
        DeepSpeedConfig(recorded)
    except Exception as e:  # noqa: BLE001 (pydantic ValidationError, AssertionError, ValueError, ...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
        return [], " / ".join(lines[:4]) or type(e).__name__, []
    finally:
        DeepSpeedConfigModel.__init__ = init
    known = recorded.looked_up | _deepspeed_key_names()
    hints = []
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), 1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key, value in config.items():
        models = [model for model, data in parsed if isinstance(value, dict) and value and data == value]
        if models:
            _retyped_in_section(value, models[0], key, retyped)
    return hints, None, retyped


def _retyped_in_section(raw: dict, model, path: str, out: list[str]) -> None:
    """Values of a JSON section that DeepSpeed's model `model` turned into another kind (see check_config)."""
    from pydantic import BaseModel
    fields = {}
    for name, info in type(model).model_fields.items():
        fields[name] = name
        if info.alias:
            fields[info.alias] = name
    for key, value in raw.items():
        if key not in fields or value == "auto":
            continue
        now = getattr(model, fields[key], None)
        if isinstance(value, dict) and isinstance(now, BaseModel):
            _retyped_in_section(value, now, f"{path}.{key}", out)
            continue
        why = _retyped_scalar(value, now)
        if why:
            out.append(f"{path}.{key} = {json.dumps(value)} ({why})")


def _retyped_scalar(raw, now) -> str | None:
    """Why a JSON value `raw` read as `now` (DeepSpeed's parsed value, or its default's) changed kind, or None."""
    if isinstance(raw, bool):
        return None if now is None or isinstance(now, bool) else "a boolean where DeepSpeed expects a number"
    if isinstance(raw, (int, float)):
        return "a number where DeepSpeed expects true or false" if isinstance(now, bool) else None
    if isinstance(raw, str) and raw != "auto":
        if isinstance(now, (bool, int, float)) and not isinstance(now, str):
            return f"a string where DeepSpeed expects {'true or false' if isinstance(now, bool) else 'a number'}"
        if now is None and raw.strip().lower() in ("true", "false"):
            return "a string where DeepSpeed expects true or false"
        if now is None and _is_number(raw):
            return "a string where DeepSpeed expects a number"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _deepspeed_defaults() -> dict[str, object]:
    """Top-level key -> DeepSpeed's default value, from its constants (KEY = "key", KEY_DEFAULT = value)."""
    constants = vars(importlib.import_module("deepspeed.runtime.constants"))
    return {constants[name[:-8]]: value for name, value in constants.items()
            if name.endswith("_DEFAULT") and isinstance(constants.get(name[:-8]), str)}


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


BUILD_LOCK_WAIT_S = 480  # a build lock whose holder is alive or unknown: waited on this long at most (below
#                          the 10-minute collective timeout the other ranks wait under meanwhile)


def bound_jit_build_locks() -> None:
    """DeepSpeed JIT-compiles its ops (cpu_adam for CPU offload, async_io for NVMe offload, fused ops on GPUs)
    through torch.utils.cpp_extension.load, which builds under a lock file <build folder>/lock (FileBaton):
    created empty, deleted when the build ends. A process killed mid-build leaves it, and every later build of
    that op waits in FileBaton.wait forever, printing nothing (seen with cpu_adam). Patched, for every op any
    process of this gptds builds: the lock records its holder's host and pid (holder_record); a lock whose
    holder is dead (this host, pid gone) is cleared and the build taken over; any other lock (a live build, or
    one by another program that does not record itself) is waited on BUILD_LOCK_WAIT_S at most, then a
    one-line UserError names the file to delete. Checked on torch 2.13.0 with CHECKED_ON; tests:
    tests/test_reliability.py (stale build locks)."""
    from torch.utils.file_baton import FileBaton
    if getattr(FileBaton, "gptds_bounded", False):
        return

    def try_acquire(self) -> bool:
        for _ in range(2):
            try:
                self.fd = os.open(self.lock_file_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                os.write(self.fd, json.dumps(holder_record()).encode())
                return True
            except FileExistsError:
                holder = _build_lock_holder(self.lock_file_path)
                if not (holder and holder_is_dead(holder)):
                    return False
                Path(self.lock_file_path).unlink(missing_ok=True)  # a killed build's: take it over
        return False

    def wait(self) -> None:
        deadline = time.monotonic() + BUILD_LOCK_WAIT_S
        while os.path.exists(self.lock_file_path):
            holder = _build_lock_holder(self.lock_file_path)
            if holder and holder_is_dead(holder):
                Path(self.lock_file_path).unlink(missing_ok=True)
                raise UserError(f"the build of the DeepSpeed op in {Path(self.lock_file_path).parent} was killed "
                                f"({describe(holder)}); its lock is cleared: run again to build it")
            if time.monotonic() > deadline:
                raise UserError(f"waited {BUILD_LOCK_WAIT_S} s for the DeepSpeed op build lock "
                                f"{self.lock_file_path} ({describe(holder) if holder else 'no holder recorded'}); "
                                f"if no build is running, delete that file and run again, or prebuild the ops "
                                f"(README, 'DeepSpeed ops')")
            time.sleep(self.wait_seconds)

    FileBaton.try_acquire, FileBaton.wait, FileBaton.gptds_bounded = try_acquire, wait, True


def _build_lock_holder(path: str) -> dict | None:
    try:
        return who_holds(Path(path).read_text(errors="replace"))
    except OSError:
        return None


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

def writing_files_through(engine, open_file):
    """A context for engine.save_checkpoint in which every file DeepSpeed writes goes into open_file(path),
    a file object gptds controls (checkpoint.ChecksummedFile: it checksums the bytes as they are written
    and keeps the OSError of a failed write), and in which a failed write does not raise. Yields the list
    of the file objects used. Why: torch.save reports a failed write (a full disk) as a RuntimeError
    "[enforce fail at inline_container.cc:...] unexpected pos" with neither the errno nor the path; and a
    rank that raises half-way through save_checkpoint leaves the others waiting in its barrier until the
    launcher kills them (a gloo traceback each). Here every rank finishes save_checkpoint and the caller
    reads each file's outcome (.error) and agrees with the other ranks on it. Wraps
    engine.checkpoint_engine.save (an attribute of the engine since 0.10); the default
    TorchCheckpointEngine.save(state_dict, path) is torch.save(state_dict, path, ...), which takes a file
    object as well as a path. Checked on CHECKED_ON; tests: tests/test_reliability.py (ENOSPC mid-save)."""
    import contextlib

    @contextlib.contextmanager
    def patched():
        write = engine.checkpoint_engine.save
        opened = []

        def write_through(state_dict, path):
            f = open_file(path)
            opened.append(f)
            try:
                write(state_dict, f)
            except (OSError, RuntimeError):
                if f.error is None:  # not a failed write: a bug, with its traceback
                    raise
            finally:
                f.close()

        engine.checkpoint_engine.save = write_through
        try:
            yield opened
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
