"""The training loop, shared by pretraining and fine-tuning (they differ in data and defaults): `set_up`
checks everything before any work and builds the engine; `train` is the loop of optimizer steps through
the DeepSpeed engine, with evaluation, HellaSwag, samples and checkpoints at intervals, and a checkpoint
on SIGTERM/SIGUSR1; the pieces of one step follow it."""

from __future__ import annotations

import errno
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gptds import checkpoint, dist, engine
from gptds.config import RunConfig
from gptds.errors import UserError
from gptds.evaluate import hellaswag_scores, load_hellaswag, validation_loss
from gptds.generate import FINETUNE_INSTRUCTIONS, PRETRAIN_PROMPTS, sample
from gptds.metrics import MetricsLogger, flops_per_token, peak_flops
from gptds.model import GPT, GPTConfig, attention_backend
from gptds.tokenizer import ASSETS_DIR

EXPECTED_DATA_KIND = {"pretrain": "text", "finetune": "instruct"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM preemption sends one of these before SIGKILL


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at decay_steps (then flat)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def overfitting_warning(before: tuple[float, float] | None, now: tuple[float, float]) -> str | None:
    """A warning when validation loss rose while training loss fell between two evaluations; each
    argument is (val_loss, mean training loss since the evaluation before)."""
    if before is None or not (now[0] > before[0] and now[1] < before[1]):
        return None
    return (f"WARNING: validation loss rose ({before[0]:.4f} -> {now[0]:.4f}) while training loss fell "
            f"({before[1]:.4f} -> {now[1]:.4f}): the model is overfitting; fewer --max_steps or a lower --lr "
            f"may generalise better")


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary and exit 0."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class RunResult:
    """What a finished run reports (the CLI prints it; tests read it)."""
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean training loss over ranks
    val_loss: float | None = None
    stopped_by_signal: bool = False
    skipped_bad_steps: int = 0
    checkpoint: str | None = None
    optimizer_state_bytes_per_param: float | None = None  # all ranks' optimizer state / parameter count


# ---------------------------------------------------------------- set-up, all checked before work

def prepare_demo_data(run: RunConfig, info: dist.DistInfo) -> Path:
    """No --data_dir: the bundled sample (tiny Shakespeare, or 300 Dolly records), prepared once."""
    from gptds.data.prepare import PrepareDollyConfig, PrepareTextConfig, prepare_dolly, prepare_text
    out = Path(run.train.log_dir) / "data"
    if info.is_main and not (out / "manifest.json").exists():
        dist.print0(f"no --data_dir: preparing the bundled demo data into {out}")
        if run.job == "pretrain":
            prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")], output_dir=str(out),
                                           val_fraction=0.1, overwrite=True, num_workers=1))
        else:
            prepare_dolly(PrepareDollyConfig(input=[str(ASSETS_DIR / "dolly_sample.jsonl")], output_dir=str(out),
                                             context_length=run.data.context_length, overwrite=True, num_workers=1))
    dist.barrier()
    return out


def resume_target(run: RunConfig) -> Path | None:
    """The step folder to continue from, or None for a fresh start."""
    ck = run.checkpoint
    if ck.resume:
        target = checkpoint.resolve(ck.checkpoint_path)
        step = checkpoint.read_meta(target).get("step", 0)
        newer = [p.name for p in checkpoint.complete_checkpoints(run.checkpoint_dir) if checkpoint.step_of(p) > step]
        if newer:  # keep-last-N and --auto_resume rank by step: they would prefer these to the new saves
            raise UserError(f"--resume from step {step} ({target}) into {run.checkpoint_dir}, which holds newer "
                            f"checkpoints ({', '.join(newer)}) that keep-last-N and --auto_resume would take for "
                            f"this run's; resume into a new --log_dir/--checkpoint_dir, or delete those folders")
        return target
    latest = checkpoint.find_latest(run.checkpoint_dir)
    if ck.auto_resume:
        return latest
    if latest is not None:
        raise UserError(f"{run.checkpoint_dir} already holds checkpoints (newest {latest.name}); pass --auto_resume "
                        f"to continue that run, or a new --log_dir/--checkpoint_dir for a new one")
    return None


