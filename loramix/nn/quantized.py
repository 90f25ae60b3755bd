"""bitsandbytes-quantised projections (4-bit NF4/FP4, 8-bit LLM.int8): which they are and their real weights.

transformers' ``BitsAndBytesConfig`` swaps a base's linear layers for bitsandbytes' ``Linear4bit`` (the
weight packed two 4-bit codes per byte, ``[out * in / 2, 1]`` uint8, one absmax scale per block of 64) or
``Linear8bitLt`` (int8 ``[out, in]``, one fp32 scale per output row). Both stay ``nn.Linear`` subclasses
with the true ``in_features`` / ``out_features``, and loramix calls them unchanged (their forward
dequantises). What needs the weight itself (DoRA's row norms, the fold into merged or exported
checkpoints) reads :func:`dense_weight`. bitsandbytes is imported only for its own layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import projection_weight


def quantization_of(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes projection; None for any other module."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return weight.quant_type
    if kind == "Int8Params":
        return "int8"
    return None


def model_quantization(model: nn.Module) -> str | None:
    """The quantisation of a model's projections (``"nf4"``, ``"fp4"``, ``"int8"``), None when none is."""
    return next((q for q in map(quantization_of, model.modules()) if q is not None), None)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as ``[out, in]``, outside the autograd graph.

    bitsandbytes layers: a new, dequantised tensor (4-bit: in the dtype the weight was quantised from;
    8-bit: fp32, the int8 rows times their scales; a 4-bit layer bitsandbytes repacked for its CPU kernel
    is first unpacked, :func:`keep_canonical_layout`). Linear and GPT-2 Conv1D: the weight itself (a
    transposed view for Conv1D).
    """
    quantization = quantization_of(module)
    if quantization is None:
        return projection_weight(module)[0].detach()
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    if quantization == "int8":
        scales = module.state.SCB if module.state.SCB is not None else weight.SCB  # SCB moves at the first forward
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales)
    keep_canonical_layout(module)
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)


def keep_canonical_layout(module: nn.Module) -> None:
    """Keep a ``Linear4bit`` in bitsandbytes' canonical packing.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first eval-mode, no-grad forward
    for a bf16 inference kernel: the absmax scales are rounded to bf16, the double quantisation is undone,
    and a later training forward takes that kernel's path, whose results differ from the training path's
    and from :func:`dense_weight`. Turned off here, so every forward, train or eval, computes the same function
    of the same weight; a layer already repacked is unpacked (its scales stay bf16-rounded).
    """
    if quantization_of(module) not in ("nf4", "fp4"):
        return
    module.support_avx512bf16_for_cpu = False
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnb_functional

        # The inverse bitsandbytes itself applies before saving such a layer's state dict.
        module.weight.data, module.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
            module.weight.data, state)


def keep_canonical_layouts(model: nn.Module) -> None:
    """:func:`keep_canonical_layout` on every 4-bit projection of ``model``."""
    for module in model.modules():
        keep_canonical_layout(module)


def parameter_count(param: torch.Tensor) -> int:
    """The number of weights a parameter holds: a 4-bit one packs two per byte of its storage dtype."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()
