"""Routers: each routing strategy is one class that owns its policy, registered by name in ``ROUTERS``.

A router maps FFN inputs ``[T, D]`` to a :class:`RoutingRecord`: token t's FFN output is
``sum_slot weights[t, slot] * FFN_{experts[t, slot]}(x_t)``; an expert id of ``NO_EXPERT`` (-1) means the
frozen FFN with no expert delta (switch tokens over capacity). Each class also says what its routing
means elsewhere: its default settings, its name in the reference implementation's files, whether its
weights sum to 1, the auxiliary loss it trains with, and why a Mixtral-style export or a dense merge
cannot express it. The semantics of each routing are documented in docs/variants.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoramixError

if TYPE_CHECKING:
    from ..config import MixLoraConfig

NO_EXPERT = -1


@dataclass(frozen=True)
class RoutingRecord:
    """What one MoE layer's router decided for ``T`` tokens in one forward.

    logits: ``[T, E]`` fp32, with their graph (the auxiliary loss trains the router through them);
    weights: ``[T, k]`` fp32; experts: ``[T, k]`` long (``NO_EXPERT``: the frozen FFN) (both None in records
    pooled over processes for the loss, which reads only logits, selected and token_mask);
    selected: ``[T, E]`` fp32 0/1, the experts each token chose before any capacity limit (what the
    load-balancing loss and the router statistics count); token_mask: ``[T]``, 1 for real tokens and 0
    for padding, or None (all real); the model sets it, the FFN does not see the batch's padding.
    """

    logits: torch.Tensor
    weights: torch.Tensor | None
    experts: torch.Tensor | None
    selected: torch.Tensor
    token_mask: torch.Tensor | None = None

    def with_token_mask(self, token_mask: torch.Tensor | None) -> "RoutingRecord":
        return dataclasses.replace(self, token_mask=token_mask)


class TopKRouter(nn.Module):
    """Top-k ("mixlora"): bias-free fp32 linear router ``z = fp32(x) W_r^T`` with ``W_r`` ``[E, D]`` ~
    N(0, init_range^2); keeps the ``top_k`` most probable experts and renormalises their weights to sum
    to 1. With ``jitter_noise`` eps, training multiplies the FFN input by ``U(1-eps, 1+eps)``. Trains with
    ``aux_loss_coef`` times the load-balancing loss."""

    name: ClassVar[str] = "top_k"
    moe_peft_name: ClassVar[str] = "mixlora"   # the reference's ``routing_strategy``
    # Values of the MixLoraConfig fields left as None (MoE-PEFT's defaults).
    defaults: ClassVar[dict[str, Any]] = {"top_k": 2, "router_init_range": 0.02, "jitter_noise": 0.0}
    renormalises: ClassVar[bool] = True        # each token's weights sum to 1 (the shared-bias identity)
    # Why a fixed top-k MoE checkpoint (Mixtral, Qwen-MoE) cannot reproduce this routing; None: it can.
    export_refusal: ClassVar[str | None] = None

    def __init__(self, hidden_size: int, num_experts: int, *, top_k: int, init_range: float,
                 jitter_noise: float = 0.0, aux_loss_coef: float = 0.0, device: torch.device | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.jitter_noise = jitter_noise
        self.aux_loss_coef = aux_loss_coef
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, init_range)

    @classmethod
    def from_config(cls, config: "MixLoraConfig", hidden_size: int, *,
                    device: torch.device | None = None) -> "TopKRouter":
        return cls(hidden_size, config.num_experts, top_k=config.top_k, init_range=config.router_init_range,
                   jitter_noise=config.jitter_noise, aux_loss_coef=config.router_aux_loss_coef, device=device)

    @classmethod
    def moe_peft_fields(cls, config: "MixLoraConfig") -> dict[str, Any]:
        """This routing's keys in MoE-PEFT's ``adapter_config.json``."""
        return {"top_k": config.top_k}

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dense_merge_refusal(self) -> str | None:
        """Why no dense FFN equals this routing even when every expert is the same FFN (None: one does)."""
        return None

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN input the experts see: x ``[T, D]`` times noise in training (``jitter_noise`` > 0)."""
        if self.training and self.jitter_noise > 0:
            return x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[T, D]`` -> fp32 ``[T, E]`` (fp32 under autocast too)."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight)

    def forward(self, x: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None) -> RoutingRecord:
        """x: ``[T, D]`` -> the record. ``batch_shape`` (``(B, S)``, ``B*S == T``) is for routers that look at
        sequences."""
        return self.route(self.logits(x), batch_shape=batch_shape)

    def route(self, logits: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None) -> RoutingRecord:
        """The routing of fp32 logits ``[T, E]``."""
        weights, experts = route_top_k(logits, self.top_k)
        return RoutingRecord(logits, weights, experts, one_hot_selection(experts, self.num_experts))

    def loss(self, records: list[RoutingRecord]) -> torch.Tensor:
        """The weighted auxiliary loss over all layers' records of one micro-batch."""
        return self.aux_loss_coef * load_balancing_loss(records)


