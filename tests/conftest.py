"""Shared fixtures: the bundled demo data prepared once per test session (tiny Shakespeare as text
shards, the 300 bundled Dolly records as instruction shards)."""

import logging
import os
import sys
from pathlib import Path

import pytest

from gptds.data.prepare import PrepareDollyConfig, PrepareTextConfig, prepare_dolly, prepare_text
from gptds.tokenizer import ASSETS_DIR

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
