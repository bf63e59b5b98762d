"""Training throughput of gptds on DeepSpeed ZeRO 1-3 (AdamW8bit and 32-bit AdamW, activation checkpointing
on and off) beside a plain PyTorch loop (DDP across the ranks, fused AdamW, SDPA attention, optional
torch.compile) on the same model, batches and optimizer hyper-parameters, in one launch. Reports median
step time, tokens/s, MFU and peak memory, as ratios to the baseline. Batches are synthetic (uniform random
token ids): throughput does not depend on what the tokens say. Writes
bench/results/throughput-<device>-<date>.{json,md}.

    deepspeed --num_gpus 2 --no_local_rank bench/throughput.py                  # CPU: gpt2-micro, 2 ranks, fp32
    deepspeed --num_gpus 1 bench/throughput.py --model gpt2 --batch_size 16     # one GPU: bf16, T=1024, compile
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import common
import torch

from gptds import dist, engine
from gptds.config import TrainConfig
from gptds.metrics import flops_per_token, peak_flops
from gptds.model import GPT, PRESETS, GPTConfig, attention_backend, compile_blocks

DS_CONFIG_OF_STAGE = {1: "zero1", 2: "zero2", 3: "zero3"}
TORCH_LINEAR = torch.nn.functional.linear
TRAIN_DEFAULTS = TrainConfig()  # the optimizer hyper-parameters gptds trains with (lr, weight decay, clipping)


@dataclass(frozen=True)
class Setting:
    """One row of the table: the plain PyTorch loop, or gptds on a ZeRO stage with an optimizer."""
    kind: str                       # "pytorch" or "deepspeed"
    activation_checkpointing: bool
    stage: int | None = None        # ZeRO stage (deepspeed)
    optimizer: str = "adamw"        # adamw8bit or adamw (the baseline is always fused 32-bit AdamW)
    compile: bool = False           # torch.compile: the whole model (baseline), each block (gptds.model)

    @property
    def name(self) -> str:
        ac = "ac" if self.activation_checkpointing else "noac"
        compiled = "-compile" if self.compile else ""
        if self.kind == "pytorch":
            return f"pytorch-ddp{compiled}-{ac}"
        return f"zero{self.stage}-{self.optimizer}{compiled}-{ac}"


# ---------------------------------------------------------------- the two training steps

class PhaseClock:
    """Durations of forward / backward / optimizer step within a step. On CPU every op is synchronous, so the
    marks cost nothing; on a GPU they synchronize, which only happens with --breakdown."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.phases = device, enabled, {}

    def start(self) -> None:
        self.phases, self.last = {}, time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now


def build_model(model_config: GPTConfig, device: torch.device, seed: int, activation_checkpointing: bool) -> GPT:
    torch.manual_seed(seed)  # identical initial weights on every rank, and for every setting
    with torch.device(device):  # on a GPU built there directly: no full fp32 copy in host memory
        model = GPT(model_config)
    model.activation_checkpointing = activation_checkpointing
    return model


