"""One declarative table: where each model family keeps its attention and FFN projections.

Adding a family is adding a row. Nothing else in loramix branches on ``model_type``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import LoramixError

if TYPE_CHECKING:
    from .config import MixLoraConfig

GATED = "gated"            # act(gate(x)) * up(x), then down
FUSED_GATED = "fused"      # gate_up(x) split in halves [gate | up], act(gate) * up, then down
PLAIN = "plain"            # act(fc1(x)), then fc2


@dataclass(frozen=True)
class Family:
    """Where a family's pieces live, relative to the ``*ForCausalLM`` model.

    ``ffn_projections`` lists the FFN's input projections first and its output projection last:
    gated ``(gate, up, down)``, fused ``(gate_up, down)``, plain ``(fc1, fc2)``.
    """

    layers: str                          # dotted path to the ModuleList of decoder layers
    attention: str                       # attribute of a decoder layer holding the attention block
    attention_projections: tuple[str, ...]
    mlp: str                             # attribute of a decoder layer holding the FFN
    ffn_kind: str
    ffn_projections: tuple[str, ...]
    activation: str                      # attribute of the FFN holding its activation module
    ffn_dropout: str | None = None       # attribute of the FFN holding a dropout after the output projection
    conv1d: bool = False                 # projections are transformers' Conv1D: checkpoints store W as [in, out]

    @property
    def all_projections(self) -> tuple[str, ...]:
        return self.attention_projections + self.ffn_projections


_LLAMA_LIKE = Family(
    layers="model.layers", attention="self_attn", attention_projections=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp="mlp", ffn_kind=GATED, ffn_projections=("gate_proj", "up_proj", "down_proj"), activation="act_fn",
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi": Family(
        layers="model.layers", attention="self_attn", attention_projections=("q_proj", "k_proj", "v_proj", "dense"),
        mlp="mlp", ffn_kind=PLAIN, ffn_projections=("fc1", "fc2"), activation="activation_fn",
    ),
    "phi3": Family(
        layers="model.layers", attention="self_attn", attention_projections=("qkv_proj", "o_proj"),
        mlp="mlp", ffn_kind=FUSED_GATED, ffn_projections=("gate_up_proj", "down_proj"), activation="activation_fn",
    ),
    "gpt2": Family(
        layers="transformer.h", attention="attn", attention_projections=("c_attn", "c_proj"),
        mlp="mlp", ffn_kind=PLAIN, ffn_projections=("c_fc", "c_proj"), activation="act", ffn_dropout="dropout",
        conv1d=True,
    ),
}


def family_for(model: nn.Module) -> Family:
    """The table row for ``model.config.model_type``; a LoramixError lists the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise LoramixError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def resolve_targets(config: "MixLoraConfig", family: Family) -> list[str]:
    """The projection names to adapt: ``config.target_modules`` checked against the family, or all of them."""
    if config.target_modules is None:
        return list(dict.fromkeys(family.all_projections))
    for name in config.target_modules:
        if name not in family.all_projections:
            close = difflib.get_close_matches(name, family.all_projections, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise LoramixError(
                f"target_modules: {name!r} is not a projection of this model; {hint}"
                f"available: {', '.join(dict.fromkeys(family.all_projections))}"
            )
    return list(config.target_modules)


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    """The model's decoder layers, found through ``family.layers``."""
    module = model
    for part in family.layers.split("."):
        module = getattr(module, part)
    return module


def projection_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as ``[out, in]`` (a view for Conv1D) and its bias ``[out]`` or None."""
    weight = module.weight
    if type(module).__name__ == "Conv1D":
        weight = weight.t()
    return weight, getattr(module, "bias", None)


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D projection.

    Linear layers answer from their ``in_features`` / ``out_features``: a quantised one (bitsandbytes'
    ``Linear4bit`` and ``Linear8bitLt`` are Linear subclasses) keeps a packed weight of another shape.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight, _ = projection_weight(module)
    return weight.shape[1], weight.shape[0]


def activation_name(hf_config) -> str | None:
    """The base model's FFN activation as an ``ACT2FN`` key (``hidden_act`` and its per-family aliases)."""
    for attr in ("hidden_act", "hidden_activation", "activation_function"):
        name = getattr(hf_config, attr, None)
        if isinstance(name, str):
            return name
    return None
