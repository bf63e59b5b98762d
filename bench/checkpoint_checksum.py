"""What checkpoint checksums cost on a `gpt2` checkpoint (124M parameters, 2 ranks, ZeRO-3, fp32 with 32-bit
AdamW: weights and both moments on disk): the xxh3-128 each rank computes over the bytes it writes (measured
on the same bytes in memory: what the save adds), a full verification before a resume or a conversion (every
file read back and hashed, page cache warm), and the recorded check pruning uses (file sizes and times only).

    python bench/checkpoint_checksum.py [--model gpt2] [--ranks 2] [--checkpoint DIR]

Without --checkpoint it first trains one step to get a real checkpoint (bench/convert_memory.make_checkpoint).
Writes bench/results/checksum-<device>-<date>.{json,md}."""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, fmt, machine, md_table, venv_env, versions, write_report  # noqa: E402,I001
from convert_memory import make_checkpoint  # noqa: E402


def best_of(n: int, fn) -> float:
    """The fastest of n runs of fn(), in seconds (the machine is shared: the fastest is the least disturbed)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="an existing checkpoint folder (skips training)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptds-checksum-bench-"))
    try:
        ckpts = Path(args.checkpoint) if args.checkpoint else make_checkpoint(work, args.model, args.ranks,
                                                                              venv_env())
        from gptds import checkpoint
        step_dir = checkpoint.resolve(ckpts)
        meta = checkpoint.read_meta(step_dir)
        files = {name: (step_dir / name).read_bytes() for name in meta["files"]}
        by_rank: dict[str, int] = {}  # rank -> bytes it wrote (rank 0 also writes the model states of ZeRO-1/2)
        for name, data in files.items():
            rank = re.search(r"zero_pp_rank_(\d+)_", name)
            by_rank[rank[1] if rank else "0"] = by_rank.get(rank[1] if rank else "0", 0) + len(data)
        total = sum(len(d) for d in files.values())
        hash_s = {name: best_of(args.repeats, lambda d=data: xxhash.xxh3_128(d).hexdigest())
                  for name, data in files.items()}
        per_rank_s = {}
        for name, seconds in hash_s.items():
            rank = re.search(r"zero_pp_rank_(\d+)_", name)
            per_rank_s[rank[1] if rank else "0"] = per_rank_s.get(rank[1] if rank else "0", 0.0) + seconds

        def full():
            checkpoint._verified_in_this_process.clear()
            checkpoint.verify(step_dir, "full")
        full_s = best_of(args.repeats, full)
        recorded_s = best_of(args.repeats, lambda: checkpoint.verify(step_dir, "recorded"))
        report = {
            "date": datetime.date.today().isoformat(), "device": "cpu", "machine": machine(), "versions": versions(),
            "xxhash": xxhash.VERSION, "command": " ".join(["python", *sys.argv]), "model": meta["model_config"],
            "world_size": meta["world_size"], "zero_stage": meta["zero_stage"], "optimizer": meta["optimizer"],
            "precision": meta["precision"], "files": len(files), "checkpoint_bytes": total,
            "bytes_per_rank": by_rank, "hash_seconds_per_rank": {r: round(s, 3) for r, s in per_rank_s.items()},
            "hash_gb_per_s": round(total / sum(hash_s.values()) / 1e9, 2),
            "full_verify_seconds": round(full_s, 3), "full_verify_gb_per_s": round(total / full_s / 1e9, 2),
            "recorded_verify_seconds": round(recorded_s, 5),
        }
        slowest_rank = max(per_rank_s, key=per_rank_s.get)
        rows = [["xxh3-128 while saving (the slowest rank's share)", fmt(by_rank[slowest_rank] / 2**20, 0),
                 fmt(per_rank_s[slowest_rank], 3)],
                ["full verification before a resume or conversion (page cache warm)", fmt(total / 2**20, 0),
                 fmt(full_s, 3)],
                ["recorded check (pruning: sizes and times, no read)", fmt(total / 2**20, 0), fmt(recorded_s, 5)]]
        markdown = "\n".join([
            f"# Checkpoint checksums, {args.model} ({report['date']})", "",
            f"{meta['world_size']} ranks, ZeRO-{meta['zero_stage']}, {meta['precision']}, {meta['optimizer']}: "
            f"{len(files)} files, {total / 2**20:,.0f} MiB. xxhash {xxhash.VERSION}; best of {args.repeats}.", "",
            *md_table(["what", "MiB", "seconds"], rows, "lrr"), "",
            f"Hashing runs at {report['hash_gb_per_s']} GB/s in memory; a full verification at "
            f"{report['full_verify_gb_per_s']} GB/s (read and hash).", ""])
        json_path, md_path = write_report("checksum", report, markdown, args.results_dir)
        print(markdown)
        print(f"wrote {json_path} and {md_path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
