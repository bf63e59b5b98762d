"""Smoke runs of the benchmarks, checking that they work and write their reports, not how fast anything is:
bench/throughput.py on 2 CPU ranks (tiny preset, 2 timed steps, the plain PyTorch baseline beside one ZeRO
stage and optimizer) and bench/memory.py in its quick mode (optimizer-state bytes per parameter), launched
side by side; and the largest-model search's doubling-then-bisecting, with a stand-in for its launches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow  # launches ranks or trains
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "bench"))  # the scripts import their shared helpers as `common`

import memory  # noqa: E402


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Both scripts at once (they spend most of their time starting processes), each into its own folder."""
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # as bench/common.venv_env
    commands = {
        "throughput": [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
                       "bench/throughput.py", "--model", "tiny", "--batch_size", "2", "--context_length", "32",
                       "--stages", "2", "--optimizers", "adamw8bit", "--activation_checkpointing", "off",
                       "--steps", "2", "--warmup_steps", "1", "--max_steps_factor", "1",
                       "--results_dir", str(tmp / "throughput")],
        "memory": [sys.executable, "bench/memory.py", "--quick", "--results_dir", str(tmp / "memory")],
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        found = sorted((tmp / name).glob(f"{name}-cpu-*.json"))
        out[name] = {"log": log, "returncode": proc.returncode,
                     "json": json.loads(found[0].read_text()) if found else None,
                     "md": found[0].with_suffix(".md").read_text() if found else None}
    return out


def report(reports, name) -> dict:
    r = reports[name]
    assert r["returncode"] == 0 and r["json"] is not None, f"{name} exited {r['returncode']}:\n{r['log'][-4000:]}"
    return r["json"]


def test_throughput_report_has_every_field_with_positive_numbers(reports):
    rep = report(reports, "throughput")
    for key in ("date", "device", "machine", "versions", "command", "model_config", "n_params", "batch_size",
                "context_length", "world_size", "tokens_per_step", "dtype", "flops_formula", "flops_per_token",
                "optimizer_hparams", "warmup_steps", "steps", "rows", "goals"):
        assert key in rep, key
    assert (rep["device"], rep["model"], rep["world_size"], rep["dtype"]) == ("cpu", "tiny", 2, "fp32")
    assert {"torch", "deepspeed", "bitsandbytes"} <= set(rep["versions"])
    assert rep["command"].startswith("deepspeed --num_gpus 2 --no_local_rank bench/throughput.py --model tiny")
    assert rep["peak_flops_per_device"] is None  # no known peak on CPU: MFU is null
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == {"pytorch-ddp-noac", "zero2-adamw8bit-noac"}
    for r in rows.values():
        for field in ("step_time_ms", "tokens_per_second", "peak_memory_mb", "optimizer_state_bytes_per_param",
                      "step_time_vs_baseline", "tokens_per_second_vs_baseline", "cpu_ms_per_rank"):
            assert r[field] > 0, (r["name"], field, r[field])
        assert r["mfu"] is None
        assert len(r["step_times_ms"]) == 2 and min(r["step_times_ms"]) > 0
        assert set(r["phase_ms"]) == {"forward", "backward", "optimizer_step"}
    assert rows["pytorch-ddp-noac"]["step_time_vs_baseline"] == 1.0
    # replicated 32-bit AdamW moments on 2 ranks vs partitioned 8-bit ones
    assert rows["pytorch-ddp-noac"]["optimizer_state_bytes_per_param"] == pytest.approx(16.0, rel=0.01)
    assert rows["zero2-adamw8bit-noac"]["optimizer_state_bytes_per_param"] < 2.2
    assert "| `zero2-adamw8bit-noac` |" in reports["throughput"]["md"]


def test_memory_quick_reports_optimizer_state_bytes_per_parameter(reports):
    rep = report(reports, "memory")
    assert (rep["device"], rep["ranks"], rep["dtype"]) == ("cpu", 2, "fp32") and "search" not in rep
    rows = {r["optimizer"]: r for r in rep["state"]["rows"]}
    assert rows["adamw"]["bytes_per_param"] == pytest.approx(8.0, rel=0.01)  # two fp32 moments
    assert 2.0 <= rows["adamw8bit"]["bytes_per_param"] < 2.2  # two uint8 moments plus block scales
    assert rows["adamw8bit"]["bytes_per_param_by_dtype"]["uint8"] == pytest.approx(2.0, rel=0.01)
    assert all(b > 0 for r in rows.values() for b in r["state_bytes_per_rank"])
    assert "## Optimizer state per parameter" in reports["memory"]["md"]


@pytest.mark.parametrize("fits,expected_tries,largest,limited_by", [
    (11, [4, 8, 16, 12, 10, 11], 11, "memory"),   # double until 16 fails, then bisect 8..16
    (3, [4, 2, 3], 3, "memory"),                  # the first size fails: bisect below it
    (1000, [4, 8, 16, 32, 64], 64, "bound"),      # --max_n_layer 64 stops the doubling
])
def test_search_doubles_then_bisects(monkeypatch, tmp_path, fits, expected_tries, largest, limited_by):
    tried = []

    def fake_launch(worker_args, args, out, timeout_s, memory_budget):
        n_layer = int(worker_args[worker_args.index("--n_layer") + 1])
        tried.append(n_layer)
        status = "ok" if n_layer <= fits else "memory: killed (out of memory)"
        return {"status": status, "wall_s": 1.0, "peak_rss_tree_mb": 1}

    monkeypatch.setattr(memory, "launch", fake_launch)
    args = memory.parse_args(["--start_n_layer", "4", "--max_n_layer", "64"])
    found = memory.search(args, tmp_path)
    assert tried == expected_tries
    assert found["largest"]["n_layer"] == largest and found["limited_by"] == limited_by


def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    """bench/gpu_check.sh with GPU_CHECK_DRY_RUN=1: the GPU window's script, on CPU with the tiny model,
    so that it cannot rot: every step runs (or is skipped by its budget, saying so), none fails, every
    measured row and the summary of the goals come back as JSON."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records}
    assert steps["environment"]["torch"] and steps["smoke"]["status"] == 0 and steps["gpu_tests"]["status"] == 0
    assert [r for r in records if r.get("status") not in (None, 0)] == []
    rows = {r["row"]: r for r in records if r["step"] == "row"}
    assert {"pytorch-ddp-noac", "zero2-adamw-compile-noac"} <= set(rows)  # the two most valuable rows
    assert all(r["tokens_per_second"] > 0 for r in rows.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["goals"]["zero2_compiled_vs_compiled_baseline (>= 1.0)"] > 0 and summary["failed_steps"] == []

