"""`gptds evaluate` against lm-evaluation-harness on the same Hugging Face GPT-2 and the same items: items per
second of each task and whether the numbers agree. lm-evaluation-harness runs from its own virtualenv
(--lm_eval_python; it is not a gptds dependency), offline, on task YAMLs written here that point at the
bundled samples (its own templates, with the dataset replaced by local JSON files). Writes
bench/results/eval-speed-<device>-<YYYY-MM-DD>.json and .md.

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm_eval==0.4.13 \\
        transformers==5.23.0
    python bench/eval_speed.py --lm_eval_python /tmp/lmeval-venv/bin/python
    python bench/eval_speed.py --lm_eval_python ... --model_dir out/gpt2-hf   # a real export instead

Without --model_dir the model is a random GPT-2 of gpt2-micro's shape (6 layers, width 384) with the full
1024-token context, its weights drawn wide (initializer_range 0.2) so that no two choices or next tokens are
within float rounding of each other (a trained model's distributions are peaked the same way). Each tool
runs each task in its own process; items/s counts the evaluation (lm_eval's total_evaluation_time_seconds,
gptds's per-task time on stderr), wall s the whole process with model loading and imports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, device_name, machine  # noqa: E402,I001

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "gptds" / "assets"

# (task, items limit, few-shot examples): what each tool is asked for
TASKS = [("hellaswag", 100, 0), ("arc_easy", 100, 0), ("arc_challenge", 100, 0), ("mmlu", 1, 5), ("gsm8k", 10, 5)]
# gptds key -> lm_eval (task, metric) it must equal
SAME_NUMBERS = {
    "hellaswag_acc": ("hellaswag_local", "acc,none"), "hellaswag_acc_norm": ("hellaswag_local", "acc_norm,none"),
    "arc_easy_acc": ("arc_easy_local", "acc,none"), "arc_easy_acc_norm": ("arc_easy_local", "acc_norm,none"),
    "arc_challenge_acc": ("arc_challenge_local", "acc,none"),
    "arc_challenge_acc_norm": ("arc_challenge_local", "acc_norm,none"),
    "mmlu_acc_micro": ("mmlu_local", "acc,none"),
    "gsm8k_pass@1": ("gsm8k_local", "exact_match,flexible-extract"),
    "gsm8k_pass@1_strict": ("gsm8k_local", "exact_match,strict-match"),
}


def write_random_model(out: Path) -> None:
    import torch
    import transformers

    from gptds.tokenizer import write_hf_tokenizer_files
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=1024, initializer_range=0.2)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    write_hf_tokenizer_files(out)


# ---------------------------------------------------------------- lm_eval task YAMLs over the bundled samples

def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines() if line.strip()]


def write_lm_eval_tasks(folder: Path, lm_tasks: Path) -> None:
    """The harness's own YAMLs (hellaswag, arc_easy, arc_challenge, mmlu's default template, gsm8k), with
    `dataset_path: json` and local data files. HellaSwag: the bundled sample has ctx (ctx_a and ctx_b
    joined), so it is given as ctx_a with an empty ctx_b: the harness's query is then what gptds reads."""
    shutil.copy(lm_tasks / "hellaswag" / "utils.py", folder / "utils.py")
    hellaswag = _jsonl(folder / "hellaswag.jsonl", [{**r, "ctx_a": r["ctx"], "ctx_b": "", "label": str(r["label"])}
                                                     for r in _rows("hellaswag_sample.jsonl")])
    (folder / "hellaswag_local.yaml").write_text(
        (lm_tasks / "hellaswag" / "hellaswag.yaml").read_text()
        .replace("task: hellaswag", "task: hellaswag_local").replace("dataset_path: Rowan/hellaswag",
                                                                     "dataset_path: json")
        .replace("training_split: train\n", "")
        + f"dataset_kwargs:\n  data_files:\n    validation: {hellaswag}\n")
    arc = (lm_tasks / "arc" / "arc_easy.yaml").read_text()
    for name in ("arc_easy", "arc_challenge"):
        data = _jsonl(folder / f"{name}.jsonl", _rows(f"{name}_sample.jsonl"))
        yaml = re.sub(r"dataset_name: .*\n", "", arc.replace("task: arc_easy", f"task: {name}_local")
                      .replace("dataset_path: allenai/ai2_arc", "dataset_path: json")
                      .replace("training_split: train\n", "").replace("validation_split: validation\n", ""))
        (folder / f"{name}_local.yaml").write_text(yaml + f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    template = (lm_tasks / "mmlu" / "default" / "_default_template_yaml").read_text()
    test, dev = _rows("mmlu_sample.jsonl"), _rows("mmlu_dev_sample.jsonl")
    subjects = sorted({r["subject"] for r in test})
    (folder / "_mmlu_local_template").write_text(template.replace("dataset_path: cais/mmlu", "dataset_path: json"))
    for s in subjects:
        t = _jsonl(folder / f"mmlu_{s}_test.jsonl", [r for r in test if r["subject"] == s])
        d = _jsonl(folder / f"mmlu_{s}_dev.jsonl", [r for r in dev if r["subject"] == s])
        (folder / f"mmlu_local_{s}.yaml").write_text(
            f"include: _mmlu_local_template\ntask: mmlu_local_{s}\ndescription: \"The following are multiple "
            f"choice questions (with answers) about {s.replace('_', ' ')}.\\n\\n\"\n"
            f"dataset_kwargs:\n  data_files:\n    test: {t}\n    dev: {d}\n")
    (folder / "mmlu_local.yaml").write_text(
        "group: mmlu_local\ntask:\n" + "".join(f"  - mmlu_local_{s}\n" for s in subjects)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: True\nmetadata:\n  version: 2\n")
    train = _jsonl(folder / "gsm8k_train.jsonl", _rows("gsm8k_train_sample.jsonl"))
    test = _jsonl(folder / "gsm8k_test.jsonl", _rows("gsm8k_sample.jsonl"))
    (folder / "gsm8k_local.yaml").write_text(
        re.sub(r"dataset_name: .*\n", "", (lm_tasks / "gsm8k" / "gsm8k.yaml").read_text()
               .replace("task: gsm8k", "task: gsm8k_local").replace("dataset_path: openai/gsm8k",
                                                                    "dataset_path: json"))
        + f"dataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n")


# ---------------------------------------------------------------- the two runs

def run_lm_eval(python: str, model_dir: Path, task: str, limit: int, shots: int, tasks_dir: Path, out: Path,
                batch_size: int) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", f"{task}_local", "--include_path", str(tasks_dir), "--limit", str(limit), "--num_fewshot",
           str(shots), "--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(out / task)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(next((out / task).rglob("results_*.json")).read_text())
    return {"results": result["results"], "eval_s": float(result["total_evaluation_time_seconds"]), "wall_s": wall}


def run_gptds(model_dir: Path, task: str, limit: int, shots: int, batch_size: int, gen_batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "gptds", "evaluate", "--checkpoint", str(model_dir), "--tasks", task, "--limit",
           str(limit), "--num_fewshot", str(shots), "-B", str(batch_size), "--gen_batch_size", str(gen_batch_size)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"gptds evaluate failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    done = re.search(rf"^{task}: (\d+) items in ([\d.]+) s", proc.stderr, re.M)
    return {"results": json.loads(proc.stdout), "eval_s": float(done.group(2)), "items": int(done.group(1)),
            "wall_s": wall}


def write_markdown(report: dict, stem: Path) -> None:
    lines = [f"# `gptds evaluate` vs lm-evaluation-harness 0.4.13, {report['date']}", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} CPUs (shared). Model: "
             f"{report['model']}, fp32. Same items (the bundled samples), same prompts; lm_eval batch size "
             f"{report['lm_eval_batch_size']}, gptds -B {report['gptds_batch_size']} --gen_batch_size "
             f"{report['gptds_gen_batch_size']}. items/s: evaluation time only; wall: "
             "the whole process.", "",
             "| task | items | shots | gptds items/s | lm_eval items/s | speed-up | gptds wall s | lm_eval wall s | "
             "same numbers |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        same = ", ".join(f"{k.removeprefix(r['task'] + '_')} {v['gptds']:.4f}"
                         f"{' = ' if abs(v['gptds'] - v['lm_eval']) < 1e-9 else ' != '}{v['lm_eval']:.4f}"
                         for k, v in r["numbers"].items())
        lines.append(f"| {r['task']} | {r['items']} | {r['num_fewshot']} | {r['gptds_items_per_s']:.2f} | "
                     f"{r['lm_eval_items_per_s']:.2f} | {r['speedup']:.1f}x | {r['gptds_wall_s']:.0f} | "
                     f"{r['lm_eval_wall_s']:.0f} | {same} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm_eval_python", required=True, help="python of a virtualenv with lm_eval installed")
    parser.add_argument("--model_dir", help="a Hugging Face GPT-2 folder (omitted: a random gpt2-micro-shaped one)")
    parser.add_argument("--tasks", default=",".join(t for t, _, _ in TASKS))
    parser.add_argument("--limit", type=int, help="items per task instead of the defaults (MMLU: per subject)")
    parser.add_argument("--lm_eval_batch_size", type=int, default=16)
    parser.add_argument("--gptds_batch_size", type=int, default=8)
    parser.add_argument("--gptds_gen_batch_size", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    if not args.model_dir:
        write_random_model(model_dir)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir()
    lm_eval_dir = subprocess.run([args.lm_eval_python, "-c", "import lm_eval, os; print(os.path.dirname("
                                  "lm_eval.__file__))"], check=True, capture_output=True, text=True).stdout.strip()
    write_lm_eval_tasks(tasks_dir, Path(lm_eval_dir) / "tasks")
    rows = []
    for task, limit, shots in TASKS:
        if task not in args.tasks.split(","):
            continue
        limit = args.limit or limit
        ours = run_gptds(model_dir, task, limit, shots, args.gptds_batch_size, args.gptds_gen_batch_size)
        theirs = run_lm_eval(args.lm_eval_python, model_dir, task, limit, shots, tasks_dir, work,
                             args.lm_eval_batch_size)
        items = ours["items"]
        numbers = {key: {"gptds": ours["results"][key], "lm_eval": theirs["results"][t][m]}
                   for key, (t, m) in SAME_NUMBERS.items() if key in ours["results"]}
        rows.append({"task": task, "items": items, "num_fewshot": shots,
                     "gptds_items_per_s": items / ours["eval_s"], "lm_eval_items_per_s": items / theirs["eval_s"],
                     "speedup": theirs["eval_s"] / ours["eval_s"], "gptds_eval_s": ours["eval_s"],
                     "lm_eval_eval_s": theirs["eval_s"], "gptds_wall_s": ours["wall_s"],
                     "lm_eval_wall_s": theirs["wall_s"], "numbers": numbers,
                     "same_numbers": all(abs(v["gptds"] - v["lm_eval"]) < 1e-9 for v in numbers.values())})
        print(json.dumps(rows[-1]), flush=True)
    stem = RESULTS_DIR / f"eval-speed-{device_name()}-{datetime.date.today().isoformat()}"
    if stem.with_suffix(".json").exists():  # a rerun of some tasks replaces their rows
        done = {r["task"] for r in rows}
        rows = [r for r in json.loads(stem.with_suffix(".json").read_text())["rows"] if r["task"] not in done] + rows
        rows.sort(key=lambda r: [t for t, _, _ in TASKS].index(r["task"]))
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": str(args.model_dir or
              "random GPT-2, 6 layers, width 384, 1024 positions, initializer_range 0.2"),
              "lm_eval_batch_size": args.lm_eval_batch_size, "gptds_batch_size": args.gptds_batch_size,
              "gptds_gen_batch_size": args.gptds_gen_batch_size, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, stem)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
