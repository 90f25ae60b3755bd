"""``loramix merge``: a dense checkpoint with the LoRAs folded in.

Two merges are exact: the attention LoRAs alone (the experts stay, as a smaller adapter), and
everything when every expert is the same FFN (one expert, or no FFN targets).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from torch import nn

from ..errors import LoramixError
from ..families import activation_name, resolve_targets
from ..io import model_folder
from ..model import ROUTER_LOSS_CONFIG_KEYS
from ..nn.lora import LoraLinear
from ..nn.quantized import model_quantization, quantization_of
from .fold import base_tensors, cast, check_foldable, dense_ffn_tensors, lora_merged_weight, model_dtype

ADAPTER_SUBDIR = "adapter"


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
                 f"{model_folder.format_bytes(self.num_bytes)}"]
        if self.adapter_path:
            lines.append(f"experts and routers: {self.adapter_path} "
                         f"(use it with --model {self.path} --adapter {self.adapter_path})")
        lines.append(model_folder.tokenizer_report(self.tokenizer_files))
        return "\n".join(lines)


def full_merge_refusal(model) -> str | None:
    """Why no dense model equals ``model`` (None when one does: every token gets the same FFN at weight 1)."""
    cfg = model.mixlora_config
    refusal = model.moe_layers()[0].router.dense_merge_refusal()
    if refusal:
        return refusal
    if cfg.num_experts > 1 and any(layer.experts for layer in model.moe_layers()):
        return f"this adapter has {cfg.num_experts} different experts, which a dense model cannot hold"
    return None


def merge_attention_(model) -> None:
    """In place: fold every attention LoRA into its projection and put the plain projection back (a dense
    ``nn.Linear`` in the model's activation dtype where the projection was quantised)."""
    dtype = model_dtype(model.base_model)
    for name, module in list(model.base_model.named_modules()):
        if isinstance(module, LoraLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.base_model.get_submodule(parent_name), attr, _folded(module, dtype))
    model.mixlora_config = dataclasses.replace(model.mixlora_config, target_modules=_ffn_targets(model))


def _folded(layer: LoraLinear, dtype: torch.dtype) -> nn.Module:
    """``layer``'s base projection with its LoRA folded into the weight."""
    base, merged = layer.base_layer, lora_merged_weight(layer)
    if quantization_of(base) is not None:
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=merged.device,
                          dtype=dtype).requires_grad_(False)
        if base.bias is not None:
            with torch.no_grad():
                dense.bias.copy_(base.bias)
        base = dense
    with torch.no_grad():
        base.weight.copy_(merged.to(base.weight.dtype))
    return base


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
                           + ("" if model.moe_layers()[0].router.export_refusal
                              else " or export it as a MoE model (loramix export)"))
    out_dir = os.path.abspath(os.fspath(out_dir))
    hf_model = model.base_model
    check_foldable(hf_model)
    if model.family.conv1d and model_quantization(hf_model):
        raise LoramixError("merge: this base's checkpoints store its Conv1D weights as [in, out], which bitsandbytes "
                           "replaced by [out, in] layers; load the base unquantised to merge")
    dtype = dtype or model_dtype(hf_model)
    model_folder.check_output_dir(out_dir, overwrite=overwrite)  # before the attention merge changes the model
    if what == "attention":
        merge_attention_(model)
        model.mixlora_config.base_model_name_or_path = out_dir
    expert = None if what == "attention" else 0
    config = copy.deepcopy(hf_model.config)
    config.dtype = dtype
    vars(config).pop("quantization_config", None)  # the weights are written dequantised
    for key in ROUTER_LOSS_CONFIG_KEYS:  # the MixLoRA model's, for TRL: not the dense model's
        vars(config).pop(key, None)
    if what == "all":
        _set_activation(config, model.activation_name)
    config.architectures = [type(hf_model).__name__]

    def write(folder: str) -> tuple[model_folder.WrittenWeights, list[str]]:
        if what == "attention":
            model.save_pretrained(os.path.join(folder, ADAPTER_SUBDIR))
        tensors = base_tensors(hf_model, lambda prefix, ffn: dense_ffn_tensors(prefix, ffn, expert=expert))
        return model_folder.write_checkpoint(folder, cast(tensors, dtype), config, hf_model, tokenizer=tokenizer,
                                             max_shard_size=max_shard_size)
    written, copied = model_folder.write_model_folder(out_dir, write, overwrite=overwrite,
                                                      what="the merged checkpoint")
    adapter_path = os.path.join(out_dir, ADAPTER_SUBDIR) if what == "attention" else None
    return MergeSummary(out_dir, what, written.num_params, written.num_bytes, adapter_path, tuple(copied))


def _set_activation(config, name: str | None) -> None:
    """Write the experts' activation (the adapter's ``act_fn`` may override the base's) into the config."""
    if name is None or name == activation_name(config):
        return
    for attr in ("hidden_act", "hidden_activation", "activation_function"):
        if isinstance(getattr(config, attr, None), str):
            setattr(config, attr, name)
            return
