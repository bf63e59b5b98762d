"""Run settings and resume rules checked before any work, without launching a run: learning-rate
defaults and limits, which checkpoint a resume may continue from, and what a mismatched resume says."""

import re

import pytest
from conftest import FAKE_META, ROOT, fake_checkpoint

from gptds import checkpoint
from gptds.__main__ import build_parser, main
from gptds.checkpoint import check_resumable
from gptds.config import TrainConfig, run_config_from_flags
from gptds.errors import UserError
from gptds.model import GPTConfig


def test_min_lr_defaults_to_a_tenth_of_lr_so_lowering_lr_alone_works():
    assert TrainConfig().min_lr == pytest.approx(1e-4)
    assert TrainConfig(lr=5e-5).min_lr == pytest.approx(5e-6)
    args = build_parser().parse_args(["finetune", "--lr", "1e-6"])
    assert run_config_from_flags("finetune", args).train.min_lr == pytest.approx(1e-7)
    with pytest.raises(UserError, match=r"--min_lr \(train.min_lr\) = 0.01 is not allowed: between 0 and --lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)


def test_a_decay_shorter_than_the_warmup_is_refused():
    assert TrainConfig(warmup_steps=10, lr_decay_steps=11).lr_decay_steps == 11
    with pytest.raises(UserError, match=r"--lr_decay_steps \(train.lr_decay_steps\) = 10 is not allowed: 0 "
                                        r"\(max_steps\) or more than --warmup_steps \(10\)"):
        TrainConfig(warmup_steps=10, lr_decay_steps=10)


def _fake_checkpoint(checkpoint_dir, step: int):
    return fake_checkpoint(checkpoint_dir, step, b"x" * step)


def _run(tmp_path, *flags):
    args = build_parser().parse_args(["pretrain", "--log_dir", str(tmp_path / "run"), *flags])
    return run_config_from_flags("pretrain", args)


def resume_target(run):
    return checkpoint.resume_target(run.checkpoint_dir, run.checkpoint)


def test_resuming_an_older_step_into_a_folder_with_newer_ones_is_refused(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    older, newest = _fake_checkpoint(checkpoints, 100), _fake_checkpoint(checkpoints, 300)
    # keep-last-N and --auto_resume rank by step: the new run's saves would lose to step 300
    with pytest.raises(UserError, match=r"--resume from step 100 .* holds newer checkpoints \(step_00000300\).* "
                                        r"resume into a new --log_dir/--checkpoint_dir, or delete those folders"):
        resume_target(_run(tmp_path, "--resume", "--checkpoint_path", str(older)))
    assert resume_target(_run(tmp_path, "--resume", "--checkpoint_path", str(newest))) == newest
    assert resume_target(_run(tmp_path, "--auto_resume")) == newest
    # into a new folder, the old step is fine
    elsewhere = _run(tmp_path / "new", "--resume", "--checkpoint_path", str(older))
    assert resume_target(elsewhere) == older


META = {"model_config": GPTConfig.from_preset("tiny").to_dict(), "data_manifest_sha256": "ab" * 32,
        "world_size": 2, "zero_stage": 2}


def test_another_world_size_offers_the_universal_conversion_only_where_it_exists(tmp_path):
    now = {**META, "world_size": 1, "zero_stage": 2}  # this run: 1 rank, ZeRO-2
    with pytest.raises(UserError, match=r"saved by 2 ranks under ZeRO-2; this run has 1 ranks under ZeRO-2\. "
                                        r"Convert it first: `gptds convert zero-to-universal"):
        check_resumable({**META, "optimizer": "adamw"}, tmp_path, {**now, "optimizer": "adamw"})
    with pytest.raises(UserError, match=r"Its 8-bit AdamW state only resumes on the same ranks and stage: run with "
                                        r"2 ranks under ZeRO-2, or start a new run") as refused:
        check_resumable({**META, "optimizer": "adamw8bit"}, tmp_path, {**now, "optimizer": "adamw8bit"})
    assert "zero-to-universal" not in str(refused.value)  # convert.py refuses 8-bit state


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--prompt", "Hi", "--top_k", "0"], r"--top_k \(generate.top_k\) = 0 is not allowed"),
    (["generate", "--prompt", "Hi", "--temperature", "-1"], r"--temperature \(generate.temperature\) = -1.0"),
    (["generate", "--prompt", "Hi", "--max_new_tokens", "0"], r"--max_new_tokens \(generate.max_new_tokens\) = 0"),
    (["evaluate", "--eval_batches", "0"], r"--eval_batches \(evaluate.eval_batches\) = 0 is not allowed"),
    (["evaluate", "--hellaswag_limit", "-1"], r"--hellaswag_limit \(evaluate.hellaswag_limit\) = -1"),
    (["evaluate", "-T", "0"], r"--context_length \(evaluate.context_length\) = 0"),
])
def test_generate_and_evaluate_refuse_bad_numbers_in_one_line(argv, expected, tmp_path, capsys):
    assert main([*argv, "--checkpoint", str(tmp_path / "nothing-read")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gptds {argv[0]}: error: ") and len(err.splitlines()) == 1, err
    assert re.search(expected, err), err


def test_a_machine_error_is_one_line_with_the_path(tmp_path, capsys):
    """OSError (here: a name longer than the file system allows) is the machine's answer, not a bug."""
    too_long = tmp_path / ("a" * 300)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be.\n")
    status = main(["prepare", "text", "--input", str(corpus), "--output_dir", str(too_long)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == f"gptds prepare: error: {too_long}: File name too long", err


def test_the_pretrained_config_is_read_from_the_header_alone(tmp_path):
    """The architecture of --pretrained_checkpoint comes from the first shard's header; the weights are read
    once, later, by the model's loader (here the second shard is cut short, and only the loader notices)."""
    from gptds.model import GPT
    from gptds.weights import WeightsError, load_weights, read_config, save_gptds_weights, state_dict_for_saving
    config = GPTConfig.from_preset("tiny")
    files = save_gptds_weights(config, state_dict_for_saving(GPT(config)).items(), tmp_path / "w",
                               max_shard_bytes=2_000_000)
    shards = sorted(f for f in files if f.suffix == ".safetensors")
    assert len(shards) >= 2
    shards[1].write_bytes(shards[1].read_bytes()[:-1000])
    assert read_config(tmp_path / "w") == config
    with pytest.raises(WeightsError, match="not a readable safetensors file, or truncated"):
        load_weights(tmp_path / "w")


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """What a killed attempt logged after its last checkpoint is dropped from metrics.jsonl and hidden in
    TensorBoard when the run resumes from that checkpoint; the kept history is untouched."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptds.metrics import MetricsLogger
    first = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 11):
        first.log(step, {"loss": 10.0 - step})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # cut short by the kill
    resumed = MetricsLogger(tmp_path, enabled=True, start_step=6)  # the checkpoint was at step 6
    for step in range(7, 9):
        resumed.log(step, {"loss": 100.0 + step})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(s, 10.0 - s) for s in range(1, 7)] + [(7, 107.0), (8, 108.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, 10.0 - s) for s in range(1, 7)] + \
        [(7, 107.0), (8, 108.0)]


def test_compile_under_zero3_is_refused_with_the_reason(tmp_path, capsys):
    zero3 = tmp_path / "z3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    argv = ["pretrain", "--log_dir", str(tmp_path / "run"), "--model", "tiny", "--deepspeed_config", str(zero3)]
    assert main([*argv, "--compile"]) == 2
    err = capsys.readouterr().err
    assert "--compile does not work under ZeRO-3: DeepSpeed's parameter-gathering hooks break" in err, err


# ---------------------------------------------------------------- what a resume may change

def _with(meta: dict, section: str | None = None, **changes) -> dict:
    """meta with run_config[section] (or meta itself) changed."""
    if section is None:
        return {**meta, **changes}
    run = meta["run_config"]
    return {**meta, "run_config": {**run, section: {**run[section], **changes}}}


@pytest.mark.parametrize("section, changes, expected", [
    ("train", {"grad_accum_steps": 2}, r"global batch of --micro_batch_size 2 x --grad_accum_steps 1 x 2 ranks = 4 "
                                       r"sequences per step; this run has .* = 8\. .*keep --grad_accum_steps 1"),
    ("data", {"micro_batch_size": 4}, r"keep --micro_batch_size 2 \(per rank, at the same world size\)"),
    ("data", {"context_length": 64}, r"--context_length 32; this run has 64, which changes the sequences"),
    ("train", {"seed": 6}, r"--seed 5; this run has 6, which changes the data order"),
    (None, {"precision": "bf16"}, r"was trained in fp32; this run's --deepspeed_config trains in bf16"),
])
def test_a_resume_that_changes_what_is_learned_is_refused(tmp_path, section, changes, expected):
    with pytest.raises(UserError, match=expected):
        check_resumable(FAKE_META, tmp_path, _with(FAKE_META, section, **changes))


def test_a_resume_may_change_the_world_size_through_a_universal_checkpoint_keeping_the_global_batch(tmp_path):
    universal = {**FAKE_META, "kind": "universal"}  # 2 ranks x micro batch 2
    check_resumable(universal, tmp_path, _with(_with(FAKE_META, world_size=4), "data", micro_batch_size=1))
    with pytest.raises(UserError, match="global batch"):
        check_resumable(universal, tmp_path, _with(FAKE_META, world_size=4))


def test_settings_that_may_change_on_resume_do_not_stop_it(tmp_path):
    now = _with(_with(FAKE_META, "train", lr=1e-4, max_steps=999, eval_interval=7), "data", eval_batches=3)
    check_resumable(FAKE_META, tmp_path, now)


def test_every_training_flag_says_what_a_resume_may_do_with_it_and_the_readme_table_is_that():
    from gptds.config import MAY_CHANGE, MUST_MATCH, resume_rules, resume_rules_markdown
    from gptds.session import Session  # noqa: F401 (the training flags are complete once the job modules load)
    parser = build_parser()
    flags = {a.option_strings[0] for sub in ("pretrain", "finetune", "rl")
             for a in parser._subparsers._group_actions[0].choices[sub]._actions if a.option_strings
             and a.option_strings[0].startswith("--") and a.dest not in ("help", "local_rank", "verbose")}
    rules = {flag: rule for flag, rule, _ in resume_rules()}
    assert set(rules) == flags and set(rules.values()) == {MAY_CHANGE, MUST_MATCH}
    for flag in ("--grad_accum_steps", "--micro_batch_size", "--seed", "--model", "--optimizer", "--context_length"):
        assert rules[flag] == MUST_MATCH, flag
    for flag in ("--lr", "--max_steps", "--eval_interval", "--checkpoint_interval", "--log_interval"):
        assert rules[flag] == MAY_CHANGE, flag
    readme = (ROOT / "README.md").read_text()
    assert resume_rules_markdown() in readme, "README's table differs from config.resume_rules_markdown()"
