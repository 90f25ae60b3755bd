"""The frozen feed-forward block, the view of it with its experts that every MoE dispatch path takes, and
the dispatch interface.

``BaseFFN`` holds the base model's own projection modules (called unchanged: Linear, GPT-2's Conv1D or a
quantised layer) and knows how they combine: gated ``act(gate(x)) * up(x)``, fused gated (Phi-3's
``gate_up_proj`` split in halves) or plain ``act(fc1(x))``, each followed by the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from ..families import FUSED_GATED, GATED, PLAIN, Family, projection_weight

if TYPE_CHECKING:
    from .experts import ExpertLoras

FFN_KINDS = (GATED, FUSED_GATED, PLAIN)


class BaseFFN(nn.Module):
    """The frozen FFN ``out(activate(inputs(u)))``; projections are submodules under their own names.

    ``projections`` maps names to modules, the input projections first and the output projection last:
    gated ``(gate, up, down)``, fused ``(gate_up, down)``, plain ``(fc1, fc2)``. ``dropout``, if given, is the
    base's dropout after the output projection (GPT-2), applied to the MoE output.
    """

    def __init__(self, *, kind: str, projections: dict[str, nn.Module], activation: nn.Module | Callable,
                 dropout: nn.Module | None = None) -> None:
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"FFN kind must be one of {FFN_KINDS}, got {kind!r}")
        if len(projections) != (3 if kind == GATED else 2):
            raise ValueError(f"a {kind} FFN has {3 if kind == GATED else 2} projections, got {list(projections)}")
        self.kind = kind
        for name, module in projections.items():
            self.add_module(name, module)
        names = tuple(projections)
        self.input_names, self.output_name = names[:-1], names[-1]
        self.activation = activation
        self.dropout = dropout
        self._compiled_activate: Callable[[list[torch.Tensor]], torch.Tensor] | None = None

    @classmethod
    def from_module(cls, mlp: nn.Module, family: Family, *, activation: nn.Module | Callable | None = None
                    ) -> "BaseFFN":
        """The family's MLP module ``mlp`` as a BaseFFN sharing its projection modules (no copy);
        ``activation`` overrides the MLP's own."""
        return cls(kind=family.ffn_kind, projections={name: getattr(mlp, name) for name in family.ffn_projections},
                   activation=activation if activation is not None else getattr(mlp, family.activation),
                   dropout=getattr(mlp, family.ffn_dropout) if family.ffn_dropout else None)

    def projection(self, name: str) -> nn.Module:
        return getattr(self, name)

    def compile_activation(self) -> None:
        """From now on :meth:`activate` runs through ``torch.compile`` (row counts dynamic): its elementwise ops
        fuse into one kernel, on the ``[P, I]`` pair rows the dispatch paths activate in forward and backward."""
        self._compiled_activate = torch.compile(self._activate, dynamic=True)

    def activate(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The hidden activation from the input projections' outputs (``[n, I]`` each, or ``[n, 2I]`` fused)."""
        return (self._compiled_activate or self._activate)(inputs)

    def _activate(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == GATED:
            gate, up = inputs
            return self.activation(gate) * up
        if self.kind == FUSED_GATED:
            gate, up = inputs[0].chunk(2, dim=-1)
            return up * self.activation(gate)
        return self.activation(inputs[0])

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The frozen FFN with no expert delta (dropout not applied). u: ``[n, D]`` -> ``[n, D]``."""
        return self.projection(self.output_name)(self.activate([self.projection(n)(u) for n in self.input_names]))


@dataclass(frozen=True)
class ExpertProjection:
    """One FFN projection as a dispatch path sees it: the frozen module and its E expert LoRAs (None: not
    adapted)."""

    module: nn.Module
    lora: "ExpertLoras | None"


@dataclass(frozen=True)
class ExpertFFN:
    """What a dispatch path computes with: ``FFN_e(x) = out_e(activate([in_e(x) for in in inputs]))`` where
    each projection is its frozen module plus expert e's LoRA delta.

    ``weights_sum_to_one``: the router renormalises, so the output projection's bias enters once.
    """

    inputs: tuple[ExpertProjection, ...]
    output: ExpertProjection
    activate: Callable[[list[torch.Tensor]], torch.Tensor]
    num_experts: int
    weights_sum_to_one: bool

    @property
    def projections(self) -> tuple[ExpertProjection, ...]:
        return (*self.inputs, self.output)

    @property
    def uses_dora(self) -> bool:
        return any(p.lora is not None and p.lora.lora_magnitude is not None for p in self.projections)

    def mixed_output(self, mixed: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The shared base output projection on ``mixed = sum_e w_e a_e`` ``[T, I]`` -> ``[T, D]`` in ``dtype``
        (``sum_e w_e W2 a_e = W2 sum_e w_e a_e``).

        Its bias enters once, so routing weights ``[T, k]`` that do not sum to 1 get ``(sum w - 1) b`` added.
        """
        y = self.output.module(mixed.to(dtype))
        bias = projection_weight(self.output.module)[1]
        if bias is not None and not self.weights_sum_to_one:
            y = y + ((weights.sum(dim=-1, keepdim=True) - 1) * bias.float()).to(y.dtype)
        return y


class Dispatch(Protocol):
    """One MoE path: ``y_t = sum_slot w[t, slot] FFN_{experts[t, slot]}(x_t)``, every path the same function.

    ``name`` is its registry name (and module name); ``handles_dora``: whether it computes DoRA experts
    (the others hand those to the per-expert path).
    """

    name: str
    handles_dora: bool

    def __call__(self, ffn: ExpertFFN, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
                 ) -> torch.Tensor:
        """x: ``[T, D]``; weights (fp32), experts (long, no ``NO_EXPERT``): ``[T, k]`` -> ``[T, D]`` in x's dtype."""
        ...
