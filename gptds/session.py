"""A training session: `set_up` checks everything a run needs before any work (folders, the DeepSpeed
JSON against the run's batch arithmetic, data, the checkpoint to resume from), then builds the model,
the engine and the loaders and restores the checkpoint. The Session it returns is what the loop in
train.py works with; other jobs (chat, LoRA, RL) build theirs the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptds import checkpoint, dist, engine
from gptds.config import Batch, RunConfig, ds_conflict_message, resolve_ds_config_path
from gptds.data.loaders import DeviceBatches, build_loader, load_manifest, manifest_sha256
from gptds.errors import UserError
from gptds.evaluate import load_hellaswag
from gptds.jobs import JOBS
from gptds.locks import FolderLock
from gptds.metrics import flops_per_token, peak_flops
from gptds.model import GPT, GPTConfig, attention_backend
from gptds.staging import check_no_overlap, check_writable
from gptds.weights import load_model, read_config


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (checkpoint.py's "stateful" parts)."""
    step: int = 0                  # optimizer steps taken
    val_loss: float | None = None  # at the last evaluation
    skipped_bad_steps: int = 0     # optimizer steps skipped for a non-finite loss, in all
    bad_in_a_row: int = 0          # ... consecutively, up to now
    stopped_by_signal: bool = False
    checkpoint: str | None = None  # the last one written

    def state_dict(self) -> dict:
        return {"step": self.step, "val_loss": self.val_loss, "skipped_bad_steps": self.skipped_bad_steps,
                "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.val_loss = state["step"], state.get("val_loss")
        self.skipped_bad_steps = state.get("skipped_bad_steps", 0)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)


@dataclass
class Session:
    """Everything the loop works with, built by `set_up` once every check has passed."""
    run: RunConfig
    info: dist.DistInfo
    eng: object                  # the DeepSpeed engine
    batches: DeviceBatches       # training batches on the rank's device
    val_loader: object
    model_config: GPTConfig
    batch: Batch
    max_steps: int
    meta: dict                   # written beside every checkpoint (checkpoint.py)
    n_params: int
    flops_per_step: float
    peak_flops: float | None
    hellaswag_items: list
    prompts: list[str]
    locks: list[FolderLock]      # the run folder's and checkpoint folder's (held by rank 0; release() at the end)
    state: LoopState = field(default_factory=LoopState)
    resumed_from_step: int | None = None  # the checkpoint's step when the run resumed
    batches_since_eval: list[float] = field(default_factory=list)  # training losses since the last evaluation
    previous_eval: tuple[float, float] | None = None  # (val_loss, mean training loss before it)

    @property
    def stateful(self) -> tuple[dict, dict]:
        """(shared, per-rank) stateful parts for checkpoint.save/load."""
        return {"loop": self.state}, {"loader": self.batches, "rng": checkpoint.RNGState()}


def load_ds_config(run: RunConfig, batch: Batch) -> tuple[Path, dict]:
    """The DeepSpeed JSON the run names, checked against the run's values and completed."""
    path = resolve_ds_config_path(run.train.deepspeed_config)
    config = engine.read_ds_config(path)
    owned = batch.ds_values(run.train.grad_clip)
    for key, given, wanted in engine.owned_conflicts(config, owned):
        raise UserError(ds_conflict_message(path, key, given, wanted, batch))
    if run.train.optimizer == "adamw8bit" and engine.offloads_optimizer(config):
        raise UserError(f"{path} offloads the optimizer to CPU, where DeepSpeed steps it with DeepSpeedCPUAdam; "
                        f"bitsandbytes' 8-bit AdamW keeps its state beside the parameters and cannot be offloaded. "
                        f"Use --optimizer adamw with this config, or a config without offload_optimizer")
    return path, engine.complete_ds_config(path, config, owned, untested_optimizer=run.train.optimizer == "adamw8bit")


def model_config_for(run: RunConfig) -> tuple[GPTConfig, str]:
    """Architecture: the pretrained checkpoint's, else the --model preset's."""
    if run.checkpoint.pretrained_checkpoint:
        return read_config(run.checkpoint.pretrained_checkpoint), run.checkpoint.pretrained_checkpoint
    return GPTConfig.from_preset(run.train.model), f"preset {run.train.model!r}"


