"""`gptds convert` on real 2-rank ZeRO checkpoints: ZeRO-3 and ZeRO-1 checkpoints exported to Hugging
Face give transformers logits equal to gptds's; HF -> gptds -> HF is bit-identical; consolidated
safetensors (sharded) load back exactly; universal checkpoints resume a 2-rank ZeRO-2 run on 1 rank and a
ZeRO-1 run under ZeRO-3 with the loss it had; bad input is one line and leaves nothing half-written."""

import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import fp32_config, launch, losses

from gptds import checkpoint
from gptds.__main__ import main
from gptds.convert import (
    HfToGptdsConfig,
    ZeroToFp32Config,
    ZeroToHfConfig,
    ZeroToUniversalConfig,
    hf_to_gptds,
    zero_to_fp32,
    zero_to_hf,
    zero_to_universal,
)
from gptds.tokenizer import encode
from gptds.weights import load_checkpoint_weights, load_gptds_weights, load_model, model_from_state_dict

pytestmark = pytest.mark.slow  # launches ranks or trains
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--model", "tiny", "-T", "32", "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "1",
         "--lr_decay_steps", "6", "--max_steps", "6", "--eval_interval", "0", "--generate_interval", "0",
         "--hellaswag_interval", "0", "--checkpoint_interval", "3", "--keep_last_n_checkpoints", "-1",
         "--log_interval", "1", "--seed", "3"]
# Tolerance for losses after a universal resume: the weights and Adam moments are carried exactly, but a
# different world size or stage sums gradients in another order (float rounding, ~1e-7 relative). A resume
# that dropped the optimizer state misses by ~1e-2 here (Adam's first step after a reset is ~lr * sign(g)).
UNIVERSAL_RTOL = 1e-4


def fp32(tmp: Path, name: str) -> str:
    return fp32_config(tmp, name, stage3_param_persistence_threshold=0)  # partition every tensor


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, text_data):
    tmp = tmp_path_factory.mktemp("convert")

    def pretrain(name, config, extra):
        return {"name": name, "argv": ["pretrain", "--data_dir", str(text_data), "--deepspeed_config", config,
                                       "--log_dir", str(tmp / name), *TRAIN, *extra]}

    runs = launch([pretrain("z3", fp32(tmp, "zero3"), ["-B", "2"]),
                   pretrain("z1", fp32(tmp, "zero1"), ["-B", "2", "--optimizer", "adamw"]),
                   pretrain("z2", fp32(tmp, "zero2"), ["-B", "2", "--optimizer", "adamw"]),
                   pretrain("z3-adamw", fp32(tmp, "zero3"), ["-B", "2", "--optimizer", "adamw"]),
                   pretrain("z1-8bit", fp32(tmp, "zero1"), ["-B", "2", "--max_steps", "3"])], tmp, "train", 2)
    for name in ("z1", "z2", "z3-adamw"):
        zero_to_universal(ZeroToUniversalConfig(str(tmp / name / "checkpoints"), str(tmp / f"{name}-universal"),
                                                tag="step_00000003"))
    # 2-rank runs (micro batch 2) resumed on 1 rank (micro batch 4: the same global batch)
    on_one = launch([pretrain("z2-on-1-rank", fp32(tmp, "zero2"), [
        "-B", "4", "--optimizer", "adamw", "--resume", "--checkpoint_path", str(tmp / "z2-universal")]),
        pretrain("z3-on-1-rank-zero1", fp32(tmp, "zero1"), [
            "-B", "4", "--optimizer", "adamw", "--resume", "--checkpoint_path", str(tmp / "z3-adamw-universal")])],
        tmp, "one", 1)
    z1_under_z3 = launch([pretrain("z1-under-z3", fp32(tmp, "zero3"), [
        "-B", "2", "--optimizer", "adamw", "--resume", "--checkpoint_path", str(tmp / "z1-universal")])],
        tmp, "z3", 2)
    return {"tmp": tmp, "runs": runs, **on_one, **z1_under_z3}


