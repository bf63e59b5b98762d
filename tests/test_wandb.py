"""Weights & Biases (the optional `wandb` extra): rank 0 logs the names TensorBoard and metrics.jsonl use,
and a resumed run continues the same W&B run (its id travels in every checkpoint's meta.json). Tested
offline (WANDB_MODE=offline: no account, no network), reading back the run files W&B writes."""

import importlib.util
import json
import struct
import sys
import types
from pathlib import Path

import pytest
from conftest import TINY_RUN

from gptds import checkpoint
from gptds.__main__ import main
from gptds.metrics import MetricsLogger

HAVE_WANDB = importlib.util.find_spec("wandb") is not None


class FakeRun:
    def __init__(self, step: int = 0, **init):
        self.init, self.step, self.logged, self.finished = init, step, [], False

    def log(self, data: dict, step: int):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module that records what MetricsLogger asks of it."""
    module = types.SimpleNamespace(runs=[], Settings=lambda **kw: kw, Html=lambda text: ("html", text))

    def init(**kwargs):
        module.runs.append(FakeRun(step=module.resume_at, **kwargs))
        return module.runs[-1]
    module.init, module.resume_at = init, 0
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_gets_the_metric_names_of_metrics_jsonl_from_rank_0_only(tmp_path, fake_wandb):
    MetricsLogger(tmp_path / "rank1", enabled=False, wandb={"project": "p", "id": "abc", "config": {}}).close()
    assert fake_wandb.runs == []  # only rank 0 logs
    log = MetricsLogger(tmp_path, enabled=True, wandb={"project": "p", "id": "abc", "config": {"job": "pretrain"}})
    log.log(1, {"loss": 10.5, "lr": 1e-3, "mfu": None})
    log.log(2, {"val_loss": 9.0, "val_perplexity": 8103.1})
    log.text(2, "samples", "[ROMEO:] <b>")
    log.close()
    run = fake_wandb.runs[0]
    assert run.init["project"] == "p" and run.init["id"] == "abc" and run.init["resume"] == "allow"
    assert run.init["dir"] == str(tmp_path) and run.init["config"] == {"job": "pretrain"} and run.finished
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(step, data) for step, data in run.logged[:2]] == [(r.pop("step"), r) for r in jsonl]
    assert run.logged[2] == (2, {"samples": ("html", "<pre>[ROMEO:] &lt;b&gt;</pre>")})


def test_a_resumed_run_leaves_alone_the_steps_wandb_already_has(tmp_path, fake_wandb):
    fake_wandb.resume_at = 8  # the W&B run got to step 7 before the kill; the checkpoint is at step 5
    log = MetricsLogger(tmp_path, enabled=True, start_step=5, wandb={"project": "p", "id": "abc", "config": {}})
    for step in range(6, 10):
        log.log(step, {"loss": float(step)})
    log.close()
    assert [step for step, _ in fake_wandb.runs[0].logged] == [8, 9]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [6, 7, 8, 9]


def test_without_wandb_installed_the_flag_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main(["pretrain", "--wandb_project", "p", "--log_dir", str(tmp_path / "run"), *TINY_RUN]) == 2
    assert "--wandb_project needs the wandb package: pip install -e '.[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def wandb_records(path: Path) -> list:
    """The records of a .wandb run file: W&B's log format (LevelDB's: 32 KiB blocks of records with a CRC,
    a length and a type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte header, protobuf inside."""
    from wandb.proto import wandb_internal_pb2
    data, pos, block, pieces, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pieces))
            pieces = b""
    return records


def wandb_history(run_file: Path) -> dict[int, dict]:
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.mark.slow  # trains
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed: pip install -e '.[wandb]'")
def test_offline_run_and_its_resume_log_to_one_wandb_run(tmp_path, monkeypatch, text_data):
    monkeypatch.setenv("WANDB_MODE", "offline")
    log_dir = tmp_path / "run"
    argv = ["pretrain", "--data_dir", str(text_data), "--log_dir", str(log_dir), "--deepspeed_config", "zero2_fp32",
            "--optimizer", "adamw", "--wandb_project", "gptds-test", "--auto_resume", *TINY_RUN,
            "--eval_interval", "2", "--eval_batches", "1"]
    assert main([*argv, "--max_steps", "2"]) == 0
    assert main([*argv, "--max_steps", "3"]) == 0  # resumed from step 2
    import wandb
    wandb.teardown()  # W&B's service process writes the run file out; at exit in a real run
    run_id = checkpoint.read_meta(log_dir / "checkpoints" / "step_00000003")["wandb_run_id"]
    assert checkpoint.read_meta(log_dir / "checkpoints" / "step_00000002")["wandb_run_id"] == run_id
    attempts = sorted((log_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts)
    first, resumed = (wandb_history(a / f"run-{run_id}.wandb") for a in attempts)
    jsonl = {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        jsonl.setdefault(record.pop("step"), {}).update(record)
    assert sorted(first) == [1, 2] and sorted(resumed) == [3]
    for step, metrics in {**first, **resumed}.items():
        assert metrics == jsonl[step], step  # the names and values of metrics.jsonl
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "val_loss"} <= set(first[2])