def model_config_for(run: RunConfig) -> tuple[GPTConfig, str]:
    """Architecture: the pretrained checkpoint's, else the --model preset's."""
    if run.checkpoint.pretrained_checkpoint:
        from gptds.weights import read_config
        return read_config(run.checkpoint.pretrained_checkpoint), run.checkpoint.pretrained_checkpoint
    return GPTConfig.from_preset(run.train.model), f"preset {run.train.model!r}"


def check_resumable(meta: dict, step_dir: Path, model_config: GPTConfig, data_sha256: str, ds_config: dict,
                    run: RunConfig, world_size: int) -> None:
    """Refuse a resume that would silently continue a different run."""
    fix = "start a new run (another --log_dir), or initialise from these weights with --pretrained_checkpoint"
    if meta["model_config"] != model_config.to_dict():
        diff = {k: (v, model_config.to_dict().get(k)) for k, v in meta["model_config"].items()
                if model_config.to_dict().get(k) != v}
        raise UserError(f"{step_dir} was trained with another model config (checkpoint vs this run: {diff}); "
                        f"resume with the same --model, or {fix}")
    if meta["data_manifest_sha256"] != data_sha256:
        raise UserError(f"{step_dir} was trained on other data (manifest sha256 {meta['data_manifest_sha256'][:12]} "
                        f"vs {data_sha256[:12]} now); resume with the same --data_dir, or {fix}")
    if meta["optimizer"] != run.train.optimizer:
        raise UserError(f"{step_dir} was trained with --optimizer {meta['optimizer']}; resume with the same optimizer")
    if meta.get("kind") != "universal":
        if meta["world_size"] != world_size or meta["zero_stage"] != engine.zero_stage(ds_config):
            saved = (f"{step_dir} was saved by {meta['world_size']} ranks under ZeRO-{meta['zero_stage']}; this run "
                     f"has {world_size} ranks under ZeRO-{engine.zero_stage(ds_config)}")
            if meta["optimizer"] == "adamw8bit":  # convert.py refuses it: no per-parameter form of 8-bit moments
                raise UserError(f"{saved}. Its 8-bit AdamW state only resumes on the same ranks and stage: run with "
                                f"{meta['world_size']} ranks under ZeRO-{meta['zero_stage']}, or {fix}")
            raise UserError(f"{saved}. Convert it first: `gptds convert zero-to-universal {step_dir} OUT_DIR`, then "
                            f"--resume --checkpoint_path OUT_DIR")


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written (a file where a folder of its
    path should be, a read-only file system), instead of failing at the first log line or checkpoint."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: cannot create it: {existing} is a file ({os.strerror(errno.ENOTDIR)})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write below {existing} ({os.strerror(errno.EACCES)})")


def save(eng, run: RunConfig, step: int, meta: dict, train_loader, result: RunResult) -> Path:
    """A checkpoint at `step` that every rank contributes to; complete once meta.json exists. A rank
    that cannot write its files (disk full) raises UserError without reaching the barrier before
    meta.json, so the folder stays incomplete; the launcher ends the ranks still waiting there."""
    info = dist.info()
    per_rank = dist.all_gather_object({"loader": train_loader.state_dict(), "rng": rng_state()})
    step_dir = Path(run.checkpoint_dir) / checkpoint.step_tag(step)
    try:
        if info.is_main:
            checkpoint.prepare_step_dir(run.checkpoint_dir, step)
        dist.barrier()
        engine.save_checkpoint(eng, run.checkpoint_dir, step_dir.name,
                               client_state={"gptds": {"step": step, "ranks": per_rank}})
        dist.barrier()  # every rank's shard is on disk before the folder is marked complete
        if info.is_main:
            checkpoint.write_meta(step_dir, {**meta, "step": step, "val_loss": result.val_loss})
            for old in checkpoint.prune(run.checkpoint_dir, run.checkpoint.keep_last_n_checkpoints):
                dist.print0(f"removed old checkpoint {old.name}")
    except OSError as e:
        latest = checkpoint.find_latest(run.checkpoint_dir)
        free = (f", {shutil.disk_usage(run.checkpoint_dir).free / 2**30:.1f} GiB free there"
                if Path(run.checkpoint_dir).is_dir() else "")
        raise UserError(f"cannot write checkpoint {e.filename or step_dir}: {e.strerror or e}{free}; "
                        f"{step_dir.name} stays incomplete and --auto_resume continues from "
                        f"{latest.name if latest else 'the start'}. Free some space or choose another "
                        f"--checkpoint_dir") from None
    dist.barrier()
    result.checkpoint = str(step_dir)
    return step_dir


