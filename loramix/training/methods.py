"""The four methods the paper compares, from one adapter spec: ``lora`` and ``dora`` (HF PEFT, same target
projections) and ``mixlora`` and ``mixdora`` (loramix); their trainable-parameter budgets, and the LoRA
rank whose budget matches a MixLoRA config's (the paper pairs MixLoRA r=16, 8 experts with LoRA r=80).

An adapter spec is the ``adapter`` mapping of a run config: MixLoraConfig keys plus ``method`` (default
``mixdora`` with ``use_dora: true``, else ``mixlora``; the method decides ``use_dora``) and ``lora_r``, the
rank of the LoRA/DoRA baselines: an integer, ``"match"`` (the largest rank whose budget does not exceed the
MixLoRA/MixDoRA one), or absent (the MixLoRA ``r``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LORA_FIELD_CHECKS, MixLoraConfig, reject_unknown
from ..errors import Problems
from ..families import decoder_layers, family_for, projection_shape, resolve_targets
from ..model import get_mixlora_model

METHODS = ("lora", "dora", "mixlora", "mixdora")


@dataclass(frozen=True)
class MethodSpec:
    """Which method to train, the MixLoRA settings it derives from, and the baselines' rank."""

    method: str
    config: MixLoraConfig
    lora_r: int | str | None = None

    @property
    def is_mixture(self) -> bool:
        return self.method in ("mixlora", "mixdora")

    @property
    def use_dora(self) -> bool:
        return self.method in ("dora", "mixdora")


def method_spec(adapter: dict[str, Any], *, source: str = "adapter") -> MethodSpec:
    """Split an adapter mapping into ``method``, ``lora_r`` and the MixLoraConfig; one LoramixError names
    every bad key."""
    keys = dict(adapter)
    problems = Problems()
    method = keys.pop("method", None)
    if method is not None and not (isinstance(method, str) and method in METHODS):
        problems.check(reject_unknown, str(method), METHODS, f"{source}.method")
        method = None
    lora_r = keys.pop("lora_r", None)
    if lora_r is not None and lora_r != "match" and (isinstance(lora_r, bool) or not isinstance(lora_r, int)
                                                     or lora_r < 1):
        problems.add(f"{source}.lora_r must be a positive integer or 'match', got {lora_r!r}")
    config = problems.result(MixLoraConfig.from_dict, keys, source=source)
    if config is not None and method is not None and "use_dora" in keys \
            and config.use_dora != (method in ("dora", "mixdora")):
        problems.add(f"{source}.use_dora {str(config.use_dora).lower()} contradicts method {method!r} "
                     "(the method decides DoRA; drop use_dora)")
    problems.raise_if_any()
    if method is None:
        method = "mixdora" if config.use_dora else "mixlora"
    return MethodSpec(method, config, lora_r)


def check_peft_lora(keys: dict[str, Any], *, source: str = "adapter") -> None:
    """A ``type: lora`` adapter mapping: PEFT LoraConfig's keys (others get a did-you-mean), the LoRA settings it
    shares with MixLoRA checked as MixLoraConfig checks them, then LoraConfig's own checks; one LoramixError."""
    from peft import LoraConfig

    problems = Problems()
    fields = [f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name != "task_type"]
    known = {key: value for key, value in keys.items()
             if problems.check(reject_unknown, key, fields, "key", prefix=f"{source}: ")}
    for key in ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora"):
        if key in known:
            problems.check(LORA_FIELD_CHECKS[key], key, known[key], prefix=f"{source}: ")
    if not problems:
        try:
            LoraConfig(task_type="CAUSAL_LM", **known)
        except (TypeError, ValueError) as e:
            problems.add(f"{source} (PEFT LoraConfig): {str(e).strip().splitlines()[0]}")
    problems.raise_if_any()


def build_model(base: nn.Module, spec: MethodSpec) -> nn.Module:
    """Wrap a frozen HF causal LM with the spec's adapter: a MixLoraModel or a PEFT model."""
    if spec.is_mixture:
        return get_mixlora_model(base, dataclasses.replace(spec.config, use_dora=spec.use_dora))
    from peft import get_peft_model

    rank = baseline_rank(base, spec)
    return get_peft_model(base, peft_lora_config(spec.config, base, rank=rank, use_dora=spec.use_dora))