@pytest.mark.parametrize("name", ["z3", "z1"])
def test_zero_to_hf_logits_match_gptds(ckpts, name):
    out = ckpts["tmp"] / f"{name}-hf"
    zero_to_hf(ZeroToHfConfig(str(ckpts["tmp"] / name / "checkpoints"), str(out)))
    ours = load_model(ckpts["tmp"] / name / "checkpoints").eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.tensor([encode("ROMEO:\nBut, soft! what light through yonder window breaks?")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], rtol=0, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("ROMEO:\nBut, soft!", "It's 3.14 -- caf\u00e9 \U0001f600\n\n  x"):
        assert tokenizer.encode(text) == encode(text)
    card = (out / "README.md").read_text()
    assert "6 optimizer steps" in card and "tinyshakespeare" in card and "validation loss" in card


def test_a_zero3_export_has_every_parameter(ckpts):
    config, sd = load_checkpoint_weights(ckpts["tmp"] / "z3" / "checkpoints")
    padding = (config.padded_vocab_size - config.vocab_size) * config.n_embd  # new models store 50304 rows (#17)
    assert padding == 47 * 64
    count = model_from_state_dict(config, sd).num_parameters()
    assert sum(v.numel() for v in sd.values()) == 3_324_736 + padding == count
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in sd.values())


def test_hf_to_gptds_to_hf_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=2, n_head=2))
    model.save_pretrained(tmp_path / "hf")
    hf_to_gptds(HfToGptdsConfig(str(tmp_path / "hf"), str(tmp_path / "w.safetensors")))
    config, sd = load_gptds_weights(tmp_path / "w.safetensors")
    from gptds.weights import read_safetensors, save_hf_directory
    save_hf_directory(config, sd.items(), tmp_path / "back")
    _, original = read_safetensors([tmp_path / "hf" / "model.safetensors"])
    _, round_trip = read_safetensors([tmp_path / "back" / "model.safetensors"])
    original.pop("lm_head.weight", None)
    assert original.keys() == round_trip.keys()
    for k in original:
        assert torch.equal(original[k], round_trip[k]), k
    assert main(["generate", "--checkpoint", str(tmp_path / "w.safetensors"), "--prompt", "Hi",
                 "--max_new_tokens", "2"]) == 0  # usable wherever a checkpoint is


def test_zero_to_fp32_shards_stream_and_load_back(ckpts, capsys):
    out = ckpts["tmp"] / "z3-fp32"
    files = zero_to_fp32(ZeroToFp32Config(str(ckpts["tmp"] / "z3" / "checkpoints"), str(out), max_shard_mb=0.2))
    names = sorted(f.name for f in files)
    assert "model.safetensors.index.json" in names and len(names) >= 4  # 13.3 MB in 200 kB shards
    assert "estimated peak memory" in capsys.readouterr().out
    config, sd = load_gptds_weights(out)
    _, reference = load_checkpoint_weights(ckpts["tmp"] / "z3" / "checkpoints")
    assert all(torch.equal(sd[k], reference[k]) for k in reference)
    assert main(["convert", "zero-to-fp32", str(ckpts["tmp"] / "z3" / "checkpoints"), str(out / ".." / "z3-bf16"),
                 "--dtype", "bf16", "--tag", "step_00000003"]) == 0
    _, half = load_gptds_weights(ckpts["tmp"] / "z3-bf16")
    assert half["transformer.wte.weight"].dtype == torch.bfloat16


def test_universal_resume_on_one_rank_continues_the_loss(ckpts):
    before = losses(ckpts["runs"]["z2"])  # steps 0..5 uninterrupted on 2 ranks
    after = ckpts["z2-on-1-rank"]
    assert sorted(map(int, after["losses"])) == [3, 4, 5]
    assert losses(after) == pytest.approx(before[3:], rel=UNIVERSAL_RTOL)


def test_universal_resume_of_zero1_under_zero3_continues_the_loss(ckpts):
    before = losses(ckpts["runs"]["z1"])
    after = ckpts["z1-under-z3"]
    assert sorted(map(int, after["losses"])) == [3, 4, 5]
    assert losses(after) == pytest.approx(before[3:], rel=UNIVERSAL_RTOL)


def test_universal_resume_of_zero3_on_one_rank_under_zero1_continues_the_loss(ckpts):
    before = losses(ckpts["runs"]["z3-adamw"])
    after = ckpts["z3-on-1-rank-zero1"]
    assert sorted(map(int, after["losses"])) == [3, 4, 5]
    assert losses(after) == pytest.approx(before[3:], rel=UNIVERSAL_RTOL)


def test_universal_meta_records_checksums_and_optimizer_state(ckpts):
    step = ckpts["tmp"] / "z1-universal" / "step_00000003"
    meta = checkpoint.verify(step)
    assert meta["kind"] == "universal" and len(meta["param_sha256"]) == 2 + 2 * 12 + 2  # the tied head once
    assert (step / "zero" / "transformer.wte.weight" / "exp_avg.pt").is_file()


