"""Fold LoRA updates into base weights, and the injected model's tensors under the base model's own names.

A LoRA on ``W`` ``[out, in]`` folds to ``W + s B A``; with DoRA (magnitude ``m`` ``[out]``) to
``(m / ||W + s B A||_row)[:, None] * (W + s B A)``; biases are unchanged (DoRA adds them after scaling).
Merge (dense checkpoints) and export (MoE checkpoints) both write from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import LoramixError
from ..families import projection_weight
from ..nn.lora import LoraLinear
from ..nn.moe import MixLoraFFN

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
    weight, _ = projection_weight(layer.base_layer)
    return _stored(layer.base_layer, merged_weight(weight, layer.lora_A, layer.lora_B, scaling=layer.scaling,
                                                   magnitude=layer.lora_magnitude))


def expert_merged_weight(ffn: MixLoraFFN, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s weight of FFN projection ``name``: the base weight plus that expert's LoRA
    (fp32, in the base weight's layout); the base weight as is when ``name`` is not targeted."""
    module = ffn.projection(name)
    weight, _ = projection_weight(module)
    if name not in ffn.experts:
        return module.weight.detach().float()
    loras = ffn.experts[name]
    magnitude = None if loras.lora_magnitude is None else loras.lora_magnitude[expert]
    return _stored(module, merged_weight(weight, loras.lora_A[expert], loras.lora_B[expert],
                                         scaling=loras.scaling, magnitude=magnitude))


def dense_ffn_tensors(prefix: str, ffn: MixLoraFFN, *, expert: int | None) -> Tensors:
    """The FFN's tensors under its original names: the base FFN (``expert=None``) or expert ``expert``'s."""
    for key, tensor in ffn.base_ffn.state_dict().items():
        name, _, kind = key.rpartition(".")
        if expert is not None and kind == "weight" and name in ffn.experts:
            tensor = expert_merged_weight(ffn, name, expert)
        yield f"{prefix}.{key}", tensor


def base_tensors(hf_model: nn.Module, ffn_tensors: Callable[[str, MixLoraFFN], Tensors]) -> Tensors:
    """The injected HF model's tensors under the base model's own names, in state-dict order.

    Attention LoRAs come folded into their projection's weight; adapter parameters are left out; each
    MixLoRA FFN contributes ``ffn_tensors(prefix, ffn)``. Tied weights (same storage) are given once.
    """
    owners = {name: module for name, module in hf_model.named_modules() if isinstance(module, (LoraLinear, MixLoraFFN))}
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
            else:
                yield f"{owner}.weight", lora_merged_weight(module)
                if getattr(module.base_layer, "bias", None) is not None:
                    yield f"{owner}.bias", module.base_layer.bias


def _owner(key: str, owners: dict[str, nn.Module]) -> str | None:
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in owners:
            return prefix
    return None


def cast(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    for name, tensor in tensors:
        yield name, tensor.detach().to(dtype)


def base_parameter_count(model) -> int:
    """Parameters of a MixLoraModel's base model alone (adapter excluded, tied weights once)."""
    adapter = {id(p) for _, p in model.trainable_parameters()}
    return sum(p.numel() for p in model.base_model.parameters() if id(p) not in adapter)


def check_unquantised(hf_model: nn.Module) -> None:
    """Folding needs real weights: refuse a base loaded quantised (GGUF files are dequantised on load)."""
    quantization = getattr(hf_model.config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    method = str(getattr(method, "value", method))  # an enum in transformers' own configs
    if method != "gguf":
        raise LoramixError(f"the base model was loaded quantised ({method}); "
                           "load it in float32/bfloat16 to fold the adapter into its weights")


def model_dtype(hf_model: nn.Module) -> torch.dtype:
    """The dtype of the base model's embedding weights (what its checkpoint holds)."""
    return hf_model.get_input_embeddings().weight.dtype
