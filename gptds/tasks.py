"""The evaluation tasks, defined as lm-evaluation-harness 0.4 defines them: readers of each dataset's
layout (a bad line is refused with file:line), the prompts (zero- and k-shot, built character for character
as the harness builds them), and the scoring of generated answers (GSM8K's answer extraction and
exact match, pass@k). Running a model on them is evaluate.py's job.

A multiple-choice task becomes ChoiceItems (the context the model reads, the choices, the answer index):
each choice is scored as the continuation " " + choice, `acc` takes the highest total log-likelihood and
`acc_norm` the highest total / len(choice) in characters (the space not counted), as the harness does.
Any dataset converts to the generic JSONL layout {"question" or "context", "choices", "answer"}."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gptds.data.chat import CHAT_FORMAT, Message, prompt_tokens
from gptds.data.sources import iter_hub_records
from gptds.errors import UserError, parse_json
from gptds.tokenizer import ASSETS_DIR, EOT_ID, IM_END, IM_END_ID, encode, is_blank

TARGET_DELIMITER = " "    # between a prompt and its answer (the harness's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # after each few-shot example (fewshot_delimiter)
FEWSHOT_SEED = 1234       # the harness's default fewshot_random_seed; a fresh Random(1234) per task
MAX_GEN_TOKENS = 256      # the harness's max_gen_toks for generation tasks


@dataclass
class ChoiceItem:
    """A multiple-choice item: the model reads `context`; each choice is scored as " " + choice."""
    context: str
    choices: list[str]
    answer: int
    subject: str = ""  # MMLU's subject, for the per-subject scores


@dataclass
class GenItem:
    """A generation item: the prompt, the reference the answer is checked against, and the parts the
    prompt was made of (for a chat format, which renders them as turns instead: the bare question as the
    user's turn, as a chat model fine-tuned on such records (prepare chat's gsm8k layout, rl.py) reads it)."""
    prompt: str
    reference: str
    question: str
    shots: list[tuple[str, str]] = field(default_factory=list)  # (question, answer text)


@dataclass
class Task:
    name: str
    kind: str     # "choice" (scored by log-likelihood) or "generate"
    items: list   # ChoiceItem or GenItem
    num_fewshot: int


# ---------------------------------------------------------------- reading files

def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line; errors name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {e.start}: not valid UTF-8") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = parse_json(line, f"{path}:{lineno}")
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}")
        rows.append((lineno, doc))
    if not rows:
        raise UserError(f"{path}: no {what} items")
    return rows


HUB_PREFIX = "hub:"  # --task_file TASK=hub:NAME:CONFIG:SPLIT reads a Hugging Face dataset (needs the hub)


def read_rows(source: str | Path, what: str) -> list[tuple[str, dict]]:
    """(where, object) of every item of a JSONL file ("path:line") or of a hub dataset given as
    hub:NAME:CONFIG:SPLIT (CONFIG may be empty), e.g. hub:allenai/ai2_arc:ARC-Easy:test."""
    source = str(source)
    if not source.startswith(HUB_PREFIX):
        return [(f"{source}:{lineno}", doc) for lineno, doc in read_jsonl(Path(source), what)]
    parts = source[len(HUB_PREFIX):].split(":")
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise UserError(f"{source}: expected hub:NAME:CONFIG:SPLIT, e.g. hub:allenai/ai2_arc:ARC-Easy:test or "
                        f"hub:openai/gsm8k:main:test (CONFIG may be empty)")
    name, config, split = parts
    return [(where, dict(doc)) for doc, where in iter_hub_records(name, config or None, split, streaming=False)]


def _field(doc: dict, name: str, kind, where: str):
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise UserError(f"{where}: field {name!r} missing or not a {' or '.join(k.__name__ for k in kinds)}")
    return value


def _text(value, name: str, where: str) -> str:
    """A context or question: a string with some visible text (a blank one would score the choices alone)."""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} missing or not a string")
    if is_blank(value):
        raise UserError(f"{where}: {name} is empty or blank; every item needs a context or question")
    return value


def _strings(doc: dict, name: str, where: str, count: int | None = None) -> list[str]:
    value = _field(doc, name, list, where)
    if not all(isinstance(v, str) for v in value) or len(value) < 2 or (count and len(value) != count):
        raise UserError(f"{where}: field {name!r} must be a list of {count or 'at least 2'} strings")
    blank = [i for i, v in enumerate(value) if is_blank(v)]
    if blank:  # a blank choice is scored on a lone space (or nothing) and can win: it would count as correct
        raise UserError(f"{where}: {name}[{blank[0]}] is empty or blank; every choice needs some text")
    return value


def _index(value, n: int, name: str, where: str) -> int:
    """An answer index given as an int, a digit string, or a letter A, B, ..."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        value = ord(value.strip().upper()) - ord("A")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise UserError(f"{where}: field {name!r} = {value!r} is not an answer index in 0..{n - 1}")
    return value


