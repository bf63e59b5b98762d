"""Every command in README.md's ```bash blocks runs as written, or is exempt below with the reason, so that a
README command cannot rot: a new command is run by the rules below, and one that is neither a gptds,
deepspeed nor make command nor exempt fails this test until it is handled.

The commands run in README order, in one temporary folder (so that `runs/`, `data/` and `out/` are the
README's relative paths and later commands use what earlier ones wrote), changed only by these rules:
1. The example inputs exist under the README's names: `my_corpus/` holds the bundled tiny Shakespeare,
   `databricks-dolly-15k.jsonl`, `conversations.jsonl`, `hellaswag_val.jsonl`, `ARC-Easy-Test.jsonl` and GSM8K's
   `test.jsonl` and `train.jsonl` are the bundled samples, and
   `path/to/hf-gpt2` is the Hugging Face folder that `gptds convert zero-to-hf` wrote (out/gpt2-hf).
2. Optional parts written `[--flag value]` are left out.
3. deepspeed: `--num_gpus N` becomes 2, and a free `--master_port` is added (tests run side by side).
4. Training (pretrain, finetune): TINY is appended (argparse takes a flag's last value): the tiny model, a
   few steps, small batches and evaluations; `gptds rl` gets RL_TINY (a few steps, one prompt per rank).
   The pretraining run also gets `--optimizer adamw`, because the README's `zero-to-universal` line
   converts `--optimizer adamw` runs (8-bit AdamW runs are refused).
   Without a bf16 GPU, `--deepspeed_config zero2` (bf16) becomes its fp32 twin `zero2_fp32` (same ZeRO
   stage; bf16 on a CPU is ~80x slower).
5. `gptds evaluate` gets `--hellaswag_limit 8 --limit 8`.
6. The interactive `gptds chat` (no --message) reads "Hello" and "/quit" from its standard input.
7. `make demo` runs the Makefile's recipe with this suite's virtualenv (VENV=..., SETUP= skips the
   install), DEMO_FLAGS=TINY and a free MASTER_PORT; it runs twice: the second run only says that the runs
   are complete and shows the answer again. Its console is checked for third-party notices too: the
   demo's commands show gptds's lines only.
8. `python` and `ds_report` are the virtualenv's (the README's commands run with it activated).
gptds commands run in this process through gptds.__main__.main, the function the `gptds` script calls;
deepspeed and make commands run as processes."""

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from gptds.__main__ import main
from gptds.tokenizer import ASSETS_DIR

pytestmark = pytest.mark.slow  # launches ranks
ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
TINY = ["--model", "tiny", "-T", "64", "-B", "2", "--max_steps", "2", "--log_interval", "1", "--eval_batches", "1",
        "--hellaswag_limit", "8", "--generate_max_new_tokens", "8"]
RL_TINY = ["--max_steps", "2", "-B", "8", "--log_interval", "1"]  # -B: one prompt's 8 completions per rank
RUNS = {"gptds", "deepspeed", "make", "python", "ds_report"}  # the programs whose commands run

HUB = "needs the Hugging Face hub (network)"
INSTALL = "installs packages from the network; the virtualenv running this suite was made this way (make setup)"
PDSH = ("needs passwordless ssh and pdsh to GPU nodes; tests/test_launch.py runs cluster.sh with stand-ins for "
        "pdsh and ssh")
SLURM = ("needs a SLURM cluster; tests/test_launch.py runs launch/slurm.sbatch with stand-ins for srun and "
         "scontrol")
DOCKER = ("needs a Docker engine and NVIDIA GPUs; tests/test_docker.py lints the Dockerfile, checks its pins and "
          "runs the entrypoint")
