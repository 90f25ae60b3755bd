"""Top-p and switch routing: selection on hand-made rows, capacity, their losses, the fast path against the
per-expert path and against per-expert PEFT LoRA MLPs, configs and files, and every variant training."""

import json
import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

import loramix
from loramix import LoramixError, MixLoraConfig
from loramix.nn.routing import NO_EXPERT, SwitchRouter, TopPRouter, build_router, load_balancing_loss, route_top_p, \
    top_p_mask, within_capacity, z_loss

from conftest import batch, hf_mlp, randomize_adapter, run_dispatch, tiny_model


def variant(model_type="llama", *, seed=0, **cfg):
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4)
    return loramix.get_mixlora_model(tiny_model(model_type, seed=seed), MixLoraConfig(**{**defaults, **cfg}))


# ---- top-p selection on hand-made probability rows ----------------------------------------------------------
@pytest.mark.parametrize("row, top_p, kept", [
    ([0.5, 0.25, 0.125, 0.125], 0.75, [0, 1, 2]),      # cumulative 0.75 is not > 0.75: the next one crosses
    ([0.5, 0.25, 0.125, 0.125], 0.7, [0, 1]),          # 0.75 > 0.7: the crossing expert is included
    ([0.125, 0.5, 0.25, 0.125], 0.25, [1]),            # the first expert alone crosses: exactly one
    ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1, 2]),        # ties: lower expert id first
    ([0.125, 0.375, 0.375, 0.125], 0.3, [1]),          # a tie at the top: the lower id
    ([0.125, 0.375, 0.375, 0.125], 0.5, [1, 2]),
    ([0.5, 0.25, 0.25, 0.0], 1.0, [0, 1, 2, 3]),       # never above top_p: all kept, zero-probability one too
])
def test_top_p_selection(row, top_p, kept):
    probs = torch.tensor([row])
    sorted_probs, order, keep = top_p_mask(probs, top_p)
    assert order[0][keep[0]].tolist() == kept
    weights, experts, _ = route_top_p(probs, top_p)
    assert experts[0, :len(kept)].tolist() == kept
    assert weights[0].tolist() == [row[e] for e in kept] + [0.0] * (weights.shape[1] - len(kept))


def test_route_top_p_pads_rows_to_the_longest_selection_with_zero_weights():
    probs = torch.tensor([[0.75, 0.125, 0.0625, 0.0625], [0.25, 0.25, 0.25, 0.25]])
    weights, experts, _ = route_top_p(probs, 0.5)
    assert weights.tolist() == [[0.75, 0.0, 0.0], [0.25, 0.25, 0.25]]     # not renormalised
    assert experts.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_top_p_temperature_divides_the_logits():
    model = variant(routing="top_p", top_p=0.9, temperature=2.0)
    router = model.moe_layers()[0].router
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    record = router(x)
    weights, experts = record.weights, record.experts
    probs = torch.softmax(x @ router.weight.T / 2.0, dim=-1)
    torch.testing.assert_close(weights.sum(-1), probs.gather(1, experts).sum(-1))
    assert (weights.sum(-1) > 0.9 - 1e-6).all() and (weights.sum(-1) <= 1 + 1e-6).all()


def test_recorded_selections_follow_the_routing():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0625, 0.0625, 0.125, 0.75]]))

    def selected(**cfg):
        return build_router(MixLoraConfig(num_experts=4, **cfg), 8).eval().route(logits).selected.tolist()

    assert selected(routing="top_p", top_p=0.6) == [[1, 1, 0, 0], [0, 0, 0, 1]]
    assert selected(top_k=2) == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert selected(routing="switch") == [[1, 0, 0, 0], [0, 0, 0, 1]]


# ---- switch capacity ----------------------------------------------------------------------------------------
def test_within_capacity_counts_per_sequence_earlier_tokens_first():
    experts = torch.tensor([[0, 0, 0, 1, 0], [1, 1, 0, 1, 1]])
    assert within_capacity(experts, 3, 2).tolist() == [[True, True, False, True, False],
                                                        [True, True, True, False, False]]


