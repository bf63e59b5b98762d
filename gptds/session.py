"""A training session: `set_up` checks everything a run needs before any work (folders, the DeepSpeed
JSON against the run's batch arithmetic, data, the checkpoint to resume from), then builds the model,
the engine and the loaders and restores the checkpoint. The Session it returns is what the loop in
train.py works with; other jobs (chat, LoRA, RL) build theirs the same way."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gptds import checkpoint, dist, engine, rl, tasks
from gptds.config import Batch, RunConfig, ds_conflict_message, resolve_ds_config_path
from gptds.data.chat import chat_format_of
from gptds.data.loaders import DeviceBatches, TrainingData, build_training_data, load_manifest, parse_data_dirs
from gptds.errors import UserError
from gptds.jobs import JOBS, sample_prompts
from gptds.locks import FolderLock
from gptds.lora import apply as lora_apply
from gptds.lora import weights_sha256
from gptds.metrics import check_wandb_installed, flops_per_token, new_wandb_run_id, peak_flops
from gptds.model import GPT, GPTConfig, attention_backend, compile_blocks
from gptds.staging import check_no_overlap, check_writable
from gptds.tokenizer import CHAT_VOCAB_SIZE
from gptds.weights import load_weights, model_from_state_dict, read_config


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
    data: TrainingData           # the loaders behind them, validation's, a mixture's components
    model_config: GPTConfig
    batch: Batch
    max_steps: int
    meta: dict                   # written beside every checkpoint (checkpoint.py)
    n_params: int
    flops_per_step: float
    peak_flops: float | None
    hellaswag: tasks.Task | None   # scored every --hellaswag_interval steps
    eval_tasks: list[tasks.Task]   # scored every --eval_task_interval steps
    prompts: list[str | list[int]]
    locks: list[FolderLock]      # the run folder's and checkpoint folder's (held by rank 0; release() at the end)
    state: LoopState = field(default_factory=LoopState)
    resumed_from_step: int | None = None  # the checkpoint's step when the run resumed
    batches_since_eval: list[float] = field(default_factory=list)  # training losses since the last evaluation
    previous_eval: tuple[float, float] | None = None  # (val_loss, mean training loss before it)
    task_generation: dict = field(default_factory=dict)  # by task name: generation settings (RL's held-out task)

    @property
    def wandb(self) -> dict | None:
        """What MetricsLogger needs for W&B (rank 0 of a run with --wandb_project), else None."""
        if not (self.run.train.wandb_project and "wandb_run_id" in self.meta):
            return None
        return {"project": self.run.train.wandb_project, "id": self.meta["wandb_run_id"], "config": self.meta}

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


NEW_MODEL_VOCAB_PADDING = 64  # 50304 rows for GPT-2's 50257 tokens: what the fast peers use


def model_config_for(run: RunConfig, resume_meta: dict | None) -> tuple[GPTConfig, str]:
    """Architecture: the pretrained checkpoint's, else the --model preset's. The vocabulary padding is
    --pad_vocab_to_multiple_of, else the resumed or pretrained checkpoint's own, else 64."""
    pad = run.train.pad_vocab_to_multiple_of
    if pad is None and resume_meta:
        pad = resume_meta["model_config"].get("pad_vocab_to_multiple_of", 1)
    if run.checkpoint.pretrained_checkpoint:
        config = read_config(run.checkpoint.pretrained_checkpoint)
        return replace(config, pad_vocab_to_multiple_of=pad or config.pad_vocab_to_multiple_of), \
            run.checkpoint.pretrained_checkpoint
    return (GPTConfig.from_preset(run.train.model, pad_vocab_to_multiple_of=pad or NEW_MODEL_VOCAB_PADDING),
            f"preset {run.train.model!r}")