EXEMPT = {  # the command (as shlex splits it, joined by spaces, without its comment): why it does not run here
    "make test": "runs the whole test suite, this test included",
    "python3 -m venv .venv": INSTALL,
    ".venv/bin/pip install torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu": INSTALL,
    ".venv/bin/pip install -e .[dev]": INSTALL,
    "gptds prepare text --dataset Skylion007/openwebtext --output_dir data/openwebtext": HUB,
    "gptds prepare text --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT --output_dir "
    "data/fineweb-edu": HUB,
    "cp launch/hostfile.example hostfile": "the first step of the pdsh launch below: " + PDSH,
    "NCCL_SOCKET_IFNAME=eth0 launch/cluster.sh hostfile pretrain --data_dir /shared/data/fineweb-edu "
    "--deepspeed_config zero2 --model gpt2 --auto_resume": PDSH,
    "source .venv/bin/activate": "the first step of the SLURM launch below: " + SLURM,
    "sbatch --nodes 4 --gpus-per-node 8 launch/slurm.sbatch pretrain --data_dir /shared/data/fineweb-edu "
    "--deepspeed_config zero2 --model gpt2": SLURM,
    "docker build -f docker/Dockerfile -t gptds .": DOCKER,
    "docker run --rm --gpus all gptds ds_report": DOCKER,
    "mkdir -p data runs": "a step of the Docker recipe: " + DOCKER,
    "launch/docker_run.sh deepspeed --no_local_rank --module gptds pretrain --auto_resume": DOCKER,
    "launch/docker_run.sh deepspeed --no_local_rank --module gptds pretrain --data_dir data/fineweb-edu "
    "--deepspeed_config zero2 --model gpt2 --auto_resume": DOCKER,
    "docker exec -d gptds tensorboard --logdir runs --bind_all": DOCKER,
    "deepspeed --num_gpus 8 --module gptds pretrain --data_dir data/fineweb-edu --model gpt2 -B 16 -T 1024 "
    "--grad_accum_steps 4 --max_steps 20000 --lr 6e-4 --warmup_steps 700 --log_interval 50 --eval_interval 1000 "
    "--eval_batches 20 --hellaswag_interval 2500 --hellaswag_limit 0 --generate_interval 2500 "
    "--checkpoint_interval 1000 --log_dir runs/gpt2 --auto_resume": "GPU settings for a corpus from the hub "
                                                                     "(data/fineweb-edu, above): " + HUB,
    "DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 pip install --no-cache-dir --no-build-isolation "
    "deepspeed==0.19.8": INSTALL,
    "deepspeed --num_gpus 8 --module gptds rl --pretrained_checkpoint runs/chat-gsm8k/checkpoints --task gsm8k "
    "--task_file train.jsonl --eval_task_file gsm8k=test.jsonl --log_dir runs/rl-gsm8k":
        "GPU scale: GSM8K prompts plus 256-token answers need a GPT-2-size chat model's context (the tiny model's "
        "is 128 tokens); the same code path runs on the arithmetic task above and in tests/test_rl.py",
    "bash bench/gpu_wheels.sh": "downloads wheels from the network for the GPU machine",
    "bash bench/gpu_check.sh": "the GPU window's script: needs a CUDA GPU; its dry run is the next command",
    "GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh": "runs in tests/test_bench.py "
                                                   "(test_gpu_check_dry_run_runs_every_step_on_cpu)",
}
# What a default console must not show (third-party notices, launcher set-up lines, tracebacks).
NOISE = re.compile(r"\[(WARNING|INFO)\]|Warning:|Setting accelerator|untested optimizer|gemm_4bit|Killing subprocess|"
                   r"Traceback|Processing zero checkpoint|Reconstructed fp32")


def readme_commands() -> list[list[str]]:
    """Each command of README.md's bash blocks as shlex tokens (continuation lines joined, comments off)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def program(tokens: list[str]) -> str:
    words = [t for t in tokens if not re.match(r"^[A-Z_]+=", t)]  # after VAR=value assignments
    return Path(words[0]).name


def without_optional_parts(tokens: list[str]) -> list[str]:
    out, optional = [], False
    for t in tokens:
        optional = optional or t.startswith("[")
        if not optional:
            out.append(t)
        optional = optional and not t.endswith("]")
    return out


def rewritten(tokens: list[str]) -> list[str]:
    """Rules 2 to 5 of the module docstring (6 is stdin, in the test)."""
    tokens = without_optional_parts(tokens)
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        tokens = ["zero2_fp32" if a == "zero2" and b == "--deepspeed_config" else a
                  for b, a in zip([""] + tokens, tokens)]
    if tokens[0] in ("python", "ds_report"):
        tokens = [str(VENV / "bin" / tokens[0]), *tokens[1:]]
    if tokens[0] == "deepspeed":
        tokens = ["deepspeed", "--master_port", str(free_port()), *tokens[1:]]
        tokens = ["2" if b == "--num_gpus" else a for b, a in zip([""] + tokens, tokens)]
    job = next((t for t in tokens if t in ("pretrain", "finetune", "rl", "evaluate")), None)
    if job == "pretrain":
        tokens += [*TINY, "--optimizer", "adamw"]
    elif job == "finetune":
        tokens += TINY
    elif job == "rl":
        tokens += RL_TINY
    elif job == "evaluate":
        tokens += ["--hellaswag_limit", "8", "--limit", "8"]
    return tokens


def example_inputs(tmp: Path) -> None:
    """Rule 1: the README's example inputs, under its names."""
    (tmp / "my_corpus").mkdir()
    shutil.copy(ASSETS_DIR / "tinyshakespeare.txt", tmp / "my_corpus")
    shutil.copy(ASSETS_DIR / "dolly_sample.jsonl", tmp / "databricks-dolly-15k.jsonl")
    shutil.copy(ASSETS_DIR / "chat_sample.jsonl", tmp / "conversations.jsonl")
    shutil.copy(ASSETS_DIR / "hellaswag_sample.jsonl", tmp / "hellaswag_val.jsonl")
    shutil.copy(ASSETS_DIR / "arc_easy_sample.jsonl", tmp / "ARC-Easy-Test.jsonl")
    shutil.copy(ASSETS_DIR / "gsm8k_sample.jsonl", tmp / "test.jsonl")
    shutil.copy(ASSETS_DIR / "gsm8k_train_sample.jsonl", tmp / "train.jsonl")
    (tmp / "path" / "to").mkdir(parents=True)
    (tmp / "path" / "to" / "hf-gpt2").symlink_to(tmp / "out" / "gpt2-hf")


