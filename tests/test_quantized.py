"""MixLoRA on bases quantised through bitsandbytes (4-bit NF4/FP4, double quantisation, 8-bit LLM.int8), on CPU.

A tiny LLaMA is saved once and loaded quantised by loramix's own loader (transformers' BitsAndBytesConfig);
bitsandbytes >= 0.50 runs its 4-bit and 8-bit layers on CPU tensors.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

pytest.importorskip("bitsandbytes", reason="bitsandbytes (pip install 'loramix[quant]') is not installed")

import loramix  # noqa: E402
from loramix import LoramixError, MixLoraConfig, MixLoraModel, export_moe, get_mixlora_model  # noqa: E402
from loramix.cli import main as cli_main  # noqa: E402
from loramix.commands import params as params_command  # noqa: E402
from loramix.convert.merge import merge_adapter  # noqa: E402
from loramix.io.base_model import load_base_model  # noqa: E402
from loramix.loading import attach_adapter  # noqa: E402
from loramix.nn.lora import LoraLinear  # noqa: E402
from loramix.nn.quantized import dense_weight, keep_canonical_layouts, model_quantization, quantization_of  # noqa: E402
from loramix.runconfig import ModelSpec, build_run_config  # noqa: E402
from loramix.tools.memory import Shape, estimate, frozen_weight_bytes, stored_bytes  # noqa: E402

from conftest import copy_into_peft, randomize_adapter, run_dispatch, tiny_config  # noqa: E402
from helpers_cli import tiny_llama_dir, tiny_run_config, toy_classification  # noqa: E402
from helpers_export import run_command  # noqa: E402

CASES = {
    "nf4": dict(quantization="nf4"),
    "nf4-double-bf16": dict(quantization="nf4", double_quant=True, dtype="bfloat16"),
    "fp4": dict(quantization="fp4"),
    "fp4-double": dict(quantization="fp4", double_quant=True),
    "int8": dict(quantization="int8"),
}
FP32_4BIT = ("nf4", "fp4", "fp4-double")
ADAPTER = dict(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=4, top_k=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA (hidden 64, FFN 128, 2 layers, GQA 4/2 heads, byte tokenizer) saved in fp32."""
    return tiny_llama_dir(tmp_path_factory.mktemp("quantized") / "base", hidden=64)


def quantized(base_dir, case: str):
    return load_base_model(ModelSpec(name_or_path=str(base_dir), **CASES[case]), "cpu")


def mixlora(base, *, seed: int = 0, **cfg):
    """MixLoRA on ``base`` with every tensor a function of ``seed`` (random B matrices and routers)."""
    torch.manual_seed(seed)
    model = get_mixlora_model(base, MixLoraConfig(**{**ADAPTER, **cfg}))
    randomize_adapter(model, seed=seed, std=0.3)
    return model


def tokens(seed: int = 0, rows: int = 3, length: int = 12):
    """``(input_ids, attention_mask, labels)``, the first row left-padded by 3 tokens."""
    ids = torch.randint(4, 260, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the largest entry of ``b``."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def twins(base_dir, case: str, **cfg):
    """(MixLoRA on the quantised base, the same adapter on the plain fp32 base holding the dequantised
    weights), in eval mode."""
    base = quantized(base_dir, case)
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in base.named_modules():
            if quantization_of(module):
                plain.get_submodule(name).weight.copy_(dense_weight(module))
    return mixlora(base, **cfg).eval(), mixlora(plain, **cfg).eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- building and training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_true_shapes_gradients_on_every_adapter_tensor_and_none_on_the_base(base_dir, case):
    base = quantized(base_dir, case)
    want = CASES[case]["quantization"]
    assert model_quantization(base) == want
    model = mixlora(base).train()
    for name, module in model.base_model.named_modules():
        if isinstance(module, LoraLinear):
            assert quantization_of(module.base_layer) == want
            assert module.lora_A.shape == (4, module.base_layer.in_features), name
            assert module.lora_B.shape == (module.base_layer.out_features, 4), name
    for layer in model.moe_layers():
        for name, loras in layer.experts.items():
            projection = layer.projection(name)
            assert quantization_of(projection) == want
            assert loras.lora_A.shape == (4, 4, projection.in_features)
            assert loras.lora_B.shape == (4, projection.out_features, 4)
    ids, mask, labels = tokens()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    adapter = dict(model.trainable_parameters())
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.values())
    base_params = [(n, p) for n, p in model.base_model.named_parameters() if n not in adapter]
    assert base_params and all(not p.requires_grad and p.grad is None for _, p in base_params)
    trainable, total = model.get_nb_trainable_parameters()
    plain_total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    assert total == plain_total + trainable  # 4-bit weights counted unpacked


