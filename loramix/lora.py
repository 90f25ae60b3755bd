"""LoraLinear: a frozen projection plus one low-rank update (the attention LoRAs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .families import projection_shape


def init_lora_A(weight: torch.Tensor, init: str, rank: int) -> None:
    """In place: Kaiming-uniform(a=sqrt(5)) for "original", N(0, 1/r^2) for "gaussian" (PEFT's inits).

    ``weight`` is ``[..., r, in]``; each trailing ``[r, in]`` block is initialised on its own.
    """
    with torch.no_grad():
        if init == "gaussian":
            weight.normal_(0.0, 1.0 / rank)
        else:
            bound = 1.0 / math.sqrt(weight.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            weight.uniform_(-bound, bound)


class LoraLinear(nn.Module):
    """``y = base(x) + s * B A dropout(x)`` with A ``[r, in]``, B ``[out, r]`` in fp32.

    The delta is computed in fp32 and cast to the base output's dtype before it is added.
    ``base_layer`` (nn.Linear or GPT-2 Conv1D) stays frozen and is called unchanged.
    """

    def __init__(self, base_layer: nn.Module, *, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = projection_shape(base_layer)
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        init_lora_A(self.lora_A, init, r)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` -> ``[..., out]``."""
        base = self.base_layer(x)
        delta = F.linear(F.linear(self.lora_dropout(x.float()), self.lora_A), self.lora_B) * self.scaling
        return base + delta.to(base.dtype)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"