class TopPRouter(TopKRouter):
    """Top-p ("mixlora-dynamic"): ``p = softmax(z / temperature)``; experts in order of probability until
    their cumulative probability exceeds ``top_p`` (at least one); weights ``p`` not renormalised.

    Returns ``k`` = the largest number of experts any token kept; a token's unused slots have weight 0.
    The load-balancing loss uses the same tempered probabilities.
    """

    name = "top_p"
    moe_peft_name = "mixlora-dynamic"
    defaults = {"router_init_range": 0.02, "jitter_noise": 0.0}
    renormalises = False
    export_refusal = ("top-p routing picks a varying number of experts per token; Mixtral and Qwen-MoE route "
                      "to a fixed top-k, so the exported model would differ")

    def __init__(self, hidden_size: int, num_experts: int, *, top_p: float, temperature: float, init_range: float,
                 jitter_noise: float = 0.0, aux_loss_coef: float = 0.0, device: torch.device | None = None) -> None:
        super().__init__(hidden_size, num_experts, top_k=num_experts, init_range=init_range,
                         jitter_noise=jitter_noise, aux_loss_coef=aux_loss_coef, device=device)
        self.top_p = top_p
        self.temperature = temperature

    @classmethod
    def from_config(cls, config: "MixLoraConfig", hidden_size: int, *,
                    device: torch.device | None = None) -> "TopPRouter":
        return cls(hidden_size, config.num_experts, top_p=config.top_p, temperature=config.temperature,
                   init_range=config.router_init_range, jitter_noise=config.jitter_noise,
                   aux_loss_coef=config.router_aux_loss_coef, device=device)

    @classmethod
    def moe_peft_fields(cls, config: "MixLoraConfig") -> dict[str, Any]:
        if config.temperature != 1.0:
            raise LoramixError(f"temperature {config.temperature} cannot be written in the moe-peft format: the "
                               "reference divides probabilities by it, loramix divides logits (docs/variants.md)")
        return {"top_p": config.top_p, "temperature": 0.0}  # the reference's "no temperature"

    def dense_merge_refusal(self) -> str | None:
        if self.num_experts > 1:
            return "top-p routing weighs experts by their unrenormalised probabilities, which no dense model can do"
        return None

    def route(self, logits: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None) -> RoutingRecord:
        return RoutingRecord(logits, *route_top_p((logits / self.temperature).softmax(dim=-1), self.top_p))

    def loss(self, records: list[RoutingRecord]) -> torch.Tensor:
        return self.aux_loss_coef * load_balancing_loss(records, temperature=self.temperature)


class SwitchRouter(TopKRouter):
    """Switch: the most probable expert with weight ``p_max`` (not renormalised), and expert capacity.

    In training, jitter ``U(1-eps, 1+eps)`` multiplies the router's input only, and each sequence sends
    at most ``capacity`` tokens to an expert, earlier tokens first: ``expert_capacity`` if set, else
    ``ceil(capacity_factor * S / E)``. Tokens over capacity get ``NO_EXPERT`` (the frozen FFN, still
    weighted by ``p_max``). In eval mode no token is dropped, so a forward pass does not depend on the
    batch or on how a sequence is split across KV-cache steps. Trains with the load-balancing loss plus
    ``z_loss_coef`` times the router z-loss.
    """

    name = "switch"
    moe_peft_name = "mixlora-switch"
    defaults = {"top_k": 1, "router_init_range": 1.0, "jitter_noise": 0.01}
    renormalises = False
    export_refusal = ("switch routing sends tokens over expert capacity to the plain base FFN; Mixtral and "
                      "Qwen-MoE have no capacity limit, so the exported model would differ")

    def __init__(self, hidden_size: int, num_experts: int, *, capacity_factor: float, expert_capacity: int | None,
                 jitter_noise: float, init_range: float, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 device: torch.device | None = None) -> None:
        super().__init__(hidden_size, num_experts, top_k=1, init_range=init_range, jitter_noise=jitter_noise,
                         aux_loss_coef=aux_loss_coef, device=device)
        self.capacity_factor = capacity_factor
        self.expert_capacity = expert_capacity
        self.z_loss_coef = z_loss_coef

    @classmethod
    def from_config(cls, config: "MixLoraConfig", hidden_size: int, *,
                    device: torch.device | None = None) -> "SwitchRouter":
        return cls(hidden_size, config.num_experts, capacity_factor=config.capacity_factor,
                   expert_capacity=config.expert_capacity, jitter_noise=config.jitter_noise,
                   init_range=config.router_init_range, aux_loss_coef=config.router_aux_loss_coef,
                   z_loss_coef=config.router_z_loss_coef, device=device)

    @classmethod
    def moe_peft_fields(cls, config: "MixLoraConfig") -> dict[str, Any]:
        # Capacity only as an expert_capacity we were given (else the reference falls back to its 32 per
        # sequence, which only matters if training continues there).
        fields: dict[str, Any] = {} if config.expert_capacity is None else {"expert_capacity": config.expert_capacity}
        return {**fields, "sparse_step": None}

    def dense_merge_refusal(self) -> str | None:
        return "switch routing gives tokens over expert capacity the plain FFN, which no dense model can do"

    def capacity(self, sequence_length: int) -> int:
        """Tokens one sequence may send to one expert."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        return math.ceil(self.capacity_factor * sequence_length / self.num_experts)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the noise is on the router's input only (forward)

    def forward(self, x: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None) -> RoutingRecord:
        return self.route(self.logits(super().jitter(x)), batch_shape=batch_shape)

    def route(self, logits: torch.Tensor, *, batch_shape: tuple[int, ...] | None = None) -> RoutingRecord:
        weights, experts = logits.softmax(dim=-1).max(dim=-1, keepdim=True)              # [T, 1]
        selected = one_hot_selection(experts, self.num_experts)
        if self.training:
            rows = experts.view(batch_shape or (1, -1))                                   # [B, S]
            over = ~within_capacity(rows, self.num_experts, self.capacity(rows.shape[1]))
            experts = experts.masked_fill(over.view(-1, 1), NO_EXPERT)
        return RoutingRecord(logits, weights, experts, selected)

    def loss(self, records: list[RoutingRecord]) -> torch.Tensor:
        return super().loss(records) + self.z_loss_coef * z_loss(records)


ROUTERS: dict[str, type[TopKRouter]] = {router.name: router for router in (TopKRouter, TopPRouter, SwitchRouter)}


def build_router(config: "MixLoraConfig", hidden_size: int, *, device: torch.device | None = None) -> TopKRouter:
    """The router ``config.routing`` names, with its settings."""
    return ROUTERS[config.routing].from_config(config, hidden_size, device=device)


# ---- the routing math ------------------------------------------------------------------------------------
def route_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over experts, keep the ``top_k`` largest, renormalise them to sum to 1: ``[T, k]`` each."""
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