@pytest.mark.parametrize("case", CASES)
def test_a_few_steps_lower_the_loss(base_dir, case):
    model = get_mixlora_model(quantized(base_dir, case), MixLoraConfig(**ADAPTER)).train()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2)
    ids, mask, labels = tokens()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("case", CASES)
def test_save_and_reload_give_identical_logits(base_dir, case, tmp_path):
    model = mixlora(quantized(base_dir, case)).eval()
    ids, mask, _ = tokens()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(MixLoraModel.from_pretrained(quantized(base_dir, case), tmp_path), ids, mask), before)


def test_adapter_files_move_between_quantised_and_plain_bases(base_dir, tmp_path):
    plain = mixlora(AutoModelForCausalLM.from_pretrained(base_dir))
    plain.save_pretrained(tmp_path / "from-plain")
    on_nf4 = MixLoraModel.from_pretrained(quantized(base_dir, "nf4"), tmp_path / "from-plain")
    on_nf4.save_pretrained(tmp_path / "from-nf4")
    on_plain = MixLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "from-nf4")
    on_int8 = MixLoraModel.from_pretrained(quantized(base_dir, "int8"), tmp_path / "from-nf4")
    theirs = dict(plain.trainable_parameters())
    for model in (on_nf4, on_plain, on_int8):
        assert {n: p.shape for n, p in model.trainable_parameters()} == {n: p.shape for n, p in theirs.items()}
        assert all(torch.equal(p, theirs[n]) for n, p in model.trainable_parameters())
    ids, mask, _ = tokens()  # plain -> nf4 -> files -> plain: the same model
    assert torch.equal(logits(on_plain.eval(), ids, mask), logits(plain.eval(), ids, mask))


# ---- dispatch parity and independent references -----------------------------------------------------------
@pytest.mark.parametrize("case", FP32_4BIT)
def test_every_dispatch_path_equals_the_reference_on_a_4bit_base(base_dir, case):
    model = mixlora(quantized(base_dir, case)).train()
    ids, mask, labels = tokens()
    ref, ref_grads = run_dispatch(model, "per_expert", input_ids=ids, attention_mask=mask, labels=labels)
    for dispatch in ("grouped", "dense"):
        out, grads = run_dispatch(model, dispatch, input_ids=ids, attention_mask=mask, labels=labels)
        assert relative(out.logits, ref.logits) < 1e-4 and abs(out.loss - ref.loss) < 1e-4
        assert max(relative(grads[n], ref_grads[n]) for n in grads) < 1e-4, dispatch


def test_dispatch_paths_on_an_8bit_base_agree_within_llm_int8s_own_error(base_dir):
    """LLM.int8() (bitsandbytes' kernels in eval mode, and in training on a GPU) quantises each matmul's input
    rows and takes outlier columns (|x| > 6 in any row) in fp16: the grouped and dense paths run the shared
    down projection once on the routing-weighted sum of the experts' activations, the reference once per
    expert on that expert's rows, so their int8 inputs differ. Measured here over 8 seeds: logits within
    4.7 % of their largest entry, all adapter gradients as one vector within 6 % (relative L2), while
    LLM.int8 itself is up to 10 % (logits) and 7.6 % (gradients) from the same adapter on its dequantised
    weights. In training mode on CPU bitsandbytes multiplies by the dequantised weight: the paths agree to
    fp32 round-off."""
    for seed in range(2):
        model = mixlora(quantized(base_dir, "int8"), seed=seed)
        ids, mask, labels = tokens(seed)
        for training, bound in ((False, (0.08, 0.1)), (True, (1e-4, 1e-4))):
            model.train(training)
            ref, ref_grads = run_dispatch(model, "per_expert", input_ids=ids, attention_mask=mask, labels=labels)
            want = torch.cat([g.flatten() for g in ref_grads.values()])
            for dispatch in ("grouped", "dense"):
                out, grads = run_dispatch(model, dispatch, input_ids=ids, attention_mask=mask, labels=labels)
                got = torch.cat([grads[n].flatten() for n in ref_grads])
                assert relative(out.logits, ref.logits) < bound[0], (seed, training, dispatch)
                assert ((got - want).norm() / want.norm()).item() < bound[1], (seed, training, dispatch)


