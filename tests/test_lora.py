"""LoRA fine-tuning (peft) on the shared loop: on conversations from a GPT-2-vocabulary checkpoint (the ChatML
rows train, tied, with the adapters) under ZeRO 1, 2 and 3 and with both optimizers, the loss falls; only
adapters and the new rows change (the export's other tensors are the base's, bit for bit); the checkpoint
holds the adapters, not the base; exact resume; merged export logits equal the live adapters'; the PEFT
adapter folder loads onto the base's Hugging Face export and computes what gptds computes; QLoRA's 4-bit
base on CPU; bad settings refused with the valid values."""

import math

import pytest
import torch
from conftest import TINY_RUN, fp32_config, launch, losses

from gptds import checkpoint, engine
from gptds.__main__ import main
from gptds.convert import ZeroToHfConfig, zero_to_hf
from gptds.lora import apply
from gptds.weights import load_checkpoint_weights, load_model, load_weights, model_from_state_dict

STEPS, HALF = 6, 3
LORA = ["--lora_rank", "4", "--lr", "1e-2", "--warmup_steps", "1", "--lr_decay_steps", str(STEPS), "-T", "64",
        "--checkpoint_interval", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint, chat_data):
    tmp = tmp_path_factory.mktemp("lora")
    configs = {stage: fp32_config(tmp, f"zero{stage}") for stage in (1, 2, 3)}

    def finetune(name, stage, *extra, log_dir=None, steps=STEPS):
        return {"name": name, "argv": ["finetune", "--data_dir", str(chat_data), "--pretrained_checkpoint",
                                       str(tiny_checkpoint), "--deepspeed_config", configs[stage], "--log_dir",
                                       str(log_dir or tmp / name), *TINY_RUN, "--max_steps", str(steps), *LORA,
                                       *extra]}
    first = [finetune(f"z{stage}", stage, "--optimizer", "adamw") for stage in (1, 2, 3)]
    first += [finetune("z2-8bit", 2, "--optimizer", "adamw8bit"),
              finetune("z2-half", 2, "--optimizer", "adamw", log_dir=tmp / "z2-resumed", steps=HALF),
              finetune("full", 2, "--optimizer", "adamw", "--lora_rank", "0")]
    second = [finetune("z2-resumed", 2, "--optimizer", "adamw", "--auto_resume")]
    return {"tmp": tmp, "base": tiny_checkpoint, "first": launch(first, tmp, "first"),
            "second": launch(second, tmp, "second")}


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["z1", "z2", "z3", "z2-8bit"])
def test_lora_loss_falls_under_every_stage_and_optimizer(runs, name):
    got = losses(runs["first"][name])
    assert len(got) == STEPS and all(math.isfinite(v) for v in got)
    assert sum(got[-2:]) / 2 < sum(got[:2]) / 2 - 0.05, got
    meta = checkpoint.read_meta(checkpoint.find_latest(runs["tmp"] / name / "checkpoints"))
    assert meta["lora"]["rank"] == 4 and meta["lora"]["new_token_ids"] == [50257, 50258]