@dataclass
class Session:
    """Everything the loop works with, built by `set_up` once every check has passed."""
    info: dist.DistInfo
    eng: object  # the DeepSpeed engine
    train_loader: object
    val_loader: object
    model_config: GPTConfig
    max_steps: int
    meta: dict  # written beside every checkpoint (checkpoint.py)
    n_params: int
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float | None
    hellaswag_items: list
    prompts: list[str]
    result: RunResult  # at the resumed step, or step 0


def set_up(run: RunConfig) -> Session:
    """Check flags, DeepSpeed config, data and any checkpoint to resume before any work; then build the
    model, the engine and the loaders, and load the checkpoint."""
    from gptds.data.loaders import build_loader, manifest_sha256
    info = dist.init_distributed()
    cfg, data = run.train, run.data

    check_writable(cfg.log_dir, "--log_dir")
    check_writable(run.checkpoint_dir, "--checkpoint_dir")
    ds_config_path = engine.resolve_ds_config_path(cfg.deepspeed_config or engine.default_ds_config_name())
    ds_config = engine.load_ds_config(ds_config_path, micro_batch_size=data.batch_size,
                                      grad_accum_steps=cfg.grad_accum_steps, world_size=info.world_size,
                                      grad_clip=cfg.grad_clip, optimizer=cfg.optimizer)
    engine.check_precision_supported(ds_config_path, ds_config)
    model_config, model_source = model_config_for(run)
    if data.context_length > model_config.block_size:
        raise UserError(f"--context_length {data.context_length} exceeds the model's block_size "
                        f"{model_config.block_size} ({model_source})")
    data_dir = Path(data.data_dir) if data.data_dir else prepare_demo_data(run, info)
    train_loader = build_loader(data_dir, "train", data.batch_size, data.context_length, info.rank,
                                info.world_size, cfg.seed)
    val_loader = build_loader(data_dir, "val", data.batch_size, data.context_length, info.rank, info.world_size,
                              cfg.seed, shuffle=False)
    kind = train_loader.manifest["kind"]
    if kind != EXPECTED_DATA_KIND[run.job]:
        raise UserError(f"{data_dir}: holds {kind!r} data; `gptds {run.job}` needs data from "
                        f"`gptds prepare {'text' if run.job == 'pretrain' else 'dolly'}`")
    data_sha256 = manifest_sha256(data_dir)
    resume_dir = resume_target(run)
    resume_meta = checkpoint.verify(resume_dir) if resume_dir else None
    if resume_meta:
        check_resumable(resume_meta, resume_dir, model_config, data_sha256, ds_config, run, info.world_size)
        if resume_meta.get("kind") == "universal":
            ds_config = engine.universal_load_config(ds_config)
    hellaswag_items = load_hellaswag(data.hellaswag_file, data.hellaswag_limit) if cfg.hellaswag_interval else []
    tokens_per_step = data.batch_size * data.context_length * cfg.grad_accum_steps * info.world_size
    # No --max_steps (fine-tuning's default): one epoch of the training split.
    max_steps = cfg.max_steps or max(1, train_loader.batches_per_epoch() // cfg.grad_accum_steps)

    # The model: identical initial weights on every rank (same seed), then DeepSpeed partitions them.
    torch.manual_seed(cfg.seed)
    model = GPT(model_config)
    if run.checkpoint.pretrained_checkpoint and resume_dir is None:
        from gptds.weights import load_weights, model_from_state_dict
        model = model_from_state_dict(*load_weights(run.checkpoint.pretrained_checkpoint))
        dist.print0(f"initialised from pretrained weights {run.checkpoint.pretrained_checkpoint}")
    elif run.job == "finetune" and resume_dir is None:
        dist.print0("WARNING: fine-tuning from RANDOM weights: no --pretrained_checkpoint was given. "
                    "Pass a pretraining checkpoint, weights file or Hugging Face GPT-2 folder.")
    model.activation_checkpointing = cfg.activation_checkpointing
    model.to(info.device)
    n_params = model.num_parameters()  # before ZeRO-3 partitions the parameters
    flops_per_step = flops_per_token(model.num_parameters(exclude_position_embedding=True), model_config.n_layer,
                                     model_config.n_embd, data.context_length) * tokens_per_step
    optimizer = engine.build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, ds_config)
    eng = engine.initialize(model, optimizer, ds_config)
    torch.manual_seed(cfg.seed + info.rank)  # per-rank streams (dropout) from here on

    result = RunResult(step=0)
    if resume_dir is not None:
        client = engine.load_checkpoint(eng, resume_dir)["gptds"]
        result.step, result.val_loss = client["step"], resume_meta.get("val_loss")
        same_world = len(client["ranks"]) == info.world_size
        mine = client["ranks"][info.rank] if same_world else client["ranks"][0]
        train_loader.load_state_dict(mine["loader"])
        if same_world:
            set_rng_state(mine["rng"])
        dist.print0(f"resumed from {resume_dir} at step {result.step}")

    precision = engine.precision(ds_config)
    meta = {"job": run.job, "model_config": model_config.to_dict(), "run_config": run.to_dict(),
            "data_dir": str(data_dir), "data_source": train_loader.manifest.get("source"),
            "data_manifest_sha256": data_sha256, "world_size": info.world_size,
            "zero_stage": engine.zero_stage(ds_config), "optimizer": cfg.optimizer, "precision": precision,
            "kind": "deepspeed"}
    dist.print0(f"gptds {run.job}: {n_params:,} parameters ({model_source}), ZeRO-{engine.zero_stage(ds_config)} "
                f"{precision} from {ds_config_path}, {info.world_size} rank(s) on {info.device.type}, optimizer "
                f"{cfg.optimizer}, attention {attention_backend(info.device, _param_dtype(eng))}, "
                f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
                f"{tokens_per_step:,} tokens/step, {max_steps} steps"
                f"{'' if cfg.max_steps else ' (one epoch)'}, data {data_dir}")
    if getattr(train_loader, "truncated_records", 0):
        dist.print0(f"WARNING: {train_loader.truncated_records} training records are longer than --context_length "
                    f"{data.context_length} + 1 and are truncated")
    prompts = (list(PRETRAIN_PROMPTS) if run.job == "pretrain"
               else [_instruction_prompt(q) for q in FINETUNE_INSTRUCTIONS])
    return Session(info, eng, train_loader, val_loader, model_config, max_steps, meta, n_params, tokens_per_step,
                   flops_per_step, peak_flops(info.device, cfg.peak_tflops), hellaswag_items, prompts, result)


