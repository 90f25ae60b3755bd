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
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import LoramixError
from .adapter_folder import check_finite
from .atomic import atomic_dir

STATE_NAME = "trainer_state.pt"
RUN_CONFIG_NAME = "run_config.yaml"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


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


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: str, model: Any, *, optimizer: Any, scheduler: Any, step: int, run_config: dict[str, Any],
                    extra: dict[str, Any]) -> None:
    """Write ``checkpoint-<step>`` atomically: the adapter, ``trainer_state.pt`` and ``run_config.yaml``.
    Refused (nothing written) when an adapter tensor is not finite."""
    check_finite(_trainable(model).items(), f"{path} not written")

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        torch.save({"step": step, "params": {n: p.detach().cpu().clone() for n, p in _trainable(model).items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), **extra}, os.path.join(tmp, STATE_NAME))
        with open(os.path.join(tmp, RUN_CONFIG_NAME), "w", encoding="utf-8") as f:
            yaml.safe_dump(run_config, f, sort_keys=False)
    atomic_dir(path, write, what=os.path.basename(path))


def restore_checkpoint(path: str, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Load a checkpoint's trainable tensors, optimizer, scheduler and RNG state; returns its whole state
    (``step``, ...)."""
    state = load_state(path)
    params = _trainable(model)
    if set(params) != set(state["params"]):
        raise LoramixError(f"{path}: checkpoint does not match this adapter config (different parameters)")
    check_finite(state["params"].items(), path)
    with torch.no_grad():
        for name, value in state["params"].items():
            if params[name].shape != value.shape:
                raise LoramixError(f"{path}: checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                   f"the adapter expects {tuple(params[name].shape)}")
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
