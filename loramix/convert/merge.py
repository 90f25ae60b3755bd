"""``loramix merge``: a dense checkpoint with the LoRAs folded in.

Two merges are exact: the attention LoRAs alone (the experts stay, as a smaller adapter), and
everything when every expert is the same FFN (one expert, or no FFN targets).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch

from ..errors import LoramixError
from ..families import activation_name, resolve_targets
from ..io import model_folder
from ..nn.lora import LoraLinear
from .fold import base_tensors, cast, check_unquantised, dense_ffn_tensors, lora_merged_weight, model_dtype

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
    model_folder.check_output_dir(out_dir, overwrite=overwrite)  # before the attention merge changes the model
    if what == "attention":
        merge_attention_(model)
        model.mixlora_config.base_model_name_or_path = out_dir
    expert = None if what == "attention" else 0
    config = copy.deepcopy(hf_model.config)
    config.dtype = dtype
    vars(config).pop("quantization_config", None)  # the weights are written dequantised
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
