"""Routers (top-k, top-p, switch) and their auxiliary losses (Mixtral load balancing, switch z-loss).

Every router maps FFN inputs ``[T, D]`` to ``(logits [T, E] fp32, weights [T, k] fp32, experts [T, k] long)``:
token t's FFN output is ``sum_slot weights[t, slot] * FFN_{experts[t, slot]}(x_t)``. An expert id of
``NO_EXPERT`` (-1) means the frozen FFN with no expert delta (switch tokens over capacity). The
semantics of each routing are documented in docs/variants.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..config import MixLoraConfig

NO_EXPERT = -1


class TopKRouter(nn.Module):
    """Bias-free fp32 linear router ``z = fp32(x) W_r^T`` with ``W_r`` ``[E, D]`` ~ N(0, init_range^2).

    Keeps the ``top_k`` most probable experts and renormalises their weights to sum to 1.
    """

    renormalises = True  # whether each token's weights sum to 1 (the fast path's shared-bias identity)

    def __init__(self, hidden_size: int, num_experts: int, *, top_k: int, init_range: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, init_range)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, D]`` -> fp32 ``[T, E]``."""
        return F.linear(x.float(), self.weight)

    def forward(self, x: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: ``[T, D]`` -> logits ``[T, E]`` fp32, weights ``[T, k]`` fp32 (sum to 1), experts ``[T, k]`` long.

        ``batch_shape`` (``(B, S)`` with ``B*S == T``) is only used by routers that look at sequences.
        """
        logits = self.logits(x)
        weights, experts = route_top_k(logits, self.top_k)
        return logits, weights, experts


class TopPRouter(TopKRouter):
    """Top-p ("mixlora-dynamic"): ``p = softmax(z / temperature)``; experts in order of probability until
    their cumulative probability exceeds ``top_p`` (at least one); weights ``p`` not renormalised.

    Returns ``k`` = the largest number of experts any token kept; a token's unused slots have weight 0.
    """

    renormalises = False

    def __init__(self, hidden_size: int, num_experts: int, *, top_p: float, temperature: float, init_range: float,
                 device: torch.device | None = None) -> None:
        super().__init__(hidden_size, num_experts, top_k=num_experts, init_range=init_range, device=device)
        self.top_p = top_p
        self.temperature = temperature

    def forward(self, x: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        weights, experts = route_top_p((logits / self.temperature).softmax(dim=-1), self.top_p)
        return logits, weights, experts


class SwitchRouter(TopKRouter):
    """Switch: the most probable expert with weight ``p_max`` (not renormalised), and expert capacity.

    In training, jitter ``U(1-eps, 1+eps)`` multiplies the router's input only, and each sequence sends
    at most ``capacity`` tokens to an expert, earlier tokens first: ``expert_capacity`` if set, else
    ``ceil(capacity_factor * S / E)``. Tokens over capacity get ``NO_EXPERT`` (the frozen FFN, still
    weighted by ``p_max``). In eval mode no token is dropped, so a forward pass does not depend on the
    batch or on how a sequence is split across KV-cache steps.
    """

    renormalises = False

    def __init__(self, hidden_size: int, num_experts: int, *, capacity_factor: float, expert_capacity: int | None,
                 jitter_noise: float, init_range: float, device: torch.device | None = None) -> None:
        super().__init__(hidden_size, num_experts, top_k=1, init_range=init_range, device=device)
        self.capacity_factor = capacity_factor
        self.expert_capacity = expert_capacity
        self.jitter_noise = jitter_noise

    def capacity(self, sequence_length: int) -> int:
        """Tokens one sequence may send to one expert."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        return math.ceil(self.capacity_factor * sequence_length / self.weight.shape[0])

    def forward(self, x: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = self.logits(x)
        weights, experts = logits.softmax(dim=-1).max(dim=-1, keepdim=True)              # [T, 1]
        if self.training:
            rows = experts.view(batch_shape or (1, -1))                                   # [B, S]
            over = ~within_capacity(rows, self.weight.shape[0], self.capacity(rows.shape[1]))
            experts = experts.masked_fill(over.view(-1, 1), NO_EXPERT)
        return logits, weights, experts


def build_router(config: "MixLoraConfig", hidden_size: int, *, device: torch.device | None = None) -> TopKRouter:
    """The router ``config.routing`` asks for, with its settings."""
    common = dict(init_range=config.router_init_range, device=device)
    if config.routing == "top_p":
        return TopPRouter(hidden_size, config.num_experts, top_p=config.top_p, temperature=config.temperature,
                          **common)
    if config.routing == "switch":
        return SwitchRouter(hidden_size, config.num_experts, capacity_factor=config.capacity_factor,
                            expert_capacity=config.expert_capacity, jitter_noise=config.jitter_noise, **common)
    return TopKRouter(hidden_size, config.num_experts, top_k=config.top_k, **common)


def auxiliary_loss(router_logits: list[torch.Tensor], config: "MixLoraConfig", *,
                   token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted router loss for ``config.routing``: ``aux_coef * load_balancing`` (top-k, top-p with its
    temperature) plus ``z_coef * z_loss`` for switch."""
    if config.routing == "top_p":
        balance = load_balancing_loss(router_logits, token_mask=token_mask, top_p=config.top_p,
                                      temperature=config.temperature)
    else:
        balance = load_balancing_loss(router_logits, top_k=config.top_k, token_mask=token_mask)
    loss = config.router_aux_loss_coef * balance
    if config.routing == "switch":
        loss = loss + config.router_z_loss_coef * z_loss(router_logits, token_mask=token_mask)
    return loss


def route_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts, keep the ``top_k`` largest, renormalise them to sum to 1."""
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def top_p_mask(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p selection on probability rows ``[T, E]``, in order of probability (ties: lower expert id first).

    Rank j is kept iff the cumulative probability of the ranks before it is ``<= top_p``: the ranks up
    to the first whose cumulative probability is ``> top_p`` (all of them if none is), so at least one.
    Returns ``(sorted_probs, order, keep)``, all ``[T, E]`` in rank order.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    return sorted_probs, order, before <= top_p


def route_top_p(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs ``[T, E]`` -> weights, experts ``[T, k]``, ``k`` the most experts any row keeps; unkept slots weigh 0."""
    sorted_probs, order, keep = top_p_mask(probs, top_p)
    k = int(keep.sum(dim=-1).max())
    return (sorted_probs * keep)[:, :k], order[:, :k]


def within_capacity(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """experts ``[B, S]`` (one per token) -> bool ``[B, S]``: the token is among the first ``capacity``
    tokens of its sequence routed to its expert."""
    one_hot = F.one_hot(experts, num_experts)                                  # [B, S, E]
    priority = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1)                   # 1-based rank within the expert
    return priority <= capacity


def selection(probs: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """probs ``[T, E]`` -> ``[T, E]`` in probs' dtype: 1 where the token selects the expert (its ``top_k``, or
    its top-p set when ``top_p`` is given), else 0."""
    if top_p is None:
        return F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(dim=1).to(probs.dtype)
    _, order, keep = top_p_mask(probs, top_p)
    return torch.zeros_like(probs).scatter_(1, order, keep.to(probs.dtype))


def expert_choices(logits: torch.Tensor, config: "MixLoraConfig") -> torch.Tensor:
    """Which experts each token selects under ``config.routing``, for statistics: logits ``[T, E]`` ->
    fp32 ``[T, E]`` of 0/1 (top-k: k ones; top-p: at least one; switch: the top-1, capacity not counted)."""
    if config.routing == "top_p":
        return selection((logits.float() / config.temperature).softmax(dim=-1), top_p=config.top_p)
    return selection(logits.float(), top_k=config.top_k)


def load_balancing_loss(router_logits: list[torch.Tensor], *, top_k: int | None = None,
                        token_mask: torch.Tensor | None = None, top_p: float | None = None,
                        temperature: float = 1.0) -> torch.Tensor:
    """Mixtral's auxiliary loss pooled over layers: ``E * sum_e f_e * mean_P_e``.

    router_logits: one ``[T, E]`` tensor per layer; token_mask: ``[T]`` with 1 for real tokens, 0 for padding.
    ``P = softmax(z / temperature)``; ``f_e`` is the masked fraction of tokens that selected expert e
    (``top_k`` experts each, or the top-p selection when ``top_p`` is given; sums to the mean number
    selected, so the loss is ``top_k`` when balanced); ``mean_P_e`` the masked mean probability.
    Gradient flows through ``mean_P_e`` only. Switch routing is ``top_k=1`` (capacity is not counted).
    """
    logits = torch.cat(router_logits, dim=0)                       # [L*T, E]
    num_experts = logits.shape[-1]
    probs = (logits / temperature).softmax(dim=-1)
    choices = selection(probs.detach(), top_k=top_k, top_p=top_p)  # [L*T, E]
    mask = _row_mask(router_logits, token_mask, probs)            # [L*T, 1]
    denom = mask.sum().clamp_min(1.0)
    fraction = (choices * mask).sum(dim=0) / denom                 # [E]
    mean_prob = (probs * mask).sum(dim=0) / denom                  # [E]
    return num_experts * (fraction * mean_prob).sum()


def z_loss(router_logits: list[torch.Tensor], *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/ST-MoE router z-loss: masked mean over tokens and layers of ``logsumexp(z)^2``."""
    logits = torch.cat(router_logits, dim=0)
    mask = _row_mask(router_logits, token_mask, logits)
    return (torch.logsumexp(logits, dim=-1, keepdim=True).square() * mask).sum() / mask.sum().clamp_min(1.0)


def _row_mask(router_logits: list[torch.Tensor], token_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``[L*T, 1]``: the per-token pad mask repeated for each layer (all ones without a mask)."""
    if token_mask is None:
        token_mask = torch.ones(router_logits[0].shape[0], device=like.device)
    return token_mask.to(like.dtype).repeat(len(router_logits)).unsqueeze(-1)
