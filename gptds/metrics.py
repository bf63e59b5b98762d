"""Where training metrics go, from rank 0 only: TensorBoard scalars and text, metrics.jsonl (one JSON
object per logged step, with the same names as the TensorBoard tags, for scripts), Weights & Biases when
asked (the same names again), and the console (a
progress bar with ETA on a terminal, plain lines elsewhere), and the progress of long evaluations.
Also the FLOPs estimate behind MFU."""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from gptds.errors import UserError, parse_json

# Dense bf16/fp16 tensor-core peaks, in FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, context_length: int) -> float:
    """Training FLOPs per token, PaLM appendix B / nanoGPT: 6N for the matmuls with the parameters
    (forward 2N, backward 4N) plus 12*L*d*T for attention scores and values. Recomputation under
    activation checkpointing is not counted (model FLOPs, not hardware FLOPs)."""
    return 6 * n_params + 12 * n_layer * n_embd * context_length


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def check_wandb_installed() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb_project needs the wandb package: pip install -e '.[wandb]' (or pip install wandb)")


def new_wandb_run_id() -> str:
    """A W&B run id, kept in every checkpoint's meta.json so that a resumed run continues the same W&B run."""
    return secrets.token_hex(4)


class MetricsLogger:
    """log(step, {...}) writes scalars to TensorBoard and a line to metrics.jsonl (and to W&B when `wandb`
    is {"project", "id", "config"}); no-op off rank 0.
    A run that starts at start_step (resumed from that checkpoint) first drops what an earlier attempt
    logged after it, the work the kill lost: TensorBoard's purge_step hides those events, and metrics.jsonl
    is rewritten without those lines, so each step appears once in both. W&B keeps a run's steps in order
    and ignores steps it already has; the resumed run repeats them exactly, so nothing differs."""

    def __init__(self, log_dir: str | Path, enabled: bool, start_step: int = 0, wandb: dict | None = None):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow to import (TensorBoard): rank 0 only
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=start_step + 1)
        path = self.log_dir / "metrics.jsonl"
        if path.exists():
            _drop_lines_after(path, start_step)
        self.jsonl = open(path, "a")
        if wandb:
            self.wandb = _wandb_run(self.log_dir, **wandb)
            self.wandb_from_step = max(start_step + 1, self.wandb.step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        for k, v in clean.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None and step >= self.wandb_from_step:
            self.wandb.log(clean, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)
        if self.wandb is not None and step >= self.wandb_from_step:
            import wandb
            self.wandb.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(log_dir: Path, project: str, id: str, config: dict):
    """The W&B run `id` of `project`, created or continued, its local files under log_dir/wandb."""
    import wandb  # the optional extra: imported by rank 0 of a run with --wandb_project only
    return wandb.init(project=project, id=id, resume="allow", dir=str(log_dir), config=config,
                      settings=wandb.Settings(quiet=True))


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (via a temp file and rename) keeping the lines of steps <= step."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if parse_json(line, str(path))["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError, UserError):  # a line cut short by a kill
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class Console:
    """Rank 0's console: a tqdm bar with ETA when stderr is a terminal (disabled elsewhere), and lines
    printed above it; other ranks print nothing."""

    def __init__(self, enabled: bool, start: int, total: int, desc: str):
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))

    def advance(self, **postfix) -> None:
        self.bar.update(1)
        self.bar.set_postfix(**postfix, refresh=False)

    def write(self, line: str) -> None:
        if self.enabled:
            self.bar.write(line) if not self.bar.disable else print(line, flush=True)

    def close(self) -> None:
        self.bar.close()


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Count, rate and ETA of a long loop (HellaSwag scoring), so that a minute of work does not look like a
    hang. By default on stderr, since stdout may be the command's result (`gptds evaluate` prints JSON):
    redrawn in place on a terminal, a line every interval_s in a log. With `write` (the training console),
    a line every interval_s through it. Every line but the last is skipped when the loop is that fast."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True,
                 write: Callable[[str], None] | None = None, interval_s: float | None = None):
        self.total, self.desc, self.unit, self.enabled, self.write = total, desc, unit, enabled, write
        self.redraw = write is None and sys.stderr.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.redraw else 10.0)
        self.n = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and (self.n >= self.total or now - self.last >= self.interval_s):
            self.last = now
            self._show(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        if self.n >= self.total:
            return f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, done in {hms(elapsed)}"
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
                f"eta {hms(eta) if math.isfinite(eta) else '?'}")

    def _show(self, now: float) -> None:
        text = self.line(now)
        if self.write is not None:
            self.write(text)
        elif self.redraw:
            sys.stderr.write("\r\033[K" + text + ("\n" if self.n >= self.total else ""))
            sys.stderr.flush()
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
