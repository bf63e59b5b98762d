"""What gptds writes: an overwrite SIGKILLed at any point leaves the old or the new output at its path (or puts
the old one back at the next start), in both the atomic-exchange and the two-rename way; outputs never overlap
inputs (symlinks followed); written files get the permissions the umask gives (safetensors creates 0600
files); and a full disk is one line naming the path, the errno text and the free space."""

import errno
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT
from reliability_report import figures_fixture

from gptds.__main__ import main
from gptds.data.shards import ShardWriter, load_manifest
from gptds.errors import UserError
from gptds.model import GPT, GPTConfig
from gptds.staging import check_no_overlap
from gptds.weights import save_hf_directory

FIGURES = {"faults_injected": 0, "data_lost": 0, "faults": []}
report = figures_fixture("outputs", FIGURES)

# `gptds prepare text --overwrite` in a process SIGKILLed right after its n-th rename (os.replace) or, with
# "exchange", right after the atomic exchange; "renames" makes the exchange unavailable (file systems without it).
KILLED = """
import os, signal, sys
from gptds import staging
from gptds.__main__ import main
how, after = sys.argv[1], int(sys.argv[2])
real_replace, real_exchange, calls = os.replace, staging._exchange, [0]
def replace(a, b):
    real_replace(a, b)
    calls[0] += 1
    if how == "renames" and calls[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)
def exchange(a, b):
    if how == "renames":
        return False
    swapped = real_exchange(a, b)
    os.kill(os.getpid(), signal.SIGKILL)
os.replace, staging._exchange = replace, exchange
main(["prepare", "text", "--input", sys.argv[3], "--output_dir", sys.argv[4], "--overwrite", "--num_workers", "0",
      "--val_block_tokens", "8"])
"""


def prepare(corpus, out):
    assert main(["prepare", "text", "--input", str(corpus), "--output_dir", str(out), "--num_workers", "0",
                 "--val_block_tokens", "8"]) == 0


@pytest.mark.parametrize("how, after", [("exchange", 0), ("renames", 1), ("renames", 2)])
def test_an_overwrite_killed_at_any_point_keeps_the_old_or_the_new_output(tmp_path, how, after, capsys):
    (tmp_path / "old.txt").write_text("The old corpus. " * 50)
    (tmp_path / "new.txt").write_text("A new corpus, longer than the old one. " * 80)
    out = tmp_path / "data"
    prepare(tmp_path / "old.txt", out)
    old_manifest = load_manifest(out)
    proc = subprocess.run([sys.executable, "-c", KILLED, how, str(after), str(tmp_path / "new.txt"), str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": f"SIGKILL of `prepare --overwrite` after its {how} step {after}"})
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("data."))
    if (how, after) == ("renames", 1):  # between the two renames: the old output moved aside, nothing at its path
        assert not out.exists() and [name.split("-")[0] for name in leftovers] == ["data.old", "data.partial"]
        assert load_manifest(out)["source"] == old_manifest["source"]  # the next start (a reader) puts it back
    else:  # the new output is in place
        assert load_manifest(out)["source"]["files"] == [str(tmp_path / "new.txt")]
    prepare_again = ["prepare", "text", "--input", str(tmp_path / "new.txt"), "--output_dir", str(out), "--overwrite",
                     "--num_workers", "0", "--val_block_tokens", "8"]
    assert main(prepare_again) == 0  # the next writer of the path removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("data")) == ["data"]
    capsys.readouterr()


def test_overlap_is_found_through_symlinks(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "corpus")
    with pytest.raises(UserError, match=r"--output_dir \S+/alias/out lies inside the input --input \S+/corpus"):
        check_no_overlap([("--output_dir", tmp_path / "alias" / "out")], [("--input", tmp_path / "corpus")])
    check_no_overlap([("--output_dir", tmp_path / "corpus-prepared")], [("--input", tmp_path / "corpus")])


@pytest.fixture
def hf_folder(tmp_path):
    config = GPTConfig.from_preset("tiny")
    save_hf_directory(config, GPT(config).state_dict().items(), tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, hf_folder, umask, capsys):
    previous = os.umask(umask)
    try:
        assert main(["convert", "hf-to-gptds", str(hf_folder), str(tmp_path / "w.safetensors")]) == 0
        assert main(["convert", "hf-to-gptds", str(hf_folder), str(tmp_path / "weights")]) == 0
        (tmp_path / "c.txt").write_text("Some text. " * 40)
        prepare(tmp_path / "c.txt", tmp_path / "data")
    finally:
        os.umask(previous)
    capsys.readouterr()
    files = [tmp_path / "w.safetensors", *(tmp_path / "weights").iterdir(), *(tmp_path / "data").iterdir()]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}
    assert oct((tmp_path / "weights").stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_a_full_disk_is_one_line_with_the_path_the_errno_text_and_the_free_space(tmp_path, monkeypatch, capsys):
    def full(self, tokens):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._file.name))
    monkeypatch.setattr(ShardWriter, "_append", full)
    (tmp_path / "c.txt").write_text("Some text. " * 40)
    assert main(["prepare", "text", "--input", str(tmp_path / "c.txt"), "--output_dir", str(tmp_path / "data"),
                 "--num_workers", "0"]) == 1
    *progress, err = capsys.readouterr().err.strip().splitlines()  # tqdm's bar, then the error
    assert "error" not in "".join(progress) and "Traceback" not in err, err
    assert err.startswith(f"gptds prepare: error: {tmp_path}/data.partial-") and "_000000.bin: No space left on " \
        "device, " in err and err.endswith(" GiB free there"), err
    assert not (tmp_path / "data").exists() and [p.name for p in tmp_path.iterdir()] == ["c.txt"]
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": "ENOSPC writing a shard in prepare", "error": err})


def test_a_full_disk_under_safetensors_is_one_line_too(tmp_path, hf_folder, monkeypatch, capsys):
    """safetensors reports a failed write as SafetensorError("... (os error 28) ..."): the OSError it is."""
    from safetensors import SafetensorError

    from gptds import weights

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path '
                              f'"{filename}"')
    monkeypatch.setattr(weights, "save_file", full)
    assert main(["convert", "hf-to-gptds", str(hf_folder), str(tmp_path / "w.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gptds convert: error: {tmp_path}/w.partial-") and ".safetensors: No space left on " \
        "device, " in err and err.endswith(" GiB free there") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w.safetensors").exists()
    FIGURES["faults_injected"] += 1
    FIGURES["faults"].append({"fault": "ENOSPC writing safetensors in convert", "error": err})