# ---------------------------------------------------------------- the tasks, as the harness writes them

def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py: strip, drop WikiHow's [bracket] markers, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(doc: dict, where: str) -> dict:
    """The harness's process_docs: query = preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()). A file with `ctx` alone (ctx_a and ctx_b already joined, as in gptds's sample)
    uses ctx as it is: ctx_b's first letter keeps its case. No activity_label: the context alone."""
    endings = _strings(doc, "endings", where)
    if isinstance(doc.get("ctx_a"), str) and isinstance(doc.get("ctx_b"), str):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    else:
        ctx = _field(doc, "ctx", str, where)
    _text(ctx, "ctx", where)
    label = doc.get("activity_label")
    query = hellaswag_preprocess(f"{label}: {ctx}" if isinstance(label, str) else ctx)
    return {"query": query, "choices": [hellaswag_preprocess(e) for e in endings],
            "gold": _index(doc.get("label"), len(endings), "label", where)}


def parse_arc(doc: dict, where: str) -> dict:
    """Hugging Face ai2_arc ({question, choices: {text, label}, answerKey}) or AI2's original layout
    ({question: {stem, choices: [{text, label}]}, answerKey})."""
    question = doc.get("question")
    if isinstance(question, dict):  # the original ARC JSONL
        choices = question.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise UserError(f"{where}: field 'question.choices' must be a list of {{text, label}}")
        question, texts, labels = question.get("stem"), [c.get("text") for c in choices], \
            [c.get("label") for c in choices]
    else:
        choices = _field(doc, "choices", dict, where)
        texts, labels = choices.get("text"), choices.get("label")
    _text(question, "question", where)
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2 \
            or not all(isinstance(t, str) for t in texts + labels):
        raise UserError(f"{where}: choices need as many string texts as labels (at least 2)")
    blank = [i for i, t in enumerate(texts) if is_blank(t)]
    if blank:
        raise UserError(f"{where}: choices.text[{blank[0]}] is empty or blank; every choice needs some text")
    key = _field(doc, "answerKey", str, where)
    if key not in labels:
        raise UserError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return {"question": question, "choices": texts, "gold": labels.index(key)}


def parse_mmlu(doc: dict, where: str) -> dict:
    choices = _strings(doc, "choices", where, count=4)
    return {"question": _text(doc.get("question"), "question", where), "subject": _field(doc, "subject", str, where),
            "choices": choices, "gold": _index(doc.get("answer"), 4, "answer", where)}


def parse_gsm8k(doc: dict, where: str) -> dict:
    answer = _field(doc, "answer", str, where)
    if "####" not in answer:
        raise UserError(f"{where}: field 'answer' has no '#### N' final answer")
    return {"question": _text(doc.get("question"), "question", where), "answer": answer}


def parse_generic(doc: dict, where: str) -> dict:
    """The generic multiple-choice layout: "context" (read verbatim) or "question" (rendered as ARC's
    "Question: ...\\nAnswer:"), "choices" (each scored as " " + choice) and "answer" (index)."""
    choices = _strings(doc, "choices", where)
    if isinstance(doc.get("context"), str):
        context = _text(doc["context"], "context", where)
    elif isinstance(doc.get("question"), str):
        context = f"Question: {_text(doc['question'], 'question', where)}\nAnswer:"
    else:
        raise UserError(f"{where}: needs a string field 'context' or 'question'")
    return {"context": context, "choices": choices, "gold": _index(doc.get("answer"), len(choices), "answer", where)}


