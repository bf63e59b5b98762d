"""How the command line treats mistakes and noise: a mistyped flag gets the subcommand's usage and the
closest flag; a user error under a multi-rank launcher is printed once, in one piece; third-party notices
that do not concern the user are held back, and --verbose / GPTDS_VERBOSE=1 bring them back."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from gptds import errors
from gptds.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_a_mistyped_flag_shows_the_subcommands_usage_and_the_closest_flag(capsys):
    err = refused(["pretrain", "--max_stesp", "10"], capsys)
    assert err.startswith("usage: gptds pretrain ") and "--max_steps MAX_STEPS" in err
    assert err.rstrip().endswith("gptds pretrain: error: unrecognized arguments: --max_stesp 10 "
                                 "(did you mean --max_steps?)")
    err = refused(["convert", "zero-to-hf", "in", "out", "--tga", "step_1", "--overwirte"], capsys)
    assert err.startswith("usage: gptds convert zero-to-hf ")
    assert "(--tga: did you mean --tag?; --overwirte: did you mean --overwrite?)" in err


def test_a_missing_required_flag_next_to_a_near_miss_says_so(capsys):
    err = refused(["generate", "--checkpoint", "x", "--promt", "Hello"], capsys)
    assert err.startswith("usage: gptds generate ")
    assert "error: the following arguments are required: --prompt (--promt was given: did you mean --prompt?)" in err
    err = refused(["pretrian"], capsys)
    assert "invalid choice: 'pretrian'" in err and "(did you mean pretrain?)" in err


def test_nothing_close_gets_no_guess(capsys):
    err = refused(["pretrain", "--zzzzzz", "1"], capsys)
    assert err.rstrip().endswith("unrecognized arguments: --zzzzzz 1")


def test_the_launchers_local_rank_and_verbose_are_accepted_before_and_after_the_subcommand():
    from gptds.__main__ import build_parser
    for argv in (["--local_rank=1", "--verbose", "pretrain"], ["pretrain", "--local-rank", "1", "--verbose"]):
        args = build_parser().parse_args(argv)
        assert args.local_rank == 1 and args.verbose is True
    assert build_parser().parse_args(["pretrain"]).verbose is False


def test_a_report_is_printed_once_per_launch_in_one_write(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(errors, "REPORTS_DIR", tmp_path / "reports")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for rank in ("0", "1"):  # two ranks of one launch (same parent) meet the same mistake
        monkeypatch.setenv("RANK", rank)
        errors.report("gptds pretrain: error: --max_steps (train.max_steps) = 0 is not allowed")
    errors.report("gptds pretrain: error: another mistake")  # a different message is news
    assert capsys.readouterr().err == ("gptds pretrain: error: --max_steps (train.max_steps) = 0 is not allowed\n"
                                       "gptds pretrain: error: another mistake\n")
    monkeypatch.setenv("WORLD_SIZE", "1")  # not launched: always printed
    errors.report("x")
    errors.report("x")
    assert capsys.readouterr().err == "x\nx\n"


NOISE = """
import logging, warnings
import gptds.__main__  # installs the filters
import deepspeed  # as a run does, later: its accelerator notice comes at import
from gptds import notices
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: no kernels. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1")
logging.getLogger("DeepSpeed").warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
logging.getLogger("DeepSpeed").warning("a DeepSpeed warning gptds does not know")
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
print("--- verbose from here", flush=True)
notices.set_verbose(True)
"""


def noise_console(env: dict) -> str:
    """NOISE's stdout and stderr as one console, in order."""
    proc = subprocess.run([sys.executable, "-u", "-c", NOISE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def test_third_party_notices_are_held_back_unless_verbose():
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "GPTDS_VERBOSE")}
    console = noise_console(env)
    quiet, _, verbose = console.partition("--- verbose from here")
    assert "a DeepSpeed warning gptds does not know" in quiet  # real problems pass
    for notice in ("gemm_4bit_forward", "untested optimizer", "FutureWarning", "Setting accelerator to CPU"):
        assert notice not in quiet, quiet
    # held, then shown once verbose (the FutureWarning was dropped: it was raised before)
    for notice in ("gemm_4bit_forward", "untested optimizer"):
        assert notice in verbose, verbose
    if not torch.cuda.is_available():  # DeepSpeed's import-time notice on a CPU machine, held until then
        assert "Setting accelerator to CPU" in verbose, verbose
    quiet, _, _ = noise_console({**env, "GPTDS_VERBOSE": "1"}).partition("--- verbose from here")
    for notice in ("gemm_4bit_forward", "untested optimizer", "FutureWarning"):
        assert notice in quiet, quiet


@pytest.mark.slow  # launches ranks
def test_a_user_error_under_the_launcher_is_printed_once(tmp_path):
    """Both ranks refuse the mistyped flag; the user reads it once (DeepSpeed's launcher then reports the exit
    status in its own words)."""
    proc = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "gptds", "pretrain", "--max_stesp", "10"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    console = proc.stdout + proc.stderr
    error = "gptds pretrain: error: unrecognized arguments: --max_stesp 10 (did you mean --max_steps?)"
    assert console.count(error) == 1 and console.count("usage: gptds pretrain") == 1, console
    assert f"\n{error}\n" in console  # on a line of its own, not glued to another rank's
