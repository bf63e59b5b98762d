"""The training loop, shared by every job (they differ in data and defaults, set up in session.py):
optimizer steps through the DeepSpeed engine until max_steps or a stop signal, with logging, evaluation,
HellaSwag, samples and checkpoints at their intervals. `train` reads top to bottom; the pieces of one step
and of each interval follow it."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptds import checkpoint, dist, engine, tasks
from gptds.config import RunConfig
from gptds.errors import UserError
from gptds.evaluate import run_task, validation_metrics
from gptds.generate import sample
from gptds.metrics import Console, MetricsLogger, hms
from gptds.model import token_losses
from gptds.session import Session, release, set_up
from gptds.tokenizer import decode

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM preemption sends one of these before SIGKILL
OVERHEAD_WARNING_SHARE = 0.10    # warn when evaluation, samples and checkpoints take more of the wall time...
OVERHEAD_WARNING_AFTER_S = 600   # ...in a run that has gone on at least this long (the CPU demo stays quiet)


def train(run: RunConfig) -> Session:
    """Set up (every check before any work), then optimizer steps until max_steps or a stop signal."""
    s = set_up(run)
    cfg, state = run.train, s.state
    log = MetricsLogger(cfg.log_dir, s.info.is_main, state.step, s.wandb)  # once every check has passed
    console = Console(s.info.is_main, state.step, s.max_steps, run.job)
    stop = StopRequest()
    clock = Clock()
    start_step, last_saved = state.step, state.step
    if state.step >= s.max_steps:  # e.g. `make demo` again: say so rather than exit without a word
        console.write(f"{cfg.log_dir}: complete, trained to step {state.step} of {s.max_steps}; nothing to do. "
                      f"Raise --max_steps to train on, or remove {cfg.log_dir} to start over")
    try:
        while state.step < s.max_steps:
            lr = lr_at(state.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.lr_decay_steps or s.max_steps)
            with clock.stepping():
                outcome = optimizer_step(s, lr, stop)
            if outcome.applied:
                state.step += 1
                state.bad_in_a_row = 0
                console.advance(loss=f"{outcome.loss:.4f}", lr=f"{lr:.2e}")
            else:  # a non-finite loss on some rank: nothing reached the weights; the next batches retry the step
                count_bad_step(s, outcome, lr, console)
            last = state.step == s.max_steps
            if outcome.applied and (state.step % cfg.log_interval == 0 or state.step == start_step + 1 or last):
                log_step(s, log, console, outcome, lr, clock)

            with clock.other():
                if outcome.applied:
                    s.batches_since_eval.append(outcome.loss)
                    if _due(cfg.eval_interval, state.step, last):
                        log_validation(s, log, console)
                    if s.hellaswag and _due(cfg.hellaswag_interval, state.step, last):
                        log_tasks(s, log, console, [s.hellaswag])
                    if s.eval_tasks and _due(cfg.eval_task_interval, state.step, last):
                        log_tasks(s, log, console, s.eval_tasks)
                    if _due(cfg.generate_interval, state.step, last):
                        log_samples(s, log, console)
                if outcome.stop_requested or (outcome.applied and _due(run.checkpoint.checkpoint_interval,
                                                                        state.step, last)):
                    save(s, console)
                    last_saved = state.step
            if outcome.stop_requested:
                state.stopped_by_signal = True
                console.write(f"stop requested by signal: checkpointed at step {state.step}, exiting")
                break
        if last_saved != state.step:
            save(s, console)
    finally:
        stop.restore()
        console.close()
        log.close()
        release(s.locks)
    return s


# ---------------------------------------------------------------- one optimizer step

@dataclass
class StepOutcome:
    loss: float            # mean over micro-batches and ranks (nan or inf when the step was skipped)
    applied: bool          # False: some rank's loss was not finite and the step was skipped on every rank
    bad_ranks: int         # micro-batches with a non-finite loss, summed over ranks
    stop_requested: bool   # some rank received SIGTERM/SIGUSR1
    component_losses: dict = field(default_factory=dict)  # a mixture's: loss/<component> (token-weighted)


def optimizer_step(s: Session, lr: float, stop: StopRequest) -> StepOutcome:
    """grad_accum_steps micro-batches through the engine, then the optimizer step. The losses, a count
    of non-finite ones and the stop flag are summed on the device and all-reduced once, right before the
    step: the step's one host synchronisation. If any rank saw a non-finite loss, every rank discards the
    accumulated gradients instead of stepping, so the weights and the optimizer state stay as they were."""
    eng, G = s.eng, s.batch.grad_accum_steps
    engine.set_lr(eng, lr)
    eng.train()
    # finite losses, non-finite count, stop flag, raw losses (nan or inf when some are), then for a mixture
    # each component's summed token losses and token counts: summed on the device
    components = len(s.data.components)
    sums = torch.zeros(4 + 2 * components, device=s.info.device, dtype=torch.float32)
    for micro in range(G):
        x, y, *options = s.batches.next()  # forward options: logits_at (responses only), RL's loss_weights
        logits, loss = eng(x, y, **(options[0] if options else {}))
        s.batches.prefetch()  # reads and copies the next batch while the device computes this one
        if components:
            per_row = token_losses(logits, y, logits.size(-1))  # (B, T), 0 where no loss is taken
            sums[4:4 + components].index_add_(0, s.batches.components, per_row.sum(dim=1))
            sums[4 + components:].index_add_(0, s.batches.components, (y != -100).sum(dim=1).float())
        eng.backward(loss)
        loss = loss.detach().float()
        sums[0] += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        sums[1] += (~torch.isfinite(loss)).float()
        sums[3] += loss
        if micro < G - 1:
            eng.step()  # not a boundary: DeepSpeed only counts the micro step
    sums[2] = float(stop.signal is not None)
    loss_sum, bad, stop_flag, raw_sum, *by_component = dist.all_reduce_sum(sums).tolist()  # the host sync
    engine.optimizer_step(eng, skip=bad > 0)
    n = G * s.info.world_size
    component_losses = {f"loss/{name}": total / count for (name, _), total, count
                        in zip(s.data.components, by_component[:components], by_component[components:]) if count}
    return StepOutcome(loss_sum / n if bad == 0 else raw_sum / n, bad == 0, int(bad), stop_flag > 0,
                       component_losses)


def count_bad_step(s: Session, outcome: StepOutcome, lr: float, console: Console) -> None:
    """Count a skipped step; --max_bad_steps of them in a row stop the run, naming the step, loss and lr."""
    state = s.state
    state.bad_in_a_row += 1
    state.skipped_bad_steps += 1
    console.write(f"step {state.step}: non-finite loss in {outcome.bad_ranks} micro-batch(es) at lr {lr:.3e}; "
                  f"optimizer step skipped on every rank ({state.bad_in_a_row} in a row)")
    if state.bad_in_a_row >= s.run.train.max_bad_steps:
        raise UserError(f"stopping at step {state.step}: {state.bad_in_a_row} consecutive non-finite losses (last "
                        f"loss {outcome.loss}, lr {lr:.3e}); resume from the "
                        f"last checkpoint with a lower --lr or more --warmup_steps")


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at decay_steps (then flat)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ---------------------------------------------------------------- at intervals

def log_step(s: Session, log: MetricsLogger, console: Console, outcome: StepOutcome, lr: float, clock: Clock) -> None:
    """Training metrics over the steps since the last log line, to TensorBoard/metrics.jsonl and one line
    with ETA. Reading the gradient norm synchronises with the device: done here, not every step."""
    step, step_time, loss = s.state.step, clock.mean_step_time(), outcome.loss
    metrics = {"loss": loss, **outcome.component_losses, "lr": lr, "grad_norm": engine.grad_norm(s.eng),
               "tokens_per_second": s.batch.global_batch_tokens / step_time, "step_time_ms": 1000 * step_time,
               "mfu": s.flops_per_step / step_time / (s.peak_flops * s.info.world_size) if s.peak_flops else None,
               "skipped_bad_steps": s.state.skipped_bad_steps, "overhead_share": clock.overhead_share(),
               **engine.fp16_state(s.eng), **s.batches.metrics(step_time, s.batch.grad_accum_steps)}
    log.log(step, metrics)
    console.write(f"step {step}/{s.max_steps} | loss {loss:.4f} | "
                  + (f"reward {metrics['reward']:.3f} (std {metrics['reward_std']:.3f}, "
                     f"{metrics['response_tokens']:.1f} tokens) | " if "reward" in metrics else "")
                  + f"lr {lr:.2e} | "
                  f"grad_norm {metrics['grad_norm'] or 0:.3f} | {metrics['tokens_per_second']:,.0f} tok/s"
                  + (f" | mfu {100 * metrics['mfu']:.1f}%" if metrics["mfu"] else "")
                  + (f" | loss_scale {metrics['loss_scale']:g} skipped {metrics['skipped_steps']}"
                     if "loss_scale" in metrics else "")
                  + f" | {metrics['step_time_ms']:.0f} ms/step | eta {hms((s.max_steps - step) * step_time)}")
    warning = clock.overhead_warning()
    if warning:
        console.write(warning)


def log_validation(s: Session, log: MetricsLogger, console: Console) -> None:
    """Validation loss, perplexity and bits per byte (the same batches); warns when validation rises while
    training loss falls."""
    s.eng.eval()
    by_component = {}
    for name, loader in [("", s.data.val), *s.data.components]:
        val = validation_metrics(lambda x, y: s.eng(x, y), loader, s.run.data.eval_batches, s.info.device,
                                 s.model_config.vocab_size)
        if not name:
            overall = val
        else:
            by_component[f"val_loss/{name}"] = val["val_loss"]
    val_loss = s.state.val_loss = overall["val_loss"]
    perplexity = math.exp(min(val_loss, 50))
    log.log(s.state.step, {"val_loss": val_loss, "val_perplexity": perplexity, "val_bpb": overall["val_bpb"],
                           **by_component})
    console.write(f"step {s.state.step}: val_loss {val_loss:.4f} (perplexity {perplexity:.1f}, "
                  f"bpb {overall['val_bpb']:.4f})" + "".join(f", {k} {v:.4f}" for k, v in by_component.items()))
    mean_train = sum(s.batches_since_eval) / len(s.batches_since_eval)
    warning = overfitting_warning(s.previous_eval, (val_loss, mean_train))
    if warning:
        console.write(warning)
    s.previous_eval, s.batches_since_eval = (val_loss, mean_train), []


def overfitting_warning(before: tuple[float, float] | None, now: tuple[float, float]) -> str | None:
    """A warning when validation loss rose while training loss fell between two evaluations; each
    argument is (val_loss, mean training loss since the evaluation before)."""
    if before is None or not (now[0] > before[0] and now[1] < before[1]):
        return None
    return (f"WARNING: validation loss rose ({before[0]:.4f} -> {now[0]:.4f}) while training loss fell "
            f"({before[1]:.4f} -> {now[1]:.4f}): the model is overfitting; fewer --max_steps or a lower --lr "
            f"may generalise better")


def log_tasks(s: Session, log: MetricsLogger, console: Console, to_score: list[tasks.Task]) -> None:
    """The tasks' metrics, every rank scoring its share of the items (ZeRO-3 ranks kept in step)."""
    s.eng.eval()
    fmt = tasks.prompt_format(s.meta.get("chat_format"))
    for task in to_score:
        scores = run_task(s.eng.module, task, s.model_config.block_size, s.info.device, fmt=fmt,
                          seed=s.run.train.seed, show_progress=True, **s.task_generation.get(task.name, {}),
                          progress_write=lambda line: console.write(f"step {s.state.step}: {line}"))
        log.log(s.state.step, {k: v for k, v in scores.items() if not k.endswith("_n")})
        shown = {k: v for k, v in scores.items() if not k.endswith("_n")
                 and not (k.startswith("mmlu_") and k not in ("mmlu_acc", "mmlu_acc_micro"))}  # not per subject
        line = " ".join(f"{k.removeprefix(task.name + '_')} {v:.4f}" for k, v in shown.items())
        console.write(f"step {s.state.step}: {task.name} {line} (n={scores[task.name + '_n']})")


