"""Typed run settings: one dataclass per concern (data, training, checkpointing; the architecture's
GPTConfig lives in model.py), each validated in __post_init__, and the batch arithmetic, computed once
(Batch). Command-line flags are generated from the fields, so a flag, its field, its log name and its
TensorBoard tag are the same word; values flow one way, from the command line into these objects, and
nothing re-reads the environment later.

The rule for ds_configs/*.json: the JSON decides where state lives and in what precision (ZeRO stage,
offload, bf16/fp16, communication buckets). The run owns the batch, the optimizer and the schedule:
`train_micro_batch_size_per_gpu` (--micro_batch_size), `gradient_accumulation_steps` (--grad_accum_steps),
`train_batch_size` (their product times world size), `gradient_clipping` (--grad_clip) and
`zero_allow_untested_optimizer` (set for AdamW8bit). In the JSON those keys are absent, "auto", or
equal to the run's value; `optimizer` and `scheduler` blocks are refused (gptds builds both)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptds.errors import UserError
from gptds.lora import check_targets
from gptds.model import PRESETS

OPTIMIZERS = ("adamw8bit", "adamw")
DS_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
INSTALLED_DS_CONFIGS_DIR = Path(sys.prefix) / "share" / "gptds" / "ds_configs"


INT64 = (-2**63, 2**63 - 1)   # what an integer flag may hold unless it says less: torch and numpy take no more
SEEDS = (0, 2**32 - 1)         # numpy's seeding limit (torch's is wider)
LOCK_WAIT_MAX_S = 480          # below the 10-minute rendezvous/collective timeout the other ranks wait under

# How each training flag behaves when a run resumes (README, "What a resume may change"):
MAY_CHANGE = "may change"      # takes effect from the resumed step on
MUST_MATCH = "must match"      # changes what is learned: a resume with another value is refused


def flag(default, help: str, short: str | None = None, choices=None, required: bool = False,
         aliases: tuple[str, ...] = (), positional: bool = False, limits: tuple[int, int] | None = None,
         blank_ok: bool = False, resume: tuple[str, str] | None = None):
    """A dataclass field that is also a command-line flag --<name> (and `short`, e.g. -B, and `aliases`),
    or with positional=True an argument given by position. Every flag also follows check_flags: integers
    within `limits` (default INT64), floats finite, strings not blank (unless blank_ok). Training flags say
    what a resume may do with them: resume=(MAY_CHANGE or MUST_MATCH, why), checked by check_resumable."""
    return field(default=default, metadata=dict(help=help, short=short, choices=choices, required=required,
                                                aliases=aliases, positional=positional, limits=limits,
                                                blank_ok=blank_ok, resume=resume))


def require(cond: bool, section: str, name: str, value, allowed: str) -> None:
    if not cond:
        raise UserError(f"--{name} ({section}.{name}) = {value!r} is not allowed: {allowed}")


def check_flags(settings, section: str) -> None:
    """The rules every flag follows before its own checks: an integer within its limits (a seed numpy and
    torch accept, a count that fits in 64 bits), a finite float (nan and inf pass `x > 0`-style checks
    silently), a path or name that is not empty or blank (--log_dir "" would write into the current folder)."""
    for f in dataclasses.fields(settings):
        if "help" not in f.metadata:
            continue
        value = getattr(settings, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or v is None:
                continue
            if isinstance(v, int):
                lo, hi = f.metadata.get("limits") or INT64
                require(lo <= v <= hi, section, f.name, v, f"an integer from {lo} to {hi}" if f.metadata.get("limits")
                        else "an integer that fits in 64 bits, which torch and numpy take")
            elif isinstance(v, float):
                require(math.isfinite(v), section, f.name, v, "a finite number")
            elif isinstance(v, str) and not f.metadata.get("blank_ok"):
                require(bool(v.strip()), section, f.name, v, "a non-empty value")


NEXT_STEPS = "from the resumed step on"
GLOBAL_BATCH = "with --micro_batch_size and the world size, the sequences of each step"


@dataclass
class DataConfig:
    data_dir: list[str] | None = flag(None, "prepared dataset folder (manifest.json from `gptds prepare`), or "
                                            "several as DIR:WEIGHT ... for a mixture (e.g. data/chat:0.6 "
                                            "data/dolly:0.3 data/text:0.1); omitted: the bundled demo data, "
                                            "prepared into <log_dir>/data",
                                      resume=(MUST_MATCH, "the data itself (each folder's manifest sha256 and a "
                                                          "mixture's weights), not the paths"))
    micro_batch_size: int = flag(4, "micro batch per rank, in sequences", short="-B", aliases=("--batch_size",),
                                 resume=(MUST_MATCH, "times the world size (a universal checkpoint may change "
                                                     "the world size); with --grad_accum_steps, the global batch"))
    context_length: int = flag(128, "tokens per sequence", short="-T", resume=(MUST_MATCH, "the sequences"))
    eval_batches: int = flag(8, "validation batches per rank at each evaluation", resume=(MAY_CHANGE, NEXT_STEPS))
    hellaswag_file: str | None = flag(None, "HellaSwag JSONL (ctx, endings, label); omitted: the bundled "
                                            "500-item sample", resume=(MAY_CHANGE, NEXT_STEPS))
    hellaswag_limit: int = flag(200, "score at most this many HellaSwag items (0: all)",
                                resume=(MAY_CHANGE, NEXT_STEPS))
    eval_tasks: str = flag("", "comma-separated tasks scored every --eval_task_interval steps on all ranks: "
                               "hellaswag, arc_easy, arc_challenge, mmlu, gsm8k, or a name given a file by "
                               "--eval_task_file (bits per byte is val_bpb, logged with val_loss)", blank_ok=True,
                           resume=(MAY_CHANGE, NEXT_STEPS))
    eval_task_limit: int = flag(100, "score at most the first N items of each --eval_tasks task (MMLU: of each "
                                     "subject; 0: all)", resume=(MAY_CHANGE, NEXT_STEPS))
    eval_task_file: list[str] | None = flag(None, "TASK=PATH for --eval_tasks, as `gptds evaluate --task_file`",
                                            resume=(MAY_CHANGE, NEXT_STEPS))

    def __post_init__(self):
        check_flags(self, "data")
        for name in ("micro_batch_size", "context_length", "eval_batches"):
            value = getattr(self, name)
            require(value > 0, "data", name, value, "a positive integer")
        for name in ("hellaswag_limit", "eval_task_limit"):
            require(getattr(self, name) >= 0, "data", name, getattr(self, name), "0 (all) or more")


@dataclass
class TrainConfig:
    deepspeed_config: str | None = flag(None, "DeepSpeed JSON: a path, or a name in ds_configs/ (zero1, zero2, "
                                              "zero3, zero2_offload, ...); omitted: zero2 on GPUs, zero2_fp32 on CPU",
                                        resume=(MUST_MATCH, "its ZeRO stage and precision; another stage or world "
                                                            "size through a universal checkpoint"))
    model: str = flag("mini", "model preset", choices=tuple(PRESETS),
                      resume=(MUST_MATCH, "the architecture (the checkpoint's model config)"))
    max_steps: int | None = flag(200, "optimizer steps to train for, counted from step 0 (a resumed run goes on "
                                      "to it); fine-tuning's default: one epoch of the training split",
                                 resume=(MAY_CHANGE, "extend or shorten the run"))
    grad_accum_steps: int = flag(1, "micro batches per optimizer step", resume=(MUST_MATCH, GLOBAL_BATCH))
    lr: float = flag(1e-3, "peak learning rate", resume=(MAY_CHANGE, "the schedule " + NEXT_STEPS))
    min_lr: float | None = flag(None, "learning rate at the end of the cosine decay (omitted: 0.1 x --lr)",
                                resume=(MAY_CHANGE, "the schedule " + NEXT_STEPS))
    warmup_steps: int = flag(20, "linear warmup steps", resume=(MAY_CHANGE, "the schedule " + NEXT_STEPS))
    lr_decay_steps: int = flag(0, "steps of the cosine decay to min_lr, counted from step 0 (0: max_steps); "
                                  "keep it fixed when a run is extended or stopped early",
                               resume=(MAY_CHANGE, "the schedule " + NEXT_STEPS))
    weight_decay: float = flag(0.1, "AdamW weight decay, on weight matrices only", resume=(MAY_CHANGE, NEXT_STEPS))
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)",
                            resume=(MAY_CHANGE, NEXT_STEPS))
    optimizer: str = flag("adamw8bit", "adamw8bit: bitsandbytes' fused 8-bit AdamW; adamw: 32-bit AdamW",
                          choices=OPTIMIZERS, resume=(MUST_MATCH, "its state is in the checkpoint"))
    activation_checkpointing: bool = flag(False, "recompute each block's activations in backward",
                                          resume=(MAY_CHANGE, "recomputation only, the same numbers"))
    compile: bool | None = flag(None, "torch.compile each transformer block's training path (omitted: on with "
                                      "CUDA, off on CPU, where it only costs start-up time); not under ZeRO-3",
                                resume=(MAY_CHANGE, "the same numbers, compiled"))
    pad_vocab_to_multiple_of: int | None = flag(None, "store the embedding with its rows padded to a multiple of "
                                                      "this (64: 50304 rows for GPT-2, faster matmuls; padding is "
                                                      "storage only); omitted: 64 for a new model, the checkpoint's "
                                                      "own for a resumed or pretrained one",
                                                resume=(MUST_MATCH, "the embedding's shape (omitted: the "
                                                                    "checkpoint's own)"))
    seed: int = flag(1337, "seed for weights, data order and sampling", limits=SEEDS,
                     resume=(MUST_MATCH, "the data order"))
    log_dir: str = flag("runs/pretrain", "TensorBoard events, metrics.jsonl, samples and checkpoints go here",
                        resume=(MAY_CHANGE, "--auto_resume finds the run in it; --resume may start a new one"))
    wandb_project: str | None = flag(None, "also log to this Weights & Biases project, from rank 0 (needs "
                                           "`pip install -e .[wandb]`; WANDB_MODE=offline logs without an account)",
                                     resume=(MAY_CHANGE, "logging only; a resumed run continues its W&B run"))
    log_interval: int = flag(10, "log training metrics every N steps", resume=(MAY_CHANGE, NEXT_STEPS))
    eval_interval: int = flag(50, "validation loss every N steps (0: never)", resume=(MAY_CHANGE, NEXT_STEPS))
    hellaswag_interval: int = flag(100, "HellaSwag accuracy every N steps (0: never)", resume=(MAY_CHANGE, NEXT_STEPS))
    eval_task_interval: int = flag(100, "score --eval_tasks every N steps (0: never)",
                                   resume=(MAY_CHANGE, NEXT_STEPS))
    generate_interval: int = flag(100, "sample from the fixed prompts every N steps (0: never)",
                                  resume=(MAY_CHANGE, NEXT_STEPS))
    generate_max_new_tokens: int = flag(48, "tokens per sample", resume=(MAY_CHANGE, NEXT_STEPS))
    max_bad_steps: int = flag(5, "stop after this many consecutive optimizer steps skipped for a NaN/inf loss "
                                 "(each skipped step is retried with the next batches)",
                              resume=(MAY_CHANGE, NEXT_STEPS))
    peak_tflops: float = flag(0.0, "accelerator peak TFLOP/s for MFU (0: look it up for known GPUs)",
                              resume=(MAY_CHANGE, "reporting only"))
    lock_wait_s: float = flag(120.0, "when another run holds the run folder (a requeued job whose predecessor is "
                                     "still shutting down), wait this long for it before refusing "
                                     f"(0 to {LOCK_WAIT_MAX_S})", resume=(MAY_CHANGE, "start-up only"))

    def __post_init__(self):
        check_flags(self, "train")
        require(self.max_steps is None or self.max_steps > 0, "train", "max_steps", self.max_steps,
                 "a positive integer")
        for name in ("grad_accum_steps", "log_interval", "generate_max_new_tokens", "max_bad_steps"):
            value = getattr(self, name)
            require(value > 0, "train", name, value, "a positive integer")
        for name in ("warmup_steps", "lr_decay_steps", "eval_interval", "hellaswag_interval", "eval_task_interval",
                     "generate_interval"):
            value = getattr(self, name)
            require(value >= 0, "train", name, value, "0 or a positive integer")
        require(self.lr > 0, "train", "lr", self.lr, "a positive number")
        if self.min_lr is None:
            self.min_lr = 0.1 * self.lr  # nanoGPT's and Chinchilla's ratio
        require(0 <= self.min_lr <= self.lr, "train", "min_lr", self.min_lr, f"between 0 and --lr ({self.lr})")
        require(self.lr_decay_steps == 0 or self.lr_decay_steps > self.warmup_steps, "train", "lr_decay_steps",
                self.lr_decay_steps, f"0 (max_steps) or more than --warmup_steps ({self.warmup_steps}): the cosine "
                "decay starts where the warmup ends")
        require(self.weight_decay >= 0, "train", "weight_decay", self.weight_decay, "0 or more")
        require(self.grad_clip >= 0, "train", "grad_clip", self.grad_clip, "0 (off) or more")
        require(self.optimizer in OPTIMIZERS, "train", "optimizer", self.optimizer, " or ".join(OPTIMIZERS))
        require(self.model in PRESETS, "train", "model", self.model, ", ".join(PRESETS))
        require(self.peak_tflops >= 0, "train", "peak_tflops", self.peak_tflops, "0 or more")
        require(self.pad_vocab_to_multiple_of is None or self.pad_vocab_to_multiple_of > 0, "train",
                "pad_vocab_to_multiple_of", self.pad_vocab_to_multiple_of, "a positive integer (1: no padding)")
        require(0 <= self.lock_wait_s <= LOCK_WAIT_MAX_S, "train", "lock_wait_s", self.lock_wait_s,
                f"0 to {LOCK_WAIT_MAX_S} seconds")


@dataclass
class CheckpointConfig:
    checkpoint_dir: str | None = flag(None, "omitted: <log_dir>/checkpoints",
                                      resume=(MAY_CHANGE, "--auto_resume finds the run's checkpoints in it"))
    checkpoint_interval: int = flag(100, "save every N steps (0: only at the end)", resume=(MAY_CHANGE, NEXT_STEPS))
    keep_last_n_checkpoints: int = flag(3, "complete checkpoints to keep (-1: all); the newest is never deleted",
                                        resume=(MAY_CHANGE, NEXT_STEPS))
    auto_resume: bool = flag(False, "continue from the newest complete checkpoint in checkpoint_dir, if any",
                             resume=(MAY_CHANGE, "how to resume"))
    resume: bool = flag(False, "continue from --checkpoint_path (a step folder, or a checkpoint folder: its newest)",
                        resume=(MAY_CHANGE, "how to resume"))
    checkpoint_path: str | None = flag(None, "what --resume continues from", resume=(MAY_CHANGE, "how to resume"))
    pretrained_checkpoint: str | None = flag(None, "initial weights: a gptds checkpoint folder, a weights file, "
                                                   "or a Hugging Face GPT-2 folder (fine-tuning)",
                                             resume=(MAY_CHANGE, "not read on resume: the weights are the "
                                                                 "checkpoint's"))

    def __post_init__(self):
        check_flags(self, "checkpoint")
        require(self.checkpoint_interval >= 0, "checkpoint", "checkpoint_interval", self.checkpoint_interval,
                 "0 or a positive integer")
        require(self.keep_last_n_checkpoints == -1 or self.keep_last_n_checkpoints > 0, "checkpoint",
                 "keep_last_n_checkpoints", self.keep_last_n_checkpoints, "-1 (keep all) or a positive integer")
        if self.resume and not self.checkpoint_path:
            raise UserError("--resume needs --checkpoint_path PATH (a checkpoint step folder or checkpoint folder); "
                            "to continue from the newest checkpoint in the run's own folder use --auto_resume")
        if self.resume and self.auto_resume:
            raise UserError("--resume and --auto_resume are exclusive: pick the explicit path or the newest checkpoint")


@dataclass
class AdapterConfig:
    lora_rank: int = flag(0, "LoRA: train rank-R adapters on a frozen base instead of every weight (0: off; needs "
                             "--pretrained_checkpoint)", resume=(MUST_MATCH, "the adapters' shapes"))
    lora_alpha: float | None = flag(None, "LoRA scaling numerator: the adapters add (alpha / rank) * B @ A "
                                          "(omitted: 2 x rank)", resume=(MUST_MATCH, "what the adapters add"))
    lora_dropout: float = flag(0.0, "dropout on the adapters' input", resume=(MUST_MATCH, "the adapters' training"))
    lora_targets: str = flag("c_attn,c_proj,c_fc", "comma-separated layers that get adapters: c_attn, c_proj, c_fc",
                             resume=(MUST_MATCH, "which adapters exist (in the checkpoint)"))
    lora_base_bits: int | None = flag(None, "4: QLoRA, the frozen base's target layers stored in 4 bits (NF4, "
                                            "bitsandbytes); omitted: the base as trained",
                                      resume=(MUST_MATCH, "the base the adapters train on"))

    def __post_init__(self):
        check_flags(self, "lora")
        require(self.lora_rank >= 0, "lora", "lora_rank", self.lora_rank, "0 (off) or a positive integer")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        require(self.lora_alpha > 0 or self.lora_rank == 0, "lora", "lora_alpha", self.lora_alpha, "a positive number")
        require(0.0 <= self.lora_dropout < 1.0, "lora", "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        require(self.lora_base_bits in (None, 4), "lora", "lora_base_bits", self.lora_base_bits, "4, or omitted")
        require(self.lora_base_bits is None or self.lora_rank > 0, "lora", "lora_base_bits", self.lora_base_bits,
                "only with --lora_rank (QLoRA trains adapters on the 4-bit base)")
        if self.lora_rank:
            check_targets(self.targets)

    @property
    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


RL_MAX_NEW_TOKENS = {"arithmetic": 8, "gsm8k": 256}  # the tasks of `gptds rl`, and their answers' length


@dataclass
class RLConfig:
    """`gptds rl`'s own flags (rl.py does the work)."""
    task: str = flag("arithmetic", "the prompts and their verifiable reward: arithmetic (built in: sums of two "
                                   "numbers, learnable on a CPU in minutes) or gsm8k; the reward is 1 when the "
                                   "answer's last number equals the reference", choices=tuple(RL_MAX_NEW_TOKENS),
                     resume=(MUST_MATCH, "the prompts and the reward"))
    task_file: str | None = flag(None, "the training prompts: JSONL in GSM8K's layout (question; answer ending in "
                                       "'#### N'), or hub:NAME:CONFIG:SPLIT (e.g. hub:openai/gsm8k:main:train); "
                                       "omitted: the task's bundled train split",
                                 resume=(MUST_MATCH, "the prompts (their sha256, not the path)"))
    num_samples: int = flag(8, "completions sampled per prompt: the group whose mean reward is each one's "
                               "baseline; --micro_batch_size (completions per rank) is a multiple of it",
                            resume=(MUST_MATCH, "the groups each step learns from"))
    temperature: float = flag(1.0, "sampling temperature of the completions (and of held-out pass@k)",
                              resume=(MAY_CHANGE, NEXT_STEPS))
    top_k: int | None = flag(None, "sample from the k most likely tokens only (omitted: all)",
                             resume=(MAY_CHANGE, NEXT_STEPS))
    max_new_tokens: int | None = flag(None, "tokens per completion at most (omitted: arithmetic 8, gsm8k 256)",
                                      resume=(MAY_CHANGE, NEXT_STEPS))
    normalize_advantages: bool = flag(True, "divide each advantage by its group's reward standard deviation "
                                            "(GRPO's form); --no-normalize_advantages: the reward minus the group "
                                            "mean alone (Dr. GRPO, nanochat)", resume=(MAY_CHANGE, NEXT_STEPS))

    def __post_init__(self):
        check_flags(self, "rl")
        require(self.num_samples >= 2, "rl", "num_samples", self.num_samples,
                "2 or more: a completion's advantage is its reward against the others' of the same prompt")
        require(self.temperature > 0, "rl", "temperature", self.temperature,
                "a positive number: greedy completions of one prompt are all alike and teach nothing")
        require(self.top_k is None or self.top_k > 1, "rl", "top_k", self.top_k, "2 or more, or omitted (all)")
        require(self.max_new_tokens is None or self.max_new_tokens > 0, "rl", "max_new_tokens",
                self.max_new_tokens, "a positive integer")
        if self.max_new_tokens is None:
            self.max_new_tokens = RL_MAX_NEW_TOKENS[self.task]