# ---------------------------------------------------------------- the loop

def train(run: RunConfig) -> RunResult:
    """Set up (every check before any work), then optimizer steps until max_steps or a stop signal, with
    logging, evaluation, HellaSwag, samples and checkpoints at their intervals."""
    s = set_up(run)
    cfg, info, eng, result = run.train, s.info, s.eng, s.result
    log = MetricsLogger(cfg.log_dir, info.is_main, result.step)  # created once every check has passed
    stop = StopRequest()
    bad = BadStepCounter(cfg.max_bad_steps, result)
    step_times: list[float] = []
    evals = EvalHistory()
    start_step = result.step
    last_saved = start_step if start_step else None
    progress = _progress_bar(info, start_step, s.max_steps, run.job)
    try:
        for step in range(start_step, s.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.lr_decay_steps or s.max_steps)
            engine.set_lr(eng, lr)
            eng.train()
            step_loss, stop_requested = optimizer_step(s, cfg.grad_accum_steps, step, lr, bad, stop)
            result.losses[step] = step_loss
            result.step = step + 1
            last = result.step == s.max_steps
            step_times.append(time.perf_counter() - t0)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if result.optimizer_state_bytes_per_param is None:  # states exist after the first step
                result.optimizer_state_bytes_per_param = optimizer_state_bytes_per_param(s)
                _write(progress, f"optimizer state: {result.optimizer_state_bytes_per_param:.2f} bytes/parameter "
                       f"({cfg.optimizer})")
            if result.step % cfg.log_interval == 0 or step == start_step or last:
                log_step(s, log, progress, step_loss, lr, step_times[-cfg.log_interval:])

            evals.train_losses.append(step_loss)
            if _due(cfg.eval_interval, result.step, last):
                evaluate(s, run, log, progress, evals)
            if s.hellaswag_items and _due(cfg.hellaswag_interval, result.step, last):
                hellaswag(s, log, progress)
            if _due(cfg.generate_interval, result.step, last):
                _log_samples(eng, s.prompts, cfg, result.step, log, progress, info)

            if stop_requested or _due(run.checkpoint.checkpoint_interval, result.step, last):
                save(eng, run, result.step, s.meta, s.train_loader, result)
                last_saved = result.step
                _write(progress, f"step {result.step}: checkpoint {result.checkpoint}")
            if stop_requested:
                result.stopped_by_signal = True
                _write(progress, f"stop requested by signal: checkpointed at step {result.step}, exiting")
                break
        if last_saved != result.step and result.step > start_step:
            save(eng, run, result.step, s.meta, s.train_loader, result)
    finally:
        stop.restore()
        progress.close()
        log.close()
    return result