@dataclass(frozen=True)
class TaskSpec:
    """One task as the harness's YAML writes it: doc_to_text, doc_to_choice, the few-shot target,
    the description, the few-shot sampler and split, the default number of shots."""
    kind: str                              # "choice" or "generate"
    parse: Callable[[dict, str], dict]     # a file's line -> the harness's processed doc
    text: Callable[[dict], str]            # doc_to_text
    target: Callable[[dict], str]          # the answer text of a few-shot example
    choices: Callable[[dict], list[str]] = lambda d: d["choices"]
    description: Callable[[dict], str] = lambda d: ""
    sample: str | None = None              # bundled file in gptds/assets
    fewshot_sample: str | None = None      # bundled file of the few-shot split
    first_n: bool = False                  # few-shot examples: the split's first n (else drawn at random)
    draw_extra: bool = False               # draw k + 1 and drop the doc even from another split (see below)
    num_fewshot: int = 0


def question_answer(d: dict) -> str:
    return f"Question: {d['question']}\nAnswer:"


SPECS: dict[str, TaskSpec] = {
    # HellaSwag has no test split in the harness: its few-shot split (None) "equals" the test split (None),
    # so the harness draws k + 1 examples and drops the doc whatever split they come from.
    "hellaswag": TaskSpec("choice", parse_hellaswag, lambda d: d["query"], lambda d: d["choices"][d["gold"]],
                          sample="hellaswag_sample.jsonl", draw_extra=True),
    "arc_easy": TaskSpec("choice", parse_arc, question_answer, lambda d: d["choices"][d["gold"]],
                         sample="arc_easy_sample.jsonl"),
    "arc_challenge": TaskSpec("choice", parse_arc, question_answer, lambda d: d["choices"][d["gold"]],
                              sample="arc_challenge_sample.jsonl"),
    "mmlu": TaskSpec("choice", parse_mmlu,
                     lambda d: f"{d['question'].strip()}\n" + "".join(f"{letter}. {c}\n" for letter, c in
                                                                    zip("ABCD", d["choices"])) + "Answer:",
                     lambda d: "ABCD"[d["gold"]], choices=lambda d: ["A", "B", "C", "D"],
                     description=lambda d: "The following are multiple choice questions (with answers) about "
                                           f"{d['subject'].replace('_', ' ')}.\n\n",
                     sample="mmlu_sample.jsonl", fewshot_sample="mmlu_dev_sample.jsonl", first_n=True),
    "gsm8k": TaskSpec("generate", parse_gsm8k, question_answer, lambda d: d["answer"],
                      sample="gsm8k_sample.jsonl", fewshot_sample="gsm8k_train_sample.jsonl", num_fewshot=5),
    # gptds's own: sums of two small numbers in GSM8K's layout, the held-out split of `gptds rl`'s built-in task
    "arithmetic": TaskSpec("generate", parse_gsm8k, question_answer, lambda d: d["answer"],
                           sample="arithmetic_test.jsonl"),
}
GENERIC = TaskSpec("choice", parse_generic, lambda d: d["context"], lambda d: d["choices"][d["gold"]])
TASK_NAMES = ("bpb", *SPECS)  # bpb is the validation split's bits per byte (evaluate.py)
FEWSHOT_SUFFIX = "_fewshot"   # --task_file TASK_fewshot=PATH: the split few-shot examples come from


def parse_task_files(entries: list[str] | None) -> dict[str, str]:
    """--task_file TASK=PATH entries -> {TASK: PATH}. TASK is a named task, TASK_fewshot (its few-shot
    split: MMLU's dev, GSM8K's train), or a new name: a multiple-choice task in the generic layout. PATH is
    a JSONL file, or hub:NAME:CONFIG:SPLIT for a Hugging Face dataset."""
    files = {}
    for entry in entries or []:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise UserError(f"--task_file {entry!r}: expected TASK=PATH, e.g. arc_easy=ARC-Easy-Test.jsonl "
                            f"(TASK: {', '.join(SPECS)}, TASK{FEWSHOT_SUFFIX}, or a new name for a file in the "
                            f"generic layout)")
        if name == "bpb":
            raise UserError("--task_file bpb=...: bits per byte is measured on --data_dir's validation split")
        files[name] = path
    return files