def pytorch_step_fn(setting: Setting, model: GPT, args, info, clock: PhaseClock):
    """Plain PyTorch: DDP (gradient buckets reduced during backward), fused AdamW, gradient clipping as
    DeepSpeed does it, bf16 autocast when --dtype bf16."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    optimizer = torch.optim.AdamW(engine.parameter_groups(model, TRAIN_DEFAULTS.weight_decay), lr=TRAIN_DEFAULTS.lr,
                                  betas=engine.ADAM_BETAS, eps=engine.ADAM_EPS, fused=True)
    net = torch.compile(model) if setting.compile else model
    if info.world_size > 1:
        net = DDP(net, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                  gradient_as_bucket_view=True)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(x, y) -> torch.Tensor:
        with autocast:
            _, loss = net(x, y)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        if TRAIN_DEFAULTS.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN_DEFAULTS.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer_step")
        return loss

    def state_tensors():
        return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    return step, state_tensors, lambda: None


def deepspeed_step_fn(setting: Setting, model: GPT, args, info, clock: PhaseClock, config_dir: Path):
    """gptds: the ds_configs file of the stage (precision set by --dtype, --zero_overrides applied), the
    optimizer gptds.engine builds, deepspeed.initialize through gptds.engine."""
    if setting.compile:
        compile_blocks(model)  # as gptds.session does for --compile
    path = common.ds_config_variant(DS_CONFIG_OF_STAGE[setting.stage], args.dtype, config_dir, args.zero_overrides)
    ds_config = common.ds_config_for(path, args.batch_size, info.world_size, setting.optimizer,
                                     TRAIN_DEFAULTS.grad_clip)
    optimizer = engine.build_optimizer(model, setting.optimizer, TRAIN_DEFAULTS.lr, TRAIN_DEFAULTS.weight_decay,
                                       ds_config)
    eng = engine.initialize(model, optimizer, ds_config)

    def step(x, y) -> torch.Tensor:
        _, loss = eng(x, y)
        clock.mark("forward")
        eng.backward(loss)
        clock.mark("backward")
        eng.step()
        clock.mark("optimizer_step")
        return loss

    return step, lambda: engine.optimizer_state_tensors(eng), eng.destroy


def profile_step(live, args, info, model_config: GPTConfig) -> None:
    """One more step under torch.profiler on rank 0 (the others step alongside): the ops that took the time,
    written to <--profile>/<setting>.txt."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.device.type == "cuda" else [])
    batch = torch.randint(0, model_config.vocab_size, (args.batch_size, args.context_length + 1))
    x, y = batch[:, :-1].to(info.device), batch[:, 1:].to(info.device)
    dist.barrier()
    if not info.is_main:
        live.step(x, y).item()
        return
    with profile(activities=activities) as prof:
        live.step(x, y).item()
    sort = "self_cuda_time_total" if info.device.type == "cuda" else "self_cpu_time_total"
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{live.setting.name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))


@dataclass
class Live:
    """A built setting and what its timed steps recorded."""
    setting: Setting
    step: Callable
    state_tensors: Callable
    close: Callable
    linear: Callable            # torch.nn.functional.linear as this setting runs it (ZeRO-3 installs its own)
    clock: PhaseClock
    generator: torch.Generator
    setup_s: float
    memory_at_start_mb: float
    peak_memory_mb: float = 0.0
    waited_s: float = 0.0
    step_times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)
    phases: list = field(default_factory=list)
    foreign: list = field(default_factory=list)
    losses: list = field(default_factory=list)

    def clean_steps(self, threshold: float) -> int:
        return sum(f <= threshold for f in self.foreign) if self.foreign else len(self.step_times)


def build(setting: Setting, args, info, model_config: GPTConfig, config_dir: Path) -> Live:
    """Build the setting from scratch and run its warm-up steps (allocator, compile, the first optimizer step
    allocating its state); its peak memory is taken over building and warm-up."""
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    common.reset_peak_memory(info.device)
    at_start = common.current_memory_mb(info.device)
    t0 = time.perf_counter()
    model = build_model(model_config, info.device, args.seed, setting.activation_checkpointing)
    clock = PhaseClock(info.device, enabled=info.device.type == "cpu" or args.breakdown)
    if setting.kind == "pytorch":
        step, state_tensors, close = pytorch_step_fn(setting, model, args, info, clock)
    else:
        step, state_tensors, close = deepspeed_step_fn(setting, model, args, info, clock, config_dir)
    # ZeRO-3 swaps torch.nn.functional.linear for its memory-efficient version for the rest of the process
    # ("this will persist unless manually reset"): each setting runs with its own, and torch's is put back.
    linear, torch.nn.functional.linear = torch.nn.functional.linear, TORCH_LINEAR
    live = Live(setting, step, state_tensors, close, linear, clock,
                torch.Generator().manual_seed(args.seed + 1000 * info.rank),  # synthetic data, per rank
                time.perf_counter() - t0, at_start)
    for _ in range(args.warmup_steps):
        run_step(live, args, info, model_config, timed=False)
    live.peak_memory_mb = common.peak_memory_mb(info.device)
    return live