def resume_rules() -> list[tuple[str, str, str]]:
    """(flag, MAY_CHANGE or MUST_MATCH, why) for every training flag, in --help order."""
    rules = []
    for cls in (DataConfig, TrainConfig, CheckpointConfig, AdapterConfig, RLConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("resume") is None:
                raise ValueError(f"--{f.name} ({cls.__name__}): say what a resume may do with it: "
                                 f"flag(..., resume=(MAY_CHANGE or MUST_MATCH, why))")
            rules.append((f"--{f.name}", *f.metadata["resume"]))
    return rules


def resume_rules_markdown() -> str:
    """The README's table of what a resume may change, generated from the flags' own classification."""
    rows = ["| flag | on resume | what it decides |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {rule} | {why} |" for name, rule, why in resume_rules()]
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Batch:
    """The batch arithmetic, once, with one name per quantity (as in logs and checkpoints)."""
    micro_batch_size: int   # sequences per rank per forward/backward
    grad_accum_steps: int   # micro batches per optimizer step
    world_size: int         # ranks
    context_length: int     # tokens per sequence

    @property
    def sequences_per_micro_step(self) -> int:
        """Sequences all ranks consume in one micro step (what a data loader's global position advances by)."""
        return self.micro_batch_size * self.world_size

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step, over all ranks."""
        return self.sequences_per_micro_step * self.grad_accum_steps

    @property
    def global_batch_tokens(self) -> int:
        """Tokens per optimizer step, over all ranks."""
        return self.global_batch_size * self.context_length

    def ds_values(self, grad_clip: float) -> dict:
        """The DeepSpeed JSON keys the run owns (engine.OWNED_KEYS), with this run's values."""
        return {"train_micro_batch_size_per_gpu": self.micro_batch_size,
                "gradient_accumulation_steps": self.grad_accum_steps,
                "train_batch_size": self.global_batch_size, "gradient_clipping": grad_clip}


# The flag that owns each DeepSpeed JSON key of Batch.ds_values (train_batch_size: their product).
DS_KEY_FLAGS = {"train_micro_batch_size_per_gpu": "--micro_batch_size", "gradient_accumulation_steps":
                "--grad_accum_steps", "gradient_clipping": "--grad_clip"}


def ds_conflict_message(path: Path, key: str, given, wanted, batch: Batch) -> str:
    """A DeepSpeed JSON value that disagrees with the run's, phrased with the flags that own it."""
    if key == "train_batch_size":
        return (f"{path}: train_batch_size = {given!r}, but batch arithmetic gives micro batch "
                f"{batch.micro_batch_size} x grad accumulation {batch.grad_accum_steps} x world size "
                f"{batch.world_size} = {wanted}; set \"train_batch_size\": \"auto\" or choose "
                f"--micro_batch_size/--grad_accum_steps whose product with the world size is {given}")
    return (f"{path}: {key} = {given!r} conflicts with {DS_KEY_FLAGS[key]} {wanted}; set \"{key}\": \"auto\" "
            f"(the run owns it) or pass {DS_KEY_FLAGS[key]} {given}")


def default_ds_config_name() -> str:
    # bf16 is the default precision, but CPUs without bf16 units run it ~80x slower than fp32.
    return "zero2" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "zero2_fp32"


def resolve_ds_config_path(name_or_path: str | None) -> Path:
    """--deepspeed_config: a path to a JSON file, or the name of one in ds_configs/ ("zero2" or
    "zero2.json"); None: the default for this machine."""
    path = Path(name_or_path or default_ds_config_name())
    if path.is_file():
        return path
    for folder in (DS_CONFIGS_DIR, INSTALLED_DS_CONFIGS_DIR):
        candidate = folder / (path.name if path.suffix == ".json" else f"{path.name}.json")
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json")) if DS_CONFIGS_DIR.is_dir() else []
    raise UserError(f"--deepspeed_config {name_or_path!r}: no such file, nor a name in ds_configs/ "
                    f"({', '.join(names)})")


@dataclass
class RunConfig:
    """Everything one training run needs; built once from the command line."""
    job: str  # "pretrain", "finetune" or "rl"
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # `gptds rl`'s

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.checkpoint_dir or Path(self.train.log_dir) / "checkpoints")

    def batch(self, world_size: int) -> Batch:
        return Batch(self.data.micro_batch_size, self.train.grad_accum_steps, world_size, self.data.context_length)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Defaults that differ between the jobs; the loop is the same. Fine-tuning follows instruction-tuning
