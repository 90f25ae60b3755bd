"""Inject MixLoRA into a Hugging Face causal LM; the MixLoraModel wrapper, its aux loss, save and load."""

from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import MixLoraConfig
from .errors import LoramixError
from .families import Family, activation_name, decoder_layers, family_for, resolve_targets
from .io import adapter_folder
from .nn.lora import LoraLinear
from .nn.moe import DISPATCHES, MixLoraFFN
from .nn.quantized import keep_canonical_layouts, parameter_count
from .nn.routing import auxiliary_loss, build_router


def _inject(model: nn.Module, config: MixLoraConfig, family: Family) -> None:
    """Wrap targeted attention projections in LoraLinear and replace each MLP with a MixLoraFFN."""
    targets = resolve_targets(config, family)
    hidden_size = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    for layer in decoder_layers(model, family):
        attention = getattr(layer, family.attention)
        for name in family.attention_projections:
            if name in targets:
                setattr(attention, name, LoraLinear(
                    getattr(attention, name), r=config.r, scaling=config.scaling(expert=False),
                    dropout=config.lora_dropout, init=config.init_lora_weights, use_dora=config.use_dora))
        mlp = getattr(layer, family.mlp)
        activation = ACT2FN[config.act_fn] if config.act_fn else getattr(mlp, family.activation)
        router = build_router(config, hidden_size, device=next(mlp.parameters()).device)
        setattr(layer, family.mlp, MixLoraFFN(
            mlp, family=family, router=router, activation=activation,
            jitter_noise=0.0 if config.routing == "switch" else config.jitter_noise,  # switch: the router's own
            expert_targets=[t for t in targets if t in family.ffn_projections],
            r=config.expert_value("r"), scaling=config.scaling(expert=True),
            dropout=config.expert_value("lora_dropout"), init=config.expert_value("init_lora_weights"),
            use_dora=config.expert_value("use_dora")))


