"""MixLoraConfig: defaults, validation messages, JSON round trip, reading the reference's config."""

import json

import pytest

from loramix import LoramixError, MixLoraConfig


def test_defaults_match_the_paper_and_reference():
    cfg = MixLoraConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.router_init_range, cfg.jitter_noise) == (8, 2, 0.02, 0.0)
    assert cfg.router_aux_loss_coef == 0.001 and cfg.router_loss is True
    assert cfg.init_lora_weights == "original" and cfg.target_modules is None


def test_json_round_trip(tmp_path):
    cfg = MixLoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, num_experts=6, top_k=3, use_rslora=True,
                        init_lora_weights="gaussian", expert_lora={"r": 2, "lora_alpha": 4},
                        target_modules=["q_proj", "up_proj"], act_fn="gelu")
    path = tmp_path / "adapter_config.json"
    cfg.to_json_file(path)
    assert MixLoraConfig.from_json_file(tmp_path) == cfg


def test_scaling_plain_rslora_and_expert_override():
    assert MixLoraConfig(r=16, lora_alpha=32).scaling(expert=False) == 2.0
    assert MixLoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling(expert=False) == 8.0
    cfg = MixLoraConfig(r=16, lora_alpha=32, expert_lora={"r": 8, "lora_alpha": 32})
    assert cfg.scaling(expert=True) == 4.0 and cfg.expert_value("r") == 8 and cfg.expert_value("lora_dropout") == 0.05


@pytest.mark.parametrize("data, message", [
    ({"num_expert": 4}, "config: unknown key 'num_expert'; did you mean 'num_experts'?"),
    ({"r": "16"}, "'r' must be an integer, got '16'"),
    ({"r": 0}, "'r' must be >= 1, got 0"),
    ({"lora_dropout": 1.0}, "'lora_dropout' must be < 1"),
    ({"top_k": 3, "num_experts": 2}, "'top_k' (3) must not exceed 'num_experts' (2)"),
    ({"init_lora_weights": "kaiming"}, "'init_lora_weights' must be one of ['original', 'gaussian']"),
    ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
    ({"expert_lora": {"lora_alhpa": 4}}, "unknown expert_lora key 'lora_alhpa'; did you mean 'lora_alpha'?"),
    ({"expert_lora": {"rank": 4}}, "unknown expert_lora key 'rank'; allowed: r, lora_alpha, lora_dropout"),
    ({"expert_lora": {"r": -1}}, "'expert_lora.r' must be >= 1"),
    ({"act_fn": "sillu"}, "unknown act_fn value 'sillu'; did you mean 'silu'?"),
    ({"target_modules": "q_proj"}, "'target_modules' must be a list"),
    ({"routing_strategy": "mixlora-unknown"}, "routing_strategy 'mixlora-unknown' is not supported"),
    ({"peft_type": "LORA"}, "peft_type 'LORA' is not a MixLoRA adapter"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(LoramixError) as info:
        MixLoraConfig.from_dict(data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_reads_the_reference_config(tmp_path):
    reference = {"bias": "none", "peft_type": "MIXLORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
                 "expert_lora": {"bias": "none", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
                 "routing_strategy": "mixlora", "num_experts": 8, "act_fn": "silu", "top_k": 2,
                 "lora_init": "gaussian", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
                 "task_type": "CAUSAL_LM"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(reference))
    cfg = MixLoraConfig.from_json_file(tmp_path)
    assert (cfg.r, cfg.lora_alpha, cfg.num_experts, cfg.top_k, cfg.act_fn) == (16, 32, 8, 2, "silu")
    assert cfg.expert_lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
    assert cfg.init_lora_weights == "gaussian"
    assert cfg.base_model_name_or_path == "meta-llama/Llama-2-7b-hf"
    assert cfg.router_aux_loss_coef == 0.001  # not exported by the reference: its default


def test_bad_config_files(tmp_path):
    with pytest.raises(LoramixError, match="adapter config not found"):
        MixLoraConfig.from_json_file(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4,\n "top_k": }')
    with pytest.raises(LoramixError, match=r"adapter_config.json: invalid JSON at line 2"):
        MixLoraConfig.from_json_file(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "num_experts": 2, "top_k": 4}')
    with pytest.raises(LoramixError, match=r"adapter_config.json: config field 'top_k' \(4\) must not exceed"):
        MixLoraConfig.from_json_file(tmp_path)