def run_step(live: Live, args, info, model_config: GPTConfig, timed: bool, rank_pids: list[int] = ()) -> None:
    """One training step from a barrier to the loss on the host. On CPU, for a timed step, the CPU time the rest
    of the machine used meanwhile (busy and stolen time in /proc/stat minus the ranks' own process time) as a
    fraction of the step's cores x seconds; every rank learns the same number."""
    batch = torch.randint(0, model_config.vocab_size, (args.batch_size, args.context_length + 1),
                          generator=live.generator)
    x, y = batch[:, :-1].to(info.device), batch[:, 1:].to(info.device)
    track_foreign = timed and info.device.type == "cpu"
    if track_foreign and info.is_main and args.quiet_wait_s > 0:
        live.waited_s += common.wait_for_quiet(rank_pids, args.max_foreign_load, args.quiet_wait_s)
    dist.barrier()
    torch.nn.functional.linear = live.linear
    busy0 = common.machine_busy_seconds() if track_foreign and info.is_main else 0.0
    live.clock.start()
    t0, c0 = time.perf_counter(), time.process_time()
    live.losses.append(live.step(x, y).item())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.nn.functional.linear = TORCH_LINEAR
    if not timed:
        return
    live.step_times.append(dt)
    live.cpu_times.append(cpu)
    live.phases.append(dict(live.clock.phases))
    if track_foreign:
        busy = common.machine_busy_seconds() - busy0 if info.is_main else 0.0
        totals = dist.all_reduce_sum(torch.tensor([cpu, busy, dt if info.is_main else 0.0], dtype=torch.float64))
        live.foreign.append(max(0.0, float(totals[1] - totals[0])) / (float(totals[2]) * (os.cpu_count() or 1)))


def measure_group(settings: list[Setting], args, info, model_config: GPTConfig, config_dir: Path) -> list[dict]:
    """Build the settings, then time them in turn, one step each, round and round, so that all see the same
    moments of a shared machine. Steps with more foreign load than --max_foreign_load do not count; rounds go
    on until each setting has --steps counted steps, or --max_steps_factor x --steps timed ones."""
    rank_pids = dist.all_gather_object(os.getpid()) if info.device.type == "cpu" else []
    lives = [build(s, args, info, model_config, config_dir) for s in settings]
    limit = args.steps * args.max_steps_factor
    while True:
        todo = [lv for lv in lives if lv.clean_steps(args.max_foreign_load) < args.steps and len(lv.step_times) < limit]
        if not todo:
            break
        for live in todo:
            run_step(live, args, info, model_config, timed=True, rank_pids=rank_pids)
    results = [finish(live, args, info, model_config) for live in lives]
    torch.nn.functional.linear = TORCH_LINEAR
    return results


def finish(live: Live, args, info, model_config: GPTConfig) -> dict:
    if args.profile:
        torch.nn.functional.linear = live.linear
        profile_step(live, args, info, model_config)
        torch.nn.functional.linear = TORCH_LINEAR
    local_state = sum(t.numel() * t.element_size() for t in live.state_tensors())
    live.close()
    per_rank = dist.all_gather_object({"step_times": live.step_times, "cpu_times": live.cpu_times,
                                       "phases": live.phases, "peak_memory_mb": live.peak_memory_mb,
                                       "memory_at_start_mb": live.memory_at_start_mb, "state_bytes": local_state,
                                       "losses": live.losses})
    n = len(live.step_times)
    # a step lasts as long as its slowest rank: per step, the max over ranks
    step_times = [max(r["step_times"][k] for r in per_rank) for k in range(n)]
    clean = [k for k in range(n) if not live.foreign or live.foreign[k] <= args.max_foreign_load]
    keep = clean if len(clean) >= args.steps else list(range(n))  # too few uncontended steps: all count
    phase_ms = {phase: 1000 * statistics.median(statistics.mean(r["phases"][k][phase] for r in per_rank)
                                                for k in keep)
                for phase in (per_rank[0]["phases"][0] if per_rank[0]["phases"] else {})}
    return {"setting": live.setting, "step_times_s": [step_times[k] for k in keep], "all_step_times_s": step_times,
            "foreign_load": live.foreign, "waited_for_quiet_s": live.waited_s, "phase_ms": phase_ms,
            "setup_s": live.setup_s,
            "cpu_ms_per_rank": 1000 * statistics.median(statistics.mean(r["cpu_times"][k] for r in per_rank)
                                                        for k in keep),
            "peak_memory_mb_per_rank": [round(r["peak_memory_mb"], 1) for r in per_rank],
            "memory_at_start_mb_per_rank": [round(r["memory_at_start_mb"], 1) for r in per_rank],
            "optimizer_state_bytes": sum(r["state_bytes"] for r in per_rank),
            "losses": [statistics.mean(r["losses"][k] for r in per_rank) for k in range(len(live.losses))]}


