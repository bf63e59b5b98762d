"""Evaluation against independent computations on a small random Hugging Face GPT-2 (transformers), on the
same items: multiple-choice log-likelihoods scored request by request as lm-evaluation-harness does
(acc, acc_norm, acc_norm_token equal), bits per byte to 1e-6 relative, greedy answers equal to
transformers' generate; prompts as the harness builds them; GSM8K answer extraction on tricky answers;
pass@k; bad task files refused with file:line; a 2-rank ZeRO-3 run whose ranks' answers end at
different lengths completes."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import fp32_config, gptds_cli, launch

from gptds import dist, tasks
from gptds.__main__ import main
from gptds.evaluate import choice_metrics, generation_metrics, score_choices, validation_metrics
from gptds.generate import generate_batch
from gptds.tokenizer import ASSETS_DIR, EOT_ID, encode, write_hf_tokenizer_files
from gptds.weights import load_model

BLOCK = 256  # the model's context: MMLU's 5-shot prompts are longer, so truncation is exercised


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 with wide weights (initializer_range 0.5: peaked distributions, so no two
    choices or next tokens are within float rounding of each other)."""
    out = tmp_path_factory.mktemp("hf-random")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=BLOCK, initializer_range=0.5)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    write_hf_tokenizer_files(out, BLOCK)
    return out


@pytest.fixture(scope="module")
def models(hf_dir):
    dist.init_distributed()
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    return hf, tok, load_model(hf_dir).eval()


# ---------------------------------------------------------------- the harness's computation, independently

def harness_encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval.api.model.TemplateLM._encode_pair with a Hugging Face tokenizer."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def harness_loglikelihoods(hf, tok, items) -> dict:
    """HFLM._loglikelihood_tokens: each request (context, " " + choice) alone in a right-padded row,
    truncated to (context + continuation)[-(max_length + 1):][:-1], the continuation's log-probs summed."""
    requests = []
    for i, item in enumerate(items):
        for k, choice in enumerate(item.choices):
            ctx, cont = harness_encode_pair(tok, item.context, " " + choice)
            requests.append(((i, k), (ctx + cont)[-(BLOCK + 1):][:-1], cont))
    out = {}
    for start in range(0, len(requests), 16):
        chunk = requests[start:start + 16]
        width = max(len(inp) for _, inp, _ in chunk)
        x = torch.tensor([inp + [0] * (width - len(inp)) for _, inp, _ in chunk])
        hidden = hf.transformer(x).last_hidden_state  # logits of the continuation's positions only
        for (key, inp, cont), h in zip(chunk, hidden):
            logprobs = F.log_softmax(hf.lm_head(h[len(inp) - len(cont):len(inp)]), dim=-1)
            out[key] = (float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum()), len(cont))
    return out


def harness_metrics(items, lls: dict) -> dict:
    """ConfigurableTask.process_results: acc = argmax(ll), acc_norm = argmax(ll / len(choice))."""
    acc, acc_norm, per_token = [], [], []
    for i, item in enumerate(items):
        ll = np.array([lls[(i, k)][0] for k in range(len(item.choices))])
        n_tokens = np.array([lls[(i, k)][1] for k in range(len(item.choices))])
        acc.append(np.argmax(ll) == item.answer)
        acc_norm.append(np.argmax(ll / np.array([float(len(c)) for c in item.choices])) == item.answer)
        per_token.append(np.argmax(ll / n_tokens) == item.answer)
    return {"acc": np.mean(acc), "acc_norm": np.mean(acc_norm), "acc_norm_token": np.mean(per_token)}


@pytest.mark.parametrize("name, limit, shots", [("hellaswag", 16, 0), ("arc_easy", 16, 0), ("arc_challenge", 16, 0),
                                                ("mmlu", 1, 5), ("generic", 0, 0)])
