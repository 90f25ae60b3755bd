"""Adapter files: our safetensors layout and the reference (MoE-PEFT / ``mixlora``) layout.

Ours: ``adapter_config.json`` (MixLoraConfig) + ``adapter_model.safetensors`` whose keys are the adapter
parameter names inside the HF model (stacked experts, e.g. ``model.layers.0.mlp.experts.up_proj.lora_A``
of shape ``[E, r, in]``). Reference: ``adapter_config.json`` (spec section 1.4) + ``adapter_model.bin``,
a ``torch.save`` of per-expert fp32 tensors named as in spec section 7.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, ROUTINGS, MixLoraConfig
from .errors import LoramixError

if TYPE_CHECKING:
    from .model import MixLoraModel

SAFETENSORS_NAME = "adapter_model.safetensors"
UPSTREAM_WEIGHTS_NAME = "adapter_model.bin"
FORMATS = ("loramix", "moe-peft")
# The reference's target-name order (spec 1.1): exported lists and per-layer FFN keys follow it.
UPSTREAM_TARGET_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj", "dense",
                         "fc1", "fc2", "qkv_proj", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h")


# ---- writing ------------------------------------------------------------------------------------------------
def save_adapter(model: "MixLoraModel", directory: str, *, format: str) -> None:
    """Write the adapter config and weights into ``directory``; each file is replaced atomically."""
    if format not in FORMATS:
        raise LoramixError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    os.makedirs(directory, exist_ok=True)
    if format == "loramix":
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in model.trainable_parameters()}
        config = model.mixlora_config.to_dict()
        config["act_fn"] = model.activation_name
        metadata = {"format": "pt", "model_type": model.config.model_type,
                    "num_hidden_layers": str(len(model.moe_layers()))}
        _atomic_write(os.path.join(directory, SAFETENSORS_NAME), lambda p: save_file(tensors, p, metadata=metadata))
    else:
        tensors = upstream_state_dict(model)
        config = upstream_config_dict(model)
        _atomic_write(os.path.join(directory, UPSTREAM_WEIGHTS_NAME), lambda p: torch.save(tensors, p))
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: _write_json(config, p))


def _write_json(data: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def upstream_config_dict(model: "MixLoraModel") -> dict:
    """The reference ``adapter_config.json`` in its key order (spec 1.4).

    Refuses what the reference cannot express: a top-p temperature (it divides probabilities, we divide
    logits). Switch capacity is written only as an ``expert_capacity`` we were given (else the reference
    falls back to its 32 per sequence, which only matters if training continues there).
    """
    cfg = model.mixlora_config
    out: dict = {}
    if cfg.use_dora:
        out["use_dora"] = True
    if cfg.use_rslora:
        out["use_rslora"] = True
    out.update(bias="none", peft_type="MIXLORA", r=cfg.r, lora_alpha=_int_if_whole(cfg.lora_alpha),
               lora_dropout=cfg.lora_dropout, target_modules=_upstream_order(_targets(model)))
    if cfg.expert_lora:
        expert = {"bias": "none", "r": cfg.expert_value("r"),
                  "lora_alpha": _int_if_whole(cfg.expert_value("lora_alpha")),
                  "lora_dropout": cfg.expert_value("lora_dropout")}
        for key in ("use_dora", "use_rslora"):  # experts inherit the top-level value unless overridden
            if cfg.expert_value(key) or cfg.expert_value(key) != getattr(cfg, key):
                expert[key] = cfg.expert_value(key)
        out["expert_lora"] = expert
    out.update(routing_strategy=ROUTINGS[cfg.routing], num_experts=cfg.num_experts, act_fn=model.activation_name)
    if cfg.routing == "top_p":
        if cfg.temperature != 1.0:
            raise LoramixError(f"temperature {cfg.temperature} cannot be written in the moe-peft format: the "
                               "reference divides probabilities by it, loramix divides logits (docs/variants.md)")
        out.update(top_p=cfg.top_p, temperature=0.0)
    elif cfg.routing == "switch":
        if cfg.expert_capacity is not None:
            out["expert_capacity"] = cfg.expert_capacity
        out["sparse_step"] = None
    else:
        out["top_k"] = cfg.top_k
    out.update(base_model_name_or_path=cfg.base_model_name_or_path, task_type=cfg.task_type)
    return out


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _upstream_order(names: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(UPSTREAM_TARGET_ORDER)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def _targets(model: "MixLoraModel") -> list[str]:
    from .model import resolve_targets

    return resolve_targets(model.mixlora_config, model.family)


def upstream_key_map(model: "MixLoraModel") -> list[tuple[str, str, int | None]]:
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
        for proj in _upstream_order([p for p in family.ffn_projections if p in targets]):
            for e in range(model.mixlora_config.num_experts):
                for ab in ("lora_A", "lora_B"):
                    entries.append((f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.{ab}.weight",
                                    f"{ours}.{family.mlp}.experts.{proj}.{ab}", e))
    return entries


def upstream_state_dict(model: "MixLoraModel") -> dict[str, torch.Tensor]:
    """Per-expert reference tensors. The reference stores no DoRA magnitude and recomputes it on load as
    ``||W + s B A||_row``, so a magnitude that differs from that (a trained one) is refused, not dropped."""
    for name, magnitude, recomputed in _dora_magnitudes(model):
        if not torch.allclose(magnitude, recomputed, rtol=1e-5, atol=1e-6):
            raise LoramixError(f"{name}: a trained DoRA magnitude cannot be written in the moe-peft format (the "
                               "reference recomputes it on load, which would change the model); use format='loramix'")
    params = dict(model.trainable_parameters())
    out = {}
    for key, name, expert in upstream_key_map(model):
        tensor = params[name].detach()
        out[key] = (tensor if expert is None else tensor[expert]).to("cpu", torch.float32).contiguous().clone()
    return out


# ---- reading ------------------------------------------------------------------------------------------------
def resolve_adapter_dir(name_or_path: str) -> str:
    """A local adapter folder as is; otherwise a hub repository id, downloaded (needs the hub)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise LoramixError(f"adapter folder not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, UPSTREAM_WEIGHTS_NAME])
    except Exception as exc:  # offline, unknown repo, ...: one line for the user
        raise LoramixError(f"adapter {name_or_path!r}: not a local folder and not downloadable ({exc})") from None


def read_adapter_config(directory: str) -> MixLoraConfig:
    if not os.path.isdir(directory):
        raise LoramixError(f"adapter folder not found: {directory}")
    return MixLoraConfig.from_json_file(os.path.join(directory, CONFIG_NAME))


def load_adapter_weights(model: "MixLoraModel", directory: str) -> None:
    """Copy every adapter tensor from the folder's weights file into ``model``; errors name the first bad key."""
    safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
    upstream_path = os.path.join(directory, UPSTREAM_WEIGHTS_NAME)
    if os.path.isfile(safetensors_path):
        tensors = _read_safetensors(safetensors_path)
        source = safetensors_path
    elif os.path.isfile(upstream_path):
        tensors = _stack_upstream(_read_torch_bin(upstream_path), model, upstream_path)
        source = upstream_path
    else:
        raise LoramixError(f"{directory}: no adapter weights ({SAFETENSORS_NAME} or {UPSTREAM_WEIGHTS_NAME})")
    _copy_into(model, tensors, source)
    if source == upstream_path:  # the reference's DoRA magnitude is ||W + s B A||_row of the loaded A, B (spec 3.3)
        with torch.no_grad():
            for name, magnitude, recomputed in _dora_magnitudes(model):
                magnitude.copy_(recomputed)


def _dora_magnitudes(model: "MixLoraModel") -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(parameter name, DoRA magnitude, ||W + s B A||_row of the current A, B)`` for every DoRA LoRA."""
    from .lora import LoraLinear
    from .moe import MixLoraFFN

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


def check_base_matches(directory: str, base_model) -> None:
    """Before injecting: the base's model_type and layer count must match those recorded in our file."""
    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        return
    metadata = _open_safetensors(path, lambda fh: fh.metadata() or {})
    from .families import decoder_layers, family_for

    found_type, base_type = metadata.get("model_type"), base_model.config.model_type
    if found_type and found_type != base_type:
        raise LoramixError(f"{path}: adapter was trained on model_type {found_type!r}, the base model is {base_type!r}")
    found_layers = metadata.get("num_hidden_layers")
    base_layers = len(decoder_layers(base_model, family_for(base_model)))
    if found_layers and int(found_layers) != base_layers:
        raise LoramixError(f"{path}: adapter has {found_layers} layers, the base model has {base_layers}")


def _open_safetensors(path: str, read: Callable):
    try:
        with safe_open(path, framework="pt") as fh:
            return read(fh)
    except Exception as exc:
        raise LoramixError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    return _open_safetensors(path, lambda fh: {key: fh.get_tensor(key) for key in fh.keys()})


def _read_torch_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoramixError(f"{path}: not a readable torch weights file ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoramixError(f"{path}: expected a flat dict of tensors")
    return state


def _stack_upstream(state: dict[str, torch.Tensor], model: "MixLoraModel", path: str) -> dict[str, torch.Tensor]:
    """Reference per-expert tensors -> our stacked parameters, checking every key and shape on the way."""
    params = dict(model.trainable_parameters())
    key_map = upstream_key_map(model)
    known = {key for key, _, _ in key_map}
    for key in state:
        if key not in known:
            raise LoramixError(f"{path}: unexpected key {key!r} (not part of this model's adapter)")
    out: dict[str, torch.Tensor] = {}
    for key, name, expert in key_map:
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


def _copy_into(model: "MixLoraModel", tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check keys and shapes in the model's parameter order (so the first error is the first layer's), then copy."""
    params = dict(model.trainable_parameters())
    for key, param in params.items():
        if key not in tensors:
            raise LoramixError(f"{source}: missing key {key!r}")
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise LoramixError(f"{source}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                               f"expected {tuple(param.shape)}")
    for key in tensors:
        if key not in params:
            raise LoramixError(f"{source}: unexpected key {key!r} (not part of this model's adapter)")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