def prepare_demo_data(run: RunConfig) -> Path:
    """No --data_dir: the job's bundled sample, prepared once into <log_dir>/data."""
    out = Path(run.train.log_dir) / "data"
    if dist.info().is_main and not (out / "manifest.json").exists():
        dist.print0(f"no --data_dir: preparing the bundled demo data into {out}")
        JOBS[run.job].prepare_demo(out, run.data.context_length)
    dist.barrier()
    return out


def set_up(run: RunConfig) -> Session:
    """Check flags, DeepSpeed config, data and any checkpoint to resume before any work; take the run's
    folders (one run per folder); then build the model, the engine and the loaders, and load the checkpoint."""
    info = dist.init_distributed()
    cfg, data = run.train, run.data
    batch = run.batch(info.world_size)

    check_writable(cfg.log_dir, "--log_dir")
    check_writable(run.checkpoint_dir, "--checkpoint_dir")
    ds_config_path, ds_config = load_ds_config(run, batch)
    if data.data_dir:
        load_manifest(data.data_dir)  # a folder that is not a prepared dataset is the first thing to say
    inputs = [("--data_dir", data.data_dir), ("--pretrained_checkpoint", run.checkpoint.pretrained_checkpoint),
              ("--hellaswag_file", data.hellaswag_file), ("--deepspeed_config", ds_config_path)]
    check_no_overlap([("--log_dir", cfg.log_dir)], inputs, allow_inputs_inside=True)
    check_no_overlap([("--checkpoint_dir", run.checkpoint_dir)], inputs)  # pruning would delete them
    engine.check_precision_supported(ds_config_path, ds_config)
    model_config, model_source = model_config_for(run)
    if data.context_length > model_config.block_size:
        raise UserError(f"--context_length {data.context_length} exceeds the model's block_size "
                        f"{model_config.block_size} ({model_source})")
    locks: list[FolderLock] = []
    dist.on_main(lambda: locks.extend(lock_run_folders(run)))  # rank 0 holds them; every rank learns if it could
    try:
        return _build(run, info, batch, ds_config_path, ds_config, model_config, model_source, locks)
    except BaseException:
        release(locks, undo=True)  # and remove the folders the lock created, if the run wrote nothing there
        raise


def lock_run_folders(run: RunConfig) -> list[FolderLock]:
    """The run folder and the checkpoint folder, each locked for this run (waiting up to --lock_wait_s for a
    run that holds one to end); UserError naming the holder otherwise."""
    held, seen = [], set()
    try:
        for flag, folder in (("--log_dir", run.train.log_dir), ("--checkpoint_dir", run.checkpoint_dir)):
            if Path(folder).resolve() not in seen:
                seen.add(Path(folder).resolve())
                held.append(FolderLock(Path(folder), flag).acquire(run.train.lock_wait_s, dist.print0))
    except BaseException:
        release(held, undo=True)
        raise
    return held


def release(locks: list[FolderLock], undo: bool = False) -> None:
    for lock in reversed(locks):
        lock.release(undo)
    locks.clear()