def route_top_p(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """probs ``[T, E]`` -> weights, experts ``[T, k]`` (``k`` the most experts any row keeps; unkept slots weigh
    0) and the selection ``[T, E]`` 0/1."""
    sorted_probs, order, keep = top_p_mask(probs, top_p)
    k = int(keep.sum(dim=-1).max())
    selected = torch.zeros_like(probs).scatter_(1, order, keep.to(probs.dtype))
    return (sorted_probs * keep)[:, :k], order[:, :k], selected


def within_capacity(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """experts ``[B, S]`` (one per token) -> bool ``[B, S]``: the token is among the first ``capacity``
    tokens of its sequence routed to its expert."""
    one_hot = F.one_hot(experts, num_experts)                                  # [B, S, E]
    priority = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1)                   # 1-based rank within the expert
    return priority <= capacity


def one_hot_selection(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """experts ``[T, k]`` (distinct per row) -> fp32 ``[T, E]`` with a 1 for each chosen expert."""
    return F.one_hot(experts, num_experts).sum(dim=1).to(torch.float32)


def load_balancing_loss(records: list[RoutingRecord], *, temperature: float = 1.0) -> torch.Tensor:
    """Mixtral's auxiliary loss pooled over layers: ``E * sum_e f_e * mean_P_e``.

    ``P = softmax(z / temperature)``; ``f_e`` is the fraction of real tokens that selected expert e (each
    record's ``selected``: sums to the mean number selected, so the loss is ``top_k`` when balanced);
    ``mean_P_e`` the mean probability over real tokens. Gradient flows through ``mean_P_e`` only.
    """
    logits, selected, mask = _pooled(records)                      # [L*T, E], [L*T, E], [L*T, 1]
    probs = (logits / temperature).softmax(dim=-1)
    denom = mask.sum().clamp_min(1.0)
    fraction = (selected * mask).sum(dim=0) / denom                # [E]
    mean_prob = (probs * mask).sum(dim=0) / denom                  # [E]
    return logits.shape[-1] * (fraction * mean_prob).sum()


def z_loss(records: list[RoutingRecord]) -> torch.Tensor:
    """Switch/ST-MoE router z-loss: mean over real tokens and layers of ``logsumexp(z)^2``."""
    logits, _, mask = _pooled(records)
    return (torch.logsumexp(logits, dim=-1, keepdim=True).square() * mask).sum() / mask.sum().clamp_min(1.0)


def _pooled(records: list[RoutingRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All layers' rows: logits ``[L*T, E]``, selected ``[L*T, E]`` and the token mask ``[L*T, 1]`` (ones
    where a record has none)."""
    logits = torch.cat([r.logits for r in records], dim=0)
    selected = torch.cat([r.selected for r in records], dim=0)
    masks = [torch.ones(r.logits.shape[0], device=logits.device) if r.token_mask is None else r.token_mask
             for r in records]
    return logits, selected, torch.cat(masks).to(logits.dtype).unsqueeze(-1)
