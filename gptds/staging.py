"""Outputs written atomically: everything goes to a staging sibling (<name>.partial-<pid>) that is renamed
to its final name only when complete, so an error or a kill never leaves a half-written dataset,
conversion or weights file under the name a user will read. Existing outputs need overwrite=True, and the
overwrite itself is crash-safe: the old and new folders are swapped in one atomic exchange where the file
system can (renameat2 RENAME_EXCHANGE), else moved with two renames, and a kill between those two leaves
<name>.old-<pid>, which the next start (recover: any command that writes or reads that path) puts back.
No output may be, lie inside, or contain an input of the same command (--overwrite or not). Files land
with the permissions the umask gives every other file (safetensors creates its files 0600)."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptds.errors import UserError

_LEFTOVER = re.compile(r"^(?P<name>.+?)\.(?P<kind>partial|old)-(?P<pid>\d+)(?P<suffix>\.[^.]*)?$")


def check_output(path: Path, overwrite: bool, flag: str, folder: bool = True) -> None:
    """Refuse to replace an existing output unless overwrite; `flag` names it in the message."""
    path = Path(path)
    recover(path)
    if folder and path.is_file():
        raise UserError(f"{flag} {path} is a file, not a folder")
    if folder and path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it "
                        f"or choose another folder")
    if not folder and path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it or choose another name")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


Paths = list[tuple[str, str | Path | None]]  # (flag, path) pairs; a None path is skipped


def check_no_overlap(outputs: Paths, inputs: Paths, allow_inputs_inside: bool = False) -> None:
    """Refuse an output that is, lies inside, or contains an input, symlinks followed: replacing, pruning or
    writing into it would destroy the input, --overwrite or not. allow_inputs_inside: an input inside the
    output is fine (a run folder that holds its own data)."""
    for out_flag, out in outputs:
        if out is None:
            continue
        o = _real(out)
        for in_flag, inp in inputs:
            if inp is None:
                continue
            i = _real(inp)
            if o == i or (o.exists() and i.exists() and os.path.samefile(o, i)):
                how = "is the same path as"
            elif o in i.parents and not allow_inputs_inside:
                how = "contains"
            elif i in o.parents:
                how = "lies inside"
            else:
                continue
            raise UserError(f"{out_flag} {out} {how} the input {in_flag} {inp}: writing there would replace or delete "
                            f"the input; choose an {out_flag} outside it")


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, a folder that cannot be created or written (a file where a folder of its
    path should be, a read-only file system), instead of failing at the first log line or checkpoint."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: cannot create it: {existing} is a file ({os.strerror(errno.ENOTDIR)})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write below {existing} ({os.strerror(errno.EACCES)})")


def free_space(path) -> str:
    """", N GiB free there" for the file system holding path (or its nearest existing parent), or ""."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return f", {shutil.disk_usage(existing).free / 2**30:.1f} GiB free there"
    except OSError:
        return ""


def _staging_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(path: Path, say=print) -> None:
    """Finish what a killed writer of `path` left: its old output moved aside (<name>.old-<pid>) goes back
    to `path` when nothing is there, else away; its staging folder or file (<name>.partial-<pid>) is
    deleted. Leftovers of running processes are not touched."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    for p in sorted(path.parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or _running(int(m["pid"])):
            continue
        own = m["name"] == path.name or (m["name"] == stem and (m["suffix"] or "") == suffix)
        if not own:
            continue
        if m["kind"] == "old" and not (path.exists() or path.is_symlink()):
            os.replace(p, path)
            say(f"{path}: restored the previous output, which an overwrite killed half-way had moved to {p.name}")
        else:
            _remove(p)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs,
    tmpfs, ...); False where the C library or the file system does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """Give path (a file, or a folder and everything in it) the permissions a new file gets from the umask:
    files 0666 & ~umask, folders 0777 & ~umask (safetensors creates its files 0600, tempfile 0600/0700)."""
    mask, path = _umask(), Path(path)
    targets = [path, *(path.rglob("*") if path.is_dir() else [])]
    for p in targets:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _commit(staging: Path, output: Path) -> None:
    """Put the complete staging path at output: either the old output or the new one is at output at every
    moment (or, where the two-rename fallback was killed half-way, the old one is put back by recover)."""
    publish_modes(staging)
    if not (output.exists() or output.is_symlink()) or output.is_file():
        os.replace(staging, output)  # atomic for a file, and for a folder onto nothing
        return
    if _exchange(staging, output):
        _remove(staging)  # now the old output
        return
    old = output.with_name(f"{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    os.replace(staging, output)
    _remove(old)


@contextmanager
def staged_dir(output_dir: Path, overwrite: bool, flag: str, inputs: Paths) -> Iterator[Path]:
    """Yield a fresh staging folder; on success it replaces output_dir, on any error it is deleted.
    `inputs`: what the command reads, (flag, path) pairs, none of which output_dir may overlap."""
    output_dir = Path(output_dir)
    check_no_overlap([(flag, output_dir)], inputs)
    check_output(output_dir, overwrite, flag)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(output_dir)
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        check_output(output_dir, overwrite, flag)  # again: something may have appeared meanwhile
        _commit(staging, output_dir)
    except BaseException:
        _remove(staging)
        raise


@contextmanager
def staged_file(output: Path, overwrite: bool, flag: str, inputs: Paths) -> Iterator[Path]:
    """Yield a staging path for one file; on success it replaces `output`, on any error it is deleted."""
    output = Path(output)
    check_no_overlap([(flag, output)], inputs)
    check_output(output, overwrite, flag, folder=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f"{output.stem}.partial-{os.getpid()}{output.suffix}")  # keeps the suffix
    _remove(staging)
    try:
        yield staging
        _commit(staging, output)
    except BaseException:
        _remove(staging)
        raise
