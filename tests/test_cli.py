"""The commands as a user runs them: `deepspeed --module gptds pretrain` then `finetune` on 2 ranks,
leaving checkpoints, TensorBoard events, metrics.jsonl and samples; `gptds generate` and `gptds evaluate`
on the result; and bad input that stops before training with a one-line message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fp32_config, free_port

from gptds import checkpoint
from gptds.__main__ import main

pytestmark = pytest.mark.slow  # launches ranks or trains
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SMALL = ["--model", "tiny", "-B", "2", "-T", "32", "--log_interval", "1"]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output}"
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, text_data, dolly_data):
    tmp = tmp_path_factory.mktemp("cli")
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
                "--module", "gptds"]
    pre = run(launcher + ["pretrain", "--data_dir", str(text_data), "--deepspeed_config", fp32_config(tmp, "zero3"),
                          "--log_dir", str(tmp / "pre"), "--max_steps", "6", "--eval_interval", "3",
                          "--eval_batches", "2", "--hellaswag_interval", "6", "--hellaswag_limit", "8",
                          "--generate_interval", "6", "--generate_max_new_tokens", "8", "--checkpoint_interval", "3",
                          *SMALL])
    ft = run(launcher + ["finetune", "--data_dir", str(dolly_data), "--deepspeed_config", fp32_config(tmp, "zero2"),
                         "--log_dir", str(tmp / "ft"), "--pretrained_checkpoint", str(tmp / "pre" / "checkpoints"),
                         "--max_steps", "4", "--eval_interval", "2", "--eval_batches", "1", "--generate_interval", "4",
                         "--generate_max_new_tokens", "8", *SMALL, "-T", "128"])
    return {"tmp": tmp, "pre": pre, "ft": ft}


def test_pretrain_leaves_checkpoints_events_metrics_and_samples(pipeline):
    pre = pipeline["tmp"] / "pre"
    steps = [p.name for p in checkpoint.complete_checkpoints(pre / "checkpoints")]
    assert steps == ["step_00000003", "step_00000006"]
    meta = checkpoint.read_meta(pre / "checkpoints" / "step_00000006")
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3 and meta["val_loss"] > 0
    assert any(name.startswith("zero_pp_rank_1_") for name in meta["files"])  # rank 1 wrote its shard
    records = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    for field in ("loss", "lr", "grad_norm", "tokens_per_second", "step_time_ms"):
        assert all(r[field] > 0 for r in train_records), field
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(0 < r["val_bpb"] < 20 for r in records if "val_loss" in r)
    hellaswag = [r for r in records if "hellaswag_acc_norm" in r]
    assert len(hellaswag) == 1 and 0 <= hellaswag[0]["hellaswag_acc_norm"] <= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(pre / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "val_loss", "val_perplexity", "val_bpb", "hellaswag_acc",
            "hellaswag_acc_norm", "hellaswag_acc_norm_token"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    samples = (pre / "samples.txt").read_text()
    assert "=== step 6" in samples and "[ROMEO:]" in samples and "[The meaning of life is]" in samples
    out = pipeline["pre"].stdout
    assert "ZeRO-3 fp32" in out and "2 rank(s)" in out and "eta" in out


def test_finetune_starts_from_pretraining_and_samples_instructions(pipeline):
    ft = pipeline["tmp"] / "ft"
    assert "initialised from pretrained weights" in pipeline["ft"].stdout
    assert [p.name for p in checkpoint.complete_checkpoints(ft / "checkpoints")] == ["step_00000004"]
    assert "### Instruction:\nWhat is the capital of France?" in (ft / "samples.txt").read_text()


def test_generate_and_evaluate_read_a_zero3_training_checkpoint(pipeline, text_data):
    ckpt = str(pipeline["tmp"] / "pre" / "checkpoints")
    gen = run([str(BIN / "gptds"), "generate", "--checkpoint", ckpt, "--prompt", "ROMEO:", "--max_new_tokens", "5",
               "--temperature", "0"])
    # the prompt, then a continuation (a 6-step model's greedy one may be newlines), then print's newline
    assert gen.stdout.startswith("ROMEO:") and len(gen.stdout) > len("ROMEO:\n")
    assert "[WARNING]" not in gen.stdout and "Reconstructed" not in gen.stdout  # DeepSpeed's chatter: stderr
    ev = run([str(BIN / "gptds"), "evaluate", "--checkpoint", ckpt, "--hellaswag_limit", "8",
              "--data_dir", str(text_data), "-T", "32", "--eval_batches", "2"])
    result = json.loads(ev.stdout)  # stdout is exactly the JSON
    assert result["hellaswag_n"] == 8 and 0 <= result["hellaswag_acc"] <= 1 and 0 <= result["hellaswag_acc_norm"] <= 1
    assert 0 < result["val_loss"] < 20


# ---------------------------------------------------------------- bad input stops before training

def fails(argv, capsys, *messages):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for message in messages:
        assert message in err, err
    return err


def test_data_dir_without_manifest(tmp_path, capsys):
    fails(["pretrain", "--data_dir", str(tmp_path), "--log_dir", str(tmp_path / "run")], capsys,
          str(tmp_path), "gptds prepare")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_resume_without_a_path(tmp_path, capsys):
    fails(["pretrain", "--resume", "--log_dir", str(tmp_path)], capsys, "--resume needs --checkpoint_path")


def test_batch_arithmetic_that_does_not_add_up(tmp_path, capsys, text_data):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    fails(["pretrain", "--data_dir", str(text_data), "--deepspeed_config", str(config), "-B", "4",
           "--log_dir", str(tmp_path)], capsys, "train_batch_size = 64", "world size 1 = 4")


def test_finetune_on_pretraining_data(tmp_path, capsys, text_data):
    fails(["finetune", "--data_dir", str(text_data), "--log_dir", str(tmp_path)], capsys,
          "holds 'text' data", "gptds prepare dolly")


def test_context_longer_than_the_model(tmp_path, capsys, text_data):
    fails(["pretrain", "--data_dir", str(text_data), "--model", "tiny", "-T", "512", "--log_dir", str(tmp_path)],
          capsys, "--context_length 512 exceeds the model's block_size 128")


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoint):
    """The run folder of the shared tiny checkpoint, which the next tests try to misuse (refused before
    any work: nothing there changes)."""
    return tiny_checkpoint.parent


def test_checkpoint_of_another_model_shape(tiny_run, capsys, text_data):
    fails(["pretrain", "--data_dir", str(text_data), "--model", "mini", "-T", "32", "--deepspeed_config",
           "zero2_fp32", "--log_dir", str(tiny_run / "other"), "--resume", "--checkpoint_path",
           str(tiny_run / "checkpoints")], capsys, "another model config", "n_layer", "same --model")


def test_existing_checkpoints_need_auto_resume(tiny_run, capsys, text_data):
    fails(["pretrain", "--data_dir", str(text_data), "--log_dir", str(tiny_run), *SMALL], capsys,
          "already holds checkpoints", "--auto_resume")


def test_changed_data_is_refused(tiny_run, capsys, tmp_path):
    from gptds.data.prepare import PrepareTextConfig, prepare_text
    text = tmp_path / "other.txt"
    text.write_text("Some other corpus entirely. " * 200)
    other = prepare_text(PrepareTextConfig(input=[str(text)], output_dir=str(tmp_path / "other"),
                                           val_fraction=0.5, val_block_tokens=64, num_workers=0))
    capsys.readouterr()
    fails(["pretrain", "--data_dir", str(other), "--log_dir", str(tiny_run), "--auto_resume", *SMALL], capsys,
          "trained on other data", "same --data_dir")
