"""Files and folders that appear complete or not at all: write to a temporary name, then rename into place.

A write that runs out of disk space removes what it had written and raises :class:`DiskFullError`, one line
naming the folder and what was being written, instead of the writer's own error (torch's "unexpected pos",
safetensors' "I/O error").
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TypeVar

from ..errors import LoramixError

T = TypeVar("T")
TMP_PREFIX = ".tmp-"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_NEARLY_FULL = 16 * 2**20  # bytes free under which a short write (torch's "unexpected pos") means a full disk


class DiskFullError(LoramixError):
    """Writing ``what`` into ``folder`` ran out of disk space; nothing partial was left behind."""

    def __init__(self, folder: str, what: str, detail: str = "") -> None:
        self.folder, self.what = folder, what
        super().__init__(f"{folder}: out of disk space while writing {what} (nothing partial was left)"
                         + (f"; {detail}" if detail else ""))

    def with_detail(self, detail: str) -> "DiskFullError":
        """The same error with what is intact and what to do next added to its line."""
        return DiskFullError(self.folder, self.what, detail)


def out_of_space(exc: BaseException, folder: str) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means the disk (or quota) is full."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc)
    if any(t in text for t in _FULL_TEXTS):
        return True
    if "unexpected pos" in text:  # torch.save's zip writer after a short write: full when the disk is
        try:
            return shutil.disk_usage(folder).free < _NEARLY_FULL
        except OSError:
            return False
    return False


def remove_leftovers(final: str) -> None:
    """Remove the temporary folders a killed :func:`atomic_dir` into ``final`` left beside it."""
    parent, name = os.path.split(os.path.abspath(final))
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith(f"{TMP_PREFIX}{name}-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def atomic_write(path: str, write: Callable[[str], None], *, what: str | None = None) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = out_of_space(e, folder)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise DiskFullError(folder, what or os.path.basename(path)) from None
        raise


def append_line(path: str, line: str, *, what: str | None = None) -> None:
    """Append ``line`` (and a newline) to ``path`` whole or not at all: a short write is cut back off."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            os.ftruncate(fd, size)
            if out_of_space(e, os.path.dirname(path) or "."):
                raise DiskFullError(os.path.dirname(path) or ".", what or os.path.basename(path)) from None
            raise
    finally:
        os.close(fd)


def write_json(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def atomic_dir(final: str, write: Callable[[str], T], *, what: str | None = None) -> T:
    """Call ``write(tmp_dir)`` and move the finished folder to ``final`` (replacing an older one); returns what
    ``write`` returned. The temporary folder is ``.tmp-<name>-*`` beside ``final``."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.path.basename(final)}-", dir=parent)
    try:
        result = write(tmp)
        _fsync_tree(tmp)
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return result
    except BaseException as e:
        full = isinstance(e, DiskFullError) or out_of_space(e, parent)  # a file inside may have said so first
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(parent, what or os.path.basename(final)) from None
        raise
