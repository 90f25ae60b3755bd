"""MixLoraFFN: router + stacked expert LoRAs + the frozen base FFN, replacing a decoder layer's MLP."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .dispatch.dense import dense_expert_mix
from .experts import ExpertLoras
from .dispatch.grouped import PairMix, PairMixSpec, sort_pairs
from ..families import FUSED_GATED, GATED, Family, projection_shape, projection_weight
from .dispatch.per_expert import reference_expert_mix
from .routing import NO_EXPERT, TopKRouter

DISPATCHES = ("grouped", "dense", "reference")


class MixLoraFFN(nn.Module):
    """``y = sum_{e in topk(x)} w_e FFN_e(x)``, each ``FFN_e`` the frozen FFN plus expert e's LoRA deltas.

    ``base`` is the model's own MLP module (frozen, its projections called unchanged). ``experts`` maps
    each targeted FFN projection name to its :class:`ExpertLoras`. ``dispatch`` selects the grouped
    fast path (``"grouped"``, the default, fused.py: fewest FLOPs, least memory, fastest on CPU), the
    sync-free dense path (``"dense"``, dense.py: fewest kernel launches, fastest on a GPU, about 2.3x the
    activations) or the straightforward per-expert loop (``"reference"``), kept for tests and benchmarks.
    The last forward's router logits are kept in ``router_logits``.
    ``router`` (routing.py) picks the experts; DoRA experts (``use_dora``) always take the per-expert path.
    """

    def __init__(self, base: nn.Module, *, family: Family, router: TopKRouter, jitter_noise: float,
                 activation: nn.Module, expert_targets: list[str], r: int, scaling: float, dropout: float, init: str,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.kind = family.ffn_kind
        self.input_names = family.ffn_projections[:-1]
        self.output_name = family.ffn_projections[-1]
        self.activation = activation
        self.ffn_dropout = getattr(base, family.ffn_dropout) if family.ffn_dropout else None
        self.jitter_noise = jitter_noise
        device = next(base.parameters()).device
        self.router = router
        self.experts = nn.ModuleDict({
            name: ExpertLoras(router.weight.shape[0], *projection_shape(getattr(base, name)), r=r, scaling=scaling,
                              dropout=dropout, init=init, device=device, use_dora=use_dora)
            for name in family.ffn_projections if name in expert_targets
        })
        if use_dora:
            self.reset_magnitudes()
        self.dispatch = "grouped"
        self.router_logits: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]

    def projection(self, name: str) -> nn.Module:
        return getattr(self.base, name)

    @property
    def uses_dora(self) -> bool:
        return any(lora.lora_magnitude is not None for lora in self.experts.values())

    def reset_magnitudes(self) -> None:
        """DoRA experts: every magnitude back to ``||W + s B_e A_e||_row``."""
        for name, lora in self.experts.items():
            lora.reset_magnitude(self.projection(name))

    def frozen_ffn(self, u: torch.Tensor) -> torch.Tensor:
        """The base FFN with no expert delta (for tokens routed to ``NO_EXPERT``). u: ``[n, D]`` -> ``[n, D]``."""
        return self.projection(self.output_name)(self.activate([self.projection(name)(u) for name in self.input_names]))

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
        logits, weights, experts = self.router(x, batch_shape=tuple(hidden_states.shape[:-1]))
        self.router_logits = logits
        y = self.mix(x, weights, experts)
        if self.ffn_dropout is not None:
            y = self.ffn_dropout(y)
        return y.view_as(hidden_states)

    def mix(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Dispatch: the per-expert path for ``dispatch="reference"`` and DoRA experts, else the grouped or
        dense path.

        Switch tokens routed to ``NO_EXPERT`` (over capacity) take ``weight * frozen_ffn(x)`` instead.
        x: ``[T, D]``; weights, experts: ``[T, k]`` -> ``[T, D]``.
        """
        mix = self.grouped_expert_mix
        if self.dispatch == "reference" or self.uses_dora:
            mix = functools.partial(reference_expert_mix, self)
        elif self.dispatch == "dense":
            mix = functools.partial(dense_expert_mix, self)
        if experts.shape[1] != 1:
            return mix(x, weights, experts)
        dropped = experts[:, 0] == NO_EXPERT
        if not dropped.any():
            return mix(x, weights, experts)
        kept, over = (~dropped).nonzero().squeeze(1), dropped.nonzero().squeeze(1)
        frozen = (weights[over] * self.frozen_ffn(x[over]).float()).to(x.dtype)
        return torch.zeros_like(x).index_copy(0, kept, mix(x[kept], weights[kept], experts[kept])).index_copy(
            0, over, frozen)

    def mixed_output(self, mixed: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The shared base output projection on ``mixed = sum_e w_e a_e`` ``[T, I]`` -> ``[T, D]`` in ``dtype``.

        Its bias enters once, so routing weights ``[T, k]`` that do not sum to 1 get ``(sum w - 1) b`` added.
        """
        y = self.projection(self.output_name)(mixed.to(dtype))
        bias = projection_weight(self.projection(self.output_name))[1]
        if bias is not None and not self.router.renormalises:
            y = y + ((weights.sum(dim=-1, keepdim=True) - 1) * bias.float()).to(y.dtype)
        return y

    def grouped_expert_mix(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The fast path (DESIGN.md section 2).

        x: ``[T, D]``; weights, experts: ``[T, k]``. The base input projections run once on all tokens;
        the (token, expert) pairs, sorted by expert, go through :class:`~loramix.fused.PairMix` (each
        expert's LoRAs on its contiguous segment, the activation, the weighted sum back onto tokens); the
        shared base output projection runs once on that sum (``sum_e w_e W2 a_e = W2 sum_e w_e a_e``).
        """
        routing = sort_pairs(experts, self.num_experts)
        tensors, scalings = [], []
        for name in self.input_names:
            tensors.append(self.projection(name)(x))                                     # [T, out]
            lora = self.experts[name] if name in self.experts else None
            scalings.append(None if lora is None else lora.scaling)
            if lora is not None:
                tensors += [lora.dropped_input(x), lora.lora_A, lora.lora_B]
        out_lora = self.experts[self.output_name] if self.output_name in self.experts else None
        keep = None
        if out_lora is not None:
            tensors += [out_lora.lora_A, out_lora.lora_B]
            keep = out_lora.dropout_mask(x.shape[0])  # one mask per token, shared by its experts
        spec = PairMixSpec(routing=routing, activate=self.activate, input_scalings=tuple(scalings),
                           output_scaling=None if out_lora is None else out_lora.scaling)
        pair_weight = weights.reshape(-1).index_select(0, routing.order)                 # [P] fp32
        outputs = PairMix.apply(spec, pair_weight, keep, *tensors)
        mixed = outputs if out_lora is None else outputs[0]                               # [T, I] fp32
        y = self.mixed_output(mixed, weights, x.dtype)                                   # [T, D]
        if out_lora is not None:
            y = y + outputs[1].to(y.dtype)
        return y
