"""Reinforcement learning with verifiable rewards, GRPO-style: the `gptds rl` job. It runs on the shared loop
(train.py), engine and checkpoints; what differs is where its batches come from. Rollouts.next() samples
--num_samples completions for each of its prompts from the current policy, scores each with the task's
reward (1 when the answer's last number equals the reference, as GSM8K is scored in tasks.py), and returns
the completions as a training batch whose per-token loss weights are the advantages.

The variant, chosen deliberately (nanochat's chat_rl.py; DeepSeekMath's GRPO; Dr. GRPO):
- advantage = (reward - the mean reward of the prompt's group) / (the group's standard deviation + 1e-4), as
  GRPO has it; --no-normalize_advantages keeps the difference alone (Dr. GRPO and nanochat: dividing by the
  spread up-weights prompts that are nearly always or nearly never solved). On the arithmetic task the
  normalised form raised the reward faster (README, "Reinforcement learning");
- the loss is -sum(advantage * log p(token)) over the sampled tokens only (prompt tokens masked), divided by
  the number of sampled tokens in the micro batch: token-level averaging, so long answers are not down-weighted
  per token as GRPO's per-sequence mean does;
- one optimizer step per batch of rollouts (on-policy): the loss takes log p at the sampling --temperature, so the
  ratio to the sampling policy is 1 and PPO's clipping would never act (--top_k's truncation is the one part of
  the sampling the loss does not model, as in nanochat); no KL term to a reference model (nanochat drops both);
  the gradient clipping of --grad_clip stays.

Under ZeRO-3 every rank must run every forward (parameters are gathered collectively): generate_batch keeps
the ranks in step until the last row on any rank is done, and every rank samples the same number of rows.
The prompt order and each rank's sampling generator are in the checkpoint (state_dict), so a resumed run
samples exactly what the uninterrupted one would have."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptds import dist, tasks
from gptds.config import RL_MAX_NEW_TOKENS, RLConfig, RunConfig, check_flags, flag, require
from gptds.data.loaders import TrainingData, trained_positions
from gptds.data.prepare import PrepareChatConfig, prepare_chat
from gptds.errors import UserError
from gptds.generate import generate_batch
from gptds.tokenizer import ASSETS_DIR, decode

STATE_VERSION = 1
# The prompts each task learns from when --task_file is not given (its held-out split is the task's own
# evaluation sample, tasks.SPECS); the tasks and their flags are config.RLConfig's.
TRAIN_SPLITS = {"arithmetic": "arithmetic_train.jsonl", "gsm8k": "gsm8k_train_sample.jsonl"}
SAMPLES_SHOWN = 4  # rollouts written to samples.txt at each --generate_interval


# ---------------------------------------------------------------- the built-in task

ARITHMETIC_MAX_OPERAND = 4  # sums a + b with 0 <= a, b <= 4: 25 problems
ARITHMETIC_TEST_SIZE = 5    # problems held out (drawn with a fixed seed), the rest (20) are the training prompts


def arithmetic_docs() -> tuple[list[dict], list[dict]]:
    """The built-in task's (train, test) problems in GSM8K's layout, as the bundled files hold them."""
    docs = [{"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}
            for a in range(ARITHMETIC_MAX_OPERAND + 1) for b in range(ARITHMETIC_MAX_OPERAND + 1)]
    held_out = sorted(random.Random(0).sample(range(len(docs)), ARITHMETIC_TEST_SIZE))
    return [d for i, d in enumerate(docs) if i not in held_out], [docs[i] for i in held_out]


def write_arithmetic_files(folder: Path = ASSETS_DIR) -> None:
    """(Re)writes the bundled files from arithmetic_docs (tests check they agree)."""
    train, test = arithmetic_docs()
    for name, docs in (("arithmetic_train.jsonl", train), ("arithmetic_test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(d) + "\n" for d in docs))


@dataclass
class PrepareTaskConfig:
    """`gptds prepare task`'s settings: a task's training prompts with their answers, as conversations for the
    brief fine-tune that teaches a model the task's answer format before RL."""
    task: str = flag("arithmetic", "whose bundled train split: arithmetic or gsm8k (GSM8K's sample)",
                     choices=tuple(RL_MAX_NEW_TOKENS))
    output_dir: str = flag("data/arithmetic", "folder for the shards, masks and manifest.json")
    context_length: int = flag(256, "tokens per training sequence")
    overwrite: bool = flag(False, "replace a non-empty --output_dir")

    def __post_init__(self):
        check_flags(self, "prepare_task")
        require(self.context_length > 0, "prepare_task", "context_length", self.context_length, "a positive integer")


