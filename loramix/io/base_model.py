"""Load a base model (plain or quantised through bitsandbytes), its tokenizer or its config (hub id, local
folder or .gguf file), and pick a device."""
from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import torch
from packaging.version import Version

from ..errors import LoramixError, Problems
from ..runconfig import ModelSpec, check_quantization

BITSANDBYTES_MIN_VERSION = "0.50"  # the version the tests run (its 4-bit and 8-bit layers work on CPU tensors)

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


def quantization_config(spec: ModelSpec) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``spec.quantization``, None without one.

    ``nf4`` / ``fp4``: 4-bit weights computing in ``spec.dtype``, the block scales quantised too with
    ``spec.double_quant``; ``int8``: LLM.int8 (outlier threshold 6, transformers' default). One-line errors
    for a missing or old bitsandbytes and for a base that is already quantised or a .gguf file, all before
    any weight is read.
    """
    check_quantization(spec)
    if spec.quantization is None:
        return None
    try:
        found = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise LoramixError(f"model.quantization {spec.quantization} needs bitsandbytes, which is not installed: "
                           "pip install 'loramix[quant]'") from None
    if Version(found) < Version(BITSANDBYTES_MIN_VERSION):
        raise LoramixError(f"model.quantization {spec.quantization} needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION}, "
                           f"found {found}: pip install -U 'loramix[quant]'")
    if spec.gguf_file or spec.name_or_path.endswith(".gguf"):
        raise LoramixError(f"model {spec.name_or_path!r}: a .gguf base is already quantised in its own format; "
                           "drop model.quantization (it is dequantised on load) or quantise its original checkpoint")
    saved = getattr(load_config(spec), "quantization_config", None)
    if saved is not None:
        method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", saved)
        raise LoramixError(f"model {spec.name_or_path!r} is already quantised ({getattr(method, 'value', method)}); "
                           "drop model.quantization to load it as saved")
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quantization,
                              bnb_4bit_use_double_quant=spec.double_quant,
                              bnb_4bit_compute_dtype=_DTYPES[spec.dtype])


def load_base_model(spec: ModelSpec, device: torch.device | str | None = None) -> Any:
    """The HF causal LM, frozen-ready, in ``spec.dtype``; quantised as ``spec.quantization`` asks.

    A quantised base is loaded straight onto ``device`` (default: :func:`resolve_device`'s ``auto``), where
    bitsandbytes quantises it; a plain one loads on the CPU and the caller moves it.
    """
    from transformers import AutoModelForCausalLM

    if spec.dtype not in _DTYPES:
        raise LoramixError(f"model.dtype must be one of {', '.join(_DTYPES)}, found {spec.dtype!r}")
    quantization = quantization_config(spec)
    where, kwargs = _source(spec.name_or_path, spec.gguf_file)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": str(device or resolve_device())})
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
