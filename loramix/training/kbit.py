"""Training on a base loaded in 4-bit or 8-bit: what PEFT's ``prepare_model_for_kbit_training`` does, for MixLoRA.

PEFT's function freezes the model, casts every fp16 and bf16 parameter that is not quantised to fp32 and turns
on gradient checkpointing with gradients on the input embeddings' output. Here:

- nothing to freeze: ``get_mixlora_model`` (and PEFT) already freeze the base;
- fp16 parameters that are not quantised (norms, embeddings, LM head, biases) become fp32: fp16's range
  overflows in the norms and the logits and its 10-bit mantissa loses small updates. bf16 ones stay: bf16
  has fp32's range, transformers' norms compute in fp32 anyway and the loss upcasts the logits, and an fp32
  norm weight would turn every activation after it into fp32 (twice the activation memory) for no gain;
- gradient checkpointing, non-reentrant by default, and gradients on the input embeddings' output, which
  reentrant checkpointing needs to build any graph (the non-reentrant kind does not). The reentrant kind
  also runs the layers under no_grad, so the router loss cannot reach the routers through it: keep the
  default;
- the 4-bit layers kept in bitsandbytes' canonical packing (nn/quantized.py), as get_mixlora_model does,
  for PEFT baselines too.

The run config does the same for a quantised ``model`` (``train.gradient_checkpointing`` on unless set false).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import MixLoraModel, enable_activation_checkpointing
from ..nn.quantized import keep_canonical_layouts


def prepare_model_for_kbit_training(model: nn.Module, *, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Prepare a quantised HF causal LM, or a MixLoRA / PEFT model on one, for training; returns ``model``.

    Call it before or after ``get_mixlora_model`` (it freezes nothing and leaves the adapter as it is).
    ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint`` (default ``use_reentrant=False``).
    """
    hf_model = model.base_model if isinstance(model, MixLoraModel) else model
    keep_canonical_layouts(hf_model)
    for param in hf_model.parameters():
        if param.dtype == torch.float16:
            param.data = param.data.float()
    if use_gradient_checkpointing:
        enable_activation_checkpointing(hf_model, gradient_checkpointing_kwargs)
        if not getattr(hf_model, "_require_grads_hooks", None):  # transformers >= 5.2x adds the hook itself
            hf_model.enable_input_require_grads()
    return model