# ---------------------------------------------------------------- settings, ratios, goals

def settings_from_args(args) -> list[Setting]:
    acs = {"off": [False], "on": [True], "both": [False, True]}[args.activation_checkpointing]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    gptds_compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile_gptds]
    out = [Setting("pytorch", ac, compile=c) for ac in acs for c in compiles]
    out += [Setting("deepspeed", ac, stage=s, optimizer=o, compile=c) for s in args.stages for o in args.optimizers
            for ac in acs for c in gptds_compiles]
    if args.rows:
        unknown = set(args.rows) - {s.name for s in out}
        if unknown:
            raise SystemExit(f"--rows: no such row {sorted(unknown)}; the settings give {[s.name for s in out]}")
        out = [s for s in out if s.name in args.rows]
    return out


def group_settings(settings: list[Setting], interleave: bool) -> list[list[Setting]]:
    """Settings timed side by side: with interleave, the baselines with each ZeRO stage of one optimizer and
    activation checkpointing setting; otherwise each alone."""
    if not interleave:
        return [[s] for s in settings]
    groups = {}
    for s in settings:
        if s.kind == "deepspeed":
            groups.setdefault((s.activation_checkpointing, s.optimizer), []).append(s)
    if not groups:
        return [[s] for s in settings]
    baselines = [s for s in settings if s.kind == "pytorch"]
    return [[b for b in baselines if b.activation_checkpointing == ac] + members
            for (ac, _), members in groups.items()]


def summarize(setting: Setting, runs: list[dict], args, info, model: dict) -> dict:
    step_times = [t for r in runs for t in r["step_times_s"]]
    median = statistics.median(step_times)
    paired = [t for r in runs for t in r.get("paired_baseline_step_times_s", [])]
    tokens_per_step = args.batch_size * args.context_length * info.world_size
    tokens_per_second = tokens_per_step / median
    peak = model["peak_flops_per_device"]
    phases = {k: round(statistics.median(r["phase_ms"][k] for r in runs), 1) for k in runs[0]["phase_ms"]}
    return {"name": setting.name, **asdict(setting), "step_time_ms": round(1000 * median, 1),
            "step_times_ms": [round(1000 * t, 1) for t in step_times],
            "paired_baseline_step_time_ms": round(1000 * statistics.median(paired), 1) if paired else None,
            "step_time_spread": round((max(step_times) - min(step_times)) / median, 3),
            "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(model["flops_per_token"] * tokens_per_second / (peak * info.world_size), 4) if peak else None,
            "phase_ms": phases, "cpu_ms_per_rank": round(statistics.median(r["cpu_ms_per_rank"] for r in runs), 1),
            "steps_timed": sum(len(r["all_step_times_s"]) for r in runs),
            "steps_kept": len(step_times),
            "waited_for_quiet_s": round(sum(r["waited_for_quiet_s"] for r in runs), 1),
            "foreign_load_median": (round(statistics.median(f for r in runs for f in r["foreign_load"]), 3)
                                    if runs[0]["foreign_load"] else None),
            "setup_s": round(statistics.median(r["setup_s"] for r in runs), 1),
            "peak_memory_mb": max(max(r["peak_memory_mb_per_rank"]) for r in runs),
            "peak_memory_mb_per_rank": [max(v) for v in zip(*(r["peak_memory_mb_per_rank"] for r in runs))],
            "memory_at_start_mb_per_rank": runs[0]["memory_at_start_mb_per_rank"],
            "own_memory_mb": max(p - a for r in runs
                                 for p, a in zip(r["peak_memory_mb_per_rank"], r["memory_at_start_mb_per_rank"])),
            "optimizer_state_bytes_per_param": round(runs[0]["optimizer_state_bytes"] / model["n_params"], 3),
            "first_loss": round(runs[0]["losses"][0], 4), "last_loss": round(runs[0]["losses"][-1], 4)}