def test_capacity_rule():
    router = SwitchRouter(8, 4, capacity_factor=1.25, expert_capacity=None, jitter_noise=0.0, init_range=1.0)
    assert router.capacity(10) == math.ceil(1.25 * 10 / 4) == 4
    router.expert_capacity = 2
    assert router.capacity(10) == 2


@pytest.mark.parametrize("dispatch", loramix.DISPATCHES)
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_switch_overflow_gets_the_frozen_ffn_in_training_and_nothing_is_dropped_in_eval(model_type, dispatch):
    model = variant(model_type, routing="switch", jitter_noise=0.0, capacity_factor=1.0)
    randomize_adapter(model)
    model.set_dispatch(dispatch)
    ffn = model.moe_layers()[0]
    with torch.no_grad():
        ffn.router.weight.zero_()  # uniform probabilities: every token picks expert 0 with weight 1/4
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        frozen = hf_mlp(model_type)(x) / 4       # transformers' own MLP
        ffn.router.train()                       # capacity applies in training (dropouts stay off to compare)
        got = ffn(x)
        capacity = math.ceil(8 / 4)
        torch.testing.assert_close(got[:, capacity:], frozen[:, capacity:], rtol=1e-6, atol=1e-6)
        assert (got[:, :capacity] - frozen[:, :capacity]).abs().amax() > 1e-3   # the expert delta is there
        ffn.router.eval()
        evaluated = ffn(x)
        expert0 = _expert_mlps(ffn, model_type)[0](x) / 4
    torch.testing.assert_close(evaluated[:, :capacity], got[:, :capacity])
    torch.testing.assert_close(evaluated, expert0, rtol=1e-5, atol=1e-6)


def test_switch_jitter_reaches_the_router_only_and_only_in_training():
    model = variant(routing="switch")          # reference defaults: jitter 0.01, init range 1.0
    ffn = model.moe_layers()[0]
    assert ffn.router.jitter_noise == 0.01
    assert ffn.router.weight.std().item() == pytest.approx(1.0, rel=0.2)
    x = torch.randn(1, 6, 32)
    ffn.eval()
    assert torch.equal(ffn.router(x[0]).logits, ffn.router(x[0]).logits)
    ffn.train()
    u = x[0]
    assert ffn.router.jitter(u) is u  # the experts see the FFN input unchanged
    assert not torch.equal(ffn.router(x[0]).logits, ffn.router(x[0]).logits)


# ---- against the per-expert path and against per-expert PEFT MLPs ---------------------------------------------
def _expert_mlps(ffn, model_type):
    """Expert e as transformers' MLP with PEFT's LoRA carrying expert e's weights on the targeted projections
    (``ffn``: layer 0 of a ``variant(model_type)``)."""
    gpt2 = model_type == "gpt2"
    mlps = []
    for e in range(ffn.num_experts):
        lora = next(iter(ffn.experts.values()))
        mlp = inject_adapter_in_model(LoraConfig(r=lora.rank, lora_alpha=lora.scaling * lora.rank, lora_dropout=0.0,
                                                 target_modules=list(ffn.experts), fan_in_fan_out=gpt2),
                                      hf_mlp(model_type)).eval()
        with torch.no_grad():
            for name, expert_lora in ffn.experts.items():
                getattr(mlp, name).lora_A["default"].weight.copy_(expert_lora.lora_A[e])
                getattr(mlp, name).lora_B["default"].weight.copy_(expert_lora.lora_B[e])
        mlps.append(mlp)
    return mlps


def _formula(ffn, model_type, x, select):
    """``sum over select(probability row) of (expert, weight)`` of the expert MLPs, token by token."""
    mlps = _expert_mlps(ffn, model_type)
    rows = x.reshape(-1, x.shape[-1])
    out = []
    for token, probs in zip(rows, torch.softmax(rows @ ffn.router.weight.T, dim=-1)):
        out.append(sum(weight * mlps[e](token[None]) for e, weight in select(probs.tolist(), probs)))
    return torch.cat(out).view_as(x)


