"""Stacked expert LoRA parameters (how they are applied to routed tokens is the dispatch package's)."""

from __future__ import annotations

import torch
from torch import nn

from .lora import adapted_projection, dora_weight_norm, init_lora_A


class ExpertLoras(nn.Module):
    """The E LoRAs of one FFN projection, stacked: A ``[E, r, in]``, B ``[E, out, r]`` (fp32).

    Expert e's delta on input u is ``scaling * B[e] A[e] dropout(u)``. With ``use_dora`` each expert
    also has a DoRA magnitude, ``lora_magnitude`` ``[E, out]``, set by :meth:`reset_magnitude`; DoRA
    experts are applied one at a time by :meth:`project` (the magnitude rescales after the projection).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, r: int, scaling: float,
                 dropout: float, init: str, device: torch.device | None = None, use_dora: bool = False) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=torch.float32))
        init_lora_A(self.lora_A, init, r)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude = None
        if use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(num_experts, out_features, device=device,
                                                           dtype=torch.float32))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def dropout_p(self) -> float:
        """The active dropout probability on the LoRA input (0 in eval mode or without dropout)."""
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) and self.training else 0.0

    def dropout_mask(self, rows: int) -> torch.Tensor | None:
        """An inverted-dropout mask for ``rows`` inputs, fp32 ``[rows, in]`` of 0 and ``1/(1-p)``, or None when
        dropout is inactive (``dropout(u) == u * mask``)."""
        p = self.dropout_p
        if p == 0:
            return None
        mask = torch.empty(rows, self.lora_A.shape[-1], device=self.lora_A.device, dtype=torch.float32)
        return mask.bernoulli_(1 - p).div_(1 - p)

    def dropped_input(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``dropout(x)`` in ``dtype`` (fp32 by default), the input of every expert's A. x: ``[T, in]``."""
        return self.lora_dropout(x.to(dtype))

    def weight_norms(self, base_layer: nn.Module) -> torch.Tensor:
        """``||W + s B_e A_e||_row`` per expert, fp32 ``[E, out]`` (``W`` from ``base_layer``)."""
        return torch.stack([dora_weight_norm(base_layer, a, b, self.scaling) for a, b in zip(self.lora_A, self.lora_B)])

    def reset_magnitude(self, base_layer: nn.Module) -> None:
        """DoRA: each expert's magnitude becomes its :meth:`weight_norms` (the value at init)."""
        with torch.no_grad():
            self.lora_magnitude.copy_(self.weight_norms(base_layer))

    def project(self, base_layer: nn.Module, u: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s whole projection (base, bias, delta; DoRA-rescaled if enabled).

        u: ``[n, in]`` -> ``[n, out]`` in the base output's dtype.
        """
        magnitude = None if self.lora_magnitude is None else self.lora_magnitude[expert]
        return adapted_projection(base_layer, u, self.lora_A[expert], self.lora_B[expert], scaling=self.scaling,
                                  dropout=self.lora_dropout, magnitude=magnitude)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"experts={self.num_experts}, r={self.rank}, scaling={self.scaling:g}{dora}"
