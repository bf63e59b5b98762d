"""DeepSpeed training on 2 CPU ranks (gloo), through the real loop, for ZeRO 1, 2 and 3:
- with fp32 and 32-bit AdamW, the first 10 losses agree with each other and with a plain PyTorch loop;
- with AdamW8bit and 32-bit AdamW, activation checkpointing on and off, the loss falls on real text;
- stopping after N steps and resuming in NEW processes repeats the losses of 2N uninterrupted steps
  exactly (8-bit AdamW included, and CPU offload with DeepSpeedCPUAdam);
- the 8-bit optimizer state really is 8-bit; keep-last-N and auto-resume pick the right checkpoint;
- fine-tuning starts from the pretrained weights.
The matrix runs in two launches of `deepspeed --num_gpus 2` (tests/dist_runner.py): the first runs and
checkpoints, the second resumes."""

import json
import math

import pytest
import torch
from conftest import fp32_config, launch, losses

from gptds import checkpoint, engine
from gptds.config import resolve_ds_config_path
from gptds.data.loaders import build_loader
from gptds.model import GPT, GPTConfig
from gptds.train import lr_at

pytestmark = pytest.mark.slow
STEPS = 10          # uninterrupted run
HALF = STEPS // 2   # stop here, resume in new processes
COMMON = ["--model", "tiny", "-B", "4", "-T", "32", "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "2",
          "--lr_decay_steps", str(STEPS), "--eval_interval", "0", "--generate_interval", "0",
          "--hellaswag_interval", "0", "--log_interval", "1", "--checkpoint_interval", "0", "--seed", "7"]
MATRIX = [(stage, opt, ac) for stage in (1, 2, 3) for opt in ("adamw8bit", "adamw") for ac in (False, True)]
OFFLOAD = ["zero2_offload", "zero3_offload"]
BF16_STEPS = 4
COMPILED_STEPS = 5


def key(stage, opt, ac):
    return f"z{stage}-{opt}-{'ac' if ac else 'noac'}"