def test_multiple_choice_equals_the_harness_computation(models, name, limit, shots, tmp_path):
    hf, tok, ours = models
    files = {}
    if name == "generic":  # the generic layout: a "question" or verbatim "context", choices, answer index
        path = tmp_path / "mine.jsonl"
        path.write_text("\n".join(json.dumps(d) for d in [
            {"question": "What is 2 + 2?", "choices": ["4", "five", "22"], "answer": 0},
            {"context": "The capital of France is", "choices": ["Paris", "a city in Texas"], "answer": 0},
            {"context": "Roses are red,  ", "choices": ["violets are blue", "grass is green"], "answer": "1"}]))
        files = {"generic": str(path)}
    task = tasks.load_task(name, files, limit=limit, num_fewshot=shots)
    assert task.items and (name != "mmlu" or len(task.items) == 57)
    scores = score_choices(ours, task.items, BLOCK, torch.device("cpu"), rows_per_forward=4)
    reference = harness_loglikelihoods(hf, tok, task.items)
    assert scores.keys() == reference.keys()
    for key in reference:
        assert scores[key][1] == reference[key][1], key  # the same continuation tokens
        assert scores[key][0] == pytest.approx(reference[key][0], rel=1e-4, abs=1e-3), key
    got, want = choice_metrics(task, scores), harness_metrics(task.items, reference)
    if name == "mmlu":
        assert got["mmlu_acc_micro"] == want["acc"] and got["mmlu_n"] == 57
        assert got["mmlu_acc"] == pytest.approx(np.mean([got[f"mmlu_{s}_acc"] for s in
                                                         sorted({i.subject for i in task.items})]))
    else:
        for metric in ("acc", "acc_norm", "acc_norm_token"):
            assert got[f"{name}_{metric}"] == want[metric], metric
    if name == "mmlu":  # 5-shot prompts are longer than the context: the harness's truncation was used
        assert max(len(encode(i.context)) for i in task.items) > BLOCK


def gpt2_byte_alphabet() -> dict[int, str]:
    """OpenAI's bytes_to_unicode (gpt-2/src/encoder.py): the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_bits_per_byte_equals_an_independent_computation(models):
    """Special tokens (<|endoftext|>) and -100 targets count in neither sum; val_loss is the batches' mean."""
    hf, tok, ours = models
    ids = encode((ASSETS_DIR / "tinyshakespeare.txt").read_text()[:6000])
    batches = []
    for b in range(3):
        row = torch.tensor(ids[b * 200:b * 200 + 4 * 33]).view(4, 33)
        row[1, 10] = row[2, 5] = EOT_ID  # document boundaries
        x, y = row[:, :-1].clone(), row[:, 1:].clone()
        y[3, :7] = -100  # a masked prompt (fine-tuning data)
        batches.append((x, y))

    class Loader:
        position = 0

        def reset(self):
            self.position = 0

        def next_batch(self):
            self.position += 1
            return batches[self.position - 1]

    got = validation_metrics(lambda x, y: ours(x, y), Loader(), 3, torch.device("cpu"), 50257)
    byte_of = {c: b for b, c in gpt2_byte_alphabet().items()}  # vocab.json's characters -> bytes
    nats, nbytes, losses = 0.0, 0, []
    with torch.no_grad():
        for x, y in batches:
            logprobs = F.log_softmax(hf(x).logits.double(), dim=-1)
            losses.append(F.nll_loss(logprobs.flatten(0, 1), y.flatten(), ignore_index=-100).item())
            for lp, t in zip(logprobs.flatten(0, 1), y.flatten().tolist()):
                if t in (-100, EOT_ID):
                    continue
                nats -= lp[t].item()
                nbytes += len(bytes(byte_of[c] for c in tok.convert_ids_to_tokens(t)))
    assert got["val_bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    assert got["val_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_batched_greedy_answers_equal_transformers_generate(models):
    """Prompts of different lengths, left-padded into one batch, give transformers' greedy tokens."""
    hf, tok, ours = models
    task = tasks.load_task("gsm8k", limit=5)
    prompts = [encode(item.prompt)[-(40 + 30 * i):] for i, item in enumerate(task.items)]
    got = generate_batch(ours, prompts, 16, stop_strings=tasks.PLAIN.stop_strings)
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOT_ID,
                              pad_token_id=EOT_ID)[0, len(prompt):].tolist()
        ref = ref[:ref.index(EOT_ID)] if EOT_ID in ref else ref
        text = tasks.cut_at_stop(tok.decode(ref), tasks.PLAIN.stop_strings)
        assert tasks.cut_at_stop(tok.decode(tokens), tasks.PLAIN.stop_strings) == text
        assert tok.decode(tokens).startswith(text)  # the answer stops where its text is cut, or at EOT


def test_generation_metrics_and_pass_at_k(models, monkeypatch):
    *_, ours = models
    task = tasks.load_task("gsm8k", limit=4, num_fewshot=1)
    result = generation_metrics(ours, task, BLOCK, torch.device("cpu"), num_samples=3, max_new_tokens=8)
    assert set(result) == {"gsm8k_pass@1", "gsm8k_pass@1_strict", "gsm8k_pass@3", "gsm8k_n"}
    assert result["gsm8k_n"] == 4  # a random model answers nothing right
    # an answer that is the reference's final number counts under flexible-extract, and under strict-match
    # when it is written "#### N"
    monkeypatch.setattr("gptds.evaluate.decode", lambda t: "So 16 - 3 - 4 = 9 eggs, 9 * 2 = $18.\n#### 18")
    right = generation_metrics(ours, tasks.load_task("gsm8k", limit=1, num_fewshot=0), BLOCK, torch.device("cpu"),
                               num_samples=2, max_new_tokens=2)
    assert right == {"gsm8k_pass@1": 1.0, "gsm8k_pass@1_strict": 1.0, "gsm8k_pass@2": 1.0, "gsm8k_n": 1}


