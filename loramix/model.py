"""Inject MixLoRA into a Hugging Face causal LM; the MixLoraModel wrapper, its aux loss, save and load."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from peft import PeftModel
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
from .nn.quantized import keep_canonical_layouts, parameter_count
from .nn.routing import RoutingRecord, build_router

RoutingHook = Callable[[list[RoutingRecord]], list[RoutingRecord]]


ADAPTER_NAME = "default"  # PEFT's name for a model's single adapter
ROUTER_LOSS_CONFIG_KEYS = ("output_router_logits", "router_aux_loss_coef")  # set on the HF config for TRL


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


class MixLoraModel(PeftModel):
    """A frozen HF causal LM with MixLoRA injected; ``base_model`` is that HF model.

    Calling it returns a ``MoeCausalLMOutputWithPast`` whose ``loss`` is cross-entropy plus the router
    auxiliary loss (when labels are given) and whose ``aux_loss`` is the auxiliary loss alone.

    It is a ``peft.PeftModel`` by type only, because transformers' Trainer and TRL recognise adapter models
    by that class: they then save checkpoints with ``save_pretrained`` (the adapter only), resume them with
    ``load_adapter`` and patch TRL's fused LM head into ``get_base_model()`` (docs/trainers.md). None of
    PeftModel's own machinery (its constructor, tuners, adapter switching) is used. As in PEFT, an attribute
    the wrapper lacks is looked up on the HF model (``generation_config``, ``can_generate``,
    ``get_input_embeddings``, ``enable_input_require_grads``, ...).
    """

    def __init__(self, base_model: nn.Module, config: MixLoraConfig) -> None:
        nn.Module.__init__(self)  # not PeftModel.__init__: that one builds PEFT's own tuners
        self.family = family_for(base_model)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model.config, "name_or_path", None) or None
        for param in base_model.parameters():
            param.requires_grad_(False)
        keep_canonical_layouts(base_model)  # 4-bit bases: one forward function in train and eval mode
        _inject(base_model, config, self.family)
        _declare_router_loss(base_model.config, config)
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
    def active_adapter(self) -> str:
        """The one adapter's name, as PEFT names a single adapter (transformers' Trainer asks on resume)."""
        return ADAPTER_NAME

    @property
    def active_adapters(self) -> list[str]:
        return [ADAPTER_NAME]

    def get_base_model(self) -> nn.Module:
        """The HF model (with MixLoRA injected), as PEFT's ``get_base_model`` returns it."""
        return self.base_model

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
        total = sum(parameter_count(p) for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **options) -> None:
        """transformers' activation checkpointing, non-reentrant so router logits keep their graph.

        ``options`` (``every_n_layers``, ``offload``: what transformers' Trainer passes) go to the HF model."""
        enable_activation_checkpointing(self.base_model, activation_checkpointing_kwargs, **options)

    def activation_checkpointing_disable(self) -> None:
        if hasattr(self.base_model, "activation_checkpointing_disable"):
            self.base_model.activation_checkpointing_disable()
        else:
            self.base_model.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, num_items_in_batch: torch.Tensor | int | None = None,
                output_router_logits: bool | None = None, **kwargs) -> MoeCausalLMOutputWithPast:
        """``num_items_in_batch`` (transformers' Trainer passes it): the predicted tokens of the whole batch the
        optimizer step sees (all accumulated micro-batches, all processes). Cross-entropy is then summed and
        divided by it, and the router loss weighted by this micro-batch's share of those tokens, so that the
        micro-batches' losses add up to the batch's. ``output_router_logits`` is accepted as HF MoE models accept
        it; the router logits are always recorded (:meth:`router_logits`).

        With ``fused_lm_head=True`` (TRL's SFTTrainer, after patching its fused LM head into the HF model) the
        HF model's fused output (per-token log-probabilities, no logits) is returned, with ``aux_loss`` set.
        """
        fused = bool(kwargs.get("fused_lm_head"))
        if fused:  # else TRL's head computes a Mixtral router loss from the HF model's (absent) router logits
            kwargs["output_router_logits"] = False
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        with collect_routing() as records:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        token_mask = _token_mask(attention_mask, records)
        self.routing = [record.with_token_mask(token_mask) for record in records]
        aux = self.router_loss(self.routing)
        loss = out.loss
        if loss is not None and aux is not None:
            loss = loss + aux * _token_share(labels, num_items_in_batch)
        if fused:
            out.loss, out.aux_loss = loss, aux
            return out
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
    def save_pretrained(self, save_directory: str | os.PathLike, *, format: str = "loramix",
                        state_dict: dict[str, torch.Tensor] | None = None, is_main_process: bool = True) -> None:
        """Write ``adapter_config.json`` and the weights: ``adapter_model.safetensors`` (``format="loramix"``)
        or the reference layout ``adapter_model.bin`` (``format="moe-peft"``).

        As transformers' Trainer calls it: ``state_dict`` (this model's ``state_dict()``, which the Trainer
        gathers under FSDP or DeepSpeed) supplies the adapter tensors instead of the parameters, and
        ``is_main_process=False`` writes nothing.
        """
        if is_main_process:
            adapter_folder.save_adapter(self, os.fspath(save_directory), format=format, state_dict=state_dict)

    def load_adapter(self, adapter_path: str | os.PathLike, adapter_name: str = ADAPTER_NAME, *,
                     is_trainable: bool = False) -> None:
        """Copy the weights of a saved adapter of this same configuration (e.g. a Trainer checkpoint) into this
        model, as transformers' Trainer does on resume; ``is_trainable`` as in :meth:`from_pretrained`."""
        adapter_path = os.fspath(adapter_path)
        if adapter_name != ADAPTER_NAME:
            raise LoramixError(f"a MixLoraModel holds one adapter, {ADAPTER_NAME!r}; "
                               f"got adapter_name {adapter_name!r}")
        adapter_folder.check_same_config(adapter_path, self)
        adapter_folder.load_adapter_weights(self, adapter_path)
        self._set_trainable(is_trainable)

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
        model._set_trainable(is_trainable)
        return model

    def _set_trainable(self, trainable: bool) -> None:
        for _, param in self.trainable_parameters():
            param.requires_grad_(trainable)
        self.train(trainable)


