"""Adapter files: round trips in both formats, the reference `mixlora` package, and every bad-file error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix
from loramix import LoramixError, MixLoraConfig, MixLoraModel

from conftest import batch, randomize_adapter, reference_package_logits, tiny_model

CFG = dict(r=4, lora_alpha=8, lora_dropout=0.05, num_experts=4, top_k=2)


def trained(model_type="llama", seed=0, **cfg):
    model = loramix.get_mixlora_model(tiny_model(model_type, seed=seed), MixLoraConfig(**{**CFG, **cfg}))
    randomize_adapter(model, seed=seed)
    return model.eval()


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2", "gemma2"])
@pytest.mark.parametrize("fmt", ["loramix", "moe-peft"])
def test_round_trip_gives_bit_identical_logits(tmp_path, model_type, fmt):
    model = trained(model_type, expert_lora={"r": 2, "lora_alpha": 6})
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path, format=fmt)
    loaded = MixLoraModel.from_pretrained(tiny_model(model_type), tmp_path)
    assert not loaded.training
    assert all(not p.requires_grad for _, p in loaded.trainable_parameters())
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    trainable = MixLoraModel.from_pretrained(tiny_model(model_type), tmp_path, is_trainable=True)
    assert trainable.training and all(p.requires_grad for _, p in trainable.trainable_parameters())


def test_reference_layout_keys_shapes_and_config(tmp_path):
    model = trained("llama")
    model.save_pretrained(tmp_path, format="moe-peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    keys = list(state)
    assert keys[0] == "mixlora.layers.0.mlp.moe_gate.weight"
    assert keys[1:3] == ["mixlora.layers.0.self_attn.q_proj.lora_A.weight",
                         "mixlora.layers.0.self_attn.q_proj.lora_B.weight"]
    assert keys[9] == "mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight"
    assert keys[9 + 8] == "mixlora.layers.0.mlp.down_proj.experts.0.lora_A.weight"  # gate, down, up order
    assert state["mixlora.layers.1.mlp.moe_gate.weight"].shape == (4, 32)
    assert state["mixlora.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    assert state["mixlora.layers.1.mlp.down_proj.experts.3.lora_A.weight"].shape == (4, 48)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert len(keys) == 2 * (1 + 4 * 2 + 3 * 4 * 2)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(config)[:4] == ["bias", "peft_type", "r", "lora_alpha"]
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert (config["routing_strategy"], config["act_fn"], config["top_k"], config["task_type"]) == \
        ("mixlora", "silu", 2, "CAUSAL_LM")
    assert isinstance(config["lora_alpha"], int)


def test_the_reference_mixlora_package_loads_our_export(tmp_path, stories_path):
    from transformers import AutoModelForCausalLM

    model = loramix.get_mixlora_model(AutoModelForCausalLM.from_pretrained(stories_path), MixLoraConfig(**CFG))
    randomize_adapter(model, std=0.05)
    model.eval()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, format="moe-peft")
    torch.testing.assert_close(reference_package_logits(tmp_path, ids), expected, rtol=1e-4, atol=1e-5)


def test_model_for_causal_lm_loads_the_base_from_the_adapter_config(tmp_path, stories_path):
    from transformers import AutoModelForCausalLM

    model = loramix.get_mixlora_model(AutoModelForCausalLM.from_pretrained(stories_path), MixLoraConfig(**CFG))
    assert model.mixlora_config.base_model_name_or_path == str(stories_path)
    randomize_adapter(model)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded, config = loramix.MixLoraModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert config.num_experts == 4
    ids = torch.randint(3, 512, (1, 10))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# ---- bad files ------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    trained("llama").save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt", "model_type": "llama", "num_hidden_layers": "2"})


def _load(path, model_type="llama", **overrides):
    return MixLoraModel.from_pretrained(tiny_model(model_type, **overrides), path)


def test_missing_key(saved):
    _rewrite(saved / "adapter_model.safetensors", lambda t: t.pop("model.layers.1.mlp.experts.up_proj.lora_B"))
    with pytest.raises(LoramixError, match=r"adapter_model.safetensors: missing key 'model.layers.1.mlp.experts.up_proj.lora_B'"):
        _load(saved)


def test_extra_key(saved):
    _rewrite(saved / "adapter_model.safetensors", lambda t: t.update({"model.layers.0.mlp.extra": torch.zeros(2)}))
    with pytest.raises(LoramixError, match=r"unexpected key 'model.layers.0.mlp.extra'"):
        _load(saved)


def test_wrong_shape(saved):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(3, 32)
    _rewrite(saved / "adapter_model.safetensors", shrink)
    with pytest.raises(LoramixError, match=r"key 'model.layers.0.self_attn.q_proj.lora_A' has shape \(3, 32\), expected \(4, 32\)"):
        _load(saved)


def test_truncated_safetensors(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LoramixError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        _load(saved)


def test_corrupt_reference_bin(tmp_path):
    trained("llama").save_pretrained(tmp_path, format="moe-peft")
    (tmp_path / "adapter_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(LoramixError, match=r"adapter_model.bin: not a readable torch weights file"):
        _load(tmp_path)


def test_reference_bin_missing_and_misshapen_keys(tmp_path):
    trained("llama").save_pretrained(tmp_path, format="moe-peft")
    path = tmp_path / "adapter_model.bin"
    state = torch.load(path, weights_only=True)
    del state["mixlora.layers.1.mlp.up_proj.experts.2.lora_A.weight"]
    torch.save(state, path)
    with pytest.raises(LoramixError, match=r"missing key 'mixlora.layers.1.mlp.up_proj.experts.2.lora_A.weight'"):
        _load(tmp_path)
    state["mixlora.layers.1.mlp.up_proj.experts.2.lora_A.weight"] = torch.zeros(4, 33)
    torch.save(state, path)
    with pytest.raises(LoramixError, match=r"has shape \(4, 33\), expected \(4, 32\)"):
        _load(tmp_path)


def test_other_family_layer_count_and_hidden_size(saved):
    with pytest.raises(LoramixError, match=r"trained on model_type 'llama', the base model is 'mistral'"):
        _load(saved, "mistral")
    with pytest.raises(LoramixError, match=r"adapter has 2 layers, the base model has 3"):
        _load(saved, num_hidden_layers=3)
    with pytest.raises(LoramixError, match=r"key 'model.layers.0.self_attn.q_proj.lora_A' has shape \(4, 32\), expected \(4, 64\)"):
        _load(saved, hidden_size=64)


def test_missing_files(tmp_path):
    with pytest.raises(LoramixError, match="adapter folder not found"):
        _load(tmp_path / "nowhere")
    MixLoraConfig(**CFG).to_json_file(tmp_path / "adapter_config.json")
    with pytest.raises(LoramixError, match=r"no adapter weights \(adapter_model.safetensors or adapter_model.bin\)"):
        _load(tmp_path)


def test_unknown_save_format(tmp_path):
    with pytest.raises(LoramixError, match="unknown adapter format 'gguf'"):
        trained("llama").save_pretrained(tmp_path, format="gguf")
