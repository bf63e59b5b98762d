"""The launch scripts, on one CPU machine:
- two deepspeed launchers as two nodes (--no_ssh, --node_rank 0 and 1) train ZeRO-2 steps and write one
  checkpoint both ranks contributed to;
- launch/slurm.sbatch, under stand-ins for srun and scontrol, resumes that run on two "nodes", checkpoints when
  its batch shell gets SIGTERM (as --signal=B:TERM sends it) and requeues the job;
- launch/cluster.sh hands deepspeed's pdsh launcher the right command; launch/docker_run.sh the right docker run;
- every script passes bash -n and shellcheck, and refuses bad input (a hostfile that does not parse, a node that
  does not resolve or answer, no data or config, missing folders) with a message, within seconds."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fp32_config, free_port

from gptds import checkpoint

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the virtualenv's deepspeed and gptds
SCRIPTS = [ROOT / "launch" / name for name in ("cluster.sh", "slurm.sbatch", "docker_run.sh")] + [
    ROOT / "docker" / "entrypoint.sh"]
TINY = ["--model", "tiny", "-B", "2", "-T", "32", "--eval_interval", "0", "--generate_interval", "0",
        "--hellaswag_interval", "0", "--log_interval", "1"]
FAST = 15  # seconds: bad input must be refused at least this fast (host lookups time out after 5 s)

# Stand-ins for SLURM's commands. srun runs its command once per node on this machine, and, like slurmstepd,
# delivers the signals srun forwards to every process of every task; --kill-on-bad-exit is honoured.
FAKE_SRUN = '''#!{python}
import os, signal, subprocess, sys, time
import psutil
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n)}})
         for n in range(int(os.environ["SLURM_NNODES"]))]
def signal_tasks(signum, frame=None):
    for task in tasks:
        try:
            procs = [psutil.Process(task.pid)] + psutil.Process(task.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, signal_tasks)
while any(t.poll() is None for t in tasks):
    if any(t.returncode not in (None, 0) for t in tasks):
        signal_tasks(signal.SIGKILL)
    time.sleep(0.2)
sys.exit(max(c if c >= 0 else 128 - c for c in (t.returncode for t in tasks)))
'''
FAKE_SCONTROL = '''#!/usr/bin/env bash
case $1 in
    show) printf '%s\\n' $FAKE_SLURM_HOSTS ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) exit 1 ;;
esac
'''


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_bin(tmp: Path) -> Path:
    """The virtualenv's deepspeed and gptds; srun, scontrol, and a pdsh/docker/ssh that record their arguments
    and succeed. Only these go before PATH: the rest (ninja above all) resolves as in the other tests, since the
    virtualenv's ninja and the system's disagree on ninja's log and would rebuild DeepSpeed's JIT ops each time."""
    folder = tmp / "fake_bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("deepspeed", "gptds"):
        if not (folder / name).exists():
            (folder / name).symlink_to(BIN / name)
    write_exe(folder / "srun", FAKE_SRUN.format(python=sys.executable))
    write_exe(folder / "scontrol", FAKE_SCONTROL)
    for name in ("pdsh", "docker"):
        write_exe(folder / name, f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{tmp}/{name}.args"\n')
    write_exe(folder / "ok_ssh" / "ssh", "#!/usr/bin/env bash\nexit 0\n")
    return folder


def script_env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{fake_bin(tmp)}:{env['PATH']}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def stop(proc: subprocess.Popen) -> None:
    """Ends a launch and everything it started (each launch runs in its own session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, text_data):
    """Two deepspeed launchers, one per "node", one rank each, 3 ZeRO-2 steps and a checkpoint at step 3."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    config = fp32_config(tmp)
    # deepspeed refuses --num_nodes > 1 without a hostfile (and would rendezvous at 127.0.0.1): it needs one
    # even with --no_ssh, to number the nodes. slurm.sbatch writes one the same way.
    (tmp / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    port, log_dir = free_port(), tmp / "run"
    procs, logs = [], []
    for node_rank in (0, 1):
        logs.append(tmp / f"node{node_rank}.log")
        procs.append(subprocess.Popen(
            [str(BIN / "deepspeed"), "--hostfile", str(tmp / "hostfile"), "--num_nodes", "2", "--num_gpus", "1",
             "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "--no_ssh", "--no_local_rank", "--module", "gptds", "pretrain", "--data_dir", str(text_data),
             "--deepspeed_config", config, "--log_dir", str(log_dir), *TINY, "--max_steps", "3",
             "--checkpoint_interval", "3"],
            cwd=tmp, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            stop(p)
    return {"config": config, "data": text_data, "log_dir": log_dir, "codes": codes,
            "outputs": [log.read_text() for log in logs]}


@pytest.mark.slow
def test_two_launchers_as_two_nodes_write_one_checkpoint(two_nodes):
    assert two_nodes["codes"] == [0, 0], "\n".join(out[-3000:] for out in two_nodes["outputs"])
    step_dir = two_nodes["log_dir"] / "checkpoints" / "step_00000003"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["zero_stage"]) == (3, 2, 2)
    # ZeRO-2 partitions the optimizer state: one shard from the rank on each node
    for rank in (0, 1):
        assert len(list(step_dir.glob(f"zero_pp_rank_{rank}_*optim_states.pt"))) == 1, sorted(step_dir.iterdir())
    assert "step 3/3" in two_nodes["outputs"][0]


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["time limit", "preemption"])
def test_slurm_script_resumes_checkpoints_on_sigterm_and_requeues(two_nodes, tmp_path, signalled):
    """Time limit: --signal=B:TERM@120 sends SIGTERM to the batch shell only. Preemption: Slurm sends SIGTERM to
    every process of the job, deepspeed's launchers included (they pass it on to their ranks and exit 1 whatever
    the ranks did): the job is requeued either way and resumes from the newest complete checkpoint."""
    env = script_env(tmp_path, SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES=2,
                     FAKE_SLURM_HOSTS="localhost 127.0.0.1", FAKE_SLURM_LOG=tmp_path / "scontrol.log",
                     GPUS_PER_NODE=1, LOG_DIR=two_nodes["log_dir"], MASTER_PORT=free_port())
    checkpoints = two_nodes["log_dir"] / "checkpoints"
    before = checkpoint.step_of(checkpoint.find_latest(checkpoints))
    out = tmp_path / "slurm.out"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "pretrain", "--data_dir", str(two_nodes["data"]),
         "--deepspeed_config", two_nodes["config"], *TINY, "--max_steps", "200", "--checkpoint_interval", "0"],
        cwd=tmp_path, env=env, stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        first = f"step {before + 1}/200"  # the first step after resuming: the handler is in place
        while first not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-4000:]
            time.sleep(0.5)
        if signalled == "time limit":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        stop(proc)
    text = out.read_text()
    assert code == 0, text[-4000:]
    assert "resumed from" in text and checkpoint.step_tag(before) in text  # --auto_resume took the newest
    assert "stop requested by signal" in text
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    newest = checkpoint.find_latest(checkpoints)
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] >= before
    if signalled == "time limit":  # nothing kills the ranks: the stop checkpoint is written
        assert meta["step"] > before + 1
    assert (two_nodes["log_dir"] / "hostfile").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"


def test_cluster_script_hands_deepspeed_the_pdsh_launch(tmp_path):
    """Every check passes (ssh is a stand-in that succeeds); deepspeed's pdsh runner gets each node's command."""
    (tmp_path / "hostfile").write_text("# two nodes\nlocalhost slots=2\n\n127.0.0.1 slots=2\n")
    (tmp_path / ".deepspeed_env").write_text("HF_HOME=/shared/hf\n")  # other variables for every node
    # No DS_ACCELERATOR: on this GPU-less node deepspeed would pick its CPU backend, which exports no NCCL_*;
    # the script defaults it to cuda, so NCCL_SOCKET_IFNAME must reach the nodes' command
    env = script_env(tmp_path, NCCL_SOCKET_IFNAME="lo", LOG_DIR=tmp_path / "run")
    env.pop("DS_ACCELERATOR", None)
    env["PATH"] = f"{tmp_path / 'fake_bin' / 'ok_ssh'}:{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "cluster.sh"), str(tmp_path / "hostfile"), "pretrain", "--data_dir", "/d",
         "--deepspeed_config", "zero2", "--model", "tiny"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = (tmp_path / "pdsh.args").read_text().split("\n")
    assert args[args.index("-w") + 1] == "localhost,127.0.0.1"
    command = " ".join(args)
    for part in ("export NCCL_SOCKET_IFNAME=lo;", "export NCCL_DEBUG=WARN;", "export HF_HOME=/shared/hf;",
                 f"cd {tmp_path};", "--node_rank=%n",
                 "--master_addr=localhost", "--master_port=29500", "--no_local_rank", "--module",
                 f"gptds pretrain --log_dir {tmp_path / 'run'} --data_dir /d --deepspeed_config zero2 --model tiny"):
        assert part in command, command
    assert (tmp_path / "run" / "launcher.log").exists()


def test_docker_run_script_mounts_folders_and_publishes_tensorboard(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "docker_run.sh"), "ds_report"], cwd=tmp_path,
                          env=script_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "docker.args").read_text().split("\n")
    command = " ".join(args)
    for part in ("run --rm", "--gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864",
                 f"--volume {tmp_path / 'data'}:/workspace/data --volume {tmp_path / 'runs'}:/workspace/runs",
                 "--publish 6006:6006", "--stop-timeout 300", "gptds ds_report"):
        assert part in command, command


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


BAD_HOSTFILE = "node0 slots=8\nnode1 slots=eight\n"
MISSING_NODE = "localhost slots=1\nno-such-node.invalid slots=1\n"
CLUSTER_ARGS = ["pretrain", "--data_dir", "/d", "--deepspeed_config", "zero2"]
CLUSTER_CASES = {  # name: (hostfile text or None for no file, arguments after HOSTFILE, expected message)
    "no arguments": (None, None, "usage: launch/cluster.sh HOSTFILE"),
    "no hostfile": (None, CLUSTER_ARGS, "is not a readable file"),
    "unparsable hostfile": (BAD_HOSTFILE, CLUSTER_ARGS, "line 2: 'node1 slots=eight' is not 'hostname slots=N'"),
    "host listed twice": ("node0 slots=1\nnode0 slots=1\n", CLUSTER_ARGS, "node0 is listed twice"),
    "empty hostfile": ("# nobody\n", CLUSTER_ARGS, "lists no hosts"),
    "not a job": ("node0 slots=1\n", ["train", *CLUSTER_ARGS[1:]], "must be pretrain or finetune"),
    "no data": ("node0 slots=1\n", ["pretrain", "--deepspeed_config", "zero2"], "--data_dir DIR is required"),
    "no config": ("node0 slots=1\n", ["pretrain", "--data_dir", "/d"], "--deepspeed_config is required"),
    "log_dir flag": ("node0 slots=1\n", [*CLUSTER_ARGS, "--log_dir=x"], "set LOG_DIR"),
    "missing node": (MISSING_NODE, CLUSTER_ARGS, "host no-such-node.invalid (in"),
    "node not answering ssh": ("localhost slots=1\n", CLUSTER_ARGS, "host localhost (in"),
}


def run_fast(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < FAST, f"took {time.monotonic() - start:.1f} s: {args}"
    return proc


@pytest.mark.parametrize("case", CLUSTER_CASES)
def test_cluster_script_refuses_bad_input(case, tmp_path):
    hostfile_text, args, message = CLUSTER_CASES[case]
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    argv = [] if args is None else [str(hostfile), *args]
    proc = run_fast(["bash", str(ROOT / "launch" / "cluster.sh"), *argv], tmp_path, script_env(tmp_path))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "pdsh.args").exists()  # nothing was launched


SLURM_ENV = dict(SLURM_JOB_ID=7, SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES=2, FAKE_SLURM_HOSTS="localhost 127.0.0.1")
SLURM_ARGS = ["pretrain", "--data_dir", "/d", "--deepspeed_config", "zero2"]
SLURM_CASES = {  # name: (environment, arguments, expected message)
    "outside SLURM": ({}, SLURM_ARGS, "not running under SLURM"),
    "node missing from the allocation": ({**SLURM_ENV, "FAKE_SLURM_HOSTS": "localhost"}, SLURM_ARGS,
                                         "gives 1 hosts (localhost), but SLURM_NNODES is 2"),
    "no arguments": (SLURM_ENV, [], "usage: sbatch launch/slurm.sbatch"),
    "not a job": (SLURM_ENV, ["train", *SLURM_ARGS[1:]], "must be pretrain or finetune"),
    "no data": (SLURM_ENV, ["pretrain", "--deepspeed_config", "zero2"], "--data_dir DIR is required"),
    "no config": (SLURM_ENV, ["pretrain", "--data_dir", "/d"], "--deepspeed_config is required"),
    "unresolvable master": ({**SLURM_ENV, "MASTER_ADDR": "no-such-node.invalid"}, SLURM_ARGS, "does not resolve"),
}


@pytest.mark.parametrize("case", SLURM_CASES)
def test_slurm_script_refuses_bad_input(case, tmp_path):
    env_extra, args, message = SLURM_CASES[case]
    env = script_env(tmp_path, LOG_DIR=tmp_path / "run", **env_extra)
    proc = run_fast(["bash", str(ROOT / "launch" / "slurm.sbatch"), *args], tmp_path, env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "hostfile").exists()  # stopped before writing anything


@pytest.mark.parametrize("missing", ["DATA_DIR", "RUNS_DIR", "arguments"])
def test_docker_run_script_refuses_missing_folders(missing, tmp_path):
    env = script_env(tmp_path, DATA_DIR=tmp_path / "data", RUNS_DIR=tmp_path / "runs")
    for name in ("data", "runs"):
        if missing != f"{name.upper()}_DIR":
            (tmp_path / name).mkdir()
    args = [] if missing == "arguments" else ["pretrain"]
    proc = run_fast(["bash", str(ROOT / "launch" / "docker_run.sh"), *args], tmp_path, env)
    expected = "usage:" if missing == "arguments" else f"{env[missing]} is not a folder"
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "docker.args").exists()


@pytest.mark.slow
@pytest.mark.parametrize("own_checkpoints", [False, True])
def test_slurm_script_starts_from_resume_path_then_continues_from_its_own(own_checkpoints, tmp_path):
    """--resume --checkpoint_path (e.g. a universal checkpoint) is passed through to the first run; once the run
    folder holds checkpoints of its own, a requeued job continues from those with --auto_resume instead."""
    log_dir = tmp_path / "run"
    if own_checkpoints:
        step_dir = log_dir / "checkpoints" / checkpoint.step_tag(7)
        step_dir.mkdir(parents=True)
        checkpoint.write_meta(step_dir, {"step": 7})
    env = script_env(tmp_path, **SLURM_ENV, LOG_DIR=log_dir, MASTER_PORT=free_port())
    fake_deepspeed = tmp_path / "fake_bin" / "deepspeed"
    fake_deepspeed.unlink()  # records the arguments each node's launcher got, instead of training
    fake_deepspeed.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_ARGS_DIR/node$SLURM_NODEID"\n')
    fake_deepspeed.chmod(0o755)
    env["FAKE_ARGS_DIR"] = str(tmp_path)
    proc = run_fast(["bash", str(ROOT / "launch" / "slurm.sbatch"), *SLURM_ARGS, "--resume", "--checkpoint_path",
                     "/shared/universal", "--model", "tiny"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    for node in (0, 1):
        args = (tmp_path / f"node{node}").read_text().splitlines()
        gptds_args = args[args.index("gptds") + 1:]
        if own_checkpoints:
            assert "--auto_resume" in gptds_args and "--resume" not in gptds_args, gptds_args
            assert "/shared/universal" not in gptds_args and "--checkpoint_path" not in gptds_args
        else:
            assert "--auto_resume" not in gptds_args, gptds_args
            assert gptds_args[gptds_args.index("--resume"):][:3] == ["--resume", "--checkpoint_path",
                                                                     "/shared/universal"]
        assert gptds_args[-2:] == ["--model", "tiny"]
