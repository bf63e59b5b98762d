"""Shared fixtures: the bundled demo data prepared once per test session (tiny Shakespeare as text
shards, the 300 bundled Dolly records as instruction shards)."""

import os
import sys
from pathlib import Path

import pytest

from gptds.data.prepare import PrepareDollyConfig, PrepareTextConfig, prepare_dolly, prepare_text
from gptds.tokenizer import ASSETS_DIR

# Every process the tests start finds the virtualenv's tools first: DeepSpeed's JIT-compiled ops are
# rebuilt (about a minute) whenever a different ninja than the one that built them runs.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


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
