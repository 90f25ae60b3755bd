"""Inject MixLoRA into a Hugging Face causal LM; the MixLoraModel wrapper, its aux loss, save and load."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import MixLoraConfig
from .errors import LoramixError
from .families import Family, activation_name, decoder_layers, family_for, projection_shape, resolve_targets
from .io import adapter_folder
from .nn.dispatch import check_dispatch
from .nn.experts import ExpertLoras
from .nn.ffn import BaseFFN
from .nn.lora import LoraLinear
from .nn.moe import MixLoraFFN, collect_routing
from .nn.routing import RoutingRecord, build_router

RoutingHook = Callable[[list[RoutingRecord]], list[RoutingRecord]]


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
        device = next(mlp.parameters()).device
        base_ffn = BaseFFN.from_module(mlp, family, activation=ACT2FN[config.act_fn] if config.act_fn else None)
        setattr(layer, family.mlp, MixLoraFFN(
            base_ffn=base_ffn, router=build_router(config, hidden_size, device=device),
            experts={name: _expert_loras(config, base_ffn.projection(name), device)
                     for name in family.ffn_projections if name in targets}))


def _expert_loras(config: MixLoraConfig, projection: nn.Module, device: torch.device) -> ExpertLoras:
    """The E expert LoRAs of one FFN projection, DoRA magnitudes set from its weight."""
    loras = ExpertLoras(config.num_experts, *projection_shape(projection), r=config.expert_value("r"),
                        scaling=config.scaling(expert=True), dropout=config.expert_value("lora_dropout"),
                        init=config.expert_value("init_lora_weights"), device=device,
                        use_dora=config.expert_value("use_dora"))
    if loras.lora_magnitude is not None:
        loras.reset_magnitude(projection)
    return loras


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
        _inject(base_model, config, self.family)
        self.base_model = base_model
        self.mixlora_config = config
        self._moe_layers = [m for m in base_model.modules() if isinstance(m, MixLoraFFN)]
        self.routing: list[RoutingRecord] = []  # the last forward's records, one per MoE layer
        # Called on the records before the router loss (data-parallel runs pool all processes' rows here).
        self.routing_hook: RoutingHook | None = None

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
        return list(self._moe_layers)

    def router_logits(self) -> list[torch.Tensor]:
        """Per MoE layer, the fp32 ``[B*S, E]`` router logits of the last forward (pads included)."""
        return [record.logits for record in self.routing]

    def set_dispatch(self, dispatch: str) -> None:
        """Every MoE layer computes through ``dispatch``: ``"auto"`` (the default: per call, the path its table
        names for the device, dtype and widths) or one of ``loramix.DISPATCHES``: ``"grouped"`` (sorted expert
        segments), ``"grouped_mm"`` (the same as grouped GEMMs, no host syncs), ``"dense"`` (sync-free masked
        matmuls, more activation memory) or ``"per_expert"`` (one expert at a time, straight from the
        formula). All compute the same function (tests/test_fast_path.py)."""
        check_dispatch(dispatch)
        for layer in self._moe_layers:
            layer.dispatch = dispatch

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapter: attention LoRAs, expert LoRAs and routers."""
        return ((n, p) for n, p in self.base_model.named_parameters() if _is_adapter_param(n))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """transformers' activation checkpointing, non-reentrant so router logits keep their graph."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.base_model, "activation_checkpointing_disable"):
            self.base_model.activation_checkpointing_disable()
        else:
            self.base_model.gradient_checkpointing_disable()

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        with collect_routing() as records:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        token_mask = _token_mask(attention_mask, records)
        self.routing = [record.with_token_mask(token_mask) for record in records]
        aux = self.router_loss(self.routing)
        loss = out.loss
        if loss is not None and aux is not None:
            loss = loss + aux
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux, logits=out.logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=tuple(record.logits for record in self.routing))

    def router_loss(self, records: list[RoutingRecord]) -> torch.Tensor | None:
        """The routers' auxiliary loss over one forward's records (after ``routing_hook``); None if off."""
        if not self.mixlora_config.router_loss or not records:
            return None
        if self.routing_hook is not None:
            records = self.routing_hook(records)
        return self._moe_layers[0].router.loss(records)

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


def _token_mask(attention_mask: torch.Tensor | None, records: list[RoutingRecord]) -> torch.Tensor | None:
    """``[T]``: 1 for the real tokens among the records' rows, from the ``[B, S_total]`` attention mask (with
    a KV cache it covers past tokens too: the rows are its last ones)."""
    if attention_mask is None or not records:
        return None
    rows = records[0].logits.shape[0] // attention_mask.shape[0]
    return attention_mask[:, -rows:].reshape(-1)


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