@pytest.mark.parametrize("case", ["nf4", "fp4-double"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_one_expert_equals_peft_lora_and_dora_on_the_same_4bit_base(base_dir, case, use_dora):
    """HF PEFT's bitsandbytes LoRA / DoRA layers are the independent reference; DoRA's magnitudes start at the
    dequantised weights' row norms in both."""
    model = get_mixlora_model(quantized(base_dir, case),
                              MixLoraConfig(**{**ADAPTER, "num_experts": 1, "top_k": 1, "use_dora": use_dora}))
    peft_model = get_peft_model(quantized(base_dir, case), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    inner = peft_model.base_model.model
    keep_canonical_layouts(inner)  # as MixLoRA and k-bit preparation do: no bf16 repacking in eval mode
    magnitudes = [(n, p) for n, p in model.trainable_parameters() if n.endswith("lora_magnitude")]
    assert len(magnitudes) == (14 if use_dora else 0)
    for name, ours in magnitudes:
        theirs = inner.get_submodule(name.rsplit(".", 1)[0].replace(".experts.", ".")).lora_magnitude_vector
        torch.testing.assert_close(ours.detach().reshape(-1), theirs["default"].weight.detach(), rtol=1e-6, atol=1e-6)
    randomize_adapter(model, std=0.3)
    copy_into_peft(model, peft_model)
    ids, mask, _ = tokens()
    assert relative(logits(model.eval(), ids, mask), logits(peft_model.eval(), ids, mask)) < 1e-5


def test_train_and_eval_mode_compute_the_same_function(base_dir):
    """bitsandbytes repacks a 4-bit weight for a bf16 kernel at its first eval-mode forward on AVX512-BF16 CPUs;
    a MixLoRA model keeps the canonical packing, so eval logits are the training forward's and training after
    an evaluation still reaches every adapter tensor through the base projections."""
    model = mixlora(quantized(base_dir, "nf4"))
    ids, mask, labels = tokens()
    evaluated = logits(model.eval(), ids, mask)
    assert torch.equal(evaluated, logits(model.train(), ids, mask))
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.trainable_parameters())


# ---- k-bit preparation ------------------------------------------------------------------------------------------
def test_prepare_upcasts_fp16_only_and_checkpointing_keeps_the_gradients(base_dir):
    fp16 = load_base_model(ModelSpec(name_or_path=str(base_dir), dtype="float16", quantization="nf4"), "cpu")
    loramix.prepare_model_for_kbit_training(fp16, use_gradient_checkpointing=False)
    norms = [p for n, p in fp16.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert fp16.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.uint8 for n, p in fp16.named_parameters() if n.endswith("proj.weight"))
    bf16 = loramix.prepare_model_for_kbit_training(quantized(base_dir, "nf4-double-bf16"),
                                                   use_gradient_checkpointing=False)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16

    ids, mask, labels = tokens()

    def gradients(model):
        return run_dispatch(model, "grouped", input_ids=ids, attention_mask=mask, labels=labels)[1]

    # Reentrant checkpointing runs the layers under no_grad, so the router loss (on the recorded router logits)
    # cannot reach the routers through it: compare without the router loss.
    want = gradients(mixlora(quantized(base_dir, "nf4"), router_loss=False).train())
    for kwargs in ({}, {"use_reentrant": True}):
        model = loramix.prepare_model_for_kbit_training(mixlora(quantized(base_dir, "nf4"), router_loss=False).train(),
                                                        gradient_checkpointing_kwargs=kwargs)
        assert model.base_model.is_activation_checkpointing
        grads = gradients(model)
        assert grads.keys() == want.keys()
        assert max(relative(grads[n], want[n]) for n in want) < 1e-4, kwargs
    model.base_model.disable_input_require_grads()  # what the reentrant kind needs them for: no graph at all
    with pytest.raises(RuntimeError, match="does not require grad"), \
            pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        gradients(model)


# ---- merge and export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nf4", "fp4-double", "int8"])
def test_export_folds_into_the_dequantised_weights(base_dir, case, tmp_path):
    """The export holds the dequantised weights with the experts folded in: equal (fp32 round-off) to the adapter
    on the dequantised base, and for 4-bit to the quantised model itself (its forward is ``x W_deq^T``); LLM.int8
    also quantises the activations, which no dense checkpoint does."""
    model, reference = twins(base_dir, case)
    summary = export_moe(model, tmp_path / "moe")
    assert summary.base_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    assert "quantization_config" not in json.loads((tmp_path / "moe" / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids, mask, _ = tokens()
    assert relative(logits(exported, ids, mask), logits(reference, ids, mask)) < 1e-5
    if case != "int8":
        assert relative(logits(exported, ids, mask), logits(model, ids, mask)) < 1e-5


@pytest.mark.parametrize("case", ["nf4", "int8"])
def test_merge_from_a_quantised_base(base_dir, case, tmp_path):
    """One expert: the whole adapter folds into a dense model; several: the attention LoRAs fold into dense
    projections (in place too) and the experts stay as an adapter on the merged model."""
    ids, mask, _ = tokens()
    single, reference = twins(base_dir, case, num_experts=1, top_k=1)
    merge_adapter(single, tmp_path / "all")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "all").eval()
    assert relative(logits(dense, ids, mask), logits(reference, ids, mask)) < 1e-5

    model, reference = twins(base_dir, case)
    summary = merge_adapter(model, tmp_path / "attention", what="attention")
    assert not any(quantization_of(m) for n, m in model.base_model.named_modules() if "self_attn." in n)
    rebuilt = MixLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "attention"),
                                           summary.adapter_path)
    assert relative(logits(rebuilt, ids, mask), logits(reference, ids, mask)) < 1e-5
    if case != "int8":
        assert relative(logits(model, ids, mask), logits(reference, ids, mask)) < 1e-5


def test_merge_refuses_a_quantised_conv1d_base(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2", n_embd=64)).save_pretrained(tmp_path / "gpt2")
    base = load_base_model(ModelSpec(name_or_path=str(tmp_path / "gpt2"), quantization="nf4"), "cpu")
    model = mixlora(base, num_experts=1, top_k=1)
    with pytest.raises(LoramixError, match=r"store its Conv1D weights as \[in, out\]"):
        merge_adapter(model, tmp_path / "merged")


def test_export_command_loads_the_base_quantised(base_dir, tmp_path):
    from loramix.commands import export as export_command

    model = mixlora(quantized(base_dir, "nf4")).eval()
    model.save_pretrained(tmp_path / "adapter")
    run_command(export_command, ["export", str(tmp_path / "moe"), "--model", str(base_dir), "--adapter",
                                 str(tmp_path / "adapter"), "--quantization", "nf4"])
    ids, mask, _ = tokens()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert relative(logits(exported, ids, mask), logits(model, ids, mask)) < 1e-5


# ---- loading, config and CLI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_keys, message", [
    ({"quantization": "nf3"}, r"model.quantization must be one of nf4, fp4, int8, found 'nf3'"),
    ({"quantization": "int8", "double_quant": True}, r"model.double_quant .* needs model.quantization nf4 or fp4, "
                                                     r"found int8"),
    ({"double_quant": True}, r"needs model.quantization nf4 or fp4, found none"),
])
def test_bad_quantisation_keys(base_dir, model_keys, message):
    raw = tiny_run_config(base_dir, base_dir / "none.jsonl", base_dir / "out")
    raw["model"].update(model_keys)
    with pytest.raises(LoramixError, match=message):
        build_run_config(raw)