def _hand_top_p(top_p):
    def select(row, probs):
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        kept, total = [], 0.0
        for e in order:
            kept.append(e)
            total += row[e]
            if total > top_p:
                break
        return [(e, probs[e]) for e in kept]
    return select


def _hand_switch(row, probs):
    best = max(range(len(row)), key=lambda e: (row[e], -e))
    return [(best, probs[best])]


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
@pytest.mark.parametrize("routing", ["top_p", "switch"])
def test_variant_equals_its_formula_on_peft_expert_mlps(model_type, routing):
    extra = dict(top_p=0.6) if routing == "top_p" else {}
    model = variant(model_type, routing=routing, num_experts=4, **extra).eval()
    randomize_adapter(model)
    ffn = model.moe_layers()[0]
    with torch.no_grad():
        ffn.router.weight.mul_(0.3)   # flatter routing: top-p keeps several experts
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    select = _hand_top_p(0.6) if routing == "top_p" else _hand_switch
    with torch.no_grad():
        expected = _formula(ffn, model_type, x, select)
        for dispatch in loramix.DISPATCHES:
            ffn.dispatch = dispatch
            torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-5, msg=dispatch)


@pytest.mark.parametrize("model_type", ["llama", "phi", "phi3", "gpt2"])
@pytest.mark.parametrize("cfg", [dict(routing="top_p", top_p=0.7), dict(routing="switch", capacity_factor=1.0)],
                         ids=["top_p", "switch"])
@pytest.mark.parametrize("fast_dispatch", ["grouped", "grouped_mm", "dense"])
def test_fast_path_equals_the_per_expert_reference_in_training(model_type, cfg, fast_dispatch):
    model = variant(model_type, jitter_noise=0.0, **cfg)
    randomize_adapter(model)
    for ffn in model.moe_layers():
        with torch.no_grad():
            ffn.router.weight.mul_(0.3)
    ids, mask = batch(pad_rows=2)
    labels = ids.masked_fill(mask == 0, -100)
    for ffn in model.moe_layers():
        ffn.router.train()  # switch capacity is a training rule; the model's dropouts stay off to compare

    over_capacity = []
    hooks = [ffn.router.register_forward_hook(lambda m, args, out: over_capacity.append((out.experts == NO_EXPERT).any()))
             for ffn in model.moe_layers()]
    fast, fast_grads = run_dispatch(model, fast_dispatch, input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_grads = run_dispatch(model, "per_expert", input_ids=ids, attention_mask=mask, labels=labels)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if cfg["routing"] == "switch":  # capacity ceil(9/4) = 3 per sequence: some tokens went over it
        assert any(over_capacity)


# ---- aux losses ---------------------------------------------------------------------------------------------
def test_top_p_aux_loss_equals_a_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0625, 0.0625, 0.125, 0.75], [0.25] * 4]))
    mask = torch.tensor([1, 1, 0])
    # top_p 0.6: row 0 keeps {0, 1}, row 1 keeps {3}; row 2 is padding.
    fraction = torch.tensor([1, 1, 0, 1]) / 2
    mean_prob = (torch.tensor([0.5, 0.25, 0.125, 0.125]) + torch.tensor([0.0625, 0.0625, 0.125, 0.75])) / 2
    expected = 4 * (fraction * mean_prob).sum()
    record = TopPRouter(4, 4, top_p=0.6, temperature=1.0, init_range=0.02).route(logits).with_token_mask(mask)
    got = load_balancing_loss([record])
    torch.testing.assert_close(got, expected)


