"""Where training metrics go, from rank 0 only: TensorBoard scalars and text, metrics.jsonl (one JSON
object per logged step, with the same names as the TensorBoard tags, for scripts), and the console (a
progress bar with ETA on a terminal, plain lines elsewhere). Also the FLOPs estimate behind MFU."""

from __future__ import annotations

import json
import math
import os
import sys
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


class MetricsLogger:
    """log(step, {...}) writes scalars to TensorBoard and a line to metrics.jsonl; no-op off rank 0.
    A run that starts at start_step (resumed from that checkpoint) first drops what an earlier attempt
    logged after it, the work the kill lost: TensorBoard's purge_step hides those events, and metrics.jsonl
    is rewritten without those lines, so each step appears once in both."""

    def __init__(self, log_dir: str | Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow to import (TensorBoard): rank 0 only
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.log_dir / "tensorboard"), purge_step=start_step + 1)
        path = self.log_dir / "metrics.jsonl"
        if path.exists():
            _drop_lines_after(path, start_step)
        self.jsonl = open(path, "a")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None}
        for k, v in clean.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


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
