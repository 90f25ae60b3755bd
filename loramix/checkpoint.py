"""Crash-safe training checkpoints: write into a temporary folder, then rename it into place.

A checkpoint folder ``checkpoint-<step>`` holds the adapter (``save_pretrained``), ``trainer_state.pt``
(step, trainable tensors, optimizer, scheduler, RNG states) and the run config. Because a folder only ever
appears under its final name by ``os.replace``, a kill -9 mid-save leaves at most a ``.tmp-*`` folder, which
is ignored and cleaned up.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from .errors import LoramixError

STATE_NAME = "trainer_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def atomic_dir(final: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_dir)`` and move the finished folder to ``final`` (replacing an older one)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (m := _CKPT.match(n)) and os.path.isfile(os.path.join(output_dir, n, STATE_NAME))]
    return sorted(found)


def clean_partial(output_dir: str) -> None:
    """Remove ``.tmp-*`` folders left by a save that was killed."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def rotate(output_dir: str, keep: int | None) -> None:
    """Delete all but the ``keep`` newest checkpoints (None keeps all)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in (found[:-keep] if keep > 0 else found):
        shutil.rmtree(path, ignore_errors=True)


def load_state(path: str) -> dict[str, Any]:
    try:
        return torch.load(os.path.join(path, STATE_NAME), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise LoramixError(f"{path}: unreadable checkpoint ({e})") from None
