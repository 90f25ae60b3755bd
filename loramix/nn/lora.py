"""LoraLinear: a frozen projection plus one low-rank update (the attention LoRAs), and DoRA."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..families import projection_shape, projection_weight
from .quantized import dense_weight


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


@torch.no_grad()
def dora_weight_norm(base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Row norms ``||W + s B A||`` (one per output unit), fp32 ``[out]``, outside the autograd graph.

    base_layer: Linear, Conv1D or a bitsandbytes layer (dequantised) with ``W`` ``[out, in]``; lora_A ``[r, in]``;
    lora_B ``[out, r]``.
    """
    return torch.linalg.norm(dense_weight(base_layer).float() + scaling * (lora_B @ lora_A), dim=1)


def adapted_projection(base_layer: nn.Module, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, *,
                       scaling: float, dropout: nn.Module, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The adapted projection of ``x`` ``[n, in]`` -> ``[n, out]`` in the base output's dtype.

    LoRA: ``W x + b + s B A dropout(x)``, the delta computed in fp32 and cast before it is added.
    DoRA (``magnitude`` ``[out]`` given): ``(m / n) (W x' + s B A x') + b + (W x - W x')`` with
    ``n = ||W + s B A||_row`` detached and ``x' = dropout(x)``; without active dropout that is
    ``(m / n)(W x + s B A x) + b``. The formula and the order of operations are HF PEFT's.
    """
    base = base_layer(x)
    dropped = dropout(x.float())
    delta = F.linear(F.linear(dropped, lora_A), lora_B) * scaling
    if magnitude is None:
        return base + delta.to(base.dtype)
    scale = magnitude / dora_weight_norm(base_layer, lora_A, lora_B, scaling)            # [out]
    bias = projection_weight(base_layer)[1]
    if isinstance(dropout, nn.Identity) or not dropout.training:
        plain = (base if bias is None else base - bias).float()                         # W x
    else:
        plain = F.linear(dropped, dense_weight(base_layer).float())                     # W x'
    return base + ((scale - 1) * plain + scale * delta).to(base.dtype)


class LoraLinear(nn.Module):
    """``y = base(x) + s * B A dropout(x)`` with A ``[r, in]``, B ``[out, r]`` in fp32; DoRA if ``use_dora``.

    The delta is computed in fp32 and cast to the base output's dtype before it is added.
    ``base_layer`` (nn.Linear or GPT-2 Conv1D) stays frozen and is called unchanged. With DoRA the
    trainable magnitude ``lora_magnitude`` ``[out]`` starts at the row norms of ``W`` (see
    :func:`adapted_projection`).
    """

    def __init__(self, base_layer: nn.Module, *, r: int, scaling: float, dropout: float, init: str,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = projection_shape(base_layer)
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        init_lora_A(self.lora_A, init, r)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude = None
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=torch.float32))
            self.reset_magnitude()

    def weight_norms(self) -> torch.Tensor:
        """``||W + s B A||_row``, fp32 ``[out]`` (DoRA's denominator)."""
        return dora_weight_norm(self.base_layer, self.lora_A, self.lora_B, self.scaling)

    def reset_magnitude(self) -> None:
        """DoRA: set the magnitude to :meth:`weight_norms` (its value at init, and what the reference loads)."""
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norms())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` -> ``[..., out]``."""
        return adapted_projection(self.base_layer, x, self.lora_A, self.lora_B, scaling=self.scaling,
                                  dropout=self.lora_dropout, magnitude=self.lora_magnitude)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}{dora}"
