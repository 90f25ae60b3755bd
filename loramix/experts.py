"""Stacked expert LoRA parameters and the grouped (sorted-segment) matmuls that apply them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import init_lora_A


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert linear over contiguous segments.

    x: ``[P, in]`` rows sorted by expert; weight: ``[E, out, in]``; counts: rows per expert (sum P).
    Returns ``[P, out]`` with row block e equal to ``x_e @ weight[e].T``.
    """
    pieces = [F.linear(chunk, weight[e]) for e, chunk in enumerate(x.split(counts)) if chunk.shape[0]]
    if not pieces:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(pieces, dim=0)


class ExpertLoras(nn.Module):
    """The E LoRAs of one FFN projection, stacked: A ``[E, r, in]``, B ``[E, out, r]`` (fp32).

    Expert e's delta on input u is ``scaling * B[e] A[e] dropout(u)``.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, r: int, scaling: float,
                 dropout: float, init: str, device: torch.device | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=torch.float32))
        init_lora_A(self.lora_A, init, r)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def shared_input_delta(self, x: torch.Tensor, pair_rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Deltas for (token, expert) pairs whose inputs are token rows shared by all experts.

        x: ``[T, in]`` all tokens; pair_rows: ``[P]`` index into the ``[T*E]`` grid of (token, expert),
        sorted by expert; counts: pairs per expert. All experts' A run as one ``[T, E*r]`` matmul.
        Returns fp32 ``[P, out]``.
        """
        low = F.linear(self.lora_dropout(x.float()), self.lora_A.flatten(0, 1))      # [T, E*r]
        low = low.view(-1, self.rank).index_select(0, pair_rows)                      # [P, r]
        return grouped_linear(low, self.lora_B, counts) * self.scaling

    def pair_input_delta(self, u: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Deltas for pairs with their own inputs. u: ``[P, in]`` sorted by expert -> fp32 ``[P, out]``."""
        low = grouped_linear(self.lora_dropout(u.float()), self.lora_A, counts)       # [P, r]
        return grouped_linear(low, self.lora_B, counts) * self.scaling

    def delta(self, u: torch.Tensor, expert: int) -> torch.Tensor:
        """One expert's delta, straight from the formula. u: ``[n, in]`` -> fp32 ``[n, out]``."""
        return F.linear(F.linear(self.lora_dropout(u.float()), self.lora_A[expert]), self.lora_B[expert]) * self.scaling

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.rank}, scaling={self.scaling:g}"