def test_switch_loss_adds_the_z_loss():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([1, 1, 0])
    z = torch.stack([torch.logsumexp(r, 0) ** 2 for r in logits[:2]]).mean()
    record = SwitchRouter(3, 3, capacity_factor=1.0, expert_capacity=None, jitter_noise=0.0, init_range=1.0).eval()
    torch.testing.assert_close(z_loss([record.route(logits).with_token_mask(mask)]), z)
    model = variant(routing="switch", router_aux_loss_coef=0.01, router_z_loss_coef=0.1)
    ids, mask = batch()
    model.eval()
    out = model(input_ids=ids, attention_mask=mask)
    records = [r.with_token_mask(mask.reshape(-1)) for r in model.routing]
    expected = 0.01 * load_balancing_loss(records) + 0.1 * z_loss(records)
    torch.testing.assert_close(out.aux_loss, expected)


# ---- eval and generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(routing="top_p", top_p=0.5), dict(routing="switch")], ids=["top_p", "switch"])
def test_generation_with_the_kv_cache_equals_full_forwards(cfg):
    model = variant(**cfg)
    randomize_adapter(model, std=0.3)
    model.eval()
    ids, _ = batch(rows=2, pad_rows=0)
    generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = ids
    with torch.no_grad():
        for _ in range(6):
            next_token = model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


# ---- configs and files ----------------------------------------------------------------------------------------
def test_reads_the_reference_dynamic_and_switch_configs(tmp_path):
    common = {"bias": "none", "peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
              "target_modules": ["q_proj", "gate_proj"], "num_experts": 8, "act_fn": "silu"}
    dynamic = MixLoraConfig.from_dict({**common, "routing_strategy": "mixlora-dynamic", "top_p": 0.8,
                                       "temperature": 0.0})
    assert (dynamic.routing, dynamic.top_p, dynamic.temperature, dynamic.top_k) == ("top_p", 0.8, 1.0, None)
    switch = MixLoraConfig.from_dict({**common, "routing_strategy": "mixlora-switch", "expert_capacity": 32,
                                      "sparse_step": None})
    assert (switch.routing, switch.top_k, switch.expert_capacity) == ("switch", 1, 32)
    assert (switch.router_init_range, switch.jitter_noise, switch.router_z_loss_coef) == (1.0, 0.01, 0.001)
    with pytest.warns(UserWarning, match="divides the router logits"):
        warm = MixLoraConfig.from_dict({**common, "routing_strategy": "mixlora-dynamic", "temperature": 0.5})
    assert warm.temperature == 0.5
    for cfg in (dynamic, switch):
        assert MixLoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("data, message", [
    ({"routing": "topp"}, "unknown routing 'topp'; did you mean 'top_p'?"),
    ({"routing": "top_p", "top_k": 2}, "'top_k' is not used by routing 'top_p'"),
    ({"routing": "top_p", "top_p": 0}, "'top_p' must be > 0"),
    ({"routing": "top_p", "top_p": 1.5}, "'top_p' must be <= 1"),
    ({"routing": "switch", "top_k": 2}, "'top_k' must be 1 with routing 'switch'"),
    ({"routing": "switch", "capacity_factor": 0}, "'capacity_factor' must be > 0"),
    ({"routing": "switch", "expert_capacity": 0}, "'expert_capacity' must be >= 1"),
    ({"temperature": 0}, "'temperature' must be > 0"),
    ({"use_dora": 1}, "'use_dora' must be true or false"),
    ({"expert_lora": {"use_dora": "yes"}}, "'expert_lora.use_dora' must be true or false"),
    ({"expert_lora": {"init_lora_weights": "pissa"}}, "'expert_lora.init_lora_weights' must be one of"),
    ({"routing": "top_k", "routing_strategy": "mixlora-switch"}, "routing 'top_k' contradicts routing_strategy"),
])
def test_bad_variant_values_name_the_field(data, message):
    with pytest.raises(LoramixError) as info:
        MixLoraConfig.from_dict(data)
    assert message in str(info.value)


