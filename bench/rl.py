"""`gptds rl` on the built-in arithmetic task, as the README runs it: the task's train split prepared as
conversations, a tiny model fine-tuned briefly on its format, then RL; held-out pass@1 and pass@8 from
`gptds evaluate` before and after; the per-step mean rewards from metrics.jsonl; and sampling under ZeRO-3 (every
rank in step, parameters gathered at every forward) against ZeRO-2 (whole weights on every rank, what gathering
the full weights once per rollout would sample at). Writes bench/results/rl-<device>-<date>.{json,md} and the
reward curve as bench/results/rl-arithmetic-<device>.svg (the README shows it).

    python bench/rl.py [--sft_steps 200] [--rl_steps 240] [--out_dir /tmp/gptds-rl-bench]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def run(cmd: list[str], commands: list[str]) -> subprocess.CompletedProcess:
    """One command as a user types it (recorded), from the repository root, with the virtualenv on PATH."""
    commands.append(shlex.join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=common.venv_env())
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    print(f"{time.perf_counter() - t0:6.1f} s  {shlex.join(cmd)}", flush=True)
    return proc


def launch(job: list[str], ranks: int) -> list[str]:
    return [str(Path(PYTHON).parent / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank", "--master_port",
            str(common.free_port()), "--module", "gptds", *job]


def metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def held_out(checkpoint: Path, commands: list[str]) -> dict:
    out = run([PYTHON, "-m", "gptds", "evaluate", "--checkpoint", str(checkpoint), "--tasks", "arithmetic",
               "--num_samples", "8", "--temperature", "1.0"], commands)
    return json.loads(out.stdout)


def svg_curve(rewards: list[float], title: str, width: int = 640, height: int = 240) -> str:
    """The per-step mean reward as a polyline with its 10-step moving average, axes 0..1 and 0..steps."""
    left, right, top, bottom = 48, 12, 28, 36
    w, h = width - left - right, height - top - bottom
    n = len(rewards)

    def point(i: int, r: float) -> str:
        return f"{left + w * i / max(1, n - 1):.1f},{top + h * (1 - r):.1f}"
    smooth = [sum(rewards[max(0, i - 9):i + 1]) / len(rewards[max(0, i - 9):i + 1]) for i in range(n)]
    grid = "".join(f'<line x1="{left}" y1="{top + h * (1 - y):.1f}" x2="{left + w}" y2="{top + h * (1 - y):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 6}" y="{top + h * (1 - y) + 4:.1f}" text-anchor="end">{y:g}</text>'
                   for y in (0, 0.25, 0.5, 0.75, 1))
    ticks = "".join(f'<text x="{left + w * s / max(1, n - 1):.1f}" y="{top + h + 16}" text-anchor="middle">{s + 1}'
                    f'</text>' for s in range(0, n, max(1, n // 8)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="{left}" y="16" font-size="13">{title}</text>{grid}{ticks}'
            f'<text x="{left + w / 2}" y="{height - 4}" text-anchor="middle">step</text>'
            f'<polyline fill="none" stroke="#9ecae1" stroke-width="1" '
            f'points="{" ".join(point(i, r) for i, r in enumerate(rewards))}"/>'
            f'<polyline fill="none" stroke="#08519c" stroke-width="2" '
            f'points="{" ".join(point(i, r) for i, r in enumerate(smooth))}"/></svg>\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_steps", type=int, default=200)
    parser.add_argument("--rl_steps", type=int, default=240)
    parser.add_argument("--sampling_steps", type=int, default=10, help="steps of the ZeRO-2 / ZeRO-3 comparison")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out_dir", default="/tmp/gptds-rl-bench")
    parser.add_argument("--results_dir", default=str(common.RESULTS_DIR))
    args = parser.parse_args()
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    commands: list[str] = []
    fp32 = [] if common.default_dtype() == "bf16" else ["--deepspeed_config", "zero2_fp32"]

    run([PYTHON, "-m", "gptds", "prepare", "task", "--task", "arithmetic", "--output_dir", str(out / "data"),
         "--context_length", "32"], commands)
    run(launch(["finetune", "--data_dir", str(out / "data"), "--model", "tiny", "-B", "8", "-T", "32", "--lr", "3e-3",
                "--weight_decay", "0", "--warmup_steps", "10", "--max_steps", str(args.sft_steps), "--optimizer",
                "adamw", "--eval_interval", "0", "--generate_interval", "0", "--log_dir", str(out / "sft"), *fp32],
               args.ranks), commands)
    before = held_out(out / "sft" / "checkpoints", commands)
    rl_flags = ["--pretrained_checkpoint", str(out / "sft" / "checkpoints"), "--task", "arithmetic", "-B", "32",
                "--lr", "1e-3", "--warmup_steps", "10", "--optimizer", "adamw", "--seed", "5", *fp32]
    t0 = time.perf_counter()
    run(launch(["rl", *rl_flags, "--max_steps", str(args.rl_steps), "--eval_task_interval", "40",
                "--log_dir", str(out / "rl")], args.ranks), commands)
    rl_seconds = time.perf_counter() - t0
    after = held_out(out / "rl" / "checkpoints", commands)
    logged = metrics(out / "rl")
    steps = [r for r in logged if "reward" in r]
    rewards = [r["reward"] for r in steps]
    q = len(rewards) // 4

    sampling = {}
    for stage in (2, 3):
        log_dir = out / f"sampling-z{stage}"
        config = common.ds_config_variant(f"zero{stage}", common.default_dtype(), out)  # fp32 on a CPU
        flags = [f for f in rl_flags if f not in fp32] + ["--deepspeed_config", str(config)]
        run(launch(["rl", *flags, "--max_steps", str(args.sampling_steps), "--eval_task_interval", "0",
                    "--checkpoint_interval", "0", "--log_dir", str(log_dir)], args.ranks), commands)
        rows = [r for r in metrics(log_dir) if "reward" in r][1:]  # the first step warms up
        sampling[f"zero{stage}"] = {k: sum(r[k] for r in rows) / len(rows) for k in
                                    ("sampling_tokens_per_second", "training_tokens_per_second", "step_time_ms")}

    device = common.device_name()
    report = {"kind": "rl", "date": datetime.date.today().isoformat(), "device": device, "machine": common.machine(),
              "versions": common.versions(), "ranks": args.ranks, "commands": commands,
              "task": "arithmetic (20 train prompts, 5 held out)", "rl_steps": len(rewards), "rl_seconds": rl_seconds,
              "rewards": rewards, "reward_first_quarter": sum(rewards[:q]) / q,
              "reward_last_quarter": sum(rewards[-q:]) / q,
              "held_out_before": before, "held_out_after": after,
              "held_out_during": [{k: v for k, v in r.items() if k.startswith("arithmetic_") or k == "step"}
                                  for r in logged if "arithmetic_pass@1" in r],
              "sampling_tokens_per_second": sum(r["sampling_tokens_per_second"] for r in steps) / len(steps),
              "training_tokens_per_second": sum(r["training_tokens_per_second"] for r in steps) / len(steps),
              "zero3_vs_zero2_sampling": sampling,
              "gsm8k": "not measured: a model trainable on this CPU scores 0 on GSM8K (the issue expects as much)"}
    svg = Path(args.results_dir) / f"rl-arithmetic-{device}.svg"
    svg.write_text(svg_curve(rewards, f"gptds rl, arithmetic: mean reward per step ({args.ranks} ranks, {device})"))
    md = [f"# gptds rl on the arithmetic task ({device}, {report['date']})", "",
          f"Mean reward: first quarter {report['reward_first_quarter']:.3f}, last quarter "
          f"{report['reward_last_quarter']:.3f} ({len(rewards)} steps, {rl_seconds:.0f} s). Curve: `{svg.name}`.", "",
          *common.md_table(["held-out split", "pass@1 (greedy)", "pass@8 (T=1)"],
                           [[when, common.fmt(r["arithmetic_pass@1"]), common.fmt(r["arithmetic_pass@8"])]
                            for when, r in (("before RL", before), ("after RL", after))]),
          "", *common.md_table(["stage", "sampling tok/s", "training tok/s", "step ms"],
                               [[k, *(common.fmt(v[m]) for m in ("sampling_tokens_per_second",
                                                                 "training_tokens_per_second", "step_time_ms"))]
                                for k, v in sampling.items()]),
          "", "Commands:", "", *[f"    {c}" for c in commands], ""]
    json_path, md_path = common.write_report("rl", report, "\n".join(md), args.results_dir)
    print(f"wrote {json_path}, {md_path} and {svg}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