def log_samples(s: Session, log: MetricsLogger, console: Console) -> None:
    """Samples for the job's fixed prompts. ZeRO-3 ranks must all run the forwards (parameters are
    gathered collectively); otherwise rank 0 samples alone."""
    cfg, step = s.run.train, s.state.step
    if s.eng.zero_optimization_stage() != 3 and not s.info.is_main:
        return
    texts = sample(s.eng.module, s.prompts, cfg.generate_max_new_tokens, temperature=0.8, top_k=200,
                   seed=cfg.seed, device=s.info.device)
    rollouts = s.batches.samples()  # RL: the last rollouts with their rewards
    if s.info.is_main:
        body = "\n\n".join(f"[{p if isinstance(p, str) else decode(p)}]{t}" for p, t in zip(s.prompts, texts))
        body += f"\n\n{rollouts}" if rollouts else ""
        console.write(f"step {step} samples:\n{body}")
        log.text(step, "samples", body)
        with open(Path(cfg.log_dir) / "samples.txt", "a") as f:
            f.write(f"=== step {step}\n{body}\n\n")


def save(s: Session, console: Console) -> None:
    s.state.checkpoint = str(checkpoint.save(s.eng, s.run.checkpoint_dir, s.state.step,
                                             {**s.meta, "val_loss": s.state.val_loss}, *s.stateful,
                                             keep_last_n=s.run.checkpoint.keep_last_n_checkpoints))
    console.write(f"step {s.state.step}: checkpoint {s.state.checkpoint}")