# ---------------------------------------------------------------- bad input

def fails(argv, capsys, *messages):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for m in messages:
        assert m in err, err


def no_leftovers(out: Path):
    assert not out.exists() and not list(out.parent.glob(f"{out.name}.partial-*"))


def test_not_a_checkpoint(tmp_path, capsys):
    fails(["convert", "zero-to-fp32", str(tmp_path), str(tmp_path / "out")], capsys, "no complete checkpoint")
    no_leftovers(tmp_path / "out")


def test_missing_and_truncated_rank_shards(ckpts, tmp_path, capsys):
    import shutil
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpts["tmp"] / "z3" / "checkpoints" / "step_00000006", broken / "step_00000006")
    shard = next((broken / "step_00000006").glob("zero_pp_rank_1_*"))
    shard.write_bytes(shard.read_bytes()[:1000])
    fails(["convert", "zero-to-hf", str(broken), str(tmp_path / "out")], capsys, shard.name, "truncated")
    shard.unlink()
    fails(["convert", "zero-to-hf", str(broken), str(tmp_path / "out"), "--tag", "step_00000006"], capsys,
          shard.name, "missing")
    no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("damaged", ["*optim_states.pt", "*model_states.pt"])
@pytest.mark.parametrize("command", ["zero-to-fp32", "zero-to-hf", "zero-to-universal"])
def test_a_damaged_shard_of_the_right_size_is_one_line(ckpts, tmp_path, capsys, command, damaged):
    """Sizes match meta.json, contents are garbage (bit rot, a copy gone wrong): the file's checksum in meta.json
    no longer matches, and gptds says which checkpoint and file, in one line, leaving nothing behind."""
    import shutil
    broken = tmp_path / "ckpt"
    source = ckpts["tmp"] / ("z1" if command == "zero-to-universal" else "z3") / "checkpoints"
    step = checkpoint.find_latest(source)
    shutil.copytree(step, broken / step.name)
    shard = next((broken / step.name).glob(damaged))
    shard.write_bytes(bytes(range(256)) * (shard.stat().st_size // 256) + b"\0" * (shard.stat().st_size % 256))
    assert main(["convert", command, str(broken), str(tmp_path / "out")]) == 2
    *progress, error = capsys.readouterr().err.strip().splitlines()  # DeepSpeed's reader draws a progress bar
    assert all(re.search(r"\[\d\d:\d\d", line) for line in progress) and "Traceback" not in error, progress
    assert error.startswith("gptds convert: error: ") and step.name in error, error
    assert f"file {shard.name} does not match its xxh3_128 checksum in meta.json" in error, error
    no_leftovers(tmp_path / "out")


def test_unknown_tag_and_existing_output(ckpts, tmp_path, capsys):
    src = str(ckpts["tmp"] / "z3" / "checkpoints")
    fails(["convert", "zero-to-fp32", src, str(tmp_path / "out"), "--tag", "step_00000099"], capsys,
          "no checkpoint tag 'step_00000099'", "step_00000003")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    fails(["convert", "zero-to-hf", src, str(tmp_path / "taken")], capsys, "exists and is not empty", "--overwrite")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_8bit_checkpoints_are_refused_for_universal_with_the_reason(ckpts, tmp_path, capsys):
    fails(["convert", "zero-to-universal", str(ckpts["tmp"] / "z1-8bit" / "checkpoints"), str(tmp_path / "u")],
          capsys, "--optimizer adamw8bit", "block-quantized")
    no_leftovers(tmp_path / "u")


def test_resuming_at_another_world_size_without_universal_is_refused(ckpts, capsys, text_data, tmp_path):
    fails(["pretrain", "--data_dir", str(text_data), "--deepspeed_config", fp32(tmp_path, "zero2"),
           "--log_dir", str(tmp_path / "r"), *TRAIN, "-B", "4", "--optimizer", "adamw", "--resume",
           "--checkpoint_path", str(ckpts["tmp"] / "z2" / "checkpoints")], capsys,
          "saved by 2 ranks under ZeRO-2", "gptds convert zero-to-universal")


def test_hf_to_gptds_needs_a_hf_folder(tmp_path, capsys):
    fails(["convert", "hf-to-gptds", str(tmp_path), str(tmp_path / "w.safetensors")], capsys, "no config.json")