def compile_wanted(run: RunConfig, device: torch.device, zero_stage: int) -> bool:
    """--compile, or by default on CUDA; refused under ZeRO-3, whose parameter-gathering hooks (disabled
    for torch.compile in DeepSpeed) break the graph at every Linear and LayerNorm: nothing would be fused,
    only compile time spent (DeepSpeed's own DeepCompile is the route there, not wired up in gptds)."""
    wanted = run.train.compile if run.train.compile is not None else device.type == "cuda"
    if wanted and zero_stage == 3:
        if run.train.compile:
            raise UserError("--compile does not work under ZeRO-3: DeepSpeed's parameter-gathering hooks break "
                            "the compiled graph at every layer, so nothing is fused; use ZeRO-1/2, or --no-compile")
        return False
    return wanted


def load_eval_tasks(run: RunConfig) -> tuple[tasks.Task | None, list[tasks.Task]]:
    """HellaSwag for --hellaswag_interval, and the --eval_tasks, read and checked before any work."""
    data, cfg = run.data, run.train
    hellaswag = tasks.load_task("hellaswag", {"hellaswag": data.hellaswag_file} if data.hellaswag_file else {},
                                data.hellaswag_limit) if cfg.hellaswag_interval else None
    if not (data.eval_tasks and cfg.eval_task_interval):
        return hellaswag, []
    files = tasks.parse_task_files(data.eval_task_file)
    names = tasks.task_names(data.eval_tasks, files)
    if "bpb" in names:
        raise UserError("--eval_tasks bpb: bits per byte is logged as val_bpb beside val_loss every --eval_interval "
                        "steps, over the same batches")
    return hellaswag, tasks.load_tasks(names, files, data.eval_task_limit)


def prepare_demo_data(run: RunConfig) -> Path:
    """No --data_dir: the job's bundled sample, prepared once into <log_dir>/data."""
    out = Path(run.train.log_dir) / "data"
    if dist.info().is_main and not (out / "manifest.json").exists():
        dist.print0(f"no --data_dir: preparing the bundled demo data into {out}")
        JOBS[run.job].prepare_demo(out, run.data.context_length)
    dist.barrier()
    return out


def build_model(run: RunConfig, model_config: GPTConfig, resume_dir: Path | None,
                resume_meta: dict | None) -> tuple[GPT, dict | None]:
    """The model the engine trains: fresh, the pretrained weights, or (LoRA) a frozen base with adapters; the
    base is loaded on resume too, since a LoRA checkpoint holds only what trains. Returns it and, for LoRA,
    the record of its adapters and base for meta.json."""
    ck, lora = run.checkpoint, run.lora
    base_path = ck.pretrained_checkpoint
    if lora.lora_rank and resume_meta and resume_meta.get("lora"):
        base_path = resume_meta["lora"]["base"]["path"]  # where the run's base came from
    if lora.lora_rank and not base_path:
        raise UserError("--lora_rank trains adapters on a frozen base: give the base with --pretrained_checkpoint")
    if not base_path or (resume_dir is not None and not lora.lora_rank):
        if run.job == "finetune" and resume_dir is None:
            dist.print0("WARNING: fine-tuning from RANDOM weights: no --pretrained_checkpoint was given. "
                        "Pass a pretraining checkpoint, weights file or Hugging Face GPT-2 folder.")
        return GPT(model_config), None  # a fresh model, or one whose weights the checkpoint restores
    base_config, base_weights = load_weights(base_path)
    model = model_from_state_dict(model_config, base_weights, base_config.vocab_size)
    dist.print0(f"initialised from pretrained weights {base_path}")
    if not lora.lora_rank:
        return model, None
    new_tokens = list(range(base_config.vocab_size, model_config.vocab_size))
    lora_apply(model, lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.targets, new_tokens,
               lora.lora_base_bits)
    record = {"rank": lora.lora_rank, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
              "targets": lora.targets, "base_bits": lora.lora_base_bits, "new_token_ids": new_tokens,
              "base": {"path": str(Path(base_path).absolute()), "sha256": weights_sha256(base_weights)}}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dist.print0(f"LoRA rank {lora.lora_rank} on {', '.join(lora.targets)}"
                + (" (base in 4 bits)" if lora.lora_base_bits else "")
                + (f", {len(new_tokens)} new token rows" if new_tokens else "")
                + f": {trainable:,} trainable parameters, the base frozen")
    return model, record