def test_missing_or_old_bitsandbytes_and_bases_that_cannot_take_it(base_dir, tmp_path, monkeypatch):
    spec = ModelSpec(name_or_path=str(base_dir), quantization="nf4")
    real_version = importlib.metadata.version

    def version(name, found):
        if name != "bitsandbytes":
            return real_version(name)
        if found is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return found

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, None))
    with pytest.raises(LoramixError, match=r"needs bitsandbytes, which is not installed: pip install 'loramix\[quant"):
        load_base_model(spec)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version(name, "0.42.0"))
    with pytest.raises(LoramixError, match=r"needs bitsandbytes >= 0.50, found 0.42.0"):
        load_base_model(spec)
    monkeypatch.undo()
    with pytest.raises(LoramixError, match=r"a .gguf base is already quantised in its own format"):
        load_base_model(ModelSpec(name_or_path=str(tmp_path / "model.gguf"), quantization="int8"))
    saved = tmp_path / "prequantised"
    quantized(base_dir, "nf4").save_pretrained(saved)
    with pytest.raises(LoramixError, match=r"is already quantised \(bitsandbytes\); drop model.quantization"):
        load_base_model(ModelSpec(name_or_path=str(saved), quantization="nf4"))
    assert model_quantization(load_base_model(ModelSpec(name_or_path=str(saved)), "cpu")) == "nf4"  # as saved


