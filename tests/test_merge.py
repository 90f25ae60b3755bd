"""Folding LoRAs into base weights: the formula against HF PEFT, and merged checkpoints against the MixLoRA model."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

import loramix
from loramix import LoramixError, MixLoraModel
from loramix.commands import merge as merge_command
from loramix.convert.fold import merged_weight
from loramix.convert.merge import merge_adapter

from conftest import batch, tiny_model
from helpers_export import assert_tokenizer_loads_as_declared, mixlora, run_command, saved_base_and_adapter


def logits(model, seed=0):
    ids, mask = batch(seed=seed, length=10)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_weight_equals_peft_merge(use_dora):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(12, 10))
    peft_model = get_peft_model(layer, LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_dora=use_dora,
                                                  init_lora_weights=False))
    lora = peft_model.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
        if use_dora:
            lora.lora_magnitude_vector["default"].weight.mul_(torch.rand(10) + 0.5)
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    magnitude = lora.lora_magnitude_vector["default"].weight if use_dora else None
    ours = merged_weight(lora.base_layer.weight, A, B, scaling=5 / 3, magnitude=magnitude)
    peft_model.merge_adapter()
    torch.testing.assert_close(ours, lora.base_layer.weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi", "phi3", "gpt2"])
def test_single_expert_adapter_merges_into_the_base_architecture(tmp_path, model_type):
    """gated, plain (with biases), fused gate_up and GPT-2 Conv1D FFNs alike."""
    model = mixlora(model_type, num_experts=1, top_k=1)
    summary = merge_adapter(model, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(dense) is type(tiny_model(model_type))
    assert summary.num_params == sum(p.numel() for p in dense.parameters())
    assert (logits(model) - logits(dense)).abs().max().item() <= 1e-4
    # The MoE's router-loss declaration for TRL (MixLoraModel sets it on the HF config) is not the dense model's.
    written = json.loads((tmp_path / "config.json").read_text())
    assert not {"output_router_logits", "router_aux_loss_coef"} & written.keys()


def test_adapter_without_expert_loras_merges_fully(tmp_path):
    """With no FFN targets every expert is the base FFN, so the routing does not matter."""
    model = mixlora("mistral", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    merge_adapter(model, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(model) - logits(dense)).abs().max().item() <= 1e-4


def test_dora_single_expert_merge(tmp_path):
    model = mixlora("llama", num_experts=1, top_k=1, use_dora=True)
    with torch.no_grad():
        for name, param in model.trainable_parameters():
            if "lora_magnitude" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(3)))
    merge_adapter(model, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(model) - logits(dense)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("use_dora", [False, True])
def test_attention_only_merge_keeps_the_experts_as_an_adapter(tmp_path, use_dora):
    model = mixlora("qwen2", use_dora=use_dora)
    want = logits(model)
    summary = merge_adapter(model, tmp_path, what="attention")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    assert adapter_config["base_model_name_or_path"] == str(tmp_path) == summary.path
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(dense) - logits(tiny_model("qwen2"))).abs().max().item() > 1e-2  # attention changed
    reloaded, _ = loramix.MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(reloaded, MixLoraModel)
    assert (want - logits(reloaded)).abs().max().item() <= 1e-4


def test_single_expert_top_p_adapter_merges_fully(tmp_path):
    model = mixlora("llama", num_experts=1, routing="top_p", top_k=None, top_p=0.5)
    merge_adapter(model, tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(model) - logits(dense)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cfg, message", [
    ({}, "4 different experts"),
    ({"target_modules": ["q_proj"], "routing": "switch", "top_k": 1}, "switch routing"),
    ({"target_modules": ["q_proj"], "routing": "top_p", "top_k": None, "top_p": 0.5}, "top-p routing"),
])
def test_refuses_a_full_merge_no_dense_model_equals(tmp_path, cfg, message):
    with pytest.raises(LoramixError, match=message):
        merge_adapter(mixlora("llama", **cfg), tmp_path)


def test_refuses_a_full_merge_of_different_experts(tmp_path):
    with pytest.raises(LoramixError, match="--attention-only"):
        merge_adapter(mixlora("llama"), tmp_path)
    with pytest.raises(LoramixError, match="no expert LoRAs"):
        merge_adapter(mixlora("llama", target_modules=["q_proj"]), tmp_path, what="attention")


def test_merge_command(tmp_path, capsys):
    base_dir, adapter_dir, model = saved_base_and_adapter(tmp_path)
    assert run_command(merge_command, ["merge", "--model", str(base_dir), "--adapter", str(adapter_dir),
                                       "--attention-only", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "merged the attention LoRAs" in printed and "tokenizer.json" in printed
    assert_tokenizer_loads_as_declared(tmp_path / "merged", base_dir)
    reloaded, _ = loramix.MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "adapter"))
    assert (logits(model) - logits(reloaded)).abs().max().item() <= 1e-4
