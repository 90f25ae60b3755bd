"""MixLoraModel against independent references: the base model, HF PEFT, the formula, a hand computation."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loramix
from loramix import LoramixError, MixLoraConfig
from loramix.nn.routing import TopKRouter, load_balancing_loss

from conftest import ALL_FAMILIES, batch, copy_into_peft, randomize_adapter, run_dispatch, tiny_model


def mixlora(model_type="llama", *, seed=0, **cfg):
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)
    return loramix.get_mixlora_model(tiny_model(model_type, seed=seed), MixLoraConfig(**{**defaults, **cfg}))


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_zero_B_gives_the_base_model_logits(model_type):
    base = tiny_model(model_type)
    ids, mask = batch()
    expected = base(input_ids=ids, attention_mask=mask).logits
    model = loramix.get_mixlora_model(base, MixLoraConfig(r=4, num_experts=4, top_k=2)).eval()
    got = model(input_ids=ids, attention_mask=mask).logits
    # The fast path computes W2 (sum_e w_e a) with sum_e w_e = 1: equal up to float rounding.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_unsupported_model_type_lists_the_supported_ones():
    model = tiny_model("llama")
    model.config.model_type = "falcon"
    with pytest.raises(LoramixError, match=r"model_type 'falcon' is not supported; supported: gemma, gemma2, gpt2, llama"):
        loramix.get_mixlora_model(model, MixLoraConfig())


def test_unknown_target_module_names_the_available_ones():
    with pytest.raises(LoramixError, match=r"target_modules: 'gate_prj' is not a projection of this model; did you mean 'gate_proj'"):
        mixlora("llama", target_modules=["q_proj", "gate_prj"])


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_one_expert_top1_equals_peft_lora_on_the_same_weights(model_type, rslora):
    reference_base = tiny_model(model_type)
    model = mixlora(model_type, num_experts=1, top_k=1, use_rslora=rslora).eval()
    randomize_adapter(model)
    family = model.family
    targets = list(dict.fromkeys(family.all_projections))
    peft_model = get_peft_model(reference_base, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=rslora,
        fan_in_fan_out=model_type == "gpt2")).eval()
    copy_into_peft(model, peft_model)
    ids, mask = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               peft_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_attention_lora_equals_peft_lora():
    reference_base = tiny_model("qwen3")
    model = mixlora("qwen3", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16).eval()
    randomize_adapter(model)
    peft_model = get_peft_model(reference_base, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).eval()
    copy_into_peft(model, peft_model)
    ids, mask = batch()
    # No FFN projection targeted: every expert is the base FFN, so only the attention LoRAs differ from the base.
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               peft_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
@pytest.mark.parametrize("experts, top_k", [(4, 2), (3, 1), (5, 5)])
def test_grouped_dispatch_equals_the_per_expert_reference(model_type, experts, top_k):
    model = mixlora(model_type, num_experts=experts, top_k=top_k)
    randomize_adapter(model)
    ids, mask = batch(pad_rows=2)
    labels = ids.masked_fill(mask == 0, -100)

    fast, fast_grads = run_dispatch(model, "grouped", input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_grads = run_dispatch(model, "per_expert", input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_aux_loss_equals_a_hand_computation():
    # 2 layers, 3 tokens (the last is padding), 3 experts, top-2.
    layer0 = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    layer1 = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.5, 0.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([1, 1, 0])
    rows = [r for layer in (layer0, layer1) for r, m in zip(layer, mask) if m]
    probs = [torch.softmax(r, 0).tolist() for r in rows]
    chosen = [sorted(range(3), key=lambda e: -p[e])[:2] for p in probs]
    fraction = [sum(e in c for c in chosen) / len(rows) for e in range(3)]
    mean_prob = [sum(p[e] for p in probs) / len(rows) for e in range(3)]
    expected = 3 * sum(f * p for f, p in zip(fraction, mean_prob))
    router = TopKRouter(3, 3, top_k=2, init_range=0.02)
    got = load_balancing_loss([router.route(z).with_token_mask(mask) for z in (layer0, layer1)])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    balanced = load_balancing_loss([TopKRouter(4, 4, top_k=2, init_range=0.02).route(torch.zeros(4, 4))])
    assert balanced.item() == pytest.approx(2.0)  # == top_k when perfectly balanced


def test_loss_is_cross_entropy_plus_aux():
    model = mixlora("llama", router_aux_loss_coef=0.5)
    randomize_adapter(model)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    plain = model.base_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert out.aux_loss.item() > 0.5  # coef 0.5 * (>= 1 for top-2 of 4)
    torch.testing.assert_close(out.loss, plain + out.aux_loss)
    model.mixlora_config.router_loss = False
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is None
    torch.testing.assert_close(out.loss, plain)


def test_gradients_reach_every_adapter_tensor_and_no_base_weight():
    model = mixlora("llama")
    randomize_adapter(model)
    ids, mask = batch()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    adapter = dict(model.trainable_parameters())
    assert adapter and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.values())
    for name, param in model.base_model.named_parameters():
        if name not in adapter:
            assert not param.requires_grad and param.grad is None, name
    kinds = {n.rsplit(".", 1)[-1] for n in adapter} | {"router" for n in adapter if ".router." in n}
    assert {"lora_A", "lora_B", "router"} <= kinds


def test_trainable_parameter_count():
    model = mixlora("llama", r=4, num_experts=4)
    trainable, total = model.get_nb_trainable_parameters()
    d, i, kv, layers = 32, 48, 16, 2
    attention = 2 * 4 * (d + d) + 2 * 4 * (d + kv)    # q, o: [4,32]+[32,4]; k, v: [4,32]+[16,4]
    experts = 4 * (2 * 4 * (d + i) + 4 * (i + d))     # gate, up: [4,32]+[48,4]; down: [4,48]+[32,4]
    router = 4 * d
    assert trainable == layers * (attention + experts + router)
    assert total == trainable + sum(p.numel() for n, p in model.base_model.named_parameters()
                                    if not p.requires_grad)


def test_eval_is_deterministic_and_train_is_not():
    model = mixlora("llama", lora_dropout=0.3, jitter_noise=0.2)
    randomize_adapter(model)
    ids, mask = batch()
    model.eval()
    first = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(first, model(input_ids=ids, attention_mask=mask).logits)
    model.train()
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_generate_with_kv_cache_matches_full_recompute(model_type):
    model = mixlora(model_type).eval()
    randomize_adapter(model)
    ids, mask = batch(rows=2, pad_rows=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**kwargs)
    uncached = model.generate(**kwargs, use_cache=False)
    assert cached.shape[1] > ids.shape[1]
    assert torch.equal(cached, uncached)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = mixlora("llama")
    randomize_adapter(model)
    ids, mask = batch()
    model.train()

    def step():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}

    loss, grads = step()
    model.gradient_checkpointing_enable()
    assert model.base_model.is_activation_checkpointing
    loss_ckpt, grads_ckpt = step()
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_bf16_base_keeps_adapter_math_in_fp32():
    fp32 = mixlora("llama", seed=3)
    randomize_adapter(fp32)
    bf16 = copy.deepcopy(fp32)
    bf16.base_model.to(torch.bfloat16)
    for _, p in bf16.trainable_parameters():
        p.data = p.data.float()
    ids, mask = batch()
    out = bf16(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in bf16.router_logits())
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for _, p in bf16.trainable_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as TRL and Accelerate's bf16 run the forward
        autocast = fp32(input_ids=ids, attention_mask=mask, labels=ids)
    assert all(r.dtype == torch.float32 for r in fp32.router_logits()) and autocast.aux_loss.dtype == torch.float32
    ref = fp32(input_ids=ids, attention_mask=mask).logits
    assert (out.logits.float() - ref).abs().max() < 0.1


def test_gaussian_init_and_original_init():
    original = mixlora("llama", init_lora_weights="original", r=8)
    gaussian = mixlora("llama", init_lora_weights="gaussian", r=8)
    a_orig = original.base_model.model.layers[0].mlp.experts["up_proj"].lora_A
    a_gauss = gaussian.base_model.model.layers[0].mlp.experts["up_proj"].lora_A
    assert a_orig.abs().max() <= 1 / 32 ** 0.5  # kaiming-uniform(a=sqrt 5) bound 1/sqrt(in)
    assert abs(a_gauss.std().item() - 1 / 8) < 0.03  # N(0, 1/r^2)
    assert not torch.equal(a_orig[0], a_orig[1])  # each expert gets its own init
    assert all(p.abs().sum() == 0 for n, p in gaussian.trainable_parameters() if "lora_B" in n)


def test_real_tiny_llama_trains(stories_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stories_path)
    model = loramix.get_mixlora_model(base, MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2))
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1