def check_same_lora(saved: dict, step_dir: Path, now: dict | None) -> None:
    """A LoRA run resumes with the same adapters on the same base (its content, wherever it now lies), and a
    run without adapters does not resume a LoRA checkpoint (or the reverse)."""
    before = saved.get("lora") or {}
    if not before and not now:
        return
    if not now:
        raise UserError(f"{step_dir} holds LoRA adapters (rank {before.get('rank')} on "
                        f"{', '.join(before.get('targets', []))}), not a whole model; resume with the same --lora_* "
                        f"flags")
    differs = [k for k in ("rank", "alpha", "dropout", "targets", "base_bits", "new_token_ids")
               if before.get(k) != now.get(k)]
    if differs:
        raise UserError(f"{step_dir} was trained with other LoRA settings ({', '.join(differs)}: "
                        f"{ {k: before.get(k) for k in differs} }); resume with the same --lora_* flags")
    if before.get("base", {}).get("sha256") != now["base"]["sha256"]:
        raise UserError(f"{step_dir}: its adapters belong to a base whose weights have another checksum than "
                        f"{now['base']['path']}; resume on the base it was trained on")


def set_up(run: RunConfig) -> Session:
    """Check flags, DeepSpeed config, data and any checkpoint to resume before any work; take the run's
    folders (one run per folder); then build the model, the engine and the loaders, and load the checkpoint."""
    info = dist.init_distributed()
    cfg, data = run.train, run.data
    batch = run.batch(info.world_size)
    if run.job == "rl":
        rl.check_run(run)

    check_writable(cfg.log_dir, "--log_dir")
    check_writable(run.checkpoint_dir, "--checkpoint_dir")
    if cfg.wandb_project:
        check_wandb_installed()
    ds_config_path, ds_config = load_ds_config(run, batch)
    specs = parse_data_dirs(data.data_dir) if data.data_dir else []
    for path, _ in specs:
        load_manifest(path)  # a folder that is not a prepared dataset is the first thing to say
    reads_task_files = (data.eval_tasks and cfg.eval_task_interval) or run.job == "rl"  # RL: its held-out split
    task_files = tasks.parse_task_files(data.eval_task_file) if reads_task_files else {}
    item_files = [("--eval_task_file", path) for path in task_files.values()]
    if run.job == "rl" and run.rl.task_file:
        item_files.append(("--task_file", run.rl.task_file))
    inputs = [("--data_dir", path) for path, _ in specs] + [
        ("--pretrained_checkpoint", run.checkpoint.pretrained_checkpoint), ("--hellaswag_file", data.hellaswag_file),
        ("--deepspeed_config", ds_config_path)] + [
        (flag, path) for flag, path in item_files if not path.startswith("hub:")]
    check_no_overlap([("--log_dir", cfg.log_dir)], inputs, allow_inputs_inside=True)
    check_no_overlap([("--checkpoint_dir", run.checkpoint_dir)], inputs)  # pruning would delete them
    engine.check_precision_supported(ds_config_path, ds_config)
    locks: list[FolderLock] = []
    dist.on_main(lambda: locks.extend(lock_run_folders(run)))  # rank 0 holds them; every rank learns if it could
    try:
        return _build(run, info, batch, ds_config_path, ds_config, specs, locks)
    except BaseException:
        release(locks, undo=True)  # and remove the folders the lock created, if the run wrote nothing there
        raise


