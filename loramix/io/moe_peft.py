"""The MoE-PEFT adapter layout (the reference implementation's; the ``mixlora`` package reads it).

``adapter_config.json`` with MoE-PEFT's keys + ``adapter_model.bin``, a ``torch.save`` of
per-expert fp32 tensors named as MoE-PEFT names them (``mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight``).
The reference stores no DoRA magnitude: it recomputes ``||W + s B A||_row`` on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import LoramixError
from ..families import resolve_targets
from ..nn.lora import LoraLinear
from ..nn.moe import MixLoraFFN
from ..nn.routing import ROUTERS

if TYPE_CHECKING:
    from ..model import MixLoraModel

WEIGHTS_NAME = "adapter_model.bin"
# The reference's target-name order: exported lists and per-layer FFN keys follow it.
TARGET_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "dense",
                "fc1", "fc2", "qkv_proj", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h")


def config_dict(model: "MixLoraModel") -> dict:
    """The reference ``adapter_config.json`` in its key order; the routing's own keys come from its
    router class, which refuses what the reference cannot express (a top-p temperature)."""
    cfg = model.mixlora_config
    out: dict = {}
    if cfg.use_dora:
        out["use_dora"] = True
    if cfg.use_rslora:
        out["use_rslora"] = True
    out.update(bias="none", peft_type="MIXLORA", r=cfg.r, lora_alpha=_int_if_whole(cfg.lora_alpha),
               lora_dropout=cfg.lora_dropout, target_modules=_in_target_order(_targets(model)))
    if cfg.expert_lora:
        expert = {"bias": "none", "r": cfg.expert_value("r"),
                  "lora_alpha": _int_if_whole(cfg.expert_value("lora_alpha")),
                  "lora_dropout": cfg.expert_value("lora_dropout")}
        for key in ("use_dora", "use_rslora"):  # experts inherit the top-level value unless overridden
            if cfg.expert_value(key) or cfg.expert_value(key) != getattr(cfg, key):
                expert[key] = cfg.expert_value(key)
        out["expert_lora"] = expert
    router = ROUTERS[cfg.routing]
    out.update(routing_strategy=router.moe_peft_name, num_experts=cfg.num_experts, act_fn=model.activation_name)
    out.update(router.moe_peft_fields(cfg))
    out.update(base_model_name_or_path=cfg.base_model_name_or_path, task_type=cfg.task_type)
    return out


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _in_target_order(names: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(TARGET_ORDER)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def _targets(model: "MixLoraModel") -> list[str]:
    return resolve_targets(model.mixlora_config, model.family)


def key_map(model: "MixLoraModel") -> list[tuple[str, str, int | None]]:
    """``(reference key, our parameter name, expert index or None)`` in the reference's key order."""
    family, targets = model.family, _targets(model)
    entries = []
    for i in range(len(model.moe_layers())):
        ours = f"{family.layers}.{i}"
        entries.append((f"mixlora.layers.{i}.mlp.moe_gate.weight", f"{ours}.{family.mlp}.router.weight", None))
        for proj in family.attention_projections:
            if proj in targets:
                for ab in ("lora_A", "lora_B"):
                    entries.append((f"mixlora.layers.{i}.self_attn.{proj}.{ab}.weight",
                                    f"{ours}.{family.attention}.{proj}.{ab}", None))
        for proj in _in_target_order([p for p in family.ffn_projections if p in targets]):
            for e in range(model.mixlora_config.num_experts):
                for ab in ("lora_A", "lora_B"):
                    entries.append((f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.{ab}.weight",
                                    f"{ours}.{family.mlp}.experts.{proj}.{ab}", e))
    return entries


def state_dict(model: "MixLoraModel") -> dict[str, torch.Tensor]:
    """Per-expert reference tensors. The reference stores no DoRA magnitude and recomputes it on load as
    ``||W + s B A||_row``, so a magnitude that differs from that (a trained one) is refused, not dropped."""
    for name, magnitude, recomputed in dora_magnitudes(model):
        if not torch.allclose(magnitude, recomputed, rtol=1e-5, atol=1e-6):
            raise LoramixError(f"{name}: a trained DoRA magnitude cannot be written in the moe-peft format (the "
                               "reference recomputes it on load, which would change the model); use format='loramix'")
    params = dict(model.trainable_parameters())
    out = {}
    for key, name, expert in key_map(model):
        tensor = params[name].detach()
        out[key] = (tensor if expert is None else tensor[expert]).to("cpu", torch.float32).contiguous().clone()
    return out


# ---- reading ------------------------------------------------------------------------------------------------
def dora_magnitudes(model: "MixLoraModel") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(parameter name, DoRA magnitude, ||W + s B A||_row of the current A, B)`` for every DoRA LoRA."""
    found = []
    for prefix, module in model.base_model.named_modules():
        if isinstance(module, LoraLinear) and module.lora_magnitude is not None:
            found.append((f"{prefix}.lora_magnitude", module.lora_magnitude, module.weight_norms()))
        elif isinstance(module, MixLoraFFN):
            for name, lora in module.experts.items():
                if lora.lora_magnitude is not None:
                    found.append((f"{prefix}.experts.{name}.lora_magnitude", lora.lora_magnitude,
                                  lora.weight_norms(module.projection(name))))
    return found


def read_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoramixError(f"{path}: not a readable torch weights file ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoramixError(f"{path}: expected a flat dict of tensors")
    return state


def stacked(state: dict[str, torch.Tensor], model: "MixLoraModel", path: str) -> dict[str, torch.Tensor]:
    """Reference per-expert tensors -> our stacked parameters, checking every key and shape on the way."""
    params = dict(model.trainable_parameters())
    keys = key_map(model)
    known = {key for key, _, _ in keys}
    for key in state:
        if key not in known:
            raise LoramixError(f"{path}: unexpected key {key!r} (not part of this model's adapter)")
    out: dict[str, torch.Tensor] = {}
    for key, name, expert in keys:
        if key not in state:
            raise LoramixError(f"{path}: missing key {key!r}")
        tensor, target = state[key], params[name]
        expected = tuple(target.shape if expert is None else target.shape[1:])
        if tuple(tensor.shape) != expected:
            raise LoramixError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, expected {expected}")
        if expert is None:
            out[name] = tensor
        else:
            out.setdefault(name, torch.empty(target.shape, dtype=torch.float32))[expert] = tensor
    for name, param in params.items():  # not in the reference's files: recomputed after loading
        if name.endswith(".lora_magnitude"):
            out[name] = param.detach()
    return out
