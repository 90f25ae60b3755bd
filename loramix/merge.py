"""Fold LoRA updates into base weights: the formula, the model's tensors with them folded, `loramix merge`.

A LoRA on ``W`` ``[out, in]`` folds to ``W + s B A``; with DoRA (magnitude ``m`` ``[out]``) to
``(m / ||W + s B A||_row)[:, None] * (W + s B A)``; biases are unchanged (DoRA adds them after scaling).
Two merges are exact: the attention LoRAs alone (the experts stay, as a smaller adapter), and
everything when every expert is the same FFN (one expert, or no FFN targets).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import modelfiles
from .errors import LoramixError
from .families import activation_name, projection_weight
from .lora import LoraLinear
from .model import resolve_targets
from .moe import MixLoraFFN

Tensors = Iterator[tuple[str, torch.Tensor]]
ADAPTER_SUBDIR = "adapter"


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, *, scaling: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``W + s B A``, DoRA-rescaled row by row when ``magnitude`` is given.

    weight: ``[out, in]``; lora_A: ``[r, in]``; lora_B: ``[out, r]``; magnitude: ``[out]`` or None.
    """
    merged = weight.detach().float() + scaling * (lora_B.detach().float() @ lora_A.detach().float())
    if magnitude is not None:
        merged = merged * (magnitude.detach().float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged


def _stored(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``[out, in]`` weight in the layout ``module.weight`` keeps (``[in, out]`` for GPT-2's Conv1D)."""
    return weight.t().contiguous() if type(module).__name__ == "Conv1D" else weight


def lora_merged_weight(layer: LoraLinear) -> torch.Tensor:
    """The attention LoRA folded into its base weight (fp32, in the base weight's layout)."""
    weight, _ = projection_weight(layer.base_layer)
    return _stored(layer.base_layer, merged_weight(weight, layer.lora_A, layer.lora_B, scaling=layer.scaling,
                                                   magnitude=layer.lora_magnitude))


def expert_merged_weight(ffn: MixLoraFFN, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert``'s weight of FFN projection ``name``: the base weight plus that expert's LoRA
    (fp32, in the base weight's layout); the base weight as is when ``name`` is not targeted."""
    module = ffn.projection(name)
    weight, _ = projection_weight(module)
    if name not in ffn.experts:
        return module.weight.detach().float()
    loras = ffn.experts[name]
    magnitude = None if loras.lora_magnitude is None else loras.lora_magnitude[expert]
    return _stored(module, merged_weight(weight, loras.lora_A[expert], loras.lora_B[expert],
                                         scaling=loras.scaling, magnitude=magnitude))


def dense_ffn_tensors(prefix: str, ffn: MixLoraFFN, *, expert: int | None) -> Tensors:
    """The FFN's tensors under its original names: the base FFN (``expert=None``) or expert ``expert``'s."""
    for key, tensor in ffn.base.state_dict().items():
        name, _, kind = key.rpartition(".")
        if expert is not None and kind == "weight" and name in ffn.experts:
            tensor = expert_merged_weight(ffn, name, expert)
        yield f"{prefix}.{key}", tensor


def base_tensors(hf_model: nn.Module, ffn_tensors: Callable[[str, MixLoraFFN], Tensors]) -> Tensors:
    """The injected HF model's tensors under the base model's own names, in state-dict order.

    Attention LoRAs come folded into their projection's weight; adapter parameters are left out; each
    MixLoRA FFN contributes ``ffn_tensors(prefix, ffn)``. Tied weights (same storage) are given once.
    """
    owners = {name: module for name, module in hf_model.named_modules() if isinstance(module, (LoraLinear, MixLoraFFN))}
    done: set[str] = set()
    seen_storage: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in hf_model.state_dict().items():
        owner = _owner(key, owners)
        if owner is None:
            storage = (tensor.data_ptr(), tuple(tensor.shape))
            if tensor.numel() and storage in seen_storage:
                continue
            seen_storage.add(storage)
            yield key, tensor
        elif owner not in done:
            done.add(owner)
            module = owners[owner]
            if isinstance(module, MixLoraFFN):
                yield from ffn_tensors(owner, module)
            else:
                yield f"{owner}.weight", lora_merged_weight(module)
                if getattr(module.base_layer, "bias", None) is not None:
                    yield f"{owner}.bias", module.base_layer.bias


def _owner(key: str, owners: dict[str, nn.Module]) -> str | None:
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in owners:
            return prefix
    return None


def cast(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    for name, tensor in tensors:
        yield name, tensor.detach().to(dtype)


def base_parameter_count(model) -> int:
    """Parameters of a MixLoraModel's base model alone (adapter excluded, tied weights once)."""
    adapter = {id(p) for _, p in model.trainable_parameters()}
    return sum(p.numel() for p in model.base_model.parameters() if id(p) not in adapter)


def check_unquantised(hf_model: nn.Module) -> None:
    """Folding needs real weights: refuse a base loaded quantised (GGUF files are dequantised on load)."""
    quantization = getattr(hf_model.config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    method = str(getattr(method, "value", method))  # an enum in transformers' own configs
    if method != "gguf":
        raise LoramixError(f"the base model was loaded quantised ({method}); "
                           "load it in float32/bfloat16 to fold the adapter into its weights")


def model_dtype(hf_model: nn.Module) -> torch.dtype:
    """The dtype of the base model's embedding weights (what its checkpoint holds)."""
    return hf_model.get_input_embeddings().weight.dtype


# ---- the merge command ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MergeSummary:
    path: str
    what: str                    # "all" or "attention"
    num_params: int
    num_bytes: int
    adapter_path: str | None     # the experts-only adapter written beside an attention merge
    tokenizer_files: tuple[str, ...]

    def report(self) -> str:
        what = "every LoRA" if self.what == "all" else "the attention LoRAs"
        lines = [f"merged {what} into {self.path}: {self.num_params:,d} params, "
                 f"{modelfiles.format_bytes(self.num_bytes)}"]
        if self.adapter_path:
            lines.append(f"experts and routers: {self.adapter_path} "
                         f"(use it with --model {self.path} --adapter {self.adapter_path})")
        lines.append(modelfiles.tokenizer_report(self.tokenizer_files))
        return "\n".join(lines)


def full_merge_refusal(model) -> str | None:
    """Why no dense model equals ``model`` (None when one does: every token gets the same FFN at weight 1)."""
    cfg = model.mixlora_config
    routing = getattr(cfg, "routing", "top_k")
    if routing == "switch":
        return "switch routing gives tokens over expert capacity the plain FFN, which no dense model can do"
    if routing == "top_p" and cfg.num_experts > 1:
        return "top-p routing weighs experts by their unrenormalised probabilities, which no dense model can do"
    if cfg.num_experts > 1 and any(layer.experts for layer in model.moe_layers()):
        return f"this adapter has {cfg.num_experts} different experts, which a dense model cannot hold"
    return None


def merge_attention_(model) -> None:
    """In place: fold every attention LoRA into its projection and put the plain projection back."""
    for name, module in list(model.base_model.named_modules()):
        if isinstance(module, LoraLinear):
            with torch.no_grad():
                module.base_layer.weight.copy_(lora_merged_weight(module).to(module.base_layer.weight.dtype))
            parent_name, _, attr = name.rpartition(".")
            setattr(model.base_model.get_submodule(parent_name), attr, module.base_layer)
    model.mixlora_config = dataclasses.replace(model.mixlora_config, target_modules=_ffn_targets(model))


def _ffn_targets(model) -> list[str]:
    return [t for t in resolve_targets(model.mixlora_config, model.family) if t in model.family.ffn_projections]


def merge_adapter(model, out_dir: str | os.PathLike, *, what: str = "all", dtype: torch.dtype | None = None,
                  max_shard_size: int | str = "5GB", overwrite: bool = False,
                  tokenizer=None) -> MergeSummary:
    """Write a dense checkpoint of ``model`` (a MixLoraModel) into ``out_dir``.

    ``what="all"``: every LoRA folded in (only for adapters whose experts are all the same FFN);
    the result is a plain model of the base architecture. ``what="attention"``: the attention LoRAs
    are folded into the base (in place, on ``model`` too) and the experts and routers are saved as a
    MixLoRA adapter in ``out_dir/adapter`` whose base is ``out_dir``. ``tokenizer``: as in
    :func:`loramix.export.export_moe`.
    """
    if what not in ("all", "attention"):
        raise LoramixError(f"merge: what must be 'all' or 'attention', got {what!r}")
    if what == "attention" and not _ffn_targets(model):
        raise LoramixError("merge: this adapter has no expert LoRAs, so nothing would stay after merging the "
                           "attention LoRAs; merge everything instead")
    refusal = full_merge_refusal(model) if what == "all" else None
    if refusal:
        raise LoramixError(f"merge: {refusal}; merge the attention LoRAs only (--attention-only)"
                           + ("" if getattr(model.mixlora_config, "routing", "top_k") == "switch"
                              else " or export it as a MoE model (loramix export)"))
    out_dir = os.path.abspath(os.fspath(out_dir))
    hf_model = model.base_model
    check_unquantised(hf_model)
    dtype = dtype or model_dtype(hf_model)
    modelfiles.prepare_output_dir(out_dir, overwrite=overwrite)
    adapter_path = None
    if what == "attention":
        merge_attention_(model)
        model.mixlora_config.base_model_name_or_path = out_dir
        adapter_path = os.path.join(out_dir, ADAPTER_SUBDIR)
        model.save_pretrained(adapter_path)
    expert = None if what == "attention" else 0
    written = modelfiles.write_safetensors(
        cast(base_tensors(hf_model, lambda prefix, ffn: dense_ffn_tensors(prefix, ffn, expert=expert)), dtype),
        out_dir, max_shard_size=max_shard_size)
    config = copy.deepcopy(hf_model.config)
    config.dtype = dtype
    vars(config).pop("quantization_config", None)  # the weights are written dequantised
    if what == "all":
        _set_activation(config, model.activation_name)
    config.architectures = [type(hf_model).__name__]
    config.save_pretrained(out_dir)
    modelfiles.write_generation_config(hf_model, out_dir)
    copied = modelfiles.write_tokenizer(
        tokenizer if tokenizer is not None else getattr(hf_model.config, "_name_or_path", None), out_dir)
    return MergeSummary(out_dir, what, written.num_params, written.num_bytes, adapter_path, tuple(copied))


def _set_activation(config, name: str | None) -> None:
    """Write the experts' activation (the adapter's ``act_fn`` may override the base's) into the config."""
    if name is None or name == activation_name(config):
        return
    for attr in ("hidden_act", "hidden_activation", "activation_function"):
        if isinstance(getattr(config, attr, None), str):
            setattr(config, attr, name)
            return