def run_process(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
    console = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"{shlex.join(cmd)} exited {proc.returncode}:\n{console}"
    return proc


def run_make_demo(tmp: Path) -> subprocess.CompletedProcess:
    """Rule 7."""
    return run_process(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "demo", f"VENV={VENV}",
                        "SETUP=", f"MASTER_PORT={free_port()}", f"DEMO_FLAGS={shlex.join(TINY)}"], tmp)


def check_demo_console(proc: subprocess.CompletedProcess) -> None:
    """No third-party notices; the last lines are the question and a visible answer (indented if longer)."""
    assert not NOISE.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    last = re.search(r"\nQuestion: (.*)\nAnswer:   (\S.*)(\n {10}.*)*\n$", proc.stdout)
    assert last and last.group(1) == "What is the capital of France?", proc.stdout


def check_plain_launch_console(proc: subprocess.CompletedProcess) -> None:
    """A launch as the README writes it: the launcher's own lines are there (its two processes announce the
    accelerator they guessed, and log their set-up), but nothing from the ranks' libraries."""
    console = proc.stdout + proc.stderr
    ranks = [line for line in console.splitlines() if not re.search(r"\[(runner|launch|real_accelerator)\.py:", line)]
    assert not [line for line in ranks if NOISE.search(line)], console
    assert console.count("Setting accelerator to CPU") <= 2, console  # the launcher's, not the ranks'


def test_every_readme_command_runs_as_written_or_is_exempt(tmp_path, monkeypatch, capfd):
    commands = readme_commands()
    unknown = [shlex.join(c) for c in commands if program(c) not in RUNS and " ".join(c) not in EXEMPT]
    assert not unknown, f"README commands neither run here nor exempt (add a rule or an EXEMPT entry): {unknown}"
    listed = {" ".join(c) for c in commands}
    assert not set(EXEMPT) - listed, f"EXEMPT lists commands the README no longer has: {set(EXEMPT) - listed}"

    example_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ran = []
    for tokens in commands:
        if " ".join(tokens) in EXEMPT:
            continue
        cmd = rewritten(tokens)
        if tokens[:2] == ["make", "demo"]:
            check_demo_console(run_make_demo(tmp_path))
            again = run_make_demo(tmp_path)
            assert "The demo's runs are complete" in again.stdout and "make clean-runs" in again.stdout, again.stdout
            assert "deepspeed" not in again.stdout + again.stderr  # nothing trained again
            check_demo_console(again)
        elif cmd[0] == "gptds":
            if cmd[1] == "chat" and "--message" not in cmd:
                monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/quit\n"))
            status = main(cmd[1:])
            out, err = capfd.readouterr()
            assert status == 0, f"{shlex.join(cmd)} exited {status}:\n{err[-4000:]}"
            if cmd[1] == "generate":
                assert out.startswith("ROMEO:") and out.strip() != "ROMEO:", out
            if cmd[1] == "evaluate":
                asked = cmd[cmd.index("--tasks") + 1].split(",") if "--tasks" in cmd else ["hellaswag"]
                result = json.loads(out)
                assert all(any(k == task or k.startswith(task + "_") for k in result) for task in asked), out
                assert all(re.search(rf"^{task}: (\d+)/\1 items", err, re.M) for task in asked if task != "bpb"), err
        elif tokens[0] == "deepspeed":
            check_plain_launch_console(run_process(cmd, tmp_path))
        else:
            run_process(cmd, tmp_path)
        ran.append(tokens[0] if tokens[0] != "gptds" else f"gptds {tokens[1]}")
    assert ran.count("deepspeed") == 2 and "make" in ran and ran.count("gptds convert") == 6, ran
    assert (tmp_path / "out" / "universal").is_dir() and (tmp_path / "runs" / "gpt2-dolly" / "checkpoints").is_dir()
