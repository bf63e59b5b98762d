"""Bad input gets a UserError naming the file, line, byte offset or field, and loses nothing: no
half-written dataset under the output name, an existing dataset untouched unless --overwrite."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptds.data import shards as shards_module
from gptds.data.prepare import PrepareDollyConfig, PrepareTextConfig, prepare_dolly, prepare_text
from gptds.data.shards import load_manifest
from gptds.data.sources import ReadReport, iter_text_file
from gptds.errors import UserError
from gptds.tokenizer import ASSETS_DIR

DOLLY = ASSETS_DIR / "dolly_sample.jsonl"


def _text(tmp_path, inputs, **overrides):
    settings = {"input": [str(p) for p in inputs], "output_dir": str(tmp_path / "out"), "num_workers": 0,
                "val_block_tokens": 8} | overrides
    return prepare_text(PrepareTextConfig(**settings))


def _dolly(tmp_path, inputs, **overrides):
    settings = {"input": [str(p) for p in inputs], "output_dir": str(tmp_path / "out"), "num_workers": 0} | overrides
    return prepare_dolly(PrepareDollyConfig(**settings))


def _assert_nothing_written(tmp_path):
    """Neither the output folder nor a staging sibling (out.partial-<pid>) is left behind."""
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_malformed_json_line_names_file_and_line(tmp_path):
    bad = _jsonl(tmp_path / "docs.jsonl", ['{"text": "one two three four five"}', '{"text": "six"}',
                                           '{"text": "seven', '{"text": "eight nine ten"}'])
    with pytest.raises(UserError, match=rf"^{bad}:3: malformed JSON: .* at column 16 \(--skip_bad skips"):
        _text(tmp_path, [bad])
    _assert_nothing_written(tmp_path)
    folder = _text(tmp_path, [bad], skip_bad=True)
    manifest = load_manifest(folder)
    assert manifest["skipped_bad"] == 1 and manifest["documents"] == 3


def test_bad_line_deep_in_the_input_with_worker_processes(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " * 50}) for i in range(3000)]
    bad = _jsonl(tmp_path / "docs.jsonl", lines[:2500] + ['{"text": 1}'] + lines[2500:])
    with pytest.raises(UserError, match=rf"^{bad}:2501: field 'text' must be a string, got int"):
        _text(tmp_path, [bad], num_workers=2)
    _assert_nothing_written(tmp_path)


def test_malformed_dolly_line_is_skipped_and_counted(tmp_path):
    lines = DOLLY.read_text().splitlines()[:100]
    bad = _jsonl(tmp_path / "dolly.jsonl", lines[:10] + ["{not json"] + ["[1, 2]"] + lines[10:])
    with pytest.raises(UserError, match=rf"^{bad}:11: malformed JSON"):
        _dolly(tmp_path, [bad])
    _assert_nothing_written(tmp_path)
    manifest = load_manifest(_dolly(tmp_path, [bad], skip_bad=True, val_fraction=0.2))
    assert manifest["skipped_bad"] == 2
    assert sum(manifest["records"].values()) + manifest["dropped"] == 100


def test_record_missing_a_field_names_the_field(tmp_path):
    docs = _jsonl(tmp_path / "docs.jsonl", ['{"text": "fine"}', '{"body": "no text here"}'])
    with pytest.raises(UserError, match=rf"^{docs}:2: record has no field 'text' \(fields: body\); set --text_field"):
        _text(tmp_path, [docs])
    records = [json.loads(line) for line in DOLLY.read_text().splitlines()[:5]]
    del records[3]["response"]
    dolly = _jsonl(tmp_path / "dolly.jsonl", [json.dumps(r) for r in records])
    with pytest.raises(UserError, match=rf"^{dolly}:4: field 'response' is missing"):
        _dolly(tmp_path, [dolly])
    records[3]["response"] = 42
    _jsonl(dolly, [json.dumps(r) for r in records])
    with pytest.raises(UserError, match=rf"^{dolly}:4: field 'response' must be a string, got int"):
        _dolly(tmp_path, [dolly])
    _assert_nothing_written(tmp_path)


def test_unknown_layout_names_the_fields(tmp_path):
    weird = _jsonl(tmp_path / "weird.jsonl", ['{"prompt": "a", "completion": "b"}'])
    with pytest.raises(UserError, match=rf"^{weird}:1: cannot tell the record layout .*'completion', 'prompt'"):
        _dolly(tmp_path, [weird])
    _assert_nothing_written(tmp_path)


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"hello\nworld\n" * 1000 + b"caf\xe9\n" + b"more\n")
    with pytest.raises(UserError, match=rf"^{txt}: not UTF-8 text at byte offset 12003 "):
        _text(tmp_path, [txt])
    # the offset is in the file, also when the bad byte is deep inside a later chunk
    with pytest.raises(UserError, match="byte offset 12003 "):
        list(iter_text_file(txt, ReadReport(), chunk_bytes=100))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{jsonl}:2: not UTF-8 text at byte offset 30 "):
        _text(tmp_path, [jsonl])
    _assert_nothing_written(tmp_path)


def test_malformed_json_array_names_the_line(tmp_path):
    array = tmp_path / "records.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n  {"text": "c"}\n]\n')
    with pytest.raises(UserError, match=rf"^{array}:4: malformed JSON: expected ',' or ']'"):
        _text(tmp_path, [array])
    array.write_text('{"text": "not an array"}')
    with pytest.raises(UserError, match=rf"^{array}: expected a JSON array"):
        _text(tmp_path, [array])
    _assert_nothing_written(tmp_path)


def test_skip_bad_skips_elements_of_a_json_array_and_a_bad_first_dolly_record(tmp_path):
    array = tmp_path / "records.json"
    doc = json.dumps({"text": "a document of some length " * 20})
    array.write_text(f'[\n  {doc},\n  5,\n  {doc},\n  "x"\n]\n')
    with pytest.raises(UserError, match=rf"^{array}:3: expected a JSON object in the array, got int \(--skip_bad"):
        _text(tmp_path, [array])
    manifest = load_manifest(_text(tmp_path, [array], skip_bad=True))
    assert manifest["skipped_bad"] == 2
    # the layout of Dolly data is told by the first good record when --skip_bad skips a bad first one
    lines = DOLLY.read_text().splitlines()[:50]
    dolly = _jsonl(tmp_path / "dolly.jsonl", ['{"question": "no layout"}'] + lines)
    with pytest.raises(UserError, match=rf"^{dolly}:1: cannot tell the record layout"):
        _dolly(tmp_path, [dolly], output_dir=str(tmp_path / "out2"))
    manifest = load_manifest(_dolly(tmp_path, [dolly], skip_bad=True, val_fraction=0.2,
                                    output_dir=str(tmp_path / "out2")))
    assert manifest["skipped_bad"] == 1 and sum(manifest["records"].values()) + manifest["dropped"] == 50


def test_parquet_without_the_column(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["x"]}), table)
    with pytest.raises(UserError, match=rf"^{table}: no column 'text' \(columns: content\); set --text_field"):
        _text(tmp_path, [table])
    _assert_nothing_written(tmp_path)


def test_empty_input_is_refused(tmp_path):
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("")
    with pytest.raises(UserError, match="no documents in .*empty.txt: the input is empty"):
        _text(tmp_path, [empty_txt])
    empty_jsonl = _jsonl(tmp_path / "empty.jsonl", ["", '{"text": ""}'])
    with pytest.raises(UserError, match="no documents in"):
        _text(tmp_path, [empty_jsonl])
    with pytest.raises(UserError, match="no records in"):
        _dolly(tmp_path, [_jsonl(tmp_path / "no_records.jsonl", [])])
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(UserError, match=r"input folder .*empty_folder holds no .txt/.jsonl/.json/.parquet files"):
        _text(tmp_path, [tmp_path / "empty_folder"])
    _assert_nothing_written(tmp_path)


def test_split_that_would_be_empty_is_refused(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.\n")
    with pytest.raises(UserError, match=r"train split would be empty: all 7 tokens .*lower --val_block_tokens"):
        _text(tmp_path, [small], val_block_tokens=4096)
    few = _jsonl(tmp_path / "few.jsonl", DOLLY.read_text().splitlines()[:3])
    with pytest.raises(UserError, match=r"the val split would be empty.*raise --val_fraction"):
        _dolly(tmp_path, [few], val_fraction=0.001)
    with pytest.raises(UserError, match=r"all \d+ records were dropped.*raise --context_length"):
        _dolly(tmp_path, [few], context_length=8)
    _assert_nothing_written(tmp_path)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Some words to tokenise, enough for two splits.\n" * 5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match=rf"--output_dir {out} exists and is not empty; pass --overwrite"):
        _text(tmp_path, [text])
    assert (out / "precious.txt").read_text() == "keep me"
    _text(tmp_path, [text], overwrite=True)
    assert not (out / "precious.txt").exists() and load_manifest(out)["documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    # an overwrite that fails leaves the old dataset in place
    bad = _jsonl(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(UserError):
        _text(tmp_path, [bad], overwrite=True)
    assert load_manifest(out)["documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def interrupted_write(self, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, tokens)

    original = shards_module.ShardWriter.write
    monkeypatch.setattr(shards_module.ShardWriter, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        _text(tmp_path, [ASSETS_DIR / "tinyshakespeare.txt"], val_block_tokens=1000)
    _assert_nothing_written(tmp_path)


def test_missing_or_unsupported_inputs(tmp_path):
    with pytest.raises(UserError, match=r"input .*nope.txt does not exist"):
        _text(tmp_path, [tmp_path / "nope.txt"])
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n")
    with pytest.raises(UserError, match=r"table.csv: unsupported file type '.csv'"):
        _text(tmp_path, [csv])
    _assert_nothing_written(tmp_path)


def test_dataset_that_cannot_be_loaded(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load dataset 'someone/corpus' .*ConnectionError: Couldn't reach"):
        prepare_text(PrepareTextConfig(dataset="someone/corpus", output_dir=str(tmp_path / "out"), num_workers=0))
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("cls, settings, field", [
    (PrepareTextConfig, {"input": ["x"], "val_fraction": 0.0}, "val_fraction"),
    (PrepareTextConfig, {"input": ["x"], "val_fraction": 0.9}, "val_fraction"),
    (PrepareTextConfig, {"input": ["x"], "shard_size": 0}, "shard_size"),
    (PrepareTextConfig, {"input": ["x"], "val_block_tokens": -1}, "val_block_tokens"),
    (PrepareTextConfig, {"input": ["x"], "num_workers": -1}, "num_workers"),
    (PrepareTextConfig, {"input": ["x"], "text_field": ""}, "text_field"),
    (PrepareDollyConfig, {"input": ["x"], "format": "sharegpt"}, "format"),
    (PrepareDollyConfig, {"input": ["x"], "context_length": 0}, "context_length"),
    (PrepareDollyConfig, {"input": ["x"], "val_fraction": 1.0}, "val_fraction"),
])
def test_config_validation_names_the_field(cls, settings, field):
    with pytest.raises(UserError, match=rf"^--{field} \(\w+\.{field}\) = .* is not allowed: "):
        cls(**settings)


@pytest.mark.parametrize("cls", [PrepareTextConfig, PrepareDollyConfig])
def test_exactly_one_source(cls):
    with pytest.raises(UserError, match="give exactly one of --input .* and --dataset"):
        cls()
    with pytest.raises(UserError, match="give exactly one of --input .* and --dataset"):
        cls(input=["a.jsonl"], dataset="databricks/databricks-dolly-15k")


def test_damaged_parquet_page_names_the_file(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 20 for i in range(5000)]}), table,
                   compression="snappy", row_group_size=1000)
    data = bytearray(table.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # the footer still parses; a data page does not
    table.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"t\.parquet: cannot read the rows after row \d+ \("):
        _text(tmp_path, [table])
    _assert_nothing_written(tmp_path)


def test_a_bad_record_in_a_streamed_dataset_is_one_error(tmp_path):
    """datasets parses a streamed dataset as it goes, so its errors arrive mid-iteration."""
    folder = tmp_path / "local_dataset"
    folder.mkdir()
    lines = [json.dumps({"text": f"record {i}"}) for i in range(40)]
    lines[30] = '{"text": "cut short'
    _jsonl(folder / "train.jsonl", lines)
    with pytest.raises(UserError, match=r"dataset '.*local_dataset' \[train\]: cannot read the record after row "
                                        r"\d+ \(.*\); --skip_bad cannot skip inside the dataset's own reader"):
        _text(tmp_path, [], input=None, dataset=str(folder), streaming=True, skip_bad=True)
    _assert_nothing_written(tmp_path)
