"""Fold LoRA updates into base weights, and the injected model's tensors under the base model's own names.

A LoRA on ``W`` ``[out, in]`` folds to ``W + s B A``; with DoRA (magnitude ``m`` ``[out]``) to
``(m / ||W + s B A||_row)[:, None] * (W + s B A)``; biases are unchanged (DoRA adds them after scaling).
On a base loaded through bitsandbytes, ``W`` is the dequantised weight (nn/quantized.py): the one the
adapter was trained against. Merge (dense checkpoints) and export (MoE checkpoints) both write from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import LoramixError
from ..nn.lora import LoraLinear
from ..nn.moe import MixLoraFFN
from ..nn.quantized import dense_weight, parameter_count, quantization_of

Tensors = Iterator[tuple[str, torch.Tensor]]


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, *, scaling: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``W + s B A``, DoRA-rescaled row by row when ``magnitude`` is given.

    weight: ``[out, in]``; lora_A: ``[r, in]``; lora_B: ``[out, r]``; magnitude: ``[out]`` or None.
    """
    merged = weight.detach().float() + scaling * (lora_B.detach().float() @ lora_A.detach().float())
    if magnitude is not None:
        merged = merged * (magnitude.detach().float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged


def _stored(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` weight in the layout ``module.weight`` keeps (``[in, out]`` for GPT-2's Conv1D)."""
    return weight.t().contiguous() if type(module).__name__ == "Conv1D" else weight


def lora_merged_weight(layer: LoraLinear) -> torch.Tensor:
    """The attention LoRA folded into its base weight (fp32, in the base weight's layout)."""
    return _stored(layer.base_layer, merged_weight(dense_weight(layer.base_layer), layer.lora_A, layer.lora_B,
                                                   scaling=layer.scaling, magnitude=layer.lora_magnitude))


def expert_merged_weight(ffn: MixLoraFFN, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s weight of FFN projection ``name``: the base weight plus that expert's LoRA
    (fp32, in the base weight's layout); the base weight as is when ``name`` is not targeted."""
    module = ffn.projection(name)
    weight = dense_weight(module)
    if name not in ffn.experts:
        return _stored(module, weight).float()
    loras = ffn.experts[name]
    magnitude = None if loras.lora_magnitude is None else loras.lora_magnitude[expert]
    return _stored(module, merged_weight(weight, loras.lora_A[expert], loras.lora_B[expert],
                                         scaling=loras.scaling, magnitude=magnitude))


def dense_ffn_tensors(prefix: str, ffn: MixLoraFFN, *, expert: int | None) -> Tensors:
    """The FFN's tensors under its original names: the base FFN (``expert=None``) or expert ``expert``'s."""
    for key, tensor in dequantized_state(ffn.base_ffn):
        name, _, kind = key.rpartition(".")
        if expert is not None and kind == "weight" and name in ffn.experts:
            tensor = expert_merged_weight(ffn, name, expert)
        yield f"{prefix}.{key}", tensor


def projection_tensors(prefix: str, module: nn.Module) -> Tensors:
    """A projection's ``weight`` (dequantised from bitsandbytes' packing, in its stored layout) and ``bias``."""
    yield f"{prefix}weight", _stored(module, dense_weight(module))
    if getattr(module, "bias", None) is not None:
        yield f"{prefix}bias", module.bias


def dequantized_state(module: nn.Module) -> Tensors:
    """``module.state_dict()`` with each bitsandbytes projection's packed weight and quantisation state given as
    its dequantised ``weight`` and its ``bias``."""
    quantized = {name: m for name, m in module.named_modules() if quantization_of(m)}
    done: set[str] = set()
    for key, tensor in module.state_dict().items():
        owner = _owner(key, quantized)
        if owner is None:
            yield key, tensor
        elif owner not in done:
            done.add(owner)
            yield from projection_tensors(f"{owner}.", quantized[owner])


def base_tensors(hf_model: nn.Module, ffn_tensors: Callable[[str, MixLoraFFN], Tensors]) -> Tensors:
    """The injected HF model's tensors under the base model's own names, in state-dict order.

    Attention LoRAs come folded into their projection's weight; adapter parameters are left out; each
    MixLoRA FFN contributes ``ffn_tensors(prefix, ffn)``; other bitsandbytes projections come dequantised.
    Tied weights (same storage) are given once.
    """
    owners = {name: module for name, module in hf_model.named_modules()
              if isinstance(module, (LoraLinear, MixLoraFFN)) or quantization_of(module)}
    done: set[str] = set()
    seen_storage: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in hf_model.state_dict().items():
        owner = _owner(key, owners)
        if owner is None:
            storage = (tensor.data_ptr(), tuple(tensor.shape))
            if tensor.numel() and storage in seen_storage:
                continue
            seen_storage.add(storage)
            yield key, tensor
        elif owner not in done:
            done.add(owner)
            module = owners[owner]
            if isinstance(module, MixLoraFFN):
                yield from ffn_tensors(owner, module)
            elif not isinstance(module, LoraLinear):  # a quantised projection without an adapter
                yield from projection_tensors(f"{owner}.", module)
            else:
                yield f"{owner}.weight", lora_merged_weight(module)
                if getattr(module.base_layer, "bias", None) is not None:
                    yield f"{owner}.bias", module.base_layer.bias


def _owner(key: str, owners: dict[str, nn.Module]) -> str | None:
    """The outermost owner module of state-dict ``key`` (a LoraLinear before the quantised layer inside it)."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if prefix in owners:
            return prefix
    return None


def cast(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    for name, tensor in tensors:
        yield name, tensor.detach().to(dtype)


def base_parameter_count(model) -> int:
    """Parameters of a MixLoraModel's base model alone (adapter excluded, tied weights once, 4-bit ones unpacked)."""
    adapter = {id(p) for _, p in model.trainable_parameters()}
    return sum(parameter_count(p) for p in model.base_model.parameters() if id(p) not in adapter)


def check_foldable(hf_model: nn.Module) -> None:
    """Folding needs weights it can read: GGUF bases are dequantised on load and bitsandbytes ones here
    (:func:`~loramix.nn.quantized.dense_weight`); refuse any other quantisation."""
    quantization = getattr(hf_model.config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    method = str(getattr(method, "value", method))  # an enum in transformers' own configs
    if method not in ("gguf", "bitsandbytes"):
        raise LoramixError(f"the base model was loaded quantised ({method}), which loramix cannot dequantise; "
                           "load it in float32/bfloat16 (or through bitsandbytes) to fold the adapter")


def model_dtype(hf_model: nn.Module) -> torch.dtype:
    """The dtype of the base model's embedding weights (what its checkpoint holds)."""
    return hf_model.get_input_embeddings().weight.dtype
