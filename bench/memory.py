"""Memory: (1) optimizer-state bytes per parameter of AdamW8bit and 32-bit AdamW under ZeRO 1-3, from the real
state tensors after one step (gptds.engine.optimizer_state_tensors, summed over ranks); (2) the largest GPT of
GPT-2 shape that trains for 10 steps under ZeRO-3 with CPU offload (ds_configs/zero3_offload.json) and activation
checkpointing, found by doubling n_layer and then bisecting, each candidate in fresh processes with a timeout and
a host-memory watchdog, the whole search bounded in time. Writes bench/results/memory-<device>-<date>.{json,md}.

    python bench/memory.py                      # CPU: 2 ranks, fp32, bytes/param on gpt2-micro, search <= 15 min
    python bench/memory.py --quick              # bytes per parameter only (tiny preset), seconds
    python bench/memory.py --ranks 1 --context_length 1024 --start_n_layer 32 --search_budget_s 5400   # one GPU
This process only orchestrates: the measurements run in ranks it launches with `deepspeed --num_gpus RANKS`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from gptds.model import GPT, PRESETS, GPTConfig

# n_embd = 64 * round(a * n_layer**b / 64), a least-squares fit of log n_embd on log n_layer over OpenAI's four
# GPT-2 sizes (12/768, 24/1024, 36/1280, 48/1600); heads of 64 dimensions, as in all of them.
SHAPE_A, SHAPE_B, HEAD_DIM = 206.74, 0.517, 64
WATCH_SECONDS = 0.1       # host-memory watchdog sampling period
MEMORY_RESERVE_GIB = 1.5  # left free for everything else on the machine


def gpt2_shape(n_layer: int) -> dict:
    n_embd = HEAD_DIM * max(1, round(SHAPE_A * n_layer ** SHAPE_B / HEAD_DIM))
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // HEAD_DIM}


def count_parameters(config: GPTConfig) -> int:
    with torch.device("meta"):  # counted, not allocated
        return GPT(config).num_parameters()


# ---------------------------------------------------------------- workers (inside the deepspeed ranks)

def _engine_for(model_config: GPTConfig, config_name: str, optimizer: str, args, info, activation_checkpointing: bool,
                config_dir: Path):
    from gptds import engine
    torch.manual_seed(args.seed)
    with torch.device(info.device):  # on a GPU built there directly: no full fp32 copy in host memory
        model = GPT(model_config)
    model.activation_checkpointing = activation_checkpointing
    path = common.ds_config_variant(config_name, args.dtype, config_dir)
    ds_config = common.ds_config_for(path, args.batch_size, info.world_size, optimizer)
    opt = engine.build_optimizer(model, optimizer, 1e-3, 0.1, ds_config)
    return engine.initialize(model, opt, ds_config)


def _train_step(eng, args, info, vocab_size: int, generator: torch.Generator) -> float:
    batch = torch.randint(0, vocab_size, (args.batch_size, args.context_length + 1), generator=generator)
    x, y = batch[:, :-1].to(info.device), batch[:, 1:].to(info.device)
    _, loss = eng(x, y)
    eng.backward(loss)
    eng.step()
    return loss.item()


def worker_state_bytes(args, info) -> dict:
    """Per stage and optimizer: one step, then the bytes of every optimizer state tensor, summed over ranks."""
    from gptds import dist, engine
    torch_linear = torch.nn.functional.linear
    model_config = GPTConfig.from_preset(args.model)
    n_params = count_parameters(model_config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptds-bench-") as tmp:
        for stage in args.stages:
            for optimizer in args.optimizers:
                eng = _engine_for(model_config, f"zero{stage}", optimizer, args, info, False, Path(tmp))
                _train_step(eng, args, info, model_config.vocab_size, torch.Generator().manual_seed(info.rank))
                by_dtype: dict[str, int] = {}
                for t in engine.optimizer_state_tensors(eng):
                    key = str(t.dtype).removeprefix("torch.")
                    by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
                gathered = dist.all_gather_object(by_dtype)
                dtypes = sorted({k for g in gathered for k in g})
                total_by_dtype = {k: sum(g.get(k, 0) for g in gathered) for k in dtypes}
                total = sum(total_by_dtype.values())
                rows.append({"stage": stage, "optimizer": optimizer, "n_params": n_params, "state_bytes": total,
                             "bytes_per_param": round(total / n_params, 4),
                             "bytes_per_param_by_dtype": {k: round(v / n_params, 4) for k, v in total_by_dtype.items()},
                             "state_bytes_per_rank": [sum(g.values()) for g in gathered]})
                dist.print0(f"ZeRO-{stage} {optimizer}: {total / n_params:.3f} bytes/parameter "
                            f"{rows[-1]['bytes_per_param_by_dtype']}")
                eng.destroy()
                del eng
                torch.nn.functional.linear = torch_linear  # ZeRO-3 replaces it for the rest of the process
    return {"model": args.model, "model_config": model_config.to_dict(), "rows": rows}


def worker_train(args, info) -> dict:
    """One search candidate: ZeRO-3 + CPU offload + activation checkpointing, --steps steps."""
    from gptds import dist
    t0 = time.perf_counter()
    model_config = GPTConfig(block_size=max(args.context_length, 64), n_layer=args.n_layer, n_embd=args.n_embd,
                             n_head=args.n_head)
    result = {"n_params": count_parameters(model_config)}
    try:
        with tempfile.TemporaryDirectory(prefix="gptds-bench-") as tmp:
            eng = _engine_for(model_config, args.search_config, "adamw", args, info, True, Path(tmp))
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        generator = torch.Generator().manual_seed(args.seed + info.rank)
        step_times, losses = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(_train_step(eng, args, info, model_config.vocab_size, generator))
            step_times.append(time.perf_counter() - t)
        result.update(status="ok" if all(math.isfinite(v) for v in losses) else "non-finite loss",
                      median_step_s=round(statistics.median(step_times), 2), losses=[round(v, 4) for v in losses])
    except torch.OutOfMemoryError as e:
        result.update(status="out of memory", error=str(e).splitlines()[0])
    except RuntimeError as e:
        result.update(status="out of memory" if "out of memory" in str(e).lower() else "failed",
                      error=str(e).splitlines()[0][:300])
    peaks = dist.all_gather_object({"peak_rss_mb": round(common.process_peak_rss_mb(), 1),
                                    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                    if info.device.type == "cuda" else None})
    result["peak_rss_mb_per_rank"] = [p["peak_rss_mb"] for p in peaks]
    if info.device.type == "cuda":
        result["peak_gpu_mb_per_rank"] = [p["peak_gpu_mb"] for p in peaks]
    return result


def run_worker(args) -> None:
    from gptds import dist
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    info = dist.init_distributed()
    result = worker_state_bytes(args, info) if args.worker == "state" else worker_train(args, info)
    if info.is_main:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()


# ---------------------------------------------------------------- the orchestrator

def _rss_bytes(pid: int) -> int:
    try:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def mem_available_bytes() -> int:
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else common.total_ram_bytes()


def settled_mem_available_bytes(timeout_s: float = 90) -> int:
    """MemAvailable once it stops rising: the kernel gives a killed candidate's memory back over seconds, after
    its processes are gone, and a budget read in that window would doom the next candidate."""
    deadline = time.perf_counter() + timeout_s
    readings = [mem_available_bytes()]
    while time.perf_counter() < deadline:
        time.sleep(1.0)
        readings.append(mem_available_bytes())
        if len(readings) >= 4 and readings[-1] - readings[-4] < 64 * 2**20:
            break
    return readings[-1]


def _wait_until_gone(pids: list[int], timeout_s: float = 120) -> None:
    """Until every pid has exited and given its memory back (a zombie holds none)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        alive = [pid for pid in pids if _rss_bytes(pid) > 0]
        if not alive:
            return
        time.sleep(WATCH_SECONDS)


