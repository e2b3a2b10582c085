"""One writer per run dir: an exclusive OS file lock (``fcntl.flock``) on ``<run dir>/codeq.lock``.

The kernel drops the lock when its holder exits in any way, SIGKILL included, so a killed run never
leaves a stale lock behind. The file names the holder (pid, host, start time) for the message a
second process prints; a clean exit removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "codeq.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir's lock; the message names it and the dir."""


class RunDirLock:
    """``with RunDirLock(run_dir):`` holds the dir's lock, or raises RunDirBusy at once (it never waits)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"run dir {self.run_dir} is in use by {holder} (lock {self.path}); wait for that run to end "
                    f"or stop it, or choose another hydra.run.dir"
                ) from None
            # The previous holder may have removed the file between our open and our lock: then we hold a
            # lock on a deleted file, which protects nothing. Retry on the file that is there now.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the file, then drop the lock (in that order, so no one locks a file about to vanish unseen)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(run_dir: Path) -> bool:
    """True while a live process holds ``run_dir``'s lock (the file may outlive a killed holder, its lock not)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> str:
    """'pid P on host H since T' from the lock file; the holder may not have written it yet."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not written yet)"
