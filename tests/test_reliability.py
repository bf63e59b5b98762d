"""Runs survive kills, preemption, bad numbers and full disks, on 2 CPU ranks through the real loop:
- SIGKILL of a rank in the middle of writing a checkpoint, then SIGKILL at a random step (of the launcher's
  process group or of one rank), then --auto_resume: the partial folders are never chosen, each resume starts
  from the newest complete checkpoint, and the losses equal an uninterrupted run's bit for bit;
- SIGKILL while meta.json is written: the folder stays incomplete and the resume takes the one before;
- SIGTERM / SIGUSR1 to the ranks: a checkpoint at the next step boundary, exit 0 (the launcher's too),
  an exact resume;
- ENOSPC on one rank during a save: a one-line error naming the file and the errno text, the launch ends in
  bounded time, the previous checkpoint intact and still the one --auto_resume takes;
- NaN/inf losses: one bad batch is skipped on every rank (counted, resumable exactly, ZeRO-3 too); K in a row
  stop the run naming step, loss and lr;
- an unwritable --log_dir/--checkpoint_dir, another ZeRO stage, world size or global batch: refused before any work;
- checkpoints damaged in place (bytes overwritten inside a shard, zeroed bytes at its start, sizes unchanged):
  --auto_resume names each one it skips and why, and resumes exactly from the newest intact one.
Four launches of tests/dist_runner.py (faults injected by its "fault" hooks); bench/reliability.py counts the
figures (tests/reliability_report.py)."""

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from reliability_report import figures_fixture

from gptds import checkpoint
from gptds.__main__ import build_parser, main
from gptds.config import run_config_from_flags

pytestmark = pytest.mark.slow  # launches ranks or trains
ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
FLAGS = ["--model", "tiny", "-B", "2", "-T", "32", "--deepspeed_config", "zero2_fp32", "--lr", "1e-2", "--min_lr",
         "1e-3", "--warmup_steps", "2", "--lr_decay_steps", str(STEPS), "--eval_interval", "0", "--generate_interval",
         "0", "--hellaswag_interval", "0", "--log_interval", "1", "--keep_last_n_checkpoints", "-1", "--seed", "11"]
SEED = int(os.environ.get("GPTDS_FAULT_SEED", "20261123"))  # the random kill: which step, which process
LAUNCH_TIMEOUT = 300  # seconds for one launch; a hang fails the test instead of the suite
STOP_SECONDS = 30     # a signalled run must have saved and exited within this (deepspeed's launcher grace)


# ---------------------------------------------------------------- the figures

FIGURES = {"faults_injected": 0, "runs_resumed_exactly": 0, "data_lost": 0, "faults": [], "launch_seconds": {}}


def fault(name: str, **details) -> None:
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": name, **details})


report = figures_fixture("faults", FIGURES)


# ---------------------------------------------------------------- launches followed line by line

class Launch:
    """`deepspeed --num_gpus 2 tests/dist_runner.py SPEC OUT` in its own process group, its output read as it
    comes (the ranks' stdout is rank 0's log lines), with a deadline for everything."""

    def __init__(self, spec: list[dict], tmp: Path, name: str):
        self.spec_path, self.out_path = tmp / f"{name}_spec.json", tmp / f"{name}_out.json"
        self.spec_path.write_text(json.dumps(spec))
        self.name, self.started = name, time.monotonic()
        self.deadline = self.started + LAUNCH_TIMEOUT
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                                      "--no_local_rank", "--master_port", str(free_port()),
                                      str(ROOT / "tests" / "dist_runner.py"), str(self.spec_path), str(self.out_path)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next_line(self) -> str | None:
        try:
            line = self.lines.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            self.kill()
            pytest.fail(f"launch timed out after {LAUNCH_TIMEOUT} s:\n" + "\n".join(self.output[-60:]))
        if line is not None:
            self.output.append(line)
        return line

    def wait_for(self, pattern: str) -> re.Match:
        while (line := self._next_line()) is not None:
            if m := re.search(pattern, line):
                return m
        pytest.fail(f"the launch ended without a line matching {pattern!r}:\n" + "\n".join(self.output[-60:]))

    def finish(self) -> int:
        while self._next_line() is not None:
            pass
        status = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        FIGURES["launch_seconds"][self.name] = round(time.monotonic() - self.started, 1)
        return status

    def ranks(self) -> list[psutil.Process]:
        """The rank processes: the children of deepspeed's per-node launcher, itself a child of `deepspeed`."""
        launchers = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                     if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        ranks = [child for launcher in launchers for child in launcher.children()]
        assert len(ranks) == 2, ranks
        return sorted(ranks, key=lambda p: int(p.environ()["RANK"]))

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def results(self) -> dict:
        return json.loads(self.out_path.read_text()) if self.out_path.exists() else {}

    def text(self) -> str:
        return "\n".join(self.output)


