"""`gptds rl` (gptds/rl.py): reinforcement learning with verifiable rewards on the shared loop.

Fast: the advantages, the batch and the policy-gradient loss against hand-computed values; the bundled
arithmetic task; bad tasks, prompts and flags refused before any work; the rollout state round trip.
Slow (one launch of 2 CPU ranks): a tiny model fine-tuned briefly on the arithmetic task's format, then RL
under ZeRO-2 raises the mean reward by at least 0.2 (last quarter of the run against the first); ZeRO-1 and
ZeRO-3 complete with answers of different lengths on the two ranks; a run stopped and resumed repeats the
uninterrupted run's losses and rewards exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fp32_config, launch

from gptds import rl, tasks
from gptds.__main__ import main
from gptds.config import RLConfig, RunConfig, run_config_from_flags
from gptds.errors import UserError
from gptds.model import GPT, GPTConfig, cross_entropy
from gptds.tokenizer import ASSETS_DIR, IM_END_ID

SFT_STEPS = 200      # "fine-tuned briefly on the task's format": the mean reward starts near 0.5
RL_STEPS = 240
RESUME_STEPS = 6


# ---------------------------------------------------------------- the computation, by hand

def test_advantages_are_the_reward_minus_the_group_mean_optionally_over_its_spread():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    centred = rl.advantages(rewards)
    assert centred.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    scaled = rl.advantages(rewards, normalize=True)
    spread = math.sqrt(1 / 3) + 1e-4  # the unbiased standard deviation of [1, 0, 0, 1]
    assert scaled[0].tolist() == pytest.approx([0.5 / spread, -0.5 / spread, -0.5 / spread, 0.5 / spread])
    assert scaled[1].tolist() == [0.0] * 4  # a group that always (or never) succeeds teaches nothing


def test_the_batch_trains_on_the_sampled_tokens_only_weighted_by_their_advantage():
    x, y, w = rl.policy_batch([[1, 2, 3], [4, 5]], [[7, IM_END_ID], [8]], [0.5, -0.25], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 7], [4, 5, 0, 0]]  # each row predicts its next token; short rows padded
    assert y.tolist() == [[-100, -100, 7, IM_END_ID], [-100, 8, -100, -100]]
    assert w.tolist() == [[0, 0, 0.5, 0.5], [0, -0.25, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_policy_gradient_loss_is_the_advantage_weighted_log_likelihood_over_sampled_tokens(dtype):
    """loss = -sum(A * log p(token)) / tokens: value and gradient against autograd on the plain formula, for
    fp32 logits and for the chunked path lower-precision logits take."""
    torch.manual_seed(0)
    logits = torch.randn(5, 11).to(dtype).requires_grad_()
    targets = torch.tensor([3, -100, 7, 0, 10])
    weights = torch.tensor([0.5, 9.0, -1.0, 0.25, 2.0])  # the 9.0 sits on a masked position: ignored
    loss = cross_entropy(logits, targets, 11, weights)
    loss.backward()
    ref_logits = logits.detach().float().requires_grad_()
    logp = torch.log_softmax(ref_logits, -1)
    keep = [0, 2, 3, 4]
    ref = -sum(weights[i] * logp[i, targets[i]] for i in keep) / len(keep)
    ref.backward()
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=tol)
    assert torch.allclose(logits.grad.float(), ref_logits.grad, atol=tol)
    assert float(cross_entropy(logits.detach(), targets, 11, torch.ones(5))) == \
        pytest.approx(float(cross_entropy(logits.detach(), targets, 11)), abs=tol)  # weights 1: the mean


def test_the_model_takes_flat_positions_and_weights_as_the_loop_gives_them():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300, pad_vocab_to_multiple_of=64))
    x = torch.randint(0, 300, (2, 6))
    y = torch.full((2, 6), -100)
    y[0, 3:], y[1, 5] = torch.tensor([1, 2, 3]), 4
    w = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = y != -100
    logits, loss = model(x, y[mask], logits_at=mask.flatten().nonzero().squeeze(1), loss_weights=w)
    full, _ = model(x)
    ref = -(w * torch.log_softmax(full[mask], -1).gather(1, y[mask][:, None]).squeeze(1)).mean()
    assert logits.shape == (4, 300) and torch.allclose(logits, full[mask], atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    # at the sampling temperature: the distribution the completions were drawn from
    _, hot = model(x, y[mask], logits_at=mask.flatten().nonzero().squeeze(1), loss_weights=w, temperature=0.5)
    ref_hot = -(w * torch.log_softmax(full[mask] / 0.5, -1).gather(1, y[mask][:, None]).squeeze(1)).mean()
    assert float(hot.detach()) == pytest.approx(float(ref_hot.detach()), rel=1e-5)
    with pytest.raises(ValueError, match="1-D int64 flat indices"):
        model(x, logits_at=mask.flatten().nonzero().squeeze(1).int())


def test_the_reward_is_gsm8ks_last_number_match():
    assert rl.reward("#### 7", "#### 7") == 1.0 and rl.reward("3 + 4 = 7", "#### 7") == 1.0
    assert rl.reward("#### 8", "#### 7") == 0.0 and rl.reward("seven", "#### 7") == 0.0


# ---------------------------------------------------------------- the task and its prompts

def test_the_bundled_arithmetic_files_are_the_generated_task(tmp_path):
    rl.write_arithmetic_files(tmp_path)
    for name in ("arithmetic_train.jsonl", "arithmetic_test.jsonl"):
        assert (tmp_path / name).read_text() == (ASSETS_DIR / name).read_text()
    train, test = rl.arithmetic_docs()
    assert len(train) == 20 and len(test) == 5 and not {d["question"] for d in train} & {d["question"] for d in test}
    held_out = tasks.load_task("arithmetic")
    assert [i.reference for i in held_out.items] == [d["answer"] for d in test] and held_out.num_fewshot == 0


def rl_run(*flags: str) -> RunConfig:
    from gptds.__main__ import build_parser
    args = build_parser().parse_args(["rl", "--pretrained_checkpoint", "x", *flags])
    return run_config_from_flags("rl", args)


def test_prompts_are_rendered_as_evaluation_renders_them_and_checked(tmp_path):
    fmt = tasks.prompt_format("chatml")
    run = rl_run("-B", "16")
    prompts = rl.load_prompts(run, fmt, block_size=128, world_size=2)
    held = tasks.load_task("arithmetic", num_fewshot=0)
    assert len(prompts.prompts) == 20 and prompts.prompts_per_micro_step == 4
    first = json.loads((ASSETS_DIR / "arithmetic_train.jsonl").read_text().splitlines()[0])
    item = tasks.GenItem("", first["answer"], first["question"])
    assert prompts.prompts[0].tokens == fmt.render(item) and prompts.prompts[0].where.endswith(":1")
    assert fmt.render(held.items[0])[-3:] == prompts.prompts[0].tokens[-3:]  # the same assistant prompt

    gsm8k = rl.load_prompts(rl_run("--task", "gsm8k"), fmt, block_size=1024, world_size=1)
    assert len(gsm8k.prompts) > 2 and gsm8k.prompts[0].reference.split("####")[-1].strip().lstrip("-").isdigit()
    with pytest.raises(UserError, match=r"gsm8k_train_sample.jsonl:1: the prompt is \d+ tokens; with --max_new_tokens "
                                        r"256 it exceeds the model's context of 128 tokens"):
        rl.load_prompts(rl_run("--task", "gsm8k"), fmt, block_size=128, world_size=1)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n{"question": "Q", "answer": "2"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'answer' has no '#### N'"):
        rl.load_prompts(rl_run("--task_file", str(bad)), fmt, 128, 1)
    bad.write_text('{"question": "   ", "answer": "#### 2"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: question is empty or blank"):
        rl.load_prompts(rl_run("--task_file", str(bad)), fmt, 128, 1)
    bad.write_text(json.dumps({"question": "word " * 200, "answer": "#### 2"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: the prompt is \d+ tokens; with --max_new_tokens 8 it exceeds"):
        rl.load_prompts(rl_run("--task_file", str(bad)), fmt, 128, 1)
    with pytest.raises(UserError, match=r"20 prompts, fewer than one optimizer step samples for"):
        rl.load_prompts(rl_run("-B", "96"), fmt, 128, 2)


def test_an_unknown_task_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["rl", "--task", "mathh"])
    assert exit_.value.code == 2 and "argument --task: invalid choice: 'mathh'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--num_samples", "1"], "--num_samples (rl.num_samples) = 1 is not allowed: 2 or more"),
    (["--temperature", "0"], "--temperature (rl.temperature) = 0.0 is not allowed: a positive number"),
    (["-B", "12"], "--micro_batch_size 12 (completions per rank per micro step) is not a multiple of --num_samples 8"),
    (["--data_dir", "data/x"], "--data_dir: `gptds rl` samples its own training data"),
    (["--eval_interval", "10"], "--eval_interval: `gptds rl` has no validation split"),
])
def test_bad_rl_flags_are_refused_in_one_line(argv, message, tmp_path, capsys):
    status = main(["rl", "--pretrained_checkpoint", str(tmp_path / "none"), "--log_dir", str(tmp_path / "run"),
                   *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err


def test_rl_without_a_model_to_improve_is_refused(tmp_path, capsys):
    assert main(["rl", "--log_dir", str(tmp_path / "run")]) == 2
    assert "give it with --pretrained_checkpoint" in capsys.readouterr().err


def test_rollout_state_round_trips_the_prompt_order_and_the_sampling_generator():
    class Info:
        rank, world_size, device = 1, 2, torch.device("cpu")
    prompt_set = rl.PromptSet([rl.Prompt([i], "#### 1", f"f:{i}") for i in range(10)], "f", "sha", 4)
    a = rl.Rollouts(prompt_set, None, RLConfig(), tasks.PLAIN, Info(), seed=3)
    seen = [a._next_prompts() for _ in range(3)]  # the third starts epoch 1 (2 left over of 10)
    assert [len(p) for p in seen] == [2, 2, 2] and a.epoch == 1 and a.cursor == 4
    a.generator.manual_seed(99)
    state = a.state_dict()
    b = rl.Rollouts(prompt_set, None, RLConfig(), tasks.PLAIN, Info(), seed=3)
    b.load_state_dict(state)
    assert b._next_prompts() == a._next_prompts()
    assert torch.equal(torch.rand(3, generator=b.generator), torch.rand(3, generator=a.generator))
    with pytest.raises(UserError, match="rollout state"):
        rl.Rollouts(rl.PromptSet(prompt_set.prompts[:8], "f", "sha", 4), None, RLConfig(), tasks.PLAIN, Info(),
                    seed=3).load_state_dict(state)


# ---------------------------------------------------------------- on 2 ranks

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    data = rl.prepare_task(rl.PrepareTaskConfig("arithmetic", str(tmp / "data"), context_length=32))
    z = {stage: fp32_config(tmp, f"zero{stage}") for stage in (1, 2, 3)}
    sft = tmp / "sft" / "checkpoints"
    common = ["--pretrained_checkpoint", str(sft), "--optimizer", "adamw", "-B", "32", "--lr", "1e-3",
              "--warmup_steps", "10", "--generate_interval", "0", "--checkpoint_interval", "0", "--seed", "5"]

    def rl_scenario(name, stage, steps, *extra, log_dir=None):
        return {"name": name, "argv": ["rl", "--deepspeed_config", z[stage], "--log_dir", str(log_dir or tmp / name),
                                       "--max_steps", str(steps), *common, *extra]}
    resume = ["--lr_decay_steps", str(RESUME_STEPS + 5), "--eval_task_interval", "0", "--checkpoint_interval", "3"]
    spec = [
        {"name": "sft", "argv": ["finetune", "--data_dir", str(data), "--deepspeed_config", z[2], "--model", "tiny",
                                 "-B", "8", "-T", "32", "--lr", "3e-3", "--weight_decay", "0", "--warmup_steps", "10",
                                 "--max_steps", str(SFT_STEPS), "--optimizer", "adamw", "--eval_interval", "0",
                                 "--generate_interval", "0", "--log_interval", "50", "--checkpoint_interval", "0",
                                 "--log_dir", str(tmp / "sft")]},
        rl_scenario("z2", 2, RL_STEPS, "--eval_task_interval", str(RL_STEPS), "--generate_interval", str(RL_STEPS)),
        # rank 1's answers end after 1 token, rank 0's run on: ZeRO-3 ranks must stay in step
        {**rl_scenario("z3", 3, 3, "--eval_task_interval", "3"), "fault": {"kind": "early_eot", "rank": 1,
                                                                           "after": 1}},
        rl_scenario("z1", 1, 3, "--eval_task_interval", "0"),
        rl_scenario("full", 2, RESUME_STEPS, *resume),
        rl_scenario("half", 2, 3, *resume, log_dir=tmp / "resumed"),
        rl_scenario("resumed", 2, RESUME_STEPS, *resume, "--auto_resume"),
    ]
    results = launch(spec, tmp, "rl", timeout=900)
    return tmp, results


def metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def rewards(log_dir: Path) -> dict[int, float]:
    return {r["step"]: r["reward"] for r in metrics(log_dir) if "reward" in r}


@pytest.mark.slow
def test_rl_raises_the_mean_reward_by_at_least_0_2_under_zero2(runs):
    tmp, results = runs
    assert results["z2"]["step"] == RL_STEPS
    curve = [r for _, r in sorted(rewards(tmp / "z2").items())]
    quarter = len(curve) // 4
    first, last = sum(curve[:quarter]) / quarter, sum(curve[-quarter:]) / quarter
    assert len(curve) == RL_STEPS and last - first >= 0.2, (first, last, curve)
    final = metrics(tmp / "z2")
    held_out = [r for r in final if "arithmetic_pass@1" in r][-1]
    assert held_out["step"] == RL_STEPS and {"arithmetic_pass@1", "arithmetic_pass@8"} <= set(held_out)
    logged = next(r for r in final if "reward" in r)
    assert {"reward_std", "response_tokens", "sampling_tokens_per_second", "training_tokens_per_second"} <= set(logged)
    samples = (tmp / "z2" / "samples.txt").read_text()
    assert "[rollout, reward " in samples and "What is" in samples


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z1", "z3"])
def test_rl_completes_under_zero1_and_zero3_with_different_answer_lengths_per_rank(runs, name):
    tmp, results = runs
    assert results[name]["step"] == 3 and len(rewards(tmp / name)) == 3
    if name == "z3":  # rank 1's answers were cut to one token: the mean length is below rank 0's alone
        assert any("arithmetic_pass@1" in r for r in metrics(tmp / name))


@pytest.mark.slow
def test_rl_resumes_exactly_prompts_and_sampling_included(runs):
    tmp, results = runs
    assert results["half"]["step"] == 3 and results["resumed"]["step"] == RESUME_STEPS
    full = {r["step"]: (r["loss"], r["reward"]) for r in metrics(tmp / "full") if "reward" in r}
    resumed = {r["step"]: (r["loss"], r["reward"]) for r in metrics(tmp / "resumed") if "reward" in r}
    assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))  # the first half, then the resumed steps
    assert resumed == full  # bit for bit: the same prompts, the same samples, the same updates
