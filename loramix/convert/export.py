"""Export a top-k MixLoRA model as a standard MoE checkpoint: Mixtral, Qwen2-MoE or Qwen3-MoE.

A top-k MixLoRA model on a LLaMA-style base *is* such a model: expert e's projection weights are
``W + s B_e A_e`` (DoRA-rescaled when the adapter uses DoRA), the router is the MoE gate (softmax over
E, keep k, renormalise: Mixtral always, Qwen-MoE with ``norm_topk_prob``), and the attention LoRAs fold
into q/k/v/o. The checkpoint uses the per-expert key layout that transformers itself writes and that
vLLM, SGLang, TGI and llama.cpp's converter read (``block_sparse_moe.experts.{e}.w1`` for Mixtral,
``mlp.experts.{e}.gate_proj`` for Qwen-MoE); every tensor's name and shape is checked against that
layout, derived from transformers' own model class, while it is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from ..errors import LoramixError
from ..families import GATED
from ..io import model_folder
from ..nn.moe import MixLoraFFN
from .fold import (Tensors, base_parameter_count, base_tensors, cast, check_foldable, expert_merged_weight,
                    model_dtype)

# Config keys that are not copied from the base (set by the export, or bookkeeping; the weights are
# written dequantised, so a GGUF base's quantization_config does not apply).
_SET_BY_EXPORT = {"model_type", "architectures", "transformers_version", "dtype", "_name_or_path",
                  "intermediate_size", "hidden_act", "output_router_logits", "router_aux_loss_coef",
                  "quantization_config"}
# Sliding-window keys: checked through the per-layer windows they produce, not key by key.
_SLIDING = {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}


@dataclass(frozen=True)
class MoeArchitecture:
    """How one transformers MoE architecture expresses a MixLoRA model on one of its ``bases``."""

    model_type: str
    architecture: str
    bases: tuple[str, ...]
    moe_block: str                          # decoder-layer attribute of the MoE block in the checkpoint
    expert_names: dict[str, str]            # our FFN projection -> the checkpoint's per-expert name
    num_experts_key: str
    ffn_size_keys: tuple[str, ...]          # config keys that get the base FFN width
    uniform_sliding: bool                   # one sliding window for every layer (no per-layer types)
    fixed: dict = field(default_factory=dict)       # config values the export needs
    dropped: dict = field(default_factory=dict)     # base-only keys -> the value they must have (None: no effect)
    carried: tuple[str, ...] = ()                   # base-only keys the target reads as extra attributes
    zero_tensors: tuple[str, ...] = ()              # per-block tensors written as zeros (a disabled part)


_GATE_UP_DOWN = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
ARCHITECTURES: dict[str, MoeArchitecture] = {
    "mixtral": MoeArchitecture(
        model_type="mixtral", architecture="MixtralForCausalLM", bases=("llama", "mistral"),
        moe_block="block_sparse_moe", expert_names={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
        num_experts_key="num_local_experts", ffn_size_keys=("intermediate_size",), uniform_sliding=True,
        fixed={"router_jitter_noise": 0.0},
        dropped={"attention_bias": False, "mlp_bias": False, "pretraining_tp": None},
    ),
    # Qwen2-MoE always has a shared expert; width 0 disables it exactly (vLLM then builds none). Its
    # zero-width weights are left out of the file (vLLM has no parameter for them); the sigmoid gate
    # in front of it is written as zeros.
    "qwen2_moe": MoeArchitecture(
        model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", bases=("qwen2",), moe_block="mlp",
        expert_names=_GATE_UP_DOWN, num_experts_key="num_experts",
        ffn_size_keys=("moe_intermediate_size", "intermediate_size"), uniform_sliding=False,
        fixed={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
               "shared_expert_intermediate_size": 0, "qkv_bias": True},
        zero_tensors=("shared_expert_gate.weight",),
    ),
    "qwen3_moe": MoeArchitecture(
        model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", bases=("qwen3",), moe_block="mlp",
        expert_names=_GATE_UP_DOWN, num_experts_key="num_experts",
        ffn_size_keys=("moe_intermediate_size", "intermediate_size"), uniform_sliding=True,
        fixed={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
        dropped={"max_window_layers": None, "layer_types": None}, carried=("head_dim",),
    ),
}


def architecture_for(model_type: str, requested: str | None = None) -> MoeArchitecture:
    """The MoE architecture for a base ``model_type`` (``requested``: a name from ARCHITECTURES or None/"auto")."""
    supported = ", ".join(f"{b} -> {a.model_type}" for a in ARCHITECTURES.values() for b in a.bases)
    if requested not in (None, "auto"):
        if requested not in ARCHITECTURES:
            raise LoramixError(f"export: unknown target {requested!r}; choose one of auto, {', '.join(ARCHITECTURES)}")
        arch = ARCHITECTURES[requested]
        if model_type not in arch.bases:
            raise LoramixError(f"export: a {model_type!r} base cannot be exported to {requested} "
                               f"(supported: {supported})")
        return arch
    for arch in ARCHITECTURES.values():
        if model_type in arch.bases:
            return arch
    raise LoramixError(f"export: no standard MoE architecture expresses a {model_type!r} base exactly "
                       f"(supported: {supported}); use `loramix merge --attention-only` to fold what can be folded")


def check_exportable(model) -> None:
    """Refuse adapters whose routing or FFN a fixed top-k MoE cannot reproduce exactly."""
    refusal = model.moe_layers()[0].router.export_refusal
    if refusal:
        raise LoramixError(f"export: {refusal}")
    if model.family.ffn_kind != GATED:
        raise LoramixError(f"export: the base's FFN is {model.family.ffn_kind!r}; MoE exports need a gated FFN")
    for layer in model.moe_layers():
        for name in (*layer.base_ffn.input_names, layer.base_ffn.output_name):
            if getattr(layer.projection(name), "bias", None) is not None:
                raise LoramixError(f"export: the base FFN's {name} has a bias, which the MoE experts cannot hold")


# ---- config ----------------------------------------------------------------------------------------------
def layer_windows(config) -> list[int | None]:
    """The attention window of every layer (None: full attention), from any of the supported configs."""
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def moe_config(model, arch: MoeArchitecture, dtype: torch.dtype):
    """The target config: every base setting carried over (checked after construction), plus the MoE sizes."""
    base = model.config
    base_dict = base.to_dict()
    target_cls = CONFIG_MAPPING[arch.model_type]
    target_keys = set(target_cls().to_dict())
    declared = set(type(base)().to_dict())  # keys the base's own class defines (the rest: extras it ignores)
    kwargs = {}
    for key, value in base_dict.items():
        if key in _SET_BY_EXPORT:
            continue
        if key in target_keys or key in arch.carried or key not in declared:
            kwargs[key] = value
        elif key in arch.dropped:
            if arch.dropped[key] is not None and value != arch.dropped[key]:
                raise LoramixError(f"export: the base config has {key}={value!r}, which {arch.model_type} "
                                   f"cannot express (it needs {key}={arch.dropped[key]!r})")
        else:
            raise LoramixError(f"export: the base config field {key!r} ({value!r}) has no counterpart in "
                               f"{arch.model_type}; the export would not be exact")
    windows = layer_windows(base)
    if arch.uniform_sliding:
        if len(set(windows)) > 1:
            raise LoramixError(f"export: the base mixes sliding-window and full-attention layers ({windows}); "
                               f"{arch.model_type} uses one window for all layers")
        kwargs["sliding_window"] = windows[0]
        if "use_sliding_window" in target_keys:
            kwargs["use_sliding_window"] = windows[0] is not None
    cfg = model.mixlora_config
    kwargs.update(dict.fromkeys(arch.ffn_size_keys, base.intermediate_size))
    kwargs.update(arch.fixed)
    kwargs.update({arch.num_experts_key: cfg.num_experts, "num_experts_per_tok": cfg.top_k,
                   "hidden_act": model.activation_name, "router_aux_loss_coef": cfg.router_aux_loss_coef,
                   "output_router_logits": False, "architectures": [arch.architecture], "dtype": dtype})
    config = target_cls(**kwargs)
    written = config.to_dict()
    for key in sorted(base_dict.keys() & written.keys() - _SET_BY_EXPORT - _SLIDING):
        if written[key] != base_dict[key]:
            raise LoramixError(f"export: {arch.model_type} turns the base's {key}={base_dict[key]!r} into "
                               f"{written[key]!r}; the export would not be exact")
    if layer_windows(config) != windows:
        raise LoramixError(f"export: {arch.model_type} cannot reproduce the base's attention windows {windows}")
    return config


def checkpoint_layout(config) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the checkpoint transformers writes for ``config`` (tied and empty tensors left out).

    Built from a meta-device instance of transformers' own class and its save-time key conversion.
    """
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = revert_weight_conversion(skeleton, skeleton.state_dict())
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    return {k: tuple(v.shape) for k, v in state.items() if k not in tied and v.numel() > 0}


