"""DoRA (attention) and MixDoRA (experts): equal to HF PEFT's DoRA, trained, saved, reloaded, read by the reference."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

import loramix
from loramix import LoramixError, MixLoraConfig

from conftest import batch, copy_into_peft, hf_mlp, randomize_adapter, reference_package_logits, tiny_model

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "phi": ["q_proj", "k_proj", "v_proj", "dense"],
             "phi3": ["qkv_proj", "o_proj"], "gpt2": ["c_attn"]}


def mixdora(model_type="llama", *, seed=0, **cfg):
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2, use_dora=True)
    return loramix.get_mixlora_model(tiny_model(model_type, seed=seed), MixLoraConfig(**{**defaults, **cfg}))


def randomize_magnitudes(model, *, seed=1):
    """Move every DoRA magnitude away from ``||W + sBA||`` so that it matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.trainable_parameters():
            if name.endswith("lora_magnitude"):
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=g))


def peft_dora(model_type, targets):
    return get_peft_model(tiny_model(model_type), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_dora=True,
        fan_in_fan_out=model_type == "gpt2"))


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
def test_attention_dora_equals_peft_dora_forward_and_gradients(model_type):
    model = mixdora(model_type, target_modules=ATTENTION[model_type])
    randomize_adapter(model)
    randomize_magnitudes(model)
    peft_model = peft_dora(model_type, ATTENTION[model_type])
    copy_into_peft(model, peft_model)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    (ours.loss - ours.aux_loss).backward()
    theirs.loss.backward()
    inner = peft_model.base_model.model
    for name, param in model.trainable_parameters():
        if "router" in name:
            continue
        path, kind = name.rsplit(".", 1)
        module = inner.get_submodule(path)
        other = module.lora_magnitude_vector["default"].weight if kind == "lora_magnitude" else \
            getattr(module, kind)["default"].weight
        torch.testing.assert_close(param.grad, other.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
def test_one_dora_expert_top1_equals_peft_dora_on_every_projection(model_type):
    model = mixdora(model_type, num_experts=1, top_k=1).eval()
    randomize_adapter(model)
    randomize_magnitudes(model)
    targets = list(dict.fromkeys(model.family.all_projections))
    peft_model = peft_dora(model_type, targets).eval()
    copy_into_peft(model, peft_model)
    ids, mask = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               peft_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
def test_mixdora_layer_equals_a_weighted_sum_of_peft_dora_mlps(model_type):
    """Several experts: each expert is the HF MLP with PEFT's DoRA on its projections; top-2, renormalised."""
    model = mixdora(model_type, num_experts=3, top_k=2).eval()
    randomize_adapter(model)
    randomize_magnitudes(model)
    ffn = model.moe_layers()[0]
    targets = list(ffn.experts)
    x = torch.randn(2, 7, ffn.router.weight.shape[1], generator=torch.Generator().manual_seed(3))
    mlps = []
    for e in range(3):
        mlp = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                 use_dora=True, fan_in_fan_out=model_type == "gpt2"),
                                      hf_mlp(model_type)).eval()
        with torch.no_grad():
            for name, lora in ffn.experts.items():
                module = getattr(mlp, name)
                module.lora_A["default"].weight.copy_(lora.lora_A[e])
                module.lora_B["default"].weight.copy_(lora.lora_B[e])
                module.lora_magnitude_vector["default"].weight.copy_(lora.lora_magnitude[e])
        mlps.append(mlp)
    probs = torch.softmax(x.reshape(-1, x.shape[-1]) @ ffn.router.weight.T, dim=-1)
    expected = []
    for t, row in enumerate(probs):
        top = row.topk(2).indices.tolist()
        token = x.reshape(-1, x.shape[-1])[t:t + 1]
        expected.append(sum(row[e] / row[top].sum() * mlps[e](token) for e in top))
    with torch.no_grad():
        got = ffn(x)
    torch.testing.assert_close(got.reshape(-1, x.shape[-1]), torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_fresh_dora_is_the_base_model_and_magnitudes_start_at_row_norms():
    base = tiny_model("phi")
    ids, mask = batch()
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = loramix.get_mixlora_model(base, MixLoraConfig(r=4, num_experts=3, top_k=2, use_dora=True)).eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)
    q = base.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_magnitude, q.base_layer.weight.norm(dim=1))
    fc1 = model.moe_layers()[0].experts["fc1"]
    assert fc1.lora_magnitude.shape == (3, fc1.lora_B.shape[1])
    torch.testing.assert_close(fc1.lora_magnitude, model.moe_layers()[0].base_ffn.fc1.weight.norm(dim=1).expand(3, -1))


