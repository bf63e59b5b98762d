"""Where training metrics go, from rank 0 only: TensorBoard scalars and text, and metrics.jsonl (one JSON
object per logged step, with the same names as the TensorBoard tags, for scripts). Also the FLOPs
estimate behind MFU."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

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
        from torch.utils.tensorboard import SummaryWriter
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
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
