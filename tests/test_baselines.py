"""LoRA and DoRA baselines through HF PEFT on the same projections, parameter budgets, the matching rank,
and ``loramix params``."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig

from loramix import LoramixError, MixLoraConfig
from loramix.training.methods import METHODS, MethodSpec, budget_table, build_model, lora_count_per_rank, \
    matching_rank, method_spec, trainable_and_total
from loramix.cli import main

from conftest import tiny_config, tiny_model

CFG = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)


def _adapted(hf_model):
    """Names of the projections that carry a LoRA (ours or PEFT's) inside the HF model."""
    return {name.split(".lora_A")[0].replace(".experts.", ".") for name, _ in hf_model.named_parameters()
            if ".lora_A" in name}


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
def test_baselines_adapt_the_same_projections_through_peft(model_type):
    config = MixLoraConfig(**CFG)
    mix = build_model(tiny_model(model_type), MethodSpec("mixlora", config))
    for method in ("lora", "dora"):
        peft_model = build_model(tiny_model(model_type), MethodSpec(method, config, lora_r=3))
        assert isinstance(peft_model, PeftModel)
        peft_config = peft_model.peft_config["default"]
        assert (peft_config.r, peft_config.lora_alpha, peft_config.use_dora) == (3, 8, method == "dora")
        assert _adapted(peft_model.base_model.model) == _adapted(mix.base_model)


def _hand_count(hf, method, r, experts=4):
    """LLaMA with GQA: q, o [D, D]; k, v [kv, D]; gate, up [I, D]; down [D, I]; routers [E, D]."""
    d, i, kv = hf.hidden_size, hf.intermediate_size, hf.num_key_value_heads * (hf.hidden_size // hf.num_attention_heads)
    attention = [(d, d), (d, kv), (d, kv), (d, d)]                  # (in, out)
    ffn = [(d, i), (d, i), (i, d)]
    dora = method.endswith("dora")
    lora = lambda shapes, copies: copies * sum(r * (a + b) + (b if dora else 0) for a, b in shapes)  # noqa: E731
    if method.startswith("mix"):
        per_layer = lora(attention, 1) + lora(ffn, experts) + experts * d
    else:
        per_layer = lora(attention + ffn, 1)
    return hf.num_hidden_layers * per_layer


@pytest.mark.parametrize("method", METHODS)
def test_trainable_counts_equal_a_hand_count(method):
    hf = tiny_config("llama")
    trainable, total = trainable_and_total(hf, MethodSpec(method, MixLoraConfig(**CFG), lora_r=5))
    assert trainable == _hand_count(hf, method, 4 if method.startswith("mix") else 5)
    base = sum(p.numel() for p in tiny_model("llama").parameters())
    assert total == base + trainable


def test_the_papers_llama2_7b_pairing():
    """MixLoRA r=16, 8 experts, all seven projections on LLaMA-2-7B shapes; the paper trains LoRA at r=80."""
    hf = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    config = MixLoraConfig(r=16, lora_alpha=32, num_experts=8, top_k=2)
    budget, _ = trainable_and_total(hf, MethodSpec("mixlora", config))
    assert budget == _hand_count(hf, "mixlora", 16, experts=8) == 203_423_744
    rank = matching_rank(hf, config, use_dora=False, budget=budget)
    lora = lambda r: _hand_count(hf, "lora", r)  # noqa: E731
    assert rank == 81 and lora(81) <= budget < lora(82)
    assert 0.98 < lora(80) / budget < 1.0          # the paper's round r=80: 98% of the MixLoRA budget


@pytest.mark.parametrize("model_type", ["phi", "phi3", "gpt2"])
def test_matching_rank_is_the_largest_within_the_budget(model_type):
    hf = tiny_config(model_type)
    config = MixLoraConfig(**CFG)
    for use_dora in (False, True):
        mixture = "mixdora" if use_dora else "mixlora"
        budget, _ = trainable_and_total(hf, MethodSpec(mixture, config))
        rank = matching_rank(hf, config, use_dora=use_dora, budget=budget)
        method = "dora" if use_dora else "lora"
        at_rank, _ = trainable_and_total(hf, MethodSpec(method, config, lora_r=rank))
        above, _ = trainable_and_total(hf, MethodSpec(method, config, lora_r=rank + 1))
        assert at_rank <= budget < above
        slope, offset = lora_count_per_rank(hf, config, use_dora=use_dora)
        assert at_rank == slope * rank + offset


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_baseline_trains_with_falling_loss_and_lora_r_match(method):
    spec = method_spec({**CFG, "method": method, "lora_r": "match"})
    model = build_model(tiny_model("llama"), spec)
    expected_rank = matching_rank(tiny_config("llama"), spec.config, use_dora=method == "dora")
    assert model.peft_config["default"].r == expected_rank
    model.train()
    ids = (torch.arange(4)[:, None] * 5 + torch.arange(12)[None] * 3) % 90 + 3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses


def test_method_defaults_follow_use_dora():
    assert method_spec({}).method == "mixlora"
    assert method_spec({"use_dora": True}).method == "mixdora"
    assert method_spec({"method": "dora", "use_dora": True}).use_dora


@pytest.mark.parametrize("adapter, message", [
    ({"method": "lorra"}, "unknown adapter.method 'lorra'; did you mean 'lora'?"),
    ({"lora_r": 0}, "adapter.lora_r must be a positive integer or 'match', got 0"),
    ({"lora_r": "best"}, "adapter.lora_r must be a positive integer or 'match'"),
    ({"num_expert": 2}, "adapter: unknown key 'num_expert'; did you mean 'num_experts'?"),
    ({"method": "mixlora", "use_dora": True}, "adapter.use_dora true contradicts method 'mixlora'"),
])
def test_bad_method_settings(adapter, message):
    with pytest.raises(LoramixError) as info:
        method_spec(adapter)
    assert message in str(info.value)


def test_params_command(tmp_path, stories_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  name_or_path: {stories_path}\nadapter:\n  r: 4\n  lora_alpha: 8\n  num_experts: 4\n")
    assert main(["params", str(path), "--json"]) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["lora"]["matches"] == "mixlora" and rows["dora"]["matches"] == "mixdora"
    assert rows["lora"]["trainable"] <= rows["mixlora"]["trainable"]
    hf = AutoConfig.from_pretrained(stories_path)
    assert rows == {row["method"]: row for row in budget_table(hf, method_spec({"r": 4, "lora_alpha": 8,
                                                                               "num_experts": 4}))}
    assert main(["params", str(path), "--set", "adapter.lora_r=2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["method", "rank", "trainable", "share", "note"]
    assert [line.split()[:2] for line in out.splitlines()[2:6]] == [["lora", "2"], ["dora", "2"], ["mixlora", "4"],
                                                                   ["mixdora", "4"]]
    assert "MixLoRA training memory per GPU" in out.splitlines()[7]  # then the memory table (test_quantized.py)
    assert main(["params", str(path), "--model", str(tmp_path / "gone")]) == 2
    assert "gone: no such model folder" in capsys.readouterr().err
    assert main(["params", str(path), "--model", str(tmp_path / "gone.gguf")]) == 2
    assert "gone.gguf: no such .gguf file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from helpers_cli import tiny_llama_dir, toy_classification

    root = tmp_path_factory.mktemp("methods")
    return tiny_llama_dir(root / "model"), toy_classification(root / "toy.jsonl")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_through_loramix_train_and_reloads(toy_run, tmp_path, method):
    """One flag, ``adapter.method``: same data, schedule and trainer; the saved adapter reloads for evaluation."""
    import yaml
    from helpers_cli import tiny_run_config

    from loramix.io.base_model import load_base_model
    from loramix.loading import attach_adapter
    from loramix.runconfig import ModelSpec, build_run_config
    from loramix.training.trainer import train

    model_dir, data = toy_run
    raw = tiny_run_config(model_dir, data, tmp_path / "run", max_steps=6, learning_rate=2e-2)
    raw["adapter"].update(method=method, lora_r="match")
    result = train(build_run_config(raw), echo=lambda _: None)
    log = [yaml.safe_load(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    written = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == ("MIXLORA" if method.startswith("mix") else "LORA")
    assert bool(written.get("use_dora")) == method.endswith("dora")
    model = attach_adapter(load_base_model(ModelSpec(name_or_path=str(model_dir))), result.adapter_dir)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 70, 80, 90]])).logits).all()