def test_only_adapters_and_the_new_rows_change(runs):
    _, base = load_weights(runs["base"])
    config, merged = load_checkpoint_weights(runs["tmp"] / "z2" / "checkpoints")
    adapted = {f"transformer.h.{i}.{part}.weight" for i in range(config.n_layer)
               for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    for name, tensor in merged.items():
        if name == "transformer.wte.weight":
            assert torch.equal(tensor[:50257], base[name][:50257])  # GPT-2's rows: the base's, bit for bit
            assert not torch.equal(tensor[50257:50259], base[name][:2])  # the ChatML rows trained
        elif name in adapted:
            assert not torch.equal(tensor, base[name]), name
        else:
            assert torch.equal(tensor, base[name]), name


def test_checkpoints_hold_the_adapters_not_the_base(runs):
    def size(name):
        step = checkpoint.find_latest(runs["tmp"] / name / "checkpoints")
        return sum(f.stat().st_size for f in step.iterdir())
    assert size("z2") * 20 < size("full")  # tiny model: ~0.2 MB of adapters and state against ~53 MB


def test_lora_resumes_exactly(runs):
    assert losses(runs["first"]["z2-half"]) + losses(runs["second"]["z2-resumed"]) == losses(runs["first"]["z2"])


def test_merged_export_equals_the_live_adapters(runs):
    step = checkpoint.find_latest(runs["tmp"] / "z2" / "checkpoints")
    meta = checkpoint.read_meta(step)
    base_config, base = load_weights(runs["base"])
    live = model_from_state_dict(load_checkpoint_weights(step)[0], base, base_config.vocab_size)
    record = meta["lora"]
    apply(live, record["rank"], record["alpha"], record["dropout"], record["targets"], record["new_token_ids"])
    adapters = {k: v.contiguous() for k, v in engine.lazy_zero_state_dict(step).items()}
    missing, unexpected = live.load_state_dict(adapters, strict=False)
    assert not unexpected and all("lora_" not in k and "delta" not in k for k in missing)
    merged = load_model(step)
    x = torch.randint(0, 50259, (2, 40))
    with torch.no_grad():
        assert torch.allclose(live.eval()(x)[0], merged.eval()(x)[0], atol=1e-5)


def test_peft_adapter_folder_loads_onto_the_hugging_face_base(runs, tmp_path):
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    assert main(["convert", "zero-to-hf", str(runs["tmp"] / "z2" / "checkpoints"), str(tmp_path / "adapters"),
                 "--lora_export", "adapters"]) == 0
    assert main(["convert", "zero-to-hf", str(runs["base"]), str(tmp_path / "base")]) == 0
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(50259)  # the chat tokens the fine-tuning added (README: LoRA)
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
    ours = load_model(runs["tmp"] / "z2" / "checkpoints").eval()
    x = torch.randint(0, 50259, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x)[0], atol=1e-5)
    zero_to_hf(ZeroToHfConfig(str(runs["tmp"] / "z2" / "checkpoints"), str(tmp_path / "merged")))
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, ours(x)[0], atol=1e-5)


def test_qlora_trains_on_a_4bit_base_on_cpu_and_is_refused_under_zero3(tmp_path, tiny_checkpoint, chat_data, capsys):
    def argv(log_dir, config):
        return ["finetune", "--data_dir", str(chat_data), "--pretrained_checkpoint", str(tiny_checkpoint),
                "--log_dir", str(log_dir), "--deepspeed_config", config, *TINY_RUN, "--max_steps", "3",
                "--optimizer", "adamw", *LORA, "--lora_base_bits", "4"]
    assert main(argv(tmp_path / "z2", "zero2_fp32")) == 0
    meta = checkpoint.read_meta(checkpoint.find_latest(tmp_path / "z2" / "checkpoints"))
    assert meta["lora"]["base_bits"] == 4
    records = (tmp_path / "z2" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in records if '"loss"' in r]) == 3 and "nan" not in "".join(records)
    zero3 = tmp_path / "z3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    capsys.readouterr()
    assert main(argv(tmp_path / "z3", str(zero3))) == 2
    assert "--lora_base_bits 4 does not work under ZeRO-3" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "-2"], r"--lora_rank \(lora.lora_rank\) = -2 is not allowed"),
    (["--lora_rank", "4", "--lora_targets", "c_attn,q_proj"], r"--lora_targets q_proj: no such layer; valid: c_attn, "
                                                              r"c_proj, c_fc"),
    (["--lora_rank", "4"], r"--lora_rank trains adapters on a frozen base: give the base with --pretrained_checkpoint"),
    (["--lora_base_bits", "8", "--lora_rank", "4"], r"--lora_base_bits \(lora.lora_base_bits\) = 8 is not allowed"),
])
def test_bad_lora_settings_are_refused(tmp_path, capsys, flags, message):
    import re
    assert main(["finetune", "--log_dir", str(tmp_path), "--model", "tiny", "-T", "64", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_lora_checkpoint_resumes_only_as_lora_on_its_base(tmp_path):
    from gptds.errors import UserError
    from gptds.session import check_same_lora
    record = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["c_attn"], "base_bits": None, "new_token_ids": [],
              "base": {"path": "/base", "sha256": "aa"}}
    check_same_lora({}, tmp_path, None)  # neither is LoRA
    check_same_lora({"lora": record}, tmp_path, record)
    with pytest.raises(UserError, match="holds LoRA adapters .rank 4 on c_attn., not a whole model"):
        check_same_lora({"lora": record}, tmp_path, None)
    with pytest.raises(UserError, match=r"other LoRA settings \(rank, alpha"):
        check_same_lora({}, tmp_path, record)
    with pytest.raises(UserError, match="another checksum"):
        check_same_lora({"lora": record}, tmp_path, {**record, "base": {"path": "/b2", "sha256": "bb"}})
