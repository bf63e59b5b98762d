"""The loaders: batches are windows of the token stream (text) or loss-masked packed records (instruct),
ranks read disjoint data, epochs wrap with a reshuffled order, and a resumed loader (same or other world
size at equal global batch) continues with exactly the batches of an uninterrupted run."""

import json
import shutil

import numpy as np
import pytest
import torch

from gptds.data.instruct import IGNORE_INDEX, pack_row, row_to_xy
from gptds.data.loaders import build_loader, load_manifest, manifest_sha256
from gptds.data.prepare import PrepareDollyConfig, PrepareTextConfig, prepare_dolly, prepare_text
from gptds.data.shards import INDEX_DTYPE, TOKEN_DTYPE, read_split
from gptds.errors import UserError
from gptds.tokenizer import ASSETS_DIR, EOT_ID

SEED = 1234


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Tiny Shakespeare in 7 train shards of 45,000 tokens (and one val shard)."""
    out = tmp_path_factory.mktemp("text") / "data"
    return prepare_text(PrepareTextConfig(input=[str(ASSETS_DIR / "tinyshakespeare.txt")], output_dir=str(out),
                                          shard_size=45_000, val_block_tokens=2048, val_fraction=0.1, num_workers=0))


@pytest.fixture(scope="module")
def dolly_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dolly") / "data"
    return prepare_dolly(PrepareDollyConfig(input=[str(ASSETS_DIR / "dolly_sample.jsonl")], output_dir=str(out),
                                            context_length=512, val_fraction=0.1, num_workers=0))


def _loaders(folder, world_size, batch_size, context_length, split="train", shuffle=True):
    return [build_loader(folder, split, batch_size, context_length, rank, world_size, SEED, shuffle)
            for rank in range(world_size)]


def _run(loaders, steps):
    """steps global steps: for each, every rank's (x, y)."""
    return [[loader.next_batch() for loader in loaders] for _ in range(steps)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b, strict=True):
        for (xa, ya), (xb, yb) in zip(step_a, step_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _check_resume(folder, world_size, batch_size, context_length, first, then):
    uninterrupted = _run(_loaders(folder, world_size, batch_size, context_length), first + then)
    loaders = _loaders(folder, world_size, batch_size, context_length)
    _assert_same(_run(loaders, first), uninterrupted[:first])
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # the position is global: one state for all ranks
    state = json.loads(json.dumps(states[0]))   # small and JSON-serialisable
    resumed = _loaders(folder, world_size, batch_size, context_length)
    for loader in resumed:
        loader.load_state_dict(state)
    _assert_same(_run(resumed, then), uninterrupted[first:])
    return uninterrupted, resumed


def test_text_batches_are_consecutive_windows(text_dir):
    (loader,) = _loaders(text_dir, 1, 3, 32, split="val", shuffle=False)
    stream = torch.from_numpy(read_split(text_dir, "val").astype(np.int64))
    x, y = loader.next_batch()
    assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.int64
    for b in range(3):  # window b: tokens [32 b, 32 b + 33)
        assert torch.equal(x[b], stream[32 * b:32 * b + 32]) and torch.equal(y[b], stream[32 * b + 1:32 * b + 33])
    assert loader.tokens_per_batch == 96
    assert loader.manifest == load_manifest(text_dir)


def test_text_resume_is_exact_across_two_ranks_and_an_epoch_wrap(text_dir):
    (probe,) = _loaders(text_dir, 1, 1, 1024)
    steps_per_epoch = probe.windows_per_epoch / 16  # about 18.6 global steps of 2 ranks x 8 windows
    assert 15 < steps_per_epoch < 25  # so the resumed part below wraps into epoch 1
    uninterrupted, resumed = _check_resume(text_dir, world_size=2, batch_size=8, context_length=1024, first=15,
                                           then=10)
    assert [loader.epoch for loader in resumed] == [1, 1]
    # ranks never read the same window; in epoch 0 no window repeats at all
    rows = [tuple(x[b].tolist()) for step in uninterrupted[:18] for x, _ in step for b in range(8)]
    assert len(set(rows)) == len(rows)


def test_text_epoch_wrap_reshuffles_shards(text_dir):
    (loader,) = _loaders(text_dir, 1, 4, 256)
    manifest = load_manifest(text_dir)
    shards = [np.fromfile(text_dir / e["file"], dtype=TOKEN_DTYPE).astype(np.int64)
              for e in manifest["shards"] if e["split"] == "train"]
    per_epoch = loader.windows_per_epoch
    orders = [np.random.default_rng([SEED, epoch]).permutation(len(shards)) for epoch in (0, 1)]
    assert orders[0].tolist() != orders[1].tolist()
    streams = [np.concatenate([shards[k] for k in order]) for order in orders]
    steps = per_epoch // 4 + 2
    windows = [x for _ in range(steps) for x in loader.next_batch()[0]]
    assert loader.epoch == 1
    for i, x in enumerate(windows):
        epoch, w = divmod(i, per_epoch)
        assert torch.equal(x, torch.from_numpy(streams[epoch][w * 256:w * 256 + 256])), i


def test_text_resume_at_another_world_size_with_equal_global_batch(text_dir):
    two = _loaders(text_dir, 2, 4, 128)
    _run(two, 5)
    state = two[0].state_dict()
    expected = _run(two, 3)
    for world_size, batch_size in ((1, 8), (4, 2)):
        resumed = _loaders(text_dir, world_size, batch_size, 128)
        for loader in resumed:
            loader.load_state_dict(state)
        got = _run(resumed, 3)
        for step_got, step_expected in zip(got, expected, strict=True):
            assert torch.equal(torch.cat([x for x, _ in step_got]), torch.cat([x for x, _ in step_expected]))
            assert torch.equal(torch.cat([y for _, y in step_got]), torch.cat([y for _, y in step_expected]))


def test_load_state_dict_refuses_changes_that_alter_the_order(text_dir, tmp_path):
    (loader,) = _loaders(text_dir, 2, 4, 128)[:1]
    loader.next_batch()
    state = loader.state_dict()
    with pytest.raises(UserError, match="context_length was 128, now 64"):
        build_loader(text_dir, "train", 4, 64, 0, 2, SEED).load_state_dict(state)
    with pytest.raises(UserError, match=r"global batch was world_size 2 x micro_batch_size 4 = 8 sequences, "
                                        r"now 2 x 2 = 4"):
        build_loader(text_dir, "train", 2, 128, 0, 2, SEED).load_state_dict(state)
    with pytest.raises(UserError, match="seed was"):
        build_loader(text_dir, "train", 4, 128, 0, 2, SEED + 1).load_state_dict(state)
    with pytest.raises(UserError, match="split was 'train', now 'val'"):
        build_loader(text_dir, "val", 4, 128, 0, 2, SEED).load_state_dict(state)
    changed = tmp_path / "changed"
    shutil.copytree(text_dir, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    first = changed / manifest["shards"][0]["file"]
    tokens = np.fromfile(first, dtype=TOKEN_DTYPE)
    tokens[0] += 1
    tokens.tofile(first)
    manifest["shards"][0]["sha256"] = "0" * 64
    (changed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the prepared data changed"):
        build_loader(changed, "train", 4, 128, 0, 2, SEED).load_state_dict(state)


def test_reset_goes_back_to_the_start(text_dir):
    (loader,) = _loaders(text_dir, 1, 2, 64, split="val", shuffle=False)
    first = loader.next_batch()
    loader.next_batch()
    loader.reset()
    assert loader.state_dict()["cursor"] == 0
    again = loader.next_batch()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def _stored_records(folder, split):
    """(tokens, prompt_len) per record in manifest order."""
    out = []
    for entry in load_manifest(folder)["shards"]:
        if entry["split"] == split:
            tokens = np.fromfile(folder / entry["file"], dtype=TOKEN_DTYPE).astype(np.int64)
            index = np.fromfile(folder / entry["index_file"], dtype=INDEX_DTYPE).reshape(-1, 2)
            ends = list(index[1:, 0]) + [len(tokens)]
            out += [(tokens[s:e], int(p)) for (s, p), e in zip(index, ends, strict=True)]
    return out


def test_instruct_rows_are_packed_records_with_exact_masks(dolly_dir):
    (loader,) = _loaders(dolly_dir, 1, 4, 512, split="val", shuffle=False)
    records = _stored_records(dolly_dir, "val")
    assert loader.truncated_records == 0 and loader.dropped_records == 0
    x, y = loader.next_batch()
    # greedy packing in manifest order, whole records, rows of 513 tokens
    rows, row, used = [], [], 0
    for tokens, prompt_len in records:
        if used + len(tokens) > 513:
            rows.append(row)
            row, used = [], 0
        row.append((tokens, prompt_len))
        used += len(tokens)
    for b in range(4):
        ex, ey = row_to_xy(*pack_row(rows[b], 513))
        assert torch.equal(x[b], torch.from_numpy(ex)) and torch.equal(y[b], torch.from_numpy(ey))
    assert max(len(row) for row in rows[:4]) >= 2  # several short records share a row
    # the targets are exactly the response and end tokens of the packed records
    first = rows[0]
    expected_targets = [t for tokens, p in first for t in tokens[p:].tolist()]
    assert y[0][y[0] != IGNORE_INDEX].tolist() == expected_targets
    assert (y == IGNORE_INDEX).any() and ((y[:, :-1] == IGNORE_INDEX) | (y[:, :-1] == x[:, 1:])).all()


def test_instruct_resume_is_exact_across_two_ranks_and_an_epoch_wrap(dolly_dir):
    uninterrupted, resumed = _check_resume(dolly_dir, world_size=2, batch_size=4, context_length=512, first=5,
                                           then=12)
    assert [loader.epoch for loader in resumed] == [1, 1]  # the resumed part crossed into the next epoch
    for step in uninterrupted:  # the two ranks' rows differ
        assert not torch.equal(step[0][0], step[1][0])


def test_instruct_epoch_covers_every_record_once(dolly_dir):
    (loader,) = _loaders(dolly_dir, 1, 1, 512)
    seen = []
    while loader.epoch == 0:
        seen += [j for row in loader._pack(1) for j in row]
    assert sorted(seen) == list(range(loader.num_records))
    (other,) = _loaders(dolly_dir, 1, 1, 512)
    other.epoch = 1
    assert other._pack(1) != _loaders(dolly_dir, 1, 1, 512)[0]._pack(1)  # epoch 1 has its own order


def test_instruct_records_longer_than_the_row_are_truncated_and_counted(dolly_dir):
    records = _stored_records(dolly_dir, "train")
    (loader,) = _loaders(dolly_dir, 1, 8, 64)
    assert loader.truncated_records == sum(1 for t, p in records if len(t) > 65 and p <= 64)
    assert loader.dropped_records == sum(1 for t, p in records if p > 64)
    assert loader.truncated_records > 0 and loader.dropped_records > 0
    x, y = loader.next_batch()
    assert x.shape == (8, 64) and (y != IGNORE_INDEX).any(dim=1).all()
    assert ((y[:, :-1] == IGNORE_INDEX) | (y[:, :-1] == x[:, 1:])).all()


def test_manifest_errors_and_hash(text_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no manifest.json.*gptds prepare text"):
        build_loader(tmp_path / "empty", "train", 1, 8, 0, 1, 0)
    broken = tmp_path / "broken"
    shutil.copytree(text_dir, broken)
    with open(broken / "train_000002.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"train_000002.bin: 100 bytes, but .*manifest.json says 45000 tokens"):
        load_manifest(broken)
    copy = tmp_path / "copy"
    shutil.copytree(text_dir, copy)
    assert manifest_sha256(copy) == manifest_sha256(text_dir)
    with pytest.raises(UserError, match="split 'test' is not one of train, val"):
        build_loader(text_dir, "test", 1, 8, 0, 1, 0)
    with pytest.raises(UserError, match="rank 2"):
        build_loader(text_dir, "train", 1, 8, 2, 2, 0)
    with pytest.raises(UserError, match=r"val split has \d+ tokens, fewer than context_length \+ 1"):
        build_loader(text_dir, "val", 1, 1_000_000, 0, 1, 0)


def test_padding_is_eot(dolly_dir):
    (loader,) = _loaders(dolly_dir, 1, 2, 512, split="val", shuffle=False)
    x, y = loader.next_batch()
    assert x[0][-1].item() == EOT_ID and y[0][-1].item() == IGNORE_INDEX  # the first row ends in padding