def task_names(tasks: str, files: dict[str, str]) -> list[str]:
    """The comma-separated --tasks, checked: named tasks, or names given a file by --task_file."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    for name in names:
        if name not in TASK_NAMES and name not in files:
            raise UserError(f"unknown task {name!r}: choose from {', '.join(TASK_NAMES)}, or give a file in the "
                            f"generic multiple-choice layout with --task_file {name}=PATH")
    if len(set(names)) != len(names):
        raise UserError(f"--tasks {tasks!r} names a task twice")
    return names


def load_tasks(names: list[str], files: dict[str, str], limit: int = 0, num_fewshot: int | None = None,
               limits: dict[str, int] | None = None) -> list[Task]:
    """Every task but bpb (measured on a prepared split, not items), all files read and checked before any
    work; limits overrides `limit` for the tasks it names."""
    return [load_task(n, files, (limits or {}).get(n) or limit, num_fewshot) for n in names if n != "bpb"]


def load_task(name: str, files: dict[str, str] | None = None, limit: int = 0,
              num_fewshot: int | None = None) -> Task:
    """Task `name`'s items from --task_file's file or the bundled sample, the first `limit` (0: all;
    MMLU: per subject, as the harness's per-subject tasks), with prompts of num_fewshot examples
    (None: the harness's default for the task)."""
    files = files or {}
    spec = SPECS.get(name, GENERIC)
    path = files.get(name) or (ASSETS_DIR / spec.sample if spec.sample else None)
    if path is None:
        raise UserError(f"task {name!r} has no file: give one with --task_file {name}=PATH")
    docs = [spec.parse(doc, where) for where, doc in read_rows(path, name)]
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    pool_path = files.get(name + FEWSHOT_SUFFIX) or (ASSETS_DIR / spec.fewshot_sample if spec.fewshot_sample
                                                      else None)
    pool = [spec.parse(doc, where) for where, doc in read_rows(pool_path, name)] if pool_path and k else None
    chosen = _limited(docs, limit, by_subject=name == "mmlu")
    shots = fewshot_examples(spec, chosen, pool if pool is not None else docs, k, same_split=pool is None, name=name)
    items = []
    for doc, examples in zip(chosen, shots):
        context = spec.description(doc) + "".join(spec.text(s) + TARGET_DELIMITER + spec.target(s) + FEWSHOT_DELIMITER
                                                  for s in examples) + spec.text(doc)
        if spec.kind == "choice":
            items.append(ChoiceItem(context, spec.choices(doc), doc["gold"], doc.get("subject", "")))
        else:
            items.append(GenItem(context, spec.target(doc), doc["question"],
                                 [(s["question"], spec.target(s)) for s in examples]))
    return Task(name, spec.kind, items, k)


def _limited(docs: list[dict], limit: int, by_subject: bool) -> list[dict]:
    if not limit:
        return docs
    if not by_subject:
        return docs[:limit]
    seen: dict[str, int] = {}
    out = []
    for doc in docs:
        seen[doc["subject"]] = seen.get(doc["subject"], 0) + 1
        if seen[doc["subject"]] <= limit:
            out.append(doc)
    return out


def fewshot_examples(spec: TaskSpec, docs: list[dict], pool: list[dict], k: int, same_split: bool,
                     name: str) -> list[list[dict]]:
    """Each doc's k few-shot examples, drawn as the harness draws them. first_n (MMLU): the first k of
    the few-shot split with the doc's subject. Otherwise one Random(1234) for the task, sampling k
    examples per doc in the docs' order; when the examples come from the evaluated split itself (no
    few-shot split given), k + 1 are drawn and the doc itself is removed (the harness's rule for a task
    whose few-shot split is its test split)."""
    if k == 0:
        return [[] for _ in docs]
    if spec.first_n:
        out = []
        for doc in docs:
            same = [p for p in pool if p.get("subject") == doc.get("subject")]
            if len(same) < k:
                raise UserError(f"{name}: {k} few-shot examples asked for, but the few-shot split has "
                                f"{len(same)} for subject {doc.get('subject')!r}")
            out.append(same[:k])
        return out
    if len(pool) < k + same_split:
        raise UserError(f"{name}: {k} few-shot examples asked for, but only {len(pool)} items to draw them from; "
                        f"give more with --task_file {name}{FEWSHOT_SUFFIX}=PATH")
    rnd, out = random.Random(FEWSHOT_SEED), []
    for doc in docs:
        if same_split or spec.draw_extra:
            drawn = [x for x in rnd.sample(pool, k + 1) if x != doc][:k]
            if len(drawn) < k:  # the doc is in the pool twice: draw from the pool without it
                drawn = rnd.sample([x for x in pool if x != doc], k)
        else:
            drawn = rnd.sample(pool, k)
        out.append(drawn)
    return out


# ---------------------------------------------------------------- the continuation of a prompt, in tokens

def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's tokenisation of a (context, continuation) request: trailing spaces of the context
    move to the continuation, the whole text is encoded, and the continuation's tokens are what follows
    the context's own encoding. An empty context becomes <|endoftext|>."""
    if context == "":
        cont = encode(continuation)
        return ([EOT_ID], cont) if cont[:1] != [EOT_ID] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


# ---------------------------------------------------------------- generation prompts and answers

@dataclass(frozen=True)
class PromptFormat:
    """How a generation item becomes the model's prompt tokens, and where its answer ends."""
    name: str
    render: Callable[[GenItem], list[int]]
    stop_strings: tuple[str, ...]   # the answer is cut before the first of these
    stop_tokens: tuple[int, ...]    # a row is done when it emits one of these


# The harness's plain-text prompt: the few-shot Question/Answer text, cut at "Question:" (and the two
# end-of-turn strings its GSM8K YAML lists) or <|endoftext|>.
PLAIN = PromptFormat("plain", lambda item: encode(item.prompt), ("Question:", "</s>", "<|im_end|>"), (EOT_ID,))


def _chatml(item: GenItem) -> list[int]:
    """A chat model's GSM8K prompt: each shot a user turn and the assistant's worked answer, then the question
    as a user turn and the assistant's generation prompt (gptds/data/chat.py renders ChatML)."""
    turns = [m for question, answer in item.shots for m in (Message("user", question), Message("assistant", answer))]
    return prompt_tokens([*turns, Message("user", item.question)])


# Chat formats by the name a checkpoint records (meta "chat_format"): the turns, and the end of turn as the stop.
CHAT_FORMATS: dict[str, PromptFormat] = {
    CHAT_FORMAT: PromptFormat(CHAT_FORMAT, _chatml, (IM_END,), (IM_END_ID, EOT_ID)),
}


def prompt_format(chat_format: str | None) -> PromptFormat:
    """The chat format a checkpoint records, when gptds knows it; otherwise the plain prompt."""
    if chat_format is None:
        return PLAIN
    if chat_format not in CHAT_FORMATS:
        raise UserError(f"the checkpoint records chat format {chat_format!r}, which this gptds cannot render "
                        f"(known: {', '.join(CHAT_FORMATS) or 'none'})")
    return CHAT_FORMATS[chat_format]


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """The harness's postprocessing: the text before the first occurrence of each stop string in turn."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")            # strict-match: first "#### N"
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")   # flexible-extract: the last number
IGNORED = (",", "\\$", "(?s).*#### ", "\\.$")                   # exact_match's regexes_to_ignore


def extract_answer(text: str, strict: bool) -> str:
    """The harness's regex filter: strict-match takes the first "#### N", flexible-extract the last
    number-like match (the first non-empty group of it); "[invalid]" when nothing matches."""
    matches = (STRICT_PATTERN if strict else FLEXIBLE_PATTERN).findall(text)
    if not matches:
        return "[invalid]"
    match = matches[0] if strict else matches[-1]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "[invalid]")
    return match.strip()


def normalize_answer(text: str) -> str:
    """exact_match's normalisation, applied to the answer and to the reference alike: drop ",", "$",
    everything up to "#### " and a final ".", then lower-case."""
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def is_correct(generation: str, reference: str, strict: bool = False) -> bool:
    return normalize_answer(extract_answer(generation, strict)) == normalize_answer(reference)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased estimator of pass@k from n samples of which c are correct:
    1 - C(n - c, k) / C(n, k), computed as a product to stay exact for large n."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
