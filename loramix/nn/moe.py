"""MixLoraFFN: a frozen FFN, a router and stacked expert LoRAs, composed; it replaces a decoder layer's MLP.

Each forward produces one :class:`~loramix.nn.routing.RoutingRecord`, handed to the collection opened by
:func:`collect_routing` (the model opens one per forward; without one, nothing is kept).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .dispatch import DEFAULT_DISPATCH, check_dispatch, dispatch_path
from .experts import ExpertLoras
from .ffn import BaseFFN, ExpertFFN, ExpertProjection
from .routing import NO_EXPERT, RoutingRecord, TopKRouter

_RECORDS: contextvars.ContextVar[list[RoutingRecord] | None] = contextvars.ContextVar("loramix_routing",
                                                                                    default=None)


@contextlib.contextmanager
def collect_routing() -> Iterator[list[RoutingRecord]]:
    """Within the block, every MixLoraFFN forward appends its record to the yielded list, in layer order.

    Recomputation in backward (activation checkpointing) happens outside the block and adds nothing.
    """
    records: list[RoutingRecord] = []
    token = _RECORDS.set(records)
    try:
        yield records
    finally:
        _RECORDS.reset(token)


class MixLoraFFN(nn.Module):
    """``y = sum_{e in topk(x)} w_e FFN_e(x)``, each ``FFN_e`` the frozen ``base_ffn`` plus expert e's LoRA deltas.

    ``experts`` maps each adapted FFN projection of ``base_ffn`` to its :class:`ExpertLoras`; ``router``
    (routing.py) picks the experts; ``dispatch`` names the path that computes the mixture
    (``"auto"``, the default, or one of ``loramix.DISPATCHES``; DoRA experts always take the per-expert path).
    """

    def __init__(self, *, base_ffn: BaseFFN, router: TopKRouter, experts: Mapping[str, ExpertLoras],
                 dispatch: str = DEFAULT_DISPATCH) -> None:
        super().__init__()
        unknown = set(experts) - {*base_ffn.input_names, base_ffn.output_name}
        if unknown:
            raise ValueError(f"experts for projections the FFN does not have: {sorted(unknown)}")
        self.base_ffn = base_ffn
        self.router = router
        self.experts = nn.ModuleDict(experts)
        self.dispatch = check_dispatch(dispatch)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def projection(self, name: str) -> nn.Module:
        return self.base_ffn.projection(name)

    def view(self) -> ExpertFFN:
        """The FFN with its experts, as dispatch paths see it."""
        def part(name: str) -> ExpertProjection:
            return ExpertProjection(self.projection(name), self.experts[name] if name in self.experts else None)

        return ExpertFFN(inputs=tuple(part(n) for n in self.base_ffn.input_names),
                         output=part(self.base_ffn.output_name), activate=self.base_ffn.activate,
                         num_experts=self.num_experts, weights_sum_to_one=self.router.renormalises)

    def reset_magnitudes(self) -> None:
        """DoRA experts: every magnitude back to ``||W + s B_e A_e||_row``."""
        for name, lora in self.experts.items():
            lora.reset_magnitude(self.projection(name))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: ``[B, S, D]`` (the FFN input after the layer norm) -> ``[B, S, D]``."""
        x = self.router.jitter(hidden_states.reshape(-1, hidden_states.shape[-1]))
        record = self.router(x, batch_shape=tuple(hidden_states.shape[:-1]))
        records = _RECORDS.get()
        if records is not None:
            records.append(record)
        y = self.mix(x, record.weights, record.experts)
        if self.base_ffn.dropout is not None:
            y = self.base_ffn.dropout(y)
        return y.view_as(hidden_states)

    def mix(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The mixture through the dispatch path; tokens routed to ``NO_EXPERT`` (switch tokens over capacity)
        take ``weight * base_ffn(x)`` instead. x: ``[T, D]``; weights, experts: ``[T, k]`` -> ``[T, D]``."""
        ffn = self.view()
        path = dispatch_path(self.dispatch, dora=ffn.uses_dora)
        if experts.shape[1] != 1:
            return path(ffn, x, weights, experts)
        dropped = experts[:, 0] == NO_EXPERT
        if not dropped.any():
            return path(ffn, x, weights, experts)
        kept, over = (~dropped).nonzero().squeeze(1), dropped.nonzero().squeeze(1)
        frozen = (weights[over] * self.base_ffn(x[over]).float()).to(x.dtype)
        return torch.zeros_like(x).index_copy(0, kept, path(ffn, x[kept], weights[kept], experts[kept])).index_copy(
            0, over, frozen)
