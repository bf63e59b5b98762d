"""ds_configs/*.json: every file is accepted by DeepSpeed after the run fills in its values, and a config
that breaks the rule in gptds/config.py is refused before any work with a message saying what to change."""

import json
from pathlib import Path

import pytest

from gptds import engine
from gptds.__main__ import build_parser
from gptds.config import resolve_ds_config_path, run_config_from_flags
from gptds.errors import UserError
from gptds.session import load_ds_config

CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json"))


def load(path, micro_batch_size=4, grad_accum_steps=2, world_size=2, optimizer="adamw"):
    """The config a run of these settings would initialise DeepSpeed with (session.load_ds_config)."""
    args = build_parser().parse_args(["pretrain", "--deepspeed_config", str(path), "-B", str(micro_batch_size),
                                      "--grad_accum_steps", str(grad_accum_steps), "--optimizer", optimizer])
    run = run_config_from_flags("pretrain", args)
    return load_ds_config(run, run.batch(world_size))[1]


def write(tmp_path, config) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def test_the_documented_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero2_fp16", "zero2_fp32"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_accepted_and_filled_in(path):
    config = load(path)
    assert config["train_batch_size"] == 4 * 2 * 2
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0
    assert "optimizer" not in config and "scheduler" not in config
    raw = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert raw[key] == "auto", f"{path.name}: {key} is owned by the CLI and must be \"auto\""


def test_bf16_is_the_default_precision_and_fp16_uses_dynamic_loss_scaling():
    by_name = {p.stem: json.loads(p.read_text()) for p in CONFIGS}
    for name in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        assert engine.precision(by_name[name]) == "bf16", name
    assert engine.precision(by_name["zero2_fp16"]) == "fp16"
    assert by_name["zero2_fp16"]["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert engine.precision(by_name["zero2_fp32"]) == "fp32"
    assert engine.zero_stage(by_name["zero3_offload"]) == 3
    assert engine.offloads_optimizer(by_name["zero3_offload"])
    assert by_name["zero3_offload"]["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_a_precision_the_device_lacks_is_refused():
    from deepspeed.accelerator import get_accelerator
    path = resolve_ds_config_path("zero2_fp16")
    if get_accelerator().is_fp16_supported():
        engine.check_precision_supported(path, load(path))
    else:  # CPU: DeepSpeed cannot train in fp16 here
        with pytest.raises(UserError, match="enables fp16, which DeepSpeed does not support"):
            engine.check_precision_supported(path, load(path))
    engine.check_precision_supported(path, load(resolve_ds_config_path("zero2_fp32")))


def test_configs_resolve_by_name():
    assert resolve_ds_config_path("zero3").name == "zero3.json"
    assert resolve_ds_config_path("zero3.json").name == "zero3.json"
    with pytest.raises(UserError, match="zero4.*zero1"):
        resolve_ds_config_path("zero4")


def test_batch_arithmetic_that_does_not_add_up_is_refused(tmp_path):
    path = write(tmp_path, {"train_batch_size": 64, "zero_optimization": {"stage": 2}})
    with pytest.raises(UserError, match=r"train_batch_size = 64.*4 x grad accumulation 2 x world size 2 = 16"):
        load(path)
    assert load(path, micro_batch_size=16)["train_batch_size"] == 64  # 16 x 2 x 2


def test_a_conflicting_cli_owned_value_names_the_flag(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu = 8 conflicts with --micro_batch_size 4"):
        load(path)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_blocks_are_refused(tmp_path, block):
    with pytest.raises(UserError, match=f'remove the "{block}" block'):
        load(write(tmp_path, {block: {"type": "AdamW", "params": {}}}))


def test_8bit_adamw_with_optimizer_offload_is_refused():
    with pytest.raises(UserError, match="--optimizer adamw"):
        load(resolve_ds_config_path("zero2_offload"), optimizer="adamw8bit")


def test_8bit_adamw_sets_the_untested_optimizer_switch():
    assert load(resolve_ds_config_path("zero2"), optimizer="adamw8bit")["zero_allow_untested_optimizer"]
    assert not load(resolve_ds_config_path("zero2"), optimizer="adamw")["zero_allow_untested_optimizer"]


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(UserError, match=r"ds.json:2:\d+: invalid JSON"):
        load(path)


@pytest.mark.parametrize("config,message", [
    ({"zero_optimization": {"stage": 4}}, "stage = 4"),
    ({"zero_optimization": {"stage": 2, "bogus_key": 1}}, "bogus_key.*Extra inputs"),
    ({"fp16": {"enabled": "yes please"}}, "enabled.*valid boolean"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
    ([1, 2], "expected a DeepSpeed JSON config, got a JSON list"),
])
def test_deepspeed_schema_errors_are_one_line(tmp_path, config, message):
    with pytest.raises(UserError, match=message) as e:
        load(write(tmp_path, config))
    assert "\n" not in str(e.value)
