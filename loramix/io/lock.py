"""One run per output folder: an exclusive lock held for a run's lifetime (train; export and merge into OUT).

The lock is the file ``.<name>.lock`` beside the folder it guards (beside, so that the folder itself may be
replaced by a rename), ``flock``-ed while held and holding the holder's pid, host, start time and command.
The kernel drops an ``flock`` when its process dies, so a lock file left behind by a killed run is free: the
next run takes it over and says whose it was. A second run while the holder lives is refused at once.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import LoramixError


def lock_path(folder: str) -> str:
    """The lock file guarding ``folder``: ``<parent>/.<name>.lock``."""
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = datetime.datetime.fromtimestamp(started).isoformat(sep=" ", timespec="seconds") if started else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}: {holder.get('command', '?')}"


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class FolderLock:
    """The lock on ``folder``; ``with FolderLock(out, what="training run"):`` holds it for the block."""

    def __init__(self, folder: str, *, what: str = "run", echo: Callable[[str], None] = print) -> None:
        self.folder = folder
        self.path = lock_path(folder)
        self.what = what
        self.echo = echo
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a LoramixError naming the live holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise LoramixError(f"{self.path}: cannot create the lock file for {self.folder} ({e.strerror})") \
                    from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise LoramixError(f"{self.path}: cannot lock {self.folder} ({e.strerror})") from None
                raise LoramixError(f"{self.folder} is in use by another {holder.get('what', 'run')} "
                                   f"({_describe(holder)}); wait for it to end or choose another folder") from None
            if not self._same_file(fd):  # the holder removed the file while we waited: lock the new one
                os.close(fd)
                continue
            self._take(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int) -> None:
        previous = _read(fd)
        if previous:
            gone = previous.get("host") == socket.gethostname() and isinstance(previous.get("pid"), int) \
                and not _alive(previous["pid"])
            self.echo(f"note: {self.folder}: taking over the lock of a {previous.get('what', 'run')} that ended "
                      f"without releasing it ({_describe(previous)}{'; no longer running' if gone else ''})")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": self.what,
                  "command": " ".join(sys.argv) or sys.executable}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        except OSError as e:
            os.close(fd)
            raise LoramixError(f"{self.path}: cannot write the lock file for {self.folder} ({e.strerror})") from None
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        if self._same_file(self._fd):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