# ---------------------------------------------------------------- the pieces of one step

class BadStepCounter:
    """Non-finite losses: each such batch is skipped and counted; K in a row stop the run."""

    def __init__(self, limit: int, result: RunResult):
        self.limit, self.in_a_row, self.result = limit, 0, result

    def bad(self, step: int, ranks: int, loss: float, lr: float) -> None:
        self.in_a_row += 1
        self.result.skipped_bad_steps += 1
        dist.print0(f"step {step}: non-finite loss on {ranks} rank(s) at lr {lr:.3e}; batch skipped "
                    f"({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise UserError(f"stopping at step {step}: {self.in_a_row} consecutive non-finite losses (last loss "
                            f"{loss}, lr {lr:.3e}); resume from the last checkpoint with a lower --lr or more "
                            f"--warmup_steps")

    def good(self) -> None:
        self.in_a_row = 0


def optimizer_step(s: Session, grad_accum_steps: int, step: int, lr: float, bad: BadStepCounter,
                   stop: StopRequest) -> tuple[float, bool]:
    """grad_accum_steps finite micro-batches through the engine (backward, step); returns the step's mean
    loss over micro-batches and ranks, and whether any rank was asked to stop. One small all-reduce per
    micro-batch carries the loss, whether any rank's loss is not finite (then every rank skips that batch
    together) and the stop flag."""
    info, eng = s.info, s.eng
    loss_sum, micro = 0.0, 0
    while micro < grad_accum_steps:
        x, y = s.train_loader.next_batch()
        _, loss = eng(x.to(info.device), y.to(info.device))
        loss_value = loss.item()
        flags = dist.all_reduce_sum(torch.tensor(
            [loss_value, float(not math.isfinite(loss_value)), float(stop.signal is not None)],
            dtype=torch.float64))
        if flags[1] > 0:
            bad.bad(step, int(flags[1]), flags[0].item() / info.world_size, lr)
            continue
        bad.good()
        eng.backward(loss)
        eng.step()
        loss_sum += flags[0].item() / info.world_size
        micro += 1
    return loss_sum / grad_accum_steps, bool(flags[2] > 0)


def optimizer_state_bytes_per_param(s: Session) -> float:
    local = sum(t.numel() * t.element_size() for t in engine.optimizer_state_tensors(s.eng))
    return dist.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64)).item() / s.n_params