def _build(run: RunConfig, info: dist.DistInfo, batch: Batch, ds_config_path: Path, ds_config: dict,
           model_config: GPTConfig, model_source: str, locks: list[FolderLock]) -> Session:
    """set_up's second half, inside the run's folders: data, the checkpoint to resume, model, engine."""
    cfg, data, job, ck = run.train, run.data, JOBS[run.job], run.checkpoint
    data_dir = Path(data.data_dir) if data.data_dir else prepare_demo_data(run)
    train_loader = build_loader(data_dir, "train", data.micro_batch_size, data.context_length, info.rank,
                                info.world_size, cfg.seed)
    val_loader = build_loader(data_dir, "val", data.micro_batch_size, data.context_length, info.rank,
                              info.world_size, cfg.seed, shuffle=False)
    rows = train_loader.rows_per_epoch()
    if batch.global_batch_size > rows:  # one step would read the same sequences more than once
        raise UserError(f"{data_dir}: the train split holds {rows} sequences of {data.context_length + 1} tokens, "
                        f"fewer than one optimizer step takes (micro batch {batch.micro_batch_size} x grad "
                        f"accumulation {batch.grad_accum_steps} x {batch.world_size} rank(s) = "
                        f"{batch.global_batch_size}); lower --micro_batch_size/--grad_accum_steps or prepare more data")
    kind = train_loader.manifest["kind"]
    if kind != job.data_kind:
        raise UserError(f"{data_dir}: holds {kind!r} data; `gptds {run.job}` needs data from "
                        f"`{job.prepare_command}`")
    # Rank 0 finds and verifies (reads every byte of) the checkpoint to resume; the other ranks take its word.
    resume_dir = dist.on_main(lambda: checkpoint.resume_target(run.checkpoint_dir, ck))
    resume_meta = checkpoint.verify(resume_dir, "sizes") if resume_dir else None
    meta = {"job": run.job, "model_config": model_config.to_dict(), "run_config": run.to_dict(),
            "data_dir": str(data_dir), "data_source": train_loader.manifest.get("source"),
            "data_manifest_sha256": manifest_sha256(data_dir), "world_size": info.world_size,
            "zero_stage": engine.zero_stage(ds_config), "optimizer": cfg.optimizer,
            "precision": engine.precision(ds_config), "kind": "deepspeed"}
    if resume_meta:
        checkpoint.check_resumable(resume_meta, resume_dir, meta)
        if resume_meta.get("kind") == "universal":
            ds_config = engine.universal_load_config(ds_config)
    hellaswag_items = load_hellaswag(data.hellaswag_file, data.hellaswag_limit) if cfg.hellaswag_interval else []
    # No --max_steps (fine-tuning's default): one epoch of the training split.
    max_steps = cfg.max_steps or max(1, train_loader.batches_per_epoch() // cfg.grad_accum_steps)

    # The model: identical initial weights on every rank (same seed), then DeepSpeed partitions them.
    torch.manual_seed(cfg.seed)
    model = GPT(model_config)
    if ck.pretrained_checkpoint and resume_dir is None:
        model = load_model(ck.pretrained_checkpoint)
        dist.print0(f"initialised from pretrained weights {ck.pretrained_checkpoint}")
    elif run.job == "finetune" and resume_dir is None:
        dist.print0("WARNING: fine-tuning from RANDOM weights: no --pretrained_checkpoint was given. "
                    "Pass a pretraining checkpoint, weights file or Hugging Face GPT-2 folder.")
    model.activation_checkpointing = cfg.activation_checkpointing
    model.to(info.device)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    flops_per_step = flops_per_token(model.num_parameters(exclude_position_embedding=True), model_config.n_layer,
                                     model_config.n_embd, data.context_length) * batch.global_batch_tokens
    optimizer = engine.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, ds_config)
    eng = engine.initialize(model, optimizer, ds_config)
    torch.manual_seed(cfg.seed + info.rank)  # per-rank streams (dropout) from here on

    s = Session(run, info, eng, DeviceBatches(train_loader, info.device), val_loader, model_config, batch,
                max_steps, meta, n_params, flops_per_step, peak_flops(info.device, cfg.peak_tflops), hellaswag_items,
                job.sample_prompts(), locks)
    if resume_dir is not None:
        s.state.step = s.resumed_from_step = checkpoint.load(eng, resume_dir, *s.stateful)
        s.state.val_loss = s.state.val_loss if s.state.val_loss is not None else resume_meta.get("val_loss")
        dist.print0(f"resumed from {resume_dir} at step {s.state.step}")

    dtype = next(eng.module.parameters()).dtype
    dist.print0(f"gptds {run.job}: {n_params:,} parameters ({model_source}), ZeRO-{meta['zero_stage']} "
                f"{meta['precision']} from {ds_config_path}, {info.world_size} rank(s) on {info.device.type}, "
                f"optimizer {cfg.optimizer}, attention {attention_backend(info.device, dtype)}, "
                f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
                f"{batch.global_batch_tokens:,} tokens/step, {max_steps} steps"
                f"{'' if cfg.max_steps else ' (one epoch)'}, data {data_dir}")
    if getattr(train_loader, "truncated_records", 0):
        dist.print0(f"WARNING: {train_loader.truncated_records} training records are longer than --context_length "
                    f"{data.context_length} + 1 and are truncated")
    return s