def test_a_rank_whose_answers_are_done_steps_on_while_another_rank_generates(models, monkeypatch):
    """generate_batch's step protocol (the 2-rank ZeRO-3 run below does it for real): the other rank
    still running for 5 more steps keeps this rank's forwards going, with its rows' answers unchanged."""
    *_, ours = models
    calls, reduces = [], []
    monkeypatch.setattr("gptds.generate.next_token_of", lambda logits, *a: torch.full((logits.size(0), 1), EOT_ID))
    monkeypatch.setattr("gptds.dist.all_reduce_sum", lambda t: reduces.append(1) or t + float(len(reduces) <= 5))
    original = ours.forward
    monkeypatch.setattr(ours, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert generate_batch(ours, [[1, 2, 3], [4]], 16) == [[], []]
    assert len(calls) == 1 + 5  # the prefill, then one step per step the other rank ran


# ---------------------------------------------------------------- prompts as the harness builds them

def test_prompts_are_the_harness_templates(tmp_path):
    arc = tasks.load_task("arc_easy", limit=1).items[0]
    assert arc.context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                           "food webs?\nAnswer:") and arc.answer == 0
    assert arc.choices[0] == "Sunlight is the source of energy for nearly all ecosystems."
    mmlu = tasks.load_task("mmlu", limit=1, num_fewshot=1).items[0]
    assert mmlu.context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert mmlu.choices == ["A", "B", "C", "D"] and mmlu.answer == 1
    hs = tmp_path / "hs.jsonl"  # the original HellaSwag layout, with WikiHow markers
    hs.write_text(json.dumps({"activity_label": "Making a cake", "ctx_a": "A woman [title] mixes flour.",
                              "ctx_b": "then SHE", "endings": ["bakes it.  [step] Done", "b", "c", "d"],
                              "label": "0"}))
    item = tasks.load_task("hellaswag", {"hellaswag": str(hs)}).items[0]
    # one pass of "  " -> " ": the three spaces left by "[step]" become two (the harness's own result)
    assert item.context == "Making a cake: A woman. mixes flour. Then she" and item.choices[0] == "bakes it.  Done"
    bundled = tasks.load_task("hellaswag", limit=1).items[0]  # ctx only: used as it is
    assert bundled.context == "Roof shingle removal: A man is sitting on a roof. he"


def test_gsm8k_shots_are_drawn_as_the_harness_draws_them():
    """One Random(1234) per task, 5 examples per item in item order, from the few-shot (train) split."""
    train = [json.loads(line) for line in (ASSETS_DIR / "gsm8k_train_sample.jsonl").read_text().splitlines()]
    items = tasks.load_task("gsm8k", limit=2).items
    rnd = random.Random(1234)
    for item in items:
        shots = rnd.sample(train, 5)
        assert item.prompt == "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) \
            + f"Question: {item.question.removeprefix('Question: ').removesuffix(chr(10) + 'Answer:')}\nAnswer:"
    assert items[0].reference.endswith("#### 18")


