"""Ranks made explicit: who we are (rank, local_rank, world_size, device), read once from the launcher's
environment; printing from rank 0; and the collectives gptds uses, which are the only calls into
torch.distributed in gptds (DeepSpeed adopts the process group created here and runs its own).

Every tensor these helpers hand to a collective is on the rank's device (`info().device`): NCCL, the
backend on CUDA, refuses CPU tensors ("No backend type associated with device type cpu"), and gloo on a
CPU machine would hide the mistake, so the rule is kept here, in one place, and callers may pass tensors
from anywhere. GPTDS_DIST_BACKEND overrides the backend, e.g. "cuda:gloo" (two ranks on one GPU, a group
that, like NCCL, accepts CUDA tensors only: bench/gpu_check.sh uses it)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from gptds.errors import EveryRankError, UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_info: DistInfo | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group the launcher describes (`deepspeed`, torchrun or srun set RANK etc.);
    a plain `gptds ...` becomes a world of one. Idempotent."""
    global _info
    if _info is not None:
        return _info
    env = os.environ
    launched = "RANK" in env
    # Not launched: a world of one with its own rendezvous on loopback (no RANK/MASTER_* is set, so
    # processes this one starts do not inherit a rank; only LOCAL_RANK=0, below).
    init_method = "env://" if launched else f"tcp://127.0.0.1:{_free_port()}"
    rank, world_size = (int(env["RANK"]), int(env["WORLD_SIZE"])) if launched else (0, 1)
    if not launched:
        env.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it; harmless to children
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world_size = int(env.get("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())  # more ranks than GPUs: shared
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # Ranks on one host share its cores; oversubscribed BLAS threads make every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))
    backend = env.get("GPTDS_DIST_BACKEND") or backend
    if not torch_dist.is_initialized():
        # A rank that never arrives (a node missing) fails the rendezvous and later collectives after this
        # long, instead of gloo's default 30 minutes; it must exceed the longest wait on rank 0 (a save).
        torch_dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                      timeout=timedelta(minutes=10))
    _info = DistInfo(rank, local_rank, world_size, local_world_size, device)
    return _info


def joined() -> bool:
    """Whether this process has joined a process group (init_distributed ran)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def info() -> DistInfo:
    assert _info is not None, "init_distributed() first"
    return _info


def print0(*args, **kwargs) -> None:
    if _info is None or _info.is_main:
        print(*args, **kwargs, flush=True)


def _distributed() -> bool:
    return torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of t over ranks, on the rank's device (t itself when it already lives there)."""
    t = t.to(info().device) if _info is not None else t
    if _distributed():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every rank's obj (picklable), in rank order. torch moves the pickled bytes through the current
    device (set in init_distributed), as NCCL needs."""
    if not _distributed():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def on_main(fn):
    """fn() computed on rank 0 alone (a decision every rank must share: which checkpoint to resume, whether
    the run folder is free), its result handed to every rank. A UserError raised there is raised on every
    rank as EveryRankError, so the command line prints it once and every rank exits 2."""
    if not _distributed():
        return fn()
    outcome = [None]
    if info().is_main:
        try:
            outcome[0] = ("ok", fn())
        except UserError as e:
            outcome[0] = ("error", str(e))
        except BaseException as e:
            outcome[0] = ("bug", f"{type(e).__name__} on rank 0")
            torch_dist.broadcast_object_list(outcome, src=0)
            raise
    torch_dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise EveryRankError(value)
    if kind == "bug":
        raise RuntimeError(f"rank 0 failed ({value}): its traceback is above")
    return value


def agree_on_errors(message: str | None) -> None:
    """Every rank says whether its part of a collective piece of work failed (message, e.g. a checkpoint
    file it could not write) or not (None); if any did, every rank raises EveryRankError with the first
    failing rank's message. The failure is local, the decision shared: no rank is left waiting in a
    collective for one that gave up, and the error is printed once."""
    messages = [m for m in all_gather_object(message) if m is not None]
    if messages:
        raise EveryRankError(messages[0])


# What a collective raises on the surviving ranks when a peer exits (gloo on CPU, NCCL on GPUs).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing",
             "NCCL communicator was aborted", "Connection refused")


def peer_failed(e: BaseException) -> bool:
    """Whether e is a collective failing because another rank exited (it printed its own error): this rank
    then stops with one line instead of a traceback."""
    if not _distributed():
        return False
    return isinstance(e, torch_dist.DistBackendError) or (
        isinstance(e, RuntimeError) and any(text in str(e) for text in PEER_GONE))


def prints_shared_errors() -> bool:
    """Whether this process prints an error every rank raised alike (EveryRankError): rank 0, or a lone process."""
    return _info is None or _info.is_main
