"""Shared fixtures: tiny random models of every family, and the real models/data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loramix.families import FAMILIES

SHARED = Path(os.environ.get("LORAMIX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STORIES = SHARED / "models" / "stories260K"

ALL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2", "olmo2")
VOCAB = 96


def tiny_config(model_type: str, **overrides):
    """A 2-layer, hidden-32 config of ``model_type`` (special token ids inside the vocabulary)."""
    if model_type == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=128,
                  bos_token_id=1, eos_token_id=2)
    else:
        kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if model_type == "qwen2":
            kw["use_sliding_window"] = False
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny ``model_type`` causal LM in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).to(dtype)
    return model.eval()


def hf_mlp(model_type: str = "llama", *, seed: int = 0, layer: int = 0):
    """Layer ``layer``'s MLP of the plain ``tiny_model(model_type, seed=seed)``: transformers' own module, with
    the same weights as an adapted copy's frozen FFN (an independent reference for it)."""
    family = FAMILIES[model_type]
    return tiny_model(model_type, seed=seed).get_submodule(f"{family.layers}.{layer}.{family.mlp}")


def batch(seed: int = 0, rows: int = 3, length: int = 9, pad_rows: int = 1):
    """``(input_ids, attention_mask)`` with the first ``pad_rows`` rows left-padded by 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[:pad_rows, :3] = 0
    ids[:pad_rows, :3] = 0
    return ids, mask


def randomize_adapter(model, *, seed: int = 0, std: float = 0.1) -> None:
    """Give every lora_B (zero at init) and the routers random values, so deltas and routing matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.trainable_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=g) * (std if "lora_B" in name else 1.0))


def copy_into_peft(model, peft_model, *, expert: int = 0) -> None:
    """Our LoRA weights and DoRA magnitudes (expert ``expert`` for experts) into PEFT's modules of the same
    projections."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, param in model.trainable_parameters():
            if "router" in name:
                continue
            path, kind = name.rsplit(".", 1)
            module = inner.get_submodule(path.replace(".experts.", "."))
            value = param[expert] if ".experts." in name else param
            if kind == "lora_magnitude":
                module.lora_magnitude_vector["default"].weight.copy_(value)
            else:
                getattr(module, kind)["default"].weight.copy_(value)


def run_dispatch(model, dispatch: str, **inputs):
    """A forward and backward with every MoE layer on ``dispatch``: ``(output, {name: grad})``."""
    model.set_dispatch(dispatch)
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.trainable_parameters()}


def reference_package_logits(adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the reference ``mixlora`` package (skips when absent) for our moe-peft export in ``adapter_dir``."""
    mixlora = pytest.importorskip("mixlora", reason="the reference `mixlora` package is not installed")
    reference, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
    reference.eval()
    for layer in reference.model.layers:  # its expert LoRAs live in plain dicts whose dropout is never off
        for expert in layer.mlp.mixlora_moes["default"].experts_.values():
            expert.dropout_.eval()
    with torch.no_grad():
        return reference(input_ids=ids).logits


@pytest.fixture
def stories_path() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"real model not found at {STORIES} (the ../shared folder is absent)")
    return STORIES
