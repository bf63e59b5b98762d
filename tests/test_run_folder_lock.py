"""One run per run folder and checkpoint folder: a second run into a folder another run holds is refused naming
the holder (host, pid, start time); the lock dies with its holder (SIGKILL included); a run waits up to
--lock_wait_s for a holder that is ending (a requeued SLURM job); and where the file system has no flock,
host, pid and heartbeat do the same, with a dead or silent holder's lock taken over."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY_RUN
from reliability_report import figures_fixture

from gptds import locks
from gptds.__main__ import build_parser, main
from gptds.config import run_config_from_flags
from gptds.errors import UserError
from gptds.locks import FolderLock
from gptds.session import lock_run_folders

FIGURES = {"faults_injected": 0, "data_lost": 0, "faults": []}
report = figures_fixture("run_folder_lock", FIGURES)

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom gptds.locks import FolderLock\n"
        "lock = FolderLock(Path(sys.argv[1]), '--log_dir').acquire(0)\nprint('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n")


def holder(folder, seconds: float = 60) -> subprocess.Popen:
    """Another process holding folder's lock for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def fault(name: str) -> None:
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": name})


def test_a_second_run_into_a_held_run_folder_is_refused_naming_the_holder(tmp_path, text_data, capsys):
    run = tmp_path / "run"
    other = holder(run)
    fault("a second run into a run folder in use")
    try:
        status = main(["pretrain", "--data_dir", str(text_data), "--log_dir", str(run), *TINY_RUN, "--max_steps", "1",
                       "--lock_wait_s", "0"])
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1, err
        assert f"--log_dir {run} is in use by another run (host {socket.gethostname()}, pid {other.pid}, " \
               f"started 20" in err and "one run per folder" in err, err
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()


def test_a_run_into_a_checkpoint_folder_another_run_holds_is_refused(tmp_path, text_data, capsys):
    shared = tmp_path / "shared-checkpoints"
    other = holder(shared)
    fault("a second run into a checkpoint folder in use, from another run folder")
    try:
        assert main(["pretrain", "--data_dir", str(text_data), "--log_dir", str(tmp_path / "b"), "--checkpoint_dir",
                     str(shared), *TINY_RUN, "--lock_wait_s", "0"]) == 2
        assert f"--checkpoint_dir {shared} is in use by another run (host " in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()


def test_the_lock_dies_with_its_holder_even_by_sigkill(tmp_path):
    other = holder(tmp_path)
    other.send_signal(signal.SIGKILL)
    other.wait()
    fault("SIGKILL of the run holding the folder")
    lock = FolderLock(tmp_path, "--log_dir").acquire(0)  # at once: the kernel released it
    lock.release()


def test_a_run_waits_for_a_holder_that_is_ending(tmp_path, capsys):
    other = holder(tmp_path, seconds=1.5)
    fault("the previous job still shutting down (requeue)")
    started = time.monotonic()
    lock = FolderLock(tmp_path, "--log_dir").acquire(30, say=print)
    waited = time.monotonic() - started
    lock.release()
    other.wait()
    assert 0.5 < waited < 20
    assert f"is in use by another run (host {socket.gethostname()}, pid {other.pid}" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"waited 0\.5 s, --lock_wait_s"):
        keeper = holder(tmp_path)
        try:
            FolderLock(tmp_path, "--log_dir").acquire(0.5)
        finally:
            keeper.kill()
            keeper.wait()


def test_a_refused_run_leaves_no_folder_its_locks_created(tmp_path):
    other = holder(tmp_path / "shared")
    args = build_parser().parse_args(["pretrain", "--log_dir", str(tmp_path / "new" / "run"), "--checkpoint_dir",
                                      str(tmp_path / "shared"), "--lock_wait_s", "0"])
    try:
        with pytest.raises(UserError, match="--checkpoint_dir .* is in use by another run"):
            lock_run_folders(run_config_from_flags("pretrain", args))
        assert not (tmp_path / "new").exists()  # the run folder's lock, taken first, was given back with it
    finally:
        other.kill()
        other.wait()


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (Lustre without -o flock, some NFS mounts): flock fails with ENOLCK."""
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_flock_a_live_holder_refuses_and_a_dead_or_silent_one_is_taken_over(tmp_path, no_flock):
    heartbeat = tmp_path / locks.HEARTBEAT_FILE
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        heartbeat.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "then"}))
        with pytest.raises(UserError, match=rf"pid {live.pid}, started then"):
            FolderLock(tmp_path, "--log_dir").acquire(0)
        fault("a second run, file system without flock: live holder")
        old = time.time() - locks.STALE_AFTER_S - 10  # ...but no heartbeat for longer than the timeout
        os.utime(heartbeat, (old, old))
        heartbeat.write_text(json.dumps({"host": "another-host", "pid": live.pid, "started": "then"}))
        os.utime(heartbeat, (old, old))
        lock = FolderLock(tmp_path, "--log_dir").acquire(0)
        assert json.loads(heartbeat.read_text())["pid"] == os.getpid()
        lock.release()
        assert not heartbeat.exists()
        fault("file system without flock: a holder on another host whose heartbeat stopped")
    finally:
        live.kill()
        live.wait()
    heartbeat.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "then"}))  # dead now
    FolderLock(tmp_path, "--log_dir").acquire(0).release()
    fault("file system without flock: a holder killed on this host")
