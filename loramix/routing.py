"""Top-k routing and the Mixtral-form load-balancing loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    """Bias-free fp32 linear router ``z = fp32(x) W_r^T`` with ``W_r`` ``[E, D]`` ~ N(0, init_range^2)."""

    def __init__(self, hidden_size: int, num_experts: int, *, top_k: int, init_range: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, init_range)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: ``[T, D]`` -> logits ``[T, E]`` fp32, weights ``[T, k]`` fp32 (sum to 1), experts ``[T, k]`` long."""
        logits = F.linear(x.float(), self.weight)
        weights, experts = route_top_k(logits, self.top_k)
        return logits, weights, experts


def route_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts, keep the ``top_k`` largest, renormalise them to sum to 1."""
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def load_balancing_loss(router_logits: list[torch.Tensor], *, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixtral's auxiliary loss pooled over layers: ``E * sum_e f_e * mean_P_e`` (== top_k when balanced).

    router_logits: one ``[T, E]`` tensor per layer; token_mask: ``[T]`` with 1 for real tokens, 0 for padding.
    ``f_e`` is the masked fraction of (token, slot) choices that went to expert e (sums to top_k over e);
    ``mean_P_e`` the masked mean router probability. Gradient flows through ``mean_P_e`` only.
    """
    logits = torch.cat(router_logits, dim=0)                       # [L*T, E]
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices                     # [L*T, k]
    choices = F.one_hot(chosen, num_experts).sum(dim=1).to(probs.dtype)  # [L*T, E]
    if token_mask is None:
        token_mask = torch.ones(router_logits[0].shape[0], device=logits.device)
    mask = token_mask.to(probs.dtype).repeat(len(router_logits)).unsqueeze(-1)  # [L*T, 1]
    denom = mask.sum().clamp_min(1.0)
    fraction = (choices * mask).sum(dim=0) / denom                 # [E]
    mean_prob = (probs * mask).sum(dim=0) / denom                  # [E]
    return num_experts * (fraction * mean_prob).sum()
