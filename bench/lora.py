"""LoRA against full fine-tuning on the same base, data and steps: optimizer-state bytes, checkpoint size, peak
memory and step time, each variant in a fresh process (one rank, the real set-up and step of gptds). The base
is a randomly initialised model of the chosen preset saved as gptds weights; the data, the bundled
conversations (so LoRA also trains the ChatML rows). Writes bench/results/lora-<device>-<date>.{json,md}.

    python bench/lora.py [--model gpt2-micro] [--steps 8] [--variants full lora qlora]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANT_FLAGS = {"full": [], "lora": ["--lora_rank", "8"], "qlora": ["--lora_rank", "8", "--lora_base_bits", "4"]}


def measure(args) -> dict:
    """One variant, in this process: set-up, --steps optimizer steps, a checkpoint."""
    from gptds import checkpoint, engine
    from gptds.__main__ import build_parser
    from gptds.config import run_config_from_flags
    from gptds.session import set_up
    from gptds.train import StopRequest, optimizer_step
    argv = ["finetune", "--data_dir", args.data_dir, "--pretrained_checkpoint", args.base, "--log_dir", args.log_dir,
            "-B", str(args.batch_size), "-T", str(args.context_length), "--optimizer", "adamw", "--max_steps",
            str(args.steps), "--eval_interval", "0", "--generate_interval", "0",
            "--deepspeed_config", "zero2_fp32" if not torch.cuda.is_available() else "zero2",
            *VARIANT_FLAGS[args.variant]]
    s = set_up(run_config_from_flags("finetune", build_parser().parse_args(argv)))
    stop, times = StopRequest(), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        optimizer_step(s, 1e-4, stop)
        times.append(time.perf_counter() - t0)
    stop.restore()
    state_bytes = sum(t.numel() * t.element_size() for t in engine.optimizer_state_tensors(s.eng))
    step_dir = checkpoint.save(s.eng, s.run.checkpoint_dir, args.steps, s.meta, *s.stateful, keep_last_n=1)
    trainable = sum(p.numel() for p in s.eng.module.parameters() if p.requires_grad)
    return {"variant": args.variant, "n_params": s.n_params, "trainable_params": trainable,
            "optimizer_state_bytes": state_bytes, "checkpoint_bytes": sum(f.stat().st_size for f in step_dir.iterdir()),
            "peak_memory_mb": round(common.peak_memory_mb(s.info.device), 1),
            "step_time_ms": round(1000 * statistics.median(times[1:] or times), 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-micro")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--context_length", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANT_FLAGS), choices=list(VARIANT_FLAGS))
    p.add_argument("--results_dir", default=str(common.RESULTS_DIR))
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one measurement (a child process)
    for hidden in ("--base", "--data_dir", "--log_dir"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)), flush=True)
        return {}
    from gptds.data.prepare import PrepareChatConfig, prepare_chat
    from gptds.jobs import BUNDLED_CONVERSATIONS
    from gptds.model import GPT, GPTConfig
    from gptds.weights import save_gptds_weights, state_dict_for_saving
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptds-lora-") as tmp:
        tmp = Path(tmp)
        config = GPTConfig.from_preset(args.model, pad_vocab_to_multiple_of=64)
        torch.manual_seed(0)
        save_gptds_weights(config, state_dict_for_saving(GPT(config)).items(), tmp / "base.safetensors")
        prepare_chat(PrepareChatConfig(input=[str(f) for f in BUNDLED_CONVERSATIONS], output_dir=str(tmp / "data"),
                                       context_length=args.context_length, num_workers=0))
        for variant in args.variants:
            child = [sys.executable, __file__, "--variant", variant, "--base", str(tmp / "base.safetensors"),
                     "--data_dir", str(tmp / "data"), "--log_dir", str(tmp / variant), "--model", args.model,
                     "--batch_size", str(args.batch_size), "--context_length", str(args.context_length),
                     "--steps", str(args.steps)]
            out = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["variant"] == "full"), None)
    report = {"date": datetime.date.today().isoformat(), "device": common.device_name(), "machine": common.machine(),
              "versions": common.versions(), "command": common.launched_command("bench/lora.py"), "argv": sys.argv,
              "model": args.model, "batch_size": args.batch_size, "context_length": args.context_length,
              "steps": args.steps, "rows": rows}
    header = ["variant", "trainable params", "optimizer state MB", "checkpoint MB", "peak memory MB", "step ms"]
    table = [[r["variant"], f"{r['trainable_params']:,}", round(r["optimizer_state_bytes"] / 2**20, 2),
              round(r["checkpoint_bytes"] / 2**20, 2), r["peak_memory_mb"], r["step_time_ms"]] for r in rows]
    md = (f"# LoRA vs full fine-tuning ({report['device']}, {report['date']})\n\n`{report['command']}`: "
          f"{args.model}, B={args.batch_size}, T={args.context_length}, {args.steps} steps, one rank\n\n"
          + "\n".join(common.md_table(header, table)) + "\n")
    if full:
        lora = next((r for r in rows if r["variant"] == "lora"), None)
        if lora:
            md += (f"\nLoRA: {lora['optimizer_state_bytes'] / full['optimizer_state_bytes']:.4f}x the optimizer state, "
                   f"{lora['checkpoint_bytes'] / full['checkpoint_bytes']:.4f}x the checkpoint.\n")
    json_path, md_path = common.write_report("lora", report, md, args.results_dir)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