def prepare_task(cfg: PrepareTaskConfig) -> Path:
    """The task's train split (question -> user turn, answer -> assistant turn) prepared as `prepare chat` does."""
    return prepare_chat(PrepareChatConfig(input=[str(ASSETS_DIR / TRAIN_SPLITS[cfg.task])], format="gsm8k",
                                          output_dir=cfg.output_dir, context_length=cfg.context_length,
                                          overwrite=cfg.overwrite, num_workers=0))


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompt:
    tokens: list[int]   # what the model reads (the chat turns, or the plain Question/Answer text)
    reference: str      # the answer the reward checks against
    where: str          # file:line


@dataclass
class PromptSet:
    """The training prompts of an RL run (the loop's training data): what set_up checks and meta.json records."""
    prompts: list[Prompt]
    source: str
    sha256: str
    prompts_per_micro_step: int  # over all ranks

    def batches_per_epoch(self) -> int:
        return len(self.prompts) // self.prompts_per_micro_step


def load_prompts(run: RunConfig, fmt: tasks.PromptFormat, block_size: int, world_size: int) -> PromptSet:
    """The task's training prompts, read and checked before any work: each line a GSM8K-layout item (bad ones
    refused with file:line), each prompt short enough to leave --max_new_tokens within the model's context,
    and enough of them for one optimizer step."""
    cfg = run.rl
    source = cfg.task_file or str(ASSETS_DIR / TRAIN_SPLITS[cfg.task])
    rows = tasks.read_rows(source, f"{cfg.task} prompt")
    prompts = []
    for where, doc in rows:
        doc = tasks.parse_gsm8k(doc, where)
        tokens = fmt.render(tasks.GenItem(tasks.question_answer(doc), doc["answer"], doc["question"]))  # as
        # evaluation renders the held-out split (tasks.load_task, zero-shot)
        if len(tokens) + cfg.max_new_tokens > block_size:
            raise UserError(f"{where}: the prompt is {len(tokens)} tokens; with --max_new_tokens {cfg.max_new_tokens} "
                            f"it exceeds the model's context of {block_size} tokens: shorten it or lower "
                            f"--max_new_tokens")
        prompts.append(Prompt(tokens, doc["answer"], where))
    digest = hashlib.sha256(json.dumps([(p.tokens, p.reference) for p in prompts]).encode()).hexdigest()
    per_micro_step = prompts_per_micro_step(run.data.micro_batch_size, cfg.num_samples) * world_size
    per_step = per_micro_step * run.train.grad_accum_steps
    if len(prompts) < per_step:
        raise UserError(f"{source}: {len(prompts)} prompts, fewer than one optimizer step samples for ("
                        f"--micro_batch_size {run.data.micro_batch_size} / --num_samples {cfg.num_samples} x "
                        f"--grad_accum_steps {run.train.grad_accum_steps} x {world_size} rank(s) = {per_step}); "
                        f"lower -B or give more prompts")
    return PromptSet(prompts, source, digest, per_micro_step)


def training_data(prompt_set: PromptSet, cfg: RLConfig) -> TrainingData:
    """The prompts in the place of the loop's training data (no validation split: held-out pass@k instead)."""
    return TrainingData(prompt_set, None, [], {"rl"}, 0, prompt_set.sha256,
                        f"task {cfg.task} ({len(prompt_set.prompts)} prompts from {prompt_set.source})",
                        {"task": cfg.task, "prompts": prompt_set.source})


def held_out(run: RunConfig, fmt: tasks.PromptFormat) -> tuple[tasks.Task, dict, list[list[int]]]:
    """The task's held-out split (the bundled one, or --eval_task_file TASK=PATH), zero-shot as the policy is
    prompted, with the generation settings of its pass@1 and pass@k (k = --num_samples), and the first three
    prompts for the samples at --generate_interval."""
    files = tasks.parse_task_files(run.data.eval_task_file)
    task = tasks.load_task(run.rl.task, files, run.data.eval_task_limit, num_fewshot=0)
    generation = {"num_samples": run.rl.num_samples, "temperature": run.rl.temperature, "top_k": run.rl.top_k,
                  "max_new_tokens": run.rl.max_new_tokens}
    return task, generation, [fmt.render(item) for item in task.items[:3]]