def log_step(s: Session, log: MetricsLogger, progress, loss: float, lr: float, recent: list[float]) -> None:
    """Training metrics averaged over the recent steps, to TensorBoard/metrics.jsonl and one line with ETA."""
    step, mean_time = s.result.step, sum(recent) / len(recent)
    metrics = {"loss": loss, "lr": lr, "grad_norm": engine.grad_norm(s.eng),
               "tokens_per_second": s.tokens_per_step / mean_time, "step_time_ms": 1000 * mean_time,
               "mfu": s.flops_per_step / mean_time / (s.peak_flops * s.info.world_size) if s.peak_flops else None,
               "skipped_bad_steps": s.result.skipped_bad_steps, **engine.fp16_state(s.eng)}
    log.log(step, metrics)
    _write(progress, f"step {step}/{s.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
           f"grad_norm {metrics['grad_norm'] or 0:.3f} | {metrics['tokens_per_second']:,.0f} tok/s"
           + (f" | mfu {100 * metrics['mfu']:.1f}%" if metrics["mfu"] else "")
           + (f" | loss_scale {metrics['loss_scale']:g} skipped {metrics['skipped_steps']}"
              if "loss_scale" in metrics else "")
           + f" | {metrics['step_time_ms']:.0f} ms/step | eta {_hms((s.max_steps - step) * mean_time)}")


@dataclass
class EvalHistory:
    previous: tuple[float, float] | None = None  # (val_loss, mean train loss before it)
    train_losses: list[float] = field(default_factory=list)  # since the previous evaluation


def evaluate(s: Session, run: RunConfig, log: MetricsLogger, progress, evals: EvalHistory) -> None:
    """Validation loss and perplexity; warns when validation rises while training loss falls."""
    s.eng.eval()
    val_loss = validation_loss(lambda x, y: s.eng(x, y)[1], s.val_loader, run.data.eval_batches, s.info.device)
    s.result.val_loss = val_loss
    perplexity = math.exp(min(val_loss, 50))
    log.log(s.result.step, {"val_loss": val_loss, "val_perplexity": perplexity})
    _write(progress, f"step {s.result.step}: val_loss {val_loss:.4f} (perplexity {perplexity:.1f})")
    mean_train = sum(evals.train_losses) / len(evals.train_losses)
    warning = overfitting_warning(evals.previous, (val_loss, mean_train))
    if warning:
        _write(progress, warning)
    evals.previous, evals.train_losses = (val_loss, mean_train), []


def hellaswag(s: Session, log: MetricsLogger, progress) -> None:
    s.eng.eval()
    scores = hellaswag_scores(lambda x: s.eng(x)[0], s.hellaswag_items, s.model_config.block_size, s.info.device)
    log.log(s.result.step, {k: v for k, v in scores.items() if k != "n"})
    _write(progress, f"step {s.result.step}: HellaSwag acc {scores['hellaswag_acc']:.4f} "
           f"acc_norm {scores['hellaswag_acc_norm']:.4f} (n={scores['n']})")


# ---------------------------------------------------------------- small helpers of the loop

def _due(interval: int, step: int, last: bool) -> bool:
    return interval > 0 and (step % interval == 0 or last)


def _param_dtype(eng) -> torch.dtype:
    return next(eng.module.parameters()).dtype


def _instruction_prompt(question: str) -> str:
    from gptds.data.instruct import InstructRecord, render_prompt
    return render_prompt(InstructRecord(instruction=question, context="", response=""))


def _log_samples(eng, prompts, cfg, step, log, progress, info) -> None:
    # ZeRO-3 ranks must all run the forwards (parameters are gathered collectively); otherwise rank 0 alone.
    if eng.zero_optimization_stage() == 3 or info.is_main:
        texts = sample(eng.module, prompts, cfg.generate_max_new_tokens, temperature=0.8, top_k=200,
                       seed=cfg.seed, device=info.device)
        if info.is_main:
            body = "\n\n".join(f"[{p}]{t}" for p, t in zip(prompts, texts))
            _write(progress, f"step {step} samples:\n{body}")
            log.text(step, "samples", body)
            with open(Path(cfg.log_dir) / "samples.txt", "a") as f:
                f.write(f"=== step {step}\n{body}\n\n")


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress_bar(info, start: int, total: int, job: str):
    """A tqdm bar with ETA on an interactive rank 0; log lines carry the ETA everywhere else."""
    import sys
    if not (info.is_main and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=job, unit="step", dynamic_ncols=True)


def _write(progress, line: str) -> None:
    if dist.info().is_main:
        if isinstance(progress, _NoBar):
            print(line, flush=True)
        else:
            from tqdm import tqdm
            tqdm.write(line)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
