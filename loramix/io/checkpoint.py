"""Crash-safe training checkpoints: write into a temporary folder, then rename it into place.

A checkpoint folder ``checkpoint-<step>`` holds the adapter (``save_pretrained``), ``trainer_state.pt``
(step, trainable tensors, optimizer, scheduler, RNG states) and the run config. Because a folder only ever
appears under its final name by ``os.replace``, a kill -9 mid-save leaves at most a ``.tmp-*`` folder, which
is ignored and cleaned up.

A checkpoint is whole whatever the run's layout: under FSDP (``train.fsdp``) the trainable parameters and
the AdamW state are DTensor shards, gathered when saved (so the files are those a one-process run writes:
the same keys, the optimizer state in ``optimizer.state_dict()``'s layout) and cut into this process's
shards when restored. Any checkpoint therefore resumes on any number of processes, with or without FSDP.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from torch.distributed.tensor import DTensor, distribute_tensor

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


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on the CPU (an all-gather: every process calls it); a plain tensor as is."""
    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


def _shard_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut as ``target`` is (this process's shard when it is a DTensor; no communication:
    every process holds ``value``)."""
    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


@contextlib.contextmanager
def whole_parameters(model: Any, *, keep: bool = True) -> Iterator[None]:
    """Within: the model's trainable DTensor parameters (FSDP shards) replaced by their whole values on the
    CPU, read-only, so that ``save_pretrained`` and ``named_parameters`` see the adapter a one-process run
    has. Collective: every process enters; those without ``keep`` take part in the gathers and drop the
    result (their model is unchanged). Without FSDP: nothing changes."""
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                whole = _whole(param)
                if keep:
                    module._parameters[name] = torch.nn.Parameter(whole)
                    swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def whole_optimizer_state(optimizer: Any, *, keep: bool = True) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with every DTensor state gathered onto the CPU (collective under FSDP);
    None without ``keep`` (that process drops each gathered tensor at once)."""
    state = optimizer.state_dict()
    gathered = {}
    for i, tensors in state["state"].items():
        whole = {k: _whole(v) for k, v in tensors.items()}
        if keep:
            gathered[i] = whole
    return {**state, "state": gathered} if keep else None


def save_checkpoint(path: str, model: Any, *, optimizer: Any, scheduler: Any, step: int, run_config: dict[str, Any],
                    extra: dict[str, Any], write: bool = True) -> None:
    """Write ``checkpoint-<step>`` atomically: the adapter, ``trainer_state.pt`` and ``run_config.yaml``.
    Refused (nothing written) when an adapter tensor is not finite.

    Under FSDP every process calls it (the shards are gathered) and the one with ``write`` writes."""
    optimizer_state = whole_optimizer_state(optimizer, keep=write)

    def write_files(tmp: str) -> None:
        model.save_pretrained(tmp)
        torch.save({"step": step, "params": {n: p.detach().cpu().clone() for n, p in _trainable(model).items()},
                    "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), **extra}, os.path.join(tmp, STATE_NAME))
        with open(os.path.join(tmp, RUN_CONFIG_NAME), "w", encoding="utf-8") as f:
            yaml.safe_dump(run_config, f, sort_keys=False)
    with whole_parameters(model, keep=write):
        if write:
            check_finite(_trainable(model).items(), f"{path} not written")
            atomic_dir(path, write_files, what=os.path.basename(path))


def _shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole ``optimizer.state_dict()`` with each per-parameter tensor cut as that parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(value: Any, param: torch.Tensor) -> Any:  # AdamW's moments are shaped as the parameter, its step not
        return _shard_like(value, param) if torch.is_tensor(value) and value.shape == param.shape else value
    return {**state, "state": {i: {k: cut(v, params[i]) for k, v in tensors.items()}
                               for i, tensors in state["state"].items()}}


def restore_checkpoint(path: str, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Load a checkpoint's trainable tensors, optimizer, scheduler and RNG state into this process's model
    and optimizer (its shards of them under FSDP); returns its whole state (``step``, ...)."""
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
            params[name].copy_(_shard_like(value, params[name]))
    optimizer.load_state_dict(_shard_optimizer_state(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