def _due(interval: int, step: int, last: bool) -> bool:
    return interval > 0 and (step % interval == 0 or last)


# ---------------------------------------------------------------- the loop's small helpers

class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 so the loop can checkpoint at the next step boundary and exit 0."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Clock:
    """Wall time spent in optimizer steps and outside them (evaluation, HellaSwag, samples, checkpoints)."""
    step_times: list[float] = field(default_factory=list)  # since the last log line
    stepping_s: float = 0.0
    other_s: float = 0.0
    warned: bool = False

    class _Span:
        def __init__(self, clock: Clock, stepping: bool):
            self.clock, self.is_step = clock, stepping

        def __enter__(self):
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            seconds = time.perf_counter() - self.t0
            if self.is_step:
                self.clock.stepping_s += seconds
                self.clock.step_times.append(seconds)
            else:
                self.clock.other_s += seconds

    def stepping(self) -> _Span:
        return Clock._Span(self, True)

    def other(self) -> _Span:
        return Clock._Span(self, False)

    def mean_step_time(self) -> float:
        """Mean time of the steps since the last call (then forgotten)."""
        recent, self.step_times = self.step_times or [float("nan")], []
        return sum(recent) / len(recent)

    def overhead_share(self) -> float | None:
        total = self.stepping_s + self.other_s
        return self.other_s / total if total > 0 else None

    def overhead_warning(self) -> str | None:
        share = self.overhead_share()
        if self.warned or share is None or self.stepping_s + self.other_s < OVERHEAD_WARNING_AFTER_S \
                or share <= OVERHEAD_WARNING_SHARE:
            return None
        self.warned = True
        return (f"WARNING: {100 * share:.0f}% of the wall time went to evaluation, HellaSwag, samples and "
                f"checkpoints, not training; raise --eval_interval, --hellaswag_interval, --eval_task_interval, "
                f"--generate_interval and --checkpoint_interval (see the README's GPU settings)")