def pretrain(name: str, log_dir: Path, data: Path, *extra: str, **fields) -> dict:
    return {"name": name, "argv": ["pretrain", "--data_dir", str(data), "--log_dir", str(log_dir), *FLAGS,
                                   "--max_steps", str(STEPS), *extra], **fields}


def losses_by_step(r: dict) -> dict[int, float]:
    """step -> loss (a dict: the reliability runs compare pieces of runs by step)."""
    assert "error" not in r, r.get("traceback", r)
    return {int(k): v for k, v in r["losses"].items()}


def logged_losses(text: str, scenario: str) -> dict[int, float]:
    """step -> loss from the lines `step N/M | loss X` that one scenario printed (4 decimals)."""
    part = text.split(f"=== scenario {scenario}\n", 1)[1].split("=== scenario ", 1)[0]
    return {int(m[1]) - 1: float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ \| loss ([\d.]+)", part, re.M)}


def resumed_from(text: str, scenario: str) -> int:
    part = text.split(f"=== scenario {scenario}\n", 1)[1]
    return int(re.search(r"resumed from \S+ at step (\d+)", part)[1])


def last_announced(text: str, scenario: str) -> int:
    """The newest checkpoint a scenario reported as written before it died (0: none)."""
    part = text.split(f"=== scenario {scenario}\n", 1)[1].split("=== scenario ", 1)[0]
    return max([int(s) for s in re.findall(r"^step (\d+): checkpoint ", part, re.M)], default=0)


def account_resume(announced: int, resumed: int, checkpoint_dir: Path) -> None:
    """Data lost: steps behind the newest checkpoint reported written before the fault, plus complete
    checkpoints that no longer verify."""
    FIGURES["data_lost"] += max(0, announced - resumed)
    for step_dir in checkpoint.step_dirs(checkpoint_dir):
        if (step_dir / checkpoint.META_FILE).exists() and not checkpoint.is_complete(step_dir):
            FIGURES["data_lost"] += 1


def kill_during_write_meta(step_dir: Path, meta: dict) -> int:
    """write_meta in a process SIGKILLed after meta.json.tmp is written and before its rename."""
    code = ("import json, os, signal, sys\nfrom pathlib import Path\nfrom gptds import checkpoint\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
            "checkpoint.write_meta(Path(sys.argv[1]), json.loads(sys.argv[2]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(step_dir), json.dumps(meta)], cwd=ROOT, timeout=60)
    return proc.returncode


# ---------------------------------------------------------------- the four launches

@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_data):
    tmp = tmp_path_factory.mktemp("reliability")
    stage1 = tmp / "zero1_fp32.json"
    stage1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    stage3 = tmp / "zero3_fp32.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    run = {"tmp": tmp}

    def spec(name, *extra, log_dir=None, **fields):
        return pretrain(name, log_dir or tmp / name, text_data, *extra, **fields)

    def nan(rank, *calls, value="nan"):
        return {"kind": "nan_loss", "rank": rank, "calls": list(calls), "value": value}

    # 1: the reference; bad losses; SIGKILL of rank 0 half-way through writing step 4 (last: it ends the launch)
    first = Launch([
        spec("ref", "--checkpoint_interval", "2"),
        spec("nan-once", "--checkpoint_interval", "0", fault=nan(1, 4)),
        spec("nan-once-half", "--checkpoint_interval", "0", "--max_steps", "5", fault=nan(1, 4),
             log_dir=tmp / "nan-once-resumed"),
        spec("inf-once-zero3", "--deepspeed_config", str(stage3), "--max_steps", "4", fault=nan(0, 2, value="inf")),
        spec("nan-3-in-a-row", "--checkpoint_interval", "1", "--max_bad_steps", "3", fault=nan(1, 3, 4, 5)),
        spec("killed-in-save", "--checkpoint_interval", "2",
             fault={"kind": "kill_in_save", "rank": 0, "tag": "step_00000004", "after_files": 1}),
    ], tmp, "first")
    run["first_status"], run["first"], run["first_text"] = first.finish(), first.results(), first.text()
    fault("nan loss, one batch, rank 1")
    fault("nan loss, one batch, rank 1, run stopped after it and resumed")
    fault("inf loss, one batch, rank 0, ZeRO-3")
    fault("nan loss, 3 batches in a row, rank 1")
    fault("SIGKILL of rank 0 half-way through writing checkpoint step 4")
    killed = tmp / "killed-in-save" / "checkpoints"
    run["after_kill_in_save"] = {p.name: checkpoint.is_complete(p) for p in checkpoint.step_dirs(killed)}

    # 2: SIGTERM and SIGUSR1 to both ranks (as SLURM signals every process of the step); refusals
    second = Launch([
        spec("nan-once-resumed", "--auto_resume", "--checkpoint_interval", "0"),
        spec("other-zero-stage", "--auto_resume", "--deepspeed_config", str(stage1), log_dir=tmp / "ref"),
        spec("other-global-batch", "--auto_resume", "--grad_accum_steps", "2", log_dir=tmp / "ref"),
        spec("sigterm", "--checkpoint_interval", "0"),
        spec("sigusr1", "--checkpoint_interval", "0"),
    ], tmp, "second")
    run["stop_seconds"] = {}
    for name, sig, at in (("sigterm", signal.SIGTERM, 3), ("sigusr1", signal.SIGUSR1, 6)):
        second.wait_for(f"^=== scenario {name}$")
        second.wait_for(rf"^step {at}/{STEPS} ")
        sent = time.monotonic()
        for rank in second.ranks():
            rank.send_signal(sig)
        second.wait_for("stop requested by signal")
        run["stop_seconds"][name] = time.monotonic() - sent
        fault(f"{sig.name} to both ranks after step {at}", seconds_to_checkpoint_and_stop=run["stop_seconds"][name])
    run["second_status"], run["second"], run["second_text"] = second.finish(), second.results(), second.text()

    # 3: resume the run killed in its save, and SIGKILL it at a random step: the launcher's process group, or one rank
    rng = random.Random(SEED)
    kill_after, target = rng.randint(3, STEPS - 1), rng.choice(["process group", "rank 0", "rank 1"])
    print(f"random kill (GPTDS_FAULT_SEED={SEED}): {target} after step {kill_after}")
    third = Launch([spec("killed-at-random", "--auto_resume", "--checkpoint_interval", "1",
                         log_dir=tmp / "killed-in-save")], tmp, "third")
    third.wait_for(f"^step {kill_after}/{STEPS} ")
    if target == "process group":
        third.kill()
    else:
        third.ranks()[int(target[-1])].kill()
    started = time.monotonic()
    run["third_status"], run["third_text"] = third.finish(), third.text()
    run["third_seconds_to_end"] = time.monotonic() - started
    fault(f"SIGKILL of the {target} after step {kill_after} (seed {SEED})")
    run["random_kill"] = (kill_after, target)
    run["latest_after_random_kill"] = checkpoint.find_latest(killed)
    run["partial_after_random_kill"] = [p.name for p in checkpoint.step_dirs(killed) if not checkpoint.is_complete(p)]

    # SIGKILL while meta.json is written: copies of the reference's steps 6 (complete) and 8 (about to be marked)
    meta_killed = tmp / "killed-in-write-meta" / "checkpoints"
    for tag in ("step_00000006", "step_00000008"):
        shutil.copytree(tmp / "ref" / "checkpoints" / tag, meta_killed / tag,
                        ignore=shutil.ignore_patterns(checkpoint.META_FILE) if tag == "step_00000008" else None)
    meta = checkpoint.read_meta(meta_killed / "step_00000006")
    meta = {k: v for k, v in meta.items() if k not in ("format", "files")}
    run["write_meta_status"] = kill_during_write_meta(meta_killed / "step_00000008", {**meta, "step": 8})
    fault("SIGKILL while meta.json of step 8 is written")
    run["latest_after_meta_kill"] = checkpoint.find_latest(meta_killed)
    run["step_8_after_meta_kill"] = sorted(p.name for p in (meta_killed / "step_00000008").iterdir())

    # Checkpoints damaged where they lie, their sizes unchanged: copies of the reference's steps 2 to 8, with
    # bytes overwritten inside rank 1's optimizer shard of step 8 and zeroed at the start of rank 0's of step 6
    damaged = tmp / "damaged" / "checkpoints"
    shutil.copytree(tmp / "ref" / "checkpoints", damaged, ignore=shutil.ignore_patterns("zero_to_fp32.py"))
    for tag, rank, offset, data in (("step_00000008", 1, 5000, b"\xab" * 64), ("step_00000006", 0, 0, b"\0" * 4096)):
        shard = damaged / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        with open(shard, "r+b") as f:
            f.seek(offset)
            f.write(data)
    fault("bytes overwritten inside rank 1's optimizer shard of the newest checkpoint, size unchanged")
    fault("zeroed bytes at the start of rank 0's optimizer shard of the checkpoint before")

    # 4: the resumes; then ENOSPC on rank 1 writing its shard of step 4 (last: it ends the launch)
    enospc_argv = spec("enospc", "--checkpoint_interval", "2")["argv"]
    fourth = Launch([
        spec("damaged-resumed", "--auto_resume", "--checkpoint_interval", "0", log_dir=tmp / "damaged"),
        spec("killed-resumed", "--auto_resume", "--checkpoint_interval", "1", log_dir=tmp / "killed-in-save"),
        spec("killed-in-write-meta", "--auto_resume", "--checkpoint_interval", "0"),
        spec("sigterm-resumed", "--auto_resume", "--checkpoint_interval", "0", log_dir=tmp / "sigterm"),
        spec("sigusr1-resumed", "--auto_resume", "--checkpoint_interval", "0", log_dir=tmp / "sigusr1"),
        {"name": "enospc", "argv": enospc_argv, "cli": True,
         "fault": {"kind": "enospc_in_save", "rank": 1, "tag": "step_00000004", "after_files": 0}},
    ], tmp, "fourth")
    fourth.wait_for("^=== scenario enospc$")
    fourth.wait_for("cannot write checkpoint")
    started = time.monotonic()
    run["fourth_status"], run["fourth"], run["fourth_text"] = fourth.finish(), fourth.results(), fourth.text()
    run["enospc_seconds_to_end"] = time.monotonic() - started
    fault("ENOSPC on rank 1 writing its shard of step 4")
    args = build_parser().parse_args([*enospc_argv, "--auto_resume"])
    run_config = run_config_from_flags("pretrain", args)
    run["enospc_auto_resume"] = checkpoint.resume_target(run_config.checkpoint_dir, run_config.checkpoint)
    count_figures(run)
    return run


def count_figures(run: dict) -> None:
    """Exact resumes (losses equal to the uninterrupted run's, bit for bit) and data lost, per fault."""
    text3, text4 = run["third_text"], run["fourth_text"]
    reference = run["first"]["ref"]["losses"]
    for resumed, uninterrupted in (("killed-resumed", reference), ("killed-in-write-meta", reference),
                                   ("sigterm-resumed", reference), ("sigusr1-resumed", reference),
                                   ("damaged-resumed", reference)):
        got = run["fourth"].get(resumed, {}).get("losses")
        FIGURES["runs_resumed_exactly"] += bool(got) and all(uninterrupted[k] == v for k, v in got.items())
    nan_once = run["second"].get("nan-once-resumed", {}).get("losses")
    FIGURES["runs_resumed_exactly"] += bool(nan_once) and all(run["first"]["nan-once"]["losses"][k] == v
                                                              for k, v in nan_once.items())
    killed, tmp = run["tmp"] / "killed-in-save" / "checkpoints", run["tmp"]
    account_resume(last_announced(run["first_text"], "killed-in-save"), resumed_from(text3, "killed-at-random"), killed)
    account_resume(last_announced(text3, "killed-at-random"), resumed_from(text4, "killed-resumed"), killed)
    account_resume(6, resumed_from(text4, "killed-in-write-meta"), tmp / "killed-in-write-meta" / "checkpoints")
    for name in ("sigterm", "sigusr1"):
        account_resume(run["second"][name]["step"], resumed_from(text4, f"{name}-resumed"), tmp / name / "checkpoints")
    account_resume(last_announced(text4, "enospc"), checkpoint.step_of(run["enospc_auto_resume"]),
                   tmp / "enospc" / "checkpoints")


# ---------------------------------------------------------------- kills

def test_sigkill_in_a_save_then_at_random_then_auto_resume_continues_exactly(runs):
    tmp, text = runs["tmp"], runs["fourth_text"]
    assert runs["first_status"] != 0  # rank 0 died by SIGKILL; the launcher ended rank 1 and failed
    assert runs["after_kill_in_save"] == {"step_00000002": True, "step_00000004": False}
    # the second attempt skipped the partial step 4, and after the random kill the third takes the newest complete
    assert resumed_from(runs["third_text"], "killed-at-random") == 2
    latest = runs["latest_after_random_kill"]
    assert all(checkpoint.step_of(Path(p)) > checkpoint.step_of(latest) for p in runs["partial_after_random_kill"])
    assert resumed_from(text, "killed-resumed") == checkpoint.step_of(latest)
    assert runs["third_seconds_to_end"] < 60
    reference = losses_by_step(runs["first"]["ref"])
    resumed = losses_by_step(runs["fourth"]["killed-resumed"])
    assert sorted(resumed) == list(range(checkpoint.step_of(latest), STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # bit for bit
    # the killed attempts' logged losses (4 decimals) are the reference's too
    for logged in (logged_losses(runs["first_text"], "killed-in-save"),
                   logged_losses(runs["third_text"], "killed-at-random")):
        assert logged and all(abs(v - reference[s]) < 1e-4 for s, v in logged.items())
    assert [p.name for p in checkpoint.complete_checkpoints(tmp / "killed-in-save" / "checkpoints")][-1] == \
        checkpoint.step_tag(STEPS)


def test_sigkill_while_meta_is_written_leaves_the_folder_incomplete(runs):
    assert runs["write_meta_status"] == -signal.SIGKILL
    folder = runs["tmp"] / "killed-in-write-meta" / "checkpoints"
    shards = [p.name for p in (runs["tmp"] / "ref" / "checkpoints" / "step_00000006").iterdir()]
    assert runs["step_8_after_meta_kill"] == sorted(["meta.json.tmp" if f == "meta.json" else f for f in shards])
    assert checkpoint.is_complete(folder / "step_00000008")  # the resumed run wrote it again
    assert runs["latest_after_meta_kill"] == folder / "step_00000006"
    resumed = losses_by_step(runs["fourth"]["killed-in-write-meta"])
    reference = losses_by_step(runs["first"]["ref"])
    assert resumed_from(runs["fourth_text"], "killed-in-write-meta") == 6
    assert resumed == {6: reference[6], 7: reference[7]}


# ---------------------------------------------------------------- preemption signals

@pytest.mark.parametrize("name", ["sigterm", "sigusr1"])
def test_stop_signal_checkpoints_at_the_step_boundary_exits_0_and_resumes_exactly(runs, name):
    stopped = runs["second"][name]
    assert "error" not in stopped, stopped
    assert stopped["stopped_by_signal"] and stopped["step"] < STEPS
    assert stopped["checkpoint"].endswith(checkpoint.step_tag(stopped["step"]))
    assert checkpoint.is_complete(Path(stopped["checkpoint"]))
    assert runs["stop_seconds"][name] < STOP_SECONDS
    assert runs["second_status"] == 0  # every rank exited 0 after the signal, so did deepspeed's launcher
    resumed = losses_by_step(runs["fourth"][f"{name}-resumed"])
    reference = losses_by_step(runs["first"]["ref"])
    assert min(resumed) == stopped["step"] and max(resumed) == STEPS - 1
    assert losses_by_step(stopped) | resumed == reference  # bit for bit


# ---------------------------------------------------------------- a full disk

def test_enospc_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(runs):
    text, tmp = runs["fourth_text"], runs["tmp"]
    folder = tmp / "enospc" / "checkpoints"
    shard = folder / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    errors = [line for line in text.splitlines() if line.startswith("gptds pretrain: error:")]
    assert len(errors) == 1, errors  # from rank 1; rank 0 was waiting for it in DeepSpeed's barrier
    assert errors[0].startswith(f"gptds pretrain: error: cannot write checkpoint {shard}: No space left on device, ")
    assert "step_00000004 stays incomplete and --auto_resume continues from step_00000002" in errors[0]
    assert runs["fourth_status"] != 0  # the failing rank exited 2; the launcher ended the rank waiting for it
    assert runs["enospc_seconds_to_end"] < 60
    assert checkpoint.is_complete(folder / "step_00000002") and not checkpoint.is_complete(folder / "step_00000004")
    assert runs["enospc_auto_resume"] == folder / "step_00000002"


@pytest.mark.parametrize("flag", ["--log_dir", "--checkpoint_dir"])
def test_a_folder_below_a_file_is_refused_before_any_work(tmp_path, capsys, text_data, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    where = ["--log_dir", str(tmp_path / "run")] if flag == "--checkpoint_dir" else []
    assert main(["pretrain", "--data_dir", str(text_data), *FLAGS, *where, flag, str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"gptds pretrain: error: {flag} {blocker / 'run'}: cannot create it: {blocker} is a file "
                           f"(Not a directory)")
    assert not (tmp_path / "run").exists()
    fault(f"{flag} below a regular file")


# ---------------------------------------------------------------- bad numbers

def test_one_bad_batch_is_skipped_on_every_rank_and_counted(runs):
    for name, steps in (("nan-once", STEPS), ("inf-once-zero3", 4)):
        r = runs["first"][name]
        assert r["skipped_bad_steps"] == 1 and r["step"] == steps
        logged = losses_by_step(r)
        assert sorted(logged) == list(range(steps)) and all(v == v and v < 20 for v in logged.values())
    assert "step 3: non-finite loss in 1 micro-batch(es) at lr" in runs["first_text"]


def test_a_run_with_a_skipped_batch_resumes_exactly(runs):
    full, half = losses_by_step(runs["first"]["nan-once"]), runs["first"]["nan-once-half"]
    resumed = runs["second"]["nan-once-resumed"]
    # the count is the run's, kept in the checkpoint: the resumed attempt skipped nothing more
    assert half["skipped_bad_steps"] == 1 and resumed["skipped_bad_steps"] == 1
    assert losses_by_step(half) | losses_by_step(resumed) == full  # the skipped batch counts as consumed
    assert full != losses_by_step(runs["first"]["ref"])  # it was skipped, not trained on


def test_consecutive_bad_losses_stop_every_rank_naming_step_loss_and_lr(runs):
    error = runs["first"]["nan-3-in-a-row"]["error"]
    assert error.startswith("UserError: stopping at step 2: 3 consecutive non-finite losses (last loss nan, lr "), error
    folder = runs["tmp"] / "nan-3-in-a-row" / "checkpoints"
    assert [p.name for p in checkpoint.step_dirs(folder)] == ["step_00000001", "step_00000002"]
    assert all(checkpoint.is_complete(p) for p in checkpoint.step_dirs(folder))


def test_consecutive_bad_losses_exit_2_with_one_line(tmp_path, capsys, text_data, monkeypatch):
    from gptds.model import GPT
    forward = GPT.forward

    def inf_loss(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        return logits, loss * float("inf")

    monkeypatch.setattr(GPT, "forward", inf_loss)
    assert main(["pretrain", "--data_dir", str(text_data), "--log_dir", str(tmp_path), *FLAGS, "--max_steps", "3",
                 "--max_bad_steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptds pretrain: error: stopping at step 0: 2 consecutive non-finite losses (last loss "
                          "inf, lr 5.000e-03); resume from the last checkpoint with a lower --lr"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    fault("inf loss on every batch, 1 rank, through the CLI")


# ---------------------------------------------------------------- resuming something else

def test_resuming_under_another_zero_stage_is_refused_with_the_fix(runs):
    error = runs["second"]["other-zero-stage"]["error"]
    assert "saved by 2 ranks under ZeRO-2; this run has 2 ranks under ZeRO-1" in error
    # 8-bit AdamW state has no universal form (convert.py refuses it): the fix is the same stage and ranks
    assert "8-bit AdamW state only resumes on the same ranks and stage: run with 2 ranks under ZeRO-2" in error


def test_auto_resuming_on_another_world_size_is_refused_with_the_fix(runs, capsys, text_data):
    argv = ["pretrain", "--data_dir", str(text_data), "--log_dir", str(runs["tmp"] / "ref"), *FLAGS, "--auto_resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "saved by 2 ranks under ZeRO-2; this run has 1 ranks under ZeRO-2. Its 8-bit AdamW state only" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- damaged checkpoints

def test_auto_resume_skips_checkpoints_damaged_in_place_naming_them_and_resumes_exactly(runs):
    text = runs["fourth_text"].split("=== scenario damaged-resumed\n", 1)[1].split("=== scenario ", 1)[0]
    for tag, rank in (("step_00000008", 1), ("step_00000006", 0)):
        assert f"skipping checkpoint {tag}: " in text and f"file zero_pp_rank_{rank}_mp_rank_00_optim_states.pt does " \
            f"not match its xxh3_128 checksum" in text, text[-3000:]
    assert resumed_from(runs["fourth_text"], "damaged-resumed") == 4
    reference = losses_by_step(runs["first"]["ref"])
    resumed = losses_by_step(runs["fourth"]["damaged-resumed"])
    assert resumed == {s: reference[s] for s in range(4, STEPS)}  # bit for bit: not the poisoned state
    assert checkpoint.is_complete(runs["tmp"] / "damaged" / "checkpoints" / "step_00000008", "full")  # saved anew


def test_falling_back_from_an_interrupted_save_says_which_and_why(runs):
    text = runs["third_text"].split("=== scenario killed-at-random\n", 1)[1]
    assert re.search(r"^skipping checkpoint step_00000004: .*(no meta\.json|truncated)", text, re.M), text[:3000]


def test_a_resume_changing_the_global_batch_is_refused(runs):
    error = runs["second"]["other-global-batch"]["error"]
    assert "global batch of --micro_batch_size 2 x --grad_accum_steps 1 x 2 ranks = 4 sequences" in error, error
    assert "keep --grad_accum_steps 1" in error


def test_a_full_disk_is_reported_once_and_no_rank_prints_a_traceback(runs):
    text = runs["fourth_text"].split("=== scenario enospc\n", 1)[1]
    assert "Traceback" not in text and "inline_container" not in text and "enforce fail" not in text, text[-4000:]
    said = [line for line in text.splitlines() if re.match(r"gptds \w+: (error|rank \d+ stopped)", line)]
    assert len(said) == 1 and said[0].startswith("gptds pretrain: error: cannot write checkpoint "), said


def test_no_data_lost(runs):
    """Every fault lost at most the steps since the last checkpoint, and no complete checkpoint was damaged."""
    assert FIGURES["faults_injected"] >= 10 and FIGURES["runs_resumed_exactly"] == 6
    assert FIGURES["data_lost"] == 0
