"""Peak resident memory and time of `gptds convert` on a ZeRO-3 checkpoint of the gpt2 preset (124M),
beside DeepSpeed's own consolidation (zero_to_fp32's get_fp32_state_dict_from_zero_checkpoint, which
loads everything) as the baseline, each in a fresh process whose whole process tree is sampled for RSS.

    python bench/convert_memory.py [--model gpt2] [--ranks 2] [--checkpoint DIR]

Without --checkpoint it first trains one ZeRO-3 step on `--ranks` CPU ranks (fp32, 32-bit AdamW) to get
a real sharded checkpoint. Writes bench/results/convert-<device>-<date>.{json,md}."""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, ROOT, ds_config_variant, fmt, free_port, machine, md_table,  # noqa: E402,I001
                    venv_env, versions, write_report)

BASELINE = ("from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as load; "
            "import sys; sd = load(sys.argv[1], tag=sys.argv[2]); print(sum(v.numel() for v in sd.values()))")


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """(all, anonymous) resident bytes of a process and all its descendants (the universal conversion runs
    worker processes). Anonymous memory is what a conversion really needs; the rest is mostly pages of the
    memory-mapped rank shards, which the kernel reclaims under pressure."""
    total = anon = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith(("VmRSS:", "RssAnon:")))
            total += int(fields["VmRSS"].split()[0]) * 1024
            anon += int(fields["RssAnon"].split()[0]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, KeyError, ValueError):
            continue
    return total, anon


def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd, sampling its process tree's memory every 20 ms; wall time, peak RSS and peak anonymous RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            peak[:] = map(max, peak, tree_rss_bytes(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak[0] / 2**20, 1),
            "peak_anon_mb": round(peak[1] / 2**20, 1)}


def make_checkpoint(work: Path, model: str, ranks: int, env: dict) -> Path:
    from gptds.data.prepare import PrepareTextConfig, prepare_text
    from gptds.tokenizer import ASSETS_DIR
    data = prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")],
                                          output_dir=str(work / "data"), val_fraction=0.1, num_workers=0))
    config = ds_config_variant("zero3", "fp32", work, {"stage3_param_persistence_threshold": 0})
    subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--no_local_rank",
                    "--master_port", str(free_port()), "--module", "gptds", "pretrain", "--data_dir", str(data),
                    "--deepspeed_config", str(config), "--model", model, "-B", "1", "-T", "64", "--max_steps", "1",
                    "--optimizer", "adamw", "--eval_interval", "0", "--generate_interval", "0",
                    "--hellaswag_interval", "0", "--log_dir", str(work / "run")],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=3600)
    return work / "run" / "checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="an existing ZeRO checkpoint folder (skips training)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (checkpoint and outputs)")
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    args = parser.parse_args()
    env = venv_env()
    work = Path(tempfile.mkdtemp(prefix="gptds-convert-bench-"))
    try:
        ckpts = Path(args.checkpoint) if args.checkpoint else make_checkpoint(work, args.model, args.ranks, env)
        from gptds import checkpoint
        step_dir = checkpoint.resolve(ckpts)
        meta = checkpoint.read_meta(step_dir)
        checkpoint_mb = sum(meta["files"].values()) / 2**20
        py, gptds_cmd = sys.executable, [sys.executable, "-m", "gptds", "convert"]
        runs = {
            "DeepSpeed get_fp32_state_dict_from_zero_checkpoint (baseline, all in memory)":
                measure([py, "-c", BASELINE, str(step_dir.parent), step_dir.name], env),
            "gptds convert zero-to-fp32": measure(gptds_cmd + ["zero-to-fp32", str(ckpts), str(work / "fp32")], env),
            "gptds convert zero-to-fp32 --max_shard_mb 100": measure(
                gptds_cmd + ["zero-to-fp32", str(ckpts), str(work / "fp32-small"), "--max_shard_mb", "100"], env),
            "gptds convert zero-to-hf": measure(gptds_cmd + ["zero-to-hf", str(ckpts), str(work / "hf")], env),
            "gptds convert zero-to-universal": measure(gptds_cmd + ["zero-to-universal", str(ckpts),
                                                                    str(work / "universal")], env),
        }
        import_only = measure([py, "-c", "import gptds.convert, deepspeed, torch"], env)
        import torch

        from gptds.model import GPT, GPTConfig
        with torch.device("meta"):
            n_params = GPT(GPTConfig.from_dict(meta["model_config"])).num_parameters()
        weights_mb = n_params * 4 / 2**20
        report = {
            "date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions(),
            "command": " ".join(["python", "bench/convert_memory.py", *sys.argv[1:]]),
            "checkpoint": {"model": args.model, "parameters": n_params, "zero_stage": meta["zero_stage"],
                           "world_size": meta["world_size"], "files_mb": round(checkpoint_mb, 1)},
            "fp32_weights_mb": round(weights_mb, 1), "python_torch_deepspeed_import_rss_mb": import_only["peak_rss_mb"],
            "python_torch_deepspeed_import_anon_mb": import_only["peak_anon_mb"],
            "runs": {name: {**r, "anon_above_imports_over_weights":
                            round((r["peak_anon_mb"] - import_only["peak_anon_mb"]) / weights_mb, 2)}
                     for name, r in runs.items()},
        }
        rows = [[name, fmt(r["seconds"], 1), fmt(r["peak_rss_mb"], 0), fmt(r["peak_anon_mb"], 0),
                 fmt(r["anon_above_imports_over_weights"])] for name, r in report["runs"].items()]
        md = [f"# Conversion memory and time, {report['date']}", "",
              f"ZeRO-{meta['zero_stage']} checkpoint of `{args.model}` ({n_params:,} parameters, fp32 weights "
              f"{weights_mb:,.0f} MB) saved by {meta['world_size']} ranks ({checkpoint_mb:,.0f} MB on disk). "
              f"Peak RSS is "
              f"the whole process tree's, sampled every 20 ms; anonymous RSS leaves out the pages of the memory-mapped "
              f"rank shards (reclaimable page cache), so it is the memory a conversion needs. Importing torch + "
              f"deepspeed + gptds alone takes {import_only['peak_anon_mb']:,.0f} MB anonymous. Machine: "
              f"{report['machine']['cpu']}, {report['machine']['cpu_count']} cores.", "",
              *md_table(["conversion", "seconds", "peak RSS (MB)", "peak anonymous RSS (MB)",
                         "(anonymous - imports) / fp32 weights"], rows), "",
              f"Command: `{report['command']}`", ""]
        json_path, md_path = write_report("convert", report, "\n".join(md), args.results_dir)
        print("\n".join(md))
        print(f"wrote {json_path} and {md_path}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