# ---- tensors ---------------------------------------------------------------------------------------------
def moe_block_tensors(prefix: str, ffn: MixLoraFFN, arch: MoeArchitecture) -> Tensors:
    """The MoE block replacing the MLP at ``prefix``: the router as gate, then each expert's merged weights."""
    block = f"{prefix.rpartition('.')[0]}.{arch.moe_block}"
    yield f"{block}.gate.weight", ffn.router.weight
    for expert in range(ffn.num_experts):
        for name in (*ffn.base_ffn.input_names, ffn.base_ffn.output_name):
            yield f"{block}.experts.{expert}.{arch.expert_names[name]}.weight", expert_merged_weight(ffn, name, expert)


def _checked(tensors: Tensors, layout: dict[str, tuple[int, ...]], arch: MoeArchitecture,
             dtype: torch.dtype) -> Tensors:
    """Pass the stream through, holding each tensor to ``layout``; then add the zero tensors and make sure
    nothing the layout needs is missing."""
    remaining = dict(layout)
    for name, tensor in tensors:
        if name not in remaining:
            raise LoramixError(f"export: the base model has {name!r}, which {arch.architecture} has no place for")
        shape = remaining.pop(name)
        if tuple(tensor.shape) != shape:
            raise LoramixError(f"export: {name!r} has shape {tuple(tensor.shape)}, {arch.architecture} "
                               f"expects {shape}")
        yield name, tensor
    for name, shape in remaining.items():
        if not (arch.zero_tensors and name.endswith(arch.zero_tensors)):
            raise LoramixError(f"export: {arch.architecture} needs {name!r}, which the base model does not have")
        yield name, torch.zeros(shape, dtype=dtype)


