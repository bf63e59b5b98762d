"""Unbounded work, bounded: `gptds generate --max_new_tokens 1000000` prints its text as it is generated (it
printed nothing for minutes), and the sampled continuation streamed equals the one returned. Past the context
window the cost per token stays bounded (tests/test_model.py counts the positions encoded)."""

import os
import select
import subprocess
import sys
import time

import torch
from conftest import ROOT

from gptds.generate import GenerateConfig, generate_from_checkpoint
from gptds.model import GPT, GPTConfig
from gptds.weights import save_gptds_weights


def tiny_weights(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    return save_gptds_weights(config, GPT(config).state_dict().items(), tmp_path / "tiny.safetensors")[0]


def test_generate_prints_as_it_goes_however_many_tokens_are_asked_for(tmp_path):
    weights = tiny_weights(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "gptds", "generate", "--checkpoint", str(weights), "--prompt",
                             "ROMEO:", "--max_new_tokens", "1000000", "--temperature", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, deadline = b"", time.monotonic() + 60
    try:
        while len(out) < 300 and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
    finally:
        proc.kill()
        proc.wait()
    assert out.startswith(b"ROMEO:") and len(out) >= 300, out[:200]  # printed while a million tokens were asked for


def test_the_streamed_text_is_the_returned_text(tmp_path):
    weights = tiny_weights(tmp_path)

    class Pieces(list):
        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    pieces = Pieces()
    cfg = GenerateConfig(checkpoint=str(weights), prompt="Once upon", max_new_tokens=40, temperature=0)
    text = generate_from_checkpoint(cfg, out=pieces)
    assert len(pieces) > 20 and "".join(pieces) == "Once upon" + text
    assert text == generate_from_checkpoint(cfg)  # streaming changes nothing
