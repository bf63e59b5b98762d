"""Checkpoint integrity, without launching ranks: every file's content checksum in meta.json (computed from the
bytes as they are written), a checkpoint damaged in place (same size, even with its modification time put back)
skipped by --auto_resume with its name and the reason and refused by --resume, a meta.json missing a field
refused by name (never a KeyError), keep-last-N never deleting an intact checkpoint while keeping a damaged
one, and pruning that re-reads only the files changed since their last check. The same faults on 2-rank runs
are in tests/test_reliability.py; the command-line refusals in tests/test_hostile_inputs.py."""

import json
import os

import pytest
import torch
from conftest import FAKE_META, fake_checkpoint
from reliability_report import figures_fixture

from gptds import checkpoint
from gptds.__main__ import build_parser
from gptds.config import run_config_from_flags
from gptds.errors import UserError

FIGURES = {"faults_injected": 0, "data_lost": 0, "faults": []}
report = figures_fixture("checkpoint_integrity", FIGURES)


def fault(name: str) -> None:
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": name})


def damage_in_place(path, offset: int = 100, keep_mtime: bool = True) -> None:
    """Overwrite bytes inside a file without changing its size (bit rot, a stray write); optionally put its
    modification time back, so that nothing but its content tells."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(255 - b for b in path.read_bytes()[offset:offset + 16]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def auto_resume(tmp_path, *flags):
    args = build_parser().parse_args(["pretrain", "--log_dir", str(tmp_path / "run"), "--auto_resume", *flags])
    run = run_config_from_flags("pretrain", args)
    return checkpoint.resume_target(run.checkpoint_dir, run.checkpoint)


def test_checksums_are_computed_from_the_bytes_as_written(tmp_path):
    state = {"weights": torch.randn(1000), "step": 3}
    f = checkpoint.ChecksummedFile(tmp_path / "shard.pt")
    torch.save(state, f)
    f.close()
    assert f.error is None and f.checksum == checkpoint.file_checksum(tmp_path / "shard.pt")
    assert torch.equal(torch.load(tmp_path / "shard.pt")["weights"], state["weights"])


def test_a_failed_write_keeps_its_errno_for_the_message(tmp_path):
    f = checkpoint.ChecksummedFile(tmp_path / "missing-folder" / "shard.pt")
    with pytest.raises((OSError, RuntimeError)):  # torch.save turns a write error met inside its writer into this
        torch.save({"x": torch.zeros(10)}, f)
    assert f.error is not None and f.error.strerror == "No such file or directory"


def test_auto_resume_skips_damaged_and_unreadable_checkpoints_naming_each_and_why(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3, 4):
        fake_checkpoint(folder, step)
    damage_in_place(folder / "step_00000004" / "shard.pt")  # mtime put back: verified.json alone would not tell
    meta = folder / "step_00000003" / "meta.json"
    meta.write_text(meta.read_text().replace('"model_config"', '"model_cfg"'))
    (folder / "step_00000002" / "meta.json").unlink()  # an interrupted save
    fault("checkpoint damaged in place, modification time restored")
    fault("meta.json with a field renamed")
    fault("checkpoint without meta.json (interrupted save)")
    assert auto_resume(tmp_path) == folder / "step_00000001"
    out = capsys.readouterr().out
    assert "skipping checkpoint step_00000004: " in out and "file shard.pt does not match its xxh3_128 checksum" in out
    assert "skipping checkpoint step_00000003: " in out and "field 'model_config' is missing" in out
    assert "skipping checkpoint step_00000002: " in out and "no meta.json; an interrupted save leaves none" in out


def test_resume_from_a_damaged_checkpoint_is_refused(tmp_path):
    step_dir = fake_checkpoint(tmp_path / "elsewhere", 5)
    damage_in_place(step_dir / "shard.pt", offset=0)
    fault("--resume --checkpoint_path to a checkpoint damaged in place")
    args = build_parser().parse_args(["pretrain", "--log_dir", str(tmp_path / "run"), "--resume",
                                      "--checkpoint_path", str(step_dir)])
    run = run_config_from_flags("pretrain", args)
    with pytest.raises(UserError, match=r"step_00000005: file shard\.pt does not match its xxh3_128 checksum"):
        checkpoint.resume_target(run.checkpoint_dir, run.checkpoint)


def test_keep_last_n_never_deletes_an_intact_checkpoint_while_keeping_a_damaged_one(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        fake_checkpoint(folder, step)
    damage_in_place(folder / "step_00000003" / "shard.pt", keep_mtime=False)
    fake_checkpoint(folder, 4)  # the save that prunes
    fault("checkpoint damaged in place, then keep-last-N")
    removed = checkpoint.prune(folder, keep_last_n=2)
    assert [p.name for p in checkpoint.step_dirs(folder)] == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000003"]
    assert "removed unusable checkpoint step_00000003 (" in capsys.readouterr().out


def test_pruning_rereads_only_the_files_changed_since_their_last_check(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        fake_checkpoint(folder, step)
    reads = []
    checksum = checkpoint.file_checksum
    monkeypatch.setattr(checkpoint, "file_checksum", lambda path: reads.append(path.parent.name) or checksum(path))
    checkpoint.prune(folder, keep_last_n=-1)
    assert reads == []  # each was checked as it was written (verified.json)
    (folder / "step_00000002" / "shard.pt").write_bytes(b"y" * 1000)  # rewritten: same size, new content
    checkpoint.prune(folder, keep_last_n=-1)
    assert reads == ["step_00000002"] and not (folder / "step_00000002").exists()  # read, found damaged, removed
    checkpoint.prune(folder, keep_last_n=-1)
    assert reads == ["step_00000002"]


@pytest.mark.parametrize("field", sorted(checkpoint.META_FIELDS))
def test_a_meta_json_without_a_field_gptds_reads_is_refused_by_name(tmp_path, field):
    step_dir = fake_checkpoint(tmp_path, 1)
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta[field]
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"meta\.json: field '{field}' is missing"):
        checkpoint.verify(step_dir)


@pytest.mark.parametrize("change, message", [
    ({"step": "7"}, r"field 'step' is '7', not a JSON int"),
    ({"world_size": True}, r"field 'world_size' is True"),
    ({"model_config": {**FAKE_META["model_config"], "n_embd": "wide"}}, r"model_config is not a GPT config"),
    ({"run_config": {"data": {}}}, r"run_config\.data lacks micro_batch_size"),
    ({"checksums": {}}, r"checksums of its files are missing or incomplete"),
    ({"files": {"../../etc/passwd": 1}}, r"file entry '\.\./\.\./etc/passwd'"),
])
def test_a_meta_json_with_a_field_of_the_wrong_kind_is_refused(tmp_path, change, message):
    step_dir = fake_checkpoint(tmp_path, 1)
    meta = json.loads((step_dir / "meta.json").read_text())
    (step_dir / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(UserError, match=message):
        checkpoint.verify(step_dir)


def test_checkpoints_from_before_checksums_are_still_read_by_size(tmp_path):
    step_dir = fake_checkpoint(tmp_path, 1)
    meta = json.loads((step_dir / "meta.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("checksum", "checksums")}
    (step_dir / "meta.json").write_text(json.dumps({**meta, "format": checkpoint.SIZES_ONLY_FORMAT}))
    assert checkpoint.verify(step_dir)["step"] == 1
