"""Data files changing under a running job: a shard truncated in place while the loader reads it is a one-line
error naming it (a memory-mapped shard killed the process with SIGBUS and nothing on stderr), and shard sizes are
checked against the manifest again before each pass over the data."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from reliability_report import figures_fixture

from gptds.data.loaders import build_loader
from gptds.data.prepare import PrepareTextConfig, prepare_text
from gptds.errors import UserError
from gptds.tokenizer import ASSETS_DIR

FIGURES = {"faults_injected": 0, "data_lost": 0, "faults": []}
report = figures_fixture("data_faults", FIGURES)

# Reads batches, truncates the shard being read to a tenth, reads on: gptds.__main__ turns the UserError into
# one line and exit status 2.
TRUNCATED_UNDER_THE_LOADER = """
import os, sys
from gptds.__main__ import main
from gptds.data import loaders
from gptds.errors import UserError
loader = loaders.build_loader(sys.argv[1], "train", 4, 32, 0, 1, seed=0, shuffle=False)
for _ in range(3):
    loader.next_batch()
shard = loader.data_dir / loader.shards[0]["file"]
os.truncate(shard, os.path.getsize(shard) // 10)
try:
    for _ in range(10_000):
        loader.next_batch()
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture
def shards(tmp_path):
    """Tiny Shakespeare as several small train shards (a copy each test may damage)."""
    return prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")],
                                          output_dir=str(tmp_path / "data"), shard_size=20_000, num_workers=0))


def test_a_shard_truncated_under_a_running_loader_is_one_line_naming_it(shards, capsys):
    proc = subprocess.run([sys.executable, "-c", TRUNCATED_UNDER_THE_LOADER, str(shards)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": "train shard truncated in place under a running loader"})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # not -SIGBUS
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {shards}/train_000000.bin: ") and "bytes, but" in error and \
        "the file was truncated or changed" in error, proc.stderr


def test_shard_sizes_are_checked_again_before_each_pass(shards):
    loader = build_loader(shards, "train", 4, 32, 0, 1, seed=0, shuffle=False)
    windows_per_shard = 20_000 // 32
    for _ in range(windows_per_shard // 4 + 2):  # past the first shard
        loader.next_batch()
    first = shards / loader.shards[0]["file"]
    os.truncate(first, 1000)  # already read in this pass: nothing reads it again until the next one
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": "a shard already read this pass truncated in place"})
    with pytest.raises(UserError, match=rf"{first}: 1000 bytes, but \S+manifest\.json says 20000 tokens"):
        for _ in range(loader.batches_per_epoch() + 1):
            loader.next_batch()
    with pytest.raises(UserError, match="truncated or changed"):
        loader.reset()  # a validation pass starts with the same check
