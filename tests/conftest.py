"""Shared fixtures and helpers: the bundled demo data prepared once per test session (tiny Shakespeare as
text shards, the 300 bundled Dolly records as instruction shards), one tiny trained checkpoint for the
tests that need *a* checkpoint, DeepSpeed configs without bf16 (this CPU has no bf16 units), free ports,
and launching a matrix of training scenarios on 2 ranks through tests/dist_runner.py.

Markers: `slow` for tests that launch ranks or train (pytest -m "not slow" is the fast inner loop), `gpu`
for tests that need CUDA (skipped without it; bench/gpu_check.sh runs them)."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptds import checkpoint
from gptds.config import resolve_ds_config_path
from gptds.data.prepare import (
    PrepareChatConfig,
    PrepareDollyConfig,
    PrepareTextConfig,
    prepare_chat,
    prepare_dolly,
    prepare_text,
)
from gptds.model import GPTConfig
from gptds.tokenizer import ASSETS_DIR

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Every process the tests start finds the virtualenv's tools first: DeepSpeed's JIT-compiled ops are
# rebuilt (about a minute) whenever a different ninja than the one that built them runs.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# ...and build them into the virtualenv, not a cache shared with every other checkout: a build killed
# half-way (a timed-out test) leaves torch's lock file there, and every later build waits on it forever.
EXTENSIONS_DIR = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
for stale_lock in EXTENSIONS_DIR.glob("*/*/lock"):  # no build runs before this session starts one
    stale_lock.unlink()


@pytest.fixture(autouse=True)
def _deepspeed_logs_to_live_stdout():
    """DeepSpeed's logger keeps the sys.stdout it saw at import. Imported during a test that captures
    output (capsys), that stream is closed when the test ends, and every later DeepSpeed log line
    prints a 'Logging error' traceback into whatever test runs then. Point it at today's stdout."""
    from deepspeed.utils import logger
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers (subclasses)
            handler.setStream(sys.stdout)
    yield


@pytest.fixture(scope="session")
def cpu_adam_op():
    """DeepSpeedCPUAdam (the offload configs' optimizer), compiled once here, in one process, before
    ranks that need it start (~80 s the first time, then loaded from TORCH_EXTENSIONS_DIR)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder
    return CPUAdamBuilder().load()


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "text"
    return prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")], output_dir=str(out),
                                          val_fraction=0.1, num_workers=0))


@pytest.fixture(scope="session")
def dolly_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "dolly"
    return prepare_dolly(PrepareDollyConfig(input=[str(ASSETS_DIR / "dolly_sample.jsonl")], output_dir=str(out),
                                            context_length=128, num_workers=0))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """The bundled multi-turn conversations as ChatML shards with loss masks (context 128)."""
    out = tmp_path_factory.mktemp("data") / "chat"
    return prepare_chat(PrepareChatConfig(input=[str(ASSETS_DIR / "chat_sample.jsonl")], output_dir=str(out),
                                          context_length=128, num_workers=0))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fp32_config(tmp: Path, name: str = "zero2", **zero_optimization) -> str:
    """ds_configs/<name>.json without bf16, with `zero_optimization` keys overridden; returns its path."""
    config = json.loads(resolve_ds_config_path(name).read_text())
    config.pop("bf16", None)
    config.setdefault("zero_optimization", {}).update(zero_optimization)
    path = Path(tmp) / f"{name}_fp32{'_' + '_'.join(zero_optimization) if zero_optimization else ''}.json"
    path.write_text(json.dumps(config))
    return str(path)


def launch(spec: list[dict], tmp: Path, name: str, ranks: int = 2, timeout: int = 1200,
           allow_errors: bool = False) -> dict:
    """Run training scenarios (tests/dist_runner.py) in one launch of `deepspeed --num_gpus ranks`;
    returns {scenario name: outcome}. Unless allow_errors, a scenario that raised fails the test."""
    spec_path, out_path = Path(tmp) / f"{name}_spec.json", Path(tmp) / f"{name}_out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port",
                           str(free_port()), str(ROOT / "tests" / "dist_runner.py"), str(spec_path), str(out_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out_path.exists(), f"launcher exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads(out_path.read_text())
    if not allow_errors:
        for key, r in results.items():
            assert "error" not in r, f"{key}: {r.get('traceback')}"
    return results


def gptds_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m gptds ARGS` in a new process, as a user runs it; fails the test unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", "gptds", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"gptds {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def losses(r: dict) -> list[float]:
    """A scenario's per-step training losses, in step order."""
    assert "error" not in r, r.get("traceback", r)
    return [r["losses"][str(s)] for s in sorted(map(int, r["losses"]))]


TINY_RUN = ["--model", "tiny", "-B", "2", "-T", "32", "--eval_interval", "0", "--generate_interval", "0",
            "--hellaswag_interval", "0", "--log_interval", "1", "--seed", "5"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, text_data) -> Path:
    """A checkpoint folder of the tiny model after 2 ZeRO-2 steps on 2 ranks (fp32, 32-bit AdamW), for
    every test that needs *a* training checkpoint rather than a particular one."""
    tmp = tmp_path_factory.mktemp("tiny_checkpoint")
    launch([{"name": "tiny", "argv": ["pretrain", "--data_dir", str(text_data), "--deepspeed_config",
                                      fp32_config(tmp, "zero2"), "--log_dir", str(tmp / "run"), "--max_steps", "2",
                                      "--optimizer", "adamw", *TINY_RUN]}], tmp, "tiny")
    return tmp / "run" / "checkpoints"


# What a real meta.json holds (checkpoint.META_FIELDS), for checkpoints made up by the tests.
FAKE_META = {"job": "pretrain", "model_config": GPTConfig.from_preset("tiny").to_dict(), "kind": "deepspeed",
             "run_config": {"data": {"micro_batch_size": 2, "context_length": 32},
                            "train": {"grad_accum_steps": 1, "seed": 5}},
             "data_manifest_sha256": "ab" * 32, "world_size": 2, "zero_stage": 2, "optimizer": "adamw",
             "precision": "fp32"}


def fake_checkpoint(checkpoint_dir: Path, step: int, content: bytes = b"x" * 1000, **meta) -> Path:
    """A step folder that is complete and intact as far as meta.json says (every field, sizes, checksums),
    holding one made-up shard file."""
    step_dir = Path(checkpoint_dir) / checkpoint.step_tag(step)
    step_dir.mkdir(parents=True)
    (step_dir / "shard.pt").write_bytes(content)
    checkpoint.write_meta(step_dir, {**FAKE_META, **meta, "step": step})
    return step_dir
