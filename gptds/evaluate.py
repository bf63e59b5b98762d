"""Evaluation: validation loss and bits per byte over a prepared split; the tasks of tasks.py scored by
log-likelihood (multiple choice) or by generation (GSM8K); `gptds evaluate`. Items are split across
ranks, and every rank runs the same number of forwards, as ZeRO-3 needs (parameters are gathered
collectively at each forward).

Scoring is batched: an item's context is computed once and shared by its choices (the context and every
choice but its last token packed into one sequence, each choice attending to the context and to itself),
several items are packed into each row, and the output layer runs only where a choice's token is predicted.
The numbers are the harness's: the same tokens are scored from the same positions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gptds import dist, tasks
from gptds.config import check_flags, flag, require
from gptds.data.chat import chat_format_of
from gptds.data.loaders import build_loader
from gptds.errors import UserError
from gptds.generate import generate_batch
from gptds.metrics import Progress
from gptds.tasks import MAX_GEN_TOKENS
from gptds.tokenizer import EOT_ID, decode, get_tokenizer
from gptds.weights import load_model

LN2 = math.log(2)


# ---------------------------------------------------------------- validation loss and bits per byte

def token_byte_lengths(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(vocab_size,) UTF-8 bytes of each token; 0 for special tokens (<|endoftext|>, and any token past
    GPT-2's BPE), which bits per byte leaves out."""
    enc = get_tokenizer()
    lengths = [len(enc.decode_single_token_bytes(t)) if t < EOT_ID else 0 for t in range(vocab_size)]
    return torch.tensor(lengths, dtype=torch.long, device=device)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Negative log-likelihood in nats (B, T) of targets (B, T) under logits (B, T, V), computed in fp32 a
    chunk of positions at a time (no full-size fp32 copy of bf16 logits, and no copy at all of logits that
    are a view of padded ones); 0 where the target is -100."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for b in range(targets.size(0)):
        for start in range(0, targets.size(1), chunk):
            span = slice(start, start + chunk)
            out[b, span] = F.cross_entropy(logits[b, span].float(), targets[b, span], ignore_index=-100,
                                           reduction="none")
    return out


@torch.no_grad()
def validation_metrics(forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       loader, num_batches: int, device: torch.device, vocab_size: int) -> dict:
    """val_loss (mean loss over num_batches batches per rank from the split's start, averaged over ranks)
    and val_bpb over the same tokens: the summed negative log-likelihood in bits of the target tokens
    divided by their UTF-8 bytes, special tokens (and -100 targets) left out of both sums (nanochat's
    definition, comparable across tokenizers). forward(x, y) -> (logits, mean loss)."""
    loader.reset()
    token_bytes = token_byte_lengths(vocab_size, device)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # batch losses, nats, bytes
    for _ in range(num_batches):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        logits, loss = forward(x, y)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # (B, T)
        nll = token_nll(logits, y)
        sums += torch.stack([loss.double(), (nll.double() * (nbytes > 0)).sum(), nbytes.sum().double()])
    loss_sum, nats, nbytes = dist.all_reduce_sum(sums).tolist()
    return {"val_loss": loss_sum / (num_batches * dist.info().world_size),
            "val_bpb": nats / (LN2 * nbytes) if nbytes else float("nan")}


# ---------------------------------------------------------------- multiple choice: packed scoring