def add_ratios(rows: list[dict]) -> None:
    """step_time_vs_baseline: step time over the fastest plain PyTorch baseline with the same activation
    checkpointing (lower is better): the one timed side by side with the row where settings were interleaved,
    else the baseline row; tokens_per_second_vs_baseline is its inverse. Also ZeRO-n over ZeRO-1
    and activation checkpointing on over off, for the same optimizer."""
    baseline = {}
    for r in rows:
        if r["kind"] == "pytorch":
            ac = r["activation_checkpointing"]
            baseline[ac] = min(baseline.get(ac, r["step_time_ms"]), r["step_time_ms"])
    by_key = {(r["kind"], r["stage"], r["optimizer"], r["activation_checkpointing"], r["compile"]): r for r in rows}
    for r in rows:
        base = r["paired_baseline_step_time_ms"] or baseline.get(r["activation_checkpointing"])
        r["step_time_vs_baseline"] = round(r["step_time_ms"] / base, 3) if base else None
        r["tokens_per_second_vs_baseline"] = round(base / r["step_time_ms"], 3) if base else None
        zero1 = by_key.get(("deepspeed", 1, r["optimizer"], r["activation_checkpointing"], False))
        r["step_time_vs_zero1"] = (round(r["step_time_ms"] / zero1["step_time_ms"], 3)
                                   if zero1 and r["kind"] == "deepspeed" else None)
        off = by_key.get((r["kind"], r["stage"], r["optimizer"], False, r["compile"]))
        r["step_time_ac_vs_no_ac"] = (round(r["step_time_ms"] / off["step_time_ms"], 3)
                                      if off and r["activation_checkpointing"] else None)


def goal(description: str, row: dict | None, field: str, target: float, at_most: bool) -> dict | None:
    if row is None or row.get(field) is None:
        return None
    value = row[field]
    return {"goal": description, "row": row["name"], "measured": value, "target": target,
            "met": value <= target if at_most else value >= target}


def evaluate_goals(rows: list[dict], device: str, model_name: str, dtype: str) -> list[dict]:
    """The issue's targets, for the rows this run measured (others are simply absent)."""
    find = {(r["kind"], r["stage"], r["optimizer"], r["activation_checkpointing"]): r for r in rows}
    goals = []
    for opt in ("adamw", "adamw8bit"):
        like = " (like-for-like)" if opt == "adamw" and dtype == "fp32" else ""
        if device == "cpu":
            goals += [goal(f"CPU {model_name}: ZeRO-2 {opt} step time <= 1.10x plain PyTorch DDP{like}",
                           find.get(("deepspeed", 2, opt, False)), "step_time_vs_baseline", 1.10, True),
                      goal(f"CPU {model_name}: ZeRO-3 {opt} step time <= 1.30x plain PyTorch DDP{like}",
                           find.get(("deepspeed", 3, opt, False)), "step_time_vs_baseline", 1.30, True)]
            continue
        z2 = find.get(("deepspeed", 2, opt, False))
        if model_name == "gpt2":
            goals += [goal(f"{device} gpt2: ZeRO-2 {opt} >= 500,000 tokens/s", z2, "tokens_per_second", 5e5, False),
                      goal(f"{device} gpt2: ZeRO-2 {opt} >= 1.0x plain PyTorch throughput", z2,
                           "tokens_per_second_vs_baseline", 1.0, False),
                      goal(f"{device} gpt2: ZeRO-3 {opt} step time <= 1.15x ZeRO-1",
                           find.get(("deepspeed", 3, opt, False)), "step_time_vs_zero1", 1.15, True)]
            for stage in (1, 2, 3):
                goals.append(goal(f"{device} gpt2: ZeRO-{stage} {opt} activation checkpointing <= 1.35x step time",
                                  find.get(("deepspeed", stage, opt, True)), "step_time_ac_vs_no_ac", 1.35, True))
        if model_name == "gpt2-xl":
            for stage in (1, 2, 3):
                goals.append(goal(f"{device} gpt2-xl: ZeRO-{stage} {opt} >= 45,000 tokens/s",
                                  find.get(("deepspeed", stage, opt, False)), "tokens_per_second", 45000, False))
    return [g for g in goals if g is not None]


# ---------------------------------------------------------------- report