def _declare_router_loss(hf_config, config: MixLoraConfig) -> None:
    """Mark the HF config as an MoE's, as TRL's SFTTrainer reads one: with ``output_router_logits`` declared it
    adds ``router_aux_loss_coef * output.aux_loss`` to its loss (and logs ``aux_loss``). Our ``aux_loss``
    already carries MixLoRA's coefficients, hence 1 (0: the router loss is off)."""
    for key, value in zip(ROUTER_LOSS_CONFIG_KEYS, (False, 1.0 if config.router_loss else 0.0)):
        setattr(hf_config, key, value)


def _token_share(labels: torch.Tensor | None, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float:
    """This micro-batch's predicted tokens (labels ``[B, S]`` shift left by one; -100: no loss) over
    ``num_items_in_batch``; 1 without."""
    if labels is None or num_items_in_batch is None:
        return 1.0
    return (labels[:, 1:] != -100).sum() / num_items_in_batch


def _token_mask(attention_mask: torch.Tensor | None, records: list[RoutingRecord]) -> torch.Tensor | None:
    """``[T]``: 1 for the real tokens among the records' rows, from the ``[B, S_total]`` attention mask (with
    a KV cache it covers past tokens too: the rows are its last ones)."""
    if attention_mask is None or not records:
        return None
    rows = records[0].logits.shape[0] // attention_mask.shape[0]
    return attention_mask[:, -rows:].reshape(-1)


def enable_activation_checkpointing(hf_model: nn.Module, kwargs: dict | None = None, **options) -> None:
    """transformers' activation checkpointing on ``hf_model``, non-reentrant unless ``kwargs`` say otherwise;
    ``options`` go to transformers' method."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)


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
