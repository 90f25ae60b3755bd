"""A base model with an adapter folder on top (MixLoRA or PEFT LoRA), as eval, inspect, generate and export load it."""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import LoramixError
from .io import moe_peft
from .io.adapter_folder import SAFETENSORS_NAME, NonFiniteError, check_finite, read_adapter_config
from .io.base_model import load_base_model, load_tokenizer, resolve_device
from .model import MixLoraModel
from .runconfig import ModelSpec

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_kind(path: str) -> str:
    """"mixlora" or "lora" from an adapter folder's adapter_config.json ``peft_type``."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise LoramixError(f"{path}: no such adapter folder")
    if not os.path.isfile(cfg_path):
        raise LoramixError(f"{path}: not an adapter folder (no adapter_config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            peft_type = str(json.load(f).get("peft_type", "")).upper()
    except (json.JSONDecodeError, AttributeError) as e:
        raise LoramixError(f"{cfg_path}: malformed adapter config ({e})") from None
    if peft_type == "MIXLORA":
        return "mixlora"
    if peft_type == "LORA":
        return "lora"
    raise LoramixError(f"{cfg_path}: peft_type {peft_type!r} is not supported (MIXLORA or LORA)")


def check_adapter_folder(path: str) -> str:
    """Before anything loads: the adapter folder's kind ("mixlora" or "lora"), after checking that its config
    is valid (a MixLoRA config names every bad field) and that it has a weights file."""
    kind = adapter_kind(path)
    weights = (SAFETENSORS_NAME, moe_peft.WEIGHTS_NAME) if kind == "mixlora" else PEFT_WEIGHTS
    if kind == "mixlora":
        read_adapter_config(path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in weights):
        raise LoramixError(f"{path}: no adapter weights ({' or '.join(weights)})")
    return kind


def attach_adapter(base: Any, path: str | None) -> Any:
    """Base model with the adapter in ``path`` (MixLoRA or PEFT LoRA) in eval mode; the bare model if None."""
    if path is None:
        return base.eval()
    kind = adapter_kind(path)
    try:
        if kind == "mixlora":
            return MixLoraModel.from_pretrained(base, path).eval()
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, path).eval()
        check_finite(((n, p) for n, p in model.named_parameters() if "lora_" in n), path)
        return model
    except NonFiniteError:
        raise
    except LoramixError as e:
        raise LoramixError(f"adapter {path} does not fit this model: {e}") from None
    except (RuntimeError, KeyError, ValueError) as e:
        raise LoramixError(f"adapter {path} does not fit this model: {str(e).splitlines()[0]}") from None


def load_model(spec: ModelSpec, adapter: str | None = None, device: str = "auto") -> tuple[Any, Any]:
    """(model with adapter or bare, on ``device`` (see :func:`resolve_device`), tokenizer)."""
    where = resolve_device(device)  # a bad name fails before the model loads
    tokenizer = load_tokenizer(spec)
    return attach_adapter(load_base_model(spec, where), adapter).to(where), tokenizer