class MixLoraModel(nn.Module):
    """A frozen HF causal LM with MixLoRA injected; ``base_model`` is that HF model.

    Calling it returns a ``MoeCausalLMOutputWithPast`` whose ``loss`` is cross-entropy plus the router
    auxiliary loss (when labels are given) and whose ``aux_loss`` is the auxiliary loss alone.
    """

    def __init__(self, base_model: nn.Module, config: MixLoraConfig) -> None:
        super().__init__()
        self.family = family_for(base_model)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model.config, "name_or_path", None) or None
        for param in base_model.parameters():
            param.requires_grad_(False)
        keep_canonical_layouts(base_model)  # 4-bit bases: one forward function in train and eval mode
        _inject(base_model, config, self.family)
        self.base_model = base_model
        self.mixlora_config = config

    # ---- HF-like surface ----------------------------------------------------------------------------
    @property
    def config(self):
        """The base model's HF config."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def activation_name(self) -> str | None:
        return self.mixlora_config.act_fn or activation_name(self.base_model.config)

    def moe_layers(self) -> list[MixLoraFFN]:
        return [m for m in self.base_model.modules() if isinstance(m, MixLoraFFN)]

    def router_logits(self) -> list[torch.Tensor]:
        """Per MoE layer, the fp32 ``[B*S, E]`` router logits of the last forward (pads included)."""
        return [m.router_logits for m in self.moe_layers()]

    def set_dispatch(self, dispatch: str) -> None:
        """For every MoE layer: ``"grouped"`` (the default: sorted expert segments, fused.py), ``"dense"``
        (sync-free masked matmuls, dense.py: faster on a GPU, about 2.3x the activations) or
        ``"reference"`` (per-expert loop). All compute the same function (tests/test_fast_path.py)."""
        if dispatch not in DISPATCHES:
            raise LoramixError(f"dispatch must be one of {', '.join(map(repr, DISPATCHES))}, got {dispatch!r}")
        for layer in self.moe_layers():
            layer.dispatch = dispatch

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapter: attention LoRAs, expert LoRAs and routers."""
        return ((n, p) for n, p in self.base_model.named_parameters() if _is_adapter_param(n))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = sum(parameter_count(p) for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """transformers' activation checkpointing, non-reentrant so router logits keep their graph."""
        enable_activation_checkpointing(self.base_model, gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.base_model, "activation_checkpointing_disable"):
            self.base_model.activation_checkpointing_disable()
        else:
            self.base_model.gradient_checkpointing_disable()

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux = self.aux_loss(attention_mask)
        loss = out.loss
        if loss is not None and aux is not None:
            loss = loss + aux
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux, logits=out.logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions)

    def aux_loss(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The router loss (routing.auxiliary_loss) over the last forward's router logits, pads masked out;
        None if off."""
        cfg = self.mixlora_config
        if not cfg.router_loss:
            return None
        logits = self.router_logits()
        token_mask = None
        if attention_mask is not None:
            rows = logits[0].shape[0] // attention_mask.shape[0]
            token_mask = attention_mask[:, -rows:].reshape(-1)  # with a KV cache, the mask covers past tokens too
        return auxiliary_loss(logits, cfg, token_mask=token_mask)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """transformers' ``generate`` on the injected model (KV cache and all)."""
        return self.base_model.generate(*args, **kwargs)

    # ---- files -------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, format: str = "loramix") -> None:
        """Write ``adapter_config.json`` and the weights: ``adapter_model.safetensors`` (``format="loramix"``)
        or the reference layout ``adapter_model.bin`` (``format="moe-peft"``)."""
        adapter_folder.save_adapter(self, os.fspath(save_directory), format=format)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_path: str | os.PathLike, *,
                        is_trainable: bool = False) -> "MixLoraModel":
        """Inject the adapter saved in ``adapter_path`` (either format) into ``base_model``.

        As in PEFT, the loaded adapter is frozen and the model in eval mode unless ``is_trainable``.
        Every adapter tensor must come from the file: a missing, extra or misshapen key is an error.
        """
        adapter_path = os.fspath(adapter_path)
        config = adapter_folder.read_adapter_config(adapter_path)
        family_for(base_model)  # an unsupported base fails before anything is read
        adapter_folder.check_base_matches(adapter_path, base_model)
        model = cls(base_model, config)
        adapter_folder.load_adapter_weights(model, adapter_path)
        for _, param in model.trainable_parameters():
            param.requires_grad_(is_trainable)
        model.train(is_trainable)
        return model


def enable_activation_checkpointing(hf_model: nn.Module, kwargs: dict | None = None) -> None:
    """transformers' activation checkpointing on ``hf_model``, non-reentrant unless ``kwargs`` say otherwise."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _is_adapter_param(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or ".lora_magnitude" in name or ".router." in name


def get_mixlora_model(model: nn.Module, config: MixLoraConfig) -> MixLoraModel:
    """Turn a frozen HF causal LM into a MixLoRA model (in place) and return the wrapper."""
    return MixLoraModel(model, config)


class MixLoraModelForCausalLM:
    """The reference package's entry point: the base model comes from the adapter's own config."""

    @staticmethod
    def from_pretrained(adapter_name_or_path: str, *, dtype: torch.dtype | str | None = None,
                        is_trainable: bool = False, **base_kwargs) -> tuple[MixLoraModel, MixLoraConfig]:
        """Load ``base_model_name_or_path`` with ``AutoModelForCausalLM`` and the adapter on top of it.

        ``adapter_name_or_path`` is a local folder or, for users with the hub, a repository id.
        Returns ``(model, config)``.
        """
        from transformers import AutoModelForCausalLM

        path = adapter_folder.resolve_adapter_dir(adapter_name_or_path)
        config = adapter_folder.read_adapter_config(path)
        if not config.base_model_name_or_path:
            raise LoramixError(f"{path}: adapter_config.json has no base_model_name_or_path")
        base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=dtype, **base_kwargs)
        model = MixLoraModel.from_pretrained(base, path, is_trainable=is_trainable)
        return model, model.mixlora_config