def test_loramix_train_on_an_nf4_base_end_to_end(base_dir, tmp_path, capsys):
    raw = tiny_run_config(base_dir, toy_classification(tmp_path / "toy.jsonl"), tmp_path / "run", max_steps=6)
    raw["model"].update(quantization="nf4", double_quant=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert cli_main(["train", str(tmp_path / "run.yaml")]) == 0
    assert "nf4 base: gradient checkpointing on (train.gradient_checkpointing)" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    adapter = str(tmp_path / "run" / "adapter")
    for base in (AutoModelForCausalLM.from_pretrained(base_dir), quantized(base_dir, "nf4")):
        assert isinstance(attach_adapter(base, adapter), MixLoraModel)


def test_fsdp_over_a_quantised_base_is_refused_before_loading(base_dir, tmp_path):
    from loramix.training import trainer

    raw = tiny_run_config(base_dir, toy_classification(tmp_path / "toy.jsonl"), tmp_path / "run", fsdp=True)
    raw["model"]["quantization"] = "nf4"
    with pytest.raises(LoramixError, match=r"model.quantization nf4 under FSDP is not supported"):
        trainer.train(build_run_config(raw), echo=lambda _: None)


def test_generate_command_with_quantization_flag(base_dir, tmp_path, capsys):
    mixlora(quantized(base_dir, "nf4")).save_pretrained(tmp_path / "adapter")
    assert cli_main(["generate", "--model", str(base_dir), "--quantization", "nf4", "--adapter",
                     str(tmp_path / "adapter"), "--prompt", "hi", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "### output" in capsys.readouterr().out


# ---- memory ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nf4", "nf4-double-bf16", "int8"])
def test_frozen_weight_bytes_equal_what_bitsandbytes_stores(base_dir, case):
    base = quantized(base_dir, case)
    shape = Shape.from_hf_config(base.config)
    assert shape.tied and shape.kv_heads == 2
    dtype_bytes = 2 if CASES[case].get("dtype") == "bfloat16" else 4
    assert stored_bytes(base) == frozen_weight_bytes(shape, quantization=CASES[case]["quantization"],
                                                      double_quant=CASES[case].get("double_quant", False),
                                                      weight_bytes=dtype_bytes)


def test_params_command_reports_memory_at_4bit_against_bf16(base_dir, tmp_path, capsys):
    raw = tiny_run_config(base_dir, base_dir / "none.jsonl", tmp_path / "out")
    raw["model"].update(quantization="nf4", double_quant=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    run_command(params_command, ["params", str(tmp_path / "run.yaml"), "--json"])
    rows = json.loads(capsys.readouterr().out)["memory"]
    assert [(r["base"], r["checkpointing"]) for r in rows] == [("bf16", False), ("bf16", True), ("nf4", False),
                                                                ("nf4", True)]
    shape = Shape.from_hf_config(AutoModelForCausalLM.from_pretrained(base_dir).config)
    want = estimate(shape, batch=4, seq=96, r=4, experts=4, top_k=2, dropout=True, checkpointing=True,
                    quantization="nf4", double_quant=True)
    assert {k: rows[3][k] for k in dataclasses.asdict(want)} == dataclasses.asdict(want)
    assert rows[3]["total"] == want.total
    assert rows[2]["weights"] < rows[0]["weights"] and rows[1]["activations"] < rows[0]["activations"]
    run_command(params_command, ["params", str(tmp_path / "run.yaml")])
    assert "nf4+dq" in capsys.readouterr().out
