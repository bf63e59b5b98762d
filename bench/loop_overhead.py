"""What the training loop costs over the bare DeepSpeed engine step, on this machine (one rank):
1. in one process, gptds's optimizer step (train.optimizer_step: device-side loss sums, one all-reduce, the
   prefetching batch source, the skip decision) against a bare `engine(x, y); backward; step; loss.item()`
   on the same engine and batches, alternated step by step;
2. the whole loop (`gptds pretrain`, logging every step) per step: the wall time of N and 2N steps in fresh
   processes, differenced so that set-up does not count; with --compare_with DIR, the same for the gptds
   code in DIR (e.g. a checkout of an earlier commit), for "no slower than before".
Writes bench/results/loop-overhead-<device>-<date>.{json,md}.

    python bench/loop_overhead.py [--model gpt2-micro] [--steps 20] [--compare_with /tmp/gptds-before]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from gptds.__main__ import build_parser
from gptds.config import run_config_from_flags
from gptds.data.prepare import PrepareTextConfig, prepare_text
from gptds.session import set_up
from gptds.tokenizer import ASSETS_DIR
from gptds.train import StopRequest, optimizer_step

ROOT = Path(__file__).resolve().parent.parent


def flags(args, data_dir: Path, log_dir: Path, steps: int) -> list[str]:
    return ["pretrain", "--data_dir", str(data_dir), "--log_dir", str(log_dir), "--model", args.model,
            "-B", str(args.batch_size), "-T", str(args.context_length), "--grad_accum_steps",
            str(args.grad_accum_steps), "--max_steps", str(steps), "--optimizer", "adamw", "--deepspeed_config",
            "zero2_fp32" if not torch.cuda.is_available() else "zero2", "--eval_interval", "0",
            "--hellaswag_interval", "0", "--generate_interval", "0", "--checkpoint_interval", "0",
            "--log_interval", "1"]


def step_comparison(args, data_dir: Path, tmp: Path) -> dict:
    """Median ms of gptds's optimizer step and of the bare engine step, alternated on one engine."""
    cli = build_parser().parse_args(flags(args, data_dir, tmp / "in-process", args.steps))
    s = set_up(run_config_from_flags("pretrain", cli))
    stop, eng, lr = StopRequest(), s.eng, 1e-3
    timings = {"gptds_step": [], "bare_engine_step": []}

    def bare():
        for _ in range(args.grad_accum_steps):
            x, y, *options = s.batches.next()  # pretraining text: (x, y)
            _, loss = eng(x, y, **(options[0] if options else {}))
            eng.backward(loss)
            eng.step()
        return loss.item()  # a loop that shows its loss reads it back once per step too
    for i in range(args.warmup + args.steps):
        for name, fn in (("gptds_step", lambda: optimizer_step(s, lr, stop)), ("bare_engine_step", bare)):
            t0 = time.perf_counter()
            fn()
            if s.info.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                timings[name].append(time.perf_counter() - t0)
    stop.restore()
    out = {name: round(1000 * statistics.median(t), 2) for name, t in timings.items()}
    out["ratio"] = round(out["gptds_step"] / out["bare_engine_step"], 4)
    return out


def loop_per_step_ms(args, data_dir: Path, tmp: Path, code: Path) -> float:
    """Wall ms per step of `gptds pretrain` with the gptds code in `code`: (time(2N) - time(N)) / N."""
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    seconds = {}
    for steps in (args.steps, 2 * args.steps):
        log_dir = tmp / f"loop-{code.name}-{steps}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gptds", *flags(args, data_dir, log_dir, steps)], cwd=code, env=env,
                       check=True, capture_output=True)
        seconds[steps] = time.perf_counter() - t0
    return round(1000 * (seconds[2 * args.steps] - seconds[args.steps]) / args.steps, 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-micro")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--context_length", type=int, default=128)
    p.add_argument("--grad_accum_steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compare_with", default=None, help="a folder holding another gptds checkout")
    p.add_argument("--results_dir", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptds-loop-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")],
                                                  output_dir=str(tmp / "data"), val_fraction=0.1, num_workers=0))
        steps = step_comparison(args, data_dir, tmp)
        loops = {"this": loop_per_step_ms(args, data_dir, tmp, ROOT)}
        if args.compare_with:
            loops["compare_with"] = loop_per_step_ms(args, data_dir, tmp, Path(args.compare_with).resolve())
    report = {"date": datetime.date.today().isoformat(), "device": common.device_name(),
              "machine": common.machine(), "versions": common.versions(),
              "command": common.launched_command("bench/loop_overhead.py"), "argv": sys.argv,
              "settings": vars(args), "optimizer_step_ms": steps, "loop_ms_per_step": loops}
    if args.compare_with:
        report["loop_vs_compare_with"] = round(loops["this"] / loops["compare_with"], 4)
    md = (f"# Loop overhead ({report['device']}, {report['date']})\n\n"
          f"`{report['command']}`\n\n| what | ms per optimizer step |\n| --- | ---: |\n"
          f"| bare engine step (forward, backward, step x {args.grad_accum_steps}, loss.item()) | "
          f"{steps['bare_engine_step']} |\n| gptds `optimizer_step` | {steps['gptds_step']} (x{steps['ratio']}) |\n"
          f"| `gptds pretrain`, this code, logging every step | {loops['this']} |\n"
          + (f"| `gptds pretrain`, {args.compare_with} | {loops['compare_with']} "
             f"(this: x{report['loop_vs_compare_with']}) |\n" if args.compare_with else ""))
    json_path, md_path = common.write_report("loop-overhead", report, md, args.results_dir)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