# ---- entry points ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote, and its size against the base model's."""

    path: str
    architecture: str
    num_experts: int
    dtype: torch.dtype
    num_params: int
    num_bytes: int
    base_params: int
    base_bytes: int
    files: tuple[str, ...]
    tokenizer_files: tuple[str, ...]

    def report(self) -> str:
        ratio = self.num_params / self.base_params
        return "\n".join([
            f"exported {self.architecture} to {self.path} ({len(self.files)} weight file(s), "
            f"{str(self.dtype).removeprefix('torch.')})",
            f"size: {self.num_params:,d} params, {model_folder.format_bytes(self.num_bytes)} vs the base model's "
            f"{self.base_params:,d} params, {model_folder.format_bytes(self.base_bytes)}: {ratio:.2f}x "
            f"(every MoE layer holds {self.num_experts} copies of the FFN)",
            model_folder.tokenizer_report(self.tokenizer_files),
        ])


def export_moe(model, out_dir: str | os.PathLike, *, architecture: str | None = None,
               dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False,
               tokenizer=None) -> ExportSummary:
    """Write ``model`` (a top-k MixLoraModel) as a standard MoE checkpoint folder in ``out_dir``.

    ``architecture``: "mixtral" (llama, mistral bases), "qwen2_moe" (qwen2), "qwen3_moe" (qwen3), or None
    to pick by base. ``dtype``: of the written weights (default: the base model's). ``tokenizer``: a
    tokenizer to save, or a folder to copy tokenizer files from (default: the base model's folder, when it
    has them). The model's generation config is written too. The model is not modified.
    """
    arch = architecture_for(model.config.model_type, architecture)
    check_exportable(model)
    hf_model = model.base_model
    check_foldable(hf_model)
    dtype = dtype or model_dtype(hf_model)
    config = moe_config(model, arch, dtype)
    layout = checkpoint_layout(config)
    out_dir = os.path.abspath(os.fspath(out_dir))

    def write(folder: str) -> tuple[model_folder.WrittenWeights, list[str]]:
        tensors = base_tensors(hf_model, lambda prefix, ffn: moe_block_tensors(prefix, ffn, arch))
        return model_folder.write_checkpoint(folder, _checked(cast(tensors, dtype), layout, arch, dtype), config,
                                             hf_model, tokenizer=tokenizer, max_shard_size=max_shard_size)
    written, copied = model_folder.write_model_folder(out_dir, write, overwrite=overwrite,
                                                      what=f"the {arch.architecture} checkpoint")
    base_params = base_parameter_count(model)
    return ExportSummary(out_dir, arch.architecture, model.mixlora_config.num_experts, dtype, written.num_params,
                         written.num_bytes, base_params, base_params * model_dtype(hf_model).itemsize,
                         written.files, tuple(copied))


def export_mixtral(model, out_dir: str | os.PathLike, **kwargs) -> ExportSummary:
    """:func:`export_moe` to Mixtral (llama and mistral bases); the same keyword arguments."""
    return export_moe(model, out_dir, architecture="mixtral", **kwargs)

