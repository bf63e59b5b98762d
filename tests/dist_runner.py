"""Runs a list of gptds training commands inside one set of ranks, so that a test matrix pays the cost
of starting processes once. Launched by the tests (conftest.launch) as
    deepspeed --num_gpus 2 --no_local_rank tests/dist_runner.py SPEC.json OUT.json
SPEC.json is a list of {"name", "argv"} (argv as for `gptds`, e.g. ["pretrain", "--max_steps", "4"]); each
runs through the CLI parser and gptds.train.train, the real loop. Rank 0 writes OUT.json: per name the
run's outcome (summary()), or the error a run raised, and prints "=== scenario NAME" as each one starts.
The per-step losses come from the run's metrics.jsonl (run the scenarios with --log_interval 1), and the
optimizer-state bytes per parameter from the optimizer after the run, as a user would read them.

Optional per scenario, for the reliability tests:
- "fault": {"kind", "rank", ...}: a failure injected on purpose, in this process only (monkeypatches,
  undone after the scenario), on rank "rank" (all ranks when absent); see FAULTS (early_eot is not a
  failure: it makes one rank's generated answers shorter than the others').
- "cli": true: run argv through gptds.__main__.main, as `gptds` does (a UserError is one line on stderr,
  exit status 2), and exit with its status when that is not 0: a rank that fails alone leaves the others
  waiting in a collective, and the launcher ends them. Such a scenario comes last in its launch."""

import errno
import json
import os
import signal
import sys
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from gptds import checkpoint, dist, engine, generate
from gptds.__main__ import build_parser
from gptds.__main__ import main as cli_main
from gptds.config import run_config_from_flags
from gptds.model import GPT
from gptds.tokenizer import EOT_ID
from gptds.train import train


@contextmanager
def patched(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def nan_loss(fault: dict):
    """The training losses of forward calls number `calls` (counted from 1) become `value` (nan or inf)."""
    original, count = GPT.forward, [0]

    def forward(self, idx, targets=None, kv_cache=None, **options):
        logits, loss = original(self, idx, targets, kv_cache, **options)
        if loss is not None and self.training:
            count[0] += 1
            if count[0] in fault["calls"]:
                loss = loss * float(fault.get("value", "nan"))
        return logits, loss
    return patched(GPT, "forward", forward)


def _save_hook(fault: dict, act):
    """torch.save as DeepSpeed's checkpoint engine calls it (into gptds's checksummed file object, or a path);
    act(path, file, files_written_so_far) runs before each write into the folder of checkpoint tag
    fault["tag"] and may return a file object to write into instead."""
    original, written = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        path = getattr(f, "name", f)
        if isinstance(path, (str, os.PathLike)) and fault["tag"] in Path(path).parts:
            f = act(Path(path), f, written[0]) or f
            original(obj, f, *args, **kwargs)
            written[0] += 1
            return
        original(obj, f, *args, **kwargs)
    return patched(torch, "save", save)


def kill_in_save(fault: dict):
    """SIGKILL this rank in the middle of a checkpoint: after `after_files` files of that save, with the
    next one half written."""
    def act(path: Path, f, written: int):
        if written == fault["after_files"]:
            path.write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
    return _save_hook(fault, act)


class FullDisk:
    """A file on a disk that fills up after `room` more bytes: the write that does not fit fails with ENOSPC,
    as the kernel reports it, inside torch.save (which turns it into an "[enforce fail at inline_container.cc]"
    RuntimeError)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def enospc_in_save(fault: dict):
    """The disk fills up during a checkpoint: after `after_files` files of that save, the next one fails
    with ENOSPC after 1000 bytes."""
    def act(path: Path, f, written: int):
        if written == fault["after_files"]:
            if hasattr(f, "file"):  # gptds's checksummed file: the disk under it fills up
                f.file = FullDisk(f.file, 1000)
            else:
                path.write_bytes(b"half a file")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return _save_hook(fault, act)


def kill_in_write_meta(fault: dict):
    """SIGKILL while meta.json of checkpoint tag fault["tag"] is being written (half of its temp file)."""
    original = checkpoint.write_meta

    def write_meta(step_dir, meta):
        if Path(step_dir).name == fault["tag"]:
            (Path(step_dir) / (checkpoint.META_FILE + ".tmp")).write_text('{"format": "gptds-chec')
            os.kill(os.getpid(), signal.SIGKILL)
        original(step_dir, meta)
    return patched(checkpoint, "write_meta", write_meta)


def early_eot(fault: dict):
    """Generation on this rank emits <|endoftext|> in every row from its `after`-th sampling step on: its
    answers end early while the other ranks' go on (the evaluation's lock-step test)."""
    original, count = generate.next_token_of, [0]

    def next_token_of(logits, *args):
        count[0] += 1
        tokens = original(logits, *args)
        return tokens.fill_(EOT_ID) if count[0] > fault["after"] else tokens
    return patched(generate, "next_token_of", next_token_of)


FAULTS = {"nan_loss": nan_loss, "early_eot": early_eot, "kill_in_save": kill_in_save, "enospc_in_save": enospc_in_save,
          "kill_in_write_meta": kill_in_write_meta}


def logged_losses(log_dir: Path, after_step: int) -> dict[int, float]:
    """step index (0-based) -> training loss, from metrics.jsonl lines of steps after `after_step`."""
    path = log_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"] - 1: r["loss"] for r in records if "loss" in r and r["step"] > after_step}


def optimizer_state_bytes_per_param(s) -> float:
    """What the optimizer holds on all ranks, per model parameter."""
    local = sum(t.numel() * t.element_size() for t in engine.optimizer_state_tensors(s.eng))
    return dist.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64)).item() / s.n_params


def summary(s) -> dict:
    state = s.state
    return {"step": state.step, "val_loss": state.val_loss, "stopped_by_signal": state.stopped_by_signal,
            "skipped_bad_steps": state.skipped_bad_steps, "checkpoint": state.checkpoint,
            "losses": logged_losses(Path(s.run.train.log_dir), s.resumed_from_step or 0),
            "optimizer_state_bytes_per_param": optimizer_state_bytes_per_param(s)}


def run_scenario(scenario: dict) -> dict:
    if scenario.get("cli"):
        status = cli_main(scenario["argv"])
        if status != 0:
            sys.exit(status)
        return {"exit_status": status}
    args = build_parser().parse_args(scenario["argv"])
    return summary(train(run_config_from_flags(args.command, args)))


def main(spec_path: str, out_path: str) -> None:
    info = dist.init_distributed()
    results = {}
    for scenario in json.load(open(spec_path)):
        dist.print0(f"=== scenario {scenario['name']}")
        fault = scenario.get("fault")
        try:
            with ExitStack() as stack:
                if fault and fault.get("rank", info.rank) == info.rank:
                    stack.enter_context(FAULTS[fault["kind"]](fault))
                result = run_scenario(scenario)
        except Exception as e:  # recorded for the test to show; the next scenario still runs
            if scenario.get("cli"):
                raise  # as `gptds` would: a traceback, exit status 1
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[scenario["name"]] = result
        if info.is_main:  # written after each scenario: a crash still leaves the ones before
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
