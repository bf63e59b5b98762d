"""`gptds prepare text`: chunked .txt tokenisation equals whole-file tokenisation, the block train/val
split, shard files and the manifest with its sha256s, record files (JSONL, JSON, parquet) and folders,
the datasets code path on local files, and the command line."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import gptds_cli

from gptds.data.prepare import PrepareTextConfig, prepare_text
from gptds.data.shards import load_manifest, manifest_sha256, read_split, verify_shards
from gptds.data.sources import ReadReport, find_cut, iter_text_file, tokenize_pieces
from gptds.tokenizer import ASSETS_DIR, EOT_ID, VOCAB_SIZE, encode

SHAKESPEARE = ASSETS_DIR / "tinyshakespeare.txt"
SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/text/tinyshakespeare.txt"  # ../shared
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shakespeare_tokens() -> list[int]:
    return encode(SHAKESPEARE.read_text()) + [EOT_ID]


def _prepare(tmp_path, name="out", **overrides) -> Path:
    settings = {"output_dir": str(tmp_path / name), "num_workers": 0} | overrides
    return prepare_text(PrepareTextConfig(**settings))


@pytest.mark.parametrize("chunk_bytes", [4096, 100_000])
def test_chunked_txt_equals_whole_file(chunk_bytes, shakespeare_tokens):
    pieces = list(iter_text_file(SHAKESPEARE, ReadReport(), chunk_bytes))
    assert len(pieces) >= SHAKESPEARE.stat().st_size // chunk_bytes - 1
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    data = SHAKESPEARE.read_bytes()
    offset = 0
    for text, _ in pieces[:-1]:  # every cut follows the rule: printable ASCII, "\n" | printable ASCII
        offset += len(text.encode())
        assert data[offset - 1] == 0x0A and 0x21 <= data[offset - 2] <= 0x7E and 0x21 <= data[offset] <= 0x7E
    tokens, documents, chars = tokenize_pieces(pieces)
    assert tokens.tolist() == shakespeare_tokens
    assert documents == 1 and chars == len(SHAKESPEARE.read_text())


def test_fallback_cut_on_crlf_text_equals_whole_file(tmp_path):
    crlf = tmp_path / "crlf.txt"  # "\r\n" line ends: the "\n" rule never applies
    crlf.write_bytes(SHAKESPEARE.read_bytes()[:200_000].replace(b"\n", b"\r\n"))
    assert find_cut(crlf.read_bytes()) == -1
    pieces = list(iter_text_file(crlf, ReadReport(), chunk_bytes=2048))
    assert len(pieces) > 20
    assert tokenize_pieces(pieces)[0].tolist() == encode(crlf.read_bytes().decode()) + [EOT_ID]


def test_cjk_text_without_ascii_cut_points_streams_in_pieces_equal_to_the_whole(tmp_path):
    cjk = tmp_path / "cjk.txt"  # lines end with "。\n": no printable ASCII byte beside any newline
    cjk.write_text("".join(f"第{i}章。吾輩は猫である、名前はまだ無い。\n" for i in range(3000)))
    assert find_cut(cjk.read_bytes()) == -1 and find_cut(cjk.read_bytes(), fallback=True) > 0
    pieces = list(iter_text_file(cjk, ReadReport(), chunk_bytes=4096))
    assert len(pieces) > 10 and max(len(text.encode()) for text, _ in pieces) <= 5 * 4096  # held: bounded
    assert tokenize_pieces(pieces)[0].tolist() == encode(cjk.read_text()) + [EOT_ID]


def test_every_allowed_cut_is_exact():
    """Tokenise both sides of every position either rule accepts, on text full of awkward whitespace."""
    ascii_text = ("First Citizen:\nWe're  done,\tyou'll see.\n\n  Indented\nline 42\r\nnaïve café\nx\u00a0y\n"
                  "end.\n!?\n'tis\n  \n\nZ ").encode()
    # no printable ASCII beside any newline: only the fallback's any-script rule (or none) applies
    other_scripts = ("東京。\n大阪、\n\u3000全角\n１２\n\u3000\nは\n\u2028\nñ\n\u00a0é\n😀\n\u0301x\nщ\n\n"
                     "ü\r\nα\u2029\nß").encode()
    cuts = 0
    for text in (ascii_text, other_scripts):
        for fallback in (False, True):
            for size in range(3, len(text) + 1):
                p = find_cut(text[:size], fallback)
                if p > 0:
                    cuts += text is other_scripts
                    head, tail = text[:p].decode(), text[p:].decode()
                    assert encode(head) + encode(tail) == encode(head + tail), (fallback, p, head[-5:], tail[:5])
    assert cuts > 10


def test_prepare_text_shards_split_and_manifest(tmp_path, shakespeare_tokens):
    folder = _prepare(tmp_path, input=[str(SHAKESPEARE)], shard_size=100_000, val_block_tokens=1000,
                      val_fraction=0.1, num_workers=2)
    manifest = load_manifest(folder)
    for key, value in {"format": "gptds-shards", "version": 1, "kind": "text", "tokenizer": "gpt2",
                       "dtype": "uint16", "vocab_size": VOCAB_SIZE, "eot_token": EOT_ID, "documents": 1,
                       "val_block_tokens": 1000, "val_every_blocks": 10, "skipped_bad": 0}.items():
        assert manifest[key] == value, key
    assert manifest["source"] == {"inputs": [str(SHAKESPEARE)], "files": [str(SHAKESPEARE)]}
    assert isinstance(manifest["command"], list)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "train_000000.bin", "train_000001.bin",
                                                         "train_000002.bin", "train_000003.bin", "val_000000.bin"]
    for entry in manifest["shards"]:
        data = (folder / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["num_tokens"] * 2 == len(data)
    assert [e["num_tokens"] for e in manifest["shards"] if e["split"] == "train"][:3] == [100_000] * 3
    verify_shards(folder)

    # Block i of 1000 tokens is in val when i % 10 == 0: interleaving the splits gives back the stream.
    train, val = read_split(folder, "train").tolist(), read_split(folder, "val").tolist()
    assert manifest["splits"] == {"train": {"num_tokens": len(train), "num_shards": 4},
                                  "val": {"num_tokens": len(val), "num_shards": 1}}
    stream, t, v = [], 0, 0
    for block in range(-(-len(shakespeare_tokens) // 1000)):
        if block % 10 == 0:
            stream += val[v:v + 1000]
            v += 1000
        else:
            stream += train[t:t + 1000]
            t += 1000
    assert stream == shakespeare_tokens


def test_record_files_and_folders(tmp_path):
    docs = ["Alpha beta.", "Gamma\ndelta", "", "Epsilon zeta eta", "Theta."]
    data = tmp_path / "data"
    (data / "b_sub").mkdir(parents=True)
    (data / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:3])))
    (data / "b_sub" / "c.json").write_text(json.dumps([{"text": docs[3]}]))
    pq.write_table(pa.table({"text": [docs[4]], "other": [1]}), data / "b_sub" / "d.parquet")
    (data / "notes.md").write_text("not an input")
    (data / "z.txt").write_text("Iota kappa\n")
    folder = _prepare(tmp_path, input=[str(data)], val_block_tokens=4, val_fraction=0.5)
    manifest = load_manifest(folder)
    expected_files = [data / "a.jsonl", data / "b_sub" / "c.json", data / "b_sub" / "d.parquet", data / "z.txt"]
    assert manifest["source"]["files"] == [str(p) for p in expected_files]
    assert manifest["documents"] == 5 and manifest["empty_documents"] == 1
    expected = []
    for doc in [d for d in docs if d] + ["Iota kappa\n"]:
        expected += encode(doc) + [EOT_ID]
    train, val = read_split(folder, "train").tolist(), read_split(folder, "val").tolist()
    stream = []
    for block in range(-(-len(expected) // 4)):  # val_every = 2: blocks 0, 2, 4, ... are val
        source, i = (val, block // 2) if block % 2 == 0 else (train, block // 2)
        stream += source[i * 4:i * 4 + 4]
    assert stream == expected


def test_datasets_code_path_on_local_files(tmp_path, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    texts = [SHAKESPEARE.read_text()[i * 3000:(i + 1) * 3000] for i in range(20)]
    hub = tmp_path / "hub"
    hub.mkdir()
    pq.write_table(pa.table({"text": texts}), hub / "train.parquet")
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    direct = _prepare(tmp_path, "direct", input=[str(jsonl)], val_block_tokens=256)
    for streaming in (True, False):
        folder = _prepare(tmp_path, f"hub_{streaming}", dataset=str(hub), streaming=streaming, val_block_tokens=256)
        manifest = load_manifest(folder)
        assert manifest["source"] == {"dataset": str(hub), "dataset_config": None, "dataset_split": "train",
                                      "streaming": streaming}
        assert manifest["documents"] == 20
        assert manifest_sha256(folder) == manifest_sha256(direct)  # same tokens, whatever the source


def test_cli_prepare_text(tmp_path, shakespeare_tokens):
    out = tmp_path / "cli"
    result = gptds_cli("prepare", "text", "--input", str(SHAKESPEARE), "--output_dir", str(out), "--num_workers", "1",
                       "--val_block_tokens", "512")
    manifest = load_manifest(out)
    assert manifest["command"][1:] == ["prepare", "text", "--input", str(SHAKESPEARE), "--output_dir", str(out),
                                       "--num_workers", "1", "--val_block_tokens", "512"]
    total = manifest["splits"]["train"]["num_tokens"] + manifest["splits"]["val"]["num_tokens"]
    assert total == len(shakespeare_tokens)
    assert "tokens/s" in result.stdout

    again = subprocess.run([sys.executable, "-m", "gptds", "prepare", "text", "--input", str(SHAKESPEARE),
                            "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert again.returncode == 2
    message = f"gptds prepare: error: --output_dir {out} exists and is not empty; pass --overwrite to replace it " \
              "or choose another folder"
    assert again.stderr.strip().splitlines() == [message]


@pytest.mark.skipif(not SHARED_SHAKESPEARE.is_file(), reason=(
    f"optional: needs {SHARED_SHAKESPEARE}, tiny Shakespeare in the project's data folder beside the clone "
    f"(karpathy/char-rnn data/tinyshakespeare/input.txt); it checks that copy against the bundled one"))
def test_shared_copy_is_the_bundled_one():
    assert SHARED_SHAKESPEARE.read_bytes() == SHAKESPEARE.read_bytes()
    assert np.array_equal(tokenize_pieces(list(iter_text_file(SHARED_SHAKESPEARE, ReadReport())))[0][:10],
                          np.array(encode(SHAKESPEARE.read_text()[:100])[:10], dtype=np.uint16))
