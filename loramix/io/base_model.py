"""Load a base model, its tokenizer or its config (hub id, local folder or .gguf file), and pick a device."""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import LoramixError, Problems
from ..runconfig import ModelSpec

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.endswith(".gguf")


def _source(path: str, gguf_file: str | None) -> tuple[str, dict[str, Any]]:
    """(folder or hub id, extra from_pretrained kwargs) for a path that may name a .gguf file directly."""
    if path.endswith(".gguf") and gguf_file is None:
        if not os.path.isfile(path):
            raise LoramixError(f"{path}: no such .gguf file")
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    if _looks_local(path) and not os.path.exists(path):
        raise LoramixError(f"{path}: no such model folder")
    return path, ({"gguf_file": gguf_file} if gguf_file else {})


def check_model_files(spec: ModelSpec) -> None:
    """Before anything loads: the local model folder or .gguf file and tokenizer folder that ``spec`` names exist
    (hub ids are not looked up); one LoramixError for all."""
    problems = Problems()
    where = problems.result(_source, spec.name_or_path, spec.gguf_file, prefix="name_or_path: ")
    if where is not None:
        folder, kwargs = where
        gguf = kwargs.get("gguf_file")
        if os.path.isdir(folder) and gguf and not os.path.isfile(os.path.join(folder, gguf)):
            problems.add(f"gguf_file: {os.path.join(folder, gguf)}: no such .gguf file")
        elif os.path.isdir(folder) and not gguf and not os.path.isfile(os.path.join(folder, "config.json")):
            problems.add(f"name_or_path: {folder}: not a model folder (no config.json; a .gguf model needs gguf_file)")
    if spec.tokenizer:
        problems.check(_source, spec.tokenizer, None, prefix="tokenizer: ")
    problems.raise_if_any()


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer from ``spec.tokenizer`` or else the model's own folder / gguf file / hub id."""
    from transformers import AutoTokenizer

    where, kwargs = _source(spec.tokenizer or spec.name_or_path, None if spec.tokenizer else spec.gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise LoramixError(f"could not load a tokenizer from {where!r} ({str(e).splitlines()[0]}); "
                           "set model.tokenizer (--tokenizer) to a tokenizer folder") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(spec: ModelSpec) -> Any:
    """The base model's transformers config (hub id, folder or .gguf file) without loading its weights."""
    from transformers import AutoConfig

    where, kwargs = _source(spec.name_or_path, spec.gguf_file)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=spec.trust_remote_code, **kwargs)
    except Exception as exc:  # missing folder, offline hub, unknown architecture: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoramixError(f"model {spec.name_or_path!r}: cannot read its config ({first})") from None


def load_base_model(spec: ModelSpec) -> Any:
    """The HF causal LM, frozen-ready, in ``spec.dtype``."""
    from transformers import AutoModelForCausalLM

    if spec.dtype not in _DTYPES:
        raise LoramixError(f"model.dtype must be one of {', '.join(_DTYPES)}, found {spec.dtype!r}")
    where, kwargs = _source(spec.name_or_path, spec.gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=_DTYPES[spec.dtype],
                                                     trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise LoramixError(f"could not load model {where!r}: {str(e).splitlines()[0]}") from None
    return model


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; else ``name`` (cpu, cuda, cuda:N)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoramixError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise LoramixError(f"device {name!r}: no such CUDA device on this machine "
                           f"({torch.cuda.device_count()} visible)")
    if device.type not in ("cpu", "cuda"):
        raise LoramixError(f"device {name!r}: only cpu and cuda are supported")
    return device