@dataclass
class _Group:
    """A context and the continuations that share it: packed as context + each continuation but its
    last token; continuation k's first token is predicted at the context's last position."""
    context: list[int]
    continuations: list[list[int]]
    keys: list[tuple[int, int]]  # (item, choice) of each continuation

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def choice_groups(item_index: int, item: tasks.ChoiceItem, block_size: int) -> list[_Group]:
    """An item's requests (context, " " + choice), tokenised and truncated as the harness does: the model
    sees (context + continuation)[-(block_size + 1):][:-1]. Choices whose truncated contexts agree share
    one group; a group longer than block_size is split into one group per choice."""
    by_context: dict[tuple[int, ...], _Group] = {}
    for k, choice in enumerate(item.choices):
        ctx, cont = tasks.encode_pair(item.context, tasks.TARGET_DELIMITER + choice)
        if not cont or len(cont) > block_size:
            raise UserError(f"choice {choice!r} is {len(cont)} tokens: it must be 1 to block_size ({block_size})")
        ctx = (ctx + cont)[-(block_size + 1):][:-len(cont)]  # what the model reads before the continuation
        group = by_context.setdefault(tuple(ctx), _Group(ctx, [], []))
        group.continuations.append(cont)
        group.keys.append((item_index, k))
    groups = []
    for g in by_context.values():
        if len(g) <= block_size:
            groups.append(g)
        else:
            groups += [_Group(g.context, [c], [key]) for c, key in zip(g.continuations, g.keys)]
    return groups


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    group_ids: list[int] = field(default_factory=list)   # which group each token belongs to
    branch_ids: list[int] = field(default_factory=list)  # 0: the group's context; k + 1: continuation k
    # per continuation: (key, indices in this row of the positions predicting its tokens, its tokens)
    targets: list[tuple[tuple[int, int], list[int], list[int]]] = field(default_factory=list)

    def add(self, group: _Group, group_id: int) -> None:
        start, n_ctx = len(self.tokens), len(group.context)
        self.tokens += group.context
        self.positions += range(n_ctx)
        self.group_ids += [group_id] * n_ctx
        self.branch_ids += [0] * n_ctx
        for k, (cont, key) in enumerate(zip(group.continuations, group.keys)):
            first = len(self.tokens)
            self.tokens += cont[:-1]
            self.positions += range(n_ctx, n_ctx + len(cont) - 1)
            self.group_ids += [group_id] * (len(cont) - 1)
            self.branch_ids += [k + 1] * (len(cont) - 1)
            # token 0 is predicted at the context's last position, token j at the branch's token j - 1
            self.targets.append((key, [start + n_ctx - 1] + list(range(first, first + len(cont) - 1)), cont))


def pack_rows(groups: list[_Group], row_tokens: int) -> list[_Row]:
    """Groups packed into rows of at most row_tokens tokens (first fit, longest first)."""
    rows: list[_Row] = []
    for gid, group in enumerate(sorted(groups, key=len, reverse=True)):
        row = next((r for r in rows if len(r.tokens) + len(group) <= row_tokens), None)
        if row is None:
            row = _Row()
            rows.append(row)
        row.add(group, gid)
    return rows