def test_magnitudes_are_trained_and_expert_lora_can_limit_dora_to_the_experts():
    model = mixdora("llama", use_dora=False, expert_lora={"use_dora": True})
    names = [n for n, _ in model.trainable_parameters() if n.endswith("lora_magnitude")]
    assert names and all(".mlp.experts." in n for n in names)
    randomize_adapter(model)
    ids, _ = batch(pad_rows=0)
    before = {n: p.detach().clone() for n, p in model.trainable_parameters() if n in names}
    optimizer = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=0.5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in model.trainable_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), name


@pytest.mark.parametrize("model_type", ["llama", "phi"])
def test_save_and_reload_reproduce_the_logits_exactly(tmp_path, model_type):
    model = mixdora(model_type, expert_lora={"r": 2, "lora_alpha": 6, "use_rslora": True})
    randomize_adapter(model)
    randomize_magnitudes(model)
    model.eval()
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = loramix.MixLoraModel.from_pretrained(tiny_model(model_type), tmp_path)
    assert loaded.mixlora_config.expert_lora == {"r": 2, "lora_alpha": 6, "use_rslora": True}
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_moe_peft_format_refuses_trained_magnitudes(tmp_path):
    model = mixdora("llama")
    randomize_adapter(model)
    randomize_magnitudes(model)
    with pytest.raises(LoramixError, match=r"lora_magnitude: a trained DoRA magnitude cannot be written in the "
                                           r"moe-peft format .* use format='loramix'"):
        model.save_pretrained(tmp_path, format="moe-peft")
    assert not (tmp_path / "adapter_model.bin").exists()


def _reference_style_dora(model):
    """What the reference has after loading its own DoRA file: magnitudes equal ||W + sBA||."""
    from loramix.io.moe_peft import dora_magnitudes as _dora_magnitudes

    with torch.no_grad():
        for _, magnitude, norms in _dora_magnitudes(model):
            magnitude.copy_(norms)


def test_a_reference_dora_file_loads_as_the_reference_runs_it(tmp_path):
    """The reference recomputes m = ||W + sBA|| on load, so its DoRA file acts as LoRA with the same A, B."""
    model = mixdora("llama")
    randomize_adapter(model)
    _reference_style_dora(model)
    model.save_pretrained(tmp_path, format="moe-peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and list(config)[0] == "use_dora"
    loaded = loramix.MixLoraModel.from_pretrained(tiny_model("llama"), tmp_path)
    plain = loramix.get_mixlora_model(tiny_model("llama"), MixLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2))
    with torch.no_grad():
        weights = dict(model.trainable_parameters())
        for name, param in plain.trainable_parameters():
            param.copy_(weights[name])
    plain.eval()
    ids, mask = batch()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_the_reference_mixlora_package_runs_our_dora_export(tmp_path, stories_path):
    from transformers import AutoModelForCausalLM

    model = loramix.get_mixlora_model(AutoModelForCausalLM.from_pretrained(stories_path), MixLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, num_experts=4, top_k=2, use_dora=True))
    randomize_adapter(model, std=0.05)
    _reference_style_dora(model)
    model.eval()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, format="moe-peft")
    torch.testing.assert_close(reference_package_logits(tmp_path, ids), expected, rtol=1e-4, atol=1e-5)