def check_training_data(run: RunConfig, training_data: TrainingData, specs: list[tuple[Path, float]],
                        batch: Batch) -> None:
    """Enough sequences for one optimizer step, of a kind the job trains on."""
    train_loader, job = training_data.train, JOBS[run.job]
    if train_loader.batches_per_epoch() < batch.grad_accum_steps:  # a step would read sequences more than once
        raise UserError(f"{training_data.description}: the train split holds "
                        f"{train_loader.batches_per_epoch() * train_loader.sequences_per_micro_step} sequences of "
                        f"{run.data.context_length + 1} tokens, fewer than one optimizer step takes (micro batch "
                        f"{batch.micro_batch_size} x grad accumulation {batch.grad_accum_steps} x {batch.world_size} "
                        f"rank(s) = {batch.global_batch_size}); lower --micro_batch_size/--grad_accum_steps or "
                        f"prepare more data")
    (kind,) = training_data.kinds if len(specs) == 1 else (None,)
    if len(specs) == 1 and kind not in job.data_kinds:
        raise UserError(f"{specs[0][0]}: holds {kind!r} data; `gptds {run.job}` needs data from "
                        f"`{job.prepare_command}` (or a mixture: several --data_dir DIR:WEIGHT)")


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
           specs: list[tuple[Path, float]], locks: list[FolderLock]) -> Session:
    """set_up's second half, inside the run's folders: the checkpoint to resume, data, model, engine."""
    cfg, data, ck = run.train, run.data, run.checkpoint
    # Rank 0 finds and verifies (reads every byte of) the checkpoint to resume; the other ranks take its word.
    resume_dir = dist.on_main(lambda: checkpoint.resume_target(run.checkpoint_dir, ck))
    resume_meta = checkpoint.verify(resume_dir, "sizes") if resume_dir else None
    model_config, model_source = model_config_for(run, resume_meta)
    use_compile = compile_wanted(run, info.device, engine.zero_stage(ds_config))
    if run.lora.lora_base_bits and engine.zero_stage(ds_config) == 3:
        raise UserError("--lora_base_bits 4 does not work under ZeRO-3: ZeRO-3 flattens and partitions every "
                        "parameter across the ranks, and bitsandbytes' packed 4-bit weights (with their "
                        "quantisation state) cannot be split and gathered that way; use ZeRO-1 or ZeRO-2, where "
                        "the frozen 4-bit base stays whole on each rank and only the adapters are partitioned")
    if data.context_length > model_config.block_size:
        raise UserError(f"--context_length {data.context_length} exceeds the model's block_size "
                        f"{model_config.block_size} ({model_source})")
    if run.job == "rl":  # the prompts the policy samples for, in the place of training data
        fmt = tasks.prompt_format(chat_format_of(model_config))
        if resume_dir is None and not ck.pretrained_checkpoint:
            raise UserError("`gptds rl` improves a model that already answers in the task's format: give it with "
                            "--pretrained_checkpoint (e.g. the chat model of `gptds finetune`; README, "
                            "\"Reinforcement learning\")")
        prompt_set = rl.load_prompts(run, fmt, model_config.block_size, info.world_size)
        training_data = rl.training_data(prompt_set, run.rl)
    else:
        specs = specs or [(prepare_demo_data(run), 1.0)]
        training_data = build_training_data(specs, data.micro_batch_size, data.context_length, info.rank,
                                            info.world_size, cfg.seed, validates=cfg.eval_interval > 0)
        check_training_data(run, training_data, specs, batch)
    train_loader = training_data.train
    if training_data.vocab_size > model_config.vocab_size:
        if training_data.vocab_size != CHAT_VOCAB_SIZE:
            raise UserError(f"{training_data.description}: the data uses {training_data.vocab_size} token ids, the "
                            f"model ({model_source}) has {model_config.vocab_size}")
        # conversations bring the ChatML tokens: their embedding rows (tied with the output layer) are added,
        # initialised from the mean of the existing rows (load_model), and train with the rest
        model_config = replace(model_config, vocab_size=CHAT_VOCAB_SIZE)
    meta = {"job": run.job, "model_config": model_config.to_dict(), "run_config": run.to_dict(),
            "data_dir": training_data.description, "data_source": training_data.source,
            "data_manifest_sha256": training_data.sha256, "world_size": info.world_size,
            "zero_stage": engine.zero_stage(ds_config), "optimizer": cfg.optimizer,
            "precision": engine.precision(ds_config), "kind": "deepspeed",
            "chat_format": chat_format_of(model_config)}
    if cfg.wandb_project and info.is_main:  # a resumed run continues its W&B run
        meta["wandb_run_id"] = (resume_meta or {}).get("wandb_run_id") or new_wandb_run_id()
    if resume_meta:
        checkpoint.check_resumable(resume_meta, resume_dir, meta)
        if run.job == "rl":
            rl.check_same_rl(resume_meta, resume_dir, run)
        if resume_meta.get("kind") == "universal":
            ds_config = engine.universal_load_config(ds_config)
    hellaswag, eval_tasks = load_eval_tasks(run)
    task_generation, prompts = {}, sample_prompts(training_data.kinds)
    if run.job == "rl":  # its held-out split: sampled at intervals, and scored with RL's sampling settings
        held_out, generation, prompts = rl.held_out(run, fmt)
        if cfg.eval_task_interval:
            eval_tasks, task_generation = [held_out, *eval_tasks], {held_out.name: generation}
    # No --max_steps (fine-tuning's default): one epoch of the training split.
    max_steps = cfg.max_steps or max(1, train_loader.batches_per_epoch() // cfg.grad_accum_steps)

    # The model: identical initial weights on every rank (same seed), then DeepSpeed partitions them.
    torch.manual_seed(cfg.seed)
    model, lora_record = build_model(run, model_config, resume_dir, resume_meta)
    if lora_record:
        meta["lora"] = lora_record
    if resume_meta:
        check_same_lora(resume_meta, resume_dir, lora_record)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.to(info.device)
    if use_compile:
        compile_blocks(model)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    flops_per_step = flops_per_token(model.num_parameters(exclude_position_embedding=True), model_config.n_layer,
                                     model_config.n_embd, data.context_length) * batch.global_batch_tokens
    optimizer = engine.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, ds_config)
    eng = engine.initialize(model, optimizer, ds_config)
    torch.manual_seed(cfg.seed + info.rank)  # per-rank streams (dropout) from here on

    batches = (rl.Rollouts(prompt_set, eng.module, run.rl, fmt, info, cfg.seed) if run.job == "rl"
               else DeviceBatches(train_loader, info.device))
    s = Session(run, info, eng, batches, training_data, model_config, batch, max_steps, meta, n_params,
                flops_per_step, None if run.job == "rl" else peak_flops(info.device, cfg.peak_tflops), hellaswag,
                eval_tasks, prompts, locks, task_generation=task_generation)
    if resume_dir is not None:
        s.state.step = s.resumed_from_step = checkpoint.load(eng, resume_dir, *s.stateful)
        s.state.val_loss = s.state.val_loss if s.state.val_loss is not None else resume_meta.get("val_loss")
        dist.print0(f"resumed from {resume_dir} at step {s.state.step}")

    dtype = next(eng.module.parameters()).dtype
    dist.print0(f"gptds {run.job}: {n_params:,} parameters ({model_source}), ZeRO-{meta['zero_stage']} "
                f"{meta['precision']} from {ds_config_path}, {info.world_size} rank(s) on {info.device.type}, "
                f"optimizer {cfg.optimizer}, attention {attention_backend(info.device, dtype)}, "
                f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
                f"compile {'on' if use_compile else 'off'}, "
                + (f"{batch.global_batch_size} completions/step ({batch.global_batch_size // run.rl.num_samples} "
                   f"prompts x {run.rl.num_samples} samples)" if run.job == "rl"
                   else f"{batch.global_batch_tokens:,} tokens/step") + f", {max_steps} steps"
                f"{'' if cfg.max_steps else ' (one epoch)'}, data {training_data.description}")
    if getattr(train_loader, "truncated_records", 0):
        dist.print0(f"WARNING: {train_loader.truncated_records} training records are longer than --context_length "
                    f"{data.context_length} + 1 and are truncated")
    return s
