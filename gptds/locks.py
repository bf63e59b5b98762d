"""One run per folder: FolderLock, held by a training run on its run folder and its checkpoint folder for as
long as it runs. Where the file system supports flock (local disks, NFSv4, Lustre mounted with -o flock) it
is an OS lock, which the kernel releases when its holder dies however it dies; where it does not, the holder
writes its host, pid and a heartbeat every HEARTBEAT_S seconds, and a heartbeat older than STALE_AFTER_S (or
a pid that no longer runs on this host) is a dead holder's. A second run is refused naming the holder (host,
pid, start time), after waiting up to a bounded time for it to end (a requeued job whose predecessor is
still shutting down). Also who_holds/holder_is_dead, which the stale-JIT-build-lock check shares."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from gptds.errors import UserError

LOCK_FILE = ".gptds-run.lock"            # flock'ed; left in place (deleting a locked file races with openers)
HEARTBEAT_FILE = ".gptds-run.heartbeat"  # without flock: exists while held, rewritten every HEARTBEAT_S
HEARTBEAT_S = 30
STALE_AFTER_S = 180                      # a heartbeat this old is a dead holder's (clock skew included)
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def holder_record() -> dict:
    """Who this process is, as written into a lock file."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.now().isoformat(timespec="seconds")}


def who_holds(text: str) -> dict | None:
    """The holder record in a lock file's text, or None (empty: the holder has not written it yet; not ours)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def holder_is_dead(record: dict) -> bool:
    """True when the holder ran on this host and its pid is gone (another host's holder cannot be checked)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(record: dict | None) -> str:
    if not record:
        return "a process that has not written its name yet"
    return f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')}"


class FolderLock:
    """The lock of one folder (created if missing); `flag` names it in messages (--log_dir)."""

    def __init__(self, folder: Path, flag: str):
        self.folder, self.flag = Path(folder), flag
        self.fd: int | None = None
        self.heartbeat: threading.Event | None = None
        self.created: list[Path] = []  # folders this lock created, removed again by release(undo=True)

    def acquire(self, wait_s: float, say: Callable[[str], None] = print) -> FolderLock:
        """Take the lock, waiting up to wait_s seconds for another holder to end; UserError naming it if not."""
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.created = missing
        deadline, announced = time.monotonic() + wait_s, False
        while (holder := self._try()) is not False:
            if time.monotonic() >= deadline:
                self.release(undo=True)
                raise UserError(f"{self.flag} {self.folder} is in use by another run ({describe(holder)}): one run "
                                f"per folder{f' (waited {wait_s:g} s, --lock_wait_s)' if wait_s else ''}. Wait for "
                                f"it to end or stop it, or choose another {self.flag}")
            if not announced:
                say(f"{self.flag} {self.folder} is in use by another run ({describe(holder)}); waiting up to "
                    f"{wait_s:g} s for it to end (--lock_wait_s)")
                announced = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return self

    def _try(self) -> dict | None | bool:
        """False when acquired; otherwise the holder's record (None if unreadable)."""
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = who_holds(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            return holder
        except OSError as e:
            os.close(fd)
            if e.errno in NO_FLOCK:
                return self._try_heartbeat()
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
        self.fd = fd
        return False

    def _try_heartbeat(self) -> dict | None | bool:
        """Without flock: the heartbeat file, created exclusively; a stale one (dead pid on this host, or no
        heartbeat for STALE_AFTER_S) is moved aside and the creation retried."""
        path = self.folder / HEARTBEAT_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                text, age = path.read_text(errors="replace"), time.time() - path.stat().st_mtime
            except FileNotFoundError:  # released meanwhile
                return self._try_heartbeat()
            holder = who_holds(text)
            if not ((holder and holder_is_dead(holder)) or age > STALE_AFTER_S):
                return holder
            aside = path.with_name(f"{HEARTBEAT_FILE}.stale-{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return self._try_heartbeat()
            if aside.read_text(errors="replace") != text:  # another process took it over meanwhile: put it back
                os.rename(aside, path)
                return who_holds(text)
            aside.unlink()
            return self._try_heartbeat()
        record = json.dumps(holder_record()).encode()
        os.write(fd, record)
        os.close(fd)
        self.heartbeat = threading.Event()
        threading.Thread(target=self._beat, args=(path, record, self.heartbeat), daemon=True).start()
        return False

    @staticmethod
    def _beat(path: Path, record: bytes, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                path.write_bytes(record)

    def release(self, undo: bool = False) -> None:
        """Let go of the lock; with undo (the run did no work), also remove the folders acquire created."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.heartbeat is not None:
            self.heartbeat.set()
            self.heartbeat = None
            (self.folder / HEARTBEAT_FILE).unlink(missing_ok=True)
        if undo:
            for folder in self.created:  # deepest first
                for name in (LOCK_FILE, HEARTBEAT_FILE):
                    (folder / name).unlink(missing_ok=True)
                try:
                    folder.rmdir()
                except OSError:
                    break
            self.created = []