def _batch_tensors(rows: list[_Row], device: torch.device) -> dict:
    """Padded (B, T) tokens and positions, the (B, T, T) attention mask (a token sees the earlier tokens
    of its own group's context and of its own branch; padding sees itself) and the (B, T) positions whose
    logits are wanted."""
    T = max(len(r.tokens) for r in rows)
    B = len(rows)
    tokens = torch.full((B, T), EOT_ID, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    group = -torch.arange(1, B * T + 1, dtype=torch.long).view(B, T)  # padding: a group of its own
    branch = torch.zeros((B, T), dtype=torch.long)
    wanted = torch.zeros((B, T), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        tokens[b, :n] = torch.tensor(r.tokens)
        positions[b, :n] = torch.tensor(r.positions)
        group[b, :n] = torch.tensor(r.group_ids)
        branch[b, :n] = torch.tensor(r.branch_ids)
        for _, where, _ in r.targets:
            wanted[b, where] = True
    tokens, positions, group, branch, wanted = (t.to(device) for t in (tokens, positions, group, branch, wanted))
    causal = torch.ones((T, T), dtype=torch.bool, device=device).tril()
    mask = (group[:, :, None] == group[:, None, :]) & causal \
        & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
    return dict(idx=tokens, positions=positions, attn_mask=mask, logits_at=wanted)


def _dummy_batch(device: torch.device) -> dict:
    """One token, for the forwards a rank runs only to keep ZeRO-3 ranks in step."""
    return dict(idx=torch.full((1, 1), EOT_ID, dtype=torch.long, device=device),
                positions=torch.zeros((1, 1), dtype=torch.long, device=device),
                attn_mask=torch.ones((1, 1, 1), dtype=torch.bool, device=device),
                logits_at=torch.ones((1, 1), dtype=torch.bool, device=device))


def forwards_in_step(batches: int) -> int:
    """The most forwards any rank has to run; every rank runs that many."""
    return max(dist.all_gather_object(batches))


@torch.no_grad()
def score_choices(model: torch.nn.Module, items: list[tasks.ChoiceItem], block_size: int, device: torch.device,
                  rows_per_forward: int = 8, progress: Progress | None = None) -> dict[tuple[int, int], tuple]:
    """(item, choice) -> (total log-likelihood, continuation tokens) of this rank's items: items[i] for
    i = rank, rank + world_size, ... Every rank runs the same number of forwards."""
    info = dist.info()
    mine = list(range(info.rank, len(items), info.world_size))
    groups = [g for i in mine for g in choice_groups(i, items[i], block_size)]
    rows = pack_rows(groups, block_size)
    batches = [rows[i:i + rows_per_forward] for i in range(0, len(rows), rows_per_forward)]
    out: dict[tuple[int, int], tuple] = {}
    for step in range(forwards_in_step(len(batches))):
        if step >= len(batches):
            model(**_dummy_batch(device))
            continue
        batch = batches[step]
        logits, _ = model(**_batch_tensors(batch, device))  # (N, V): the wanted positions, row-major
        wanted = sorted({(b, w) for b, r in enumerate(batch) for _, where, _ in r.targets for w in where})
        row_of = {bw: n for n, bw in enumerate(wanted)}
        rows, targets, segment, keys = [], [], [], []
        for b, r in enumerate(batch):
            for key, where, cont in r.targets:
                rows += [row_of[(b, w)] for w in where]
                targets += cont
                segment += [len(keys)] * len(cont)
                keys.append((key, len(cont)))
        rows_t, targets_t = torch.tensor(rows, device=logits.device), torch.tensor(targets, device=logits.device)
        logprobs = logits[rows_t, targets_t].float() - torch.logsumexp(logits.float(), dim=-1)[rows_t]  # (M,)
        totals = torch.zeros(len(keys), dtype=torch.float64, device=logits.device).index_add_(
            0, torch.tensor(segment, device=logits.device), logprobs.double())
        for (key, n), total in zip(keys, totals.tolist()):
            out[key] = (total, n)
        if progress:
            progress.update(len({key[0] for key in out}) * info.world_size - progress.n)
    return out


def choice_metrics(task: tasks.Task, scores: dict[tuple[int, int], tuple]) -> dict:
    """acc, acc_norm and acc_norm_token of the task (MMLU: acc per subject, macro and item-weighted
    means), from every rank's scores (gathered here)."""
    merged: dict[tuple[int, int], tuple] = {}
    for part in dist.all_gather_object(scores):
        merged.update(part)
    correct = {"acc": [], "acc_norm": [], "acc_norm_token": []}
    for i, item in enumerate(task.items):
        lls = [merged[(i, k)][0] for k in range(len(item.choices))]
        ntok = [merged[(i, k)][1] for k in range(len(item.choices))]
        correct["acc"].append(_argmax(lls) == item.answer)
        correct["acc_norm"].append(_argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.answer)
        correct["acc_norm_token"].append(_argmax([ll / n for ll, n in zip(lls, ntok)]) == item.answer)
    name, n = task.name, len(task.items)
    if name != "mmlu":
        return {**{f"{name}_{m}": sum(v) / n for m, v in correct.items()}, f"{name}_n": n}
    subjects: dict[str, list[bool]] = {}
    for item, ok in zip(task.items, correct["acc"]):
        subjects.setdefault(item.subject, []).append(ok)
    per_subject = {s: sum(v) / len(v) for s, v in sorted(subjects.items())}
    return {"mmlu_acc": sum(per_subject.values()) / len(per_subject), "mmlu_acc_micro": sum(correct["acc"]) / n,
            "mmlu_n": n, **{f"mmlu_{s}_acc": a for s, a in per_subject.items()}}


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's argmax, as the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------- generation tasks

@torch.no_grad()
def generation_metrics(model: torch.nn.Module, task: tasks.Task, block_size: int, device: torch.device,
                       fmt: tasks.PromptFormat = tasks.PLAIN, num_samples: int = 0, temperature: float = 0.8,
                       top_k: int | None = None, seed: int = 1337, gen_batch_size: int = 32,
                       max_new_tokens: int = tasks.MAX_GEN_TOKENS, progress: Progress | None = None) -> dict:
    """pass@1 of greedy answers (flexible-extract, and strict-match as `<task>_pass@1_strict`), and with
    num_samples n > 0 pass@n from n sampled answers per item (Chen et al.'s estimator). Prompts are cut
    from the left to leave max_new_tokens (at most half the context) for the answer, as the harness does."""
    info = dist.info()
    max_new = min(max_new_tokens, block_size // 2)
    mine = list(range(info.rank, len(task.items), info.world_size))
    prompts = [fmt.render(task.items[i])[-(block_size - max_new):] for i in mine]
    per_rank = math.ceil(len(task.items) / info.world_size)  # equal on every rank: same number of batches
    generator = torch.Generator(device=device).manual_seed(seed + info.rank)

    def answers(repeat: int, temp: float, progress: Progress | None) -> list[str]:
        rows = [p for p in prompts for _ in range(repeat)]
        texts = []
        for start in range(0, per_rank * repeat, gen_batch_size):
            chunk = rows[start:start + gen_batch_size]
            out = generate_batch(model, chunk, max_new, temperature=temp, top_k=top_k, generator=generator,
                                 stop_tokens=fmt.stop_tokens, stop_strings=fmt.stop_strings, device=device)
            texts += [tasks.cut_at_stop(decode(t), fmt.stop_strings) for t in out]
            if progress:
                progress.update(min(min(len(texts) // repeat, len(mine)) * info.world_size, progress.total)
                                - progress.n)
        return texts

    greedy = answers(1, 0.0, progress)
    results = [(i, tasks.is_correct(g, task.items[i].reference), tasks.is_correct(g, task.items[i].reference, True))
               for i, g in zip(mine, greedy)]
    if num_samples:
        sampled = answers(num_samples, temperature, progress and Progress(
            progress.total, f"{task.name} pass@{num_samples}", "items", progress.enabled, progress.write))
        results = [(*r, sum(tasks.is_correct(a, task.items[r[0]].reference)
                            for a in sampled[j * num_samples:(j + 1) * num_samples])) for j, r in enumerate(results)]
    merged = [r for part in dist.all_gather_object(results) for r in part]
    n, name = len(merged), task.name
    out = {f"{name}_pass@1": sum(r[1] for r in merged) / n, f"{name}_pass@1_strict": sum(r[2] for r in merged) / n}
    if num_samples:
        out[f"{name}_pass@{num_samples}"] = sum(tasks.pass_at_k(num_samples, r[3], num_samples) for r in merged) / n
    return {**out, f"{name}_n": n}


def run_task(model: torch.nn.Module, task: tasks.Task, block_size: int, device: torch.device,
             show_progress: bool = False, rows_per_forward: int = 8,
             progress_write: Callable[[str], None] | None = None, **generation) -> dict:
    """The metrics of one task (every rank calls this with the same task; items are split across ranks);
    progress on rank 0's stderr, or through progress_write (the training console); `generation`:
    generation_metrics' settings."""
    progress = Progress(len(task.items), task.name, "items", show_progress and dist.info().is_main,
                        write=progress_write)
    if task.kind == "choice":
        result = choice_metrics(task, score_choices(model, task.items, block_size, device, rows_per_forward,
                                                    progress))
    else:
        result = generation_metrics(model, task, block_size, device, progress=progress, **generation)
    if progress.n < progress.total:
        progress.update(progress.total - progress.n)
    return result


# ---------------------------------------------------------------- `gptds evaluate`

@dataclass
class EvaluateConfig:
    """`gptds evaluate`'s settings (the names of the training flags that do the same)."""
    checkpoint: str = flag(None, "anything `gptds generate` accepts", required=True)
    tasks: str | None = flag(None, f"comma-separated tasks: {', '.join(tasks.TASK_NAMES)}, or a name given a file "
                                   "by --task_file (omitted: hellaswag, and bpb with --data_dir)")
    limit: int = flag(0, "score at most the first N items of each task (MMLU: of each subject; 0: all)")
    num_fewshot: int | None = flag(None, "few-shot examples in each prompt (omitted: each task's lm-evaluation-"
                                         "harness default: gsm8k 5, the others 0)")
    num_samples: int = flag(0, "GSM8K: also sample this many answers per item for pass@N (0: greedy only)")
    temperature: float = flag(0.8, "sampling temperature of the --num_samples answers")
    top_k: int | None = flag(None, "sample the --num_samples answers from the k most likely tokens (omitted: all)")
    max_new_tokens: int = flag(MAX_GEN_TOKENS, "GSM8K: answer tokens at most (and at most half the context)")
    seed: int = flag(1337, "seed of the sampled answers")
    task_file: list[str] | None = flag(None, "TASK=PATH: the task's items from PATH in its dataset's layout (the "
                                             "full sets); TASK_fewshot=PATH: its few-shot split; a new name: a "
                                             "multiple-choice task in the generic layout")
    hellaswag_file: str | None = flag(None, "HellaSwag JSONL (ctx or ctx_a/ctx_b, endings, label); omitted: the "
                                            "bundled sample (same as --task_file hellaswag=PATH)")
    hellaswag_limit: int = flag(0, "score at most this many HellaSwag items (0: --limit)")
    data_dir: str | None = flag(None, "prepared dataset: bpb and val_loss of its val split")
    batch_size: int = flag(8, "sequences per forward: validation batches and packed scoring rows of block_size "
                              "tokens", short="-B")
    gen_batch_size: int = flag(32, "GSM8K: answers generated together (one KV cache; decoding is a step per token, "
                                   "so wider is faster until memory or compute is full)")
    context_length: int | None = flag(None, "tokens per validation sequence (omitted: the model's block_size)",
                                      short="-T")
    eval_batches: int = flag(20, "validation batches")

    def __post_init__(self):
        check_flags(self, "evaluate")
        for name in ("limit", "hellaswag_limit", "num_samples"):
            require(getattr(self, name) >= 0, "evaluate", name, getattr(self, name), "0 (all) or more")
        for name in ("batch_size", "gen_batch_size", "eval_batches", "max_new_tokens"):
            require(getattr(self, name) > 0, "evaluate", name, getattr(self, name), "a positive integer")
        require(self.num_fewshot is None or self.num_fewshot >= 0, "evaluate", "num_fewshot", self.num_fewshot,
                "0 or more, or omitted for each task's default")
        require(self.temperature > 0, "evaluate", "temperature", self.temperature, "a positive number")
        require(self.top_k is None or self.top_k > 0, "evaluate", "top_k", self.top_k,
                "a positive integer, or omitted for all tokens")
        require(self.context_length is None or self.context_length > 0, "evaluate", "context_length",
                self.context_length, "a positive integer, or omitted for the model's block_size")


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict:
    """`gptds evaluate`: the tasks' metrics of any model path, as one dict (keys <task>_<metric>)."""
    files = tasks.parse_task_files(cfg.task_file)
    if cfg.hellaswag_file:
        files["hellaswag"] = cfg.hellaswag_file
    names = tasks.task_names(cfg.tasks, files) if cfg.tasks else ["hellaswag"] + (["bpb"] if cfg.data_dir else [])
    if "bpb" in names and not cfg.data_dir:
        raise UserError("task bpb needs --data_dir (a prepared dataset with a val split)")
    loaded = tasks.load_tasks(names, files, cfg.limit, cfg.num_fewshot, {"hellaswag": cfg.hellaswag_limit})
    info = dist.init_distributed()
    model = load_model(cfg.checkpoint).to(info.device).eval()
    block = model.config.block_size
    fmt = tasks.prompt_format(chat_format_of(model.config))  # a chat model is asked in its turns
    result: dict = {} if cfg.tasks else {"val_loss": None}
    for task in loaded:
        result.update(run_task(model, task, block, info.device, show_progress=True,
                               rows_per_forward=cfg.batch_size, fmt=fmt, num_samples=cfg.num_samples,
                               temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
                               gen_batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens))
    if "bpb" in names:
        T = cfg.context_length or block
        if T > block:
            raise UserError(f"--context_length {T} exceeds the model's block_size {block}")
        loader = build_loader(cfg.data_dir, "val", cfg.batch_size, T, info.rank, info.world_size, seed=0,
                              shuffle=False)
        val = validation_metrics(lambda x, y: model(x, y), loader, cfg.eval_batches, info.device,
                                 model.config.vocab_size)
        result.update(val_loss=val["val_loss"], bpb=val["val_bpb"])
    return result
