"""The training loop, shared by pretraining and fine-tuning (they differ in data and defaults): set-up
that checks everything before any work, then `train`, one loop of micro-steps through the DeepSpeed
engine with evaluation, HellaSwag, samples and checkpoints at intervals, and a checkpoint on SIGTERM."""

from __future__ import annotations

import math
import random
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
        return checkpoint.resolve(ck.checkpoint_path)
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
            raise UserError(f"{step_dir} was saved by {meta['world_size']} ranks under ZeRO-{meta['zero_stage']}; this "
                            f"run has {world_size} ranks under ZeRO-{engine.zero_stage(ds_config)}. Convert it first: "
                            f"`gptds convert zero-to-universal {step_dir} OUT_DIR`, then --resume --checkpoint_path "
                            f"OUT_DIR")


def save(eng, run: RunConfig, step: int, meta: dict, train_loader, result: RunResult) -> Path:
    """A checkpoint at `step` that every rank contributes to; complete once meta.json exists."""
    info = dist.info()
    per_rank = dist.all_gather_object({"loader": train_loader.state_dict(), "rng": rng_state()})
    step_dir = Path(run.checkpoint_dir) / checkpoint.step_tag(step)
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
    dist.barrier()
    result.checkpoint = str(step_dir)
    return step_dir


# ---------------------------------------------------------------- the loop