def prompts_per_micro_step(micro_batch_size: int, num_samples: int) -> int:
    """Prompts one rank samples for in one micro step."""
    if micro_batch_size % num_samples:
        raise UserError(f"--micro_batch_size {micro_batch_size} (completions per rank per micro step) is not a "
                        f"multiple of --num_samples {num_samples} (completions per prompt): use e.g. "
                        f"-B {num_samples * max(1, micro_batch_size // num_samples)}")
    return micro_batch_size // num_samples


# ---------------------------------------------------------------- rewards and advantages

def reward(completion: str, reference: str) -> float:
    """1.0 when the completion's last number equals the reference's final answer (GSM8K's flexible-extract)."""
    return float(tasks.is_correct(completion, reference))


def advantages(rewards: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """rewards (groups, num_samples) -> each reward minus its group's mean, divided by the group's standard
    deviation (+1e-4) when `normalize`. A group whose rewards are all equal teaches nothing: advantages 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4) if normalize else centred


def policy_batch(prompts: list[list[int]], completions: list[list[int]], weights: list[float], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows prompt + completion, right-padded: x (B, T) the inputs, y (B, T) the completion's tokens as targets
    (-100 on prompt and padding), w (B, T) the row's advantage at every target."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    x = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    y = torch.full((len(prompts), T), -100, dtype=torch.long)
    w = torch.zeros((len(prompts), T), dtype=torch.float32)
    for i, (p, c, a) in enumerate(zip(prompts, completions, weights)):
        row = p + c
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(p) - 1:len(row) - 1] = torch.tensor(c)
        w[i, len(p) - 1:len(row) - 1] = a
    return x, y, w


class Rollouts:
    """The RL job's batches, in the loop's place of a data loader: next() returns (x, y, forward options),
    y and the loss weights at the sampled tokens only (the output layer runs on those rows, logits_at).

    The prompt order is global and identical on every rank, (epoch, cursor) as in the data loaders: each
    micro step takes prompts_per_rank x world_size prompts of the epoch's seeded permutation, rank r its slice.
    Each rank samples with its own generator (seed + rank); both are in state_dict."""

    components = None  # the loop's per-component losses are a mixture's, not ours

    def __init__(self, prompt_set: PromptSet, model: torch.nn.Module, cfg: RLConfig, fmt: tasks.PromptFormat,
                 info: dist.DistInfo, seed: int):
        self.prompts, self.model, self.cfg, self.fmt = prompt_set.prompts, model, cfg, fmt
        self.per_rank = prompt_set.prompts_per_micro_step // info.world_size
        self.info, self.seed = info, seed
        self.epoch = self.cursor = 0
        self.generator = torch.Generator(device=info.device).manual_seed(seed + 1000 * (info.rank + 1))
        self._reset_stats()
        self.recent: list[tuple[str, str, float]] = []  # (prompt, completion, reward) of the last micro step

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.prompts))

    def _next_prompts(self) -> list[Prompt]:
        need = self.per_rank * self.info.world_size
        if self.cursor + need > len(self.prompts):  # the rest of the epoch cannot fill a micro step
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._order(self.epoch)[self.cursor:self.cursor + need]
        self.cursor += need
        mine = order[self.info.rank * self.per_rank:(self.info.rank + 1) * self.per_rank]
        return [self.prompts[i] for i in mine]

    def next(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Sample, score and return one micro batch: every rank runs generate_batch on micro_batch_size rows."""
        prompts, n = self._next_prompts(), self.cfg.num_samples
        rows = [p.tokens for p in prompts for _ in range(n)]
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            completions = generate_batch(self.model, rows, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                         top_k=self.cfg.top_k, generator=self.generator,
                                         stop_tokens=self.fmt.stop_tokens, stop_strings=self.fmt.stop_strings,
                                         device=self.info.device, keep_stop_token=True)
        finally:
            self.model.train(was_training)
        texts = [tasks.cut_at_stop(decode([t for t in c if t not in self.fmt.stop_tokens]), self.fmt.stop_strings)
                 for c in completions]
        rewards = torch.tensor([reward(t, prompts[i // n].reference) for i, t in enumerate(texts)])
        weights = advantages(rewards.view(-1, n), self.cfg.normalize_advantages).view(-1)
        x, y, w = policy_batch(rows, completions, weights.tolist(), self.fmt.stop_tokens[0])
        self.stats += torch.tensor([float(rewards.sum()), float((rewards ** 2).sum()), len(rewards),
                                    sum(map(len, completions)), time.perf_counter() - t0,
                                    sum(len(r) + len(c) - 1 for r, c in zip(rows, completions)), 1.0],
                                   dtype=torch.float64)
        self.recent = [(decode(prompts[i // n].tokens), texts[i], float(rewards[i]))
                       for i in range(0, len(texts), max(1, len(texts) // SAMPLES_SHOWN))][:SAMPLES_SHOWN]
        x, y, w, trained = (t.to(self.info.device) for t in (x, *trained_positions(y, w)))
        return x, y, {"logits_at": trained, "loss_weights": w, "temperature": self.cfg.temperature}

    def prefetch(self) -> None:
        """Nothing to read ahead: the next rollouts need the weights after this step."""

    # -------- reporting (every rank calls metrics: one all-reduce)

    def _reset_stats(self) -> None:
        # reward sum, reward^2 sum, completions, completion tokens, sampling seconds, trained tokens, micro steps
        self.stats = torch.zeros(7, dtype=torch.float64)

    def metrics(self, step_time: float, grad_accum_steps: int) -> dict:
        """Over the steps since the last call and all ranks: the mean reward and its spread, the mean completion
        length, and tokens per second of sampling and of training (the rest of the step) separately."""
        s = dist.all_reduce_sum(self.stats.clone()).tolist()
        self._reset_stats()
        r_sum, r_sq, count, tokens, sample_s, trained, micro = s
        if not count:
            return {}
        steps = micro / self.info.world_size / grad_accum_steps
        mean = r_sum / count
        sample_per_step = sample_s / self.info.world_size / steps  # each rank samples at the same time
        return {"reward": mean, "reward_std": max(0.0, r_sq / count - mean ** 2) ** 0.5,
                "response_tokens": tokens / count,
                "sampling_tokens_per_second": tokens / steps / sample_per_step if sample_per_step > 0 else None,
                "training_tokens_per_second": (trained / steps / (step_time - sample_per_step)
                                               if step_time > sample_per_step else None),
                "tokens_per_second": (tokens + trained) / steps / step_time}

    def samples(self) -> str:
        """A few of the last rollouts with their rewards, for samples.txt."""
        return "\n\n".join(f"[rollout, reward {r:g}] {p!r} -> {c!r}" for p, c, r in self.recent)

    # -------- checkpointing (checkpoint.py's per-rank stateful part)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor,
                "generator": self.generator.get_state(), "prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("prompts") != len(self.prompts):
            raise UserError(f"the checkpoint's rollout state (version {state.get('version')}, {state.get('prompts')} "
                            f"prompts) does not fit this run ({len(self.prompts)} prompts)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------- set-up checks

def check_run(run: RunConfig) -> None:
    """What `gptds rl` needs beyond the training flags' own checks."""
    if run.data.data_dir:
        raise UserError("--data_dir: `gptds rl` samples its own training data from --task (and --task_file)")
    if run.train.eval_interval:
        raise UserError("--eval_interval: `gptds rl` has no validation split to score; its held-out pass@1 and "
                        "pass@k are scored every --eval_task_interval steps")
    if run.lora.lora_rank:
        raise UserError("--lora_rank: LoRA is not wired into `gptds rl` yet; train every weight (omit --lora_*)")
    prompts_per_micro_step(run.data.micro_batch_size, run.rl.num_samples)


def check_same_rl(saved: dict, step_dir: Path, run: RunConfig) -> None:
    """The settings a resumed RL run must keep (MUST_MATCH) that check_resumable does not see (the prompts are
    the data sha256)."""
    before = saved["run_config"].get("rl") or {}
    if saved.get("job") != "rl":
        raise UserError(f"{step_dir} is a {saved.get('job')} checkpoint; `gptds rl` resumes only its own: start "
                        f"from it with --pretrained_checkpoint instead")
    if before.get("num_samples") != run.rl.num_samples:
        raise UserError(f"{step_dir} was trained with --num_samples {before.get('num_samples')}; resume with the "
                        f"same groups, or start a new run in another --log_dir")
