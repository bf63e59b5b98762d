"""Instruction data: the prompt template, prompt/response tokens and the loss mask token by token
(alone and across a packed-row record boundary), truncation and dropping, and `gptds prepare dolly`
on the bundled Dolly sample, Alpaca-layout files and the datasets code path."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import gptds_cli

from gptds.data.instruct import (
    IGNORE_INDEX,
    InstructRecord,
    encode_record,
    pack_row,
    record_from_fields,
    render_prompt,
    render_text,
    row_to_xy,
)
from gptds.data.prepare import PrepareDollyConfig, prepare_dolly
from gptds.data.shards import INDEX_DTYPE, TOKEN_DTYPE, load_manifest, sha256_file, verify_shards
from gptds.errors import UserError
from gptds.tokenizer import ASSETS_DIR, EOT_ID, decode

DOLLY = ASSETS_DIR / "dolly_sample.jsonl"
SHARED_DOLLY = Path(__file__).resolve().parents[2] / "shared/data/dolly15k/dolly15k_sample.jsonl"  # ../shared
ROOT = Path(__file__).resolve().parents[1]
M = IGNORE_INDEX

# "### Instruction:\nSay hi\n\n### Response:\n" and "Hi there." in GPT-2 ids
SAY_HI_PROMPT = [21017, 46486, 25, 198, 25515, 23105, 198, 198, 21017, 18261, 25, 198]
SAY_HI_RESPONSE = [17250, 612, 13]
# "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n" and "5"
ADD_PROMPT = [21017, 46486, 25, 198, 4550, 198, 198, 21017, 23412, 25, 198, 17, 290, 513, 198, 198, 21017, 18261,
              25, 198]
ADD_RESPONSE = [20]


def test_template_with_and_without_context():
    with_context = InstructRecord("Add", "2 and 3", "5")
    assert render_prompt(with_context) == "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert render_text(with_context) == render_prompt(with_context) + "5<|endoftext|>"
    no_context = InstructRecord("Say hi", "", "Hi there.")
    assert render_text(no_context) == "### Instruction:\nSay hi\n\n### Response:\nHi there.<|endoftext|>"


def test_fields_are_stripped_and_layouts_map():
    dolly = record_from_fields({"instruction": "  Say hi\n", "context": " \n", "response": " Hi there. ",
                                "category": "open_qa"}, "dolly", "x:1")
    assert dolly == InstructRecord("Say hi", "", "Hi there.", "open_qa")
    alpaca = record_from_fields({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca", "x:2")
    assert alpaca == InstructRecord("Add", "2 and 3", "5", "none")


def test_record_tokens_without_context():
    encoded = encode_record(InstructRecord("Say hi", "", "Hi there."), context_length=64)
    assert encoded.tokens.tolist() == SAY_HI_PROMPT + SAY_HI_RESPONSE + [EOT_ID]
    assert encoded.prompt_len == 12 and encoded.status == "ok"


def test_loss_mask_token_by_token_without_context():
    encoded = encode_record(InstructRecord("Say hi", "", "Hi there."), context_length=64)
    x, y = row_to_xy(*pack_row([(encoded.tokens, encoded.prompt_len)], row_len=20))
    assert x.tolist() == SAY_HI_PROMPT + SAY_HI_RESPONSE + [EOT_ID] + [EOT_ID] * 3
    # y[t] is the target after reading x[:t+1]: the prompt's last token (t=11, "\n") predicts "Hi".
    assert y.tolist() == [M] * 11 + [17250, 612, 13, EOT_ID] + [M] * 4


def test_loss_mask_token_by_token_with_context():
    encoded = encode_record(InstructRecord("Add", "2 and 3", "5"), context_length=64)
    assert encoded.tokens.tolist() == ADD_PROMPT + ADD_RESPONSE + [EOT_ID] and encoded.prompt_len == 20
    x, y = row_to_xy(*pack_row([(encoded.tokens, encoded.prompt_len)], row_len=23))
    assert x.tolist() == ADD_PROMPT + [20, EOT_ID]
    assert y.tolist() == [M] * 19 + [20, EOT_ID] + [M]


def test_loss_mask_across_a_packed_record_boundary():
    a = encode_record(InstructRecord("Say hi", "", "Hi there."), 64)  # 16 tokens
    b = encode_record(InstructRecord("Add", "2 and 3", "5"), 64)        # 22 tokens
    x, y = row_to_xy(*pack_row([(a.tokens, a.prompt_len), (b.tokens, b.prompt_len)], row_len=40))
    assert x.tolist() == SAY_HI_PROMPT + SAY_HI_RESPONSE + [EOT_ID] + ADD_PROMPT + ADD_RESPONSE + [EOT_ID] * 2
    expected = ([M] * 11 + [17250, 612, 13, EOT_ID]  # record a: its response and end token
                + [M]                                 # a's EOT -> b's first prompt token: no loss
                + [M] * 19 + [20, EOT_ID]             # record b
                + [M] * 2)                            # b's EOT -> padding, padding -> padding
    assert y.tolist() == expected
    assert len(y) == 39


def test_truncation_and_dropping():
    record = InstructRecord("Say hi", "", "Hi there.")  # prompt 12 tokens, response 3 + EOT
    fits = encode_record(record, context_length=15)  # 16 tokens = context_length + 1
    assert fits.status == "ok" and len(fits.tokens) == 16
    cut = encode_record(record, context_length=14)
    assert cut.status == "truncated" and cut.tokens.tolist() == SAY_HI_PROMPT + SAY_HI_RESPONSE  # no EOT
    one = encode_record(record, context_length=12)  # room for exactly one response token
    assert one.status == "truncated" and one.tokens.tolist() == SAY_HI_PROMPT + [17250]
    assert encode_record(record, context_length=11).status == "dropped"


def _prepare(tmp_path, name="dolly", **overrides):
    settings = {"input": [str(DOLLY)], "output_dir": str(tmp_path / name), "num_workers": 0} | overrides
    return prepare_dolly(PrepareDollyConfig(**settings))


def _records(folder: Path, split: str) -> list[tuple[list[int], int]]:
    """(tokens, prompt_len) of every record of a split, read back through the manifest and index files."""
    out = []
    for entry in load_manifest(folder)["shards"]:
        if entry["split"] != split:
            continue
        tokens = np.fromfile(folder / entry["file"], dtype=TOKEN_DTYPE)
        index = np.fromfile(folder / entry["index_file"], dtype=INDEX_DTYPE).reshape(-1, 2)
        ends = list(index[1:, 0]) + [len(tokens)]
        out += [(tokens[s:e].tolist(), int(p)) for (s, p), e in zip(index, ends, strict=True)]
    return out


def test_prepare_dolly_sample(tmp_path):
    folder = _prepare(tmp_path, context_length=256, num_workers=2)
    manifest = load_manifest(folder)
    verify_shards(folder)
    assert manifest["kind"] == "instruct" and manifest["layout"] == "dolly" and manifest["context_length"] == 256
    assert manifest["template"] == ("### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
                                    "{response}<|endoftext|>")
    records = manifest["records"]
    assert records["train"] + records["val"] + manifest["dropped"] == 300
    assert manifest["truncated"] > 0 and manifest["dropped"] > 0 and manifest["skipped_bad"] == 0
    for split in ("train", "val"):
        assert sum(manifest["categories"][split].values()) == records[split]
        assert manifest["splits"][split]["num_records"] == records[split]
    for entry in manifest["shards"]:
        assert entry["sha256"] == sha256_file(folder / entry["file"])
        assert entry["index_sha256"] == sha256_file(folder / entry["index_file"])

    # Every stored record is a rendered input record (cut at 257 tokens when truncated).
    rendered = {}
    for line in DOLLY.read_text().splitlines():
        record = record_from_fields(json.loads(line), "dolly", "")
        rendered[render_prompt(record)] = render_text(record)
    truncated = 0
    for tokens, prompt_len in _records(folder, "train") + _records(folder, "val"):
        assert len(tokens) <= 257 and prompt_len < len(tokens)
        prompt = decode(tokens[:prompt_len])
        assert prompt.endswith("### Response:\n") and prompt in rendered
        if tokens[-1] == EOT_ID:
            assert decode(tokens) == rendered[prompt]
        else:
            truncated += 1
            assert len(tokens) == 257 and rendered[prompt].startswith(decode(tokens))
    assert truncated == manifest["truncated"]


def test_split_is_stable_under_record_order(tmp_path):
    lines = DOLLY.read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    a = _prepare(tmp_path, "a")
    b = _prepare(tmp_path, "b", input=[str(shuffled)])
    for split in ("train", "val"):
        assert sorted(map(str, _records(a, split))) == sorted(map(str, _records(b, split)))
    assert load_manifest(a)["categories"] == load_manifest(b)["categories"]


def test_alpaca_layout_json_array_and_jsonl(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi", "input": "", "output": "Hi there."}] * 20
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(rows, indent=1))
    lines = tmp_path / "alpaca.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = _prepare(tmp_path, "a", input=[str(array)], val_fraction=0.5)
    b = _prepare(tmp_path, "b", input=[str(lines)], val_fraction=0.5, format="alpaca")
    manifest = load_manifest(a)
    assert manifest["layout"] == "alpaca" and load_manifest(b)["layout"] == "alpaca"
    # two distinct records, hashed to their splits; identical records share a split
    stored = {str(r) for split in ("train", "val") for r in _records(a, split)}
    assert stored == {str((ADD_PROMPT + ADD_RESPONSE + [EOT_ID], 20)),
                      str((SAY_HI_PROMPT + SAY_HI_RESPONSE + [EOT_ID], 12))}
    assert manifest["categories"]["train"] == {"none": 20} and manifest["categories"]["val"] == {"none": 20}
    assert [e["sha256"] for e in manifest["shards"]] == [e["sha256"] for e in load_manifest(b)["shards"]]
    with pytest.raises(UserError, match=rf"{lines}:1: field 'response' is missing"):
        _prepare(tmp_path, "c", input=[str(lines)], format="dolly")


def test_dolly_through_the_datasets_code_path(tmp_path):
    hub_folder = tmp_path / "hub"
    hub_folder.mkdir()
    (hub_folder / "train.jsonl").write_bytes(DOLLY.read_bytes())
    direct = _prepare(tmp_path, "direct")
    via_hub = prepare_dolly(PrepareDollyConfig(dataset=str(hub_folder), output_dir=str(tmp_path / "hub_out"),
                                               num_workers=0))
    manifest = load_manifest(via_hub)
    assert manifest["source"] == {"dataset": str(hub_folder), "dataset_config": None, "dataset_split": "train",
                                  "streaming": True}
    assert [e["sha256"] for e in manifest["shards"]] == [e["sha256"] for e in load_manifest(direct)["shards"]]


def test_cli_prepare_dolly(tmp_path):
    out = tmp_path / "cli"
    result = gptds_cli("prepare", "dolly", "--input", str(DOLLY), "--output_dir", str(out), "--num_workers", "0",
                       "--context_length", "512")
    manifest = load_manifest(out)
    assert manifest["context_length"] == 512 and manifest["command"][1:4] == ["prepare", "dolly", "--input"]
    assert "records" in result.stdout


@pytest.mark.skipif(not SHARED_DOLLY.is_file(), reason=(
    f"optional: needs {SHARED_DOLLY}, 750 records of databricks-dolly-15k (the project's data folder beside the "
    f"clone; any 750-line Dolly JSONL there will do, e.g. from the Hugging Face dataset databricks/"
    f"databricks-dolly-15k); the bundled 300-record sample is tested without it"))
def test_shared_dolly_sample(tmp_path):
    folder = _prepare(tmp_path, input=[str(SHARED_DOLLY)])
    manifest = load_manifest(folder)
    assert manifest["records"]["train"] + manifest["records"]["val"] + manifest["dropped"] == 750
    assert len(manifest["categories"]["train"]) == 8
