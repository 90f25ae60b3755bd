"""MixLoraFFN: router + stacked expert LoRAs + the frozen base FFN, replacing a decoder layer's MLP."""

from __future__ import annotations

import torch
from torch import nn

from .experts import ExpertLoras
from .families import FUSED_GATED, GATED, Family, projection_shape
from .reference import reference_expert_mix
from .routing import TopKRouter


class MixLoraFFN(nn.Module):
    """``y = sum_{e in topk(x)} w_e FFN_e(x)``, each ``FFN_e`` the frozen FFN plus expert e's LoRA deltas.

    ``base`` is the model's own MLP module (frozen, its projections called unchanged). ``experts`` maps
    each targeted FFN projection name to its :class:`ExpertLoras`. ``dispatch`` selects the grouped
    fast path (``"grouped"``) or the straightforward per-expert loop (``"reference"``), which is kept
    for tests and benchmarks. The last forward's router logits are kept in ``router_logits``.
    """

    def __init__(self, base: nn.Module, *, family: Family, hidden_size: int, num_experts: int, top_k: int,
                 router_init_range: float, jitter_noise: float, activation: nn.Module,
                 expert_targets: list[str], r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        self.base = base
        self.kind = family.ffn_kind
        self.input_names = family.ffn_projections[:-1]
        self.output_name = family.ffn_projections[-1]
        self.activation = activation
        self.ffn_dropout = getattr(base, family.ffn_dropout) if family.ffn_dropout else None
        self.jitter_noise = jitter_noise
        device = next(base.parameters()).device
        self.router = TopKRouter(hidden_size, num_experts, top_k=top_k, init_range=router_init_range, device=device)
        self.experts = nn.ModuleDict({
            name: ExpertLoras(num_experts, *projection_shape(getattr(base, name)), r=r, scaling=scaling,
                              dropout=dropout, init=init, device=device)
            for name in family.ffn_projections if name in expert_targets
        })
        self.dispatch = "grouped"
        self.router_logits: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    def projection(self, name: str) -> nn.Module:
        return getattr(self.base, name)

    def activate(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The FFN's hidden activation from its input projections' outputs (``[n, I]`` each, or ``[n, 2I]`` fused)."""
        if self.kind == GATED:
            gate, up = inputs
            return self.activation(gate) * up
        if self.kind == FUSED_GATED:
            gate, up = inputs[0].chunk(2, dim=-1)
            return up * self.activation(gate)
        return self.activation(inputs[0])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: ``[B, S, D]`` (the FFN input after the layer norm) -> ``[B, S, D]``."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits, weights, experts = self.router(x)
        self.router_logits = logits
        if self.dispatch == "reference":
            y = reference_expert_mix(self, x, weights, experts)
        else:
            y = self.grouped_expert_mix(x, weights, experts)
        if self.ffn_dropout is not None:
            y = self.ffn_dropout(y)
        return y.view_as(hidden_states)

    def grouped_expert_mix(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The fast path (DESIGN.md section 2).

        x: ``[T, D]``; weights, experts: ``[T, k]``. The base input projections run once on all tokens;
        the (token, expert) pairs are sorted by expert so each expert's LoRA runs on one contiguous
        segment; the weighted pair activations are summed back onto tokens and go through the shared
        base output projection once (``sum_e w_e W2 a_e = W2 sum_e w_e a_e``, as the weights sum to 1).
        """
        num_tokens, top_k = experts.shape
        flat_experts = experts.reshape(-1)                                   # [T*k]
        order = torch.argsort(flat_experts, stable=True)                     # pairs sorted by expert
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        pair_token = order // top_k                                          # [P]
        pair_expert = flat_experts.index_select(0, order)                   # [P]
        pair_weight = weights.reshape(-1).index_select(0, order).unsqueeze(-1)  # [P, 1] fp32

        projected = []
        for name in self.input_names:
            h = self.projection(name)(x).index_select(0, pair_token)         # [P, out] model dtype
            if name in self.experts:
                pair_rows = pair_token * self.num_experts + pair_expert
                h = h + self.experts[name].shared_input_delta(x, pair_rows, counts).to(h.dtype)
            projected.append(h)
        act = self.activate(projected)                                       # [P, I]

        mixed = torch.zeros(num_tokens, act.shape[-1], device=x.device, dtype=torch.float32)
        mixed.index_add_(0, pair_token, act.float() * pair_weight)          # [T, I]
        y = self.projection(self.output_name)(mixed.to(x.dtype))             # [T, D]
        if self.output_name in self.experts:
            delta = self.experts[self.output_name].pair_input_delta(act, counts) * pair_weight
            y = y + torch.zeros(num_tokens, y.shape[-1], device=x.device, dtype=torch.float32).index_add_(
                0, pair_token, delta).to(y.dtype)
        return y