# practice: small lr, light weight decay, about one epoch of the data.
JOB_DEFAULTS = {
    "pretrain": {},
    "finetune": dict(lr=3e-5, weight_decay=0.01, warmup_steps=10, max_steps=None, context_length=256,
                     log_dir="runs/finetune", eval_interval=25, generate_interval=50, hellaswag_interval=0,
                     checkpoint_interval=50),
    # RL: a small lr (the policy already answers; each step moves it a little), the batch in completions
    # (-B: 2 prompts x 8 samples per rank), the held-out pass@1/pass@k every 25 steps, every step logged
    "rl": dict(lr=1e-5, weight_decay=0.0, warmup_steps=0, max_steps=100, micro_batch_size=16, log_dir="runs/rl",
               eval_interval=0, eval_task_interval=25, generate_interval=25, hellaswag_interval=0,
               checkpoint_interval=25, log_interval=1),
}


# ---------------------------------------------------------------- flags from fields

def _field_type(cls, f: dataclasses.Field):
    tp = typing.get_type_hints(cls)[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_flags(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One flag per field of dataclass `cls`: --<field> (bools take --<field> / --no-<field>); a field
    marked positional is an argument given by position."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        meta = f.metadata
        default = (defaults or {}).get(f.name, f.default)
        tp = _field_type(cls, f)
        if meta.get("positional"):
            group.add_argument(f.name, type=tp, help=meta["help"], metavar=f.name.upper())
            continue
        names = [f"--{f.name}", *meta.get("aliases", ())] + ([meta["short"]] if meta.get("short") else [])
        required = meta.get("required", False)
        help_text = meta["help"] + ("" if required else f" (default: {default})")
        if tp is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif typing.get_origin(tp) is list:
            (item_type,) = typing.get_args(tp)
            group.add_argument(*names, dest=f.name, type=item_type, nargs="+", default=default, help=help_text,
                               metavar=f.name.upper())
        else:
            group.add_argument(*names, dest=f.name, type=tp, default=default, choices=meta.get("choices"),
                               required=required, help=help_text,
                               metavar=f.name.upper() if not meta.get("choices") else None)


def from_flags(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name in vars(args)})


def add_run_flags(parser: argparse.ArgumentParser, job: str) -> None:
    for cls in (DataConfig, TrainConfig, CheckpointConfig, AdapterConfig) + ((RLConfig,) if job == "rl" else ()):
        add_flags(parser, cls, JOB_DEFAULTS[job])


def run_config_from_flags(job: str, args: argparse.Namespace) -> RunConfig:
    return RunConfig(job=job, data=from_flags(DataConfig, args), train=from_flags(TrainConfig, args),
                     checkpoint=from_flags(CheckpointConfig, args), lora=from_flags(AdapterConfig, args),
                     rl=from_flags(RLConfig, args))
