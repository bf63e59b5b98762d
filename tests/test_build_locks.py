"""A DeepSpeed op build killed half-way (its torch_extensions/<op>/lock left behind) must not hang later runs:
with gptds's guard (deepspeed_workarounds.bound_jit_build_locks, applied before every op gptds builds) a lock
records its builder's host and pid, a dead builder's lock is cleared and the build taken over, and any other
lock is waited on a bounded time, ending in a one-line error that names the file to delete."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from reliability_report import figures_fixture
from torch.utils.file_baton import FileBaton

from gptds import deepspeed_workarounds, engine
from gptds.errors import UserError

FIGURES = {"faults_injected": 0, "data_lost": 0, "faults": []}
report = figures_fixture("build_locks", FIGURES)


@pytest.fixture(autouse=True)
def guarded(monkeypatch):
    monkeypatch.setattr(FileBaton, "try_acquire", FileBaton.try_acquire)  # undone after the test
    monkeypatch.setattr(FileBaton, "wait", FileBaton.wait)
    monkeypatch.setattr(FileBaton, "gptds_bounded", False, raising=False)
    deepspeed_workarounds.bound_jit_build_locks()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_builders_lock_is_cleared_and_the_build_taken_over(tmp_path):
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "then"}))
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": "JIT build lock left by a killed build"})
    baton = FileBaton(str(lock))
    assert baton.try_acquire()  # this process builds now
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    baton.release()
    assert not lock.exists()


@pytest.mark.parametrize("holder", ["unknown", "live"])
def test_waiting_on_a_build_lock_is_bounded_and_names_the_file(tmp_path, monkeypatch, holder):
    monkeypatch.setattr(deepspeed_workarounds, "BUILD_LOCK_WAIT_S", 0.5)
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text("" if holder == "unknown" else
                        json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "then"}))
        baton = FileBaton(str(lock))
        assert not baton.try_acquire()
        started = time.monotonic()
        with pytest.raises(UserError, match=rf"waited 0\.5 s for the DeepSpeed op build lock {lock} .*delete that "
                                            r"file and run again"):
            baton.wait()
        assert time.monotonic() - started < 5
    finally:
        live.kill()
        live.wait()
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": f"JIT build lock of a {holder} builder"})


def test_a_builder_dying_while_waited_on_ends_the_wait_with_the_fix(tmp_path):
    lock = tmp_path / "async_io" / "lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "then"}))
    with pytest.raises(UserError, match=r"was killed .*its lock is cleared: run again"):
        FileBaton(str(lock)).wait()
    assert not lock.exists()


def test_every_op_gptds_builds_is_built_under_the_guard(monkeypatch):
    """The guard is applied where gptds can first build an op: building the optimizer (CPU Adam under offload)
    and initializing DeepSpeed (async_io for NVMe, the fused ops on GPUs)."""
    import inspect

    from gptds.model import GPT, GPTConfig
    calls = []
    monkeypatch.setattr(deepspeed_workarounds, "bound_jit_build_locks", lambda: calls.append(1))
    engine.build_optimizer(GPT(GPTConfig.from_preset("tiny")), "adamw", 1e-3, 0.1, {})
    assert calls == [1]
    source = inspect.getsource(engine.initialize)
    assert source.index("workarounds.bound_jit_build_locks()") < source.index("deepspeed.initialize(")