def markdown(report: dict) -> str:
    m, mc = report["machine"], report["model_config"]
    where = (f"{', '.join(m['gpus'])}" if "gpus" in m else f"{m['cpu']}, {m['cpu_count']} cores, {m['ram_gib']} GiB")
    v = report["versions"]
    lines = [f"# Training throughput on {report['device']}, {report['date']}", "",
             f"`{report['command']}`", "",
             f"Machine: {where}. torch {v['torch']}, deepspeed {v['deepspeed']}, bitsandbytes {v['bitsandbytes']}. "
             f"Model `{report['model']}`: {report['n_params']:,} parameters, {mc['n_layer']} layers, width "
             f"{mc['n_embd']}, {mc['n_head']} heads. {report['world_size']} rank(s) x micro batch "
             f"{report['batch_size']} x context {report['context_length']} = {report['tokens_per_step']:,} tokens "
             f"per step, {report['dtype']}, attention {report['attention']}, {report['threads_per_rank']} torch "
             f"thread(s) per rank. Synthetic batches (uniform random token ids). Optimizer hyper-parameters as "
             f"gptds trains: lr {report['optimizer_hparams']['lr']}, betas {report['optimizer_hparams']['betas']}, "
             f"weight decay {report['optimizer_hparams']['weight_decay']} on matrices, gradient clipping "
             f"{report['optimizer_hparams']['grad_clip']}.", "",
             f"Timing: every setting is built from scratch and runs {report['warmup_steps']} warm-up step(s), "
             f"not timed; then {report['steps']} timed steps x {report['rounds']} round(s); a step's time is the "
             f"slowest rank's, from a barrier to the loss on the host; the table shows the median. "
             + ("Settings are interleaved: the baseline and the three ZeRO stages of one optimizer and activation "
                "checkpointing setting are alive together and step in turn, so they see the same moments of the "
                "machine, and `x base` divides by the baseline timed beside the row. "
                if report["interleave"] == "on" else "")
             + (f"Shared machine: steps during which other processes used more than "
                f"{100 * report['max_foreign_load']:.0f}% of the cores (busy and stolen time in /proc/stat minus "
                f"the ranks' own) are not counted and more are run; `kept` shows counted/timed steps and `other` "
                f"the median foreign load. " if report["device"] == "cpu" else "")
             + f"Baseline: plain PyTorch, no DeepSpeed: "
             f"{'DDP across the ranks, ' if report['world_size'] > 1 else ''}fused torch AdamW (32-bit), gradient "
             f"clipping, SDPA attention{', torch.compile where marked' if report['compile'] != 'off' else ''}; "
             f"`x base` is a row's step time over the fastest baseline with the same activation checkpointing "
             f"(lower is better). {report['flops_formula']}; peak "
             + (f"{report['peak_flops_per_device'] / 1e12:g} TFLOP/s per device." if report['peak_flops_per_device']
                else "unknown on CPU, so MFU is n/a (pass --peak_tflops to set one).")
             + f" Memory: {report['memory_kind']}, the largest rank's peak over building and warm-up; `own` is that "
             "peak minus the memory before the setting was built (on CPU the RSS includes the Python/torch process "
             "and, interleaved, the settings built before it). Optimizer state: bytes per parameter summed over "
             "ranks (replicated by DDP, partitioned by ZeRO).", ""]
    if report.get("zero_overrides"):
        lines += [f"ZeRO overrides applied to every ds_configs file: `{json.dumps(report['zero_overrides'])}`", ""]
    cpu = report["device"] == "cpu"
    header = (["setting", "step ms", "x base", "tokens/s", "MFU", "fwd ms", "bwd ms", "opt ms", "peak MB/rank",
               "own MB/rank", "opt state B/param", "x ZeRO-1", "AC x"] + (["kept", "other"] if cpu else []))
    rows = []
    for r in report["rows"]:
        rows.append([f"`{r['name']}`", common.fmt(r["step_time_ms"], 1), common.fmt(r["step_time_vs_baseline"], 3),
                     common.fmt(r["tokens_per_second"], 1), "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     common.fmt(r["phase_ms"].get("forward"), 1), common.fmt(r["phase_ms"].get("backward"), 1),
                     common.fmt(r["phase_ms"].get("optimizer_step"), 1), common.fmt(r["peak_memory_mb"], 0),
                     common.fmt(r["own_memory_mb"], 0), common.fmt(r["optimizer_state_bytes_per_param"], 2),
                     "" if r["step_time_vs_zero1"] is None else common.fmt(r["step_time_vs_zero1"], 3),
                     "" if r["step_time_ac_vs_no_ac"] is None else common.fmt(r["step_time_ac_vs_no_ac"], 3)]
                    + ([f"{r['steps_kept']}/{r['steps_timed']}", f"{100 * (r['foreign_load_median'] or 0):.0f}%"]
                       if cpu else []))
    lines += common.md_table(header, rows)
    if report["goals"]:
        lines += ["", "## Goals", ""]
        lines += common.md_table(["goal", "row", "measured", "target", "met"],
                                 [[g["goal"], f"`{g['row']}`", common.fmt(g["measured"], 3), common.fmt(g["target"], 2),
                                   "yes" if g["met"] else "**no**"] for g in report["goals"]], align="llrrl")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2-micro", choices=tuple(PRESETS), help="model preset")
    p.add_argument("--batch_size", type=int, default=4, help="micro batch per rank, in sequences")
    p.add_argument("--context_length", type=int, default=0, help="tokens per sequence (0: the preset's block size)")
    p.add_argument("--pad_vocab_to_multiple_of", type=int, default=1, help="64: 50304 embedding rows")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--optimizers", nargs="+", default=["adamw8bit", "adamw"], choices=["adamw8bit", "adamw"])
    p.add_argument("--activation_checkpointing", default="both", choices=["on", "off", "both"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting and round")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="run the whole list of settings this many times")
    p.add_argument("--interleave", default=None, choices=["on", "off"],
                   help="time the baselines and the ZeRO stages of one optimizer side by side, a step each in turn "
                        "(all alive at once); default: on for CPU (a shared machine), off on GPUs (memory)")
    p.add_argument("--max_foreign_load", type=float, default=0.1,
                   help="CPU: steps during which other processes used more than this fraction of the cores are "
                        "not counted")
    p.add_argument("--quiet_wait_s", type=float, default=0.0,
                   help="CPU: before each timed step wait up to this long for other processes to drop below "
                        "--max_foreign_load (a shared machine)")
    p.add_argument("--max_steps_factor", type=int, default=3, help="CPU: at most this many x --steps to get "
                   "--steps uncontended ones (if not, all count)")
    p.add_argument("--compile", default=None, choices=["on", "off", "both"],
                   help="torch.compile the baseline (default: on for GPUs, off on CPU)")
    p.add_argument("--compile_gptds", default="off", choices=["on", "off", "both"],
                   help="the ZeRO rows with gptds's per-block compile (gptds.model.compile_blocks, as --compile)")
    p.add_argument("--rows", nargs="+", default=None, help="only the rows of these names, e.g. "
                   "pytorch-ddp-compile-noac zero2-adamw-compile-noac")
    p.add_argument("--no_baseline", action="store_true", help="DeepSpeed rows only (no ratios)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak for MFU (0: known GPUs only)")
    p.add_argument("--zero_overrides", type=json.loads, default=None,
                   help='JSON merged into every zero_optimization block, e.g. \'{"overlap_comm": false}\'')
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: gptds.dist's choice)")
    p.add_argument("--breakdown", action="store_true", help="on GPUs, time forward/backward/step (synchronizes)")
    p.add_argument("--profile", default=None, help="folder: profile one extra step per setting (rank 0's top ops)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--results_dir", default=str(common.RESULTS_DIR))
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # from `deepspeed` launcher
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup_steps < 0 or args.context_length < 0:
        p.error("--warmup_steps and --context_length must be 0 or more")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    info = dist.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or common.default_dtype()
    args.compile = args.compile or ("on" if info.device.type == "cuda" else "off")
    args.interleave = args.interleave or ("off" if info.device.type == "cuda" else "on")
    model_config = GPTConfig.from_preset(args.model, pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of)
    args.context_length = args.context_length or model_config.block_size
    if args.context_length > model_config.block_size:
        raise SystemExit(f"--context_length {args.context_length} exceeds {args.model}'s block size "
                         f"{model_config.block_size}")
    with torch.device("meta"):  # sizes without allocating
        shape = GPT(model_config)
    n_params, n_params_no_wpe = shape.num_parameters(), shape.num_parameters(exclude_position_embedding=True)
    per_device_peak = peak_flops(info.device, args.peak_tflops)
    model = {"n_params": n_params, "flops_per_token": flops_per_token(n_params_no_wpe, model_config.n_layer,
                                                                      model_config.n_embd, args.context_length),
             "peak_flops_per_device": per_device_peak}
    settings = settings_from_args(args)
    if args.no_baseline:
        settings = [s for s in settings if s.kind != "pytorch"]
    dist.print0(f"throughput: {args.model} ({n_params:,} parameters), {info.world_size} rank(s) on "
                f"{info.device.type}, {args.dtype}, B={args.batch_size} T={args.context_length}, "
                f"{torch.get_num_threads()} thread(s)/rank; {len(settings)} settings x {args.rounds} round(s)")

    runs: dict[Setting, list[dict]] = {s: [] for s in settings}
    groups = group_settings(settings, args.interleave == "on")
    with tempfile.TemporaryDirectory(prefix="gptds-bench-") as tmp:
        config_dir = Path(tmp)
        for round_index in range(args.rounds):
            for group in groups:
                results = measure_group(group, args, info, model_config, config_dir)
                baselines = [r for r in results if r["setting"].kind == "pytorch"]
                best = min(baselines, key=lambda r: statistics.median(r["step_times_s"]), default=None)
                for run in results:
                    if best is not None and run["setting"].kind == "deepspeed":  # timed side by side with it
                        run["paired_baseline_step_times_s"] = best["step_times_s"]
                    runs[run["setting"]].append(run)
                    dist.print0(f"[round {round_index + 1}/{args.rounds}] {run['setting'].name}: median step "
                                f"{1000 * statistics.median(run['step_times_s']):.1f} ms, phases "
                                f"{ {k: round(v, 1) for k, v in run['phase_ms'].items()} }, cpu "
                                f"{run['cpu_ms_per_rank']:.0f} ms/rank, {len(run['step_times_s'])} of "
                                f"{len(run['all_step_times_s'])} steps kept (foreign load "
                                f"{[round(f, 2) for f in run['foreign_load']]}), peak memory "
                                f"{max(run['peak_memory_mb_per_rank']):.0f} MB/rank, loss "
                                f"{run['losses'][0]:.3f} -> {run['losses'][-1]:.3f}")
        used_configs = {p.stem: json.loads(p.read_text()) for p in sorted(config_dir.glob("*.json"))}
    rows = [summarize(s, runs[s], args, info, model) for s in settings]
    add_ratios(rows)
    if not info.is_main:
        dist.barrier()
        return None
    device = common.device_name()
    report = {
        "date": datetime.date.today().isoformat(), "device": device, "machine": common.machine(),
        "versions": common.versions(), "command": common.launched_command("bench/throughput.py"),
        "argv": sys.argv, "model": args.model, "model_config": model_config.to_dict(), "n_params": n_params,
        "world_size": info.world_size, "batch_size": args.batch_size, "context_length": args.context_length,
        "tokens_per_step": args.batch_size * args.context_length * info.world_size, "dtype": args.dtype,
        "attention": attention_backend(info.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32),
        "threads_per_rank": torch.get_num_threads(), "compile": args.compile,
        "data": "synthetic uniform random token ids",
        "optimizer_hparams": {"lr": TRAIN_DEFAULTS.lr, "betas": list(engine.ADAM_BETAS), "eps": engine.ADAM_EPS,
                              "weight_decay": TRAIN_DEFAULTS.weight_decay, "grad_clip": TRAIN_DEFAULTS.grad_clip},
        "warmup_steps": args.warmup_steps, "steps": args.steps, "rounds": args.rounds,
        "interleave": args.interleave, "max_foreign_load": args.max_foreign_load,
        "max_steps_factor": args.max_steps_factor, "quiet_wait_s": args.quiet_wait_s,
        "flops_formula": common.FLOPS_FORMULA, "flops_per_token": model["flops_per_token"],
        "peak_flops_per_device": per_device_peak, "memory_kind": common.memory_kind(info.device),
        "process_peak_rss_mb_rank0": round(common.process_peak_rss_mb(), 1),
        "zero_overrides": args.zero_overrides, "ds_configs": used_configs, "rows": rows,
        "goals": evaluate_goals(rows, device, args.model, args.dtype),
    }
    json_path, md_path = common.write_report("throughput", report, markdown(report), args.results_dir)
    print(markdown(report), flush=True)
    print(f"wrote {json_path} and {md_path}", flush=True)
    dist.barrier()
    return report


if __name__ == "__main__":
    main()