def peft_lora_config(config: MixLoraConfig, base: nn.Module, *, rank: int, use_dora: bool):
    """HF PEFT's LoraConfig for the same projections as ``config`` on ``base`` (its top-level alpha, dropout,
    rsLoRA and init; ``rank`` instead of ``config.r``)."""
    from peft import LoraConfig

    targets = list(dict.fromkeys(resolve_targets(config, family_for(base))))
    conv1d = any(type(module).__name__ == "Conv1D" for module in base.modules())  # GPT-2 stores W as [in, out]
    return LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, use_rslora=config.use_rslora, use_dora=use_dora,
                      init_lora_weights=True if config.init_lora_weights == "original" else "gaussian",
                      fan_in_fan_out=conv1d)


def baseline_rank(base: nn.Module, spec: MethodSpec) -> int:
    """The LoRA/DoRA rank: ``lora_r``, the budget-matching rank for ``"match"``, else the MixLoRA ``r``."""
    if spec.lora_r == "match":
        return matching_rank(base.config, spec.config, use_dora=spec.use_dora)
    return spec.config.r if spec.lora_r is None else spec.lora_r


# ---- budgets -------------------------------------------------------------------------------------------------
def meta_model(hf_config) -> nn.Module:
    """The base model built on the meta device: shapes and parameter counts, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def trainable_and_total(hf_config, spec: MethodSpec) -> tuple[int, int]:
    """``(trainable, all)`` parameter counts of the spec's model, counted on a meta-device build."""
    model = build_model(meta_model(hf_config), spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def lora_count_per_rank(hf_config, config: MixLoraConfig, *, use_dora: bool) -> tuple[int, int]:
    """A LoRA on ``config``'s projections has ``slope * r + offset`` trainable parameters:
    ``slope = sum (in + out)`` over the adapted projections, ``offset = sum out`` with DoRA (magnitudes), else 0."""
    base = meta_model(hf_config)
    family = family_for(base)
    targets = resolve_targets(config, family)
    slope = offset = 0
    for layer in decoder_layers(base, family):
        for owner, names in ((family.attention, family.attention_projections), (family.mlp, family.ffn_projections)):
            for name in names:
                if name in targets:
                    in_features, out_features = projection_shape(getattr(getattr(layer, owner), name))
                    slope += in_features + out_features
                    offset += out_features if use_dora else 0
    return slope, offset


def matching_rank(hf_config, config: MixLoraConfig, *, use_dora: bool, budget: int | None = None) -> int:
    """The largest LoRA (``use_dora``: DoRA) rank whose trainable count does not exceed ``budget``, by default
    the MixLoRA (MixDoRA) budget of ``config`` on the same base and projections (at least 1)."""
    if budget is None:
        budget, _ = trainable_and_total(hf_config, MethodSpec("mixdora" if use_dora else "mixlora", config))
    slope, offset = lora_count_per_rank(hf_config, config, use_dora=use_dora)
    return max(1, (budget - offset) // slope)


def budget_table(hf_config, spec: MethodSpec) -> list[dict[str, Any]]:
    """One row per method: ``method``, ``rank``, ``trainable``, ``total``, ``share`` (trainable / all).

    The mixtures use ``spec.config``; the baselines use ``spec.lora_r``, and when that is "match" or absent,
    the rank matching their mixture's budget (lora: mixlora's, dora: mixdora's), noted in ``matches``.
    """
    rows: dict[str, dict[str, Any]] = {}
    for method in ("mixlora", "mixdora", "lora", "dora"):
        rank, matches = spec.config.r, None
        if not method.startswith("mix"):
            rank = spec.lora_r or "match"
            if rank == "match":
                matches = "mix" + method
                rank = matching_rank(hf_config, spec.config, use_dora=method == "dora",
                                     budget=rows[matches]["trainable"])
        trainable, total = trainable_and_total(hf_config, MethodSpec(method, spec.config, rank))
        rows[method] = {"method": method, "rank": rank, "trainable": trainable, "total": total,
                        "share": trainable / total}
        if matches:
            rows[method]["matches"] = matches
    return [rows[method] for method in METHODS]
