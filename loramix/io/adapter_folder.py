"""An adapter folder: ``adapter_config.json`` plus the weights, in loramix's layout or MoE-PEFT's (moe_peft.py).

loramix's layout: ``adapter_config.json`` (MixLoraConfig) + ``adapter_model.safetensors`` whose keys are the
adapter parameter names inside the HF model (stacked experts, e.g. ``model.layers.0.mlp.experts.up_proj.lora_A``
of shape ``[E, r, in]``). Loading is strict: a missing, extra or misshapen tensor is an error naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import CONFIG_NAME, MixLoraConfig
from ..errors import LoramixError
from ..families import decoder_layers, family_for
from . import moe_peft
from .atomic import atomic_write, write_json

if TYPE_CHECKING:
    from ..model import MixLoraModel

SAFETENSORS_NAME = "adapter_model.safetensors"
FORMATS = ("loramix", "moe-peft")


class NonFiniteError(LoramixError):
    """An adapter or checkpoint tensor holds NaN or Inf."""


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """A NonFiniteError naming the first tensor that holds NaN or Inf (and how many more do)."""
    bad = [name for name, tensor in tensors if not torch.isfinite(tensor).all()]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteError(f"{where}: tensor {bad[0]!r}{more} holds NaN or Inf values")


def save_adapter(model: "MixLoraModel", directory: str, *, format: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter config and weights into ``directory``; each file is replaced atomically.

    ``state_dict``: the model's ``state_dict()`` (keys ``base_model.<adapter key>``), whose adapter tensors are
    written instead of the parameters (loramix format only)."""
    if format not in FORMATS:
        raise LoramixError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    if state_dict is not None and format != "loramix":
        raise LoramixError(f"saving from a state_dict writes the loramix format, not {format!r}")
    check_finite(model.trainable_parameters(), f"{directory}: adapter not saved")
    os.makedirs(directory, exist_ok=True)
    if format == "loramix":
        source = dict(model.trainable_parameters()) if state_dict is None else _adapter_entries(model, state_dict)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in source.items()}
        config = _config_dict(model)
        metadata = {"format": "pt", "model_type": model.config.model_type,
                    "num_hidden_layers": str(len(model.moe_layers()))}
        atomic_write(os.path.join(directory, SAFETENSORS_NAME), lambda p: save_file(tensors, p, metadata=metadata),
                     what=f"the adapter weights {SAFETENSORS_NAME}")
    else:
        tensors = moe_peft.state_dict(model)
        config = moe_peft.config_dict(model)
        atomic_write(os.path.join(directory, moe_peft.WEIGHTS_NAME), lambda p: torch.save(tensors, p),
                     what=f"the adapter weights {moe_peft.WEIGHTS_NAME}")
    atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: write_json(config, p), what=CONFIG_NAME)


def _config_dict(model: "MixLoraModel") -> dict:
    """The adapter_config.json of ``model`` in loramix's format (the activation spelled out)."""
    return {**model.mixlora_config.to_dict(), "act_fn": model.activation_name}


def _adapter_entries(model: "MixLoraModel", state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    entries = {}
    for name, _ in model.trainable_parameters():
        key = f"base_model.{name}"
        if key not in state_dict:
            raise LoramixError(f"the state_dict to save has no adapter tensor {key!r}")
        entries[name] = state_dict[key]
    return entries


def check_same_config(directory: str, model: "MixLoraModel") -> None:
    """Before loading weights into an existing model: the folder's adapter config must be the model's (the
    base model's name and an unrecorded activation aside); the error names the first field that differs."""
    found = read_adapter_config(directory).to_dict()
    if found.get("act_fn") is None:
        found["act_fn"] = model.activation_name
    ours = _config_dict(model)
    for key in ours:
        if key != "base_model_name_or_path" and found.get(key) != ours[key]:
            raise LoramixError(f"{os.path.join(directory, CONFIG_NAME)}: {key} is {found.get(key)!r}, "
                               f"the model's adapter has {ours[key]!r}")


def resolve_adapter_dir(name_or_path: str) -> str:
    """A local adapter folder as is; otherwise a hub repository id, downloaded (needs the hub)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise LoramixError(f"adapter folder not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, moe_peft.WEIGHTS_NAME])
    except Exception as exc:  # offline, unknown repo, ...: one line for the user
        raise LoramixError(f"adapter {name_or_path!r}: not a local folder and not downloadable ({exc})") from None


def read_adapter_config(directory: str) -> MixLoraConfig:
    if not os.path.isdir(directory):
        raise LoramixError(f"adapter folder not found: {directory}")
    return MixLoraConfig.from_json_file(os.path.join(directory, CONFIG_NAME))


def load_adapter_weights(model: "MixLoraModel", directory: str) -> None:
    """Copy every adapter tensor from the folder's weights file into ``model``; errors name the first bad key."""
    safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
    moe_peft_path = os.path.join(directory, moe_peft.WEIGHTS_NAME)
    if os.path.isfile(safetensors_path):
        tensors = _read_safetensors(safetensors_path)
        source = safetensors_path
    elif os.path.isfile(moe_peft_path):
        tensors = moe_peft.stacked(moe_peft.read_weights(moe_peft_path), model, moe_peft_path)
        source = moe_peft_path
    else:
        raise LoramixError(f"{directory}: no adapter weights ({SAFETENSORS_NAME} or {moe_peft.WEIGHTS_NAME})")
    _copy_into(model, tensors, source)
    if source == moe_peft_path:  # the reference's DoRA magnitude is ||W + s B A||_row of the loaded A, B
        with torch.no_grad():
            for name, magnitude, recomputed in moe_peft.dora_magnitudes(model):
                magnitude.copy_(recomputed)


def check_base_matches(directory: str, base_model) -> None:
    """Before injecting: the base's model_type and layer count must match those recorded in our file."""
    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        return
    metadata = _open_safetensors(path, lambda fh: fh.metadata() or {})
    found_type, base_type = metadata.get("model_type"), base_model.config.model_type
    if found_type and found_type != base_type:
        raise LoramixError(f"{path}: adapter was trained on model_type {found_type!r}, the base model is {base_type!r}")
    found_layers = metadata.get("num_hidden_layers")
    base_layers = len(decoder_layers(base_model, family_for(base_model)))
    if found_layers and int(found_layers) != base_layers:
        raise LoramixError(f"{path}: adapter has {found_layers} layers, the base model has {base_layers}")


def _open_safetensors(path: str, read: Callable):
    try:
        with safe_open(path, framework="pt") as fh:
            return read(fh)
    except Exception as exc:
        raise LoramixError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    return _open_safetensors(path, lambda fh: {key: fh.get_tensor(key) for key in fh.keys()})


def _copy_into(model: "MixLoraModel", tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check keys and shapes in the model's parameter order (so the first error is the first layer's), then copy."""
    params = dict(model.trainable_parameters())
    for key, param in params.items():
        if key not in tensors:
            raise LoramixError(f"{source}: missing key {key!r}")
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise LoramixError(f"{source}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                               f"expected {tuple(param.shape)}")
    for key in tensors:
        if key not in params:
            raise LoramixError(f"{source}: unexpected key {key!r} (not part of this model's adapter)")
    check_finite(((key, tensors[key]) for key in params), source)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
