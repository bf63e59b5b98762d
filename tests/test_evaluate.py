"""HellaSwag scoring as lm-evaluation-harness does it, long items included (the model reads the last
block_size tokens of context + ending), checked against an independent computation; and `gptds evaluate`
showing its progress on stderr while stdout stays the JSON result."""

import json

import pytest
import torch
import torch.nn.functional as F

from gptds import dist
from gptds.__main__ import main
from gptds.evaluate import ending_logprobs, hellaswag_scores, load_hellaswag
from gptds.metrics import Progress
from gptds.model import GPT, GPTConfig
from gptds.tokenizer import encode
from gptds.weights import save_gptds_weights, state_dict_for_saving

BLOCK = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)).eval()


def harness_logprobs(model, ctx: str, ending: str, max_length: int) -> float:
    """One choice's log-likelihood as lm-evaluation-harness computes it (models/huggingface.py,
    _loglikelihood_tokens): one unpadded sequence per choice, truncated from the left."""
    context_enc, continuation_enc = encode(ctx), encode(" " + ending)
    inp = torch.tensor((context_enc + continuation_enc)[-(max_length + 1):][:-1])
    logits = model(inp[None])[0][0]  # (inplen, V)
    cont = logits[len(inp) - len(continuation_enc):]
    logprobs = F.log_softmax(cont.float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(continuation_enc)[:, None]).sum().item()


@pytest.fixture(scope="module")
def long_items():
    """The bundled items with their context repeated until every item is longer than the model's context."""
    items = load_hellaswag(None, limit=3)
    for item in items:
        while len(encode(item["ctx"])) < BLOCK + 20:
            item["ctx"] = item["ctx"] + " " + item["ctx"]
    return items


@torch.no_grad()
def test_long_items_are_scored_like_lm_evaluation_harness(model, long_items):
    dist.init_distributed()
    for item in long_items:
        total, mean = ending_logprobs(lambda x: model(x)[0], item, BLOCK, torch.device("cpu"))
        expected = torch.tensor([harness_logprobs(model, item["ctx"], e, BLOCK) for e in item["endings"]])
        torch.testing.assert_close(total, expected, rtol=0, atol=1e-4)
        lengths = torch.tensor([len(encode(" " + e)) for e in item["endings"]], dtype=total.dtype)
        torch.testing.assert_close(mean, expected / lengths, rtol=0, atol=1e-4)
        # the model reads exactly block_size tokens of the longest row (one fewer was the old cut)
        assert max(len(encode(item["ctx"])) + len(encode(" " + e)) for e in item["endings"]) > BLOCK + 1


@torch.no_grad()
def test_short_items_are_unchanged_by_the_cut(model):
    dist.init_distributed()
    item = load_hellaswag(None, limit=1)[0]
    total, _ = ending_logprobs(lambda x: model(x)[0], item, BLOCK, torch.device("cpu"))
    expected = torch.tensor([harness_logprobs(model, item["ctx"], e, 10_000) for e in item["endings"]])
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-4)


def test_progress_reports_count_rate_and_eta():
    lines = []
    progress = Progress(10, "HellaSwag", "items", write=lines.append, interval_s=0)
    for _ in range(10):
        progress.update()
    assert lines[0].startswith("HellaSwag: 1/10 items, ") and " items/s, eta 0:00:0" in lines[0]
    assert lines[-1].startswith("HellaSwag: 10/10 items, ") and ", done in 0:00:0" in lines[-1]
    quiet = []
    Progress(10, "HellaSwag", "items", enabled=False, write=quiet.append, interval_s=0).update(10)
    assert quiet == []


def test_hellaswag_inside_training_counts_every_item_once(model):
    dist.init_distributed()
    lines = []
    items = load_hellaswag(None, limit=3)
    hellaswag_scores(lambda x: model(x)[0], items, BLOCK, torch.device("cpu"),
                     Progress(len(items), "HellaSwag", "items", write=lines.append, interval_s=0))
    assert [line.split(",")[0] for line in lines] == [f"HellaSwag: {n}/3 items" for n in range(1, 4)]


def test_evaluate_shows_progress_on_stderr_and_prints_only_json_on_stdout(model, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    save_gptds_weights(model.config, state_dict_for_saving(model).items(), weights)
    assert main(["evaluate", "--checkpoint", str(weights), "--hellaswag_limit", "3"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is exactly the JSON
    assert result["n"] == 3
    assert "HellaSwag: 3/3 items, " in err and " items/s, done in " in err, err