def test_shots_from_the_evaluated_split_never_include_the_item():
    task = tasks.load_task("arc_easy", limit=30, num_fewshot=3)
    for item in task.items:
        question = item.context.rsplit("Question: ", 1)[1]
        assert item.context.count("Question: ") == 4 and item.context.count("Question: " + question) == 1


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("answer, flexible, strict, correct", [
    ("The answer is 1,234.", "1,234.", "[invalid]", True),          # thousands separator, final period
    ("It drops to -5 degrees", "-5", "[invalid]", True),             # negative
    ("She pays $18", "$18", "[invalid]", True),                      # dollar sign
    ("so 12 kg in all", "12", "[invalid]", True),                    # trailing unit
    ("#### 1,234\n\nQuestion: next", "1,234", "1,234", True),        # strict-match needs "#### N"
    ("2 + 3 = 5, so 7 apples", "7", "[invalid]", True),              # the last number wins
    ("It costs $1,234.00", "$1,234.00", "[invalid]", False),         # 1234.00 != 1234 (the harness's rule)
    ("about 1234...", "1234...", "[invalid]", False),                # one final "." is dropped, not three
    ("no number here", "[invalid]", "[invalid]", False),
])
def test_gsm8k_answer_extraction(answer, flexible, strict, correct):
    reference = "Some working <<617*2=1234>>\n#### 1234" if "5 degrees" not in answer else "#### -5"
    reference = "#### 18" if "$18" in answer else "#### 12" if "12 kg" in answer else \
        "#### 7" if "7 apples" in answer else reference
    assert tasks.extract_answer(answer, strict=False) == flexible
    assert tasks.extract_answer(answer, strict=True) == strict
    assert tasks.is_correct(answer, reference) is correct


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 5), (20, 20, 5), (5, 1, 5), (100, 7, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert tasks.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert tasks.pass_at_k(10, 3, 1) == pytest.approx(0.3)


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}',
     "answerKey 'C' is not one of the labels"),
    ('{"question": "q?", "answerKey": "A"}', "field 'choices' missing or not a dict"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_task_files_are_refused_with_file_and_line(tmp_path, capsys, line, message):
    good = '{"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}'
    path = tmp_path / "arc.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "unread"), "--tasks", "arc_easy",
                 "--task_file", f"arc_easy={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}:3: " in err and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "arc_easy,squad"], "unknown task 'squad'"),
    (["--tasks", "bpb"], "task bpb needs --data_dir"),
    (["--task_file", "arc_easy"], "expected TASK=PATH"),
    (["--tasks", "gsm8k", "--task_file", "gsm8k=/nonexistent.jsonl"], "/nonexistent.jsonl: cannot read"),
    (["--tasks", "mine", "--task_file", "mine=GENERIC"], 'needs a string field \'context\' or \'question\''),
    (["--tasks", "mmlu", "--num_fewshot", "6"], "6 few-shot examples asked for"),
])
def test_bad_task_arguments_are_one_line(tmp_path, capsys, argv, message):
    generic = tmp_path / "generic.jsonl"
    generic.write_text('{"choices": ["a", "b"], "answer": 0}\n')
    argv = [a.replace("GENERIC", str(generic)) for a in argv]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "unread"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_evaluate_prints_one_json_object_with_every_task(hf_dir, text_data, tmp_path):
    proc = gptds_cli("evaluate", "--checkpoint", str(hf_dir), "--tasks", "bpb,hellaswag,arc_easy,arc_challenge,"
                     "mmlu,gsm8k", "--limit", "2", "--num_samples", "2", "--max_new_tokens", "8", "--data_dir",
                     str(text_data), "-T", "64", "--eval_batches", "2")
    result = json.loads(proc.stdout)
    for key in ("bpb", "val_loss", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_acc_norm_token",
                "arc_easy_acc", "arc_easy_acc_norm", "arc_challenge_acc", "mmlu_acc", "mmlu_acc_micro",
                "mmlu_abstract_algebra_acc", "gsm8k_pass@1", "gsm8k_pass@1_strict", "gsm8k_pass@2"):
        assert key in result, key
    assert result["arc_easy_n"] == 2 and result["mmlu_n"] == 114 and 0 < result["bpb"] < 20
    assert "items/s" in proc.stderr and proc.stderr.count("gsm8k: 2/2 items") == 1, proc.stderr
    assert proc.stderr.count("gsm8k pass@2: 2/2 items") == 1, proc.stderr
    old = gptds_cli("evaluate", "--checkpoint", str(hf_dir), "--hellaswag_file",
                    str(ASSETS_DIR / "hellaswag_sample.jsonl"), "--hellaswag_limit", "3")
    assert set(json.loads(old.stdout)) == {"hellaswag_acc", "hellaswag_acc_norm", "hellaswag_acc_norm_token",
                                           "hellaswag_n", "val_loss"}


@pytest.mark.slow
def test_zero3_ranks_whose_answers_end_at_different_lengths_stay_in_step(tmp_path, text_data):
    """Rank 1's answers end after 2 tokens (a fault injected in its sampling), rank 0's run to the limit;
    under ZeRO-3 every forward gathers parameters collectively, so a rank stepping alone would hang."""
    run = tmp_path / "run"
    launch([{"name": "z3-eval", "argv": [
        "pretrain", "--data_dir", str(text_data), "--deepspeed_config",
        fp32_config(tmp_path, "zero3", stage3_param_persistence_threshold=0), "--log_dir", str(run), "--model",
        "tiny", "-B", "2", "-T", "32", "--max_steps", "1", "--optimizer", "adamw", "--eval_interval", "1",
        "--eval_batches", "2", "--hellaswag_interval", "0", "--generate_interval", "0", "--eval_tasks",
        "gsm8k,arc_easy,mmlu", "--eval_task_interval", "1", "--eval_task_limit", "3"],
        "fault": {"kind": "early_eot", "rank": 1, "after": 2}}], tmp_path, "z3-eval", timeout=600)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records for k in r}
    assert {"val_loss", "val_bpb", "gsm8k_pass@1", "arc_easy_acc_norm", "mmlu_acc", "mmlu_anatomy_acc"} <= logged