def train(run: RunConfig) -> RunResult:
    from gptds.data.loaders import build_loader, manifest_sha256
    info = dist.init_distributed()
    cfg, data = run.train, run.data

    # Everything that can be wrong with flags, config, data or checkpoint is found before any work.
    ds_config_path = engine.resolve_ds_config_path(cfg.deepspeed_config or engine.default_ds_config_name())
    ds_config = engine.load_ds_config(ds_config_path, micro_batch_size=data.batch_size,
                                      grad_accum_steps=cfg.grad_accum_steps, world_size=info.world_size,
                                      grad_clip=cfg.grad_clip, optimizer=cfg.optimizer)
    engine.check_precision_supported(ds_config_path, ds_config)
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
    model_config, model_source = model_config_for(run)
    if data.context_length > model_config.block_size:
        raise UserError(f"--context_length {data.context_length} exceeds the model's block_size "
                        f"{model_config.block_size} ({model_source})")
    resume_dir = resume_target(run)
    resume_meta = checkpoint.verify(resume_dir) if resume_dir else None
    if resume_meta:
        check_resumable(resume_meta, resume_dir, model_config, data_sha256, ds_config, run, info.world_size)
        if resume_meta.get("kind") == "universal":
            ds_config = engine.universal_load_config(ds_config)
    hellaswag_items = load_hellaswag(data.hellaswag_file, data.hellaswag_limit) if cfg.hellaswag_interval else []
    tokens_per_step = data.batch_size * data.context_length * cfg.grad_accum_steps * info.world_size

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
        mine = client["ranks"][info.rank] if len(client["ranks"]) == info.world_size else client["ranks"][0]
        train_loader.load_state_dict(mine["loader"])
        if len(client["ranks"]) == info.world_size:
            set_rng_state(mine["rng"])
        dist.print0(f"resumed from {resume_dir} at step {result.step}")

    precision = engine.precision(ds_config)
    peak = peak_flops(info.device, cfg.peak_tflops)
    meta = {"job": run.job, "model_config": model_config.to_dict(), "run_config": run.to_dict(),
            "data_dir": str(data_dir), "data_source": train_loader.manifest.get("source"),
            "data_manifest_sha256": data_sha256, "world_size": info.world_size,
            "zero_stage": engine.zero_stage(ds_config), "optimizer": cfg.optimizer, "precision": precision,
            "kind": "deepspeed"}
    dist.print0(f"gptds {run.job}: {n_params:,} parameters ({model_source}), ZeRO-{engine.zero_stage(ds_config)} "
                f"{precision} from {ds_config_path}, {info.world_size} rank(s) on {info.device.type}, optimizer "
                f"{cfg.optimizer}, attention {attention_backend(info.device, _param_dtype(eng))}, "
                f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, "
                f"{tokens_per_step:,} tokens/step, data {data_dir}")
    if getattr(train_loader, "truncated_records", 0):
        dist.print0(f"WARNING: {train_loader.truncated_records} training records are longer than --context_length "
                    f"{data.context_length} + 1 and are truncated")

    prompts = (list(PRETRAIN_PROMPTS) if run.job == "pretrain"
               else [_instruction_prompt(q) for q in FINETUNE_INSTRUCTIONS])
    log = MetricsLogger(cfg.log_dir, info.is_main)  # created once every check has passed
    stop = StopRequest()
    bad_in_a_row, step_times = 0, []
    prev_eval = None  # (val_loss, mean train loss since the eval before) for the overfitting warning
    train_losses_since_eval: list[float] = []
    last_saved = result.step if resume_dir else None
    start_step = result.step
    progress = _progress_bar(info, start_step, cfg.max_steps, run.job)
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps)
            engine.set_lr(eng, lr)
            eng.train()
            loss_sum, micro = 0.0, 0
            while micro < cfg.grad_accum_steps:
                x, y = train_loader.next_batch()
                _, loss = eng(x.to(info.device), y.to(info.device))
                # One small all-reduce per micro-step: the loss mean, whether any rank's loss is not
                # finite (then every rank skips that batch together), and whether a stop was requested.
                loss_value = loss.item()
                finite = math.isfinite(loss_value)
                flags = dist.all_reduce_sum(torch.tensor(
                    [loss_value if finite else 0.0, float(not finite), float(stop.signal is not None)],
                    dtype=torch.float64))
                if flags[1] > 0:
                    bad_in_a_row += 1
                    result.skipped_bad_steps += 1
                    dist.print0(f"step {step}: non-finite loss on {int(flags[1])} rank(s) at lr {lr:.3e}; "
                                f"batch skipped "
                                f"({bad_in_a_row} in a row)")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        raise UserError(f"stopping at step {step}: {bad_in_a_row} consecutive non-finite losses "
                                        f"(last loss {loss_value}, lr {lr:.3e}); resume from the last checkpoint "
                                        f"with a lower --lr or more --warmup_steps")
                    continue
                bad_in_a_row = 0
                eng.backward(loss)
                eng.step()
                loss_sum += flags[0].item() / info.world_size
                micro += 1
            step_loss = loss_sum / cfg.grad_accum_steps
            if result.optimizer_state_bytes_per_param is None:  # states exist after the first step
                local = sum(t.numel() * t.element_size() for t in engine.optimizer_state_tensors(eng))
                total = dist.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64)).item()
                result.optimizer_state_bytes_per_param = total / n_params
                _write(progress, f"optimizer state: {result.optimizer_state_bytes_per_param:.2f} bytes/parameter "
                       f"({cfg.optimizer})")
            result.losses[step] = step_loss
            train_losses_since_eval.append(step_loss)
            result.step = step + 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

            if result.step % cfg.log_interval == 0 or step == start_step or result.step == cfg.max_steps:
                recent = step_times[-cfg.log_interval:]
                tokens_per_second = tokens_per_step * len(recent) / sum(recent)
                metrics = {"loss": step_loss, "lr": lr, "grad_norm": engine.grad_norm(eng),
                           "tokens_per_second": tokens_per_second, "step_time_ms": 1000 * sum(recent) / len(recent),
                           "mfu": flops_per_step / (sum(recent) / len(recent)) / (peak * info.world_size)
                           if peak else None, "skipped_bad_steps": result.skipped_bad_steps,
                           **engine.fp16_state(eng)}
                log.log(result.step, metrics)
                eta = (cfg.max_steps - result.step) * sum(recent) / len(recent)
                _write(progress, f"step {result.step}/{cfg.max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | "
                       f"grad_norm {metrics['grad_norm'] or 0:.3f} | {tokens_per_second:,.0f} tok/s"
                       + (f" | mfu {100 * metrics['mfu']:.1f}%" if metrics["mfu"] else "")
                       + (f" | loss_scale {metrics['loss_scale']:g} skipped {metrics['skipped_steps']}"
                          if "loss_scale" in metrics else "")
                       + f" | {metrics['step_time_ms']:.0f} ms/step | eta {_hms(eta)}")

            last = result.step == cfg.max_steps
            if _due(cfg.eval_interval, result.step, last):
                eng.eval()
                result.val_loss = validation_loss(lambda x, y: eng(x, y)[1], val_loader, data.eval_batches,
                                                  info.device)
                perplexity = math.exp(min(result.val_loss, 50))
                log.log(result.step, {"val_loss": result.val_loss, "val_perplexity": perplexity})
                _write(progress, f"step {result.step}: val_loss {result.val_loss:.4f} "
                       f"(perplexity {perplexity:.1f})")
                mean_train = sum(train_losses_since_eval) / len(train_losses_since_eval)
                warning = overfitting_warning(prev_eval, (result.val_loss, mean_train))
                if warning:
                    _write(progress, warning)
                prev_eval, train_losses_since_eval = (result.val_loss, mean_train), []
            if hellaswag_items and _due(cfg.hellaswag_interval, result.step, last):
                eng.eval()
                scores = hellaswag_scores(lambda x: eng(x)[0], hellaswag_items, model_config.block_size, info.device)
                log.log(result.step, {k: v for k, v in scores.items() if k != "n"})
                _write(progress, f"step {result.step}: HellaSwag acc {scores['hellaswag_acc']:.4f} "
                       f"acc_norm {scores['hellaswag_acc_norm']:.4f} (n={scores['n']})")
            if _due(cfg.generate_interval, result.step, last):
                _log_samples(eng, prompts, cfg, result.step, log, progress, info)

            stop_requested = flags[2] > 0
            if stop_requested or _due(run.checkpoint.checkpoint_interval, result.step, last):
                save(eng, run, result.step, meta, train_loader, result)
                last_saved = result.step
                _write(progress, f"step {result.step}: checkpoint {result.checkpoint}")
            if stop_requested:
                result.stopped_by_signal = True
                _write(progress, f"stop requested by signal: checkpointed at step {result.step}, exiting")
                break
        if last_saved != result.step and result.step > start_step:
            save(eng, run, result.step, meta, train_loader, result)
    finally:
        stop.restore()
        progress.close()
        log.close()
    return result


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