def launch(worker_args: list[str], args, out: Path, timeout_s: float, memory_budget: int) -> dict:
    """Run `deepspeed --num_gpus RANKS bench/memory.py --worker ...` in its own session; kill the whole group
    when it runs past timeout_s or its processes together hold more than memory_budget bytes."""
    port = common.free_port()
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--no_local_rank",
               "--master_port", str(port), str(Path(__file__).resolve()), *worker_args, "--out", str(out),
               "--dtype", args.dtype, "--batch_size", str(args.batch_size),
               "--context_length", str(args.context_length)]
    log = open(out.with_suffix(".log"), "w")
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=common.venv_env())
    peak, why = 0, None
    while proc.poll() is None:
        rss = sum(_rss_bytes(pid) for pid in common.process_tree(proc.pid))
        peak = max(peak, rss)
        if rss > memory_budget:
            why = "memory"
        elif time.perf_counter() - start > timeout_s:
            why = "time"
        if why:
            ranks = common.process_tree(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call created: launcher and its ranks
            proc.wait()
            _wait_until_gone(ranks)  # or the next candidate's budget is measured while their memory is held
            break
        time.sleep(WATCH_SECONDS)
    log.close()
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(wall_s=round(time.perf_counter() - start, 1), peak_rss_tree_mb=round(peak / 2**20),
                  returncode=proc.returncode)
    if why == "memory":
        result["status"] = (f"memory: the ranks together exceeded the {memory_budget / 2**30:.1f} GiB budget "
                            f"(killed by the watchdog)")
    elif why == "time":
        result["status"] = f"time: still running after {timeout_s:.0f} s (killed)"
    elif "status" not in result and "rows" not in result:
        tail = out.with_suffix(".log").read_text()[-3000:]
        oom = proc.returncode in (-9, 137) or "Killed" in tail or "out of memory" in tail.lower()
        result["status"] = "memory: killed (out of memory)" if oom else f"failed (exit {proc.returncode})"
        result["log_tail"] = tail[-800:]
    return result


def search(args, work: Path) -> dict:
    """Double n_layer from --start_n_layer until a candidate fails, then bisect between the last success and
    the first failure; stop when the bracket closes, --max_n_layer is passed, or the time budget runs out."""
    start = time.perf_counter()
    candidates, ok, bad = [], None, None
    stopped_by = None

    def attempt(n_layer: int) -> bool:
        remaining = args.search_budget_s - (time.perf_counter() - start)
        shape = gpt2_shape(n_layer)
        budget = settled_mem_available_bytes() - int(MEMORY_RESERVE_GIB * 2**30)
        n_params = count_parameters(GPTConfig(block_size=max(args.context_length, 64), **shape))
        print(f"search: n_layer {n_layer}, n_embd {shape['n_embd']} ({n_params / 1e6:,.0f}M parameters), "
              f"timeout {min(args.candidate_timeout_s, remaining):.0f} s, host memory budget {budget / 2**30:.1f} GiB",
              flush=True)
        result = launch(["--worker", "train", "--n_layer", str(n_layer), "--n_embd", str(shape["n_embd"]),
                         "--n_head", str(shape["n_head"]), "--steps", str(args.steps),
                         "--search_config", args.search_config],
                        args, work / f"candidate-{n_layer}.json", min(args.candidate_timeout_s, remaining), budget)
        row = {**shape, "n_params": n_params, "memory_budget_gib": round(budget / 2**30, 1), **result}
        row.pop("losses", None)
        candidates.append(row)
        print(f"search:   -> {row['status']} ({row['wall_s']} s, peak host RSS {row['peak_rss_tree_mb']:,} MB)",
              flush=True)
        return row["status"] == "ok"

    if args.n_layers:  # exactly these sizes, e.g. to confirm one size on a machine with little time
        for n_layer in args.n_layers:
            if time.perf_counter() - start >= args.search_budget_s:
                stopped_by = "time"
                break
            if attempt(n_layer):
                ok = max(ok or 0, n_layer)
            elif bad is None or n_layer < bad:
                bad = n_layer
        stopped_by = stopped_by or "the --n_layers list"
    n_layer = args.start_n_layer
    while bad is None and stopped_by is None:
        if time.perf_counter() - start >= args.search_budget_s:
            stopped_by = "time"
            break
        if n_layer > args.max_n_layer:
            stopped_by = "bound"
            break
        if attempt(n_layer):
            ok, n_layer = n_layer, n_layer * 2
        else:
            bad = n_layer
    while stopped_by is None and bad is not None and (ok or 0) + 1 < bad:
        if time.perf_counter() - start >= args.search_budget_s:
            stopped_by = "time"
            break
        mid = ((ok or 0) + bad) // 2
        if attempt(mid):
            ok = mid
        else:
            bad = mid
    failure = next((c["status"] for c in candidates if c["n_layer"] == bad), None)
    if stopped_by is None:  # the bracket closed: what the first failing size ran into
        stopped_by = failure.split(":")[0] if failure else "unknown"
    best = max((c for c in candidates if c["status"] == "ok"), key=lambda c: c["n_params"], default=None)
    return {"candidates": candidates, "largest": best, "smallest_failure_n_layer": bad,
            "smallest_failure_status": failure, "limited_by": stopped_by,
            "search_seconds": round(time.perf_counter() - start, 1)}


def markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    where = ", ".join(m["gpus"]) + f" ({m['gpu_memory_gib']} GiB), " if "gpus" in m else ""
    lines = [f"# Memory on {report['device']}, {report['date']}", "", f"`{report['command']}`", "",
             f"Machine: {where}{m['cpu']}, {m['cpu_count']} cores, {m['ram_gib']} GiB RAM. torch {v['torch']}, "
             f"deepspeed {v['deepspeed']}, bitsandbytes {v['bitsandbytes']}. {report['ranks']} rank(s), "
             f"{report['dtype']}, synthetic batches (uniform random token ids)."]
    if report["state"]:
        lines += state_markdown(report["state"])
    if report.get("search"):
        lines += search_markdown(report, on_gpu="gpus" in m)
    return "\n".join(lines) + "\n"


def state_markdown(state: dict) -> list[str]:
    lines = ["", "## Optimizer state per parameter", "",
             f"Model `{state['model']}`, {state['rows'][0]['n_params']:,} parameters. Bytes of every tensor in the "
             "optimizer's state after one step (gptds.engine.optimizer_state_tensors), summed over ranks, divided by "
             "the parameter count. 32-bit AdamW keeps two fp32 moments (8 bytes); bitsandbytes' AdamW8bit two uint8 "
             "moments plus fp32 block-wise scales (and 32-bit state for tensors under 4,096 elements; ZeRO hands it "
             "flat partitions, so that does not arise here).", ""]
    lines += common.md_table(["ZeRO stage", "optimizer", "bytes/param", "by dtype", "bytes per rank"],
                             [[r["stage"], r["optimizer"], f"{r['bytes_per_param']:.3f}",
                               ", ".join(f"{k} {b:.3f}" for k, b in r["bytes_per_param_by_dtype"].items()),
                               " / ".join(f"{b / 2**20:.1f} MiB" for b in r["state_bytes_per_rank"])]
                              for r in state["rows"]], align="llrll")
    full = {r["stage"]: r["bytes_per_param"] for r in state["rows"] if r["optimizer"] == "adamw"}
    eight = {r["stage"]: r["bytes_per_param"] for r in state["rows"] if r["optimizer"] == "adamw8bit"}
    if full and eight:
        lines += ["", "AdamW8bit / AdamW state: " + ", ".join(f"ZeRO-{s} {eight[s] / full[s]:.3f}"
                                                              for s in sorted(full) if s in eight) + "."]
    return lines


def search_markdown(report: dict, on_gpu: bool) -> list[str]:
    s, best = report["search"], report["search"]["largest"]
    how = (f"Sizes tried: n_layer {report['n_layers']}; " if report.get("n_layers") else
           f"n_layer doubles from {report['start_n_layer']} until a size fails, then bisects; ")
    lines = ["", f"## Largest model: ZeRO-3 + CPU offload + activation checkpointing, {report['steps']} steps", "",
             f"DeepSpeed config `{report['search_config']}` ({report['dtype']} copy), 32-bit AdamW (DeepSpeedCPUAdam; "
             f"8-bit AdamW cannot be offloaded), micro batch {report['batch_size']} x context "
             f"{report['context_length']} per rank, {report['steps']} steps. Shapes follow the GPT-2 family: n_embd = "
             f"64 * round({SHAPE_A} * n_layer^{SHAPE_B} / 64) (a fit to 12/768, 24/1024, 36/1280, 48/1600), "
             f"64-dimensional heads. {how}each candidate runs in fresh processes with a timeout of "
             f"{report['candidate_timeout_s']:.0f} s and a host-memory watchdog (MemAvailable minus "
             f"{MEMORY_RESERVE_GIB} GiB); no candidate starts after {report['search_budget_s']:.0f} s. Peak host RSS "
             "sums the launcher and its ranks, sampled from outside every 0.1 s.", ""]
    header = ["n_layer", "n_embd", "heads", "parameters", "result", "setup s", "median step s", "wall s",
              "peak host RSS MB", "peak RSS/rank MB"] + (["peak GPU MB/rank"] if on_gpu else [])
    rows = []
    for c in s["candidates"]:
        rows.append([c["n_layer"], c["n_embd"], c["n_head"], f"{c['n_params'] / 1e6:,.1f}M", c["status"],
                     c.get("setup_s", ""), c.get("median_step_s", ""), c["wall_s"], f"{c['peak_rss_tree_mb']:,}",
                     " / ".join(f"{x:,.0f}" for x in c.get("peak_rss_mb_per_rank", []))]
                    + ([" / ".join(f"{x:,.0f}" for x in c.get("peak_gpu_mb_per_rank", []))] if on_gpu else []))
    lines += common.md_table(header, rows, align="rrrrlrrrrr" + ("r" if on_gpu else ""))
    largest = (f"{best['n_params'] / 1e6:,.1f}M parameters (n_layer {best['n_layer']}, n_embd {best['n_embd']})"
               if best else "none of the candidates")
    failure = (f" (smallest failing n_layer {s['smallest_failure_n_layer']}: {s['smallest_failure_status']})"
               if s["smallest_failure_n_layer"] else "")
    lines += ["", f"**Largest that trained {report['steps']} steps: {largest}.** Limited by **{s['limited_by']}**"
              f"{failure}; the search took {s['search_seconds']:.0f} s."]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=0, help="ranks to launch (0: 2 on CPU, the GPU count on GPUs)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--model", default="gpt2-micro", choices=tuple(PRESETS), help="preset for bytes per parameter")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--optimizers", nargs="+", default=["adamw8bit", "adamw"], choices=["adamw8bit", "adamw"])
    p.add_argument("--quick", action="store_true", help="bytes per parameter only, tiny preset, ZeRO-2")
    p.add_argument("--no_search", action="store_true", help="bytes per parameter only")
    p.add_argument("--no_state", action="store_true", help="the largest-model search only")
    p.add_argument("--search_config", default="zero3_offload", help="ds_configs file of the search")
    p.add_argument("--batch_size", type=int, default=1, help="search: micro batch per rank")
    p.add_argument("--context_length", type=int, default=64, help="search: tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="search: steps a candidate must train")
    p.add_argument("--start_n_layer", type=int, default=4, help="search: first candidate")
    p.add_argument("--max_n_layer", type=int, default=1024, help="search: never try more layers than this")
    p.add_argument("--n_layers", type=int, nargs="+", default=None,
                   help="instead of searching, try exactly these n_layer values (GPT-2 shape)")
    p.add_argument("--candidate_timeout_s", type=float, default=360, help="search: per candidate")
    p.add_argument("--search_budget_s", type=float, default=900, help="search: no candidate starts after this")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--results_dir", default=str(common.RESULTS_DIR))
    p.add_argument("--work_dir", default=None, help="keep the ranks' logs and outputs here (default: a temp folder)")
    # inside the launched ranks
    p.add_argument("--worker", choices=["state", "train"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--n_layer", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n_embd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n_head", type=int, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.stages, args.no_search = "tiny", [2], True
    args.dtype = args.dtype or common.default_dtype()
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    args.ranks = args.ranks or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    command = shlex.join(["python", "bench/memory.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="gptds-bench-memory-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        state = None
        if not args.no_state:
            state_args = ["--worker", "state", "--model", args.model, "--stages", *map(str, args.stages),
                          "--optimizers", *args.optimizers]
            print(f"memory: optimizer state bytes per parameter ({args.model}, ZeRO {args.stages}, "
                  f"{args.optimizers})", flush=True)
            state = launch(state_args, args, work / "state.json", timeout_s=1800, memory_budget=mem_available_bytes())
            if "rows" not in state:
                raise SystemExit(f"bytes-per-parameter run failed: {state.get('status')}\n{state.get('log_tail', '')}")
        found = None if args.no_search else search(args, work)
    report = {"date": datetime.date.today().isoformat(), "device": common.device_name(), "machine": common.machine(),
              "versions": common.versions(), "command": command, "argv": sys.argv, "ranks": args.ranks,
              "dtype": args.dtype, "data": "synthetic uniform random token ids", "state": state}
    if found is not None:
        report.update(search_config=args.search_config, batch_size=args.batch_size, context_length=args.context_length,
                      steps=args.steps, start_n_layer=args.start_n_layer, max_n_layer=args.max_n_layer,
                      n_layers=args.n_layers,
                      candidate_timeout_s=args.candidate_timeout_s, search_budget_s=args.search_budget_s,
                      shape_rule={"a": SHAPE_A, "b": SHAPE_B, "head_dim": HEAD_DIM}, search=found)
    json_path, md_path = common.write_report("memory", report, markdown(report), args.results_dir)
    print(markdown(report), flush=True)
    print(f"wrote {json_path} and {md_path}", flush=True)
    return report


if __name__ == "__main__":
    main()