def test_a_task_reads_a_hub_dataset(monkeypatch):
    """--task_file TASK=hub:NAME:CONFIG:SPLIT goes through datasets.load_dataset (no hub here: its rows are
    faked, in the dataset's own layout)."""
    asked = []

    def rows(name, config, split, streaming):
        asked.append((name, config, split))
        yield {"id": "x", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
               "answerKey": "B"}, f"dataset {name}[{split}] row 1"
    monkeypatch.setattr(tasks, "iter_hub_records", rows)
    task = tasks.load_task("arc_easy", {"arc_easy": "hub:allenai/ai2_arc:ARC-Easy:test"})
    assert asked == [("allenai/ai2_arc", "ARC-Easy", "test")]
    assert task.items[0].context == "Question: Which?\nAnswer:" and task.items[0].answer == 1
    with pytest.raises(tasks.UserError, match="expected hub:NAME:CONFIG:SPLIT"):
        tasks.load_task("arc_easy", {"arc_easy": "hub:allenai/ai2_arc"})


def test_a_checkpoint_with_a_chat_format_gets_its_prompts_and_stops(models, monkeypatch):
    """The hook the chat format plugs into: a format registered under the name a checkpoint records renders
    the GSM8K examples as turns and ends answers at its own stop token; an unknown name is refused."""
    *_, ours = models
    seen = []

    def render(item):
        seen.append(item)
        turns = "".join(f"<u>{q}<a>{a}" for q, a in item.shots) + f"<u>{item.question}<a>"
        return encode(turns)[-100:]
    fake = tasks.PromptFormat("fake", render, ("\n",), (EOT_ID, 13))
    monkeypatch.setitem(tasks.CHAT_FORMATS, "fake", fake)
    assert tasks.prompt_format("fake") is fake and tasks.prompt_format(None) is tasks.PLAIN
    with pytest.raises(tasks.UserError, match="chat format 'other'"):
        tasks.prompt_format("other")
    task = tasks.load_task("gsm8k", limit=2, num_fewshot=2)
    assert generation_metrics(ours, task, BLOCK, torch.device("cpu"), fmt=fake, max_new_tokens=4)["gsm8k_n"] == 2
    assert [len(item.shots) for item in seen] == [2, 2] and not seen[0].question.startswith("Question: ")
    assert seen[0].prompt.endswith(f"Question: {seen[0].question}\nAnswer:")  # the plain prompt around it


def test_progress_reports_count_rate_and_eta():
    from gptds.metrics import Progress
    lines = []
    progress = Progress(10, "hellaswag", "items", write=lines.append, interval_s=0)
    for _ in range(10):
        progress.update()
    assert lines[0].startswith("hellaswag: 1/10 items, ") and " items/s, eta 0:00:0" in lines[0]
    assert lines[-1].startswith("hellaswag: 10/10 items, ") and ", done in 0:00:0" in lines[-1]
    quiet = []
    Progress(10, "hellaswag", "items", enabled=False, write=quiet.append, interval_s=0).update(10)
    assert quiet == []


def test_evaluate_shows_progress_on_stderr_and_prints_only_json_on_stdout(hf_dir, capsys):
    assert main(["evaluate", "--checkpoint", str(hf_dir), "--hellaswag_limit", "3"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is exactly the JSON
    assert result["hellaswag_n"] == 3
    assert "hellaswag: 3/3 items, " in err and " items/s, done in " in err, err


def test_a_chat_model_is_asked_gsm8k_in_chatml_turns():
    from gptds.data.chat import Message, prompt_tokens
    from gptds.tokenizer import IM_END_ID
    fmt = tasks.prompt_format("chatml")
    item = tasks.load_task("gsm8k", limit=1, num_fewshot=2).items[0]
    turns = [m for q, a in item.shots for m in (Message("user", q), Message("assistant", a))]
    assert fmt.render(item) == prompt_tokens([*turns, Message("user", item.question)])
    assert IM_END_ID in fmt.stop_tokens
