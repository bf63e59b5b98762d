"""The step path as a GPU would run it, checked on CPU where the CPU cannot see the problem directly:
- a skipped optimizer step (a non-finite loss on some rank) leaves the weights and the optimizer state
  bit-identical under every ZeRO stage, fp32 and bf16, 32-bit and 8-bit AdamW, and the next steps equal a
  run that never saw the bad batch;
- gptds synchronises with the device once per optimizer step outside logging and evaluation intervals
  (a spy counts .item(), .tolist(), bool(tensor), ... called from gptds code);
- every collective gptds starts goes through gptds/dist.py, which puts its tensors on the rank's device
  (NCCL refuses CPU tensors; gloo accepts them, so a spy stands in for NCCL here);
- batches are prefetched without breaking exact resume."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN

from gptds import dist, engine
from gptds.__main__ import build_parser
from gptds.config import run_config_from_flags
from gptds.data.loaders import DeviceBatches, build_loader
from gptds.model import GPT, GPTConfig

CONFIGS = {
    "z0-fp32": {"zero_optimization": {"stage": 0}},
    "z1-fp32": {"zero_optimization": {"stage": 1}},
    "z2-fp32": {"zero_optimization": {"stage": 2}},
    "z3-fp32": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
    "z0-bf16": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}},
    "z1-bf16": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
    "z2-bf16": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
    "z3-bf16": {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}},
}
G = 2  # micro-batches per optimizer step


def _engine(config: dict, optimizer: str):
    dist.init_distributed()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=16))
    ds = engine.complete_ds_config(Path("test.json"), config, {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": G, "train_batch_size": 2 * G,
        "gradient_clipping": 1.0}, untested_optimizer=optimizer == "adamw8bit")
    return engine.initialize(model, engine.build_optimizer(model, optimizer, 1e-2, 0.1, ds), ds)


def _step(eng, batches, poison: bool = False, skip: bool = False):
    for i, (x, y) in enumerate(batches):
        _, loss = eng(x, y)
        if poison and i == 1:  # a batch the caller flags as bad; finite, so DeepSpeed's own overflow
            loss = loss * 1000.0  # checks (which skip NaN gradients in some configs) cannot be what skips it
        eng.backward(loss)
        if i < len(batches) - 1:
            eng.step()
    engine.optimizer_step(eng, skip=skip)


def _snapshot(eng) -> list[torch.Tensor]:
    """Every parameter (the full one under ZeRO-3) and every optimizer-state tensor, copied."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(eng.module.parameters()), enabled=eng.zero_optimization_stage() == 3):
        params = [p.detach().clone() for p in eng.module.parameters()]
    return params + [t.detach().clone() for t in engine.optimizer_state_tensors(eng)]


CASES = [(name, "adamw") for name in CONFIGS] + [("z2-bf16", "adamw8bit"), ("z3-fp32", "adamw8bit")]


@pytest.mark.slow
@pytest.mark.parametrize("name,optimizer", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(name, optimizer):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g))
            for _ in range(4 * G)]
    steps = [data[i:i + G] for i in range(0, len(data), G)]
    skipping, reference = _engine(CONFIGS[name], optimizer), _engine(CONFIGS[name], optimizer)
    _step(skipping, steps[0])
    _step(reference, steps[0])
    before = _snapshot(skipping)
    _step(skipping, steps[1], poison=True, skip=True)  # the second micro-batch is bad
    after = _snapshot(skipping)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)), name
    for batches in steps[2:]:  # then training goes on as if the bad batches had never come
        _step(skipping, batches)
        _step(reference, batches)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(skipping), _snapshot(reference))), name


# ---------------------------------------------------------------- host synchronisations

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@pytest.mark.slow
def test_one_host_sync_per_optimizer_step(tmp_path, text_data, monkeypatch):
    """A real run through the loop (one rank, ZeRO-2, 2 micro-batches per step): calls that wait for the
    device, made by gptds code inside optimizer steps, are counted; logging, evaluation and checkpoints
    happen outside optimizer_step and are not counted (they run at intervals)."""
    from gptds import train as train_module
    counts, inside = {"syncs": 0, "steps": 0}, [False]

    def spy(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if inside[0] and caller.startswith("gptds"):
                counts["syncs"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for method in SYNCING:
        monkeypatch.setattr(torch.Tensor, method, spy(method))
    step = train_module.optimizer_step

    def counted_step(*args, **kwargs):
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False
            counts["steps"] += 1
    monkeypatch.setattr(train_module, "optimizer_step", counted_step)
    args = build_parser().parse_args(["pretrain", "--data_dir", str(text_data), "--log_dir", str(tmp_path),
                                      "--deepspeed_config", "zero2_fp32", "--max_steps", "6", "--grad_accum_steps",
                                      "2", *TINY_RUN])
    train_module.train(run_config_from_flags("pretrain", args))
    assert counts["steps"] == 6
    assert counts["syncs"] == counts["steps"], counts


# ---------------------------------------------------------------- collectives

def test_only_dist_py_calls_torch_distributed():
    """The rule that keeps every collective's tensors on the rank's device: gptds code outside dist.py
    never calls torch.distributed itself (DeepSpeed's own collectives are DeepSpeed's)."""
    offenders = []
    for path in sorted((ROOT / "gptds").rglob("*.py")):
        if path.name == "dist.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                names = ["torch.distributed"]
            if any(n.startswith("torch.distributed") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_dist_helpers_put_tensors_on_the_ranks_device(monkeypatch):
    """With the rank's device something other than the CPU (as on a GPU), a CPU tensor handed to
    dist.all_reduce_sum reaches the collective on that device: a spy stands in for NCCL and refuses
    any other device, as NCCL does."""
    import torch.distributed as torch_dist
    device = torch.device("meta")
    seen = []

    def nccl_like_all_reduce(t, op=None):
        if t.device != device:
            raise RuntimeError("No backend type associated with device type cpu")
        seen.append(t.device)
    monkeypatch.setattr(dist, "_info", dist.DistInfo(0, 0, 2, 2, device))
    monkeypatch.setattr(dist, "_distributed", lambda: True)
    monkeypatch.setattr(torch_dist, "all_reduce", nccl_like_all_reduce)
    out = dist.all_reduce_sum(torch.zeros(4))
    assert seen == [device] and out.device == device


# ---------------------------------------------------------------- prefetching

def test_prefetched_batches_resume_where_the_consumed_ones_end(text_data):
    """DeviceBatches reads one batch ahead; its state is the position after the last batch handed out,
    so a checkpoint taken with a batch waiting resumes with exactly that batch."""
    def batches():
        return DeviceBatches(build_loader(text_data, "train", 2, 32, 0, 1, seed=3), torch.device("cpu"))
    reference = batches()
    expected = [reference.next()[0] for _ in range(5)]
    first = batches()
    got = [first.next()[0] for _ in range(3)]
    first.prefetch()  # the fourth batch is waiting when the state is taken
    state = first.state_dict()
    second = batches()
    second.load_state_dict(state)
    got += [second.next()[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