def test_expert_lora_settings_reach_the_experts_and_both_files(tmp_path):
    cfg = dict(r=4, lora_alpha=8, expert_lora={"r": 2, "lora_alpha": 6, "use_rslora": True, "lora_init": "gaussian"})
    config = MixLoraConfig.from_dict({**cfg, "num_experts": 4})
    assert config.expert_lora == {"r": 2, "lora_alpha": 6, "use_rslora": True, "init_lora_weights": "gaussian"}
    model = loramix.get_mixlora_model(tiny_model("llama"), config)
    up = model.moe_layers()[0].experts["up_proj"]
    assert up.rank == 2 and up.scaling == 6 / math.sqrt(2)
    assert model.base_model.model.layers[0].self_attn.q_proj.scaling == 2.0
    randomize_adapter(model)
    model.save_pretrained(tmp_path, format="moe-peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["expert_lora"] == {"bias": "none", "r": 2, "lora_alpha": 6, "lora_dropout": 0.05,
                                      "use_rslora": True}
    loaded = loramix.MixLoraModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.moe_layers()[0].experts["up_proj"].scaling == up.scaling
    model.eval()
    ids, mask = batch()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("fmt", ["loramix", "moe-peft"])
@pytest.mark.parametrize("cfg", [dict(routing="top_p", top_p=0.7), dict(routing="switch", expert_capacity=5)],
                         ids=["top_p", "switch"])
def test_variant_round_trips_in_both_formats(tmp_path, fmt, cfg):
    model = variant("phi", **cfg)
    randomize_adapter(model)
    model.eval()
    model.save_pretrained(tmp_path, format=fmt)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {"top_p": "mixlora-dynamic", "switch": "mixlora-switch"}[cfg["routing"]]
    assert written["routing_strategy"] == expected
    if fmt == "moe-peft":
        assert "routing" not in written and "top_k" not in written
        assert written.get("expert_capacity") == cfg.get("expert_capacity")
        assert written.get("temperature", 0.0) == 0.0
    loaded = loramix.MixLoraModel.from_pretrained(tiny_model("phi"), tmp_path)
    assert (loaded.mixlora_config.routing, loaded.mixlora_config.top_p,
            loaded.mixlora_config.expert_capacity) == (cfg["routing"], model.mixlora_config.top_p,
                                                       cfg.get("expert_capacity"))
    ids, mask = batch()
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits)


def test_moe_peft_format_refuses_a_temperature_it_would_misread(tmp_path):
    model = variant(routing="top_p", temperature=0.5)
    with pytest.raises(LoramixError, match="temperature 0.5 cannot be written in the moe-peft format"):
        model.save_pretrained(tmp_path, format="moe-peft")


# ---- every variant trains -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    dict(use_dora=True),                                        # MixDoRA, top-k
    dict(routing="top_p", top_p=0.6),
    dict(routing="switch", capacity_factor=1.0),
    dict(routing="top_p", top_p=0.6, use_dora=True),
    dict(routing="switch", use_dora=True, expert_capacity=2),
], ids=["mixdora", "top_p", "switch", "top_p-dora", "switch-dora"])
def test_each_variant_trains_with_falling_loss(cfg):
    model = variant("llama", r=8, lora_alpha=16, num_experts=4, **cfg)
    model.train()
    ids = (torch.arange(4)[:, None] * 5 + torch.arange(12)[None] * 3) % 90 + 3   # a learnable pattern
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    losses = []
    for _ in range(10):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.25, losses
    assert all(p.grad is not None for _, p in model.trainable_parameters())


@pytest.mark.parametrize("routing", ["top_p", "switch"])
def test_routing_variants_train_through_loramix_train(tmp_path, routing):
    """The trainer's router loss and load log follow the routing (top-p has no top_k)."""
    import yaml
    from helpers_cli import tiny_llama_dir, tiny_run_config, toy_classification

    from loramix.runconfig import build_run_config
    from loramix.training.trainer import train

    raw = tiny_run_config(tiny_llama_dir(tmp_path / "model"), toy_classification(tmp_path / "toy.jsonl"),
                          tmp_path / "run", max_steps=3)
    raw["adapter"].pop("top_k")
    raw["adapter"]["routing"] = routing
    assert train(build_run_config(raw), echo=lambda _: None).steps == 3
    log = [yaml.safe_load(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 and 0 < r["router_balance"] <= 1 for r in log), log
