"""Throughput and peak memory of `gptds prepare text` on tiny Shakespeare repeated to a given size:
tokens per second and the peak resident memory of the whole process tree (main process plus tokeniser
workers), at two corpus sizes to show memory does not grow with the corpus. Writes
bench/results/prepare-cpu-<YYYY-MM-DD>.json and .md.

    python bench/prepare_throughput.py                 # 25 MB and 100 MB, .txt and .jsonl
    python bench/prepare_throughput.py --sizes_mb 25   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import process_tree  # noqa: E402,I001

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "gptds" / "assets" / "tinyshakespeare.txt"
SAMPLE_SECONDS = 0.05  # memory sampling period


def make_corpus(folder: Path, size_mb: int, kind: str) -> Path:
    """Tiny Shakespeare repeated to about size_mb MB: one .txt file (one document, streamed in
    chunks), or .jsonl with one ~10 KB document per line."""
    text = SHAKESPEARE.read_text()
    copies = max(1, round(size_mb * 1e6 / len(SHAKESPEARE.read_bytes())))
    path = folder / f"shakespeare_{size_mb}mb.{kind}"
    with open(path, "w") as f:
        for _ in range(copies):
            if kind == "txt":
                f.write(text)
            else:
                for i in range(0, len(text), 10_000):
                    f.write(json.dumps({"text": text[i:i + 10_000]}) + "\n")
    return path


def _rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def run_measured(command: list[str]) -> dict:
    """Run command, sampling the RSS of it and all its descendants; peak of the sum, of the main
    process and of the largest other process. (A sum of RSS counts shared library pages once per process.)"""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak_tree = peak_main = peak_worker = 0.0
    while proc.poll() is None:
        sizes = {pid: _rss_mb(pid) for pid in process_tree(proc.pid)}
        peak_tree = max(peak_tree, sum(sizes.values()))
        peak_main = max(peak_main, sizes[proc.pid])
        peak_worker = max([peak_worker] + [mb for pid, mb in sizes.items() if pid != proc.pid])
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - start
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode}:\n{stdout}")
    return {"wall_seconds": wall, "peak_rss_tree_mb": peak_tree, "peak_rss_main_mb": peak_main,
            "peak_rss_worker_mb": peak_worker, "stdout": stdout}


def bench_one(corpus: Path, out_dir: Path, num_workers: int) -> dict:
    command = [sys.executable, "-m", "gptds", "prepare", "text", "--input", str(corpus), "--output_dir",
               str(out_dir), "--num_workers", str(num_workers), "--overwrite"]
    result = run_measured(command)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    tokens = sum(split["num_tokens"] for split in manifest["splits"].values())
    # prepare's own timing (reading, tokenising, writing; not Python/torch start-up) from its summary line
    prepare_seconds = float(re.search(r" in ([\d.]+) s,", result["stdout"]).group(1))
    size_mb = corpus.stat().st_size / 1e6
    return {"input": corpus.name, "input_mb": round(size_mb, 1), "num_workers": num_workers,
            "documents": manifest["documents"], "tokens": tokens,
            "prepare_seconds": prepare_seconds, "wall_seconds": round(result["wall_seconds"], 2),
            "tokens_per_second": round(tokens / prepare_seconds),
            "mb_per_second": round(size_mb / prepare_seconds, 2),
            "peak_rss_tree_mb": round(result["peak_rss_tree_mb"], 1),
            "peak_rss_main_mb": round(result["peak_rss_main_mb"], 1),
            "peak_rss_worker_mb": round(result["peak_rss_worker_mb"], 1)}


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def markdown(report: dict) -> str:
    lines = [f"# `gptds prepare text` throughput, {report['date']}", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs, "
             f"Python {report['machine']['python']}. Input: tiny Shakespeare repeated to the size shown "
             "(.txt: one document streamed in ~1 MB chunks; .jsonl: ~10 KB documents). tokens/s counts prepare's "
             f"own time (reading, tokenising, writing shards; median of {report['runs'][0]['repeats']} runs); wall "
             "includes start-up. Peak RSS (the max over the runs) is "
             f"sampled every {SAMPLE_SECONDS * 1000:.0f} ms: the tree column sums the main process and its "
             "tokeniser workers. Importing gptds.data.prepare alone (Python, numpy, tiktoken, torch) takes "
             f"{report['import_baseline_rss_mb']} MB of the main process's RSS.", "",
             "| input | MB | workers | tokens | tokens/s | MB/s | prepare s | wall s | peak RSS tree MB "
             "| main MB | largest worker MB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        lines.append(f"| {r['input']} | {r['input_mb']} | {r['num_workers']} | {r['tokens']:,} | "
                     f"{r['tokens_per_second']:,} | {r['mb_per_second']} | {r['prepare_seconds']} | "
                     f"{r['wall_seconds']} | {r['peak_rss_tree_mb']} | {r['peak_rss_main_mb']} | "
                     f"{r['peak_rss_worker_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--kinds", nargs="+", default=["txt", "jsonl"], choices=["txt", "jsonl"])
    parser.add_argument("--num_workers", type=int, nargs="+", default=[min(8, os.cpu_count() or 1)])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    parser.add_argument("--results_dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--work_dir", default=None, help="where corpora and shards go (default: a temp folder)")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gptds-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for kind in args.kinds:
            for size_mb in args.sizes_mb:
                corpus = make_corpus(work, size_mb, kind)
                for num_workers in args.num_workers:
                    # the median run by time is reported (a shared VM is noisy); peak memory is the max of all
                    tries = sorted((bench_one(corpus, work / "out", num_workers) for _ in range(args.repeats)),
                                   key=lambda r: r["prepare_seconds"])
                    run = tries[len(tries) // 2] | {
                        "repeats": len(tries), "tokens_per_second_all": [r["tokens_per_second"] for r in tries],
                        "peak_rss_tree_mb": max(r["peak_rss_tree_mb"] for r in tries)}
                    print(json.dumps(run), flush=True)
                    runs.append(run)
                corpus.unlink()
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    # what the main process holds before any data: Python, numpy, tiktoken and torch (gptds.config imports the model)
    baseline = run_measured([sys.executable, "-c", "import time, gptds.data.prepare; time.sleep(0.5)"])
    date = datetime.date.today().isoformat()
    report = {"date": date, "machine": machine(), "command": sys.argv,
              "import_baseline_rss_mb": round(baseline["peak_rss_main_mb"], 1), "runs": runs}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"prepare-cpu-{date}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"prepare-cpu-{date}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
