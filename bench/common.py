"""What bench/throughput.py and bench/memory.py share: the machine and versions a result was measured on,
the device's short name for file names, benchmark-local copies of ds_configs with the precision and
ZeRO knobs a run asks for, peak-memory probes (CUDA allocator or the process's RSS high-water mark), and
writing a report as JSON plus a markdown table into bench/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from gptds import engine
from gptds.config import Batch, resolve_ds_config_path
from gptds.metrics import PEAK_FLOPS

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

FLOPS_FORMULA = ("training FLOPs per token = 6*N + 12*L*d*T (N parameters without the position embedding, "
                 "L layers, d width, T context length; gptds.metrics.flops_per_token, recomputation under "
                 "activation checkpointing not counted); MFU = FLOPs per token * tokens/s / (peak FLOP/s per "
                 "device * devices)")


# ---------------------------------------------------------------- where and with what

def device_name() -> str:
    """Short lower-case name for result files: 'cpu', or the GPU model ('h100', 'a100', ...)."""
    if not torch.cuda.is_available():
        return "cpu"
    full = torch.cuda.get_device_name(0)
    known = next((k for k in PEAK_FLOPS if k in full), None)
    return (known or re.sub(r"[^A-Za-z0-9]+", "-", full.replace("NVIDIA", "")).strip("-")).lower()


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "ram_gib": round(total_ram_bytes() / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def versions() -> dict:
    from importlib.metadata import version  # without importing deepspeed and bitsandbytes (seconds each)
    return {"torch": torch.__version__, "deepspeed": version("deepspeed"), "bitsandbytes": version("bitsandbytes"),
            "cuda": torch.version.cuda}


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_dtype() -> str:
    # bf16 where the hardware has it; CPUs without bf16 units run it ~80x slower than fp32.
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def launched_command(script: str) -> str:
    """The command that started this rank: `deepspeed` runs each rank as `python -u SCRIPT ARGS`, so the
    launcher's own flags are rebuilt from the world it made (recorded beside sys.argv, which is exact)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if "RANK" not in os.environ:
        return shlex.join(["python", script, *args])
    local = os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return shlex.join(["deepspeed", "--num_gpus", local, "--no_local_rank", script, *args])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_env() -> dict:
    """This environment with the interpreter's bin/ first on PATH, as an activated virtualenv has it. DeepSpeed
    JIT-builds its CPU ops (cpu_adam, shm comm) with the first `ninja` on PATH, and two ninja versions (the
    venv's pip one, the system's) record different command hashes, so alternating between them rebuilds the
    ops (~80 s each time) in the shared torch_extensions cache."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---------------------------------------------------------------- DeepSpeed configs for a benchmark

def ds_config_variant(name: str, dtype: str, out_dir: Path, zero_overrides: dict | None = None) -> Path:
    """A copy of ds_configs/<name>.json in out_dir with the precision block for dtype ('fp32' drops bf16/fp16,
    'bf16' enables bf16) and zero_optimization keys overridden; the repository's files are left alone."""
    config = json.loads(resolve_ds_config_path(name).read_text())
    config.pop("bf16", None)
    config.pop("fp16", None)
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype != "fp32":
        raise ValueError(f"dtype {dtype!r}; allowed: fp32, bf16")
    config["zero_optimization"] = {**config.get("zero_optimization", {}), **(zero_overrides or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if not zero_overrides else "-" + "-".join(f"{k}={v}" for k, v in sorted(zero_overrides.items()))
    path = out_dir / f"{name}-{dtype}{re.sub(r'[^A-Za-z0-9_.=-]', '', suffix)}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def ds_config_for(path: Path, micro_batch_size: int, world_size: int, optimizer: str, grad_clip: float = 1.0) -> dict:
    """The config gptds would initialise DeepSpeed with for this batch (no gradient accumulation)."""
    owned = Batch(micro_batch_size, 1, world_size, 1).ds_values(grad_clip)
    return engine.complete_ds_config(path, engine.read_ds_config(path), owned,
                                     untested_optimizer=optimizer == "adamw8bit")


# ---------------------------------------------------------------- peak memory

def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on CPU the RSS high-water mark (VmHWM, reset to the
    current RSS by writing 5 to /proc/self/clear_refs; Linux 4.0+)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole process so far
        pass


def current_memory_mb(device: torch.device) -> float:
    """torch.cuda.memory_allocated on a GPU, the RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_kb("VmRSS") / 1024


def peak_memory_mb(device: torch.device) -> float:
    """Peak since reset_peak_memory: torch.cuda.max_memory_allocated on a GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_kb("VmHWM")
    if hwm:
        return hwm / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def process_peak_rss_mb() -> float:
    """Peak RSS over this process's life (ru_maxrss), whatever was reset."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent in processes (user, nice, system) or were stolen by the
    hypervisor (first line of /proc/stat). Interrupt time is left out: loopback traffic between the ranks
    (gloo) is processed there and would be counted as someone else's."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, fields)
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def processes_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def foreign_load(own_pids: list[int], seconds: float) -> float:
    """Fraction of this machine's cores that processes other than own_pids kept busy (or the hypervisor stole)
    over the next `seconds`."""
    busy0, own0, t0 = machine_busy_seconds(), processes_cpu_seconds(own_pids), time.perf_counter()
    time.sleep(seconds)
    busy, own = machine_busy_seconds() - busy0, processes_cpu_seconds(own_pids) - own0
    return max(0.0, busy - own) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def wait_for_quiet(own_pids: list[int], threshold: float, max_wait_s: float, sample_s: float = 1.0) -> float:
    """Wait (up to max_wait_s) until the rest of the machine uses at most `threshold` of its cores; returns
    the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s and foreign_load(own_pids, sample_s) > threshold:
        pass
    return time.perf_counter() - start


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM) of the rank process"


# ---------------------------------------------------------------- reports

def result_paths(kind: str, results_dir: str | Path, date: str | None = None) -> tuple[Path, Path]:
    """bench/results/<kind>-<device>-<YYYY-MM-DD>.json and .md"""
    date = date or datetime.date.today().isoformat()
    stem = Path(results_dir) / f"{kind}-{device_name()}-{date}"
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def write_report(kind: str, report: dict, markdown: str, results_dir: str | Path) -> tuple[Path, Path]:
    json_path, md_path = result_paths(kind, results_dir, report.get("date"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def md_table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """Markdown table lines; align is one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines


def fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc/<pid>/task/<tid>/children (cheap: no scan of all of /proc)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:  # the process ended meanwhile
            continue
        for task in tasks:
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return pids