CHAT_STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_data, dolly_data, chat_data, cpu_adam_op):
    tmp = tmp_path_factory.mktemp("training")
    configs = {stage: fp32_config(tmp, f"zero{stage}") for stage in (1, 2, 3)}
    configs.update({name: fp32_config(tmp, name) for name in OFFLOAD})
    first, second = [], []

    def scenario(name, config, extra, log_dir=None, steps=STEPS):
        return {"name": name, "argv": ["pretrain", "--data_dir", str(text_data), "--deepspeed_config", config,
                                       "--log_dir", str(log_dir or tmp / name), "--max_steps", str(steps),
                                       *COMMON, *extra]}

    for stage, opt, ac in MATRIX:
        flags = ["--optimizer", opt] + (["--activation_checkpointing"] if ac else [])
        first.append(scenario(key(stage, opt, ac), configs[stage], flags))
        if not ac:  # stop at HALF, then resume in the second launch (the lr schedule is fixed by --lr_decay_steps)
            first.append(scenario(key(stage, opt, ac) + "-half", configs[stage], flags,
                                  log_dir=tmp / (key(stage, opt, ac) + "-resumed"), steps=HALF))
            second.append(scenario(key(stage, opt, ac) + "-resumed", configs[stage], flags + ["--auto_resume"]))
    for name in OFFLOAD:
        flags = ["--optimizer", "adamw"]
        first.append(scenario(name, configs[name], flags))
        first.append(scenario(name + "-half", configs[name], flags, log_dir=tmp / f"{name}-resumed", steps=HALF))
        second.append(scenario(name + "-resumed", configs[name], flags + ["--auto_resume"]))
    # bf16 with the default 8-bit AdamW, as on GPUs (this CPU has no bf16 units: short and small)
    for stage in (1, 2, 3):
        config = str(resolve_ds_config_path(f"zero{stage}"))
        flags = ["--optimizer", "adamw8bit", "-T", "16", "-B", "1"]
        name = f"bf16-z{stage}"
        first.append(scenario(name, config, flags, steps=BF16_STEPS))
        first.append(scenario(name + "-half", config, flags, log_dir=tmp / f"{name}-resumed", steps=BF16_STEPS // 2))
        second.append(scenario(name + "-resumed", config, flags + ["--auto_resume"], steps=BF16_STEPS))
    # torch.compile'd blocks (what CUDA runs by default) against the eager run of the same settings
    first.append(scenario("z2-adamw-compiled", configs[2], ["--optimizer", "adamw", "--compile"], steps=COMPILED_STEPS))
    first.append(scenario("z1-adamw-compiled-ac", configs[1], ["--optimizer", "adamw", "--compile",
                                                                "--activation_checkpointing"], steps=COMPILED_STEPS))
    # a checkpoint from before vocabulary padding (pad 1) resumes without the flag, keeping its own padding
    pad1 = ["--optimizer", "adamw", "--checkpoint_interval", "2"]
    first.append(scenario("pad1", configs[2], pad1 + ["--pad_vocab_to_multiple_of", "1"], steps=2))
    second.append(scenario("pad1", configs[2], pad1 + ["--auto_resume"], steps=4))
    # keep-last-N: saves at 2, 4, 6, 8, keeps 6 and 8; later a partial step_10 must be ignored by auto-resume
    keep = ["--checkpoint_interval", "2", "--keep_last_n_checkpoints", "2"]
    first.append(scenario("keep-last-2", configs[2], keep, steps=8))
    second.append(scenario("keep-last-2", configs[2], keep + ["--auto_resume"], steps=10))
    # fine-tuning from the 32-bit ZeRO-2 run's checkpoint, on the bundled Dolly records
    first.append({"name": "finetune", "argv": [
        "finetune", "--data_dir", str(dolly_data), "--deepspeed_config", configs[2], "--log_dir", str(tmp / "ft"),
        "--pretrained_checkpoint", str(tmp / key(2, "adamw", False) / "checkpoints"), "--max_steps", "4",
        "-B", "2", "-T", "128", "--eval_interval", "2", "--eval_batches", "2", "--generate_interval", "0",
        "--log_interval", "1"]})
    # fine-tuning on conversations from the GPT-2-vocabulary checkpoint (the ChatML rows are added), every stage
    for stage in (1, 2, 3):
        first.append({"name": f"chat-z{stage}", "argv": [
            "finetune", "--data_dir", str(chat_data), "--deepspeed_config", configs[stage], "--log_dir",
            str(tmp / f"chat-z{stage}"), "--pretrained_checkpoint", str(tmp / key(2, "adamw", False) / "checkpoints"),
            "--max_steps", str(CHAT_STEPS), "-B", "4", "-T", "128", "--lr", "3e-3", "--warmup_steps", "1",
            "--optimizer", "adamw", "--eval_interval", "0", "--generate_interval", "0", "--log_interval", "1"]})
    # a mixture (conversations, instruction records, text) stopped half-way and resumed in new processes
    mixture = ["--data_dir", f"{chat_data}:0.6", f"{dolly_data}:0.3", f"{text_data}:0.1", "-T", "128",
               "--eval_interval", "2", "--eval_batches", "1"]
    first.append(scenario("mixture", configs[2], mixture, steps=6))
    first.append(scenario("mixture-half", configs[2], mixture, log_dir=tmp / "mixture-resumed", steps=3))
    second.append(scenario("mixture-resumed", configs[2], mixture + ["--auto_resume"], steps=6))
    results = launch(first, tmp, "first", allow_errors=True)
    checkpoints_after_first = sorted(p.name for p in (tmp / "keep-last-2" / "checkpoints").glob("step_*"))
    partial = tmp / "keep-last-2" / "checkpoints" / "step_00000010"  # as a save killed half-way leaves it
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    resumed = launch(second, tmp, "second", allow_errors=True)
    return {"first": results, "second": resumed, "tmp": tmp, "keep_after_first": checkpoints_after_first}


def result(runs, phase, name):
    r = runs[phase][name]
    assert "error" not in r, f"{name}: {r.get('traceback', r)}"
    return r


def plain_pytorch_losses(data_dir, steps: int) -> list[float]:
    """The reference: one process, no DeepSpeed, the same seed, batches of both ranks, optimizer and schedule."""
    torch.manual_seed(7)
    model = GPT(GPTConfig.from_preset("tiny", pad_vocab_to_multiple_of=64))  # a new run's default padding
    loaders = [build_loader(data_dir, "train", 4, 32, rank, 2, seed=7) for rank in (0, 1)]
    opt = torch.optim.AdamW(engine.parameter_groups(model, 0.1), lr=1e-2, betas=engine.ADAM_BETAS, eps=engine.ADAM_EPS)
    out = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-2, 1e-3, 2, STEPS)
        opt.zero_grad()
        step_losses = []
        for loader in loaders:  # data parallel: the gradient is the mean over ranks
            x, y = loader.next_batch()
            _, loss = model(x, y)
            (loss / len(loaders)).backward()
            step_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out.append(sum(step_losses) / len(step_losses))
    return out


def test_fp32_adamw_losses_equal_plain_pytorch_under_every_stage(runs, text_data):
    reference = plain_pytorch_losses(text_data, STEPS)
    for stage in (1, 2, 3):
        got = losses(result(runs, "first", key(stage, "adamw", False)))[:STEPS]
        for step, (a, b) in enumerate(zip(got, reference)):
            assert a == pytest.approx(b, rel=1e-4), f"ZeRO-{stage} step {step}: {a} vs plain PyTorch {b}"


@pytest.mark.parametrize("stage,opt,ac", MATRIX, ids=[key(*m) for m in MATRIX])
def test_loss_falls_on_real_text(runs, stage, opt, ac):
    got = losses(result(runs, "first", key(stage, opt, ac)))
    assert len(got) == STEPS and all(math.isfinite(v) for v in got)
    first, last = sum(got[:3]) / 3, sum(got[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall: {got}"


@pytest.mark.parametrize("stage,opt", [(s, o) for s in (1, 2, 3) for o in ("adamw8bit", "adamw")])
def test_activation_checkpointing_does_not_change_the_losses(runs, stage, opt):
    plain = losses(result(runs, "first", key(stage, opt, False)))
    recomputed = losses(result(runs, "first", key(stage, opt, True)))
    assert recomputed == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("name", [key(s, o, False) for s in (1, 2, 3) for o in ("adamw8bit", "adamw")] + OFFLOAD)
def test_resume_in_new_processes_repeats_the_uninterrupted_losses_exactly(runs, name):
    uninterrupted = losses(result(runs, "first", name))
    half = result(runs, "first", name + "-half")
    resumed = result(runs, "second", name + "-resumed")
    assert half["step"] == HALF and resumed["step"] == STEPS
    assert sorted(map(int, resumed["losses"])) == list(range(HALF, STEPS))  # continued, not restarted
    assert losses(half) + losses(resumed) == uninterrupted  # bit-for-bit


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_8bit_adamw_trains_and_resumes_exactly(runs, stage):
    name = f"bf16-z{stage}"
    uninterrupted = losses(result(runs, "first", name))
    assert len(uninterrupted) == BF16_STEPS and all(math.isfinite(v) for v in uninterrupted)
    resumed = result(runs, "second", name + "-resumed")
    assert losses(result(runs, "first", name + "-half")) + losses(resumed) == uninterrupted


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_8bit_optimizer_state_is_8bit(runs, stage):
    eight = result(runs, "first", key(stage, "adamw8bit", False))["optimizer_state_bytes_per_param"]
    full = result(runs, "first", key(stage, "adamw", False))["optimizer_state_bytes_per_param"]
    assert full == pytest.approx(8.0, rel=0.01)  # two fp32 moments
    assert eight < 2.2  # two uint8 moments, plus fp32 block scales and the small no-decay group


def test_keep_last_n_and_auto_resume_pick_the_right_checkpoint(runs):
    assert runs["keep_after_first"] == ["step_00000006", "step_00000008"]
    resumed = result(runs, "second", "keep-last-2")
    assert sorted(map(int, resumed["losses"])) == [8, 9]  # from step 8, not the partial step 10
    folder = runs["tmp"] / "keep-last-2" / "checkpoints"
    assert [p.name for p in checkpoint.complete_checkpoints(folder)] == ["step_00000008", "step_00000010"]
    assert checkpoint.read_meta(folder / "step_00000010")["step"] == 10


def test_finetune_starts_from_the_pretrained_weights(runs):
    ft = result(runs, "first", "finetune")
    pretrained_last = losses(result(runs, "first", key(2, "adamw", False)))[-1]
    assert ft["step"] == 4 and ft["val_loss"] is not None
    assert losses(ft)[0] < 10.0 < math.log(50257)  # random weights would start near ln(50257) = 10.8
    assert pretrained_last < 10.0


@pytest.mark.parametrize("compiled,eager", [("z2-adamw-compiled", key(2, "adamw", False)),
                                            ("z1-adamw-compiled-ac", key(1, "adamw", True))])
def test_compiled_blocks_give_the_eager_losses(runs, compiled, eager):
    got = losses(result(runs, "first", compiled))
    assert len(got) == COMPILED_STEPS
    assert got == pytest.approx(losses(result(runs, "first", eager))[:COMPILED_STEPS], rel=1e-4)


def test_new_runs_pad_the_vocabulary_and_old_unpadded_checkpoints_still_resume(runs):
    from gptds.weights import load_model
    new = checkpoint.read_meta(checkpoint.find_latest(runs["tmp"] / "keep-last-2" / "checkpoints"))
    assert new["model_config"]["pad_vocab_to_multiple_of"] == 64
    resumed = result(runs, "second", "pad1")
    assert resumed["step"] == 4 and sorted(map(int, resumed["losses"])) == [2, 3]
    old = checkpoint.read_meta(checkpoint.find_latest(runs["tmp"] / "pad1" / "checkpoints"))
    assert old["step"] == 4 and old["model_config"]["pad_vocab_to_multiple_of"] == 1
    for folder in ("keep-last-2", "pad1"):  # padding rows are storage only: every model gives 50257 logits
        model = load_model(runs["tmp"] / folder / "checkpoints")
        assert model(torch.zeros(1, 3, dtype=torch.long))[0].shape == (1, 3, 50257)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_finetuning_on_conversations_learns_the_assistant_turns(runs, stage):
    got = losses(result(runs, "first", f"chat-z{stage}"))
    assert len(got) == CHAT_STEPS and all(math.isfinite(v) for v in got)
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.25, got
    meta = checkpoint.read_meta(checkpoint.find_latest(runs["tmp"] / f"chat-z{stage}" / "checkpoints"))
    assert meta["model_config"]["vocab_size"] == 50259 and meta["chat_format"] == "chatml"


def test_a_mixture_logs_each_component_and_resumes_exactly(runs):
    uninterrupted = losses(result(runs, "first", "mixture"))
    half, resumed = result(runs, "first", "mixture-half"), result(runs, "second", "mixture-resumed")
    assert losses(half) + losses(resumed) == uninterrupted  # bit for bit
    records = [json.loads(line) for line in (runs["tmp"] / "mixture" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    components = {"chat", "dolly", "text"}
    assert {f"loss/{c}" for c in components} <= logged and {f"val_loss/{c}" for c in components} <= logged

